"""The dispatch loop of one pass over a job: send, collect, write, re-send what was lost."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from app.batch import UNENCODABLE
from app.launcher.job import BadInput, JobOptions
from app.launcher.output import Progress, say
from app.launcher.plan import BatchPlan, grown_size, in_flight_limit
from app.launcher.sources import InputError, check_json
from app.store import Store, bit_is_set

if TYPE_CHECKING:
    from app.launcher.launcher import Launcher

WRITE_CHUNK = 8  # batch results fetched per round trip
SEND_CHUNK = 256  # batch messages published per round trip (kombu's publish batch, Redis)
# A collecting round at most this often: at hundreds of batches a second each round then
# takes several announcements, results and journal marks per round trip instead of one.
# A batch's slot waits for it no longer: its next batch is on the broker already.
ROUND_SECONDS = 0.02
# A job whose sink refused a write pauses, and sends the refused batches again after this
# many seconds, doubled at each refusal in a row up to PAUSE_MAX.
PAUSE_FIRST, PAUSE_MAX = 5.0, 300.0


class _NothingYet:
    def __repr__(self) -> str:
        return "NOTHING_YET"


# What a source fed while the job runs (app.fleet's Executor) yields when no item waits:
# no batch is cut now, and the loop goes on collecting; the source is asked again next round.
NOTHING_YET: Any = _NothingYet()


def driver_slot(job: str) -> str:
    """The semaphore (one slot) its driver holds while it drives `job`."""
    return f"driver-{job}"


def running_batches(busy: set[str], job: str) -> set[int]:
    """The batches of `job` among the leases `busy` (Store.busy_slots: "job/batch")."""
    prefix = f"{job}/"
    return {int(m[len(prefix) :]) for m in busy if m.startswith(prefix)}


def driver_lease(lease_seconds: float) -> float:
    """How long a driver's hold on its job outlives its last renewal (renewed every second)."""
    return max(10.0, 3 * lease_seconds)


@dataclass
class Steering:
    """What a driver looks at once a second beside the batches: its hold on the job (which
    `fleet jobs` reads as the job's driver being alive), a cancel, a request to hand the
    job over, and, in the fleet, the mark of the batches sent so far, which a driver that
    takes over reads so as not to send them again."""

    store: Store
    job: str
    holder: str
    lease: float
    in_fleet: bool = False
    stop: threading.Event | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Why it stopped: "cancelled", "lost" (another driver holds the job), "stopped".
    why: str = ""

    def hold(self) -> bool:
        return self.store.acquire_slot(driver_slot(self.job), self.holder, 1, self.lease)

    def check(self, next_batch: int | None = None) -> bool:
        """True: stop driving now (self.why says why). `next_batch`: the first batch not
        sent yet."""
        # Attached (`fleet run`), the hold only tells `fleet jobs` the launcher is alive:
        # a resumed run goes on beside a launcher that died a moment ago.
        if not self.hold() and self.in_fleet:
            self.why = "lost"
        elif self.store.is_cancelled(self.job):
            self.why = "cancelled"
        elif self.stop is not None and self.stop.is_set():
            self.why = "stopped"
        if self.why:
            return True
        if self.in_fleet and next_batch is not None and self.meta.get("sent") != next_batch:
            self.meta["sent"] = next_batch
            self.store.put_meta(self.job, self.meta)
        return False

    def release(self) -> None:
        self.store.release_slot(driver_slot(self.job), self.holder)


@dataclass
class InFlight:
    body: bytes  # the encoded message, ready to send again
    sent_at: float
    seen_running: float = 0.0  # last time its lease was seen, 0 if never


class Dispatch:
    """The state of one pass over a job's batches."""

    def __init__(
        self,
        launcher: Launcher,
        job: str,
        task: str,
        opts: JobOptions,
        out: IO[bytes],
        out_path: str | None,
        progress: Progress,
        batches: int | None = None,
        steering: Steering | None = None,
        sent_before: int = 0,
        keep: bool = False,
        meta: dict[str, Any] | None = None,
        plan: BatchPlan | None = None,
    ) -> None:
        """`plan`: the plan the batches are being cut by, to grow with the fleet (None:
        a stream read once, cut by its own)."""
        self.launcher = launcher
        self.plan = plan
        # How many batches the job is cut into: known from the plan, or
        # counted when a stream of unknown length runs out.
        self.batches = batches
        self.store = launcher.store
        self.job = job
        self.task = task
        self.opts = opts
        self.out = out
        self.out_path = out_path
        # An output that takes each batch's lines with its number and its count of errors
        # (app.fleet's inbox), and says how many batches it holds that its reader has not
        # taken yet: those count against the in-flight limit, so a slow reader holds the
        # job back, bounded.
        self._emit = getattr(out, "write_batch", None)
        self._unread = getattr(out, "unread", None)
        self.progress = progress
        self.inflight: dict[int, InFlight] = {}
        self.written: set[int] = set()
        self.resent = 0
        self.unreported = 0  # batches written since the last advertise_backlog
        self.interrupted = False
        self.lease = launcher.settings.lease_seconds
        self._idle_since: float | None = None
        # Until then no batch is called lost: the store fell behind (note_stall).
        self._stalled_until = 0.0
        self.stalls = 0  # lost-batch checks skipped for a slow store
        self._next = 0  # the next batch number to take from the stream
        self._exhausted = False
        self.steering = steering
        # Batches below this were sent by an earlier driver of the job: in flight, not sent
        # again unless found lost.
        self.sent_before = sent_before
        # The job's output is the result store: written batches keep their results there.
        self.keep = keep
        # The job's metadata, where a pause is said (`fleet jobs` shows it).
        self.meta = meta
        # Paused (the sink refused a write): the refused batches, and when to send them again.
        self.refused: set[int] = set()
        self.retry_at = 0.0
        self.pause = 0.0  # seconds of the current pause; 0: not paused
        self.retried = False  # the refused batches were sent again since the pause began
        self._round_at = 0.0  # when the next collecting round may begin
        self.batch_seconds = 0.0  # what the workers reported of the batches committed

    def grow(self) -> None:
        """Cut the batches not cut yet larger when the fleet has grown past what the plan
        was sized for (BatchPlan.grow), and keep the new plan with the job first, so that
        a resumed job or a driver that takes it over cuts them the same."""
        if self.plan is None or self.meta is None or not self.meta.get("seconds_per_item"):
            return
        slots = self.launcher.slots()
        size = grown_size(
            self.plan,
            self.meta["seconds_per_item"],
            self.opts.target_seconds,
            slots,
            max_batch_seconds=self.launcher.settings.max_batch_seconds,
        )
        if size is None or not self.plan.grow(size):
            return
        self.meta["layout"] = self.plan.as_meta()
        self.store.put_meta(self.job, self.meta)
        self.batches = self.plan.count()
        first = self.plan.steps[-1][0]
        say(f"job {self.job}: {slots:,} slots online, batches of {size:,} IDs from batch {first:,}")

    def max_in_flight(self) -> int:
        return self.opts.max_in_flight or in_flight_limit(self.launcher.slots())

    def loop(
        self,
        payloads: Iterator[Any],
        written_bits: bytes,
        committed_bits: bytes,
        interrupted: list[bool],
    ) -> None:
        last_check = time.monotonic()
        while True:
            backlog = self.fill(payloads, written_bits, committed_bits)
            if backlog:
                self.write(backlog)
            if interrupted[0]:
                self.interrupted = True
                return
            if self._exhausted and not self.inflight:
                return
            self.collect()
            now = time.monotonic()
            if now - last_check >= 1.0:
                if self.steering is not None and self.steering.check(self._next):
                    if self.steering.why == "cancelled":
                        self.drain()
                    self.interrupted = True
                    return
                self.retry_refused(now)
                self.find_lost(now)
                self.grow()
                self.launcher.advertise_backlog(self.job, self.held(), self.unreported)
                self.unreported = 0
                last_check = now

    def fill(
        self, payloads: Iterator[Any], written_bits: bytes, committed_bits: bytes
    ) -> list[int]:
        """Send batches until the in-flight limit; those committed on an earlier pass
        are not sent but returned, to be written."""
        backlog: list[int] = []
        if self.pause:
            return backlog  # the sink refuses writes: nothing new until it takes one again
        sends: list[tuple[int, bytes]] = []  # published together, in one round trip
        try:
            self._fill(payloads, written_bits, committed_bits, backlog, sends)
        finally:
            self.launcher.send_many(self.job, sends)  # what was cut before a bad input too
        return backlog

    def _fill(
        self,
        payloads: Iterator[Any],
        written_bits: bytes,
        committed_bits: bytes,
        backlog: list[int],
        sends: list[tuple[int, bytes]],
    ) -> None:
        limit = self.max_in_flight() - (self._unread() if self._unread is not None else 0)
        while not self._exhausted and len(self.inflight) < limit:
            try:
                payload = next(payloads)
                if payload is NOTHING_YET:
                    break
            except StopIteration:
                self._exhausted = True
                self.batches = self._next
                break
            except InputError as exc:  # only a streamed source gets here
                self.store.cancel(self.job)
                raise BadInput(f"{exc} Batches before it were sent and written.") from None
            batch, self._next = self._next, self._next + 1
            if bit_is_set(written_bits, batch):
                continue
            body = self._encode(batch, payload)
            self.inflight[batch] = InFlight(body, time.monotonic())
            if bit_is_set(committed_bits, batch):
                backlog.append(batch)
            elif batch < self.sent_before:
                pass  # on the broker already, or lost: find_lost sends it again if so
            else:
                sends.append((batch, body))
                if len(sends) >= SEND_CHUNK:
                    self.launcher.send_many(self.job, sends)
                    sends.clear()

    def _encode(self, batch: int, payload: Any) -> bytes:
        try:
            body = self.launcher.encode(self.job, batch, self.task, payload)
        except UNENCODABLE:
            # Only items from Python (app.fleet) can be other than JSON: name the first.
            try:
                check_json(payload, 0, where=f" of batch {batch}")
            except InputError as exc:
                self.store.cancel(self.job)
                raise BadInput(f"{exc} Batches before it were sent and written.") from None
            raise
        limit = self.launcher.settings.message_limit
        if len(body) > limit:
            # Workers refuse it (app/batch.py): say so before sending.
            self.store.cancel(self.job)
            raise BadInput(
                f"batch {batch} takes {len(body):,} bytes, more than the {limit:,} a batch "
                "message may hold on this broker; use a smaller --batch-size."
            )
        return body

    def collect(self) -> None:
        """Write the batches workers announced as committed (waiting up to half a second)."""
        began = time.monotonic()
        if began < self._round_at:
            time.sleep(self._round_at - began)
            began = self._round_at
        self._round_at = began + ROUND_SECONDS
        dones = self.store.wait_done(self.job, timeout=0.5)
        # It waits half a second at most: much longer, and the store (or this process)
        # fell behind, and leases may look lapsed that were not.
        now = time.monotonic()
        self.note_stall(now - began - 0.5, now)
        refused = next((d.refused for d in dones if d.refused and not d.later), None)
        if refused:
            self.store.cancel(self.job)
            raise BadInput(refused)
        later = [d for d in dones if d.later]
        if later:
            self.pause_for(later[-1].refused, {d.batch for d in later})
        committed = [d.batch for d in dones if not d.refused]
        self.batch_seconds += sum(d.seconds for d in dones if not d.refused)
        self.write(committed)
        if committed and self.pause:
            self.resume_writes()

    def drain(self) -> None:
        """Cancelled: write the batches that commit while those running end (the workers
        drop the job's queued ones), so what ran is in the output; bounded by a lease."""
        deadline = time.monotonic() + max(3 * self.lease, 10.0)
        while time.monotonic() < deadline:
            running = running_batches(self.store.busy_slots(), self.job)
            dones = self.store.wait_done(self.job, timeout=0.2)
            self.write([d.batch for d in dones if not d.refused])
            if not running and not dones:
                return

    def pause_for(self, reason: str, batches: set[int]) -> None:
        """The sink refused `batches`: hold them (and every batch not sent yet) back, and send
        them again after a pause that doubles at each refusal in a row."""
        self.refused |= {b for b in batches if b in self.inflight}
        if self.pause and not self.retried:
            return  # another batch of the same round refused: the pause is already counting
        self.pause = min(self.pause * 2, PAUSE_MAX) if self.pause else PAUSE_FIRST
        self.retried = False
        self.retry_at = time.monotonic() + self.pause
        say(f"job {self.job} paused: {reason}; trying again in {self.pause:.0f} s")
        if self.meta is not None:
            self.meta["paused"] = reason
            self.store.put_meta(self.job, self.meta)

    def resume_writes(self) -> None:
        """A batch committed: the sink takes writes again."""
        self.pause = 0.0
        self.retry_at = 0.0  # the refused batches go again at the next tick
        say(f"job {self.job}: the sink takes writes again")
        if self.meta is not None and self.meta.pop("paused", None) is not None:
            self.store.put_meta(self.job, self.meta)

    def retry_refused(self, now: float) -> None:
        """Once the pause is over, send the refused batches again (the next refusal pauses
        longer; the first commit ends the pause)."""
        if not self.refused or now < self.retry_at:
            return
        self.send_again([b for b in sorted(self.refused) if b in self.inflight], now)
        self.refused.clear()
        self.retried = True
        self.retry_at = now + self.pause

    def held(self) -> int:
        """Batches not sent yet; for a stream of unknown length, as many again as in flight."""
        if self._exhausted:
            return 0
        if self.batches is None:
            return len(self.inflight)
        return max(0, self.batches - self._next)

    def write(self, batches: list[int]) -> None:
        """Copy the committed lines of `batches` to the output and journal them."""
        pending = sorted({b for b in batches if b not in self.written})
        # A few batches per round trip, so memory stays bounded however many finished.
        for i in range(0, len(pending), WRITE_CHUNK):
            self._write_chunk(pending[i : i + WRITE_CHUNK])

    def _write_chunk(self, batches: list[int]) -> None:
        items = errors = 0
        done_now = []
        for b, result in zip(batches, self.store.results(self.job, batches), strict=False):
            if result is None:
                continue  # expired; the lost-batch check re-sends it
            n, e, lines = result
            if self._emit is not None:
                self._emit(b, lines, e)
            else:
                self.out.write(lines)
            items += n
            errors += e
            done_now.append(b)
        if not done_now:
            return
        self.out.flush()
        offset = self.out.tell() if self.out_path else None
        self.store.mark_written(self.job, done_now, offset, items, errors, keep=self.keep)
        for b in done_now:
            self.written.add(b)
            self.inflight.pop(b, None)
        self.unreported += len(done_now)
        self.progress.add(items, errors)

    def note_stall(self, late: float, now: float) -> None:
        """A store call came back `late` seconds later than it should have: past a third of
        a lease, no batch is called lost until the store has answered in time for a whole
        lease. Its workers' renewals were held up as this launcher's reads were, and a
        lease that lapsed meanwhile is renewed within a third of a lease once they pass."""
        if late > max(1.0, self.lease / 3):
            self._stalled_until = max(self._stalled_until, now + self.lease + late)

    def find_lost(self, now: float) -> None:
        """Re-send batches whose lease lapsed, or that sit unstarted while slots are idle.

        Not while the store has been slow (note_stall): a batch is called lost only when
        its lease lapsed while the store answered in time. And at most a quarter of the
        slots' batches (at least two) are sent again per check, so a burst of losses costs
        the broker and the workers a bounded amount at a time."""
        began = time.monotonic()
        busy = self.store.busy_slots()
        self.note_stall(time.monotonic() - began, now)
        stalled = now < self._stalled_until
        running = running_batches(busy, self.job)
        lost = []
        unstarted = []
        for b, f in self.inflight.items():
            if b in self.refused:
                continue  # held back by the pause, sent again by retry_refused
            if b in running:
                f.seen_running = now
            elif stalled:
                continue
            elif f.seen_running and now - f.seen_running > self.lease:
                lost.append(b)
            elif not f.seen_running:
                unstarted.append(b)
        if stalled:
            self._idle_since = None
            self.stalls += 1
            return
        # Idle by the leases and by the heartbeats both: this check mostly runs just as a
        # batch is announced done (collect returns on it), when that slot holds no lease
        # until its worker starts the next batch, so the leases alone would show a slot
        # idle at nearly every look, and send again batches that merely wait their turn.
        idle = min(self.launcher.slots() - len(busy), self.launcher.idle_slots())
        lost.extend(self._unstarted_while_idle(unstarted, idle, now))
        self.send_again(lost[: max(2, self.launcher.slots() // 4)], now)

    def send_again(self, batches: list[int], now: float) -> None:
        """Publish batches in flight once more, as if sent now (never seen running since)."""
        for b in batches:
            self.inflight[b].seen_running, self.inflight[b].sent_at = 0.0, now
        self.launcher.send_many(self.job, [(b, self.inflight[b].body) for b in batches])
        self.resent += len(batches)

    def _unstarted_while_idle(self, unstarted: list[int], idle: int, now: float) -> list[int]:
        """Unstarted batches to send again: once slots have sat idle for a lease beside them."""
        if not unstarted or idle <= 0:
            self._idle_since = None
            return []
        if self._idle_since is None:
            self._idle_since = now
            return []
        if now - self._idle_since <= self.lease:
            return []
        # Only those unstarted for a lease since they were sent: one that merely waits its
        # turn (behind a worker's main loop that falls behind, say) is not taken for lost.
        # The idle clock keeps running until one qualifies, so a batch lost on the broker
        # goes again a lease after it was sent, not up to two leases later.
        waited = [b for b in unstarted if now - self.inflight[b].sent_at > self.lease]
        if waited:
            self._idle_since = None
        return sorted(waited)[:idle]


class interrupt_guard:
    """Turn the first Ctrl-C into a clean stop (the job stays resumable); a second one aborts."""

    def __enter__(self) -> list[bool]:
        self.flag = [False]
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self.flag

    def _handle(self, signum: int, frame: Any) -> None:
        if self.flag[0]:
            raise KeyboardInterrupt
        self.flag[0] = True
        say("\nstopping: batches already running will be kept for --resume (Ctrl-C again to abort)")

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
