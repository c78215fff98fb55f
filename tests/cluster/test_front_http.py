"""A cluster front's own answers, with no worker needed: the guard and caps of ``execute/``,
``specifications/`` and ``usages/`` of an empty cluster, ``files/`` and ``environments/`` from
the bucket (hostile manifests included), and the bucket's sweep (design B7, B8).

Real processes: a front (``sandbox-kernel serve --cluster``) on a real redis-server and moto;
environments are put in the bucket with the store's own ``publish``, or as raw hostile JSON.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import tarfile
import time
import urllib.parse
import uuid as uuid_module
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from sandbox_kernel import protocol
from sandbox_kernel.server.cluster import keys, manifests
from sandbox_kernel.server.cluster.objects import ObjectStore
from sandbox_kernel.server.cluster.settings import parse_redis_url
from sandbox_kernel.server.cluster.sweeper import Sweeper
from sandbox_kernel.server.settings import ServerSettings

from .processes import ClusterPlace, Front

StartFront = Callable[..., Front]


def raw_get(front: Front, path: str) -> tuple[int, bytes]:
    """GET ``path`` as written (``requests`` would resolve ``..`` before sending it)."""
    address = urllib.parse.urlsplit(front.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=30)
    try:
        connection.request("GET", "/" + path, headers=dict(front.http.headers))
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def store_of(place: ClusterPlace) -> ObjectStore:
    return ObjectStore.from_url(place.storage_url, endpoint=place.s3_url)


def published(place: ClusterPlace, tmp_path: Path, *, expire_in: float = 3600.0) -> str:
    """A real environment in the bucket (as a worker's save stores it); its uuid."""
    folder = tmp_path / f"env-{uuid_module.uuid4().hex[:8]}"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (folder / "notes.txt").write_text("kept in the bucket\n")
    (folder / "empty").write_bytes(b"")
    (folder / "to-src").symlink_to("src")
    (folder / "to-main").symlink_to("src/main.c")
    (folder / "outside").symlink_to("/etc/passwd")
    os.link(folder / "notes.txt", folder / "hard.txt")
    uuid = str(uuid_module.uuid4())
    manifests.publish(folder, uuid, None, store_of(place), expire=time.time() + expire_in)
    return uuid


# -- the guard and the caps hold at the front ------------------------------------------------------


def test_token_host_and_origin_are_checked_by_the_front(start_front: StartFront) -> None:
    front = start_front()
    config = {"files": {"config": (None, json.dumps({"commands": ["true"]}))}}
    bare = requests.post(front.url + "execute/", timeout=30, **config)  # type: ignore[arg-type]
    assert bare.status_code == 401 and "Bearer" in bare.text
    wrong = requests.post(
        front.url + "execute/",
        headers={"Authorization": "Bearer not-the-token"},
        timeout=30,
        **config,  # type: ignore[arg-type]
    )
    assert wrong.status_code == 401
    for path in ("specifications/", "usages/", "libraries/"):
        assert requests.get(front.url + path, timeout=30).status_code == 401
    host = front.http.get(front.url + "specifications/", headers={"Host": "evil.example"})
    assert host.status_code == 403 and "DNS rebinding" in host.text
    origin = front.http.get(
        front.url + "specifications/", headers={"Origin": "http://evil.example"}
    )
    assert origin.status_code == 403 and "Origin" in origin.text


def test_an_upload_over_max_upload_is_refused_by_the_front(
    start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    front = start_front("--max-upload", "10K")
    big = os.urandom(20 * 1024)
    answer = front.post_execute({"commands": ["true"]}, environment=big)
    assert answer.status_code == 413
    assert "--max-upload" in answer.text
    client = cluster_place.redis_client()
    try:  # refused before anything was queued
        assert client.zcard(keys.WAITING) == 0
        assert not client.keys("sk:upload:*")
    finally:
        client.close()


def test_a_bad_config_is_refused_by_the_front_as_by_one_server(start_front: StartFront) -> None:
    front = start_front()
    answer = front.post_execute({"commands": "not a list"})
    assert answer.status_code == 400
    nested = front.http.post(
        front.url + "execute/", files={"config": (None, "[" * 100 + "]" * 100)}, timeout=30
    )
    assert nested.status_code == 400 and "nested deeper" in nested.text


# -- an empty cluster ------------------------------------------------------------------------------


def test_an_empty_cluster_says_so_and_a_run_waits_then_gets_503(start_front: StartFront) -> None:
    front = start_front("--queue-wait", "1")
    specs = front.get("specifications/").json()
    assert specs["container"]["count"] == 0
    assert specs[protocol.CLUSTER_FIELD] == {"workers": 0, "slots": 0}
    assert protocol.EXTENSION_QUEUE in specs["extensions"]
    assert "no live worker" in specs["container"]["isolation"]["warning"]
    usages = front.get("usages/").json()
    assert usages["container"] == 0 and usages["workers"] == []
    started = time.monotonic()
    answer = front.post_execute({"commands": ["true"]})
    waited = time.monotonic() - started
    assert answer.status_code == 503
    assert answer.text == protocol.OVERLOADED_TEXT
    assert 0.9 < waited < 10, waited


def test_the_cluster_id_is_shared_by_fronts_and_survives_a_redis_restart(
    start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    first = start_front().get("specifications/").json()["server_id"]
    second = start_front().get("specifications/").json()["server_id"]
    assert first == second and len(first) == 32
    cluster_place.redis.restart()  # every key is gone; the bucket keeps the id
    third = start_front().get("specifications/").json()["server_id"]
    assert third == first


# -- files/ and environments/ from the bucket ------------------------------------------------------


def test_files_come_from_the_bucket(
    start_front: StartFront, cluster_place: ClusterPlace, tmp_path: Path
) -> None:
    uuid = published(cluster_place, tmp_path)
    front = start_front()
    assert front.get(f"files/{uuid}/notes.txt/").content == b"kept in the bucket\n"
    assert front.get(f"files/{uuid}/src/main.c/").text.startswith("int main")
    assert front.get(f"files/{uuid}/hard.txt/").content == b"kept in the bucket\n"
    assert front.get(f"files/{uuid}/./src//main.c/").status_code == 200
    empty = front.get(f"files/{uuid}/empty/")
    assert empty.status_code == 200 and empty.content == b""
    head = front.http.head(front.url + f"files/{uuid}/notes.txt/", timeout=30)
    assert head.status_code == 200 and head.headers["Content-Length"] == "19"
    assert front.get(f"files/{uuid.upper()}/notes.txt/").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "to-main",  # a symlink at the end
        "to-src/main.c",  # a symlink on the way
        "outside",  # a symlink out of the environment
        "src",  # a folder
        "missing.txt",
        "src/../notes.txt",
        "../notes.txt",
        "notes.txt/more",  # a file on the way
    ],
)
def test_files_keeps_the_rules_of_one_server(
    start_front: StartFront, cluster_place: ClusterPlace, tmp_path: Path, path: str
) -> None:
    uuid = published(cluster_place, tmp_path)
    status, body = raw_get(start_front(), f"files/{uuid}/{path}/")
    assert status == 404, body
    assert b"could not be found" in body


def test_an_environment_downloads_as_the_archive_of_its_manifest(
    start_front: StartFront, cluster_place: ClusterPlace, tmp_path: Path
) -> None:
    uuid = published(cluster_place, tmp_path)
    front = start_front()
    answer = front.get(f"environments/{uuid}/")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(answer.content)) as archive:
        members = {member.name: member for member in archive.getmembers()}
        assert archive.extractfile(members["notes.txt"]).read() == b"kept in the bucket\n"  # type: ignore[union-attr]
        assert members["to-src"].issym() and members["to-src"].linkname == "src"
        assert members["hard.txt"].islnk() or members["notes.txt"].islnk()
        assert members["src"].isdir()
        assert members["src/main.c"].uname == "student"
    again = front.get(f"environments/{uuid}/")  # from the front's cache
    assert again.content == answer.content
    missing = front.get(f"environments/{uuid_module.uuid4()}/")
    assert missing.status_code == 404 and "No environment with UUID" in missing.text


def test_an_expired_environment_is_gone(
    start_front: StartFront, cluster_place: ClusterPlace, tmp_path: Path
) -> None:
    uuid = published(cluster_place, tmp_path, expire_in=-1)
    front = start_front()
    assert front.get(f"files/{uuid}/notes.txt/").status_code == 404
    assert front.get(f"environments/{uuid}/").status_code == 404


def _hostile_manifests(uuid: str) -> dict[str, bytes]:
    digest = "0" * 64
    base = {
        "format": 1,
        "uuid": uuid,
        "created": time.time(),
        "expire": time.time() + 3600,
        "base": None,
        "bytes": 5,
        "inodes": 1,
    }

    def with_entries(*entries: list[object], **overrides: object) -> bytes:
        return json.dumps({**base, "entries": list(entries), **overrides}).encode()

    return {
        "dotdot": with_entries(["f", "../notes.txt", 420, 0, 5, digest]),
        "absolute": with_entries(["f", "/notes.txt", 420, 0, 5, digest]),
        "through a symlink": with_entries(
            ["l", "d", "/etc"], ["f", "d/notes.txt", 420, 0, 5, digest], bytes=5, inodes=2
        ),
        "huge count": with_entries(
            *[["f", f"f{i}", 420, 0, 0, digest] for i in range(200_001)], bytes=0, inodes=200_001
        ),
        "other uuid": with_entries(
            ["f", "notes.txt", 420, 0, 5, digest], uuid=str(uuid_module.uuid4())
        ),
        "not json": b"{not json",
        "wrong totals": with_entries(["f", "notes.txt", 420, 0, 5, digest], bytes=1),
        "nul": with_entries(["f", "no\u0000tes.txt", 420, 0, 5, digest]),
    }


def test_hostile_manifests_in_the_bucket_serve_nothing(
    start_front: StartFront, cluster_place: ClusterPlace
) -> None:
    store = store_of(cluster_place)
    front = start_front()
    for name in _hostile_manifests(str(uuid_module.uuid4())):
        uuid = str(uuid_module.uuid4())
        store.put_manifest(uuid, _hostile_manifests(uuid)[name])
        for path in ("notes.txt", "../notes.txt", "d/notes.txt", "f1"):
            answer = front.get(f"files/{uuid}/{path}/")
            assert answer.status_code == 404, (name, path, answer.text)
        assert front.get(f"environments/{uuid}/").status_code == 404, name
    assert front.alive()


def test_a_damaged_blob_is_never_served(
    start_front: StartFront, cluster_place: ClusterPlace, tmp_path: Path
) -> None:
    uuid = published(cluster_place, tmp_path)
    store = store_of(cluster_place)
    manifest = manifests.read_manifest(store, uuid)
    assert manifest is not None
    entry = manifest.files()["notes.txt"]
    store.put_blob(entry.digest, b"replaced content\n", 17)
    answer = start_front().get(f"files/{uuid}/notes.txt/")
    assert answer.status_code == 500 and "damaged" in answer.text
    assert b"replaced" not in answer.content


# -- the sweep -------------------------------------------------------------------------------------


def _sweeper(place: ClusterPlace, grace: float) -> Sweeper:
    settings = ServerSettings(cluster=place.redis.url, storage=place.storage_url)
    return Sweeper(
        store_of(place), parse_redis_url(place.redis.url), settings, "sweeper", grace=grace
    )


def test_the_sweep_removes_expired_environments_and_unused_blobs(
    cluster_place: ClusterPlace, tmp_path: Path
) -> None:
    kept = published(cluster_place, tmp_path)
    expired = published(cluster_place, tmp_path, expire_in=-4000)  # past the 1 h grace
    just_expired = published(cluster_place, tmp_path, expire_in=-1)
    store = store_of(cluster_place)
    store.put_blob("a" * 64, b"orphan", 6)  # no manifest names it
    sweeper = _sweeper(cluster_place, grace=3600)
    report = sweeper.sweep_locked()
    assert report.expired == 1
    assert report.blobs_deleted == 0  # within the grace: a save may be on its way
    assert store.get_manifest(expired) is None and store.get_manifest(kept) is not None
    # Expired within the grace: kept (a save over it may reuse its blobs), but unreadable.
    assert store.get_manifest(just_expired) is not None
    assert manifests.read_manifest(store, just_expired) is None
    report = _sweeper(cluster_place, grace=0).sweep_locked(now=time.time() + 1)
    assert report.blobs_deleted == 1
    assert not store.has_blob("a" * 64)
    kept_manifest = manifests.read_manifest(store, kept)
    assert kept_manifest is not None
    assert all(store.has_blob(digest) for digest in kept_manifest.digests())
    sweeper.close()


def test_the_sweep_recounts_the_quota_after_a_redis_restart(
    cluster_place: ClusterPlace, tmp_path: Path
) -> None:
    published(cluster_place, tmp_path)
    store = store_of(cluster_place)
    objects = [*store.list_blobs(), *store.list_manifests()]
    cluster_place.redis.restart()
    sweeper = _sweeper(cluster_place, grace=3600)
    assert sweeper.sweep() == 0
    client = cluster_place.redis_client()
    try:
        quota = client.hgetall(keys.QUOTA)
        assert int(quota[b"bytes"]) == sum(item.size for item in objects)
        assert int(quota[b"inodes"]) == len(objects)
        assert client.get(keys.SWEEP_LOCK) is None  # released
        client.set(keys.SWEEP_LOCK, "another-front", px=60_000)
        client.delete(keys.QUOTA)
        assert sweeper.sweep() == 0
        assert not client.exists(keys.QUOTA)  # another front holds the lock: nothing done
    finally:
        client.close()
        sweeper.close()


def test_a_damaged_manifest_is_swept_after_the_grace(cluster_place: ClusterPlace) -> None:
    store = store_of(cluster_place)
    uuid = str(uuid_module.uuid4())
    store.put_manifest(uuid, b"{damaged")
    assert _sweeper(cluster_place, grace=3600).sweep_locked().junk == 0
    assert _sweeper(cluster_place, grace=0).sweep_locked(now=time.time() + 1).junk == 1
    assert store.get_manifest(uuid) is None
