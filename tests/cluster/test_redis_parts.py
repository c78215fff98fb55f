"""The cluster's Redis building blocks against a real redis-server (design B3, B4, B7, B9).

No Celery worker and no front yet: the claim and the give-up under real concurrency, the
heartbeat and its expiry after a real ``kill -9``, the job message and the events refusing what a
hostile writer to Redis could put there, and the ``--cluster`` URL (auth required, password
never shown).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.backoff
import redis.retry

from sandbox_kernel import protocol
from sandbox_kernel.server import app
from sandbox_kernel.server.cluster import jobs, keys
from sandbox_kernel.server.cluster.liveness import Heartbeat, Liveness, WorkerState
from sandbox_kernel.server.cluster.settings import (
    ClusterUnreachable,
    ClusterURLError,
    RedisTarget,
    check,
    check_async,
    parse_redis_url,
)

from ..conftest import Server
from .redis_fixture import RedisServer, redis_acl_server, redis_server, running_redis

__all__ = ["redis_acl_server", "redis_server"]  # fixtures, used by name

ROOT = Path(__file__).resolve().parents[2]
FIGURES: dict[str, str] = {}


def new_job() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    target = parse_redis_url(redis_server.url)
    connection = target.client()
    yield connection
    connection.close()


def wait_for(condition: Callable[[], bool], seconds: float, step: float = 0.005) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(step)
    return None


# -- the claim ---------------------------------------------------------------------------------


def race(count: int, contender: Callable[[int], bool]) -> list[bool]:
    """Run ``contender(i)`` for i in range(count) in threads released at the same instant."""
    start = threading.Barrier(count)
    results: list[bool | None] = [None] * count

    def run(index: int) -> None:
        start.wait()
        results[index] = contender(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert all(result is not None for result in results), "a claimer did not finish in 30 s"
    return [bool(result) for result in results]


def test_one_claimer_wins_among_50_threads(client: redis.Redis) -> None:
    for _round in range(10):
        job = new_job()
        client.zadd(keys.WAITING, {job: time.time() * 1000})
        won = race(50, lambda index, job=job: keys.claim(client, job, f"worker-{index}"))
        assert won.count(True) == 1, f"{won.count(True)} claimers won job {job}"
        winner = f"worker-{won.index(True)}"
        assert client.get(keys.claim_key(job)) == winner.encode()
        assert client.zscore(keys.WAITING, job) is None, "the claim left the job in the queue"
        ttl = client.pttl(keys.claim_key(job))
        assert keys.CLAIM_TTL_MS - 60_000 < ttl <= keys.CLAIM_TTL_MS


def test_one_claimer_wins_among_50_asyncio_tasks(redis_server: RedisServer) -> None:
    async def main() -> list[bool]:
        connection = parse_redis_url(redis_server.url).async_client()
        try:
            job = new_job()
            won = await asyncio.gather(
                *(keys.claim_async(connection, job, f"w{index}") for index in range(50))
            )
            assert (await connection.get(keys.claim_key(job))) == f"w{won.index(True)}".encode()
            return list(won)
        finally:
            await connection.aclose()

    for _round in range(5):
        assert asyncio.run(main()).count(True) == 1

    async def front_among_workers() -> tuple[bool, list[bool]]:
        connection = parse_redis_url(redis_server.url).async_client()
        try:
            job = new_job()
            front, *workers = await asyncio.gather(
                keys.give_up_async(connection, job),
                *(keys.claim_async(connection, job, f"w{index}") for index in range(49)),
            )
            owner = await connection.get(keys.claim_key(job))
            assert owner == (b"front:gave-up" if front else f"w{workers.index(True)}".encode())
            return front, workers
        finally:
            await connection.aclose()

    for _round in range(5):
        front, workers = asyncio.run(front_among_workers())
        assert [front, *workers].count(True) == 1


def test_one_claimer_wins_across_processes(redis_server: RedisServer) -> None:
    """Separate processes, as workers on separate machines: still exactly one."""
    job = new_job()
    script = (
        "import sys, time\n"
        "from sandbox_kernel.server.cluster import keys, settings\n"
        "client = settings.parse_redis_url(sys.stdin.readline().strip()).client()\n"
        "client.ping()\n"
        "print('ready', flush=True)\n"
        "release = float(sys.stdin.readline())\n"
        "while time.time() < release: pass\n"
        "print(int(keys.claim(client, sys.argv[1], sys.argv[2])), flush=True)\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, job, f"proc-{index}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for index in range(6)
    ]
    try:
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(redis_server.url + "\n")
            process.stdin.flush()
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        release = time.time() + 0.2  # every process spins until then, then claims
        answers = [process.communicate(f"{release}\n", timeout=30)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert sorted(answer.strip() for answer in answers) == ["0"] * 5 + ["1"], answers


def test_give_up_and_claim_race_has_one_winner(client: redis.Redis) -> None:
    outcomes = {"front": 0, "worker": 0}
    for _round in range(40):
        job, front = new_job(), _round % 2  # which thread is the front: started first or not

        def contender(index: int, job: str = job, front: int = front) -> bool:
            if index == front:
                return keys.give_up(client, job)
            return keys.claim(client, job, "worker-a")

        won = race(2, contender)
        front_won, worker_won = won[front], won[1 - front]
        assert front_won != worker_won, f"round {_round}: front {front_won}, worker {worker_won}"
        owner = client.get(keys.claim_key(job))
        assert owner == (b"front:gave-up" if front_won else b"worker-a")
        outcomes["front" if front_won else "worker"] += 1
        # A fallback copy or a late redelivery of the message finds the claim: never runs.
        assert not keys.claim(client, job, "worker-b")
        assert not keys.give_up(client, job, keys.OWNER_CANCELLED)
    FIGURES["give-up race (front wins / worker wins of 40)"] = str(outcomes)


def test_front_owners_and_worker_names_cannot_be_confused(client: redis.Redis) -> None:
    job = new_job()
    with pytest.raises(ValueError, match="not a worker or front name"):
        keys.claim(client, job, "front:evil")
    with pytest.raises(ValueError, match="a front gives a job up as one of"):
        keys.give_up(client, job, "worker-a")
    assert client.get(keys.claim_key(job)) is None, "a refused claim wrote the key"
    assert keys.give_up(client, job, keys.OWNER_CANCELLED)
    assert client.get(keys.claim_key(job)) == b"front:cancelled"


@pytest.mark.parametrize(
    ("build", "value"),
    [
        (keys.claim_key, "../../etc"),
        (keys.claim_key, "A" * 32),
        (keys.claim_key, new_job() + "\n"),
        (keys.worker_key, "a b"),
        (keys.worker_key, "w" * 101),
        (keys.worker_key, "-leading-dash"),
        (keys.inbox_key, "front*"),
        (keys.env_key, "not-a-uuid"),
        (keys.upload_key, 12345),
    ],
)
def test_keys_are_never_built_from_junk(build: Callable[[Any], str], value: Any) -> None:
    with pytest.raises(ValueError, match="not a"):
        build(value)


def test_claim_latency(client: redis.Redis) -> None:
    times = []
    for _ in range(300):
        job = new_job()
        started = time.perf_counter()
        assert keys.claim(client, job, "worker-a")
        times.append(time.perf_counter() - started)
    median, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
    FIGURES["claim latency, sync, median / p90"] = f"{median * 1000:.3f} / {p90 * 1000:.3f} ms"
    assert median < 0.02, f"a claim took {median * 1000:.1f} ms (median), expected about 0.1"


# -- the heartbeat -----------------------------------------------------------------------------


def liveness_of(server: RedisServer) -> tuple[Liveness, Callable[[], None]]:
    connection = parse_redis_url(server.url).async_client()
    return Liveness(connection), lambda: asyncio.run(connection.aclose())


def test_heartbeat_is_seen_with_its_jobs(redis_server: RedisServer, client: redis.Redis) -> None:
    beat = Heartbeat(client, "worker-seen", slots=2)
    job = new_job()
    beat.start()
    try:
        assert client.sismember(keys.WORKERS, "worker-seen")
        assert 0 < client.pttl(keys.worker_key("worker-seen")) <= keys.HEARTBEAT_TTL_MS
        assert keys.claim(client, job, "worker-seen")
        beat.job_started(job)
        assert wait_for(lambda: job.encode() in client.get(keys.worker_key("worker-seen")), 2)

        async def read() -> tuple[dict[str, WorkerState], bool]:
            connection = parse_redis_url(redis_server.url).async_client()
            try:
                watcher = Liveness(connection)
                return await watcher.alive_workers(), await watcher.owner_alive(job)
            finally:
                await connection.aclose()

        alive, owner_alive = asyncio.run(read())
        state = alive["worker-seen"]
        assert (state.slots, state.busy, state.jobs) == (2, 1, (job,))
        assert abs(state.started - time.time()) < 60
        assert owner_alive
        time.sleep(1.5)  # past the TTL: the thread keeps the key alive
        assert client.exists(keys.worker_key("worker-seen"))
        assert beat.longest_gap < 0.75, f"beats {beat.longest_gap:.2f} s apart (every 0.25 s)"
    finally:
        beat.stop()
    assert not client.exists(keys.worker_key("worker-seen")), "a clean stop left the key"


def test_heartbeat_expires_after_the_thread_stops_without_cleanup(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    beat = Heartbeat(client, "worker-stopped", slots=1)
    job = new_job()
    beat.start()
    assert keys.claim(client, job, "worker-stopped")
    beat.job_started(job)
    time.sleep(0.3)
    beat.stop(clean=False)  # as a kill -9 would: no delete
    stopped = time.monotonic()
    not_alive = expiry_seen(redis_server, "worker-stopped", job, stopped)
    FIGURES["heartbeat: thread stopped -> owner_alive false"] = f"{not_alive:.3f} s"
    assert 0.5 < not_alive < 2.5, f"owner_alive turned false {not_alive:.2f} s after the stop"


def expiry_seen(server: RedisServer, worker: str, job: str, since: float) -> float:
    """Seconds from ``since`` until ``owner_alive(job)`` turned false, polled as a front's
    watcher would (every 10 ms here); the worker is then gone from the live ones too."""

    async def watch() -> float:
        connection = parse_redis_url(server.url).async_client()
        watcher = Liveness(connection)
        try:
            assert await watcher.owner_alive(job), "the owner was not alive to begin with"
            while await watcher.owner_alive(job):
                assert time.monotonic() - since < 5, "owner_alive still true 5 s after a stop"
                await asyncio.sleep(0.01)
            not_alive = time.monotonic() - since
            assert worker not in await watcher.alive_workers()
            assert not await connection.sismember(keys.WORKERS, worker), "not pruned"
            assert not await connection.exists(keys.worker_key(worker))
            return not_alive
        finally:
            await connection.aclose()

    return asyncio.run(watch())


def test_heartbeat_of_a_killed_process_expires(redis_server: RedisServer) -> None:
    """A real ``kill -9`` of a process that beats: its claimed job is seen lost within ~1 s."""
    job = new_job()
    script = (
        "import sys, time\n"
        "from sandbox_kernel.server.cluster import keys, settings\n"
        "from sandbox_kernel.server.cluster.liveness import Heartbeat\n"
        "client = settings.parse_redis_url(sys.stdin.readline().strip()).client()\n"
        "beat = Heartbeat(client, 'worker-killed', slots=2)\n"
        "assert keys.claim(client, sys.argv[1], 'worker-killed')\n"
        "beat.job_started(sys.argv[1])\n"
        "beat.start()\n"
        "print('beating', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, job],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(redis_server.url + "\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "beating"
        time.sleep(0.6)  # a few beats
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        process.wait(10)
        not_alive = expiry_seen(redis_server, "worker-killed", job, killed)
    finally:
        process.kill()
        process.wait()
    FIGURES["heartbeat: kill -9 -> owner_alive false"] = f"{not_alive:.3f} s"
    assert 0.5 < not_alive < 2.5, f"owner_alive turned false {not_alive:.2f} s after kill -9"


def test_owner_alive_is_false_without_a_beating_worker(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    unclaimed, gave_up, ghost, lost = new_job(), new_job(), new_job(), new_job()
    assert keys.give_up(client, gave_up)
    assert keys.claim(client, ghost, "worker-never-seen")
    beat = Heartbeat(client, "worker-alive", slots=1)
    beat.start()
    try:
        assert keys.claim(client, lost, "worker-alive")
        client.delete(keys.claim_key(lost))  # as a Redis restart loses it

        async def read() -> dict[str, bool]:
            connection = parse_redis_url(redis_server.url).async_client()
            try:
                return await Liveness(connection).owners_alive([unclaimed, gave_up, ghost, lost])
            finally:
                await connection.aclose()

        assert asyncio.run(read()) == {unclaimed: False, gave_up: False, ghost: False, lost: False}
    finally:
        beat.stop()


def test_alive_workers_ignores_junk_written_to_redis(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    client.sadd(keys.WORKERS, "bad name", "worker:x", "worker-junk", "worker-negative")
    client.set(keys.worker_key("worker-junk"), b"{not json", px=5000)
    client.set(
        keys.worker_key("worker-negative"),
        json.dumps({"slots": 0, "busy": True, "jobs": [], "started": 0}),
        px=5000,
    )
    beat = Heartbeat(client, "worker-fine", slots=3)
    beat.start()
    try:

        async def read() -> dict[str, WorkerState]:
            connection = parse_redis_url(redis_server.url).async_client()
            try:
                return await Liveness(connection).alive_workers()
            finally:
                await connection.aclose()

        alive = asyncio.run(read())
        assert "worker-fine" in alive and alive["worker-fine"].slots == 3
        assert not {"bad name", "worker:x", "worker-junk", "worker-negative"} & set(alive)
    finally:
        beat.stop()
        client.delete(keys.worker_key("worker-junk"), keys.worker_key("worker-negative"))


def test_heartbeat_comes_back_after_redis_restarts(tmp_path: Path) -> None:
    with running_redis(tmp_path) as server:
        client = parse_redis_url(server.url).client(socket_timeout=0.5)
        beat = Heartbeat(client, "worker-restart", slots=1)
        beat.start()
        try:
            server.restart()  # every key is gone
            back = time.monotonic()
            seen = wait_for(lambda: bool(client.exists(keys.worker_key("worker-restart"))), 5)
            assert seen is not None, "the heartbeat did not come back within 5 s of the restart"
            assert time.monotonic() - back < 5
            assert client.sismember(keys.WORKERS, "worker-restart"), "not registered again"
            FIGURES["heartbeat back after a Redis restart"] = f"{seen:.3f} s"
        finally:
            beat.stop()
            client.close()


def test_heartbeat_calls_on_join_at_start_and_after_a_restart(tmp_path: Path) -> None:
    """``on_join`` (the worker registers its cached environments again) runs when a beat
    finds the worker new to ``sk:workers``: at start, after a restart, and again at the next
    beat when it failed; ``every`` runs on its own period."""
    joins: list[float] = []
    checks: list[float] = []
    failing = threading.Event()

    def join() -> None:
        if failing.is_set():
            failing.clear()
            raise ConnectionError("a join that fails once")
        joins.append(time.monotonic())

    with running_redis(tmp_path) as server:
        client = parse_redis_url(server.url).client(socket_timeout=0.5)
        beat = Heartbeat(
            client, "worker-joins", slots=1, on_join=join, every=(0.5, lambda: checks.append(1))
        )
        beat.start()
        try:
            assert len(joins) == 1  # the first beat, before start returns
            time.sleep(1.2)
            assert len(joins) == 1, "a join on every beat"
            assert 2 <= len(checks) <= 4, checks
            failing.set()
            server.restart()
            assert wait_for(lambda: len(joins) == 2, 5) is not None, "no join after the restart"
            assert not failing.is_set()  # the first try failed, the next beat joined
            client.srem(keys.WORKERS, "worker-joins")  # a front pruned it (missed beats)
            assert wait_for(lambda: len(joins) == 3, 2) is not None
        finally:
            beat.stop()
            client.close()


def test_caps_that_differ_are_named_and_junk_is_refused() -> None:
    from sandbox_kernel.server.settings import ServerSettings

    front = ServerSettings(max_upload=1024**2, execute_timeout=30.5)
    mine = jobs.caps_of(ServerSettings())
    front_name, differences = jobs.differing_caps(mine, jobs.caps_message("f1", front))
    assert front_name == "'f1'"
    assert differences == [
        "--max-upload 268435456 here, 1048576 at the front",
        "--execute-timeout 60 here, 30.5 at the front",
    ]
    assert jobs.differing_caps(mine, jobs.caps_message("f1", ServerSettings()))[1] == []
    odd = json.dumps({"front": "f", "caps": {"max_upload": True, "max_output": "1", "x": 1}})
    assert jobs.differing_caps(mine, odd)[1] == []  # not numbers: nothing to compare
    for junk in (b"not json", b"[]", b'{"front": 3, "caps": {}}', b'{"front": "f"}'):
        with pytest.raises(jobs.BadEvent):
            jobs.differing_caps(mine, junk)


# -- the job message ---------------------------------------------------------------------------


def a_job(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "v": 1,
        "job": new_job(),
        "front": "front-1",
        "config": {"commands": ["echo hi"], "environ": {"NAME": "é 🎉"}, "save": True},
        "upload": None,
        "stream": False,
        "enqueued_ms": 1_700_000_000_000,
    }
    message.update(changes)
    return message


def test_job_round_trip() -> None:
    upload = jobs.UploadRef(place="redis", size=300, sha256="ab" * 32)
    spec = jobs.JobSpec(
        job=new_job(),
        front="front-1.example",
        config={"commands": [{"command": "cat", "timeout": 2.5}], "environment": str(uuid.uuid4())},
        upload=upload,
        stream=True,
        enqueued_ms=int(time.time() * 1000),
    )
    text = spec.to_json()
    assert jobs.JobSpec.from_json(text) == spec
    assert jobs.JobSpec.from_json(text.encode()) == spec
    plain = jobs.JobSpec(job=new_job(), front="f", config={"commands": ["true"]})
    assert jobs.JobSpec.from_json(plain.to_json()) == plain
    assert "token" not in text and "password" not in text


HOSTILE_JOBS: list[tuple[str, str | bytes, str]] = [
    ("not JSON", "{job:", "not valid JSON"),
    ("not UTF-8", b'{"v": 1, "job": "\xff"}', "not valid JSON"),
    ("NaN", json.dumps(a_job(enqueued_ms=float("nan"))), "NaN is not valid JSON"),
    ("a list", json.dumps([a_job()]), "not an object"),
    ("a string", json.dumps("job"), "not an object"),
    ("extra key", json.dumps(a_job(token="x")), "unknown ['token']"),
    ("missing key", json.dumps({k: v for k, v in a_job().items() if k != "front"}), "missing"),
    ("version 2", json.dumps(a_job(v=2)), "run fronts and workers of the same version"),
    ("version true", json.dumps(a_job(v=True)), "its format is True"),
    ("job an int", json.dumps(a_job(job=12)), "not a job id"),
    ("job upper", json.dumps(a_job(job="A" * 32)), "not a job id"),
    ("job a key path", json.dumps(a_job(job="x:../" + "a" * 27)), "not a job id"),
    ("front with colon", json.dumps(a_job(front="front:gave-up")), "not a worker or front name"),
    ("front huge", json.dumps(a_job(front="f" * 5000)), "not a worker or front name"),
    ("front null", json.dumps(a_job(front=None)), "not a worker or front name"),
    ("stream a string", json.dumps(a_job(stream="yes")), "'stream' is 'yes'"),
    ("stream 1", json.dumps(a_job(stream=1)), "'stream' is 1"),
    ("enqueued bool", json.dumps(a_job(enqueued_ms=True)), "'enqueued_ms' is True"),
    ("enqueued float", json.dumps(a_job(enqueued_ms=1.5)), "'enqueued_ms' is 1.5"),
    ("enqueued negative", json.dumps(a_job(enqueued_ms=-1)), "'enqueued_ms' is -1"),
    ("enqueued huge", json.dumps(a_job(enqueued_ms=10**30)), "'enqueued_ms' is"),
    ("upload a list", json.dumps(a_job(upload=[])), "'upload' is a list"),
    (
        "upload extra",
        json.dumps(a_job(upload={"place": "redis", "size": 1, "sha256": "a" * 64, "path": "/"})),
        "unknown ['path']",
    ),
    (
        "upload elsewhere",
        json.dumps(a_job(upload={"place": "/etc", "size": 1, "sha256": "a" * 64})),
        "'upload.place' is '/etc'",
    ),
    (
        "upload too big for redis",
        json.dumps(a_job(upload={"place": "redis", "size": 2 * 1024**2, "sha256": "a" * 64})),
        "'upload.size' is 2097152",
    ),
    (
        "upload over --max-upload",
        json.dumps(a_job(upload={"place": "bucket", "size": 2**40, "sha256": "a" * 64})),
        "'upload.size' is 1099511627776",
    ),
    (
        "upload size zero",
        json.dumps(a_job(upload={"place": "bucket", "size": 0, "sha256": "a" * 64})),
        "'upload.size' is 0",
    ),
    (
        "upload bad digest",
        json.dumps(a_job(upload={"place": "bucket", "size": 5, "sha256": "../" * 20})),
        "'upload.sha256'",
    ),
    ("huge message", json.dumps(a_job(front="f", pad="x" * (2 * 1024**2))), "more than"),
    (
        "huge config",
        json.dumps(a_job(config={"commands": ["true"], "x": "y" * (1024**2)})),
        "Request too large: config is limited to 1048576 bytes",
    ),
    ("deep", '{"v": 1, "config": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
    ("deep config", json.dumps(a_job(config={"commands": ["true"], "x": [[[[[]]]]]})), ""),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(raw, expected) for _, raw, expected in HOSTILE_JOBS],
    ids=[name for name, _, _ in HOSTILE_JOBS],
)
def test_hostile_job_messages_are_refused(raw: str | bytes, expected: str) -> None:
    if not expected:  # a config of normal depth is fine: only too deep is refused
        assert jobs.job_from_json(raw).config["x"] == [[[[[]]]]]
        return
    with pytest.raises(jobs.BadJob) as refused:
        jobs.job_from_json(raw)
    assert expected in str(refused.value)
    assert refused.value.status == 400
    assert len(str(refused.value)) < 600, "a hostile value went into the message whole"


def test_a_config_nested_past_the_execute_limit_is_refused() -> None:
    assert jobs.MAX_JSON_DEPTH == app._MAX_JSON_DEPTH, "the worker's limit drifted from execute/"
    nested: Any = ["x"]
    for _ in range(jobs.MAX_JSON_DEPTH - 1):
        nested = [nested]
    fits = json.dumps(a_job(config={"commands": ["true"], "deep": nested[0]}))
    assert jobs.job_from_json(fits)
    too_deep = json.dumps(a_job(config={"commands": ["true"], "deep": nested}))
    with pytest.raises(jobs.BadJob, match="nested deeper"):
        jobs.job_from_json(too_deep)


def test_a_front_cannot_send_a_job_no_worker_accepts() -> None:
    with pytest.raises(jobs.BadJob, match="cannot be sent as JSON"):
        jobs.JobSpec(new_job(), "f", {"commands": ["true"], "environ": {"X": math_inf()}}).to_json()
    with pytest.raises(jobs.BadJob, match="Command list cannot be empty"):
        jobs.JobSpec(new_job(), "f", {"commands": []}).to_json()
    with pytest.raises(jobs.BadJob, match="not a worker or front name"):
        jobs.JobSpec(new_job(), "a front", {"commands": ["true"]}).to_json()


def math_inf() -> float:
    return float("inf")


HOSTILE_CONFIGS: list[Any] = [
    [],
    "echo hi",
    {},
    {"commands": "echo hi"},
    {"commands": []},
    {"commands": [{"command": "true", "timeout": -1}]},
    {"commands": [{"command": "true", "shell": "/bin/sh"}]},
    {"commands": ["echo \0"]},
    {"commands": ["true"], "environ": {"A=B": "x"}},
    {"commands": ["true"], "environ": {"X": None}},
    {"commands": ["true"], "environment": 42},
    {"commands": ["true"], "save": "yes"},
    {"commands": ["true"], "result_path": ["x"]},
]


@pytest.mark.parametrize("config", HOSTILE_CONFIGS, ids=[repr(c)[:40] for c in HOSTILE_CONFIGS])
def test_worker_refuses_configs_with_the_text_execute_answers(server: Server, config: Any) -> None:
    """The real server's 400 for this config, word for word, is the worker's refusal."""
    answer = server.http.post(server.url + "execute/", files={"config": (None, json.dumps(config))})
    assert answer.status_code == 400
    with pytest.raises(jobs.BadJob) as refused:
        jobs.job_from_json(json.dumps(a_job(config=config)))
    assert str(refused.value) == answer.text
    assert protocol.validate_config(config) == (False, answer.text)


# -- the events --------------------------------------------------------------------------------


def test_events_round_trip_through_a_real_stream(client: redis.Redis) -> None:
    job = new_job()
    sent = [
        jobs.claimed(job, "worker-a"),
        jobs.queue(job, 3),
        jobs.chunk(job, "stdout", "héllo\n"),
        jobs.stdin_wanted(job, "name? "),
        jobs.error(job, 404, f"No environment with UUID '{uuid.uuid4()}' found"),
        jobs.final(job, {"status": 0, "execution": [], "total_time": 0.01}),
    ]
    inbox = keys.inbox_key("front-events")
    for event in sent:
        client.xadd(inbox, jobs.encode_event(event), maxlen=keys.INBOX_MAXLEN)
    entries = client.xread({inbox: "0"}, count=100)[0][1]
    assert [jobs.decode_event(fields) for _, fields in entries] == sent
    control = keys.control_key("worker-a")
    orders = [
        jobs.Event(job, "stdin", {"text": "ada\n"}),
        jobs.Event(job, "eof", {}),
        jobs.Event(job, "stop", {}),
        jobs.Event(job, "cancel", {}),
    ]
    for event in orders:
        client.xadd(control, jobs.encode_event(event, control=True))
    entries = client.xread({control: "0"}, count=100)[0][1]
    assert [jobs.decode_event(fields, control=True) for _, fields in entries] == orders


HUGE_FINAL = json.dumps({"status": 0, "x": "y" * (17 * 1024**2)})
A_JOB = "a" * 32
HOSTILE_EVENTS: list[tuple[str, dict[Any, Any], str]] = [
    ("extra field", {"job": "a" * 32, "kind": "queue", "data": '{"ahead":1}', "x": ""}, "fields"),
    ("no data", {"job": "a" * 32, "kind": "queue"}, "fields"),
    ("junk job", {"job": "../x", "kind": "queue", "data": '{"ahead":1}'}, "names no job"),
    ("unknown kind", {"job": "a" * 32, "kind": "exec", "data": "{}"}, "Unknown event kind"),
    ("not json", {"job": "a" * 32, "kind": "final", "data": "{"}, "not valid JSON"),
    ("data a list", {"job": "a" * 32, "kind": "final", "data": "[]"}, "not an object"),
    ("final no status", {"job": "a" * 32, "kind": "final", "data": "{}"}, "'status'"),
    (
        "final bool status",
        {"job": "a" * 32, "kind": "final", "data": '{"status":true}'},
        "'status'",
    ),
    (
        "error 200",
        {"job": "a" * 32, "kind": "error", "data": '{"status":200,"text":"ok"}'},
        "not an HTTP error status",
    ),
    (
        "error no text",
        {"job": "a" * 32, "kind": "error", "data": '{"status":500}'},
        "its fields are",
    ),
    ("queue negative", {"job": "a" * 32, "kind": "queue", "data": '{"ahead":-1}'}, "'ahead'"),
    (
        "queue float",
        {"job": "a" * 32, "kind": "queue", "data": '{"ahead":1.0}'},
        "not a whole number",
    ),
    (
        "stream to stdin",
        {"job": "a" * 32, "kind": "stream", "data": '{"stream":"stdin","text":""}'},
        "not 'stdout' or 'stderr'",
    ),
    (
        "claimed by a front",
        {"job": "a" * 32, "kind": "claimed", "data": '{"worker":"front:gave-up"}'},
        "not a worker or front name",
    ),
    ("nan", {"job": "a" * 32, "kind": "queue", "data": '{"ahead":NaN}'}, "NaN"),
    ("bytes", {b"job": b"\xff" * 32, b"kind": b"queue", b"data": b"{}"}, "not UTF-8"),
    (
        "deep",
        {"job": "a" * 32, "kind": "final", "data": '{"status":0,"x":' + "[" * 70 + "]" * 70 + "}"},
        "nested deeper",
    ),
    (
        "huge",
        {
            "job": "a" * 32,
            "kind": "final",
            "data": HUGE_FINAL,
        },
        "more than",
    ),
]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [(fields, expected) for _, fields, expected in HOSTILE_EVENTS],
    ids=[name for name, _, _ in HOSTILE_EVENTS],
)
def test_hostile_events_are_refused(fields: dict[Any, Any], expected: str) -> None:
    with pytest.raises(jobs.BadEvent) as refused:
        jobs.decode_event(fields)
    assert expected in str(refused.value)
    assert len(str(refused.value)) < 600


def test_reply_and_control_vocabularies_are_apart() -> None:
    job = new_job()
    with pytest.raises(jobs.BadEvent, match="Unknown event kind 'cancel'"):
        jobs.decode_event(jobs.encode_event(jobs.Event(job, "cancel", {}), control=True))
    with pytest.raises(jobs.BadEvent, match="Unknown event kind 'final'"):
        jobs.encode_event(jobs.final(job, {"status": 0}), control=True)
    with pytest.raises(jobs.BadEvent, match=r"stdin event .* malformed"):
        jobs.decode_event(jobs.encode_event(jobs.stdin_wanted(job, "?")), control=True)
    with pytest.raises(jobs.BadEvent, match="malformed"):
        jobs.encode_event(jobs.Event(job, "stop", {"now": True}), control=True)


# -- the --cluster URL and authentication ------------------------------------------------------

GOOD_URLS: list[tuple[str, RedisTarget]] = [
    (
        "redis://:pw@127.0.0.1:6390/0",
        RedisTarget("redis", "127.0.0.1", 6390, 0, None, "pw"),
    ),
    (
        "redis://sk:s3cret@redis.internal:6379/2",
        RedisTarget("redis", "redis.internal", 6379, 2, "sk", "s3cret"),
    ),
    ("rediss://sk:pw@h/", RedisTarget("rediss", "h", 6379, 0, "sk", "pw")),
    ("REDIS://:pw@h", RedisTarget("redis", "h", 6379, 0, None, "pw")),
    ("redis://:pw@[::1]:7000/3", RedisTarget("redis", "::1", 7000, 3, None, "pw")),
    ("redis://:p%40ss%2Fw%3Ard@h:1/0", RedisTarget("redis", "h", 1, 0, None, "p@ss/w:rd")),
    ("redis://:p@ss/word@h:1/0", RedisTarget("redis", "h", 1, 0, None, "p@ss/word")),
]


@pytest.mark.parametrize(("url", "target"), GOOD_URLS, ids=[url for url, _ in GOOD_URLS])
def test_cluster_urls_are_parsed(url: str, target: RedisTarget) -> None:
    parsed = parse_redis_url(url)
    assert parsed == target
    assert parse_redis_url(parsed.secret_url()) == parsed
    for shown in (repr(parsed), str(parsed), parsed.masked, f"{parsed}", repr([parsed])):
        assert target.password not in shown.replace("***", "")
        assert ":***@" in shown
    assert parsed.tls == (target.scheme == "rediss")


BAD_URLS: list[tuple[str, str]] = [
    ("redis://127.0.0.1:6379/0", "has no password"),
    ("redis://sk@127.0.0.1:6379/0", "has no password"),
    ("redis://:@127.0.0.1:6379/0", "has no password"),
    ("redis://sk:@127.0.0.1:6379/0", "has no password"),
    ("http://:hunter2@h:6379/0", "must start with redis:// or rediss://"),
    ("unix://:hunter2@/run/redis.sock", "must start with redis://"),
    ("hunter2@h:6379", "must start with redis://"),
    ("redis://:hunter2@h:6379/0?ssl_cert_reqs=none", "options after '?'"),
    ("redis://:hunter2@h:0/0", "invalid port"),
    ("redis://:hunter2@h:70000/0", "invalid port"),
    ("redis://:hunter2@h:http/0", "invalid port"),
    ("redis://:hunter2@h:6379/x", "names the database"),
    ("redis://:hunter2@h:6379/-1", "names the database"),
    ("redis://:hunter2@:6379/0", "no valid host"),
    ("redis://:hunter2@h h:6379/0", "no valid host"),
    ("redis://:hunt/er2@:6379/0", "no valid host"),
]


@pytest.mark.parametrize(("url", "expected"), BAD_URLS, ids=[url for url, _ in BAD_URLS])
def test_unusable_cluster_urls_are_refused_without_showing_the_password(
    url: str, expected: str
) -> None:
    with pytest.raises(ClusterURLError) as refused:
        parse_redis_url(url)
    message = str(refused.value)
    assert expected in message
    assert "redis://[USER:]PASSWORD@HOST:PORT/DB" in message, "no hint of the right form"
    for secret in ("hunter2", "hunt/er2"):
        assert secret not in message


def test_a_client_without_the_password_is_refused_by_redis(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    open_client = redis.Redis(
        host="127.0.0.1",
        port=redis_server.port,
        socket_connect_timeout=2,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
    )
    with pytest.raises(redis.AuthenticationError):
        open_client.ping()
    open_client.close()
    # A raw RESP2 connection, as a student's script would open: every command refused.
    job = new_job()
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as raw:
        raw.sendall(f"SET {keys.claim_key(job)} intruder\r\nPING\r\n".encode())
        answer = b""
        while answer.count(b"\r\n") < 2:
            answer += raw.recv(4096) or b"\r\n\r\n"
    assert answer.startswith(b"-NOAUTH"), answer
    assert client.get(keys.claim_key(job)) is None


def test_a_wrong_password_is_said_without_it(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    wrong = RedisTarget("redis", "127.0.0.1", redis_server.port, 0, None, "hunter2-wrong")
    connection = wrong.client()
    with pytest.raises(ClusterUnreachable) as refused:
        check(wrong, connection)
    connection.close()
    message = str(refused.value)
    assert f"127.0.0.1:{redis_server.port} refused the login" in message
    assert "check the user and password in --cluster" in message
    for shown in (message, repr(connection), repr(connection.connection_pool), caplog.text):
        assert "hunter2" not in shown
        assert redis_server.password not in shown


def test_an_unreachable_redis_is_said_with_what_to_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ..helpers import free_port

    caplog.set_level("DEBUG")
    target = parse_redis_url(f"redis://:hunter2@127.0.0.1:{free_port()}/0")

    async def main() -> str:
        connection = target.async_client()
        try:
            with pytest.raises(ClusterUnreachable) as refused:
                await check_async(target, connection)
            return str(refused.value)
        finally:
            await connection.aclose()

    message = asyncio.run(main())
    assert "Redis cannot be reached at 127.0.0.1:" in message
    assert "check that redis-server runs there" in message
    assert "hunter2" not in message and "hunter2" not in caplog.text


def test_an_acl_user_logs_in_and_others_do_not(redis_acl_server: RedisServer) -> None:
    target = parse_redis_url(redis_acl_server.url)
    assert target.username == "sk"
    connection = target.client()
    check(target, connection)
    assert connection.acl_whoami() in ("sk", b"sk")
    assert keys.claim(connection, new_job(), "worker-acl")
    connection.close()
    for user, password in ((None, redis_acl_server.password), ("other", "x"), ("sk", "wrong")):
        intruder = RedisTarget("redis", "127.0.0.1", redis_acl_server.port, 0, user, password)
        connection = intruder.client()
        with pytest.raises(ClusterUnreachable, match="refused the login"):
            check(intruder, connection)
        connection.close()


def test_figures() -> None:
    """Print what this module measured (run with -s to see it)."""
    for name, value in FIGURES.items():
        print(f"{name}: {value}")
