"""Forked workers, parent side: start the fork server (``_worker.forkserver``), ask it for
workers.

Goals: the mechanism the supervisor needs to get a never-used worker for the cost of a fork,
with the same surface as a re-exec ``WorkerProcess`` (channels, pidfd, kill, wait/reap,
close), and one typed error, ``ForkServerUnavailable``, whenever the fork server cannot give
one, saying why and whether the re-exec path should be used from now on (``permanent``).

Plan (docs/DESIGN.md, "Forked workers"): ``ForkServerProcess`` is a ``processes.ChildProcess``
(the one mechanism that spawns, kills, reaps and describes workers and the fork server): it
re-executes the interpreter in the hidden fork server mode with a SOCK_SEQPACKET control pair
as its fd 0 and reads its hello. ``fork_worker()`` makes the three channels of a new worker
here (so the fork server holds them only for the fork), sends them to the fork server over
SCM_RIGHTS, and receives the worker's pidfd back. The fork server forks with CLONE_PARENT, so
the worker is a child of *this* process: ``ForkedWorker`` reaps it with ``waitid(P_PIDFD)``
and gets its real exit status, a pid-reuse race is impossible (a pidfd names one process, and
an unreaped child keeps its pid), and the worker outlives its fork server: killing the fork
server loses no in-flight call. ``WorkerSource`` is the supervisor's one call, a thin driver
of ``forkserver_policy``: it reports to the policy what happened (started, forked, failed,
died, CPU used) and carries out what the policy decides (a fork or a re-exec
``WorkerProcess``, a fork server started or closed, a log line); each fork server it starts
goes into a task cgroup of its own (``tasklimit``), removed once it is reaped.

Weak spots: the fork server runs as one of the pool's ``WorkerSettings.identities``, and its
workers share that uid. If the fork server dies in the middle of a fork after cloning, before
it sends the pidfd, the child is still ours: ``fork_worker`` reads its pid from its hello
without consuming it and adopts it (a child that dies before its hello is never known: it
stays a zombie until this process exits). An application that sets SIGCHLD to SIG_IGN makes
the kernel reap every child itself: the exit status is then unknown and reported as 0 (as
``subprocess`` does). On the wire the fork server's hello
keeps its historical type name (``template_hello``), as does the public ``template`` layer
of ``pool.sandbox`` and ``PoolStats.template_pid``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import WorkerStartError
from .._sandbox.landlock import Scope
from .._sandbox.privileges import WorkerIdentity
from .._wire.control import (
    CHANNELS,
    CONTROL_MAX,
    FORK_FLAGS,
    ControlError,
    decode_control,
    encode_control,
)
from .._wire.framing import HEADER_SIZE, ProtocolViolation
from .._wire.layers import LayerStatus
from .._wire.messages import (
    FORK_SERVER_COMMAND,
    WORKER_COMMAND,
    Forked,
    ForkRequest,
    ForkServerHello,
    StartupFailure,
    WorkerHello,
    read_fork_answer,
    read_greeting,
)
from .connection import NEED_DATA, WorkerConnection
from .forkserver_policy import (
    CPU_SHARE,
    CloseForkServer,
    Effect,
    ForkServerPolicy,
    Log,
    Next,
    SourceStats,
    StartForkServer,
)
from .processes import (
    Channels,
    ChildProcess,
    WorkerProcess,
    WorkerSettings,
    one_way_channel,
    worker_command,
)
from .tasklimit import TaskCgroup, TaskLimits

logger = logging.getLogger("jsonnet_worker")

START_TIMEOUT = 20.0
FORK_TIMEOUT = 5.0
# How long a fork whose fork server died looks for the hello of a child it may have cloned (a
# fork's hello takes about 7 ms; an end of the channel says at once that there is none).
ORPHAN_WAIT = 5.0
ORPHAN_HELLO_MAX = 64 * 1024  # a hello is about 2 KB
# How a kernel or a container's seccomp profile refuses clone(CLONE_PARENT | CLONE_PIDFD):
# it will refuse every later fork the same way.
_REFUSALS = frozenset({errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS})


class ForkServerUnavailable(WorkerStartError):
    """The fork server cannot give a worker. ``permanent``: this host refuses what forking
    needs (use re-exec workers for the pool's life); otherwise the fork server died or failed
    once (respawn it with back-off)."""

    kind = "fork_server_unavailable"

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def isolation_problem(hello: ForkServerHello) -> str | None:
    """Why workers forked from this fork server would be less isolated from each other and
    from the fork server than re-exec workers are, or None."""
    if not hello.landlock.enforced:
        return f"no Landlock layer ({hello.landlock.reason or hello.landlock.state.value})"
    if Scope.SIGNAL.name not in hello.landlock.scoped:
        return (
            f"Landlock ABI {hello.landlock.abi} has no signal scope (ABI 6, Linux 6.12): "
            "a forked worker could signal its fork server and its siblings"
        )
    return None


def fork_server_command(
    settings: WorkerSettings, identity: WorkerIdentity | None = None
) -> list[str]:
    """The worker command in the fork server mode: the same bootstrap and arguments."""
    command = worker_command(settings, identity)
    command[command.index(WORKER_COMMAND)] = FORK_SERVER_COMMAND
    return command


class ForkedWorker(WorkerProcess):
    """A worker forked by the fork server: a child of this process (CLONE_PARENT), adopted by
    ``WorkerProcess.adopt`` and reaped through its pidfd. Everything else is a re-exec
    worker's mechanism; it holds no identity (its fork server holds the one it runs as)."""

    fork_server_pid: int

    @classmethod
    def forked(
        cls,
        settings: WorkerSettings,
        pid: int,
        pidfd: int,
        channels: tuple[int, int, int],
        fork_server_pid: int,
    ) -> ForkedWorker:
        worker = cls.adopt(settings, pid, pidfd, channels)
        worker.fork_server_pid = fork_server_pid
        return worker

    def __repr__(self) -> str:
        return f"<ForkedWorker pid={self.pid} fork_server={self.fork_server_pid}>"


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
            # Read by the one conversation parser, as every worker's hello; each peek sees
            # the frame from its start. (A hello fills no answer: max_output is moot.)
            connection = WorkerConnection(max_output=1, max_frame_hello=ORPHAN_HELLO_MAX)
            connection.receive_data(data)
            event = connection.next_event()
            if event is NEED_DATA:  # the rest is on its way: poll says "readable" meanwhile
                time.sleep(0.001)
                continue
            return event.pid if isinstance(event, WorkerHello) else None
        return None
    finally:
        channel.close()


def _fork_server_channels() -> Channels:
    """The fork server's stdio: a SOCK_SEQPACKET control pair's end as its fd 0 (fds travel
    over it), one stderr channel as its fds 1 and 2; our ends: (control, stderr)."""
    control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        child_stderr, stderr = one_way_channel(child_reads=False)
    except BaseException:
        control.close()
        child_control.close()
        raise
    return (child_control.detach(), child_stderr, child_stderr), (control.detach(), stderr)


class ForkServerProcess(ChildProcess):
    """One fork server: started, greeted, asked for workers; killed and reaped through it only
    (``ChildProcess``: the same mechanism as a worker's).

    ``fork_worker`` may be called from any thread (one fork at a time). Raises
    ``ForkServerUnavailable`` from the constructor and from ``fork_worker``."""

    def __init__(
        self,
        settings: WorkerSettings,
        command: list[str] | None = None,
        *,
        timeout: float = START_TIMEOUT,
        require_isolation: bool = True,
    ) -> None:
        self._lock = threading.Lock()  # one fork at a time, and no close in the middle of one
        self._next_id = 0
        # One identity for the fork server's life, shared by every worker it forks (which
        # neither acquire nor release one); released once the fork server is reaped.
        control, _ = self._spawn(
            settings,
            lambda identity: command or fork_server_command(settings, identity),
            _fork_server_channels,
        )
        self.control = socket.socket(fileno=control)
        try:
            self.hello = self._greet(timeout, require_isolation)
        except BaseException:
            self.close()
            raise
        self.cpu_at_hello = self.cpu_seconds() or 0.0

    def __repr__(self) -> str:
        return f"<ForkServerProcess pid={self.pid}{' closed' if self.closed else ''}>"

    # -- the conversation ----------------------------------------------------------------

    def _greet(self, timeout: float, require_isolation: bool) -> ForkServerHello:
        message, fds = self._receive(time.monotonic() + timeout)
        for fd in fds:
            os.close(fd)
        try:
            hello = read_greeting(message, ForkServerHello)
        except ProtocolViolation as exc:
            raise ForkServerUnavailable(
                f"malformed fork server hello: {exc}", permanent=True
            ) from None
        if isinstance(hello, StartupFailure):
            # The same start-up would fail the same way again: use re-exec workers.
            raise ForkServerUnavailable(
                f"the fork server could not start: {hello.reason}", permanent=True
            )
        if hello.fork_flags != FORK_FLAGS:
            raise ForkServerUnavailable(
                f"the fork server forks with flags {hello.fork_flags:#x}, expected {FORK_FLAGS:#x}",
                permanent=True,
            )
        problem = isolation_problem(hello)
        if problem is not None and require_isolation:
            raise ForkServerUnavailable(f"forked workers refused: {problem}", permanent=True)
        return hello

    def _receive(self, deadline: float) -> tuple[dict[str, Any], list[int]]:
        """The fork server's next control message; ForkServerUnavailable if it dies, goes
        silent past ``deadline`` or sends something that is not a control message."""
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.stderr_fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise self._gone("the fork server did not answer in time")
            for fd, _ in poller.poll(left * 1000):
                if fd == self.stderr_fd:
                    if not self.drain_stderr():
                        poller.unregister(self.stderr_fd)
                    continue
                try:
                    data, fds, flags, _ = socket.recv_fds(
                        self.control, CONTROL_MAX, CHANNELS, socket.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise self._gone(f"the fork server's control socket failed: {exc}") from None
                if not data:
                    raise self._gone("the fork server exited")
                try:
                    if flags & socket.MSG_CTRUNC:
                        raise ControlError("more fds than any control message carries")
                    return decode_control(data), fds
                except ControlError as exc:
                    for received in fds:
                        os.close(received)
                    self.kill()
                    raise ForkServerUnavailable(f"fork server: {exc}", permanent=False) from None

    def _gone(self, what: str) -> ForkServerUnavailable:
        """The error for a fork server that stopped answering: says how it ended."""
        self.drain_stderr()
        self.wait(1.0)
        tail = self.stderr.text().strip()
        detail = f": {tail.splitlines()[-1][:300]}" if tail else ""
        return ForkServerUnavailable(f"{what} ({self.how_it_ended()}){detail}", permanent=False)

    def fork_worker(self, timeout: float = FORK_TIMEOUT) -> ForkedWorker:
        """A new, never-used worker forked from the fork server (its hello still to be read
        from its response channel, as with a re-exec worker)."""
        with self._lock:
            if self.closed:
                raise ForkServerUnavailable("the fork server is closed", permanent=False)
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
                    request = encode_control(ForkRequest(request_id).to_message())
                    socket.send_fds(self.control, [request], child_ends)
                except OSError as exc:
                    raise self._gone(f"cannot reach the fork server ({exc})") from None
                finally:
                    for fd in child_ends:
                        os.close(fd)
                try:
                    message, fds = self._receive(time.monotonic() + timeout)
                except ForkServerUnavailable:
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
        try:
            answer = read_fork_answer(message)
            if answer.request_id != request_id:
                raise ProtocolViolation(
                    f"the answer to fork {request_id} has id {answer.request_id}"
                )
            if isinstance(answer, Forked) and pidfd < 0:
                raise ProtocolViolation(f"fork {request_id} answered without a pidfd")
        except ProtocolViolation as exc:
            if pidfd >= 0:
                os.close(pidfd)
            self.kill()
            reason = f"the fork server broke the protocol: {exc}"
            raise ForkServerUnavailable(reason, permanent=False) from None
        if isinstance(answer, Forked):
            stdin, stdout, stderr = channels
            return ForkedWorker.forked(
                self.settings, answer.pid, pidfd, (stdin, stdout, stderr), self.pid
            )
        if pidfd >= 0:
            os.close(pidfd)
        raise ForkServerUnavailable(
            f"the fork server cannot fork: {answer.reason}", permanent=answer.errno in _REFUSALS
        )

    def _adopt_orphan(self, channels: list[int]) -> ForkedWorker | None:
        """The fork server died (or was killed) before it answered a fork: had it cloned the
        worker, that worker is our child (CLONE_PARENT) and nobody else would reap it. Its
        hello names its pid; a pidfd on a child of ours that is not reaped names that child
        and no other, and ``waitid`` on it refuses any process that is not our child. So it
        is adopted as any forked worker. None: no worker came (the fork server died before the
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
            "jsonnet_worker: fork server %d died before it answered a fork; "
            "its worker %d is adopted",
            self.pid,
            pid,
        )
        stdin, stdout, stderr = channels
        return ForkedWorker.forked(self.settings, pid, pidfd, (stdin, stdout, stderr), self.pid)

    # -- life and death: ChildProcess's, with the control socket as the input ------------

    def end_input(self) -> None:
        """Close the control socket: the fork server exits at its end. Idempotent."""
        self.control.close()

    def _channel_fds(self) -> tuple[int, ...]:
        return ()

    def close(self, grace: float = 1.0) -> int | None:
        """Stop the fork server (it exits at the end of its control socket; killed after
        ``grace``), reap it, close every fd. The workers it forked live on. Idempotent."""
        with self._lock:
            return super().close(grace)


class WorkerSource:
    """Where a pool's new workers come from: a fork of its fork server while the fork server
    can give one, a re-exec start otherwise, with the reason kept for ``pool.sandbox`` and
    ``doctor``. A thin driver: every decision is ``ForkServerPolicy``'s; this carries out its
    effects and reports what happened.

    The fork server is started on the first ``spawn`` (or ``maintain``) and again after a
    failure, after the pool's back-off; a permanent refusal stops the attempts for good.
    ``maintain`` notices a dead fork server, restarts it once the back-off has passed, and
    replaces it before its RLIMIT_CPU runs out (each fork costs it about a millisecond). Call
    it from the supervisor thread only: PR_SET_PDEATHSIG ties the fork server, and every
    worker it forks, to the thread that started the fork server."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        fork_server_command: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_share: float = CPU_SHARE,
        tasks: TaskLimits | None = None,
    ) -> None:
        self.settings = settings
        self.fork_server_command = fork_server_command
        self.clock = clock
        self.fork_server: ForkServerProcess | None = None
        # The pool's task cgroups (None: not placed): each fork server gets one, so that a
        # worker is born in a bounded cgroup and moved from there to its own by the pool.
        self.tasks = tasks
        self._fork_server_cgroup: TaskCgroup | None = None
        self.policy = ForkServerPolicy(
            cpu_budget=settings.cpu_budget,
            cpu_share=cpu_share,
            uid_range=settings.identities.uids is not None,
        )

    def spawn(self) -> WorkerProcess:
        """A new worker: forked if the fork server can, re-executed otherwise. Raises only
        what ``WorkerProcess`` raises."""
        self._notice_death()
        step = self.policy.next_worker(self.clock())
        if step is Next.START:
            self._start()
            step = self.policy.next_worker(self.clock())
        if step is Next.FORK:
            server = self.fork_server
            assert server is not None  # FORKING: the policy's fork server is ours
            try:
                worker = server.fork_worker()
            except ForkServerUnavailable as exc:
                self._perform(
                    self.policy.fork_failed(server.pid, exc.reason, exc.permanent, self.clock())
                )
            else:
                self.policy.forked()
                return worker
        re_exec = WorkerProcess(self.settings)
        self.policy.re_executed()
        return re_exec

    def maintain(self) -> None:
        """Between spawns, once the policy's ``check_at`` has come: a dead fork server is
        reported, a live one's CPU time sampled, and what the policy asks done (a fork
        server started once its back-off has passed, one near its CPU limit replaced)."""
        now = self.clock()
        if now < self.policy.check_at:
            return
        self._notice_death()
        server = self.fork_server
        if server is not None:
            self._perform(self.policy.cpu_used(server.pid, server.cpu_seconds(), now))
        self._perform(self.policy.tend(self.clock()))

    @property
    def check_at(self) -> float:
        """When ``maintain`` has something to do (the supervisor's next tending time)."""
        return self.policy.check_at

    def look_soon(self) -> None:
        """The fork server's pidfd turned readable: ``maintain`` looks on the next turn."""
        self.policy.look_soon()

    def replace(self) -> None:
        """Start a new fork server now (the old one is closed; the workers it forked live on)."""
        self._perform(self.policy.replace(self.clock()))

    @property
    def pidfd(self) -> int | None:
        """The fork server's pidfd, to watch for its death (None without a fork server)."""
        return self.fork_server.pidfd if self.fork_server is not None else None

    def status(self) -> LayerStatus:
        """The fork server's layer (named ``template``) of ``pool.sandbox`` and ``doctor``."""
        return self.policy.status()

    def stats(self) -> SourceStats:
        return self.policy.stats()

    def close(self) -> None:
        """Stop the fork server; the workers it forked live on (their owners close them)."""
        self._perform(self.policy.stop())

    # -- carrying out ----------------------------------------------------------------------

    def _notice_death(self) -> None:
        server = self.fork_server
        if server is not None and server.exited():
            self._perform(self.policy.died(server.pid, server.how_it_ended(), self.clock()))

    def _start(self) -> None:
        try:
            server = ForkServerProcess(self.settings, self.fork_server_command)
        except ForkServerUnavailable as exc:  # it closed itself
            self._perform(self.policy.start_failed(exc.reason, exc.permanent, self.clock()))
            return
        except OSError as exc:  # no fds, no processes left: try again later
            reason = f"cannot start the fork server: {exc}"
            self._perform(self.policy.start_failed(reason, False, self.clock()))
            return
        if self.tasks is not None:
            try:
                self._fork_server_cgroup = self.tasks.place(server.pid, fork_server=True)
            except OSError as exc:  # fail closed: no fork server whose forks are unbounded
                server.close()
                reason = f"cannot put the fork server in a task cgroup: {exc}"
                self._perform(self.policy.start_failed(reason, False, self.clock()))
                return
        self.fork_server = server
        self.policy.started(server.pid, server.cpu_at_hello, self.clock())

    def _perform(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, CloseForkServer):
                server = self.fork_server
                if server is not None and server.pid == effect.pid:
                    self.fork_server = None
                    server.close(effect.grace)
                    self._remove_cgroup()
            elif isinstance(effect, StartForkServer):
                self._start()
            elif isinstance(effect, Log):
                logger.log(effect.level, effect.message, *effect.args)

    def _remove_cgroup(self) -> None:
        """The closed (reaped) fork server's cgroup; a worker forked into it was moved out
        before the fork server was asked for the next one (an orphan adopted after its fork
        server's death too: the supervisor places it before it tends the dead fork server)."""
        cgroup, self._fork_server_cgroup = self._fork_server_cgroup, None
        if cgroup is not None:
            cgroup.remove()
