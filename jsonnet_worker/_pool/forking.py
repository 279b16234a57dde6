"""Forked workers, parent side: start a template (``_template``), ask it for workers.

Goals: the mechanism the supervisor needs to get a never-used worker for the cost of a fork,
with the same surface as a re-exec ``WorkerProcess`` (channels, pidfd, kill, wait/reap,
close), and one typed error, ``TemplateUnavailable``, whenever the template cannot give one,
saying why and whether the re-exec path should be used from now on (``permanent``).

Plan (docs/DESIGN.md, "Forked workers"): ``TemplateProcess`` re-executes the interpreter in
the hidden ``_template`` mode with a SOCK_SEQPACKET control pair as its fd 0 and reads its
hello. ``fork_worker()`` makes the three channels of a new worker here (so the template holds
them only for the fork), sends them to the template over SCM_RIGHTS, and receives the
worker's pidfd back. The template forks with CLONE_PARENT, so the worker is a child of *this*
process: ``ForkedWorker`` reaps it with ``waitid(P_PIDFD)`` and gets its real exit status, a
pid-reuse race is impossible (a pidfd names one process, and an unreaped child keeps its pid),
and the worker outlives its template: killing the template loses no in-flight call.
``WorkerSource`` is the supervisor's one call: a fork while the template can give one, a
re-exec ``WorkerProcess`` otherwise, the template restarted after a back-off, the reason kept.

Weak spots: the template runs as the pool's ``WorkerSettings.identity``, and its workers share
that uid. If the template dies in the middle of a fork after cloning, before it sends the
pidfd, the child is still ours: ``fork_worker`` reads its pid from its hello without consuming
it and adopts it (a child that dies before its hello is never known: it stays a zombie until
this process exits). An application that sets SIGCHLD to SIG_IGN makes the kernel
reap every child itself: the exit status is then unknown and reported as 0 (as
``subprocess`` does).
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import WorkerStartError
from .._report import SandboxStatus
from .._sandbox.landlock import LandlockStatus, Scope
from .._sandbox.privileges import WorkerIdentity
from .._wire.control import (
    CHANNELS,
    CONTROL_MAX,
    FORK_FLAGS,
    ControlError,
    decode_control,
    encode_control,
)
from .._wire.layers import EXTRA_LAYERS, LayerState, LayerStatus
from .._wire.protocol import (
    FORK_SERVER_COMMAND,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    WORKER_COMMAND,
    FrameReader,
    Message,
)
from .processes import (
    StderrCapture,
    WorkerProcess,
    WorkerSettings,
    exits_within,
    kill_through,
    one_way_channel,
    process_cpu_seconds,
    worker_command,
    worker_environment,
)

logger = logging.getLogger("jsonnet_worker")

START_TIMEOUT = 20.0
BACKOFF_FIRST = 0.1  # seconds before a failed template is started again, doubling
BACKOFF_MAX = 5.0
FORK_TIMEOUT = 5.0
# How long a fork whose template died looks for the hello of a child it may have cloned (a
# fork's hello takes about 7 ms; an end of the channel says at once that there is none).
ORPHAN_WAIT = 5.0
ORPHAN_HELLO_MAX = 64 * 1024  # a hello is about 2 KB
READ_SIZE = 64 * 1024
# How a kernel or a container's seccomp profile refuses clone(CLONE_PARENT | CLONE_PIDFD):
# it will refuse every later fork the same way.
_REFUSALS = frozenset({errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS})


class TemplateUnavailable(WorkerStartError):
    """The template cannot give a worker. ``permanent``: this host refuses what forking
    needs (use re-exec workers for the pool's life); otherwise the template died or failed
    once (respawn it with back-off)."""

    kind = "template_unavailable"

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class TemplateHello:
    """What the template reports once its start-up is over (validated)."""

    pid: int
    engine: str
    python: str
    landlock: LandlockStatus
    self_check: str
    startup_ms: float
    layers: tuple[LayerStatus, ...]
    fork_flags: int

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> TemplateHello:
        """Raises ValueError (or TypeError) on any missing or ill-typed field."""
        if message.get("protocol") != PROTOCOL_VERSION:
            raise ValueError(f"protocol {message.get('protocol')!r}, expected {PROTOCOL_VERSION}")
        sandbox, layers = message.get("sandbox"), message.get("layers")
        if not isinstance(sandbox, dict) or not isinstance(layers, dict):
            raise ValueError("sandbox and layers must be maps")
        fields = {"pid": int, "engine": str, "python": str, "self_check": str}
        for name, kind in fields.items():
            if not isinstance(message.get(name), kind):
                raise ValueError(f"field {name!r} must be {kind.__name__}")
        startup_ms, fork_flags = message.get("startup_ms"), message.get("fork_flags")
        if not isinstance(startup_ms, int | float) or not isinstance(fork_flags, int):
            raise ValueError("startup_ms and fork_flags must be numbers")
        return cls(
            pid=message["pid"],
            engine=message["engine"],
            python=message["python"],
            landlock=LandlockStatus.from_dict(sandbox),
            self_check=message["self_check"],
            startup_ms=float(startup_ms),
            layers=tuple(LayerStatus.from_dict(name, layers.get(name)) for name in EXTRA_LAYERS),
            fork_flags=fork_flags,
        )

    def sandbox(self) -> SandboxStatus:
        extra = {layer.name: layer for layer in self.layers}

        def layer(name: str) -> LayerStatus:
            return extra.get(name) or LayerStatus.unreported(name)

        return SandboxStatus(
            self.landlock,
            self.self_check,
            limits=layer("limits"),
            privileges=layer("privileges"),
            seccomp=layer("seccomp"),
        )


def isolation_problem(hello: TemplateHello) -> str | None:
    """Why workers forked from this template would be less isolated from each other and
    from the template than re-exec workers are, or None."""
    if not hello.landlock.enforced:
        return f"no Landlock layer ({hello.landlock.reason or hello.landlock.state.value})"
    if Scope.SIGNAL.name not in hello.landlock.scoped:
        return (
            f"Landlock ABI {hello.landlock.abi} has no signal scope (ABI 6, Linux 6.12): "
            "a forked worker could signal its template and its siblings"
        )
    return None


def template_command(settings: WorkerSettings, identity: WorkerIdentity | None = None) -> list[str]:
    """The worker command in the template mode: the same bootstrap and arguments."""
    command = worker_command(settings, identity)
    command[command.index(WORKER_COMMAND)] = FORK_SERVER_COMMAND
    return command


class ForkedWorker(WorkerProcess):
    """A worker forked by a template: a child of this process (CLONE_PARENT), adopted by
    ``WorkerProcess.adopt`` and reaped through its pidfd. Everything else is a re-exec
    worker's mechanism; it holds no identity (its template holds the one it runs as)."""

    template_pid: int

    @classmethod
    def forked(
        cls,
        settings: WorkerSettings,
        pid: int,
        pidfd: int,
        channels: tuple[int, int, int],
        template_pid: int,
    ) -> ForkedWorker:
        worker = cls.adopt(settings, pid, pidfd, channels)
        worker.template_pid = template_pid
        return worker

    def __repr__(self) -> str:
        return f"<ForkedWorker pid={self.pid} template={self.template_pid}>"


def _peek_hello_pid(fd: int, deadline: float) -> int | None:
    """The pid named by the hello waiting on a worker's response channel, read without
    consuming it (MSG_PEEK: the pool's conversation reads it as from any worker); None if the
    channel ends, the deadline passes or what it holds is not a hello."""
    channel = socket.socket(fileno=os.dup(fd))
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(left * 1000):
                return None
            try:
                data = channel.recv(
                    HEADER_SIZE + ORPHAN_HELLO_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not data:
                return None  # the end of the channel: no process holds its other end
            reader = FrameReader(ORPHAN_HELLO_MAX)  # each peek sees the frame from its start
            reader.feed(data)
            event = reader.next_event()
            if event is None:  # the rest is on its way: poll says "readable" meanwhile
                time.sleep(0.001)
                continue
            if not isinstance(event, Message) or event.payload.get("t") != "hello":
                return None  # an oversized or malformed frame too
            pid = event.payload.get("pid")
            return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
        return None
    finally:
        channel.close()


class TemplateProcess:
    """One template: started, greeted, asked for workers; killed and reaped through it only.

    ``fork_worker`` may be called from any thread (one fork at a time). Raises
    ``TemplateUnavailable`` from the constructor and from ``fork_worker``."""

    def __init__(
        self,
        settings: WorkerSettings,
        command: list[str] | None = None,
        *,
        timeout: float = START_TIMEOUT,
        require_isolation: bool = True,
    ) -> None:
        self.settings = settings
        self.stderr = StderrCapture()
        self._lock = threading.Lock()
        self._next_id = 0
        self._closed = False
        # One identity for the template's life, shared by every worker it forks (which
        # neither acquire nor release one); released once the template is reaped.
        self.identity = settings.identities.acquire()
        try:
            control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except BaseException:
            settings.identities.release(self.identity)
            raise
        try:
            child_stderr, self.stderr_fd = one_way_channel(child_reads=False)
        except BaseException:
            control.close()
            child_control.close()
            settings.identities.release(self.identity)
            raise
        try:
            self._popen = subprocess.Popen(
                command or template_command(settings, self.identity),
                stdin=child_control.fileno(),
                stdout=child_stderr,
                stderr=child_stderr,
                env=worker_environment(settings),
                close_fds=True,
                start_new_session=True,
            )
        except BaseException:
            control.close()
            os.close(self.stderr_fd)
            settings.identities.release(self.identity)
            raise
        finally:
            child_control.close()
            os.close(child_stderr)
        self.control = control
        os.set_blocking(self.stderr_fd, False)
        self.pid = self._popen.pid
        self.pidfd = os.pidfd_open(self.pid)
        try:
            self.hello = self._greet(timeout, require_isolation)
        except BaseException:
            self.close()
            raise
        self.cpu_at_hello = self.cpu_seconds() or 0.0

    def __repr__(self) -> str:
        return f"<TemplateProcess pid={self.pid}{' closed' if self._closed else ''}>"

    # -- the conversation ----------------------------------------------------------------

    def _greet(self, timeout: float, require_isolation: bool) -> TemplateHello:
        message, fds = self._receive(time.monotonic() + timeout)
        for fd in fds:
            os.close(fd)
        if message["t"] == "startup_failed":
            # The same start-up would fail the same way again: use re-exec workers.
            raise TemplateUnavailable(
                f"the template could not start: {str(message.get('reason'))[:1000]}",
                permanent=True,
            )
        if message["t"] != "template_hello":
            raise TemplateUnavailable(
                f"the template sent {message['t']!r} instead of its hello", permanent=True
            )
        try:
            hello = TemplateHello.from_message(message)
        except (TypeError, ValueError) as exc:
            raise TemplateUnavailable(f"malformed template hello: {exc}", permanent=True) from None
        if hello.fork_flags != FORK_FLAGS:
            raise TemplateUnavailable(
                f"the template forks with flags {hello.fork_flags:#x}, expected {FORK_FLAGS:#x}",
                permanent=True,
            )
        problem = isolation_problem(hello)
        if problem is not None and require_isolation:
            raise TemplateUnavailable(f"forked workers refused: {problem}", permanent=True)
        return hello

    def _receive(self, deadline: float) -> tuple[dict[str, Any], list[int]]:
        """The template's next control message; TemplateUnavailable if it dies, goes
        silent past ``deadline`` or sends something that is not a control message."""
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.stderr_fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise self._gone("the template did not answer in time")
            for fd, _ in poller.poll(left * 1000):
                if fd == self.stderr_fd:
                    if not self._drain_stderr():
                        poller.unregister(self.stderr_fd)
                    continue
                try:
                    data, fds, flags, _ = socket.recv_fds(
                        self.control, CONTROL_MAX, CHANNELS, socket.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise self._gone(f"the template's control socket failed: {exc}") from None
                if not data:
                    raise self._gone("the template exited")
                try:
                    if flags & socket.MSG_CTRUNC:
                        raise ControlError("more fds than any control message carries")
                    return decode_control(data), fds
                except ControlError as exc:
                    for received in fds:
                        os.close(received)
                    self.kill()
                    raise TemplateUnavailable(f"template: {exc}", permanent=False) from None

    def _drain_stderr(self) -> bool:
        while True:
            try:
                data = os.read(self.stderr_fd, READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self.stderr.add(data)

    def _gone(self, what: str) -> TemplateUnavailable:
        """The error for a template that stopped answering: says how it ended."""
        self._drain_stderr()
        returncode = self.wait(1.0)
        if returncode is None:
            how = "still running"
        elif returncode < 0:
            how = f"killed by {signal.Signals(-returncode).name}"
        else:
            how = f"exited with status {returncode}"
        tail = self.stderr.text().strip()
        detail = f": {tail.splitlines()[-1][:300]}" if tail else ""
        return TemplateUnavailable(f"{what} ({how}){detail}", permanent=False)

    def fork_worker(self, timeout: float = FORK_TIMEOUT) -> ForkedWorker:
        """A new, never-used worker forked from the template (its hello still to be read
        from its response channel, as with a re-exec worker)."""
        with self._lock:
            if self._closed:
                raise TemplateUnavailable("the template is closed", permanent=False)
            self._next_id += 1
            request_id = self._next_id
            child_ends: list[int] = []
            parent_ends: list[int] = []
            try:
                for child_reads in (True, False, False):  # requests, responses, stderr
                    child_end, parent_end = one_way_channel(child_reads)
                    child_ends.append(child_end)
                    parent_ends.append(parent_end)
                try:
                    socket.send_fds(
                        self.control, [encode_control({"t": "fork", "id": request_id})], child_ends
                    )
                except OSError as exc:
                    raise self._gone(f"cannot reach the template ({exc})") from None
                finally:
                    for fd in child_ends:
                        os.close(fd)
                try:
                    message, fds = self._receive(time.monotonic() + timeout)
                except TemplateUnavailable:
                    orphan = self._adopt_orphan(parent_ends)
                    if orphan is None:
                        raise
                    return orphan
                return self._forked(request_id, message, fds, parent_ends)
            except BaseException:
                for fd in parent_ends:
                    os.close(fd)
                raise

    def _forked(
        self, request_id: int, message: dict[str, Any], fds: list[int], channels: list[int]
    ) -> ForkedWorker:
        pidfd, extra = (fds[0], fds[1:]) if fds else (-1, [])
        for fd in extra:
            os.close(fd)
        pid = message.get("pid")
        answered = message.get("id") == request_id
        if message["t"] == "forked" and answered and pidfd >= 0 and isinstance(pid, int):
            stdin, stdout, stderr = channels
            return ForkedWorker.forked(self.settings, pid, pidfd, (stdin, stdout, stderr), self.pid)
        if pidfd >= 0:
            os.close(pidfd)
        if message["t"] == "fork_failed" and answered:
            err = message.get("errno")
            reason = str(message.get("reason"))[:1000]
            raise TemplateUnavailable(
                f"the template cannot fork: {reason}", permanent=err in _REFUSALS
            )
        self.kill()
        raise TemplateUnavailable(
            f"the template answered a fork with {message['t']!r} (id {message.get('id')!r})",
            permanent=False,
        )

    def _adopt_orphan(self, channels: list[int]) -> ForkedWorker | None:
        """The template died (or was killed) before it answered a fork: had it cloned the
        worker, that worker is our child (CLONE_PARENT) and nobody else would reap it. Its
        hello names its pid; a pidfd on a child of ours that is not reaped names that child
        and no other, and ``waitid`` on it refuses any process that is not our child. So it
        is adopted as any forked worker. None: no worker came (the template died before the
        clone, or the worker before its hello)."""
        pid = _peek_hello_pid(channels[1], time.monotonic() + ORPHAN_WAIT)
        if pid is None:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except OSError:  # ChildProcessError: not our child, not the worker we asked for
            os.close(pidfd)
            return None
        logger.info(
            "jsonnet_worker: template %d died before it answered a fork; its worker %d is adopted",
            self.pid,
            pid,
        )
        stdin, stdout, stderr = channels
        return ForkedWorker.forked(self.settings, pid, pidfd, (stdin, stdout, stderr), self.pid)

    # -- life and death ------------------------------------------------------------------

    def kill(self) -> None:
        if self._closed:
            return
        kill_through(self.pidfd)

    def exited(self) -> bool:
        return self._popen.poll() is not None

    def cpu_seconds(self) -> float | None:
        """CPU time the template has used (RLIMIT_CPU counts it); None once it is gone."""
        return process_cpu_seconds(self.pid)

    def wait(self, timeout: float | None) -> int | None:
        """Reap the template; None if it is still running after ``timeout`` seconds."""
        unreaped = self._popen.returncode is None and not self._closed
        if unreaped and timeout is not None and not exits_within(self.pidfd, timeout):
            return None
        return self._popen.wait()

    def close(self, grace: float = 1.0) -> int | None:
        """Stop the template (it exits at the end of its control socket; killed after
        ``grace``), reap it, close every fd. The workers it forked live on. Idempotent."""
        with self._lock:
            if self._closed:
                return self._popen.returncode
            self.control.close()
            if grace <= 0 or self.wait(grace) is None:
                self.kill()
            returncode = self.wait(None)
            self._drain_stderr()
            self._closed = True
            os.close(self.stderr_fd)
            os.close(self.pidfd)
            self.settings.identities.release(self.identity)
            return returncode


class ForkState(enum.Enum):
    FORKING = "forking"  # a template is up: new workers are its forks
    WAITING = "waiting"  # it died or failed once: re-exec until the back-off has passed
    REFUSED = "refused"  # this host refuses what forking needs: re-exec for good


@dataclass(frozen=True)
class SourceStats:
    """The template's part of ``PoolStats``."""

    template_pid: int | None  # None: no template is up (re-exec workers meanwhile)
    forks: int  # workers forked from a template
    fallbacks: int  # workers re-executed because no template could give one
    template_starts: int  # templates started (the first, respawns, replacements)


# A template that has used this share of its CPU limit (beyond its start-up) is replaced:
# it never evaluates, only its forks count (about a millisecond each).
CPU_SHARE = 0.5


class WorkerSource:
    """Where a pool's new workers come from: a fork of its template while the template can
    give one, a re-exec start otherwise, with the reason kept for ``pool.sandbox``/``doctor``.

    The template is started on the first ``spawn`` and again after a failure, with a
    back-off of 0.1 s doubling to 5 s; a permanent refusal stops the attempts for good.
    ``maintain`` notices a dead template at once, restarts it once the back-off has passed,
    and replaces it before its RLIMIT_CPU runs out (each fork costs it about a millisecond).
    Call it from the supervisor thread only: PR_SET_PDEATHSIG ties the template, and every
    worker it forks, to the thread that started the template."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        template_command: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_share: float = CPU_SHARE,
    ) -> None:
        self.settings = settings
        self.template_command = template_command
        self.clock = clock
        self.cpu_share = cpu_share
        self.template: TemplateProcess | None = None
        self.state = ForkState.WAITING
        self.reason = "no template started yet"
        self.forked = 0
        self.fallbacks = 0
        self.starts = 0
        self._retry_at = 0.0
        self._delay = BACKOFF_FIRST
        if settings.identities.uids is not None:
            # A worker_user range promises a uid per worker; a template has one uid.
            self.state = ForkState.REFUSED
            self.reason = (
                "worker_user is a uid range (one uid per worker): a template's forked "
                "workers would share its uid"
            )

    def spawn(self) -> WorkerProcess:
        """A new worker: forked if the template can, re-executed otherwise. Raises only
        what ``WorkerProcess`` raises."""
        template = self._usable_template()
        if template is not None:
            try:
                worker = template.fork_worker()
            except TemplateUnavailable as exc:
                self._failed(exc)
            else:
                self.forked += 1
                return worker
        re_exec = WorkerProcess(self.settings)
        self.fallbacks += 1
        return re_exec

    def maintain(self) -> float | None:
        """Between spawns: a dead template is noticed (and logged), a missing one started
        once its back-off has passed, one near its CPU budget replaced. Returns when to call
        again (a back-off running out), or None."""
        budget = self.settings.cpu_budget
        template = self.template
        if template is not None and not template.exited() and budget is not None:
            limit = max(1, math.ceil(budget))  # RLIMIT_CPU as the start-up sets it
            used = template.cpu_seconds()
            # Its start-up's own CPU time is not counted against the share (no churn).
            due = template.cpu_at_hello + (limit - template.cpu_at_hello) * self.cpu_share
            if used is not None and used >= due:
                logger.info(
                    "jsonnet_worker template %d used %.2f s of its %d s CPU limit; replacing it",
                    template.pid,
                    used,
                    limit,
                )
                self.replace()
        self._usable_template()
        if self.template is None and self.state is ForkState.WAITING:
            return self._retry_at
        return None

    def replace(self) -> None:
        """Start a new template now (the old one is closed; the workers it forked live on)."""
        if self.state is ForkState.REFUSED:
            return
        if self.template is not None:
            self.template.close()
            self.template = None
        self.state, self._retry_at, self._delay = ForkState.WAITING, 0.0, BACKOFF_FIRST
        self._usable_template()

    @property
    def pidfd(self) -> int | None:
        """The template's pidfd, to watch for its death (None without a template)."""
        return self.template.pidfd if self.template is not None else None

    def _usable_template(self) -> TemplateProcess | None:
        if self.template is not None and self.template.exited():
            self._failed(self.template_death())
        if self.template is not None:
            return self.template
        if self.state is ForkState.REFUSED or self.clock() < self._retry_at:
            return None
        self.starts += 1
        try:
            self.template = TemplateProcess(self.settings, self.template_command)
        except TemplateUnavailable as exc:
            self._failed(exc)
            return None
        except OSError as exc:  # no fds, no processes left: try again later
            self._failed(TemplateUnavailable(f"cannot start the template: {exc}", permanent=False))
            return None
        self.state, self.reason, self._delay = ForkState.FORKING, "", BACKOFF_FIRST
        return self.template

    def template_death(self) -> TemplateUnavailable:
        assert self.template is not None
        returncode = self.template.wait(0)
        return TemplateUnavailable(
            f"the template (pid {self.template.pid}) exited with {returncode}", permanent=False
        )

    def _failed(self, exc: TemplateUnavailable) -> None:
        if self.template is not None:
            self.template.close(grace=0)
            self.template = None
        self.reason = exc.reason
        if exc.permanent:
            self.state = ForkState.REFUSED
            logger.warning(
                "jsonnet_worker: forked workers are unavailable on this host (%s); new "
                "workers are re-executed interpreters (slower to start, as isolated)",
                exc.reason,
            )
            return
        self.state = ForkState.WAITING
        self._retry_at = self.clock() + self._delay
        logger.warning(
            "jsonnet_worker: the worker template failed (%s); re-exec workers until it is "
            "started again in %.1f s",
            exc.reason,
            self._delay,
        )
        self._delay = min(self._delay * 2, BACKOFF_MAX)

    def status(self) -> LayerStatus:
        """The ``template`` layer of ``pool.sandbox`` and ``doctor``."""
        template = self.template
        if template is not None:
            return LayerStatus(
                "template",
                LayerState.ACTIVE,
                f"template pid {template.pid}: new workers are its forks (CLONE_PARENT), "
                f"each in its own nested Landlock domain; {self.forked} forked",
            )
        return LayerStatus("template", LayerState.MISSING, reason=f"re-exec workers: {self.reason}")

    def stats(self) -> SourceStats:
        template = self.template
        return SourceStats(
            template.pid if template is not None else None, self.forked, self.fallbacks, self.starts
        )

    def close(self) -> None:
        """Stop the template; the workers it forked live on (their owners close them)."""
        if self.template is not None:
            self.template.close()
            self.template = None
