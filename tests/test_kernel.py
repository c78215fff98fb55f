"""The Sandbox kernel end to end, through jupyter_client, against real embedded servers.

Each test starts kernel processes: one cell and one interrupt stay in the fast tier, the rest
are ``slow`` (the kernel's handlers are tested in-process in ``fast/test_kernel_inprocess.py``).
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox_kernel.client import Sandbox

from .conftest import KernelSession, Server, processes_matching, wait_until

StartKernel = Callable[..., KernelSession]
StartServer = Callable[..., Server]


def test_files_and_shell_state_carry_across_cells(
    server: Server, start_kernel: StartKernel
) -> None:
    kernel = start_kernel(server)
    first = kernel.run(
        "x=41; export Y=exported; declare -a list=(a 'b c')\n"
        "greet() { echo \"hello $1\"; }\nalias ll='ls -1'\n"
        "mkdir -p work/sub && cd work && echo data > file.txt"
    )
    assert first.status == "ok", first.stderr
    second = kernel.run('echo $((x + 1)) $Y "${list[1]}"; greet you; pwd; ll; cat file.txt')
    assert second.stdout == "42 exported b c\nhello you\n/home/student/work\nfile.txt\nsub\ndata\n"
    third = kernel.run("printf '\\n  indented\\n\\n'")
    assert third.stdout == "\n  indented\n\n"


@pytest.mark.slow
def test_failing_cell_gives_a_readable_error(server: Server, start_kernel: StartKernel) -> None:
    kernel = start_kernel(server)
    cell = kernel.run("echo partial; no_such_command_here")
    assert cell.status == "error"
    assert (cell.reply["ename"], cell.reply["evalue"]) == (
        "ExitCode",
        "command exited with status 127",
    )
    assert cell.stdout == "partial\n"
    assert "line 1: no_such_command_here: command not found" in cell.stderr
    [error] = cell.of_type("error")
    assert error["traceback"][0] == "ExitCode: command exited with status 127"
    assert kernel.run("echo still here").stdout == "still here\n"


@pytest.mark.slow
def test_timeout_names_the_limit_and_the_next_cell_works(
    start_server: StartServer, start_kernel: StartKernel
) -> None:
    server = start_server("--execute-timeout", "1.5", "--workers", "2")
    kernel = start_kernel(server)
    kernel.run("kept=yes")
    cell = kernel.run("touch written-before; lost=1; sleep 5")
    assert cell.status == "error" and cell.reply["ename"] == "Timeout"
    assert "1.5 s" in cell.reply["evalue"]
    assert any("%sandbox_timeout" in line for line in cell.reply["traceback"])
    assert any("shell state" in line for line in cell.reply["traceback"])
    assert len(cell.reply["traceback"]) <= 2, "a timeout reads in two lines at most"
    after = kernel.run('echo "$kept ${lost:-unset}"; ls written-before')
    assert after.stdout == "yes unset\nwritten-before\n"


@pytest.mark.slow
def test_busy_sandbox_shows_one_waiting_line_then_runs(
    start_server: StartServer, start_kernel: StartKernel
) -> None:
    server = start_server("--workers", "1")
    kernel = start_kernel(server)
    kernel.run("true")
    busy = Sandbox(server.url, token=server.token)
    blocker = threading.Thread(target=busy.execute, args=({"commands": ["sleep 3"]},))
    blocker.start()
    time.sleep(0.3)
    cell = kernel.run("echo ran")
    blocker.join()
    assert cell.status == "ok"
    assert cell.stdout == "ran\n"
    shown = cell.of_type("display_data") + cell.of_type("update_display_data")
    assert shown and "sandbox busy" in shown[0]["data"]["text/plain"]
    assert cell.of_type("clear_output"), "the busy line was not removed"


def test_interrupt_ends_the_cell_and_kills_the_command(
    server: Server, start_kernel: StartKernel
) -> None:
    kernel = start_kernel(server)
    kernel.run("before=1")
    marker = f"30.{int(time.time() * 1000) % 100000}"
    threading.Timer(1.0, kernel.manager.interrupt_kernel).start()
    cell = kernel.run(f"sleep {marker}")
    assert cell.status == "error" and cell.reply["ename"] == "Interrupted"
    assert cell.seconds < 5
    assert wait_until(lambda: not processes_matching(f"sleep {marker}"), 5)
    assert kernel.run("echo ${before:-lost}").stdout == "1\n"


@pytest.mark.slow
def test_interrupt_ends_a_magics_request(server: Server, kernelspec: str, tmp_path: Path) -> None:
    """An interrupt ends a magic's request at once, as it ends a cell's: a look-up, a download
    and an upload to a sandbox that never answers (a real proxy holding the request)."""
    from .faults.fault_proxy import HANG, FaultProxy
    from .helpers import kernel_env
    from .hostile.test_page import FolderKernel

    (tmp_path / "up.txt").write_text("to upload\n")
    with FaultProxy(server.url) as proxy:
        kernel = FolderKernel(kernel_env(proxy.url, server.token), tmp_path)
        try:
            first = kernel.run("echo data > f")
            assert first.status == "ok", first.reply
            for paths, line in [
                (("specifications/",), "%sandbox_specs --refresh"),
                (("files/",), "%sandbox_download f --force"),
                (("execute/",), "%sandbox_upload up.txt"),
            ]:
                proxy.set(HANG, paths=paths)
                threading.Timer(1.0, kernel.manager.interrupt_kernel).start()
                cell = kernel.run(line)
                assert cell.status == "error" and cell.reply["ename"] == "Interrupted", cell.reply
                assert line.split()[0] in cell.reply["evalue"]
                assert cell.seconds < 5, f"{line} took {cell.seconds:.1f} s"
                proxy.clear()
            assert not (tmp_path / "f").exists()
            assert kernel.run("%sandbox_download f\ncat up.txt 2>&1; true").status == "ok"
            assert (tmp_path / "f").read_text() == "data\n"
        finally:
            kernel.stop()


@pytest.mark.slow
def test_server_killed_and_restarted(
    start_server: StartServer, start_kernel: StartKernel, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    data = tmp_path / "data"
    server = start_server("--port", port, "--workers", "2", data_dir=data, token="t-restart")
    kernel = start_kernel(server)
    assert kernel.run("mine=kept; echo content > f.txt").status == "ok"
    server.stop()
    down = kernel.run("echo unreachable")
    assert down.status == "error" and down.reply["ename"] == "SandboxUnreachable"
    assert server.url.rstrip("/") in down.reply["evalue"]
    assert any("next cell continues" in line for line in down.reply["traceback"])
    start_server("--port", port, "--workers", "2", data_dir=data, token="t-restart")
    back = kernel.run("echo $mine; cat f.txt")
    assert back.status == "ok", back.reply
    assert back.stdout == "kept\ncontent\n"


@pytest.mark.slow
def test_expired_environment_is_said_and_replaced(
    start_server: StartServer, start_kernel: StartKernel
) -> None:
    server = start_server("--expiration", "2", "--workers", "2")
    kernel = start_kernel(server)
    kernel.run("x=1; touch f")
    time.sleep(3)
    cell = kernel.run("echo ${x:-unset}; ls")
    assert cell.status == "ok"
    assert cell.stdout == "unset\n"
    assert "is gone from the sandbox" in cell.stderr and "were lost" in cell.stderr


@pytest.mark.slow
def test_restart_starts_a_fresh_environment(server: Server, start_kernel: StartKernel) -> None:
    kernel = start_kernel(server)
    kernel.run("x=1; touch f")
    kernel.manager.restart_kernel()
    kernel.client.wait_for_ready(timeout=60)
    assert kernel.run("echo ${x:-unset}; ls").stdout == "unset\n"


@pytest.mark.slow
def test_reopened_notebook_is_told_how_to_continue(
    server: Server, start_kernel: StartKernel
) -> None:
    notebook = f"notebooks/reopen-{time.time()}.ipynb"
    first = start_kernel(server, JPY_SESSION_NAME=notebook)
    first.run("echo kept > f")
    first.stop()
    second = start_kernel(server, JPY_SESSION_NAME=notebook)
    cell = second.run("ls")
    match = re.search(r"%sandbox_use ([0-9a-f-]{36})", cell.stderr)
    assert match, cell.stderr
    uuid = match.group(1)
    assert Sandbox(server.url, token=server.token).download(uuid, "f").read() == b"kept\n"
    assert cell.stdout == ""  # a fresh environment until the user asks


@pytest.mark.slow
def test_display_shows_images(server: Server, start_kernel: StartKernel) -> None:
    kernel = start_kernel(server)
    logo = Path(__file__).parent.parent / "kernelspec" / "logo-32x32.png"
    png = base64.b64encode(logo.read_bytes())
    cell = kernel.run(f"echo {png.decode()} | base64 -d > logo.png; display logo.png")
    [shown] = cell.of_type("display_data")
    assert shown["data"]["image/png"] == png.decode()


@pytest.mark.slow
def test_completion_and_inspection_use_the_carried_state(
    server: Server, start_kernel: StartKernel
) -> None:
    kernel = start_kernel(server)
    kernel.run("my_variable=1; my_function() { :; }; touch notes-one.txt notes-two.txt")
    client = kernel.client
    reply = client.complete("cat note", 8, reply=True)["content"]
    assert reply["matches"] == ["notes-one.txt", "notes-two.txt"]
    assert reply["cursor_start"] == 4
    assert client.complete("echo $my_v", 10, reply=True)["content"]["matches"] == ["$my_variable"]
    assert "my_function" in client.complete("my_f", 4, reply=True)["content"]["matches"]
    found = client.inspect("python3", 3, reply=True)["content"]
    assert found["found"] and "executable" in found["data"]["text/plain"]
    missing = client.inspect("surely_not_a_tool", 5, reply=True)["content"]
    assert "not found in the sandbox" in missing["data"]["text/plain"]


@pytest.mark.slow
def test_default_is_a_private_embedded_server(start_kernel: StartKernel, tmp_path: Path) -> None:
    before = set(processes_matching("--exit-with-parent"))
    kernel = start_kernel(None, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    banner = kernel.client.kernel_info(reply=True)["content"]["banner"]
    assert "http://127.0.0.1:" in banner
    assert kernel.run("echo private").stdout == "private\n"
    started = set(processes_matching("--exit-with-parent")) - before
    assert started, "no private server process found"
    kernel.stop()
    assert wait_until(lambda: not started & set(processes_matching("--exit-with-parent")), 15)


@pytest.mark.slow
def test_banner_says_not_isolated(start_server: StartServer, start_kernel: StartKernel) -> None:
    server = start_server("--isolation", "none", "--workers", "1")
    kernel = start_kernel(server)
    assert "NOT ISOLATED" in kernel.client.kernel_info(reply=True)["content"]["banner"]


@pytest.mark.slow
def test_shell_options_and_exit_traps_of_the_cell_are_respected(
    server: Server, start_kernel: StartKernel
) -> None:
    kernel = start_kernel(server)
    strict = kernel.run("set -euo pipefail; set -C; strict=1")
    assert strict.status == "ok", strict.reply
    exited = kernel.run("set -e; inner=2; exit 3")
    assert exited.reply["evalue"] == "command exited with status 3"
    trapped = kernel.run("trap 'echo cleanup ran' EXIT; trapped=3; cd /tmp")
    assert trapped.stdout == "cleanup ran\n"
    after = kernel.run('echo "$strict $inner $trapped"; pwd')
    assert after.stdout == "1 2 3\n/tmp\n"
    assert "shell state" not in after.stderr


@pytest.mark.slow
def test_an_internal_error_still_gets_a_reply(server: Server, start_kernel: StartKernel) -> None:
    kernel = start_kernel(server)
    cell = kernel.run('%%c --args "it\'s"\nint main(void) { return 0; }')
    assert cell.status == "error" and cell.reply["ename"] == "UsageError"
    assert kernel.run("echo alive").stdout == "alive\n"
