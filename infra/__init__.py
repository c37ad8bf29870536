"""The celery-fleet Pulumi program: one ComponentResource per concern, wired in program.py."""
