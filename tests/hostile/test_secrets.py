"""No secret on a command line: while each part runs, another local user (``nobody``) reads
every process's command line (``ps`` and ``/proc/*/cmdline``, and tries ``/proc/*/environ``)
and finds neither the sandbox token nor JupyterLab's token.

Covered: ``serve --token-file`` (an existing file, a file it creates, a file others can read:
refused), ``serve`` with its default token (advertised, or ``--no-advertise``), ``run`` with its
private server and with ``--url --token-file``, ``lab`` (JupyterLab, its kernel and the embedded
sandbox), ``demo`` and a kernel with its private embedded server. ``serve --token`` is the
documented exception: the scan finds that token, which also proves the scan can see one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import nbformat
import pytest
import requests

from sandbox_kernel.discovery import read_server_info, read_token_file

from ..conftest import KernelSession, Server, descendants, processes_matching, wait_until
from ..helpers import free_port, kernel_env

CLI = [sys.executable, "-m", "sandbox_kernel.cli"]
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
#: What ``nobody`` reads: every command line, and every environment it is allowed to read.
SCAN = "cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null; true"
SERVER_MODULE = "sandbox_kernel.server"


# -- what another user sees ---------------------------------------------------------------------


def seen_by_nobody() -> bytes:
    """Every process's command line as user ``nobody`` sees it, through ``ps`` and ``/proc``."""
    if shutil.which("setpriv") is None or shutil.which("ps") is None:
        pytest.fail("setpriv and ps are needed (Debian packages util-linux, procps)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the scan runs as user nobody through setpriv: run the tests as root",
                    pytrace=False)  # fmt: skip
    # A clean environment: the scanning processes' own environ (readable by nobody) must not
    # carry the test's.
    clean = {"PATH": "/usr/bin:/bin"}
    ps = subprocess.run([*AS_NOBODY, "ps", "-eww", "-o", "args"], capture_output=True,
                        timeout=30, env=clean)  # fmt: skip
    assert ps.returncode == 0, ps.stderr.decode(errors="replace")
    proc = subprocess.run([*AS_NOBODY, "sh", "-c", SCAN], capture_output=True, timeout=30,
                          env=clean)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return ps.stdout + b"\n" + proc.stdout


def assert_hidden(secrets: dict[str, str | None], must_see: str | Path) -> None:
    """``nobody`` sees ``must_see`` (a word of the command line of the process under test: the
    scan works and reaches it) and none of ``secrets`` (name: value)."""
    must_see = str(must_see)
    missing = [name for name, value in secrets.items() if not value]
    assert not missing, f"the test could not find the secrets it looks for: {missing}"
    seen = seen_by_nobody()
    assert must_see.encode() in seen, f"user nobody does not see {must_see!r}: the scan is blind"
    leaked = [name for name, value in secrets.items() if value and value.encode() in seen]
    assert not leaked, f"user nobody can read {leaked} in the process table"


def _arguments(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _option(arguments: list[str], name: str) -> str | None:
    for index, word in enumerate(arguments[:-1]):
        if word == name:
            return arguments[index + 1]
    return None


def server_tokens(below: int) -> list[str]:
    """The tokens of the sandbox servers running below process ``below``, read (as their
    user may) from the files their command lines name."""
    tokens = []
    for pid in descendants(below):
        arguments = _arguments(pid)
        if SERVER_MODULE not in arguments:
            continue
        token_file = _option(arguments, "--token-file")
        info_file = _option(arguments, "--info-file")
        if token_file:
            tokens.append(read_token_file(Path(token_file)))
        elif info_file:
            info = read_server_info(Path(info_file))
            if info is not None and info.token:
                tokens.append(info.token)
    return tokens


def answers_with(url: str, token: str) -> tuple[int, int]:
    """``specifications/`` with ``token`` and without one: (200, 401) for a server using it."""
    good = requests.get(url + "specifications/", headers={"Authorization": f"Bearer {token}"},
                        timeout=30)  # fmt: skip
    bad = requests.get(url + "specifications/", timeout=30)
    return good.status_code, bad.status_code


# -- processes --------------------------------------------------------------------------------


@contextlib.contextmanager
def running(
    command: list[str], log: Path, cwd: Path | None = None, stop: int = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` running with its output in ``log``; stopped (``stop``, then SIGKILL) after."""
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(stop)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_info(info_file: Path, process: subprocess.Popen[bytes], log: Path) -> str:
    """The URL of a server once its info file appears."""

    def ready() -> bool:
        return read_server_info(info_file) is not None or process.poll() is not None

    assert wait_until(ready, 60), f"the server never started: {log.read_text()[-2000:]}"
    info = read_server_info(info_file)
    assert info is not None, f"the server stopped: {log.read_text()[-2000:]}"
    return info.url


def serve(tmp_path: Path, *args: str) -> list[str]:
    return [*CLI, "serve", "--port", "0", "--workers", "1", "--data-dir", str(tmp_path / "data"),
            *args]  # fmt: skip


def sandbox_notebook(folder: Path, *cells: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "sandbox", "display_name": "Sandbox (bash)",
                                       "language": "bash"}  # fmt: skip
    notebook.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    nbformat.write(notebook, folder / "slow.ipynb")


def marker() -> str:
    """A ``sleep`` argument no other process has."""
    return f"7.{time.time_ns() % 10**9:09d}"


def sleeping(mark: str) -> bool:
    """Whether ``sleep <mark>`` runs (in a sandbox): the cell or command has started."""
    return any(_arguments(pid)[:2] == ["sleep", mark] for pid in processes_matching(mark))


# -- serve ----------------------------------------------------------------------------------------


def test_serve_reads_its_token_from_a_file(tmp_path: Path, jupyter_dirs: dict[str, str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-" + os.urandom(12).hex() + "\n")
    token_file.chmod(0o600)
    token = token_file.read_text().strip()
    info_file, log = tmp_path / "info.json", tmp_path / "serve.log"
    command = serve(tmp_path, "--token-file", str(token_file), "--no-advertise",
                    "--info-file", str(info_file))  # fmt: skip
    with running(command, log) as process:
        url = wait_for_info(info_file, process, log)
        assert answers_with(url, token) == (200, 401)
        assert_hidden({"sandbox token": token}, must_see=tmp_path / "data")
    output = log.read_text()
    assert f"token: in {token_file}" in output and token not in output


def test_serve_creates_a_missing_token_file(tmp_path: Path, jupyter_dirs: dict[str, str]) -> None:
    token_file = tmp_path / "new-token"
    info_file, log = tmp_path / "info.json", tmp_path / "serve.log"
    command = serve(tmp_path, "--token-file", str(token_file), "--no-advertise",
                    "--info-file", str(info_file))  # fmt: skip
    with running(command, log) as process:
        url = wait_for_info(info_file, process, log)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = read_token_file(token_file)
        assert answers_with(url, token) == (200, 401)
        assert_hidden({"sandbox token": token}, must_see=tmp_path / "data")
    assert token_file.exists(), "a token file the user named is kept for the next start"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_serve_refuses_a_token_file_others_can_open(
    tmp_path: Path, jupyter_dirs: dict[str, str], mode: int
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("shared-token")
    token_file.chmod(mode)
    done = subprocess.run(serve(tmp_path, "--token-file", str(token_file), "--no-advertise"),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"chmod 600 {token_file}" in done.stderr and "open to other users" in done.stderr


def test_serve_refuses_a_token_file_of_another_user(
    tmp_path: Path, jupyter_dirs: dict[str, str]
) -> None:
    """Its owner could change the token to one they know."""
    token_file = tmp_path / "token"
    token_file.write_text("planted-token")
    token_file.chmod(0o600)
    os.chown(token_file, 65534, 65534)  # nobody
    done = subprocess.run(serve(tmp_path, "--token-file", str(token_file), "--no-advertise"),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "belongs to another user" in done.stderr


def test_serve_default_token_is_only_in_the_advertised_file(
    tmp_path: Path, jupyter_dirs: dict[str, str]
) -> None:
    runtime = Path(jupyter_dirs["JUPYTER_RUNTIME_DIR"])
    log = tmp_path / "serve.log"
    with running(serve(tmp_path), log) as process:
        advert = runtime / f"sandbox-kernel-server-{process.pid}.json"
        url = wait_for_info(advert, process, log)
        assert stat.S_IMODE(advert.stat().st_mode) == 0o600
        token = read_token_file(advert)  # the advertisement is the token file
        assert answers_with(url, token) == (200, 401)
        assert_hidden({"sandbox token": token}, must_see=tmp_path / "data")
    output = log.read_text()
    assert f"token: in {advert}" in output and token not in output
    assert not advert.exists()


def test_serve_without_advertising_keeps_its_token_in_the_runtime_dir(
    tmp_path: Path, jupyter_dirs: dict[str, str]
) -> None:
    runtime = Path(jupyter_dirs["JUPYTER_RUNTIME_DIR"])
    log = tmp_path / "serve.log"
    with running(serve(tmp_path, "--no-advertise"), log) as process:
        token_file = runtime / f"sandbox-kernel-token-{process.pid}"
        assert wait_until(lambda: "serving the sandbox" in log.read_text(), 60), log.read_text()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = read_token_file(token_file)
        port = re.search(r"on http://127\.0\.0\.1:(\d+)/", log.read_text())
        assert port, log.read_text()
        assert answers_with(f"http://127.0.0.1:{port[1]}/", token) == (200, 401)
        assert_hidden({"sandbox token": token}, must_see=tmp_path / "data")
    assert f"token: in {token_file}" in log.read_text()
    assert not token_file.exists()


def test_serve_token_on_the_command_line_is_visible_as_documented(
    tmp_path: Path, jupyter_dirs: dict[str, str]
) -> None:
    """The documented exception, and the proof that the scan sees a token where there is one."""
    token = "argv-token-" + os.urandom(12).hex()
    info_file, log = tmp_path / "info.json", tmp_path / "serve.log"
    command = serve(tmp_path, "--token", token, "--no-advertise", "--info-file", str(info_file))
    with running(command, log) as process:
        url = wait_for_info(info_file, process, log)
        assert answers_with(url, token) == (200, 401)
        assert token.encode() in seen_by_nobody()
    assert token not in log.read_text()


@pytest.mark.parametrize("command", ["serve", "run", "lab", "demo"])
def test_help_warns_about_token_on_the_command_line(command: str) -> None:
    done = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True, timeout=60,
                          env=kernel_env(COLUMNS="200"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--token-file PATH" in text
    assert "WARNING: every local user sees a command line (ps); prefer --token-file" in text


# -- run ------------------------------------------------------------------------------------------


def test_run_with_its_private_server(tmp_path: Path, jupyter_dirs: dict[str, str]) -> None:
    mark = marker()
    log = tmp_path / "run.log"
    env_free = {"SANDBOX_URL", "SANDBOX_TOKEN"}
    assert not env_free & set(os.environ), "the session must not configure a sandbox"
    with running([*CLI, "run", "--", f"sleep {mark}; echo finished"], log) as process:
        assert wait_until(lambda: bool(sleeping(mark)), 60), log.read_text()
        tokens = server_tokens(process.pid)
        assert len(tokens) == 1, f"expected one private server below run: {tokens}"
        assert_hidden({"private server token": tokens[0]}, must_see=mark)
        assert process.wait(60) == 0, log.read_text()
    assert log.read_text().startswith("finished"), log.read_text()


def test_run_with_a_token_file(
    start_server: Callable[..., Server], tmp_path: Path, jupyter_dirs: dict[str, str]
) -> None:
    server = start_server("--workers", "1")
    assert server.token
    token_file = tmp_path / "token"
    token_file.write_text(server.token)
    token_file.chmod(0o600)
    mark = marker()
    log = tmp_path / "run.log"
    command = [*CLI, "run", "--url", server.url, "--token-file", str(token_file), "--",
               f"sleep {mark}; echo finished"]  # fmt: skip
    with running(command, log) as process:
        assert wait_until(lambda: bool(sleeping(mark)), 60), log.read_text()
        assert_hidden({"sandbox token": server.token}, must_see=token_file)
        assert process.wait(60) == 0, log.read_text()
    assert log.read_text().startswith("finished"), log.read_text()
    token_file.chmod(0o644)
    done = subprocess.run([*CLI, "run", "--url", server.url, "--token-file", str(token_file),
                           "--", "true"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "chmod 600" in done.stderr, done.stderr


# -- lab and demo ---------------------------------------------------------------------------------


def _read_banner(stream: IO[str], lines: int, log: list[str]) -> str:
    for _ in range(lines):
        log.append(stream.readline())
    return "".join(log)


def _jupyterlab_answers(port: int, token: str | None) -> int:
    headers = {"Authorization": f"token {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _start_jupyter_kernel(port: int, token: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/kernels", method="POST",
        data=json.dumps({"name": "sandbox"}).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        kernel_id: str = json.load(response)["id"]
        return kernel_id


def test_lab_passes_no_token_on_a_command_line(
    kernelspec: str, tmp_path: Path, jupyter_dirs: dict[str, str]
) -> None:
    if shutil.which("jupyter-lab") is None and not _importable("jupyterlab"):
        pytest.fail("jupyterlab is missing: pip install -e '.[lab]'", pytrace=False)
    sandbox_notebook(tmp_path / "notebooks", "echo hello")
    port = free_port()
    lab = subprocess.Popen(
        [*CLI, "lab", "--no-browser", "--port", str(port), "--notebooks",
         str(tmp_path / "notebooks")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert lab.stdout is not None
    banner: list[str] = []
    try:
        text = _read_banner(lab.stdout, 7, banner)
        found = re.search(r"lab\?token=(\w+)", text)
        assert found, text
        lab_token = found[1]
        assert wait_until(lambda: _jupyterlab_answers(port, lab_token) == 200, 90), text
        assert _jupyterlab_answers(port, "wrong") == 403, "JupyterLab does not use our token"
        sandbox_tokens = server_tokens(lab.pid)
        assert len(sandbox_tokens) == 1, f"one embedded sandbox expected: {sandbox_tokens}"
        url = re.search(r"sandbox:\s+(http://\S+)", text)
        assert url, text
        assert answers_with(url[1], sandbox_tokens[0]) == (200, 401)
        _start_jupyter_kernel(port, lab_token)

        def kernel_started() -> bool:
            return any(
                "sandbox_kernel" in " ".join(_arguments(pid)) and "-f" in _arguments(pid)
                for pid in descendants(lab.pid)
            )

        assert wait_until(kernel_started, 60), "JupyterLab did not start the Sandbox kernel"
        secrets = {"JupyterLab token": lab_token, "sandbox token": sandbox_tokens[0]}
        assert_hidden(secrets, must_see=f"--ServerApp.root_dir={tmp_path / 'notebooks'}")
    finally:
        lab.send_signal(signal.SIGINT)
        rest, _ = lab.communicate(timeout=90)
    assert lab.returncode == 0, "".join(banner) + rest


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_demo_passes_no_token_on_a_command_line(
    kernelspec: str, tmp_path: Path, jupyter_dirs: dict[str, str]
) -> None:
    mark = marker()
    sandbox_notebook(tmp_path / "notebooks", f"sleep {mark}; echo finished")
    log = tmp_path / "demo.log"
    command = [*CLI, "demo", "--notebooks", str(tmp_path / "notebooks"), "--output",
               str(tmp_path / "out")]  # fmt: skip
    with running(command, log) as process:
        assert wait_until(lambda: bool(sleeping(mark)), 120), log.read_text()
        tokens = server_tokens(process.pid)
        assert len(tokens) == 1, f"one embedded sandbox expected below demo: {tokens}"
        assert_hidden({"sandbox token": tokens[0]}, must_see=tmp_path / "notebooks")
        assert process.wait(120) == 0, log.read_text()
    assert "slow.ipynb: 1 cells run, 0 errors" in log.read_text(), log.read_text()


def test_demo_with_a_token_file(
    start_server: Callable[..., Server], kernelspec: str, tmp_path: Path
) -> None:
    server = start_server("--workers", "1")
    assert server.token
    token_file = tmp_path / "token"
    token_file.write_text(server.token)
    token_file.chmod(0o600)
    mark = marker()
    sandbox_notebook(tmp_path / "notebooks", f"sleep {mark}; echo finished")
    log = tmp_path / "demo.log"
    folders = ["--notebooks", str(tmp_path / "notebooks"), "--output", str(tmp_path / "out")]
    command = [*CLI, "demo", "--url", server.url, "--token-file", str(token_file), *folders]
    with running(command, log) as process:
        assert wait_until(lambda: bool(sleeping(mark)), 120), log.read_text()
        assert_hidden({"sandbox token": server.token}, must_see=token_file)
        assert process.wait(120) == 0, log.read_text()
    assert "slow.ipynb: 1 cells run, 0 errors" in log.read_text(), log.read_text()


# -- a kernel -------------------------------------------------------------------------------------


def test_kernel_private_server_gets_no_token_on_its_command_line(
    start_kernel: Callable[..., KernelSession],
) -> None:
    kernel = start_kernel()
    cell = kernel.run("echo hello")
    assert (cell.status, cell.stdout) == ("ok", "hello\n"), cell.stderr
    provisioner = kernel.manager.provisioner
    kernel_pid = getattr(provisioner, "pid", None)
    assert kernel_pid is not None, "cannot find the kernel's process"
    tokens = server_tokens(int(kernel_pid))
    assert len(tokens) == 1, f"one private server expected below the kernel: {tokens}"
    assert_hidden({"private server token": tokens[0]}, must_see=kernel.manager.connection_file)
