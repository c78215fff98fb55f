"""The Sandbox kernel in a JupyterHub single-user server, through jupyter_client.

The kernel gets the environment a JupyterHub 5+ spawner gives a server (the user's API token,
the Hub's public URLs, its base URL) and no ``SANDBOX_URL``: it must find the Hub's sandbox
service, send the user's token there and nowhere else, say what the Hub must grant when the
token is refused, and show the user's share of a sandbox that knows its users. The Hub's
origin is played by :class:`~tests.fast.test_hub_settings.HubStandIn`, a little HTTP server
on loopback (recording every request) that forwards to the real embedded server, or answers
what only a ``--hub-auth`` server behind a Hub can (a refused scope, ``usages/`` with
``user``); the panel's Load tab is checked in-process on the same stand-in.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.session.context import SandboxContext
from sandbox_kernel.views.panel import SandboxPanel

from .conftest import Cell, KernelSession, Server
from .fast.test_hub_settings import HUB_SCOPE_ADVICE, NO_SCOPE_TEXT, HubStandIn, hub_env

StartKernel = Callable[..., KernelSession]


def said(cell: Cell) -> str:
    """Everything a user reads of a cell: its outputs' text, its error and traceback."""
    parts = [cell.stdout, cell.stderr]
    for kind in ("display_data", "execute_result"):
        parts += [str(content["data"].get("text/plain", "")) for content in cell.of_type(kind)]
    for error in [cell.reply, *cell.of_type("error")]:
        if error.get("status", "error") == "error" and "evalue" in error:
            parts += [error["evalue"], *error.get("traceback", [])]
    return "\n".join(parts)


# -- which sandbox, which token --------------------------------------------------------------------


def test_the_kernel_runs_on_the_hub_service_and_sends_the_token_nowhere_else(
    server: Server, start_kernel: StartKernel
) -> None:
    """Cells run on ``{public origin}/services/sandbox/`` with the user's token; after
    ``%sandbox_connect`` to another user's path on the Hub's origin, or another host, no
    request carries it (a token given with the URL goes, alone); back to the service, it
    goes again."""
    upstream = (server.url, server.token)
    with HubStandIn(upstream) as hub, HubStandIn(upstream, host="localhost") as other:
        kernel = start_kernel(**hub_env(hub))
        first = kernel.run("echo kept > f; cat f")
        assert (first.status, first.stdout) == ("ok", "kept\n"), said(first)
        status = said(kernel.run("%sandbox_status"))
        assert hub.service_url in status and "JupyterHub service 'sandbox'" in status, status
        mallory = f"{hub.url}user/mallory/sandbox/"
        for url in (mallory, other.url):
            moved = kernel.run(f"%sandbox_connect {url}\n%sandbox_specs --refresh\n%sandbox_usage")
            assert moved.status == "ok", said(moved)
            there = kernel.run("echo there")
            assert (there.status, there.stdout) == ("ok", "there\n"), said(there)
        given = kernel.run(f"%sandbox_connect {mallory} --token given\necho given")
        assert given.stdout == "given\n", said(given)
        back = kernel.run(f"%sandbox_connect {hub.service_url}\necho back")
        assert (back.status, back.stdout) == ("ok", "back\n"), said(back)
        bearer = f"Bearer {hub.token}"
        assert set(hub.authorizations("/services/sandbox/")) == {bearer}
        assert len(hub.authorizations("/services/sandbox/")) >= 4  # specs, execute... twice
        seen = hub.authorizations("/user/mallory/")
        assert None in seen and set(seen) == {None, "Bearer given"}, seen
        assert set(other.authorizations("/", host="localhost")) == {None}
        assert hub.carrying(hub.token) == [] and other.carrying(hub.token) == []


def test_without_a_public_url_the_first_cell_says_what_to_set(start_kernel: StartKernel) -> None:
    kernel = start_kernel(**hub_env())
    for code in ("echo hi", "%sandbox_specs"):
        cell = kernel.run(code)
        told = said(cell)
        assert cell.status == "error" and "SandboxNotConfigured" in told, told
        assert "c.JupyterHub.public_url" in told and "SANDBOX_URL" in told, told
        assert "hi" not in cell.stdout


# -- what a refusal says ---------------------------------------------------------------------------


@pytest.mark.parametrize("configured", ["derived", "SANDBOX_URL"])
def test_a_refused_token_names_what_is_missing(start_kernel: StartKernel, configured: str) -> None:
    """A 403 names the scope, the ``user`` role and ``c.Spawner.server_token_scopes``, with
    the server's own text, at the first cell and at ``%sandbox_specs``; a 401 says to restart
    the server from the Hub's control panel."""
    with HubStandIn() as hub:
        hub.mode = "no scope"
        extra = {"SANDBOX_URL": hub.service_url} if configured == "SANDBOX_URL" else {}
        kernel = start_kernel(**hub_env(hub, **extra))
        for code in ("echo hi", "%sandbox_specs --refresh"):
            cell = kernel.run(code)
            told = said(cell)
            assert cell.status == "error", told
            for words in ("access:services!service=sandbox", "'user' role", HUB_SCOPE_ADVICE,
                          "AND add it to c.Spawner.server_token_scopes", NO_SCOPE_TEXT[:60],
                          "examples/jupyterhub/jupyterhub_config.py"):  # fmt: skip
                assert words in told, told
        hub.mode = "unknown token"
        cell = kernel.run("echo hi")
        told = said(cell)
        assert cell.status == "error" and "SandboxHTTP401" in told, told
        assert "Hub Control Panel" in told and "expired or was revoked" in told, told


# -- the user's share ------------------------------------------------------------------------------


def _displayed(cell: Cell) -> str:
    return "\n".join(str(c["data"].get("text/plain", "")) for c in cell.of_type("display_data"))


def test_usage_shows_your_share_and_the_class(start_kernel: StartKernel) -> None:
    """``%sandbox_usage`` of a sandbox that knows its users: "you: 1 running · class: 17/40
    busy"; a teacher also gets every user's runs and storage; without ``user``, the line
    is what it always was."""
    with HubStandIn() as hub:
        hub.busy = 17  # of the 40 containers the recorded specifications tell
        kernel = start_kernel(**hub_env(hub))
        plain = _displayed(kernel.run("%sandbox_usage"))
        assert "42% (17/40 busy)" in plain and "you:" not in plain, plain
        hub.user = {"name": "ann", "running": 1, "queued": 0, "stored_bytes": 3 * 1024**2}
        student = kernel.run("%sandbox_usage")
        shown = _displayed(student)
        assert student.status == "ok", said(student)
        assert "you: 1 running · class: 17/40 busy" in shown, shown
        assert "your saved environments 3.0 MiB" in shown and "Users of" not in shown, shown
        hub.user = {"name": "ann", "running": 2, "queued": 3, "stored_bytes": 0}
        assert "you: 2 running, 3 queued · class: 17/40 busy" in _displayed(
            kernel.run("%sandbox_usage")
        )
        hub.users = [
            {"name": "bob", "running": 0, "queued": 0, "stored_bytes": 1024},
            {"name": "ann", "running": 2, "queued": 3, "stored_bytes": 0},
            {"name": "eve\x1b[2J\nroot", "running": 1, "queued": 0, "stored_bytes": 2048},
        ]
        teacher = _displayed(kernel.run("%sandbox_usage"))
        rows = [line.split() for line in teacher.splitlines()]
        assert ["ann", "2", "3", "0", "B"] in rows and ["bob", "0", "0", "1.0", "KiB"] in rows
        assert "eve?[2J?root" in teacher and "\x1b" not in teacher, teacher
        assert "total (3 users)" in teacher and "3 running, 3 queued" in teacher, teacher


async def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "the panel did not show a load in time"
        await asyncio.sleep(0.02)


def _text(value: str) -> str:
    spaced = re.sub(r"</?(?:td|th|tr|caption)\b[^>]*>", " ", value)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", spaced))).strip()


def test_the_panel_load_tab_shows_your_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Load tab's figures, in-process on the same stand-in: the share line; a teacher's
    table of users below the chart."""
    monkeypatch.chdir(tmp_path)
    with HubStandIn() as hub:
        hub.busy = 17
        hub.user = {"name": "ann", "running": 1, "queued": 0, "stored_bytes": 0}
        hub.users = [hub.user, {"name": "bob", "running": 4, "queued": 1, "stored_bytes": 0}]
        context = SandboxContext(hub.service_url, hub.token)
        shown: dict[str, Any] = {}

        async def scenario() -> None:
            panel = SandboxPanel(context, interval=0.5)
            panel.start()
            try:
                await _until(lambda: bool(panel.history))
                shown["load"] = _text(panel.load_text.value)
                shown["tables"] = _text(panel.workers.value)
                shown["gauge"] = panel.gauge.value
            finally:
                panel.close()

        try:
            asyncio.run(scenario())
        finally:
            context.close()
    assert shown["load"].startswith("you: 1 running · class: 17/40 busy"), shown
    assert "bob 4 1" in shown["tables"] and "total (2 users) 5 1" in shown["tables"], shown
    assert shown["gauge"] == pytest.approx(17 / 40)
