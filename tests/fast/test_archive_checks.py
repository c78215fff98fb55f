"""Environment archives (``archive.py``) in-process: what an upload may hold and what a
downloaded environment may write, on real files in a temporary folder.

Each refused archive starts with a good member and aims at a canary folder beside the target:
the answer is an :class:`ArchiveError` naming the reason, with nothing half-extracted and the
canary untouched. The same classes through the server are in ``tests/hostile/test_archives.py``
(slow tier); these are the checks themselves, several variants per class.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox_kernel.archive import (
    ArchiveError,
    ArchiveLimits,
    build_archive,
    extract_archive,
    remove_entry,
)

from ..helpers import Member, MiB, escape_chain, gzip_bomb, member, raw_header, tgz

RESERVED = (".sandbox_kernel",)

GOOD: Member = (member("good.txt"), b"good\n")


def symlink_chain(canary: Path) -> bytes:
    """CVE-2025-4517 (:func:`escape_chain`), then a file written through it, into the canary."""
    planted: Member = (member("escape/planted"), b"written outside\n")
    return tgz(GOOD, *escape_chain(canary), planted)


@dataclasses.dataclass(frozen=True)
class Refused:
    """A hostile archive (built from the canary's path) and words its refusal must hold."""

    name: str
    build: Callable[[Path], bytes]
    reason: str


REFUSED = [
    # Names that point out.
    Refused("dotdot", lambda c: tgz(GOOD, (member("../" * 8 + "x"), b"x")), "points outside"),
    Refused("dotdot-nested", lambda c: tgz(GOOD, (member("d/../../x"), b"x")), "points outside"),
    Refused("absolute", lambda c: tgz(GOOD, (member(f"{c}/planted"), b"x")), "points outside"),
    Refused(
        "absolute-dir",
        lambda c: tgz(GOOD, (member("/tmp/d", tarfile.DIRTYPE), None)),
        "points outside",
    ),
    # Symbolic links that point out, or are written through.
    Refused(
        "symlink-absolute",
        lambda c: tgz(GOOD, (member("l", tarfile.SYMTYPE, str(c)), None)),
        "absolute path",
    ),
    Refused(
        "symlink-climbs",
        lambda c: tgz(GOOD, (member("d/l", tarfile.SYMTYPE, "../.."), None)),
        "outside the destination",
    ),
    Refused(
        "symlink-dotdot-after-a-name",
        lambda c: tgz(GOOD, (member("l", tarfile.SYMTYPE, "x/../.."), None)),
        "after a name",
    ),
    Refused(
        "symlink-then-write-through",
        lambda c: tgz(
            GOOD,
            (member("d", tarfile.DIRTYPE), None),
            (member("l", tarfile.SYMTYPE, "d"), None),
            (member("l/f"), b"x"),
        ),
        "symbolic link or a file",
    ),
    Refused(
        "symlink-chain-through-links",
        lambda c: tgz(
            GOOD,
            (member("real", tarfile.DIRTYPE), None),
            (member("a", tarfile.SYMTYPE, "real"), None),
            (member("real/b", tarfile.SYMTYPE, ".."), None),
            (member("a/b/planted"), b"x"),
        ),
        "symbolic link or a file",
    ),
    Refused("symlink-chain-past-path-max", symlink_chain, "which is a symbolic link"),
    # Hard links.
    Refused(
        "hardlink-absolute",
        lambda c: tgz(GOOD, (member("h", tarfile.LNKTYPE, f"{c}/canary.txt"), None)),
        "absolute path",
    ),
    Refused(
        "hardlink-dotdot",
        lambda c: tgz(GOOD, (member("h", tarfile.LNKTYPE, "../x"), None)),
        "outside the destination",
    ),
    Refused(
        "hardlink-not-extracted",
        lambda c: tgz(GOOD, (member("h", tarfile.LNKTYPE, "later.txt"), None)),
        "not a file unpacked earlier",
    ),
    # Special files and the kernel's own folder.
    Refused("device", lambda c: tgz(GOOD, (member("dev", tarfile.CHRTYPE), None)), "device, FIFO"),
    Refused("fifo", lambda c: tgz(GOOD, (member("fifo", tarfile.FIFOTYPE), None)), "device, FIFO"),
    Refused(
        "reserved-folder",
        lambda c: tgz(GOOD, (member(".sandbox_kernel/state-x-a.sh"), b"x")),
        ".sandbox_kernel/ belongs",
    ),
    Refused(
        "reserved-link",
        lambda c: tgz(GOOD, (member("./.sandbox_kernel", tarfile.SYMTYPE, "good.txt"), None)),
        ".sandbox_kernel/ belongs",
    ),
    # Caps (see LIMITS) and broken files.
    Refused(
        "too-many-entries",
        lambda c: tgz(GOOD, *[(member(f"f{i}"), b"") for i in range(50)]),
        "more than 50 entries",
    ),
    Refused(
        "too-many-bytes",
        lambda c: tgz(GOOD, (member("big"), bytes(MiB + 1))),
        "more than 1048576 bytes",
    ),
    Refused(
        "gzip-bomb-in-a-long-name",  # tarfile would read the whole name into memory
        lambda c: gzip_bomb(
            raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 64 * MiB), 64 * MiB
        ),
        "decompresses to more than",
    ),
    Refused(
        "announced-size-over-the-cap",
        lambda c: gzip_bomb(raw_header("zeros", tarfile.REGTYPE, 64 * MiB), 64 * MiB),
        "holds more than 1048576 bytes",
    ),
    Refused("not-gzip", lambda c: b"PK\x03\x04 a zip file", "not a valid gzip file"),
    Refused("gzip-not-tar", lambda c: gzip.compress(b"just text\n" * 100), "not a valid tar.gz"),
    Refused(
        "truncated", lambda c: tgz(GOOD, (member("r"), bytes(range(256)) * 64))[:300], "not a valid"
    ),
]

#: Small caps, so that the cap cases stay small.
LIMITS = ArchiveLimits(max_entries=50, max_bytes=MiB)


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """The target (holding one file from before) and a canary folder beside it."""
    target, canary = tmp_path / "target", tmp_path / "canary"
    target.mkdir()
    canary.mkdir()
    (target / "before.txt").write_text("before\n")
    (canary / "canary.txt").write_text("canary\n")
    return target, canary


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry below ``folder``: file content, link target, or ``dir``."""
    found: dict[str, bytes | str] = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


@pytest.mark.parametrize("case", REFUSED, ids=[case.name for case in REFUSED])
def test_a_hostile_archive_is_refused_and_leaves_nothing(
    case: Refused, places: tuple[Path, Path]
) -> None:
    target, canary = places
    before, canary_before = snapshot(target), snapshot(canary)
    with pytest.raises(ArchiveError) as refused:
        extract_archive(case.build(canary), target, LIMITS, reserved=RESERVED)
    assert case.reason in str(refused.value), str(refused.value)
    assert snapshot(target) == before, "something was left half-extracted"
    assert snapshot(canary) == canary_before, "the canary outside was touched"


# -- what is accepted ---------------------------------------------------------------------------


def test_a_folder_round_trips_with_its_modes(tmp_path: Path) -> None:
    source = tmp_path / "project"
    (source / "src" / "deep").mkdir(parents=True)
    (source / "src" / "main.c").write_text("int main;\n")
    (source / "src" / "deep" / "empty.txt").write_bytes(b"")
    (source / "run.sh").write_text("#!/bin/sh\n")
    (source / "run.sh").chmod(0o750)
    (tmp_path / "notes.md").write_text("# notes\n")
    archive = build_archive([source, tmp_path / "notes.md"], reserved=RESERVED)
    names = extract_archive(archive, tmp_path / "out", reserved=RESERVED)
    assert sorted(names) == [
        "notes.md",
        "project",
        "project/run.sh",
        "project/src",
        "project/src/deep",
        "project/src/deep/empty.txt",
        "project/src/main.c",
    ]
    assert (tmp_path / "out" / "notes.md").read_text() == "# notes\n"
    assert snapshot(tmp_path / "out" / "project") == snapshot(source)
    assert stat.S_IMODE((tmp_path / "out" / "project" / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "project" / "src" / "main.c").stat().st_mode) == 0o644


def test_links_that_stay_inside_are_stored_as_links(tmp_path: Path) -> None:
    archive = tgz(
        (member("d", tarfile.DIRTYPE), None),
        (member("d/f.txt"), b"data"),
        (member("d/up", tarfile.SYMTYPE, "../d"), None),
        (member("top", tarfile.SYMTYPE, "d/f.txt"), None),
        (member("hard", tarfile.LNKTYPE, "d/f.txt"), None),
    )
    extract_archive(archive, tmp_path)
    assert os.readlink(tmp_path / "d" / "up") == "../d"
    assert os.readlink(tmp_path / "top") == "d/f.txt"
    assert os.path.samefile(tmp_path / "hard", tmp_path / "d" / "f.txt")


def test_set_id_bits_and_odd_modes_are_dropped(tmp_path: Path) -> None:
    archive = tgz(
        (member("suid", mode=0o4755), b"x"),
        (member("sgid", mode=0o2644), b"x"),
        (member("private", mode=0o600), b"x"),
        (member("sticky", tarfile.DIRTYPE, mode=0o1777), None),
    )
    extract_archive(archive, tmp_path)
    modes = {
        name: stat.S_IMODE((tmp_path / name).stat().st_mode)
        for name in ("suid", "sgid", "private", "sticky")
    }
    assert modes == {"suid": 0o755, "sgid": 0o644, "private": 0o644, "sticky": 0o755}


def test_members_replace_what_was_there_but_never_write_through_it(
    places: tuple[Path, Path],
) -> None:
    target, canary = places
    (target / "to-canary").symlink_to(canary / "canary.txt")
    (target / "folder").mkdir()
    (target / "folder" / "old.txt").write_text("old")
    archive = tgz(
        (member("to-canary"), b"replaced the link\n"),
        (member("folder"), b"a file now\n"),
        (member("before.txt"), b"new\n"),
    )
    extract_archive(archive, target)
    assert (target / "to-canary").read_text() == "replaced the link\n"
    assert not (target / "to-canary").is_symlink()
    assert (target / "folder").read_text() == "a file now\n"
    assert (target / "before.txt").read_text() == "new\n"
    assert (canary / "canary.txt").read_text() == "canary\n"


def test_a_link_already_in_the_target_is_never_written_through(places: tuple[Path, Path]) -> None:
    target, canary = places
    (target / "out").symlink_to(canary)
    for archive in (
        tgz((member("out/planted"), b"x")),
        tgz((member("out/sub", tarfile.DIRTYPE), None)),
    ):
        with pytest.raises(ArchiveError, match="symbolic link or a file"):
            extract_archive(archive, target)
    assert snapshot(canary) == {"canary.txt": b"canary\n"}


def test_a_member_may_not_replace_a_folder_of_the_same_archive(tmp_path: Path) -> None:
    archive = tgz(
        (member("d", tarfile.DIRTYPE), None), (member("d/f"), b"x"), (member("d"), b"file")
    )
    with pytest.raises(ArchiveError, match="replace a folder of the same archive"):
        extract_archive(archive, tmp_path / "t")


def test_an_archive_made_with_tar_dot_is_accepted(tmp_path: Path) -> None:
    archive = tgz(
        (member(".", tarfile.DIRTYPE), None),
        (member("./a.txt"), b"a"),
        (member("./d/", tarfile.DIRTYPE), None),
    )
    assert extract_archive(archive, tmp_path) == ["a.txt", "d"]


# -- building an upload ----------------------------------------------------------------------


def test_building_refuses_links_and_special_files(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("key")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "link").symlink_to(tmp_path / "secret")
    os.mkfifo(tmp_path / "fifo")
    for path in (folder, tmp_path / "fifo", folder / "link"):
        with pytest.raises(ArchiveError, match="not a regular file or folder"):
            build_archive([path])


@pytest.mark.parametrize("name", ["../up", "/abs", "a/../../b", "", "nul\0"])
def test_building_refuses_names_outside(tmp_path: Path, name: str) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArchiveError, match="relative name inside the environment"):
        build_archive([tmp_path / "f"], names=[name])


@pytest.mark.parametrize(
    "name", [".sandbox_kernel", ".sandbox_kernel/state-a.sh", "./.sandbox_kernel/x"]
)
def test_building_refuses_the_kernels_folder(tmp_path: Path, name: str) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArchiveError, match="belongs to the Sandbox kernel"):
        build_archive([tmp_path / "f"], names=[name], reserved=RESERVED)


def test_building_needs_one_name_per_path(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="one name per path"):
        build_archive([tmp_path / "f"], names=["a", "b"])


# -- removing ------------------------------------------------------------------------------------


def test_remove_entry_removes_deep_and_read_only_trees_without_following_links(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("kept")
    tree = tmp_path / "tree"
    tree.mkdir()
    folder = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(200):  # deeper than PATH_MAX allows to name from the top
        os.mkdir("x" * 30, dir_fd=folder)
        inner = os.open("x" * 30, os.O_RDONLY | os.O_DIRECTORY, dir_fd=folder)
        os.close(folder)
        folder = inner
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder))
    os.close(folder)
    (tree / "link").symlink_to(outside)
    locked = tree / "locked"
    locked.mkdir()
    (locked / "f").write_text("f")
    locked.chmod(0o500)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_entry(parent, "tree")
        remove_entry(parent, "missing")  # nothing there: nothing to do
    finally:
        os.close(parent)
    assert not tree.exists()
    assert (outside / "kept.txt").read_text() == "kept"
