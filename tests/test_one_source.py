"""Bugs of knowledge written several times, seen as a user sees them, through real kernels.

- A malformed ``SANDBOX_URL`` used to kill the kernel before ``kernel_info``: now the kernel
  starts, and its banner and every cell say what is wrong (``%sandbox_connect`` repairs it).
- ``%sandbox_specs`` used to send ``usages/`` behind the user's back (2 s on the public server).
- The user's timeout did not reach side requests, and timeout errors did not name the setting.
- ``%sandbox_status`` said "private embedded server: no" under ``lab``: it names the server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from sandbox_kernel.discovery import advertisement_path, write_advertisement

from .conftest import KernelSession, Server
from .proxy import CountingProxy

pytestmark = pytest.mark.slow  # kernels through jupyter_client


def test_a_malformed_url_gives_a_kernel_that_says_what_is_wrong(
    start_kernel: Callable[..., KernelSession], server: Server
) -> None:
    kernel = start_kernel(SANDBOX_URL="localhost:7000")
    reply = kernel.client.kernel_info(reply=True, timeout=30)
    banner = reply["content"]["banner"]
    assert "'localhost:7000' is not a sandbox URL" in banner and "SANDBOX_URL" in banner
    for code in ("echo hi", "%sandbox_status"):
        cell = kernel.run(code)
        assert cell.status == "error"
        assert cell.reply["ename"] == "SandboxNotConfigured"
        assert "check SANDBOX_URL" in cell.reply["evalue"]
    # The user can repair it from the notebook.
    token = f" --token {server.token}" if server.token else ""
    assert kernel.run(f"%sandbox_connect {server.url}{token}").status == "ok"
    assert kernel.run("echo repaired").stdout == "repaired\n"


def test_sandbox_specs_asks_only_for_the_specifications(
    start_kernel: Callable[..., KernelSession], server: Server, counting_proxy: CountingProxy
) -> None:
    kernel = start_kernel(server, SANDBOX_URL=counting_proxy.url)
    cell = kernel.run("%sandbox_specs")
    assert cell.status == "ok", cell.outputs
    assert "Sandbox specifications" in str(cell.outputs)
    assert counting_proxy.count("GET", "usages/") == 0
    assert counting_proxy.count("GET", "specifications/") >= 1
    kernel.run("%sandbox_usage")
    assert counting_proxy.count("GET", "usages/") == 1  # the load is asked for where it is wanted


def test_the_users_timeout_reaches_side_requests_and_is_named(
    start_kernel: Callable[..., KernelSession], server: Server, counting_proxy: CountingProxy
) -> None:
    counting_proxy.delays["/specifications/"] = 4.0
    kernel = start_kernel(server, SANDBOX_URL=counting_proxy.url, SANDBOX_TIMEOUT="1")
    started = time.monotonic()
    cell = kernel.run("%sandbox_specs", timeout=60)
    assert time.monotonic() - started < 3.5  # 1 s, not the delay nor a built-in 10 s
    assert cell.status == "error"
    assert "within 1 s" in cell.reply["evalue"]
    assert "SANDBOX_TIMEOUT=1" in cell.reply["evalue"]


def test_status_names_the_server_in_use(
    start_kernel: Callable[..., KernelSession], server: Server
) -> None:
    # The tests' private Jupyter runtime directory (conftest): this process advertises the
    # server as `lab` would.
    advertisement = advertisement_path(os.getpid())
    write_advertisement(advertisement, server.url, server.token, "sandbox-kernel lab")
    try:
        advertised = start_kernel()  # no SANDBOX_URL: the advertised server is found
        shown = advertised.run("%sandbox_status").outputs
        assert "a local server started by `sandbox-kernel lab`" in str(shown)
        assert "found advertised" in str(shown)
    finally:
        os.unlink(advertisement)
    private = start_kernel()
    assert "a private embedded server" in str(private.run("%sandbox_status").outputs)
    given = start_kernel(server)
    assert "the server given by SANDBOX_URL" in str(given.run("%sandbox_status").outputs)
