"""The cluster's bucket: file contents by sha256, and immutable environment manifests.

Layout under ``s3://BUCKET/PREFIX`` (design B5)::

    PREFIX/blobs/<sha256 hex>   the content of a file, immutable
    PREFIX/envs/<uuid>.json     an environment's manifest (:mod:`.manifests`), immutable
    PREFIX/uploads/<job>.tgz    a request's archive above the inline size: written by the
                                front, read and deleted by the worker (:func:`upload_name`)

Keys are only ever made from a sha256 in hex, a uuid or a job id, checked here: no caller can
make a key that escapes its folder of the bucket. Nothing rewrites a key: a blob's key is its
content, and a manifest's key is a fresh uuid4.

The client is boto3, called from threads (the server's storage code already runs in
``asyncio.to_thread``), configured for every S3 implementation a cluster may use: path-style
addresses, and checksums only where the API requires them (``when_required``), since MinIO,
Ceph RGW and Garage refuse botocore's default checksum trailers (design A4). One client is
shared by all threads (botocore clients are thread-safe); its connection pool is sized for the
8 transfer threads of :mod:`.manifests` plus a few callers.

Every failure is an :class:`ObjectStoreError` whose message says what happened and what to do,
and whose ``kind`` lets callers answer (a corrupt blob is not an unreachable bucket).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, Literal

import boto3
import botocore.config
import botocore.exceptions

from ...protocol import is_uuid
from .keys import job_id

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

#: Bytes read from a body per call (as the server's ``_send_file`` reads files).
CHUNK = 256 * 1024
#: A manifest larger than this is refused unread (20,000 entries take about 3 MB).
MAX_MANIFEST_BYTES = 64 * 1024**2
#: Objects per DeleteObjects request (the S3 API's limit).
_DELETE_BATCH = 1000
#: Connections kept per client: 8 transfer threads, the caller, and some slack.
POOL_CONNECTIONS = 16

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")

ErrorKind = Literal["unreachable", "credentials", "no-bucket", "corrupt", "refused", "invalid"]

_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "403",
    }
)


class ObjectStoreError(Exception):
    """The bucket could not do what was asked; the message says why and what to do.

    ``kind``: ``unreachable`` (no answer from the endpoint), ``credentials`` (missing or
    refused), ``no-bucket``, ``corrupt`` (an object whose content is not what its key says),
    ``refused`` (any other error answer), ``invalid`` (a bad location or key, before any
    request)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a cluster keeps its objects: ``s3://BUCKET/PREFIX``."""

    bucket: str
    prefix: str  # without slashes at either end; may be empty

    @classmethod
    def parse(cls, url: str) -> Location:
        """``s3://BUCKET[/PREFIX]`` (``--storage``); refuses anything else, saying why."""
        if not url.startswith("s3://"):
            raise ObjectStoreError(
                "invalid",
                f"--storage {url!r} is not an S3 location: write s3://BUCKET/PREFIX (the "
                "endpoint is given apart, with --s3-endpoint or AWS_ENDPOINT_URL)",
            )
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise ObjectStoreError(
                "invalid",
                f"--storage {url!r}: {bucket!r} is not a valid bucket name (3 to 63 lower-case "
                "letters, digits, dots and dashes)",
            )
        parts = [part for part in prefix.split("/") if part]
        if any(part in (".", "..") for part in parts) or "\0" in prefix:
            raise ObjectStoreError(
                "invalid", f"--storage {url!r}: the prefix may not hold '.', '..' or NUL"
            )
        return cls(bucket, "/".join(parts))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """One listed object: its name under the prefix (``envs/<uuid>.json``), size, date."""

    name: str
    size: int
    modified: datetime

    @property
    def uuid(self) -> str:
        """The environment's uuid, for a manifest."""
        return self.name.removeprefix("envs/").removesuffix(".json")

    @property
    def digest(self) -> str:
        """The sha256, for a blob."""
        return self.name.removeprefix("blobs/")


def blob_name(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise ObjectStoreError("invalid", f"{digest!r} is not a sha256 in lower-case hex")
    return f"blobs/{digest}"


def manifest_name(uuid: str) -> str:
    if not is_uuid(uuid):
        raise ObjectStoreError("invalid", f"{uuid!r} is not an environment uuid")
    return f"envs/{uuid.lower()}.json"


def upload_name(job: str) -> str:
    """``uploads/<job>.tgz``: where an archive above the inline size waits in the bucket
    (the front writes it, the worker that claimed the job reads and deletes it)."""
    try:
        return f"uploads/{job_id(job)}.tgz"
    except ValueError as error:
        raise ObjectStoreError("invalid", str(error)) from None


def endpoint_from_environment() -> str | None:
    """The endpoint botocore would use for S3 from the usual variables, if one is set."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class ObjectStore:
    """Blobs and manifests in one bucket under one prefix. Blocking: call from threads."""

    def __init__(
        self,
        location: Location,
        *,
        endpoint: str | None = None,
        attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        """``endpoint``: ``--s3-endpoint``; else ``AWS_ENDPOINT_URL`` (AWS itself when neither
        is set). Credentials and region come from the usual AWS variables and files; the
        region defaults to ``us-east-1``, which every S3 implementation accepts."""
        self.location = location
        self.endpoint = endpoint or endpoint_from_environment()
        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            max_pool_connections=POOL_CONNECTIONS,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=region or "us-east-1",
            config=config,
        )

    @classmethod
    def from_url(cls, url: str, *, endpoint: str | None = None, **options: Any) -> ObjectStore:
        """The store of ``--storage s3://BUCKET/PREFIX`` (and ``--s3-endpoint``)."""
        return cls(Location.parse(url), endpoint=endpoint, **options)

    @property
    def where(self) -> str:
        """The location and endpoint, as error messages show them."""
        return f"{self.location} at {self.endpoint or 'the AWS endpoint'}"

    # -- the bucket -------------------------------------------------------------------------------

    def check(self) -> None:
        """Make one request that needs the bucket and the credentials (at start-up: a
        misconfigured cluster says so at once, not at the first save)."""
        with self._translated("reach"):
            self.client.list_objects_v2(
                Bucket=self.location.bucket, Prefix=self.location.key("envs/"), MaxKeys=1
            )

    # -- blobs ------------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        key = self.location.key(blob_name(digest))
        with self._translated(f"look for blob {digest[:12]}"):
            try:
                self.client.head_object(Bucket=self.location.bucket, Key=key)
            except botocore.exceptions.ClientError as error:
                if _status(error) == 404:
                    return False
                raise
        return True

    def put_blob(self, digest: str, body: IO[bytes] | bytes, size: int) -> None:
        """Store ``size`` bytes of ``body`` as the blob ``digest``. The caller hashed them:
        environments are immutable, so what is read here is what was hashed."""
        key = self.location.key(blob_name(digest))
        with self._translated(f"store blob {digest[:12]}"):
            self.client.put_object(
                Bucket=self.location.bucket, Key=key, Body=body, ContentLength=size
            )

    def get_blob(self, digest: str, into: IO[bytes], *, size: int | None = None) -> int:
        """Write the blob ``digest`` into ``into``, checking its sha256 (and ``size`` when
        known: a longer body is cut short, never written whole). Returns the bytes written.

        On a mismatch the caller must discard what was written (``kind`` ``corrupt``)."""
        key = self.location.key(blob_name(digest))
        hasher = hashlib.sha256()
        written = 0
        with self._translated(f"fetch blob {digest[:12]}"):
            answer = self.client.get_object(Bucket=self.location.bucket, Key=key)
            body = answer["Body"]
            try:
                for chunk in body.iter_chunks(CHUNK):
                    written += len(chunk)
                    if size is not None and written > size:
                        raise self._corrupt(digest, f"is longer than the {size} bytes expected")
                    hasher.update(chunk)
                    into.write(chunk)
            finally:
                body.close()
        if size is not None and written != size:
            raise self._corrupt(digest, f"holds {written} bytes, not the {size} expected")
        if hasher.hexdigest() != digest:
            raise self._corrupt(digest, f"has the sha256 {hasher.hexdigest()}")
        return written

    def _corrupt(self, digest: str, what: str) -> ObjectStoreError:
        return ObjectStoreError(
            "corrupt",
            f"the blob {blob_name(digest)} of {self.where} {what}: the bucket's copy is "
            "damaged or was replaced. Nothing was taken from it; delete the object so that the "
            "next save stores it again, and check what else writes to the bucket",
        )

    def list_blobs(self) -> Iterator[StoredObject]:
        return self._list("blobs/")

    # -- manifests --------------------------------------------------------------------------------

    def put_manifest(self, uuid: str, data: bytes) -> None:
        key = self.location.key(manifest_name(uuid))
        with self._translated(f"store the manifest of {uuid}"):
            self.client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=data,
                ContentLength=len(data),
                ContentType="application/json",
            )

    def get_manifest(self, uuid: str, *, limit: int = MAX_MANIFEST_BYTES) -> bytes | None:
        """The manifest's bytes, or None if the bucket has none under that uuid."""
        key = self.location.key(manifest_name(uuid))
        with self._translated(f"fetch the manifest of {uuid}"):
            try:
                answer = self.client.get_object(Bucket=self.location.bucket, Key=key)
            except botocore.exceptions.ClientError as error:
                if _code(error) == "NoSuchKey":
                    return None
                raise
            if answer.get("ContentLength", 0) > limit:
                answer["Body"].close()
                raise ObjectStoreError(
                    "corrupt",
                    f"the manifest {key} of {self.where} holds {answer['ContentLength']} bytes, "
                    f"more than the {limit} a manifest may: it was not read. Delete it if it "
                    "is not this cluster's",
                )
            body = answer["Body"]
            try:
                return bytes(body.read(limit + 1))[:limit]
            finally:
                body.close()

    def list_manifests(self) -> Iterator[StoredObject]:
        """Every stored manifest (its uuid, size and date), whatever its expiry."""
        return (item for item in self._list("envs/") if is_uuid(item.uuid))

    # -- uploads ----------------------------------------------------------------------------------

    def put_upload(self, job: str, body: IO[bytes], size: int) -> None:
        """Store ``size`` bytes of ``body`` as the archive of ``job`` (:func:`upload_name`)."""
        key = self.location.key(upload_name(job))
        with self._translated(f"store the upload of job {job}"):
            self.client.put_object(
                Bucket=self.location.bucket, Key=key, Body=body, ContentLength=size
            )

    def get_upload(self, job: str, into: IO[bytes], *, limit: int) -> tuple[int, str]:
        """Write the archive of ``job`` into ``into``, never more than ``limit`` bytes; the
        bytes the object holds (up to ``limit + 1``: more means it is not the one the job
        names) and the sha256 of what was written. The caller checks both against the job."""
        key = self.location.key(upload_name(job))
        hasher, size = hashlib.sha256(), 0
        with self._translated(f"fetch the upload of job {job}"):
            answer = self.client.get_object(Bucket=self.location.bucket, Key=key)
            body = answer["Body"]
            try:
                for chunk in body.iter_chunks(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        break
                    hasher.update(chunk)
                    into.write(chunk)
            finally:
                body.close()
        return size, hasher.hexdigest()

    def delete_upload(self, job: str) -> None:
        """Delete the archive of ``job`` (one already gone is fine)."""
        key = self.location.key(upload_name(job))
        with self._translated(f"delete the upload of job {job}"):
            self.client.delete_object(Bucket=self.location.bucket, Key=key)

    # -- deleting ---------------------------------------------------------------------------------

    def delete(self, names: Iterable[str]) -> None:
        """Delete objects by their name under the prefix (:func:`blob_name`,
        :func:`manifest_name`); names already gone are fine."""
        batch: list[str] = []
        for name in names:
            if not (name.startswith("blobs/") or name.startswith("envs/")) or ".." in name:
                raise ObjectStoreError("invalid", f"{name!r} is not a blob or manifest name")
            batch.append(self.location.key(name))
            if len(batch) == _DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        with self._translated(f"delete {len(keys)} objects"):
            answer = self.client.delete_objects(
                Bucket=self.location.bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        errors = answer.get("Errors") or []
        if errors:
            first = errors[0]
            raise ObjectStoreError(
                "refused",
                f"{self.where} refused to delete {len(errors)} of {len(keys)} objects (first: "
                f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}); check that "
                "the credentials may delete objects",
            )

    # -- helpers ----------------------------------------------------------------------------------

    def _list(self, folder: str) -> Iterator[StoredObject]:
        start = self.location.key(folder)
        paginator = self.client.get_paginator("list_objects_v2")
        with self._translated(f"list {folder}"):
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    name = folder + item["Key"].removeprefix(start)
                    yield StoredObject(name, item["Size"], item["LastModified"])

    def _translated(self, doing: str) -> _Translated:
        return _Translated(self, doing)


class _Translated:
    """Turns botocore's exceptions into :class:`ObjectStoreError` with a useful text."""

    def __init__(self, store: ObjectStore, doing: str) -> None:
        self.store = store
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        if error is None or isinstance(error, ObjectStoreError):
            return
        if isinstance(error, botocore.exceptions.ClientError):
            raise self._answered(error) from error
        if isinstance(error, botocore.exceptions.NoCredentialsError | _PartialCredentials):
            raise ObjectStoreError(
                "credentials",
                f"could not {self.doing} in {self.store.where}: no AWS credentials were found. "
                "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the "
                "cluster's processes",
            ) from error
        if isinstance(error, botocore.exceptions.BotoCoreError):
            raise ObjectStoreError(
                "unreachable",
                f"could not {self.doing}: {self.store.where} cannot be reached ({error}). Check "
                "that the storage server runs, and that --s3-endpoint or AWS_ENDPOINT_URL "
                "names it (scheme, host and port)",
            ) from error

    def _answered(self, error: botocore.exceptions.ClientError) -> ObjectStoreError:
        code, store = _code(error), self.store
        message = error.response.get("Error", {}).get("Message") or ""
        if code == "NoSuchBucket":
            return ObjectStoreError(
                "no-bucket",
                f"could not {self.doing}: the bucket {store.location.bucket!r} does not exist "
                f"at {store.endpoint or 'the AWS endpoint'}. Create it, or correct the bucket "
                "in --storage s3://BUCKET/PREFIX",
            )
        if code in _CREDENTIAL_CODES:
            return ObjectStoreError(
                "credentials",
                f"could not {self.doing}: {store.where} refused the credentials ({code}"
                f"{': ' + message if message else ''}). Check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, and that they may read and write this bucket",
            )
        return ObjectStoreError(
            "refused",
            f"could not {self.doing}: {store.where} answered {_status(error)} {code}"
            f"{': ' + message if message else ''}",
        )


_PartialCredentials = botocore.exceptions.PartialCredentialsError


def _code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code") or "")


def _status(error: botocore.exceptions.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
