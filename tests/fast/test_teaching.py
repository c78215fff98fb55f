"""Teaching cells' scripts (``magics/teaching.py``: ``build``) run by a local bash in a
temporary folder, with the local compilers: what a student sees from ``%%python3``, ``%%c``,
``%%cpp``: the program's output, its arguments and input, the compiler's line numbers matching
the cell's, nothing run after a failed compilation."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox_kernel.magics.teaching import LANGUAGES, Language, build

HEAP_MB = 128


def language(name: str) -> Language:
    [found] = [entry for entry in LANGUAGES if entry.name == name]
    return found


def options(
    entry: Language, file: str | None = None, args: str = "", stdin: str | None = None
) -> argparse.Namespace:
    """The magic's parsed options (``%%c --file F --args A --stdin S``), defaults included."""
    values = argparse.Namespace(file=file or entry.file, args=args, stdin=stdin)
    if entry.compile:
        values.flags = entry.flags
    return values


def run(script: str, folder: Path) -> subprocess.CompletedProcess[str]:
    for program in ("bash", "python3", "gcc", "g++"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is missing: the teaching cells run it here", pytrace=False)
    return subprocess.run(
        ["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=60
    )


def test_python_gets_its_arguments_and_input(tmp_path: Path) -> None:
    entry = language("python3")
    source = "import sys\nprint(sys.argv[1:])\nprint(input(), input())\nraise SystemExit(4)\n"
    script = build(entry, options(entry, args="a 'b c' $HOME", stdin="one\\ntwo"), source, HEAP_MB)
    done = run(script, tmp_path)
    assert done.stdout == "['a', 'b c', '$HOME']\none two\n"
    assert done.returncode == 4, "the program's exit status is the cell's"
    assert (tmp_path / "main.py").read_text() == "\n" + source, "the file stays for later cells"


def test_source_is_written_verbatim(tmp_path: Path) -> None:
    entry = language("python3")
    source = "print('''$HOME `id` \\\\ EOF\nSANDBOX_SOURCE_0\n''', end='')"
    done = run(build(entry, options(entry), source, HEAP_MB), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "$HOME `id` \\ EOF\nSANDBOX_SOURCE_0\n"


def test_c_compiles_runs_and_gets_its_arguments(tmp_path: Path) -> None:
    entry = language("c")
    source = (
        "#include <stdio.h>\n#include <math.h>\n"
        "int main(int argc, char **argv) {\n"
        '    printf("%d %s %.0f\\n", argc, argv[1], sqrt(16.0));\n    return 3;\n}\n'
    )
    done = run(build(entry, options(entry, args="'x y'"), source, HEAP_MB), tmp_path)
    assert done.stdout == "2 x y 4\n", done.stderr
    assert done.returncode == 3


def test_compiler_line_numbers_are_the_cells_and_nothing_runs_after_an_error(
    tmp_path: Path,
) -> None:
    """Cell line 1 is ``%%cpp``; the error is on cell line 4 (the source's third line)."""
    entry = language("cpp")
    source = "#include <iostream>\nint main() {\n    undefined_name;\n}\n"
    stale = tmp_path / "main"
    stale.write_text("#!/bin/sh\necho the program of an earlier cell ran\n")
    stale.chmod(0o755)
    done = run(build(entry, options(entry), source, HEAP_MB), tmp_path)
    assert done.returncode != 0
    assert "main.cpp:4:" in done.stderr, done.stderr
    assert done.stdout == "", "the program of an earlier cell ran after a failed compilation"


def test_a_file_in_a_folder_is_built_there_and_the_directory_is_given_back(
    tmp_path: Path,
) -> None:
    entry = language("c")
    source = "int main(void) { return 5; }\n"
    script = build(entry, options(entry, file="exercises/one/prog.c"), source, HEAP_MB)
    done = run(script + 'status=$?; echo "$status $PWD"\n', tmp_path)
    assert done.stdout == f"5 {tmp_path}\n", done.stderr
    assert (tmp_path / "exercises" / "one" / "prog").exists()


def test_the_jvm_gets_the_heap_it_is_given() -> None:
    entry = language("java")
    script = build(entry, options(entry), "class Main {}", 300)
    assert "javac -J-Xmx300m" in script and "java -Xmx300m" in script


@pytest.mark.parametrize("args", ["'unbalanced", 'a "b'])
def test_unbalanced_quotes_in_arguments_are_refused(args: str) -> None:
    entry = language("python3")
    with pytest.raises(ValueError, match="quotation"):
        build(entry, options(entry, args=args), "print()", HEAP_MB)


def test_every_language_has_a_file_a_title_and_what_it_needs() -> None:
    names = [entry.name for entry in LANGUAGES]
    assert len(names) == len(set(names))
    for entry in LANGUAGES:
        assert entry.file and entry.title and entry.needs, entry
        assert "{file}" in entry.run or "{stem}" in entry.run, entry
