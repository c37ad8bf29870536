"""`python -m app.agent`: the drain agent beside the worker on an EC2 instance (app/host/agent.py).

A stable entry point: the systemd unit app.boot writes runs it by this name.
"""

from app.host.agent import main

if __name__ == "__main__":
    raise SystemExit(main())
