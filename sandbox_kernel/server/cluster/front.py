"""A cluster front: ``sandbox-kernel serve --cluster redis://... --storage s3://...`` (design B7).

A front speaks the same HTTP protocol as the single server (:class:`~..app.ProtocolApp`: the
guard, the token, the caps, the admission of configs and archives, ``execute/`` and
``execute/stream/`` unchanged) and runs nothing itself: :class:`ClusterExecutor` puts each run
on the task engine and waits, without ever blocking its event loop, for the worker's events
on the front's one inbox stream. Fronts hold no state: any number of them can stand behind a
load balancer, and a killed one loses only the requests it was answering.

A run, seen from the front:

1. the upload goes to Redis (``sk:upload:<job>``, up to 1 MiB) or to the bucket
   (``PREFIX/uploads/<job>.tgz``); the job enters the queue (``ZADD sk:waiting``);
2. routing: a live worker that holds the base environment and has a free slot gets the job
   on its own queue; after :data:`AFFINITY_WAIT` without a claim, a copy goes to the shared
   queue. The atomic claim (:func:`.keys.claim`) lets only one copy run;
3. until a worker claims it, the job's place in the queue is sent to clients that asked for
   it (``RunHooks.on_queue``); after ``--queue-wait`` the front claims the job itself
   (:func:`.keys.give_up`): if that wins nothing ran, and the answer is the contract's 503;
   if it loses, a worker got there first and the front keeps waiting;
4. once claimed, a watcher checks every :data:`LIVENESS_POLL` that the worker still beats: a
   dead worker, a lost Redis connection or a claim that vanished (Redis restarted) answer 502
   with :data:`~sandbox_kernel.protocol.CLUSTER_LOST_TEXT` ("it may have run"), never 503;
5. a client that goes away cancels the handler: an unclaimed job is claimed by the front
   (nobody will run it), a claimed one gets ``cancel`` on its worker's control stream, which
   kills the run there.

The GET endpoints answer for the whole cluster: ``specifications/`` and ``usages/`` from the
workers' heartbeats, ``environments/`` and ``files/`` from the bucket's manifests and blobs.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
import uuid as uuid_module
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import redis.asyncio
import redis.exceptions
from aiohttp import web

from ... import protocol
from ..app import ProtocolApp, send_file, text
from ..executor import EnvironmentNotFound, Overloaded, Refused
from ..libraries import INVENTORY_SCRIPT, parse_inventory
from ..live import MAX_STDIN_WAITING, Refusal, RunHooks, stdin_flood
from ..storage import StorageFull
from ..sysinfo import EXTENSIONS, UsageSampler, specifications
from ..unpacker import UnpackFailed
from ..uploads import StagingPlaces, Upload
from . import engine, jobs, keys
from .liveness import Liveness, WorkerState
from .manifests import File, Folder, HardLink, Limits, Manifest, ManifestError, Symlink
from .objects import ObjectStore, ObjectStoreError
from .settings import RedisTarget, check_async, parse_redis_url
from .sweeper import Sweeper

if TYPE_CHECKING:
    from celery import Celery

    from .. import Served
    from ..runners import Isolation
    from ..settings import ServerSettings

log = logging.getLogger(__name__)

#: How long a job routed to the worker holding its environment waits for that worker's claim
#: before a copy goes to the shared queue (design B7, step 4).
AFFINITY_WAIT: Final = 0.1
#: An unclaimed job waits this long while workers have free slots before it is queued
#: again (the broker may have lost it: see ``ClusterExecutor._rescue_unclaimed``).
RESCUE_AFTER: Final = 1.0
#: How often the queue positions of this front's waiting jobs are read (one pipeline).
QUEUE_POLL: Final = 0.5
#: How often the claimed jobs' workers are checked for a heartbeat.
LIVENESS_POLL: Final = 0.25
#: ``XREAD BLOCK`` on the inbox, in ms, and events taken per read.
INBOX_BLOCK_MS: Final = 1000
INBOX_BATCH: Final = 512
#: A claimed run's answer is awaited at most ``--queue-wait`` + ``--execute-timeout`` + this
#: (unpacking, saving): past it, the request fails 502 whatever happened to its events.
ANSWER_MARGIN: Final = 30.0
#: A front's inbox expires this long after the front stopped refreshing it (a killed front's
#: inbox goes away), refreshed every :data:`INBOX_REFRESH` by the liveness watcher.
INBOX_TTL_S: Final = 3600
INBOX_REFRESH: Final = 60.0
#: ``socket_timeout`` of the front's Redis client: above the inbox's blocking read.
FRONT_SOCKET_TIMEOUT: Final = INBOX_BLOCK_MS / 1000 + 5
FRONT_HEALTH_CHECK: Final = 15
#: A pause before reading the inbox again after Redis failed (the client reconnects then).
REDIS_RETRY_PAUSE: Final = 0.2
#: stdin a streamed run may relay in all (the worker's run refuses more than 1 MiB waiting
#: unread, but every frame stays in Redis until its control stream is trimmed: this bounds
#: what one client can put there), and the size of one relayed piece.
RELAY_STDIN_MAX: Final = 16 * MAX_STDIN_WAITING
RELAY_PIECE: Final = 64 * 1024
#: Control entries a streamed run may have waiting for Redis (stdin pieces, merged up to
#: :data:`RELAY_PIECE` each): a flood of tiny frames is refused 413 beyond.
RELAY_QUEUE_MAX: Final = 256
#: Manifests kept parsed in memory (they are immutable; expiry is checked at each use).
MANIFEST_CACHE: Final = 256
#: ... and at most this many entries in all (a manifest of 100,000 entries takes about 30 MB
#: parsed): a cache bounded by count alone could hold gigabytes.
MANIFEST_CACHE_ENTRIES: Final = 500_000
#: Environment archives kept on the front's disk for ``environments/``.
ARCHIVE_CACHE: Final = 8
#: The live workers' view is reused this long by ``specifications/`` and ``usages/``.
VIEW_SECONDS: Final = 0.5
#: Uploads a front stages at once (``StagingPlaces``): a front waits in a queue, not a slot.
MIN_STAGING_PLACES: Final = 64
#: Threads of the bucket's reads for ``environments/``.
ARCHIVE_THREADS: Final = 8
#: The owner of archived files, as the single server writes them.
_ARCHIVE_OWNER: Final = (1000, "student")
_NOT_FOUND = "No environment with UUID '{uuid}' found"


class ClusterRefusal(Refused):
    """A run refused or failed on a worker, answered with the worker's status and text."""


class ClusterLost(ClusterRefusal):
    """The run may have started, and the cluster lost it (a worker or Redis went down):
    502 with :data:`~sandbox_kernel.protocol.CLUSTER_LOST_TEXT`, never 503."""

    def __init__(self, why: str) -> None:
        super().__init__(protocol.CLUSTER_LOST_STATUS, protocol.CLUSTER_LOST_TEXT)
        self.why = why


def worker_refusal(status: int, message: str) -> Exception:
    """The exception that answers a worker's ``error`` event exactly as the single server
    answers the same refusal: the executor's own exceptions where the text is theirs (so
    ``refusal_answer`` gives it back word for word), else :class:`ClusterRefusal`."""
    if status == 503 and message == protocol.OVERLOADED_TEXT:
        return Overloaded()
    if status == 507:
        return StorageFull(message)
    prefix, suffix = _NOT_FOUND.split("{uuid}")
    if status == 404 and message.startswith(prefix) and message.endswith(suffix):
        return EnvironmentNotFound(message[len(prefix) : len(message) - len(suffix)])
    archive = "Invalid environment archive: "
    if status == 400 and message.startswith(archive):
        return UnpackFailed(message[len(archive) :])
    return ClusterRefusal(status, message)


# -- the runs -------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    """One run this front waits for."""

    id: str
    #: Events from the inbox, or the exception that ends the wait (:class:`ClusterLost`).
    events: asyncio.Queue[jobs.Event | BaseException]
    on_queue: Callable[[int], None] | None = None
    relay: RelayControl | None = None
    #: In ``sk:waiting`` (ZADD done): from then on the watcher looks after it.
    queued: bool = False
    #: The run got its answer or its failure (a 502 included): the watcher leaves it alone.
    #: Unlike ``queued``, it says nothing of whether the job must still be given up or
    #: cancelled: the cleanup always tries both.
    answered: bool = False
    #: The worker that claimed it.
    worker: str | None = None
    #: What the front last told about the queue.
    ahead: int | None = None
    #: Where its upload waits (deleted at the end).
    upload: jobs.UploadRef | None = None
    #: The job message, published again if the broker may have lost it (see
    #: :meth:`ClusterExecutor._rescue_unclaimed`), and when it was last published.
    message: str | None = None
    published: float = 0.0
    #: The task handing the client's stdin, eof and stop to the worker (a streamed run only),
    #: started once by :meth:`attach`, cancelled when ``execute`` ends.
    forwarder: asyncio.Task[None] | None = None
    #: When the owner was first seen not beating (``loop.time()``): failed at the next poll
    #: only if no final came meanwhile (a worker's clean shutdown deletes its key just after
    #: sending the last finals).
    silent_since: float | None = None

    def attach(self, worker: str, client: redis.asyncio.Redis) -> None:
        """``worker`` claimed the job: remember it, and start relaying the client's controls
        to it. Every place that learns the owner calls this (the ``claimed`` event, the
        watcher, a lost give-up), so whichever comes first starts the forwarder, once."""
        if self.worker is None:
            self.worker = worker
        if self.relay is not None and self.forwarder is None:
            self.forwarder = asyncio.get_running_loop().create_task(
                self.relay.forward(client, self, self.worker), name=f"forward-{self.id}"
            )

    def fail(self, why: str) -> None:
        self.answered = True
        self.events.put_nowait(ClusterLost(why))


@dataclasses.dataclass
class _RelayHooks(RunHooks):
    """The hooks of a streamed run on a front: they lead back to its :class:`RelayControl`."""

    relay: RelayControl | None = None


def _no_command(_runner: object) -> None:
    """A front runs no command: the worker's own hooks see them."""


class RelayControl:
    """A streamed run's controls on a front (:class:`~..live.LiveControl`): the client's
    stdin, end of file and stop go to the control stream of the worker that claimed the job,
    held in order until the claim arrives; the worker's ``stream`` and ``stdin`` events come
    back through ``send`` as the single server's frames.

    A client can send frames much faster than Redis takes them, so what waits is bounded:
    consecutive stdin pieces are merged up to :data:`RELAY_PIECE` bytes, end of file and
    stop are sent once each, and at most :data:`RELAY_QUEUE_MAX` entries wait (413 beyond).
    """

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self.send = send
        self.hooks: RunHooks = _RelayHooks(
            on_output=self._on_output, on_command=_no_command, relay=self
        )
        #: Controls to send, in order: kind, data, and the stdin bytes they carry.
        self.outgoing: collections.deque[tuple[str, dict[str, Any], int]] = collections.deque()
        self._ready = asyncio.Event()
        #: stdin bytes not yet handed to Redis, and relayed in all.
        self.held = 0
        self.relayed = 0
        #: Bytes of a UTF-8 sequence cut by the end of a piece wait here for the rest.
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._eof_sent = False
        self._stop_sent = False

    def _on_output(self, stream: str, chunk: str) -> None:
        self.send({"stream": stream, "text": chunk})

    def wanted(self, prompt: str) -> None:
        self.send({"stdin": "wanted", "prompt": prompt})

    def give_stdin(self, data: bytes) -> Refusal | None:
        if self.held + len(data) > MAX_STDIN_WAITING:
            return stdin_flood()
        if self.relayed + len(data) > RELAY_STDIN_MAX:
            return (
                413,
                f"More than {RELAY_STDIN_MAX // 1024**2} MiB of stdin were sent to this run "
                "through the cluster's front: the run was stopped. Give large inputs as files "
                "in the environment archive instead.",
            )
        pieces = split_utf8(self._decoder.decode(data), RELAY_PIECE)
        if self._entries_after(pieces) > RELAY_QUEUE_MAX:
            return (
                413,
                f"More than {RELAY_QUEUE_MAX} stdin messages waited to be relayed to this "
                "run's worker: the run was stopped. Send input in fewer, larger pieces, or "
                "when the run asks for it.",
            )
        self.held += len(data)
        self.relayed += len(data)
        for piece in pieces:
            self._put_stdin(piece)
        return None

    def _entries_after(self, pieces: list[str]) -> int:
        """How many entries would wait once ``pieces`` are added (the first may merge)."""
        if not pieces:
            return len(self.outgoing)
        merges = self._mergeable(pieces[0])
        return len(self.outgoing) + len(pieces) - (1 if merges else 0)

    def _mergeable(self, piece: str) -> bool:
        if not self.outgoing or self.outgoing[-1][0] != "stdin":
            return False
        last = self.outgoing[-1][1]["text"]
        return len(last.encode()) + len(piece.encode()) <= RELAY_PIECE

    def _put_stdin(self, piece: str) -> None:
        size = len(piece.encode())
        if self._mergeable(piece):
            _, data, held = self.outgoing.pop()
            self.outgoing.append(("stdin", {"text": data["text"] + piece}, held + size))
        else:
            self.outgoing.append(("stdin", {"text": piece}, size))
        self._ready.set()

    def end_stdin(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        rest = self._decoder.decode(b"", final=True)  # a cut sequence: U+FFFD, as one server
        if rest:
            self._put_stdin(rest)
        self.outgoing.append(("eof", {}, 0))
        self._ready.set()

    def stop(self) -> None:
        if self._stop_sent:
            return
        self._stop_sent = True
        self.outgoing.append(("stop", {}, 0))
        self._ready.set()

    async def watch(self) -> None:
        """The worker's run watches its stdin; its ``stdin`` events arrive with the others."""
        await asyncio.Event().wait()

    async def _next(self) -> tuple[str, dict[str, Any], int]:
        while not self.outgoing:
            self._ready.clear()
            await self._ready.wait()
        return self.outgoing.popleft()

    async def forward(self, client: redis.asyncio.Redis, job: _Job, worker: str) -> None:
        """Hand the held and future controls to ``worker``, in order (until cancelled). A
        control Redis refuses cannot reach the run: the job fails (502, it may have run)."""
        stream = keys.control_key(worker)
        while True:
            kind, data, size = await self._next()
            fields = jobs.encode_event(jobs.Event(job.id, kind, data), control=True)
            try:
                await client.xadd(stream, fields, maxlen=keys.CONTROL_MAXLEN, approximate=True)  # type: ignore[arg-type]
            except redis.exceptions.RedisError as error:
                log.warning("job %s: could not relay %s to %s: %s", job.id, kind, worker, error)
                if not job.answered:
                    job.fail(f"Redis failed while relaying the client's {kind}: {error}")
                return
            self.held -= size


def split_utf8(text_: str, limit: int) -> list[str]:
    """``text_`` in pieces of at most ``limit`` bytes of UTF-8 each, cut between characters
    (a piece never ends inside a character's byte sequence)."""
    pieces: list[str] = []
    encoded = text_.encode("utf-8", "surrogatepass")
    start = 0
    while start < len(encoded):
        end = min(start + limit, len(encoded))
        while end < len(encoded) and end > start and (encoded[end] & 0xC0) == 0x80:
            end -= 1  # a continuation byte: the character began before the cut
        pieces.append(encoded[start:end].decode("utf-8", "surrogatepass"))
        start = end
    return pieces


class ClusterExecutor:
    """The front's :class:`~..executor.Runs`: each run goes to a worker through the engine.

    All on ``redis.asyncio``; the engine's publish (Celery, blocking) runs in a one-thread
    executor. One inbox reader, one queue reader and one liveness watcher serve all the runs
    of this front, so a waiting run costs no connection of its own.
    """

    def __init__(
        self,
        settings: ServerSettings,
        client: redis.asyncio.Redis,
        store: ObjectStore,
        engine_app: Celery,
        name: str,
    ) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.engine_app = engine_app
        self.name = keys.name(name)
        self.inbox = keys.inbox_key(self.name)
        self.liveness = Liveness(client)
        self.jobs: dict[str, _Job] = {}
        self.max_event = jobs.event_cap(settings.max_output, settings.max_result)
        self._publisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._tasks: list[asyncio.Task[None]] = []
        self._cleanups: set[asyncio.Task[None]] = set()
        #: Called with a request's staged archive once it is stored for the worker: the
        #: front's staging place and disk are given back before the run waits in the queue.
        self.on_stored: Callable[[Path], Awaitable[None]] | None = None
        #: Fallback copies sent to the shared queue (for logs and tests).
        self.copies = 0
        #: Runs this front waits for (``usages/`` shows the whole cluster's count).
        self.busy = 0
        #: The live workers the watcher saw last (a worker gone from it may have died
        #: holding unclaimed jobs).
        self._workers_seen: set[str] = set()
        self._free_slots = 0
        self._rescuing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        last = await self._inbox_end()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_inbox(last), name="inbox"),
            loop.create_task(self._watch_liveness(), name="liveness"),
            loop.create_task(self._read_queue(), name="queue"),
        ]

    async def close(self) -> None:
        if self._rescuing is not None:
            self._tasks.append(self._rescuing)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=2)
        self._publisher.shutdown(wait=False)
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.client.delete(self.inbox)

    def live(self, send: Callable[[dict[str, Any]], None]) -> RelayControl:
        return RelayControl(send)

    # -- one run ----------------------------------------------------------------------------------

    async def execute(
        self,
        config: Mapping[str, Any],
        upload: Path | None,
        hooks: RunHooks | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Run ``config`` on a worker and return its answer; raises the refusals of
        ``execute/`` (:class:`Overloaded` after ``--queue-wait``), :class:`ClusterRefusal`
        for a worker's other errors and :class:`ClusterLost` (502). ``user`` is always None:
        fronts refuse --hub-auth (settings)."""
        relay = hooks.relay if isinstance(hooks, _RelayHooks) else None
        job = _Job(uuid_module.uuid4().hex, asyncio.Queue(), relay=relay)
        job.on_queue = hooks.on_queue if hooks is not None else None
        self.jobs[job.id] = job
        self.busy = len(self.jobs)
        finished = False
        try:
            message = job.message = await self._prepare(
                job, config, upload, streamed=hooks is not None
            )
            queue = await self._enqueue(job, config, message)
            answer = await self._await_answer(job, message, queue, hooks)
            finished = True
            return answer
        except ClusterLost as lost:
            log.warning("job %s answered 502: %s", job.id, lost.why)
            raise
        except (ClusterRefusal, Overloaded, UnpackFailed, EnvironmentNotFound, StorageFull):
            finished = True
            raise
        finally:
            job.answered = True
            self.jobs.pop(job.id, None)
            self.busy = len(self.jobs)
            if job.forwarder is not None:
                job.forwarder.cancel()
            cleanup = asyncio.get_running_loop().create_task(self._cleanup(job, finished))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            if not finished:  # cancelled, or lost: tell the worker, even while cancelled
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(cleanup)

    async def _prepare(
        self, job: _Job, config: Mapping[str, Any], upload: Path | None, *, streamed: bool
    ) -> str:
        """The job message, its upload stored where the worker will find it."""
        if upload is not None:
            job.upload = await self._store_upload(job.id, upload)
            if self.on_stored is not None:  # the worker reads it from Redis or the bucket now
                await self.on_stored(upload)
        spec = jobs.JobSpec(
            job=job.id,
            front=self.name,
            config=dict(config),
            upload=job.upload,
            stream=streamed,
            enqueued_ms=int(time.time() * 1000),
        )
        try:
            return spec.to_json(
                max_config_bytes=self.settings.max_config_bytes,
                max_upload=self.settings.max_upload,
            )
        except jobs.BadJob as error:
            raise ClusterRefusal(400, str(error)) from None

    async def _store_upload(self, job: str, path: Path) -> jobs.UploadRef:
        data, digest = await asyncio.to_thread(_read_and_hash, path, keys.UPLOAD_INLINE_MAX)
        size = path.stat().st_size
        if size == 0:
            raise UnpackFailed("the archive is empty: send a .tgz, or no environment part")
        try:
            if data is not None:
                ttl = max(keys.UPLOAD_TTL_S, int(self.settings.queue_wait) + 60)
                await self.client.set(keys.upload_key(job), data, ex=ttl)
                return jobs.UploadRef("redis", size, digest)
            await asyncio.to_thread(self._put_upload, job, path, size)
        except (redis.exceptions.RedisError, ObjectStoreError) as error:
            log.warning("could not store the upload of job %s: %s", job, error)
            raise Overloaded() from None  # nothing was queued: a retry is right
        return jobs.UploadRef("bucket", size, digest)

    def _put_upload(self, job: str, path: Path, size: int) -> None:
        with open(path, "rb") as body:
            self.store.put_upload(job, body, size)

    async def _enqueue(self, job: _Job, config: Mapping[str, Any], message: str) -> str:
        """Queue the job and publish it; the queue it went to. A failure before the publish
        answers 503 (nothing can run a message never sent); one of the publish itself, 503
        if the front's give-up wins, else 502."""
        publishing = False
        try:
            job.queued = True  # before the ZADD: if its answer is lost, the cleanup ZREMs
            await self.client.zadd(keys.WAITING, {job.id: int(time.time() * 1000)})
            queue = await self._route(config.get("environment"))
            publishing = True
            await self._publish(message, queue)
            job.published = asyncio.get_running_loop().time()
        except Exception as error:
            if isinstance(error, asyncio.CancelledError):
                raise
            log.warning("could not queue job %s: %s: %s", job.id, type(error).__name__, error)
            await self._unqueue(job, publishing)
            raise
        return queue

    async def _unqueue(self, job: _Job, publishing: bool) -> None:
        """After a failed queueing: a 503 if the front can prove nothing runs, else 502."""
        if not publishing:
            raise Overloaded()  # the message never left: the cleanup takes the ZADD back
        try:
            won = await keys.give_up_async(self.client, job.id)
        except redis.exceptions.RedisError:
            won = False
        if won:
            raise Overloaded()
        raise ClusterLost("the job could not be published, and Redis cannot be asked")

    async def _route(self, environment: object) -> str:
        """The queue of a live worker holding ``environment`` with a free slot (the least
        busy), else the shared queue."""
        if not isinstance(environment, str) or not protocol.is_uuid(environment):
            return keys.SHARED_QUEUE
        members = await self.client.smembers(keys.env_key(environment))
        names = sorted({_text(m) for m in members if keys.NAME_RE.fullmatch(_text(m))})
        if not names:
            return keys.SHARED_QUEUE
        beats = await self.client.mget([keys.worker_key(name) for name in names])
        states = [
            WorkerState.from_json(name, beat)
            for name, beat in zip(names, beats, strict=True)
            if beat is not None
        ]
        free = [s for s in states if s is not None and s.busy < s.slots]
        if not free:
            return keys.SHARED_QUEUE
        best = min(free, key=lambda state: (state.busy / state.slots, state.name))
        return keys.worker_queue(best.name)

    async def _publish(self, message: str, queue: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._publisher, engine.publish, self.engine_app, message, queue)

    async def _await_answer(
        self, job: _Job, message: str, queue: str, hooks: RunHooks | None
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.queue_wait
        copy_at = loop.time() + AFFINITY_WAIT if queue != keys.SHARED_QUEUE else None
        # However the claim's worker or its events went missing, the request ends by then.
        budget = self.settings.queue_wait + self.settings.execute_timeout + ANSWER_MARGIN
        lost_at = loop.time() + budget
        while True:
            wake = lost_at if job.worker is not None else min(give_up_at, copy_at or give_up_at)
            try:
                item = await asyncio.wait_for(job.events.get(), max(0.0, wake - loop.time()))
            except asyncio.TimeoutError:
                if loop.time() >= lost_at:
                    raise ClusterLost(
                        f"no answer from worker {job.worker} for job {job.id} within {budget:g} s"
                    ) from None
                if job.worker is not None:
                    continue  # the watcher saw a claim during the queue wait: await its answer
                if copy_at is not None:
                    copy_at = None
                    await self._publish_copy(job, message)
                else:
                    await self._give_up(job)
                continue
            if isinstance(item, BaseException):
                raise item
            if item.kind == "claimed":
                job.attach(item.data["worker"], self.client)
            elif item.kind == "final":
                return item.data
            elif item.kind == "error":
                raise worker_refusal(item.data["status"], item.data["text"])
            else:
                self._relay(job, hooks, item)

    def _relay(self, job: _Job, hooks: RunHooks | None, event: jobs.Event) -> None:
        if event.kind == "stream" and hooks is not None:
            hooks.on_output(event.data["stream"], event.data["text"])
        elif event.kind == "stdin" and job.relay is not None:
            job.relay.wanted(event.data["prompt"])

    async def _publish_copy(self, job: _Job, message: str) -> None:
        """The preferred worker did not claim the job in time: any worker may (the claim
        lets one copy run)."""
        try:
            await self._publish(message, keys.SHARED_QUEUE)
            job.published = asyncio.get_running_loop().time()
            self.copies += 1
        except Exception as error:  # the first copy is still queued: keep waiting for it
            log.warning("could not publish the fallback copy of job %s: %s", job.id, error)

    async def _give_up(self, job: _Job) -> None:
        """``--queue-wait`` is over: 503 if the front's claim wins (nothing ran)."""
        try:
            won = await keys.give_up_async(self.client, job.id)
            owner = None if won else await self.liveness.owner(job.id)
        except redis.exceptions.RedisError as error:
            raise ClusterLost(f"Redis failed while giving job {job.id} up: {error}") from None
        if won:
            job.queued = False
            log.info(
                "job %s waited %g s in the queue: answered 503", job.id, self.settings.queue_wait
            )
            raise Overloaded()
        if owner is None or owner in keys.FRONT_OWNERS:
            raise ClusterLost(f"the claim of job {job.id} is gone")
        job.attach(owner, self.client)  # claimed just now: its event is on the way

    async def _cleanup(self, job: _Job, finished: bool) -> None:
        """After the run: a job nobody answered (cancelled, or 502) is claimed by the front
        (so no worker runs it) or cancelled on its worker; its queue entry and upload go."""
        try:
            if job.queued:
                if not finished:
                    await self._cancel(job)
                await self.client.zrem(keys.WAITING, job.id)
            if job.upload is not None and job.upload.place == "redis":
                await self.client.delete(keys.upload_key(job.id))
        except redis.exceptions.RedisError as error:
            log.warning("could not clean up after job %s: %s", job.id, error)
        if job.upload is not None and job.upload.place == "bucket":
            try:
                await asyncio.to_thread(self.store.delete_upload, job.id)
            except ObjectStoreError as error:  # a bucket lifecycle rule is the backstop
                log.warning("could not delete the upload of job %s: %s", job.id, error)

    async def _cancel(self, job: _Job) -> None:
        """The front claims the job (no worker will start it), else tells its owner to kill
        the run (a dead owner's control stream is read by nobody: harmless)."""
        if await keys.give_up_async(self.client, job.id, keys.OWNER_CANCELLED):
            return
        worker = await self.liveness.owner(job.id) or job.worker
        if worker is None or worker in keys.FRONT_OWNERS:
            return
        fields = jobs.encode_event(jobs.Event(job.id, "cancel", {}), control=True)
        await self.client.xadd(
            keys.control_key(worker),
            fields,  # type: ignore[arg-type]
            maxlen=keys.CONTROL_MAXLEN,
            approximate=True,
        )
        log.info("job %s: cancelled on worker %s", job.id, worker)

    # -- the front's readers ----------------------------------------------------------------------

    async def _inbox_end(self) -> str:
        """The id of the inbox's last entry: events older than this front are not its own."""
        last = await self.client.xrevrange(self.inbox, count=1)
        return _text(last[0][0]) if last else "0-0"

    async def _read_inbox(self, last: str) -> None:
        """The one reader of this front's inbox: each event to its run's queue; what was
        read is trimmed away. Nothing but a cancel stops it: an error fails the runs that
        may have lost their events, is logged, and the reading goes on."""
        while True:
            try:
                answer: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = cast(
                    Any,
                    await self.client.xread(
                        {self.inbox: last}, count=INBOX_BATCH, block=INBOX_BLOCK_MS
                    ),
                )
            except Exception as error:
                self._lose_all(f"reading the inbox failed: {type(error).__name__}: {error}")
                if not isinstance(error, redis.exceptions.RedisError):
                    log.exception("the inbox reader of front %s failed", self.name)
                await asyncio.sleep(REDIS_RETRY_PAUSE)
                continue
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    self._dispatch(fields)
            if answer:
                await self._trim_inbox(last)

    async def _trim_inbox(self, last: str) -> None:
        """Drop the inbox's entries before ``last``, all read (the last stays: ``XTRIM
        MINID`` keeps it, and a worker's next ``XADD`` gets a greater id anyway)."""
        try:
            await self.client.xtrim(self.inbox, minid=last, approximate=False)
        except redis.exceptions.RedisError as error:  # the next batch trims them
            log.warning("could not trim the inbox %s: %s", self.inbox, error)

    def _dispatch(self, fields: Mapping[bytes, bytes]) -> None:
        try:
            event = jobs.decode_event(fields, max_bytes=self.max_event)
        except jobs.BadEvent as error:
            job = self.jobs.get(_event_job(fields) or "")
            log.warning("ignoring an event on %s: %s", self.inbox, error)
            if job is not None and not job.answered:  # its answer may be this very event
                job.fail(f"an event of job {job.id} was refused: {error}")
            return
        except Exception as error:
            log.exception("an event on %s could not be read: %s", self.inbox, error)
            return
        job = self.jobs.get(event.job)
        if job is None:
            return
        if event.kind in ("final", "error"):
            job.answered = True  # the watcher leaves it alone from now on
        job.events.put_nowait(event)

    def _lose_all(self, why: str) -> None:
        """Redis failed: every queued run may have run, and its events may be lost."""
        lost = [job for job in self.jobs.values() if job.queued and not job.answered]
        if lost:
            log.warning("%s: %d runs answered 502", why, len(lost))
        for job in lost:
            job.fail(why)

    async def _watch_liveness(self) -> None:
        """Every :data:`LIVENESS_POLL`: a claimed job whose worker stopped beating, or a
        queued job Redis no longer knows (restarted), is lost; the inbox's TTL is refreshed.
        Nothing but a cancel stops it (an error is logged, its runs fail, it goes on)."""
        refresh_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LIVENESS_POLL)
            watched = [
                job
                for job in self.jobs.values()
                if job.queued and job.published and not job.answered
            ]
            try:
                if loop.time() >= refresh_at:
                    await self.client.expire(self.inbox, INBOX_TTL_S)
                    refresh_at = loop.time() + INBOX_REFRESH
                if watched:
                    await self._check(watched)
                    self._rescue_unclaimed(await self._gone_workers(), watched)
            except Exception as error:
                if not isinstance(error, redis.exceptions.RedisError):
                    log.exception("the liveness watcher of front %s failed", self.name)
                self._lose_all(f"checking the workers failed: {type(error).__name__}: {error}")

    async def _gone_workers(self) -> set[str]:
        """The workers seen alive at the last poll that are gone now; and how many slots
        are free (None when some worker went)."""
        alive = await self.liveness.alive_workers(prune=False)
        gone = self._workers_seen - set(alive)
        self._workers_seen = set(alive)
        self._free_slots = sum(max(0, state.slots - state.busy) for state in alive.values())
        return gone

    def _rescue_unclaimed(self, gone: set[str], watched: list[_Job]) -> None:
        """Queue again the unclaimed jobs the broker may have lost: when a worker is gone
        (the broker hands a message to a worker before the worker claims the job, and gives
        it back only after its visibility timeout, minutes later; a dead machine's blocked
        pop may even take a message with it), and when a job waited :data:`RESCUE_AFTER`
        while workers had free slots (one job per free slot, the oldest first). The claim
        lets one copy run; under a full queue, where jobs wait by right, nothing is sent.
        The copies go in a task of their own, so the watcher never waits for a publish."""
        if self._rescuing is not None and not self._rescuing.done():
            return  # the last rescue still publishes: its jobs would be sent twice
        now = asyncio.get_running_loop().time()
        unclaimed = sorted(
            (job for job in watched if job.worker is None and job.message),
            key=lambda job: job.published,
        )
        if not gone:
            unclaimed = [job for job in unclaimed if now - job.published > RESCUE_AFTER]
            unclaimed = unclaimed[: self._free_slots]
        if not unclaimed:
            return
        why = f"worker {', '.join(sorted(gone))} is gone" if gone else "slots are free"
        log.warning("%s: %d unclaimed jobs queued again", why, len(unclaimed))
        self._rescuing = asyncio.get_running_loop().create_task(self._publish_copies(unclaimed))

    async def _publish_copies(self, unclaimed: list[_Job]) -> None:
        for job in unclaimed:
            if job.message is not None and job.worker is None and not job.answered:
                await self._publish_copy(job, job.message)

    async def _check(self, watched: list[_Job]) -> None:
        ids = [job.id for job in watched]
        pipe = self.client.pipeline(transaction=False)
        pipe.zmscore(keys.WAITING, ids)  # first: a job out of the queue has a claim by then
        pipe.mget([keys.claim_key(job) for job in ids])
        scores, claims = await pipe.execute()
        owners: dict[str, str] = {}
        for job, score, claim in zip(watched, scores, claims, strict=True):
            if claim is not None:
                owners[job.id] = _text(claim)
            elif score is None and not job.answered:
                job.fail(f"Redis lost job {job.id} (restarted?)")
        workers = sorted({w for w in owners.values() if w not in keys.FRONT_OWNERS})
        if not workers:
            return
        pipe = self.client.pipeline(transaction=False)
        for worker in workers:
            pipe.exists(keys.worker_key(worker))
        beating = dict(zip(workers, map(bool, await pipe.execute()), strict=True))
        for job in watched:
            owner = owners.get(job.id)
            if owner is None or owner in keys.FRONT_OWNERS or job.answered:
                continue
            if beating.get(owner, False):
                job.silent_since = None
                job.attach(owner, self.client)  # its claimed event may be late
            elif job.silent_since is None:
                # A worker shutting down cleanly deletes its key right after its last
                # finals: give them one more poll to arrive.
                job.silent_since = asyncio.get_running_loop().time()
            else:
                job.fail(f"worker {owner} of job {job.id} stopped beating")

    async def _read_queue(self) -> None:
        """Every :data:`QUEUE_POLL`: each waiting run's place, to the clients that asked."""
        while True:
            await asyncio.sleep(QUEUE_POLL)
            waiting = [
                job
                for job in self.jobs.values()
                if job.queued and job.worker is None and job.on_queue is not None
            ]
            if not waiting:
                continue
            pipe = self.client.pipeline(transaction=False)
            for job in waiting:
                pipe.zrank(keys.WAITING, job.id)
            try:
                ranks = await pipe.execute()
            except redis.exceptions.RedisError:
                continue  # the watcher answers for the runs
            for job, rank in zip(waiting, ranks, strict=True):
                if rank is not None and rank != job.ahead and job.worker is None:
                    job.ahead = rank
                    assert job.on_queue is not None
                    job.on_queue(int(rank))


def _read_and_hash(path: Path, inline_max: int) -> tuple[bytes | None, str]:
    """The file's sha256, and its bytes if at most ``inline_max``."""
    hasher = hashlib.sha256()
    kept = bytearray()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            size += len(chunk)
            hasher.update(chunk)
            if size <= inline_max:
                kept += chunk
    return (bytes(kept) if size <= inline_max else None), hasher.hexdigest()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _event_job(fields: Mapping[bytes, bytes]) -> str | None:
    """The job an inbox entry names, if it names a valid one (even if the rest is refused)."""
    raw = fields.get(b"job")
    if raw is None:
        return None
    try:
        return keys.job_id(_text(raw))
    except ValueError:
        return None


# -- the cluster's GET endpoints ------------------------------------------------------------------


class _WorkersIsolation:
    """Stands for :class:`~..runners.Isolation` in :func:`~..sysinfo.specifications`: the
    workers' isolation, the weakest if they differ."""

    def __init__(self, described: dict[str, Any] | None) -> None:
        self.described = described
        self.cgroups = bool(described and described.get("cgroups"))

    def describe(self) -> dict[str, object]:
        return dict(self.described or {})


def weakest_isolation(states: list[WorkerState]) -> dict[str, Any] | None:
    """The isolation of the live workers: the weakest (not isolated, then no cgroups), with a
    warning when they differ; None without any live worker."""
    described = [state.isolation for state in states if state.isolation is not None]
    if not described:
        return None

    def strength(item: dict[str, Any]) -> tuple[bool, bool]:
        return bool(item.get("isolated")), bool(item.get("cgroups"))

    weakest_found: dict[str, Any] = min(described, key=strength)
    weakest = dict(weakest_found)
    if any(item != described[0] for item in described):
        names = ", ".join(s.name for s in states if s.isolation != weakest) or "some"
        weakest["warning"] = (
            f"the workers are isolated differently (stronger on {names}): this is the "
            "weakest; start every worker with the same options on the same system"
        )
    return weakest


class _StagedUpload(Upload):
    """An upload a front tracks by its archive's path, so that the executor can give its
    staging place back once the archive is stored for the worker (:meth:`FrontApp.stored`)."""

    def __init__(self, places: StagingPlaces, staging: Path, registry: dict[Path, Upload]) -> None:
        super().__init__(places, staging)
        self.registry = registry
        registry[staging / "upload.tgz"] = self

    async def discard(self) -> None:
        self.registry.pop(self.staging / "upload.tgz", None)
        await super().discard()


class FrontApp(ProtocolApp):
    """A front's HTTP application: :class:`ProtocolApp` with the cluster's GET endpoints."""

    def __init__(
        self,
        settings: ServerSettings,
        executor: ClusterExecutor,
        staging: Path,
        cluster_id: str,
        sampler: UsageSampler,
        cache: Path,
    ) -> None:
        super().__init__(settings, executor, staging)
        self.cluster = executor
        self.cluster_id = cluster_id
        self.sampler = sampler
        self.cache = cache
        self.staging_places.limit = max(self.staging_places.limit, MIN_STAGING_PLACES)
        #: The staged uploads of requests in progress, by archive path (see :meth:`stored`).
        self._staged: dict[Path, Upload] = {}
        executor.on_stored = self.stored
        self.limits = Limits(entries=settings.workdir_inodes, bytes=settings.workdir_quota)
        self._manifests: collections.OrderedDict[str, Manifest] = collections.OrderedDict()
        self._cached_entries = 0
        self._view: tuple[float, list[WorkerState]] = (0.0, [])
        self._libraries: asyncio.Task[dict[str, Any]] | None = None
        self._archives: dict[str, asyncio.Task[Path | None]] = {}

    def new_upload(self) -> Upload:
        staged = super().new_upload()
        return _StagedUpload(staged.places, staged.staging, self._staged)

    async def stored(self, archive: Path) -> None:
        """A request's archive went to Redis or the bucket: its staging place and file are
        given back at once, not after the queue wait and the run (a front stages uploads
        while they wait in the queue, not while they run)."""
        upload = self._staged.pop(archive, None)
        if upload is not None:
            await upload.discard()

    # -- specifications/ and usages/ ---------------------------------------------------------------

    async def workers(self) -> list[WorkerState]:
        """The live workers (by heartbeat), read at most every :data:`VIEW_SECONDS`."""
        at, states = self._view
        now = time.monotonic()
        if now - at > VIEW_SECONDS:
            alive = await self.cluster.liveness.alive_workers()
            states = [alive[name] for name in sorted(alive)]
            self._view = (now, states)
        return states

    async def get_specifications(self, request: web.Request) -> web.StreamResponse:
        try:
            states = await self.workers()
        except redis.exceptions.RedisError as error:
            return _redis_down(error)
        isolation = weakest_isolation(states)
        stand_in = cast("Isolation", _WorkersIsolation(isolation))
        answer = specifications(self.settings, stand_in, self.staging, self.cluster_id)
        slots = sum(state.slots for state in states)
        answer["container"]["count"] = slots
        answer["container"]["isolation"] = isolation or {
            "isolated": None,
            "warning": "no live worker: start workers with sandbox-kernel worker --cluster ...",
        }
        answer[protocol.CLUSTER_FIELD] = {"workers": len(states), "slots": slots}
        answer["extensions"] = [*EXTENSIONS, protocol.EXTENSION_QUEUE]
        return web.json_response(answer)

    async def get_usages(self, request: web.Request) -> web.StreamResponse:
        try:
            states = await self.workers()
        except redis.exceptions.RedisError as error:
            return _redis_down(error)
        answer = self.sampler.current(sum(state.busy for state in states))
        answer["workers"] = [
            {
                "name": state.name,
                "slots": state.slots,
                "busy": state.busy,
                "cached_environments": state.cached_environments,
            }
            for state in states
        ]
        return web.json_response(answer)

    async def get_libraries(self, request: web.Request) -> web.StreamResponse:
        """The inventory a command finds in a worker's sandbox: run once as a job on the
        cluster (any worker: they must all run the same system), then kept."""
        if self._libraries is None or (
            self._libraries.done() and self._libraries.exception() is not None
        ):
            self._libraries = asyncio.get_running_loop().create_task(self._list_libraries())
        try:
            return web.json_response(await asyncio.shield(self._libraries))
        except (ClusterRefusal, Overloaded, RuntimeError) as error:
            return text(
                500 if not isinstance(error, Overloaded) else 503,
                f"Could not list the sandbox's libraries on a worker: {error or 'overloaded'}. "
                "Retry in a moment; see the front's log.",
            )

    async def _list_libraries(self) -> dict[str, Any]:
        answer = await self.cluster.execute({"commands": [INVENTORY_SCRIPT]}, None)
        execution = answer.get("execution") or [{}]
        stdout = execution[0].get("stdout", "")
        if not stdout:
            raise RuntimeError(f"the inventory printed nothing ({execution[0].get('stderr')!r})")
        return parse_inventory(stdout)

    # -- environments/ and files/ -----------------------------------------------------------------

    async def manifest(self, uuid: str) -> Manifest | None:
        """The environment's checked manifest (cached: manifests never change), or None if
        the bucket has none, it expired, or it is not a valid manifest."""
        if not protocol.is_uuid(uuid):
            return None
        uuid = uuid.lower()
        manifest = self._manifests.get(uuid)
        if manifest is None:
            try:
                data = await asyncio.to_thread(self.cluster.store.get_manifest, uuid)
                if data is None:
                    return None
                manifest = await asyncio.to_thread(Manifest.parse, data, self.limits, uuid=uuid)
            except ManifestError as error:
                log.warning("the manifest of %s in the bucket is refused: %s", uuid, error)
                return None
            self._manifests[uuid] = manifest
            self._cached_entries += len(manifest.entries)
            while len(self._manifests) > 1 and (
                len(self._manifests) > MANIFEST_CACHE
                or self._cached_entries > MANIFEST_CACHE_ENTRIES
            ):
                _, dropped = self._manifests.popitem(last=False)
                self._cached_entries -= len(dropped.entries)
        self._manifests.move_to_end(uuid)
        return None if manifest.expired() else manifest

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        uuid, path = request.match_info["uuid"], request.match_info["path"]
        try:
            manifest = await self.manifest(uuid)
            if manifest is None:
                return text(404, _NOT_FOUND.format(uuid=uuid))
            entry = file_entry(manifest, path)
            if entry is None:
                return text(404, f"The file '{path}' could not be found in environment '{uuid}'")
            fd = await asyncio.to_thread(self._fetch_blob, entry)
        except ObjectStoreError as error:
            return _bucket_failed(error)
        return await send_file(request, fd, "application/octet-stream", os.path.basename(path))

    def _fetch_blob(self, entry: File) -> int:
        """A blob checked against its sha256, in an unlinked temporary file (its fd)."""
        with tempfile.TemporaryFile(dir=self.cache) as copy_:
            self.cluster.store.get_blob(entry.digest, copy_, size=entry.size)
            copy_.flush()
            fd = os.dup(copy_.fileno())
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    async def get_environment(self, request: web.Request) -> web.StreamResponse:
        uuid = request.match_info["uuid"]
        try:
            manifest = await self.manifest(uuid)
            if manifest is None:
                return text(404, _NOT_FOUND.format(uuid=uuid))
            archive = await self._archive(manifest)
        except ObjectStoreError as error:
            return _bucket_failed(error)
        try:
            fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # trimmed this very moment: build it again
            fd = os.open(await self._archive(manifest), os.O_RDONLY | os.O_CLOEXEC)
        return await send_file(request, fd, "application/gzip", f"{manifest.uuid}.tgz")

    async def _archive(self, manifest: Manifest) -> Path:
        """The environment's ``.tgz`` in the front's cache, built once (concurrent requests
        wait for the same build)."""
        task = self._archives.get(manifest.uuid)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._build_archive, manifest)
            )
            self._archives[manifest.uuid] = task
        path = await asyncio.shield(task)
        if path is None or not path.exists():
            self._archives.pop(manifest.uuid, None)
            return await self._archive(manifest)
        return path

    def _build_archive(self, manifest: Manifest) -> Path:
        target = self.cache / f"{manifest.uuid}.tgz"
        if target.exists():
            os.utime(target)
            return target
        blobs = Path(tempfile.mkdtemp(prefix="blobs-", dir=self.cache))
        temporary = target.with_suffix(f".{os.urandom(4).hex()}.tmp")
        try:
            files = {e.digest: e for e in manifest.entries if isinstance(e, File)}
            with concurrent.futures.ThreadPoolExecutor(ARCHIVE_THREADS) as pool:
                list(pool.map(lambda e: self._blob_into(e, blobs), files.values()))
            with tarfile.open(temporary, "w:gz", compresslevel=1) as archive:
                for entry in manifest.entries:
                    _add_entry(archive, entry, blobs)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
            shutil.rmtree(blobs, ignore_errors=True)
        self._trim_archives()
        return target

    def _blob_into(self, entry: File, folder: Path) -> None:
        with open(folder / entry.digest, "wb") as into:
            self.cluster.store.get_blob(entry.digest, into, size=entry.size)

    def _trim_archives(self) -> None:
        archives = sorted(self.cache.glob("*.tgz"), key=lambda p: p.stat().st_mtime)
        for old in archives[:-ARCHIVE_CACHE]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
            self._archives.pop(old.name.removesuffix(".tgz"), None)


def file_entry(manifest: Manifest, path: str) -> File | None:
    """The file at ``path`` in ``manifest``, with the rules of ``open_beneath``: a client's
    path, refused when absolute or holding ``..``; every folder on the way a real folder (a
    symlink anywhere gives None), the end a regular file (or a hard link to one)."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or not parts or ".." in parts or "\0" in path:
        return None
    entries = manifest.by_path
    for depth in range(1, len(parts)):
        if not isinstance(entries.get("/".join(parts[:depth])), Folder):
            return None
    entry = entries.get("/".join(parts))
    if isinstance(entry, HardLink):
        entry = entries.get(entry.target)
    return entry if isinstance(entry, File) else None


def _add_entry(
    archive: tarfile.TarFile, entry: Folder | File | Symlink | HardLink, blobs: Path
) -> None:
    """One manifest entry into the archive, as ``trees.add_to_archive`` writes a tree."""
    member = tarfile.TarInfo(entry.path)
    member.uid = member.gid = _ARCHIVE_OWNER[0]
    member.uname = member.gname = _ARCHIVE_OWNER[1]
    if isinstance(entry, Folder | File):
        member.mode = entry.mode & 0o7777
        member.mtime = entry.mtime_ns // 1_000_000_000
    if isinstance(entry, Folder):
        member.type = tarfile.DIRTYPE
        archive.addfile(member)
    elif isinstance(entry, File):
        member.size = entry.size
        with open(blobs / entry.digest, "rb") as data:
            archive.addfile(member, data)
    elif isinstance(entry, Symlink):
        member.type = tarfile.SYMTYPE
        member.linkname = entry.target
        archive.addfile(member)
    else:
        member.type = tarfile.LNKTYPE
        member.linkname = entry.target
        archive.addfile(member)


def _redis_down(error: Exception) -> web.Response:
    return text(
        503,
        f"The cluster's Redis cannot be reached ({type(error).__name__}): retry in a few "
        "seconds; if it lasts, check that redis-server runs and that --cluster is right.",
    )


def _bucket_failed(error: ObjectStoreError) -> web.Response:
    if error.kind == "corrupt":
        log.error("%s", error)
        return text(500, "The environment's stored content is damaged; see the front's log.")
    log.warning("the bucket failed: %s", error)  # endpoint, bucket and key: for the log only
    return text(502, "The cluster's storage failed; retry in a few seconds. See the front's log.")


# -- the cluster id and the assembly --------------------------------------------------------------


async def cluster_id(client: redis.asyncio.Redis, store: ObjectStore) -> str:
    """The cluster's ``server_id``: ``sk:cluster-id`` (SET NX by the first front), mirrored
    in the bucket, which survives a Redis restart and gives the same id back."""
    name = store.location.key("cluster-id")

    def read_bucket() -> str | None:
        try:
            answer = store.client.get_object(Bucket=store.location.bucket, Key=name)
        except store.client.exceptions.NoSuchKey:
            return None
        text_ = bytes(answer["Body"].read(64)).decode("ascii", "replace").strip()
        return text_ if len(text_) == 32 and all(c in "0123456789abcdef" for c in text_) else None

    kept = await asyncio.to_thread(read_bucket)
    await client.set(keys.CLUSTER_ID, kept or uuid_module.uuid4().hex, nx=True)
    chosen = _text(await client.get(keys.CLUSTER_ID))
    if chosen != kept:
        await asyncio.to_thread(
            store.client.put_object,
            Bucket=store.location.bucket,
            Key=name,
            Body=chosen.encode(),
        )
    return chosen


def front_name(settings: ServerSettings) -> str:
    """``--name``, else ``<hostname>-<pid>-<random>`` cut to a valid name: two fronts (in
    two containers, where pids repeat) never share an inbox."""
    if settings.name:
        return keys.name(settings.name)
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    suffix = f"-{os.getpid()}-{os.urandom(3).hex()}"
    return keys.name(f"{host.strip('.-_') or 'front'}"[:80] + suffix)


@contextlib.asynccontextmanager
async def assembled_front(settings: ServerSettings) -> AsyncIterator[Served]:
    """A front's application (:class:`FrontApp` on a :class:`ClusterExecutor`), its Redis
    client, bucket and engine, started in order and stopped in the reverse one."""
    from .. import Served

    assert settings.cluster and settings.storage and settings.data_dir is not None
    target = parse_redis_url(settings.cluster)
    name = front_name(settings)
    async with contextlib.AsyncExitStack() as cleanup:
        client = target.async_client(  # a hung Redis fails a read instead of hanging it
            socket_timeout=FRONT_SOCKET_TIMEOUT, health_check_interval=FRONT_HEALTH_CHECK
        )
        cleanup.push_async_callback(client.aclose)
        await check_async(target, client)
        store = ObjectStore.from_url(settings.storage, endpoint=settings.s3_endpoint)
        await asyncio.to_thread(store.check)
        engine_app = engine.make_engine(settings)
        cleanup.callback(engine_app.close)
        identity = await cluster_id(client, store)
        await client.set(keys.FRONT_CAPS, jobs.caps_message(name, settings))
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        place = Path(tempfile.mkdtemp(prefix=f"front-{name}-", dir=settings.data_dir))
        cleanup.callback(shutil.rmtree, place, True)
        staging, cache = place / "staging", place / "cache"
        staging.mkdir()
        cache.mkdir()
        executor = ClusterExecutor(settings, client, store, engine_app, name)
        await executor.start()
        cleanup.push_async_callback(executor.close)
        sampler = UsageSampler(settings.data_dir)
        sampler.start()
        cleanup.push_async_callback(sampler.stop)
        app = FrontApp(settings, executor, staging, identity, sampler, cache).build()
        sweeper = Sweeper(store, target, settings, name)
        cleanup.callback(sweeper.close)
        lines = _front_lines(settings, target, store, name, identity)
        yield Served(app, lines, sweeper.sweep)


def _front_lines(
    settings: ServerSettings, target: RedisTarget, store: ObjectStore, name: str, identity: str
) -> list[str]:
    return [
        f"  cluster front {name} of cluster {identity}: runs nothing itself",
        f"  engine: Redis at {target.masked}",
        f"  storage: {store.where}",
        f"  queue wait: {settings.queue_wait:g} s, then 503",
    ]
