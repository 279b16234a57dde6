"""The template process: a worker's start-up up to the engine, kept, and forked on request.

Goals: a never-used worker for the cost of a fork (a few ms) instead of an interpreter
re-exec (~90 ms), without weakening anything a re-exec worker has: every Go thread born
inside the worker's own Landlock domain, the worker's seccomp filter on every thread, no fd
or channel of the template or of a sibling, no way to signal or trace the template or a
sibling. The template itself never evaluates and never reads untrusted input: the only
bytes it reads are the pool's control messages.

Plan (docs/DESIGN.md, "Forked workers"). The template is started like a worker (the same
bootstrap, mode ``_template``), and:
  1. ties its life to the parent, moves the control socket (a SOCK_SEQPACKET pair made by
     the pool, given as fd 0) to a private fd, keeps a /dev/null fd for its workers' fd 0;
  2. runs ``startup.start_restricted``: warm-up, the engine copied into a memfd with its
     libraries loaded, limits, privilege drop, the empty Landlock layer, the self-check, all
     while it has one thread (it never starts another);
  3. applies its own seccomp filter: the worker's deny-list, except that ``clone`` with
     exactly ``FORK_FLAGS`` may make a process (every other process-making clone is still
     refused). A filter is inherited by the children, and a worker needs everything the
     worker's filter allows, so the template's cannot be narrower than the worker's; it is
     the worker's plus this one flag word, and each child stacks the worker's own on top;
  4. sends its hello on the control socket, then serves ``fork`` messages, each carrying the
     new worker's three channels (made by the pool) as SCM_RIGHTS: it clones with
     ``CLONE_PARENT | CLONE_PIDFD`` (the worker is the *pool's* child, so the pool reaps it
     and gets its exit status; the pidfd goes back to the pool over SCM_RIGHTS), then closes
     every fd of that worker. Between two forks it holds no live worker's fd.
The forked child (``run_forked_worker``), before its hello:
  1. re-arms PR_SET_PDEATHSIG (cleared by fork; its parent is now the pool's thread that
     started the template), leaves the template's session, puts its channels on fds 0-2 and
     two private fds, and closes every other fd (the control socket included);
  2. adds a nested empty Landlock layer: its own domain, so the signal and abstract-socket
     scopes keep it from the template and from its siblings; checks the layer holds;
  3. loads the engine from the memfd (its Go threads are born in the nested domain), applies
     the worker's seccomp filter with TSYNC (no fork from here on), and runs the normal
     hello and evaluation loop (``startup.finish_start`` and ``startup.serve``).

Control messages (msgpack maps, one per SEQPACKET datagram, key ``t``):
  pool -> template  ``fork``            id; SCM_RIGHTS: requests, responses, stderr
  template -> pool  ``template_hello``  protocol, pid, engine, python, sandbox, layers,
                                        self_check, startup_ms, fork_flags
                    ``startup_failed``  reason (the template then exits)
                    ``forked``          id, pid; SCM_RIGHTS: the worker's pidfd
                    ``fork_failed``     id, reason, errno

Weak spots: the clone is a raw syscall (CPython has no ``os.clone``, and ``os.fork`` cannot
pass CLONE_PARENT), bracketed by CPython's public ``PyOS_BeforeFork``/``PyOS_AfterFork_*``
so the interpreter's own after-fork work runs; glibc's fork handling does not, which is
sound only because the template is single-threaded (no lock can be held by another thread,
no stack cache to reclaim) and registers no pthread_atfork handler; glibc's cached tid of
the child's main thread still holds the template's (used only by recursive/error-checking
and PI mutexes, which neither CPython nor the Go runtime uses on that thread). Forked
workers share the template's uid: a uid per worker (a root parent's uid range) is given
per template, not per worker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import gc
import os
import resource
import socket
import sys
import threading
import time
from typing import Any, NoReturn

from .._sandbox import landlock, seccomp
from .._wire.control import (
    CHANNELS,
    CONTROL_MAX,
    FORK_FLAGS,
    ControlError,
    decode_control,
    encode_control,
)
from .._wire.layers import LayerState, LayerStatus
from .._wire.protocol import PROTOCOL_VERSION
from . import engines, startup

EXIT_STARTUP_FAILED = startup.EXIT_STARTUP_FAILED
EXIT_PROTOCOL = startup.EXIT_PROTOCOL


class Cloner:
    """``clone(FORK_FLAGS)`` from Python, with CPython's fork bookkeeping around it.

    Bound before restriction. The syscall goes through a ``PyDLL`` handle, which keeps the
    GIL across the call as ``os.fork`` does (a ``CDLL`` call would release it around the
    fork and re-take it in the child)."""

    def __init__(self, machine: str | None = None) -> None:
        table = seccomp.table_for_machine(machine)
        if table is None:
            raise startup.StartupFailed(
                f"no clone syscall number for architecture {machine or os.uname().machine}"
            )
        self.number = table.number("clone")
        libc = ctypes.PyDLL(None, use_errno=True)
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long
        self.api = ctypes.pythonapi

    def __call__(self) -> tuple[int, int]:
        """(pid, pidfd) in the template, (0, -1) in the child; raises OSError if refused."""
        pidfd = ctypes.c_int(-1)
        self.api.PyOS_BeforeFork()
        ctypes.set_errno(0)
        # x86_64 and aarch64 agree on the first three arguments: flags, stack (0: the
        # child runs on a copy of this stack, as with fork), and where CLONE_PIDFD writes.
        pid = int(
            self.syscall(
                ctypes.c_long(self.number),
                ctypes.c_ulong(FORK_FLAGS),
                ctypes.c_void_p(None),
                ctypes.byref(pidfd),
                ctypes.c_void_p(None),
                ctypes.c_void_p(None),
            )
        )
        if pid == 0:
            self.api.PyOS_AfterFork_Child()
            return 0, -1
        err = ctypes.get_errno()
        self.api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone(CLONE_PARENT | CLONE_PIDFD): {os.strerror(err)}")
        return pid, pidfd.value


def seccomp_layer(result: seccomp.SeccompResult) -> LayerStatus:
    if not result.applied:
        return LayerStatus("seccomp", LayerState.MISSING, reason=result.reason)
    return LayerStatus(
        "seccomp",
        LayerState.ACTIVE,
        f"{result.arch}, {result.denied} calls refused, threads and the template's one "
        "fork form only, TSYNC",
    )


class ForkedStreams(startup.ProtocolStreams):
    """A forked worker's protocol channels, already on private fds (``ProtocolStreams``
    moves fds 0 and 1, and opens /dev/null, which the template's layer now refuses)."""

    def __init__(self, requests: int, responses: int) -> None:
        self.requests = requests
        self.responses = responses


def close_all_but(keep: set[int]) -> None:
    """Close every fd of this process not in ``keep`` (close_range between the keepers)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    end = max(soft, max(keep) + 1)
    low = 0
    for fd in [*sorted(keep), end]:
        if low < fd:  # os.closerange(0, 0) closes every fd: close_range(0, (unsigned) -1)
            os.closerange(low, fd)
        low = fd + 1


@dataclasses.dataclass
class Template:
    """The template's state: what it forks, and the channel it is asked on."""

    options: startup.WorkerOptions
    restricted: startup.Restricted
    control: socket.socket
    null_fd: int
    clone: Cloner

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        socket.send_fds(self.control, [encode_control(message)], fds or [])

    def serve(self) -> int:
        """Fork on request until the pool closes the control socket."""
        # Everything the template made so far lives for good: out of the collector's reach,
        # a child's full collections do not write to (and so copy) the pages it shares with
        # the template. (No difference measured at a worker's first call; it bounds what a
        # long-lived worker's collections copy.)
        gc.freeze()
        while True:
            data, fds, flags, _ = socket.recv_fds(self.control, CONTROL_MAX, CHANNELS)
            if not data:
                for fd in fds:
                    os.close(fd)
                return 0
            try:
                message = decode_control(data)
            except ControlError as exc:
                for fd in fds:
                    os.close(fd)
                print(f"template: {exc}", file=sys.stderr, flush=True)
                return EXIT_PROTOCOL  # the pool is the only peer: a garbled message is a bug
            self.answer(message, fds, flags)

    def answer(self, message: dict[str, Any], fds: list[int], flags: int) -> None:
        request_id = message.get("id")
        try:
            if message["t"] != "fork":
                self.refuse(request_id, f"unknown control message {message['t']!r}")
                return
            if len(fds) != CHANNELS or flags & socket.MSG_CTRUNC:
                self.refuse(request_id, f"a fork needs {CHANNELS} channels, got {len(fds)}")
                return
            if threading.active_count() != 1:  # a fork would copy another thread's locks
                self.refuse(request_id, f"the template has {threading.active_count()} threads")
                return
            try:
                pid, pidfd = self.clone()
            except OSError as exc:
                self.refuse(request_id, exc.strerror or str(exc), exc.errno or 0)
                return
            if pid == 0:
                run_forked_worker(self, fds)
            try:
                self.send({"t": "forked", "id": request_id, "pid": pid}, [pidfd])
            finally:
                os.close(pidfd)
        finally:
            for fd in fds:  # the worker's channels: never kept past its fork
                os.close(fd)

    def refuse(self, request_id: object, reason: str, err: int = 0) -> None:
        self.send({"t": "fork_failed", "id": request_id, "reason": reason, "errno": err})


def run_forked_worker(template: Template, channels: list[int]) -> NoReturn:
    """The child of a fork: never returns into the template's loop."""
    code = EXIT_STARTUP_FAILED
    try:
        code = forked_worker_main(template, channels)
    except BaseException as exc:  # before the streams exist: say it on the stderr channel
        try:
            os.write(2, f"forked worker start-up failed: {exc!r}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stderr.flush()
        finally:
            # No interpreter finalisation: the engine's runtime threads are still running.
            os._exit(code)


# Made once, at the template's start, before it dropped privileges: a forked worker has its
# template's, not one of its own.
PER_TEMPLATE_LAYERS = ("ipc_namespace", "uid")


def per_template(layers: list[LayerStatus]) -> list[LayerStatus]:
    """A forked worker's report of the layers it shares with its template's other workers
    (an IPC namespace and a uid per template, not per worker; its seccomp filter refuses
    SysV IPC and mq_* whatever the namespace)."""
    return [
        dataclasses.replace(
            layer, detail=f"{layer.detail}; one per template, shared by its forked workers"
        )
        if layer.name in PER_TEMPLATE_LAYERS and layer.active
        else layer
        for layer in layers
    ]


def forked_worker_main(template: Template, channels: list[int]) -> int:
    started = time.monotonic()
    options, restricted = template.options, template.restricted
    requests, responses, errors = channels
    # The parent is now the pool's thread that started the template (CLONE_PARENT).
    startup.tie_to_parent(options.parent_pid)
    os.setsid()  # out of the template's session and process group
    os.dup2(template.null_fd, 0)
    os.dup2(errors, 2)
    os.dup2(errors, 1)  # a stray write lands in the diagnostics, never inside a frame
    streams = ForkedStreams(requests, responses)
    template.control.detach()  # its fd is closed below; the object must not close it again
    close_all_but({0, 1, 2, requests, responses, restricted.prepared.memfd})
    try:
        status = landlock.restrict_self_empty()
        check = startup.self_check(status, restricted.check_target)
        own = dataclasses.replace(
            restricted,
            started=started,
            landlock=status,
            self_check=check,
            layers=per_template(restricted.layers),
        )
        engine, hello = startup.finish_start(options, own)
    except (startup.StartupFailed, OSError, ValueError) as exc:
        reason = f"forked worker start-up failed: {exc}"
        print(reason, file=sys.stderr, flush=True)
        streams.send({"t": "startup_failed", "reason": engines.bound_text(reason)})
        return EXIT_STARTUP_FAILED
    return startup.serve(streams, engine, hello, options)


def start_template(
    options: startup.WorkerOptions, control: socket.socket, null_fd: int
) -> tuple[Template, dict[str, Any]]:
    """Steps 2-3 of the plan; returns the template and its hello."""
    clone = Cloner()
    restricted = startup.start_restricted(options)
    try:
        seccomp_status = seccomp_layer(seccomp.install(process_clone=FORK_FLAGS))
    except OSError as exc:
        raise startup.StartupFailed(f"cannot apply the template's seccomp filter: {exc}") from exc
    hello = {
        "t": "template_hello",
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "engine": options.engine.value,
        "python": sys.version.split()[0],
        "sandbox": restricted.landlock.to_dict(),
        "layers": {layer.name: layer.to_dict() for layer in (*restricted.layers, seccomp_status)},
        "self_check": restricted.self_check,
        "startup_ms": round((time.monotonic() - restricted.started) * 1000, 3),
        "fork_flags": FORK_FLAGS,
    }
    return Template(options, restricted, control, null_fd, clone), hello


def main(argv: list[str]) -> int:
    """Entry point of the fork server mode (``bootstrap.run`` dispatches here)."""
    options = startup.parse_args(argv)
    startup.tie_to_parent(options.parent_pid)
    control = socket.socket(fileno=os.dup(0))
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null_fd, 0)
    os.dup2(2, 1)

    def fail(reason: str) -> int:
        print(reason, file=sys.stderr, flush=True)
        message = {"t": "startup_failed", "reason": engines.bound_text(reason, 4096)}
        try:
            socket.send_fds(control, [encode_control(message)], [])
        except OSError:
            pass
        return EXIT_STARTUP_FAILED

    try:
        template, hello = start_template(options, control, null_fd)
    except (startup.StartupFailed, OSError, ValueError) as exc:
        return fail(f"template start-up failed: {exc}")
    try:
        template.send(hello)
    except OSError:
        return EXIT_PROTOCOL
    try:
        return template.serve()
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return 0  # the pool went away
        raise
