"""A front with real workers: routing, fallback without double runs, the queue, failover,
a Redis restart and cluster-wide caps (design B7, B10), each on a cluster of its own. Streaming
through a front and a client that goes away run on the shared cluster of
``test_front_clients.py``; more failures are in ``test_front_failures.py``.

Everything is a real process: redis-server, moto, ``sandbox-kernel worker`` and ``sandbox-kernel
serve --cluster``; requests go over HTTP (``requests``, shaped as PremierLangage's clients send
them) and WebSockets (``aiohttp``). Which worker ran a job comes from the workers' logs
(``job <id> ran on <name>``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import requests

from sandbox_kernel import protocol

from ..helpers import wait_until
from .conftest import CountingProxy
from .processes import ClusterPlace, Front, Worker, WorkerStarter, saved

StartWorker = WorkerStarter
StartFront = Callable[..., Front]


def post(front: Front, config: dict[str, Any], timeout: float) -> requests.Response:
    """``execute/`` as PremierLangage's client sends it, with this client-side timeout."""
    files = {"config": (None, json.dumps(config))}
    return front.http.post(front.url + "execute/", files=files, timeout=timeout)


def ran(workers: list[Worker]) -> list[int]:
    return [worker.jobs_ran() for worker in workers]


def claims(place: ClusterPlace) -> list[str]:
    client = place.redis_client()
    try:
        return [value.decode() for key in client.keys("sk:claim:*") if (value := client.get(key))]
    finally:
        client.close()


def in_background(call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


# -- routing and fallback --------------------------------------------------------------------------


def test_a_sessions_cells_stay_on_the_worker_holding_its_environment(
    start_worker: StartWorker, start_front: StartFront, counting_proxy: CountingProxy
) -> None:
    proxy = ["--s3-endpoint", counting_proxy.url]
    workers = start_worker.many("w1", "w2", args=tuple(proxy))
    front = start_front()
    environment = saved(front, ["echo 0 >> log"])
    holder = next(w for w in workers if w.jobs_ran() == 1)
    counting_proxy.reset()
    for cell in range(1, 6):
        environment = saved(front, [f"echo {cell} >> log"], environment)
    assert holder.jobs_ran() == 6, [w.log_text()[-1500:] for w in workers]
    assert sum(ran(workers)) == 6
    assert counting_proxy.count("GET blob") == 0  # never downloaded: it was there
    assert counting_proxy.count("GET manifest") == 0
    final = front.post_execute({"commands": ["cat log"], "environment": environment}).json()
    assert final["execution"][0]["stdout"] == "0\n1\n2\n3\n4\n5"


def test_a_busy_preferred_worker_falls_back_elsewhere_without_double_runs(
    start_worker: StartWorker, start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    workers = start_worker.many("w1", "w2")
    front = start_front()
    environment = saved(front, ["echo start >> log"])
    holder = next(w for w in workers if w.jobs_ran() == 1)
    other = next(w for w in workers if w is not holder)
    sleepers = [
        in_background(
            lambda: front.post_execute({"commands": ["sleep 3"], "environment": environment})
        )
        for _ in range(2)
    ]
    assert wait_until(lambda: len(claims(cluster_place)) >= 3, timeout=10)  # both sleep
    started = time.monotonic()
    newer = saved(front, ["echo run >> log"], environment)  # the holder is full
    took = time.monotonic() - started
    assert took < 2.5, f"the fallback took {took:.2f} s (affinity wait 0.1 s)"
    assert other.jobs_ran() == 1  # the cell ran there (the holder logs its sleeps at their end)
    for sleeper in sleepers:
        assert sleeper.result(timeout=30).status_code == 200
    assert holder.jobs_ran() == 3
    time.sleep(1.0)  # the holder, free again, meets the stale copy and drops it at the claim
    log = front.post_execute({"commands": ["cat log"], "environment": newer}).json()
    assert log["execution"][0]["stdout"] == "start\nrun"
    assert holder.jobs_ran() + other.jobs_ran() == 5  # start, 2 sleeps, run, cat: once each


# -- the queue -------------------------------------------------------------------------------------


def test_a_full_cluster_queues_a_plain_execute_instead_of_503(
    start_worker: StartWorker, start_front: StartFront
) -> None:
    start_worker("w1", workers=1)
    front = start_front()
    busy = in_background(lambda: front.post_execute({"commands": ["sleep 2"]}))
    time.sleep(0.5)
    started = time.monotonic()
    answer = front.post_execute({"commands": ["echo after"]})
    assert answer.status_code == 200, answer.text  # one server would have said 503 at 2 s
    assert answer.json()["execution"][0]["stdout"] == "after"
    assert 0.8 < time.monotonic() - started < 15
    assert busy.result(timeout=30).status_code == 200


def test_past_queue_wait_the_answer_is_503_and_the_cell_never_runs(
    start_worker: StartWorker, start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    worker = start_worker("w1", workers=1)
    front = start_front("--queue-wait", "1")
    environment = saved(front, ["echo start >> log"])
    busy = in_background(lambda: front.post_execute({"commands": ["sleep 3"]}))
    assert wait_until(lambda: len(claims(cluster_place)) >= 2, timeout=10)
    started = time.monotonic()
    answer = front.post_execute(
        {"commands": ["echo late >> log"], "environment": environment, "save": True}
    )
    assert answer.status_code == 503
    assert answer.text == protocol.OVERLOADED_TEXT
    assert time.monotonic() - started < 5
    assert busy.result(timeout=30).status_code == 200
    time.sleep(1.5)  # the worker is free: the given-up message is met and dropped
    assert "front:gave-up" in claims(cluster_place)
    assert worker.jobs_ran() == 2  # start and sleep
    log = front.post_execute({"commands": ["cat log"], "environment": environment}).json()
    assert log["execution"][0]["stdout"] == "start"


async def _queue_frames(front: Front, config: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    headers = {"Authorization": f"Bearer {front.token}"}
    url = front.url + "execute/stream/?" + protocol.QUEUE_EVENTS_QUERY
    queue: list[int] = []
    async with aiohttp.ClientSession(headers=headers) as http, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps(config))
        await ws.send_bytes(b"")
        async for message in ws:
            frame = json.loads(message.data)
            if protocol.QUEUE_FIELD in frame:
                queue.append(frame[protocol.QUEUE_FIELD])
            elif "status" in frame or "error" in frame:
                return queue, frame
    raise AssertionError("no final frame")


def test_streamed_runs_that_asked_get_their_place_in_the_queue(
    start_worker: StartWorker, start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    start_worker("w1", workers=1)
    front = start_front()
    first = in_background(lambda: front.post_execute({"commands": ["sleep 1.5"]}))
    assert wait_until(lambda: len(claims(cluster_place)) >= 1, timeout=10)
    waiting = []
    for _ in range(2):
        waiting.append(in_background(lambda: front.post_execute({"commands": ["sleep 1.5"]})))
        time.sleep(0.2)
    places, final = asyncio.run(_queue_frames(front, {"commands": ["echo mine"]}))
    assert final["status"] == 0, final
    assert places == [2, 1, 0], places
    assert first.result(timeout=30).status_code == 200
    assert all(w.result(timeout=30).status_code == 200 for w in waiting)
    # Without ?events=queue, a client gets no queue frame (older clients refuse them).
    headers = {"Authorization": f"Bearer {front.token}"}

    async def plain() -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.ws_connect(front.url + "execute/stream/") as ws,
        ):
            await ws.send_str(json.dumps({"commands": ["echo x"]}))
            await ws.send_bytes(b"")
            return [json.loads(m.data) async for m in ws]

    busy = in_background(lambda: front.post_execute({"commands": ["sleep 1.2"]}))
    time.sleep(0.3)
    frames = asyncio.run(plain())
    assert not any(protocol.QUEUE_FIELD in f for f in frames) and frames[-1]["status"] == 0
    busy.result(timeout=30)


# -- failover --------------------------------------------------------------------------------------


def test_a_killed_worker_gives_502_and_the_session_goes_on_elsewhere(
    start_worker: StartWorker, start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    workers = start_worker.many("w1", "w2")
    front = start_front()
    environment = saved(front, ["echo kept >> log"])
    holder = next(w for w in workers if w.jobs_ran() == 1)
    other = next(w for w in workers if w is not holder)
    running = in_background(
        lambda: front.post_execute(
            {"commands": ["sleep 5; echo lost >> log"], "environment": environment, "save": True}
        )
    )
    assert wait_until(lambda: len(claims(cluster_place)) >= 2, timeout=10)
    killed_at = time.monotonic()
    holder.kill(signal.SIGKILL)
    answer = running.result(timeout=30)
    took = time.monotonic() - killed_at
    assert answer.status_code == protocol.CLUSTER_LOST_STATUS
    assert answer.text == protocol.CLUSTER_LOST_TEXT
    assert took < 4, f"the 502 came {took:.2f} s after the kill"
    started = time.monotonic()
    after = front.post_execute({"commands": ["cat log"], "environment": environment})
    assert after.status_code == 200, after.text
    assert after.json()["execution"][0]["stdout"] == "kept"
    assert time.monotonic() - started < 5
    assert other.jobs_ran() == 1
    elsewhere = time.monotonic() - started
    print(f"\n502 {took:.2f} s after kill -9; next cell elsewhere in {elsewhere:.2f} s")


def test_a_redis_restart_loses_runs_in_flight_and_new_cells_work_within_5_s(
    start_worker: StartWorker, start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    start_worker("w1")
    front = start_front()
    assert front.post_execute({"commands": ["true"]}).status_code == 200
    running = in_background(lambda: front.post_execute({"commands": ["sleep 3"]}))
    assert wait_until(lambda: len(claims(cluster_place)) >= 2, timeout=10)
    cluster_place.redis.restart()
    back = time.monotonic()
    lost = running.result(timeout=30)
    assert lost.status_code == protocol.CLUSTER_LOST_STATUS, lost.text
    assert lost.text == protocol.CLUSTER_LOST_TEXT
    first_success = None
    statuses: list[int | str] = []
    while time.monotonic() - back < 20:
        try:
            answer = post(front, {"commands": ["echo again"]}, timeout=10)
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                first_success = time.monotonic() - back
                break
        except requests.RequestException as error:
            statuses.append(type(error).__name__)
        time.sleep(0.1)
    assert first_success is not None, statuses
    print(f"\nfirst success {first_success:.2f} s after Redis was back ({statuses})")
    assert first_success < 5, statuses
    specs = front.get("specifications/").json()
    assert specs[protocol.CLUSTER_FIELD] == {"workers": 1, "slots": 2}


# -- caps ------------------------------------------------------------------------------------------


def test_max_storage_counts_saves_on_every_worker(
    start_worker: StartWorker, start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    caps = ["--max-storage", "150K"]
    workers = start_worker.many("w1", "w2", args=tuple(caps), workers=1)
    front = start_front(*caps)
    write = "head -c 60000 /dev/urandom > f; sleep 1"
    both = [
        in_background(lambda: front.post_execute({"commands": [write], "save": True}))
        for _ in range(2)
    ]
    assert all(b.result(timeout=60).status_code == 200 for b in both)
    assert ran(workers) == [1, 1]  # one save on each
    refused = front.post_execute({"commands": [write], "save": True})
    assert refused.status_code == 507, refused.text
    assert "cluster" in refused.text
