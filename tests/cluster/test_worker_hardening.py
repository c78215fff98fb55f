"""The worker's and the sweeper's hardening (issue 14 review: M1, M5, M6, M7, M9, M10, L5, L9).

Real parts: a real ``redis-server`` (``redis_server``, ``running_redis``), moto in server mode
(``cluster_place``, ``bucket``), and real worker and front processes (``processes``). The one
fault no real worker produces on demand, its event loop dying, is injected into a real worker
process by a small driver that stops the loop from inside (:data:`_LOOP_KILLER`).
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
import urllib.parse
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from sandbox_kernel.server.cluster import jobs, keys, manifests
from sandbox_kernel.server.cluster.liveness import Heartbeat, Liveness, WorkerState
from sandbox_kernel.server.cluster.objects import ObjectStore
from sandbox_kernel.server.cluster.settings import parse_redis_url
from sandbox_kernel.server.cluster.sweeper import Sweeper
from sandbox_kernel.server.cluster.worker import LOOP_DIED_STATUS, default_name
from sandbox_kernel.server.settings import ServerSettings

from ..helpers import wait_until
from .conftest import CountingProxy
from .environments import LocalStorage, fill_environment
from .processes import ClusterPlace, Processes, Worker
from .redis_fixture import RedisServer, running_redis

# -- M1: a forged heartbeat never raises -----------------------------------------------------------

_GOOD = {"slots": 2, "busy": 0, "jobs": [], "started": 1.0}


def _forged(**changes: Any) -> str:
    return json.dumps({**_GOOD, **changes})


FORGED_HEARTBEATS = {
    "a huge int as start (float overflows)": _forged(started=10**400),
    "an int past Python's digit limit": '{"slots": 2, "busy": 0, "jobs": [], "started": '
    + "9" * 5000
    + "}",
    "a start of 1e400 (infinite)": _forged().replace('"started": 1.0', '"started": 1e400'),
    "isolation nested 100000 deep": '{"slots": 2, "busy": 0, "jobs": [], "started": 1.0, '
    + '"isolation": '
    + "[" * 100_000
    + "]" * 100_000
    + "}",
    "jobs nested 100000 deep": '{"slots": 2, "busy": 0, "jobs": '
    + "[" * 100_000
    + "]" * 100_000
    + ', "started": 1.0}',
    "an object nested 100000 deep": '{"a": ' * 100_000 + "1" + "}" * 100_000,
    "a huge int as slots count in a list": _forged(slots=[10**400]),
    "jobs as a huge string": _forged(jobs="x" * 1_000_000),
    "not UTF-8": b'{"slots": 2, "\xff\xfe": 1}',
    "a list, not an object": "[1, 2, 3]",
}


@pytest.mark.parametrize("raw", FORGED_HEARTBEATS.values(), ids=FORGED_HEARTBEATS.keys())
def test_a_forged_heartbeat_is_ignored_never_raised(raw: str | bytes) -> None:
    assert WorkerState.from_json("forged", raw) is None


def test_a_front_reading_forged_heartbeats_keeps_the_real_workers(
    redis_server: RedisServer,
) -> None:
    """What a front's watcher does every 250 ms: a forged key among real ones is skipped."""
    import asyncio

    import redis.asyncio

    client = redis_server.client()
    client.flushall()
    real = Heartbeat(client, "real-worker", 2)
    real.beat()
    for index, raw in enumerate(FORGED_HEARTBEATS.values()):
        name = f"forged-{index}"
        client.sadd(keys.WORKERS, name)
        client.set(keys.worker_key(name), raw, px=60_000)

    async def read() -> dict[str, WorkerState]:
        reader = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            return await Liveness(reader).alive_workers()
        finally:
            await reader.aclose()

    try:
        assert list(asyncio.run(read())) == ["real-worker"]
    finally:
        client.close()


# -- M5: a worker whose loop died stops ------------------------------------------------------------

#: Runs a real worker (the arguments of ``sandbox-kernel worker``) and, LOOP_DIES_AFTER
#: seconds after its heartbeat started, stops its event loop from inside: what a bug that
#: escapes every handler would do.
_LOOP_KILLER = """
import os, sys, threading, time
from sandbox_kernel.server.cluster import worker as module

original_run = module.ClusterWorker.run

def run(self):
    def kill_the_loop():
        while self.heartbeat._thread is None:
            time.sleep(0.02)
        time.sleep(float(os.environ["LOOP_DIES_AFTER"]))
        print("test: stopping the worker's event loop", flush=True)
        self.loop._loop.call_soon_threadsafe(self.loop._loop.stop)
    threading.Thread(target=kill_the_loop, daemon=True).start()
    return original_run(self)

module.ClusterWorker.run = run
sys.exit(module.main(sys.argv[1:]))
"""


def _dying_worker(processes: Processes, name: str, after: float) -> Worker:
    place = processes.place
    data_dir = processes.root / f"worker-{name}"
    argv = [
        sys.executable,
        "-c",
        _LOOP_KILLER,
        *place.cluster_args(),
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--workers",
        "2",
    ]
    env = {**place.environment(), "LOOP_DIES_AFTER": str(after)}
    worker = Worker(name, argv, processes.root / f"worker-{name}.log", env, data_dir)
    processes.started.append(worker)
    processes.wait_worker(worker)
    return worker


def test_a_worker_whose_loop_died_stops_beating_and_exits(
    processes: Processes, cluster_place: ClusterPlace
) -> None:
    healthy = processes.start_worker("healthy")
    dying = _dying_worker(processes, "dying", after=1.0)
    front = processes.start_front()
    client = cluster_place.redis_client()
    try:
        assert wait_until(lambda: not dying.alive(), timeout=60), (
            "the worker whose loop died still runs:\n" + dying.log_text()[-3000:]
        )
        assert dying.process.returncode == LOOP_DIED_STATUS, dying.log_text()[-3000:]
        assert "its event loop died" in dying.log_text()
        assert not client.exists(keys.worker_key("dying"))
        for index in range(6):  # none is taken and dropped by the dead worker
            answer = front.post_execute({"commands": [f"echo cell-{index}"]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["execution"][0]["stdout"].strip() == f"cell-{index}"
        assert healthy.jobs_ran() == 6
    finally:
        client.close()


# -- M6: a cancel during the base's fetch never pins it for ever -----------------------------------


def test_a_cancel_during_the_fetch_of_the_base_leaves_it_evictable(
    processes: Processes,
    cluster_place: ClusterPlace,
    counting_proxy: CountingProxy,
    tmp_path: Path,
) -> None:
    """The worker fetches a run's base through a proxy that holds the blob; the client goes
    away (the front cancels the job); the fetch ends later. With ``--cache-size 1`` the next
    save evicts every environment no run uses: the base must go too, not stay pinned."""
    store = ObjectStore.from_url(cluster_place.storage_url, endpoint=cluster_place.s3_url)
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "data.bin").write_bytes(os.urandom(256 * 1024))
    base = str(uuid_module.uuid4())
    manifests.publish(folder, base, None, store, expire=time.time() + 3600)
    worker = processes.start_worker(
        "fetcher", "--s3-endpoint", counting_proxy.url, "--cache-size", "1", workers=1
    )
    front = processes.start_front()
    counting_proxy.hold_next("GET blob")
    request = requests.Request(
        "POST",
        front.url + "execute/",
        headers={"Authorization": f"Bearer {front.token}"},
        files={"config": (None, json.dumps({"commands": ["true"], "environment": base}))},
    ).prepare()
    address = urllib.parse.urlsplit(front.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request("POST", "/execute/", body=request.body, headers=request.headers)
        assert counting_proxy.held.wait(30), "the worker never fetched the base's blob"
    finally:
        connection.close()  # the client goes away mid-fetch: the front cancels the job
    assert wait_until(lambda: "cancelled by its front" in worker.log_text(), timeout=30), (
        worker.log_text()[-3000:]
    )
    counting_proxy.release()  # the held GET is dropped; the fetch retries and ends
    fetched = f"environment {base} fetched from the bucket"
    assert wait_until(lambda: fetched in worker.log_text(), timeout=60), worker.log_text()[-3000:]
    cached = worker.data_dir / "manifests" / f"{base}.json"
    assert cached.exists()  # kept while the fetch held the pin
    answer = front.post_execute({"commands": ["echo later > f"], "save": True})
    assert answer.status_code == 200, answer.text
    assert wait_until(lambda: not cached.exists(), timeout=10), (
        "the base of a cancelled job stays pinned in the cache for ever"
    )


# -- M7: blobs of a just-expired environment survive for a save reusing them -----------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalStorage]:
    storage = LocalStorage(tmp_path / "worker-a")
    yield storage
    storage.close()


def _sweeper(place: ClusterPlace, store: ObjectStore, grace: float) -> Sweeper:
    settings = ServerSettings(cluster=place.redis.url, storage=place.storage_url)
    return Sweeper(store, parse_redis_url(place.redis.url), settings, "sweeper", grace=grace)


def test_a_save_over_an_environment_that_just_expired_is_never_damaged(
    cluster_place: ClusterPlace, local: LocalStorage, tmp_path: Path
) -> None:
    """A run starts over environment A while A is alive; A expires during the run; a sweep
    runs; the run's save publishes B, which reuses A's blobs without uploading them (they are
    its base's). B must come back whole, and A's blobs go only once no manifest names them."""
    store = ObjectStore.from_url(cluster_place.storage_url, endpoint=cluster_place.s3_url)
    start = time.time()
    uuid_a, _, saved_a = local.save_new(fill_environment)
    first = manifests.publish(saved_a, uuid_a, None, store, expire=start + 70)
    grace = 60.0
    sweeper = _sweeper(cluster_place, store, grace)
    try:
        # 100 s later: A expired 30 s ago, its blobs are 100 s old (past the grace).
        report = sweeper.sweep_locked(now=start + 100)
        assert report.blobs_deleted == 0, "the blobs of a just-expired environment went"
        uuid_b, _, saved_b = local.save_from(saved_a, lambda work: None)
        second = manifests.publish(
            saved_b, uuid_b, first.manifest, store, expire=start + 3600, base_directory=saved_a
        )
        assert second.uploaded == 0  # every blob reused from the base: the race's shape
        # Later: A expired 70 s ago (past the grace) and goes; B keeps the blobs it names.
        report = sweeper.sweep_locked(now=start + 140)
        assert report.expired == 1 and store.get_manifest(uuid_a) is None
        back = manifests.read_manifest(store, uuid_b)
        assert back is not None
        missing = [digest for digest in back.digests() if not store.has_blob(digest)]
        assert not missing, f"environment {uuid_b} lost {len(missing)} blobs to the sweep"
        again = tmp_path / "again"
        manifests.materialise(back, store, again, tmp_path / "blobs")
        assert (again / "src" / "main.c").read_text() == "int main(void) { return 0; }\n"
    finally:
        sweeper.close()


def test_blobs_no_manifest_names_still_go_after_the_grace(
    cluster_place: ClusterPlace, local: LocalStorage
) -> None:
    store = ObjectStore.from_url(cluster_place.storage_url, endpoint=cluster_place.s3_url)
    start = time.time()
    uuid_a, _, saved_a = local.save_new(fill_environment)
    manifests.publish(saved_a, uuid_a, None, store, expire=start + 10)
    blobs = len(list(store.list_blobs()))
    sweeper = _sweeper(cluster_place, store, 60.0)
    try:
        report = sweeper.sweep_locked(now=start + 100)  # expired 90 s ago: past the grace
        assert report.expired == 1 and report.blobs_deleted == blobs > 0
        assert list(store.list_blobs()) == [] and list(store.list_manifests()) == []
    finally:
        sweeper.close()


# -- M9: a slow registration never holds a beat back -----------------------------------------------


def test_a_slow_on_join_never_holds_the_heartbeat_back(tmp_path: Path) -> None:
    slow = threading.Event()
    joins: list[float] = []

    def join() -> None:
        joins.append(time.monotonic())
        if slow.is_set():
            time.sleep(3.0)  # a registration of thousands of environments, a slow Redis

    with running_redis(tmp_path) as server:
        client = parse_redis_url(server.url).client(socket_timeout=0.5)
        beat = Heartbeat(client, "slow-joiner", slots=1, on_join=join)
        beat.start()
        try:
            slow.set()
            client.srem(keys.WORKERS, "slow-joiner")  # a front pruned it: the next beat joins
            assert wait_until(lambda: len(joins) == 2, timeout=5), "no join"
            beats = beat.beats
            time.sleep(2.0)  # the join sleeps meanwhile
            assert beat.beats - beats >= 4, "beats stopped while on_join ran"
            assert beat.longest_gap < 1.0, f"a beat waited {beat.longest_gap:.2f} s"
            assert client.exists(keys.worker_key("slow-joiner"))
        finally:
            beat.stop()
            client.close()


# -- M10: keys of dead names go; names are unique ------------------------------------------------


def _leave_keys(client: redis.Redis, name: str) -> None:
    client.rpush(keys.worker_queue(name), "a message for a worker that will never come")
    client.rpush(keys.worker_queue(name) + "\x06\x163", "a priority message")
    client.xadd(keys.control_key(name), {"job": "0" * 32, "kind": "stop", "data": "{}"})
    client.xadd(keys.inbox_key(name), {"job": "0" * 32, "kind": "queue", "data": "{}"})
    client.sadd(keys.WORKERS, name)


def test_the_sweeper_deletes_the_keys_of_names_gone_for_ten_minutes(
    cluster_place: ClusterPlace,
) -> None:
    store = ObjectStore.from_url(cluster_place.storage_url, endpoint=cluster_place.s3_url)
    client = cluster_place.redis_client()
    now = time.time()
    for name, seen in (("gone-long", now - 700), ("gone-lately", now - 60), ("beats", now - 700)):
        _leave_keys(client, name)
        client.hset(keys.SEEN, name, str(seen))
    client.set(keys.worker_key("beats"), "{}", px=60_000)  # its clock is off, but it beats
    client.hset(keys.SEEN, "junk:name with spaces", "0")
    sweeper = _sweeper(cluster_place, store, 60.0)
    try:
        assert sweeper.sweep_locked(now=now).names_forgotten == 1
        assert not any(client.exists(key) for key in keys.keys_of_name("gone-long"))
        assert not client.sismember(keys.WORKERS, "gone-long")
        for name in ("gone-lately", "beats"):
            assert all(
                client.exists(key)
                for key in (keys.worker_queue(name), keys.control_key(name), keys.inbox_key(name))
            ), name
        assert sorted(client.hkeys(keys.SEEN)) == [b"beats", b"gone-lately"]
    finally:
        sweeper.close()
        client.close()


def test_a_heartbeat_records_its_time_and_keeps_its_control_stream_expiring(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    client.flushall()
    client.xadd(keys.control_key("beater"), {"job": "0" * 32, "kind": "stop", "data": "{}"})
    try:
        Heartbeat(client, "beater", 1).beat()
        assert abs(float(client.hget(keys.SEEN, "beater")) - time.time()) < 5
        assert 0 < client.ttl(keys.control_key("beater")) <= keys.CONTROL_TTL_S
    finally:
        client.close()


def test_default_names_differ_even_with_the_same_host_and_pid() -> None:
    names = {default_name() for _ in range(50)}
    assert len(names) == 50
    assert all(keys.NAME_RE.fullmatch(name) for name in names)
    assert all(f"-{os.getpid()}-" in name for name in names)


# -- L5: a legal large final passes ---------------------------------------------------------------


def test_a_final_larger_than_the_default_cap_passes_with_the_workers_cap() -> None:
    output = "x" * (jobs.DEFAULT_MAX_EVENT_BYTES + 1024)
    final = jobs.final("a" * 32, {"status": 0, "execution": [{"stdout": output}]})
    with pytest.raises(jobs.BadEvent):
        jobs.encode_event(final)
    cap = jobs.event_cap(32 * 1024**2, 1024**2)
    fields = jobs.encode_event(final, max_bytes=cap)
    assert jobs.decode_event(fields, max_bytes=cap).data == final.data


# -- L9: the quota never goes negative, and reservations survive a recount ------------------------


@pytest.fixture
def quota_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


def test_a_release_never_takes_the_quota_below_zero(quota_client: redis.Redis) -> None:
    keys.init_quota(quota_client, 100, 2)
    assert keys.reserve_quota(quota_client, 50, 1, 1000, 10) == keys.QUOTA_RESERVED
    quota_client.delete(keys.QUOTA)  # a Redis restart lost the count meanwhile
    keys.release_quota(quota_client, 50, 1)
    keys.release_quota(quota_client, 50, 1)  # twice: still not negative
    assert keys.quota_used(quota_client) == (0, 0)
    raw = quota_client.hgetall(keys.QUOTA)
    assert all(int(value) >= 0 for value in raw.values()), raw
    # No count yet: a reservation asks for a recount first.
    assert keys.reserve_quota(quota_client, 1, 1, 1000, 10) == keys.QUOTA_UNCOUNTED


def test_a_recount_keeps_the_reservations_of_saves_in_progress(
    quota_client: redis.Redis,
) -> None:
    keys.init_quota(quota_client, 0, 0)
    assert keys.reserve_quota(quota_client, 600, 3, 1000, 10) == keys.QUOTA_RESERVED
    # The sweeper's recount, from a bucket where the save has not published yet.
    quota_client.hset(keys.QUOTA, mapping={"bytes": 0, "inodes": 0})
    assert keys.reserve_quota(quota_client, 600, 3, 1000, 10) == keys.QUOTA_FULL
    keys.commit_quota(quota_client, 600, 3)  # the save is published
    assert keys.quota_used(quota_client) == (600, 3)
    assert keys.reserve_quota(quota_client, 600, 3, 1000, 10) == keys.QUOTA_FULL
    assert keys.reserve_quota(quota_client, 400, 3, 1000, 10) == keys.QUOTA_RESERVED
    keys.release_quota(quota_client, 400, 3)  # that save failed
    assert keys.quota_used(quota_client) == (600, 3)


def test_a_save_that_fails_after_reserving_gives_the_room_back(
    cluster_place: ClusterPlace, tmp_path: Path
) -> None:
    """A real ClusterStorage whose local save fails after the reservation (its environments
    folder is gone when the save moves the run into it): the reservation is given back."""
    from sandbox_kernel.server.cluster.store import ClusterLink, ClusterStorage
    from sandbox_kernel.server.storage import Snapshot

    store = ObjectStore.from_url(cluster_place.storage_url, endpoint=cluster_place.s3_url)
    client = cluster_place.redis_client()
    settings = ServerSettings(max_storage=10 * 1024**2)
    storage = ClusterStorage(
        settings, tmp_path / "data", ClusterLink(store, client, "quota-worker")
    )
    storage.open(os.geteuid())
    try:
        keys.init_quota(client, 0, 0)
        workdir = storage.new_staging() / "work"
        workdir.mkdir()
        (workdir / "file").write_bytes(b"x" * 4096)
        environments = storage.environments
        storage.environments = tmp_path / "gone"  # the move into place fails (even as root)
        try:
            with pytest.raises(OSError):
                storage.save(workdir, Snapshot())
        finally:
            storage.environments = environments
        assert keys.quota_used(client) == (0, 0), client.hgetall(keys.QUOTA)
        uuid, _ = storage.save(workdir, Snapshot())  # and a save that works is counted
        used, inodes = keys.quota_used(client)
        assert used >= 4096 and inodes >= 2
        assert store.get_manifest(uuid) is not None
    finally:
        storage.close()
        client.close()
