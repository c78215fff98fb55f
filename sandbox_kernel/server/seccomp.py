"""The seccomp filter bubblewrap installs (``bwrap --seccomp FD``) before it runs the agent.

Inside a runner the user already has no capabilities, no network and, with bubblewrap's
``--disable-userns``, no way to make a user namespace. The filter removes the kernel interfaces
that have been the usual way out of such a sandbox, or that nothing in a sandbox needs:

- EPERM, always, for :data:`FILTERED_SYSCALLS`: io_uring (its own syscall surface, bypassing
  filters of the calls it runs), the key rings, eBPF, perf events, userfaultfd (makes kernel
  races easy to win), kexec and module loading, ``mount``/``umount2``/``pivot_root``, and
  ``unshare``/``setns``;
- EPERM for ``clone(2)`` with any ``CLONE_NEW*`` flag (one ``MASKED_EQ`` test per flag on the
  flags argument). ``CLONE_NEWTIME`` (0x80) cannot be tested on ``clone(2)``: there the low byte
  is the exit signal, and the kernel only accepts ``CLONE_NEWTIME`` through ``unshare``, ``setns``
  and ``clone3``, which are all refused;
- ENOSYS for ``clone3``. Its flags live in a structure in memory, which seccomp cannot read, so
  the filter cannot tell a thread from a namespace. ENOSYS, not EPERM: glibc >= 2.34 tries
  ``clone3`` first and falls back to ``clone(2)`` (where the flags are checked) only on ENOSYS;
  EPERM would make every ``pthread_create`` and ``posix_spawn`` fail;
- the whole process is killed (SIGSYS, exit status 159) for a syscall of another architecture
  than the machine's: on x86_64, i386 calls (``int $0x80``) and x32 calls (numbers with bit
  0x40000000). libseccomp already sends x32 numbers to the bad-architecture action on an
  x86_64 filter (Debian's 2.5.4 exports ``if nr >= 0x40000000 and nr != -1: bad-arch``); that
  action is set here explicitly to KILL_PROCESS rather than left at its default, KILL_THREAD.

Everything else is allowed, ``ptrace`` included: the runner's PID namespace holds only the
run's own processes (bubblewrap's PID 1 is filtered too), and gdb and strace must work. Since
Linux 4.8 the filter checks a syscall as a tracer left it (after the tracer's syscall-entry
stop), so tracing is no way around it.

The filter is generated with libseccomp: Debian's ``python3-seccomp`` bindings when the
interpreter can import them (``/usr/bin/python3``, or a venv with system site packages), else
``pyseccomp`` (ctypes over Debian's ``libseccomp2``). :attr:`SeccompFilter.library` says which.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

#: Refused with EPERM whatever their arguments.
FILTERED_SYSCALLS: tuple[str, ...] = (
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

#: ``clone(2)`` gets EPERM when its flags hold any of these (values from <linux/sched.h>).
DENIED_CLONE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

#: Answered ENOSYS so that the C library falls back to ``clone(2)``.
ENOSYS_SYSCALLS: tuple[str, ...] = ("clone3",)

#: What a process of the sandbox cannot reach: other ABIs of the same kernel, per machine.
_FOREIGN_ABIS: dict[str, tuple[str, ...]] = {
    "x86_64": ("i386 (int $0x80)", "x32 (syscall numbers with bit 0x40000000)"),
    "aarch64": ("arm (32-bit)",),
}

#: Tried in this order: Debian's bindings, then the ctypes ones from PyPI.
_LIBRARIES = (("python3-seccomp", "seccomp"), ("pyseccomp", "pyseccomp"))


class SeccompUnavailable(RuntimeError):
    """libseccomp (or the kernel's seccomp) cannot be used on this machine."""


class SeccompFilter:
    """The compiled filter: BPF bytes to hand to bubblewrap, and what it denies."""

    def __init__(self, library: str, bpf: bytes, machine: str) -> None:
        self.library = library
        self.bpf = bpf
        self.machine = machine

    def fd(self) -> int:
        """A new sealed memfd holding the BPF, positioned at 0, for one ``bwrap --seccomp FD``.

        Close-on-exec (``pass_fds`` clears that in the child only); the caller closes it.
        Sealed, so nothing that later gets hold of the descriptor can change the program.
        """
        fd = os.memfd_create("sandbox-kernel-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(self.bpf)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def describe(self) -> dict[str, object]:
        """The ``container.isolation.seccomp`` entry of ``specifications/``."""
        return {
            "library": self.library,
            "default": "allow",
            "denied_syscalls": list(FILTERED_SYSCALLS),
            "denied_errno": "EPERM",
            "denied_clone_flags": list(DENIED_CLONE_FLAGS),
            "enosys_syscalls": list(ENOSYS_SYSCALLS),
            "killed_architectures": list(
                _FOREIGN_ABIS.get(self.machine, ("every non-native architecture",))
            ),
            "killed_with": "SIGSYS (exit status 159)",
            "allowed_notably": ["ptrace"],
        }


def load_filter() -> SeccompFilter | None:
    """Built once at server start; None (with a log warning saying why) if libseccomp is
    unusable, in which case runners start without a filter."""
    try:
        return build_filter()
    except SeccompUnavailable as error:
        log.warning(
            "no seccomp filter in the sandboxes: %s. Install libseccomp2 and python3-seccomp "
            "(apt-get install -y libseccomp2 python3-seccomp) or pyseccomp (pip install "
            "pyseccomp) and restart the server.",
            error,
        )
        return None


def build_filter() -> SeccompFilter:
    """The filter described in this module's docstring; :class:`SeccompUnavailable` if not."""
    if not _kernel_has_seccomp():
        raise SeccompUnavailable("this kernel has no seccomp (no Seccomp: in /proc/self/status)")
    name, library = _import_library()
    try:
        bpf = _compile(library)
    except (OSError, ValueError, RuntimeError) as error:
        raise SeccompUnavailable(f"{name} could not build the filter: {error}") from error
    return SeccompFilter(name, bpf, os.uname().machine)


def _kernel_has_seccomp() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    return "\nSeccomp:" in status


def _import_library() -> tuple[str, ModuleType]:
    problems = []
    for name, module in _LIBRARIES:
        try:
            return name, importlib.import_module(module)
        except (ImportError, OSError, RuntimeError) as error:  # pyseccomp raises RuntimeError
            problems.append(f"{name}: {error}")  # when libseccomp.so is missing
    raise SeccompUnavailable("; ".join(problems))


def _compile(library: ModuleType) -> bytes:
    """Rules in libseccomp's terms, exported as BPF."""
    rules = library.SyscallFilter(library.ALLOW)
    rules.set_attr(library.Attr.ACT_BADARCH, library.KILL_PROCESS)
    deny = library.ERRNO(errno.EPERM)
    for syscall in FILTERED_SYSCALLS:
        rules.add_rule(deny, syscall)
    flags_argument = 1 if os.uname().machine.startswith("s390") else 0  # clone(sp, flags) there
    for flag in DENIED_CLONE_FLAGS.values():
        rules.add_rule(deny, "clone", library.Arg(flags_argument, library.MASKED_EQ, flag, flag))
    for syscall in ENOSYS_SYSCALLS:
        rules.add_rule(library.ERRNO(errno.ENOSYS), syscall)
    with tempfile.TemporaryFile() as exported:
        rules.export_bpf(exported)
        exported.seek(0)
        bpf = exported.read()
    if not bpf or len(bpf) % 8:
        raise ValueError(f"libseccomp exported {len(bpf)} bytes, not a BPF program")
    return bpf
