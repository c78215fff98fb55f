"""The bucket as the cluster sees it: blobs, manifests, listing, deleting, and the errors a
person running the cluster gets when the bucket is unreachable, refuses the credentials, or
does not exist (each message says what to do)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel.server.cluster.objects import (
    Location,
    ObjectStore,
    ObjectStoreError,
    blob_name,
    manifest_name,
    upload_name,
)

from ..helpers import free_port
from .conftest import MotoServer


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(moto_server: MotoServer, bucket: str) -> ObjectStore:
    return ObjectStore.from_url(f"s3://{bucket}/courses/algo", endpoint=moto_server.url)


def test_a_blob_goes_in_and_comes_back_checked(store: ObjectStore) -> None:
    data = os.urandom(300_000)
    digest = _digest(data)
    assert not store.has_blob(digest)
    store.put_blob(digest, io.BytesIO(data), len(data))
    assert store.has_blob(digest)
    into = io.BytesIO()
    assert store.get_blob(digest, into, size=len(data)) == len(data)
    assert into.getvalue() == data
    assert [item.digest for item in store.list_blobs()] == [digest]


def test_an_empty_blob(store: ObjectStore) -> None:
    digest = _digest(b"")
    store.put_blob(digest, b"", 0)
    into = io.BytesIO()
    assert store.get_blob(digest, into, size=0) == 0


@pytest.mark.parametrize(
    "stored, size",
    [
        pytest.param(b"other", None, id="other content"),
        pytest.param(b"expected!", 5, id="longer than announced"),
        pytest.param(b"exp", 8, id="shorter than announced"),
    ],
)
def test_a_blob_that_is_not_its_hash_is_refused(
    stored: bytes, size: int | None, store: ObjectStore
) -> None:
    digest = _digest(b"expected")
    store.put_blob(digest, stored, len(stored))
    with pytest.raises(ObjectStoreError) as refused:
        store.get_blob(digest, io.BytesIO(), size=size)
    assert refused.value.kind == "corrupt"
    assert blob_name(digest) in str(refused.value)


def test_manifests_are_stored_listed_and_deleted(store: ObjectStore) -> None:
    uuids = sorted(str(uuid_module.uuid4()) for _ in range(3))
    for uuid in uuids:
        store.put_manifest(uuid, b'{"format":1}')
    assert store.get_manifest(uuids[0]) == b'{"format":1}'
    assert store.get_manifest(str(uuid_module.uuid4())) is None
    assert sorted(item.uuid for item in store.list_manifests()) == uuids
    store.delete([manifest_name(uuids[0]), manifest_name(str(uuid_module.uuid4()))])
    assert store.get_manifest(uuids[0]) is None
    assert sorted(item.uuid for item in store.list_manifests()) == uuids[1:]


def test_a_manifest_larger_than_the_limit_is_not_read(store: ObjectStore) -> None:
    uuid = str(uuid_module.uuid4())
    store.put_manifest(uuid, b"x" * 2000)
    with pytest.raises(ObjectStoreError) as refused:
        store.get_manifest(uuid, limit=1000)
    assert refused.value.kind == "corrupt"


def test_an_upload_goes_in_comes_back_capped_and_goes(
    store: ObjectStore, moto_server: MotoServer, bucket: str
) -> None:
    job = uuid_module.uuid4().hex
    data = os.urandom(700_000)
    store.put_upload(job, io.BytesIO(data), len(data))
    key = f"courses/algo/uploads/{job}.tgz"
    assert moto_server.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == len(data)
    into = io.BytesIO()
    assert store.get_upload(job, into, limit=len(data)) == (len(data), _digest(data))
    assert into.getvalue() == data
    # An object longer than the job says: reading stops past the limit, never keeps it whole.
    short = io.BytesIO()
    size, _ = store.get_upload(job, short, limit=1000)
    assert size > 1000 and len(short.getvalue()) <= 1000
    store.delete_upload(job)
    store.delete_upload(job)  # already gone: fine
    with pytest.raises(ObjectStoreError) as missing:
        store.get_upload(job, io.BytesIO(), limit=10)
    assert missing.value.kind == "refused" and "upload of job" in str(missing.value)


@pytest.mark.parametrize("job", ["../envs/x", "ABC", "", "0" * 31, "0" * 32 + "/x"])
def test_upload_keys_are_only_made_of_a_job_id(job: str, store: ObjectStore) -> None:
    with pytest.raises(ObjectStoreError) as refused:
        upload_name(job)
    assert refused.value.kind == "invalid"
    with pytest.raises(ObjectStoreError):
        store.put_upload(job, io.BytesIO(b"x"), 1)


def test_prefixes_keep_clusters_apart(moto_server: MotoServer, bucket: str) -> None:
    one = ObjectStore.from_url(f"s3://{bucket}/one", endpoint=moto_server.url)
    two = ObjectStore.from_url(f"s3://{bucket}/one-two", endpoint=moto_server.url)
    uuid = str(uuid_module.uuid4())
    one.put_manifest(uuid, b"{}")
    assert two.get_manifest(uuid) is None
    assert list(two.list_manifests()) == []
    keys = [item["Key"] for item in moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"one/envs/{uuid}.json"]


def test_the_endpoint_comes_from_aws_endpoint_url(
    moto_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    store = ObjectStore.from_url(f"s3://{bucket}")
    assert store.endpoint == moto_server.url
    store.check()
    store.put_blob(_digest(b"a"), b"a", 1)
    assert store.has_blob(_digest(b"a"))


@pytest.mark.parametrize(
    "name",
    ["../escape", "0" * 63, "A" * 64, "blobs/" + "0" * 64, "0" * 64 + "/x", ""],
)
def test_keys_are_only_made_of_a_sha256(name: str, store: ObjectStore) -> None:
    with pytest.raises(ObjectStoreError) as refused:
        store.has_blob(name)
    assert refused.value.kind == "invalid"


@pytest.mark.parametrize("name", ["../../x", "not-a-uuid", "", "a" * 36])
def test_manifest_keys_are_only_made_of_a_uuid(name: str, store: ObjectStore) -> None:
    with pytest.raises(ObjectStoreError):
        store.get_manifest(name)
    with pytest.raises(ObjectStoreError):
        store.put_manifest(name, b"{}")


@pytest.mark.parametrize("name", ["cluster-id", "uploads/x.tgz", "blobs/../envs", "../x"])
def test_delete_takes_only_blobs_and_manifests(name: str, store: ObjectStore) -> None:
    with pytest.raises(ObjectStoreError) as refused:
        store.delete([name])
    assert refused.value.kind == "invalid"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("s3://bucket", Location("bucket", "")),
        ("s3://bucket/", Location("bucket", "")),
        ("s3://my.bucket-1/a/b/", Location("my.bucket-1", "a/b")),
        ("s3://bucket//a//b", Location("bucket", "a/b")),
    ],
)
def test_storage_locations(url: str, expected: Location) -> None:
    assert Location.parse(url) == expected


@pytest.mark.parametrize(
    "url",
    ["http://bucket/x", "bucket/x", "s3://", "s3://UPPER", "s3://a", "s3://b/../x", "s3://b_c/x"],
)
def test_bad_storage_locations_say_how_to_write_one(url: str) -> None:
    with pytest.raises(ObjectStoreError) as refused:
        Location.parse(url)
    assert refused.value.kind == "invalid"
    assert "--storage" in str(refused.value)


# -- what goes wrong ----------------------------------------------------------------------------


def test_an_endpoint_where_nothing_listens(bucket: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = ObjectStore.from_url(f"s3://{bucket}/p", endpoint=endpoint, attempts=1)
    empty = _digest(b"")
    for call in (store.check, lambda: store.has_blob(empty), lambda: store.put_blob(empty, b"", 0)):
        with pytest.raises(ObjectStoreError) as refused:
            call()
        assert refused.value.kind == "unreachable"
        text = str(refused.value)
        assert endpoint in text and "AWS_ENDPOINT_URL" in text and "cannot be reached" in text


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def test_an_endpoint_that_never_answers(silent_endpoint: str) -> None:
    store = ObjectStore.from_url(
        "s3://bucket/p", endpoint=silent_endpoint, attempts=1, read_timeout=0.5
    )
    started = time.monotonic()
    with pytest.raises(ObjectStoreError) as refused:
        store.get_manifest(str(uuid_module.uuid4()))
    assert time.monotonic() - started < 10
    assert refused.value.kind == "unreachable"
    assert silent_endpoint in str(refused.value)


def test_a_bucket_that_does_not_exist(moto_server: MotoServer) -> None:
    store = ObjectStore.from_url("s3://no-such-bucket-here/p", endpoint=moto_server.url)
    for call in (store.check, lambda: store.put_manifest(str(uuid_module.uuid4()), b"{}")):
        with pytest.raises(ObjectStoreError) as refused:
            call()
        assert refused.value.kind == "no-bucket"
        assert "'no-such-bucket-here' does not exist" in str(refused.value)
        assert "Create it" in str(refused.value)


@pytest.fixture(scope="module")
def strict_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoServer, str]]:
    """A moto server that checks credentials (after one free request: the bucket's)."""
    server = MotoServer(
        tmp_path_factory.mktemp("strict-moto") / "moto.log",
        {"INITIAL_NO_AUTH_ACTION_COUNT": "1"},
    )
    try:
        server.client().create_bucket(Bucket="strict-bucket")
        yield server, "strict-bucket"
    finally:
        server.stop()


def test_refused_credentials(strict_moto: tuple[MotoServer, str]) -> None:
    server, bucket = strict_moto
    store = ObjectStore.from_url(f"s3://{bucket}/p", endpoint=server.url)
    digest = _digest(b"a")
    calls = {
        "check": store.check,
        "put_blob": lambda: store.put_blob(digest, b"a", 1),
        "has_blob": lambda: store.has_blob(digest),  # a HEAD: a bare 403, no error code
        "get_manifest": lambda: store.get_manifest(str(uuid_module.uuid4())),
        "list": lambda: list(store.list_manifests()),
    }
    for name, call in calls.items():
        with pytest.raises(ObjectStoreError) as refused:
            call()
        assert refused.value.kind == "credentials", name
        assert "refused the credentials" in str(refused.value)
        assert "AWS_ACCESS_KEY_ID" in str(refused.value)


def test_no_credentials_at_all(
    moto_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = ObjectStore.from_url(f"s3://{bucket}", endpoint=moto_server.url, attempts=1)
    with pytest.raises(ObjectStoreError) as refused:
        store.check()
    assert refused.value.kind == "credentials"
    assert "no AWS credentials were found" in str(refused.value)


def test_the_single_server_never_imports_the_cluster_libraries() -> None:
    """``sandbox-kernel serve`` (every kernel starts one) must not pay about 100 ms each for
    boto3 and redis: only the modules of ``sandbox_kernel.server.cluster`` import them."""
    script = (
        "import sys, sandbox_kernel.server, sandbox_kernel.server.cluster, sandbox_kernel.cli\n"
        "heavy = {'boto3', 'botocore', 'redis', 'celery', 'kombu', 'moto'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
