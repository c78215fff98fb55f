"""The HTTP side of the embedded server: routes, request parsing and the security checks.

Every answer follows the contract (``shared/reference/sandbox-protocol.md``): paths end with a
slash, errors are plain text, 503 carries the public server's exact sentence, HEAD answers have
the headers and no body. On top of it: a bearer token, an ``Origin`` check and a ``Host`` check
(DNS rebinding), since the public server leaves that to a reverse proxy; and the WebSocket
``execute/stream/`` (:mod:`.streaming`), which goes through the same checks, config validation,
staging and executor as ``execute/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .. import protocol
from .executor import RUN_REFUSALS, Executor, Runs, refusal_answer
from .hub import Caller, HubGuard, RunLog, UserShares
from .libraries import LibraryCache
from .live import RunHooks
from .runners import Isolation
from .settings import ServerSettings, format_size
from .storage import NotConfined, Storage, open_beneath
from .streaming import StreamSession
from .sysinfo import UsageSampler, specifications
from .uploads import StagingPlaces, Upload

log = logging.getLogger(__name__)

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "localhost.localdomain"})
#: Bytes per second a request body must keep up, on average, once its grace has passed.
_MIN_BODY_RATE = 16 * 1024
_CHUNK = 1 << 18
_MAX_JSON_DEPTH = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Read = TypeVar("_Read")


def user_of(request: web.Request) -> str | None:
    """The JupyterHub user of a request (with --hub-auth), else None: every holder of the
    server's token is one and the same user."""
    caller = request.get("caller")
    return caller.name if isinstance(caller, Caller) else None


def text(status: int, message: str) -> web.Response:
    """A plain-text error answer (the public server's error bodies are plain text too)."""
    return web.Response(status=status, text=message, content_type="text/plain")


class ProtocolApp:
    """The protocol's HTTP side, whatever runs the requests: the guard (Host, Origin, token),
    ``execute/`` and ``execute/stream/`` with their caps and admission of configs and
    archives. The GET endpoints are a subclass's: :class:`SandboxApp` answers them from this
    machine, a cluster front from the cluster (:mod:`.cluster.front`)."""

    def __init__(self, settings: ServerSettings, executor: Runs, staging: Path) -> None:
        self.settings = settings
        self.executor = executor
        self.staging = staging
        self.allowed_hosts = _LOCAL_HOSTS | {h.lower() for h in settings.allowed_hosts}
        if settings.host not in ("0.0.0.0", "::", ""):
            self.allowed_hosts |= {settings.host.lower()}
        #: Uploads staged on disk while they wait for a slot: at most two per slot.
        self.staging_places = StagingPlaces(2 * settings.workers)
        #: With --hub-auth: who asks (the Hub says), and each user's share of the runs.
        self.hub: HubGuard | None = None
        if settings.hub_auth:
            self.hub = HubGuard(settings)
        self.shares = UserShares(settings.per_user_runs)
        self.run_log = RunLog(settings.run_log) if settings.run_log else None

    def build(self) -> web.Application:
        # The multipart reader enforces its own caps; this one bounds url-encoded bodies.
        app = web.Application(
            middlewares=[self.guard], client_max_size=self.settings.max_config_bytes + 4096
        )
        base = self.settings.base_path or "/"  # --base-path: under a JupyterHub's proxy
        app.router.add_post(base + "execute/", self.execute)
        app.router.add_get(base + protocol.EXECUTE_STREAM, self.execute_stream)
        app.router.add_get(base + "specifications/", self.get_specifications)
        app.router.add_get(base + "usages/", self.get_usages)
        app.router.add_get(base + "libraries/", self.get_libraries)
        app.router.add_get(base + "environments/{uuid}/", self.get_environment)
        app.router.add_get(base + "files/{uuid}/{path:.+}/", self.get_file)
        return app

    # -- security -----------------------------------------------------------------------------

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        host = _hostname(request.headers.get("Host", ""))
        if host not in self.allowed_hosts:
            return text(
                403,
                f"Host '{host}' is not allowed (DNS rebinding protection). Use a loopback "
                "address, or start the server with --allowed-host NAME.",
            )
        origin = request.headers.get("Origin")
        if origin and _hostname(urlsplit(origin).netloc) not in self.allowed_hosts:
            return text(
                403,
                f"Origin '{origin}' is not allowed: only pages served from this machine may call "
                "the sandbox. Add the host with --allowed-host NAME if you trust it.",
            )
        if self.hub is not None:
            caller = await self.hub.identify(request)
            if isinstance(caller, web.Response):
                return caller
            request["caller"] = caller
            return await handler(request)
        token = self.settings.token
        if token:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # Bytes: compare_digest refuses str with non-ASCII characters (a 500 otherwise).
            offered = given.strip(" \t").encode("utf-8", "surrogateescape")  # HTTP's OWS only
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered, token.encode()):
                return web.Response(
                    status=401,
                    text="Missing or wrong token: send 'Authorization: Bearer <token>'. The token "
                    "is in the server's token file: the file it advertises in the Jupyter "
                    "runtime directory, or its --token-file (the path is printed when it "
                    "starts).",
                    content_type="text/plain",
                    headers={"WWW-Authenticate": 'Bearer realm="sandbox"'},
                )
        return await handler(request)

    # -- execute/ -------------------------------------------------------------------------------

    def _body_limit(self) -> int:
        return self.settings.max_upload + self.settings.max_config_bytes + 64 * 1024

    async def execute(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self._body_limit():
            return self.too_large()
        upload = self.new_upload()
        try:
            parsed = await self._paced(request, self._read_form(request, upload))
            if isinstance(parsed, web.Response):
                return parsed
            config = parsed
            return web.json_response(await self.run(request, config, upload.archive))
        except RUN_REFUSALS as refused:
            return text(*refusal_answer(refused))
        finally:
            await upload.discard()

    async def run(
        self,
        request: web.Request,
        config: dict[str, Any],
        archive: Path | None,
        hooks: RunHooks | None = None,
    ) -> dict[str, Any]:
        """One run for ``execute/`` and ``execute/stream/``: in the caller's share of the
        runs (``--per-user-runs``, with --hub-auth), then written to ``--run-log``."""
        user = user_of(request)
        started = time.monotonic()
        answer: dict[str, Any] | None = None
        status = 500
        try:
            async with self.shares.admitted(user) if user else contextlib.nullcontext():
                answer = await self.executor.execute(config, archive, hooks, user=user)
            status = int(answer.get("status", 0))
            return answer
        except RUN_REFUSALS as refused:
            status = refusal_answer(refused)[0]
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away: the run was killed
            raise
        finally:
            if self.run_log is not None:
                seconds = time.monotonic() - started
                try:
                    self.run_log.write(user, config, answer, status, seconds)
                except OSError as error:  # the answer still goes out; the log says why not
                    log.error("could not write to the run log %s: %s", self.run_log.path, error)

    async def execute_stream(self, request: web.Request) -> web.StreamResponse:
        """``execute/stream/``: the same run over a WebSocket (docs/protocol-extensions.md)."""
        return await StreamSession(self, request).serve()

    def new_upload(self) -> Upload:
        """The staging place of one request's archive (made only if there is one)."""
        return Upload(self.staging_places, self.staging / os.urandom(8).hex())

    def admit_config(self, raw_config: str) -> dict[str, Any] | web.Response:
        """The config of a request, decoded and validated, or the 400 answer."""
        config = _parse_config(raw_config)
        if isinstance(config, _Invalid):
            return text(400, str(config))
        ok, reason = protocol.validate_config(config)
        if not ok:
            return text(400, reason)
        checked: dict[str, Any] = config
        return checked

    async def _paced(
        self, request: web.Request, reading: Coroutine[Any, Any, _Read]
    ) -> _Read | web.Response:
        """``reading`` (of the request's body), given up with 408 when the body comes slower
        than :data:`_MIN_BODY_RATE` past the grace of ``--header-timeout``: a client that
        trickles its upload cannot hold a connection and a staging place for ever."""
        task = asyncio.ensure_future(reading)
        started = time.monotonic()
        grace = self.settings.header_timeout
        try:
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                elapsed = time.monotonic() - started
                if elapsed > grace and request.content.total_bytes < _MIN_BODY_RATE * elapsed:
                    return text(
                        408,
                        f"The request body came too slowly (less than {_MIN_BODY_RATE // 1024} "
                        f"KiB/s after {grace:g} s): nothing was run. Send it again from a "
                        "faster connection.",
                    )
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def too_large(self) -> web.Response:
        return text(
            413,
            f"Request too large: uploads are limited to {format_size(self.settings.max_upload)} "
            f"(--max-upload) and config to {format_size(self.settings.max_config_bytes)}.",
        )

    async def _read_form(
        self, request: web.Request, upload: Upload
    ) -> dict[str, Any] | web.Response:
        """The config from a multipart or url-encoded body (the archive, if any, saved by
        ``upload``), or an error answer."""
        raw_config: str | None = None
        if request.content_type == "multipart/form-data":
            # The whole body is bounded too, not only the parts we keep: a chunked body has no
            # Content-Length to check up front, and unknown parts are read to be skipped.
            body = _Budget(request, self._body_limit())
            try:
                reader = await request.multipart()
                parts = 0
                while (part := await reader.next()) is not None:
                    parts += 1
                    if parts > self.settings.max_parts:
                        return text(400, f"Too many parts (at most {self.settings.max_parts}).")
                    if not isinstance(part, BodyPartReader):
                        return text(400, "Nested multipart bodies are not accepted.")
                    if part.name == "config":
                        data = await _read_capped(part, self.settings.max_config_bytes, body)
                        if data is None:
                            return self.too_large()
                        raw_config = data.decode("utf-8", errors="replace")
                    elif part.name == "environment":
                        archive = upload.stage()
                        if archive is None:  # uploads beyond the slots wait for none
                            return text(503, protocol.OVERLOADED_TEXT)
                        if not await _save_capped(part, archive, self.settings.max_upload, body):
                            return self.too_large()
                    elif await _read_capped(part, 0, body, drain=True) is None:
                        return self.too_large()
            except (ValueError, AssertionError, HttpProcessingError) as error:
                return text(400, f"Malformed multipart body: {error}")
        elif request.content_type == "application/x-www-form-urlencoded":
            try:
                form = await request.post()
            except web.HTTPRequestEntityTooLarge:
                return self.too_large()
            value = form.get("config")
            raw_config = value if isinstance(value, str) else None
        if raw_config is None:
            return text(400, "Missing argument 'config'")
        return self.admit_config(raw_config)

    # -- the GET endpoints: a subclass's ----------------------------------------------------------

    async def get_specifications(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def get_usages(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def get_libraries(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def get_environment(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


class SandboxApp(ProtocolApp):
    """The single server: its runs, environments and files are on this machine."""

    def __init__(
        self,
        settings: ServerSettings,
        storage: Storage,
        isolation: Isolation,
        executor: Executor,
        libraries: LibraryCache,
        sampler: UsageSampler,
    ) -> None:
        super().__init__(settings, executor, storage.staging)
        self.storage = storage
        self.isolation = isolation
        self.libraries = libraries
        self.sampler = sampler
        self.specifications = specifications(settings, isolation, storage.root, storage.server_id)

    async def get_specifications(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.specifications)

    async def get_usages(self, request: web.Request) -> web.StreamResponse:
        usage = self.sampler.current(self.executor.busy)
        caller = request.get("caller")
        if isinstance(caller, Caller):  # --hub-auth: the caller's share, a teacher's class
            usage[protocol.USER_FIELD] = self.user_usage(caller.name)
            if caller.teacher:
                usage[protocol.USERS_FIELD] = [self.user_usage(n) for n in self.known_users()]
        return web.json_response(usage)

    def user_usage(self, name: str) -> dict[str, Any]:
        return {"name": name, **self.shares.of(name), "stored_bytes": self.storage.stored_by(name)}

    def known_users(self) -> list[str]:
        """Users who ran something since the server started, or keep environments."""
        return sorted(set(self.shares.users()) | set(self.storage.used_by))

    async def get_libraries(self, request: web.Request) -> web.StreamResponse:
        try:
            return web.json_response(await self.libraries.get())
        except (RuntimeError, OSError) as error:
            return text(500, f"Could not list the sandbox's libraries: {error}. See the log.")

    async def get_environment(self, request: web.Request) -> web.StreamResponse:
        uuid = request.match_info["uuid"]
        for _attempt in range(3):
            archive = await asyncio.to_thread(self.storage.archive, uuid, user_of(request))
            if archive is None:
                break
            try:
                fd = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # expired, or trimmed from the cache by another download
                continue
            return await send_file(request, fd, "application/gzip", f"{uuid}.tgz")
        return text(404, f"No environment with UUID '{uuid}' found")

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        uuid, path = request.match_info["uuid"], request.match_info["path"]
        directory = self.storage.directory(uuid, user_of(request))
        if directory is None:
            return text(404, f"No environment with UUID '{uuid}' found")
        try:
            fd = await asyncio.to_thread(open_beneath, directory, path)
        except NotConfined:
            return text(404, f"The file '{path}' could not be found in environment '{uuid}'")
        return await send_file(request, fd, "application/octet-stream", os.path.basename(path))


async def send_file(
    request: web.Request, fd: int, content_type: str, filename: str
) -> web.StreamResponse:
    """Stream an open file (closed here); HEAD gets the same headers and no body."""
    try:
        size = os.fstat(fd).st_size
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type,
                "Content-Disposition": f"attachment; filename={filename}",
            }
        )
        response.content_length = size
        await response.prepare(request)
        if request.method != "HEAD":
            while chunk := await asyncio.to_thread(os.read, fd, _CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        os.close(fd)


class _Budget:
    """How much of a request body may still be read."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self.request, self.limit = request, limit

    def exceeded(self) -> bool:
        return self.request.content.total_bytes > self.limit


async def _read_capped(
    part: BodyPartReader, cap: int, body: _Budget, drain: bool = False
) -> bytes | None:
    """A part's bytes, or None past ``cap`` or the body's budget (``drain`` drops them)."""
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        if body.exceeded():
            return None
        if drain:
            continue
        data += chunk
        if len(data) > cap:
            return None
    return bytes(data)


async def _save_capped(part: BodyPartReader, target: Path, cap: int, body: _Budget) -> bool:
    size = 0
    with open(target, "wb") as file:
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > cap or body.exceeded():
                return False
            file.write(chunk)
    return True


class _Invalid(str):
    """The 400 text of a config that is not valid JSON (a config may itself be a string)."""


def _parse_config(raw: str) -> Any:
    """The decoded config, or the 400 text. NaN/Infinity and absurd nesting are refused."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    if raw.count("[") + raw.count("{") > _MAX_JSON_DEPTH and _depth(raw) > _MAX_JSON_DEPTH:
        return _Invalid(f"'config' json is invalid - nested deeper than {_MAX_JSON_DEPTH} levels")
    try:
        config = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as error:
        return _Invalid(f"'config' json is invalid - {error}")
    return config


def _depth(raw: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for char in raw:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _hostname(netloc: str) -> str:
    """``host`` of ``host:port`` (IPv6 brackets kept), lowercased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[: netloc.find("]") + 1] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
