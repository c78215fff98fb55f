"""Hostile: the seccomp filter inside the sandbox (issue 10, section 7).

A user's program, compiled with gcc inside the sandbox, calls what the filter must refuse:

- each filtered syscall gets EPERM. The arguments are chosen so that, without the filter, all
  but ``pivot_root`` would fail otherwise (EFAULT, EBADF, EINVAL, ENOSYS) or succeed
  (``userfaultfd(UFFD_USER_MODE_ONLY)``, ``unshare(0)``), so an EPERM here is the filter's;
- ``unshare`` (the command and the call) and ``clone`` with a ``CLONE_NEW*`` flag get EPERM
  (without the filter ``CLONE_NEWUSER`` gets ENOSPC from bubblewrap's ``--disable-userns``);
  ``clone3`` gets ENOSYS, and threads, ``posix_spawn`` and ``fork`` still work;
- a syscall through another ABI (i386 ``int $0x80``, x32 numbers), even an allowed one, kills
  the process with SIGSYS (exit status 159); without the filter ``int $0x80`` reaches the
  kernel's i386 ``unshare``;
- ``ptrace`` works: ``PTRACE_TRACEME``, attaching to a child, strace and gdb when installed;
- ``specifications/`` lists what is filtered and which library built the filter.

These cases compile C, start gdb and java: their server has more CPU time, memory and wall
time per run than the other hostile modules (:data:`ROOMIER`); every other cap is theirs.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..conftest import Server
from .conftest import Hostile, make_hostile, stop_and_check

#: What issue 10 says the filter refuses with EPERM whatever the arguments.
EPERM_SYSCALLS = (
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "mount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
)
NAMESPACE_FLAGS = (
    "CLONE_NEWUSER",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWIPC",
    "CLONE_NEWUTS",
    "CLONE_NEWCGROUP",
)
#: Exit status of a command killed by SIGSYS, as bash reports it.
KILLED_BY_SIGSYS = 128 + 31

ROOMIER = ("--cpu-limit", "20", "--execute-timeout", "60", "--memory-limit", "256M")

#: The program each case compiles in the sandbox: ``probe MODE [ARGS]`` prints one line per
#: attempt, ``NAME ok`` or ``NAME ERRNO``.
PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void report(const char *name, long result) {
    if (result < 0)
        printf("%s %s\n", name, strerrorname_np(errno));
    else
        printf("%s ok\n", name);
}

static int syscalls(void) {
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    report("io_uring_enter", syscall(SYS_io_uring_enter, -1, 0, 0, 0, NULL, 0));
    report("io_uring_register", syscall(SYS_io_uring_register, -1, 0, NULL, 0));
    report("keyctl", syscall(SYS_keyctl, -1, 0, 0, 0, 0));
    report("add_key", syscall(SYS_add_key, NULL, NULL, NULL, 0, 0));
    report("request_key", syscall(SYS_request_key, NULL, NULL, NULL, 0));
    report("bpf", syscall(SYS_bpf, -1, NULL, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    report("userfaultfd", syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("kexec_file_load", syscall(SYS_kexec_file_load, -1, -1, 0, NULL, 0));
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("finit_module", syscall(SYS_finit_module, -1, "", 0));
    report("delete_module", syscall(SYS_delete_module, "", 0));
    report("mount", syscall(SYS_mount, NULL, NULL, NULL, 0, NULL));
    report("umount2", syscall(SYS_umount2, "/", -1));
    report("pivot_root", syscall(SYS_pivot_root, NULL, NULL));
    report("unshare", syscall(SYS_unshare, 0));
    report("setns", syscall(SYS_setns, -1, 0));
    return 0;
}

/* clone(2) the way fork() calls it, plus FLAGS; the child exits at once. */
static long clone_with(unsigned long flags) {
    long pid = syscall(SYS_clone, flags | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid(pid, NULL, 0);
    return pid;
}

/* struct clone_args of <linux/sched.h>, version 0. */
struct clone_args_v0 {
    unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static long clone3_with(unsigned long long flags) {
    struct clone_args_v0 args = {.flags = flags, .exit_signal = SIGCHLD};
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid(pid, NULL, 0);
    return pid;
}

static int clones(void) {
    static const struct { const char *name; unsigned long flag; } flags[] = {
        {"CLONE_NEWUSER", 0x10000000}, {"CLONE_NEWNET", 0x40000000},
        {"CLONE_NEWNS", 0x00020000},   {"CLONE_NEWPID", 0x20000000},
        {"CLONE_NEWIPC", 0x08000000},  {"CLONE_NEWUTS", 0x04000000},
        {"CLONE_NEWCGROUP", 0x02000000},
    };
    char name[64];
    report("clone", clone_with(0));
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        snprintf(name, sizeof name, "clone+%s", flags[i].name);
        report(name, clone_with(flags[i].flag));
    }
    report("clone+CLONE_NEWUSER+CLONE_NEWNS", clone_with(0x10000000 | 0x00020000));
    report("clone3", clone3_with(0));
    report("clone3+CLONE_NEWUSER", clone3_with(0x10000000));
    return 0;
}

static void *thread_main(void *argument) { return argument; }

static int threads(void) {
    pthread_t thread[8];
    int started = 0, status = -1;
    for (int i = 0; i < 8; i++)
        if (pthread_create(&thread[i], NULL, thread_main, NULL) == 0)
            started++;
    for (int i = 0; i < started; i++)
        pthread_join(thread[i], NULL);
    printf("pthread_create %d/8\n", started);
    pid_t pid;
    char *argv[] = {"/bin/true", NULL};
    int error = posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ);
    if (error == 0)
        waitpid(pid, &status, 0);
    printf("posix_spawn %s %d\n", error ? strerrorname_np(error) : "ok", status);
    pid = fork();
    if (pid == 0)
        _exit(3);
    waitpid(pid, &status, 0);
    printf("fork %d\n", WEXITSTATUS(status));
    return 0;
}

/* getpid or unshare(0) through another ABI of the kernel. */
static int foreign(const char *abi, const char *call) {
    long result = 0, number;
    int getpid_call = strcmp(call, "getpid") == 0;
    fprintf(stderr, "calling %s %s\n", abi, call);
#ifdef __x86_64__
    if (strcmp(abi, "i386") == 0) {
        number = getpid_call ? 20 : 310;
        __asm__ volatile("int $0x80" : "=a"(result) : "a"(number), "b"(0) : "memory");
    } else {
        number = 0x40000000L | (getpid_call ? 39 : 272);
        __asm__ volatile("syscall" : "=a"(result) : "a"(number), "D"(0) : "rcx", "r11", "memory");
    }
#else
    (void)number, (void)getpid_call;
    fprintf(stderr, "not an x86_64 machine\n");
    return 2;
#endif
    printf("%s %s returned %ld\n", abi, call, result);
    return 0;
}

static int traceme(void) {
    int status;
    pid_t pid = fork();
    if (pid == 0) {
        if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
            _exit(10);
        raise(SIGSTOP);
        _exit(7);
    }
    waitpid(pid, &status, 0);
    printf("traceme stopped %d\n", WIFSTOPPED(status));
    report("PTRACE_CONT", ptrace(PTRACE_CONT, pid, NULL, NULL));
    waitpid(pid, &status, 0);
    printf("traceme exit %d\n", WEXITSTATUS(status));
    return 0;
}

static int attach(void) {
    int status;
    pid_t pid = fork();
    if (pid == 0)
        for (;;)
            pause();
    report("PTRACE_ATTACH", ptrace(PTRACE_ATTACH, pid, NULL, NULL));
    waitpid(pid, &status, 0);
    printf("attach stopped %d\n", WIFSTOPPED(status));
    struct user_regs_struct regs;
    report("PTRACE_GETREGS", ptrace(PTRACE_GETREGS, pid, NULL, &regs));
    report("PTRACE_DETACH", ptrace(PTRACE_DETACH, pid, NULL, NULL));
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc >= 2 && strcmp(argv[1], "syscalls") == 0)
        return syscalls();
    if (argc >= 2 && strcmp(argv[1], "clones") == 0)
        return clones();
    if (argc >= 2 && strcmp(argv[1], "threads") == 0)
        return threads();
    if (argc >= 4 && strcmp(argv[1], "foreign") == 0)
        return foreign(argv[2], argv[3]);
    if (argc >= 2 && strcmp(argv[1], "traceme") == 0)
        return traceme();
    if (argc >= 2 && strcmp(argv[1], "attach") == 0)
        return attach();
    fprintf(stderr, "usage: probe syscalls|clones|threads|traceme|attach|foreign ABI CALL\n");
    return 2;
}
"""

#: Writes and compiles the probe in the working directory (the marker names it, so that the
#: harness finds any process left running).
COMPILE = (
    f"cat > probe.c <<'PROBE_EOF'\n{PROBE_C}\nPROBE_EOF\n"
    "gcc -Wall -g -pthread -o probe{m} probe.c"
)


@pytest.fixture(scope="module")
def hostile(
    start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    """The module's server: the hostile caps, with :data:`ROOMIER` runs."""
    if shutil.which("gcc") is None:
        pytest.fail(
            "gcc is missing: these cases compile a C program inside the sandbox; install the "
            "Debian package gcc (apt-get install -y gcc)",
            pytrace=False,
        )
    harness = make_hostile(start_server, tmp_path_factory, *ROOMIER)
    yield harness
    stop_and_check(harness)


def run_probe(hostile: Hostile, marker: str, *commands: str) -> list[dict[str, Any]]:
    """Compile the probe, then run ``commands`` (``{m}``: the marker; a leading ``-`` lets the
    run go on after a failure); the execution entries of ``commands``, in order."""
    compile_and_run = [with_marker(command, marker) for command in (COMPILE, *commands)]
    answer = hostile.execute({"commands": compile_and_run}, marker)
    execution: list[dict[str, Any]] = answer.json["execution"]
    compiled, *entries = execution
    assert compiled["exit_code"] == 0, f"the probe did not compile: {compiled['stderr']}"
    assert len(entries) == len(commands), f"the run stopped early: {answer.text[:2000]}"
    return entries


def with_marker(command: str, marker: str) -> str:
    """``command`` with ``{m}`` replaced (not ``str.format``: C and shell use braces)."""
    return command.replace("{m}", marker)


def outcomes(entry: dict[str, Any]) -> dict[str, str]:
    """``{name: "ok" or errno name}`` from the probe's lines."""
    assert entry["exit_code"] == 0, entry
    return dict(line.rsplit(" ", 1) for line in entry["stdout"].splitlines())


def seccomp_entry(server: Server) -> dict[str, Any]:
    isolation = server.get("specifications/").json()["container"]["isolation"]
    entry = isolation.get("seccomp")
    assert isinstance(entry, dict), f"no seccomp entry in container.isolation: {isolation}"
    return entry


# -- refused calls ------------------------------------------------------------------------------


def test_every_filtered_syscall_gets_eperm(hostile: Hostile, trial: Callable[..., None]) -> None:
    """All nineteen, each with arguments that would give another answer without the filter
    (except ``pivot_root``, refused anyway for want of a capability)."""

    def case(marker: str) -> None:
        [entry] = run_probe(hostile, marker, "./probe{m} syscalls")
        assert outcomes(entry) == dict.fromkeys(EPERM_SYSCALLS, "EPERM")

    trial(case)


def test_every_process_of_the_sandbox_is_filtered(
    hostile: Hostile, trial: Callable[..., None]
) -> None:
    """PID 1 (bubblewrap's init: it could be traced otherwise), the agent, a ``setsid`` daemon,
    and a command in the runner that replaces one killed by a timeout."""

    def case(marker: str) -> None:
        every_process = (
            "setsid sleep {m} </dev/null >/dev/null 2>&1 & sleep 0.2; "
            "for p in /proc/[0-9]*; do "
            'echo "${p#/proc/} $(grep -s ^Seccomp: $p/status | cut -f2)"; done'
        )
        answer = hostile.execute(
            {
                "commands": [
                    with_marker(every_process, marker),
                    {"command": f"-sleep {marker}", "timeout": 0.5},
                    "grep ^Seccomp: /proc/self/status /proc/1/status",
                ]
            },
            marker,
        )
        listing, timed_out, after = answer.json["execution"]
        modes = dict(line.split(" ", 1) for line in listing["stdout"].splitlines())
        assert len(modes) >= 4 and "1" in modes, listing
        unfiltered = {pid: mode for pid, mode in modes.items() if mode not in ("2", "")}
        assert not unfiltered, f"processes without the filter (mode != 2): {unfiltered}"
        assert modes["1"] == "2", "bubblewrap's PID 1 has no filter"
        assert timed_out["exit_code"] == -2, timed_out
        assert after["stdout"].split() == [
            "/proc/self/status:Seccomp:",
            "2",
            "/proc/1/status:Seccomp:",
            "2",
        ], after

    trial(case)


def test_unshare_command_is_refused(hostile: Hostile, trial: Callable[..., None]) -> None:
    """The util-linux command and the C library call; without the filter, ``-U`` and ``-r``
    fail with "No space left on device" (``--disable-userns``) instead."""
    attempts = [
        "-unshare -U true {m}",
        "-unshare -r true {m}",
        "-unshare -n true {m}",
        "-unshare -m true {m}",
        "-unshare -p -f true {m}",
        "-unshare -U -n -m -p -f true {m}",
    ]
    python = (
        "python3 -c 'import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
        'print(libc.unshare(0x10000000), ctypes.get_errno(), "{m}")\''
    )

    def case(marker: str) -> None:
        commands = [with_marker(command, marker) for command in [*attempts, python]]
        answer = hostile.execute({"commands": commands}, marker)
        *commands_run, call = answer.json["execution"]
        for command, entry in zip(attempts, commands_run, strict=True):
            assert entry["exit_code"] != 0, (command, entry)
            assert "unshare failed: Operation not permitted" in entry["stderr"], (command, entry)
        assert call["stdout"] == f"-1 1 {marker}", "unshare(CLONE_NEWUSER) did not get EPERM"

    trial(case)


def test_clone_with_a_namespace_flag_is_refused(
    hostile: Hostile, trial: Callable[..., None]
) -> None:
    """``clone`` without a ``CLONE_NEW*`` flag works; ``clone3`` gets ENOSYS, whatever its
    flags (they are in memory the filter cannot read)."""

    def case(marker: str) -> None:
        [entry] = run_probe(hostile, marker, "./probe{m} clones")
        expected = {
            "clone": "ok",
            **{f"clone+{flag}": "EPERM" for flag in NAMESPACE_FLAGS},
            "clone+CLONE_NEWUSER+CLONE_NEWNS": "EPERM",
            "clone3": "ENOSYS",
            "clone3+CLONE_NEWUSER": "ENOSYS",
        }
        assert outcomes(entry) == expected

    trial(case)


# -- what must keep working ---------------------------------------------------------------------


def test_threads_and_processes_still_work(hostile: Hostile, trial: Callable[..., None]) -> None:
    """glibc tries ``clone3`` first and falls back to ``clone`` on ENOSYS: pthreads,
    ``posix_spawn``, Python's threads and subprocesses, and Java when installed."""
    python = (
        "python3 -c 'import subprocess, threading\n"
        "done = []\n"
        "workers = [threading.Thread(target=done.append, args=(i,)) for i in range(8)]\n"
        "[w.start() for w in workers]; [w.join() for w in workers]\n"
        'print(len(done), subprocess.run(["echo", "child"], capture_output=True).stdout)\''
    )
    java = "java -Xshare:auto -XX:+UseSerialGC -Xmx32m -version"
    with_java = shutil.which("java") is not None

    def case(marker: str) -> None:
        commands = ["./probe{m} threads", python, *([java] if with_java else [])]
        probe, threads, *jvm = run_probe(hostile, marker, *commands)
        assert probe["stdout"].splitlines() == ["pthread_create 8/8", "posix_spawn ok 0", "fork 3"]
        assert threads["stdout"] == "8 b'child\\n'", threads
        for entry in jvm:
            assert entry["exit_code"] == 0 and "version" in entry["stderr"], entry

    trial(case)


@pytest.mark.parametrize("call", ["getpid", "unshare"])
@pytest.mark.parametrize("abi", ["i386", "x32"])
def test_foreign_architecture_syscall_is_killed(
    hostile: Hostile, trial: Callable[..., None], abi: str, call: str
) -> None:
    """``int $0x80`` (i386) and x32 numbers: even ``getpid`` kills the process, and the i386
    ``unshare`` (which the x86_64 rules would not see) never runs."""
    if platform.machine() != "x86_64":
        pytest.fail(
            f"this case calls the {abi} ABI of an x86_64 kernel; this machine is "
            f"{platform.machine()}: run the suite on x86_64",
            pytrace=False,
        )

    def case(marker: str) -> None:
        [entry] = run_probe(hostile, marker, f"-./probe{marker} foreign {abi} {call}")
        assert entry["stderr"].startswith(f"calling {abi} {call}"), entry
        assert "returned" not in entry["stdout"], f"the {abi} {call} call ran: {entry}"
        assert entry["exit_code"] == KILLED_BY_SIGSYS, entry

    trial(case)


def test_ptrace_works(hostile: Hostile, trial: Callable[..., None]) -> None:
    """``PTRACE_TRACEME`` and attaching to a child (C); strace and gdb when installed."""
    strace = "strace -f -e trace=getpid python3 -c 'import os; os.getpid()' 2>&1 | grep getpid"
    gdb = "gdb -q -batch -ex 'break attach' -ex run -ex bt --args ./probe{m} attach"
    #: (program, command, patterns its stdout matches when tracing worked)
    debuggers = [
        (program, command, shows)
        for program, command, shows in (
            ("strace", strace, [r"getpid\(\)\s+= \d+"]),
            ("gdb", gdb, [r"Breakpoint 1, attach \(\)", r"in main \("]),
        )
        if shutil.which(program) is not None
    ]

    def case(marker: str) -> None:
        traceme, attach, *ran = run_probe(
            hostile,
            marker,
            "./probe{m} traceme",
            "./probe{m} attach",
            *(command for _, command, _ in debuggers),
        )
        assert outcomes(traceme) == {
            "traceme stopped": "1",
            "PTRACE_CONT": "ok",
            "traceme exit": "7",
        }
        assert outcomes(attach) == {
            "PTRACE_ATTACH": "ok",
            "attach stopped": "1",
            "PTRACE_GETREGS": "ok",
            "PTRACE_DETACH": "ok",
        }
        for (program, _, shows), entry in zip(debuggers, ran, strict=True):
            assert entry["exit_code"] == 0, (program, entry)
            for pattern in shows:
                assert re.search(pattern, entry["stdout"]), (program, pattern, entry)

    trial(case)


# -- what the server says -----------------------------------------------------------------------


def test_specifications_list_the_filter(hostile: Hostile, trial: Callable[..., None]) -> None:
    """The filtered calls, the clone flags, the killed ABIs, and the library this interpreter
    imports (Debian's bindings where importable, else pyseccomp)."""
    library = "python3-seccomp" if importlib.util.find_spec("seccomp") else "pyseccomp"

    def case(marker: str) -> None:
        entry = seccomp_entry(hostile.server)
        assert sorted(entry["denied_syscalls"]) == sorted(EPERM_SYSCALLS), entry
        assert sorted(entry["denied_clone_flags"]) == sorted(NAMESPACE_FLAGS), entry
        assert entry["enosys_syscalls"] == ["clone3"], entry
        killed = " ".join(entry["killed_architectures"])
        assert "i386" in killed and "x32" in killed, entry
        assert entry["library"] == library, entry
        assert "ptrace" not in entry["denied_syscalls"]
        print(f"seccomp filter built with {entry['library']}")

    trial(case)
