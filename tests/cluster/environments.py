"""Real environment directories for the store's tests, and what a user would compare in them."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from sandbox_kernel.server import trees
from sandbox_kernel.server.settings import ServerSettings
from sandbox_kernel.server.storage import Snapshot, Storage

T0 = 1_700_000_000_123_456_789  # an mtime in ns, with its nanoseconds


def fill_environment(root: Path) -> None:
    """Files, folders, symlinks, hard links, modes, mtimes, an empty file, a 1 MiB file,
    a name that is not UTF-8, long names past PATH_MAX, and the kernel's state folder."""
    (root / "src").mkdir()
    (root / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (root / "src" / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "src" / "run.sh", 0o755)
    (root / "private.txt").write_text("mine\n")
    os.chmod(root / "private.txt", 0o600)
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(1024 * 1024))
    (root / "same-as-main.c").write_bytes((root / "src" / "main.c").read_bytes())
    os.link(root / "src" / "main.c", root / "hard-link.c")
    (root / "latest").symlink_to("src/main.c")
    (root / "outside").symlink_to("/etc/passwd")  # a link may point anywhere; never followed
    (root / "dangling").symlink_to("../../nowhere")
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name\n")
    deep = root / "deep"
    deep.mkdir()
    _long_chain(deep, levels=25)  # 25 x 200 characters: past PATH_MAX (4096)
    state = root / ".sandbox_kernel"
    state.mkdir()
    (state / "state.sh").write_text("export X=1\n")
    (root / "readonly").mkdir()
    (root / "readonly" / "kept").write_text("kept\n")
    for index, path in enumerate(sorted(_all_files(root))):
        os.utime(path, ns=(T0 + index, T0 + index * 1_000_001), follow_symlinks=False)
    os.chmod(root / "readonly", 0o555)
    for index, path in enumerate(sorted(_all_folders(root), reverse=True)):
        os.utime(path, ns=(T0, T0 - index * 7))


def _long_chain(folder: Path, levels: int) -> None:
    current = os.open(folder, trees.FOLDER_FLAGS)
    try:
        for level in range(levels):
            name = f"{level:03d}" + "x" * 197
            os.mkdir(name, dir_fd=current)
            below = os.open(name, trees.FOLDER_FLAGS, dir_fd=current)
            os.close(current)
            current = below
        fd = os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=current)
        os.write(fd, b"at the bottom\n")
        os.close(fd)
    finally:
        os.close(current)


def _all_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, files in os.walk(root) for f in files if len(d) < 3000]


def _all_folders(root: Path) -> list[Path]:
    found = [Path(d) for d, _, _ in os.walk(root) if len(d) < 3000]
    return [path for path in found if path != root]


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    """What a user compares between two trees, by path: kind, mode, mtime, size, content,
    link target, and which paths share an inode (hard links)."""
    described: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    folder = trees.open_folder(root)
    try:
        for entry in trees.walk(folder):
            info = entry.info
            assert info is not None
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISDIR(info.st_mode):
                described[entry.relative] = ("d", mode | 0o700, info.st_mtime_ns)
            elif stat.S_ISLNK(info.st_mode):
                target = os.readlink(entry.name, dir_fd=entry.folder)
                described[entry.relative] = ("l", target)
            else:
                fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=entry.folder)
                with os.fdopen(fd, "rb") as data:
                    digest = hashlib.sha256(data.read()).hexdigest()
                described[entry.relative] = ("f", mode, info.st_mtime_ns, info.st_size, digest)
                inodes.setdefault(info.st_ino, []).append(entry.relative)
    finally:
        os.close(folder)
    for paths in inodes.values():
        for path in paths:
            described[path] = (*described[path], tuple(sorted(paths)))
    return described


class LocalStorage:
    """The real :class:`Storage` of one data dir, saving runs as the server does."""

    def __init__(self, root: Path) -> None:
        self.storage = Storage(ServerSettings(), root)
        self.storage.open(os.geteuid())

    def save_new(self, fill: object) -> tuple[str, float, Path]:
        """Save a run that starts empty; ``fill(workdir)`` is its command."""
        workdir = self.storage.new_staging() / "work"
        workdir.mkdir()
        fill(workdir)  # type: ignore[operator]
        uuid, expire = self.storage.save(workdir, Snapshot())
        directory = self.storage.directory(uuid)
        assert directory is not None
        return uuid, expire, directory

    def save_from(self, base: Path, change: object) -> tuple[str, float, Path]:
        """Save a run over the saved environment ``base``: a copy, then ``change(workdir)``,
        then the save, which links every unchanged file to the base's."""
        workdir = self.storage.new_staging() / "work"
        workdir.mkdir()
        snapshot = self.storage.populate(base, workdir, os.getuid(), os.getgid())
        change(workdir)  # type: ignore[operator]
        uuid, expire = self.storage.save(workdir, snapshot)
        directory = self.storage.directory(uuid)
        assert directory is not None
        return uuid, expire, directory

    def adopt(self, uuid: str, expire: float) -> Path:
        """Describe an environment materialised into ``environments/<uuid>``."""
        (self.storage.environments / f"{uuid}.json").write_text(f'{{"expire": {expire}}}')
        directory = self.storage.directory(uuid)
        assert directory is not None
        return directory

    def close(self) -> None:
        self.storage.close()
