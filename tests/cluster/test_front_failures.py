"""A front with real workers, when things go wrong or arrive late: a worker killed under a
streamed run or in the middle of a save, a Redis restart under cached environments, and a
worker that joins a queue already full (design B4, B7, B10, B12.1).

Each test builds its own cluster (real redis-server, moto, ``sandbox-kernel worker`` and
``sandbox-kernel serve --cluster`` processes), since each breaks it. A worker "killed in the
middle of a save" is killed while a real proxy between it and moto holds its upload (the
blob's or the manifest's), which is then dropped unanswered: nothing of it reaches the bucket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import requests

from sandbox_kernel import protocol
from sandbox_kernel.server.cluster import keys

from ..helpers import wait_until
from .conftest import CountingProxy
from .processes import ClusterPlace, Front, Processes, Worker, saved


def in_background(call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def running_on(place: ClusterPlace, workers: list[Worker]) -> Worker:
    """The worker whose heartbeat lists a running job (exactly one must, within the 0.25 s
    of a beat)."""
    client = place.redis_client()
    busy: list[Worker] = []

    def found() -> bool:
        busy[:] = [
            worker
            for worker in workers
            if json.loads(client.get(keys.worker_key(worker.name)) or "{}").get("jobs")
        ]
        return bool(busy)

    try:
        assert wait_until(found, timeout=10), "no worker says it runs the job"
    finally:
        client.close()
    assert len(busy) == 1, [worker.name for worker in busy]
    return busy[0]


def bucket_manifests(place: ClusterPlace, s3: Any) -> list[str]:
    prefix = f"{place.prefix}/envs/"
    found = s3.list_objects_v2(Bucket=place.bucket, Prefix=prefix).get("Contents", [])
    return sorted(item["Key"].removeprefix(prefix).removesuffix(".json") for item in found)


# -- a worker killed under a streamed run ----------------------------------------------------------


async def _streamed_kill(
    front: Front, place: ClusterPlace, workers: list[Worker]
) -> tuple[list[dict[str, Any]], float, Worker]:
    """A streamed ``sleep 5``; its worker gets ``kill -9`` once the run printed ``up``."""
    headers = {"Authorization": f"Bearer {front.token}"}
    frames: list[dict[str, Any]] = []
    killed_at = 0.0
    victim: Worker | None = None
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.ws_connect(front.url + "execute/stream/") as ws,
    ):
        await ws.send_str(json.dumps({"commands": ["echo up; sleep 5; echo late"]}))
        await ws.send_bytes(b"")
        async for message in ws:
            frames.append(json.loads(message.data))
            if frames[-1].get("text") == "up\n":
                victim = running_on(place, workers)
                victim.kill(signal.SIGKILL)
                killed_at = time.monotonic()
    assert victim is not None, frames
    return frames, time.monotonic() - killed_at, victim


async def _streamed(front: Front, commands: list[str]) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {front.token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.ws_connect(front.url + "execute/stream/") as ws,
    ):
        await ws.send_str(json.dumps({"commands": commands}))
        await ws.send_bytes(b"")
        return [json.loads(message.data) async for message in ws]


def test_a_streamed_run_whose_worker_is_killed_ends_with_the_502_frame(
    processes: Processes, cluster_place: ClusterPlace
) -> None:
    workers = processes.start_workers("w1", "w2")
    front = processes.start_front()
    frames, took, victim = asyncio.run(
        asyncio.wait_for(_streamed_kill(front, cluster_place, workers), 60)
    )
    assert frames[0] == {"stream": "stdout", "text": "up\n"}
    assert frames[-1] == {"error": protocol.CLUSTER_LOST_STATUS, "text": protocol.CLUSTER_LOST_TEXT}
    assert not any(frame.get("text") == "late\n" for frame in frames)
    assert took < 5, f"the 502 frame came {took:.2f} s after the kill"
    print(f"\nstreamed 502 frame {took:.2f} s after kill -9")
    # The next streamed cell runs on the worker left.
    survivor = next(worker for worker in workers if worker is not victim)
    after = asyncio.run(asyncio.wait_for(_streamed(front, ["echo still here"]), 60))
    assert after[-1]["status"] == 0, after
    assert after[-1]["execution"][0]["stdout"] == "still here"
    assert wait_until(lambda: survivor.jobs_ran() == 1)


# -- a worker killed in the middle of a save -------------------------------------------------------


@pytest.mark.parametrize("cut", ["PUT blob", "PUT manifest"])
def test_a_worker_killed_in_the_middle_of_a_save_publishes_nothing(
    processes: Processes,
    cluster_place: ClusterPlace,
    counting_proxy: CountingProxy,
    moto_server: Any,
    cut: str,
) -> None:
    """The commands ran and the worker saved locally; it dies while uploading a 3 MB blob, or
    once the blobs are up but before the manifest is written. The answer is 502 ("it may have
    run"), the bucket holds no manifest of the new environment (404 for its uuid, should
    anyone learn it), and the session's previous environment works on the other worker."""
    through_proxy = ["--s3-endpoint", counting_proxy.url]
    workers = processes.start_workers("w1", "w2", args=tuple(through_proxy))
    front = processes.start_front()
    previous = saved(front, ["echo kept > log"])
    counting_proxy.hold_next(cut)
    command = "head -c 3000000 /dev/urandom > big; echo lost >> log"
    running = in_background(
        lambda: front.post_execute({"commands": [command], "environment": previous, "save": True})
    )
    assert counting_proxy.held.wait(60), f"no {cut} came: {dict(counting_proxy.counts)}"
    victim = running_on(cluster_place, workers)
    victim.kill(signal.SIGKILL)
    answer = running.result(timeout=60)
    counting_proxy.release()
    assert answer.status_code == protocol.CLUSTER_LOST_STATUS, answer.text
    assert answer.text == protocol.CLUSTER_LOST_TEXT
    # The victim saved the new environment locally, under a uuid nobody was told.
    local = victim.data_dir / "environments"
    [new] = [path.name for path in local.iterdir() if path.is_dir() and path.name != previous]
    not_found = f"No environment with UUID '{new}' found"
    for path in (f"environments/{new}/", f"files/{new}/log/", f"files/{new}/big/"):
        served = front.get(path)
        assert (served.status_code, served.text) == (404, not_found), (path, served.text)
    refused = front.post_execute({"commands": ["true"], "environment": new})
    assert (refused.status_code, refused.text) == (404, not_found)
    assert bucket_manifests(cluster_place, moto_server.client()) == [previous]
    # The previous environment is intact, and runs on the other worker.
    survivor = next(worker for worker in workers if worker is not victim)
    after = front.post_execute({"commands": ["cat log; ls"], "environment": previous})
    assert after.status_code == 200, after.text
    assert after.json()["execution"][0]["stdout"] == "kept\nlog"
    assert front.get(f"files/{previous}/log/").content == b"kept\n"
    assert wait_until(lambda: survivor.jobs_ran() >= 1)


# -- a Redis restart under cached environments -----------------------------------------------------


def test_after_a_redis_restart_workers_register_their_environments_again(
    processes: Processes, cluster_place: ClusterPlace
) -> None:
    """Redis restarted empty: every ``sk:env:<uuid>`` routing hint is gone. The heartbeat
    finds its worker new to Redis and registers the environments it holds again, so the
    session's next cells still go where its environment is (no download elsewhere)."""
    workers = processes.start_workers("w1", "w2")
    front = processes.start_front()
    environment = saved(front, ["echo 0 >> log"])
    holder = next(worker for worker in workers if worker.jobs_ran() == 1)
    other = next(worker for worker in workers if worker is not holder)
    hint = keys.env_key(environment)
    client = cluster_place.redis_client()
    try:
        assert client.smembers(hint) == {holder.name.encode()}
        client.set("test:canary", "1")
        cluster_place.redis.restart()
        back = time.monotonic()
        # Nothing survived the restart (the hint itself may be back already: a heartbeat
        # every 0.25 s re-registers it, and the log line below says it was gone).
        assert not client.exists("test:canary")
        assert wait_until(lambda: client.smembers(hint) == {holder.name.encode()}, timeout=10)
        registered = time.monotonic() - back
        ttl = client.ttl(hint)
    finally:
        client.close()
    print(f"\nrouting hint registered again {registered:.2f} s after Redis was back")
    assert registered < 5
    assert 0 < ttl <= 86400 + 1  # ... and it expires with the environment again
    # The log line comes after the hint is written.
    assert wait_until(
        lambda: "registered 1 cached environments in Redis again" in holder.log_text()
    )
    # The front is back too: a cell that carries no environment, until one answers.
    assert wait_until(
        lambda: front.post_execute({"commands": ["true"]}).status_code == 200, timeout=20
    )
    assert wait_until(lambda: front.get("usages/").json()["container"] == 0)
    # Both consumers are back on the engine: a job routed to a worker whose consumer still
    # reconnects goes elsewhere after the affinity wait, rightly. A consumer may reconnect
    # more than once after a restart (its log says "Connected" before a later "Cannot
    # connect"), so the holder is known to consume again once it has run a session's cell.
    for worker in workers:
        assert wait_until(lambda w=worker: w.log_text().count("Connected to redis") >= 2)

    def total() -> int:
        return holder.jobs_ran() + other.jobs_ran()

    ran = total()

    def a_cell_runs_on_the_holder() -> bool:
        nonlocal ran
        before = holder.jobs_ran()
        answer = front.post_execute({"commands": ["cat log"], "environment": environment})
        assert answer.status_code == 200, answer.text
        ran += 1
        return wait_until(lambda: holder.jobs_ran() > before, timeout=1)

    assert wait_until(a_cell_runs_on_the_holder, timeout=20), holder.log_text()[-2000:]
    assert wait_until(lambda: total() == ran)  # every warm-up cell's log line is written
    counts = [holder.jobs_ran(), other.jobs_ran()]
    for cell in range(4):
        answer = front.post_execute(
            {"commands": [f"cat log; echo {cell}"], "environment": environment}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["execution"][0]["stdout"] == f"0\n{cell}"
    assert wait_until(lambda: holder.jobs_ran() == counts[0] + 4), holder.log_text()[-2000:]
    assert other.jobs_ran() == counts[1]
    assert "fetched from the bucket" not in other.log_text()


# -- a worker that joins a full queue (why task_acks_late=True, design B12.1) -------------------


def test_a_worker_that_joins_takes_the_queued_jobs_at_once(
    processes: Processes, cluster_place: ClusterPlace
) -> None:
    """w0 (2 slots) runs 2 of 6 jobs of 5 s, the other 4 wait in the queue; w1 (4 slots)
    starts meanwhile and must take all 4 at once. With Celery's early acks, w0 would have
    reserved 2 more behind its running ones, and they would start only at 5 s, while w1 idles
    (design A2): late acks reserve exactly the running jobs."""
    seconds = 5.0
    w0 = processes.start_worker("w0", workers=2)
    front = processes.start_front()

    def job() -> float:
        answer = front.post_execute({"commands": [f"date +%s.%N; sleep {seconds:g}"]})
        assert answer.status_code == 200, answer.text
        return float(answer.json()["execution"][0]["stdout"])

    runs = [in_background(job) for _ in range(6)]
    client = cluster_place.redis_client()
    try:
        assert wait_until(lambda: client.zcard(keys.WAITING) == 4, timeout=20)
    finally:
        client.close()
    w1 = processes.start_worker("w1", workers=4, wait=False)
    processes.wait_worker(w1)
    joined = time.time()
    starts = sorted(run.result(timeout=60) for run in runs)
    first = starts[0]
    assert joined - first < seconds - 0.5, (
        f"w1 took {joined - first:.1f} s to start: too slow for this test (w0's first jobs "
        "ended before it could take any)"
    )
    late = [round(start - joined, 2) for start in starts if start > joined + 1.5]
    shown = [round(start - first, 2) for start in starts]
    print(f"\nstarts after the first: {shown}; w1 up at {joined - first:.2f} s")
    assert late == [], f"jobs that waited on a busy worker while w1 had room: {late}"
    assert (w0.jobs_ran(), w1.jobs_ran()) == (2, 4)


# -- a worker killed between taking a message and claiming it --------------------------------------


class ClaimHoldingProxy:
    """A real TCP proxy in front of Redis that holds the first claim it sees (a command
    naming ``sk:claim:``): the worker behind it has taken the job's message from the queue
    and waits for its claim for ever, the window in which a kill leaves the message in the
    broker's unacknowledged set, handed back only after the visibility timeout (minutes)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.held = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, redis_url: str) -> str:
        return redis_url.replace(f":{self.target_port}/", f":{self.port}/")

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client and b"sk:claim:" in data and not self.held.is_set():
                    self.held.set()
                    self._closing.wait()  # never forwarded: the claim never happens
                    return
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closing.set()
        self.listener.close()


def test_jobs_a_killed_worker_took_before_claiming_them_run_elsewhere(
    processes: Processes, cluster_place: ClusterPlace
) -> None:
    """The broker hands a message to a worker before the worker claims the job; a worker
    killed in between leaves the message with the broker for minutes. The front sees the
    worker gone and queues its unclaimed jobs again: the run happens once, on another worker,
    instead of waiting out --queue-wait for a 503 while workers are idle."""
    proxy = ClaimHoldingProxy(cluster_place.redis.port)
    try:
        doomed = processes.start_worker("doomed", "--cluster", proxy.url(cluster_place.redis.url))
        front = processes.start_front("--queue-wait", "20")
        running = in_background(
            lambda: front.post_execute({"commands": ["echo once"], "save": True})
        )
        assert proxy.held.wait(30), "the worker never tried to claim the job"
        doomed.kill(signal.SIGKILL)
        killed = time.monotonic()
        rescuer = processes.start_worker("rescuer")
        answer = running.result(timeout=60)
        took = time.monotonic() - killed
    finally:
        proxy.close()
    assert answer.status_code == 200, answer.text
    assert answer.json()["execution"][0]["stdout"] == "once"
    assert took < 15, f"answered {took:.1f} s after the kill (--queue-wait is 20 s)"
    assert rescuer.jobs_ran() == 1
    assert wait_until(lambda: "unclaimed jobs queued again" in front.log_text())


# -- a front killed -------------------------------------------------------------------------------


def test_a_killed_front_loses_only_its_requests_and_the_next_front_serves_the_session(
    processes: Processes,
) -> None:
    """Fronts hold no state: with one killed (``kill -9``) in the middle of a run, its client
    loses that answer, and the session goes on through another front from its last saved
    environment, as a load balancer would send it."""
    processes.start_workers("w1", "w2")
    doomed, spare = processes.start_front(), processes.start_front()
    environment = saved(doomed, ["echo 1 >> log"])
    running = in_background(
        lambda: doomed.post_execute(
            {"commands": ["sleep 2; echo 2 >> log"], "environment": environment, "save": True}
        )
    )
    time.sleep(0.5)
    doomed.kill(signal.SIGKILL)
    with pytest.raises(requests.ConnectionError):
        running.result(timeout=30)
    assert spare.get(f"files/{environment}/log/").content == b"1\n"
    after = saved(spare, ["echo 3 >> log"], environment)
    assert spare.get(f"files/{after}/log/").content == b"1\n3\n"
    assert spare.get("specifications/").json()["cluster"] == {"workers": 2, "slots": 4}


# -- uploads waiting in the queue -----------------------------------------------------------------


def test_an_upload_waiting_in_the_queue_holds_no_staging_place_on_the_front(
    processes: Processes, cluster_place: ClusterPlace
) -> None:
    """A front stages an upload only until it is stored for the worker (Redis or the bucket):
    a request waiting in the queue keeps no file and no staging place on the front, so
    uploads waiting for busy workers cannot fill the front's disk or shut others out."""
    import io
    import tarfile

    processes.start_worker("only", workers=1)
    front = processes.start_front()
    staging = next((processes.root / "front-1").glob("front-*")) / "staging"
    busy = in_background(lambda: front.post_execute({"commands": ["sleep 4"]}))
    client = cluster_place.redis_client()
    assert wait_until(lambda: json.loads(client.get("sk:worker:only") or "{}").get("busy") == 1)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        data = b"from the upload\n"
        member = tarfile.TarInfo("given.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    waiting = in_background(
        lambda: front.post_execute({"commands": ["cat given.txt"]}, archive.getvalue())
    )
    assert wait_until(lambda: client.zcard(keys.WAITING) >= 1)
    assert wait_until(lambda: list(staging.iterdir()) == []), list(staging.iterdir())
    assert not waiting.done()  # still in the queue behind the sleep
    answer = waiting.result(timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["execution"][0]["stdout"] == "from the upload"
    assert busy.result(timeout=60).status_code == 200
