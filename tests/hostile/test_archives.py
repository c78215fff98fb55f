"""Hostile environment uploads: names and links that point out, special files, more entries or
bytes than the caps, a gzip bomb, broken and foreign files.

Every refused archive starts with a good member, is uploaded on top of a saved environment, and
aims at the host's canary where it can: the documented answer is a 400 saying why, with
nothing half-extracted (``staging/`` is empty, checked by the harness) and the base environment
unchanged.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MAX_ARCHIVE_BYTES, MAX_ENTRIES, Hostile, MiB


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = int(time.time())
    return info


def tgz(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            if data is None:
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def good(marker: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(f"good{marker}"), b"good\n"


def gzip_bomb(header: bytes, size: int) -> bytes:
    """``header`` then ``size`` zero bytes, gzip-compressed on the fly (~1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    pieces = [compressor.compress(header)]
    zeros = bytes(MiB)
    for _ in range(size // MiB):
        pieces.append(compressor.compress(zeros))
    pieces.append(compressor.flush())
    return b"".join(pieces)


def raw_header(name: str, kind: bytes, size: int, form: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar header claiming ``size`` bytes of data (tarfile would check the size itself)."""
    info = member(name, kind)
    info.size = size
    return info.tobuf(form)


def bomb_member(marker: str, canary: Path) -> bytes:
    return gzip_bomb(raw_header(f"zeros{marker}", tarfile.REGTYPE, 64 * MiB), 64 * MiB)


def bomb_long_name(marker: str, canary: Path) -> bytes:
    """A GNU long-name record of 64 MB: tarfile would read it whole into memory."""
    return gzip_bomb(raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 64 * MiB), 64 * MiB)


def bomb_pax(marker: str, canary: Path) -> bytes:
    header = raw_header("././@PaxHeader", tarfile.XHDTYPE, 64 * MiB, tarfile.USTAR_FORMAT)
    return gzip_bomb(header, 64 * MiB)


def truncated(marker: str, canary: Path) -> bytes:
    whole = tgz(good(marker), (member(f"random{marker}"), bytes(range(256)) * 64))
    return whole[: len(whole) // 2]


Build = Callable[[str, Path], bytes]


@dataclasses.dataclass(frozen=True)
class Upload:
    """A hostile archive (built from the case's marker and the canary's path) and the reason
    its 400 must give; ``reason=None`` marks a control that must be accepted."""

    name: str
    build: Build
    reason: str | None


UPLOADS = [
    Upload(
        "dotdot-into-the-canary",
        lambda m, c: tgz(good(m), (member("../" * 12 + f"{str(c).lstrip('/')}/{m}"), b"x")),
        "points outside the environment",
    ),
    Upload(
        "dotdot-nested",
        lambda m, c: tgz(good(m), (member(f"d{m}/../../x{m}"), b"x")),
        "points outside the environment",
    ),
    Upload(
        "absolute-name-in-the-canary",
        lambda m, c: tgz(good(m), (member(f"{c}/{m}"), b"x")),
        "points outside the environment",
    ),
    Upload(
        "absolute-name-in-tmp",
        lambda m, c: tgz(good(m), (member(f"/tmp/{m}"), b"x")),
        "points outside the environment",
    ),
    Upload(
        "symlink-to-etc-passwd",
        lambda m, c: tgz(good(m), (member(f"l{m}", tarfile.SYMTYPE, "/etc/passwd"), None)),
        "link to an absolute path",
    ),
    Upload(
        "symlink-to-the-canary-then-write-through-it",
        lambda m, c: tgz(
            good(m), (member("out", tarfile.SYMTYPE, str(c)), None), (member(f"out/{m}"), b"x")
        ),
        "link to an absolute path",
    ),
    Upload(
        "relative-symlink-out",
        lambda m, c: tgz(good(m), (member(f"l{m}", tarfile.SYMTYPE, "../" * 12 + "etc"), None)),
        "outside the destination",
    ),
    Upload(
        "hard-link-to-the-canary",
        lambda m, c: tgz(good(m), (member(f"h{m}", tarfile.LNKTYPE, f"{c}/canary.txt"), None)),
        "link to an absolute path",
    ),
    Upload(
        "relative-hard-link-out",
        lambda m, c: tgz(
            good(m), (member(f"h{m}", tarfile.LNKTYPE, "../" * 12 + "etc/passwd"), None)
        ),
        "outside the destination",
    ),
    Upload(
        "character-device",
        lambda m, c: tgz(good(m), (member(f"dev{m}", tarfile.CHRTYPE), None)),
        "device, FIFO or other special file",
    ),
    Upload(
        "block-device",
        lambda m, c: tgz(good(m), (member(f"dev{m}", tarfile.BLKTYPE), None)),
        "device, FIFO or other special file",
    ),
    Upload(
        "fifo",
        lambda m, c: tgz(good(m), (member(f"fifo{m}", tarfile.FIFOTYPE), None)),
        "device, FIFO or other special file",
    ),
    Upload(
        "one-entry-over-the-cap",
        lambda m, c: tgz(*((member(f"f{m}-{i}"), b"") for i in range(MAX_ENTRIES + 1))),
        f"more than {MAX_ENTRIES} entries",
    ),
    Upload(
        "one-byte-over-the-cap",
        lambda m, c: tgz(good(m), (member(f"z{m}"), bytes(MAX_ARCHIVE_BYTES - 4))),
        f"more than {MAX_ARCHIVE_BYTES} bytes",
    ),
    Upload(
        "bytes-over-the-cap-split-in-two",
        lambda m, c: tgz(
            (member(f"a{m}"), bytes(MAX_ARCHIVE_BYTES // 2)),
            (member(f"b{m}"), bytes(MAX_ARCHIVE_BYTES // 2 + 1)),
        ),
        f"more than {MAX_ARCHIVE_BYTES} bytes",
    ),
    Upload("gzip-bomb-64M-member", bomb_member, f"more than {MAX_ARCHIVE_BYTES} bytes"),
    Upload("gzip-bomb-64M-long-name", bomb_long_name, "decompresses to more than"),
    Upload("gzip-bomb-64M-pax-header", bomb_pax, "decompresses to more than"),
    Upload("truncated-gzip", truncated, "not a valid gzip file"),
    Upload("not-gzip", lambda m, c: b"this is not an archive\n" * 50, "not a valid gzip file"),
    Upload(
        "gzip-but-not-tar",
        lambda m, c: gzip.compress(b"this is not a tar archive\n" * 50),
        "not a valid tar.gz archive",
    ),
    Upload("empty-file", lambda m, c: b"", "not a valid tar.gz archive"),
    Upload("empty-gzip", lambda m, c: gzip.compress(b""), "not a valid tar.gz archive"),
    # Controls: exactly at the caps, and links that stay inside, are accepted.
    Upload(
        "control-entries-at-the-cap",
        lambda m, c: tgz(*((member(f"f{m}-{i}"), b"") for i in range(MAX_ENTRIES))),
        None,
    ),
    Upload(
        "control-bytes-at-the-cap",
        lambda m, c: tgz((member(f"z{m}"), bytes(MAX_ARCHIVE_BYTES))),
        None,
    ),
    Upload(
        "control-links-inside",
        lambda m, c: tgz(
            good(m),
            (member(f"s{m}", tarfile.SYMTYPE, f"good{m}"), None),
            (member(f"h{m}", tarfile.LNKTYPE, f"good{m}"), None),
        ),
        None,
    ),
]


@pytest.fixture(scope="module")
def base(hostile: Hostile) -> str:
    """A saved environment the uploads are merged onto: it must never change."""
    response = hostile.post({"commands": ["echo base > base.txt"], "save": True})
    assert response.status_code == 200, response.text
    uuid: str = response.json()["environment"]
    return uuid


def members(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return sorted(archive.getnames())


@pytest.mark.parametrize("upload", UPLOADS, ids=[upload.name for upload in UPLOADS])
def test_hostile_upload(
    hostile: Hostile, trial: Callable[..., None], base: str, upload: Upload
) -> None:
    def case(marker: str) -> None:
        archive = upload.build(marker, hostile.canary)
        started = time.monotonic()
        answer = hostile.execute(
            {"commands": ["ls -A | sort"], "environment": base}, marker, archive
        )
        assert time.monotonic() - started < 3
        if upload.reason is None:
            listing = answer.entry()["stdout"].split()
            assert "base.txt" in listing and any(marker in name for name in listing), listing
        else:
            assert answer.status == 400, answer.text[:300]
            assert answer.text.startswith("Invalid environment archive: "), answer.text
            assert upload.reason in answer.text
        download = hostile.server.get(f"environments/{base}/")
        assert members(download.content) == ["base.txt"], "the base environment changed"
        again = hostile.execute({"commands": ["ls -A"], "environment": base}, marker)
        assert again.entry()["stdout"] == "base.txt", "something of the upload was left"

    trial(case)
