"""Where magics sit in a kernel cell (``magics/cells.py``): only in its leading lines."""

from __future__ import annotations

import pytest

from sandbox_kernel.magics import MagicUsageError
from sandbox_kernel.magics.cells import SplitCell, split_cell


def test_a_plain_cell_is_all_bash() -> None:
    code = "echo hi\nprintf '%s\\n' x"
    assert split_cell(code) == SplitCell([], None, code)


def test_leading_line_magics_run_first_and_keep_the_line_numbers() -> None:
    code = "%sandbox_env A=1 B=2\n\n  %sandbox_timeout 5\necho $A\nfalse"
    split = split_cell(code)
    assert split.line_magics == [("sandbox_env", "A=1 B=2"), ("sandbox_timeout", "5")]
    assert split.cell_magic is None
    assert split.code == "\n\n\necho $A\nfalse", "magic lines become blank lines"
    assert split.code.split("\n").index("false") == code.split("\n").index("false")


def test_a_cell_magic_takes_the_whole_body() -> None:
    code = "\n%%c --args 'a b'\n#include <stdio.h>\n%d is not a magic here\n"
    split = split_cell(code)
    assert split.line_magics == []
    assert split.cell_magic == ("c", "--args 'a b'", "#include <stdio.h>\n%d is not a magic here\n")
    assert split.code == ""


@pytest.mark.parametrize(
    "code",
    [
        "printf '%s\\n' a",
        "cat <<EOF\n%sandbox_env X=1\nEOF",
        "cat <<-'END' > notes\n\t%%c\n\tEND",
        'cat << "EOF"; cat <<EOF2\n%sandbox_status\nEOF\n%c\nEOF2',
        "echo 100%",
        "sleep 9 &\n%1",
        "sleep 9 &\n%%\n%+\n%-\n%?sleep",
        "echo start\n%not_a_magic X=1",
        "printf 'line one\n%sandbox_env\n'",
        'echo "two\n%%c lines"',
        "echo a \\\n%sandbox_status",
        "echo $((1<<2))\necho ok",
        "cat <<< here\necho ok",
        "# a comment <<EOF\necho ok",
    ],
)
def test_a_percent_after_the_first_bash_line_is_bash(code: str) -> None:
    assert split_cell(code) == SplitCell([], None, code)


@pytest.mark.parametrize(
    ("code", "line", "written"),
    [
        ("echo start\n%sandbox_env X=1", 2, "%sandbox_env"),
        ("%sandbox_status\nls\n\n  %sandbox_timeout 5\necho", 4, "%sandbox_timeout"),
        ("echo compile\n%%c\nint main(void) { return 0; }", 2, "%%c"),
        ("cat <<EOF\ntext\nEOF\n%sandbox_download out.txt", 4, "%sandbox_download"),
        ("echo 'a quote\nthat closes'\n%sandbox_status", 3, "%sandbox_status"),
        ("echo $((1<<2))\n%sandbox_status", 2, "%sandbox_status"),
    ],
)
def test_a_known_magic_after_bash_is_refused_saying_where_magics_go(
    code: str, line: int, written: str
) -> None:
    """Bash would run it as a job spec and print ``fg: no job control``: the cell is refused
    before anything runs, in two lines that say what happened and what to do."""
    with pytest.raises(MagicUsageError) as refused:
        split_cell(code)
    message = str(refused.value)
    assert message.startswith(f"Line {line}: {written} comes after bash code")
    assert len(message.splitlines()) == 2
    if written.startswith("%%"):
        assert "first line of its cell" in message and "new cell" in message
    else:
        assert f"Put {written} before the bash lines" in message
        assert "in a cell of its own" in message


def test_a_cell_magic_after_a_line_magic_is_a_line_magic_named_with_a_percent() -> None:
    """``%%`` only counts on the first non-blank line; later it is a line magic whose name
    starts with ``%`` (which the kernel then reports as unknown)."""
    split = split_cell("%sandbox_status\n%%c\nint main;")
    assert split.line_magics == [("sandbox_status", ""), ("%c", "")]
    assert split.cell_magic is None
    assert split.code == "\n\nint main;"


def test_magics_only_and_blank_cells() -> None:
    assert split_cell("%sandbox_status") == SplitCell([("sandbox_status", "")], None, "\n")
    assert split_cell("") == SplitCell([], None, "")
    assert split_cell("\n  \n") == SplitCell([], None, "\n  \n")
    assert split_cell("%%sandbox") == SplitCell([], ("sandbox", "", ""), "")


def test_arguments_keep_their_inner_spacing() -> None:
    [(name, arguments)] = split_cell("%sandbox_env   MSG='a  b'   ").line_magics
    assert (name, arguments) == ("sandbox_env", "MSG='a  b'")
