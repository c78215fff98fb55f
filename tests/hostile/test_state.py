"""The kernel's own state in an environment (``.sandbox_kernel/``) cannot be planted.

The next cell restores shell state only from a file the kernel's records (kept across
restarts) say this kernel wrote for that environment; ``display`` shows only what the cell's
shell recorded. Planted by a foreign environment, an upload or a program, neither runs nor
shows. Each test drives a real Sandbox kernel through jupyter_client against the embedded
server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Cell, KernelSession, Server
from ..helpers import kernel_env
from .conftest import new_marker

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: Where an attacker would put a state file: today's names (random per cell; guessed here)
#: and the names of earlier versions.
PLANTED = {
    "random-style-name": "state-0123456789abcdef.sh",
    "old-name-a": "state-a.sh",
    "old-name-b": "state-b.sh",
}


@pytest.fixture
def notebook_kernel(
    kernelspec: str, server: Server, tmp_path: Path
) -> Iterator[Callable[[], KernelSession]]:
    started: list[KernelSession] = []
    folder = tmp_path / "notebook"
    folder.mkdir()

    def start() -> KernelSession:
        kernel = KernelSession(kernel_env(server.url, server.token or ""), cwd=folder)
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        kernel.stop()


def shown(cell: Cell) -> str:
    """Everything a cell showed: streams, displays, the error."""
    texts = [cell.stdout, cell.stderr]
    for content in cell.of_type("display_data"):
        texts += [str(value) for value in content["data"].values()]
    texts += [str(cell.reply.get("evalue", ""))]
    return "\n".join(texts)


def environment_of(kernel: KernelSession) -> str:
    status = shown(kernel.run("%sandbox_status"))
    found = UUID.search(status)
    assert found, status
    return found.group(0)


def foreign_environment(server: Server, marker: str, planted: str) -> str:
    """An environment someone else prepared: planted state, display files, bookkeeping."""
    state = f"echo PWNED-{marker}; echo PWNED-{marker} >&2; planted=1; cd /tmp"
    commands = [
        "mkdir -p .sandbox_kernel/display",
        f"printf '%s\\n' '{state}' > .sandbox_kernel/{planted}",
        "echo '<script>parent.alert(1)</script>' > .sandbox_kernel/display/0-page.html",
        "echo hello > greeting.txt",
    ]
    uuid: str = server.run(*commands, save=True)["environment"]
    return uuid


@pytest.mark.parametrize("planted", list(PLANTED.values()), ids=list(PLANTED))
def test_foreign_environment_state_is_not_restored(
    notebook_kernel: Callable[[], KernelSession], server: Server, planted: str
) -> None:
    marker = new_marker()
    uuid = foreign_environment(server, marker, planted)
    kernel = notebook_kernel()
    use = kernel.run(f"%sandbox_use {uuid}")
    assert use.status == "ok", shown(use)
    said = shown(use)
    assert "not its shell state" in said, said
    cell = kernel.run('echo "[${planted-unset}] $PWD"; cat greeting.txt')
    assert cell.status == "ok", shown(cell)
    assert cell.stdout == "[unset] /home/student\nhello\n", "files come back, state does not"
    assert f"PWNED-{marker}" not in shown(cell)
    assert not cell.of_type("display_data"), "a planted display file was shown"


def test_own_state_comes_back_after_a_restart(
    notebook_kernel: Callable[[], KernelSession],
) -> None:
    first = notebook_kernel()
    assert first.run("mkdir -p sub && cd sub && answer=42 && f() { echo f$1; }").status == "ok"
    uuid = environment_of(first)
    first.stop()
    second = notebook_kernel()
    use = second.run(f"%sandbox_use {uuid}")
    assert "files and shell state" in shown(use), shown(use)
    cell = second.run('echo "$answer $PWD"; f 1')
    assert cell.stdout == "42 /home/student/sub\nf1\n", shown(cell)


def test_state_survives_the_kernels_own_upload(
    notebook_kernel: Callable[[], KernelSession], tmp_path: Path
) -> None:
    (tmp_path / "notebook" / "data.txt").write_text("uploaded\n")
    kernel = notebook_kernel()
    assert kernel.run("kept=yes").status == "ok"
    upload = kernel.run("%sandbox_upload data.txt")
    assert upload.status == "ok", shown(upload)
    cell = kernel.run('echo "$kept"; cat data.txt')
    assert cell.stdout == "yes\nuploaded\n", shown(cell)


@pytest.mark.parametrize("name", ["state-0123456789abcdef.sh", "display/0-page.html", "result"])
def test_upload_of_kernel_state_is_refused(
    notebook_kernel: Callable[[], KernelSession], tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "notebook" / ".sandbox_kernel"
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("echo PWNED\n")
    kernel = notebook_kernel()
    assert kernel.run("kept=still").status == "ok"
    upload = kernel.run("%sandbox_upload .sandbox_kernel")
    assert upload.status == "error", shown(upload)
    assert ".sandbox_kernel" in shown(upload)
    cell = kernel.run('echo "$kept"')
    assert cell.stdout == "still\n" and "PWNED" not in shown(cell)


PLANTERS = {
    "files-without-display": "mkdir -p .sandbox_kernel/display && "
    "echo '<b>planted</b>' > .sandbox_kernel/display/0-page.html && "
    "echo planted > .sandbox_kernel/display/1-notes.txt",
    "background-program": "(sleep 0.2; mkdir -p .sandbox_kernel/display; "
    "echo '<b>late</b>' > .sandbox_kernel/display/0-late.html) & disown; sleep 0.5",
    "beside-a-real-display": "echo real > real.txt; display real.txt; "
    "echo '<b>planted</b>' > .sandbox_kernel/display/7-extra.html",
}


@pytest.mark.parametrize("name", list(PLANTERS))
def test_only_recorded_displays_are_shown(
    notebook_kernel: Callable[[], KernelSession], name: str
) -> None:
    kernel = notebook_kernel()
    cell = kernel.run(PLANTERS[name])
    assert cell.status == "ok", shown(cell)
    displays: list[dict[str, Any]] = cell.of_type("display_data")
    expected = 1 if name == "beside-a-real-display" else 0
    assert len(displays) == expected, displays
    assert "planted" not in shown(cell) and "late" not in shown(cell)
    again = kernel.run("true")
    assert not again.of_type("display_data")
