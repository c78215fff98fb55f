"""The sandbox protocol on the client's side, without I/O: building requests, reading answers.

Every transport (the synchronous :class:`~sandbox_kernel.client.Sandbox`, the asyncio one of
live cells) sends what this module builds and gives what it receives back to it, so the wire
format, its checks and the errors it raises are written once. An answer is anything with the
attributes of :class:`~sandbox_kernel._errors.Answer` (a ``requests.Response`` has them).

The contract is ``shared/reference/sandbox-protocol.md``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote, urlsplit

from ._errors import (
    Answer,
    SandboxConfigError,
    SandboxProtocolError,
    body_snippet,
    error_for_status,
)
from ._generations import checked
from .protocol import EXECUTE, OVERLOADED_TEXT, environment_path, file_path, validate_config

#: Added to the server's ``execute_timeout`` for the deadline of ``execute/``: the server
#: answers after the commands' budget, plus the time to prepare and save the environment.
EXECUTE_MARGIN: Final = 10.0
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


def execute_deadline(timeout: float, execute_timeout: float | None) -> float:
    """Seconds an ``execute/`` may take: the client's timeout, or the server's budget plus a
    margin when that is longer."""
    if execute_timeout is None:
        return timeout
    return max(timeout, execute_timeout + EXECUTE_MARGIN)


# --- Reading answers --------------------------------------------------------------------------


def raise_for_status(answer: Answer) -> None:
    """``Sandbox<STATUS>`` for an answer of 300 or more."""
    if answer.status_code >= 300:
        raise error_for_status(answer.status_code)(answer)


def json_object(answer: Answer, base: str) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else breaks the protocol."""
    try:
        data = json.loads(answer.content)
    except ValueError:  # not JSON, or not UTF-8
        data = None
    if isinstance(data, dict):
        return data
    method = getattr(answer.request, "method", None) or "request"
    what = "not JSON" if data is None else "JSON but not an object"
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


def timeout_message(method: str, url: str, timeout: float, setting: str) -> str:
    """The text of a request that missed its deadline; ``setting`` names the one that applies."""
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
