"""The result store on Redis (or Valkey): the store of the local fleet and of `resultStore: redis`.

The commit is a Lua script that sets the batch's bit and stores its lines
only if the bit was not set: first writer wins. Leases and worker
registrations are sorted sets scored by expiry on the server's clock.

A job's keys share a hash tag (`fleet:{job}:...`): the Lua commit touches
several of them at once, which a Redis/Valkey cluster allows only within one
slot.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import msgspec
import redis
import redis.utils
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from app.settings import REDIS_SOCKET_TIMEOUT, redact, redis_tls_options
from app.store.base import BatchResult, Done, Journal, StoreUnavailable

# redis-py 8 reads its own version from the installed packages' metadata for
# every new connection, about 5 ms each time: the launcher opens several (its
# store, kombu's broker connections) and so does every worker process. The
# answer cannot change within a process, so it is read once.
redis.utils.get_lib_version = functools.cache(redis.utils.get_lib_version)

WORKERS_KEY = "fleet:workers"  # sorted set: worker name -> expiry (Redis clock)
LEASES_KEY = "fleet:leases"  # sorted set: "job/batch" -> expiry (Redis clock)
# sorted set: "queue/job" -> expiry; the counts in the hash BACKLOG_KEY + ":n"
BACKLOG_KEY = "fleet:backlog"
JOBS_KEY = "fleet:jobs"  # sorted set: job -> when its metadata was first written (epoch)
DRIVEN_KEY = "fleet:driven:"  # + queue: set of the jobs whose driver runs in the fleet

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder().decode


def _keys(job: str) -> dict[str, str]:
    tag = f"fleet:{{{job}}}"
    return {
        "meta": f"{tag}:meta",
        "ok": f"{tag}:ok",  # bitmap: batch committed
        "written": f"{tag}:written",  # bitmap: batch written to the output
        "offset": f"{tag}:offset",  # output file size after the last written batch
        "done": f"{tag}:done",  # list of Done announcements
        "cancel": f"{tag}:cancel",
        "stats": f"{tag}:stats",  # items and errors written so far
        "result": f"{tag}:r:",  # + batch number
        "input": f"{tag}:input",  # the IDs of a submitted job, uploaded from a file
        "partials": f"{tag}:partials",  # hash: batch -> its reducer's partial (JSON)
    }


# KEYS: ok, result, done, partials. ARGV: batch, lines, announcement, ttl, partial ('': none).
_COMMIT = """
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 1 then
  return 0
end
redis.call('SETBIT', KEYS[1], ARGV[1], 1)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
"""

# Idempotent, so the client may retry it after a timeout: the counters move
# only when some batch was not marked yet (a retry finds them all marked).
# KEYS: stats, written, offset, then the batches' result keys.
# ARGV: items, errors, ttl, offset ("" for none), then the batch numbers.
_WRITTEN = """
local fresh = 0
for i = 5, #ARGV do
  if redis.call('SETBIT', KEYS[2], ARGV[i], 1) == 0 then fresh = fresh + 1 end
end
if fresh > 0 then
  redis.call('HINCRBY', KEYS[1], 'items', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'errors', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[3]) end
if #KEYS > 3 then redis.call('DEL', unpack(KEYS, 4)) end
return fresh
"""

# Leases use the server's clock so that worker and launcher clocks need not agree.
# KEYS: a sorted set. ARGV: seconds to live, then the members (any number: a worker
# process renews all its running batches in one call).
_RENEW = """
local expiry = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
return 1
"""

# Whether a batch about to run should: 1 committed already, 2 its job cancelled, 0 run.
# KEYS: ok, cancel. ARGV: batch.
_BEGIN = """
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
return 0
"""

# KEYS: a sorted set. Drops expired members; returns the live ones with scores.
_LIVE = """
local now = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


# A counting semaphore of leases (app/sinks: at most N writers across the fleet).
# KEYS: a sorted set. ARGV: holder, limit, seconds to live. 1 if the holder has a slot.
_ACQUIRE = """
local now = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], tonumber(now[1]) + tonumber(ARGV[3]), ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


class RedisStore:
    # Raised once self.r's retries (about a minute) have given up on the server.
    connection_errors: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)

    def __init__(self, url: str, ttl: int = 7 * 24 * 3600, tls_ca_file: str | None = None) -> None:
        self.url = url
        self.ttl = ttl
        # rediss://: the certificate must chain to tls_ca_file (None: the
        # system's CAs) and name the host.
        self._tls = redis_tls_options(url, tls_ca_file)
        # Reconnect through a broker or store restart instead of failing the job.
        self.r = redis.Redis.from_url(
            url,
            **self._tls,
            socket_connect_timeout=5,
            # A store that goes silent (a half-open connection) is given up
            # after this, and the call retried on a new connection; no store
            # command blocks longer (wait_done's BLPOP: 1 s at most).
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_keepalive=True,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=40),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self._commit = self.r.register_script(_COMMIT)
        self._begin = self.r.register_script(_BEGIN)
        self._renew = self.r.register_script(_RENEW)
        self._live = self.r.register_script(_LIVE)
        self._written = self.r.register_script(_WRITTEN)
        self._acquire = self.r.register_script(_ACQUIRE)

    def ping(self) -> None:
        # A few quick tries only: the long retry of self.r rides out a restart
        # mid-job, but a store that is down at the start should be said at once
        # (with it, a refused connection took over a minute to report).
        quick = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=5,
            socket_timeout=10,
            **self._tls,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=3),
        )
        try:
            quick.ping()
        except redis.AuthenticationError as exc:
            raise StoreUnavailable(
                f"cannot reach the result store at {redact(self.url)}: it refused the password "
                f"(none given, or a wrong one): {exc}"
            ) from None
        except redis.RedisError as exc:
            raise StoreUnavailable(
                f"cannot reach the result store at {redact(self.url)}: {exc}"
            ) from None
        finally:
            quick.close()

    # -- jobs -------------------------------------------------------------

    def put_meta(self, job: str, meta: dict[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(_keys(job)["meta"], _json.encode(meta), ex=self.ttl)
        pipe.zadd(JOBS_KEY, {job: time.time()}, nx=True)
        pipe.expire(JOBS_KEY, self.ttl)
        pipe.execute()

    def jobs(self) -> list[str]:
        """Every job with metadata, oldest first (those expired are dropped from the index)."""
        names = [n.decode() for n in cast(list[bytes], self.r.zrange(JOBS_KEY, 0, -1))]
        if not names:
            return []
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.exists(_keys(n)["meta"])
        alive = pipe.execute()
        gone = [n for n, there in zip(names, alive, strict=True) if not there]
        if gone:
            self.r.zrem(JOBS_KEY, *gone)
        return [n for n, there in zip(names, alive, strict=True) if there]

    def put_input(self, job: str, data: bytes) -> None:
        self.r.set(_keys(job)["input"], data, ex=self.ttl)

    def get_input(self, job: str) -> bytes | None:
        return cast(bytes | None, self.r.get(_keys(job)["input"]))

    def add_driven(self, queue: str, job: str) -> None:
        self.r.sadd(DRIVEN_KEY + queue, job)

    def driven(self, queue: str) -> list[str]:
        return sorted(m.decode() for m in cast(set[bytes], self.r.smembers(DRIVEN_KEY + queue)))

    def remove_driven(self, queue: str, job: str) -> None:
        self.r.srem(DRIVEN_KEY + queue, job)

    def get_meta(self, job: str) -> dict[str, Any] | None:
        raw = self.r.get(_keys(job)["meta"])
        return None if raw is None else _decode(raw)

    def cancel(self, job: str) -> None:
        self.r.set(_keys(job)["cancel"], b"1", ex=self.ttl)

    def is_cancelled(self, job: str) -> bool:
        return bool(self.r.exists(_keys(job)["cancel"]))

    # -- worker side ------------------------------------------------------

    def is_committed(self, job: str, batch: int) -> bool:
        return bool(self.r.getbit(_keys(job)["ok"], batch))

    def _pipelined(self, build: Callable[[Any], None]) -> list[Any]:
        """One round trip of commands, scripts called by their SHA (redis-py's Script in a
        pipeline asks SCRIPT EXISTS first: one more round trip each time); a server
        that lost its scripts (restarted) gets them again, and the commands are re-run."""
        for attempt in (1, 2):
            pipe = self.r.pipeline(transaction=False)
            build(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                for script in (self._begin, self._renew, self._commit):
                    self.r.script_load(script.script)
        raise AssertionError("unreachable")

    def begin(self, job: str, batch: int, seconds: float) -> bool:
        k = _keys(job)
        member = f"{job}/{batch}"

        def build(pipe: Any) -> None:
            # The lease in the same round trip, on the chance the batch runs (almost always).
            pipe.evalsha(self._begin.sha, 2, k["ok"], k["cancel"], batch)
            pipe.evalsha(self._renew.sha, 1, LEASES_KEY, int(seconds) + 1, member)

        if self._pipelined(build)[0] == 0:
            return True
        self.r.zrem(LEASES_KEY, member)  # a redelivery of a done batch, or a cancelled job
        return False

    def commit(self, job: str, done: Done, lines: bytes) -> bool:
        """Store a batch's lines and announce it; False if it was already committed."""
        k = _keys(job)
        # The counts travel with the lines: a later pass writes the batch without its
        # announcement.
        body = b"%d %d\n" % (done.items, done.errors) + lines
        partial = b"" if done.partial is None else _json.encode(done.partial)
        keys = [k["ok"], k["result"] + str(done.batch), k["done"], k["partials"]]

        def build(pipe: Any) -> None:
            pipe.evalsha(
                self._commit.sha,
                len(keys),
                *keys,
                done.batch,
                body,
                _json.encode(done),
                self.ttl,
                partial,
            )
            # The leases are outside the job's hash tag (a cluster slot): not in the script.
            pipe.zrem(LEASES_KEY, f"{job}/{done.batch}")

        return bool(self._pipelined(build)[0])

    def announce(self, job: str, done: Done) -> None:
        """Announce a batch without committing it (a refused batch)."""
        k = _keys(job)
        self.r.rpush(k["done"], _json.encode(done))
        self.r.expire(k["done"], self.ttl)

    def renew_leases(self, leases: Sequence[tuple[str, int]], seconds: float) -> None:
        if leases:
            members = [f"{job}/{batch}" for job, batch in leases]
            self._renew(keys=[LEASES_KEY], args=[int(seconds) + 1, *members])

    def drop_lease(self, job: str, batch: int) -> None:
        self.r.zrem(LEASES_KEY, f"{job}/{batch}")

    def acquire_slot(self, name: str, holder: str, limit: int, seconds: float) -> bool:
        return bool(
            self._acquire(keys=[f"fleet:slots:{name}"], args=[holder, limit, int(seconds) + 1])
        )

    def release_slot(self, name: str, holder: str) -> None:
        self.r.zrem(f"fleet:slots:{name}", holder)

    def slot_holders(self, name: str, seconds: float) -> list[str]:
        return [m.decode() for m in self._live(keys=[f"fleet:slots:{name}"])]

    def register_worker(self, name: str, info: dict[str, Any], seconds: float) -> None:
        self.r.set(f"fleet:worker:{name}", _json.encode(info), ex=int(seconds) + 1)
        self._renew(keys=[WORKERS_KEY], args=[int(seconds) + 1, name])

    def unregister_worker(self, name: str) -> None:
        self.r.zrem(WORKERS_KEY, name)
        self.r.delete(f"fleet:worker:{name}")

    # -- launcher side ----------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        names = [n.decode() for n in self._live(keys=[WORKERS_KEY])]
        if not names:
            return []
        raws = self.r.mget([f"fleet:worker:{n}" for n in names])
        return [dict(_decode(raw), name=n) for n, raw in zip(names, raws, strict=False) if raw]

    def busy_slots(self) -> set[str]:
        """Members "job/batch" of every batch running now, on any job."""
        return {m.decode() for m in self._live(keys=[LEASES_KEY])}

    def advertise_backlog(self, queue: str, job: str, batches: int, seconds: float) -> None:
        """Say `job` holds back `batches` more for `queue` (0: none); lapses after `seconds`."""
        member = f"{queue}/{job}"
        pipe = self.r.pipeline(transaction=False)
        if batches > 0:
            pipe.hset(BACKLOG_KEY + ":n", member, batches)
            self._renew(keys=[BACKLOG_KEY], args=[int(seconds) + 1, member], client=pipe)
        else:
            pipe.zrem(BACKLOG_KEY, member)
            pipe.hdel(BACKLOG_KEY + ":n", member)
        pipe.execute()

    def backlog(self, queue: str) -> int:
        """Batches the launchers of `queue` hold back from the broker (for the autoscaler)."""
        live = {m.decode() for m in self._live(keys=[BACKLOG_KEY])}
        # The casts here and below: replies are bytes (decode_responses is off),
        # which redis-py's types cannot know, so they say `bytes | str`.
        raw_counts = cast(dict[bytes, bytes], self.r.hgetall(BACKLOG_KEY + ":n"))
        counts = {k.decode(): int(v) for k, v in raw_counts.items()}
        stale = [m for m in counts if m not in live]  # a launcher that died
        if stale:
            self.r.hdel(BACKLOG_KEY + ":n", *stale)
        return sum(n for m, n in counts.items() if m in live and m.startswith(f"{queue}/"))

    def wait_done(self, job: str, timeout: float) -> list[Done]:
        """Announcements of committed batches; waits up to `timeout` for the first one."""
        key = _keys(job)["done"]
        # Taken without waiting first: on a busy job there is nearly always some, and
        # that is one round trip instead of two.
        raws = cast(list[bytes] | None, self.r.lpop(key, 10_000)) or []  # with a count: a list
        if not raws:
            first = cast(tuple[bytes, bytes] | None, self.r.blpop([key], timeout=timeout))
            if first is None:
                return []
            raws = [first[1]]
            more = cast(list[bytes] | None, self.r.lpop(key, 10_000))
            if more:
                raws.extend(more)
        return [msgspec.convert(_decode(raw), Done) for raw in raws]

    def committed(self, job: str, batches: Iterable[int]) -> list[int]:
        key = _keys(job)["ok"]
        batches = list(batches)
        pipe = self.r.pipeline(transaction=False)
        for b in batches:
            pipe.getbit(key, b)
        return [b for b, bit in zip(batches, pipe.execute(), strict=False) if bit]

    def results(self, job: str, batches: list[int]) -> list[BatchResult | None]:
        """(items, errors, JSON lines) of each committed batch; None where there is none."""
        if not batches:
            return []
        prefix = _keys(job)["result"]
        out: list[BatchResult | None] = []
        for raw in cast(list[bytes | None], self.r.mget([prefix + str(b) for b in batches])):
            if raw is None:
                out.append(None)
                continue
            cut = raw.index(b"\n")
            items, errors = raw[:cut].split()
            out.append((int(items), int(errors), memoryview(raw)[cut + 1 :]))  # no copy
        return out

    def mark_written(
        self,
        job: str,
        batches: list[int],
        offset: int | None,
        items: int,
        errors: int,
        keep: bool = False,
    ) -> None:
        """Journal that `batches` are in the output (ending at `offset`) and free their results
        (`keep`: the results stay, the job's output being the store itself).

        Safe to repeat: the client retries a call whose reply timed out, and
        the counters must not count those batches twice.
        """
        k = _keys(job)
        self._written(
            keys=[
                k["stats"],
                k["written"],
                k["offset"],
                *(() if keep else (k["result"] + str(b) for b in batches)),
            ],
            args=[items, errors, self.ttl, "" if offset is None else offset, *batches],
        )

    def partials(self, job: str) -> dict[int, Any]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(_keys(job)["partials"]))
        return {int(b): _decode(v) for b, v in raw.items()}

    def journal(self, job: str) -> Journal:
        """Committed and written bitmaps, output offset, items and errors written."""
        k = _keys(job)
        pipe = self.r.pipeline(transaction=True)
        pipe.mget([k["ok"], k["written"], k["offset"]])
        pipe.hmget(k["stats"], ["items", "errors"])
        (ok, written, offset), (items, errors) = pipe.execute()
        return (
            ok or b"",
            written or b"",
            None if offset is None else int(offset),
            int(items or 0),
            int(errors or 0),
        )
