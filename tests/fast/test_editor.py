"""Editor support (``kernel/editor.py``) on given text: completion, Shift-Tab inspection and
is-complete, as a front-end asks for them, with what the kernel knows of the sandbox given
directly. ``is_complete`` runs the local ``bash -n``, as the kernel does."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Mapping

import pytest

from sandbox_kernel._generations import Inventory
from sandbox_kernel.kernel import editor
from sandbox_kernel.session import ShellState


def knowledge(
    *,
    cwd: str = "/home/student",
    tree: editor.Tree | None = None,
    files: tuple[str, ...] = (),
    variables: tuple[str, ...] = (),
    functions: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
    executables: tuple[str, ...] | None = None,
    libraries: Mapping[str, Mapping[str, str | None]] | None = None,
) -> editor.Knowledge:
    """What the kernel knows after some cells; ``executables=None``: the sandbox's inventory
    has not arrived yet (the kernel fetches it in the background)."""
    state = ShellState(
        cwd=cwd,
        files=list(files),
        variables=list(variables),
        functions=list(functions),
        aliases=list(aliases),
    )
    inventory = None
    if executables is not None:
        inventory = Inventory(libraries=libraries or {}, executables=executables, tools={})
    return editor.Knowledge(state=state, environ=environ or {}, inventory=inventory, tree=tree)


def matches(code: str, known: editor.Knowledge, cursor: int | None = None) -> list[str]:
    reply = editor.complete(code, len(code) if cursor is None else cursor, known)
    assert reply["status"] == "ok"
    return list(reply["matches"])


# -- completion -----------------------------------------------------------------------------------


def test_commands_come_from_functions_aliases_keywords_builtins_and_the_sandbox() -> None:
    known = knowledge(functions=("gr_func",), aliases=("gr_alias",), executables=("grep", "gcc"))
    assert matches("gr", known) == ["gr_alias", "gr_func", "grep"]
    assert matches("ec", known) == ["echo"]
    assert "while" in matches("ls && whil", known)
    assert matches("wh", knowledge()) == ["while"], "keywords even before the inventory"


@pytest.mark.parametrize("before", ["", "ls; ", "ls | ", "ls && ", "(", "$(", "if ", "then ", "! "])
def test_a_command_position_completes_commands(before: str) -> None:
    known = knowledge(files=("grapes.txt",), executables=("grep",))
    assert matches(before + "gr", known) == ["grep"]


@pytest.mark.parametrize("before", ["cat ", "ls -l ", "echo x > ", "wc < "])
def test_an_argument_completes_files(before: str) -> None:
    known = knowledge(files=("notes-one.txt", "notes-two.txt", "other/"), executables=("notes",))
    code = before + "note"
    reply = editor.complete(code, len(code), known)
    assert reply["matches"] == ["notes-one.txt", "notes-two.txt"]
    assert (reply["cursor_start"], reply["cursor_end"]) == (len(before), len(code))


def test_variables_come_from_the_state_and_the_sent_environ() -> None:
    known = knowledge(variables=("my_variable", "other"), environ={"my_sent": "1"})
    assert matches("echo $my_", known) == ["$my_sent", "$my_variable"]
    assert matches('echo "${my_v', known) == ["${my_variable}"]
    assert matches("echo $", known) == ["$my_sent", "$my_variable", "$other"]


def test_completion_in_the_middle_of_a_cell_replaces_only_the_word() -> None:
    code = "cat no; echo done"
    reply = editor.complete(code, 6, knowledge(files=("notes.txt",)))
    assert reply["matches"] == ["notes.txt"]
    assert (reply["cursor_start"], reply["cursor_end"]) == (4, 6)


def test_a_path_is_never_completed_as_a_command() -> None:
    assert matches("./gr", knowledge(executables=("grep",))) == []


@pytest.mark.parametrize("before", ["cat ", "ls | cat ", "grep -n x ", "echo hi > ", "sudo "])
def test_an_argument_never_offers_commands(before: str) -> None:
    """``cat gra`` offers the files starting with ``gra``, never ``cat``, ``grep`` or a
    function, even when those are known."""
    known = knowledge(
        files=("grades.txt", "graph/"),
        functions=("grade_all",),
        aliases=("gra",),
        executables=("cat", "grep", "gradle"),
    )
    assert matches(before + "gra", known) == ["grades.txt", "graph/"]
    assert "cat" not in matches(before, known)


HOME = "/home/student"
#: The environment of a user who made sub/, sub/dir-one/ and notes in both places.
TREE: editor.Tree = {
    HOME: ("figures/", "first.txt", "sub/"),
    f"{HOME}/sub": ("data.csv", "dir-one/", "dir-two/"),
    f"{HOME}/sub/dir-one": ("deep.txt",),
    f"{HOME}/sub/dir-two": (),
    f"{HOME}/figures": (),
}


@pytest.mark.parametrize(
    ("cwd", "files", "code", "expected"),
    [
        (f"{HOME}/sub", ("data.csv",), "cat ../f", ["../figures/", "../first.txt"]),
        (HOME, ("first.txt", "sub/"), "ls sub/di", ["sub/dir-one/", "sub/dir-two/"]),
        (HOME, ("first.txt", "sub/"), "ls sub/dir-one/", ["sub/dir-one/deep.txt"]),
        (f"{HOME}/sub", ("data.csv",), "cat ~/f", ["~/figures/", "~/first.txt"]),
        (f"{HOME}/sub", ("data.csv",), "cat ~/sub/da", ["~/sub/data.csv"]),
        (f"{HOME}/sub", ("data.csv",), f"cat {HOME}/fi", [f"{HOME}/figures/", f"{HOME}/first.txt"]),
        (f"{HOME}/sub/dir-one", ("deep.txt",), "cat ../../sub/dir-t", ["../../sub/dir-two/"]),
        (f"{HOME}/sub", ("data.csv",), "./da", ["./data.csv"]),
        (f"{HOME}/sub", ("data.csv",), "ls ./", ["./data.csv", "./dir-one/", "./dir-two/"]),
    ],
)  # fmt: skip
def test_paths_complete_like_bash_from_the_carried_directory(
    cwd: str, files: tuple[str, ...], code: str, expected: list[str]
) -> None:
    known = knowledge(cwd=cwd, files=files, tree=TREE)
    reply = editor.complete(code, len(code), known)
    assert reply["matches"] == expected
    word = code.split(" ")[-1]
    assert reply["cursor_start"] == len(code) - len(word), "the whole path is replaced"


def test_the_tree_once_known_lists_the_current_directory_too() -> None:
    """The tree is the current environment's, as new as the last cell's listing or newer
    (an upload makes a new environment without a cell); outside /home/student, where the
    tree knows nothing, the cell's listing is used."""
    known = knowledge(files=("old.txt", "sub/"), tree=TREE)
    assert matches("cat fi", known) == ["figures/", "first.txt"]
    assert matches("cat o", known) == []
    in_tmp = knowledge(cwd="/tmp", files=("scratch.o",), tree=TREE)
    assert matches("cat scr", in_tmp) == ["scratch.o"]


def test_home_completes_from_the_listing_when_the_shell_is_there() -> None:
    known = knowledge(files=("first.txt", "sub/"))
    assert matches("cat ~/f", known) == ["~/first.txt"]
    assert matches("cat ~", known) == ["~/"]
    assert matches("cat ~/", known) == ["~/first.txt", "~/sub/"]


def test_folders_not_known_offer_nothing_rather_than_a_guess() -> None:
    """Without the environment's tree, only the current directory is known; ``/usr`` and
    ``~user/`` are never known (the archive holds /home/student only)."""
    known = knowledge(cwd=f"{HOME}/sub", files=("data.csv",))
    assert matches("cat ../f", known) == []
    assert matches("ls sub/", knowledge(files=("sub/",))) == []
    with_tree = knowledge(tree=TREE)
    assert matches("ls /usr/bi", with_tree) == []
    assert matches("ls ~root/", with_tree) == []
    assert matches("ls missing/", with_tree) == [], "under /home/student and not in the tree"


def test_wanted_folder_names_what_completion_lacks() -> None:
    bare = knowledge(cwd=f"{HOME}/sub", files=("data.csv",))
    assert editor.wanted_folder("cat ../f", 8, bare) == HOME
    assert editor.wanted_folder("ls ~/sub/di", 11, knowledge()) == f"{HOME}/sub"
    assert editor.wanted_folder("cat da", 6, bare) is None, "the current directory is known"
    assert editor.wanted_folder("ls /usr/", 8, bare) is None, "outside what an archive holds"
    assert editor.wanted_folder("ec", 2, bare) is None, "a command"
    assert editor.wanted_folder("echo $H", 7, bare) is None, "a variable"
    assert editor.wanted_folder("cat ../f", 8, knowledge(cwd=f"{HOME}/sub", tree=TREE)) is None


def _archive(*members: tuple[str, bool], leading: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, folder in members:
            info = tarfile.TarInfo(leading + name)
            if folder:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = 3
                archive.addfile(info, io.BytesIO(b"abc"))
    return buffer.getvalue()


@pytest.mark.parametrize("leading", ["", "./"])
def test_an_environment_archive_gives_every_folder_and_hides_the_kernels_own(
    leading: str,
) -> None:
    data = _archive(
        (".", True),
        ("first.txt", False),
        ("sub", True),
        ("sub/data.csv", False),
        ("sub/dir-one/deep.txt", False),  # its folder has no member of its own
        (".sandbox_kernel", True),
        (".sandbox_kernel/state-0123456789abcdef-a.sh", False),
        ("../escape.txt", False),
        leading=leading,
    )
    tree = editor.archive_tree(data)
    assert dict(tree) == {
        HOME: ("first.txt", "sub/"),
        f"{HOME}/sub": ("data.csv", "dir-one/"),
        f"{HOME}/sub/dir-one": ("deep.txt",),
    }


def test_a_damaged_or_endless_archive_gives_what_was_read() -> None:
    data = _archive(("a.txt", False), ("b.txt", False))
    assert editor.archive_tree(data[: len(data) // 2])[HOME] in ((), ("a.txt",), ("a.txt", "b.txt"))
    assert editor.archive_tree(b"not an archive") == {HOME: ()}
    many = _archive(*((f"f{index:03}", False) for index in range(50)))
    assert len(editor.archive_tree(many, max_members=10)[HOME]) == 10
    assert len(editor.archive_tree(many, max_bytes=4096)[HOME]) < 50


def test_matches_are_sorted_without_case_and_unique() -> None:
    known = knowledge(functions=("Beta", "alpha"), aliases=("alpha",), executables=("beta",))
    assert [m for m in matches("", known) if m.lower() in ("alpha", "beta")] == [
        "alpha",
        "Beta",
        "beta",
    ]


# -- inspection -----------------------------------------------------------------------------------


def inspected(code: str, known: editor.Knowledge, cursor: int | None = None) -> str | None:
    reply = editor.inspect(code, len(code) if cursor is None else cursor, known)
    assert reply["status"] == "ok"
    if not reply["found"]:
        return None
    return str(reply["data"]["text/plain"])


def test_inspection_says_what_a_word_is_in_this_notebook_and_sandbox() -> None:
    known = knowledge(
        variables=("count",),
        functions=("greet",),
        environ={"LANG": "C"},
        executables=("python3",),
        libraries={"python": {"numpy": "1.26.4"}, "system": {"python3": None}},
    )
    assert inspected("greet", known) == "greet: a shell function defined in this notebook"
    assert inspected("echo $count", known) == "count: a shell variable (carried)"
    assert (
        inspected("$LANG", known) == "LANG: a shell variable (sent with every cell (%sandbox_env))"
    )
    assert inspected("for", known) == "for: a bash keyword"
    assert inspected("printf", known) == "printf: a bash builtin"
    python3 = inspected("python3 main.py", known, cursor=3)
    assert python3 is not None
    assert "python3: an executable on the sandbox's PATH" in python3
    assert "python3: system package" in python3 and "None" not in python3
    assert inspected("numpy", known) == "numpy: Python module, version 1.26.4"


def test_an_unknown_word_is_said_missing_only_once_the_inventory_is_known() -> None:
    assert inspected("surely_not_a_tool", knowledge()) is None
    missing = inspected("surely_not_a_tool", knowledge(executables=("ls",)))
    assert missing == ("surely_not_a_tool: not found in the sandbox (no such command or library)")
    assert inspected("   ", knowledge(executables=("ls",))) is None


def test_word_at_takes_both_sides_of_the_cursor() -> None:
    assert editor.word_at("echo python3.11-config x", 8) == "python3.11-config"
    assert editor.word_at("a  b", 2) == ""


# -- is_complete ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _bash() -> None:
    if shutil.which("bash") is None:
        pytest.fail("bash is missing: is_complete runs `bash -n`; install bash", pytrace=False)


@pytest.mark.parametrize("code", ["echo hi", "if true; then echo a; fi", "f() { echo; }", ""])
def test_complete_code(code: str) -> None:
    assert editor.is_complete(code) == {"status": "complete"}


@pytest.mark.parametrize(
    ("code", "indent"),
    [
        ("if true; then", "    "),
        ("for i in 1 2; do", "    "),
        ("  while true; do", "      "),
        ("echo 'open quote", ""),
        ("cat <<EOF\nline", ""),
        ("echo a \\", ""),
        ("f() {", "    "),
        ('case "$x" in', "    "),
        ("ls |", "    "),
    ],
)
def test_incomplete_code_gets_an_indent_hint(code: str, indent: str) -> None:
    assert editor.is_complete(code) == {"status": "incomplete", "indent": indent}


@pytest.mark.parametrize("code", ["fi", "done", "echo )"])
def test_invalid_code(code: str) -> None:
    assert editor.is_complete(code) == {"status": "invalid"}


def test_an_escaped_backslash_ends_the_line() -> None:
    assert editor.is_complete("echo a \\\\") == {"status": "complete"}
