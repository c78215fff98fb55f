"""The bash script a cell becomes, and the bookkeeping it sends back.

The protocol runs each command as a fresh ``bash -c`` and keeps only files between runs. To
feel like a local bash kernel, a cell's script:

1. restores the shell state saved by the previous cell (variables, exported or not, functions,
   aliases, current directory) from ``.sandbox_kernel/state.sh`` in the environment;
2. runs the cell's code in that same shell, so that ``x=1``, ``cd`` or ``f() {...}`` last;
3. on exit (an ``EXIT`` trap: normal end, ``exit N``, ``set -e``, a syntax error) writes the
   new state and a bookkeeping file, and exits with the user's own status.

The bookkeeping file is the request's ``result_path``, so it comes back in the same response.
Its first line is a per-cell nonce: a stale file left by an earlier cell (one that timed out
before its trap ran) is never taken for this cell's.

Stdout and stderr are stripped by the server (contract, "Execution semantics"); the script
frames them with ``\\x02`` ... ``\\x03`` (not whitespace, so not stripped) to keep the cell's
leading and trailing blank lines and indentation.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterable

STATE_DIR = ".sandbox_kernel"
RESULT_PATH = f"{STATE_DIR}/result"
DISPLAY_DIR = f"{STATE_DIR}/display"
START, END = "\x02", "\x03"

#: Shell variables that belong to bash (or to this script) and are never saved.
_BASH_VARIABLES = (
    "BASH BASHOPTS BASHPID BASH_ALIASES BASH_ARGC BASH_ARGV BASH_ARGV0 BASH_CMDS BASH_COMMAND "
    "BASH_EXECUTION_STRING BASH_LINENO BASH_LOADABLES_PATH BASH_REMATCH BASH_SOURCE "
    "BASH_SUBSHELL BASH_VERSINFO BASH_VERSION COLUMNS COMP_WORDBREAKS DIRSTACK EPOCHREALTIME "
    "EPOCHSECONDS EUID FUNCNAME GROUPS HISTCMD HOSTNAME HOSTTYPE IFS LINENO LINES MACHTYPE "
    "OPTERR OPTIND OSTYPE PIPESTATUS PPID PS4 PWD RANDOM SECONDS SHELLOPTS SHLVL SRANDOM UID _"
)

_PROLOGUE = r"""
__sk_nonce=@NONCE@
__sk_environ=' @ENVIRON@ '
__sk_skip=' @SKIP@ '
__sk_home=$PWD
__sk_dir=$__sk_home/@STATE_DIR@
mkdir -p "$__sk_dir" && rm -rf "$__sk_dir/display"

__sk_names() {  # the shell variables worth saving, one per line
    local IFS=$' \t\n' __sk_name __sk_flags
    for __sk_name in $(compgen -v); do
        case "$__sk_skip$__sk_environ" in *" $__sk_name "*) continue ;; esac
        case $__sk_name in __sk_*) continue ;; esac
        __sk_flags=$(declare -p "$__sk_name" 2>/dev/null) || continue
        __sk_flags=${__sk_flags#declare -}
        case ${__sk_flags%% *} in *r*) continue ;; esac  # readonly
        printf '%s\n' "$__sk_name"
    done
}

__sk_functions() {
    local IFS=$' \t\n' __sk_name
    for __sk_name in $(compgen -A function); do
        case $__sk_name in __sk_* | display) ;; *) printf '%s\n' "$__sk_name" ;; esac
    done
}

__sk_save() {
    local __sk_status=$? IFS=$' \t\n' __sk_name
    trap - EXIT
    printf '\003'
    printf '\003' >&2
    mkdir -p "$__sk_dir"
    {
        for __sk_name in $(__sk_names); do declare -p "$__sk_name"; done
        for __sk_name in $(__sk_functions); do declare -f "$__sk_name"; done
        alias -p
        printf 'cd -- %q 2>/dev/null || true\n' "$PWD"
    } >"$__sk_dir/state.sh.new" 2>/dev/null && mv -f "$__sk_dir/state.sh.new" "$__sk_dir/state.sh"
    {
        printf '%s\n' "$__sk_nonce"
        printf '#status %s\n#cwd %s\n' "$__sk_status" "$PWD"
        printf '#display\n'
        [ -d "$__sk_dir/display" ] && ls -1 "$__sk_dir/display" | sort -n
        printf '#files\n'
        ls -1Ap 2>/dev/null | head -n 500
        printf '#variables\n'
        __sk_names
        printf '#functions\n'
        __sk_functions
        printf '#aliases\n'
        compgen -a
    } >"$__sk_dir/result" 2>/dev/null
    exit "$__sk_status"
}
trap __sk_save EXIT

display() {  # display FILE...: show files inline below the cell
    local __sk_file __sk_count
    mkdir -p "$__sk_dir/display" || return 1
    for __sk_file in "$@"; do
        if [ ! -f "$__sk_file" ]; then
            printf 'display: %s: no such file\n' "$__sk_file" >&2
            return 1
        fi
        __sk_count=$(ls -1 "$__sk_dir/display" | wc -l)
        cp -- "$__sk_file" "$__sk_dir/display/$__sk_count-${__sk_file##*/}" || return 1
    done
}

__sk_backup=$(declare -p@ENVIRON_LIST@ 2>/dev/null)
if [ -f "$__sk_dir/state.sh" ]; then . "$__sk_dir/state.sh"; fi
eval "$__sk_backup"  # variables sent as environ win over the saved state
unset __sk_backup
shopt -s expand_aliases
printf '\002'
printf '\002' >&2
"""


def build_script(code: str, nonce: str, environ_names: Iterable[str]) -> str:
    """The whole cell as one ``bash -c`` script: prologue, then the user's code verbatim."""
    names = sorted(environ_names)
    prologue = (
        _PROLOGUE.replace("@NONCE@", shlex.quote(nonce))
        .replace("@ENVIRON@", " ".join(names))
        .replace("@ENVIRON_LIST@", "".join(f" {name}" for name in names) or " __sk_none")
        .replace("@SKIP@", _BASH_VARIABLES)
        .replace("@STATE_DIR@", STATE_DIR)
    )
    return f"{prologue.lstrip()}{code}\n"


@dataclasses.dataclass
class Bookkeeping:
    """What the cell's exit trap reported: the shell state after the cell."""

    status: int | None = None
    cwd: str | None = None
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
        elif line.startswith("#") and line[1:] in ("display", "files", "variables", "functions",
                                                     "aliases"):  # fmt: skip
            section = getattr(book, line[1:])
        elif section is not None and line:
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
