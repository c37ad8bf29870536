"""A fleet on this machine: what `fleet local` and `fleet demo` run, and what the tests use.

    fleet.py       LocalFleet: the servers and N pinned worker instances, supervised
    servers.py     redis-server and rabbitmq-server on free ports with private passwords
    tls.py         a throwaway CA for `--tls`
    processes.py   ports, process groups, and stopping them
    autoscaler.py  the shared policy (app/autoscale.py) starting and draining instances
    flower.py      Flower beside the fleet (`--flower`)

The fleet's state file (where `fleet run` finds it) is read by
app/launcher/discovery.py, which also says where it is.
"""
