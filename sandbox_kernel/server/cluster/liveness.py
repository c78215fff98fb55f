"""Which workers are alive, and whether a job's worker still is (design B3, B6, B7).

A worker proves it is alive by refreshing ``sk:worker:<name>`` every
:data:`~.keys.HEARTBEAT_INTERVAL` (0.25 s) with a TTL of :data:`~.keys.HEARTBEAT_TTL_MS` (1 s):
the key vanishes within a second of the worker dying, however it died. :class:`Heartbeat` is
that refresh, in a thread of its own with a synchronous client: a worker's event loop busy with
a 50 MB copy must not look dead. The thread is also what registers the worker again after a
Redis restart: every beat writes the key, the ``sk:workers`` entry and the ``sk:seen`` time
(and refreshes the TTL of the worker's control stream), and a beat that finds
the entry gone (a restarted Redis lost it, or a front pruned a worker that missed beats) calls
``on_join``, with which the worker registers its cached environments' routing hints again
(``sk:env:<uuid>``), so that fronts keep routing a session's cells to it. ``every`` runs other
slow checks (the worker compares its caps with the fronts'). Both run in a side thread of
their own, never in the beating one.

:class:`Liveness` is the reading side, on ``redis.asyncio`` for fronts: the live workers (for
``specifications/`` and ``usages/``), and whether the owner of a claimed job still beats (a
front answers 502 when it does not).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import keys

if TYPE_CHECKING:
    import redis
    import redis.asyncio

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkerState:
    """What a heartbeat says: ``{"slots", "busy", "jobs", "started", "cached_environments",
    "isolation"}`` (the last two optional: fronts show them in ``usages/`` and
    ``specifications/``)."""

    name: str
    slots: int
    busy: int
    jobs: tuple[str, ...]
    #: When the worker started (Unix time).
    started: float
    #: Environments the worker holds in its local cache (``usages/``' ``workers``).
    cached_environments: int = 0
    #: The worker's ``Isolation.describe()`` (``specifications/``' ``container.isolation``).
    isolation: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "slots": self.slots,
                "busy": self.busy,
                "jobs": list(self.jobs),
                "started": self.started,
                "cached_environments": self.cached_environments,
                "isolation": self.isolation,
            }
        )

    @classmethod
    def from_json(cls, name: str, raw: bytes | str) -> WorkerState | None:
        """The state in a heartbeat key, or None if it is not one (logged: someone wrote it)."""
        try:
            value = json.loads(raw)
            state = cls(
                name=name,
                slots=value["slots"],
                busy=value["busy"],
                jobs=tuple(keys.job_id(job) for job in value["jobs"]),
                started=float(value["started"]),
                cached_environments=value.get("cached_environments", 0),
                isolation=value.get("isolation"),
            )
        except Exception as error:  # anyone with Redis access may write it: never raise
            # (RecursionError for deep nesting, OverflowError for a huge "started", ...)
            log.warning(
                "ignoring the malformed heartbeat of worker %s: %s: %s",
                name,
                type(error).__name__,
                str(error)[:200],
            )
            return None
        if type(state.slots) is not int or type(state.busy) is not int or state.slots < 1:
            log.warning("ignoring the heartbeat of worker %s: slots or busy are no counts", name)
            return None
        if (
            type(state.cached_environments) is not int
            or not isinstance(state.isolation, dict | None)
            or not math.isfinite(state.started)
        ):
            log.warning("ignoring the heartbeat of worker %s: a malformed cache or start", name)
            return None
        return state


class Heartbeat:
    """A worker's heartbeat: a daemon thread writing its :class:`WorkerState` with a TTL.

    ``client`` should have a ``socket_timeout`` below the TTL (``target.client(
    socket_timeout=0.5)``) so that a Redis that hangs cannot hold a beat back unseen.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        slots: int,
        *,
        interval: float = keys.HEARTBEAT_INTERVAL,
        ttl_ms: int = keys.HEARTBEAT_TTL_MS,
        clock: Callable[[], float] = time.time,
        isolation: dict[str, Any] | None = None,
        on_join: Callable[[], None] | None = None,
        every: tuple[float, Callable[[], None]] | None = None,
    ) -> None:
        """``on_join``: called after a beat that added the worker to ``sk:workers``, at
        start and after Redis lost it. ``every``: (seconds, call), a call made that often.
        Both run in a side thread, never the beating one (a slow registration must not hold
        a beat back), and are logged, never raised, when they fail; a failed ``on_join`` is
        tried again."""
        self.client = client
        self.on_join = on_join
        self.every = every
        self._next_check = 0.0
        #: Set by a beat that joined: the side thread runs ``on_join``.
        self._join_wanted = threading.Event()
        self._wake = threading.Event()
        self._side: threading.Thread | None = None
        #: Shown by fronts: the worker's ``Isolation.describe()``, and how many environments
        #: its local cache holds (the worker updates it; an int is read whole by the thread).
        self.isolation = isolation
        self.cached_environments = 0
        self.name = keys.name(name)
        self.key = keys.worker_key(name)
        self.slots = slots
        self.interval = interval
        self.ttl_ms = ttl_ms
        self.started = clock()
        self._jobs: dict[str, None] = {}  # ordered: the oldest job first
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: Beats written, and the longest time between two written beats, in seconds: past
        #: half the TTL, a busy machine risks a live worker looking dead (design B12, 3).
        self.beats = 0
        self.longest_gap = 0.0
        self._last_beat: float | None = None
        self._failing = False

    def job_started(self, job: str) -> None:
        with self._lock:
            self._jobs[keys.job_id(job)] = None

    def job_finished(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def state(self) -> WorkerState:
        with self._lock:
            jobs = tuple(self._jobs)
        return WorkerState(
            self.name,
            self.slots,
            len(jobs),
            jobs,
            self.started,
            cached_environments=self.cached_environments,
            isolation=self.isolation,
        )

    def beat(self) -> None:
        """Write one beat now: the key with its TTL, the name in ``sk:workers`` and its time
        in ``sk:seen``, and a fresh TTL on the worker's control stream; then wake the side
        thread for ``on_join`` if the name was not there. Nothing slow runs here: a beat
        waits for nothing but Redis."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key, self.state().to_json(), px=self.ttl_ms)
        pipe.sadd(keys.WORKERS, self.name)
        pipe.hset(keys.SEEN, self.name, f"{time.time():.3f}")
        pipe.expire(keys.control_key(self.name), keys.CONTROL_TTL_S)
        _, added, *_ = pipe.execute()
        now = time.monotonic()
        if self._last_beat is not None:
            self.longest_gap = max(self.longest_gap, now - self._last_beat)
        self._last_beat = now
        self.beats += 1
        if added and self.on_join is not None:
            self._join_wanted.set()
            self._wake.set()
            if self._side is None:  # the first beat, or beating without start(): here
                self._side_work()

    def _side_run(self) -> None:
        """The side thread: ``on_join`` when a beat asks, ``every`` when due."""
        while not self._stopping.is_set():
            self._side_work()
            pause = 3600.0 if self.every is None else self._next_check - time.monotonic()
            if self._join_wanted.is_set():  # it failed: again within a second
                pause = min(pause, 1.0)
            self._wake.wait(max(0.01, pause))
            self._wake.clear()

    def _side_work(self) -> None:
        if self._join_wanted.is_set() and self.on_join is not None:
            self._join_wanted.clear()
            if not self._call(self.on_join, "registering again"):
                self._join_wanted.set()  # tried again within a second
        now = time.monotonic()
        if self.every is not None and now >= self._next_check:
            self._next_check = now + self.every[0]
            self._call(self.every[1], "a periodic check")

    def _call(self, call: Callable[[], None], what: str) -> bool:
        """Whether ``call`` worked (a failed join is tried again at the next beat)."""
        try:
            call()
        except Exception as error:  # the beat goes on
            log.warning(
                "worker %s: %s failed: %s: %s", self.name, what, type(error).__name__, error
            )
            return False
        return True

    def start(self) -> None:
        """Beat once (so the worker is seen as soon as this returns), then every interval."""
        try:
            self.beat()  # no side thread yet: its on_join runs here, in the caller's thread
        finally:  # even when Redis is away: the threads retry
            self._side = threading.Thread(
                target=self._side_run, name=f"heartbeat-side-{self.name}", daemon=True
            )
            self._side.start()
            self._thread = threading.Thread(
                target=self._run, name=f"heartbeat-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self, *, clean: bool = True) -> None:
        """Stop beating. ``clean`` deletes the key, so fronts see the worker gone at once;
        without it the key lives out its TTL, as after a ``kill -9``."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._side is not None and self._side is not threading.current_thread():
            self._side.join(5)  # a registration under way may take a while: not for ever
        if clean:
            try:
                self.client.delete(self.key)
            except Exception as error:  # the key expires anyway
                log.warning("worker %s could not delete its heartbeat: %s", self.name, error)

    def _run(self) -> None:
        next_beat = time.monotonic() + self.interval
        while not self._stopping.wait(max(0.0, next_beat - time.monotonic())):
            next_beat = max(next_beat + self.interval, time.monotonic())
            try:
                self.beat()
            except Exception as error:
                self._failed(error)
            else:
                if self._failing:
                    self._failing = False
                    log.warning("worker %s reaches Redis again: its heartbeat is back", self.name)

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "worker %s cannot write its heartbeat (%s: %s): fronts will see it dead within "
                "%.1f s; retrying every %.2f s",
                self.name,
                type(error).__name__,
                error,
                self.ttl_ms / 1000,
                self.interval,
            )


class Liveness:
    """A front's view of the workers, on ``redis.asyncio``."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client

    async def alive_workers(self, *, prune: bool = True) -> dict[str, WorkerState]:
        """The workers whose heartbeat key lives, by name. ``prune`` drops the others from
        ``sk:workers`` (a name comes back with its next beat, should it still beat)."""
        members = await self.client.smembers(keys.WORKERS)
        names = sorted(filter(None, (_name(member) for member in members)))
        if not names:
            return {}
        values = await self.client.mget([keys.worker_key(name) for name in names])
        alive: dict[str, WorkerState] = {}
        gone: list[str] = []
        for name, value in zip(names, values, strict=True):
            if value is None:
                gone.append(name)
            elif (state := WorkerState.from_json(name, value)) is not None:
                alive[name] = state
        if prune and gone:
            await self.client.srem(keys.WORKERS, *gone)
        return alive

    async def owner(self, job: str) -> str | None:
        """Who claimed ``job``: a worker's name, a front's reserved owner, or None (nobody, or
        Redis lost the claim in a restart)."""
        value = await self.client.get(keys.claim_key(job))
        return None if value is None else _text(value)

    async def owner_alive(self, job: str) -> bool:
        """Whether a worker claimed ``job`` and still beats. False for an unclaimed job, a job
        a front gave up, and a lost claim: a front asks only about jobs it saw claimed, for
        which each of these means the run is lost."""
        return (await self.owners_alive([job]))[job]

    async def owners_alive(self, jobs: Iterable[str]) -> dict[str, bool]:
        """:meth:`owner_alive` for many jobs in two round trips (a front's watcher checks all
        its claimed jobs every 250 ms). A claim never changes owner once set, so reading the
        claims and then the heartbeats is as good as one atomic read."""
        jobs = list(jobs)
        if not jobs:
            return {}
        claims = await self.client.mget([keys.claim_key(job) for job in jobs])
        owners = {job: _text(value) for job, value in zip(jobs, claims, strict=True) if value}
        workers = sorted({owner for owner in owners.values() if _name(owner)})
        beating: dict[str, bool] = {}
        if workers:
            pipe = self.client.pipeline(transaction=False)
            for worker in workers:
                pipe.exists(keys.worker_key(worker))
            beating = dict(zip(workers, map(bool, await pipe.execute()), strict=True))
        return {job: beating.get(owners.get(job, ""), False) for job in jobs}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _name(value: Any) -> str | None:
    """A worker name from Redis, or None for junk (never turned into a key)."""
    text = _text(value)
    return text if keys.NAME_RE.fullmatch(text) else None
