"""Settings resolved once (``sandbox_kernel.settings.resolve``): the order, the checks at the
edge, and what ``describe`` tells. In-process; the advertisement files are real files in a
temporary Jupyter runtime directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_kernel import SandboxConfigError
from sandbox_kernel.discovery import advertisement_path, write_advertisement
from sandbox_kernel.settings import KERNEL_NAMES, Source, resolve


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Jupyter runtime directory: no advertised server unless a test writes one."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    yield tmp_path


def advertise(url: str, token: str | None, started_by: str | None = None) -> None:
    # The advertisement names this (living) process: it counts as a running server.
    write_advertisement(advertisement_path(os.getpid()), url, token, started_by)


def test_explicit_beats_environment_beats_advertised(runtime: Path) -> None:
    advertise("http://127.0.0.1:7001", "advertised-token", "sandbox-kernel lab")
    env = {"SANDBOX_URL": "http://127.0.0.1:7002", "SANDBOX_TOKEN": "env-token"}
    explicit = resolve("http://127.0.0.1:7003/", "t", environ=env).settings
    assert (explicit.url, explicit.token, explicit.source) == (
        "http://127.0.0.1:7003/", "t", Source.EXPLICIT,
    )  # fmt: skip
    from_env = resolve(environ=env).settings
    assert (from_env.url, from_env.token, from_env.source) == (
        "http://127.0.0.1:7002/", "env-token", Source.ENVIRONMENT,
    )  # fmt: skip
    advertised = resolve(environ={}).settings
    assert (advertised.url, advertised.token, advertised.source) == (
        "http://127.0.0.1:7001/", "advertised-token", Source.ADVERTISED,
    )  # fmt: skip
    assert "started by `sandbox-kernel lab`" in advertised.describe()


def test_a_url_given_by_the_environment_that_is_advertised_says_who_started_it(
    runtime: Path,
) -> None:
    advertise("http://127.0.0.1:7001/", None, "sandbox-kernel lab")
    settings = resolve(environ={"SANDBOX_URL": "http://127.0.0.1:7001"}).settings
    assert settings.describe().startswith("a local server started by `sandbox-kernel lab`")
    assert "from SANDBOX_URL" in settings.describe()


def test_nothing_configured_starts_a_private_embedded_server(runtime: Path) -> None:
    resolved = resolve(environ={})
    try:
        assert resolved.server is not None and resolved.settings.source is Source.EMBEDDED
        assert resolved.settings.token  # a private server always has one
        assert "private embedded server" in resolved.settings.describe()
    finally:
        resolved.close()
    assert resolved.server is None
    with pytest.raises(LookupError):
        resolve(environ={}, start_embedded=False)


@pytest.mark.parametrize(
    "url", ["localhost:7000", "127.0.0.1:7000", "ftp://host/", "http://", "http://h:x/", " "]
)
def test_a_malformed_url_names_the_setting(runtime: Path, url: str) -> None:
    with pytest.raises(SandboxConfigError, match="check SANDBOX_URL"):
        resolve(environ={"SANDBOX_URL": url} if url.strip() else {"SANDBOX_URL": "x y"})
    with pytest.raises(SandboxConfigError, match=r"c\.SandboxKernel\.url"):
        resolve(url if url.strip() else "x y", names=KERNEL_NAMES, environ={})


def test_one_normalised_url(runtime: Path) -> None:
    for given in ("http://127.0.0.1:7000", "http://127.0.0.1:7000/", " http://127.0.0.1:7000// "):
        assert resolve(given, environ={}).settings.url == "http://127.0.0.1:7000/"


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan", "inf"])
def test_a_bad_timeout_names_its_setting(runtime: Path, value: str) -> None:
    env = {"SANDBOX_URL": "http://127.0.0.1:7000", "SANDBOX_TIMEOUT": value}
    with pytest.raises(SandboxConfigError, match=f"SANDBOX_TIMEOUT={value}"):
        resolve(environ=env)


def test_timeouts_and_the_setting_named_in_errors(runtime: Path) -> None:
    base = {"SANDBOX_URL": "http://127.0.0.1:7000"}
    default = resolve(environ=base).settings
    assert (default.timeout, default.side_timeout) == (60.0, 60.0)
    assert "SANDBOX_TIMEOUT" in default.timeout_setting
    mine = resolve(environ={**base, "SANDBOX_TIMEOUT": "5"}).settings
    # The user's timeout reaches side requests unless they have their own.
    assert (mine.timeout, mine.side_timeout, mine.timeout_setting) == (
        5.0,
        5.0,
        "SANDBOX_TIMEOUT=5",
    )
    both = resolve(environ={**base, "SANDBOX_TIMEOUT": "5", "SANDBOX_SIDE_TIMEOUT": "2"}).settings
    assert (both.timeout, both.side_timeout) == (5.0, 2.0)
    kernel = resolve(timeout=7, names=KERNEL_NAMES, environ=base).settings
    assert (kernel.timeout, kernel.timeout_setting) == (7.0, "c.SandboxKernel.timeout")


def test_a_broken_advertisement_is_skipped(runtime: Path) -> None:
    (runtime / "sandbox-kernel-server-1.json").write_text("{not json")
    advertise("not a url", None)
    with pytest.raises(LookupError):
        resolve(environ={}, start_embedded=False)
