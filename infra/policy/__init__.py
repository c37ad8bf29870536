"""The celery-fleet policy pack (run by Pulumi from this directory; rules in rules.py)."""
