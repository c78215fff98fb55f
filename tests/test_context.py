"""The façade the front-ends call (``SandboxContext``), in-process against the real embedded
server, with a real slow proxy where the server must be slow."""

from __future__ import annotations

import threading
import time

import pytest

from sandbox_kernel import SandboxTimeout
from sandbox_kernel._errors import SandboxCancelled
from sandbox_kernel.client import Cancellation, cancel_scope
from sandbox_kernel.session.context import SandboxContext

from .conftest import Server
from .proxy import CountingProxy


def test_an_interrupt_ends_a_wait_behind_another_request(
    server: Server, counting_proxy: CountingProxy
) -> None:
    """A magic queued behind a slow side request (a panel's refresh of usages/) ends at the
    interrupt, not when the side request does."""
    context = SandboxContext(counting_proxy.url, server.token)
    try:
        context.specs()
        counting_proxy.delays["/usages/"] = 3.0
        busy = context.submit(context.load)  # the worker is held for 3 s
        cancellation, outcome = Cancellation(), {}

        def magic() -> None:
            with cancel_scope(cancellation):
                try:
                    context.inventory()
                except SandboxCancelled as error:
                    outcome["error"] = error

        thread = threading.Thread(target=magic)
        thread.start()
        time.sleep(0.3)
        started = time.monotonic()
        cancellation.cancel()
        thread.join(5)
        assert isinstance(outcome.get("error"), SandboxCancelled)
        assert time.monotonic() - started < 1.0  # generous: it polls every 50 ms
        busy.result(10)
    finally:
        context.close()


def test_side_requests_name_their_own_timeout(
    server: Server, counting_proxy: CountingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_SIDE_TIMEOUT", "1")
    counting_proxy.delays["/specifications/"] = 3.0
    context = SandboxContext(counting_proxy.url, server.token)
    try:
        with pytest.raises(SandboxTimeout, match="SANDBOX_SIDE_TIMEOUT=1"):
            context.specs()
    finally:
        context.close()


def test_connect_keeps_the_users_timeouts_and_swaps_in_one_step(
    server: Server, start_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_TIMEOUT", "7")
    context = SandboxContext(server.url, server.token)
    try:
        assert context.session.run_cell("echo hi").stdout == "hi\n"
        first = context.connection
        settings = context.connect(server.url, server.token)
        assert (settings.timeout, settings.side_timeout) == (7.0, 7.0)
        assert context.connection is not first and context.session.environment is None
        with pytest.raises(Exception, match=r"check %sandbox_connect URL"):
            context.connect("localhost:7000", None)
        assert context.connection.settings.url == server.url  # a typo keeps the connection
    finally:
        context.close()
    with pytest.raises(Exception, match="closed"):
        context.connection  # noqa: B018  (no server is started for a closed context)


def test_the_private_server_outlives_a_connect_elsewhere(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """``%sandbox_connect`` elsewhere, then back: the private embedded server is still there,
    with its environments, and its own origin gets its token back."""
    monkeypatch.delenv("SANDBOX_URL", raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))  # nothing advertised
    context = SandboxContext()
    try:
        private = context.settings
        assert "private embedded server" in private.describe()
        context.session.run_cell("echo kept > f")
        saved = context.session.environment
        context.connect(server.url, server.token)
        context.connect(private.url, None)  # no token given: the configured one applies
        assert context.session.run_cell("echo back").stdout == "back\n"
        assert context.fetch("f", saved) == b"kept\n"
    finally:
        context.close()
