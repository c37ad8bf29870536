"""`python -m app.boot`: configure and run this host's worker (the code is in app/host/).

A stable entry point: user-data written by an older fleet-boot.sh, the
Ansible role and `fleet ops` run it by this name.
"""

from app.host.boot import main

if __name__ == "__main__":
    raise SystemExit(main())
