"""The host's Landlock layer: a process that hosts a pool restricts itself to an allow-list.

Goals: after start-up, the process that hosts a pool may open only what it needs at run
time (the Ory Kratos ``serve`` sandbox, for any Python application): what the application
lists (a ``HostAllowList``, or a Kratos-style config turned into one by ``_kratos``), a few
system files, and exactly what a fresh worker loads, so that workers keep respawning.
Filesystem rights only: the application keeps its network. Nothing here knows a
configuration format.

Plan: ``restrict_host`` grants the list's paths (``_listed_grants``, with ``/dev/null`` and
the name-resolution files) and adds the worker's runtime (``_runtime_grants``): execute on
the interpreter and the dynamic loader, read on the stdlib, the package, msgpack and engine
files, list-only on the ``sys.path`` roots above them, and read on the shared libraries
mapped in this process and in a live worker (the pool's, or a probe worker started for it
with the settings a pool would give it), plus the engines' ``DT_NEEDED`` resolved through
their RUNPATH and the directories the loader already used. It logs what it collected and
applies one layer to the calling thread and to each given pool's supervisor thread (workers
are started there), refusing if any other thread exists: before Landlock ABI 8 a layer binds
only the thread that applies it and the threads and processes that thread starts later.

Weak spots: sonames are resolved without reading /etc/ld.so.cache (a library found only
through the cache and loaded by neither this process nor the probe worker is missed; the
worker then fails to start and says which file). A path that does not exist at start-up
cannot be granted (Landlock rules bind inodes) and is reported in ``skipped``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import stat
import sys
import sysconfig
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.machinery import EXTENSION_SUFFIXES
from typing import TYPE_CHECKING, Any

from ._allowlist import HostAllowList
from ._config import PoolConfig
from ._errors import HostSandboxError, SandboxConfigError, WorkerStartError
from ._kratos import kratos_allow_list
from ._pool.launch import launch_and_greet
from ._pool.processes import _package_paths, settings_for
from ._report import log_landlock
from ._sandbox import elf
from ._sandbox.landlock import (
    ABI_RIGHTS,
    KNOWN_ABI,
    FsAccess,
    LandlockError,
    LandlockStatus,
    Ruleset,
    SupportState,
    probe,
)
from ._wire.values import replace as replace_value  # a worker-side value's

if TYPE_CHECKING:
    from ._pool.facade import WorkerPool

logger = logging.getLogger("jsonnet_worker")

READ = FsAccess.READ_FILE | FsAccess.READ_DIR
EXECUTE = FsAccess.READ_FILE | FsAccess.EXECUTE
LIST = FsAccess.READ_DIR
TASK_CGROUPS = READ | FsAccess.WRITE_FILE | FsAccess.MAKE_DIR | FsAccess.REMOVE_DIR
DEVICE = FsAccess.READ_FILE | FsAccess.WRITE_FILE
READ_WRITE = (
    READ
    | FsAccess.WRITE_FILE
    | FsAccess.TRUNCATE
    | FsAccess.MAKE_REG
    | FsAccess.REMOVE_FILE
    | FsAccess.MAKE_DIR
    | FsAccess.REMOVE_DIR
)

SYSTEM_FILES = ("/etc/resolv.conf", "/etc/hosts")
# The dynamic loader reads its cache for every soname it looks up (a worker loads the
# engine's libraries by soname) and its preload list if there is one.
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.preload")
ENGINE_MODULES = ("_gojsonnet", "_jsonnet")
RESTART_NOTE = (
    "the host's Landlock layer is irrevocable: a changed allow-list (or opt-out) takes "
    "effect at the next start"
)


@dataclass(frozen=True)
class HostSandbox:
    """What ``restrict_host`` allowed, and whether the layer is in force.

    ``ro_paths``: read (a directory: everything beneath it); ``exec_paths``: read and
    execute (the interpreter, the dynamic loader); ``listed_dirs``: listing only (the
    ``sys.path`` roots a worker searches); ``rw_dirs``: read-write (the list's, such as a
    Kratos config's SQLite directories, and ``private_dirs``). ``skipped`` names paths that
    could not be granted and why. ``disabled``: the allow-list opted out (``disabled_by``).
    ``restart_required`` is set on the value a second call returns: the first layer stays,
    whatever the new allow-list says.
    """

    ro_paths: tuple[str, ...]
    rw_dirs: tuple[str, ...]
    exec_paths: tuple[str, ...]
    listed_dirs: tuple[str, ...]
    status: LandlockStatus
    skipped: tuple[str, ...] = ()
    disabled: bool = False
    restart_required: bool = False

    @property
    def enforced(self) -> bool:
        return self.status.enforced

    @property
    def reason(self) -> str:
        """Why the layer is not in force (empty when it is)."""
        return "" if self.enforced else self.status.reason or self.status.state.value


@dataclass
class Grants:
    """Paths and the rights each is granted; rights given twice to one path are merged."""

    grants: dict[str, FsAccess] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, path: str, access: FsAccess, why: str) -> None:
        path = os.path.abspath(path)
        if not os.path.exists(path):
            self.skipped.append(f"{path}: does not exist ({why})")
            return
        self.grants[path] = self.grants.get(path, FsAccess(0)) | access

    def add_if_exists(self, path: str, access: FsAccess) -> None:
        if os.path.exists(path):
            self.add(path, access, "")

    def with_access(self, wanted: FsAccess) -> tuple[str, ...]:
        return tuple(path for path, access in self.grants.items() if access == wanted)

    def ro_paths(self) -> tuple[str, ...]:
        return tuple(
            path
            for path, access in self.grants.items()
            if access & FsAccess.READ_FILE and access not in (EXECUTE, READ_WRITE, DEVICE)
        )

    def ruleset(self) -> Ruleset:
        ruleset = Ruleset(fs=ABI_RIGHTS[KNOWN_ABI].fs)
        for path, access in self.grants.items():
            ruleset.allow(path, access)
        return ruleset


# -- the allow-list --------------------------------------------------------------------------


def private_dir(path: str | os.PathLike[str]) -> str:
    """``path`` checked as a directory this process made for itself: absolute, no symlink
    on the way, a directory owned by this user with no access for group or others (what
    ``tempfile.mkdtemp`` makes). SandboxConfigError otherwise: a read-write grant on
    anything broader (``/tmp``, a home directory) is refused, not narrowed."""
    text = os.fspath(path)
    if not os.path.isabs(text) or os.path.realpath(text) != os.path.normpath(text):
        raise SandboxConfigError(f"private_dirs: {text!r} must be an absolute path, no symlink")
    try:
        info = os.lstat(text)
    except OSError as exc:
        raise SandboxConfigError(f"private_dirs: {text}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SandboxConfigError(f"private_dirs: {text} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise SandboxConfigError(
            f"private_dirs: {text} must be owned by this user with mode 0700 "
            f"(it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})"
        )
    return os.path.normpath(text)


def _listed_grants(allow: HostAllowList) -> Grants:
    """The list's paths with their rights, then what every host needs whatever its list:
    /dev/null, and name resolution (the host keeps its network)."""
    grants = Grants(skipped=list(allow.skipped))
    for paths, access, kind in (
        (allow.ro_paths, READ, "ro_paths"),
        (allow.rw_dirs, READ_WRITE, "rw_dirs"),
        (allow.exec_paths, EXECUTE, "exec_paths"),
        (allow.listed_dirs, LIST, "listed_dirs"),
    ):
        for path in paths:
            grants.add(path, access, f"the allow-list's {kind}")
    grants.add(os.devnull, DEVICE, "/dev/null")
    for path in SYSTEM_FILES:
        grants.add_if_exists(path, READ)
    return grants


# -- what a worker loads ---------------------------------------------------------------------


def mapped_files(pid: int | str = "self") -> set[str]:
    """The regular files mapped into a process (its program and shared libraries)."""
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    path = parts[5].rstrip("\n")
                    if not path.endswith(" (deleted)") and os.path.isfile(path):
                        found.add(path)
    except OSError:
        pass
    return found


def _probe_worker_maps(engine: str) -> set[str]:
    """Start one worker of ``engine`` (PoolConfig's defaults otherwise: what a worker maps
    depends on its engine), wait for its hello, and read what it mapped."""
    config = PoolConfig(engine=engine)
    try:
        worker, _ = launch_and_greet(settings_for(config), timeout=config.spawn_timeout)
    except WorkerStartError as exc:
        logger.warning(
            "Landlock: the probe worker did not start (%s); its libraries are not known",
            exc.cause or exc,
        )
        return set()
    try:
        return mapped_files(worker.pid)
    finally:
        worker.close()


def _resolve_needed(paths: Iterable[str], search: list[str]) -> set[str]:
    """The DT_NEEDED closure of ``paths``, each soname found as the loader would: RUNPATH
    (``$ORIGIN`` expanded) first, then the directories in ``search``."""
    found: set[str] = set()
    pending = list(paths)
    while pending:
        path = pending.pop()
        try:
            entries = elf.dynamic_strings(path)
        except (OSError, ValueError, IndexError):
            continue
        origin = os.path.dirname(path)
        runpath = [
            directory.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
            for text in entries.get(elf.DT_RUNPATH, []) + entries.get(elf.DT_RPATH, [])
            for directory in text.split(":")
        ]
        for soname in entries.get(elf.DT_NEEDED, []):
            for directory in [*runpath, *search]:
                candidate = os.path.realpath(os.path.join(directory, soname))
                if os.path.isfile(candidate):
                    if candidate not in found:
                        found.add(candidate)
                        pending.append(candidate)
                    break
    return found


def _library_search_dirs(known: Iterable[str]) -> list[str]:
    multiarch = str(getattr(sys.implementation, "_multiarch", "") or "")
    defaults = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else []
    defaults += ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    return list(dict.fromkeys([*sorted({os.path.dirname(p) for p in known}), *defaults]))


def _is_beneath(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _extension_module_dir() -> str | None:
    """Where this interpreter keeps the stdlib's extension modules (``lib-dynload``), as
    its build configured it; None where it has no such directory.

    Not the directory of one module such as ``select``: Debian builds ``select`` (and many
    others) into the interpreter, and one directory up from the stdlib is ``/usr/lib``."""
    configured = sysconfig.get_config_var("DESTSHARED")
    if isinstance(configured, str) and os.path.isdir(configured):
        return os.path.realpath(configured)
    for module in sys.modules.values():
        origin = getattr(module, "__file__", None)
        if isinstance(origin, str) and origin.endswith(tuple(EXTENSION_SUFFIXES)):
            directory = os.path.dirname(os.path.realpath(origin))
            if os.path.basename(directory) == "lib-dynload":
                return directory
    return None


def _runtime_grants(pools: Sequence[WorkerPool]) -> Grants:
    allow = Grants()
    interpreter = os.path.realpath(sys.executable)
    allow.add(interpreter, EXECUTE, "the interpreter")
    loader = elf.interpreter(interpreter)
    if loader:
        allow.add(os.path.realpath(loader), EXECUTE, "the dynamic loader")
    if sys.prefix != sys.base_prefix:
        allow.add(os.path.join(sys.prefix, "pyvenv.cfg"), READ, "the venv's pyvenv.cfg")
    stdlib = os.path.dirname(os.__file__)
    allow.add(stdlib, READ, "the stdlib")
    dynload = _extension_module_dir()
    if dynload and not _is_beneath(dynload, stdlib):
        allow.add(dynload, READ, "the stdlib's extension modules")
    package = os.path.dirname(os.path.abspath(__file__))
    allow.add(package, READ, "jsonnet_worker")
    for root in _package_paths():
        allow.add(root, LIST, "a sys.path root of the worker")
    extensions = _grant_worker_modules(allow)
    for path in LOADER_FILES:
        allow.add_if_exists(path, FsAccess.READ_FILE)
    for pool in pools:  # each worker's cgroup is made, written, read and removed there
        if pool.task_cgroups is not None:
            allow.add(pool.task_cgroups, TASK_CGROUPS, "the pool's task cgroups")
        if (idle := pool.idle_cgroup) is not None:  # a demoted worker is moved in there
            allow.add(idle, FsAccess.WRITE_FILE, "the idle cpu cgroup")
    libraries = _mapped_by_workers(pools)
    libraries |= _resolve_needed([interpreter, *extensions], _library_search_dirs(libraries))
    for path in sorted(libraries):
        if path != interpreter and not path.startswith(stdlib + os.sep):
            allow.add(path, FsAccess.READ_FILE, "a shared library a worker loads")
    return allow


def _grant_worker_modules(allow: Grants) -> list[str]:
    """Grant the modules a worker imports beyond the stdlib (msgpack, the engines); return
    their extension modules, whose shared libraries it needs too."""
    extensions = []
    for name in ("msgpack", *ENGINE_MODULES):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        if spec.submodule_search_locations:
            allow.add(os.path.dirname(spec.origin), READ, name)
            extensions += [
                os.path.join(os.path.dirname(spec.origin), entry)
                for entry in os.listdir(os.path.dirname(spec.origin))
                if entry.endswith(".so")
            ]
        else:
            allow.add(spec.origin, READ, name)
            extensions.append(spec.origin)
    return extensions


def _mapped_by_workers(pools: Sequence[WorkerPool]) -> set[str]:
    """The files this process and the pools' workers have mapped (one probe worker's, if
    no pool has a worker yet)."""
    libraries = mapped_files()
    worker_pids = [pid for pool in pools for pid in pool.stats().worker_pids]
    for pid in worker_pids:
        libraries |= mapped_files(pid)
    if not worker_pids:
        engine = pools[0].engine if pools else PoolConfig().engine
        libraries |= _probe_worker_maps(engine)
    return libraries


# -- applying it -----------------------------------------------------------------------------

_applied: HostSandbox | None = None
_applied_lock = threading.Lock()


def _other_threads(pools: Sequence[WorkerPool]) -> list[str]:
    """Threads of this process that the layer would not bind, by name."""
    allowed = {threading.get_native_id()}
    allowed |= {pool.supervisor_thread_id or 0 for pool in pools}
    try:
        task_ids = {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        task_ids = {t.native_id or 0 for t in threading.enumerate()}
    names = {t.native_id: t.name for t in threading.enumerate()}
    return [f"{names.get(tid, 'not a Python thread')} ({tid})" for tid in task_ids - allowed]


def _as_pools(pool: WorkerPool | Sequence[WorkerPool] | None) -> list[WorkerPool]:
    if pool is None:
        return []
    if isinstance(pool, Sequence):
        return list(pool)
    return [pool]


def _allow_list(
    allow: HostAllowList | Mapping[str, Any] | None,
    config_files: Iterable[str | os.PathLike[str]],
) -> HostAllowList:
    """The allow-list ``restrict_host`` was given, or the one its Kratos config names."""
    if allow is None:
        allow = HostAllowList()
    if not isinstance(allow, HostAllowList):
        return kratos_allow_list(allow, config_files)
    if list(config_files):
        raise SandboxConfigError(
            "config_files goes with a Kratos config: list the files in the HostAllowList"
        )
    return allow


def restrict_host(
    allow: HostAllowList | Mapping[str, Any] | None = None,
    *,
    config_files: Iterable[str | os.PathLike[str]] = (),
    pool: WorkerPool | Sequence[WorkerPool] | None = None,
    private_dirs: Iterable[str | os.PathLike[str]] = (),
) -> HostSandbox:
    """Apply a Landlock layer to this process that allows only what ``allow`` lists and
    what a new worker loads.

    ``allow``: a ``HostAllowList``; or a Kratos-style config (the parsed YAML mapping),
    turned into one by ``kratos_allow_list(allow, config_files)`` (``config_files``: the
    files it was read from; given with a HostAllowList, SandboxConfigError); None: only what
    every host is granted (a new worker's files, ``/dev/null``, name resolution).

    Call it once, after the application has loaded everything it needs, from the thread
    that will run it, before starting other threads (a pool passed as ``pool`` is the
    exception: its supervisor thread is restricted too, and so is every worker it starts
    from then on). The layer cannot be lifted: a later call returns the first result with
    ``restart_required=True`` and changes nothing. Raises ``SandboxConfigError`` for a bad
    allow-list or ``security.landlock`` section and ``HostSandboxError`` when Landlock is
    supported but the layer cannot be applied (fail closed).

    ``private_dirs``: directories this process made for its own run-time files (the
    service's Prometheus multiprocess directory), granted read-write, each exactly itself
    and what is beneath it; each must be absolute, owned by this user and mode 0700
    (``private_dir``), else SandboxConfigError and nothing is applied.
    """
    global _applied
    pools = _as_pools(pool)
    listed = _allow_list(allow, config_files)  # a bad list is refused, even on a later call
    with _applied_lock:
        if _applied is not None:
            logger.warning("Landlock: %s; a restart is required.", RESTART_NOTE)
            return replace(_applied, restart_required=True)
        private = [private_dir(path) for path in private_dirs]
        grants = _listed_grants(listed)
        for path in private:
            grants.grants[path] = READ_WRITE  # exactly READ_WRITE: reported in rw_dirs
        for path, access in _runtime_grants(pools).grants.items():
            grants.grants[path] = grants.grants.get(path, FsAccess(0)) | access
        ro_paths, rw_dirs = grants.ro_paths(), grants.with_access(READ_WRITE)
        # The lists run to kilobytes: at DEBUG, with one line at INFO that says how many.
        logger.debug(
            "Landlock: collected roPaths. %s", json.dumps(ro_paths), extra={"paths": ro_paths}
        )
        logger.debug(
            "Landlock: collected rwDirs. %s", json.dumps(rw_dirs), extra={"paths": rw_dirs}
        )
        logger.info(
            "Landlock: granting %d read-only paths and %d read-write directories "
            "(the lists at DEBUG).",
            len(ro_paths),
            len(rw_dirs),
        )
        for note in grants.skipped:
            logger.warning("Landlock: not granted: %s", note)
        sandbox = HostSandbox(
            ro_paths=ro_paths,
            rw_dirs=rw_dirs,
            exec_paths=grants.with_access(EXECUTE),
            listed_dirs=grants.with_access(LIST),
            status=LandlockStatus(enforced=False, state=SupportState.AVAILABLE),
            skipped=tuple(grants.skipped),
            disabled=bool(listed.disabled_by),
        )
        if listed.disabled_by:
            reason = f"disabled by {listed.disabled_by}"
            logger.warning(
                "Landlock filesystem sandbox is not active: %s. The host process can open "
                "any file its user can.",
                reason,
            )
            _applied = replace(sandbox, status=replace_value(sandbox.status, reason=reason))
            return _applied
        _applied = replace(sandbox, status=_apply(grants.ruleset(), pools))
        log_landlock(_applied.status, "The host process runs")
        return _applied


def _apply(ruleset: Ruleset, pools: Sequence[WorkerPool]) -> LandlockStatus:
    support = probe()
    if not support.available:
        return ruleset.restrict_self(support)
    others = _other_threads(pools)
    if others:
        raise HostSandboxError(
            "restrict_host must run before other threads start: a Landlock layer binds only "
            "the thread that applies it and what that thread starts later; unbound threads: "
            + ", ".join(sorted(others))
        )
    try:
        status = ruleset.restrict_self(support)
        for pool in pools:
            pool.run_on_supervisor(lambda: ruleset.restrict_self(support))
    except (LandlockError, OSError) as exc:
        raise HostSandboxError(f"cannot apply the host's Landlock layer: {exc}") from exc
    return status
