"""Landlock over ctypes: the three syscalls, the rights of each ABI, best effort as a value.

Goals: one place that knows the kernel's Landlock interface, so that the worker (an empty
layer) and the host sandbox (an allow-list) describe *what* they want and this module works
out what the running kernel can give.

Plan: ``probe()`` asks the kernel for its ABI and errata and returns a typed
``LandlockSupport``. ``Ruleset`` takes the rights a caller wants, keeps those the running ABI
knows and records the rest as dropped (the idea of rust-landlock's compat module: best effort
is a value you can print, not ``if abi >= n`` spread through the code). ``restrict_self()``
sets no_new_privs and applies the layer.

Weak spots: only x86_64/aarch64 syscall numbers are known (444-446 on both, and on most
other architectures since the syscall table was unified); errno is read only when a call
returns -1, because ctypes leaves a stale value otherwise.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import stat
import struct
import sys

# What a restriction achieved, as a hello carries it: defined with the other reported layers.
from .._wire.layers import LandlockStatus as LandlockStatus
from .._wire.layers import SupportState as SupportState
from .._wire.values import field, valueclass

SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446

CREATE_RULESET_VERSION = 1 << 0
CREATE_RULESET_ERRATA = 1 << 1
RULE_PATH_BENEATH = 1

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

# Newest ABI whose rights this module knows; a newer kernel is used at this level.
KNOWN_ABI = 9


class FsAccess(enum.IntFlag):
    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13
    TRUNCATE = 1 << 14
    IOCTL_DEV = 1 << 15
    RESOLVE_UNIX = 1 << 16


class NetAccess(enum.IntFlag):
    BIND_TCP = 1 << 0
    CONNECT_TCP = 1 << 1


class Scope(enum.IntFlag):
    ABSTRACT_UNIX_SOCKET = 1 << 0
    SIGNAL = 1 << 1


class RestrictFlag(enum.IntFlag):
    LOG_SAME_EXEC_OFF = 1 << 0
    LOG_NEW_EXEC_ON = 1 << 1
    LOG_SUBDOMAINS_OFF = 1 << 2


_FS_ABI1 = FsAccess(0x1FFF)


@valueclass
class AbiRights:
    """What one Landlock ABI version can handle."""

    fs: FsAccess
    net: NetAccess
    scope: Scope
    restrict_flags: RestrictFlag


def _rights_table() -> dict[int, AbiRights]:
    none_net, none_scope, none_flags = NetAccess(0), Scope(0), RestrictFlag(0)
    all_net = NetAccess.BIND_TCP | NetAccess.CONNECT_TCP
    all_scope = Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL
    all_flags = (
        RestrictFlag.LOG_SAME_EXEC_OFF
        | RestrictFlag.LOG_NEW_EXEC_ON
        | RestrictFlag.LOG_SUBDOMAINS_OFF
    )
    fs2 = _FS_ABI1 | FsAccess.REFER
    fs3 = fs2 | FsAccess.TRUNCATE
    fs5 = fs3 | FsAccess.IOCTL_DEV
    fs9 = fs5 | FsAccess.RESOLVE_UNIX
    return {
        1: AbiRights(_FS_ABI1, none_net, none_scope, none_flags),
        2: AbiRights(fs2, none_net, none_scope, none_flags),
        3: AbiRights(fs3, none_net, none_scope, none_flags),
        4: AbiRights(fs3, all_net, none_scope, none_flags),
        5: AbiRights(fs5, all_net, none_scope, none_flags),
        6: AbiRights(fs5, all_net, all_scope, none_flags),
        7: AbiRights(fs5, all_net, all_scope, all_flags),
        # ABI 8 adds TSYNC (all threads at once); this project restricts single-threaded
        # processes or accepts that existing threads stay free, so it does not use it.
        8: AbiRights(fs5, all_net, all_scope, all_flags),
        9: AbiRights(fs9, all_net, all_scope, all_flags),
    }


ABI_RIGHTS: dict[int, AbiRights] = _rights_table()


def rights_for_abi(abi: int) -> AbiRights:
    """The rights of ``abi``; a kernel newer than this module is used at KNOWN_ABI."""
    if abi < 1:
        return AbiRights(FsAccess(0), NetAccess(0), Scope(0), RestrictFlag(0))
    return ABI_RIGHTS[min(abi, KNOWN_ABI)]


@valueclass
class LandlockSupport:
    """What the running kernel offers, as found by ``probe()``."""

    state: SupportState
    abi: int = 0
    errata: int = 0
    detail: str = ""

    @property
    def available(self) -> bool:
        return self.state is SupportState.AVAILABLE


class LandlockError(OSError):
    """A Landlock step failed on a kernel that supports Landlock: never run untrusted code."""


def _flag_names(flags: enum.IntFlag) -> tuple[str, ...]:
    return tuple(member.name or "" for member in type(flags) if member in flags)


class _Syscalls:
    """Typed ctypes entry points, loaded once."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long
        self.prctl = libc.prctl
        self.prctl.restype = ctypes.c_int
        self.prctl.argtypes = [
            ctypes.c_int,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]

    def call(self, number: int, *args: object) -> int:
        """Run a syscall; on -1 raise OSError with the errno of *this* call."""
        ctypes.set_errno(0)
        result = int(self.syscall(ctypes.c_long(number), *args))
        if result == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result


_syscalls: _Syscalls | None = None


def _sys() -> _Syscalls:
    global _syscalls
    if _syscalls is None:
        _syscalls = _Syscalls()
    return _syscalls


_PROBE_STATES = {
    errno.ENOSYS: SupportState.NOT_BUILT_IN,
    errno.EOPNOTSUPP: SupportState.DISABLED_AT_BOOT,
    errno.EPERM: SupportState.BLOCKED_BY_SECCOMP,
}


def probe() -> LandlockSupport:
    """Ask the kernel which Landlock ABI it offers, and its errata."""
    if not sys.platform.startswith("linux"):
        return LandlockSupport(SupportState.NOT_LINUX, detail=sys.platform)
    calls = _sys()
    try:
        abi = calls.call(
            SYS_CREATE_RULESET,
            ctypes.c_void_p(None),
            ctypes.c_size_t(0),
            ctypes.c_uint32(CREATE_RULESET_VERSION),
        )
    except OSError as exc:
        state = _PROBE_STATES.get(exc.errno or 0)
        if state is None:
            return LandlockSupport(SupportState.NOT_BUILT_IN, detail=f"probe failed: {exc}")
        return LandlockSupport(state, detail=os.strerror(exc.errno or 0))
    try:
        errata = calls.call(
            SYS_CREATE_RULESET,
            ctypes.c_void_p(None),
            ctypes.c_size_t(0),
            ctypes.c_uint32(CREATE_RULESET_ERRATA),
        )
    except OSError:
        errata = 0  # kernels before the errata interface
    return LandlockSupport(SupportState.AVAILABLE, abi=abi, errata=errata)


def set_no_new_privs() -> None:
    calls = _sys()
    ctypes.set_errno(0)
    if calls.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")


def no_new_privs() -> bool:
    return bool(_sys().prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1)


def prctl(option: int, arg: int = 0) -> int:
    """prctl(2) with one argument, through the typed entry point this module holds (the
    worker's other prctl calls use it, e.g. PR_SET_PDEATHSIG); returns what the call did."""
    return int(_sys().prctl(option, arg, 0, 0, 0))


@valueclass(frozen=False)
class Ruleset:
    """The rights a caller wants handled, and path rules that grant some of them back.

    Rights the running kernel lacks are dropped (and reported); the rest are handled. An
    empty ruleset (no rules) denies every handled right.
    """

    fs: FsAccess = FsAccess(0)
    net: NetAccess = NetAccess(0)
    scope: Scope = Scope(0)
    restrict_flags: RestrictFlag = RestrictFlag(0)
    rules: list[tuple[str, FsAccess]] = field(default_factory=list)

    @classmethod
    def deny_everything(cls) -> Ruleset:
        """Every right any known ABI handles, with no rule: the worker's empty layer."""
        newest = ABI_RIGHTS[KNOWN_ABI]
        return cls(
            fs=newest.fs,
            net=newest.net,
            scope=newest.scope,
            restrict_flags=RestrictFlag.LOG_SAME_EXEC_OFF,
        )

    def allow(self, path: str, access: FsAccess) -> None:
        self.rules.append((path, access))

    def restrict_self(self, support: LandlockSupport | None = None) -> LandlockStatus:
        """Set no_new_privs and apply this layer to the calling thread (and its children).

        Returns a status with ``enforced=False`` when the kernel has no Landlock, and raises
        ``LandlockError`` when the kernel has it but a step fails (fail closed).
        """
        support = support or probe()
        if not support.available:
            return LandlockStatus(
                enforced=False,
                state=support.state,
                reason=f"Landlock {support.state.value}"
                + (f" ({support.detail})" if support.detail else ""),
            )
        offered = rights_for_abi(support.abi)
        fs, net = self.fs & offered.fs, self.net & offered.net
        scope, flags = self.scope & offered.scope, self.restrict_flags & offered.restrict_flags
        dropped = (
            _flag_names(self.fs & ~offered.fs)
            + _flag_names(self.net & ~offered.net)
            + _flag_names(self.scope & ~offered.scope)
            + _flag_names(self.restrict_flags & ~offered.restrict_flags)
        )
        calls = _sys()
        attr = ctypes.create_string_buffer(struct.pack("=QQQ", int(fs), int(net), int(scope)), 24)
        try:
            ruleset_fd = calls.call(
                SYS_CREATE_RULESET, attr, ctypes.c_size_t(24), ctypes.c_uint32(0)
            )
        except OSError as exc:
            raise LandlockError(exc.errno, f"landlock_create_ruleset: {exc.strerror}") from exc
        try:
            for path, access in self.rules:
                self._add_path_rule(calls, ruleset_fd, path, access & fs)
            try:
                set_no_new_privs()
            except OSError as exc:
                raise LandlockError(exc.errno, str(exc)) from exc
            try:
                calls.call(SYS_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(int(flags)))
            except OSError as exc:
                raise LandlockError(exc.errno, f"landlock_restrict_self: {exc.strerror}") from exc
        finally:
            os.close(ruleset_fd)
        return LandlockStatus(
            enforced=True,
            state=support.state,
            abi=support.abi,
            errata=support.errata,
            handled_fs=_flag_names(fs),
            handled_net=_flag_names(net),
            scoped=_flag_names(scope),
            restrict_flags=_flag_names(flags),
            dropped=dropped,
        )

    @staticmethod
    def _add_path_rule(calls: _Syscalls, ruleset_fd: int, path: str, access: FsAccess) -> None:
        if not access:
            return
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not stat.S_ISDIR(os.fstat(path_fd).st_mode):
                # Directory-only rights on a file make the kernel answer EINVAL.
                access &= (
                    FsAccess.EXECUTE
                    | FsAccess.WRITE_FILE
                    | FsAccess.READ_FILE
                    | (FsAccess.TRUNCATE | FsAccess.IOCTL_DEV)
                )
            rule = ctypes.create_string_buffer(struct.pack("=Qi", int(access), path_fd), 12)
            try:
                calls.call(
                    SYS_ADD_RULE,
                    ctypes.c_int(ruleset_fd),
                    ctypes.c_int(RULE_PATH_BENEATH),
                    rule,
                    ctypes.c_uint32(0),
                )
            except OSError as exc:
                raise LandlockError(
                    exc.errno, f"landlock_add_rule({path!r}): {exc.strerror}"
                ) from exc
        finally:
            os.close(path_fd)


def restrict_self_empty(support: LandlockSupport | None = None) -> LandlockStatus:
    """The worker's layer: every right of the running ABI handled, no rule."""
    return Ruleset.deny_everything().restrict_self(support)
