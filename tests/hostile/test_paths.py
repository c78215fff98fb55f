"""Hostile paths: ``result_path`` and ``files/`` paths that leave the working directory or follow
a symlink (to ``/etc/passwd``, or to the host's canary, which the server could read if it
followed it: the sandbox cannot), and unknown, malformed and expired uuids.

Documented answers: a result path that is not a regular file inside the working directory,
reached without a symlink, gives status -3 and no ``result``; such a ``files/`` path gives 404;
an unknown or expired environment gives 404 "No environment with UUID '<uuid>' found".
"""

from __future__ import annotations

import io
import tarfile
import time
import uuid as uuid_module
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from .conftest import SECRET, Hostile, make_hostile, stop_and_check

#: What every result_path case's run leaves in the working directory.
SETUP = (
    "mkdir -p d/e && echo inside > d/e/f && echo x > x"
    " && ln -s /etc/passwd passwd && ln -s /etc etc && ln -s {canary}/canary.txt canary"
    " && ln -s {canary} canarydir && ln -s d/e/f innerlink && ln -s . self && mkfifo fifo"
)

RESULT_PATHS = {
    "dotdot": "../x",
    "dotdot-deep-to-the-canary": "../" * 12 + "{canary_rel}/canary.txt",
    "dotdot-through-a-directory": "d/../../x",
    "absolute-etc-passwd": "/etc/passwd",
    "absolute-the-canary": "{canary}/canary.txt",
    "absolute-inside-home": "/home/student/x",
    "symlink-to-etc-passwd": "passwd",
    "symlink-to-the-canary": "canary",
    "through-a-symlinked-directory-to-etc": "etc/passwd",
    "through-a-symlinked-directory-to-the-canary": "canarydir/canary.txt",
    "symlink-inside-the-directory": "innerlink",
    "symlink-to-the-directory-itself": "self/x",
    "a-directory": "d",
    "a-directory-with-slash": "d/e/",
    "the-working-directory": ".",
    "empty": "",
    "missing": "missing{m}",
    "fifo-nobody-writes": "fifo",
    "nul-byte": "x\u0000/etc/passwd",
    "very-long": "a/" * 3000 + "x",
    "proc-of-the-sandbox": "/proc/self/environ",
}


@pytest.mark.parametrize("name", list(RESULT_PATHS))
def test_result_path(hostile: Hostile, trial: Callable[..., None], name: str) -> None:
    def case(marker: str) -> None:
        canary = str(hostile.canary)
        values = {"m": marker, "canary": canary, "canary_rel": canary.lstrip("/")}
        path = RESULT_PATHS[name].format(**values)
        started = time.monotonic()
        answer = hostile.execute(
            {"commands": [SETUP.format(**values)], "result_path": path}, marker
        )
        assert time.monotonic() - started < 2
        assert answer.entry()["exit_code"] == 0, answer.entry()
        assert answer.json["status"] == -3, answer.text[:300]
        assert "result" not in answer.json
        assert SECRET not in answer.text and "root:" not in answer.text

    trial(case)


def test_result_path_inside_is_read(hostile: Hostile, trial: Callable[..., None]) -> None:
    """The control: a regular file inside, through a subdirectory."""

    def case(marker: str) -> None:
        answer = hostile.execute(
            {"commands": [f"mkdir d && printf '{marker}\\n' > d/r"], "result_path": "./d//r"},
            marker,
        )
        assert (answer.json["status"], answer.json.get("result")) == (0, f"{marker}\n")

    trial(case)


# -- files/ -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(hostile: Hostile) -> str:
    """A saved environment full of links that point out, and one honest file."""
    canary = hostile.canary
    command = (
        "echo ok > ok && mkdir d && ln -s /etc/passwd passwd && ln -s / root"
        f" && ln -s {canary}/canary.txt canary && ln -s {canary} canarydir && mkfifo fifo"
    )
    response = hostile.post({"commands": [command], "save": True})
    assert response.status_code == 200 and response.json()["status"] == 0, response.text
    uuid: str = response.json()["environment"]
    return uuid


FILE_PATHS = {
    "encoded-dotdot": "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "encoded-dotdot-and-slashes": "%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "dotdot-with-encoded-slashes": "..%2f..%2f..%2fetc%2fpasswd",
    "encoded-absolute": "%2fetc%2fpasswd",
    "encoded-absolute-canary": "%2f{canary_enc}%2fcanary.txt",
    "double-encoded-dotdot": "%252e%252e/%252e%252e/etc/passwd",
    "backslashes": "..\\..\\..\\etc\\passwd",
    "symlink-to-etc-passwd": "passwd",
    "symlink-to-the-canary": "canary",
    "through-a-symlink-to-root": "root/etc/passwd",
    "through-a-symlinked-directory-to-the-canary": "canarydir/canary.txt",
    "a-directory": "d",
    "the-fifo-dropped-at-save": "fifo",
    "missing": "missing{m}",
    "nul-byte": "ok%00",
    "dot": ".",
    "dotdot-after-a-real-file": "ok/..",
}


def send_exactly(hostile: Hostile, path: str) -> requests.Response:
    """GET a URL without letting requests normalise its path."""
    url = f"{hostile.server.url}{path}"
    prepared = hostile.server.http.prepare_request(requests.Request("GET", url))
    prepared.url = url
    return hostile.server.http.send(prepared, timeout=10)


@pytest.mark.parametrize("name", list(FILE_PATHS))
def test_files_path(hostile: Hostile, trial: Callable[..., None], saved: str, name: str) -> None:
    def case(marker: str) -> None:
        canary_enc = str(hostile.canary).lstrip("/").replace("/", "%2f")
        path = FILE_PATHS[name].format(m=marker, canary_enc=canary_enc)
        response = send_exactly(hostile, f"files/{saved}/{path}/")
        assert response.status_code == 404, (response.status_code, response.text[:200])
        assert SECRET.encode() not in response.content and b"root:" not in response.content
        assert send_exactly(hostile, f"files/{saved}/ok/").content == b"ok\n"  # the control

    trial(case)


def test_environment_download_keeps_links_as_links(
    hostile: Hostile, trial: Callable[..., None], saved: str
) -> None:
    """The archive of an environment holds its symlinks, never what they point to."""

    def case(marker: str) -> None:
        response = hostile.server.get(f"environments/{saved}/")
        assert response.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
            infos = {info.name: info for info in archive}
            contents = b"".join(
                archive.extractfile(info).read()  # type: ignore[union-attr]
                for info in infos.values()
                if info.isreg()
            )
        assert sorted(infos) == ["canary", "canarydir", "d", "ok", "passwd", "root"]
        assert infos["canary"].issym() and infos["passwd"].issym() and infos["root"].issym()
        assert SECRET.encode() not in contents and b"root:" not in contents

    trial(case)


# -- uuids --------------------------------------------------------------------------------------

UUIDS = {
    "unknown-uuid4": "{uuid}",
    "unknown-uppercase": "{UUID}",
    "not-a-uuid": "not-a-uuid",
    "dotdot": "..",
    "encoded-dotdot-to-environments": "..%2f..%2fenvironments",
    "uuid-with-json-suffix": "{uuid}.json",
    "very-long": "a" * 5000,
}


@pytest.mark.parametrize("name", list(UUIDS))
def test_unknown_environment(hostile: Hostile, trial: Callable[..., None], name: str) -> None:
    def case(marker: str) -> None:
        unknown = str(uuid_module.uuid4())
        value = UUIDS[name].format(uuid=unknown, UUID=unknown.upper())
        download = send_exactly(hostile, f"environments/{value}/")
        assert download.status_code == 404, download.text[:200]
        assert send_exactly(hostile, f"files/{value}/ok/").status_code == 404
        answer = hostile.execute({"commands": [f"sleep {marker}"], "environment": value}, marker)
        assert (answer.status, answer.text) == (404, f"No environment with UUID '{value}' found")

    trial(case)


@pytest.fixture(scope="module")
def short_lived(
    start_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    """Environments expire after one second."""
    harness = make_hostile(start_server, tmp_path_factory, "--expiration", "1")
    yield harness
    stop_and_check(harness)


def test_expired_environment(short_lived: Hostile) -> None:
    def case(marker: str) -> None:
        saved = short_lived.execute({"commands": ["echo x > x"], "save": True}, marker)
        uuid = saved.json["environment"]
        assert short_lived.server.get(f"files/{uuid}/x/").status_code == 200
        time.sleep(1.2)
        assert short_lived.server.get(f"environments/{uuid}/").status_code == 404
        assert short_lived.server.get(f"files/{uuid}/x/").status_code == 404
        answer = short_lived.execute({"commands": [f"sleep {marker}"], "environment": uuid}, marker)
        assert (answer.status, answer.text) == (404, f"No environment with UUID '{uuid}' found")

    short_lived.trial("paths: expired_environment", case)
