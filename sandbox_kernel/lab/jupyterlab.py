"""The JupyterLab ``lab`` starts: its command, environment and quiet page config, started
quietly (output to a log), its real URL read from its runtime file once it answers, and
stopped with its kernels."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .notebooks import write_file
from .processes import end_survivors, exit_with_parent, process_tree
from .sandbox import LabSandbox
from .terminal import say

#: JupyterLab's plugin that asks "Would you like to get notified about official Jupyter
#: news?" and checks for updates. ``LabApp.news_url=None`` alone does not stop that question
#: (JupyterLab 4 asks whenever its ``fetchNews`` setting is "none", the default), so ``lab``
#: disables the plugin for the JupyterLab it starts.
ANNOUNCEMENTS_PLUGIN = "@jupyterlab/apputils-extension:announcements"

#: Seconds JupyterLab gets to shut its kernels down before it and they are killed.
JUPYTERLAB_GRACE = 20.0


def jupyterlab_command(folder: Path, port: int, no_browser: bool) -> list[str]:
    command = [
        sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder}",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    if no_browser:
        command.append("--no-browser")
    if os.geteuid() == 0:
        command.append("--allow-root")
    return command


def jupyterlab_environment(box: LabSandbox, token_file: Path, config: Path) -> dict[str, str]:
    """JupyterLab reads its token from ``JUPYTER_TOKEN_FILE`` (jupyter_server's
    ``IdentityProvider``); ``JUPYTER_TOKEN``, which would win, is removed. ``config`` comes
    first on ``JUPYTER_CONFIG_PATH``: its page config turns the announcements off."""
    env = box.kernel_environment()
    env.pop("JUPYTER_TOKEN", None)
    env["JUPYTER_TOKEN_FILE"] = str(token_file)
    paths = [str(config), *filter(None, env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep))]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(paths)
    return env


def quiet_config(logs: Path, stack: contextlib.ExitStack) -> Path:
    """A Jupyter config folder whose ``labconfig/page_config.json`` disables the news and
    update prompts, for this JupyterLab only (the user's own config is not touched)."""
    folder = logs / "jupyter-config"
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    page_config = {"disabledExtensions": {ANNOUNCEMENTS_PLUGIN: True}}
    write_file(folder / "labconfig" / "page_config.json", json.dumps(page_config).encode())
    return folder


def start_jupyterlab(
    command: list[str], env: dict[str, str], log_path: Path, stack: contextlib.ExitStack
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, preexec_fn=exit_with_parent(),
        )  # fmt: skip
    stack.callback(_stop_jupyterlab, process)
    return process


def _runtime_file(process: subprocess.Popen[bytes]) -> Path:
    """jupyter_server's ``jpserver-<pid>.json``: the URL it really serves (the port moves
    on when the one asked for is taken)."""
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / f"jpserver-{process.pid}.json"


def wait_until_answering(
    process: subprocess.Popen[bytes], token: str, log_path: Path
) -> str | None:
    """JupyterLab's base URL once it answers an authenticated request; None if it ended."""
    runtime_file = _runtime_file(process)
    started = time.monotonic()
    warned = False
    while process.poll() is None:
        url = _served_url(runtime_file)
        if url is not None and _answers(url, token):
            return url
        if not warned and time.monotonic() - started > 60:
            say(f"            JupyterLab has not answered for a minute; see {log_path}")
            warned = True
        time.sleep(0.1)
    return None


def _served_url(runtime_file: Path) -> str | None:
    try:
        url = json.loads(runtime_file.read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and url.startswith("http") else None


def _answers(url: str, token: str) -> bool:
    request = urllib.request.Request(
        url.rstrip("/") + "/api/status", headers={"Authorization": f"token {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _stop_jupyterlab(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to JupyterLab, which shuts its kernels down; SIGKILL for its process group if
    it takes too long; then any process of its tree still there (a kernel that did not
    answer) gets the same treatment."""
    tree = process_tree(process.pid) if process.poll() is None else []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(JUPYTERLAB_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    end_survivors(tree)
