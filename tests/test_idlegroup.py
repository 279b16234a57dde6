"""The idle cpu cgroup's parts that need no demotion: where it is found, from the text of
/proc/self/cgroup and /proc/self/mountinfo, and what is said where it cannot be had. The
demotion into it, from outside and from a compromised worker, is in tests/test_scheduling.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jsonnet_worker._pool.idlegroup import IDLE_GROUP, IdleGroup, Unavailable, cpu_cgroup_dir

ROOT = os.geteuid() == 0
NOBODY = 65534

# A hybrid host as this one: v1 controllers, an empty cgroup2 beside them.
HYBRID_CGROUPS = "4:memory:/app\n2:cpuacct:/app\n1:cpu:/app/web\n0::/\n"
HYBRID_MOUNTS = (
    "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
    "31 25 0:27 / /sys/fs/cgroup/cpuacct rw,nosuid - cgroup cgroup rw,cpuacct\n"
    "32 25 0:28 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n"
)


def test_v1_the_cpu_hierarchy_and_the_applications_cgroup_in_it() -> None:
    assert cpu_cgroup_dir(HYBRID_MOUNTS, HYBRID_CGROUPS) == "/sys/fs/cgroup/cpu/app/web"


def test_v1_cpu_mounted_with_cpuacct_and_a_path_with_a_space() -> None:
    cgroups = "3:cpu,cpuacct:/my app\n"
    mounts = "40 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    assert cpu_cgroup_dir(mounts, cgroups) == "/sys/fs/cgroup/cpu,cpuacct/my app"
    escaped = "40 25 0:30 / /mnt/cg\\040cpu rw - cgroup cgroup rw,cpuacct,cpu\n"
    assert cpu_cgroup_dir(escaped, cgroups) == "/mnt/cg cpu/my app"


def test_a_mount_of_a_subtree_is_that_subtrees_root() -> None:
    """A container that sees its own cgroup mounted (the mount's root field) but the host's
    path in /proc/self/cgroup (no cgroup namespace)."""
    cgroups = "1:cpu:/docker/abc/app\n"
    mounts = "50 40 0:31 /docker/abc /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu\n"
    assert cpu_cgroup_dir(mounts, cgroups) == "/sys/fs/cgroup/cpu/app"
    elsewhere = "1:cpu:/other/app\n"
    assert cpu_cgroup_dir(mounts, elsewhere) == Unavailable(
        "cgroup v1: this process's cpu cgroup /other/app is not mounted here"
    )


def test_v2_where_the_cpu_controller_is_enabled_for_the_children(tmp_path: Path) -> None:
    mounts = f"30 25 0:26 / {tmp_path} rw - cgroup2 cgroup2 rw,nsdelegate\n"
    (tmp_path / "app").mkdir()
    control = tmp_path / "app" / "cgroup.subtree_control"
    control.write_text("memory pids\n")
    assert cpu_cgroup_dir(mounts, "0::/app\n") == Unavailable(
        f"cgroup v2: the cpu controller is not enabled for the children of {tmp_path}/app "
        "(its cgroup.subtree_control)"
    )
    control.write_text("cpu memory pids\n")
    assert cpu_cgroup_dir(mounts, "0::/app\n") == f"{tmp_path}/app"


def test_no_cpu_controller_says_why() -> None:
    assert cpu_cgroup_dir(HYBRID_MOUNTS, "4:memory:/app\n") == Unavailable(
        "no cgroup hierarchy with the cpu controller is mounted"
    )


def test_where_the_kernel_has_no_cpu_idle_nothing_is_left_behind(tmp_path: Path) -> None:
    """A directory that takes no ``cpu.idle`` (a kernel before 5.15, here a plain one): the
    group is unavailable, with the reason, and the directory it made is removed."""
    group = IdleGroup.at(str(tmp_path / IDLE_GROUP))
    assert group == IdleGroup(unavailable="this kernel has no cpu.idle (Linux 5.15 or later)")
    assert not (tmp_path / IDLE_GROUP).exists()


def test_an_existing_group_is_taken_as_it_is_and_set_idle(tmp_path: Path) -> None:
    directory = tmp_path / IDLE_GROUP
    directory.mkdir()
    (directory / "cpu.idle").write_text("0\n")
    (directory / "cgroup.procs").write_text("")
    assert IdleGroup.at(str(directory)) == IdleGroup(str(directory))
    assert (directory / "cpu.idle").read_text() == "1\n"  # "1" over "0": one byte


def test_a_non_root_parent_has_none_and_is_told_why() -> None:
    """Run as nobody (in a child, when the tests run as root) or as the unprivileged user
    that runs them (.ci/isolation-as-user)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read)
            if ROOT:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
            group = IdleGroup.find()
            os.write(write, f"{group.directory}\n{group.unavailable}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        directory, unavailable = answer.read().decode().split("\n", 1)
    os.waitpid(child, 0)
    assert not directory
    reasons = ("Permission denied", "not writable", "Read-only file system", "Linux 5.15")
    assert any(reason in unavailable for reason in reasons), unavailable


@pytest.mark.skipif(not ROOT, reason="the cgroup file system is root's")
def test_as_root_here_there_is_one() -> None:
    group = IdleGroup.find()
    if group.unavailable:  # a host without a writable cpu controller, or cpu.idle
        pytest.skip(group.unavailable)
    assert group.directory.endswith("/" + IDLE_GROUP)
    assert IdleGroup.find() == group  # found again, as it is: shared, never made twice
