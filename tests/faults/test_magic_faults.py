"""Magics that talk to the sandbox, while the path to it is broken: a clear MagicError, the
kernel alive, and the magic works again once the fault is gone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import KernelSession, Server
from .fault_proxy import NOT_JSON, REFUSE, FaultProxy

StartKernel = Callable[..., KernelSession]


@pytest.fixture
def proxy(server: Server) -> Iterator[FaultProxy]:
    with FaultProxy(server.url) as fault_proxy:
        yield fault_proxy


def test_magics_under_faults(
    proxy: FaultProxy, server: Server, start_kernel: StartKernel, tmp_path: Path
) -> None:
    kernel = start_kernel(
        None, cwd=tmp_path, SANDBOX_URL=proxy.url, SANDBOX_TOKEN=server.token or ""
    )
    assert kernel.run("x=1; echo data > f").status == "ok"
    url = proxy.url.rstrip("/")

    proxy.set(REFUSE)
    for magic, action in [
        ("%sandbox_specs --refresh", "Could not read the specifications"),
        ("%sandbox_usage", "Could not read the load"),
        (f"%sandbox_download f --to {tmp_path}", "Could not download f"),
    ]:
        cell = kernel.run(magic)
        assert kernel.manager.is_alive()
        assert cell.status == "error", (magic, cell.reply)
        assert cell.reply["ename"] == "MagicError", (magic, cell.reply)
        evalue = cell.reply["evalue"]
        assert evalue.startswith(action), evalue
        assert url in evalue and "Connection refused" in evalue, evalue
        assert "Check that the sandbox server is running" in evalue, evalue
    assert not (tmp_path / "f").exists()

    proxy.set(NOT_JSON, paths=("specifications/",))
    cell = kernel.run("%sandbox_specs --refresh")
    assert cell.status == "error" and cell.reply["ename"] == "MagicError"
    assert "not JSON" in cell.reply["evalue"] and url in cell.reply["evalue"]

    proxy.clear()
    specs = kernel.run("%sandbox_specs --refresh")
    assert specs.status == "ok", specs.reply
    assert specs.of_type("display_data")
    download = kernel.run(f"%sandbox_download f --to {tmp_path}")
    assert download.status == "ok", download.reply
    assert (tmp_path / "f").read_text() == "data\n"
    after = kernel.run("echo $x; cat f")
    assert after.stdout == "1\ndata\n"
