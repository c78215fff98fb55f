"""Faults between the Sandbox kernel and its server, through a real kernel (jupyter_client).

Each test puts state and files in the sandbox, breaks the path to the server with the proxy
of :mod:`.fault_proxy`, runs a cell, then repairs the path. Whatever the fault, the kernel
stays alive, the cell's error says what happened and what to do, the next cell works as soon
as the fault is gone, and it starts from the last good environment. An ``execute/`` that may
have run (a 500, a cut answer, a dropped connection) is never sent again.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ..conftest import Cell, KernelSession, Server
from .fault_proxy import (
    BUSY_503,
    CUT,
    ENV_404,
    ERROR_500,
    HANG,
    NOT_FOUND,
    NOT_JSON,
    REFUSE,
    FaultProxy,
)

StartKernel = Callable[..., KernelSession]

FIRST = "x=1; echo data > f"
#: What a faulty cell tries: a server that ran it anyway must not become the kernel's state.
FAULTY = "x=2; echo changed > f"
CHECK = "echo $x; cat f"


@pytest.fixture
def proxy(server: Server) -> Iterator[FaultProxy]:
    with FaultProxy(server.url) as fault_proxy:
        yield fault_proxy


def kernel_behind(proxy: FaultProxy, server: Server, start_kernel: StartKernel) -> KernelSession:
    """A kernel whose sandbox URL is the proxy's, with a first cell's state and file."""
    kernel = start_kernel(None, SANDBOX_URL=proxy.url, SANDBOX_TOKEN=server.token or "")
    first = kernel.run(FIRST)
    assert first.status == "ok", first.reply
    return kernel


def assert_intact(kernel: KernelSession) -> None:
    """The kernel is alive and the next cell starts from the last good environment."""
    assert kernel.manager.is_alive()
    after = kernel.run(CHECK)
    assert after.status == "ok", after.reply
    assert after.stdout == "1\ndata\n"
    assert after.stderr == ""


@dataclasses.dataclass
class Case:
    id: str
    #: Turns the fault on (the proxy is listening and forwarding before).
    start: Callable[[FaultProxy], None]
    #: POSTs of execute/ the proxy must see for the faulty cell: never a replay.
    posts: int
    #: Words the error's evalue must hold (besides the URL): what happened, what to check.
    says: tuple[str, ...]
    ename: str | None = None


def _drop_mid_request(proxy: FaultProxy) -> None:
    """The request reaches the proxy, which holds it, then is restarted: the connection drops
    with no answer."""
    proxy.set(HANG)
    after_hang(proxy, proxy.restart)


def after_hang(proxy: FaultProxy, action: Callable[[], object]) -> None:
    """Do ``action`` (in a thread) once a request is held by the proxy, and a little more."""
    mark = proxy.mark()

    def act() -> None:
        proxy.wait_for(HANG, since=mark, timeout=30)
        time.sleep(0.3)
        action()

    threading.Thread(target=act, daemon=True).start()


CASES = [
    Case(
        "refused",
        lambda p: p.set(REFUSE),
        posts=0,
        says=("Cannot reach", "Connection refused", "Check that the sandbox server is running"),
        ename="SandboxUnreachable",
    ),
    Case(
        "500",
        lambda p: p.set(ERROR_500),
        posts=1,
        says=("500", "Internal Server Error: the worker crashed", "server's log"),
        ename="SandboxHTTP500",
    ),
    Case(
        "html-200",
        lambda p: p.set(NOT_JSON),
        posts=1,
        says=("200", "not JSON", "Welcome to nginx", "is a sandbox server", "proxy"),
    ),
    Case(
        "cut-short",
        lambda p: p.set(CUT),
        posts=1,
        says=("cut short", "server's log"),
    ),
    Case(
        "dropped-mid-request",
        _drop_mid_request,
        posts=1,
        says=("connection", "may have run", "not sent again", "server's log"),
    ),
]


def _traceback(cell: Cell) -> str:
    return "\n".join(cell.reply["traceback"])


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_fault_gives_a_clear_error_and_keeps_the_environment(
    case: Case, proxy: FaultProxy, server: Server, start_kernel: StartKernel
) -> None:
    kernel = kernel_behind(proxy, server, start_kernel)
    mark = proxy.mark()
    case.start(proxy)
    cell = kernel.run(FAULTY)

    assert kernel.manager.is_alive()
    assert cell.status == "error"
    assert cell.seconds < 15, "the kernel waited for its 60 s timeout instead of failing"
    if case.ename is not None:
        assert cell.reply["ename"] == case.ename
    assert cell.reply["ename"].startswith("Sandbox")
    evalue = cell.reply["evalue"]
    assert proxy.url.rstrip("/") in evalue, evalue
    for words in case.says:
        assert words in evalue, f"{words!r} not in {evalue!r}"
    traceback = _traceback(cell)
    assert "keeps the environment" in traceback and "next cell continues" in traceback
    [error] = cell.of_type("error")
    assert error["ename"] == cell.reply["ename"]
    assert cell.stdout == ""
    assert len(proxy.executes(mark)) == case.posts, proxy.executes(mark)

    proxy.clear()
    assert_intact(kernel)
    assert len(proxy.executes(mark)) == case.posts + 1


def test_busy_burst_is_retried_with_a_line_that_is_cleared(
    proxy: FaultProxy, server: Server, start_kernel: StartKernel
) -> None:
    kernel = kernel_behind(proxy, server, start_kernel)
    mark = proxy.mark()
    proxy.set(BUSY_503, times=3)
    cell = kernel.run(CHECK)

    assert cell.status == "ok", cell.reply
    assert cell.stdout == "1\ndata\n"
    # 503: the server refused before running anything, so the same POST is sent again.
    assert [e.outcome for e in proxy.executes(mark)] == ["503", "503", "503", "forwarded"]
    kinds = [m["msg_type"] for m in cell.outputs]
    shown = cell.of_type("display_data") + cell.of_type("update_display_data")
    assert len(shown) == 3
    assert all("sandbox busy" in s["data"]["text/plain"] for s in shown)
    assert kinds[0] == "display_data"
    assert "clear_output" in kinds, "the busy line was not removed"
    busy_last = max(i for i, kind in enumerate(kinds) if kind.endswith("display_data"))
    cleared = kinds.index("clear_output")
    assert busy_last < cleared < kinds.index("stream"), kinds  # cleared before the output

    proxy.clear()
    assert_intact(kernel)


def test_lost_environment_is_said_and_the_cell_runs_fresh(
    proxy: FaultProxy, server: Server, start_kernel: StartKernel
) -> None:
    kernel = kernel_behind(proxy, server, start_kernel)
    mark = proxy.mark()
    proxy.set(ENV_404, times=1)
    cell = kernel.run("echo ${x:-unset}; ls; y=fresh; echo new > g")

    assert kernel.manager.is_alive()
    assert cell.status == "ok", cell.reply
    assert cell.stdout == "unset\n"
    assert "is gone from the sandbox" in cell.stderr
    assert "ran in a fresh environment" in cell.stderr
    posts = proxy.executes(mark)
    assert [e.outcome for e in posts] == ["env-404", "forwarded"]
    assert posts[0].environment is not None and posts[0].environment in cell.stderr
    assert posts[1].environment is None  # the 404 ran nothing: sent again, without it

    proxy.clear()
    after = kernel.run("echo $y; cat g; ls")
    assert after.status == "ok", after.reply
    assert after.stdout == "fresh\nnew\ng\n"


def test_a_404_not_about_the_environment_keeps_it(
    proxy: FaultProxy, server: Server, start_kernel: StartKernel
) -> None:
    """A 404 page from a misrouted reverse proxy does not say the environment is unknown (the
    sandbox's own 404 names it: "No environment with UUID '<uuid>' found"): the environment
    must not be given up for it."""
    kernel = kernel_behind(proxy, server, start_kernel)
    mark = proxy.mark()
    proxy.set(NOT_FOUND)
    cell = kernel.run(FAULTY)

    assert kernel.manager.is_alive()
    assert cell.status == "error"
    assert cell.reply["ename"] == "SandboxHTTP404"
    assert proxy.url.rstrip("/") in cell.reply["evalue"]
    assert "is gone" not in cell.stderr, "a 404 page was taken for a lost environment"
    assert "keeps the environment" in _traceback(cell)
    assert len(proxy.executes(mark)) == 1

    proxy.clear()
    assert_intact(kernel)


def test_kernel_started_while_the_sandbox_is_down(
    proxy: FaultProxy, server: Server, start_kernel: StartKernel
) -> None:
    proxy.set(REFUSE)
    kernel = start_kernel(None, SANDBOX_URL=proxy.url, SANDBOX_TOKEN=server.token or "")
    banner = kernel.client.kernel_info(reply=True)["content"]["banner"]
    assert "does not answer yet" in banner and proxy.url.rstrip("/") in banner
    down = kernel.run("x=1")
    assert down.status == "error" and down.reply["ename"] == "SandboxUnreachable"
    assert proxy.url.rstrip("/") in down.reply["evalue"]

    proxy.clear()
    assert kernel.run(FIRST).status == "ok"
    assert_intact(kernel)


def test_proxy_restarted_between_cells_is_not_noticed(
    proxy: FaultProxy, server: Server, start_kernel: StartKernel
) -> None:
    kernel = kernel_behind(proxy, server, start_kernel)
    mark = proxy.mark()
    proxy.restart()  # the kernel's pooled connection is closed under it
    assert_intact(kernel)
    assert len(proxy.executes(mark)) == 1


def test_hung_request_is_interrupted_and_not_sent_again(
    proxy: FaultProxy, server: Server, start_kernel: StartKernel
) -> None:
    """The kernel's own timeout is 60 s: an interrupt is what ends a hung cell here
    (test_client_faults checks the timeout itself with a short-timeout client)."""
    kernel = kernel_behind(proxy, server, start_kernel)
    mark = proxy.mark()
    proxy.set(HANG)
    after_hang(proxy, kernel.manager.interrupt_kernel)
    cell = kernel.run(FAULTY)

    assert kernel.manager.is_alive()
    assert cell.status == "error" and cell.reply["ename"] == "Interrupted"
    assert cell.seconds < 10
    assert "last completed environment" in _traceback(cell)
    assert [e.outcome for e in proxy.executes(mark)] == ["hang"]

    proxy.clear()
    assert_intact(kernel)
    assert len(proxy.executes(mark)) == 2
