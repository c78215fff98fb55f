"""The cluster's environment store on moto: what publishing and materialising cost.

    python bench/bench_store.py [--rounds N]
    python bench/bench_store.py --quick     # smoke mode: 3 rounds

Starts ``python -m moto.server`` on loopback (``pip install 'moto[s3]' flask flask-cors``)
and the real :class:`Storage` of two data dirs (two workers), then measures:

- the carried cell: a base of 1000 small files (about 1 KB; then of 20, a small notebook's),
  a run that appends to one of them, saved by ``Storage.save`` and published over the base
  (hash one file, one blob, one manifest), with a HEAD before the new blob and without;
  then that environment materialised on the other worker, whose blob cache holds the base
  (one blob GET, every entry linked);
- a 50 MB environment of 1000 files of 50 KB: published from nothing (1000 blob PUTs) and
  materialised on a worker with an empty cache (1000 GETs).

Medians (and p90 where rounds allow) in ms.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid as uuid_module
from collections.abc import Callable
from pathlib import Path

import boto3

from sandbox_kernel.server import trees
from sandbox_kernel.server.cluster.manifests import Manifest, materialise, publish
from sandbox_kernel.server.cluster.objects import ObjectStore
from sandbox_kernel.server.settings import ServerSettings
from sandbox_kernel.server.storage import Snapshot, Storage


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1000):
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise SystemExit("moto did not start: pip install 'moto[s3]' flask flask-cors")


def fill(count: int, size: int) -> Callable[[Path], None]:
    def run(workdir: Path) -> None:
        for folder in range(max(1, count // 100)):
            (workdir / f"d{folder}").mkdir()
            for index in range(min(100, count)):
                (workdir / f"d{folder}" / f"f{index}.txt").write_bytes(os.urandom(size))

    return run


def save(storage: Storage, base: Path | None, change: Callable[[Path], None]) -> tuple[str, float]:
    workdir = storage.new_staging() / "work"
    workdir.mkdir()
    snapshot = Snapshot()
    if base is not None:
        snapshot = storage.populate(base, workdir, os.getuid(), os.getgid())
    change(workdir)
    return storage.save(workdir, snapshot)


def ms(values: list[float]) -> str:
    median = statistics.median(values) * 1000
    if len(values) < 5:
        return f"{median:.1f} ms (n={len(values)})"
    p90 = sorted(values)[int(len(values) * 0.9) - 1] * 1000
    return f"{median:.1f} ms (p90 {p90:.1f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    moto, url = start_moto()
    scratch = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
        store = ObjectStore.from_url("s3://bench/p", endpoint=url)
        store.check()
        one = Storage(ServerSettings(), scratch / "one")
        two = Storage(ServerSettings(), scratch / "two")
        one.open(os.geteuid())
        two.open(os.geteuid())
        carried(store, one, two, rounds, 1000)
        carried(store, one, two, rounds, 20)
        large(store, one, two, max(3, rounds // 5))
        one.close()
        two.close()
    finally:
        moto.terminate()
        moto.wait()
        trees.remove_quietly(scratch)


def carried(store: ObjectStore, one: Storage, two: Storage, rounds: int, files: int) -> None:
    uuid, expire = save(one, None, fill(files, 1000))
    base = one.directory(uuid)
    assert base is not None
    started = time.perf_counter()
    manifest = publish(base, uuid, None, store, expire=expire).manifest
    print(f"base of {files} x 1 KB published: {(time.perf_counter() - started) * 1000:.0f} ms")
    cache = two.root / "blobs"
    started = time.perf_counter()
    materialise(manifest, store, two.environments / uuid, cache)
    print(f"base materialised, cold cache: {(time.perf_counter() - started) * 1000:.0f} ms")

    def append(workdir: Path) -> None:
        with open(workdir / "d0" / "f7.txt", "a") as file:
            file.write(os.urandom(8).hex() + "\n")  # new content every time

    timings: dict[str, list[float]] = {}
    for round_ in range(rounds):
        for head_from, label in ((0, "HEAD first"), (1 << 62, "no HEAD")):
            child, child_expire = save(one, base, append)
            directory = one.directory(child)
            assert directory is not None
            started = time.perf_counter()
            done = publish(
                directory, child, manifest, store, expire=child_expire, base_directory=base,
                head_from=head_from,
            )  # fmt: skip
            timings.setdefault(f"publish ({label})", []).append(time.perf_counter() - started)
            assert (done.hashed, done.uploaded) == (1, 1), done
            started = time.perf_counter()
            target = two.environments / child
            got = materialise(done.manifest, store, target, cache)
            timings.setdefault("materialise (warm cache)", []).append(time.perf_counter() - started)
            assert got == 1
            started = time.perf_counter()
            Manifest.parse(done.manifest.to_json())
            timings.setdefault("manifest to JSON and parsed back", []).append(
                time.perf_counter() - started
            )
            trees.remove(target)
        del round_
    print(f"carried cell over {files} files (one small file changed):")
    for label, values in timings.items():
        print(f"  {label}: {ms(values)}")


def large(store: ObjectStore, one: Storage, two: Storage, rounds: int) -> None:
    published: list[float] = []
    materialised: list[float] = []
    for _ in range(rounds):
        uuid, expire = save(one, None, fill(1000, 50_000))
        directory = one.directory(uuid)
        assert directory is not None
        started = time.perf_counter()
        manifest = publish(directory, uuid, None, store, expire=expire).manifest
        published.append(time.perf_counter() - started)
        cache = two.root / f"blobs-{uuid_module.uuid4().hex}"
        started = time.perf_counter()
        materialise(manifest, store, two.environments / uuid, cache)
        materialised.append(time.perf_counter() - started)
        trees.remove(two.environments / uuid)
        trees.remove(cache)
    print("50 MB environment, 1000 files of 50 KB:")
    print(f"  publish, nothing stored before: {ms(published)}")
    print(f"  materialise, empty cache: {ms(materialised)}")


if __name__ == "__main__":
    main()
