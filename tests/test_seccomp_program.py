"""The seccomp program's decisions, for every architecture it has a table for, without
running it: a classic-BPF interpreter below evaluates the assembled filter for a syscall
number and arguments. With the tables checked against the kernel headers, this is how the
aarch64 filter is tested on an x86_64 machine (it is never run here).
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from jsonnet_worker._sandbox import seccomp
from jsonnet_worker._sandbox.seccomp import (
    ARGUMENT_RULES,
    DENIED,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    TABLES,
    Rule,
    SyscallTable,
    build_program,
)
from jsonnet_worker._wire.control import FORK_FLAGS

OWN_PID = 4321
OTHER_PID = 4322
ALLOW = SECCOMP_RET_ALLOW
REFUSE = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
KILL = SECCOMP_RET_KILL_PROCESS
HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


def run(program: bytes, arch: int, nr: int, args: tuple[int, ...] = ()) -> int:
    """What the filter returns for one call: a classic-BPF interpreter for the opcodes the
    assembler emits (ld abs, tax, ja, jeq/jge/jset with a constant, jeq/jgt with X, ret)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    pc, accumulator, x = 0, 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            accumulator = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x07:
            x = accumulator
            pc += 1
        elif code == 0x05:
            pc += 1 + k
        elif code in (0x15, 0x35, 0x45, 0x1D, 0x2D):
            taken = {
                0x15: accumulator == k,
                0x35: accumulator >= k,
                0x45: bool(accumulator & k),
                0x1D: accumulator == x,
                0x2D: accumulator > x,
            }[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not expected")


@pytest.fixture(params=sorted(TABLES))
def table(request: pytest.FixtureRequest) -> SyscallTable:
    return TABLES[request.param]


def decide(table: SyscallTable, name: str, *args: int) -> int:
    program = build_program(table, OWN_PID)
    return run(program, table.audit_arch, table.number(name), args)


def test_every_denied_call_is_refused(table: SyscallTable) -> None:
    program = build_program(table, OWN_PID)
    for name, number in table.denied().items():
        assert run(program, table.audit_arch, number) == REFUSE, name


def test_calls_outside_the_rules_are_allowed(table: SyscallTable) -> None:
    program = build_program(table, OWN_PID)
    named = set(table.numbers.values())
    for number in range(0, 470):
        if number not in named:
            assert run(program, table.audit_arch, number) == ALLOW, number


def test_another_architecture_is_killed_and_x32_refused(table: SyscallTable) -> None:
    program = build_program(table, OWN_PID)
    assert run(program, 0x40000003, 1) == KILL  # AUDIT_ARCH_I386
    if table.x32_bit:
        assert run(program, table.audit_arch, 0x40000000 | 59) == REFUSE


@pytest.mark.parametrize("name", [n for n, rule in ARGUMENT_RULES.items() if rule is Rule.OWN_PID])
def test_calls_aimed_at_a_pid_pass_only_for_the_worker_itself(
    table: SyscallTable, name: str
) -> None:
    assert decide(table, name, 0) == ALLOW
    assert decide(table, name, OWN_PID) == ALLOW
    assert decide(table, name, OTHER_PID) == REFUSE
    assert decide(table, name, 1) == REFUSE
    assert decide(table, name, 0xFFFFFFFF) == REFUSE  # kill(-1): every process
    # The kernel reads a pid_t: only the low 32 bits count, and only they are checked.
    assert decide(table, name, (1 << 32) | OTHER_PID) == REFUSE


def test_setpriority_and_ioprio_set_only_for_the_caller(table: SyscallTable) -> None:
    assert decide(table, "setpriority", 0, 0, 10) == ALLOW  # PRIO_PROCESS, this thread
    assert decide(table, "setpriority", 0, OWN_PID, 10) == REFUSE
    assert decide(table, "setpriority", 1, 0, 10) == REFUSE  # PRIO_PGRP
    assert decide(table, "setpriority", 2, 0, 10) == REFUSE  # PRIO_USER: every process
    assert decide(table, "ioprio_set", 1, 0, 0) == ALLOW  # IOPRIO_WHO_PROCESS
    assert decide(table, "ioprio_set", 1, OWN_PID, 0) == ALLOW
    assert decide(table, "ioprio_set", 1, OTHER_PID, 0) == REFUSE
    assert decide(table, "ioprio_set", 3, 0, 0) == REFUSE  # IOPRIO_WHO_USER


def test_mmap_of_uncounted_memory_is_refused(table: SyscallTable) -> None:
    private_anon, shared_anon = 0x22, 0x21
    assert decide(table, "mmap", 0, 4096, 3, private_anon, 2**64 - 1, 0) == ALLOW
    assert decide(table, "mmap", 0, 4096, 7, private_anon, 2**64 - 1, 0) == ALLOW  # RWX
    assert decide(table, "mmap", 0, 4096, 1, 0x02, 3, 0) == ALLOW  # a private file mapping
    assert decide(table, "mmap", 0, 4096, 1, 0x01, 3, 0) == ALLOW  # a shared file mapping
    assert decide(table, "mmap", 0, 4096, 3, shared_anon, 2**64 - 1, 0) == REFUSE
    assert decide(table, "mmap", 0, 4096, 3, 0x23, 2**64 - 1, 0) == REFUSE  # SHARED_VALIDATE
    assert decide(table, "mmap", 0, 4096, 3, private_anon | 0x100, 2**64 - 1, 0) == REFUSE
    assert decide(table, "mmap", 0, 4096, 3, 0x02 | 0x100, 3, 0) == REFUSE  # GROWSDOWN


def test_mremap_may_move_or_shrink_but_never_grow(table: SyscallTable) -> None:
    page, big = 4096, 2 << 30
    assert decide(table, "mremap", 0x7000, page, page, 3, 0x9000) == ALLOW  # libffi's move
    assert decide(table, "mremap", 0x7000, big, page, 1) == ALLOW  # shrink
    assert decide(table, "mremap", 0x7000, 8 << 32, 4 << 32, 1) == ALLOW  # shrink, high word
    assert decide(table, "mremap", 0x7000, page, 2 * page, 1) == REFUSE  # grow
    assert decide(table, "mremap", 0x7000, 135168, big, 1) == REFUSE  # the stack, to 2 GiB
    assert decide(table, "mremap", 0x7000, 0, page, 1) == REFUSE  # duplicate a shared one
    assert decide(table, "mremap", 0x7000, 1 << 32, (1 << 32) + 1, 1) == REFUSE
    assert decide(table, "mremap", 0x7000, (1 << 32) + 5, 2 << 32, 1) == REFUSE  # high grows


def test_clone_makes_threads_only_and_clone3_does_not_exist(table: SyscallTable) -> None:
    thread = 0x003D0F00  # glibc's pthread_create flags
    assert decide(table, "clone", thread) == ALLOW
    assert decide(table, "clone", 0x11) == REFUSE  # fork(): SIGCHLD only
    assert decide(table, "clone", thread | 0x08000000) == REFUSE  # + CLONE_NEWIPC
    assert decide(table, "clone3", 0) == ENOSYS


def test_fcntl_passes_but_for_its_lock_commands(table: SyscallTable) -> None:
    # What the runtimes use (strace, both engines): descriptor flags, status flags, dup.
    for command in (0, 1, 2, 3, 4, 1030):  # F_DUPFD, F_GETFD/SETFD, F_GETFL/SETFL, CLOEXEC
        assert decide(table, "fcntl", 3, command, 0) == ALLOW, command
    for command in (5, 6, 7, 12, 13, 14, 36, 37, 38):  # F_*LK, F_*LK64, F_OFD_*LK
        assert decide(table, "fcntl", 0, command, 0x7FFF0000) == REFUSE, command
    # The kernel reads an unsigned int: only the low 32 bits count, and only they are checked.
    assert decide(table, "fcntl", 0, (1 << 32) | 6, 0) == REFUSE


def test_a_channel_gets_no_name_or_peer_and_no_file_is_locked(table: SyscallTable) -> None:
    for name in ("bind", "listen", "accept", "accept4", "connect", "flock"):
        assert decide(table, name, 2, 0, 0) == REFUSE, name
    # The fork server's filter (no pid of its own, one clone form) refuses them too.
    program = build_program(table, None, process_clone=FORK_FLAGS)
    for name in ("bind", "listen", "accept", "accept4", "connect", "flock"):
        assert run(program, table.audit_arch, table.number(name), (2, 0, 0)) == REFUSE, name
    assert run(program, table.audit_arch, table.number("fcntl"), (0, 6, 0)) == REFUSE


def test_every_rule_names_a_call_of_each_table(table: SyscallTable) -> None:
    assert set(ARGUMENT_RULES) <= set(table.numbers)
    assert set(table.numbers) <= set(DENIED) | set(ARGUMENT_RULES) | {"seccomp"}


# -- the numbers against the kernel's own headers ------------------------------------------


def header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text()
    numbers = {m[2]: int(m[3]) for m in re.finditer(r"#define __NR(3264)?_(\w+)\s+(\d+)", text)}
    for alias, target in re.findall(r"#define __NR_(\w+)\s+__NR3264_(\w+)", text):
        if target in numbers:
            numbers.setdefault(alias, numbers[target])
    return numbers


@pytest.mark.parametrize("arch", sorted(TABLES))
def test_the_numbers_are_the_kernel_headers(arch: str) -> None:
    """Each number equals the installed kernel headers' (x86_64: asm/unistd_64.h; aarch64:
    asm-generic/unistd.h, which arm64 uses unchanged). A call the header lacks is either one
    the architecture does not have (absent from the table too) or newer than the headers:
    then it is in the unified range (424 and up), where every architecture has the same
    number."""
    path = HEADERS[arch]
    if not path.exists():
        pytest.skip(f"no {path} (apt-get install linux-libc-dev)")
    reference = header_numbers(path)
    newest = max(number for name, number in reference.items() if not name.startswith("syscalls"))
    table = TABLES[arch]
    for name, number in table.numbers.items():
        if name in reference:
            assert number == reference[name], (name, number, reference[name])
        else:
            assert number > newest and number >= 424, (name, number)
            assert all(other.numbers.get(name, number) == number for other in TABLES.values())
    for name in set(DENIED) | set(ARGUMENT_RULES):
        if name not in table.numbers:
            assert name not in reference, f"{arch} has {name} ({reference[name]})"


def test_the_module_has_one_table_per_architecture_it_claims() -> None:
    assert seccomp.table_for_machine("x86_64") is seccomp.X86_64
    assert seccomp.table_for_machine("aarch64") is seccomp.AARCH64
    assert seccomp.table_for_machine("riscv64") is None
