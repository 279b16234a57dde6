"""The idle cpu cgroup: where a demoted worker goes, so that any other thread preempts it at once.

Goals: a demoted worker (``scheduling``) must not delay a light call at all, and within its own
group ``SCHED_IDLE`` does that, but the kernel weighs groups first: a worker's threads at
``SCHED_IDLE`` still sit in a group (its session's autogroup, at nice 19) that, once picked,
keeps the CPU for its slice (EEVDF's run-to-parity) while the victim's caller or worker waits
a tick on the run queue. A cgroup whose ``cpu.idle`` is 1 is itself an idle entity: a waking
thread of any other group preempts it at once (the kernel's wake-up check prefers a non-idle
entity to an idle one at the level where they meet). Measured on a quiet machine, 4 runs of
500 victim calls beside 4 looping calls, calls over 3 ms: 23/14/23/17 without it, 4/10/9/15
with it.

Plan: ``IdleGroup.find()`` (once per pool, at its first demotion) reads where the cpu
controller is mounted (``/proc/self/mountinfo``) and this process's cgroup in it
(``/proc/self/cgroup``); the idle group is the child ``jsonnet-worker-idle`` of that cgroup,
created if absent, with ``cpu.idle`` set to 1. A child of the application's own cgroup, so
that whatever bounds the application (a container's quota, shares, cpuset) bounds its demoted
workers too. ``admit(pid)`` writes the pid to its ``cgroup.procs``, which moves every thread of
the process at once. Every pool of every process in the same cgroup shares the one group
(all that is in it is demoted), and it is left in place: a cgroup can only be removed once
empty, and another pool may be about to admit a worker. A process's threads leave it when it
exits. ``cpu_cgroup_dir`` finds the directory from the two files' text (on cgroup
v2 it reads one control file too: is the cpu controller enabled for the children).

Where there is none, ``IdleGroup`` says why (``unavailable``) and demotion goes on without it
(``SCHED_IDLE`` and the autogroup): a non-root parent (the cgroup file system is root's); a
kernel before 5.15 (no ``cpu.idle``); cgroup v2 where the cpu controller is not enabled for
the children of the application's cgroup (with no internal processes it can be only for the
root cgroup, or a delegated subtree). ``restrict_host`` finds it before applying its layer
(``WorkerPool.idle_cgroup``) and grants the directory for writing.

Why a worker cannot leave it: moving a process is a write to a cgroup file, and the worker's
Landlock layer allows it no file to write; it runs as an unprivileged uid besides, and the
cgroup files are root's.

Weak spots: one empty ``jsonnet-worker-idle`` directory stays in the application's cgroup after
its last pool; two applications in the same cgroup share the group, where their demoted
workers share what idle time there is; a worker admitted is no longer in its autogroup (a
task in a cgroup other than the root one never is), which is what is wanted here.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import cgroupfs

# The idle group's name, a child of the application's own cpu cgroup.
IDLE_GROUP = "jsonnet-worker-idle"


@dataclass(frozen=True, slots=True)
class IdleGroup:
    """The idle cgroup's directory, or (``directory`` empty) why there is none."""

    directory: str = ""
    unavailable: str = ""

    @classmethod
    def find(cls) -> IdleGroup:
        """The idle group of this process's cpu cgroup, created and set idle if need be."""
        try:
            parent = cpu_cgroup_dir(*cgroupfs.read_own())
        except OSError as exc:
            return cls(unavailable=f"cannot read this process's cgroups: {exc.strerror}")
        if isinstance(parent, Unavailable):
            return cls(unavailable=parent.why)
        return cls.at(os.path.join(parent, IDLE_GROUP))

    @classmethod
    def at(cls, directory: str) -> IdleGroup:
        """The idle group at ``directory``, created and set idle if need be."""
        made = False
        try:
            os.mkdir(directory, 0o755)
            made = True
        except FileExistsError:
            pass
        except OSError as exc:
            return cls(unavailable=f"cannot create {directory}: {exc.strerror}")
        idle = os.path.join(directory, "cpu.idle")
        try:
            if cgroupfs.read_words(idle) != ["1"]:
                cgroupfs.write(idle, "1")
        except OSError as exc:
            if made:  # leave nothing of ours behind that is of no use
                _remove(directory)
            if exc.errno == errno.ENOENT:
                return cls(unavailable="this kernel has no cpu.idle (Linux 5.15 or later)")
            return cls(unavailable=f"cannot set {idle} to 1: {exc.strerror}")
        if not os.access(os.path.join(directory, "cgroup.procs"), os.W_OK):
            return cls(unavailable=f"cannot move processes into {directory}: not writable")
        return cls(directory)

    def admit(self, pid: int) -> str:
        """Move process ``pid`` (every thread) into the group: "" once done, or gone; else
        why not."""
        try:
            cgroupfs.write(os.path.join(self.directory, "cgroup.procs"), str(pid))
        except ProcessLookupError:  # it has exited
            return ""
        except OSError as exc:
            return f"idle cgroup {self.directory}: {exc.strerror}"
        return ""


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why there is no cpu cgroup to make the idle group in."""

    why: str


def cpu_cgroup_dir(mountinfo: str, cgroups: str) -> str | Unavailable:
    """The directory of this process's cgroup in the cpu controller's hierarchy, from the
    text of ``/proc/self/mountinfo`` and ``/proc/self/cgroup``, or why there is none to use.
    The v1 hierarchy where the cpu controller is bound to one (it then is in no v2 one);
    else v2, where the cpu controller is enabled for the children of this process's cgroup.
    Reads that cgroup's ``cgroup.subtree_control``; writes nothing."""
    v2_mount, v1_mount = cgroupfs.mounts(mountinfo, "cpu")
    v2_path, v1_path = cgroupfs.own_cgroups(cgroups, "cpu")
    if v1_path is not None:
        own = cgroupfs.inside(v1_mount, v1_path) if v1_mount is not None else None
        if own is None:
            return Unavailable(
                f"cgroup v1: this process's cpu cgroup {v1_path} is not mounted here"
            )
        return own
    if v2_mount is None or v2_path is None:
        return Unavailable("no cgroup hierarchy with the cpu controller is mounted")
    own = cgroupfs.inside(v2_mount, v2_path)
    if own is None:
        return Unavailable(f"cgroup v2: this process's cgroup {v2_path} is outside the mount")
    if "cpu" not in cgroupfs.read_words(os.path.join(own, "cgroup.subtree_control")):
        return Unavailable(
            f"cgroup v2: the cpu controller is not enabled for the children of {own} "
            "(its cgroup.subtree_control)"
        )
    return own


def _remove(directory: str) -> None:
    try:
        os.rmdir(directory)
    except OSError:  # another pool put a worker in it meanwhile: it is in use, then
        pass


def cgroup_of(pid: int) -> str:
    """``pid``'s cgroup in the cpu controller's hierarchy, as ``/proc/<pid>/cgroup`` names it
    (for tests)."""
    with open(f"/proc/{pid}/cgroup") as cgroups:
        lines = [line.split(":", 2) for line in cgroups.read().splitlines()]
    return next(
        (path for _, controllers, path in lines if "cpu" in controllers.split(",")),
        next(path for number, controllers, path in lines if number == "0" and not controllers),
    )
