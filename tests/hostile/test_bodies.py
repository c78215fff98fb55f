"""Hostile request bodies: oversized (announced or streamed), too many parts, a missing or
broken boundary, malformed part headers, and clients that go away mid-request.

Documented answers: 413 past the size caps (``--max-upload`` for the environment, 1 MiB for
the config, their sum plus 64 KiB for a body), 400 with a reason for a malformed body, and the
server's memory stays bounded (its RSS is sampled while the body streams in). A client that
disconnects mid-execute has its job killed and its slot given back; an upload cut midway
leaves nothing in ``staging/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from ..conftest import processes_matching, wait_until
from .conftest import (
    MAX_CONFIG,
    MAX_PARTS,
    MAX_RSS,
    MAX_UPLOAD,
    Hostile,
    MiB,
    RawAnswer,
    chunked,
    multipart,
)

BOUNDARY = "hostile"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
TOO_LARGE = "Request too large"
MALFORMED = "Malformed multipart body"
#: How much a streamed oversized body carries: eight times the biggest cap.
STREAMED = 8 * MiB


def config_part(marker: str) -> bytes:
    return json.dumps({"commands": [f"echo ok {marker}"]}).encode()


def part_head(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def zeros(total: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    for _ in range(total // piece):
        yield bytes(piece)


def streamed(marker: str, name: str, filename: str | None = None) -> Iterable[bytes]:
    """A chunked multipart body: a good config, then ``STREAMED`` bytes in part ``name``."""
    pieces: list[Iterable[bytes]] = []
    if name != "config":
        pieces.append([part_head("config") + config_part(marker) + b"\r\n"])
    pieces += [[part_head(name, filename)], zeros(STREAMED), [f"\r\n--{BOUNDARY}--\r\n".encode()]]
    return chunked(piece for group in pieces for piece in group)


@contextlib.contextmanager
def rss_peak(hostile: Hostile) -> Iterator[list[int]]:
    """Samples the server's RSS every 5 ms; yields a list whose only item is the peak."""
    peak = [hostile.rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], hostile.rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join(5)


@dataclasses.dataclass(frozen=True)
class Body:
    """A hostile body: ``send(hostile, marker)`` returns the raw answer, which must have
    ``status`` and contain ``text``."""

    name: str
    send: Callable[[Hostile, str], RawAnswer]
    status: int
    text: str


def post(
    headers: dict[str, str | bytes | None], body: Callable[[str], Iterable[bytes] | bytes]
) -> Callable[[Hostile, str], RawAnswer]:
    return lambda hostile, marker: hostile.raw("POST", "/execute/", headers, body(marker))


CHUNKED: dict[str, str | bytes | None] = {"Content-Type": MULTIPART, "Transfer-Encoding": "chunked"}

BODIES = [
    Body(
        "announced-100M",
        post(
            {"Content-Type": MULTIPART, "Content-Length": str(100 * MiB)},
            lambda m: [part_head("config"), config_part(m), *zeros(STREAMED)],
        ),
        413,
        TOO_LARGE,
    ),
    Body(
        "streamed-environment-8M",
        post(CHUNKED, lambda m: streamed(m, "environment", "e.tgz")),
        413,
        "--max-upload",
    ),
    Body("streamed-config-8M", post(CHUNKED, lambda m: streamed(m, "config")), 413, TOO_LARGE),
    Body("streamed-unknown-part-8M", post(CHUNKED, lambda m: streamed(m, "junk")), 413, TOO_LARGE),
    Body(
        "streamed-url-encoded-8M",
        post(
            {"Content-Type": "application/x-www-form-urlencoded", "Transfer-Encoding": "chunked"},
            lambda m: chunked([b"config=", *zeros(STREAMED)]),
        ),
        413,
        TOO_LARGE,
    ),
    Body(
        "environment-one-byte-over-the-cap",
        post(
            {"Content-Type": MULTIPART},
            lambda m: multipart(
                [("config", config_part(m), None), ("environment", bytes(MAX_UPLOAD + 1), "e")],
                BOUNDARY,
            ),
        ),
        413,
        "--max-upload",
    ),
    Body(
        "config-one-byte-over-the-cap",
        post(
            {"Content-Type": MULTIPART},
            lambda m: multipart([("config", b" " * (MAX_CONFIG + 1), None)], BOUNDARY),
        ),
        413,
        TOO_LARGE,
    ),
    Body(
        "one-part-over-max-parts",
        post(
            {"Content-Type": MULTIPART},
            lambda m: multipart(
                [("config", config_part(m), None)] + [("x", b"1", None)] * MAX_PARTS, BOUNDARY
            ),
        ),
        400,
        f"Too many parts (at most {MAX_PARTS}).",
    ),
    Body(
        "ten-thousand-empty-parts",
        post(
            {"Content-Type": MULTIPART},
            lambda m: multipart(
                [("x", b"", None)] * 10_000 + [("config", config_part(m), None)], BOUNDARY
            ),
        ),
        400,
        "Too many parts",
    ),
    Body(
        "missing-boundary",
        post(
            {"Content-Type": "multipart/form-data"},
            lambda m: multipart([("config", config_part(m), None)], BOUNDARY),
        ),
        400,
        MALFORMED,
    ),
    Body(
        "wrong-boundary",
        post(
            {"Content-Type": "multipart/form-data; boundary=other"},
            lambda m: multipart([("config", config_part(m), None)], BOUNDARY),
        ),
        400,
        MALFORMED,
    ),
    Body(
        "no-closing-boundary",
        post(
            {"Content-Type": MULTIPART},
            lambda m: part_head("config") + config_part(m) + b"\r\n",
        ),
        400,
        MALFORMED,
    ),
    Body(
        "cut-inside-a-part",
        post(
            {"Content-Type": MULTIPART},
            lambda m: multipart([("config", config_part(m), None)], BOUNDARY)[:60],
        ),
        400,
        MALFORMED,
    ),
    Body(
        "part-header-line-of-100K",
        post(
            {"Content-Type": MULTIPART},
            lambda m: (
                (
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="config"\r\n'
                    f"X-Junk: {'a' * 100_000}\r\n\r\n"
                ).encode()
                + config_part(m)
                + f"\r\n--{BOUNDARY}--\r\n".encode()
            ),
        ),
        400,
        MALFORMED,
    ),
    Body(
        "a-part-with-100000-headers",
        post(
            {"Content-Type": MULTIPART},
            lambda m: (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="config"\r\n'.encode()
                + b"X-A: a\r\n" * 100_000
                + b"\r\n"
                + config_part(m)
                + f"\r\n--{BOUNDARY}--\r\n".encode()
            ),
        ),
        400,
        MALFORMED,
    ),
    Body(
        "nested-multipart",
        post(
            {"Content-Type": MULTIPART},
            lambda m: multipart([("config", config_part(m), None)], BOUNDARY).replace(
                b'name="config"\r\n',
                b'name="config"\r\nContent-Type: multipart/mixed; boundary=inner\r\n',
                1,
            ),
        ),
        400,
        "Nested multipart bodies are not accepted.",
    ),
    Body(
        "binary-garbage",
        post({"Content-Type": MULTIPART}, lambda m: bytes(range(256)) * 16),
        400,
        MALFORMED,
    ),
    Body("empty-body", post({"Content-Type": MULTIPART}, lambda m: b""), 400, MALFORMED),
    Body(
        "plain-text-body",
        post({"Content-Type": "text/plain"}, config_part),
        400,
        "Missing argument 'config'",
    ),
    Body(
        "json-body",
        post(
            {"Content-Type": "application/json"},
            lambda m: json.dumps({"config": config_part(m).decode()}).encode(),
        ),
        400,
        "Missing argument 'config'",
    ),
    Body(
        "request-header-of-100K",
        post(
            {"Content-Type": MULTIPART, "X-Junk": "a" * 100_000},
            lambda m: multipart([("config", config_part(m), None)], BOUNDARY),
        ),
        400,
        "8190",
    ),
]


@pytest.mark.parametrize("body", BODIES, ids=[body.name for body in BODIES])
def test_hostile_body(hostile: Hostile, trial: Callable[..., None], body: Body) -> None:
    def case(marker: str) -> None:
        started = time.monotonic()
        with rss_peak(hostile) as peak:
            answer = body.send(hostile, marker)
        assert (answer.status, body.text in answer.text) == (body.status, True), (
            f"{answer.status} {answer.text[:300]}"
        )
        assert time.monotonic() - started < 5
        assert peak[0] < MAX_RSS, f"the server's RSS reached {peak[0] // MiB} MiB"

    trial(case)


# -- clients that go away ---------------------------------------------------------------------


def open_request(hostile: Hostile, body: bytes, declared: int) -> socket.socket:
    """A socket with a POST execute/ announcing ``declared`` bytes and sending ``body``."""
    sock = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
    head = (
        f"POST /execute/ HTTP/1.1\r\nHost: 127.0.0.1:{hostile.port}\r\n"
        f"Authorization: Bearer {hostile.server.token}\r\nContent-Type: {MULTIPART}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def test_client_disconnects_mid_execute(hostile: Hostile, trial: Callable[..., None]) -> None:
    """The job is killed at once and its slot given back."""

    def case(marker: str) -> None:
        config = json.dumps({"commands": [f"sleep {marker}"]}).encode()
        body = multipart([("config", config, None)], BOUNDARY)
        sock = open_request(hostile, body, len(body))
        try:
            assert wait_until(lambda: bool(processes_matching(marker)), 3), "never started"
            assert hostile.server.get("usages/").json()["container"] == 1
        finally:
            sock.close()
        assert wait_until(lambda: not processes_matching(marker), 2), "the job outlived its client"
        assert wait_until(lambda: hostile.server.get("usages/").json()["container"] == 0, 2)

    trial(case)


def test_client_disconnects_mid_upload(hostile: Hostile, trial: Callable[..., None]) -> None:
    """Half an upload is sent, then the client goes: nothing is left in staging/."""

    def case(marker: str) -> None:
        config = json.dumps({"commands": [f"sleep {marker}"]}).encode()
        body = part_head("config") + config + b"\r\n" + part_head("environment", "e.tgz")
        sock = open_request(hostile, body + bytes(MAX_UPLOAD // 2), len(body) + MAX_UPLOAD)
        try:
            assert wait_until(lambda: bool(list(hostile.staging.rglob("upload.tgz"))), 3), (
                "the upload never reached staging/"
            )
        finally:
            sock.close()
        assert wait_until(lambda: not list(hostile.staging.iterdir()), 3), (
            f"left in staging/: {list(hostile.staging.rglob('*'))}"
        )

    trial(case)
