"""The job message and the events of a run, as JSON, checked both ways (design B3, B6, B9).

A job travels from a front to a worker as one JSON text (:class:`JobSpec`), and its events come
back on the front's inbox stream (:class:`Event`). Anyone who reaches Redis can write either, so
a worker re-validates every job exactly as ``execute/`` validates a request: the same JSON rules
(no NaN or Infinity, nesting at most :data:`MAX_JSON_DEPTH`), the same
:func:`~sandbox_kernel.protocol.validate_config` and its 400 texts, the same size cap. The
message around the config is stricter still: exactly its keys, each of its type and size.
Decoding refuses, it never repairs: :class:`BadJob` or :class:`BadEvent`, whose text says what
was wrong (hostile values are shown cut short).

The job carries no token and no credentials.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

from ... import protocol
from . import keys

#: The job message's format; a worker refuses another one (a front of another version).
FORMAT_VERSION: Final = 1
#: How deep a config may nest: the same limit as ``execute/`` (``app._MAX_JSON_DEPTH``).
MAX_JSON_DEPTH: Final = 64
#: ``ServerSettings.max_config_bytes``: the cap of a config at ``execute/``.
DEFAULT_MAX_CONFIG_BYTES: Final = 1024**2
#: What a job message may hold beyond its config (ids, names, the upload's reference).
ENVELOPE_BYTES: Final = 4096
#: ``ServerSettings.max_upload``.
DEFAULT_MAX_UPLOAD: Final = 256 * 1024**2
#: The largest event a front accepts by default: a final answer holds up to ``--max-output``
#: of output and ``--max-result`` of result (1 MiB each by default), JSON-escaped; see
#: :func:`event_cap` for other caps.
DEFAULT_MAX_EVENT_BYTES: Final = 16 * 1024**2

UploadPlace = Literal["redis", "bucket"]
_JOB_KEYS: Final = frozenset({"v", "job", "front", "config", "upload", "stream", "enqueued_ms"})
_UPLOAD_KEYS: Final = frozenset({"place", "size", "sha256"})
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_LARGEST_MS: Final = 2**53


class BadJob(ValueError):
    """A job message a worker must not run. Answered 400 with this text; nothing ran."""

    status: Final = 400


class BadEvent(ValueError):
    """An event on a reply or control stream that is not one of the vocabulary."""


@dataclasses.dataclass(frozen=True)
class UploadRef:
    """Where a job's uploaded archive waits: ``sk:upload:<job>`` in Redis (up to
    :data:`keys.UPLOAD_INLINE_MAX`) or ``PREFIX/uploads/<job>.tgz`` in the bucket."""

    place: UploadPlace
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One ``execute/`` request on its way to a worker."""

    #: The job id (:data:`keys.JOB_ID_RE`): the claim key and the events name it.
    job: str
    #: The front that waits for it: events go to ``sk:inbox:<front>``.
    front: str
    #: The request's config, validated by the front and again by the worker.
    config: dict[str, Any]
    upload: UploadRef | None = None
    #: An ``execute/stream/`` run: the worker sends ``stream`` and ``stdin`` events.
    stream: bool = False
    #: When the front queued it (Unix time in ms): the queue's wait is measured from it.
    enqueued_ms: int = 0

    def to_json(
        self,
        *,
        max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
        max_upload: int = DEFAULT_MAX_UPLOAD,
    ) -> str:
        """The message text. Raises :class:`BadJob` for a job no worker would accept, so a
        front learns it at once rather than from a worker's refusal."""
        message: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "job": self.job,
            "front": self.front,
            "config": self.config,
            "upload": dataclasses.asdict(self.upload) if self.upload else None,
            "stream": self.stream,
            "enqueued_ms": self.enqueued_ms,
        }
        try:
            text = _dumps(message)
        except (TypeError, ValueError) as error:
            raise BadJob(f"The job cannot be sent as JSON: {error}.") from None
        job_from_json(text, max_config_bytes=max_config_bytes, max_upload=max_upload)
        return text

    @classmethod
    def from_json(
        cls,
        raw: str | bytes,
        *,
        max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
        max_upload: int = DEFAULT_MAX_UPLOAD,
    ) -> JobSpec:
        """:func:`job_from_json`."""
        return job_from_json(raw, max_config_bytes=max_config_bytes, max_upload=max_upload)


def job_from_json(
    raw: str | bytes,
    *,
    max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
    max_upload: int = DEFAULT_MAX_UPLOAD,
) -> JobSpec:
    """The :class:`JobSpec` of a message, re-validated as ``execute/`` validates a request,
    or :class:`BadJob`. ``max_config_bytes`` and ``max_upload`` are the worker's caps, which
    must be the fronts' too."""
    limit = max_config_bytes + ENVELOPE_BYTES
    message = _strict_loads(raw, limit, MAX_JSON_DEPTH + 1, BadJob, "job message")
    if not isinstance(message, dict):
        raise _bad_job(f"it is {_kind(message)}, not an object")
    _exact_keys(message, _JOB_KEYS, "the message")
    if type(message["v"]) is not int or message["v"] != FORMAT_VERSION:
        raise _bad_job(
            f"its format is {_cut(message['v'])}, this worker reads {FORMAT_VERSION}: "
            "run fronts and workers of the same version"
        )
    try:
        job, front = keys.job_id(message["job"]), keys.name(message["front"])
    except ValueError as error:
        raise _bad_job(str(error)) from None
    return JobSpec(
        job=job,
        front=front,
        config=_checked_config(message["config"], max_config_bytes),
        upload=_checked_upload(message["upload"], max_upload),
        stream=_checked_bool(message["stream"], "stream"),
        enqueued_ms=_checked_ms(message["enqueued_ms"]),
    )


def _checked_config(config: object, max_config_bytes: int) -> dict[str, Any]:
    ok, reason = protocol.validate_config(config)
    if not ok:
        raise BadJob(reason)  # word for word the 400 of execute/
    assert isinstance(config, dict)  # validate_config checked it is a Mapping; JSON gives dicts
    size = len(_dumps(config).encode())
    if size > max_config_bytes:
        raise BadJob(
            f"Request too large: config is limited to {max_config_bytes} bytes, "
            f"this one has {size}."
        )
    return config


def _checked_upload(upload: object, max_upload: int) -> UploadRef | None:
    if upload is None:
        return None
    if not isinstance(upload, dict):
        raise _bad_job(f"'upload' is {_kind(upload)}, not an object or null")
    _exact_keys(upload, _UPLOAD_KEYS, "'upload'")
    place, size, digest = upload["place"], upload["size"], upload["sha256"]
    if place not in ("redis", "bucket"):
        raise _bad_job(f"'upload.place' is {_cut(place)}, not 'redis' or 'bucket'")
    limit = keys.UPLOAD_INLINE_MAX if place == "redis" else max_upload
    if type(size) is not int or not 0 < size <= limit:
        raise _bad_job(f"'upload.size' is {_cut(size)}, not a number of bytes from 1 to {limit}")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise _bad_job(f"'upload.sha256' is {_cut(digest)}, not 64 lowercase hex digits")
    return UploadRef(place=place, size=size, sha256=digest)


def _checked_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise _bad_job(f"{field!r} is {_cut(value)}, not true or false")
    return value


def _checked_ms(value: object) -> int:
    if type(value) is not int or not 0 <= value < _LARGEST_MS:
        raise _bad_job(f"'enqueued_ms' is {_cut(value)}, not a time in milliseconds")
    return value


def _bad_job(detail: str) -> BadJob:
    return BadJob(f"The cluster refused a malformed job message ({detail}); nothing was run.")


# The events of a run. On a front's inbox (``sk:inbox:<front>``), from workers:
#   claimed {"worker": NAME}                  the job is claimed: no 503 any more
#   stream  {"stream": "stdout"|"stderr", "text": TEXT}   a chunk of a streamed run
#   stdin   {"prompt": TEXT}                  the run waits for input
#   final   {... the execute/ answer ...}     the run's answer (an object with "status")
#   error   {"status": 400-599, "text": TEXT} the run was refused or failed: HTTP status, text
#   queue   {"ahead": N}                      jobs ahead of this one
# On a worker's control stream (``sk:control:<worker>``), from fronts:
#   stdin {"text": TEXT}, eof {}, stop {}, cancel {}
# Each is one stream entry of three fields: job, kind, data (a JSON object).
ReplyKind = Literal["claimed", "stream", "stdin", "final", "error", "queue"]
ControlKind = Literal["stdin", "eof", "stop", "cancel"]
REPLY_KINDS: Final = ("claimed", "stream", "stdin", "final", "error", "queue")
CONTROL_KINDS: Final = ("stdin", "eof", "stop", "cancel")
_EVENT_FIELDS: Final = frozenset({"job", "kind", "data"})
_TYPE_NAMES: Final = {int: "a whole number", str: "a string"}


@dataclasses.dataclass(frozen=True)
class Event:
    """One entry of a reply or control stream."""

    job: str
    kind: str
    data: dict[str, Any]


def event_cap(max_output: int, max_result: int) -> int:
    """The largest event a front should accept given the workers' ``--max-output`` and
    ``--max-result``: the final answer holds both, the result JSON-escaped (up to 6 bytes per
    byte), plus room for the rest of the answer."""
    return max_output + 6 * max_result + 64 * 1024


def encode_event(
    event: Event, *, control: bool = False, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> dict[str, str]:
    """The fields of an ``XADD``. Refuses (:class:`BadEvent`) what the other side would; a
    worker passes ``max_bytes=event_cap(max_output, max_result)``, the cap its fronts read
    with, so that a legal large final is never refused."""
    fields = {"job": event.job, "kind": event.kind, "data": _dumps(event.data)}
    decode_event(fields, control=control, max_bytes=max_bytes)
    return fields


def decode_event(
    fields: Mapping[bytes, bytes] | Mapping[str, str],
    *,
    control: bool = False,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Event:
    """The :class:`Event` of a stream entry (``XREAD`` answers bytes), or :class:`BadEvent`.
    ``control`` picks the vocabulary: a worker's control stream, else a front's inbox."""
    text = {_text(field): _text(value) for field, value in fields.items()}
    if set(text) != _EVENT_FIELDS:
        raise BadEvent(f"An event has the fields {_cut(sorted(text))}, not job, kind and data.")
    try:
        job = keys.job_id(text["job"])
    except ValueError as error:
        raise BadEvent(f"An event names no job: {error}.") from None
    kind = text["kind"]
    vocabulary = CONTROL_KINDS if control else REPLY_KINDS
    if kind not in vocabulary:
        raise BadEvent(f"Unknown event kind {_cut(kind)} for job {job}: not one of {vocabulary}.")
    data = _strict_loads(text["data"], max_bytes, MAX_JSON_DEPTH + 1, BadEvent, f"{kind} event")
    if not isinstance(data, dict):
        raise BadEvent(f"The {kind} event of job {job} holds {_kind(data)}, not an object.")
    problem = (_control_problem if control else _reply_problem)(kind, data)
    if problem:
        raise BadEvent(f"The {kind} event of job {job} is malformed: {problem}.")
    return Event(job=job, kind=kind, data=data)


def _reply_problem(kind: str, data: dict[str, Any]) -> str | None:
    if kind == "final":
        status = data.get("status")
        return None if type(status) is int else f"its 'status' is {_cut(status)}, not a number"
    if kind == "claimed":
        return _shape(data, {"worker": str}) or _name_problem(data["worker"])
    if kind == "stream":
        if data.get("stream") not in ("stdout", "stderr"):
            return f"its 'stream' is {_cut(data.get('stream'))}, not 'stdout' or 'stderr'"
        return _shape(data, {"stream": str, "text": str})
    if kind == "stdin":
        return _shape(data, {"prompt": str})
    if kind == "error":
        problem = _shape(data, {"status": int, "text": str})
        if problem is None and not 400 <= data["status"] <= 599:
            problem = f"its 'status' {data['status']} is not an HTTP error status"
        return problem
    problem = _shape(data, {"ahead": int})
    if problem is None and data["ahead"] < 0:
        problem = f"its 'ahead' is {data['ahead']}"
    return problem


def _control_problem(kind: str, data: dict[str, Any]) -> str | None:
    return _shape(data, {"text": str} if kind == "stdin" else {})


def _shape(data: dict[str, Any], fields: dict[str, type]) -> str | None:
    """Why ``data`` does not have exactly these fields of these types (bool is no int)."""
    if set(data) != set(fields):
        return f"its fields are {_cut(sorted(data))}, not {sorted(fields)}"
    for field, wanted in fields.items():
        if type(data[field]) is not wanted:
            return f"its {field!r} is {_cut(data[field])}, not {_TYPE_NAMES[wanted]}"
    return None


def _name_problem(value: str) -> str | None:
    try:
        keys.name(value)
    except ValueError as error:
        return str(error)
    return None


def claimed(job: str, worker: str) -> Event:
    return Event(job, "claimed", {"worker": worker})


def chunk(job: str, stream: str, text: str) -> Event:
    return Event(job, "stream", {"stream": stream, "text": text})


def stdin_wanted(job: str, prompt: str) -> Event:
    return Event(job, "stdin", {"prompt": prompt})


def final(job: str, answer: dict[str, Any]) -> Event:
    return Event(job, "final", answer)


def error(job: str, status: int, text: str) -> Event:
    return Event(job, "error", {"status": status, "text": text})


def queue(job: str, ahead: int) -> Event:
    return Event(job, "queue", {"ahead": ahead})


# JSON, strictly.


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _strict_loads(
    raw: str | bytes, limit: int, max_depth: int, refusal: type[ValueError], what: str
) -> Any:
    """``json.loads`` with the rules of ``execute/``: valid UTF-8, at most ``limit`` bytes,
    no NaN or Infinity, nested at most ``max_depth`` deep."""

    def refuse_constant(constant: str) -> Any:
        raise ValueError(f"{constant} is not valid JSON")

    if not isinstance(raw, str | bytes):
        raise refusal(f"The {what} is {_kind(raw)}, not JSON text.")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise refusal(f"The {what} has {size} bytes, more than the {limit} allowed.")
    try:
        value = json.loads(raw, parse_constant=refuse_constant)
    except RecursionError:
        raise refusal(f"The {what} is nested deeper than {max_depth} levels.") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise refusal(f"The {what} is not valid JSON: {_cut(str(error))}.") from None
    if _deeper_than(value, max_depth):
        raise refusal(f"The {what} is nested deeper than {max_depth} levels.")
    return value


def _deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep (iterative: a
    hostile value must not exhaust the stack here either)."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def _exact_keys(value: dict[str, Any], wanted: frozenset[str], where: str) -> None:
    missing, extra = sorted(wanted - set(value)), sorted(set(value) - wanted)
    if missing or extra:
        detail = ", ".join(
            part
            for part in (
                f"missing {_cut(missing)}" if missing else "",
                f"unknown {_cut(extra)}" if extra else "",
            )
            if part
        )
        raise _bad_job(f"{where} has {detail}")


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEvent(f"An event holds bytes that are not UTF-8: {_cut(value)}.") from None
    return value


def _kind(value: object) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _cut(value: object) -> str:
    """The repr of a value for a message, at most 80 characters (it may be hostile)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- the caps fronts and workers must share -------------------------------------------------------

#: The settings a front admits requests by and a worker runs them by (design B8): a front
#: publishes its own in :data:`~.keys.FRONT_CAPS`, and a worker whose caps differ says so.
SHARED_CAPS: Final = ("max_upload", "max_output", "max_result", "workdir_quota", "execute_timeout")


def caps_of(settings: object) -> dict[str, float]:
    """The :data:`SHARED_CAPS` of a ``ServerSettings``, by name."""
    return {name: float(getattr(settings, name)) for name in SHARED_CAPS}


def caps_message(front: str, settings: object) -> str:
    """What a front publishes in :data:`~.keys.FRONT_CAPS`: its name and its caps (JSON)."""
    return _dumps({"front": front, "caps": caps_of(settings)})


def differing_caps(mine: Mapping[str, float], published: str | bytes) -> tuple[str, list[str]]:
    """The front named in ``published`` (:func:`caps_message`) and, for each cap that differs
    from ``mine``, ``"--option MINE here, THEIRS at the front"``. Raises :class:`BadEvent` for
    a value that is not such a message (anyone who reaches Redis can write it)."""
    try:
        value = json.loads(published)
        front, caps = value["front"], value["caps"]
        if not isinstance(front, str) or not isinstance(caps, dict):
            raise TypeError("front or caps of the wrong type")
    except (ValueError, KeyError, TypeError) as error:
        raise BadEvent(f"not a front's caps: {error}") from None
    differences = []
    for name in SHARED_CAPS:
        theirs = caps.get(name)
        if not isinstance(theirs, int | float) or isinstance(theirs, bool):
            continue
        if float(theirs) != mine[name]:
            option = "--" + name.replace("_", "-")
            shown = f"{_number(mine[name])} here, {_number(theirs)} at the front"
            differences.append(f"{option} {shown}")
    return _cut(front), differences


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
