"""The processes of ``bench_cluster.py``: a private Redis, an S3 server (moto in server mode, or
s3rver from npm), cluster workers and fronts, and a single ``sandbox-kernel serve``, all on
loopback, all stopped at the end.

Every process is started in its own session (a Ctrl-C meant for the bench reaches only the
bench, which then stops them in order) and with ``PR_SET_PDEATHSIG`` (SIGTERM if the bench is
killed outright). :meth:`Place.close` stops them newest first (SIGTERM, SIGKILL after a grace),
then kills whatever they left below them (sandboxes included) and removes the scratch
directory: a run leaves no process and no file behind, whether it ends well, fails or is
interrupted.

A missing prerequisite (``redis-server``, moto or s3rver, boto3, redis-py) stops the bench with
a message naming how to install it.

Both S3 servers log one line per request (moto through werkzeug, s3rver through koa-logger):
that is how the bench counts the S3 requests of a cell. The count is checked at start-up on the
bucket probe; when a server's log does not show it, the counts are reported as unavailable.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sandbox_kernel.discovery import read_server_info, write_token_file
from sandbox_kernel.lab.processes import exit_with_parent, process_tree

#: A process (Celery, the isolation probe, the runner pool) starts in about a second; on two
#: busy cores it can take much longer.
READY_SECONDS = 60.0
#: A warm shutdown lets running jobs finish: a few seconds at most in this bench.
STOP_SECONDS = 15.0
MOTO_INSTALL = "pip install 'moto[s3]>=5' flask flask-cors (or pip install -e '.[test]')"
S3RVER_VERSION = "3.7.1"
#: ``--no-save``: npm writes no package.json nor lock file into bench/, only node_modules/
#: (which .gitignore lists).
S3RVER_INSTALL = (
    f"npm install --prefix bench --no-save s3rver@{S3RVER_VERSION} "
    "(or set S3RVER to its executable)"
)
NODE_INSTALL = "apt-get install -y nodejs (s3rver runs on Node.js)"
#: The S3 servers the bench can start.
S3_SERVERS = ("moto", "s3rver")
#: The keys s3rver checks SigV4 signatures against (fixed); moto accepts any.
S3RVER_KEY = "S3RVER"
CLUSTER_INSTALL = "pip install -e '.[cluster]' (celery[redis], boto3, redis)"
REDIS_INSTALL = "apt-get install -y redis-server (the Debian package; .ci/run installs it)"
#: The storage prefix inside the bench's bucket.
PREFIX = "bench"

_P = TypeVar("_P", bound="Process")


class Missing(RuntimeError):
    """A prerequisite is not installed: the text says what and how to install it."""


class StartFailed(RuntimeError):
    """A process did not come up: the text has its log's tail."""


@dataclasses.dataclass(frozen=True)
class Programs:
    """What the bench runs besides Python modules: found before anything starts."""

    redis: str
    #: The s3rver executable, when the bench runs s3rver (None with moto).
    s3rver: str | None


def require_prerequisites(s3: str) -> Programs:
    """The programs the bench needs, after checking that the Python parts are importable;
    ``s3`` is one of :data:`S3_SERVERS`."""
    program = shutil.which("redis-server")
    if program is None:
        raise Missing(f"redis-server is not installed: {REDIS_INSTALL}")
    modules = [("redis", CLUSTER_INSTALL), ("boto3", CLUSTER_INSTALL), ("celery", CLUSTER_INSTALL)]
    if s3 == "moto":
        modules += [("moto.server", MOTO_INSTALL), ("flask", MOTO_INSTALL)]
    for module, install in modules:
        try:
            __import__(module)
        except ImportError as error:
            raise Missing(f"{error.name} is not installed: {install}") from None
    return Programs(redis=program, s3rver=find_s3rver() if s3 == "s3rver" else None)


def find_s3rver() -> str:
    """s3rver's executable: ``$S3RVER``, else ``node_modules/.bin/s3rver`` under ``bench/`` or
    the repository (``npm install --prefix``), else ``s3rver`` on the PATH; and Node.js."""
    program = _s3rver_program()
    if shutil.which("node") is None:
        raise Missing(f"node is not installed: {NODE_INSTALL}")
    return program


def _s3rver_program() -> str:
    configured = os.environ.get("S3RVER")
    if configured:
        if not (Path(configured).is_file() and os.access(configured, os.X_OK)):
            raise Missing(f"S3RVER={configured} is not an executable file: {S3RVER_INSTALL}")
        return configured
    bench = Path(__file__).resolve().parent
    for base in (bench, bench.parent):
        candidate = base / "node_modules" / ".bin" / "s3rver"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("s3rver")
    if found is None:
        raise Missing(f"s3rver is not installed: {S3RVER_INSTALL}")
    return found


def s3rver_version(program: str) -> str:
    """The version in s3rver's ``package.json`` (``.bin/s3rver`` links to its ``bin/``)."""
    package = Path(program).resolve().parent.parent / "package.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads(package.read_text())["version"])
    return "(version unknown)"


def free_port() -> int:
    """A port free right now (bind to 0, close). Redis's own ``--port 0`` turns TCP off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Process:
    """One started program, its stdout and stderr in a log file."""

    def __init__(
        self, label: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.label = label
        self.argv = argv
        self.log = log
        with open(log, "ab") as output:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=exit_with_parent(),
            )
        #: Every (pid, start time) seen below it while it lived: what its stop must not leave.
        self.seen: set[tuple[int, int]] = set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-characters:] or "(empty log)"
        except OSError:
            return "(no log)"

    def remember_children(self) -> None:
        if self.alive():
            self.seen.update(process_tree(self.pid))

    def kill(self) -> None:
        """``kill -9`` of the process alone, as a crash would: its sandboxes must die with it
        (bubblewrap's ``--die-with-parent``)."""
        self.remember_children()
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, grace: float = STOP_SECONDS) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL after ``grace``; then its process group."""
        self.remember_children()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def survivors(self) -> list[int]:
        """Pids it started that are still alive (same pid and same start time)."""
        return [pid for pid, started in self.seen if _start_time(pid) == started]

    def fail(self, why: str) -> StartFailed:
        self.stop(grace=2)
        return StartFailed(
            f"{self.label} {why}; its log ({self.log}) ends with:\n{self.log_tail()}"
        )


def _start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


class Server(Process):
    """A ``sandbox-kernel serve`` (single or front): its URL and token come from its info file."""

    def __init__(
        self, label: str, argv: list[str], log: Path, env: dict[str, str], info: Path, token: str
    ) -> None:
        super().__init__(label, argv, log, env)
        self.info_file = info
        self.token = token
        self.url = ""

    def wait_ready(self, slots: int | None = None, timeout: float = READY_SECONDS) -> None:
        """Until the info file is written and, given ``slots``, ``specifications/`` counts
        them (a front counts the slots of the live workers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail(f"exited with status {self.popen.returncode}")
            info = read_server_info(self.info_file) if self.info_file.exists() else None
            if info is not None:
                self.url = info.url
                if slots is None or self.slots() == slots:
                    self.remember_children()
                    return
            time.sleep(0.05)
        raise self.fail(f"was not ready ({slots} slots) within {timeout:g} s")

    def slots(self) -> int | None:
        """``container.count`` of ``specifications/``, or None while it cannot answer."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(self.get_json("specifications/")["container"]["count"])
        return None

    def get_json(self, path: str) -> Any:
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())


class Place:
    """The scratch directory and every process of one bench run; :meth:`close` undoes all."""

    def __init__(self, s3: str = "moto") -> None:
        if s3 not in S3_SERVERS:
            raise ValueError(f"unknown S3 server {s3!r}: one of {', '.join(S3_SERVERS)}")
        self.root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
        self.started: list[Process] = []
        self.redis_port = 0
        self.redis_password = secrets.token_urlsafe(16)
        #: Which S3 server (:data:`S3_SERVERS`), its URL, and its name and version once started.
        self.s3 = s3
        self.s3_url = ""
        self.s3_label = ""
        #: Whether the S3 server's log shows its requests (see :meth:`s3_requests_since`).
        self.s3_counting = False
        self.bucket = f"bench-{secrets.token_hex(6)}"
        self.s3_key = S3RVER_KEY if s3 == "s3rver" else "bench"
        self.env = _child_environment(self.root, self.s3_key)

    # -- the shared parts -----------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://:{quote(self.redis_password, safe='')}@127.0.0.1:{self.redis_port}/0"

    def cluster_args(self) -> list[str]:
        return [
            "--cluster",
            self.redis_url,
            "--storage",
            f"s3://{self.bucket}/{PREFIX}",
            "--s3-endpoint",
            self.s3_url,
        ]

    def start_redis(self, program: str) -> Process:
        """A private ``redis-server`` with a password, persisting nothing; retried on another
        port if the free one was taken meanwhile."""
        for _attempt in range(5):
            self.redis_port = free_port()
            config = self.root / "redis.conf"
            config.write_text(
                f'port {self.redis_port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
                f"requirepass {self.redis_password}\ndir {self.root}\nloglevel warning\n"
            )
            config.chmod(0o600)  # the password is in it
            process = self._start(
                Process("redis-server", [program, str(config)], self._log("redis"))
            )
            if self._redis_answers(process):
                return process
            process.stop(grace=2)
        raise process.fail(f"did not answer an authenticated PING on port {self.redis_port}")

    def _redis_answers(self, process: Process) -> bool:
        import redis

        client = self.redis_client()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and process.alive():
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return True
                time.sleep(0.01)
        finally:
            client.close()
        return False

    def redis_client(self) -> Any:
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.redis_port,
            password=self.redis_password,
            socket_connect_timeout=2,
            socket_timeout=5,
        )

    def start_s3(self, programs: Programs) -> Process:
        """The S3 server chosen at construction, with the bench's bucket; then whether its
        log counts requests (the bucket's probe must be in it)."""
        if self.s3 == "s3rver":
            assert programs.s3rver is not None, "require_prerequisites('s3rver') finds it"
            process = self.start_s3rver(programs.s3rver)
        else:
            process = self.start_moto()
        self.s3_counting = self._log_shows_requests()
        return process

    def start_moto(self) -> Process:
        """``python -m moto.server`` (S3 in server mode) and the bench's bucket."""
        import moto

        port = free_port()
        self.s3_url = f"http://127.0.0.1:{port}"
        self.s3_label = f"moto {moto.__version__} (server mode)"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        process = self._start(Process("moto_server", argv, self._log("s3"), self.env))
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if not process.alive():
                raise process.fail(
                    f"exited with status {process.popen.returncode} ({MOTO_INSTALL})"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.s3_url}/moto-api/", timeout=1),
            ):
                self.s3_client().create_bucket(Bucket=self.bucket)
                return process
            time.sleep(0.05)
        raise process.fail(f"did not answer on {self.s3_url} within {READY_SECONDS:g} s")

    def start_s3rver(self, program: str) -> Process:
        """``s3rver`` on a port it picks (``-p 0``, read back from its first line), objects
        under the scratch directory, the bench's bucket made at start-up. ``FORCE_COLOR``:
        s3rver cuts 16 characters of colour codes off each koa-logger line, so without
        colours the method would be cut off instead."""
        self.s3_label = f"s3rver {s3rver_version(program)}"
        argv = [program, "-d", str(self.root / "s3rver-data"), "-a", "127.0.0.1", "-p", "0"]
        argv += ["--configure-bucket", self.bucket]
        env = dict(self.env, FORCE_COLOR="1")
        process = self._start(Process("s3rver", argv, self._log("s3"), env))
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if not process.alive():
                raise process.fail(
                    f"exited with status {process.popen.returncode} ({S3RVER_INSTALL})"
                )
            listening = _S3RVER_LISTENING.search(self._log("s3").read_text(errors="replace"))
            if listening is not None:
                self.s3_url = f"http://127.0.0.1:{listening.group(1)}"
                with contextlib.suppress(Exception):  # botocore's errors, until it is ready
                    self.s3_client().head_bucket(Bucket=self.bucket)
                    return process
            time.sleep(0.05)
        raise process.fail(f"did not serve its bucket within {READY_SECONDS:g} s")

    def _log_shows_requests(self, patience: float = 2.0) -> bool:
        """Whether the S3 server's log has shown the bucket's probe (a server logs a request
        just after answering it)."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            if self._s3_requests_in(self._read_s3_log(0)):
                return True
            time.sleep(0.05)
        return False

    def s3_client(self) -> Any:
        """A boto3 client of the bench's S3 server, set up as the cluster's own (path-style
        addresses, checksums only where required: s3rver refuses botocore's default trailers)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            region_name="us-east-1",
            aws_access_key_id=self.s3_key,
            aws_secret_access_key=self.s3_key,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def s3_log_offset(self) -> int:
        """Where the S3 server's log ends now (see :meth:`s3_requests_since`)."""
        return self._log("s3").stat().st_size

    def worker_log_offsets(self) -> dict[Path, int]:
        """Where each worker's log ends now (see :meth:`task_seconds_since`)."""
        return {log: log.stat().st_size for log in self.root.glob("worker-*.log")}

    def task_seconds_since(self, offsets: dict[Path, int]) -> list[float]:
        """How long each job took on its worker since ``offsets``, from Celery's log lines
        ``Task sk.run_job[...] succeeded in 0.0123s``: claim to answer, save included."""
        text = self._worker_logs_since(offsets)
        return [float(found) for found in _TASK_LINE.findall(text)]

    def worker_events_since(self, offsets: dict[Path, int]) -> dict[str, int]:
        """What the workers logged since ``offsets``: jobs run, environments fetched from the
        bucket (a cell that ran away from its environment), copies dropped at the claim."""
        text = self._worker_logs_since(offsets)
        return {event: text.count(marker) for event, marker in _WORKER_EVENTS.items()}

    def _worker_logs_since(self, offsets: dict[Path, int]) -> str:
        parts = []
        for log, offset in offsets.items():
            with open(log, "rb") as file:
                file.seek(offset)
                parts.append(file.read().decode(errors="replace"))
        return "\n".join(parts)

    def s3_requests_since(self, offset: int) -> collections.Counter[str] | None:
        """The requests the S3 server logged since ``offset``, as ``"PUT blob"``,
        ``"GET manifest"``...; None when its log does not show requests (checked at start)."""
        if not self.s3_counting:
            return None
        return self._s3_requests_in(self._read_s3_log(offset))

    def _read_s3_log(self, offset: int) -> str:
        with open(self._log("s3"), "rb") as log:
            log.seek(offset)
            return _ANSI_CODE.sub("", log.read().decode(errors="replace"))

    def _s3_requests_in(self, text: str) -> collections.Counter[str]:
        pattern = _S3RVER_REQUEST_LINE if self.s3 == "s3rver" else _MOTO_REQUEST_LINE
        counts: collections.Counter[str] = collections.Counter()
        for match in pattern.finditer(text):
            method, path = match.groups()
            counts[f"{method} {_object_kind(path, self.bucket)}"] += 1
        return counts

    # -- sandbox-kernel processes ---------------------------------------------------------------

    def start_worker(self, name: str, slots: int = 2) -> Process:
        """``sandbox-kernel worker`` (not waited for: see :meth:`wait_workers`)."""
        argv = [
            *_sandbox_kernel("worker"),
            *self.cluster_args(),
            "--workers",
            str(slots),
            "--data-dir",
            str(self.root / f"worker-{name}"),
            "--name",
            name,
        ]
        return self._start(Process(f"worker {name}", argv, self._log(f"worker-{name}"), self.env))

    def wait_workers(self, workers: dict[str, Process], timeout: float = READY_SECONDS) -> None:
        """Until each worker's heartbeat key (``sk:worker:NAME``) is in Redis."""
        client = self.redis_client()
        try:
            deadline = time.monotonic() + timeout
            waiting = dict(workers)
            while waiting and time.monotonic() < deadline:
                for name, process in list(waiting.items()):
                    if not process.alive():
                        raise process.fail(f"exited with status {process.popen.returncode}")
                    with contextlib.suppress(Exception):
                        if client.exists(f"sk:worker:{name}"):
                            process.remember_children()
                            del waiting[name]
                time.sleep(0.05)
        finally:
            client.close()
        if waiting:
            name, process = next(iter(waiting.items()))
            raise process.fail(f"wrote no heartbeat (sk:worker:{name}) within {timeout:g} s")

    def start_front(self, name: str = "front") -> Server:
        return self._server(name, ["--name", name, *self.cluster_args()])

    def start_single(self, name: str = "single", slots: int = 2) -> Server:
        return self._server(name, ["--workers", str(slots)])

    def _server(self, name: str, options: list[str]) -> Server:
        token = secrets.token_urlsafe(24)
        token_file = self.root / f"{name}.token"
        write_token_file(token_file, token)
        info = self.root / f"{name}.json"
        argv = [
            *_sandbox_kernel("serve"),
            *options,
            "--port",
            "0",
            "--info-file",
            str(info),
            "--no-advertise",
            "--token-file",
            str(token_file),
            "--data-dir",
            str(self.root / name),
            "--exit-with-parent",
        ]
        server = Server(name, argv, self._log(name), self.env, info, token)
        self._start(server)
        return server

    # -- the end --------------------------------------------------------------------------------

    def close(self, keep_logs: Path | None = None) -> list[str]:
        """Stop everything, newest first; kill and name whatever was left behind; copy the
        logs into ``keep_logs`` if given; remove the scratch directory. The list says what had
        to be killed (empty when all went well)."""
        problems = []
        for process in reversed(self.started):
            process.stop()
            deadline = time.monotonic() + 5
            while process.survivors() and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in process.survivors():
                problems.append(f"{process.label} left pid {pid} behind: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.started.clear()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in self.root.glob("*.log"):
                shutil.copy(log, keep_logs / log.name)
        shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _start(self, process: _P) -> _P:
        self.started.append(process)
        return process

    def _log(self, name: str) -> Path:
        return self.root / f"{name}.log"


#: A request line of moto's log (werkzeug's): ``"PUT /bucket/prefix/blobs/... HTTP/1.1" 200``.
_MOTO_REQUEST_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" \d{3}')
#: A request line of s3rver's log (koa-logger's, through winston), colour codes removed:
#: ``info: PUT /bucket/prefix/blobs/... 200 3ms 0b``.
_S3RVER_REQUEST_LINE = re.compile(r"^info: ([A-Z]+) (\S+) \d{3} ", re.MULTILINE)
#: s3rver's first line, with the port it bound (``-p 0``).
_S3RVER_LISTENING = re.compile(r"S3rver listening on [0-9.]+:([0-9]+)")
_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


#: Celery's line for a finished job (``celery.app.trace``, level INFO).
_TASK_LINE = re.compile(r"Task sk\.run_job\[[^\]]+\] succeeded in ([0-9.e-]+)s")


#: The workers' log lines counted by :meth:`Place.worker_events_since`.
_WORKER_EVENTS = {
    "jobs run": " ran on ",
    "environments fetched from the bucket": "fetched from the bucket",
    "copies dropped at the claim": "dropped: claimed before",
}


def _object_kind(path: str, bucket: str) -> str:
    if "/blobs/" in path:
        return "blob"
    if "/envs/" in path:
        return "manifest"
    if "/uploads/" in path:
        return "upload"
    if "?" in path:
        return "list"
    return "bucket" if path.rstrip("/") == f"/{bucket}" else "other"


def _sandbox_kernel(command: str) -> list[str]:
    return [sys.executable, "-m", "sandbox_kernel.cli", command]


def _child_environment(root: Path, key: str) -> dict[str, str]:
    """The bench's environment minus the developer's AWS settings, plus the S3 server's dummy
    keys (``key`` as both): nothing the bench starts can reach a real AWS account."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=key,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(root / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    return env
