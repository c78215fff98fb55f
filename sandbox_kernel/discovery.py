"""Local sandbox servers: the ones advertised in the Jupyter runtime directory, token files, and
a private embedded server started for the caller. Which one a front-end uses is decided in one
place, :func:`sandbox_kernel.settings.resolve`.

A running ``sandbox-kernel serve`` writes ``sandbox-kernel-server-<pid>.json`` (``{url, token,
pid, started_by}``, mode 0600) into the Jupyter runtime directory, so local clients find it and
its token without configuration (``lab`` writes one for the server it starts). A private
server is not advertised: it belongs to its starter, which stops it when done.

Tokens never travel on a command line, where ``ps`` shows them to every local user: they are
passed in files readable by their owner only (:func:`read_token_file`, :func:`write_token_file`)
or in the environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

ADVERTISEMENT_GLOB = "sandbox-kernel-server-*.json"


def default_data_dir() -> Path:
    """Where the embedded server keeps environments unless told otherwise."""
    return Path(jupyter_data_dir()) / "sandbox-kernel"


def runtime_dir() -> Path:
    return Path(jupyter_runtime_dir())


def advertisement_path(pid: int | None = None) -> Path:
    return runtime_dir() / f"sandbox-kernel-server-{pid or os.getpid()}.json"


def default_token_path(pid: int | None = None) -> Path:
    """Where ``serve --no-advertise`` keeps the random token it makes when given none."""
    return runtime_dir() / f"sandbox-kernel-token-{pid or os.getpid()}"


#: Bytes read from a token file at most: a token is short, a huge file is a mistake.
_MAX_TOKEN_FILE = 64 * 1024


class TokenFileError(ValueError):
    """A token file that cannot be used; the message says why and what to do."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def read_token_file(path: Path) -> str:
    """The token held by ``path``: the file's text, or the ``token`` of a server's
    ``{url, token, pid}`` file (so the path ``serve`` prints can be given as is).

    Refused when group or others may read or write the file: its token is no longer a secret,
    or someone else could choose it.
    """
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            text = file.read(_MAX_TOKEN_FILE + 1)
    except OSError as error:
        raise TokenFileError(f"cannot read the token file {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"the token file {path} is not a regular file")
    if info.st_uid not in (os.geteuid(), 0):
        raise TokenFileError(
            f"the token file {path} belongs to another user (uid {info.st_uid}), who could "
            "change the token: use a file of your own"
        )
    if info.st_mode & 0o077:
        raise TokenFileError(
            f"the token file {path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}),"
            f" so its token is no secret: run 'chmod 600 {path}', and put a new token in it if "
            "others may have read it"
        )
    if len(text) > _MAX_TOKEN_FILE:
        raise TokenFileError(f"the token file {path} is over 64 KiB: it holds no token")
    return _token_in(text.decode("utf-8", errors="replace"), path)


def _token_in(text: str, path: Path) -> str:
    token = text.strip()
    if token.startswith("{"):
        try:
            data = json.loads(token)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("token"), str):
            raise TokenFileError(f'{path} is JSON without a "token" string')
        token = data["token"]
    if not token:
        raise TokenFileError(f"the token file {path} is empty: write a token into it, or remove it")
    if not all("!" <= char <= "~" for char in token):
        raise TokenFileError(
            f"the token in {path} has spaces, line breaks or non-ASCII characters: a token is "
            "one word of printable ASCII"
        )
    return token


def write_token_file(path: Path, token: str) -> None:
    """Create ``path`` holding ``token``, mode 0600. Never overwrites, never follows a
    symlink: a file planted there by someone else makes this fail instead of leaking."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        file.write(token)


def token_from_options(token: str | None, token_file: Path | None) -> str | None:
    """The token given by ``--token`` or ``--token-file`` (the file is read now)."""
    return read_token_file(token_file) if token_file is not None else token


def write_advertisement(
    path: Path, url: str, token: str | None, started_by: str | None = None
) -> None:
    """Write ``{url, token, pid, started_by}`` readable by the owner only (it holds the token).

    ``started_by`` names the command that started the server (``"sandbox-kernel lab"``), so
    that ``%sandbox_status`` can say which local server a kernel uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"url": url, "token": token, "pid": os.getpid(), "started_by": started_by})
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(data)
    os.replace(path.with_suffix(".tmp"), path)


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    url: str
    token: str | None
    pid: int | None = None
    #: The command that started it, when its advertisement says (``"sandbox-kernel lab"``).
    started_by: str | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_server_info(path: Path) -> ServerInfo | None:
    """The ``{url, token, pid, started_by}`` of an advertisement; None for a file that is not
    one (too large, not JSON, fields of the wrong type): it is skipped, never trusted."""
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read(_MAX_TOKEN_FILE + 1)[:_MAX_TOKEN_FILE])
        url, token, pid = data["url"], data.get("token"), data.get("pid")
        started_by = data.get("started_by")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(url, str) or not isinstance(token, str | None):
        return None
    if not (
        pid is None or (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31)
    ):
        return None
    return ServerInfo(url, token, pid, started_by if _is_command_name(started_by) else None)


def _is_command_name(value: object) -> bool:
    """A ``started_by`` worth showing: a short line of printable text (it ends up in
    ``%sandbox_status`` and the panel)."""
    return isinstance(value, str) and 0 < len(value) <= 100 and value.isprintable()


def advertised_servers() -> list[ServerInfo]:
    """Local servers whose process still runs, newest first."""
    found = []
    paths = sorted(runtime_dir().glob(ADVERTISEMENT_GLOB), key=_mtime, reverse=True)
    for path in paths:
        info = read_server_info(path)
        if info is not None and (info.pid is None or _alive(info.pid)):
            found.append(info)
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class EmbeddedServer:
    """A private ``sandbox-kernel serve`` process: free port, random token, not advertised.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Its log goes to
    ``log_path`` so that a failure to start can be explained; by default to a scratch
    directory that :meth:`stop` removes after a clean stop (no empty
    ``sandbox-kernel-server-*`` directories pile up in /tmp).
    """

    def __init__(
        self,
        *args: str,
        data_dir: Path | None = None,
        token: str | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.data_dir = data_dir
        self.token: str | None = token if token is not None else secrets.token_urlsafe(24)
        if "--no-token" in self.args:
            self.token = None
        self._scratch = Path(tempfile.mkdtemp(prefix="sandbox-kernel-server-"))
        self.log_path = log_path or self._scratch / "server.log"
        #: ``{url, token, pid}`` of the running server (mode 0600).
        self.info_file = self._scratch / "server.json"
        #: The token, passed to the server by file (never on its command line, which every
        #: local user can read).
        self.token_file = self._scratch / "token"
        if self.token:
            write_token_file(self.token_file, self.token)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.info: ServerInfo | None = None
        self._keep_log = False

    @property
    def url(self) -> str:
        if self.info is None:
            raise RuntimeError("the embedded server is not started")
        return self.info.url

    def start(self, timeout: float = 30.0) -> ServerInfo:
        info_file = self.info_file
        command = [
            sys.executable,
            "-m",
            "sandbox_kernel.server",
            "--port",
            "0",
            "--info-file",
            str(info_file),
            "--no-advertise",
            *self.args,
        ]
        if self.token:
            command += ["--token-file", str(self.token_file)]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
        # Its own session: a Ctrl-C meant for the starter's process group (a kernel being
        # interrupted) must not stop the server; --exit-with-parent stops it if we die.
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*command, "--exit-with-parent"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = read_server_info(info_file) if info_file.exists() else None
            if info is not None:
                self.info = info
                return info
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        log_text = self.log_text()
        self.stop(keep_log=True)
        raise RuntimeError(
            f"the embedded sandbox server did not start (log: {self.log_path}):\n{log_text}"
        )

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """SIGTERM (the server kills its jobs and cleans up), then SIGKILL if it lingers.

        The token file goes too: the secret does not outlive the server. The scratch directory
        goes after a clean stop; a log kept there stays when the server failed (or when
        ``keep_log``), since an error message names it."""
        process, self.process = self.process, None
        clean = True
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            clean = process.returncode == 0
        self.token_file.unlink(missing_ok=True)
        self.info_file.unlink(missing_ok=True)
        self._keep_log = self._keep_log or keep_log or not clean  # a later stop() keeps it too
        if not self._keep_log and self.log_path.parent == self._scratch:
            self.log_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: the log of a failure stays
            self._scratch.rmdir()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
