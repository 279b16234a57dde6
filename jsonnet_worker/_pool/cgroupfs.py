"""Reading the cgroup file system: where a controller's hierarchy is mounted, and this
process's cgroup in it.

Goals: the pool makes cgroups under its own, for two controllers (``tasklimit``: a pids
cgroup per worker; ``idlegroup``: the idle cpu cgroup of demoted workers), and both find
their place the same way, from the text of ``/proc/self/mountinfo`` and ``/proc/self/cgroup``,
on cgroup v1, v2, or a hybrid of the two (this machine: v1 controllers beside an empty v2).

Plan: ``mounts`` gives the first cgroup2 mount and the first v1 mount with the controller,
each as (the root of the hierarchy it shows, where it is mounted); ``own_cgroups`` this
process's v2 path and its v1 path for the controller; ``inside`` the directory of a path in
a mount. ``read_words`` and ``write`` read and write control files (one ``write(2)``: a
kernfs file takes its value in one write).

Weak spots: a cgroup outside the mount (another cgroup namespace's view) has no directory
here (``inside`` gives None): the caller says so.
"""

from __future__ import annotations

import os
import re

Mount = tuple[str, str]  # (the root of the hierarchy it shows, where it is mounted)


def mounts(mountinfo: str, controller: str) -> tuple[Mount | None, Mount | None]:
    """The first cgroup2 mount and the first cgroup v1 mount with ``controller``."""
    v2_mount = v1_mount = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        tail = fields[fields.index("-") + 1 :]  # fs type, source, super options
        if len(tail) < 3:
            continue
        mount = (fields[3], unescape(fields[4]))
        if tail[0] == "cgroup2" and v2_mount is None:
            v2_mount = mount
        elif tail[0] == "cgroup" and controller in tail[2].split(",") and v1_mount is None:
            v1_mount = mount
    return v2_mount, v1_mount


def own_cgroups(cgroups: str, controller: str) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and its v1 path for ``controller``
    (``/proc/self/cgroup``)."""
    v2_path = v1_path = None
    for line in cgroups.splitlines():
        hierarchy_id, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy_id == "0" and controllers == "":
            v2_path = path
        elif controller in controllers.split(","):
            v1_path = path
    return v2_path, v1_path


def unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), path)


def inside(mount: Mount, path: str) -> str | None:
    """The directory of cgroup ``path`` in a hierarchy mounted as ``mount`` (its root, its
    mount point); None if the mount does not show it (another cgroup namespace's)."""
    root, point = mount
    if root != "/" and path != root and not path.startswith(root.rstrip("/") + "/"):
        return None
    relative = path[len(root) :] if root != "/" else path
    return os.path.join(point, relative.lstrip("/")).rstrip("/") or "/"


def read_words(path: str) -> list[str]:
    try:
        with open(path) as file:
            return file.read().split()
    except OSError:
        return []


def write(path: str, text: str) -> None:
    """One write(2) of a control file (a kernfs file takes its value in one write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_own() -> tuple[str, str]:
    """This process's ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` (OSError where
    they cannot be read)."""
    with open("/proc/self/mountinfo") as mountinfo, open("/proc/self/cgroup") as cgroups:
        return mountinfo.read(), cgroups.read()
