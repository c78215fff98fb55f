"""``sandbox-kernel lab`` and ``sandbox-kernel demo``: the whole thing, started from one command.

``lab`` brings up the embedded sandbox server (unless a sandbox URL is configured), installs the
Sandbox kernelspec if it is missing, and starts JupyterLab on the notebooks; Ctrl-C stops
everything it started. ``demo`` runs every notebook headless (nbclient) against the same kind
of sandbox, writes the executed copies, and prints a line per notebook: the main job for
someone without a browser.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .discovery import (
    EmbeddedServer,
    ServerInfo,
    configured_sandbox,
    token_from_options,
    write_token_file,
)
from .install import KERNEL_NAME, in_virtualenv, install


def add_arguments(parser: argparse.ArgumentParser, demo: bool) -> None:
    parser.add_argument("--url", help="use this sandbox instead of the embedded one")
    add_token_options(parser)
    parser.add_argument(
        "--notebooks", type=Path, help="folder of notebooks (default: ./notebooks, else here)"
    )
    if demo:
        parser.add_argument(
            "--output", type=Path, help="where executed copies go (default: ./sandbox-kernel-demo)"
        )
        parser.add_argument("--timeout", type=float, default=300,
                            help="seconds a cell may take (default 300)")  # fmt: skip
    else:
        parser.add_argument("--port", type=int, default=8888, help="JupyterLab's port")
        parser.add_argument("--no-browser", action="store_true", help="do not open a browser")


def add_token_options(parser: argparse.ArgumentParser) -> None:
    """``--token-file PATH`` and ``--token T`` (one of them) for a sandbox given by URL."""
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file holding the sandbox's token, mode 0600 (a server's advertisement file "
        "works too). Default: SANDBOX_TOKEN, or the token of the server found",
    )
    tokens.add_argument(
        "--token",
        help="the sandbox's token. WARNING: every local user sees a command line (ps); prefer "
        "--token-file or SANDBOX_TOKEN",
    )


def given_token(args: argparse.Namespace) -> str | None:
    """The token of ``--token`` or ``--token-file``; ValueError says why a file is unusable."""
    token: str | None = args.token
    token_file: Path | None = args.token_file
    return token_from_options(token, token_file)


def notebooks_folder(given: Path | None) -> Path:
    if given is not None:
        return given.resolve()
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path.cwd()


def ensure_kernelspec() -> str:
    """Install the Sandbox kernelspec into this environment if Jupyter does not see it."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL_NAME in KernelSpecManager().find_kernel_specs():
        return "already installed"
    if in_virtualenv():
        return install(prefix=sys.prefix)
    return install(user=True)


@dataclasses.dataclass
class Sandbox:
    info: ServerInfo
    log: Path | None
    token_file: Path | None = None

    def describe(self) -> list[str]:
        """Where things are, for the user."""
        if self.log is None:
            return [f"sandbox:    {self.info.url} (configured)"]
        return [
            f"sandbox:    {self.info.url} (embedded, started now)",
            f"token file: {self.token_file}",
            f"server log: {self.log}",
        ]


@contextlib.contextmanager
def sandbox(url: str | None, token: str | None, logs: Path) -> Iterator[Sandbox]:
    """The configured sandbox, or an embedded server stopped on the way out."""
    info = configured_sandbox(url, token) if url or os.environ.get("SANDBOX_URL") else None
    if info is not None:
        yield Sandbox(info, None)
        return
    log = logs / "sandbox-server.log"
    server = EmbeddedServer(log_path=log)
    try:
        started = server.start()
        yield Sandbox(ServerInfo(started.url, server.token, started.pid), log, server.info_file)
    finally:
        server.stop()


def _environment(box: Sandbox) -> dict[str, str]:
    """What the kernels get: the sandbox's URL and token in their environment, which only
    their user (and root) can read, unlike a command line."""
    env = dict(os.environ)
    env["SANDBOX_URL"] = box.info.url
    env["SANDBOX_TOKEN"] = box.info.token or ""
    return env


def _jupyterlab_environment(box: Sandbox, token_file: Path) -> dict[str, str]:
    """JupyterLab reads its token from ``JUPYTER_TOKEN_FILE`` (jupyter_server's
    ``IdentityProvider``); ``JUPYTER_TOKEN``, which would win, is removed."""
    env = _environment(box)
    env.pop("JUPYTER_TOKEN", None)
    env["JUPYTER_TOKEN_FILE"] = str(token_file)
    return env


def _require(module: str) -> bool:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        print(f"sandbox-kernel: {module} is not installed. Install the extra: "
              "pip install 'sandbox-kernel[lab]' (or pip install -e '.[lab]' in a clone).",
              file=sys.stderr)  # fmt: skip
        return False
    return True


def lab(args: argparse.Namespace) -> int:
    if not _require("jupyterlab"):
        return 2
    try:
        sandbox_token = given_token(args)
    except ValueError as error:
        print(f"sandbox-kernel lab: {error}", file=sys.stderr)
        return 2
    notebooks = notebooks_folder(args.notebooks)
    logs = Path(tempfile.mkdtemp(prefix="sandbox-kernel-lab-"))  # mode 0700
    with sandbox(args.url, sandbox_token, logs) as box:
        spec = ensure_kernelspec()
        token = secrets.token_hex(16)
        token_file = logs / "jupyterlab-token"
        write_token_file(token_file, token)
        command = [
            sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={notebooks}",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={args.port}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]  # fmt: skip
        if args.no_browser:
            command.append("--no-browser")
        if os.geteuid() == 0:
            command.append("--allow-root")
        log_path = logs / "jupyterlab.log"
        print("\n".join(box.describe()))
        print(f"kernelspec: {KERNEL_NAME} ({spec})")
        print(f"notebooks:  {notebooks}")
        print(f"JupyterLab: http://127.0.0.1:{args.port}/lab?token={token}")
        print(f"            log: {log_path}")
        print("Ctrl-C stops JupyterLab, its kernels and the embedded sandbox.", flush=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=_jupyterlab_environment(box, token_file),
                                       stdout=log, stderr=log, start_new_session=True)  # fmt: skip
            return _wait(process, log_path)


def _wait(process: subprocess.Popen[bytes], log_path: Path) -> int:
    try:
        code = process.wait()
    except KeyboardInterrupt:
        print("\nstopping JupyterLab and its kernels…", flush=True)
        _stop(process)
        return 0
    if code != 0:
        print(f"JupyterLab stopped with status {code}; see {log_path}", file=sys.stderr)
    return code


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (JupyterLab shuts its kernels down), then SIGKILL for the whole group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def demo(args: argparse.Namespace) -> int:
    if not _require("nbclient"):
        return 2
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    try:
        token = given_token(args)
    except ValueError as error:
        print(f"sandbox-kernel demo: {error}", file=sys.stderr)
        return 2
    notebooks = notebooks_folder(args.notebooks)
    paths = sorted(notebooks.glob("*.ipynb"))
    if not paths:
        print(f"sandbox-kernel demo: no notebooks in {notebooks}", file=sys.stderr)
        return 2
    output = (args.output or Path.cwd() / "sandbox-kernel-demo").resolve()
    output.mkdir(parents=True, exist_ok=True)
    print(f"notebooks: {notebooks}\nexecuted copies: {output}")
    failures = 0
    with sandbox(args.url, token, output) as box, _environ(_environment(box)):
        ensure_kernelspec()
        print("\n".join(box.describe()), flush=True)
        for path in paths:
            notebook = nbformat.read(path, as_version=4)
            started = time.monotonic()
            client = NotebookClient(
                notebook, timeout=args.timeout, store_widget_state=True,
                resources={"metadata": {"path": str(output)}},
            )  # fmt: skip
            problem = ""
            try:
                client.execute()
            except CellExecutionError as error:
                problem = str(error).strip().splitlines()[-1][:200]
            except Exception as error:  # a kernel that died, a timeout: report and go on
                problem = f"{type(error).__name__}: {error}"[:200]
            nbformat.write(notebook, output / path.name)
            ran, errors = _count(notebook)
            failures += bool(problem)
            verdict = f"FAILED: {problem}" if problem else "ok"
            print(f"{path.name}: {ran} cells run, {errors} errors, "
                  f"{time.monotonic() - started:.1f} s, {verdict}", flush=True)  # fmt: skip
    return 1 if failures else 0


def _count(notebook: object) -> tuple[int, int]:
    cells = [c for c in notebook.cells if c.cell_type == "code"]  # type: ignore[attr-defined]
    ran = sum(1 for c in cells if c.get("execution_count"))
    errors = sum(1 for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error")
    return ran, errors


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
