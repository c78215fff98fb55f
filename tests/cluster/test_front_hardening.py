"""A front's :class:`ClusterExecutor` against the ways a run goes wrong between the claim and
the answer (issue 14's review: H1, H2, H6, H7, M2, M3, M4, L4, L7).

The executor is the real one, on a real ``redis-server`` (the module's ``redis_server``), a
real Celery engine publishing there and a real moto bucket. The worker's side is played by
the test with the cluster's own parts (the atomic claim of :func:`keys.claim_async`, a
heartbeat key, events encoded by :mod:`jobs`): this is how a test makes a worker claim a job
and then say nothing, answer too big, or stop beating a moment before its final, which a
real worker cannot be made to do on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio

from sandbox_kernel.server.cluster import engine, front, jobs, keys
from sandbox_kernel.server.cluster.front import ClusterExecutor, ClusterLost, RelayControl
from sandbox_kernel.server.cluster.objects import ObjectStore
from sandbox_kernel.server.cluster.settings import parse_redis_url
from sandbox_kernel.server.live import MAX_STDIN_WAITING
from sandbox_kernel.server.settings import ServerSettings

from .processes import ClusterPlace

T = TypeVar("T")
WORKER = "played-worker"


class PlayedWorker:
    """The worker's side of a job, done by hand on the real Redis."""

    def __init__(self, client: redis.asyncio.Redis, front_name: str, name: str = WORKER):
        self.client = client
        self.inbox = keys.inbox_key(front_name)
        self.name = name
        self._beat: asyncio.Task[None] | None = None

    async def next_job(self, timeout: float = 10) -> str:
        """The id of the first job in ``sk:waiting`` (queued by the front)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            waiting: list[Any] = list(await self.client.zrange(keys.WAITING, 0, 0))
            if waiting:
                return str(waiting[0].decode())
            await asyncio.sleep(0.02)
        raise AssertionError("the front queued no job within 10 s")

    async def claim(self, job: str) -> None:
        self.start_beating()
        assert await keys.claim_async(self.client, job, self.name)

    def start_beating(self) -> None:
        async def beat() -> None:
            while True:
                await self.client.set(keys.worker_key(self.name), _state(self.name), px=1000)
                await asyncio.sleep(0.1)

        if self._beat is None:
            self._beat = asyncio.get_running_loop().create_task(beat())

    async def stop_beating(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        await self.client.delete(keys.worker_key(self.name))

    async def send(self, event: jobs.Event) -> None:
        await self.client.xadd(self.inbox, jobs.encode_event(event))  # type: ignore[arg-type]

    async def controls(self) -> list[tuple[str, dict[str, Any]]]:
        """What fronts sent to this worker: (kind, data) in order."""
        entries: list[Any] = list(await self.client.xrange(keys.control_key(self.name)) or [])
        decoded = [jobs.decode_event(fields, control=True) for _id, fields in entries]
        return [(event.kind, event.data) for event in decoded]


def _state(name: str) -> str:
    from sandbox_kernel.server.cluster.liveness import WorkerState

    return WorkerState(name, 2, 1, (), 0.0).to_json()


@contextlib.asynccontextmanager
async def running_front(
    place: ClusterPlace, **options: Any
) -> AsyncIterator[tuple[ClusterExecutor, PlayedWorker]]:
    settings = ServerSettings(cluster=place.redis.url, storage=place.storage_url, **options)
    target = parse_redis_url(place.redis.url)
    client = target.async_client()
    store = ObjectStore.from_url(place.storage_url, endpoint=place.s3_url)
    engine_app = engine.make_engine(settings)
    executor = ClusterExecutor(settings, client, store, engine_app, front.front_name(settings))
    await client.flushdb()
    await executor.start()
    worker = PlayedWorker(target.async_client(), executor.name)
    try:
        yield executor, worker
    finally:
        await worker.stop_beating()
        await executor.close()
        await worker.client.aclose()
        await client.aclose()
        engine_app.close()


def run(place: ClusterPlace, body: Callable[..., Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        async with running_front(place, **options) as (executor, worker):
            return await asyncio.wait_for(body(executor, worker), 60)

    return asyncio.run(main())


def streamed(executor: ClusterExecutor) -> tuple[RelayControl, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    return executor.live(sent.append), sent


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


# -- H7, M2: the forwarder starts whoever learns the claim first, and ends with the run -------


@pytest.mark.parametrize("learnt_by", ["watcher", "give_up"])
def test_stdin_reaches_a_worker_whose_claimed_event_never_came(
    cluster_place: ClusterPlace, learnt_by: str
) -> None:
    """The claim is seen by the liveness watcher (or by the front's lost give-up) before any
    ``claimed`` event: the client's stdin and end of file must still reach the worker."""

    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        relay, _sent = streamed(executor)
        run_ = asyncio.ensure_future(executor.execute({"commands": ["cat"]}, None, relay.hooks))
        job = await worker.next_job()
        assert relay.give_stdin(b"hello\n") is None
        if learnt_by == "give_up":
            worker.start_beating()  # claim only once the front's give-up is due
            await asyncio.sleep(executor.settings.queue_wait * 0.8)
        await worker.claim(job)
        relay.end_stdin()

        async def arrived() -> bool:
            return [kind for kind, _ in await worker.controls()] == ["stdin", "eof"]

        await wait_for(arrived, "the stdin and eof on the worker's control stream")
        assert (await worker.controls())[0][1] == {"text": "hello\n"}
        await worker.send(jobs.final(job, {"status": 0, "execution": []}))
        assert (await run_)["status"] == 0
        forwarders = [t for t in asyncio.all_tasks() if t.get_name().startswith("forward-")]
        await asyncio.sleep(0)
        assert all(task.done() for task in forwarders), "a forwarder outlived its run"

    run(cluster_place, body, queue_wait=1.0 if learnt_by == "give_up" else 30.0)


def test_a_claim_the_watcher_saw_during_the_queue_wait_outlives_the_queue_wait(
    cluster_place: ClusterPlace,
) -> None:
    """The watcher learns the owner while the front still waits for the queue wait's end:
    when that time comes the run is a worker's, not lost (a 502 there was CI's flake)."""

    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        run_ = asyncio.ensure_future(executor.execute({"commands": ["true"]}, None))
        job = await worker.next_job()
        await worker.claim(job)

        async def seen() -> bool:
            return job in executor.jobs and executor.jobs[job].worker == WORKER

        await wait_for(seen, "the watcher attaching the claim's worker")
        await asyncio.sleep(executor.settings.queue_wait + 0.5)
        assert not run_.done(), "the run ended at the queue wait although a worker claimed it"
        await worker.send(jobs.final(job, {"status": 0, "execution": []}))
        assert (await run_)["status"] == 0

    run(cluster_place, body, queue_wait=1.0)


def test_a_client_gone_mid_run_leaves_no_forwarder_and_cancels_the_run(
    cluster_place: ClusterPlace,
) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        relay, _sent = streamed(executor)
        run_ = asyncio.ensure_future(executor.execute({"commands": ["cat"]}, None, relay.hooks))
        job = await worker.next_job()
        await worker.claim(job)
        await worker.send(jobs.claimed(job, WORKER))
        await wait_for(
            lambda: _true(any(t.get_name() == f"forward-{job}" for t in asyncio.all_tasks())),
            "the forwarder started",
        )
        run_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run_
        await asyncio.sleep(0.05)
        assert not [t for t in asyncio.all_tasks() if t.get_name() == f"forward-{job}"]
        assert ("cancel", {}) in await worker.controls()

    run(cluster_place, body)


async def _true(value: bool) -> bool:
    return value


# -- H1, L4: the stdin relay is bounded and keeps characters whole ----------------------------


def test_a_flood_of_tiny_stdin_frames_is_merged_and_eof_stop_are_sent_once(
    cluster_place: ClusterPlace,
) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        relay, _sent = streamed(executor)
        for _ in range(20_000):
            assert relay.give_stdin(b"x") is None
        for _ in range(1000):
            relay.end_stdin()
            relay.stop()
        assert len(relay.outgoing) == 3, "20000 one-byte frames must wait as one entry"
        run_ = asyncio.ensure_future(executor.execute({"commands": ["cat"]}, None, relay.hooks))
        job = await worker.next_job()
        await worker.claim(job)
        await worker.send(jobs.claimed(job, WORKER))

        async def arrived() -> bool:
            return len(await worker.controls()) >= 3

        await wait_for(arrived, "the relayed controls")
        await asyncio.sleep(0.2)
        controls = await worker.controls()
        assert controls == [("stdin", {"text": "x" * 20_000}), ("eof", {}), ("stop", {})]
        await worker.send(jobs.final(job, {"status": 0, "execution": []}))
        await run_

    run(cluster_place, body)


def test_stdin_waiting_for_the_claim_is_refused_413_past_its_bound(
    cluster_place: ClusterPlace,
) -> None:
    async def body(executor: ClusterExecutor, _worker: PlayedWorker) -> None:
        relay, _sent = streamed(executor)
        piece = b"y" * 4096
        refusal = None
        for _ in range(MAX_STDIN_WAITING // len(piece) + 2):
            refusal = relay.give_stdin(piece)
            if refusal is not None:
                break
        assert refusal is not None and refusal[0] == 413
        assert "stdin" in refusal[1] and "Send input" in refusal[1]
        assert len(relay.outgoing) <= MAX_STDIN_WAITING // front.RELAY_PIECE + 1

    run(cluster_place, body)


async def relayed_stdin(
    executor: ClusterExecutor, worker: PlayedWorker, relay: Any
) -> tuple[list[str], Callable[[], Awaitable[None]]]:
    """Run ``cat`` with ``relay``'s stdin (already ended), claimed by the played worker: the
    stdin texts that reached its control stream, and how to finish the run."""
    run_ = asyncio.ensure_future(executor.execute({"commands": ["cat"]}, None, relay.hooks))
    job = await worker.next_job()
    await worker.claim(job)
    await worker.send(jobs.claimed(job, WORKER))

    async def arrived() -> bool:
        return any(kind == "eof" for kind, _ in await worker.controls())

    await wait_for(arrived, "the end of file on the control stream")
    texts = [data["text"] for kind, data in await worker.controls() if kind == "stdin"]

    async def finish() -> None:
        await worker.send(jobs.final(job, {"status": 0, "execution": []}))
        await run_

    return texts, finish


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(["a" * (front.RELAY_PIECE - 1) + "é" * 10], id="two-byte-at-the-cut"),
        pytest.param(["b" * (front.RELAY_PIECE - 2) + "€😀" * 3], id="3-and-4-byte-at-the-cut"),
        pytest.param(["😀" * 40_000], id="only-4-byte-characters"),
    ],
)
def test_stdin_is_cut_between_characters(cluster_place: ClusterPlace, frames: list[str]) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        relay, _sent = streamed(executor)
        for frame in frames:
            assert relay.give_stdin(frame.encode()) is None
        relay.end_stdin()
        texts, finish = await relayed_stdin(executor, worker, relay)
        assert "".join(texts) == "".join(frames)
        assert "\ufffd" not in "".join(texts)
        assert all(len(text.encode()) <= front.RELAY_PIECE for text in texts)
        await finish()

    run(cluster_place, body)


def test_a_character_cut_between_two_frames_arrives_whole(cluster_place: ClusterPlace) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        relay, _sent = streamed(executor)
        euro = "€".encode()
        assert relay.give_stdin(b"price " + euro[:1]) is None
        assert relay.give_stdin(euro[1:] + b"5\n") is None
        relay.end_stdin()
        texts, finish = await relayed_stdin(executor, worker, relay)
        assert "".join(texts) == "price €5\n"
        await finish()

    run(cluster_place, body)


# -- H2, L7: the inbox is trimmed, expires, and is the front's own ----------------------------


def test_the_inbox_is_trimmed_after_reading_and_expires(cluster_place: ClusterPlace) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        for _ in range(3):
            run_ = asyncio.ensure_future(executor.execute({"commands": ["true"]}, None))
            job = await worker.next_job()
            await worker.claim(job)
            await worker.send(jobs.claimed(job, WORKER))
            for index in range(50):
                await worker.send(jobs.queue(job, index))
            await worker.send(jobs.final(job, {"status": 0, "execution": []}))
            assert (await run_)["status"] == 0
        await asyncio.sleep(0.2)
        assert await worker.client.xlen(executor.inbox) <= 1, "read events stay in Redis"

        async def expiring() -> bool:
            return bool(await worker.client.ttl(executor.inbox) > 0)

        await wait_for(expiring, "an expiry on the front's inbox")
        assert await worker.client.ttl(executor.inbox) <= front.INBOX_TTL_S

    run(cluster_place, body)


def test_two_unnamed_fronts_never_share_an_inbox() -> None:
    names = {front.front_name(ServerSettings()) for _ in range(20)}
    assert len(names) == 20


# -- H6, M3, M4: a claimed run always ends, and a lost one is cancelled -----------------------


def test_a_claimed_run_that_never_answers_fails_502_at_its_deadline(
    cluster_place: ClusterPlace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front, "ANSWER_MARGIN", 1.0)

    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> float:
        started = asyncio.get_running_loop().time()
        run_ = asyncio.ensure_future(executor.execute({"commands": ["true"]}, None))
        job = await worker.next_job()
        await worker.claim(job)
        await worker.send(jobs.claimed(job, WORKER))
        with pytest.raises(ClusterLost):
            await run_
        await asyncio.sleep(0.2)
        assert ("cancel", {}) in await worker.controls(), "the lost run was not cancelled"
        return asyncio.get_running_loop().time() - started

    took = run(cluster_place, body, queue_wait=1.0, execute_timeout=1.0)
    assert 2.5 < took < 20


def test_an_answer_too_large_to_accept_fails_its_run_at_once_with_the_reason(
    cluster_place: ClusterPlace, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> float:
        executor.max_event = 10_000
        run_ = asyncio.ensure_future(executor.execute({"commands": ["true"]}, None))
        job = await worker.next_job()
        await worker.claim(job)
        await worker.send(jobs.claimed(job, WORKER))
        started = asyncio.get_running_loop().time()
        await worker.send(jobs.final(job, {"status": 0, "stdout": "z" * 20_000}))
        with pytest.raises(ClusterLost):
            await run_
        return asyncio.get_running_loop().time() - started

    with caplog.at_level(logging.WARNING):
        took = run(cluster_place, body)
    assert took < 10, "the run waited for its deadline instead of failing at once"
    assert any("answered 502" in r.message and "bytes" in r.message for r in caplog.records)


def test_a_worker_stopping_cleanly_right_after_its_final_gives_no_false_502(
    cluster_place: ClusterPlace,
) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        for _ in range(5):
            run_ = asyncio.ensure_future(executor.execute({"commands": ["true"]}, None))
            job = await worker.next_job()
            await worker.claim(job)
            await worker.send(jobs.claimed(job, WORKER))
            await asyncio.sleep(front.LIVENESS_POLL * 2)  # watched by now
            await worker.stop_beating()  # the key goes just before the final is read
            await asyncio.sleep(front.LIVENESS_POLL * 0.9)
            await worker.send(jobs.final(job, {"status": 0, "execution": []}))
            assert (await run_)["status"] == 0

    run(cluster_place, body)


def test_a_worker_that_died_fails_its_run_502_and_the_run_is_cancelled(
    cluster_place: ClusterPlace,
) -> None:
    async def body(executor: ClusterExecutor, worker: PlayedWorker) -> None:
        run_ = asyncio.ensure_future(executor.execute({"commands": ["true"]}, None))
        job = await worker.next_job()
        await worker.claim(job)
        await worker.send(jobs.claimed(job, WORKER))
        await asyncio.sleep(front.LIVENESS_POLL * 2)
        await worker.stop_beating()
        with pytest.raises(ClusterLost):
            await run_
        await asyncio.sleep(0.2)
        assert ("cancel", {}) in await worker.controls()
        assert await worker.client.zscore(keys.WAITING, job) is None

    run(cluster_place, body)
