"""A cell's bash script (``session/cellscript.py``) run by a local bash, in-process.

The server runs each command as ``bash -c`` in the environment's working directory, with the
request's ``environ`` as environment variables, and strips stdout and stderr (contract,
"Execution semantics"). :class:`LocalShell` does the same in a temporary folder, so the
script's real work (framing, shell state carried from cell to cell, bookkeeping, exit status,
``display``) is checked without a server; the sandbox's isolation is the other suites' work.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from sandbox_kernel.session.cellscript import (
    DISPLAY_DIR,
    END,
    RESULT_PATH,
    START,
    STATE_DIR,
    Bookkeeping,
    LiveFrames,
    Streams,
    build_script,
    next_state_file,
    parse_bookkeeping,
    server_notes,
    unframe,
)


@dataclasses.dataclass
class LocalCell:
    """What one cell gave back: its unframed streams, bash's exit status, its bookkeeping."""

    stdout: Streams
    stderr: Streams
    exit_code: int
    book: Bookkeeping | None


class LocalShell:
    """One kernel session's cells, run by a local bash in ``root`` as the server runs them."""

    def __init__(self, root: Path) -> None:
        bash = shutil.which("bash")
        if bash is None:
            pytest.fail("bash is missing: install the Debian package bash", pytrace=False)
        self.bash = bash
        self.root = root
        self.session = secrets.token_hex(6)
        self.state: str | None = None

    def run(self, code: str, environ: Mapping[str, str] | None = None) -> LocalCell:
        environ = dict(environ or {})
        nonce = secrets.token_hex(8)
        next_state = next_state_file(self.session, self.state)
        script = build_script(code, nonce, environ, self.state, next_state)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root), **environ}
        done = subprocess.run(
            [self.bash, "-c", script],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        result_file = self.root / RESULT_PATH
        result = result_file.read_text() if result_file.exists() else None
        book = parse_bookkeeping(result, nonce)
        if book is not None and book.state == next_state:
            self.state = book.state  # as the session adopts it
        # The server strips both streams: the framing must survive that.
        return LocalCell(
            unframe(done.stdout.strip()), unframe(done.stderr.strip()), done.returncode, book
        )


@pytest.fixture
def shell(tmp_path: Path) -> LocalShell:
    return LocalShell(tmp_path)


# -- one cell -------------------------------------------------------------------------------------


def test_blank_lines_and_indentation_survive_the_servers_stripping(shell: LocalShell) -> None:
    cell = shell.run("printf '\\n  indented\\n\\n'; printf '\\n\\terr\\n' >&2")
    assert cell.stdout == Streams("\n  indented\n\n")
    assert cell.stderr == Streams("\n\terr\n")
    assert cell.exit_code == 0


def test_bookkeeping_reports_status_directory_files_and_definitions(shell: LocalShell) -> None:
    cell = shell.run(
        "mkdir -p work/sub && touch work/notes.txt && cd work\n"
        "count=3; greet() { echo hi; }; alias ll='ls -1'"
    )
    book = cell.book
    assert book is not None, "no bookkeeping for this cell"
    assert book.status == 0
    assert book.cwd == "/home/student/work", "the directory is named as the sandbox names it"
    assert book.state == next_state_file(shell.session, None)
    assert book.files == ["notes.txt", "sub/"]
    assert "count" in book.variables
    assert book.functions == ["greet"]
    assert book.aliases == ["ll"]


def test_bash_and_kernel_variables_are_not_carried(shell: LocalShell) -> None:
    book = shell.run("mine=1; readonly fixed=2").book
    assert book is not None
    assert "mine" in book.variables
    kept = set(book.variables)
    for name in ("BASH_VERSION", "PWD", "OLDPWD", "HOME", "RANDOM", "PIPESTATUS", "fixed"):
        assert name not in kept, f"{name} would be restored by the next cell"
    assert not [name for name in kept if name.startswith("__sk_")]
    assert shell.run("echo $mine").stdout.text == "1\n"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("exit 3", 3),
        ("set -e; false; echo not reached", 1),
        ("no_such_command_here", 127),
        ("if true; then echo", 2),  # a syntax error: the trap still runs
        ("(exit 5)", 5),
    ],
)
def test_the_users_exit_status_is_kept_and_the_state_saved(
    shell: LocalShell, code: str, status: int
) -> None:
    shell.run("before=kept")
    cell = shell.run(code)
    assert cell.exit_code == status, cell.stderr
    assert cell.book is not None and cell.book.status == status
    assert "not reached" not in cell.stdout.text
    assert shell.run('echo "$before"').stdout.text == "kept\n"


def test_the_cells_own_exit_trap_runs_before_the_state_is_saved(shell: LocalShell) -> None:
    cell = shell.run("trap 'echo cleanup ran' EXIT; trapped=yes")
    assert cell.stdout.text == "cleanup ran\n"
    assert cell.book is not None and "trapped" in cell.book.variables
    after = shell.run('echo "$trapped"')
    assert after.stdout.text == "yes\n", "the cell's trap is not carried to the next cell"


# -- cell after cell ---------------------------------------------------------------------------


def test_variables_functions_aliases_and_directory_carry_across_cells(shell: LocalShell) -> None:
    first = shell.run(
        "x=41; export Y=exported; declare -a list=(a 'b c'); declare -A map=([k]=v)\n"
        "greet() { echo \"hello $1\"; }\nalias ll='ls -1'\n"
        "mkdir -p work/sub && cd work && echo data > file.txt"
    )
    assert first.exit_code == 0, first.stderr
    second = shell.run(
        'echo $((x + 1)) $Y "${list[1]}" ${map[k]}; greet you; pwd; ll; cat file.txt; '
        "bash -c 'echo child sees $Y'"
    )
    assert second.stdout.text == (
        f"42 exported b c v\nhello you\n{shell.root}/work\nfile.txt\nsub\ndata\n"
        "child sees exported\n"
    )
    assert second.book is not None and second.book.cwd == "/home/student/work"


def test_state_files_alternate_and_a_killed_cell_keeps_the_last_state(shell: LocalShell) -> None:
    shell.run("n=1")
    first_state = shell.state
    shell.run("n=2")
    assert {first_state, shell.state} == {
        f"state-{shell.session}-a.sh",
        f"state-{shell.session}-b.sh",
    }
    killed = shell.run("n=3; kill -KILL $$")
    assert killed.exit_code == -9, "bash died of SIGKILL (the server reports 137)"
    assert killed.book is None, "the result file left is the last cell's (another nonce)"
    assert not killed.stdout.complete, "a killed cell never wrote its end marker"
    assert shell.run("echo $n").stdout.text == "2\n", "the last completed cell's state"


def test_sent_environ_wins_over_the_saved_state(shell: LocalShell) -> None:
    shell.run("A=saved; B=saved")
    cell = shell.run('echo "$A $B"', environ={"A": "sent"})
    assert cell.stdout.text == "sent saved\n"
    assert cell.book is not None and "A" not in cell.book.variables, "environ is never saved"


def test_only_this_sessions_state_is_restored(shell: LocalShell) -> None:
    """A state file another session (or an upload) left in the folder is never sourced, and
    goes once this session has written its own."""
    state_dir = shell.root / STATE_DIR
    state_dir.mkdir()
    planted = [state_dir / "state-other-a.sh", state_dir / "state-other-b.sh"]
    for path in planted:
        path.write_text("echo planted; injected=1\n")
    cell = shell.run('echo "${injected:-clean}"')
    assert cell.stdout.text == "clean\n"
    assert not [path for path in planted if path.exists()], "another session's files stay"
    assert shell.run('echo "${injected:-clean}"').stdout.text == "clean\n"


# -- display ---------------------------------------------------------------------------------------


def test_display_records_the_files_shown_by_the_cell(shell: LocalShell) -> None:
    cell = shell.run("mkdir d; echo one > d/a.txt; echo two > b.txt; display d/a.txt b.txt")
    assert cell.book is not None
    assert cell.book.display == ["0-a.txt", "1-b.txt"]
    shown = shell.root / DISPLAY_DIR
    assert (shown / "0-a.txt").read_text() == "one\n"
    assert (shown / "1-b.txt").read_text() == "two\n"
    after = shell.run("true").book
    assert after is not None
    assert (after.display, after.files) == ([], ["b.txt", "d/"]), "the next cell shows nothing"
    assert not shown.exists(), "the copies of the last cell are gone"


def test_display_of_a_missing_file_says_so(shell: LocalShell) -> None:
    cell = shell.run("display nowhere.png")
    assert cell.exit_code == 1
    assert cell.stderr.text == "display: nowhere.png: no such file\n"
    assert cell.book is not None and cell.book.display == []


def test_a_file_planted_in_the_display_folder_is_not_shown(shell: LocalShell) -> None:
    (shell.root / DISPLAY_DIR).mkdir(parents=True)
    (shell.root / DISPLAY_DIR / "0-evil.html").write_text("<script>")
    cell = shell.run("echo quiet")
    assert cell.book is not None and cell.book.display == []


# -- the pieces, on given text -------------------------------------------------------------------


def test_unframe_separates_what_the_server_added() -> None:
    assert unframe(f"{START}out\n{END}") == Streams("out\n")
    assert unframe(f"{START}out{END}\nKilled") == Streams("out", "Killed")
    assert unframe(f"noise{START}out{END}") == Streams("noiseout")
    killed = unframe(f"{START}partial")
    assert (killed.text, killed.complete) == ("partial", False)
    assert unframe("") == Streams("", complete=False)


def test_stale_or_missing_bookkeeping_is_ignored() -> None:
    result = "nonce-1\n#status 0\n#cwd /home/student\n#state state-s-a.sh\n#files\nf\n"
    assert parse_bookkeeping(result, "nonce-2") is None, "another cell's file"
    assert parse_bookkeeping(None, "nonce-1") is None
    assert parse_bookkeeping("", "nonce-1") is None
    book = parse_bookkeeping(result, "nonce-1")
    assert book == Bookkeeping(status=0, cwd="/home/student", state="state-s-a.sh", files=["f"])


def test_bookkeeping_odd_lines() -> None:
    result = (
        "n\n#status weird\n#cwd /home/student/with space\n#files\n"
        f"{STATE_DIR}/\nreal/\n\n#variables\nv\n#functions\n#aliases\na\n"
    )
    book = parse_bookkeeping(result, "n")
    assert book is not None
    assert book.status is None, "a status that is not a number is unknown, not an error"
    assert book.cwd == "/home/student/with space"
    assert book.files == ["real/"], "the kernel's own folder is not the user's"
    assert (book.variables, book.functions, book.aliases) == (["v"], [], ["a"])


def test_next_state_file_alternates_between_the_sessions_two() -> None:
    assert next_state_file("s1", None) == "state-s1-a.sh"
    assert next_state_file("s1", "state-s1-a.sh") == "state-s1-b.sh"
    assert next_state_file("s1", "state-s1-b.sh") == "state-s1-a.sh"
    assert next_state_file("s1", "state-s2-a.sh") == "state-s1-a.sh", "another session's"


def test_the_users_code_ends_the_script_verbatim() -> None:
    code = "cat <<'EOF'\n@NONCE@ $x\nEOF"
    script = build_script(code, "n'1", ["B", "A"], None, "state-s-a.sh")
    assert script.endswith("\n" + code + "\n")
    assert "__sk_nonce='n'\"'\"'1'" in script, "the nonce is quoted for bash"
    assert "declare -p A B " in script, "environ names sorted, backed up before the state"


def test_live_frames_hide_markers_and_what_follows_the_end() -> None:
    live = LiveFrames(limit=1000)
    shown = [live.feed("stdout", chunk) for chunk in ("\x02he", "llo\n", "bye\n\x03", "trap\n")]
    assert "".join(shown) == "hello\nbye\n"
    assert live.feed("stderr", "\x02oops\n") == "oops\n"


def test_live_frames_release_an_end_marker_the_cell_printed() -> None:
    """Only the last \\x03 can be the exit trap's: one followed by more output was the cell's."""
    live = LiveFrames(limit=1000)
    assert live.feed("stdout", "\x02a\x03b") == "a"
    assert live.feed("stdout", "c\x03") == "\x03bc"
    assert live.feed("stdout", "after the trap") == ""


def test_live_frames_cut_past_the_limit_and_count_the_rest() -> None:
    live = LiveFrames(limit=10)
    assert live.feed("stdout", "\x02" + "y\n" * 4) == "y\n" * 4
    assert live.feed("stderr", "\x02" + "err\n") == "er"
    assert live.feed("stdout", "y\n" * 100) == ""
    assert live.dropped == 2 + 200


def test_server_notes_are_the_trailing_sandbox_lines() -> None:
    stderr = "user line\n[sandbox] not at the end\nmore\n[sandbox] a\n[sandbox] b"
    assert server_notes(stderr) == ["[sandbox] a", "[sandbox] b"]
    assert server_notes("plain") == []


def test_live_frames_hold_back_a_bounded_tail_only() -> None:
    """A stream that prints \\x03 and then megabytes (a hostile cell or server) is not held
    in memory to the end: past what an exit trap could write, the marker was the cell's."""
    live = LiveFrames(limit=10_000_000)
    assert live.feed("stdout", "\x02a\x03") == "a"
    shown = "".join(live.feed("stdout", "x" * 1000) for _ in range(200))
    assert shown == "\x03" + "x" * 200_000
