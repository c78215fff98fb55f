"""Hostile environment archives: names and links that point out (symlink chains beyond
``PATH_MAX`` included, the CVE-2025-4517 class), links written through, hard links to what was
not extracted, the kernel's own ``.sandbox_kernel/``, special files, set-id bits, more entries
or bytes than the caps, a gzip bomb, broken and foreign files.

Uploads: every refused archive starts with a good member, is uploaded on top of a saved
environment, and aims at the host's canary where it can: the documented answer is a 400 saying
why, with nothing half-extracted (``staging/`` is empty, checked by the harness) and the base
environment unchanged. Downloads: the client's ``extract_archive`` gets the same archives, with
the same answers, and writes nothing outside its target.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.archive import ArchiveError, ArchiveLimits, extract_archive

from ..helpers import escape_chain, gzip_bomb, member, raw_header, tgz
from .conftest import (
    MAX_ARCHIVE_BYTES,
    MAX_ENTRIES,
    Hostile,
    MiB,
    make_hostile,
    new_marker,
    stop_and_check,
)


def good(marker: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(f"good{marker}"), b"good\n"


def bomb_member(marker: str, canary: Path) -> bytes:
    return gzip_bomb(raw_header(f"zeros{marker}", tarfile.REGTYPE, 64 * MiB), 64 * MiB)


def bomb_long_name(marker: str, canary: Path) -> bytes:
    """A GNU long-name record of 64 MB: tarfile would read it whole into memory."""
    return gzip_bomb(raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 64 * MiB), 64 * MiB)


def bomb_pax(marker: str, canary: Path) -> bytes:
    header = raw_header("././@PaxHeader", tarfile.XHDTYPE, 64 * MiB, tarfile.USTAR_FORMAT)
    return gzip_bomb(header, 64 * MiB)


def symlink_chain(marker: str, canary: Path, last: str = "file") -> bytes:
    """The CVE-2025-4517 proof of concept, aimed at the canary: folders with 247-character
    names and one-letter links to them, so that ``os.path.realpath`` of the final link passes
    ``PATH_MAX`` and stops resolving; tarfile's ``data`` filter then believes ``escape``
    points inside, and the last member (a file, a hard link, a folder) lands in the canary."""
    members = [good(marker), *escape_chain(canary)]
    if last == "file":
        members.append((member(f"escape/{marker}"), b"written outside\n"))
    elif last == "hard-link":
        members.append((member(f"h{marker}", tarfile.LNKTYPE, "escape/canary.txt"), None))
    else:
        members.append((member(f"escape/{marker}", tarfile.DIRTYPE), None))
    return tgz(*members)


def symlink_chain_short(marker: str, canary: Path) -> bytes:
    """The same chain with short names: a link through a link, then a file through both."""
    return tgz(
        good(marker),
        (member("real", tarfile.DIRTYPE), None),
        (member("a", tarfile.SYMTYPE, "real"), None),
        (member("real/b", tarfile.SYMTYPE, "../.."), None),
        (member(f"a/b/{marker}"), b"x"),
    )


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
    Upload("symlink-chain-short-names", symlink_chain_short, "outside the destination"),
    Upload(
        "symlink-to-dot-then-climb-out",
        lambda m, c: tgz(
            good(m),
            (member("x", tarfile.SYMTYPE, "."), None),
            (member(f"y{m}", tarfile.SYMTYPE, f"x/../../..{c}"), None),
        ),
        "has '..' after a name",
    ),
    Upload(
        "write-through-a-link-of-the-same-archive",
        lambda m, c: tgz(
            good(m),
            (member("sub", tarfile.DIRTYPE), None),
            (member("l", tarfile.SYMTYPE, "sub"), None),
            (member(f"l/{m}"), b"x"),
        ),
        "not a folder",
    ),
    Upload(
        "folder-entry-through-a-link",
        lambda m, c: tgz(
            good(m),
            (member("sub", tarfile.DIRTYPE), None),
            (member("l", tarfile.SYMTYPE, "sub"), None),
            (member(f"l/d{m}", tarfile.DIRTYPE), None),
        ),
        "not a folder",
    ),
    Upload(
        "hard-link-to-a-symlink",
        lambda m, c: tgz(
            good(m),
            (member("s", tarfile.SYMTYPE, f"good{m}"), None),
            (member(f"h{m}", tarfile.LNKTYPE, "s"), None),
        ),
        "not a file unpacked earlier",
    ),
    Upload(
        "hard-link-before-its-target",
        lambda m, c: tgz(
            (member(f"h{m}", tarfile.LNKTYPE, f"later{m}"), None), (member(f"later{m}"), b"x")
        ),
        "not a file unpacked earlier",
    ),
    Upload(
        "hard-link-to-a-folder",
        lambda m, c: tgz(
            (member(f"d{m}", tarfile.DIRTYPE), None),
            (member(f"h{m}", tarfile.LNKTYPE, f"d{m}"), None),
        ),
        "not a file unpacked earlier",
    ),
    Upload(
        "file-replacing-a-folder-of-the-same-archive",
        lambda m, c: tgz(
            (member(f"d{m}", tarfile.DIRTYPE), None),
            (member(f"d{m}/inner"), b"x"),
            (member(f"d{m}"), b"x"),
        ),
        "would replace a folder of the same archive",
    ),
    Upload(
        "kernel-state-file",
        lambda m, c: tgz(
            good(m), (member(".sandbox_kernel/state-0123456789abcdef.sh"), b"echo PWNED\n")
        ),
        "'.sandbox_kernel/state-0123456789abcdef.sh': .sandbox_kernel/ belongs to the Sandbox",
    ),
    Upload(
        "kernel-state-file-dot-slash",
        lambda m, c: tgz(good(m), (member("./.sandbox_kernel/state-a.sh"), b"echo PWNED\n")),
        ".sandbox_kernel/ belongs to the Sandbox kernel",
    ),
    Upload(
        "kernel-state-folder-as-a-link",
        lambda m, c: tgz(good(m), (member(".sandbox_kernel", tarfile.SYMTYPE, "/tmp"), None)),
        ".sandbox_kernel/ belongs to the Sandbox kernel",
    ),
    Upload(
        "kernel-display-folder",
        lambda m, c: tgz(
            good(m),
            (member(".sandbox_kernel/", tarfile.DIRTYPE), None),
            (member(".sandbox_kernel/display/0-page.html"), b"<script>alert(1)</script>"),
        ),
        ".sandbox_kernel/ belongs to the Sandbox kernel",
    ),
    Upload(
        "component-longer-than-the-file-system-allows",
        lambda m, c: tgz(good(m), (member("n" * 300 + m), b"x")),
        "File name too long",
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
    Upload(
        "control-links-climbing-within-their-depth",
        lambda m, c: tgz(
            good(m),
            (member(f"a{m}/b/up", tarfile.SYMTYPE, f"../../good{m}"), None),
            (member(f"a{m}/b/same", tarfile.SYMTYPE, "./up"), None),
        ),
        None,
    ),
    Upload(
        # 300 folders of 200 characters: a name far beyond PATH_MAX, made one component at
        # a time (and its implicit folders with it).
        "control-member-name-beyond-PATH_MAX",
        lambda m, c: tgz(good(m), (member(f"d{m}/" + ("n" * 200 + "/") * 300 + "bottom"), b"x")),
        None,
    ),
    Upload(
        "control-nested-folders-a-folder-of-its-own-name",
        lambda m, c: tgz(
            (member(f"d{m}/sandbox_kernel/.sandbox_kernel/x"), b"x"),
            (member(f"d{m}/", tarfile.DIRTYPE), None),
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


def _listing_mode(hostile: Hostile, uuid: str, name: str) -> str:
    answer = hostile.post({"commands": [f"stat -c '%a %U' {name}"], "environment": uuid})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["execution"][0]["stdout"])


@pytest.fixture(scope="module")
def linked_base(hostile: Hostile) -> str:
    """A saved environment whose links point at the host's canary and at /tmp."""
    commands = [f"ln -s {hostile.canary} out && ln -s /tmp tmplink && mkdir real && echo b > b"]
    response = hostile.post({"commands": commands, "save": True})
    assert response.status_code == 200, response.text
    uuid: str = response.json()["environment"]
    return uuid


@pytest.mark.parametrize("through", ["out", "tmplink", "out/deeper"])
def test_upload_never_writes_through_a_link_of_the_environment(
    hostile: Hostile, trial: Callable[..., None], linked_base: str, through: str
) -> None:
    """The base environment's own links are never followed by an upload: refused, 400."""

    def case(marker: str) -> None:
        archive = tgz(good(marker), (member(f"{through}/{marker}"), b"written through\n"))
        answer = hostile.execute(
            {"commands": ["ls -A"], "environment": linked_base}, marker, archive
        )
        assert answer.status == 400, answer.text
        assert "symbolic link or a file, not a folder" in answer.text
        assert not list(Path("/tmp").glob(f"*{marker}*"))

    trial(case)


def test_upload_folder_replaces_a_link_of_the_environment(
    hostile: Hostile, trial: Callable[..., None], linked_base: str
) -> None:
    """A folder entry where the base has a link replaces the link (files of the upload win);
    the link's target is left alone."""

    def case(marker: str) -> None:
        archive = tgz((member("out", tarfile.DIRTYPE), None), (member(f"out/{marker}"), b"in\n"))
        answer = hostile.execute(
            {"commands": ["test -d out && ! test -L out && cat out/*"], "environment": linked_base},
            marker,
            archive,
        )
        assert answer.entry()["stdout"] == "in"

    trial(case)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(0o6755, "755"), (0o4777, "755"), (0o2644, "644"), (0o1777, "755"), (0o666, "644")],
)
def test_upload_modes_and_owner(
    hostile: Hostile, trial: Callable[..., None], base: str, mode: int, expected: str
) -> None:
    """No set-id, sticky or world-writable bit survives; files belong to the sandbox user,
    never to root (the server unpacks as that user)."""

    def case(marker: str) -> None:
        info = member(f"f{marker}")
        info.mode = mode
        response = hostile.post({"commands": ["true"], "environment": base, "save": True},
                                tgz((info, b"#!/bin/sh\n")))  # fmt: skip
        assert response.status_code == 200, response.text
        uuid = response.json()["environment"]
        assert _listing_mode(hostile, uuid, f"f{marker}") == f"{expected} nobody"
        saved = hostile.server.data_dir / "environments" / uuid / f"f{marker}"
        assert saved.stat().st_uid != 0, "the upload was unpacked as root"

    trial(case)


# -- the same archives, unpacked by the client (downloads) -----------------------------------


@pytest.mark.parametrize("upload", UPLOADS, ids=[upload.name for upload in UPLOADS])
def test_client_extract_archive(tmp_path: Path, upload: Upload) -> None:
    """``extract_archive`` (what unpacks a download) answers like the server, and writes
    nothing outside its target: the canary beside it and the host's /tmp stay untouched."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "canary.txt").write_text("canary\n")
    target = tmp_path / "target"
    (target / "kept").mkdir(parents=True)
    marker = new_marker()
    data = upload.build(marker, canary)
    limits = ArchiveLimits(MAX_ENTRIES, MAX_ARCHIVE_BYTES)
    if upload.reason is None:
        names = extract_archive(data, target, limits)
        assert names and all(not name.startswith(("/", "..")) for name in names)
    else:
        with pytest.raises(ArchiveError) as refused:
            extract_archive(data, target, limits, reserved=(".sandbox_kernel",))
        assert upload.reason in str(refused.value)
        assert sorted(os.listdir(target)) == ["kept"], "something was left half-extracted"
    assert sorted(os.listdir(canary)) == ["canary.txt"]
    assert not list(Path("/tmp").glob(f"*{marker}*"))


def test_client_extract_never_writes_through_a_link_of_the_target(tmp_path: Path) -> None:
    """A download unpacked into a folder holding a link to elsewhere: refused, not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "docs").symlink_to(outside)
    with pytest.raises(ArchiveError, match="not a folder"):
        extract_archive(tgz((member("docs/evil"), b"x")), target)
    assert list(outside.iterdir()) == []
    assert (target / "docs").is_symlink()


#: Entries of the symlink chain (35): above the module server's cap.
CHAIN_ENTRIES = 64


@pytest.fixture(scope="module")
def roomy(
    start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    harness = make_hostile(
        start_server, tmp_path_factory, "--max-archive-entries", str(CHAIN_ENTRIES)
    )
    yield harness
    stop_and_check(harness)


@pytest.mark.parametrize("last", ["file", "hard-link", "folder"])
def test_symlink_chain_beyond_path_max_upload(
    roomy: Hostile, last: str, request: pytest.FixtureRequest
) -> None:
    """CVE-2025-4517: refused (400), nothing written into the canary."""

    def case(marker: str) -> None:
        archive = symlink_chain(marker, roomy.canary, last)
        answer = roomy.execute({"commands": ["ls -A"]}, marker, archive)
        assert answer.status == 400, answer.text[:300]
        assert "symbolic link or a file, not a folder" in answer.text

    roomy.trial(f"archives: symlink_chain_beyond_path_max[{last}]", case)


@pytest.mark.parametrize("last", ["file", "hard-link", "folder"])
def test_symlink_chain_beyond_path_max_download(tmp_path: Path, last: str) -> None:
    """The same archive unpacked by the client: refused, nothing in the canary."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "canary.txt").write_text("canary\n")
    target = tmp_path / "a" / "b" / "target"
    marker = new_marker()
    with pytest.raises(ArchiveError, match="not a folder"):
        extract_archive(symlink_chain(marker, canary, last), target, ArchiveLimits(CHAIN_ENTRIES))
    assert sorted(os.listdir(canary)) == ["canary.txt"]
    assert (canary / "canary.txt").read_text() == "canary\n"
    assert os.listdir(target) == []
