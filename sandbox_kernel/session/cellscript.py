"""The bash script a cell becomes, and the bookkeeping it sends back.

The protocol runs each command as a fresh ``bash -c`` and keeps only files between runs. To
feel like a local bash kernel, a cell's script:

1. restores the shell state saved by the previous cell (variables, exported or not, functions,
   aliases, current directory) from ``.sandbox_kernel/state-<random>-<a|b>.sh`` in the
   environment: only the file the kernel's records say this kernel wrote for that
   environment (its name is random per kernel session), never a file an upload or a foreign
   environment could have planted;
2. runs the cell's code in that same shell, so that ``x=1``, ``cd`` or ``f() {...}`` last;
3. on exit (an ``EXIT`` trap: normal end, ``exit N``, ``set -e``, a syntax error) writes the
   new state and a bookkeeping file, and exits with the user's own status.

The bookkeeping file is the request's ``result_path``, so it comes back in the same response.
Its first line is a per-cell nonce: a stale file left by an earlier cell (one that timed out
before its trap ran) is never taken for this cell's. Files shown with ``display`` are listed
from the cell's shell (what ``display`` recorded), never from the folder they are copied to:
a file planted there by anything else is not shown.

Stdout and stderr are stripped by the server (contract, "Execution semantics"); the script
frames them with ``\\x02`` ... ``\\x03`` (not whitespace, so not stripped) to keep the cell's
leading and trailing blank lines and indentation.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable

from ..protocol import SERVER_NOTE

STATE_DIR = ".sandbox_kernel"
RESULT_PATH = f"{STATE_DIR}/result"
DISPLAY_DIR = f"{STATE_DIR}/display"
#: Entries of the current directory the bookkeeping lists at most (completion, the panel).
LISTED_ENTRIES = 500
START, END = "\x02", "\x03"

#: Shell variables that belong to bash (or to this script) and are never saved.
_BASH_VARIABLES = (
    "BASH BASHOPTS BASHPID BASH_ALIASES BASH_ARGC BASH_ARGV BASH_ARGV0 BASH_CMDS BASH_COMMAND "
    "BASH_EXECUTION_STRING BASH_LINENO BASH_LOADABLES_PATH BASH_REMATCH BASH_SOURCE "
    "BASH_SUBSHELL BASH_VERSINFO BASH_VERSION COLUMNS COMP_WORDBREAKS DIRSTACK EPOCHREALTIME "
    "EPOCHSECONDS EUID FUNCNAME GROUPS HISTCMD HOSTNAME HOSTTYPE IFS LINENO LINES MACHTYPE "
    "OPTERR OPTIND OSTYPE PIPESTATUS PPID PS4 PWD RANDOM SECONDS SHELLOPTS SHLVL SRANDOM UID _ "
    # Set by the server for every run (the working directory may move between runs), and for
    # every streamed run (line buffering: docs/protocol-extensions.md).
    "HOME OLDPWD LD_PRELOAD PYTHONUNBUFFERED _STDBUF_I _STDBUF_O _STDBUF_E"
)

# The whole prologue and exit trap use bash builtins only (no fork in the common path): each
# fork+exec costs about a millisecond, and this runs for every cell. The state is written to
# one of the session's two files in turn (state-<session>-a.sh, -b.sh) and the kernel says
# which one to restore, so that a cell killed while saving never leaves a half-written state
# behind; files of other sessions go (one rm) once this session has written its own.
_PROLOGUE = r"""
__sk_nonce=@NONCE@
__sk_environ=' @ENVIRON@ '
__sk_skip=' @SKIP@ '
__sk_root=$PWD
__sk_dir=$PWD/@STATE_DIR@
__sk_user_exit=
__sk_state=@STATE@
__sk_next=@NEXT@
__sk_shown=()
[ -d "$__sk_dir" ] || mkdir -p "$__sk_dir"
[ -d "$__sk_dir/display" ] && rm -rf "$__sk_dir/display"

__sk_collect() {  # fill __sk_vars and __sk_funcs with what is worth saving
    local IFS=$' \t\n' __sk_name __sk_all
    compgen -v >"$__sk_dir/names"
    mapfile -t __sk_all <"$__sk_dir/names"
    __sk_vars=()
    for __sk_name in "${__sk_all[@]}"; do
        case "$__sk_skip$__sk_environ" in *" $__sk_name "*) continue ;; esac
        case $__sk_name in __sk_*) continue ;; esac
        case ${!__sk_name@a} in *r*) continue ;; esac  # readonly
        __sk_vars+=("$__sk_name")
    done
    compgen -A function >"$__sk_dir/names"
    mapfile -t __sk_all <"$__sk_dir/names"
    __sk_funcs=()
    for __sk_name in "${__sk_all[@]}"; do
        case $__sk_name in __sk_* | display | trap) ;; *) __sk_funcs+=("$__sk_name") ;; esac
    done
}

__sk_save() {
    local __sk_status=$? IFS=$' \t\n' __sk_name __sk_entries __sk_i
    local -a __sk_vars __sk_funcs
    set +eu +C +o pipefail  # the user's shell options must not break the saving
    builtin trap - EXIT
    if [ -n "$__sk_user_exit" ]; then  # the cell's own EXIT trap runs first
        (exit "$__sk_status")
        eval "$__sk_user_exit"
    fi
    printf '\003'
    printf '\003' >&2
    [ -d "$__sk_dir" ] || mkdir -p "$__sk_dir"
    __sk_collect
    __sk_cwd=$PWD  # as the protocol names it (/home/student/...), whatever the real path
    [ "${PWD#"$__sk_root"}" != "$PWD" ] && __sk_cwd=/home/student${PWD#"$__sk_root"}
    {
        ((${#__sk_vars[@]})) && declare -p "${__sk_vars[@]}"
        ((${#__sk_funcs[@]})) && declare -f "${__sk_funcs[@]}"
        alias -p
        if [ "$PWD" = "$__sk_root" ] || [ "${PWD#"$__sk_root"/}" != "$PWD" ]; then
            printf 'cd -- "$PWD"%q 2>/dev/null || true\n' "${PWD#"$__sk_root"}"
        else
            printf 'cd -- %q 2>/dev/null || true\n' "$PWD"
        fi
    } >"$__sk_dir/$__sk_next" 2>/dev/null
    {
        printf '%s\n#status %s\n#cwd %s\n#state %s\n#display\n' \
            "$__sk_nonce" "$__sk_status" "$__sk_cwd" "$__sk_next"
        ((${#__sk_shown[@]})) && printf '%s\n' "${__sk_shown[@]}"
        printf '#files\n'
        shopt -s nullglob dotglob
        __sk_entries=(*)
        for __sk_name in "${__sk_entries[@]:0:@LISTED@}"; do
            [ -d "$__sk_name" ] && printf '%s/\n' "$__sk_name" || printf '%s\n' "$__sk_name"
        done
        printf '#variables\n'
        ((${#__sk_vars[@]})) && printf '%s\n' "${__sk_vars[@]}"
        printf '#functions\n'
        ((${#__sk_funcs[@]})) && printf '%s\n' "${__sk_funcs[@]}"
        printf '#aliases\n'
        compgen -a || true
    } >"$__sk_dir/result" 2>/dev/null
    __sk_entries=("$__sk_dir"/state-*.sh)
    if ((${#__sk_entries[@]} > 2)); then  # another session's: the kernel's two are kept
        local -a __sk_old=()
        for __sk_name in "${__sk_entries[@]}"; do
            case ${__sk_name##*/} in
            "$__sk_state" | "$__sk_next") ;;
            *) __sk_old+=("$__sk_name") ;;
            esac
        done
        rm -f -- "${__sk_old[@]}"
    fi
    exit "$__sk_status"
}
trap __sk_save EXIT

trap() {  # an EXIT trap of the cell's runs before the state is saved, not instead
    local __sk_action __sk_signal
    local -a __sk_others=()
    [ "$1" = -- ] && shift
    if [ "$#" -lt 2 ] || { [ "${1:0:1}" = - ] && [ "$1" != - ]; }; then
        builtin trap "$@"
        return
    fi
    __sk_action=$1
    shift
    for __sk_signal in "$@"; do
        case $__sk_signal in
        EXIT | 0) __sk_user_exit=$__sk_action && [ "$__sk_action" = - ] && __sk_user_exit= ;;
        *) __sk_others+=("$__sk_signal") ;;
        esac
    done
    ((${#__sk_others[@]} == 0)) || builtin trap -- "$__sk_action" "${__sk_others[@]}"
}

display() {  # display FILE...: show files inline below the cell (recorded in this shell)
    local __sk_file __sk_copy
    [ -d "$__sk_dir/display" ] || mkdir -p "$__sk_dir/display" || return 1
    for __sk_file in "$@"; do
        if [ ! -f "$__sk_file" ]; then
            printf 'display: %s: no such file\n' "$__sk_file" >&2
            return 1
        fi
        __sk_copy=${#__sk_shown[@]}-${__sk_file##*/}
        cp -- "$__sk_file" "$__sk_dir/display/$__sk_copy" || return 1
        __sk_shown+=("$__sk_copy")
    done
}
@ENVIRON_BACKUP@
[ -n "$__sk_state" ] && [ -f "$__sk_dir/$__sk_state" ] && . "$__sk_dir/$__sk_state"
@ENVIRON_RESTORE@
shopt -s expand_aliases
printf '\002'
printf '\002' >&2
"""


def build_script(
    code: str, nonce: str, environ_names: Iterable[str], state: str | None, next_state: str
) -> str:
    """The whole cell as one ``bash -c`` script: prologue, then the user's code verbatim.

    ``state`` is the state file to restore, one this kernel wrote for the environment (see
    :mod:`.records`); None restores no shell state. The new state goes to ``next_state``
    (see :func:`next_state_file`).
    """
    names = sorted(environ_names)
    backup = restore = ""
    if names:  # variables sent as environ win over the saved state
        backup = f'declare -p {" ".join(names)} >"$__sk_dir/environ" 2>/dev/null'
        restore = '. "$__sk_dir/environ"'
    prologue = (
        _PROLOGUE.replace("@NONCE@", shlex.quote(nonce))
        .replace("@ENVIRON@", " ".join(names))
        .replace("@ENVIRON_BACKUP@", backup)
        .replace("@ENVIRON_RESTORE@", restore)
        .replace("@STATE@", shlex.quote(state) if state else "''")
        .replace("@NEXT@", shlex.quote(next_state))
        .replace("@SKIP@", _BASH_VARIABLES)
        .replace("@STATE_DIR@", STATE_DIR)
        .replace("@LISTED@", str(LISTED_ENTRIES))
    )
    return f"{prologue.lstrip()}{code}\n"


def next_state_file(session: str, current: str | None) -> str:
    """The state file (in ``STATE_DIR``) the next cell of the kernel session ``session`` (a
    random token) writes: the one of the session's two that is not ``current``."""
    if current == f"state-{session}-a.sh":
        return f"state-{session}-b.sh"
    return f"state-{session}-a.sh"


@dataclasses.dataclass
class Bookkeeping:
    """What the cell's exit trap reported: the shell state after the cell."""

    status: int | None = None
    cwd: str | None = None
    state: str | None = None
    display: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)
    variables: list[str] = dataclasses.field(default_factory=list)
    functions: list[str] = dataclasses.field(default_factory=list)
    aliases: list[str] = dataclasses.field(default_factory=list)


def parse_bookkeeping(result: str | None, nonce: str) -> Bookkeeping | None:
    """The bookkeeping of *this* cell, or None (missing, or stale: another cell's nonce)."""
    if not result:
        return None
    first, _, rest = result.partition("\n")
    if first.strip() != nonce:
        return None
    book = Bookkeeping()
    section: list[str] | None = None
    for line in rest.splitlines():
        if line.startswith("#status "):
            value = line.split(" ", 1)[1].strip()
            book.status = int(value) if value.lstrip("-").isdigit() else None
        elif line.startswith("#cwd "):
            book.cwd = line.split(" ", 1)[1]
        elif line.startswith("#state "):
            book.state = line.split(" ", 1)[1].strip()
        elif line.startswith("#") and line[1:] in (
            "display",
            "files",
            "variables",
            "functions",
            "aliases",
        ):
            section = getattr(book, line[1:])
        elif section is not None and line and line != f"{STATE_DIR}/":
            section.append(line)
    return book


@dataclasses.dataclass
class Streams:
    """A cell's stdout or stderr, split into what the cell printed and what the server added."""

    text: str
    added: str = ""
    complete: bool = True  # False when the end marker never came (the cell was killed)


def unframe(raw: str) -> Streams:
    """Undo the ``\\x02``/``\\x03`` framing (see the module docstring)."""
    if raw.startswith(START):
        raw = raw[1:]
    elif START in raw:  # something printed before the prologue's marker (never expected)
        raw = raw.replace(START, "", 1)
    end = raw.rfind(END)
    if end < 0:
        return Streams(raw, complete=False)
    return Streams(raw[:end], raw[end + 1 :].strip("\n"))


_BASH_LINE = re.compile(r"^(\S*bash: )(?:-c: )?line (\d+):", re.MULTILINE)


def user_line_numbers(stderr: str, offset: int) -> str:
    """``bash: line 80:`` -> ``bash: line 3:``: count lines from the cell's first line."""

    def shift(match: re.Match[str]) -> str:
        line = int(match.group(2)) - offset
        return f"{match.group(1)}line {line}:" if line > 0 else match.group(0)

    return _BASH_LINE.sub(shift, stderr)


#: Characters after an end marker that can still be the exit trap's (beyond: the cell's own).
_MAX_HELD = 64 * 1024


class LiveFrames:
    """Undo the framing of a cell's output as it streams in (see :func:`unframe`).

    Text before ``\\x02`` is shown as :func:`unframe` shows it; from the latest ``\\x03`` on,
    text is held back: only the end of the run tells whether that ``\\x03`` was the exit
    trap's (then what follows belongs to the trap, and the final answer tells the rest) or one
    the cell printed (then it is shown with what follows, when more comes). Past ``limit``
    characters shown, the rest is counted and dropped: a ``yes`` cell never floods the
    notebook.
    """

    def __init__(self, limit: int, prologue_lines: int = 0) -> None:
        self.limit = limit
        self.prologue_lines = prologue_lines
        self.shown = 0
        #: Characters of the cell's output not shown because of ``limit``.
        self.dropped = 0
        self._started = {"stdout": False, "stderr": False}
        self._held = {"stdout": "", "stderr": ""}

    def feed(self, stream: str, text: str) -> str:
        """What to show now of a chunk of ``stream`` ("stdout" or "stderr")."""
        if not self._started[stream] and START in text:
            text = text.replace(START, "", 1)
            self._started[stream] = True
        text = self._held[stream] + text
        end = text.rfind(END)
        if end >= 0:
            text, self._held[stream] = text[:end], text[end:]
        else:
            self._held[stream] = ""
        if len(self._held[stream]) > _MAX_HELD:  # the exit trap adds a line or two, no more:
            text, self._held[stream] = text + self._held[stream], ""  # that one was the cell's
        if stream == "stderr":  # a write of bash's is one chunk: its line number is whole
            text = user_line_numbers(text, self.prologue_lines)
        room = max(0, self.limit - self.shown)
        if len(text) > room:
            self.dropped += len(text) - room
            text = text[:room]
        self.shown += len(text)
        return text


def server_notes(stderr: str) -> list[str]:
    """The server's ``[sandbox] ...`` lines ending a command's (final, stripped) stderr."""
    notes: list[str] = []
    for line in reversed(stderr.splitlines()):
        if not line.startswith(SERVER_NOTE):
            break
        notes.insert(0, line)
    return notes
