"""The same magics through the IPython extension (``%load_ext sandbox_kernel``), in a real
IPython shell, against the embedded server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from sandbox_kernel.client import Specs
from sandbox_kernel.session import CellOutcome

from .conftest import Server
from .helpers import sandbox_ipython


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the extension is loaded in: the only one its magics read and write."""
    return tmp_path_factory.mktemp("ipython-notebook")


@pytest.fixture
def local(folder: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh folder of the test inside :func:`folder`."""
    path = folder / request.node.name
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def shell(server: Server, folder: Path) -> Iterator[InteractiveShell]:
    with sandbox_ipython(server.url, server.token, folder) as ip:
        yield ip


def run(shell: InteractiveShell, code: str) -> Any:
    result = shell.run_cell(code)
    return result


def test_sandbox_cells_carry_environment_and_shell_state(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    run(shell, "%%sandbox --out first\nx=41; mkdir -p d && cd d && echo kept > f\necho hello")
    first = shell.user_ns["first"]
    assert isinstance(first, CellOutcome)
    assert (first.ok, first.stdout, first.exit_code) == (True, "hello\n", 0)
    run(shell, "%%sandbox --out second\necho $((x + 1)); pwd; cat f; exit 3")
    second = shell.user_ns["second"]
    assert second.stdout == "42\n/home/student/d\nkept\n"
    assert not second.ok and second.error.ename == "ExitCode"
    assert "ExitCode: command exited with status 3" in capsys.readouterr().err
    assert second.environment and second.environment != first.environment


def test_magics_return_python_objects(shell: InteractiveShell) -> None:
    specs = shell.run_line_magic("sandbox_specs", "")
    assert isinstance(specs, Specs) and specs.containers and specs.containers > 0
    assert "isolation" in specs._repr_mimebundle_()["text/plain"]
    load = shell.run_line_magic("sandbox_usage", "")
    assert isinstance(load, float) and 0.0 <= load <= 1.0
    assert "load" in load._repr_mimebundle_()["text/plain"]
    found = shell.run_line_magic("sandbox_libraries", "bash --category bin")
    assert ("bin", "bash") in [(row.category, row.name) for row in found]
    status = shell.run_line_magic("sandbox_status", "")
    assert status["url"] == os.environ["SANDBOX_URL"]
    environ = shell.run_line_magic("sandbox_env", "COURSE=intro")
    assert environ == {"COURSE": "intro"}
    run(shell, "%%sandbox --out shown\necho $COURSE")
    assert shell.user_ns["shown"].stdout == "intro\n"
    shell.run_line_magic("sandbox_env", "--unset COURSE")
    assert shell.run_line_magic("sandbox_timeout", "4") == 4.0


def test_teaching_cells_keep_ipythons_own_names(shell: InteractiveShell) -> None:
    outcome = shell.run_cell_magic(
        "sandbox_c",
        "--stdin '2 5'",
        '#include <stdio.h>\nint main(void) { int a, b; scanf("%d %d", &a, &b); '
        'printf("%d\\n", a * b); return 0; }',
    )
    assert outcome.stdout == "10\n"
    java = shell.run_cell_magic(
        "sandbox_java",
        "",
        'public class Main { public static void main(String[] a) { System.out.println("j"); } }',
    )
    assert java.stdout == "j\n"
    assert shell.run_cell_magic("sandbox_python3", "", "print(6 * 7)").stdout == "42\n"
    assert shell.run_cell_magic("sandbox_perl", "", "print 1+1").stdout == "2"
    # The outcome is there for a script, but a notebook gets no Out[] line for it.
    assert shell.display_formatter.format(outcome) == ({}, {})
    # IPython's own %%python3, %%perl and %%bash still run locally.
    for name in ("python3", "perl", "bash"):
        magic = shell.find_cell_magic(name)
        assert magic is not None and magic.__module__.startswith("IPython"), name


def test_bad_uses_are_usage_errors_and_send_nothing(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str], local: Path
) -> None:
    for line in (
        "%sandbox_timeout soon",
        "%sandbox_timeout 3600",
        "%sandbox_use junk",
        "%sandbox_env bad-name=1",
        f"%sandbox_download ../../etc/passwd --to {local}",
        "%%sandbox --bogus\necho no",
        "%%sandbox_ruby\nputs 1",
    ):
        result = run(shell, line)
        assert result.error_in_exec is not None or result.error_before_exec is not None, line
    err = capsys.readouterr()
    text = err.out + err.err
    assert "usage: %sandbox_timeout" in text
    assert "execute_timeout" in text
    assert "outside the environment" in text
    assert "no ruby" in text
    assert list(local.iterdir()) == []


def test_download_and_upload(shell: InteractiveShell, local: Path) -> None:
    (local / "local.txt").write_text("from here\n")
    shell.run_line_magic("sandbox_upload", str(local / "local.txt"))
    assert shell.run_cell_magic("sandbox", "--out up", "cat ~/d/local.txt") is None
    assert shell.user_ns["up"].stdout == "from here\n"
    run(shell, "%%sandbox\necho result > ~/out.txt")
    saved = shell.run_line_magic(
        "sandbox_download", f"~/out.txt --to {local}".replace("~", "/home/student")
    )
    assert Path(saved).read_text() == "result\n"
    assert Path(saved).parent == local.resolve()
    # --show: the file, once (one display, and the value displays as nothing more).
    with capture_output() as captured:
        result = shell.run_cell(
            f"%sandbox_download /home/student/out.txt --to {local} --show --force"
        )
    shown = [*captured.outputs, *([result.result] if result.result is not None else [])]
    assert len(shown) == 1, shown
    assert "result" in str(
        shown[0]._repr_mimebundle_() if hasattr(shown[0], "_repr_mimebundle_") else shown[0].data
    )


def test_connect_reset_use_help_and_cpp(
    shell: InteractiveShell, start_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run(shell, "%%sandbox --out before\nmarker=1; touch here")
    uuid = shell.user_ns["before"].environment
    previous = shell.run_line_magic("sandbox_reset", "")
    assert previous == uuid
    run(shell, "%%sandbox --out fresh\necho ${marker:-none}; ls | wc -l")
    assert shell.user_ns["fresh"].stdout == "none\n0\n"
    assert shell.run_line_magic("sandbox_use", uuid) == uuid
    run(shell, "%%sandbox --out back\necho $marker; ls here")
    assert shell.user_ns["back"].stdout == "1\nhere\n"
    cpp = shell.run_cell_magic(
        "sandbox_cpp", "", '#include <iostream>\nint main() { std::cout << "c++" << "\\n"; }'
    )
    assert cpp.stdout == "c++\n"
    shell.run_line_magic("sandbox_help", "")
    assert "%%sandbox_java" in capsys.readouterr().out
    other = start_server("--workers", "1")
    url = shell.run_line_magic("sandbox_connect", f"{other.url} --token {other.token}")
    assert url == other.url
    assert shell.run_line_magic("sandbox_status", "")["url"] == other.url
    shell.run_line_magic(
        "sandbox_connect", f"{os.environ['SANDBOX_URL']} --token {os.environ['SANDBOX_TOKEN']}"
    )
