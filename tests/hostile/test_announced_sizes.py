"""Front-ends accept no more of a file than the server announced: a server (here a real proxy
in front of the embedded one) whose GET sends more than its HEAD said is cut off, in
``%sandbox_download``, in ``display`` and in the panel's Files tab, and nothing of the excess
is written or shown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel._errors import SandboxAnswerTooLarge
from sandbox_kernel.session.context import SandboxContext

from ..conftest import KernelSession, Server
from ..helpers import kernel_env
from ..proxy import CountingProxy

#: Bytes the proxy adds: a little (one more than announced) and a lot.
INFLATIONS = [1, 5 * 1024**2]


@pytest.fixture
def inflating(server: Server) -> Iterator[CountingProxy]:
    proxy = CountingProxy(server.url)
    yield proxy
    proxy.close()


def kernel_on(proxy: CountingProxy, server: Server, folder: Path) -> KernelSession:
    return KernelSession(kernel_env(proxy.url, server.token or ""), cwd=folder)


@pytest.mark.parametrize("extra", INFLATIONS)
def test_download_magic_takes_only_what_was_announced(
    kernelspec: str, server: Server, inflating: CountingProxy, tmp_path: Path, extra: int
) -> None:
    kernel = kernel_on(inflating, server, tmp_path)
    try:
        assert kernel.run("echo data > f").status == "ok"
        inflating.inflate = extra
        cell = kernel.run("%sandbox_download f")
        assert cell.status == "error" and cell.reply["ename"] == "MagicError", cell.reply
        assert "more than" in cell.reply["evalue"], cell.reply["evalue"]
        assert not (tmp_path / "f").exists(), "a file was written from a lying answer"
        inflating.inflate = 0
        assert kernel.run("%sandbox_download f").status == "ok"
        assert (tmp_path / "f").read_text() == "data\n"
    finally:
        kernel.stop()


@pytest.mark.parametrize("extra", INFLATIONS)
def test_display_takes_only_what_was_announced(
    kernelspec: str, server: Server, inflating: CountingProxy, tmp_path: Path, extra: int
) -> None:
    kernel = kernel_on(inflating, server, tmp_path)
    try:
        inflating.inflate = extra
        cell = kernel.run("echo shown > page.txt; display page.txt")
        assert cell.status == "ok", cell.reply
        assert not cell.of_type("display_data"), "a display was built from a lying answer"
        assert "display: could not fetch page.txt" in cell.stderr, cell.stderr
    finally:
        kernel.stop()


@pytest.mark.parametrize("extra", INFLATIONS)
def test_panel_files_take_only_what_was_announced(
    server: Server, inflating: CountingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    extra: int,
) -> None:  # fmt: skip
    from sandbox_kernel.views.panel import SandboxPanel

    monkeypatch.chdir(tmp_path)  # the panel's Download writes into the notebook's folder
    context = SandboxContext(inflating.url, server.token)
    try:
        assert context.session.run_cell("echo data > f").ok
        panel = SandboxPanel(context)
        inflating.inflate = extra
        for limit in (None, 1024):  # Download, then Show
            with pytest.raises(SandboxAnswerTooLarge):
                panel._download("f", limit)
        inflating.inflate = 0
        assert panel._download("f", None) == b"data\n"
    finally:
        context.close()
