"""Live cells through a real kernel (jupyter_client) on a real server: output shown as it is
printed, kept on interrupt, capped without killing, and keyboard input (``input_request``).

Timing bounds are generous (5x the targets or more): these machines are noisy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import KernelSession, Server
from .proxy import CountingProxy

#: The issue's target: a printed line reaches the notebook within 0.3 s.
FIRST_LINE_TARGET = 0.3
OBSERVED = Path(__file__).parent / "fixtures" / "observed" / "reference-3.0.3-responses.json"


class LiveCell:
    """What a front-end saw of a cell, each output with the time it arrived."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.outputs: list[tuple[float, dict[str, Any]]] = []
        self.prompts: list[dict[str, Any]] = []
        #: What the page showed when each input box opened.
        self.shown_at_prompt: list[str] = []
        self.reply: dict[str, Any] = {}
        self.ended = 0.0

    def streams(self, name: str | None = None) -> list[tuple[float, str]]:
        return [
            (at - self.started, message["content"]["text"])
            for at, message in self.outputs
            if message["msg_type"] == "stream"
            and (name is None or message["content"]["name"] == name)
        ]

    def text(self, name: str | None = None) -> str:
        return "".join(text for _at, text in self.streams(name))

    def first_arrival(self, fragment: str) -> float:
        """Seconds from the request to the stream message holding ``fragment``."""
        shown = ""
        for at, text in self.streams():
            shown += text
            if fragment in shown:
                return at
        raise AssertionError(f"{fragment!r} never shown; outputs: {self.streams()}")


def run_live(
    kernel: KernelSession,
    code: str,
    *,
    answers: list[str] | None = None,
    allow_stdin: bool = True,
    on_output: Callable[[LiveCell, dict[str, Any]], None] | None = None,
    timeout: float = 60,
) -> LiveCell:
    """Run ``code`` as JupyterLab does, typing ``answers`` into the input boxes in turn."""
    cell = LiveCell()
    pending = list(answers or [])

    def output(message: dict[str, Any]) -> None:
        if message["msg_type"] not in ("status", "execute_input"):
            cell.outputs.append((time.monotonic(), message))
            if on_output is not None:
                on_output(cell, message)

    def stdin(message: dict[str, Any]) -> None:
        cell.prompts.append(message["content"])
        cell.shown_at_prompt.append(cell.text())
        kernel.client.input(pending.pop(0) if pending else "")

    reply = kernel.client.execute_interactive(
        code,
        output_hook=output,
        stdin_hook=stdin,
        allow_stdin=allow_stdin,
        timeout=timeout,
    )
    cell.ended = time.monotonic() - cell.started
    cell.reply = reply["content"]
    return cell


@pytest.fixture(scope="module")
def live_server(start_server: Callable[..., Server]) -> Server:
    return start_server("--workers", "2", "--execute-timeout", "30")


@pytest.fixture
def kernel(start_kernel: Callable[..., KernelSession], live_server: Server) -> KernelSession:
    return start_kernel(live_server)


LOOPS = {
    "bash": "for i in 1 2 3 4; do echo line$i; sleep 1; done",
    "python": (
        "python3 -c 'import time\nfor i in range(1, 5):\n    print(f\"line{i}\"); time.sleep(1)'"
    ),
    "c": (
        "cat > loop.c <<'EOF'\n#include <stdio.h>\n#include <unistd.h>\n"
        'int main(void) { for (int i = 1; i < 5; i++) { printf("line%d\\n", i); sleep(1); } }\n'
        "EOF\ngcc -o loop loop.c && ./loop"
    ),
}


@pytest.mark.parametrize("language", sorted(LOOPS))
def test_lines_appear_as_printed(kernel: KernelSession, language: str) -> None:
    """The first line of a 4 s loop is on screen long before the cell ends (bash, Python's
    and C's buffering included): each line is sent about when it is printed."""
    cell = run_live(kernel, LOOPS[language])
    assert cell.reply["status"] == "ok", cell.outputs
    assert cell.text("stdout") == "line1\nline2\nline3\nline4\n"
    first, last = cell.first_arrival("line1"), cell.first_arrival("line4")
    # line1 is printed at once and line4 three seconds later (a compile comes first for C).
    assert last - first > 2.5, f"lines came together: {cell.streams()}"
    assert cell.ended - first > 2.5, "the first line was only shown at the end"
    assert cell.first_arrival("line2") - first < 1 + 5 * FIRST_LINE_TARGET


def test_stdout_and_stderr_interleave_in_order(kernel: KernelSession) -> None:
    cell = run_live(kernel, "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three")
    shown = [(message["content"]["name"], message["content"]["text"]) for _, message in
             cell.outputs if message["msg_type"] == "stream"]  # fmt: skip
    assert shown == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]


def test_markers_and_bookkeeping_never_shown(kernel: KernelSession) -> None:
    """The framing characters never reach the user; leading blank lines and the shell state
    survive as in non-streamed cells."""
    cell = run_live(kernel, "x=41; printf '\\n  indented\\n'; echo err >&2")
    assert cell.text("stdout") == "\n  indented\n"
    assert cell.text("stderr") == "err\n"
    assert "\x02" not in cell.text() and "\x03" not in cell.text()
    assert run_live(kernel, "echo $((x + 1))").text("stdout") == "42\n"


def test_interrupt_keeps_output_files_and_state(kernel: KernelSession) -> None:
    """The stop button: what was printed stays, one short line is added, and the cell's files
    and shell state are there for the next cell (bash's EXIT trap runs on SIGINT)."""

    interrupted = threading.Event()

    def interrupt_after_before(cell: LiveCell, message: dict[str, Any]) -> None:
        if "before" in cell.text() and not interrupted.is_set():  # once, as a user would
            interrupted.set()
            threading.Thread(target=kernel.manager.interrupt_kernel).start()

    cell = run_live(
        kernel,
        "kept=yes; echo data > kept.txt; echo before; sleep 60; echo after",
        on_output=interrupt_after_before,
    )
    assert cell.reply["status"] == "error" and cell.reply["ename"] == "Interrupted"
    assert cell.ended < 20, "the interrupt did not end the cell promptly"
    assert cell.text("stdout") == "before\n"
    traceback = "\n".join(cell.reply["traceback"])
    assert len(traceback.splitlines()) <= 2, traceback
    after = run_live(kernel, "cat kept.txt; echo $kept")
    assert after.text("stdout") == "data\nyes\n"


def test_server_output_cap_ends_normally(
    start_server: Callable[..., Server], start_kernel: Callable[..., KernelSession]
) -> None:
    """Past the server's --max-output the cell keeps the first part, says in one line how
    much, and ends normally with its shell state saved (the program is not killed)."""
    capped = start_server("--max-output", "200000")
    kernel = start_kernel(capped)
    cell = run_live(kernel, "yes | head -c 3000000; after_cut=1")
    assert cell.reply["status"] == "ok", cell.reply
    # The cap counts the answer's JSON text, where each newline takes two characters.
    assert 120_000 < len(cell.text("stdout")) <= 200_000
    notes = [line for line in cell.text("stderr").splitlines() if "cut" in line]
    assert len(notes) == 1 and "--max-output" in notes[0], cell.text("stderr")
    assert run_live(kernel, "echo $after_cut").text("stdout") == "1\n"


def test_kernel_output_cap_against_an_uncapped_flood(
    start_kernel: Callable[..., KernelSession], live_server: Server
) -> None:
    """The kernel's own cap (c.SandboxKernel.max_output, here through SANDBOX_MAX_OUTPUT)
    stops forwarding a flood even when the server lets it through."""
    kernel = start_kernel(live_server, SANDBOX_MAX_OUTPUT="50000")
    cell = run_live(kernel, "yes | head -c 400000")
    assert cell.reply["status"] == "ok"
    assert len(cell.text("stdout")) == 50_000
    assert "c.SandboxKernel.max_output" in cell.text("stderr")


def test_bash_read_gets_what_is_typed(kernel: KernelSession) -> None:
    cell = run_live(kernel, 'read name; echo "hello $name"', answers=["Ada"])
    assert len(cell.prompts) == 1
    assert cell.text("stdout") == "hello Ada\n"


def test_python_input_prompt_comes_before_the_box(kernel: KernelSession) -> None:
    cell = run_live(kernel, "python3 -c 'print(int(input(\"n? \")) * 2)'", answers=["21"])
    assert len(cell.prompts) == 1
    assert cell.text("stdout") == "n? 42\n"
    assert cell.shown_at_prompt == ["n? "], "the prompt was not shown before the input box"


def test_c_scanf_in_a_teaching_cell(kernel: KernelSession) -> None:
    code = (
        "%%c\n#include <stdio.h>\nint main(void) {\n  int a, b;\n"
        '  printf("two numbers? ");\n  if (scanf("%d %d", &a, &b) != 2) return 1;\n'
        '  printf("%d\\n", a + b);\n  return 0;\n}\n'
    )
    cell = run_live(kernel, code, answers=["2 3"])
    assert cell.reply["status"] == "ok", cell.outputs
    assert len(cell.prompts) == 1
    assert cell.shown_at_prompt[0].endswith("two numbers? "), "prompt not flushed before scanf"
    assert cell.text("stdout").endswith("two numbers? 5\n"), cell.text()


def test_empty_submission_is_end_of_file(kernel: KernelSession) -> None:
    cell = run_live(kernel, "read x && echo got || echo eof; cat; echo done", answers=["", "\x04"])
    assert cell.text("stdout") == "eof\ndone\n"


def test_without_stdin_a_program_reads_end_of_file(kernel: KernelSession) -> None:
    """nbclient and `demo` allow no stdin: programs read end-of-file at once, as today."""
    cell = run_live(kernel, "read x || echo eof", allow_stdin=False)
    assert cell.text("stdout") == "eof\n" and cell.prompts == []


def test_premierlangage_server_without_the_extension(
    start_kernel: Callable[..., KernelSession], live_server: Server
) -> None:
    """A server whose specifications/ is the public server's (no "extensions"): plain
    execute/ as before, output at the end, stdin empty, no input box."""
    observed = json.loads(OBSERVED.read_text())["specifications"]["body"]
    proxy = CountingProxy(live_server.url)
    proxy.premierlangage_specifications = observed
    try:
        kernel = start_kernel(live_server, SANDBOX_URL=proxy.url)
        cell = run_live(kernel, "echo first; sleep 1.5; echo second; read x || echo eof")
        assert cell.reply["status"] == "ok"
        assert cell.text("stdout") == "first\nsecond\neof\n"
        assert cell.prompts == []
        assert cell.first_arrival("first") > 1.4, "output came before the run ended"
        assert proxy.count("POST", "execute/") == 1
        assert proxy.count("GET", "execute/stream/") == 0
    finally:
        proxy.close()


def test_a_proxy_without_websockets_falls_back_to_plain_runs(
    start_kernel: Callable[..., KernelSession], live_server: Server
) -> None:
    """The server names the extension, but a proxy in between passes no WebSocket: the cell
    runs once, as plain execute/, with one line saying live output is off; later cells do
    not try again."""
    proxy = CountingProxy(live_server.url)
    try:
        kernel = start_kernel(live_server, SANDBOX_URL=proxy.url)
        first = run_live(kernel, "echo one >> runs.txt; cat runs.txt")
        assert first.reply["status"] == "ok", first.reply
        assert first.text("stdout") == "one\n", "the cell ran once"
        assert first.text("stderr").count("Live output is off") == 1
        second = run_live(kernel, "echo two")
        assert second.text() == "two\n"
        assert proxy.count("GET", "execute/stream/") == 1
        assert proxy.count("POST", "execute/") == 2
    finally:
        proxy.close()


def test_a_cell_ending_in_tmp_is_told_once_that_tmp_does_not_carry(
    kernel: KernelSession,
) -> None:
    first = run_live(kernel, "mkdir -p /tmp/work && cd /tmp/work && echo scratch > f")
    notices = [line for line in first.text("stderr").splitlines() if "/tmp" in line]
    assert len(notices) == 1 and "/home/student" in notices[0], first.text()
    second = run_live(kernel, "pwd; ls /tmp; cd /tmp")
    assert second.text("stdout") == "/home/student\n", "/tmp/work went with its run"
    assert "/tmp" not in second.text("stderr"), "said once only"


def test_a_printed_line_reaches_the_notebook_within_the_target(kernel: KernelSession) -> None:
    """Each line carries the time it was printed (the sandbox shares this machine's clock);
    it must arrive within 5x the 0.3 s target (the bench reports the median: milliseconds)."""
    arrivals: list[tuple[float, str]] = []

    def arrived(cell: LiveCell, message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream" and message["content"]["name"] == "stdout":
            arrivals.append((time.time(), message["content"]["text"]))

    run_live(kernel, "for i in 1 2 3; do echo $EPOCHREALTIME; sleep 0.5; done", on_output=arrived)
    delays = [at - float(line) for at, text in arrivals for line in text.split() if line.strip()]
    assert len(delays) == 3, arrivals
    assert max(delays) < 5 * FIRST_LINE_TARGET, delays
