"""A seccomp filter for the worker, hand-assembled as classic BPF, applied to every thread.

Goals: close what Landlock leaves open to a fully compromised engine: running an ELF
(``execve``/``execveat``, even of a memfd), making sockets of any family (``socket``,
``socketpair``) or giving the channels it holds a name or a peer (``bind``: an abstract
unix name held host-wide; ``listen``, ``accept``, ``accept4``, ``connect``), file locks,
which live on a file the whole host shares, not in the worker (``flock``, and ``fcntl``'s
record-lock commands, POSIX and open file description ones: a lock on /dev/null holds
host-wide and ``F_GETLK`` reads another process's back), reading, writing or steering
other processes (``ptrace``,
``process_vm_*``, pidfds, ``kcmp``, ``process_madvise``, ``migrate_pages``...), and the
calls a same-uid process can aim at another pid (``prlimit64``, ``sched_set*``,
``setpriority``, ``ioprio_set``, ``kill`` and the other signal calls): those pass only when
aimed at the worker itself. Also System V IPC and POSIX message queues (host-wide objects
that Landlock does not mediate and that outlive the worker), inotify and fanotify (they
report names in directories the worker cannot list), memory that ``RLIMIT_DATA`` does not
count (``MAP_GROWSDOWN``, shared anonymous mappings, an ``mremap`` that grows a mapping:
it can grow the main thread's stack), file metadata changes (chmod, chown, utime, xattr:
not Landlock rights), namespaces and mounts, new memfds, host-wide state (``sync``,
``syslog``, clocks, host names, quotas, swap, modules, reboot) and the big kernel attack
surfaces (``bpf``, ``perf_event_open``, keyrings, ``io_uring``, ``userfaultfd``,
``personality``, ``modify_ldt``). Forks are refused: ``clone`` is allowed only with
``CLONE_THREAD`` and no namespace flag, and ``clone3`` answers ENOSYS so glibc's
``pthread_create`` falls back to ``clone``, whose flags a filter can read (``clone3`` passes
them in memory).

Plan: the rules are data, named by syscall: ``DENIED_FAMILIES`` (refused outright) and
``ARGUMENT_RULES`` (a check of the arguments), and each architecture has a table of numbers
for those names (``SyscallTable``). ``build_program()`` assembles from them: check the
architecture (another ABI on the same CPU, e.g. i386 through ``int 0x80``, kills the
process: its numbers mean other things), refuse x32 numbers, dispatch the calls with an
argument rule to their checks, then compare the number against the deny-list. A refused
call returns EPERM, never kills: the engine or Python sees an ordinary error and the caller
a typed ``JsonnetError`` (or ``WorkerCrashed`` if a runtime aborts on it), never a hang.
``install()`` loads it with ``seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC)``
so the Go runtime's threads, which exist by then, get the same filter atomically.

What "the worker itself" means: pid 0 or the worker's process id (its thread-group id),
written into the filter when it is installed. Not the thread ids of its other threads: a
filter cannot know the ids of threads born later. Nothing the worker runs needs those:
after start-up neither runtime calls any ``sched_set*``, ``prlimit64``, ``setpriority`` or
``ioprio_set`` at all (measured with strace under load, both engines), glibc's ``raise``
and Go's preemption signals use ``tgkill(getpid(), tid, ...)``, whose first argument is the
process id. The readers (``sched_getaffinity`` and friends) are not filtered: glibc's
``pthread_getattr_np``, which cgo calls on every callback, asks ``sched_getaffinity`` for
the calling thread's own tid.

Why hand-assembled BPF rather than libseccomp: the program is a few hundred instructions of
one shape (load, compare, jump, return), so the assembler below is short and needs no
library that might be missing (libseccomp.so.2 is optional on Debian and absent from slim
images) and no ctypes layouts of a C API that would have to match the installed version. The
cost is that syscall numbers are ours to keep right: the tables come from the kernel's
``arch/x86/entry/syscalls/syscall_64.tbl`` and ``include/uapi/asm-generic/unistd.h``, and
tests/test_seccomp_program.py checks both against the installed kernel headers
(``asm/unistd_64.h`` and ``asm-generic/unistd.h``, which aarch64 uses unchanged).

Why a deny-list, not an allow-list: CPython, glibc and the Go runtime between them make
syscalls that change with their versions (rseq, clone3, futex_waitv, statx, mmap flags...);
an allow-list that misses one kills a worker in production on a library upgrade. The
deny-list names what this project's threat model needs refused; Landlock still refuses every
path-based filesystem access and TCP behind it.

Weak spots: the aarch64 table is checked against the generic header only, never run here
(x86_64 is what the tests run on); numbers newer than the installed headers (451 and up) are
the same on every architecture and checked only for that. Other architectures get no filter
and the worker says so in its hello. ``stat``/``readlink`` cannot be filtered without
breaking ``fstat`` (glibc implements it as ``newfstatat(fd, "", AT_EMPTY_PATH)``, and a
filter cannot read the path), so existence checks stay possible where the worker's user may
search the directory. ``mremap`` may move or shrink but not grow: glibc's ``realloc`` of a
large chunk then falls back to allocate, copy and free (tests/test_layers.py shows it
working), and libffi's static trampolines (a same-size move) keep working.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import struct
from collections.abc import Mapping

from .._wire.layers import LayerState, LayerStatus
from .._wire.values import valueclass

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_TAX = 0x07  # X = A
_JA = 0x05
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_JEQ_X = 0x1D
_JGT_X = 0x2D
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
_OFFSET_ARGS = 16


def _arg_low(index: int) -> int:
    """Offset of the low 32 bits of args[index] (little-endian: they come first). The calls
    checked below take ``int``/``pid_t`` arguments: the kernel reads only these bits."""
    return _OFFSET_ARGS + 8 * index


def _arg_high(index: int) -> int:
    return _OFFSET_ARGS + 8 * index + 4


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
# linux/mman.h (the same values on x86_64 and asm-generic): MAP_SHARED is bit 0 of the
# mapping type, set for MAP_SHARED (1) and MAP_SHARED_VALIDATE (3), clear for MAP_PRIVATE.
MAP_SHARED = 0x01
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x0100
PRIO_PROCESS = 0
IOPRIO_WHO_PROCESS = 1
# fcntl's record-lock commands (asm-generic/fcntl.h, the same on x86_64 and aarch64): the
# POSIX ones, the open file description ones, and the flock64 names, which a 64-bit kernel
# answers EINVAL (measured) and are refused anyway so the filter does not rest on that.
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_GETLK64, F_SETLK64, F_SETLKW64 = 12, 13, 14
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
LOCK_COMMANDS = (
    F_GETLK,
    F_SETLK,
    F_SETLKW,
    F_GETLK64,
    F_SETLK64,
    F_SETLKW64,
    F_OFD_GETLK,
    F_OFD_SETLK,
    F_OFD_SETLKW,
)


class Rule(enum.Enum):
    """An argument check: the call passes only when aimed at the worker itself (or, for
    ``mmap``, when it maps memory ``RLIMIT_DATA`` counts; for ``fcntl``, when it takes,
    drops or reads no lock)."""

    OWN_PID = "first argument is 0 or the worker's pid"
    PRIO_SELF = "PRIO_PROCESS, 0"
    IOPRIO_SELF = "IOPRIO_WHO_PROCESS, 0 or the worker's pid"
    COUNTED_MAPPING = "no MAP_GROWSDOWN, no shared anonymous memory"
    NO_GROWTH = "new size at most the old size"
    THREAD_ONLY = "CLONE_THREAD and no namespace flag"
    NO_LOCKS = "no record-lock command"
    NO_SUCH_CALL = "answers ENOSYS"


ARGUMENT_RULES: dict[str, Rule] = {
    "prlimit64": Rule.OWN_PID,
    "sched_setaffinity": Rule.OWN_PID,
    "sched_setscheduler": Rule.OWN_PID,
    "sched_setparam": Rule.OWN_PID,
    "sched_setattr": Rule.OWN_PID,
    "kill": Rule.OWN_PID,  # 0: the worker's own process group (it leads a session of its own)
    "tgkill": Rule.OWN_PID,
    "rt_sigqueueinfo": Rule.OWN_PID,
    "rt_tgsigqueueinfo": Rule.OWN_PID,
    "setpriority": Rule.PRIO_SELF,
    "ioprio_set": Rule.IOPRIO_SELF,
    "mmap": Rule.COUNTED_MAPPING,
    # Growing the main thread's stack (or a shared mapping) is not counted in RLIMIT_DATA;
    # moving or shrinking is harmless, and libffi's static trampolines move a page.
    "mremap": Rule.NO_GROWTH,
    "clone": Rule.THREAD_ONLY,
    "clone3": Rule.NO_SUCH_CALL,
    # Record locks live on the inode (POSIX) or the open file (OFD), not in the worker: one
    # taken on /dev/null holds host-wide, and F_GETLK reads other processes' locks back (a
    # covert channel between two workers). The runtimes use only F_GETFD/F_SETFD,
    # F_GETFL/F_SETFL and F_DUPFD_CLOEXEC (measured with strace, both engines).
    "fcntl": Rule.NO_LOCKS,
}

# Calls refused with EPERM, by family. Names follow the kernel's syscall tables; a name an
# architecture does not have (fork on aarch64) is simply absent from its table.
DENIED_FAMILIES: dict[str, tuple[str, ...]] = {
    "exec": ("execve", "execveat"),
    "fork": ("fork", "vfork"),
    "sockets": ("socket", "socketpair"),
    # A worker only reads and writes the connected channels its parent made. bind() would
    # give one an abstract unix name, held host-wide (the network namespace's) for the
    # worker's life: Landlock's abstract-socket scope covers connect and send, not bind.
    # listen/accept/connect have no use on a connected stream socket: refused all the same.
    "socket endpoints": ("bind", "listen", "accept", "accept4", "connect"),
    # An exclusive flock on a file the worker holds (/dev/null) holds host-wide.
    "file locks": ("flock",),
    "other processes": (
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_open",
        "pidfd_getfd",
        "pidfd_send_signal",
        "tkill",
        "kcmp",
        "process_madvise",
        "process_mrelease",
        "migrate_pages",
        "move_pages",
    ),
    "System V IPC": (
        "shmget",
        "shmat",
        "shmdt",
        "shmctl",
        "semget",
        "semop",
        "semtimedop",
        "semctl",
        "msgget",
        "msgsnd",
        "msgrcv",
        "msgctl",
    ),
    "POSIX message queues": (
        "mq_open",
        "mq_unlink",
        "mq_timedsend",
        "mq_timedreceive",
        "mq_notify",
        "mq_getsetattr",
    ),
    "file watches": (
        "inotify_init",
        "inotify_init1",
        "inotify_add_watch",
        "inotify_rm_watch",
        "fanotify_init",
        "fanotify_mark",
    ),
    "uncounted memory": ("remap_file_pages",),
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
        "open_tree_attr",
        "move_mount",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
    ),
    "memfd after start-up": ("memfd_create", "memfd_secret"),
    "host-wide state": (
        "sync",
        "syncfs",
        "syslog",
        "quotactl",
        "quotactl_fd",
        "settimeofday",
        "clock_settime",
        "adjtimex",
        "clock_adjtime",
        "sethostname",
        "setdomainname",
        "vhangup",
        "acct",
        "swapon",
        "swapoff",
        "reboot",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
    ),
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
        "open_by_handle_at",
        "name_to_handle_at",
        "iopl",
        "ioperm",
        "modify_ldt",
    ),
}

DENIED: tuple[str, ...] = tuple(name for names in DENIED_FAMILIES.values() for name in names)


@valueclass
class SyscallTable:
    """One architecture: its audit id and the number of every call the rules name."""

    audit_arch: int
    numbers: Mapping[str, int]
    x32_bit: bool = False  # x86_64 also accepts x32 numbers (nr | 0x40000000)

    def number(self, name: str) -> int:
        return self.numbers[name]

    def denied(self) -> dict[str, int]:
        """The deny-list's calls this architecture has, with their numbers."""
        return {name: self.numbers[name] for name in DENIED if name in self.numbers}

    def checked(self) -> dict[str, int]:
        """The calls with an argument rule, with their numbers (every architecture has all)."""
        return {name: self.numbers[name] for name in ARGUMENT_RULES}


# Since Linux 5.1 every architecture numbers new system calls alike, from 424 on
# (pidfd_send_signal): one table for both.
# fmt: off
_UNIFIED_NUMBERS = {
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
    "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "quotactl_fd": 443,
    "memfd_secret": 447, "process_mrelease": 448, "fchmodat2": 452, "setxattrat": 463,
    "getxattrat": 464, "listxattrat": 465, "removexattrat": 466, "open_tree_attr": 467,
}
# fmt: on


# From arch/x86/entry/syscalls/syscall_64.tbl (checked against asm/unistd_64.h in the tests).
# fmt: off
_X86_64_NUMBERS = {
    "mmap": 9, "mremap": 25, "shmget": 29, "shmat": 30, "shmctl": 31, "socket": 41,
    "connect": 42, "accept": 43, "bind": 49, "listen": 50, "socketpair": 53, "clone": 56,
    "fork": 57, "vfork": 58, "execve": 59, "kill": 62, "semget": 64, "semop": 65, "semctl": 66,
    "shmdt": 67, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "fcntl": 72,
    "flock": 73, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94,
    "ptrace": 101, "syslog": 103, "rt_sigqueueinfo": 129, "utime": 132, "personality": 135,
    "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144, "vhangup": 153,
    "modify_ldt": 154, "pivot_root": 155, "adjtimex": 159, "chroot": 161, "sync": 162,
    "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179, "setxattr": 188,
    "lsetxattr": 189, "fsetxattr": 190, "getxattr": 191, "lgetxattr": 192, "fgetxattr": 193,
    "listxattr": 194, "llistxattr": 195, "flistxattr": 196, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "tkill": 200, "sched_setaffinity": 203,
    "remap_file_pages": 216, "semtimedop": 220, "clock_settime": 227, "tgkill": 234,
    "utimes": 235, "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242,
    "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "ioprio_set": 251, "inotify_init": 253,
    "inotify_add_watch": 254, "inotify_rm_watch": 255, "migrate_pages": 256, "fchownat": 260,
    "futimesat": 261, "fchmodat": 268, "unshare": 272, "move_pages": 279, "utimensat": 280,
    "accept4": 288, "inotify_init1": 294, "rt_tgsigqueueinfo": 297, "perf_event_open": 298,
    "fanotify_init": 300, "fanotify_mark": 301, "prlimit64": 302, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "syncfs": 306, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "sched_setattr": 314, "seccomp": 317, "memfd_create": 319, "kexec_file_load": 320,
    "bpf": 321, "execveat": 322, "userfaultfd": 323, **_UNIFIED_NUMBERS,
}
# fmt: on
X86_64 = SyscallTable(audit_arch=0xC000003E, numbers=_X86_64_NUMBERS, x32_bit=True)

# From include/uapi/asm-generic/unistd.h, which aarch64 uses (with clone3 and memfd_secret):
# no fork, vfork, chmod, chown, lchown, utime, utimes, futimesat, inotify_init, iopl, ioperm
# or modify_ldt.
# fmt: off
_GENERIC_NUMBERS = {
    "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "getxattr": 8, "lgetxattr": 9,
    "fgetxattr": 10, "listxattr": 11, "llistxattr": 12, "flistxattr": 13, "removexattr": 14,
    "lremovexattr": 15, "fremovexattr": 16, "fcntl": 25, "inotify_init1": 26,
    "inotify_add_watch": 27, "inotify_rm_watch": 28, "ioprio_set": 30, "flock": 32, "umount2": 39,
    "mount": 40, "pivot_root": 41, "chroot": 51, "fchmod": 52, "fchmodat": 53, "fchownat": 54,
    "fchown": 55, "vhangup": 58, "quotactl": 60, "sync": 81, "utimensat": 88, "acct": 89,
    "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
    "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117,
    "sched_setparam": 118, "sched_setscheduler": 119, "sched_setaffinity": 122, "kill": 129,
    "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "setpriority": 140, "reboot": 142,
    "sethostname": 161, "setdomainname": 162, "settimeofday": 170, "adjtimex": 171,
    "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183,
    "mq_notify": 184, "mq_getsetattr": 185, "msgget": 186, "msgctl": 187, "msgrcv": 188,
    "msgsnd": 189, "semget": 190, "semctl": 191, "semtimedop": 192, "semop": 193, "shmget": 194,
    "shmctl": 195, "shmat": 196, "shmdt": 197, "socket": 198, "socketpair": 199, "bind": 200,
    "listen": 201, "accept": 202, "connect": 203, "mremap": 216, "add_key": 217,
    "request_key": 218, "keyctl": 219, "clone": 220, "execve": 221, "mmap": 222, "swapon": 224,
    "swapoff": 225, "remap_file_pages": 234, "migrate_pages": 238, "move_pages": 239,
    "rt_tgsigqueueinfo": 240, "perf_event_open": 241, "accept4": 242, "prlimit64": 261,
    "fanotify_init": 262, "fanotify_mark": 263, "name_to_handle_at": 264,
    "open_by_handle_at": 265, "clock_adjtime": 266, "syncfs": 267, "setns": 268,
    "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273,
    "sched_setattr": 274, "seccomp": 277, "memfd_create": 279, "bpf": 280, "execveat": 281,
    "userfaultfd": 282, "kexec_file_load": 294, **_UNIFIED_NUMBERS,
}
# fmt: on
AARCH64 = SyscallTable(audit_arch=0xC00000B7, numbers=_GENERIC_NUMBERS)

TABLES = {"x86_64": X86_64, "aarch64": AARCH64}


@valueclass
class SeccompResult:
    """What ``install()`` achieved: applied (how many calls refused or checked) or why not."""

    applied: bool
    arch: str
    denied: int = 0
    checked: int = 0
    reason: str = ""


class SeccompError(OSError):
    """The kernel supports seccomp filters but this one could not be applied: fail closed."""


# One instruction before assembly: (opcode, k, label if true, label if false); for a jump
# always (``_JA``) the target is the true label. "next" is the following instruction.
_Insn = tuple[int, int, str | None, str | None]


def _check_block(rule: Rule, own_pid: int | None, process_clone: int | None) -> list[_Insn]:
    """The checks of one argument rule, ending in "allow" or "refuse". ``own_pid`` None: a
    filter its children inherit (the template's) cannot name one pid; each child installs
    its own filter with its own pid, and the stricter filter wins."""
    if rule in (Rule.OWN_PID, Rule.IOPRIO_SELF) and own_pid is None:
        return [(_JA, 0, "allow", None)]
    if rule is Rule.OWN_PID and own_pid is not None:
        return [
            (_LD_W_ABS, _arg_low(0), None, None),
            (_JEQ_K, 0, "allow", "next"),
            (_JEQ_K, own_pid, "allow", "refuse"),
        ]
    if rule is Rule.PRIO_SELF:
        return [
            (_LD_W_ABS, _arg_low(0), None, None),
            (_JEQ_K, PRIO_PROCESS, "next", "refuse"),
            (_LD_W_ABS, _arg_low(1), None, None),
            (_JEQ_K, 0, "allow", "refuse"),
        ]
    if rule is Rule.IOPRIO_SELF and own_pid is not None:
        return [
            (_LD_W_ABS, _arg_low(0), None, None),
            (_JEQ_K, IOPRIO_WHO_PROCESS, "next", "refuse"),
            (_LD_W_ABS, _arg_low(1), None, None),
            (_JEQ_K, 0, "allow", "next"),
            (_JEQ_K, own_pid, "allow", "refuse"),
        ]
    if rule is Rule.COUNTED_MAPPING:
        return [
            (_LD_W_ABS, _arg_low(3), None, None),  # flags
            (_JSET_K, MAP_GROWSDOWN, "refuse", "next"),
            (_JSET_K, MAP_ANONYMOUS, "next", "allow"),
            (_JSET_K, MAP_SHARED, "refuse", "allow"),
        ]
    if rule is Rule.NO_GROWTH:  # mremap(old, old_size, new_size, ...): 64-bit sizes
        return [
            (_LD_W_ABS, _arg_high(1), None, None),
            (_TAX, 0, None, None),
            (_LD_W_ABS, _arg_high(2), None, None),
            (_JGT_X, 0, "refuse", "next"),
            (_JEQ_X, 0, "next", "allow"),  # high word smaller: it shrinks
            (_LD_W_ABS, _arg_low(1), None, None),
            (_TAX, 0, None, None),
            (_LD_W_ABS, _arg_low(2), None, None),
            (_JGT_X, 0, "refuse", "allow"),
        ]
    if rule is Rule.NO_LOCKS:  # fcntl(fd, cmd, ...): cmd is an unsigned int
        return [
            (_LD_W_ABS, _arg_low(1), None, None),
            *((_JEQ_K, command, "refuse", "next") for command in LOCK_COMMANDS),
            (_JA, 0, "allow", None),
        ]
    if rule is Rule.THREAD_ONLY:
        # ``process_clone``: the one exact flag word that may make a process (the template's
        # fork, ``_wire.control.FORK_FLAGS``); every other process-making clone is refused.
        exact = [] if process_clone is None else [(_JEQ_K, process_clone, "allow", "next")]
        return [
            (_LD_W_ABS, _arg_low(0), None, None),  # flags
            *exact,
            (_JSET_K, CLONE_NAMESPACES, "refuse", "next"),
            (_JSET_K, CLONE_THREAD, "allow", "refuse"),
        ]
    return [(_JA, 0, "enosys", None)]


# Deny-list comparisons per group: each group ends in its own refusal, within reach of a
# classic BPF conditional jump (forward, at most 255 instructions).
_GROUP = 200


def build_program(
    table: SyscallTable,
    own_pid: int | None,
    refusal: int = errno.EPERM,
    *,
    process_clone: int | None = None,
) -> bytes:
    """The filter as ``struct sock_filter`` bytes, for a worker whose pid is ``own_pid``
    (None, with ``process_clone``, for the template's: see ``_check_block``).

    Layout: the architecture check, then a dispatch of the calls with an argument rule to
    their checks, then the deny-list in groups, then allow. Each block ends in returns of
    its own, so every conditional jump is short; blocks are left with an unconditional jump.
    """
    program: list[_Insn] = [
        (_LD_W_ABS, _OFFSET_ARCH, None, None),
        (_JEQ_K, table.audit_arch, "next", "kill"),
        (_LD_W_ABS, _OFFSET_NR, None, None),
    ]
    if table.x32_bit:
        program.append((_JGE_K, X32_SYSCALL_BIT, "refuse", "next"))
    checked = table.checked()
    program.extend((_JEQ_K, number, f"check {name}", "next") for name, number in checked.items())
    program.append((_JA, 0, "deny-list", None))
    labels: dict[str, int] = {}

    def place(label: str, instructions: list[_Insn]) -> None:
        labels[label] = len(program)
        program.extend(instructions)

    for name in checked:
        place(f"check {name}", _check_block(ARGUMENT_RULES[name], own_pid, process_clone))
    returns: list[tuple[str, _Insn]] = [
        ("allow", (_RET_K, SECCOMP_RET_ALLOW, None, None)),
        ("refuse", (_RET_K, SECCOMP_RET_ERRNO | refusal, None, None)),
        ("enosys", (_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS, None, None)),
        ("kill", (_RET_K, SECCOMP_RET_KILL_PROCESS, None, None)),
    ]
    for label, instruction in returns:
        place(label, [instruction])
    numbers = sorted(set(table.denied().values()))
    labels["deny-list"] = len(program)
    for start in range(0, len(numbers), _GROUP):
        group = numbers[start : start + _GROUP]
        refuse_here = f"refuse after group {start}"
        program.extend((_JEQ_K, number, refuse_here, "next") for number in group)
        program.append((_JA, 0, f"after group {start}", None))
        place(refuse_here, [(_RET_K, SECCOMP_RET_ERRNO | refusal, None, None)])
        labels[f"after group {start}"] = len(program)
    program.append((_RET_K, SECCOMP_RET_ALLOW, None, None))
    return _assemble(program, labels)


def _assemble(program: list[_Insn], labels: dict[str, int]) -> bytes:
    encoded = []
    for index, (code, k, true, false) in enumerate(program):
        if code == _JA:
            assert true is not None
            encoded.append(struct.pack("=HBBI", code, 0, 0, labels[true] - index - 1))
            continue
        jt, jf = (_distance(labels, index, label) for label in (true, false))
        encoded.append(struct.pack("=HBBI", code, jt, jf, k))
    return b"".join(encoded)


def _distance(labels: dict[str, int], index: int, label: str | None) -> int:
    if label is None or label == "next":
        return 0
    distance = labels[label] - index - 1
    if not 0 <= distance <= 255:
        raise ValueError(f"BPF jump to {label} out of range ({distance})")
    return distance


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
    own_pid = None if process_clone is not None else os.getpid()
    program = build_program(table, own_pid, refusal, process_clone=process_clone)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ctypes.set_errno(0)
    result = int(
        libc.syscall(
            ctypes.c_long(table.number("seccomp")),
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
    return SeccompResult(True, arch, denied=len(table.denied()), checked=len(table.checked()))


def layer_status(result: SeccompResult) -> LayerStatus:
    if not result.applied:
        return LayerStatus("seccomp", LayerState.MISSING, reason=result.reason)
    return LayerStatus(
        "seccomp",
        LayerState.ACTIVE,
        f"{result.arch}, {result.denied} refused, {result.checked} checked, TSYNC",
    )
