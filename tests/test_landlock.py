"""The Landlock module: probe, rights table, best effort as a value."""

from __future__ import annotations

import os
import subprocess
import sys

from jsonnet_worker._sandbox import landlock
from jsonnet_worker._sandbox.landlock import FsAccess, NetAccess, Scope, SupportState
from jsonnet_worker._wire.messages import ForkServerHello


def test_rights_table_grows_with_the_abi() -> None:
    assert landlock.rights_for_abi(1).fs == FsAccess(0x1FFF)
    assert FsAccess.REFER in landlock.rights_for_abi(2).fs
    assert FsAccess.TRUNCATE in landlock.rights_for_abi(3).fs
    assert landlock.rights_for_abi(3).net == NetAccess(0)
    assert landlock.rights_for_abi(4).net == NetAccess.BIND_TCP | NetAccess.CONNECT_TCP
    assert FsAccess.IOCTL_DEV in landlock.rights_for_abi(5).fs
    assert landlock.rights_for_abi(6).scope == Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL
    assert landlock.rights_for_abi(7).restrict_flags
    assert FsAccess.RESOLVE_UNIX in landlock.rights_for_abi(9).fs
    assert landlock.rights_for_abi(42) == landlock.rights_for_abi(landlock.KNOWN_ABI)
    for abi in range(1, landlock.KNOWN_ABI):
        newer = landlock.rights_for_abi(abi + 1)
        older = landlock.rights_for_abi(abi)
        assert older.fs & newer.fs == older.fs and older.net & newer.net == older.net


def test_probe_reports_this_kernel() -> None:
    support = landlock.probe()
    assert support.state in set(SupportState)
    if support.available:
        assert support.abi >= 1


def test_status_round_trips_through_a_hello() -> None:
    status = landlock.LandlockStatus(
        enforced=True,
        state=SupportState.AVAILABLE,
        abi=7,
        errata=1,
        handled_fs=("READ_FILE",),
        handled_net=("BIND_TCP",),
        scoped=("SIGNAL",),
        restrict_flags=("LOG_SAME_EXEC_OFF",),
        dropped=("RESOLVE_UNIX",),
    )
    hello = ForkServerHello(1, "go", "3.11", status, "refused", 1.0, (), fork_flags=0)
    assert ForkServerHello.from_message(hello.to_message()).landlock == status
    assert "dropped" in status.summary() and "RESOLVE_UNIX" in status.summary()


def test_unavailable_kernel_gives_a_typed_status_not_an_error() -> None:
    support = landlock.LandlockSupport(SupportState.DISABLED_AT_BOOT, detail="lsm=")
    status = landlock.restrict_self_empty(support)
    assert not status.enforced and status.state is SupportState.DISABLED_AT_BOOT
    assert "disabled at boot" in status.reason


def test_best_effort_drops_what_an_older_abi_lacks() -> None:
    """Run in a child: restriction is irrevocable. ABI 3 is pretended; the real kernel
    accepts the subset, and the status names what was dropped."""
    code = (
        "from jsonnet_worker._sandbox import landlock as l\n"
        "real = l.probe()\n"
        "s = l.restrict_self_empty(l.LandlockSupport(real.state, abi=min(3, real.abi)))\n"
        "print(s.enforced, ','.join(s.dropped), ','.join(s.handled_net))\n"
        "try:\n"
        "    open('/etc/hostname')\n"
        "    print('opened')\n"
        "except PermissionError:\n"
        "    print('refused')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    ).stdout.split("\n")
    enforced, dropped, net = out[0].split(" ")
    assert enforced == "True"
    assert "BIND_TCP" in dropped and "SIGNAL" in dropped and "IOCTL_DEV" in dropped
    assert net == ""
    assert out[1] == "refused"
