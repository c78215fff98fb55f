"""Environments through the bucket: saved by the real Storage, published, materialised.

Round trips compare everything a user sees in the tree (kinds, modes, mtimes, contents, link
targets, hard links); saves count the requests on the wire; hostile manifests are written
straight into the bucket, as anyone who can write there could, and must be refused with
nothing written outside the target (nor the target itself).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox_kernel.server.cluster.manifests import (
    File,
    Limits,
    Manifest,
    ManifestError,
    materialise,
    publish,
    read_manifest,
)
from sandbox_kernel.server.cluster.objects import ObjectStore, ObjectStoreError

from .conftest import CountingProxy, MotoServer
from .environments import LocalStorage, describe, fill_environment

UUID = "0f6b1a0e-3b1c-4a57-9d0e-2c5f7d1e9a01"


@pytest.fixture
def store(moto_server: MotoServer, bucket: str) -> ObjectStore:
    return ObjectStore.from_url(f"s3://{bucket}/class-a", endpoint=moto_server.url)


@pytest.fixture
def counted(counting_proxy: CountingProxy, bucket: str) -> ObjectStore:
    """The same bucket, through the counting proxy."""
    return ObjectStore.from_url(f"s3://{bucket}/class-a", endpoint=counting_proxy.url)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalStorage]:
    storage = LocalStorage(tmp_path / "worker-a")
    yield storage
    storage.close()


@pytest.fixture
def other_worker(tmp_path: Path) -> Iterator[LocalStorage]:
    storage = LocalStorage(tmp_path / "worker-b")
    yield storage
    storage.close()


def _change(workdir: Path) -> None:
    """A carried cell: one file appended to, one file created."""
    with open(workdir / "src" / "main.c", "a") as main:
        main.write("/* edited */\n")
    (workdir / "notes.txt").write_text("new\n")


# -- round trips -----------------------------------------------------------------------------------


def test_a_saved_environment_comes_back_whole_on_another_worker(
    store: ObjectStore, local: LocalStorage, other_worker: LocalStorage
) -> None:
    uuid, expire, saved = local.save_new(fill_environment)
    published = publish(saved, uuid, None, store, expire=expire)
    assert published.manifest.expire == expire

    manifest = read_manifest(store, uuid)
    assert manifest is not None
    target = other_worker.storage.environments / uuid
    materialise(manifest, store, target, other_worker.storage.root / "blobs")

    assert describe(target) == describe(saved)
    assert other_worker.adopt(uuid, manifest.expire) == target
    assert (target / "big.bin").stat().st_size == 1024 * 1024
    assert os.readlink(target / "outside") == "/etc/passwd"
    assert (target / "hard-link.c").stat().st_ino == (target / "src" / "main.c").stat().st_ino
    # Same content, not a hard link: it stays a file of its own.
    assert (target / "same-as-main.c").stat().st_ino != (target / "src" / "main.c").stat().st_ino
    # No staging folder left beside it; only its description, written by adopt.
    assert sorted(os.listdir(target.parent)) == [uuid, f"{uuid}.json"]


def test_a_materialised_environment_is_a_base_like_any_other(
    store: ObjectStore, local: LocalStorage, other_worker: LocalStorage
) -> None:
    """Worker B runs the session's next cell over what it downloaded, and publishes it:
    only the changed files are read and stored."""
    uuid, expire, saved = local.save_new(fill_environment)
    first = publish(saved, uuid, None, store, expire=expire).manifest
    base = other_worker.storage.environments / uuid
    materialise(first, store, base, other_worker.storage.root / "blobs")
    other_worker.adopt(uuid, expire)

    uuid2, expire2, saved2 = other_worker.save_from(base, _change)
    second = publish(saved2, uuid2, first, store, expire=expire2, base_directory=base)
    assert (second.hashed, second.uploaded) == (2, 2)

    again = local.storage.environments / uuid2
    materialise(second.manifest, store, again, local.storage.root / "blobs")
    assert describe(again) == describe(saved2)
    assert (again / "notes.txt").read_text() == "new\n"


def test_a_second_save_uploads_only_the_changed_blobs(
    counted: ObjectStore, counting_proxy: CountingProxy, local: LocalStorage
) -> None:
    uuid, expire, saved = local.save_new(fill_environment)
    first = publish(saved, uuid, None, counted, expire=expire)
    files = len({e.digest for e in first.manifest.entries if isinstance(e, File)})
    assert counting_proxy.count("PUT blob") == first.uploaded == files
    assert counting_proxy.count("PUT manifest") == 1

    counting_proxy.reset()
    uuid2, expire2, saved2 = local.save_from(saved, _change)
    second = publish(saved2, uuid2, first.manifest, counted, expire=expire2, base_directory=saved)
    assert second.hashed == 2  # main.c and notes.txt: every other file kept its sha256 unread
    assert counting_proxy.count("PUT blob") == 2
    assert counting_proxy.count("HEAD blob") == 0  # small contents are put without a HEAD
    assert counting_proxy.count("PUT manifest") == 1
    assert sum(counting_proxy.counts.values()) == 3

    counting_proxy.reset()
    uuid3, expire3, saved3 = local.save_from(saved2, lambda workdir: None)  # `true`
    third = publish(saved3, uuid3, second.manifest, counted, expire=expire3, base_directory=saved2)
    assert (third.hashed, third.uploaded) == (0, 0)
    assert dict(counting_proxy.counts) == {"PUT manifest": 1}


def test_content_another_environment_stored_is_not_uploaded_again(
    counted: ObjectStore, counting_proxy: CountingProxy, local: LocalStorage
) -> None:
    """Two students save the same course file: the second finds the blob by HEAD."""
    course = os.urandom(200_000)
    uuid, expire, saved = local.save_new(lambda w: (w / "course.csv").write_bytes(course))
    publish(saved, uuid, None, counted, expire=expire)
    counting_proxy.reset()
    uuid2, expire2, saved2 = local.save_new(lambda w: (w / "data.csv").write_bytes(course))
    second = publish(saved2, uuid2, None, counted, expire=expire2)
    assert (second.uploaded, second.present) == (0, 1)
    assert counting_proxy.count("PUT blob") == 0
    assert counting_proxy.count("HEAD blob") == 1


def test_a_second_environment_downloads_only_what_the_cache_lacks(
    counted: ObjectStore,
    counting_proxy: CountingProxy,
    local: LocalStorage,
    other_worker: LocalStorage,
) -> None:
    uuid, expire, saved = local.save_new(fill_environment)
    first = publish(saved, uuid, None, counted, expire=expire).manifest
    uuid2, expire2, saved2 = local.save_from(saved, _change)
    second = publish(saved2, uuid2, first, counted, expire=expire2, base_directory=saved).manifest

    cache = other_worker.storage.root / "blobs"
    counting_proxy.reset()
    one = other_worker.storage.environments / uuid
    assert materialise(first, counted, one, cache) == len(first.digests())
    assert counting_proxy.count("GET blob") == len(first.digests())
    counting_proxy.reset()
    two = other_worker.storage.environments / uuid2
    assert materialise(second, counted, two, cache) == 2
    assert counting_proxy.count("GET blob") == 2
    # Unchanged files are the same inode in both (stored once, like a local save).
    assert (one / "big.bin").stat().st_ino == (two / "big.bin").stat().st_ino
    assert describe(two) == describe(saved2)


def test_an_expired_manifest_is_absent(store: ObjectStore, local: LocalStorage) -> None:
    uuid, _, saved = local.save_new(lambda w: (w / "f").write_text("x"))
    publish(saved, uuid, None, store, expire=time.time() - 1)
    assert store.get_manifest(uuid) is not None
    assert read_manifest(store, uuid) is None
    assert read_manifest(store, UUID) is None  # never stored


# -- hostile manifests -----------------------------------------------------------------------------

DIGEST_X = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"  # sha256(b"x")


def _document(entries: list[list[object]], **changes: object) -> dict[str, object]:
    files = [entry for entry in entries if entry[0] == "f"]
    document: dict[str, object] = {
        "format": 1,
        "uuid": UUID,
        "created": time.time(),
        "expire": time.time() + 3600,
        "base": None,
        "bytes": sum(int(entry[4]) for entry in files),  # type: ignore[call-overload]
        "inodes": sum(1 for entry in entries if entry[0] != "h"),
        "entries": entries,
    }
    document.update(changes)
    return document


def _f(path: str) -> list[object]:
    return ["f", path, 0o644, 0, 1, DIGEST_X]


HOSTILE: dict[str, dict[str, object]] = {
    "dot-dot": _document([_f("../escaped")]),
    "dot-dot inside": _document([["d", "a", 0o755, 0], _f("a/../../escaped")]),
    "absolute": _document([_f("/tmp/escaped")]),
    "absolute folder": _document([["d", "/tmp/escaped-dir", 0o755, 0]]),
    "NUL": _document([_f("a\0b")]),
    "empty component": _document([["d", "a", 0o755, 0], _f("a//b")]),
    "dot": _document([_f("./escaped")]),
    "through a symlink": _document([["l", "evil", "/"], _f("evil/escaped")]),
    "folder through a symlink": _document([["l", "evil", ".."], ["d", "evil/x", 0o755, 0]]),
    "through a file": _document([_f("a"), _f("a/b")]),
    "folder not listed": _document([_f("nowhere/b")]),
    "folder left earlier": _document([["d", "a", 0o755, 0], ["d", "b", 0o755, 0], _f("a/late")]),
    "twice": _document([_f("a"), _f("a")]),
    "file over a folder": _document([["d", "a", 0o755, 0], _f("a")]),
    "hard link to nothing": _document([["h", "a", "missing"]]),
    "hard link to a later file": _document([["h", "a", "b"], _f("b")]),
    "hard link to a symlink": _document([["l", "s", "/etc/passwd"], ["h", "a", "s"]]),
    "hard link out": _document([["h", "a", "../../etc/passwd"]]),
    "too many entries": _document([_f(f"n{index}") for index in range(101)]),
    "too many bytes": _document([["f", "big", 0o644, 0, 2000, DIGEST_X]]),
    "counts lie": _document([_f("a")], bytes=0),
    "bad digest": _document([["f", "a", 0o644, 0, 1, "../../" + "0" * 58]]),
    "negative size": _document([["f", "a", 0o644, 0, -1, DIGEST_X]], bytes=-1),
    "mode not a mode": _document([["f", "a", 0o77777, 0, 1, DIGEST_X]]),
    "unknown kind": _document([["c", "dev", 1, 1]]),
    "wrong shape": _document([["f", "a", "0644", 0, 1, DIGEST_X]]),
    "empty link target": _document([["l", "a", ""]]),
    "other uuid": _document([_f("a")], uuid="11111111-2222-4333-8444-555555555555"),
    "future format": _document([_f("a")], format=2),
}
LIMITS = Limits(entries=100, bytes=1000)
#: Cases about the document, not its entries: only the parser sees them.
DOCUMENT_LEVEL = frozenset({"counts lie", "other uuid", "future format"})


@pytest.fixture
def outside(tmp_path: Path) -> Callable[[], list[str]]:
    """A folder beside the target that nothing may touch; returns what it holds."""
    sentinel = tmp_path / "tmp"
    sentinel.mkdir()
    (sentinel / "sentinel").write_text("untouched")
    return lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_manifest_is_refused_before_anything_is_written(
    case: str, store: ObjectStore, tmp_path: Path, outside: Callable[[], list[str]]
) -> None:
    store.put_blob(DIGEST_X, b"x", 1)
    data = json.dumps(HOSTILE[case]).encode()
    store.client.put_object(
        Bucket=store.location.bucket, Key=f"class-a/envs/{UUID}.json", Body=data
    )
    before = outside()
    with pytest.raises(ManifestError) as refused:
        read_manifest(store, UUID, LIMITS)
    assert str(refused.value).startswith("the manifest")
    if case not in DOCUMENT_LEVEL:
        # Built in code, materialise refuses it as well (the check is not only the parser's).
        with pytest.raises(ManifestError):
            unchecked = _unchecked(HOSTILE[case])
            materialise(unchecked, store, tmp_path / "env", tmp_path / "blobs", limits=LIMITS)
    assert outside() == before
    assert not (tmp_path / "env").exists()


def _unchecked(document: dict[str, object]) -> Manifest:
    """The manifest as code could build it, with no check (hostile data past the parser)."""
    from sandbox_kernel.server.cluster.manifests import _entry_from_list

    entries = []
    for item in document["entries"]:  # type: ignore[attr-defined]
        try:
            entries.append(_entry_from_list(item))
        except ManifestError:
            entries.append(File("\0unparsable", 0, 0, 0, "0" * 64))
    return Manifest(UUID, 0.0, 0.0, None, tuple(entries))


@pytest.mark.parametrize(
    "stored, size",
    [
        pytest.param(b"y", 1, id="same size, other content"),
        pytest.param(b"xx", 1, id="longer"),
        pytest.param(b"", 1, id="shorter"),
    ],
)
def test_a_blob_whose_content_is_not_its_hash_is_refused(
    stored: bytes, size: int, store: ObjectStore, tmp_path: Path
) -> None:
    store.put_blob(DIGEST_X, stored, len(stored))  # replaced in the bucket behind our back
    entries: list[list[object]] = [["d", "src", 0o755, 0], ["f", "src/a", 0o644, 0, size, DIGEST_X]]
    manifest = Manifest.parse(json.dumps(_document(entries)).encode())
    with pytest.raises(ObjectStoreError) as refused:
        materialise(manifest, store, tmp_path / "env", tmp_path / "blobs")
    assert refused.value.kind == "corrupt"
    assert "delete the object" in str(refused.value)
    assert not (tmp_path / "env").exists()
    assert os.listdir(tmp_path / "blobs") == []  # nothing cached, not even a partial file
    assert sorted(os.listdir(tmp_path)) == ["blobs"]


def test_a_deep_tree_past_path_max_round_trips(
    store: ObjectStore, local: LocalStorage, tmp_path: Path
) -> None:
    def deep(workdir: Path) -> None:
        current = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        for level in range(400):  # 400 x 100 characters
            name = f"{level:03d}" + "d" * 97
            os.mkdir(name, dir_fd=current)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = below
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=current))
        os.close(current)

    uuid, expire, saved = local.save_new(deep)
    manifest = publish(saved, uuid, None, store, expire=expire).manifest
    assert len(manifest.entries) == 401
    materialise(manifest, store, tmp_path / "env", tmp_path / "blobs")
    assert describe(tmp_path / "env") == describe(saved)
