"""The ``sandbox-kernel`` command, run as a user runs it."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .conftest import Server, wait_until
from .helpers import kernel_env
from .test_lab import public_temp_dir

CLI = [sys.executable, "-m", "sandbox_kernel.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=env or kernel_env()
    )


def test_run_uses_a_private_embedded_server_by_default(tmp_path: Path) -> None:
    env = kernel_env(JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")
    with public_temp_dir() as temp:
        done = run_cli("run", "--", "echo hello from the sandbox; id -u; pwd",
                       env={**env, "TMPDIR": str(temp)})  # fmt: skip
        left = list(temp.iterdir())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "hello from the sandbox"
    assert lines[1] != "0"  # not root
    assert lines[2] == "/home/student"
    assert not list((tmp_path / "runtime").glob("sandbox-kernel-server-*.json"))  # not advertised
    assert left == []  # its scratch directory went with the server


def test_run_passes_the_exit_code_and_stderr(server: Server) -> None:
    done = run_cli(
        "run",
        "--url",
        server.url,
        "--token",
        server.token,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    )
    assert (done.returncode, done.stdout, done.stderr.strip()) == (7, "out\n", "err")


def test_run_reports_a_timeout_with_124(server: Server) -> None:
    done = run_cli(
        "run", "--url", server.url, "--token", server.token, "--timeout", "0.3", "--", "sleep 5"
    )
    assert done.returncode == 124
    assert "Command timed out after 0.3 seconds" in done.stderr


def test_run_explains_an_unreachable_sandbox() -> None:
    done = run_cli("run", "--url", "http://127.0.0.1:9/", "--", "true")
    assert done.returncode == 125
    assert "http://127.0.0.1:9" in done.stderr


def test_run_needs_a_command() -> None:
    done = run_cli("run")
    assert done.returncode == 2
    assert "give the command after --" in done.stderr


def test_serve_advertises_itself_and_cleans_up(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    env = kernel_env(JUPYTER_RUNTIME_DIR=str(runtime), JUPYTER_DATA_DIR=str(tmp_path))
    server = subprocess.Popen(
        [*CLI, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        assert wait_until(lambda: bool(list(runtime.glob("sandbox-kernel-server-*.json"))), 20)
        [advert] = runtime.glob("sandbox-kernel-server-*.json")
        assert stat.S_IMODE(advert.stat().st_mode) == 0o600
        info = json.loads(advert.read_text())
        assert info["pid"] == server.pid and info["token"] and info["url"].startswith("http://127.")
        # A local client finds it without configuration, and uses its token.
        done = run_cli("run", "--", "echo found", env=env)
        assert (done.returncode, done.stdout) == (0, "found\n"), done.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=20)
    assert server.returncode == 0
    assert "serving the sandbox protocol on http://127.0.0.1:" in output
    assert not advert.exists()


def test_serve_refuses_a_busy_port(start_server: Callable[..., Server], tmp_path: Path) -> None:
    taken = start_server("--workers", "1")
    port = taken.url.rsplit(":", 1)[1].strip("/")
    started = time.monotonic()
    done = run_cli("serve", "--port", port, "--data-dir", str(tmp_path / "data"), "--no-advertise")
    assert done.returncode == 1
    assert "--port 0" in done.stderr
    assert time.monotonic() - started < 30


def test_serve_options_reach_the_settings() -> None:
    from sandbox_kernel.cli import build_parser
    from sandbox_kernel.server import settings_from_args

    args = build_parser().parse_args(
        ["serve", "--no-token", "--max-result", "2M", "--workdir-inodes", "500",
         "--max-storage-inodes", "7000", "--header-timeout", "1.5", "--keepalive-timeout", "4"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert (
        settings.max_result,
        settings.workdir_inodes,
        settings.max_storage_inodes,
        settings.header_timeout,
        settings.keepalive_timeout,
        settings.token,
    ) == (2 * 1024**2, 500, 7000, 1.5, 4.0, None)


def test_serve_refuses_meaningless_limits() -> None:
    for option, value in [
        ("--header-timeout", "0"),
        ("--keepalive-timeout", "-1"),
        ("--workdir-inodes", "0"),
        ("--max-storage-inodes", "many"),
    ]:
        done = run_cli("serve", option, value)
        assert done.returncode == 2 and option in done.stderr, (option, done.stderr)


def test_token_and_token_file_exclude_each_other(tmp_path: Path) -> None:
    for command in ("serve", "run", "lab", "demo"):
        done = run_cli(command, "--token", "t", "--token-file", str(tmp_path / "token"))
        assert done.returncode == 2, (command, done.stderr)
        assert "not allowed with argument" in done.stderr, (command, done.stderr)


# -- settings resolved once (settings.resolve), checked at the edge ----------------------------


def test_a_malformed_sandbox_url_is_a_usage_error_naming_the_setting(tmp_path: Path) -> None:
    """run, lab and demo refuse it before starting anything: exit 2, the setting named, no
    traceback, nothing left in the temporary directory."""
    temp = tmp_path / "tmp"  # nothing may even try to start a server
    temp.mkdir()
    rest = {"run": ["--", "true"], "lab": ["--no-browser"], "demo": ["--output", str(tmp_path)]}
    for command, words in rest.items():
        for bad in ("localhost:7000", "http://127.0.0.1:port/", "ftp://127.0.0.1/"):
            env = kernel_env(SANDBOX_URL=bad, TMPDIR=str(temp),
                             JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))  # fmt: skip
            done = run_cli(command, *words, env=env)
            assert (done.returncode, "Traceback" in done.stderr) == (2, False), done.stderr
            assert "SANDBOX_URL" in done.stderr and repr(bad) in done.stderr, done.stderr
        done = run_cli(command, "--url", "localhost:7000", *words, env=kernel_env(TMPDIR=str(temp)))
        assert done.returncode == 2 and "check --url" in done.stderr, (command, done.stderr)
    assert list(temp.iterdir()) == []


def test_a_malformed_timeout_is_a_usage_error(server: Server) -> None:
    env = kernel_env(SANDBOX_URL=server.url, SANDBOX_TOKEN=server.token or "",
                     SANDBOX_TIMEOUT="soon")  # fmt: skip
    done = run_cli("run", "--", "true", env=env)
    assert done.returncode == 2 and "SANDBOX_TIMEOUT=soon" in done.stderr, done.stderr


def test_run_waits_as_long_as_its_command_may_run(server: Server) -> None:
    """``run --timeout`` is the command's limit: the answer is awaited that long (plus a
    margin) even when the client's own timeout (SANDBOX_TIMEOUT) is shorter."""
    env = kernel_env(SANDBOX_URL=server.url, SANDBOX_TOKEN=server.token or "",
                     SANDBOX_TIMEOUT="1")  # fmt: skip
    done = run_cli("run", "--timeout", "10", "--", "sleep 2; echo done", env=env)
    assert (done.returncode, done.stdout) == (0, "done\n"), done.stderr
    # Without --timeout the client's 1 s applies, and the error names the setting.
    done = run_cli("run", "--", "sleep 3", env=env)
    assert done.returncode == 125 and "SANDBOX_TIMEOUT" in done.stderr, done.stderr


def test_an_embedded_server_leaves_no_scratch_directory_behind() -> None:
    from sandbox_kernel.discovery import EmbeddedServer

    server = EmbeddedServer("--workers", "1")
    server.start()
    scratch = server.log_path.parent
    assert scratch.name.startswith("sandbox-kernel-server-") and scratch.is_dir()
    server.stop()
    assert not scratch.exists()
    # One that fails to start keeps its log, which the error names (and only that).
    failed = EmbeddedServer("--workers", "0")
    try:
        failed.start()
    except RuntimeError as error:
        assert str(failed.log_path) in str(error) and "--workers" in str(error)
    else:
        failed.stop()
        raise AssertionError("a server with --workers 0 started")
    try:
        assert [path.name for path in failed.log_path.parent.iterdir()] == ["server.log"]
        failed.stop()  # again, as a caller's cleanup does: the log stays
        assert failed.log_path.exists()
    finally:
        failed.log_path.unlink()
        failed.log_path.parent.rmdir()
