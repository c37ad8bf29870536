"""`fleet ops`: Fabric tasks on a fleet's hosts over SSH.

    tasks.py    the ops tasks: plain functions of a Fabric Connection, one host each
    hosts.py    which hosts (a stack's group by tag, or a list) and how to reach them
    rolling.py  running a task on hosts a few at a time, stopping at the first failure

The command line is in scripts/cli/ops.py; it only assembles these.
"""
