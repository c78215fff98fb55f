"""Exceptions of the sandbox client, one module so that they can be imported without requests.

Every failure of :class:`sandbox_kernel.client.Sandbox` is a :class:`SandboxError`; nothing from
``requests`` escapes. An HTTP answer with a status of 300 or more raises ``Sandbox<STATUS>``
(``Sandbox404``, ``Sandbox503``...), a subclass of :class:`SandboxHTTPError`, as the
``sandbox-api`` package users know did. The status classes are written out below (generated
once from :class:`http.HTTPStatus`, the same on every Python >= 3.10) so that type checkers and
IDEs see them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol


class Answer(Protocol):
    """An HTTP answer as the client reads it, whatever the transport: a ``requests.Response``
    has these attributes, and so must the answers of any other transport."""

    @property
    def status_code(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def url(self) -> str: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...
    @property
    def encoding(self) -> str | None: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    #: Something with a ``method`` (the request that was answered), or None.
    @property
    def request(self) -> Any: ...


__all__ = [
    "Answer",
    "Sandbox300",
    "Sandbox301",
    "Sandbox302",
    "Sandbox303",
    "Sandbox304",
    "Sandbox305",
    "Sandbox307",
    "Sandbox308",
    "Sandbox400",
    "Sandbox401",
    "Sandbox402",
    "Sandbox403",
    "Sandbox404",
    "Sandbox405",
    "Sandbox406",
    "Sandbox407",
    "Sandbox408",
    "Sandbox409",
    "Sandbox410",
    "Sandbox411",
    "Sandbox412",
    "Sandbox413",
    "Sandbox414",
    "Sandbox415",
    "Sandbox416",
    "Sandbox417",
    "Sandbox418",
    "Sandbox421",
    "Sandbox422",
    "Sandbox423",
    "Sandbox424",
    "Sandbox425",
    "Sandbox426",
    "Sandbox428",
    "Sandbox429",
    "Sandbox431",
    "Sandbox451",
    "Sandbox500",
    "Sandbox501",
    "Sandbox502",
    "Sandbox503",
    "Sandbox504",
    "Sandbox505",
    "Sandbox506",
    "Sandbox507",
    "Sandbox508",
    "Sandbox510",
    "Sandbox511",
    "SandboxAnswerTooLarge",
    "SandboxCancelled",
    "SandboxConfigError",
    "SandboxConnectionError",
    "SandboxError",
    "SandboxHTTPError",
    "SandboxProtocolError",
    "SandboxStreamRefused",
    "SandboxTimeout",
    "error_for_status",
]

#: How much of an error body goes into a message: enough for the server's one-line reason,
#: not a whole HTML page.
BODY_SNIPPET: Final = 200


class SandboxError(Exception):
    """Base class of every error raised by the sandbox client.

    Catch this one to handle any failure of a request (HTTP status, connection, timeout,
    malformed answer, invalid config) in one place; the message always says what happened and
    what to do about it.
    """


class SandboxConfigError(SandboxError, ValueError):
    """Something given to the client is unusable, detected before any request is sent.

    An ``execute`` config the server would reject (the message is the reason), or a sandbox
    URL that is not an ``http://`` or ``https://`` address. Also a ``ValueError``, since the
    caller passed a bad value.
    """


class SandboxConnectionError(SandboxError):
    """The server could not be reached: connection refused, host unknown or unreachable,
    or the connection dropped before an answer came.
    """


class SandboxCancelled(SandboxError):
    """The caller cancelled a request (an interrupted cell, say) before its answer was whole.

    ``Cancellation.cancel()`` ends an ``execute(..., cancel=...)``, and any request made in a
    ``cancel_scope`` (downloads, uploads, specifications...), at once, body included. Its
    connection was closed: a server that watches for disconnects (the embedded one) kills an
    ``execute``'s command; the public server cannot, and runs it until its own timeout.
    """


class SandboxTimeout(SandboxError):
    """The server did not give its whole answer within the client's timeout.

    The timeout is a deadline for the whole exchange (connecting, sending, the headers and the
    body), not for each read: a server trickling its answer a byte at a time ends here too.
    """


class SandboxProtocolError(SandboxError):
    """A successful (2xx) answer that is not what the protocol says: not JSON, not a JSON
    object, a body cut short, a missing ``Content-Length``... Usually the URL points to
    something that is not a sandbox server, or a proxy in between mangled the answer.
    """


class SandboxStreamRefused(SandboxError):
    """The WebSocket of ``execute/stream/`` could not be opened although the server names the
    ``stream`` extension: the upgrade was answered with an HTTP status (a proxy in between that
    does not pass WebSockets, say). Nothing ran: the same run can go as plain ``execute/``,
    which is what the kernel does from then on.
    """


class SandboxAnswerTooLarge(SandboxProtocolError):
    """An answer larger than the client accepts: it was cut there and nothing of it was kept.

    A download is capped by what the caller asked for (``download(..., max_bytes=...)``, the
    size ``check()`` announced), a JSON answer by ``Sandbox(url, max_json=...)``; a body longer
    than its own ``Content-Length`` is refused too. The client never reads more than the cap
    plus one byte, so a hostile or broken server cannot fill the memory of the kernel.
    """


#: What to do, by status.
_HINTS: Final[dict[int, str]] = {
    400: "the server rejected the request as malformed: check the config (Sandbox.validate)",
    401: "the server wants credentials: pass the right token, Sandbox(url, token=...)",
    403: "the server refused access: check the token given to Sandbox(url, token=...)",
    404: (
        "nothing there: the environment or file is unknown or has expired, "
        "or the URL does not point to a sandbox server"
    ),
    405: "wrong method for this endpoint: check that the URL points to a sandbox server",
    413: "the request is too large for the server: send a smaller environment",
    429: "too many requests: wait a little before trying again",
    503: "the sandbox is busy or unavailable: retry after a few seconds",
}
#: The fallback advice, by class of status (3xx, 4xx, 5xx).
_CLASS_HINTS: Final[dict[int, str]] = {
    3: "the server redirected the request: give the sandbox's final URL instead",
    4: "the server rejected the request: check what was sent",
    5: "the server failed: retry later, or look at the server's log",
}


class SandboxHTTPError(SandboxError):
    """The server answered with a status of 300 or more.

    ``response`` is the answer (a :class:`requests.Response` for the synchronous client; its
    body is already read), ``status_code`` its status. ``message``, when given, replaces the
    default advice of the status.
    """

    def __init__(self, response: Answer, message: str | None = None) -> None:
        self.response = response
        self.status_code: int = response.status_code
        super().__init__(_describe(response, message))


def _describe(response: Answer, advice: str | None) -> str:
    """``"<status> <reason> to <METHOD> <url>: '<body>'. <what to do>"``."""
    status = response.status_code
    request = response.request
    method = request.method if request is not None and request.method else "request"
    text = f"The sandbox answered {status} {response.reason or ''}".rstrip()
    text += f" to {method} {response.url}"
    snippet = body_snippet(response)
    if snippet:
        text += f": {snippet!r}"
    hint = advice or _HINTS.get(status) or _CLASS_HINTS.get(status // 100, "see the server's log")
    if method == "POST" and status >= 500 and status != 503 and advice is None:
        hint += " (the commands may have run: the request was not sent again)"
    return f"{text}. {hint[0].upper()}{hint[1:]}."


def body_snippet(response: Answer) -> str:
    """The start of a plain-text body, whitespace squeezed (an HTML error page is long).

    Decoded cheaply (no charset guessing over a large body); bad bytes become U+FFFD.
    """
    try:
        head = response.content[: BODY_SNIPPET * 8]
    except Exception:  # a body that cannot be read is not worth a second failure
        return ""
    try:
        text = head.decode(response.encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = head.decode("utf-8", errors="replace")
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= BODY_SNIPPET else text[:BODY_SNIPPET] + "…"


#: What to do about an answer, when its sender knows better than the status's own advice (a
#: 403 of a sandbox that was sent the user's JupyterHub token names the Hub's settings); None
#: leaves the status's advice.
Advise = Callable[[Answer], "str | None"]


def with_advice(error: SandboxError, advise: Advise | None) -> SandboxError:
    """``error`` again with ``advise``'s advice when it is an HTTP error ``advise`` knows
    better about (the same class, the same answer); else ``error`` itself. For errors raised
    by a client that was not given ``advise``."""
    if advise is None or not isinstance(error, SandboxHTTPError):
        return error
    advice = advise(error.response)
    if advice is None:
        return error
    better = type(error)(error.response, advice)
    better.__cause__ = error.__cause__
    return better


def error_for_status(code: int) -> type[SandboxHTTPError]:
    """The exception class for an HTTP status: ``Sandbox<code>``, or :class:`SandboxHTTPError`
    for a status that :class:`http.HTTPStatus` does not know (a proxy's 599, say).
    """
    return _BY_STATUS.get(code, SandboxHTTPError)


# --- One class per status >= 300 of http.HTTPStatus (generated, do not edit by hand) ---


class Sandbox300(SandboxHTTPError):
    """300 Multiple Choices."""


class Sandbox301(SandboxHTTPError):
    """301 Moved Permanently."""


class Sandbox302(SandboxHTTPError):
    """302 Found."""


class Sandbox303(SandboxHTTPError):
    """303 See Other."""


class Sandbox304(SandboxHTTPError):
    """304 Not Modified."""


class Sandbox305(SandboxHTTPError):
    """305 Use Proxy."""


class Sandbox307(SandboxHTTPError):
    """307 Temporary Redirect."""


class Sandbox308(SandboxHTTPError):
    """308 Permanent Redirect."""


class Sandbox400(SandboxHTTPError):
    """400 Bad Request."""


class Sandbox401(SandboxHTTPError):
    """401 Unauthorized."""


class Sandbox402(SandboxHTTPError):
    """402 Payment Required."""


class Sandbox403(SandboxHTTPError):
    """403 Forbidden."""


class Sandbox404(SandboxHTTPError):
    """404 Not Found."""


class Sandbox405(SandboxHTTPError):
    """405 Method Not Allowed."""


class Sandbox406(SandboxHTTPError):
    """406 Not Acceptable."""


class Sandbox407(SandboxHTTPError):
    """407 Proxy Authentication Required."""


class Sandbox408(SandboxHTTPError):
    """408 Request Timeout."""


class Sandbox409(SandboxHTTPError):
    """409 Conflict."""


class Sandbox410(SandboxHTTPError):
    """410 Gone."""


class Sandbox411(SandboxHTTPError):
    """411 Length Required."""


class Sandbox412(SandboxHTTPError):
    """412 Precondition Failed."""


class Sandbox413(SandboxHTTPError):
    """413 Request Entity Too Large."""


class Sandbox414(SandboxHTTPError):
    """414 Request-URI Too Long."""


class Sandbox415(SandboxHTTPError):
    """415 Unsupported Media Type."""


class Sandbox416(SandboxHTTPError):
    """416 Requested Range Not Satisfiable."""


class Sandbox417(SandboxHTTPError):
    """417 Expectation Failed."""


class Sandbox418(SandboxHTTPError):
    """418 I'm a Teapot."""


class Sandbox421(SandboxHTTPError):
    """421 Misdirected Request."""


class Sandbox422(SandboxHTTPError):
    """422 Unprocessable Entity."""


class Sandbox423(SandboxHTTPError):
    """423 Locked."""


class Sandbox424(SandboxHTTPError):
    """424 Failed Dependency."""


class Sandbox425(SandboxHTTPError):
    """425 Too Early."""


class Sandbox426(SandboxHTTPError):
    """426 Upgrade Required."""


class Sandbox428(SandboxHTTPError):
    """428 Precondition Required."""


class Sandbox429(SandboxHTTPError):
    """429 Too Many Requests."""


class Sandbox431(SandboxHTTPError):
    """431 Request Header Fields Too Large."""


class Sandbox451(SandboxHTTPError):
    """451 Unavailable For Legal Reasons."""


class Sandbox500(SandboxHTTPError):
    """500 Internal Server Error."""


class Sandbox501(SandboxHTTPError):
    """501 Not Implemented."""


class Sandbox502(SandboxHTTPError):
    """502 Bad Gateway."""


class Sandbox503(SandboxHTTPError):
    """503 Service Unavailable."""


class Sandbox504(SandboxHTTPError):
    """504 Gateway Timeout."""


class Sandbox505(SandboxHTTPError):
    """505 HTTP Version Not Supported."""


class Sandbox506(SandboxHTTPError):
    """506 Variant Also Negotiates."""


class Sandbox507(SandboxHTTPError):
    """507 Insufficient Storage."""


class Sandbox508(SandboxHTTPError):
    """508 Loop Detected."""


class Sandbox510(SandboxHTTPError):
    """510 Not Extended."""


class Sandbox511(SandboxHTTPError):
    """511 Network Authentication Required."""


_BY_STATUS: Final[dict[int, type[SandboxHTTPError]]] = {
    int(cls.__name__.removeprefix("Sandbox")): cls
    for cls in SandboxHTTPError.__subclasses__()
    if cls.__name__.removeprefix("Sandbox").isdigit()
}
