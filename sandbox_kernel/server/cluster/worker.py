"""``sandbox-kernel worker``: the runners of a cluster, taking jobs from the engine (design B6).

A worker runs requests exactly as ``sandbox-kernel serve`` does (the same isolation, runner
pool, :class:`~..executor.Executor`, caps and limits), but takes them from the task engine
instead of a socket, and keeps environments in the bucket (:class:`.store.ClusterStorage`).

**Threads.** The main thread runs Celery (``worker_main``: a pool of ``--workers`` threads on
the queues ``sk.shared`` and ``sk.w.<name>``; SIGTERM is a warm shutdown, the running jobs
finish). One thread runs the asyncio loop with everything else: the parts of the single server
(:func:`..assembled_parts`), the control-stream reader, the jobs themselves. A Celery thread
only hands its job to the loop and waits. The sandboxes are started from the loop's thread,
which lives as long as the process: bubblewrap's ``--die-with-parent`` (``PR_SET_PDEATHSIG``,
fired when the *thread* that forked it ends) kills them when the worker dies, however it dies
(design B12.7; tested with ``kill -9``). The heartbeat has a thread of its own, so a busy loop
never looks like a dead worker; it starts once Celery consumes.

**A job** (:meth:`Jobs.handle`): re-validated as ``execute/`` validates a request (a refused
message answers 400 to its front, if it names one, and nothing runs), claimed atomically (a
copy or a redelivery finds the claim and is dropped), announced (``claimed``), its upload
fetched and checked (size and sha256), its base environment made local, run, and answered
(``final``, or ``error`` with the single server's status and text). The worker logs ``job <id>
ran on <name>`` for every job it ran. ``cancel`` on the control stream cancels the job's task
(the sandbox is killed, nothing is saved); ``stdin``, ``eof`` and ``stop`` go to the streamed
run's :class:`~..streaming.LiveRun`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ...discovery import default_data_dir
from ..executor import RUN_REFUSALS, refusal_answer
from ..live import LiveRun, Refusal
from ..settings import ServerSettings
from ..storage import StorageFull
from . import jobs, keys
from .engine import TASK_NAME, make_engine
from .liveness import Heartbeat
from .manifests import ManifestError
from .objects import ObjectStore, ObjectStoreError
from .settings import ClusterUnreachable, ClusterURLError, RedisTarget, check, parse_redis_url
from .store import ClusterLink, ClusterStorage

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from .. import Parts

log = logging.getLogger("sandbox_kernel.worker")

#: How long a control read blocks (ms): the reader notices a stop within this.
CONTROL_BLOCK_MS: Final = 1000
#: How long the events of a finished job may take to reach Redis before they are dropped.
OUTBOX_FLUSH_SECONDS: Final = 10.0
#: How often the heartbeat thread compares this worker's caps with the fronts'.
CAPS_CHECK_SECONDS: Final = 2.0
#: How long the loop's parts (isolation probe, runner pool) may take to start.
START_SECONDS: Final = 120.0
#: The exit status of a worker whose event loop died (M5): it must be restarted.
LOOP_DIED_STATUS: Final = 3
#: How long Celery may take to stop after the loop died before the process exits anyway.
LOOP_DEATH_EXIT_SECONDS: Final = 30.0
#: A refused message longer than this is not even parsed to find whom to answer.
_REFUSAL_PARSE_LIMIT: Final = 4 * (jobs.DEFAULT_MAX_CONFIG_BYTES + jobs.ENVELOPE_BYTES)

_SERVER_FAILED: Final = "The worker failed while running the request; see its log."


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sandbox-kernel worker`` (those of ``serve``'s settings)."""
    from .. import add_worker_arguments as add

    add(parser)


def run_worker(args: argparse.Namespace) -> int:
    """``sandbox-kernel worker``: run until SIGTERM; the exit status (2: it cannot start)."""
    logging.basicConfig(
        level=str(getattr(args, "log_level", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = ServerSettings.from_args(
            args, token=None, data_dir=args.data_dir or default_data_dir()
        )
        if not settings.cluster:
            raise ValueError(
                "a worker needs --cluster redis://[USER:]PASSWORD@HOST:PORT/DB and --storage "
                "s3://BUCKET/PREFIX: the Redis and the bucket of the cluster it serves"
            )
        worker = ClusterWorker.connect(settings)
    except (ValueError, ClusterURLError, ClusterUnreachable, ObjectStoreError) as error:
        print(f"sandbox-kernel worker: {error}", file=sys.stderr)
        return 2
    return worker.run()


def default_name() -> str:
    """``<hostname>-<pid>-<6 random hex digits>``, reduced to the characters a name may hold.
    The random part keeps two workers apart even when hostname and pid are the same (two
    containers are both pid 1, and often share a hostname)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_")[:80] or "worker"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ClusterWorker:
    """One worker process: Celery in the main thread, the loop and the heartbeat beside it."""

    def __init__(
        self, settings: ServerSettings, name: str, target: RedisTarget, store: ObjectStore
    ) -> None:
        self.settings = settings
        self.name = name
        self.target = target
        self.store = store
        self.redis = target.client(socket_timeout=10)
        self.heartbeat = Heartbeat(
            target.client(socket_timeout=0.5),
            name,
            settings.workers,
            on_join=self._register_cached,
            every=(CAPS_CHECK_SECONDS, self._check_caps),
        )
        #: The fronts' caps last compared with ours (a change is compared again).
        self._front_caps: bytes | None = None
        self.engine = make_engine(settings)
        self.engine.task(name=TASK_NAME, ignore_result=True, typing=False)(self._task)
        self.loop = LoopThread(self)
        #: Set when the loop died under Celery: the worker stops and exits non-zero.
        self.loop_died = threading.Event()

    @classmethod
    def connect(cls, settings: ServerSettings) -> ClusterWorker:
        """Check the name, Redis and the bucket before anything starts: a misconfigured
        worker says so at once (:class:`ClusterUnreachable`, :class:`ObjectStoreError`)."""
        assert settings.cluster is not None and settings.storage is not None
        try:
            name = keys.name(settings.name or default_name())
        except ValueError as error:
            raise ValueError(f"--name: {error}") from None
        target = parse_redis_url(settings.cluster)
        client = target.client()
        try:
            check(target, client)
        finally:
            client.close()
        store = ObjectStore.from_url(settings.storage, endpoint=settings.s3_endpoint)
        try:
            store.check()
        except ObjectStoreError as error:
            raise ObjectStoreError(error.kind, f"the cluster's bucket: {error}") from None
        return cls(settings, name, target, store)

    def run(self) -> int:
        """Start the loop's parts, then serve the queues until Celery stops."""
        if not self.loop.start():
            return 2
        from celery.signals import worker_ready

        def consuming(**_: Any) -> None:
            try:
                self.heartbeat.start()
            except Exception as error:  # Redis went away meanwhile: the thread retries
                log.warning("worker %s: first heartbeat failed: %s", self.name, error)
            log.info("worker %s takes jobs from %s", self.name, self.target)

        worker_ready.connect(consuming, weak=False)
        # celery-types says worker_main never returns: it does, once the worker stopped.
        engine: Any = self.engine
        try:
            engine.worker_main(self._celery_argv())
        except Exception:
            log.exception("worker %s: the task engine failed", self.name)
            return 1
        finally:
            self.heartbeat.stop(clean=True)
            self.loop.stop()
        return LOOP_DIED_STATUS if self.loop_died.is_set() else 0

    def on_loop_death(self, error: BaseException | None) -> None:
        """The loop's thread ended while Celery still takes jobs (called from that thread):
        no job can run any more, and every job taken would be dropped. Stop beating at once
        (fronts fail this worker's jobs with 502 within a poll, and stop routing to it),
        then stop Celery with a warm shutdown (its threads waiting on the dead loop were
        released when the loop cancelled their jobs); if Celery does not stop within
        :data:`LOOP_DEATH_EXIT_SECONDS`, the process exits anyway. The exit status is
        :data:`LOOP_DIED_STATUS`, for the service manager to restart the worker."""
        self.loop_died.set()
        log.critical(
            "worker %s: its event loop died (%s); it stops taking jobs and exits with status "
            "%d. Restart it (a service manager does); see the error above.",
            self.name,
            "no error" if error is None else f"{type(error).__name__}: {error}",
            LOOP_DIED_STATUS,
        )
        try:
            self.heartbeat.stop(clean=True)
        except Exception as failure:  # the key expires within its TTL anyway
            log.warning("worker %s: its heartbeat did not stop cleanly: %s", self.name, failure)
        exit_timer = threading.Timer(LOOP_DEATH_EXIT_SECONDS, _exit_now)
        exit_timer.daemon = True
        exit_timer.start()
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown, in the main thread

    def _register_cached(self) -> None:
        """The heartbeat found this worker new to Redis (at start, or Redis restarted and
        lost every key): the environments it holds are routing hints again."""
        storage = self.loop.storage
        if storage is not None:
            storage.register_cached()

    def _check_caps(self) -> None:
        """Warn when the caps the fronts admit requests by (:data:`~.keys.FRONT_CAPS`)
        differ from this worker's: a request a front accepts could be refused here, or one
        refused by a single server pass here. Logged once per value the key takes."""
        published = self.redis.get(keys.FRONT_CAPS)
        if not isinstance(published, bytes) or published == self._front_caps:
            return
        self._front_caps = published
        try:
            front, differences = jobs.differing_caps(jobs.caps_of(self.settings), published)
        except jobs.BadEvent as error:
            log.warning("worker %s: %s ignored: %s", self.name, keys.FRONT_CAPS, error)
            return
        if differences:
            log.warning(
                "worker %s runs with other caps than front %s: %s. Start every worker with the "
                "caps of the fronts (the same --max-upload, --max-output, --max-result, "
                "--workdir-quota and --execute-timeout), or requests the front admits are "
                "run by other rules here.",
                self.name,
                front,
                "; ".join(differences),
            )

    def _celery_argv(self) -> list[str]:
        queues = f"{keys.SHARED_QUEUE},{keys.worker_queue(self.name)}"
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return [
            "--quiet",  # no banner: the worker prints its own lines
            "worker",
            "--pool=threads",
            f"--concurrency={self.settings.workers}",
            "-Q",
            queues,
            "-n",
            f"{self.name}@{socket.gethostname()}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--loglevel={level}",
        ]

    def _task(self, *args: Any, **kwargs: Any) -> None:
        """The body of :data:`TASK_NAME`, in a Celery thread: hand the job to the loop."""
        if kwargs or len(args) != 1 or not isinstance(args[0], str):
            log.warning(
                "dropped a message of %s that is not one job text (%d arguments, keywords %s)",
                TASK_NAME,
                len(args),
                sorted(kwargs)[:5],
            )
            return
        self.loop.call(args[0])


class LoopThread:
    """The worker's asyncio loop, in a thread that lives as long as the process."""

    def __init__(self, worker: ClusterWorker) -> None:
        self.worker = worker
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.jobs: Jobs | None = None
        #: The worker's storage, once the loop's parts started.
        self.storage: ClusterStorage | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        #: Whether stop() ended the loop (else its end is a death: :meth:`on_loop_death`).
        self._stop_requested = False
        self._thread = threading.Thread(target=self._main, name="sk-worker-loop", daemon=True)

    def start(self) -> bool:
        self._thread.start()
        if not self.ready.wait(START_SECONDS):
            print(
                f"sandbox-kernel worker: the sandboxes did not start within {START_SECONDS:g} "
                "s; see the log above",
                file=sys.stderr,
            )
            return False
        if self.failure is not None:
            print(f"sandbox-kernel worker: {self.failure}", file=sys.stderr)
            return False
        return True

    def call(self, message: str) -> None:
        """Run one job message on the loop and wait for its end (from a Celery thread).
        A message that comes when the loop is dead is dropped unclaimed (its front answers
        503 after its queue wait: nothing ran), and logged."""
        assert self._loop is not None and self.jobs is not None
        try:
            future = asyncio.run_coroutine_threadsafe(self.jobs.handle(message), self._loop)
            future.result()
        except (RuntimeError, concurrent.futures.CancelledError) as error:
            if self._thread.is_alive() and not self._loop.is_closed():
                raise
            log.error("a job message dropped unclaimed: the worker's loop is dead (%s)", error)

    def stop(self) -> None:
        self._stop_requested = True
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to stop
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not threading.current_thread():
            self._thread.join(30)

    def _main(self) -> None:
        error: BaseException | None = None
        try:
            asyncio.run(self._serve())
        except BaseException as failure:
            error = failure
            self.failure = self.failure or failure
            if not self.ready.is_set():
                self.ready.set()
                return
            log.error("worker %s: the event loop failed", self.worker.name, exc_info=failure)
        if self.ready.is_set() and not self._stop_requested:
            self.worker.on_loop_death(error)
        self.ready.set()

    async def _serve(self) -> None:
        from .. import assembled_parts

        worker = self.worker
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        link = ClusterLink(worker.store, worker.redis, worker.name)

        def storage_type(settings: ServerSettings, root: Path) -> ClusterStorage:
            return ClusterStorage(settings, root, link)

        try:
            async with assembled_parts(worker.settings, storage_type=storage_type) as parts:
                assert isinstance(parts.storage, ClusterStorage)
                self.storage = parts.storage
                worker.heartbeat.isolation = parts.isolation.describe()
                worker.heartbeat.cached_environments = parts.storage.cached_environments()
                async with Jobs(worker, parts, parts.storage) as self.jobs:
                    _announce(worker, parts)
                    self.ready.set()
                    await self._stopping.wait()
        except Exception as error:
            if not self.ready.is_set():
                self.failure = error
                self.ready.set()
                return
            raise


def _announce(worker: ClusterWorker, parts: Parts) -> None:
    from .. import isolation_line

    lines = [
        f"sandbox-kernel worker {worker.name}: {worker.settings.workers} slots, jobs from "
        f"{worker.target}, environments in {worker.store.where}",
        isolation_line(parts.isolation),
        f"  data dir: {worker.settings.data_dir}",
    ]
    for line in lines:
        print(line, flush=True)


@dataclasses.dataclass
class RunningJob:
    """A job this worker claimed, while it runs."""

    spec: jobs.JobSpec
    outbox: Outbox
    task: asyncio.Task[Any] | None
    live: LiveRun | None = None
    #: Set when the run must answer this instead of its result (stdin sent too fast).
    refusal: Refusal | None = None


class Jobs:
    """The jobs of a worker, on its loop: handling, the control stream, the sweeping."""

    def __init__(self, worker: ClusterWorker, parts: Parts, storage: ClusterStorage) -> None:
        self.worker = worker
        self.name = worker.name
        self.settings = worker.settings
        self.parts = parts
        self.storage = storage
        self.client: redis.asyncio.Redis = worker.target.async_client(socket_timeout=10)
        self.control_client: redis.asyncio.Redis = worker.target.async_client(
            socket_timeout=CONTROL_BLOCK_MS / 1000 + 5
        )
        self.running: dict[str, RunningJob] = {}
        self._background: list[asyncio.Task[None]] = []
        #: The largest event sent: a legal final holds --max-output and --max-result.
        self.max_event = jobs.event_cap(self.settings.max_output, self.settings.max_result)

    async def __aenter__(self) -> Jobs:
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._read_control()),
            loop.create_task(self._sweep_forever()),
        ]
        return self

    async def __aexit__(self, *_: object) -> None:
        for job in list(self.running.values()):
            if job.task is not None:
                job.task.cancel()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for client in (self.client, self.control_client):
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- one job ----------------------------------------------------------------------------------

    async def handle(self, message: str) -> None:
        """Validate, claim, run and answer one job message (never raises)."""
        settings = self.settings
        try:
            spec = jobs.job_from_json(
                message, max_config_bytes=settings.max_config_bytes, max_upload=settings.max_upload
            )
        except jobs.BadJob as error:
            await self._refuse(message, error)
            return
        try:
            claimed = await keys.claim_async(self.client, spec.job, self.name)
        except Exception as error:
            log.warning("job %s dropped: Redis failed at its claim (%s)", spec.job, error)
            return
        if not claimed:
            log.info("job %s dropped: claimed before (a copy or a redelivery)", spec.job)
            return
        await self._claimed(spec)

    async def _claimed(self, spec: jobs.JobSpec) -> None:
        heartbeat = self.worker.heartbeat
        heartbeat.job_started(spec.job)
        outbox = Outbox(self.client, spec.front, spec.job, self.max_event)
        job = RunningJob(spec, outbox, asyncio.current_task())
        self.running[spec.job] = job
        try:
            outbox.put(jobs.claimed(spec.job, self.name))
            outbox.put(await self._answer(job))
        except asyncio.CancelledError:
            log.info("job %s cancelled by its front: killed, nothing saved", spec.job)
        finally:
            self.running.pop(spec.job, None)
            heartbeat.job_finished(spec.job)
            await asyncio.shield(self._finish(job))  # the answer goes out first
            heartbeat.cached_environments = self.storage.cached_environments()

    async def _finish(self, job: RunningJob) -> None:
        await job.outbox.close()
        if job.spec.upload is not None:
            await self._delete_upload(job.spec)

    async def _answer(self, job: RunningJob) -> jobs.Event:
        """The job's ``final`` or ``error`` event (cancellation aside)."""
        spec = job.spec
        upload_dir: Path | None = None
        base = spec.config.get("environment")
        pinned = False
        watcher: asyncio.Task[None] | None = None
        try:
            upload = None
            if spec.upload is not None:
                upload_dir = await asyncio.to_thread(self.storage.new_staging)
                upload = await self._fetch_upload(spec, upload_dir / "upload.tgz")
            if isinstance(base, str):
                await self._make_local(base)
                pinned = True
            hooks = None
            if spec.stream:
                job.live = self.parts.executor.live(job.outbox.frame)
                hooks = job.live.hooks
                watcher = asyncio.ensure_future(job.live.watch())
            answer = await self.parts.executor.execute(spec.config, upload, hooks)
            log.info("job %s ran on %s", spec.job, self.name)
            if job.refusal is not None:
                return jobs.error(spec.job, *job.refusal)
            return jobs.final(spec.job, answer)
        except RUN_REFUSALS as error:
            if isinstance(error, StorageFull):  # refused at the save: the commands ran
                log.info("job %s ran on %s", spec.job, self.name)
            return jobs.error(spec.job, *refusal_answer(error))
        except BadUpload as error:
            return jobs.error(spec.job, 400, str(error))
        except ManifestError as error:
            log.warning("job %s: the manifest of %s is refused: %s", spec.job, base, error)
            return jobs.error(
                spec.job,
                500,
                f"The environment '{base}' cannot be used: its manifest in the cluster's bucket "
                f"is refused ({error}). Nothing was run; run the session again from an "
                "environment it can save anew.",
            )
        except ObjectStoreError as error:
            log.warning("job %s: the bucket failed: %s", spec.job, error)
            return jobs.error(
                spec.job,
                502,
                f"The cluster's storage failed ({error}). The commands may have run, but "
                "nothing was saved: the session's last saved environment is intact.",
            )
        except Exception:
            log.exception("job %s failed on %s", spec.job, self.name)
            return jobs.error(spec.job, 500, _SERVER_FAILED)
        finally:
            if watcher is not None:
                watcher.cancel()
            if pinned and isinstance(base, str):
                self.storage.unpin(base)
            if upload_dir is not None:
                await asyncio.shield(asyncio.to_thread(_remove_quietly, upload_dir))

    async def _make_local(self, base: str) -> None:
        """The base environment made local and pinned. The fetch runs in a thread that a
        cancel cannot stop: if the job is cancelled meanwhile, the pin the fetch ends with
        is taken back when it ends, so a cancel never leaves an environment pinned (never
        evicted) for ever."""
        fetch = asyncio.ensure_future(asyncio.to_thread(self.storage.make_local, base))
        try:
            await asyncio.shield(fetch)
        except asyncio.CancelledError:
            fetch.add_done_callback(self._unpin_fetched(base))
            raise

    def _unpin_fetched(self, base: str) -> Callable[[asyncio.Future[Path]], None]:
        def unpin(fetch: asyncio.Future[Path]) -> None:
            if not fetch.cancelled() and fetch.exception() is None:
                self.storage.unpin(base)
                log.info("environment %s unpinned: its job was cancelled during its fetch", base)

        return unpin

    async def _refuse(self, message: str, error: jobs.BadJob) -> None:
        """Answer a refused message 400 if it names a job and a front; nothing runs."""
        job, front = _job_and_front(message)
        if job is None or front is None:
            log.warning("refused a job message that names no job and front to answer: %s", error)
            return
        try:
            if not await keys.claim_async(self.client, job, self.name):
                log.info("job %s dropped: claimed before (a copy or a redelivery)", job)
                return
            log.warning("job %s refused: %s", job, error)
            outbox = Outbox(self.client, front, job, self.max_event)
            outbox.put(jobs.error(job, 400, str(error)))
            await outbox.close()
        except Exception as failure:
            log.warning("job %s: could not answer its refusal (%s)", job, failure)

    # -- uploads ----------------------------------------------------------------------------------

    async def _fetch_upload(self, spec: jobs.JobSpec, path: Path) -> Path:
        """The job's archive at ``path``, checked against its reference (size, sha256)."""
        ref = spec.upload
        assert ref is not None
        if ref.place == "redis":
            data: Any = await self.client.get(keys.upload_key(spec.job))
            if not isinstance(data, bytes):
                raise BadUpload(
                    "The uploaded archive of this request is gone from the cluster's Redis "
                    f"(it is kept {keys.UPLOAD_TTL_S} s, and a Redis restart loses it): nothing "
                    "was run. Send the request again."
                )
            _check_upload(ref, len(data), hashlib.sha256(data).hexdigest())
            await asyncio.to_thread(path.write_bytes, data)
        else:
            await asyncio.to_thread(self._download_upload, spec, path)
        return path

    def _download_upload(self, spec: jobs.JobSpec, path: Path) -> None:
        ref = spec.upload
        assert ref is not None
        try:
            with open(path, "wb") as into:
                size, digest = self.worker.store.get_upload(spec.job, into, limit=ref.size)
        except ObjectStoreError as error:
            raise BadUpload(
                f"The uploaded archive of this request cannot be read from the bucket ({error}):"
                " nothing was run. Send the request again."
            ) from None
        _check_upload(ref, size, digest)

    async def _delete_upload(self, spec: jobs.JobSpec) -> None:
        assert spec.upload is not None
        try:
            if spec.upload.place == "redis":
                await self.client.delete(keys.upload_key(spec.job))
            else:
                await asyncio.to_thread(self.worker.store.delete_upload, spec.job)
        except Exception as error:  # it expires (Redis) or the lifecycle rule takes it
            log.debug("job %s: its upload was not deleted: %s", spec.job, error)

    # -- the control stream -----------------------------------------------------------------------

    async def _read_control(self) -> None:
        """``stdin``, ``eof``, ``stop`` and ``cancel`` for the jobs this worker runs."""
        stream = keys.control_key(self.name)
        last = "$"
        failing = False
        while True:
            try:
                if last == "$":
                    newest = await self.control_client.xrevrange(stream, count=1)
                    last = _text(newest[0][0]) if newest else "0-0"
                answer: Any = await self.control_client.xread(
                    {stream: last}, block=CONTROL_BLOCK_MS
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not failing:
                    log.warning("worker %s cannot read its control stream: %s", self.name, error)
                failing = True
                await asyncio.sleep(0.25)
                continue
            if failing:
                log.info("worker %s reads its control stream again", self.name)
                failing = False
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    self._control(fields)

    def _control(self, fields: dict[Any, Any]) -> None:
        try:
            event = jobs.decode_event(fields, control=True)
        except jobs.BadEvent as error:
            log.warning("ignored a control message: %s", error)
            return
        job = self.running.get(event.job)
        if job is None:
            log.debug("control %s for job %s, which does not run here", event.kind, event.job)
            return
        if event.kind == "cancel":
            if job.task is not None:
                job.task.cancel()
            return
        live = job.live
        if live is None:
            log.debug("control %s for job %s, which is not streamed", event.kind, event.job)
            return
        if event.kind == "stop":
            live.stop()
        elif event.kind == "eof":
            live.end_stdin()
        else:
            refusal = live.give_stdin(str(event.data["text"]).encode("utf-8", "replace"))
            if refusal is not None:
                job.refusal = refusal
                live.stop()

    async def _sweep_forever(self) -> None:
        """Expired local environments go, as on the single server."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await asyncio.to_thread(self.storage.sweep)
            except OSError:
                log.exception("sweeping expired environments failed")
            self.worker.heartbeat.cached_environments = self.storage.cached_environments()


class Outbox:
    """The events of one job to its front's inbox, in order (one sender task per job)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        front: str,
        job: str,
        max_bytes: int = jobs.DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.inbox = keys.inbox_key(front)
        self.job = job
        self._queue: asyncio.Queue[jobs.Event | None] = asyncio.Queue()
        self._sender = asyncio.ensure_future(self._send_all())
        self._failed = False

    def put(self, event: jobs.Event) -> None:
        self._queue.put_nowait(event)

    def frame(self, message: dict[str, Any]) -> None:
        """``LiveRun``'s ``send``: a chunk or a wait for input, as an event."""
        if "stream" in message:
            self.put(jobs.chunk(self.job, message["stream"], message["text"]))
        elif message.get("stdin") == "wanted":
            self.put(jobs.stdin_wanted(self.job, message.get("prompt", "")))

    async def close(self) -> None:
        """Send what is queued (within :data:`OUTBOX_FLUSH_SECONDS`), then stop."""
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._sender), OUTBOX_FLUSH_SECONDS)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._sender.cancel()

    async def _send_all(self) -> None:
        while (event := await self._queue.get()) is not None:
            try:
                fields = jobs.encode_event(event, max_bytes=self.max_bytes)
            except jobs.BadEvent as error:
                log.error("job %s: an event could not be encoded: %s", self.job, error)
                fields = jobs.encode_event(jobs.error(self.job, 500, _SERVER_FAILED))
            try:
                await self.client.xadd(
                    self.inbox,
                    fields,  # type: ignore[arg-type]
                    maxlen=keys.INBOX_MAXLEN,
                    approximate=True,
                )
            except Exception as error:
                if not self._failed:
                    log.warning("job %s: its events cannot reach Redis: %s", self.job, error)
                self._failed = True


class BadUpload(Exception):
    """A job's upload that is missing or not what its reference says (HTTP 400)."""


def _check_upload(ref: jobs.UploadRef, size: int, digest: str) -> None:
    if size != ref.size or digest != ref.sha256:
        raise BadUpload(
            f"The uploaded archive of this request is not the one its job names ({size} "
            f"bytes with sha256 {digest[:12]}..., not {ref.size} with {ref.sha256[:12]}...): "
            "nothing was run. Send the request again; if this repeats, something else writes "
            "to the cluster's Redis or bucket."
        )


def _job_and_front(message: str) -> tuple[str | None, str | None]:
    """The job id and front name of a refused message, if it is JSON naming valid ones."""
    if len(message) > _REFUSAL_PARSE_LIMIT:
        return None, None
    try:
        value = json.loads(message)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(value, dict):
        return None, None
    try:
        return keys.job_id(value.get("job")), keys.name(value.get("front"))
    except ValueError:
        return None, None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _exit_now() -> None:
    """The last resort when Celery does not stop after the loop died."""
    log.critical("the worker did not stop in time after its loop died: exiting now")
    logging.shutdown()
    os._exit(LOOP_DIED_STATUS)


def _remove_quietly(path: Path) -> None:
    from .. import trees

    trees.remove_quietly(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m sandbox_kernel.server.cluster.worker``: the same as ``sandbox-kernel
    worker``."""
    parser = argparse.ArgumentParser(prog="sandbox-kernel worker")
    add_worker_arguments(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
