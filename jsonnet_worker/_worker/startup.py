"""The worker process: start-up under an empty Landlock layer, then the evaluation loop.

Goals: a process that evaluates untrusted Jsonnet and can read no file, reach no TCP port
and signal no process outside itself, on a kernel that offers Landlock; that never evaluates if
the sandbox is supported but cannot be applied; and whose every thread is born inside the
Landlock domain.

Plan (the order is the point):
  1. tie our life to the parent (PR_SET_PDEATHSIG), move the protocol pipes off fds 0 and 1
     so nothing else can read the request stream or write into the response stream;
  2. import and warm everything the loop will ever need, and prepare the engine (a memfd
     copy of the extension, its shared libraries loaded) without starting it;
  3. the resource limits (memory, core, file size, locked memory, real-time and nice
     priority, message queues, stack, the CPU budget, then tasks and fds); when started by
     root, a new IPC namespace, then the drop to the worker user (``_privileges``; a uid of
     its own where the pool has a uid range) and PR_SET_PDEATHSIG re-armed, which the kernel
     clears on a credential change;
  4. while the process has exactly one thread: no_new_privs and the empty layer;
  5. check from inside that the layer holds (opening our own interpreter must fail);
  6. load the engine (its Go threads are born restricted), then the seccomp filter on every
     thread at once (``_seccomp``: the Go threads exist by now, and memfd_create is refused
     from here on), start the loop thread (born restricted, and off the main thread, where
     cgo's stack probing re-reads /proc/self/maps on every call and now fails), measure the
     memory headroom the limit leaves (``MemoryHeadroom``), and send the hello, which reports
     every layer.
Any failure in 2-6 sends a ``startup_failed`` frame and exits non-zero. Steps 2-5 are
``start_restricted``, step 6 ``finish_start`` and ``serve``: a template (``_template``) runs
the first half once and forks children that each run the second.

Weak spots: where the kernel has no Landlock the worker still runs, reports why in its
hello, and the pool decides (``require_sandbox``).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import math
import mmap
import os
import resource
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .._sandbox import landlock, privileges, seccomp
from .._wire.layers import LayerStatus
from .._wire.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    RETIRE_AT_MEMORY_SHARE,
    WORKER_COMMAND,
    EngineKind,
    ErrorKind,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    ProtocolViolation,
    encode,
    error_message,
    parse_request,
    result_message,
)
from . import engines

PR_SET_PDEATHSIG = 1
EXIT_STARTUP_FAILED = 70
EXIT_PROTOCOL = 71
READ_SIZE = 256 * 1024
# A sequential caller's next request follows an answer within tens of microseconds on an idle
# machine; interleaved A/B runs on the busy 2-CPU machine (issue 13): a 60 us window, spun only
# while it pays, beat both a fixed 300 us spin (p50 1.09x vs 3.0-3.9x in-process) and none.
SPIN_FOR_REQUEST = 0.00006
# The memory headroom is probed (a few microseconds) after an evaluation that took at least
# this long, and after every MEMORY_PROBE_EVERY answers: mapping hundreds of megabytes takes
# an honest engine far longer than this, so the fast calls skip the probe.
MEMORY_PROBE_AFTER = 0.001
MEMORY_PROBE_EVERY = 256


@dataclass(frozen=True)
class WorkerOptions:
    engine: EngineKind
    memory_limit: int
    parent_pid: int
    max_frame: int = DEFAULT_MAX_FRAME
    identity: privileges.WorkerIdentity | None = None
    cpu_budget: float | None = None
    engine_api: str = "auto"


class StartupFailed(Exception):
    pass


def parse_args(argv: list[str]) -> WorkerOptions:
    parser = argparse.ArgumentParser(prog=f"jsonnet_worker {WORKER_COMMAND}", add_help=False)
    parser.add_argument("--engine", choices=[kind.value for kind in EngineKind])
    parser.add_argument("--memory-limit", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME)
    parser.add_argument("--user", default=None)
    parser.add_argument("--uid", type=int, default=None)
    parser.add_argument("--gid", type=int, default=None)
    parser.add_argument("--own-uid", action="store_true")
    parser.add_argument("--cpu-budget", type=float, default=None)
    # "binding" keeps the go engine on its Python binding (tests and benchmarks compare).
    parser.add_argument("--engine-api", choices=["auto", "binding"], default="auto")
    args = parser.parse_args(argv)
    identity = None
    if args.uid is not None and args.gid is not None:
        identity = privileges.WorkerIdentity(
            args.user or str(args.uid), args.uid, args.gid, own_uid=args.own_uid
        )
    return WorkerOptions(
        engine=EngineKind(args.engine),
        memory_limit=args.memory_limit,
        parent_pid=args.parent_pid,
        max_frame=args.max_frame,
        identity=identity,
        cpu_budget=args.cpu_budget,
        engine_api=args.engine_api,
    )


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ProtocolStreams:
    """The request and response pipes, moved to private fds at start-up.

    fd 0 becomes /dev/null (so ``/dev/stdin`` is not the request stream even without
    Landlock) and fd 1 a copy of stderr (so a stray write by the engine or by Python lands in
    the diagnostics, never inside a frame).
    """

    def __init__(self) -> None:
        self.requests = os.dup(0)
        self.responses = os.dup(1)
        os.set_inheritable(self.requests, False)
        os.set_inheritable(self.responses, False)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)

    def send(self, message: dict[str, Any]) -> None:
        write_all(self.responses, encode(message))


def tie_to_parent(parent_pid: int) -> None:
    if landlock.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise StartupFailed("PR_SET_PDEATHSIG failed")
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
    raise StartupFailed("no Threads: line in /proc/self/status")


def _alone_in_thread_group() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    ctypes.set_errno(0)
    if libc.unshare(ctypes.c_int(CLONE_THREAD)) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        return False
    raise StartupFailed(
        f"cannot count threads: /proc/self/status is refused and unshare(CLONE_THREAD) "
        f"failed: {os.strerror(err)}"
    )


def warm_up() -> None:
    """Load lazily-imported code now: after restriction no module file can be opened."""
    "é".encode("utf-8", "replace").decode("utf-8", "replace")
    b"\xff".decode("utf-8", "replace")
    "\ud800".encode("utf-8", "replace")
    encode(error_message(0, ErrorKind.INTERNAL, "warm-up"))
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
    raise StartupFailed("no file to run the Landlock self-check on")


def self_check(status: landlock.LandlockStatus, target: str) -> str:
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
        raise StartupFailed(f"Landlock reported enforced, but opening {target} succeeded")
    return f"allowed: open({target!r}) succeeded (no Landlock on this kernel)"


def can_map(size: int) -> bool:
    """Whether RLIMIT_DATA (and the kernel's overcommit policy) would let this process map
    ``size`` more bytes of private writable memory now: mapped and unmapped untouched, so
    it costs no page. No /proc: under the empty layer a forked worker cannot open its own."""
    try:
        mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS).close()
    except OSError:
        return False
    return True


class MemoryHeadroom:
    """Whether this worker has used over RETIRE_AT_MEMORY_SHARE of the headroom it started
    with. Measured at the start (a bisection of ``can_map``, to 1 MiB), then probed."""

    def __init__(self, memory_limit: int) -> None:
        can, cannot = 0, memory_limit + 1
        while cannot - can > 1 << 20:
            size = (can + cannot) // 2
            can, cannot = (size, cannot) if can_map(size) else (can, size)
        self.reserve = max(1, int(can * (1 - RETIRE_AT_MEMORY_SHARE)))
        self.unprobed = 0

    def spent(self, evaluation_seconds: float) -> bool:
        self.unprobed += 1
        if evaluation_seconds < MEMORY_PROBE_AFTER and self.unprobed < MEMORY_PROBE_EVERY:
            return False
        self.unprobed = 0
        return not can_map(self.reserve)


class EvaluationLoop:
    def __init__(
        self, streams: ProtocolStreams, engine: engines.Engine, max_frame: int, memory_limit: int
    ) -> None:
        self.streams = streams
        self.engine = engine
        self.reader = FrameReader(max_frame)
        self.headroom = MemoryHeadroom(memory_limit)
        os.set_blocking(streams.requests, False)
        self.wait_readable = select.poll()
        self.wait_readable.register(streams.requests, select.POLLIN)
        self.spin_pays = True

    def run(self) -> int:
        reader = self.reader
        while True:
            data = self.receive()
            if not data:
                return 0  # the pool closed our stdin: an orderly stop
            reader.feed(data)
            while (event := reader.next_event()) is not None:
                if isinstance(event, FrameTooLarge):
                    self.streams.send(
                        error_message(
                            None,
                            ErrorKind.PROTOCOL,
                            f"frame of {event.size} bytes is over the limit of {event.limit}",
                        )
                    )
                    return EXIT_PROTOCOL
                if isinstance(event, MalformedFrame):
                    self.streams.send(error_message(None, ErrorKind.PROTOCOL, event.reason))
                    continue
                started = time.monotonic()
                message = self.answer(event.payload)
                if self.headroom.spent(time.monotonic() - started):
                    message["retire"] = True
                self.streams.send(message)

    def receive(self) -> bytes:
        """The next bytes of the request stream; b"" at EOF.

        Right after an answer a sequential caller often sends the next request within tens
        of microseconds, and waking a blocked reader costs an inter-processor interrupt,
        about 30 us on the virtual machines measured: so we may first poll without blocking
        for up to ``SPIN_FOR_REQUEST``. Only while it pays: after a wait longer than that
        window (the caller is slow, or the machine busy: then a spin only takes CPU from the
        caller and the other workers) the next wait blocks at once, until a request comes
        within the window again."""
        requests = self.streams.requests
        try:
            return os.read(requests, READ_SIZE)  # a hand-over: the next request is here
        except BlockingIOError:
            pass
        started = time.monotonic()
        if self.spin_pays:
            spin_until = started + SPIN_FOR_REQUEST
            while time.monotonic() < spin_until:
                os.sched_yield()  # spinning must not starve what else runs on this CPU
                try:
                    return os.read(requests, READ_SIZE)
                except BlockingIOError:
                    continue
        while True:
            self.wait_readable.poll()
            try:
                data = os.read(requests, READ_SIZE)
            except BlockingIOError:
                continue
            self.spin_pays = time.monotonic() - started < SPIN_FOR_REQUEST
            return data

    def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            request = parse_request(payload)
        except ProtocolViolation as exc:
            return error_message(exc.request_id, ErrorKind.PROTOCOL, exc.reason)
        try:
            return result_message(request.id, self.engine.run(request))
        except engines.EvaluationFailed as exc:
            return error_message(request.id, exc.kind, exc.message)
        except MemoryError:
            return error_message(request.id, ErrorKind.MEMORY, "the worker ran out of memory")
        except Exception as exc:  # never lose a request to a bug: say what happened
            return error_message(
                request.id, ErrorKind.INTERNAL, engines.bound_text(f"{type(exc).__name__}: {exc}")
            )


@dataclass
class Restricted:
    """What start-up achieved up to, not including, loading the engine (steps 2-5): the
    state a template keeps and forks (``_template``)."""

    started: float
    prepared: engines.PreparedEngine
    landlock: landlock.LandlockStatus
    self_check: str
    check_target: str  # what the self-check opened: a forked worker checks its layer on it
    layers: list[LayerStatus]  # limits, privileges; seccomp is added by ``finish_start``


def start_restricted(options: WorkerOptions) -> Restricted:
    """Steps 2-5 of the plan."""
    started = time.monotonic()
    warm_up()
    try:
        prepared = engines.prepare(options.engine)
    except engines.EngineLoadError as exc:
        raise StartupFailed(str(exc)) from exc
    applied = set_limits(options.memory_limit, options.cpu_budget)
    ipc_namespace = privileges.new_ipc_namespace()  # needs root: before the drop
    identity = options.identity
    limits = privileges.set_task_and_file_limits(identity.uid if identity else os.getuid())
    limits = dataclasses.replace(limits, detail=f"{limits.detail}, {applied}".strip(", "))
    if identity is not None:
        privileges.drop_to(identity)
        tie_to_parent(options.parent_pid)
    privileges_layer = privileges.privilege_status(identity)
    uid = privileges.uid_status(identity)
    check_target = self_check_target()
    threads = thread_count()
    if threads != 1:
        raise StartupFailed(
            f"{threads} threads exist before restriction; each must be born inside the domain"
        )
    try:
        status = landlock.restrict_self_empty()
        if not status.enforced:
            landlock.set_no_new_privs()
    except OSError as exc:
        raise StartupFailed(f"cannot apply the Landlock layer: {exc}") from exc
    check = self_check(status, check_target)
    layers = [ipc_namespace, limits, privileges_layer, uid]
    return Restricted(started, prepared, status, check, check_target, layers)


def finish_start(
    options: WorkerOptions, restricted: Restricted
) -> tuple[engines.Engine, dict[str, Any]]:
    """Step 6 up to the hello: load the engine, apply the seccomp filter; returns the engine
    and the hello to send."""
    try:
        engine = engines.Engine(
            options.engine,
            engines.load(restricted.prepared),
            prefer_capi=options.engine_api != "binding",
        )
    except engines.EngineLoadError as exc:
        raise StartupFailed(str(exc)) from exc
    try:
        seccomp_layer = seccomp.layer_status(seccomp.install())
    except OSError as exc:
        raise StartupFailed(f"cannot apply the seccomp filter: {exc}") from exc
    hello = {
        "t": "hello",
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "engine": options.engine.value,
        "engine_version": engine.version,
        "engine_api": engine.api,
        "python": sys.version.split()[0],
        "sandbox": restricted.landlock.to_dict(),
        "layers": {layer.name: layer.to_dict() for layer in (*restricted.layers, seccomp_layer)},
        "self_check": restricted.self_check,
        "startup_ms": round((time.monotonic() - restricted.started) * 1000, 3),
    }
    return engine, hello


def start(
    options: WorkerOptions, streams: ProtocolStreams
) -> tuple[engines.Engine, dict[str, Any]]:
    """Steps 2-6 up to the hello; returns the engine and the hello to send."""
    return finish_start(options, start_restricted(options))


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    tie_to_parent(options.parent_pid)
    streams = ProtocolStreams()
    try:
        engine, hello = start(options, streams)
    except (StartupFailed, OSError, ValueError) as exc:
        reason = f"worker start-up failed: {exc}"
        print(reason, file=sys.stderr, flush=True)
        streams.send({"t": "startup_failed", "reason": engines.bound_text(reason)})
        return EXIT_STARTUP_FAILED
    return serve(streams, engine, hello, options)


def serve(
    streams: ProtocolStreams,
    engine: engines.Engine,
    hello: dict[str, Any],
    options: WorkerOptions,
) -> int:
    """The rest of step 6: the hello and the loop, on a thread born restricted."""
    outcome: list[int] = []

    def run_loop() -> None:
        loop = EvaluationLoop(streams, engine, options.max_frame, options.memory_limit)
        streams.send(hello)
        outcome.append(loop.run())

    loop_thread = threading.Thread(target=run_loop, name="jsonnet-worker-loop")
    loop_thread.start()
    loop_thread.join()
    return outcome[0] if outcome else EXIT_PROTOCOL
