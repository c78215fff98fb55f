"""``sandbox-kernel worker`` as real processes on a real Redis and a real S3 server (moto).

The tests play the front's part by hand: they publish job messages with the engine's
:func:`~sandbox_kernel.server.cluster.engine.publish`, read the answers on a front inbox
stream, and send control messages, exactly as ``jobs.py`` and ``keys.py`` define them. Where a
job ran is read from the workers' logs (``job <id> ran on <name>``).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sandbox_kernel.server.cluster import engine, jobs, keys
from sandbox_kernel.server.settings import ServerSettings

from ..helpers import living, processes_matching, wait_until
from .processes import ClusterPlace, Processes, Worker, WorkerStarter
from .redis_fixture import running_redis

FRONT = "test-front"


class FakeFront:
    """What a front does with Redis, by hand: publish jobs, read its inbox, send controls."""

    def __init__(self, place: ClusterPlace, name: str = FRONT) -> None:
        self.place = place
        self.name = name
        settings = ServerSettings(cluster=place.redis.url, storage=place.storage_url)
        self.engine = engine.make_engine(settings)
        self.client = place.redis_client()
        self.last = "0-0"
        self.events: list[jobs.Event] = []

    def job(self, *commands: Any, stream: bool = False, **config: Any) -> jobs.JobSpec:
        return jobs.JobSpec(
            job=uuid.uuid4().hex,
            front=self.name,
            config={"commands": list(commands), **config},
            stream=stream,
            enqueued_ms=int(time.time() * 1000),
        )

    def publish(self, message: str | jobs.JobSpec, queue: str = keys.SHARED_QUEUE) -> None:
        text = message.to_json() if isinstance(message, jobs.JobSpec) else message
        engine.publish(self.engine, text, queue)

    def read(self, timeout: float = 1.0) -> None:
        """Read the inbox for up to ``timeout`` seconds (what came is in :attr:`events`)."""
        answer = self.client.xread(
            {keys.inbox_key(self.name): self.last}, block=int(timeout * 1000)
        )
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                self.last = entry_id.decode()
                self.events.append(jobs.decode_event(fields))

    def of(self, job: str) -> list[jobs.Event]:
        return [event for event in self.events if event.job == job]

    def wait_for(
        self, job: str, kinds: tuple[str, ...] = ("final", "error"), timeout: float = 60.0
    ) -> jobs.Event:
        """The first event of ``job`` of one of ``kinds``."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.of(job):
                if event.kind in kinds:
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {kinds} event for job {job} within {timeout} s: {self.of(job)}")
            self.read(min(left, 1.0))

    def answer(self, spec: jobs.JobSpec, timeout: float = 60.0) -> dict[str, Any]:
        """The final answer of ``spec`` (failing on an error event)."""
        event = self.wait_for(spec.job, timeout=timeout)
        assert event.kind == "final", event
        return event.data

    def control(self, worker: str, job: str, kind: str, **data: Any) -> None:
        fields = jobs.encode_event(jobs.Event(job, kind, data), control=True)
        self.client.xadd(keys.control_key(worker), fields)  # type: ignore[arg-type]

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def front(cluster_place: ClusterPlace) -> Iterator[FakeFront]:
    fake = FakeFront(cluster_place)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture(scope="module")
def lone_worker(
    moto_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ClusterPlace, Worker]]:
    """One worker ``w1`` shared by the module's tests that leave it as they found it (idle),
    on a Redis of its own: ``cluster_place`` empties the module's ``redis_server`` for each
    of the other tests. Starting a worker costs 1 to 3 s, stopping it about 1.5 s."""
    with running_redis(tmp_path_factory.mktemp("lone-redis")) as server:
        bucket = f"sk-lone-{uuid.uuid4().hex[:16]}"
        moto_server.client().create_bucket(Bucket=bucket)
        place = ClusterPlace(server, moto_server.url, bucket)
        started = Processes(place, tmp_path_factory.mktemp("lone-worker"))
        try:
            yield place, started.start_worker("w1")
        finally:
            started.close()


@pytest.fixture
def lone(lone_worker: tuple[ClusterPlace, Worker]) -> Iterator[tuple[FakeFront, Worker]]:
    """A front by hand on :func:`lone_worker`'s cluster, reading only this test's events."""
    place, worker = lone_worker
    fake = FakeFront(place)
    newest = fake.client.xrevrange(keys.inbox_key(fake.name), count=1)
    fake.last = newest[0][0].decode() if newest else "0-0"
    try:
        yield fake, worker
    finally:
        fake.close()


def _heartbeat(front: FakeFront, worker: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(front.client.get(keys.worker_key(worker)) or "{}")
    return state


def runs_of(*workers: Worker) -> int:
    return sum(worker.jobs_ran() for worker in workers)


# -- plain jobs ------------------------------------------------------------------------------------


def test_a_published_job_is_claimed_run_and_answered(
    lone: tuple[FakeFront, Worker],
) -> None:
    front, worker = lone
    spec = front.job("echo hello from the cluster", "-false", "echo after")
    front.publish(spec)
    answer = front.answer(spec)
    assert answer["status"] == 0, answer
    assert [entry["stdout"] for entry in answer["execution"]] == [
        "hello from the cluster",
        "",
        "after",
    ]
    kinds = [event.kind for event in front.of(spec.job)]
    assert kinds == ["claimed", "final"]
    assert front.of(spec.job)[0].data == {"worker": "w1"}
    assert wait_until(lambda: worker.ran(spec.job)), worker.log_text()
    claim = front.client.get(keys.claim_key(spec.job))
    assert claim == b"w1"


def test_a_job_on_a_worker_queue_runs_on_that_worker(
    start_worker: WorkerStarter, front: FakeFront
) -> None:
    one, two = start_worker.many("w1", "w2")
    specs = [front.job(f"echo {index}") for index in range(4)]
    for spec in specs:
        front.publish(spec, keys.worker_queue("w2"))
    for spec in specs:
        assert front.answer(spec)["status"] == 0
        assert front.of(spec.job)[0].data == {"worker": "w2"}
    assert wait_until(lambda: all(two.ran(spec.job) for spec in specs)), two.log_text()
    assert one.jobs_ran() == 0


@pytest.mark.parametrize("copies", ["same-queue", "both-queues", "after-the-run"])
def test_a_second_copy_of_a_job_is_dropped_never_run(
    start_worker: WorkerStarter, front: FakeFront, copies: str
) -> None:
    """The claim makes a fallback copy or a redelivery safe: one run, one answer."""
    one, two = start_worker.many("w1", "w2")
    spec = front.job("echo ran", "sleep 0.5")
    text = spec.to_json()
    if copies == "same-queue":
        front.publish(text)
        front.publish(text)
    elif copies == "both-queues":
        front.publish(text, keys.worker_queue("w1"))
        front.publish(text, keys.worker_queue("w2"))
        front.publish(text)
    else:
        front.publish(text)
        front.answer(spec)
        front.publish(text, keys.worker_queue("w1"))
        front.publish(text, keys.worker_queue("w2"))
    assert front.answer(spec)["status"] == 0
    assert wait_until(lambda: "dropped: claimed before" in one.log_text() + two.log_text())
    time.sleep(1.0)  # any late copy would have run by now
    front.read(0.2)
    kinds = [event.kind for event in front.of(spec.job)]
    assert kinds == ["claimed", "final"], kinds
    assert runs_of(one, two) == 1, one.log_text() + two.log_text()


def test_a_job_a_front_gave_up_on_never_runs(
    lone: tuple[FakeFront, Worker],
) -> None:
    front, worker = lone
    ran, dropped = worker.jobs_ran(), worker.log_text().count("dropped: claimed before")
    spec = front.job("echo should not run")
    assert keys.give_up(front.client, spec.job)
    front.publish(spec)
    assert wait_until(
        lambda: worker.log_text().count("dropped: claimed before") == dropped + 1, timeout=10
    )
    front.read(0.3)
    assert front.of(spec.job) == []
    assert worker.jobs_ran() == ran


# -- hostile messages ------------------------------------------------------------------------------


def _hostile_messages(front: FakeFront) -> dict[str, tuple[str, str]]:
    """Messages anyone who reaches Redis could publish, by name: (job id, text)."""

    def message(**changes: Any) -> tuple[str, str]:
        job = uuid.uuid4().hex
        body = {
            "v": 1,
            "job": job,
            "front": FRONT,
            "config": {"commands": ["echo pwned"]},
            "upload": None,
            "stream": False,
            "enqueued_ms": 0,
        }
        body.update(changes)
        return job, json.dumps(body)

    job, good = message()
    return {
        "bad-config": message(config={"commands": "echo pwned"}),
        "no-commands": message(config={"environ": {}}),
        "unknown-key": message(pickle="cos\nsystem\n"),
        "missing-key": (job, good.replace('"stream": false, ', "")),
        "huge-config": message(config={"commands": ["echo pwned"], "environ": {"X": "x" * 2**21}}),
        "forged-upload": message(upload={"place": "redis", "size": 10, "sha256": "0" * 64}),
        "bucket-upload-missing": message(
            upload={"place": "bucket", "size": 10, "sha256": "0" * 64}
        ),
        "bad-version": message(v=2),
        "evil-path": message(config={"commands": ["echo pwned"], "environment": "../../etc"}),
    }


def test_hostile_job_messages_are_refused_and_nothing_runs(
    lone: tuple[FakeFront, Worker],
) -> None:
    front, worker = lone
    ran = worker.jobs_ran()
    nobody = worker.log_text().count("refused a job message that names no job and front")
    hostile = _hostile_messages(front)
    # A forged upload whose data is there but is not what the reference says.
    forged_job = hostile["forged-upload"][0]
    front.client.set(keys.upload_key(forged_job), b"0123456789", ex=60)
    for _name, (_job, text) in hostile.items():
        front.publish(text)
    # Messages that name nobody to answer: dropped with a log line.
    for junk in ("not json at all", "[1, 2, 3]", json.dumps({"job": "x"}), "{" * 100_000):
        front.publish(junk)
    for name, (job, _text) in hostile.items():
        event = front.wait_for(job)
        assert event.kind == "error", (name, event)
        if name == "evil-path":  # as execute/ answers it: no such environment
            assert event.data == {
                "status": 404,
                "text": "No environment with UUID '../../etc' found",
            }
            continue
        assert event.data["status"] == 400, (name, event)
        assert event.data["text"], name
    # Nothing ran, and the worker still serves.
    good = front.job("echo still here")
    front.publish(good)
    assert front.answer(good)["execution"][0]["stdout"] == "still here"
    assert wait_until(lambda: worker.ran(good.job))
    assert worker.jobs_ran() == ran + 1, worker.log_text()
    assert "pwned" not in json.dumps([event.data for event in front.events])
    log = worker.log_text()
    assert log.count("refused a job message that names no job and front") >= nobody + 4, log


def test_a_task_message_with_other_arguments_is_dropped(
    lone: tuple[FakeFront, Worker],
) -> None:
    front, worker = lone
    ran, dropped = worker.jobs_ran(), worker.log_text().count("is not one job text")
    spec = front.job("echo pwned")
    front.engine.send_task(
        engine.TASK_NAME,
        args=(spec.to_json(), "extra"),
        exchange="",
        routing_key=keys.SHARED_QUEUE,
        declare=[],
    )
    front.engine.send_task(
        engine.TASK_NAME,
        kwargs={"message": spec.to_json()},
        exchange="",
        routing_key=keys.SHARED_QUEUE,
        declare=[],
    )
    assert wait_until(
        lambda: worker.log_text().count("is not one job text") == dropped + 2, timeout=20
    )
    front.read(0.3)
    assert front.of(spec.job) == []
    assert worker.jobs_ran() == ran


# -- environments in the bucket --------------------------------------------------------------------


def _bucket_objects(place: ClusterPlace, folder: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=place.s3_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    prefix = f"{place.prefix}/{folder}/"
    found = s3.list_objects_v2(Bucket=place.bucket, Prefix=prefix).get("Contents", [])
    return [item["Key"].removeprefix(prefix) for item in found]


def test_a_save_is_published_and_another_worker_materialises_it(
    start_worker: WorkerStarter, front: FakeFront, cluster_place: ClusterPlace
) -> None:
    one, two = start_worker.many("w1", "w2")
    first = front.job(
        "echo one > a.txt", "mkdir sub", "echo two > sub/b.txt", "ln -s a.txt link", save=True
    )
    front.publish(first, keys.worker_queue("w1"))
    answer = front.answer(first)
    assert answer["status"] == 0, answer
    saved = answer["environment"]
    assert f"{saved}.json" in _bucket_objects(cluster_place, "envs")
    assert len(_bucket_objects(cluster_place, "blobs")) == 2  # a.txt and sub/b.txt
    assert front.client.smembers(keys.env_key(saved)) == {b"w1"}
    # The next cell lands on the other worker: it fetches the environment from the bucket.
    second = front.job(
        "cat a.txt sub/b.txt", "readlink link", "echo three >> a.txt", environment=saved, save=True
    )
    front.publish(second, keys.worker_queue("w2"))
    answer = front.answer(second)
    assert answer["status"] == 0, answer
    assert answer["execution"][0]["stdout"] == "one\ntwo"
    assert answer["execution"][1]["stdout"] == "a.txt"
    assert f"environment {saved} fetched from the bucket" in two.log_text()
    assert front.client.smembers(keys.env_key(saved)) == {b"w1", b"w2"}
    # Only the changed file was uploaded: one more blob.
    assert len(_bucket_objects(cluster_place, "blobs")) == 3
    # And back on the first worker, which has the base locally (no fetch).
    third = front.job("cat a.txt", environment=answer["environment"])
    front.publish(third, keys.worker_queue("w1"))
    assert front.answer(third)["execution"][0]["stdout"] == "one\nthree"
    assert "fetched from the bucket" in one.log_text()  # it had to fetch the new one


def test_an_unknown_or_expired_environment_is_404(
    start_worker: WorkerStarter, front: FakeFront
) -> None:
    start_worker("w1", "--expiration", "2")
    missing = str(uuid.uuid4())
    spec = front.job("true", environment=missing)
    front.publish(spec)
    event = front.wait_for(spec.job)
    assert event.kind == "error"
    assert event.data == {"status": 404, "text": f"No environment with UUID '{missing}' found"}
    saved = front.job("echo x > f", save=True)
    front.publish(saved)
    uuid_saved = front.answer(saved)["environment"]
    time.sleep(2.5)
    late = front.job("cat f", environment=uuid_saved)
    front.publish(late)
    event = front.wait_for(late.job)
    assert event.data == {"status": 404, "text": f"No environment with UUID '{uuid_saved}' found"}


# -- cancel and streaming --------------------------------------------------------------------------


def _sleep_marker(seconds: int) -> str:
    """A duration for ``sleep`` that no other process on the machine has on its command line."""
    return f"{seconds}.{uuid.uuid4().int % 10**9:09d}"


def _wait_claimed(front: FakeFront, job: str) -> str:
    return str(front.wait_for(job, kinds=("claimed",)).data["worker"])


@pytest.mark.parametrize("stream", [False, True])
def test_cancel_kills_the_running_job(lone: tuple[FakeFront, Worker], stream: bool) -> None:
    front, worker = lone
    cancelled = worker.log_text().count("cancelled by its front")
    marker = _sleep_marker(30)
    spec = front.job(f"sleep {marker}", stream=stream)
    front.publish(spec)
    assert _wait_claimed(front, spec.job) == "w1"
    assert wait_until(lambda: processes_matching(marker) != [], timeout=10)
    started = time.monotonic()
    front.control("w1", spec.job, "cancel")
    assert wait_until(lambda: processes_matching(marker) == [], timeout=10)
    assert wait_until(
        lambda: worker.log_text().count("cancelled by its front") == cancelled + 1, timeout=10
    )
    print(f"cancel to sandbox gone: {time.monotonic() - started:.2f} s")

    def idle() -> bool:  # the heartbeat thread writes the state every 0.25 s
        state = json.loads(front.client.get(keys.worker_key("w1")) or "{}")
        return bool(state.get("busy") == 0 and state.get("jobs") == [])

    assert wait_until(idle)
    front.read(0.3)
    assert [event.kind for event in front.of(spec.job)] == ["claimed"]
    # The slot is free again.
    after = front.job("echo next")
    front.publish(after)
    assert front.answer(after)["status"] == 0


def test_a_streamed_job_sends_chunks_and_takes_stdin(
    lone: tuple[FakeFront, Worker],
) -> None:
    front, _ = lone
    spec = front.job(
        "echo first; sleep 0.3; echo second >&2",
        "printf 'name? '; read name; echo hi $name",
        stream=True,
    )
    front.publish(spec)
    worker = _wait_claimed(front, spec.job)
    front.wait_for(spec.job, kinds=("stdin",), timeout=30)
    wanted = [event for event in front.of(spec.job) if event.kind == "stdin"]
    assert wanted[0].data == {"prompt": "name? "}
    front.control(worker, spec.job, "stdin", text="Ada\n")
    answer = front.answer(spec)
    chunks = [(e.data["stream"], e.data["text"]) for e in front.of(spec.job) if e.kind == "stream"]
    assert "".join(text for name, text in chunks if name == "stdout") == "first\nname? hi Ada\n"
    assert "".join(text for name, text in chunks if name == "stderr") == "second\n"
    kinds = [event.kind for event in front.of(spec.job)]
    assert kinds[0] == "claimed" and kinds[-1] == "final"
    assert answer["execution"][1]["stdout"] == "name? hi Ada"


def test_a_streamed_job_takes_eof_and_stop(
    lone: tuple[FakeFront, Worker],
) -> None:
    front, _ = lone
    eof = front.job("cat; echo done", stream=True)
    front.publish(eof)
    worker = _wait_claimed(front, eof.job)
    front.control(worker, eof.job, "stdin", text="line\n")
    front.control(worker, eof.job, "eof")
    assert front.answer(eof)["execution"][0]["stdout"] == "line\ndone"
    stop = front.job("sleep 30", "echo never", stream=True)
    front.publish(stop)
    worker = _wait_claimed(front, stop.job)
    time.sleep(0.5)
    front.control(worker, stop.job, "stop")
    answer = front.answer(stop, timeout=20)
    assert answer["status"] == 130, answer
    assert len(answer["execution"]) == 1


def test_stdin_flooding_a_streamed_job_is_refused_413(
    lone: tuple[FakeFront, Worker],
) -> None:
    front, _ = lone
    spec = front.job("sleep 30", stream=True)
    front.publish(spec)
    worker = _wait_claimed(front, spec.job)
    for _ in range(5):
        front.control(worker, spec.job, "stdin", text="x" * 300_000)
    event = front.wait_for(spec.job, timeout=20)
    assert event.kind == "error" and event.data["status"] == 413, event


# -- the process -----------------------------------------------------------------------------------


def test_kill_9_of_a_worker_leaves_no_sandbox_behind(
    start_worker: WorkerStarter, front: FakeFront
) -> None:
    worker = start_worker("w1", workers=2)
    marker = _sleep_marker(60)
    specs = [front.job(f"sleep {marker}") for _ in range(2)]
    for spec in specs:
        front.publish(spec)
    for spec in specs:
        _wait_claimed(front, spec.job)
    assert wait_until(lambda: len(processes_matching(marker)) >= 2, timeout=10)
    below = worker.remember_descendants()
    assert any("bwrap" in _command(pid) for pid in below), [_command(pid) for pid in below]
    worker.kill(signal.SIGKILL)
    worker.wait()
    assert wait_until(lambda: not living(below), timeout=10), [
        _command(pid) for pid in living(below)
    ]
    assert processes_matching(marker) == []
    # The heartbeat expires within its TTL: a front sees the worker dead.
    assert wait_until(lambda: not front.client.exists(keys.worker_key("w1")), timeout=3)


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def test_sigterm_is_a_warm_shutdown(start_worker: WorkerStarter, front: FakeFront) -> None:
    worker = start_worker("w1")
    spec = front.job("sleep 1", "echo finished")
    front.publish(spec)
    _wait_claimed(front, spec.job)
    worker.kill(signal.SIGTERM)
    answer = front.answer(spec, timeout=30)
    assert answer["execution"][-1]["stdout"] == "finished"
    assert worker.wait(30) == 0, worker.log_text()
    assert not front.client.exists(keys.worker_key("w1"))  # it said goodbye


def test_a_worker_on_a_restarted_redis_serves_again_within_5_s(
    processes: Processes, front: FakeFront, cluster_place: ClusterPlace
) -> None:
    worker = processes.start_worker("w1")
    first = front.job("echo before")
    front.publish(first)
    assert front.answer(first)["status"] == 0
    # kombu alone retries after 2, 4, 6, 8 ... s: after 13 s down, its next attempt comes 7 s
    # after Redis is back (measured without the fix: 4.1 s after an 8 s outage). The fix
    # retries every second at most.
    for outage in (1.0, 13.0):
        cluster_place.redis.kill()
        time.sleep(outage)
        cluster_place.redis.start(same_port=True)
        back = time.monotonic()
        front.client.close()
        front.client = cluster_place.redis_client()
        front.last = "0-0"
        front.events.clear()
        assert wait_until(lambda: bool(front.client.exists(keys.worker_key("w1"))), timeout=10)
        beating = time.monotonic() - back
        spec = front.job("echo after")
        front.publish(spec)
        assert front.answer(spec, timeout=30)["execution"][0]["stdout"] == "after"
        served = time.monotonic() - back
        print(
            f"Redis down {outage:g} s: heartbeat back after {beating:.2f} s, "
            f"a job answered {served:.2f} s after Redis was back"
        )
        assert served < 5.0, worker.log_text()[-3000:]


# -- starting --------------------------------------------------------------------------------------


def test_a_worker_that_cannot_reach_redis_or_the_bucket_exits_2(
    processes: Processes, cluster_place: ClusterPlace
) -> None:
    import subprocess
    import sys

    base = [sys.executable, "-m", "sandbox_kernel.cli", "worker", "--name", "w9"]
    cases = {
        "no password": (
            ["--cluster", "redis://127.0.0.1:1/0", "--storage", cluster_place.storage_url],
            "has no password",
        ),
        "wrong password": (
            [
                "--cluster",
                f"redis://:wrong@127.0.0.1:{cluster_place.redis.port}/0",
                "--storage",
                cluster_place.storage_url,
            ],
            "refused the login",
        ),
        "no redis": (
            ["--cluster", "redis://:pw@127.0.0.1:1/0", "--storage", cluster_place.storage_url],
            "cannot be reached",
        ),
        "no bucket": (
            [*cluster_place.cluster_args()[:2], "--storage", "s3://no-such-bucket-here/x"],
            "does not exist",
        ),
        "no storage": (["--cluster", cluster_place.redis.url], "needs --storage"),
    }
    for name, (args, expected) in cases.items():
        done = subprocess.run(
            [*base, *args, "--data-dir", str(processes.root / "w9")],
            env=cluster_place.environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (name, done.stderr)
        assert expected in done.stderr, (name, done.stderr)
        assert "pw@" not in done.stderr and "wrong" not in done.stderr.split("***")[0], name


# -- uploads ---------------------------------------------------------------------------------------


def _archive(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("place", ["redis", "bucket"])
def test_an_upload_is_fetched_checked_unpacked_and_deleted(
    lone: tuple[FakeFront, Worker],
    place: str,
) -> None:
    import hashlib

    import boto3

    front, _ = lone
    cluster_place = front.place
    data = _archive({"given.txt": b"from the upload\n"})
    spec = front.job("cat given.txt")
    ref = jobs.UploadRef(place, len(data), hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]
    spec = jobs.JobSpec(spec.job, spec.front, spec.config, ref)
    s3 = boto3.client("s3", endpoint_url=cluster_place.s3_url, region_name="us-east-1")
    key = f"{cluster_place.prefix}/uploads/{spec.job}.tgz"
    if place == "redis":
        front.client.set(keys.upload_key(spec.job), data, ex=60)
    else:
        s3.put_object(Bucket=cluster_place.bucket, Key=key, Body=data)
    front.publish(spec)
    assert front.answer(spec)["execution"][0]["stdout"] == "from the upload"
    if place == "redis":
        assert wait_until(lambda: not front.client.exists(keys.upload_key(spec.job)))
    else:
        assert wait_until(lambda: _bucket_objects(cluster_place, "uploads") == [])


# -- the cluster-wide quota and the local cache ----------------------------------------------------


@pytest.mark.parametrize("limit", ["bytes", "inodes"])
def test_the_storage_quota_holds_across_workers(
    start_worker: WorkerStarter, front: FakeFront, limit: str
) -> None:
    caps = ["--max-storage", "3000"] if limit == "bytes" else ["--max-storage-inodes", "6"]
    one, two = start_worker.many("w1", "w2", args=tuple(caps))
    fill = ["head -c 2000 /dev/zero > big"] if limit == "bytes" else ["touch a b c"]
    first = front.job(*fill, save=True)
    front.publish(first, keys.worker_queue("w1"))
    assert "environment" in front.answer(first)
    second = front.job(*fill, save=True)
    front.publish(second, keys.worker_queue("w2"))
    event = front.wait_for(second.job)
    assert event.kind == "error", event
    assert event.data["status"] == 507
    assert "whole cluster" in event.data["text"], event.data["text"]
    assert "Nothing was saved" in event.data["text"]
    # A run that saves nothing still runs.
    plain = front.job("echo fine")
    front.publish(plain, keys.worker_queue("w2"))
    assert front.answer(plain)["status"] == 0
    assert wait_until(lambda: two.ran(second.job)) and one.ran(first.job)


def test_the_local_cache_evicts_the_least_recently_used(
    start_worker: WorkerStarter, front: FakeFront
) -> None:
    worker = start_worker("w1", "--cache-size", "5000")
    saved = []
    for index in range(3):
        spec = front.job(f"head -c 2000 /dev/urandom > data{index}", save=True)
        front.publish(spec)
        saved.append(front.answer(spec)["environment"])
    local = worker.data_dir / "environments"
    # 6000 bytes saved, 5000 kept: the oldest environment went (it stays in the bucket).
    assert not (local / saved[0]).exists()
    assert (local / saved[1]).is_dir() and (local / saved[2]).is_dir()
    assert "evicted 1 environments" in worker.log_text()
    assert front.client.smembers(keys.env_key(saved[0])) == set()
    assert front.client.smembers(keys.env_key(saved[2])) == {b"w1"}
    assert wait_until(lambda: _heartbeat(front, "w1")["cached_environments"] == 2)
    again = front.job("ls", environment=saved[0])
    front.publish(again)
    assert front.answer(again)["execution"][0]["stdout"] == "data0"
    assert f"environment {saved[0]} fetched from the bucket" in worker.log_text()
