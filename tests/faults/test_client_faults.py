"""Faults seen by the client and the session directly, where a short timeout can be given.

The kernel's client waits 60 s for an answer and the kernel offers no setting to shorten it,
so a request that hangs past the timeout is checked here, on a ``Session`` over a
``Sandbox(url, timeout=2)``: the same code the kernel runs a cell with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sandbox_kernel.client import (
    Sandbox,
    Sandbox500,
    SandboxConnectionError,
    SandboxError,
    SandboxProtocolError,
    SandboxTimeout,
)
from sandbox_kernel.session.session import Session

from ..conftest import Server
from .fault_proxy import BUSY_503, CUT, ERROR_500, HANG, NOT_JSON, REFUSE, FaultProxy

FIRST = "x=1; echo data > f"
CHECK = "echo $x; cat f"


@pytest.fixture
def proxy(server: Server) -> Iterator[FaultProxy]:
    with FaultProxy(server.url) as fault_proxy:
        yield fault_proxy


def session_behind(proxy: FaultProxy, server: Server, **options: Any) -> Session:
    session = Session(Sandbox(proxy.url, token=server.token, **options))
    first = session.run_cell(FIRST)
    assert first.ok, first.error
    return session


def assert_intact(session: Session) -> None:
    after = session.run_cell(CHECK)
    assert after.ok, after.error
    assert after.stdout == "1\ndata\n"


def test_hang_past_the_timeout_is_reported_and_not_sent_again(
    start_server: Callable[..., Server],
) -> None:
    """The session knows the server (its specifications tell its identity), so the deadline
    of an execute/ is the longer of the client's timeout and the server's execute_timeout
    plus 10 s: here 11 s."""
    server = start_server("--workers", "2", "--execute-timeout", "1")
    with FaultProxy(server.url) as proxy:
        _hang_is_reported_and_not_sent_again(proxy, server)


def _hang_is_reported_and_not_sent_again(proxy: FaultProxy, server: Server) -> None:
    session = session_behind(proxy, server, timeout=2)
    kept = session.environment
    mark = proxy.mark()
    proxy.set(HANG)
    started = time.monotonic()
    outcome = session.run_cell("x=2; echo changed > f")
    elapsed = time.monotonic() - started

    assert 10.9 <= elapsed < 20, elapsed
    assert outcome.error is not None
    assert outcome.error.ename == "SandboxUnreachable"
    evalue = outcome.error.evalue
    assert proxy.url.rstrip("/") in evalue
    assert "did not answer POST within 11 s" in evalue
    assert "may still be running" in evalue
    advice = " ".join(outcome.error.advice)
    assert "keeps the environment" in advice and str(kept) in advice
    time.sleep(0.5)  # a replay would come now
    assert [e.outcome for e in proxy.executes(mark)] == ["hang"]
    assert session.environment == kept

    proxy.clear()
    assert_intact(session)
    assert [e.outcome for e in proxy.executes(mark)] == ["hang", "forwarded"]


def test_busy_past_the_budget_says_so_and_ran_nothing(proxy: FaultProxy, server: Server) -> None:
    session = session_behind(proxy, server, busy_budget=1.0)
    mark = proxy.mark()
    proxy.set(BUSY_503)
    outcome = session.run_cell("x=2; echo changed > f")

    assert outcome.error is not None
    assert outcome.error.ename == "SandboxBusy"
    evalue = outcome.error.evalue
    assert proxy.url.rstrip("/") in evalue
    assert "503" in evalue and "busy" in evalue and "Try again later" in evalue
    posts = proxy.executes(mark)
    assert len(posts) >= 2 and {e.outcome for e in posts} == {"503"}

    proxy.clear()
    assert_intact(session)


@pytest.mark.parametrize(
    ("fault", "error", "posts"),
    [
        (REFUSE, SandboxConnectionError, 0),
        (ERROR_500, Sandbox500, 1),
        (NOT_JSON, SandboxProtocolError, 1),
        (CUT, SandboxProtocolError, 1),
        (HANG, SandboxTimeout, 1),
    ],
)
def test_client_raises_a_sandbox_error_and_never_replays(
    proxy: FaultProxy, server: Server, fault: str, error: type[SandboxError], posts: int
) -> None:
    with Sandbox(proxy.url, timeout=1, token=server.token) as client:
        assert client.execute({"commands": ["true"]})["status"] == 0
        mark = proxy.mark()
        proxy.set(fault)
        with pytest.raises(error) as raised:
            client.execute({"commands": ["echo once"]})
        assert proxy.url.rstrip("/") in str(raised.value)
        assert len(proxy.executes(mark)) == posts
        proxy.clear()
        assert client.execute({"commands": ["true"]})["status"] == 0
        assert len(proxy.executes(mark)) == posts + 1
