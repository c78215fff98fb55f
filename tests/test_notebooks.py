"""The main job: ``sandbox-kernel demo`` runs the five demo notebooks, the tracked ones only (and
their outputs are what they teach). ``sandbox-kernel lab`` is tested in test_lab.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

from .conftest import Server

CLI = [sys.executable, "-m", "sandbox_kernel.cli"]


def outputs(notebook: Any) -> list[list[dict[str, Any]]]:
    return [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]


def text_of(cell_outputs: list[dict[str, Any]]) -> str:
    parts = []
    for output in cell_outputs:
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] == "error":
            parts.append(f"{output['ename']}: {output['evalue']}")
        else:
            parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "".join(parts)


@pytest.fixture(scope="module")
def demo(server: Server, kernelspec: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [*CLI, "demo", "--url", server.url, "--token", server.token or "",
         "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.endswith(", ok")]
    assert len(lines) == 5, done.stdout
    return output


def read(demo: Path, name: str) -> list[list[dict[str, Any]]]:
    return outputs(nbformat.read(demo / f"{name}.ipynb", as_version=4))


def test_quickstart(demo: Path) -> None:
    cells = read(demo, "1-quickstart")
    assert "Hello from the sandbox: Linux, user" in text_of(cells[0])
    assert (
        text_of(cells[2])
        == "Course: Systems 101, in /home/student/project\nfruit.txt has 3 lines\n"
    )
    assert "ExitCode: command exited with status 2" in text_of(cells[3])
    assert "Timeout: the cell was stopped after 2 s" in text_of(cells[4])
    assert "back to normal in /home/student/project" in text_of(cells[5])
    [chart] = [o for o in cells[6] if o["output_type"] == "display_data"]
    assert chart["data"]["image/svg+xml"].count("<rect") == 3
    assert (demo / "fruit.txt").read_text() == "apples 3\npears 5\nplums 2\n"
    live = text_of(cells[8]).splitlines()  # the live loop: one line a second, with its time
    steps = [re.sub(r" at \d\d:\d\d:\d\d$", "", line) for line in live]
    assert steps == [f"step {step} of 5" for step in range(1, 6)], live


def test_teaching(demo: Path) -> None:
    cells = read(demo, "2-teaching")
    assert text_of(cells[0]) == "5\n" and text_of(cells[1]) == "5\n"
    check = text_of(cells[2])
    assert check.count("✓ passed") == 4 and "777777" in check, check
    assert check.rstrip().endswith("4/4 points · 4/4 cases passed"), check
    broken = text_of(cells[3])
    assert "broken.c:4:" in broken and "undefined_name" in broken
    assert "ExitCode: command exited with status 1" in broken
    # Headless, nothing can be typed: the interactive program reads end-of-file at once.
    assert text_of(cells[4]) == "Two integers? (end of input: nothing to add)\n"


def test_inspecting(demo: Path) -> None:
    cells = read(demo, "3-inspecting-a-sandbox")
    assert "bubblewrap" in text_of(cells[0]) and "time per run" in text_of(cells[0])
    assert "gcc" in text_of(cells[1]) and "matches" in text_of(cells[1])
    assert "json" in text_of(cells[2])
    assert "load " in text_of(cells[3]) and "busy" in text_of(cells[3])
    assert "environment" in text_of(cells[4])
    [panel] = cells[5]
    assert "application/vnd.jupyter.widget-view+json" in panel["data"]
    metadata = nbformat.read(demo / "3-inspecting-a-sandbox.ipynb", as_version=4).metadata
    state = metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(entry["model_name"] == "TabModel" for entry in state.values())


def test_from_python(demo: Path) -> None:
    cells = read(demo, "4-from-python")
    assert text_of(cells[1]).startswith("hello from the sandbox\n")
    assert text_of(cells[2]).startswith("(True, 0, ['hello from the sandbox'")
    assert text_of(cells[3]) == "still the sandbox\n"
    assert text_of(cells[4]).startswith("(4, '3.0.3+sandbox-kernel")
    assert text_of(cells[5]).startswith("load now: ")
    [table] = [o for o in cells[9] if o["output_type"] == "execute_result"]
    rows = table["data"]["text/markdown"].splitlines()
    assert rows[2].startswith("| sort | True | 0 | 100000 |")
    assert rows[3].startswith("| python | True | 0 | 499999500000 |")
    assert rows[4].startswith("| fail | False | 1 |")


def test_demo_reports_an_unexpected_error(server: Server, kernelspec: str, tmp_path: Path) -> None:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "sandbox", "display_name": "Sandbox (bash)",
                                       "language": "bash"}  # fmt: skip
    notebook.cells = [nbformat.v4.new_code_cell("exit 4"), nbformat.v4.new_code_cell("echo never")]
    nbformat.write(notebook, folder / "broken.ipynb")
    done = subprocess.run(
        [*CLI, "demo", "--url", server.url, "--token", server.token or "",
         "--notebooks", str(folder), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert "broken.ipynb: 1 cells run, 1 errors" in done.stdout and "FAILED" in done.stdout
    assert (tmp_path / "out" / "broken.ipynb").exists()


def score(text: str) -> str:
    return text.rstrip().splitlines()[-1]


def test_checking(demo: Path) -> None:
    cells = read(demo, "5-checking")
    assert text_of(cells[0]) == "5\n"
    assert score(text_of(cells[1])) == "5/5 points · 4/4 cases passed"
    hidden = text_of(cells[2])  # tests/sum-hidden.yaml: verdicts only, never the data
    assert score(hidden) == "4/4 points · 3/3 cases passed"
    assert hidden.count("(hidden)") == 3
    assert not any(data in hidden for data in ("-15", "42", "9223372036854775807"))
    overflow = text_of(cells[4])
    assert score(overflow) == "5/9 points · 5/7 cases passed"
    assert "large: line 1: expected '4000000000', got '-294967296'" in overflow
    assert overflow.count("wrong output") == 2 and "9223372036854775807" not in overflow
    count = text_of(cells[6])
    assert score(count) == "5/9 points · 4/7 cases passed" and count.count("time limit") == 3
    recursive = text_of(cells[8])
    assert score(recursive) == "5/9 points · 4/7 cases passed"
    assert recursive.count("segmentation fault (SIGSEGV)") == 2  # the hidden one: verdict only
    typo = text_of(cells[9])
    assert "typo.c:7:" in typo and typo.count("compilation error") == 7
    assert score(typo) == "0/9 points · 0/7 cases passed"
    stopped = text_of(cells[10])
    assert stopped.count("time limit") == 1 and stopped.count("not run") == 2
    assert score(stopped) == "1/4 points · 1/4 cases passed"
    assert score(text_of(cells[12])) == "9/9 points · 7/7 cases passed"  # Python
    assert score(text_of(cells[14])) == "2/2 points · 2/2 cases passed"  # bash: args, env
    mean = text_of(cells[16])  # compare: float, tolerance 0.001
    assert "3.3333333333333335" in mean and score(mean) == "2/2 points · 2/2 cases passed"
