"""The worker's start-up: one ordered list of steps, one line per layer, under which the
evaluation loop (``loop``) then runs.

Goals: a process that evaluates untrusted Jsonnet and can read no file, reach no TCP port
and signal no process outside itself, on a kernel that offers Landlock; that never evaluates if
the sandbox is supported but cannot be applied; and whose every thread is born inside the
Landlock domain.

Plan (the order is the point; ``main`` and the tuples below are the order, nsjail's
``contain.cc`` style, so a reader sees it at a glance):
  1. tie our life to the parent (PR_SET_PDEATHSIG);
  2. move the protocol pipes off fds 0 and 1 (``loop.ProtocolStreams``), so nothing else can
     read the request stream or write into the response stream;
  then ``RESTRICT``, in order:
  3. import and warm everything the loop will ever need;
  4. prepare the engine (a memfd copy of the extension, its shared libraries loaded) without
     starting it;
  5. the resource limits (memory, core, file size, locked memory, real-time and nice
     priority, message queues, stack, the CPU budget), after the memfd is written;
  6. when started by root, a new IPC namespace (it needs root: before the drop);
  7. the task and file limits, for the uid the worker will run as;
  8. the drop to the worker user (``_sandbox.privileges``; a uid of its own where the pool
     has a uid range) and PR_SET_PDEATHSIG re-armed, which the kernel clears on a credential
     change;
  9. while the process has exactly one thread: no_new_privs and the empty Landlock layer;
  10. check from inside that the layer holds (opening a file we could open before must fail);
  then ``FINISH``:
  11. load the engine (its Go threads are born restricted);
  12. the seccomp filter on every thread at once (``_sandbox.seccomp``: the Go threads exist
      by now, and memfd_create is refused from here on);
  13. the loop thread (``loop.serve``: born restricted, and off the main thread, where cgo's
      stack probing re-reads /proc/self/maps on every call and now fails), which measures
      the memory headroom the limit leaves and sends the hello, which reports every layer.
Any failure in 3-12 sends a ``StartupFailure`` and exits non-zero (fail closed). A fork
server (``forkserver``) runs 1-10 once, with its own seccomp filter, and forks children that
each add a nested Landlock layer, check it, and run ``FINISH`` and the loop.

Weak spots: where the kernel has no Landlock the worker still runs, reports why in its
hello, and the pool decides (``require_sandbox``). A step that cannot apply a
defence-in-depth layer (the IPC namespace, a limit the kernel refuses) reports it missing
rather than failing.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import resource
import sys
import time
from collections.abc import Callable

from .._sandbox import landlock, privileges, seccomp
from .._wire.framing import DEFAULT_MAX_FRAME, encode
from .._wire.layers import LandlockStatus, LayerStatus
from .._wire.messages import (
    EngineKind,
    ErrorKind,
    Failure,
    StartupFailure,
    WorkerHello,
)
from .._wire.values import field, replace, valueclass
from . import engines, loop

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from signal import SIGKILL
else:  # signal's constant without its enums (part of every worker's start-up)
    from _signal import SIGKILL

PR_SET_PDEATHSIG = 1
EXIT_STARTUP_FAILED = 70


@valueclass
class WorkerOptions:
    """What the worker's command line asks for (``parse_args``)."""

    engine: EngineKind
    memory_limit: int
    parent_pid: int
    max_frame: int = DEFAULT_MAX_FRAME
    identity: privileges.WorkerIdentity | None = None
    cpu_budget: float | None = None
    engine_api: str = "auto"


class StartupError(Exception):
    """A start-up step that cannot be done: the worker says why and exits (fail closed)."""


# What a failed step raises: its own StartupError, or what a system call or a value gave.
STARTUP_ERRORS = (StartupError, OSError, ValueError)


# The worker's command line, as ``_pool.processes.worker_command`` writes it: each option
# but ``--own-uid`` takes one value. Read by hand, not by argparse, which would cost every
# worker start about 5 ms (its import, gettext's locale lookup, shutil for a help text's
# terminal width) for a command line that no person types.
_VALUED = frozenset(
    {"engine", "memory-limit", "parent-pid", "max-frame", "user", "uid", "gid", "cpu-budget"}
    | {"engine-api"}  # "binding" keeps the go engine on its binding (tests, benchmarks)
)
_OWN_UID = "--own-uid"
ENGINE_APIS = ("auto", "binding")


def parse_args(argv: list[str]) -> WorkerOptions:
    """The options of a worker's command line; ``StartupError`` says what is wrong."""
    given: dict[str, str] = {}
    own_uid = False
    words = iter(argv)
    for word in words:
        if word == _OWN_UID:
            own_uid = True
            continue
        value = next(words, None)
        if not word.startswith("--") or word[2:] not in _VALUED or value is None:
            raise StartupError(f"bad worker command line: {word!r} unknown or without a value")
        given[word[2:]] = value
    try:
        return _options(given, own_uid)
    except KeyError as exc:
        raise StartupError(f"bad worker command line: --{exc.args[0]} missing") from None
    except ValueError as exc:
        raise StartupError(f"bad worker command line: {exc}") from None


def _options(given: dict[str, str], own_uid: bool) -> WorkerOptions:
    identity = None
    if "uid" in given and "gid" in given:
        uid = int(given["uid"])
        user = given.get("user") or str(uid)
        identity = privileges.WorkerIdentity(user, uid, int(given["gid"]), own_uid=own_uid)
    engine_api = given.get("engine-api", "auto")
    if engine_api not in ENGINE_APIS:
        raise ValueError(f"--engine-api {engine_api!r}")
    budget = given.get("cpu-budget")
    return WorkerOptions(
        engine=EngineKind(given["engine"]),
        memory_limit=int(given["memory-limit"]),
        parent_pid=int(given["parent-pid"]),
        max_frame=int(given.get("max-frame", DEFAULT_MAX_FRAME)),
        identity=identity,
        cpu_budget=None if budget is None else float(budget),
        engine_api=engine_api,
    )


def tie_to_parent(parent_pid: int) -> None:
    if landlock.prctl(PR_SET_PDEATHSIG, SIGKILL) != 0:
        raise StartupError("PR_SET_PDEATHSIG failed")
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(EXIT_STARTUP_FAILED)


# Limits a worker needs none of: no locked memory, no real-time or raised priority, no POSIX
# message queue bytes (seccomp refuses the calls too; these hold if it is missing).
ZERO_LIMITS = {
    "RLIMIT_MEMLOCK": resource.RLIMIT_MEMLOCK,
    "RLIMIT_RTPRIO": resource.RLIMIT_RTPRIO,
    "RLIMIT_NICE": resource.RLIMIT_NICE,
    "RLIMIT_MSGQUEUE": resource.RLIMIT_MSGQUEUE,
}
DEFAULT_STACK = 8 * 1024 * 1024
# Past the budget the kernel sends SIGXCPU (the default action ends the process), and this
# much later SIGKILL, for a worker that ignores SIGXCPU.
CPU_HARD_MARGIN = 1


def set_limits(memory_limit: int, cpu_budget: float | None = None) -> str:
    """No core dumps, no file writes, bounded memory and CPU. Runs after the engine's memfd
    is written: RLIMIT_FSIZE applies to memfds too. Returns what it set, for the limits
    layer; a limit the kernel refuses is named there, not fatal (every one is a lowering,
    which Linux never refuses: a refusal means an emulating kernel such as gVisor)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    wanted = dict.fromkeys(ZERO_LIMITS, (0, 0))
    # The main thread's stack is not counted in RLIMIT_DATA: its hard limit too is the soft
    # one, so it cannot be raised and grown (mremap, which could move it, is refused).
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    stack = soft if soft != resource.RLIM_INFINITY else min(DEFAULT_STACK, hard)
    wanted["RLIMIT_STACK"] = (stack, stack)
    if cpu_budget is not None:
        _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
        seconds = max(1, math.ceil(cpu_budget))
        limit = seconds + CPU_HARD_MARGIN
        if cpu_hard != resource.RLIM_INFINITY:
            seconds, limit = min(seconds, cpu_hard), min(limit, cpu_hard)
        wanted["RLIMIT_CPU"] = (seconds, limit)
    zero, done, refused = ["RLIMIT_FSIZE", "RLIMIT_CORE"], [f"RLIMIT_DATA {memory_limit}"], []
    for name, value in wanted.items():
        try:
            resource.setrlimit(getattr(resource, name), value)
        except (OSError, ValueError) as exc:
            refused.append(f"{name} ({exc})")
        else:
            if value == (0, 0):
                zero.append(name)
            else:
                done.append(f"{name} {value[0]}" + (f"/{value[1]}" if value[1] != value[0] else ""))
    # One short line: the hello that carries it must fit in a small max_request too.
    text = ", ".join(done) + f"; 0: {', '.join(name.removeprefix('RLIMIT_') for name in zero)}"
    return text + (f"; refused by the kernel: {', '.join(refused)}" if refused else "")


CLONE_THREAD = 0x00010000


def thread_count() -> int:
    """The number of threads of this process.

    Read from /proc/self/status; where an outer Landlock domain (a host restricted with
    ``restrict_host``) refuses /proc, ask the kernel instead: ``unshare(CLONE_THREAD)`` is a
    no-op that fails with EINVAL exactly when the process has more than one thread. Any
    other failure (a seccomp profile that blocks unshare) is a start-up failure: fail closed.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except PermissionError:
        return 1 if _alone_in_thread_group() else 2
    raise StartupError("no Threads: line in /proc/self/status")


def _alone_in_thread_group() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    ctypes.set_errno(0)
    if libc.unshare(ctypes.c_int(CLONE_THREAD)) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return False
    raise StartupError(
        f"cannot count threads: /proc/self/status is refused and unshare(CLONE_THREAD) "
        f"failed: {os.strerror(err)}"
    )


def warm_up(progress: StartUp) -> None:
    """Load lazily-imported code now: after restriction no module file can be opened."""
    "é".encode("utf-8", "replace").decode("utf-8", "replace")
    b"\xff".decode("utf-8", "replace")
    "\ud800".encode("utf-8", "replace")
    encode(Failure(0, ErrorKind.INTERNAL, "warm-up").to_message())
    try:
        raise MemoryError
    except MemoryError:
        pass


def self_check_target() -> str:
    """Before restriction: a file this process can open now (after any privilege drop, the
    interpreter may sit in a directory the worker user cannot search)."""
    # /dev/null last: readable by any user and allowed by a restricted host's layer
    # (``restrict_host``), where the first two are not.
    for path in (sys.executable, "/proc/self/status", os.devnull):
        try:
            with open(path, "rb"):
                return path
        except OSError:
            continue
    raise StartupError("no file to run the Landlock self-check on")


def self_check(status: LandlockStatus, target: str) -> str:
    """Try to open a file we could read before restriction; it must be refused."""
    try:
        with open(target, "rb"):
            pass
    except PermissionError as exc:
        return f"refused: open({target!r}) -> {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    except OSError as exc:
        if status.enforced:
            return f"refused: open({target!r}) -> {errno.errorcode.get(exc.errno or 0, exc.errno)}"
        raise
    if status.enforced:
        raise StartupError(f"Landlock reported enforced, but opening {target} succeeded")
    return f"allowed: open({target!r}) succeeded (no Landlock on this kernel)"


@valueclass(frozen=False)
class StartUp:
    """What start-up has achieved so far: each step fills in its part, in order. A fork
    server keeps the one ``RESTRICT`` left it, and each fork goes on from a copy."""

    options: WorkerOptions
    started: float = field(default_factory=time.monotonic)
    prepared: engines.PreparedEngine | None = None
    resource_limits: str = ""  # what ``set_limits`` set, for the limits layer's detail
    layers: dict[str, LayerStatus] = field(default_factory=dict)  # beyond Landlock, by name
    check_target: str = ""  # what the self-check opens: a forked worker checks its layer on it
    landlock: LandlockStatus | None = None
    self_check: str = ""
    engine: engines.Engine | None = None

    def hello(self) -> WorkerHello:
        """The worker's hello, once ``FINISH`` is done."""
        assert self.engine is not None and self.landlock is not None
        return WorkerHello(
            pid=os.getpid(),
            engine=self.options.engine.value,
            engine_version=self.engine.version,
            engine_api=self.engine.api,
            python=sys.version.split()[0],
            landlock=self.landlock,
            layers=tuple(self.layers.values()),
            self_check=self.self_check,
            startup_ms=round((time.monotonic() - self.started) * 1000, 3),
        )


Step = Callable[[StartUp], None]


def prepare_engine(progress: StartUp) -> None:
    try:
        progress.prepared = engines.prepare(progress.options.engine)
    except engines.EngineLoadError as exc:
        raise StartupError(str(exc)) from exc


def limit_resources(progress: StartUp) -> None:
    progress.resource_limits = set_limits(
        progress.options.memory_limit, progress.options.cpu_budget
    )


def ipc_namespace(progress: StartUp) -> None:
    progress.layers["ipc_namespace"] = privileges.new_ipc_namespace()


def limit_tasks_and_files(progress: StartUp) -> None:
    identity = progress.options.identity
    limits = privileges.set_task_and_file_limits(identity.uid if identity else os.getuid())
    detail = f"{limits.detail}, {progress.resource_limits}".strip(", ")
    progress.layers["limits"] = replace(limits, detail=detail)


def drop_privileges(progress: StartUp) -> None:
    identity = progress.options.identity
    if identity is not None:
        privileges.drop_to(identity)
        tie_to_parent(progress.options.parent_pid)  # a credential change cleared PR_SET_PDEATHSIG
    progress.layers["privileges"] = privileges.privilege_status(identity)
    progress.layers["uid"] = privileges.uid_status(identity)


def landlock_layer(progress: StartUp) -> None:
    progress.check_target = self_check_target()  # before restriction: a file we can open now
    threads = thread_count()
    if threads != 1:
        raise StartupError(
            f"{threads} threads exist before restriction; each must be born inside the domain"
        )
    try:
        progress.landlock = landlock.restrict_self_empty()
        if not progress.landlock.enforced:
            landlock.set_no_new_privs()
    except OSError as exc:
        raise StartupError(f"cannot apply the Landlock layer: {exc}") from exc


def check_the_layer(progress: StartUp) -> None:
    assert progress.landlock is not None
    progress.self_check = self_check(progress.landlock, progress.check_target)


def load_engine(progress: StartUp) -> None:
    assert progress.prepared is not None
    try:
        progress.engine = engines.Engine(
            progress.options.engine,
            engines.load(progress.prepared),
            prefer_capi=progress.options.engine_api != "binding",
        )
    except engines.EngineLoadError as exc:
        raise StartupError(str(exc)) from exc


def seccomp_filter(progress: StartUp) -> None:
    try:
        progress.layers["seccomp"] = seccomp.layer_status(seccomp.install())
    except OSError as exc:
        raise StartupError(f"cannot apply the seccomp filter: {exc}") from exc


# Steps 3-10 of the plan: up to the engine, what a fork server runs once for all its forks.
RESTRICT: tuple[Step, ...] = (
    warm_up,  # import and exercise what is used once no file can be opened
    prepare_engine,  # the engine's memfd and libraries, not started
    limit_resources,  # memory, core, file size, ...: after the memfd (FSIZE applies to it)
    ipc_namespace,  # needs root: before the drop
    limit_tasks_and_files,  # RLIMIT_NPROC and NOFILE, for the uid the worker runs as
    drop_privileges,  # the worker user; PR_SET_PDEATHSIG re-armed
    landlock_layer,  # one thread, no_new_privs, the empty layer
    check_the_layer,  # opening a file we could open before must fail now
)
# Steps 11-12: what each worker runs for itself (a fork of a fork server too).
FINISH: tuple[Step, ...] = (
    load_engine,  # its Go threads are born inside every layer above
    seccomp_filter,  # on every thread at once; no memfd_create from here on
)


def run_steps(progress: StartUp, steps: tuple[Step, ...]) -> StartUp:
    """Each step in order; the first that fails raises one of STARTUP_ERRORS and ends it."""
    for step in steps:
        step(progress)
    return progress


def start(options: WorkerOptions) -> StartUp:
    """Steps 3-12; raises one of STARTUP_ERRORS."""
    return run_steps(StartUp(options), (*RESTRICT, *FINISH))


def main(argv: list[str]) -> int:
    try:
        options = parse_args(argv)
    except StartupError as exc:  # before the protocol streams exist: said on stderr
        print(f"worker start-up failed: {exc}", file=sys.stderr, flush=True)
        return EXIT_STARTUP_FAILED
    tie_to_parent(options.parent_pid)  # 1
    streams = loop.ProtocolStreams()  # 2
    try:
        started = start(options)  # 3-12
    except STARTUP_ERRORS as exc:
        reason = f"worker start-up failed: {exc}"
        print(reason, file=sys.stderr, flush=True)
        streams.send(StartupFailure(reason))
        return EXIT_STARTUP_FAILED
    assert started.engine is not None
    return loop.serve(  # 13
        streams, started.engine, started.hello(), options.max_frame, options.memory_limit
    )
