"""On a worker host, outside Celery: boot (configure and run the worker) and the drain agent.

    boot.py       `python -m app.boot`: the command line over the modules below
    configure.py  settings -> environment file -> units -> started, idempotently
    paths.py      where a host keeps its files
    envfile.py    the environment file systemd reads
    command.py    the worker's command line, built in one place
    units.py      the systemd units of the worker and the drain agent
    service.py    the worker as a service: systemd's unit, or a pidfile
    status.py     what the host runs; waiting until its worker answers
    agent.py      `python -m app.agent`: scale-in protection, the termination hook, Spot notices
    imds.py       the instance metadata client (IMDSv2)

Nothing here imports the launcher (tests/unit/test_imports.py). `python -m
app.boot` and `python -m app.agent` stay the entry points (app/boot.py,
app/agent.py: two lines each).
"""
