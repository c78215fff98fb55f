"""The sandbox as a JupyterHub service (issue 16): who is asking, their fair share, and a log
of what they ran.

- :class:`HubGuard` identifies the caller of each request with JupyterHub's own service
  authentication (:class:`jupyterhub.services.auth.HubAuth`): the request carries the user's
  JupyterHub API token, the Hub says whose it is and which scopes it holds. Answers are cached
  by HubAuth (``cache_max_age``, 5 minutes), so a session's cells cost the Hub one request.
- :class:`UserShares` lets each user run ``--per-user-runs`` commands at a time; a user's
  further requests wait in that user's own queue, before they take any of the server's slots,
  so one student's 20 parallel cells never keep the others waiting for a slot.
- :class:`RunLog` appends one JSON line per run (``--run-log``): what a teacher needs to
  answer "what did this student run".

Imported only with ``--hub-auth``: ``jupyterhub`` is an optional dependency (``[hub]``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .settings import ServerSettings

log = logging.getLogger(__name__)

#: Holders of this custom scope see every user's share in ``usages/``.
TEACHER_SCOPE = "custom:sandbox:teacher"
#: Bytes of a run's commands kept in the run log.
RUN_LOG_COMMANDS = 4096  # about: the head's quarter and the tail's rest, with a mark between
DEFAULT_SERVICE_NAME = "sandbox"
#: Longer "tokens" are not JupyterHub's (its are 32 characters): refused without asking it.
_MAX_TOKEN = 1024
#: HTTP's optional white space (RFC 9110, OWS): all that may surround a header's value. Not
#: str.strip()'s Unicode white space, which would make "\u2028<token>" a token.
_HTTP_SPACE = " \t"
#: Longer user names are not a Hub's: they would end up in every run log line and usages/.
_MAX_NAME = 255


@dataclasses.dataclass(frozen=True)
class Caller:
    """The JupyterHub user behind a request."""

    name: str
    teacher: bool = False


def resolve_hub_settings(settings: ServerSettings, environ: Mapping[str, str]) -> None:
    """Fill what the Hub tells a managed service through its environment: the service's name,
    its URL prefix and (when ``--host``/``--port`` kept their defaults) where to listen.
    Raises ValueError naming what is missing when the Hub's API cannot be reached."""
    if not settings.hub_auth:
        return
    needed = ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL")
    missing = [name for name in needed if not environ.get(name)]
    if missing:
        raise ValueError(
            f"--hub-auth needs {' and '.join(missing)}: JupyterHub sets them for a service it "
            "starts (c.JupyterHub.services with a 'command'); for a service you start yourself, "
            "set them to the service's API token and the Hub's API URL"
        )
    if settings.hub_service_name is None:
        settings.hub_service_name = environ.get("JUPYTERHUB_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    if settings.base_path is None:
        prefix = environ.get("JUPYTERHUB_SERVICE_PREFIX", "/") or "/"
        settings.base_path = prefix if prefix.endswith("/") else prefix + "/"
    bind = environ.get("JUPYTERHUB_SERVICE_URL")
    defaults = ServerSettings()
    if bind and (settings.host, settings.port) == (defaults.host, defaults.port):
        where = urlsplit(bind)
        settings.host = where.hostname or settings.host
        settings.port = where.port or settings.port


class HubGuard:
    """Identifies the caller of a request with the Hub, or answers 401/403 saying why not."""

    def __init__(self, settings: ServerSettings) -> None:
        # JupyterHub's import brings alembic, whose plugins log at INFO when loaded.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from jupyterhub.services.auth import HubAuth

        self.service = settings.hub_service_name or DEFAULT_SERVICE_NAME
        self.scope = f"access:services!service={self.service}"
        self.auth = HubAuth(access_scopes={self.scope}, cache_max_age=300)

    async def identify(self, request: web.Request) -> Caller | web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip(_HTTP_SPACE)
        if len(token) > _MAX_TOKEN or not (token.isascii() and token.isprintable()):
            token = ""  # never sent on to the Hub: not a token JupyterHub makes
        if scheme.lower() not in ("bearer", "token") or not token:
            return _text(
                401,
                "Missing JupyterHub token: send 'Authorization: Bearer <token>' with your "
                "JupyterHub API token (JUPYTERHUB_API_TOKEN in your server's environment).",
            )
        try:
            user = await self.auth.user_for_token(token, sync=False)
        except Exception as error:  # the Hub down, or answering garbage
            log.warning("the Hub could not check a token: %s", error)
            return _text(
                502,
                "The sandbox could not ask JupyterHub who you are (the Hub did not answer). "
                "Try again in a moment; if it lasts, tell the Hub's administrator.",
            )
        if not user:
            return _text(
                401,
                "JupyterHub does not know this token (expired, or revoked): restart your "
                "server from the Hub's control panel to get a new one.",
            )
        model = _user_model(user)
        if model is None:  # the Hub's answer is checked like any other input
            log.warning("the Hub answered a token check with no user model: %.200r", user)
            return _text(
                502,
                "JupyterHub's answer about your token is not a user (no valid name and scopes): "
                "tell the Hub's administrator.",
            )
        name, scopes = model
        if not self.auth.check_scopes({self.scope}, {"scopes": scopes}):
            return _text(
                403,
                f"Your JupyterHub token lacks the scope {self.scope}. The Hub's administrator "
                f"must grant it to the 'user' role (c.JupyterHub.load_roles) and add it to "
                "c.Spawner.server_token_scopes, then you restart your server "
                "(examples/jupyterhub/jupyterhub_config.py does both).",
            )
        return Caller(name, teacher=TEACHER_SCOPE in scopes)


def _user_model(answer: object) -> tuple[str, set[str]] | None:
    """(name, scopes) of the Hub's answer for a token, or None if it is not a user model: a
    printable name of 1 to 255 characters and a list of text scopes."""
    if not isinstance(answer, dict):
        return None
    name, scopes = answer.get("name"), answer.get("scopes", [])
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME or not name.isprintable():
        return None
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        return None
    return name, set(scopes)


def _text(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="sandbox"'} if status == 401 else None
    return web.Response(status=status, text=message, content_type="text/plain", headers=headers)


@dataclasses.dataclass
class _Share:
    """One user's runs: a semaphore of ``--per-user-runs`` and what waits on it."""

    slots: asyncio.Semaphore
    running: int = 0
    queued: int = 0


class UserShares:
    """Each user's runs at a time, and their queue (see the module's docstring)."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._shares: dict[str, _Share] = collections.defaultdict(
            lambda: _Share(asyncio.Semaphore(self.per_user))
        )

    @contextlib.asynccontextmanager
    async def admitted(self, user: str) -> AsyncIterator[None]:
        """Wait for one of ``user``'s slots (their queue), run, give it back."""
        share = self._shares[user]
        share.queued += 1
        try:
            await share.slots.acquire()
        finally:
            share.queued -= 1
        share.running += 1
        try:
            yield
        finally:
            share.running -= 1
            share.slots.release()

    def of(self, user: str) -> dict[str, int]:
        """``user``'s runs now and waiting (zeros for a user who never ran anything)."""
        share = self._shares.get(user)
        if share is None:
            return {"running": 0, "queued": 0}
        return {"running": share.running, "queued": share.queued}

    def users(self) -> list[str]:
        return sorted(self._shares)


class RunLog:
    """``--run-log``: one JSON line per run, appended (0600, created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._append(b"")  # fails at start, not at the first run, if the place is wrong

    def write(
        self,
        user: str | None,
        config: Mapping[str, Any],
        answer: Mapping[str, Any] | None,
        status: int,
        seconds: float,
    ) -> None:
        commands = _as_text(config.get("commands", ()))
        line = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "user": user,
            "environment": config.get("environment"),
            "saved": (answer or {}).get("environment"),
            "commands": _head_and_tail(commands, RUN_LOG_COMMANDS),
            "duration": round(seconds, 3),
            "status": status,
        }
        with self._lock:
            self._append((json.dumps(line, ensure_ascii=False) + "\n").encode())

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def _as_text(commands: Any) -> str:
    """A run's commands, one per line: a ``{"command": ..., "timeout": ...}`` entry (the
    kernel's, after ``%sandbox_timeout``) by its command."""
    lines = []
    for command in commands if isinstance(commands, list | tuple) else ():
        if isinstance(command, Mapping):
            command = command.get("command", "")
        lines.append(str(command))
    return "\n".join(lines)


def _head_and_tail(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` bytes, keeping its head and its tail: a kernel's cell
    comes after its prologue (several KiB), so the end is what a teacher needs most."""
    data = text.encode()
    if len(data) <= limit:
        return text
    head, tail = data[: limit // 4], data[-(limit - limit // 4) :]
    cut = len(data) - len(head) - len(tail)
    return (
        head.decode(errors="ignore") + f"\n[... {cut} bytes ...]\n" + tail.decode(errors="ignore")
    )
