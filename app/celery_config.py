"""Celery configuration for the fleet: one readable block of production defaults.

Shared by every Celery client of a fleet: the workers (app/worker/celery_app.py),
the launcher, which publishes its batches through a Celery app configured the
same way, and plain Celery clients.
"""

from __future__ import annotations

import functools
import ssl
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from app.cpus import worker_concurrency
from app.names import TASK_ENTRY_POINTS
from app.settings import Settings, query_options, redis_tls_options

# Modules every worker imports: the batch task (with the heartbeat) and the example tasks.
WORKER_MODULES = ("app.worker.task",)
# The modules whose functions a job may name as module:function (app/registry.py),
# besides FLEET_INCLUDE's. The worker's own modules are not among them.
TASK_MODULES = ("app.tasks",)


@functools.cache
def entry_point_modules() -> dict[str, str]:
    """Task modules the installed projects declare: module -> the project declaring it.

    A project names them in the entry-point group `celery_fleet.tasks`
    (`[project.entry-points."celery_fleet.tasks"] mytasks = "myproj.tasks"`), the way
    plugins are found in Python packaging; a value's `:attribute`, if any, is ignored
    (the module is what is imported). Read once per process: what is installed does
    not change under a running worker.
    """
    found: dict[str, str] = {}
    for ep in metadata.entry_points(group=TASK_ENTRY_POINTS):
        module = ep.value.partition(":")[0].strip()
        dist = getattr(ep, "dist", None)
        found.setdefault(module, dist.name if dist is not None else ep.name)
    return found


def task_module_origins(settings: Settings) -> dict[str, str]:
    """Every module whose tasks the workers run, with who asked for it: the kit's, the
    installed projects' (entry points) and FLEET_INCLUDE's, each once, in that order."""
    origins = dict.fromkeys(TASK_MODULES, "this kit")
    for module, project in entry_point_modules().items():
        origins.setdefault(module, f"project {project}, entry point group {TASK_ENTRY_POINTS}")
    for module in settings.include:
        origins.setdefault(module, "FLEET_INCLUDE")
    return origins


def task_modules(settings: Settings) -> tuple[str, ...]:
    """The modules of `task_module_origins`, in its order."""
    return tuple(task_module_origins(settings))


def result_backend(settings: Settings) -> dict[str, Any]:
    """Celery's own result backend (for plain group/chunks/chord use) on the result store."""
    parts = urlsplit(settings.result_url)
    if parts.scheme == "s3":
        opts = query_options(settings.result_url)
        prefix = parts.path.strip("/")
        conf: dict[str, Any] = {
            "result_backend": "s3",
            "s3_bucket": parts.hostname,
            "s3_base_path": f"{prefix}/celery/" if prefix else "celery/",
        }
        if opts.get("region"):
            conf["s3_region"] = opts["region"]
        if opts.get("endpoint_url"):
            conf["s3_endpoint_url"] = opts["endpoint_url"]
        return conf
    return {"result_backend": settings.result_url}


def tls_config(settings: Settings) -> dict[str, Any]:
    """broker_use_ssl / redis_backend_use_ssl for amqps:// and rediss:// URLs.

    The server's certificate must chain to FLEET_TLS_CA_FILE (default: the
    system's CAs) and name the host of the URL: without these options kombu
    checks no host name on amqps:// and nothing at all on rediss://.
    """
    conf: dict[str, Any] = {}
    broker = urlsplit(settings.broker_url)
    if broker.scheme == "amqps":
        # py-amqp's wrap: a server_hostname turns the host name check on (and sends SNI).
        conf["broker_use_ssl"] = {
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": settings.tls_ca_file,
            "server_hostname": broker.hostname,
        }
    elif broker.scheme == "rediss":
        conf["broker_use_ssl"] = redis_tls_options(settings.broker_url, settings.tls_ca_file)
    if urlsplit(settings.result_url).scheme == "rediss":
        # Celery's redis backend insists on ssl_cert_reqs for rediss://.
        conf["redis_backend_use_ssl"] = redis_tls_options(settings.result_url, settings.tls_ca_file)
    return conf


def broker_ssl(settings: Settings) -> dict[str, Any] | bool:
    """kombu.Connection(ssl=...) for the broker, for connections made without Celery."""
    ssl_options: dict[str, Any] | bool = tls_config(settings).get("broker_use_ssl", False)
    return ssl_options


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = settings.transport_options
    return {
        "broker_url": settings.broker_url,
        **result_backend(settings),
        **tls_config(settings),
        # JSON only: a pickled message on a reachable broker is code execution on every worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": settings.queue,
        # A batch is acknowledged after it ran, and requeued if its process
        # died, so a lost worker loses no batch.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Reserve one message per process: a new worker is not starved by an
        # old worker's prefetch, and a dead worker strands little.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": worker_concurrency(settings.concurrency),
        # Unacknowledged messages come back after this long on Redis and SQS;
        # it must outlast the longest batch (see Settings.visibility_timeout).
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "result_expires": settings.result_ttl,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Detect a dead AMQP peer (a half-open socket) within a minute.
        "broker_heartbeat": 30,
        # A worker cut off from RabbitMQ reconnects as soon as its link is
        # back, while the broker still holds its old connection (for up to
        # two heartbeats). Celery's default exclusive mailbox queue
        # (`NODE.celery.pidbox`) is then locked by that old connection: the
        # declare fails with RESOURCE_LOCKED and the worker exits
        # ("Unrecoverable error"; tests/faults/test_partitions.py, cut off). Not
        # exclusive, the new connection shares the queue until the old one
        # is dropped; it is still deleted when unused (control_queue_expires).
        "control_queue_exclusive": False,
        "task_time_limit": settings.max_batch_seconds,
        # No task events unless asked: three broker messages per batch from the
        # worker's main process, CPU taken from the batches on the same cores.
        # Flower asks for them itself (its enable_events, every minute) while
        # it runs; `fleet status` does not use them.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        # A malformed message is logged and rejected, never the end of a worker
        # (app/worker/guard.py).
        "worker_consumer": "app.worker.guard:GuardedConsumer",
    }


def make_app(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    # GuardedTask: a malformed message is refused, never the end of the worker
    # (app/worker/guard.py).
    modules = task_modules(settings)
    app = Celery(
        "fleet",
        include=[*WORKER_MODULES, *modules, *include],
        task_cls="app.worker.guard:GuardedTask",
    )
    app.conf.update(celery_config(settings))
    # The batch task reads the store URL, lease and allowed modules from here.
    app.fleet_settings = settings
    app.fleet_task_modules = modules
    return app
