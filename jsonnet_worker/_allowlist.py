"""``HostAllowList``: what a host process asks ``restrict_host`` to let it open, whatever
produced the list (the application itself, or ``kratos_allow_list`` from a Kratos-style
configuration).

Goals: one public, typed value between "what this application needs" and "the Landlock layer
that allows it", so that ``restrict_host`` knows nothing of any configuration format.

Plan: four tuples of paths, one per kind of right (the names ``HostSandbox`` reports them
under), checked and made absolute when the value is made; ``skipped`` carries what its source
could not list (a path named by a config field that does not exist), so that ``restrict_host``
reports it with the rest; ``disabled_by`` names the setting that opted out of the layer.

Weak spots: paths are not checked for existence here (``restrict_host`` does, when it builds
the layer: a Landlock rule binds the inode a path names at that moment).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from ._errors import SandboxConfigError


def _paths(name: str, values: object) -> tuple[str, ...]:
    if isinstance(values, str | os.PathLike) or not isinstance(values, Iterable):
        raise SandboxConfigError(f"{name} must be a sequence of paths, not {values!r}")
    paths = []
    for value in values:
        if not isinstance(value, str | os.PathLike) or not os.fspath(value):
            raise SandboxConfigError(f"{name}: {value!r} is not a path")
        paths.append(os.path.abspath(os.fspath(value)))
    return tuple(paths)


@dataclass(frozen=True)
class HostAllowList:
    """What the host process may open once restricted, beyond what ``restrict_host`` grants
    on its own (what a new worker loads, ``/dev/null``, ``/etc/resolv.conf`` and
    ``/etc/hosts``).

    ``ro_paths``: read (a directory: everything beneath it; a file: only itself);
    ``rw_dirs``: read and write, create and remove files and directories beneath each
    directory; ``exec_paths``: read and execute; ``listed_dirs``: list the entries only.
    Each is stored absolute (relative paths against the working directory when the value is
    made). ``skipped``: what the list's source could not include, one line each (reported
    in ``HostSandbox.skipped``). ``disabled_by``: the setting that opted out of the layer (a
    Kratos config's ``security.landlock.disabled``); when set, ``restrict_host`` applies
    nothing and logs a WARNING. ``SandboxConfigError`` for a field that is not a sequence of
    paths.
    """

    ro_paths: tuple[str, ...] = ()
    rw_dirs: tuple[str, ...] = ()
    exec_paths: tuple[str, ...] = ()
    listed_dirs: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    disabled_by: str = ""

    def __post_init__(self) -> None:
        for name in ("ro_paths", "rw_dirs", "exec_paths", "listed_dirs"):
            # frozen: each field is replaced once, here, by its checked, absolute form
            object.__setattr__(self, name, _paths(name, getattr(self, name)))
        object.__setattr__(self, "skipped", tuple(str(note) for note in self.skipped))
        if not isinstance(self.disabled_by, str):
            raise SandboxConfigError("disabled_by must be the name of a setting, or empty")
