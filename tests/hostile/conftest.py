"""The harness of the hostile suite: a server with small caps, a canary, and the checks that
follow every case.

A case is a function of a fresh *marker* (twelve random digits, put into the argv of whatever
the case starts and into the names of the files it tries to write). :meth:`Hostile.trial` runs
it, then checks that the case survived:

- the server still runs, and answers a trivial ``execute/`` correctly;
- no process whose command line holds the marker is left on the machine, the server's process
  tree is back to its idle size (ready runners), and the run cgroups are gone;
- nothing outside the working directory was written: the canary directory on the host (world
  writable, aimed at by absolute path from inside the sandbox) is unchanged, and no file named
  after the marker appeared in the host's ``/``, ``/tmp``, ``/var/tmp``, ``/dev/shm`` or
  ``/home``;
- no upload is left half-extracted under ``staging/<pid>/``, no working directory of a finished
  run is left, and the server's RSS stays under 300 MB.

Every trial is counted; the end of the session prints how many were tried, answered as
documented, and survived.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import secrets
import select
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from sandbox_kernel.server.cgroups import server_group_name

from ..conftest import Server, descendants, processes_matching, wait_until
from ..helpers import living

MiB = 1024**2
KiB = 1024
WORKERS = 2
EXECUTE_TIMEOUT = 3.0
MAX_PROCESSES = 40
MEMORY_LIMIT = 64 * MiB
WORKDIR_QUOTA = 4 * MiB
MAX_STORAGE = 16 * MiB
MAX_UPLOAD = 1 * MiB
MAX_ENTRIES = 20
MAX_ARCHIVE_BYTES = 1 * MiB
MAX_OUTPUT = 64 * KiB
CPU_LIMIT = 1
MAX_PARTS = 4
#: Fixed by the server (not an option): the biggest ``config`` part.
MAX_CONFIG = 1 * MiB
#: The server's memory after any case, however big the body it was sent.
MAX_RSS = 300 * MiB

CAPS = (
    "--workers",
    str(WORKERS),
    "--execute-timeout",
    str(int(EXECUTE_TIMEOUT)),
    "--max-processes",
    str(MAX_PROCESSES),
    "--memory-limit",
    "64M",
    "--workdir-quota",
    "4M",
    "--max-storage",
    "16M",
    "--max-upload",
    "1M",
    "--max-archive-entries",
    str(MAX_ENTRIES),
    "--max-archive-bytes",
    "1M",
    "--max-output",
    "64K",
    "--cpu-limit",
    str(CPU_LIMIT),
    "--max-parts",
    str(MAX_PARTS),
)

#: What the canary file holds: it must never show up in an answer.
SECRET = f"canary-secret-{secrets.token_hex(8)}"
CANARY_FILE = "canary.txt"


def new_marker() -> str:
    """Twelve random digits: a valid ``sleep`` argument and file name no other process has."""
    return str(random.randrange(10**11, 10**12))


# -- the tally ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    answered: bool  # got its documented answer
    survived: bool  # server serving, nothing left behind, nothing written outside
    problems: list[str]


TALLY: dict[str, Outcome] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TALLY:
        return
    tried = len(TALLY)
    answered = sum(outcome.answered for outcome in TALLY.values())
    survived = sum(outcome.survived for outcome in TALLY.values())
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "hostile inputs")
    write(
        f"{tried} hostile cases tried, {survived} survived (server still serving, no process "
        "left, nothing written outside the working directory, nothing half-extracted), "
        f"{answered} got their documented answer"
    )
    groups: dict[str, list[Outcome]] = {}
    for name, outcome in TALLY.items():
        groups.setdefault(name.split(":", 1)[0], []).append(outcome)
    write(
        "  "
        + ", ".join(
            f"{group} {sum(o.survived for o in outcomes)}/{len(outcomes)} survived"
            for group, outcomes in sorted(groups.items())
        )
    )
    for name, outcome in sorted(TALLY.items()):
        if not (outcome.answered and outcome.survived):
            what = "NOT SURVIVED" if not outcome.survived else "wrong answer"
            write(f"  {what}: {name}: {outcome.problems[0].splitlines()[0][:160]}")


# -- raw HTTP -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    """An ``execute/`` answer: HTTP status, the JSON object (200 only) and the raw text."""

    status: int
    data: dict[str, Any] | None
    text: str

    @property
    def json(self) -> dict[str, Any]:
        assert self.status == 200 and self.data is not None, f"{self.status}: {self.text[:300]}"
        return self.data

    def entry(self, index: int = 0) -> dict[str, Any]:
        execution: list[dict[str, Any]] = self.json["execution"]
        return execution[index]


@dataclasses.dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client managed to send before the answer came

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def multipart(parts: Iterable[tuple[str, bytes, str | None]], boundary: str = "hostile") -> bytes:
    """A ``multipart/form-data`` body: ``(name, data, filename or None)`` per part."""
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def chunked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """HTTP/1.1 chunked framing of ``chunks`` (no Content-Length: the server cannot know the
    size in advance)."""
    for chunk in chunks:
        if chunk:
            yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    yield b"0\r\n\r\n"


class Hostile:
    """A server with small caps, a canary directory on the host, and the after-case checks."""

    def __init__(self, server: Server, canary: Path, workers: int) -> None:
        self.server = server
        self.canary = canary
        self.workers = workers
        self.port = urlsplit(server.url).port or 80
        pid = server.pid
        self.work_area = server.work_area
        self.staging = server.data_dir / "staging" / str(pid)
        name = server_group_name(pid)
        self.cgroups = [
            path
            for path in (
                Path(f"/sys/fs/cgroup/pids/{name}"),
                Path(f"/sys/fs/cgroup/memory/{name}"),
                Path(f"/sys/fs/cgroup/{name}"),
            )
            if path.is_dir()
        ]
        self.idle_processes = self._settled_process_count()
        #: Seconds the after-case checks wait for things to settle (teardowns are async).
        self.patience = 5.0

    # -- requests -----------------------------------------------------------------------------

    def post(self, config: Any, environment: bytes | None = None) -> requests.Response:
        return self.server.post_execute(config, environment)

    def raw(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str | bytes | None] | None = None,
        body: Iterable[bytes] | bytes = b"",
        timeout: float = 30.0,
    ) -> RawAnswer:
        """One request over a plain socket, headers sent exactly as given.

        Defaults: ``Host`` of the server, the bearer token, ``Connection: close``. A header
        given as None is left out. The body is sent piece by piece, and the client stops
        sending as soon as the server answers (as browsers and curl do), so an early 413 is
        read rather than lost to a reset.
        """
        fields: dict[str, str | bytes | None] = {
            "Host": f"127.0.0.1:{self.port}",
            "Authorization": f"Bearer {self.server.token}",
            "Connection": "close",
        }
        fields.update(headers or {})
        if isinstance(body, bytes) and "Content-Length" not in fields:
            fields["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n".encode()
        for name, value in fields.items():
            if value is not None:
                raw_value = value if isinstance(value, bytes) else value.encode("latin-1")
                head += name.encode() + b": " + raw_value + b"\r\n"
        pieces = [body] if isinstance(body, bytes) else body
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(head + b"\r\n")
            sent = 0
            for piece in pieces:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered already
                try:
                    sock.sendall(piece)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(piece)
            response = http.client.HTTPResponse(sock, method=method)
            response.begin()
            data = response.read()
            return RawAnswer(response.status, dict(response.getheaders()), data, sent)

    # -- what a command case tries on the side -------------------------------------------------

    def attack(self, marker: str) -> str:
        """A command writing outside the working directory by absolute path, and reading the
        host's canary: it must print nothing (every attempt fails)."""
        targets = " ".join(
            [
                f"{self.canary}/{marker}",
                f"{self.canary}/{CANARY_FILE}",
                f"/{marker}",
                f"/home/{marker}",
                f"/usr/{marker}",
                f"/etc/{marker}",
                f"/var/tmp/{marker}",
                f"/opt/{marker}",
            ]
        )
        return (
            f'-for p in {targets}; do if (echo {marker} >> "$p") 2>/dev/null; then '
            'echo "wrote $p"; fi; done; '
            f"cat {self.canary}/{CANARY_FILE} /proc/*/root{self.canary}/{CANARY_FILE} "
            "2>/dev/null; "
            f"echo {marker} > /tmp/{marker}; echo {marker} > /dev/shm/{marker}; true"
        )

    def execute(
        self, config: dict[str, Any], marker: str, environment: bytes | None = None
    ) -> Answer:
        """``config`` with :meth:`attack` run first; the answer comes back without the attack's
        entry, which is checked here: nothing was written or read outside."""
        response = self.post(
            {**config, "commands": [self.attack(marker), *config["commands"]]}, environment
        )
        assert SECRET not in response.text, "the answer holds the host's canary"
        if response.status_code != 200:
            return Answer(response.status_code, None, response.text)
        data = response.json()
        first = data["execution"].pop(0)
        assert first["stdout"] == "", f"the sandbox reached the host: {first['stdout']!r}"
        return Answer(200, data, response.text)

    # -- the trial ------------------------------------------------------------------------------

    def trial(self, case_id: str, case: Callable[[str], None]) -> None:
        """Run ``case(marker)`` (it sends and asserts the documented answer), then check that
        the server survived it; record both in the tally and fail with every problem found."""
        marker = new_marker()
        before = self.canary_state()
        problems: list[str] = []
        try:
            case(marker)
        except AssertionError as error:
            problems.append(f"wrong answer: {error}")
        except Exception as error:
            problems.append(f"no answer: {type(error).__name__}: {error}")
        answered = not problems
        survival = self.survival_problems(marker, before)
        problems += survival
        TALLY[case_id] = Outcome(answered, not survival, problems)
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)

    def survival_problems(self, marker: str, canary_before: dict[str, Any]) -> list[str]:
        process = self.server.embedded.process
        if process is None or process.poll() is not None:
            return ["the server is gone"]
        problems = []
        if not wait_until(lambda: not processes_matching(marker), self.patience):
            left = {pid: _cmdline(pid) for pid in processes_matching(marker)}
            problems.append(f"processes of the case left running: {left}")
        if not wait_until(
            lambda: len(descendants(self.server.pid)) <= self.idle_processes, self.patience
        ):
            tree = {pid: _cmdline(pid) for pid in descendants(self.server.pid)}
            problems.append(
                f"the server's tree has {len(tree)} processes, {self.idle_processes} when "
                f"idle: {tree}"
            )
        if not wait_until(lambda: self.run_cgroups() <= self.workers, self.patience):
            problems.append(f"{self.run_cgroups()} run cgroups left for {self.workers} runners")
        if not wait_until(lambda: not _entries(self.staging), self.patience):
            problems.append(f"left in staging/: {_entries(self.staging)}")
        if not wait_until(lambda: len(_entries(self.work_area)) <= self.workers, self.patience):
            problems.append(f"working directories left: {_entries(self.work_area)}")
        after = self.canary_state()
        if after != canary_before:
            problems.append(f"the canary changed: {canary_before} -> {after}")
        written = self.host_files_named(marker)
        if written:
            problems.append(f"files written on the host: {written}")
        rss = self.rss()
        if rss > MAX_RSS:
            problems.append(f"the server's RSS is {rss // MiB} MiB")
        try:
            response = self.server.http.post(
                self.server.url + "execute/",
                files={"config": (None, json.dumps({"commands": ["echo alive"]}))},
                timeout=15,
            )
            data = response.json() if response.status_code == 200 else {}
            entry = data.get("execution", [{}])[0]
            if (data.get("status"), entry.get("stdout"), entry.get("stderr")) != (0, "alive", ""):
                problems.append(
                    f"trivial execute after the case: {response.status_code} {response.text[:300]}"
                )
        except (requests.RequestException, ValueError, KeyError) as error:
            problems.append(f"trivial execute after the case failed: {error!r}")
        return problems

    # -- observations ---------------------------------------------------------------------------

    def canary_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for root, directories, files in os.walk(self.canary):
            for name in [".", *directories, *files]:
                path = Path(root, name)
                info = path.lstat()
                content = path.read_bytes() if path.is_file() else None
                state[str(path.relative_to(self.canary))] = (
                    info.st_mode,
                    info.st_size,
                    info.st_mtime_ns,
                    content,
                )
        return state

    def host_files_named(self, marker: str) -> list[str]:
        found = []
        for directory in ("/", "/tmp", "/var/tmp", "/dev/shm", "/home", "/home/student"):
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            found += [os.path.join(directory, name) for name in names if marker in name]
        return found

    def run_cgroups(self) -> int:
        return max((len(_entries(path, "run-")) for path in self.cgroups), default=0)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def saved_environments(self) -> set[str]:
        return {
            entry.name
            for entry in (self.server.data_dir / "environments").iterdir()
            if entry.is_dir()
        }

    def _settled_process_count(self) -> int:
        """The server's tree once its ready runners are up and nothing changes for 0.5 s."""
        deadline = time.monotonic() + 10
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = len(descendants(self.server.pid))
            if count != last:
                last, since = count, time.monotonic()
            elif count >= self.workers and time.monotonic() - since >= 0.5:
                return count
            time.sleep(0.05)
        pytest.fail(f"the server's runners never settled ({last} processes)", pytrace=False)


def _entries(directory: Path, prefix: str = "") -> list[str]:
    try:
        return sorted(name for name in os.listdir(directory) if name.startswith(prefix))
    except FileNotFoundError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


# -- servers ------------------------------------------------------------------------------------


def _require_program(program: str, package: str) -> None:
    if shutil.which(program) is None:
        pytest.fail(
            f"{program} is missing: the hostile cases run it inside the sandbox; install the "
            f"Debian package {package} (apt-get install -y {package})",
            pytrace=False,
        )


def make_hostile(
    start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory, *extra: str
) -> Hostile:
    """A server with :data:`CAPS` (``extra`` options override them) and its canary."""
    for program, package in (
        ("python3", "python3"),
        ("mkfifo", "coreutils"),
        ("setsid", "util-linux"),
    ):
        _require_program(program, package)
    args = (*CAPS, *extra)
    workers = int(args[len(args) - 1 - list(reversed(args)).index("--workers") + 1])
    server = start_server(*args, token=secrets.token_urlsafe(24))
    isolation = server.get("specifications/").json()["container"]["isolation"]
    if not isolation["isolated"] or not isolation["cgroups"]:
        server.stop()
        pytest.fail(
            "the hostile suite needs bubblewrap and cgroups (pids and memory controllers) to "
            f"contain fork bombs and memory hogs; the server reports: {isolation}. Run it as "
            "root on a machine with cgroup v1, or a delegated cgroup v2 subtree.",
            pytrace=False,
        )
    canary = tmp_path_factory.mktemp("canary")
    canary.chmod(0o777)
    (canary / CANARY_FILE).write_text(SECRET + "\n")
    (canary / CANARY_FILE).chmod(0o666)
    return Hostile(server, canary, workers)


def stop_and_check(hostile: Hostile) -> None:
    """Stop a hostile server: it must exit at once and leave no process and no cgroup."""
    tree = descendants(hostile.server.pid)
    hostile.server.stop()
    assert wait_until(lambda: not living(tree), 5), (
        f"processes left after the server stopped: {[_cmdline(pid) for pid in living(tree)]}"
    )
    assert wait_until(lambda: not any(path.exists() for path in hostile.cgroups), 5), (
        f"cgroups left after the server stopped: {hostile.cgroups}"
    )


@pytest.fixture(scope="module")
def hostile(
    start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    """The module's server with small caps (:data:`CAPS`)."""
    harness = make_hostile(start_server, tmp_path_factory)
    yield harness
    stop_and_check(harness)


@pytest.fixture
def trial(
    hostile: Hostile, request: pytest.FixtureRequest
) -> Callable[[Callable[[str], None]], None]:
    """``trial(case)``: :meth:`Hostile.trial` on the module's server, named after the test."""
    module = request.node.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    name = request.node.name.removeprefix("test_")
    return lambda case: hostile.trial(f"{module}: {name}", case)
