"""Settings shared by the workers and the launcher, read from the environment.

Every worker and the launcher read the same variables, so the stack (SSM
Parameter Store), the local fleet and the Ansible role only have to write one
environment file. A bad value is reported by name with what to do about it,
and a password inside a URL is never printed.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
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
_VERIFY_OFF = {"ssl_cert_reqs": ("none", "optional", "cert_none", "cert_optional"),
               "ssl_check_hostname": ("false", "0", "no", "off", "n", "f")}


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
            f"FLEET_TLS_CA_FILE={path!r} is not a readable PEM file of CA certificates "
            f"({reason})."
        ) from None


def redis_tls_options(url: str, ca_file: str | None) -> dict[str, object]:
    """redis-py (and kombu / Celery redis) keywords for a rediss:// URL; {} for redis://.

    The certificate must chain to `ca_file` (None: the system's CAs) and name the host.
    """
    if urlsplit(url).scheme != "rediss":
        return {}
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_file,
            "ssl_check_hostname": True}


def _env_int(env: dict[str, str], name: str, default: int | None, minimum: int = 1) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number.") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}.")
    return value


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number.") from None
    if not value > 0 or value == float("inf"):  # also refuses nan and inf
        raise ConfigError(f"{name}={raw!r} must be a finite number greater than zero.")
    return value


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
    max_batch_seconds: int = 900
    # How long batch results and job state are kept in the result store.
    result_ttl: int = 7 * 24 * 3600
    # A running batch renews its lease this often (x3 = time to notice a dead worker).
    lease_seconds: float = 10.0
    # SQS: the region, and the queue's URL. With the URL, workers use the
    # queue the stack made (with its visibility timeout and dead-letter
    # queue) and need no permission to list or create queues.
    aws_region: str | None = None
    sqs_queue_url: str | None = None
    # The deployed stack these settings came from (None: a local fleet). The
    # launcher then publishes its held-back batches to CloudWatch, where the
    # stack's scaling policy adds them to the queue depth.
    stack: str | None = None
    # A PEM file of the CAs that sign the broker's and result store's TLS
    # certificates (rediss://, amqps://). None: the system's CAs, which sign
    # Amazon MQ's and ElastiCache's. The certificate and host name are always checked.
    tls_ca_file: str | None = None

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
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from FLEET_* variables; `overrides` (e.g. from CLI flags) win when not None."""
        env = dict(os.environ if env is None else env)
        broker = overrides.pop("broker_url", None) or env.get("FLEET_BROKER_URL", "").strip()
        result = overrides.pop("result_url", None) or env.get("FLEET_RESULT_URL", "").strip()
        if not broker:
            raise ConfigError(
                "no broker URL. Start a local fleet with `fleet local`, pass --broker URL, "
                "or set FLEET_BROKER_URL (e.g. redis://127.0.0.1:6379/0)."
            )
        if not result:
            raise ConfigError(
                "no result store URL. Start a local fleet with `fleet local`, pass --backend URL, "
                "or set FLEET_RESULT_URL (e.g. redis://127.0.0.1:6379/1)."
            )
        include = tuple(
            m.strip()
            for m in env.get("FLEET_INCLUDE", "").replace(" ", ",").split(",")
            if m.strip()
        )
        values: dict[str, object] = dict(
            broker_url=broker,
            result_url=result,
            queue=env.get("FLEET_QUEUE", "").strip() or "fleet",
            include=include,
            concurrency=_env_int(env, "FLEET_CONCURRENCY", None),
            max_batch_seconds=_env_int(env, "FLEET_MAX_BATCH_SECONDS", 900),
            result_ttl=_env_int(env, "FLEET_RESULT_TTL", 7 * 24 * 3600),
            lease_seconds=_env_float(env, "FLEET_LEASE_SECONDS", 10.0),
            aws_region=env.get("FLEET_AWS_REGION", "").strip() or None,
            sqs_queue_url=env.get("FLEET_SQS_QUEUE_URL", "").strip() or None,
            stack=env.get("FLEET_STACK", "").strip() or None,
            tls_ca_file=env.get("FLEET_TLS_CA_FILE", "").strip() or None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

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
        env = {
            "FLEET_BROKER_URL": self.broker_url,
            "FLEET_RESULT_URL": self.result_url,
            "FLEET_QUEUE": self.queue,
            "FLEET_MAX_BATCH_SECONDS": str(self.max_batch_seconds),
            "FLEET_RESULT_TTL": str(self.result_ttl),
            "FLEET_LEASE_SECONDS": str(self.lease_seconds),
        }
        if self.include:
            env["FLEET_INCLUDE"] = ",".join(self.include)
        if self.concurrency:
            env["FLEET_CONCURRENCY"] = str(self.concurrency)
        if self.aws_region:
            env["FLEET_AWS_REGION"] = self.aws_region
        if self.sqs_queue_url:
            env["FLEET_SQS_QUEUE_URL"] = self.sqs_queue_url
        if self.stack:
            env["FLEET_STACK"] = self.stack
        if self.tls_ca_file:
            env["FLEET_TLS_CA_FILE"] = self.tls_ca_file
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
            # consuming (celery#9705; tests/test_partitions.py, half-open).
            # With a timeout the command fails and the worker reconnects.
            # kombu drops an event-loop BRPOP (sent with a 1 s server-side
            # timeout) once its reply is overdue by health_check_interval.
            options.update(socket_timeout=REDIS_SOCKET_TIMEOUT, socket_connect_timeout=5,
                           health_check_interval=REDIS_HEALTH_CHECK_INTERVAL)
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
