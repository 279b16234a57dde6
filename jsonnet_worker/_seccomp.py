"""A seccomp deny-list for the worker, hand-assembled as classic BPF, applied to every thread.

Goals: close what Landlock leaves open to a fully compromised engine: running an ELF
(``execve``/``execveat``, even of a memfd), making sockets of any family, reading or writing
other processes' memory (``ptrace``, ``process_vm_*``), changing file metadata (the chmod,
chown, utime and xattr families, which Landlock does not mediate), namespaces and mounts,
new memfds, and the big kernel attack surfaces (``bpf``, ``perf_event_open``, keyrings,
``io_uring``, ``userfaultfd``, ``personality``). Forks are refused too: ``clone`` is allowed
only with ``CLONE_THREAD`` (a new thread of this process) and no namespace flag, and
``clone3`` answers ENOSYS so glibc's ``pthread_create`` falls back to ``clone``, whose flags
a filter can read (``clone3`` passes them in memory, out of a filter's reach).

Plan: ``build_program()`` assembles the filter from a per-architecture syscall table:
check the architecture (another ABI on the same CPU, e.g. i386 through ``int 0x80``, kills
the process: its syscall numbers mean other things), refuse x32 numbers, then compare the
number against the deny-list. A refused call returns EPERM, never kills: the engine or
Python sees an ordinary ``OSError``/error and the caller gets a typed ``JsonnetError`` (or a
``WorkerCrashed`` if a runtime aborts on it), never a hang. ``install()`` loads it with
``seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC)`` so the Go runtime's threads,
which exist by then, get the same filter atomically.

Why hand-assembled BPF rather than libseccomp: the program is ~90 instructions of one
shape (compare, jump, return), so the assembler below is 30 lines and needs no library that
might be missing (libseccomp.so.2 is optional on Debian and absent from slim images) and no
ctypes struct layouts of a C API that would have to match the installed version. The cost is
that syscall numbers are ours to keep right: the tables below come from the kernel's
``arch/x86/entry/syscalls/syscall_64.tbl`` and ``include/uapi/asm-generic/unistd.h``.

Why a deny-list, not an allow-list: CPython, glibc and the Go runtime between them make
syscalls that change with their versions (rseq, clone3, futex_waitv, statx, mmap flags...);
an allow-list that misses one kills a worker in production on a library upgrade. The
deny-list names what the issue and this project's threat model need refused; Landlock still
refuses every path-based filesystem access and TCP behind it.

Weak spots: aarch64's table is written from unistd.h but untested here (x86_64 is what the
tests run on); other architectures get no filter and the worker says so in its hello.
``stat``/``readlink`` cannot be filtered without breaking ``fstat`` (glibc implements it as
``newfstatat(fd, "", AT_EMPTY_PATH)``, and a filter cannot read the path), so existence
checks stay possible where the worker's user may search the directory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from ._status import LayerState, LayerStatus

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_GET_SECCOMP = 21

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0_LOW = 16  # little-endian: the low 32 bits of args[0] come first

CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
X32_SYSCALL_BIT = 0x40000000


@dataclass(frozen=True)
class SyscallTable:
    """The numbers one architecture gives the calls this filter cares about."""

    audit_arch: int
    seccomp: int  # the seccomp(2) syscall itself, to install the filter
    clone: int
    clone3: int
    denied: dict[str, int]
    x32_bit: bool = False  # x86_64 also accepts x32 numbers (nr | 0x40000000)


# Calls refused with EPERM, by family. Names follow the kernel's syscall tables.
DENIED_FAMILIES: dict[str, tuple[str, ...]] = {
    "exec": ("execve", "execveat"),
    "fork": ("fork", "vfork"),
    "sockets": ("socket",),
    "other processes": ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
    "chmod": ("chmod", "fchmod", "fchmodat", "fchmodat2"),
    "chown": ("chown", "fchown", "lchown", "fchownat"),
    "utime": ("utime", "utimes", "futimesat", "utimensat"),
    "xattr": (
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "getxattr",
        "lgetxattr",
        "fgetxattr",
        "listxattr",
        "llistxattr",
        "flistxattr",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "setxattrat",
        "getxattrat",
        "listxattrat",
        "removexattrat",
    ),
    "namespaces and mounts": (
        "mount",
        "umount2",
        "unshare",
        "setns",
        "pivot_root",
        "chroot",
        "open_tree",
        "move_mount",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
    ),
    "memfd after start-up": ("memfd_create", "memfd_secret"),
    "kernel attack surface": (
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "request_key",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "userfaultfd",
        "personality",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "open_by_handle_at",
        "name_to_handle_at",
        "iopl",
        "ioperm",
        "acct",
        "swapon",
        "swapoff",
        "reboot",
    ),
}

# shared by both tables: numbers from the unified range (424+)
_COMMON_NEW = {
    "pidfd_getfd": 438,
    "fchmodat2": 452,
    "setxattrat": 463,
    "getxattrat": 464,
    "listxattrat": 465,
    "removexattrat": 466,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "memfd_secret": 447,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
}

X86_64 = SyscallTable(
    audit_arch=0xC000003E,
    seccomp=317,
    clone=56,
    clone3=435,
    x32_bit=True,
    denied={
        "execve": 59,
        "execveat": 322,
        "fork": 57,
        "vfork": 58,
        "socket": 41,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "chmod": 90,
        "fchmod": 91,
        "fchmodat": 268,
        "chown": 92,
        "fchown": 93,
        "lchown": 94,
        "fchownat": 260,
        "utime": 132,
        "utimes": 235,
        "futimesat": 261,
        "utimensat": 280,
        "setxattr": 188,
        "lsetxattr": 189,
        "fsetxattr": 190,
        "getxattr": 191,
        "lgetxattr": 192,
        "fgetxattr": 193,
        "listxattr": 194,
        "llistxattr": 195,
        "flistxattr": 196,
        "removexattr": 197,
        "lremovexattr": 198,
        "fremovexattr": 199,
        "mount": 165,
        "umount2": 166,
        "unshare": 272,
        "setns": 308,
        "pivot_root": 155,
        "chroot": 161,
        "memfd_create": 319,
        "bpf": 321,
        "perf_event_open": 298,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "userfaultfd": 323,
        "personality": 135,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "open_by_handle_at": 304,
        "name_to_handle_at": 303,
        "iopl": 172,
        "ioperm": 173,
        "acct": 163,
        "swapon": 167,
        "swapoff": 168,
        "reboot": 169,
        **_COMMON_NEW,
    },
)

# asm-generic numbering: no fork/vfork/chmod/chown/lchown/utime/utimes/futimesat/iopl/ioperm.
AARCH64 = SyscallTable(
    audit_arch=0xC00000B7,
    seccomp=277,
    clone=220,
    clone3=435,
    denied={
        "execve": 221,
        "execveat": 281,
        "socket": 198,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "fchmod": 52,
        "fchmodat": 53,
        "fchown": 55,
        "fchownat": 54,
        "utimensat": 88,
        "setxattr": 5,
        "lsetxattr": 6,
        "fsetxattr": 7,
        "getxattr": 8,
        "lgetxattr": 9,
        "fgetxattr": 10,
        "listxattr": 11,
        "llistxattr": 12,
        "flistxattr": 13,
        "removexattr": 14,
        "lremovexattr": 15,
        "fremovexattr": 16,
        "mount": 40,
        "umount2": 39,
        "unshare": 97,
        "setns": 268,
        "pivot_root": 41,
        "chroot": 51,
        "memfd_create": 279,
        "bpf": 280,
        "perf_event_open": 241,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "userfaultfd": 282,
        "personality": 92,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "open_by_handle_at": 265,
        "name_to_handle_at": 264,
        "acct": 89,
        "swapon": 224,
        "swapoff": 225,
        "reboot": 142,
        **_COMMON_NEW,
    },
)

TABLES = {"x86_64": X86_64, "aarch64": AARCH64}


@dataclass(frozen=True)
class SeccompResult:
    """What ``install()`` achieved: applied (how many calls denied) or why not."""

    applied: bool
    arch: str
    denied: int = 0
    reason: str = ""


class SeccompError(OSError):
    """The kernel supports seccomp filters but this one could not be applied: fail closed."""


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_program(
    table: SyscallTable, refusal: int = errno.EPERM, *, process_clone: int | None = None
) -> bytes:
    """The filter as ``struct sock_filter`` bytes.

    Layout: checks first, then one shared return per outcome at the end, so each check is a
    single conditional jump forward (classic BPF jumps only forward, by at most 255).
    ``process_clone``: the one exact ``clone`` flag word that may make a process (the
    template's fork, ``_template.FORK_FLAGS``); every other process-making clone is refused.
    """
    numbers = sorted(set(table.denied.values()))
    body: list[tuple[int, int, str | None, str | None]] = [
        (_LD_W_ABS, _OFFSET_ARCH, None, None),
        (_JEQ_K, table.audit_arch, "next", "kill"),
        (_LD_W_ABS, _OFFSET_NR, None, None),
    ]
    if table.x32_bit:
        body.append((_JGE_K, X32_SYSCALL_BIT, "refuse", "next"))
    body.append((_JEQ_K, table.clone, "clone", "next"))
    body.append((_JEQ_K, table.clone3, "enosys", "next"))
    body.extend((_JEQ_K, number, "refuse", "next") for number in numbers)
    body.append((_RET_K, SECCOMP_RET_ALLOW, None, None))
    tail: dict[str, list[tuple[int, int, str | None, str | None]]] = {
        # clone: a new thread of this process may be made, nothing else.
        "clone": [
            (_LD_W_ABS, _OFFSET_ARG0_LOW, None, None),
            *([(_JEQ_K, process_clone, "allow", None)] if process_clone is not None else []),
            (_JSET_K, CLONE_NAMESPACES, "refuse", "next"),
            (_JSET_K, CLONE_THREAD, "allow", "refuse"),
        ],
        "allow": [(_RET_K, SECCOMP_RET_ALLOW, None, None)],
        "refuse": [(_RET_K, SECCOMP_RET_ERRNO | refusal, None, None)],
        "enosys": [(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS, None, None)],
        "kill": [(_RET_K, SECCOMP_RET_KILL_PROCESS, None, None)],
    }
    program = list(body)
    labels: dict[str, int] = {}
    for label, instructions in tail.items():
        labels[label] = len(program)
        program.extend(instructions)

    def offset(index: int, label: str | None) -> int:
        if label is None or label == "next":
            return 0
        distance = labels[label] - index - 1
        if not 0 <= distance <= 255:
            raise ValueError(f"BPF jump to {label} out of range ({distance})")
        return distance

    return b"".join(
        _insn(code, offset(index, true), offset(index, false), k)
        for index, (code, k, true, false) in enumerate(program)
    )


def table_for_machine(machine: str | None = None) -> SyscallTable | None:
    return TABLES.get(machine or os.uname().machine)


def supported() -> tuple[bool, str]:
    """Whether this kernel has seccomp at all (PR_GET_SECCOMP answers EINVAL without it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ctypes.set_errno(0)
    if libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        err = ctypes.get_errno()
        return False, f"prctl(PR_GET_SECCOMP): {os.strerror(err)} (kernel without CONFIG_SECCOMP)"
    return True, ""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(
    machine: str | None = None, refusal: int = errno.EPERM, *, process_clone: int | None = None
) -> SeccompResult:
    """Apply the filter to every thread of this process (no_new_privs must already be set).
    ``process_clone``: see ``build_program`` (the template's filter; workers pass None).

    Returns ``applied=False`` with the reason where the architecture has no table or the
    kernel has no seccomp filters; raises ``SeccompError`` where it has them but the filter
    is refused (the worker must not run then).
    """
    arch = machine or os.uname().machine
    table = table_for_machine(arch)
    if table is None:
        return SeccompResult(False, arch, reason=f"no syscall table for architecture {arch}")
    available, why = supported()
    if not available:
        return SeccompResult(False, arch, reason=why)
    program = build_program(table, refusal, process_clone=process_clone)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ctypes.set_errno(0)
    result = int(
        libc.syscall(
            ctypes.c_long(table.seccomp),
            ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC),
            ctypes.byref(fprog),
        )
    )
    if result == -1:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:  # no seccomp(2): kernels before 3.17, or a sandbox around us
            return SeccompResult(False, arch, reason=f"seccomp(2): {os.strerror(err)}")
        raise SeccompError(err, f"seccomp(SET_MODE_FILTER, TSYNC): {os.strerror(err)}")
    if result != 0:  # TSYNC: the id of a thread that could not be synchronised
        raise SeccompError(errno.EBUSY, f"seccomp TSYNC failed on thread {result}")
    return SeccompResult(True, arch, denied=len(table.denied) + 2)  # + fork-style clone, clone3


def layer_status(result: SeccompResult) -> LayerStatus:
    if not result.applied:
        return LayerStatus("seccomp", LayerState.MISSING, reason=result.reason)
    return LayerStatus(
        "seccomp",
        LayerState.ACTIVE,
        f"{result.arch}, {result.denied} calls refused, threads-only clone, TSYNC",
    )
