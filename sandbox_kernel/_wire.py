"""The sandbox protocol on the client's side, without I/O: building requests, reading answers.

Every transport (the synchronous :class:`~sandbox_kernel.client.Sandbox`, the asyncio one of
live cells) sends what this module builds and gives what it receives back to it, so the wire
format, its checks, its defaults and caps, the frames of ``execute/stream/`` and the words of
the errors it raises are written once; a transport only moves bytes and says which of its
failures is which. An answer is anything with the attributes of
:class:`~sandbox_kernel._errors.Answer` (a ``requests.Response`` has them).

The contract is ``shared/reference/sandbox-protocol.md``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import quote, urlsplit

from ._errors import (
    Answer,
    SandboxAnswerTooLarge,
    SandboxConfigError,
    SandboxHTTPError,
    SandboxProtocolError,
    body_snippet,
    error_for_status,
)
from ._generations import Load, checked
from ._generations._schema import malformed
from .protocol import (
    CLUSTER_LOST_STATUS,
    DEFAULT_QUEUE_WAIT,
    EXECUTE,
    EXECUTE_STREAM,
    OVERLOADED_TEXT,
    QUEUE_EVENTS_QUERY,
    QUEUE_FIELD,
    USAGES,
    environment_path,
    file_path,
    validate_config,
)

# --- Defaults every transport shares ------------------------------------------------------------

#: Seconds to wait for any answer, unless an ``execute/`` needs longer (see ``Sandbox.execute``).
DEFAULT_TIMEOUT: Final = 60.0
#: Seconds ``execute`` keeps retrying an ``execute/`` answered 503 (no free container).
DEFAULT_BUSY_BUDGET: Final = 30.0
#: Largest JSON answer read (``execute/``, ``specifications/``...): ``libraries/`` is ~21 KB,
#: an ``execute/`` at most the server's output cap (a few MiB); far more is not a sandbox.
DEFAULT_MAX_JSON: Final = 64 * 1024**2
#: Largest ``download`` when the caller gives no ``max_bytes`` (front-ends pass the size that
#: ``check()`` announced): twice the embedded server's default working-directory quota.
DEFAULT_MAX_DOWNLOAD: Final = 2 * 1024**3
#: How much of an error answer's body is read (for its message); the rest is dropped.
ERROR_BODY_CAP: Final = 64 * 1024
#: Attempts to open a connection for a GET or HEAD; backoff 0, 0.1, 0.2 s (urllib3's formula).
CONNECT_RETRIES: Final = 3
CONNECT_BACKOFF: Final = 0.05

#: ``on_busy(attempt, wait, elapsed)``: the ``attempt``-th ``execute/`` was answered 503, the
#: client now sleeps ``wait`` seconds; ``elapsed`` seconds have passed since the first attempt.
#: Raising from it (``KeyboardInterrupt``, say) abandons the execution: nothing ran yet.
OnBusy = Callable[[int, float, float], object]

#: Added to the server's ``execute_timeout`` for the deadline of ``execute/``: the server
#: answers after the commands' budget, plus the time to prepare and save the environment.
EXECUTE_MARGIN: Final = 10.0
#: Seconds a cluster front (a server whose specifications name the ``queue`` extension) may
#: hold a run in its queue before it starts: its default ``--queue-wait``. Added to the
#: deadline of ``execute/`` and of a streamed run there, so that a run that waited in the
#: queue still gets its whole time budget (docs/protocol-extensions.md, "Queue events").
QUEUE_ALLOWANCE: Final = DEFAULT_QUEUE_WAIT
#: The longest host name DNS allows (RFC 1035).
_LONGEST_HOST_NAME: Final = 253
_BUSY_FIRST_WAIT: Final = 0.25
_BUSY_MAX_WAIT: Final = 3.0


@dataclasses.dataclass(frozen=True)
class Part:
    """One field of a multipart form: ``filename`` None for a plain field."""

    name: str
    value: str | bytes
    filename: str | None = None
    content_type: str | None = None


# --- Checks of a client's arguments ------------------------------------------------------------


def check_options(timeout: float, token: str | None, max_json: int, max_download: int) -> None:
    """What both clients check of their options before any request (SandboxConfigError)."""
    if not timeout > 0:
        raise SandboxConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
    check_size("max_json", max_json)
    check_size("max_download", max_download)
    check_token(token)


def check_token(token: str | None) -> None:
    """A token that cannot travel in a header is refused before anything is sent (an HTTP
    library's own error would show the token in its text)."""
    if token is not None and (
        not token or token.strip() != token or any(c in token for c in "\r\n")
    ):
        raise SandboxConfigError(
            "The token cannot travel in an HTTP header (it is empty, has surrounding "
            "spaces or line breaks). Give the token exactly as the server expects it."
        )


def check_size(name: str, value: object) -> None:
    """A cap (``max_json``, ``max_bytes``...) is a whole number of bytes: anything else is
    refused when given, not when the first answer is read against it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SandboxConfigError(
            f"{name} must be a whole number of bytes (0 or more), not {value!r}."
        )


# --- Where requests go ------------------------------------------------------------------------


def normalise_url(url: object, setting: str = "SANDBOX_URL") -> str:
    """``url`` with a trailing slash (the contract's endpoint paths are appended to it).

    ``setting`` names where the URL came from, for the error: a URL without a scheme
    (``localhost:7000``) or with a query is refused before anything is sent.
    """
    text = url.strip() if isinstance(url, str) else ""
    try:
        parts = urlsplit(text) if text else None
    except ValueError:  # "http://[::1/": an unclosed IPv6 address
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.query
        or parts.fragment
        or any(char.isspace() for char in text)
    ):
        raise SandboxConfigError(
            f"{_quoted(url)} is not a sandbox URL. Give its base address with the scheme, such as "
            f"'http://127.0.0.1:8000/' (check {setting})."
        )
    try:
        parts.port  # noqa: B018  (a port that is not a number raises here)
    except ValueError:
        raise SandboxConfigError(
            f"{_quoted(url)} is not a sandbox URL: its port is not a number (check {setting})."
        ) from None
    if len(parts.hostname or "") > _LONGEST_HOST_NAME:
        raise SandboxConfigError(
            f"{_quoted(url)} is not a sandbox URL: its host name is longer than DNS allows "
            f"({_LONGEST_HOST_NAME} characters; check {setting})."
        )
    return text.rstrip("/") + "/"


def _quoted(value: object) -> str:
    """A setting's value as an error quotes it: its first 80 characters."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def resource(uuid: str, path: str | None) -> str:
    """Path of an environment or of one of its files, quoted so that any name travels."""
    uuid = quote(uuid, safe="")
    return environment_path(uuid) if path is None else file_path(uuid, quote(path, safe="/"))


def execute_form(config: Mapping[str, Any], archive: bytes | None) -> list[Part]:
    """The multipart form of ``execute/``: ``config`` as a plain JSON field, the upload as a
    file. An invalid config raises :class:`SandboxConfigError`: nothing is sent."""
    ok, reason = validate_config(config)
    if not ok:
        raise SandboxConfigError(
            f"Invalid execute config: {reason}. Nothing was sent; fix the config "
            "(Sandbox.validate(config) checks it)."
        )
    try:
        text = json.dumps(dict(config), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SandboxConfigError(
            f"The config cannot be sent as JSON ({exc}). Nothing was sent; use only strings, "
            "numbers, booleans, lists and dicts in it."
        ) from exc
    form = [Part("config", text)]
    if archive is not None:
        form.append(Part("environment", archive, "environment.tgz", "application/gzip"))
    return form


def execute_deadline(
    timeout: float, execute_timeout: float | None, *, queued: bool = False
) -> float:
    """Seconds an ``execute/`` may take: the client's timeout, or the server's budget plus a
    margin when that is longer; ``queued``: the server is a cluster front, whose queue may
    hold the run up to :data:`QUEUE_ALLOWANCE` seconds before it starts."""
    allowance = QUEUE_ALLOWANCE if queued else 0.0
    if execute_timeout is None:
        return timeout + allowance
    return max(timeout, execute_timeout + EXECUTE_MARGIN) + allowance


def stream_url(base: str, *, queue_events: bool = False) -> str:
    """The WebSocket address of ``execute/stream/`` on the (normalised) ``base``:
    ``ws://`` for ``http://``, ``wss://`` for ``https://``. ``queue_events``: ask for the
    ``{"queue": N}`` frames (``?events=queue``), only of a server naming the ``queue``
    extension: a server without it may refuse a query it does not know."""
    scheme, rest = base.split("://", 1)
    query = "?" + QUEUE_EVENTS_QUERY if queue_events else ""
    return ("wss" if scheme == "https" else "ws") + "://" + rest + EXECUTE_STREAM + query


# --- Reading answers --------------------------------------------------------------------------


#: What a body that does not parse reads as (``None`` is the JSON ``null``).
_NOT_JSON: Final = object()


#: What to do after a cluster lost a run (502 with :data:`protocol.CLUSTER_LOST_TEXT`).
CLUSTER_LOST_ADVICE: Final = (
    "the sandbox cluster lost this run after it may have started (a worker or Redis went "
    "down), so the client did not send it again: check what its commands did (their files, "
    "anything they changed elsewhere) before running them again. The last saved environment "
    "is intact: the next run starts from it, on another worker"
)


def is_cluster_lost(status: int, text: str) -> bool:
    """Whether an answer is a cluster front's "lost this request; it may have run" (never
    retried: unlike a 503, something may have run)."""
    return status == CLUSTER_LOST_STATUS and "the cluster lost this request" in text.lower()


def http_error(answer: Answer) -> SandboxHTTPError:
    """``Sandbox<STATUS>`` for an answer of 300 or more, with the advice of a cluster's 502."""
    advice = CLUSTER_LOST_ADVICE if is_cluster_lost(answer.status_code, answer.text) else None
    return error_for_status(answer.status_code)(answer, advice)


def raise_for_status(answer: Answer) -> None:
    """``Sandbox<STATUS>`` for an answer of 300 or more."""
    if answer.status_code >= 300:
        raise http_error(answer)


def json_object(answer: Answer, base: str) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else breaks the protocol."""
    try:
        data = json.loads(answer.content)
    except ValueError:  # not JSON, or not UTF-8
        data = _NOT_JSON
    if isinstance(data, dict):
        return data
    method = getattr(answer.request, "method", None) or "request"
    what = "not JSON" if data is _NOT_JSON else "JSON but not an object"
    raise SandboxProtocolError(
        f"{method} {answer.url} answered {answer.status_code} with a body that is {what}: "
        f"{body_snippet(answer)!r}. Check that {base} is a sandbox server and that no proxy "
        "in between rewrites its answers."
    )


def facts_answer(endpoint: str, answer: Answer, base: str) -> dict[str, Any]:
    """The checked JSON of ``specifications/``, ``usages/`` or ``libraries/``: a field of the
    wrong type raises :class:`SandboxProtocolError` naming it."""
    raise_for_status(answer)
    return checked(endpoint, json_object(answer, base), base)


def execute_answer(answer: Answer, base: str) -> dict[str, Any]:
    """The checked JSON of an ``execute/`` answer (a 503 is the caller's to retry first): a
    field of the wrong type (``"exit_code": "x"``) raises :class:`SandboxProtocolError`
    naming it, so that what reads the answer can trust its types."""
    raise_for_status(answer)
    return checked(EXECUTE, json_object(answer, base), base)


@dataclasses.dataclass(frozen=True)
class WorkerLoad:
    """One worker of a sandbox cluster, as its front's ``usages/`` tells it (``workers``)."""

    name: str
    slots: int
    busy: int
    #: Saved environments the worker keeps on its disk (a session's next cell there costs no
    #: download).
    cached_environments: int


@dataclasses.dataclass(frozen=True)
class LoadSample:
    """The load at one moment and, from a cluster front, the load of each of its workers
    (None from a single server or a PremierLangage one, which do not tell it)."""

    load: Load
    workers: tuple[WorkerLoad, ...] | None = None


#: The fields of one entry of ``usages/``' ``workers``, each a whole number 0 or more but
#: the name.
_WORKER_COUNTS: Final = ("slots", "busy", "cached_environments")


def read_workers(usages: Mapping[str, Any] | None, base: str) -> tuple[WorkerLoad, ...] | None:
    """The ``workers`` of a cluster front's ``usages/`` (docs/protocol-extensions.md); None
    when the answer has none. A malformed entry raises :class:`SandboxProtocolError` naming
    it, as any field of the wrong type does."""
    told = None if usages is None else usages.get("workers")
    if told is None:
        return None
    if not isinstance(told, list):
        raise malformed(USAGES, "workers", told, "a list of workers", base)
    return tuple(_worker(entry, f"workers[{index}]", base) for index, entry in enumerate(told))


def _worker(entry: object, where: str, base: str) -> WorkerLoad:
    if not isinstance(entry, Mapping):
        raise malformed(USAGES, where, entry, "an object", base)
    name = entry.get("name")
    if not isinstance(name, str):
        raise malformed(USAGES, f"{where}.name", name, "a string", base)
    counts = []
    for field in _WORKER_COUNTS:
        value = entry.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise malformed(USAGES, f"{where}.{field}", value, "a whole number, 0 or more", base)
        counts.append(value)
    return WorkerLoad(name, *counts)


def announced_size(answer: Answer, base: str) -> int:
    """The size a HEAD answer announces: 0 for 404, else its ``Content-Length``, which the
    protocol requires."""
    if answer.status_code == 404:
        return 0
    raise_for_status(answer)
    length = answer.headers.get("Content-Length", "")
    if not re.fullmatch(r"[0-9]{1,30}", length):  # str.isdigit() takes '²', int() not
        raise SandboxProtocolError(
            f"HEAD {answer.url} answered {answer.status_code} without a valid "
            f"Content-Length ({length!r}), which the protocol requires. Check that "
            f"{base} is a sandbox server and that no proxy strips the header."
        )
    return int(length)


# --- Reading answers within caps ---------------------------------------------------------------

JSON_CAP_ADVICE: Final = (
    "A sandbox's JSON answers are far smaller: check that {base} is a sandbox server and that "
    "no proxy in between rewrites its answers. If such an answer is expected, allow more with "
    "Sandbox(url, max_json=...)."
)
DOWNLOAD_CAP_ADVICE: Final = (
    "That is the size the caller expected (max_bytes, normally what HEAD announced): if the "
    "file changed meanwhile, download it again; otherwise check that {base} is a sandbox "
    "server and that no proxy in between rewrites its answers."
)
DEFAULT_DOWNLOAD_CAP_ADVICE: Final = (
    "Pass the size you expect, download(..., max_bytes=sandbox.check(...)), or allow more with "
    "Sandbox(url, max_download=...); and check that {base} is a sandbox server."
)


@dataclasses.dataclass(frozen=True)
class Cap:
    """The most bytes a 2xx answer may have, and what to advise (``{base}``: the server's URL)
    when it has more."""

    limit: int
    advice: str


def json_cap(max_json: int) -> Cap:
    """The cap of a JSON answer (``execute/``, ``specifications/``...)."""
    return Cap(max_json, JSON_CAP_ADVICE)


def download_cap(max_download: int, max_bytes: int | None) -> Cap:
    """The cap of a ``download``: the size the caller expects, else the client's
    ``max_download`` (each with its advice)."""
    if max_bytes is None:
        return Cap(max_download, DEFAULT_DOWNLOAD_CAP_ADVICE)
    return Cap(max_bytes, DOWNLOAD_CAP_ADVICE)


def check_identity(encoding: str, where: str, base: str) -> None:
    """A 2xx answer's ``Content-Encoding`` (stripped, lower case) must be identity: a
    compressed body could expand past any cap. ``where``: ``"METHOD url"``."""
    if encoding not in ("", "identity"):
        raise SandboxProtocolError(
            f"{where} answered with Content-Encoding {encoding!r}, which the client does not "
            f"accept (it asks for identity, so that it can bound what it reads). Check that "
            f"{base} is a sandbox server and that no proxy in between compresses its answers."
        )


def announced_too_large(where: str, announced: int, cap: Cap, base: str) -> SandboxAnswerTooLarge:
    """The error of an answer whose ``Content-Length`` is past ``cap`` (nothing was read)."""
    return SandboxAnswerTooLarge(
        f"{where} announced {announced} bytes (Content-Length), more than the {cap.limit} "
        f"the client accepts for this answer; nothing of it was read. "
        f"{cap.advice.format(base=base)}"
    )


def sent_too_much(where: str, cap: Cap, base: str) -> SandboxAnswerTooLarge:
    """The error of an answer that sent more than ``cap`` (cut there, nothing kept)."""
    return SandboxAnswerTooLarge(
        f"{where} sent more than the {cap.limit} bytes the client accepts for this answer; "
        f"it was cut there and nothing of it was kept. {cap.advice.format(base=base)}"
    )


def sent_past_length(where: str, announced: int, base: str) -> SandboxAnswerTooLarge:
    """The error of an answer that sent more than its own ``Content-Length``."""
    return SandboxAnswerTooLarge(
        f"{where} sent more bytes than its own Content-Length ({announced}); the answer "
        "was cut there and nothing of it was kept. A server that miscounts its answers "
        f"cannot be trusted with this one: check that {base} is a sandbox server and that "
        "no proxy in between rewrites its answers."
    )


# --- Frames of execute/stream/ -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Output:
    """A chunk of the running command's output, as read (not stripped)."""

    stream: str
    text: str


@dataclasses.dataclass(frozen=True)
class StdinWanted:
    """The run waits for stdin; ``prompt`` is what it printed after its last newline (it was
    streamed already: shown again only as the input box's label)."""

    prompt: str


#: What a streamed run yields.
Event = Output | StdinWanted


@dataclasses.dataclass(frozen=True)
class Queued:
    """``{"queue": N}`` (a cluster front, to a client that asked for queue events): the run
    waits in the cluster's queue with ``ahead`` runs before it; it has not started."""

    ahead: int


@dataclasses.dataclass(frozen=True)
class ErrorFrame:
    """``{"error": STATUS, "text": ...}``: the run was refused as ``execute/`` would have."""

    status: int
    text: str


_FRAME_FIELDS: Final[dict[str, frozenset[str]]] = {
    "stream": frozenset({"stream", "text"}),
    "stdin": frozenset({"stdin", "prompt"}),
    "error": frozenset({"error", "text"}),
    QUEUE_FIELD: frozenset({QUEUE_FIELD}),
}


def read_frame(
    data: str, where: str, base: str, *, queue_events: bool = False
) -> Event | Queued | ErrorFrame | dict[str, Any]:
    """One text frame of ``execute/stream/``, checked: an event, an error, or the final
    object (checked as ``execute/``'s answer). Anything else raises
    :class:`SandboxProtocolError` naming what is wrong, so that nothing hostile reaches
    whatever shows the output. ``queue_events``: the client asked for ``{"queue": N}``
    frames (:class:`Queued`); unasked, they are refused as any unknown frame."""
    try:
        frame = json.loads(data)
    except ValueError:
        frame = _NOT_JSON
    if not isinstance(frame, dict):
        what = "not JSON" if frame is _NOT_JSON else "JSON but not an object"
        raise frame_error(where, base, f"a frame that is {what}: {_snippet(data)!r}")
    kind = next((key for key in _FRAME_FIELDS if key in frame), None)
    if kind is None:
        if "status" not in frame:
            raise frame_error(where, base, f"an object that is no frame: {_snippet(data)!r}")
        return checked(EXECUTE, frame, base)
    unknown = sorted(set(frame) - _FRAME_FIELDS[kind])
    if unknown:
        raise frame_error(where, base, f"a {kind!r} frame with an unknown field {unknown[0]!r}")
    missing = sorted(_FRAME_FIELDS[kind] - set(frame))
    if missing:
        raise frame_error(where, base, f"a {kind!r} frame without its field {missing[0]!r}")
    if kind == "stream":
        _expect(frame, "stream", ("stdout", "stderr"), where, base)
        return Output(frame["stream"], _string(frame, "text", where, base))
    if kind == "stdin":
        _expect(frame, "stdin", ("wanted",), where, base)
        return StdinWanted(_string(frame, "prompt", where, base))
    if kind == QUEUE_FIELD:
        return _queued(frame[QUEUE_FIELD], queue_events, where, base)
    status = frame["error"]
    if isinstance(status, bool) or not isinstance(status, int) or not 300 <= status <= 599:
        raise frame_error(where, base, f"an 'error' frame whose status is {status!r}")
    return ErrorFrame(status, _string(frame, "text", where, base))


def _queued(ahead: object, asked: bool, where: str, base: str) -> Queued:
    if not asked:
        raise frame_error(
            where, base, "a 'queue' frame, which the client did not ask for (?events=queue)"
        )
    if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0:
        raise frame_error(
            where,
            base,
            f"a 'queue' frame whose count is {_snippet(ahead)!r}, not a whole number 0 or more",
        )
    return Queued(ahead)


def _expect(
    frame: dict[str, Any], key: str, allowed: tuple[str, ...], where: str, base: str
) -> None:
    if frame[key] not in allowed:
        raise frame_error(
            where, base, f"a frame whose {key!r} is {_snippet(frame[key])!r}, not one of {allowed}"
        )


def _string(frame: dict[str, Any], key: str, where: str, base: str) -> str:
    value = frame[key]
    if not isinstance(value, str):
        raise frame_error(
            where, base, f"a {key!r} field that is {type(value).__name__}, not a string"
        )
    return value


def _snippet(value: object) -> str:
    """A frame or a field as an error quotes it: its first 60 characters."""
    shown = value if isinstance(value, str) else repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def frame_error(where: str, base: str, what: str) -> SandboxProtocolError:
    """The error of a frame the stream extension does not allow (``what``: what was sent)."""
    return SandboxProtocolError(
        f"The stream of {where} sent {what}, which the protocol's stream extension does not "
        f"allow; the run was stopped. Check that {base} is a sandbox server of a version this "
        "client knows and that no proxy in between rewrites its frames."
    )


def frame_too_large(where: str, limit: int, base: str) -> SandboxAnswerTooLarge:
    """The error of a frame past ``max_json`` (the run was stopped)."""
    return SandboxAnswerTooLarge(
        f"The stream of {where} sent a frame larger than the {limit} bytes the client "
        "accepts; the run was stopped. " + JSON_CAP_ADVICE.format(base=base)
    )


# --- Waiting for a free container ---------------------------------------------------------------


def busy_wait(attempt: int) -> float:
    """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s... up to 3 s, each one 50-100 %."""
    ceiling = min(_BUSY_MAX_WAIT, _BUSY_FIRST_WAIT * 2.0 ** min(attempt - 1, 16))
    return ceiling * random.uniform(0.5, 1.0)


def busy_advice(answer: Answer, elapsed: float, attempts: int) -> str:
    """What to tell after ``execute/`` stayed 503 (contract: the overloaded text)."""
    busy = answer.text.strip() == OVERLOADED_TEXT
    why = "no container became free" if busy else "the server stayed unavailable"
    return (
        f"the sandbox stayed busy for {elapsed:.1f} s ({attempts} attempts; {why}). Try again "
        "later, allow a longer wait (busy_budget=... on Sandbox or execute), or use a sandbox "
        "with more containers"
    )


# --- Words of errors that every transport raises ------------------------------------------------

#: How a user changes the client's timeout, when the caller does not say.
DEFAULT_TIMEOUT_SETTING: Final = (
    "Sandbox(url, timeout=...), or SANDBOX_TIMEOUT / c.SandboxKernel.timeout for the kernel"
)
#: What a streamed run (``execute/stream/``) is called where an HTTP method would be: its
#: upgrade is a GET, but what fails is no plain GET.
STREAM_METHOD: Final = "WebSocket"
#: The advice of an error that may come from a server not running or a wrong URL.
CHECK_SERVER: Final = (
    "Check that the sandbox server is running (start one with `sandbox-kernel serve`) and that "
    "the URL given (or SANDBOX_URL) points to it."
)


def timeout_message(method: str, url: str, timeout: float, setting: str) -> str:
    """The text of a request that missed its deadline; ``setting`` names the one that applies.
    A streamed run (``method`` :data:`STREAM_METHOD`) is stopped by the client at its deadline."""
    if method == STREAM_METHOD:
        return (
            f"The streamed run at {url} did not answer within {timeout:g} s (a deadline for the "
            "whole run up to its final answer, not counting the time it waited for stdin); it "
            "was stopped (its socket closed). If the server is only slow, allow more time: "
            f"{setting} (a run also gets the server's execute_timeout + 10 s once the "
            "specifications are known)."
        )
    text = (
        f"The sandbox at {url} did not answer {method} within {timeout:g} s (a deadline for "
        "the whole answer, headers and body, however slowly it arrives)."
    )
    if method == "POST":
        text += " The commands may still be running on the server, which cannot cancel them."
        return (
            text + f" If the server is only slow, allow more time: {setting} (execute/ also "
            "gets the server's execute_timeout + 10 s once the specifications are known)."
        )
    return text + f" If the server is only slow, allow more time: {setting}."


def connection_message(method: str, url: str, cause: object, *, never_sent: bool) -> str:
    """The text of a connection that failed. A POST that may have reached the server is not
    sent again (its commands may have run); ``never_sent``: the connection never opened."""
    if method == "POST" and not never_sent:
        return (
            f"The connection to the sandbox broke during {method} {url} ({cause}). The commands "
            "may have run, so the request was not sent again: check the server's log, then "
            "retry if needed."
        )
    return f"Cannot reach the sandbox at {url} ({cause}). " + CHECK_SERVER


def connect_timeout_message(url: str, timeout: float, cause: object) -> str:
    """The text of a connection that did not open in time (nothing was sent)."""
    return (
        f"The sandbox at {url} did not accept a connection within {timeout:g} s ({cause}). "
        + CHECK_SERVER
    )


def garbled_message(method: str, url: str, cause: object) -> str:
    """The text of an answer that broke the HTTP framing (cut short, bad chunking...)."""
    return (
        f"The answer to {method} {url} was cut short or garbled ({cause}). Retry; if it "
        "persists, check the server's log and any proxy in between."
    )


def invalid_url_message(method: str, url: str, cause: object) -> str:
    """The text of a request the HTTP library refused to send for its URL."""
    return (
        f"Cannot send {method} {url}: {cause}. Give the sandbox's base URL, such as "
        "'http://127.0.0.1:8000/' (check SANDBOX_URL)."
    )


def failed_message(method: str, url: str, cause: object) -> str:
    """The text of a failure no other message describes."""
    return f"{method} {url} failed: {cause}. " + CHECK_SERVER
