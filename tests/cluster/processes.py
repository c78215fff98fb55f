"""Real cluster processes for the tests: workers and fronts on a real Redis and moto (design B10).

``start_worker(name, *args)`` spawns ``python -m sandbox_kernel.cli worker --cluster ...
--storage ... --name NAME --data-dir DIR --workers 2 *args`` and returns once the worker's
heartbeat key (``sk:worker:NAME``) is in Redis: from then on it takes jobs. ``start_front(*args)``
spawns ``python -m sandbox_kernel.cli serve --cluster ... --storage ... --port 0 --info-file F
--no-advertise *args`` and returns once the info file (its URL and token) is written.

Both inherit the test's environment (the dummy AWS keys of ``_dummy_aws``) plus
``AWS_ENDPOINT_URL`` = the moto server, and both write stdout and stderr into one log file that
:meth:`ClusterProcess.log_text` reads: a worker logs ``job <id> ran on <name>`` for each run,
which is how a test knows where a job ran.

Every process is stopped at teardown (SIGTERM, then SIGKILL), and the teardown fails if any
process it started (the sandboxes included) is still alive afterwards: no test leaves one
behind, and no test passes while a killed worker's sandbox survives.

Fixtures (registered in ``tests/cluster/conftest.py``):

- ``cluster_place``: the module's Redis (``redis_server``), the session's moto and a fresh
  bucket for this test: where a cluster lives;
- ``processes``: a :class:`Processes` on that place; ``start_worker`` (with
  ``start_worker.many`` to start several side by side) and ``start_front`` use it;
- ``shared_cluster``: one cluster per module (2 workers, 1 front) for read-mostly tests.

Every process of a :class:`Processes` gets SIGTERM at once at teardown (a warm shutdown takes
about a second each), then is waited for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ..helpers import descendants, living, wait_until
from .redis_fixture import RedisServer

#: A worker starts in about 0.5 to 1 s (Celery, the isolation probe, the runner pool); on 2
#: busy cores, much more.
READY_SECONDS = 60.0
STOP_SECONDS = 15.0
#: The storage prefix every test cluster uses inside its bucket.
PREFIX = "cluster"
#: What the cluster's processes get instead of the developer's AWS settings.
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclasses.dataclass
class ClusterPlace:
    """Where a test cluster lives: a Redis, an S3 server, a bucket."""

    redis: RedisServer
    s3_url: str
    bucket: str
    prefix: str = PREFIX

    @property
    def storage_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def cluster_args(self) -> list[str]:
        """``--cluster`` and ``--storage`` (the endpoint comes from AWS_ENDPOINT_URL)."""
        return ["--cluster", self.redis.url, "--storage", self.storage_url]

    def environment(self) -> dict[str, str]:
        """The test's environment without any AWS setting of the developer's: dummy keys,
        and the endpoint of the test's S3 server (set here, not by the function-scoped
        ``_dummy_aws``, so that a module-scoped cluster gets them too)."""
        kept = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        return {**kept, **DUMMY_AWS, "AWS_ENDPOINT_URL": self.s3_url, "PYTHONUNBUFFERED": "1"}

    def redis_client(self) -> Any:
        return self.redis.client()


class ClusterProcess:
    """One spawned cluster process, its log in a file."""

    kind = "process"

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                argv, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        #: Every process seen below it (sandboxes included), collected while it lived.
        self.seen: set[int] = set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def remember_descendants(self) -> list[int]:
        """The processes below it now (and remember them for the teardown's check)."""
        found = descendants(self.pid) if self.alive() else []
        self.seen.update(found)
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process alone (not its group): what a crash or an operator
        does. ``kill(SIGKILL)`` is the ``kill -9`` of the failover tests."""
        self.remember_descendants()
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float = STOP_SECONDS) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = STOP_SECONDS) -> int | None:
        """SIGTERM (a warm shutdown), SIGKILL after ``timeout``; the exit status."""
        self.remember_descendants()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def fail(self, why: str) -> None:
        """Stop, and fail the test with the log's tail."""
        self.stop(timeout=2)
        pytest.fail(f"{self.kind} {why}:\n{self.log_text()[-4000:]}", pytrace=False)


class Worker(ClusterProcess):
    kind = "worker"

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str], data_dir: Path
    ) -> None:
        super().__init__(argv, log, env)
        self.name = name
        self.data_dir = data_dir

    def ran(self, job: str) -> bool:
        """Whether its log says it ran ``job``."""
        return f"job {job} ran on {self.name}" in self.log_text()

    def jobs_ran(self) -> int:
        return self.log_text().count(" ran on ")


class Front(ClusterProcess):
    kind = "front"

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], info: Path) -> None:
        super().__init__(argv, log, env)
        self.info_file = info
        self.url = ""
        self.token: str | None = None
        self.http = requests.Session()

    def read_info(self) -> bool:
        try:
            info = json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return False
        self.url = info["url"]
        self.token = info.get("token")
        if self.token:
            self.http.headers["Authorization"] = f"Bearer {self.token}"
        return True

    def get(self, path: str, **options: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=60, **options)

    def post_execute(
        self, config: Any, environment: bytes | None = None, **options: Any
    ) -> requests.Response:
        files: dict[str, Any] = {"config": (None, json.dumps(config))}
        if environment is not None:
            files["environment"] = ("environment.tgz", environment, "application/gzip")
        return self.http.post(self.url + "execute/", files=files, timeout=120, **options)


def saved(front: Front, commands: list[str], environment: str | None = None) -> str:
    """Run ``commands`` with ``save`` through ``front``; the new environment's uuid."""
    config: dict[str, Any] = {"commands": commands, "save": True}
    if environment:
        config["environment"] = environment
    answer = front.post_execute(config)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == 0, answer.text
    return str(answer.json()["environment"])


class Processes:
    """Starts workers and fronts on one :class:`ClusterPlace`; :meth:`close` stops them all
    and checks that nothing they started survives."""

    def __init__(self, place: ClusterPlace, root: Path) -> None:
        self.place = place
        self.root = root
        self.started: list[ClusterProcess] = []

    def start_worker(
        self,
        name: str,
        *args: str,
        workers: int = 2,
        data_dir: Path | None = None,
        wait: bool = True,
    ) -> Worker:
        """A worker named ``name`` (``--workers 2`` unless ``workers``); ready once it beats."""
        data_dir = data_dir or self.root / f"worker-{name}"
        argv = [
            sys.executable,
            "-m",
            "sandbox_kernel.cli",
            "worker",
            *self.place.cluster_args(),
            "--name",
            name,
            "--data-dir",
            str(data_dir),
            "--workers",
            str(workers),
            *args,
        ]
        log = self.root / f"worker-{name}-{len(self.started)}.log"
        worker = Worker(name, argv, log, self.place.environment(), data_dir)
        self.started.append(worker)
        if wait:
            self.wait_worker(worker)
        return worker

    def start_workers(
        self, *names: str, args: tuple[str, ...] = (), workers: int = 2
    ) -> list[Worker]:
        """Workers named ``names`` started side by side (each takes 1 to 3 s to be ready)."""
        started = [self.start_worker(name, *args, workers=workers, wait=False) for name in names]
        for worker in started:
            self.wait_worker(worker)
        return started

    def wait_worker(self, worker: Worker, timeout: float = READY_SECONDS) -> None:
        client = self.place.redis_client()
        key = f"sk:worker:{worker.name}"
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not worker.alive():
                    worker.fail(f"{worker.name} exited with status {worker.process.returncode}")
                with contextlib.suppress(Exception):
                    if client.exists(key):
                        worker.remember_descendants()
                        return
                time.sleep(0.02)
        finally:
            client.close()
        worker.fail(f"{worker.name} wrote no heartbeat within {timeout:g} s")

    def start_front(self, *args: str, wait: bool = True) -> Front:
        """A front on a free port; ready once its info file (URL and token) is written."""
        index = len(self.started)
        info = self.root / f"front-{index}.json"
        argv = [
            sys.executable,
            "-m",
            "sandbox_kernel.cli",
            "serve",
            *self.place.cluster_args(),
            "--port",
            "0",
            "--info-file",
            str(info),
            "--no-advertise",
            "--data-dir",
            str(self.root / f"front-{index}"),
            *args,
        ]
        front = Front(argv, self.root / f"front-{index}.log", self.place.environment(), info)
        self.started.append(front)
        if wait:
            self.wait_front(front)
        return front

    def wait_front(self, front: Front, timeout: float = READY_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if front.read_info():
                return
            if not front.alive():
                front.fail(f"exited with status {front.process.returncode}")
            time.sleep(0.02)
        front.fail(f"wrote no info file within {timeout:g} s")

    def close(self) -> None:
        """Stop every process, all at once (each warm shutdown takes about a second);
        fail if one of theirs is still alive."""
        left: list[int] = []
        for process in reversed(self.started):
            process.remember_descendants()
            if process.alive():
                process.process.send_signal(signal.SIGTERM)
        for process in reversed(self.started):
            process.stop()
            if not wait_until(lambda p=process: not living(p.seen), timeout=5):
                survivors = living(process.seen)
                left += survivors
                for pid in survivors:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # a safety net after the check
        assert not left, f"processes left behind by the cluster's processes: {left}"


@pytest.fixture
def cluster_place(redis_server: RedisServer, moto_server: Any, bucket: str) -> ClusterPlace:
    """The module's Redis (emptied), the session's moto, a new bucket."""
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return ClusterPlace(redis_server, moto_server.url, bucket)


@dataclasses.dataclass
class SharedCluster:
    """A module's read-mostly cluster (:func:`shared_cluster`)."""

    place: ClusterPlace
    processes: Processes
    workers: list[Worker]
    front: Front


@pytest.fixture(scope="module")
def shared_cluster(
    redis_server: RedisServer, moto_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedCluster]:
    """One cluster for a whole module (about 3 to 10 s to start, paid once): a bucket of its
    own, workers ``w1`` and ``w2`` of 2 slots each, one front. Its tests must leave it as
    they found it (no kill, no Redis restart, no worker left busy), and the module must not
    use ``cluster_place``, whose emptying of the module's Redis would wipe this cluster's
    keys: destructive tests build their own cluster in another module."""
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    bucket = f"sk-shared-{os.urandom(8).hex()}"
    moto_server.client().create_bucket(Bucket=bucket)
    place = ClusterPlace(redis_server, moto_server.url, bucket)
    started = Processes(place, tmp_path_factory.mktemp("shared-cluster"))
    try:
        workers = started.start_workers("w1", "w2")
        front = started.start_front()
        yield SharedCluster(place, started, workers, front)
    finally:
        started.close()


@pytest.fixture
def processes(cluster_place: ClusterPlace, tmp_path: Path) -> Iterator[Processes]:
    """Cluster processes on ``cluster_place``, all stopped (and checked) at the end."""
    started = Processes(cluster_place, tmp_path)
    try:
        yield started
    finally:
        started.close()


class WorkerStarter:
    """``start_worker(name, *worker_args, workers=2)``: a ready worker of the test cluster;
    ``start_worker.many(*names, args=(...), workers=2)``: several, started side by side."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes

    def __call__(self, name: str, *args: str, **options: Any) -> Worker:
        return self.processes.start_worker(name, *args, **options)

    def many(self, *names: str, args: tuple[str, ...] = (), workers: int = 2) -> list[Worker]:
        return self.processes.start_workers(*names, args=args, workers=workers)


@pytest.fixture
def start_worker(processes: Processes) -> WorkerStarter:
    """A ready worker of the test cluster (:class:`WorkerStarter`)."""
    return WorkerStarter(processes)


@pytest.fixture
def start_front(processes: Processes) -> Callable[..., Front]:
    """``start_front(*serve_args)``: a ready front of the test cluster."""
    return processes.start_front
