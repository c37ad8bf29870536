"""Settings shared by the workers and the launcher, read from the environment.

Every worker and the launcher read the same variables, so the stack (SSM
Parameter Store), the local fleet and the Ansible role only have to write one
environment file. A bad value is reported by name with what to do about it,
and a password inside a URL is never printed.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "sqs")
RESULT_SCHEMES = ("redis", "rediss", "s3")

# Largest message body the launcher builds, per broker. SQS caps a message at
# 256 KiB and kombu base64-encodes the body (x4/3), so stay well under that.
MESSAGE_LIMITS = {"sqs": 160 * 1024}
DEFAULT_MESSAGE_LIMIT = 1024 * 1024

# A Redis broker that has not answered a command for this long is treated as
# gone (see Settings.transport_options); well above any healthy reply time.
REDIS_SOCKET_TIMEOUT = 15
# kombu's check of its long-lived connections (an overdue BRPOP is dropped
# after 1 s + this); 25 s by default.
REDIS_HEALTH_CHECK_INTERVAL = 10


class ConfigError(SystemExit):
    """Configuration that cannot work.

    A SystemExit so that `celery -A app worker` and `fleet` print the message
    alone, without a traceback; Python code can still catch it by name.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"fleet: {message}")
        self.message = message


def redact(url: str) -> str:
    """The URL with any password replaced by '***'."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    # Work on the raw netloc: parts.port raises on a bad port, and
    # parts.hostname drops an IPv6 address's brackets.
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        if ":" not in userinfo:
            return url
        user = userinfo.partition(":")[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
    if "@" in url:
        # No "//" before the credentials (a typo), so urlsplit saw no netloc:
        # hide everything before the last "@" but the scheme.
        tail = url.rpartition("@")[2]
        return f"{parts.scheme}:***@{tail}" if parts.scheme else f"***@{tail}"
    return url


def check_url(name: str, url: str, schemes: tuple[str, ...]) -> str:
    """Return `url` if it names one of `schemes` and a host, else raise ConfigError."""
    example = {
        "broker": "redis://127.0.0.1:6379/0, amqp://user:pass@host:5672//, sqs://",
        "result store": "redis://127.0.0.1:6379/1, s3://bucket/prefix",
    }.get(name, "")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric port
    except ValueError as exc:
        raise ConfigError(f"the {name} URL {redact(url)!r} is malformed ({exc}).") from None
    if parts.scheme not in schemes:
        raise ConfigError(
            f"the {name} URL {redact(url)!r} has scheme {parts.scheme or '(none)'!r}; "
            f"use one of {', '.join(schemes)} (for example {example})."
        )
    # sqs:// may leave the host out (kombu then uses the region's endpoint);
    # s3:// carries the bucket where the host would be.
    if parts.scheme != "sqs" and not parts.hostname:
        raise ConfigError(f"the {name} URL {redact(url)!r} names no host; for example {example}.")
    del port
    return url


# TLS: rediss:// and amqps:// always check the server's certificate and host name.
_VERIFY_OFF = {
    "ssl_cert_reqs": ("none", "optional", "cert_none", "cert_optional"),
    "ssl_check_hostname": ("false", "0", "no", "off", "n", "f"),
}


def check_tls_url(name: str, url: str) -> None:
    """Refuse a rediss:// URL that turns certificate or host name checking off."""
    if urlsplit(url).scheme != "rediss":
        return
    for key, value in query_options(url).items():
        if value.strip().lower() in _VERIFY_OFF.get(key, ()):
            raise ConfigError(
                f"the {name} URL {redact(url)!r} turns TLS verification off ({key}={value}); "
                "the fleet always checks the server's certificate and host name. For a private "
                "CA, set FLEET_TLS_CA_FILE to its PEM file."
            )


def check_ca_file(path: str) -> None:
    """Raise ConfigError unless `path` is a readable PEM file of CA certificates."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"FLEET_TLS_CA_FILE={path!r} is not a readable PEM file of CA certificates ({reason})."
        ) from None


def redis_tls_options(url: str, ca_file: str | None) -> dict[str, object]:
    """redis-py (and kombu / Celery redis) keywords for a rediss:// URL; {} for redis://.

    The certificate must chain to `ca_file` (None: the system's CAs) and name the host.
    """
    if urlsplit(url).scheme != "rediss":
        return {}
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_file, "ssl_check_hostname": True}


# -- the FLEET_* variables, described once ---------------------------------------


def _text(raw: str, name: str) -> str:
    return raw


def _whole(raw: str, name: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number.") from None
    if value < 1:
        raise ConfigError(f"{name}={value} must be at least 1.")
    return value


def _seconds(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number.") from None
    if not value > 0 or value == float("inf"):  # also refuses nan and inf
        raise ConfigError(f"{name}={raw!r} must be a finite number greater than zero.")
    return value


def _modules(raw: str, name: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in raw.replace(" ", ",").split(",") if m.strip())


@dataclass(frozen=True)
class Variable:
    """One FLEET_* variable: what `Settings.from_env` reads, `as_env` writes, the stack
    stores in SSM Parameter Store and the README's settings table shows."""

    name: str
    # The Settings field it sets; None: read by the one process that uses it (named in `meaning`).
    attr: str | None
    default: Any
    shown: str  # the default as the README shows it
    meaning: str
    parse: Callable[[str, str], Any] = _text
    # The stack's parameter under /celery-fleet/<stack>/, for those the stack writes.
    ssm: str | None = None

    def read(self, env: Mapping[str, str]) -> Any:
        raw = env.get(self.name, "").strip()
        return self.parse(raw, self.name) if raw else self.default

    def write(self, value: Any) -> str | None:
        """The variable's text for `value`, or None when it is unset."""
        if value is None or value == ():
            return None
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


MAX_BATCH_SECONDS = 900
RESULT_TTL = 7 * 24 * 3600
LEASE_SECONDS = 10.0
SQS_POLLING_INTERVAL = 0.1  # seconds between a busy SQS consumer's looks (transport_options)
# A stopping worker may finish its longest batch, then needs a moment to hand
# back what it had not started and exit.
STOP_MARGIN_SECONDS = 60

VARIABLES = (
    Variable(
        "FLEET_BROKER_URL",
        "broker_url",
        "",
        "(required)",
        "`redis://`, `rediss://`, `amqp://`, `amqps://` or `sqs://`",
        ssm="broker_url",
    ),
    Variable(
        "FLEET_RESULT_URL",
        "result_url",
        "",
        "(required)",
        "`redis://`, `rediss://` or `s3://BUCKET/PREFIX[?region=R&endpoint_url=U]` "
        "(result store and Celery result backend)",
        ssm="result_url",
    ),
    Variable("FLEET_QUEUE", "queue", "fleet", "`fleet`", "the queue", ssm="queue"),
    Variable("FLEET_INCLUDE", "include", (), "", "extra task modules, comma-separated", _modules),
    Variable(
        "FLEET_CONCURRENCY",
        "concurrency",
        None,
        "the CPUs this process may use",
        "worker processes per instance",
        _whole,
    ),
    Variable(
        "FLEET_MAX_BATCH_SECONDS",
        "max_batch_seconds",
        MAX_BATCH_SECONDS,
        f"`{MAX_BATCH_SECONDS}`",
        "the longest a batch may run: its hard time limit; the visibility timeout is "
        "twice this plus a minute",
        _whole,
        ssm="max_batch_seconds",
    ),
    Variable(
        "FLEET_RESULT_TTL",
        "result_ttl",
        RESULT_TTL,
        f"`{RESULT_TTL}` (7 days)",
        "how long results and job state are kept for `--resume`",
        _whole,
        ssm="result_ttl",
    ),
    Variable(
        "FLEET_LEASE_SECONDS",
        "lease_seconds",
        LEASE_SECONDS,
        f"`{LEASE_SECONDS:g}`",
        "how often (÷3) a running batch renews its lease; a batch whose lease lapses is sent again",
        _seconds,
    ),
    Variable(
        "FLEET_AWS_REGION",
        "aws_region",
        None,
        "boto3's default",
        "the region of an SQS broker / S3 store",
    ),
    Variable(
        "FLEET_SQS_QUEUE_URL",
        "sqs_queue_url",
        None,
        "",
        "the stack's queue: workers use it as is (its visibility timeout and dead-letter "
        "queue) and need no right to list or create queues",
        ssm="queue_url",
    ),
    Variable(
        "FLEET_STACK", "stack", None, "", "the stack the settings came from; set by `--stack`"
    ),
    Variable(
        "FLEET_CODE_VERSION",
        "code_version",
        None,
        "",
        "the content hash of the code deployed to the fleet (`pulumi up` keeps it in SSM, "
        "`fleet local --code` in its state); `fleet run` and `fleet status` compare the "
        "workers' own with it",
        ssm="code_version",
    ),
    Variable(
        "FLEET_SINK_PASSWORD",
        "sink_password",
        None,
        "",
        "the password of a `--out postgresql://USER@HOST/DB` sink whose URL has none (a "
        "stack keeps `celery-fleet:sinkPassword` as a SecureString parameter); never printed",
        ssm="sink_password",
    ),
    Variable(
        "FLEET_WATCHDOG_SECONDS",
        None,
        None,
        "max(3 × lease, 30)",  # noqa: RUF001 - a multiplication sign, as printed
        "how long work may wait on the queue while a worker with a free slot takes none "
        "before it restarts itself; `0` turns the watchdog off (see Operating a fleet)",
    ),
    Variable(
        "FLEET_METRICS",
        None,
        None,
        "`cloudwatch` on EC2, else none",
        "`cloudwatch`: every worker publishes its busy slots and finished batches to "
        "CloudWatch each minute, per instance (`FLEET_INSTANCE_ID`) and for the stack; "
        "`python -m app.boot` sets it on EC2",
    ),
    Variable(
        "FLEET_TLS_CA_FILE",
        "tls_ca_file",
        None,
        "the system's CAs",
        "a PEM file of the CAs that sign the broker's and result store's certificates "
        "(`rediss://`, `amqps://`); the certificate and the host name are always "
        "checked, and a URL that turns that off (`ssl_cert_reqs=none`) is refused",
    ),
)
_BY_ATTR = {v.attr: v for v in VARIABLES if v.attr}


def parameter_name(attr: str) -> str:
    """The SSM parameter (under the stack's prefix) that holds Settings field `attr`."""
    ssm = _BY_ATTR[attr].ssm
    if ssm is None:
        raise KeyError(f"the stack keeps no parameter for {attr}")
    return ssm


def settings_table() -> str:
    """The README's table of FLEET_* variables."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.shown} | {v.meaning} |".replace("|  |", "| |") for v in VARIABLES]
    return "\n".join(rows) + "\n"


def stop_seconds(env: Mapping[str, str]) -> int:
    """How long a stopping worker of these FLEET_* variables may take: its longest batch,
    then a margin to hand back what it had not started and exit.

    Lenient on purpose: stopping a worker must work even when its environment
    file is broken (the worker then refuses to start, and says why).
    """
    raw = env.get("FLEET_MAX_BATCH_SECONDS", "").strip()
    try:
        longest = int(raw) if raw else MAX_BATCH_SECONDS
    except ValueError:
        longest = MAX_BATCH_SECONDS
    return max(0, longest) + STOP_MARGIN_SECONDS


@dataclass(frozen=True)
class Settings:
    broker_url: str
    result_url: str
    queue: str = "fleet"
    # Extra modules the workers import; only functions defined in these (or
    # registered with @fleet_task) can be named by a job.
    include: tuple[str, ...] = ()
    # None: size the worker to the CPUs this process may use.
    concurrency: int | None = None
    # The longest a batch may run. The hard time limit of a batch and the
    # Redis visibility timeout are derived from it.
    max_batch_seconds: int = MAX_BATCH_SECONDS
    # How long batch results and job state are kept in the result store.
    result_ttl: int = RESULT_TTL
    # A running batch renews its lease this often (x3 = time to notice a dead worker).
    lease_seconds: float = LEASE_SECONDS
    # SQS: the region, and the queue's URL. With the URL, workers use the
    # queue the stack made (with its visibility timeout and dead-letter
    # queue) and need no permission to list or create queues.
    aws_region: str | None = None
    sqs_queue_url: str | None = None
    # The deployed stack these settings came from (None: a local fleet). The
    # launcher then publishes its held-back batches to CloudWatch, where the
    # stack's scaling policy adds them to the queue depth.
    stack: str | None = None
    # The content hash of the wheelhouse deployed to the fleet (app/wheelhouse.py), which
    # every worker installed from it reports too; None: not known (no wheelhouse).
    code_version: str | None = None
    # A PEM file of the CAs that sign the broker's and result store's TLS
    # certificates (rediss://, amqps://). None: the system's CAs, which sign
    # Amazon MQ's and ElastiCache's. The certificate and host name are always checked.
    tls_ca_file: str | None = None
    # The password of a PostgreSQL sink whose URL holds none (app/sinks/postgres.py).
    sink_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_url("broker", self.broker_url, BROKER_SCHEMES)
        check_url("result store", self.result_url, RESULT_SCHEMES)
        check_tls_url("broker", self.broker_url)
        check_tls_url("result store", self.result_url)
        if self.tls_ca_file is not None:
            check_ca_file(self.tls_ca_file)
        if not self.queue or any(c.isspace() for c in self.queue):
            raise ConfigError(f"queue name {self.queue!r} must be non-empty with no spaces.")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from FLEET_* variables (VARIABLES); `overrides` (e.g. from CLI flags) win
        when not None."""
        env = os.environ if env is None else env
        values = {v.attr: v.read(env) for v in VARIABLES if v.attr}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not values["broker_url"]:
            raise ConfigError(
                "no broker URL. Start a local fleet with `fleet local`, pass --broker URL, "
                "or set FLEET_BROKER_URL (e.g. redis://127.0.0.1:6379/0)."
            )
        if not values["result_url"]:
            raise ConfigError(
                "no result store URL. Start a local fleet with `fleet local`, pass --backend URL, "
                "or set FLEET_RESULT_URL (e.g. redis://127.0.0.1:6379/1)."
            )
        return cls(**values)

    @property
    def broker_scheme(self) -> str:
        return urlsplit(self.broker_url).scheme

    @property
    def message_limit(self) -> int:
        return MESSAGE_LIMITS.get(self.broker_scheme, DEFAULT_MESSAGE_LIMIT)

    @property
    def visibility_timeout(self) -> int:
        # Redis and SQS redeliver an unacknowledged message after this long;
        # it must outlast the longest batch or that batch runs twice.
        return 2 * self.max_batch_seconds + 60

    def as_env(self) -> dict[str, str]:
        """The FLEET_* variables that reproduce these settings in another process."""
        env = {}
        for var in VARIABLES:
            text = None if var.attr is None else var.write(getattr(self, var.attr))
            if text is not None:
                env[var.name] = text
        return env

    @property
    def transport_options(self) -> dict[str, object]:
        """kombu transport options for the broker (and Celery's Redis result backend)."""
        options: dict[str, object] = {"visibility_timeout": self.visibility_timeout}
        if self.broker_scheme in ("redis", "rediss"):
            # A broker that goes silent without closing the connection (a
            # partition, a rebooted broker host, a NAT that lost its state)
            # must not hang a worker. kombu sets no socket timeout, so a
            # synchronous command (an ack, a task event) waited forever for
            # its reply on the dead socket and the whole worker stopped
            # consuming (celery#9705; tests/faults/test_partitions.py, half-open).
            # With a timeout the command fails and the worker reconnects.
            # kombu drops an event-loop BRPOP (sent with a 1 s server-side
            # timeout) once its reply is overdue by health_check_interval.
            options.update(
                socket_timeout=REDIS_SOCKET_TIMEOUT,
                socket_connect_timeout=5,
                health_check_interval=REDIS_HEALTH_CHECK_INTERVAL,
            )
            # kombu stores a Redis message as JSON text and by default base64s
            # the body inside it, which for a batch of a million IDs costs
            # more than the JSON escaping that replaces it (both ways, every
            # message). The fleet's bodies are JSON (UTF-8) only; a consumer
            # decodes each message by the encoding it names, so messages sent
            # either way mix on one queue.
            options["body_encoding"] = "utf-8"
        if self.broker_scheme == "sqs":
            # kombu hands a message back (a worker's cold shutdown on a Spot
            # notice, a requeue) by making it visible again after this many
            # seconds, and long-polls this long: 1 s instead of kombu's 10
            # gets a handed-back batch running 1 s later, for an idle worker's
            # ReceiveMessage every ~2 s instead of ~11 s.
            options["wait_time_seconds"] = 1
            # While every slot is busy kombu asks SQS nothing and looks again after
            # polling_interval (1 s by default): a slot that ends a batch waited 0.5 s on
            # average for its next one, a quarter of a 2 s batch. The look is local; an
            # idle worker's empty receives come every 1.1 s instead of every 2 s.
            options["polling_interval"] = SQS_POLLING_INTERVAL
            if self.aws_region:
                options["region"] = self.aws_region
            if self.sqs_queue_url:
                options["predefined_queues"] = {self.queue: {"url": self.sqs_queue_url}}
                # A local SQS endpoint (a test server) speaks plain HTTP.
                options["is_secure"] = self.sqs_queue_url.startswith("https://")
        return options


def query_options(url: str) -> dict[str, str]:
    """The ?key=value options of a URL (used for s3:// result stores)."""
    return dict(parse_qsl(urlsplit(url).query))
