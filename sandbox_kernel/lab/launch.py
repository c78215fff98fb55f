"""``sandbox-kernel lab``: the sandbox, the kernelspec, the notebooks and JupyterLab, started
in that order and stopped in the reverse one."""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import tempfile
from pathlib import Path

from .._errors import SandboxConfigError
from ..discovery import write_token_file
from ..install import KERNEL_NAME
from .jupyterlab import (
    jupyterlab_command,
    jupyterlab_environment,
    quiet_config,
    start_jupyterlab,
    wait_until_answering,
)
from .notebooks import open_folder
from .options import given_token
from .prerequisites import ensure_kernelspec, require
from .processes import StopSignals, stopped_by
from .sandbox import LabSandbox, found_sandbox, start_advertised_server
from .terminal import say


def lab(args: argparse.Namespace) -> int:
    if not require("jupyterlab"):
        return 2
    try:
        sandbox_token = given_token(args)
    except ValueError as error:
        say(f"sandbox-kernel lab: {error}", error=True)
        return 2
    with StopSignals() as signals, contextlib.ExitStack() as stack:
        try:
            code = _run_lab(args, sandbox_token, stack)
        except KeyboardInterrupt as interrupt:
            signals.ignore()
            say(f"\n{stopped_by(interrupt)}: stopping JupyterLab, its kernels and what "
                 "else lab started…")  # fmt: skip
            code = 0
        except (SandboxConfigError, NotADirectoryError) as error:
            say(f"sandbox-kernel lab: {error}", error=True)
            code = 2
        except RuntimeError as error:  # the embedded server did not start
            say(f"sandbox-kernel lab: {error}", error=True)
            code = 1
        finally:
            signals.ignore()  # the shutdown (the stack) is bounded in time: not to be cut
    return code


def _run_lab(
    args: argparse.Namespace, sandbox_token: str | None, stack: contextlib.ExitStack
) -> int:
    found = found_sandbox(args.url, sandbox_token)
    folder, notes = open_folder(args.dir)  # a bad --dir fails before anything is made
    logs = Path(tempfile.mkdtemp(prefix="sandbox-kernel-lab-"))  # mode 0700, logs kept
    stack.callback(_remove_if_empty, logs)
    box = LabSandbox(found) if found is not None else start_advertised_server(logs, stack)
    spec = ensure_kernelspec()
    token = secrets.token_hex(16)
    token_file = logs / "jupyterlab-token"
    write_token_file(token_file, token)
    stack.callback(token_file.unlink, missing_ok=True)
    log_path = logs / "jupyterlab.log"
    say("\n".join([*box.describe(), f"kernelspec: {KERNEL_NAME} ({spec})",
                    f"notebooks:  {folder}", *(f"            {note}" for note in notes),
                    f"JupyterLab: starting (log: {log_path})"]))  # fmt: skip
    env = jupyterlab_environment(box, token_file, quiet_config(logs, stack))
    command = jupyterlab_command(folder, args.port, args.no_browser)
    process = start_jupyterlab(command, env, log_path, stack)
    url = wait_until_answering(process, token, log_path)
    if url is None:
        say(f"JupyterLab stopped with status {process.wait()} before answering; see "
             f"{log_path}:\n{_tail(log_path)}", error=True)  # fmt: skip
        return 1
    moved = f" (port {args.port} was taken)" if args.port and f":{args.port}/" not in url else ""
    what = "JupyterLab, its kernels and the sandbox server"
    if box.server is None:
        what = "JupyterLab and its kernels (not the sandbox server, which lab did not start)"
    say(f"JupyterLab: {url.rstrip('/')}/lab?token={token}{moved}\n"
         f"Ctrl-C (or SIGTERM, SIGHUP) stops {what}.")  # fmt: skip
    return _wait(process, log_path)


def _remove_if_empty(folder: Path) -> None:
    """The logs folder stays only when something was logged in it."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _wait(process: subprocess.Popen[bytes], log_path: Path) -> int:
    """JupyterLab's exit status, when it stops by itself (File > Shut Down)."""
    code = process.wait()
    if code != 0:
        say(f"JupyterLab stopped with status {code}; see {log_path}", error=True)
    return code


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
