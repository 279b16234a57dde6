"""Child processes, owned each by exactly one object that kills and reaps it (trio's rule).

Goals: pure mechanism. Start a worker or the fork server by re-executing this interpreter in
a hidden mode, or adopt a worker the fork server cloned; hold its channels and its pidfd;
read, write, signal, reap, read its CPU time; say how it ended, in one wording. Nothing here
decides policy (how many workers, when to recycle: ``state``'s; when to start the fork
server: ``forkserver_policy``'s) or what the bytes mean (``connection``'s, ``forking``'s).
See docs/DESIGN.md, "Call flow".

Plan: ``ChildProcess`` is the one owner of a child, for workers (``WorkerProcess``) and the
fork server (``forking.ForkServerProcess``) alike: spawned (Popen, then a pidfd) or adopted (a
CLONE_PARENT fork's pidfd, reaped through ``waitid(P_PIDFD)`` by ``PidfdChild``); its stderr
captured; killed through its pidfd under the fd lock; waited and reaped; its fds closed once.
It is the only code of the pool that signals or reaps a child (the fork server's orphan
adoption only asks, with ``WNOWAIT``, whether a pid is our child; ``eval``'s worker, started
before its config exists, is ``_cli.early``'s to kill and reap until it is adopted here). The
command line, environment and channels are ``workerline``'s, which ``_cli.early`` shares.

The channels are non-blocking on our side, so a stuck or dead worker can never block a
caller past its deadline; callers ``poll`` (or asyncio watches) them. stderr is drained into a
``StderrCapture`` that keeps the head and the tail of what a call printed, bounded, so a
``std.trace`` flood never fills the channel and a Go crash dump keeps its first line ("fatal
error: runtime: out of memory"). The pidfd lets the supervisor see a death without touching
the channels a caller reads, and lets us signal without a pid-reuse race.

A worker's three channels are unix socket pairs, not pipes, each shut down in the direction
it does not carry. Landlock does not mediate pipefs, so a worker could reopen a pipe it holds
through ``/proc/self/fd/N`` (``importstr "/proc/self/fd/1"`` without the import barrier read
the worker's own stderr pipe and hung; fd 3 would steal the request stream). A socket cannot
be opened through ``/proc`` at all (ENXIO), so the kernel refuses that too.

A worker forked by the fork server (``forking``) is a child of this process that
``subprocess`` did not start: ``WorkerProcess.adopt`` owns it the same way; it holds no
identity of its own.

Weak spots: a spawned child is reaped by ``subprocess.Popen`` (thread-safe); the pidfd only
observes it. ``kill`` may come from any thread (the fd lock keeps the pidfd's number alive),
but ``wait`` and ``close`` only from the owner's holder.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from .._config import PoolConfig
from .._errors import EvaluationTimeout, MemoryLimitExceeded, WorkerCrashed
from .._sandbox.privileges import WorkerIdentity
from .._wire.messages import escape_controls
from .._wire.values import field, valueclass
from . import workerline
from .identities import WorkerIdentities
from .workerline import one_way_channel as one_way_channel  # the fork server's channels too

STDERR_HEAD = 4096
STDERR_TAIL = 4096
READ_SIZE = 256 * 1024

# Text a runtime prints when it dies of memory exhaustion under the memory limit.
_MEMORY_MARKERS = (
    "out of memory",
    "cannot allocate memory",
    "memory allocation error",
    "pthread_create failed",
    "MemoryError",
    "std::bad_alloc",
)


@valueclass
class WorkerSettings:
    """What every worker of a pool is started with."""

    engine: str
    memory_limit: int
    max_frame: int
    # whom a root parent's workers drop to (one uid each from a range); none by default
    identities: WorkerIdentities = field(default_factory=lambda: WorkerIdentities(None))
    cpu_budget: float | None = None  # CPU seconds of one worker's life (RLIMIT_CPU)


def settings_for(config: PoolConfig) -> WorkerSettings:
    """What a pool with ``config`` starts its workers with (kept next to ``WorkerSettings``
    so that a field added there is filled here)."""
    return WorkerSettings(
        config.engine,
        config.memory_limit,
        config.max_request,
        WorkerIdentities(config.worker_user),
        config.cpu_budget,
    )


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time process ``pid`` has used (all its threads), as RLIMIT_CPU counts it; None
    once it is gone. Its per-process CPU clock (clock_getcpuclockid: CPUCLOCK_SCHED): no
    /proc, works for a child of another uid, and a zombie's still reads."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


def kill_through(pidfd: int) -> None:
    """SIGKILL the process ``pidfd`` names (no pid-reuse race); nothing if it is gone."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def exits_within(pidfd: int, timeout: float) -> bool:
    """Whether the process ``pidfd`` names has exited within ``timeout`` seconds (its pidfd
    turns readable at once; Popen.wait(timeout) sleeps in steps of up to 50 ms)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class StderrCapture:
    """The first and last bytes a worker printed since ``mark()``, bounded: the head keeps
    ``head_limit`` bytes (a call's ``std.trace`` lines are read from it), the tail the last
    ``STDERR_TAIL`` (a crash's last words), ``dropped`` counts what fell in between."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        self.head_limit = STDERR_HEAD

    def mark(self, head_limit: int = STDERR_HEAD) -> None:
        """A new call's capture starts: what was kept is forgotten; a caller that asked for
        its traces keeps up to ``head_limit`` bytes of head (never fewer than
        ``STDERR_HEAD``, where a crash dump's first line is looked for)."""
        self.head.clear()
        self.tail.clear()
        self.dropped = 0
        self.head_limit = max(STDERR_HEAD, head_limit)

    def add(self, data: bytes) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            excess = len(self.tail) - STDERR_TAIL
            if excess > 0:
                del self.tail[:excess]
                self.dropped += excess

    def text(self) -> str:
        gap = f"\n... ({self.dropped} bytes) ...\n" if self.dropped else ""
        return (
            bytes(self.head).decode("utf-8", "replace")
            + gap
            + bytes(self.tail).decode("utf-8", "replace")
        )


# Where the package and its dependencies are imported from (the host sandbox reads them too).
_package_paths = workerline.package_paths


def worker_command(settings: WorkerSettings, identity: WorkerIdentity | None = None) -> list[str]:
    """The command line of one worker that drops to ``identity`` (if given): written by
    ``workerline``, which ``eval``'s early start (``_cli.early``) shares."""
    drop = (
        None if identity is None else (identity.user, identity.uid, identity.gid, identity.own_uid)
    )
    return workerline.worker_command(
        settings.engine, settings.memory_limit, settings.max_frame, drop, settings.cpu_budget
    )


def worker_environment(settings: WorkerSettings) -> dict[str, str]:
    """A minimal environment (``workerline.worker_environment``)."""
    return workerline.worker_environment(settings.memory_limit)


class _Child(Protocol):
    """How a child is reaped: ``subprocess.Popen`` for a spawned one, ``PidfdChild`` for an
    adopted one."""

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...


class PidfdChild:
    """A child of this process that ``subprocess`` did not start, reaped through its pidfd
    (``waitid(P_PIDFD)``: no pid-reuse race, an unreaped child keeps its pid). Popen's
    ``returncode``/``poll``/``wait``, thread-safe: a look while another thread waits says
    "running", as ``Popen.poll`` does."""

    def __init__(self, pidfd: int) -> None:
        self.pidfd = pidfd
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._reap(block=False)

    def wait(self) -> int:
        returncode = self._reap(block=True)
        assert returncode is not None
        return returncode

    def _reap(self, block: bool) -> int | None:
        if not self._lock.acquire(blocking=block):
            return self.returncode
        try:
            if self.returncode is not None:
                return self.returncode
            try:
                info = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | (0 if block else os.WNOHANG))
            except ChildProcessError:  # reaped by the kernel (SIGCHLD ignored): status lost
                self.returncode = 0
                return 0
            if info is None:
                return None
            killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
            self.returncode = -info.si_status if killed else info.si_status
            return self.returncode
        finally:
            self._lock.release()


# What a spawned child's channels are made of: its (stdin, stdout, stderr) fds, and our ends
# of them, our end of its stderr last.
Channels = tuple[tuple[int, int, int], tuple[int, ...]]


class ChildProcess:
    """One child process of this process, a worker or the fork server, owned by this object
    alone: the only one that signals it (``kill``, under the fd lock, so that its pidfd's
    number is never closed and reused meanwhile), reaps it (``wait``), says how it ended
    (``how_it_ended``) and closes its fds (``close``).

    Spawned (``_spawn``: ``subprocess.Popen``, reaped by Popen, observed through a pidfd) or
    adopted (``_own`` with a ``PidfdChild``: a CLONE_PARENT fork, reaped through its pidfd).
    Its stderr is drained into a ``StderrCapture``. A subclass adds its other channels:
    ``end_input`` closes the one whose end tells the child to exit, ``_channel_fds`` lists
    the rest, closed with the stderr channel and the pidfd once the child is reaped."""

    def _spawn(
        self,
        settings: WorkerSettings,
        command: Callable[[WorkerIdentity | None], list[str]],
        channels: Callable[[], Channels],
    ) -> tuple[int, ...]:
        """Start the child: ``command`` is its command line for the identity it drops to
        (held until it is reaped), ``channels`` makes its stdio and our ends. Returns our
        ends; on any failure, everything acquired is given back."""
        identity = settings.identities.acquire()
        try:
            child_stdio, ours = channels()
        except BaseException:
            settings.identities.release(identity)
            raise
        import subprocess  # here: eval's worker is adopted, and subprocess costs it ~2 ms

        try:
            popen = subprocess.Popen(
                command(identity),
                stdin=child_stdio[0],
                stdout=child_stdio[1],
                stderr=child_stdio[2],
                env=worker_environment(settings),
                close_fds=True,
                start_new_session=True,
            )
            try:
                pidfd = os.pidfd_open(popen.pid)
            except BaseException:
                popen.kill()
                popen.wait()
                raise
        except BaseException:
            for fd in ours:
                os.close(fd)
            settings.identities.release(identity)
            raise
        finally:
            for fd in dict.fromkeys(child_stdio):  # the fork server's stdout is its stderr
                os.close(fd)
        self._own(settings, popen, popen.pid, pidfd, ours[-1], identity, held=True)
        return ours

    def _own(
        self,
        settings: WorkerSettings,
        child: _Child,
        pid: int,
        pidfd: int,
        stderr_fd: int,
        identity: WorkerIdentity | None,
        *,
        held: bool,
    ) -> None:
        """Take ownership of a started child (``held``: its identity is released once it
        is reaped; an adopted fork runs as its fork server's, which holds that one)."""
        self.settings = settings
        self.pid = pid
        self.pidfd = pidfd
        self.stderr_fd = stderr_fd
        os.set_blocking(stderr_fd, False)
        self.stderr = StderrCapture()
        self.stderr_open = True
        self.started_at = time.monotonic()
        self.identity = identity
        self._identity_held = held
        self._child = child
        self._fd_lock = threading.Lock()
        self._fds_open = True
        self._cpu_at_exit: float | None = None

    @property
    def returncode(self) -> int | None:
        """Its exit status once reaped (negative: the signal that killed it)."""
        return self._child.returncode

    @property
    def closed(self) -> bool:
        return not self._fds_open

    def drain_stderr(self, keep: bool = True) -> bool:
        """Move what stderr holds into the capture (or, ``keep=False``, into nothing);
        False at end of file."""
        while True:
            try:
                data = os.read(self.stderr_fd, READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                self.stderr_open = False
                return False
            if keep:
                self.stderr.add(data)

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    @property
    def cpu_at_exit(self) -> float | None:
        """Its CPU time as ``wait`` read it just before reaping it (None: not reaped that
        way): once reaped its clock no longer reads."""
        return self._cpu_at_exit

    # -- life and death ------------------------------------------------------------------

    def kill(self) -> None:
        with self._fd_lock:  # the pidfd's number must not be closed (and reused) meanwhile
            if not self._fds_open:
                return
            kill_through(self.pidfd)

    def exited(self) -> bool:
        return self._child.poll() is not None

    def wait(self, timeout: float | None) -> int | None:
        """Reap the process; None if it is still running after ``timeout`` seconds."""
        unreaped = self._child.returncode is None and self._fds_open
        if unreaped and timeout is not None and not exits_within(self.pidfd, timeout):
            return None
        if self._child.returncode is None and self._fds_open:  # not reaped meanwhile
            self._cpu_at_exit = self.cpu_seconds()  # a zombie's clock still reads
        return self._child.wait()

    def how_it_ended(self) -> str:
        """ "killed by SIGSEGV", "exited with status 3", or "still running" (not reaped)."""
        returncode = self._child.returncode
        if returncode is None:
            return "still running"
        if returncode < 0:
            try:
                return f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                return f"killed by signal {-returncode}"
        return f"exited with status {returncode}"

    def end_input(self) -> None:
        """Close the channel whose end tells the child to exit. Idempotent."""
        raise NotImplementedError

    def _channel_fds(self) -> tuple[int, ...]:
        """Our ends of its channels other than stderr and the input, closed by ``close``."""
        raise NotImplementedError

    def close(self, grace: float = 0.0) -> int | None:
        """Stop the process (after ``grace`` seconds for an orderly exit at the end of its
        input), reap it, keep what it printed last, close every fd. Idempotent."""
        self.end_input()
        if grace <= 0 or self.wait(grace) is None:
            self.kill()
        returncode = self.wait(None)
        self._release_identity()
        with self._fd_lock:
            if self._fds_open:
                self._fds_open = False
                self.drain_stderr()
                for fd in (*self._channel_fds(), self.stderr_fd, self.pidfd):
                    os.close(fd)
        return returncode

    def _release_identity(self) -> None:
        """Once the process is reaped (or never started): its uid may go to a new one."""
        with self._fd_lock:
            held, self._identity_held = self._identity_held, False
        if held:
            self.settings.identities.release(self.identity)


@valueclass
class AdoptedChild:
    """A worker started elsewhere, to be owned by a ``WorkerProcess``: its pid, its pidfd,
    and the parent ends of its (requests, responses, stderr) channels."""

    pid: int
    pidfd: int
    channels: tuple[int, int, int]


_Process = TypeVar("_Process", bound="WorkerProcess")


class WorkerProcess(ChildProcess):
    """A started worker: its channels and pidfd. Killed, reaped and closed through it only.

    Pure mechanism: which state the pool gives it, and what its bytes mean, live in
    ``state`` and ``connection``."""

    def __init__(
        self,
        settings: WorkerSettings,
        command: list[str] | None = None,
        *,
        adopted: AdoptedChild | None = None,
    ) -> None:
        if adopted is not None:
            child = PidfdChild(adopted.pidfd)
            channels = adopted.channels
            self._own(settings, child, adopted.pid, adopted.pidfd, channels[2], None, held=False)
        else:
            stdin, stdout, stderr = self._spawn(
                settings,
                lambda identity: command or worker_command(settings, identity),
                workerline.worker_channels,
            )
            channels = (stdin, stdout, stderr)
        self.stdin, self.stdout, _ = channels
        os.set_blocking(self.stdin, False)
        os.set_blocking(self.stdout, False)
        # Reused by whichever caller holds the worker: registering fds per call costs
        # more syscalls than the answer's wait.
        self.poller = select.poll()
        self.poller.register(self.stdout, select.POLLIN)
        self.poller.register(self.stderr_fd, select.POLLIN)
        self._input_open = True

    @classmethod
    def adopt(
        cls: type[_Process],
        settings: WorkerSettings,
        pid: int,
        pidfd: int,
        channels: tuple[int, int, int],
    ) -> _Process:
        """Own a worker started elsewhere: a child of this process (a fork server's
        CLONE_PARENT fork, or ``eval``'s worker started before its config was built,
        ``_cli.early``) given as its pidfd and the parent ends of its three channels,
        reaped through ``waitid(P_PIDFD)``. It holds no identity of its own: it runs as its
        fork server's, which the fork server holds for its life, or as a shared one (no
        release is owed)."""
        return cls(settings, adopted=AdoptedChild(pid, pidfd, channels))

    def __repr__(self) -> str:
        return f"<WorkerProcess pid={self.pid}>"

    # -- reading -------------------------------------------------------------------------

    def read_stdout(self) -> bytes | None:
        """What stdout holds now: bytes, ``b""`` at end of stream, None if nothing yet."""
        try:
            return os.read(self.stdout, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def ready(self) -> tuple[bool, bool]:
        """Without blocking: whether (stdout, stderr) have bytes or have ended."""
        stdout = stderr = False
        for fd, _ in self.poller.poll(0):
            if fd == self.stdout:
                stdout = True
            else:
                stderr = True
        return stdout, stderr

    # -- how it died ---------------------------------------------------------------------

    def _ran_out_of_cpu(self, returncode: int | None) -> bool:
        """RLIMIT_CPU ended it: SIGXCPU at the budget, or SIGKILL a second later (a worker
        that ignores SIGXCPU), told apart from other kills by the CPU time it had used when
        it was reaped (``wait`` samples it then: the clock is gone afterwards)."""
        budget = self.settings.cpu_budget
        if budget is None or returncode is None:
            return False
        if returncode == -signal.SIGXCPU:
            return True
        cpu = self._cpu_at_exit
        return returncode == -signal.SIGKILL and cpu is not None and cpu >= budget

    def death_error(self) -> MemoryLimitExceeded | WorkerCrashed | EvaluationTimeout:
        """After it has exited (reaped): why it died, with what it printed during this call."""
        returncode = self._child.returncode
        self.drain_stderr()
        tail = self.stderr.text()
        how = self.how_it_ended()
        if self._ran_out_of_cpu(returncode):
            return EvaluationTimeout(
                f"the worker used up its CPU budget of {self.settings.cpu_budget:g} s "
                f"(CPU clock: RLIMIT_CPU, SIGXCPU) and was {how}; it is replaced",
                clock="cpu",
            )
        if any(marker in tail for marker in _MEMORY_MARKERS):
            return MemoryLimitExceeded(
                f"the worker ran out of memory (limit {self.settings.memory_limit} bytes) and {how}"
            )
        # What the worker printed is the snippet's (std.trace) or the engine's: escaped, so
        # that it can paint no terminal and forge no log line where the message goes.
        tail = escape_controls(tail)
        detail = tail.strip().splitlines()[0] if tail.strip() else "no output"
        return WorkerCrashed(
            f"worker {self.pid} {how} during the evaluation ({detail[:200]})",
            returncode=returncode,
            stderr_tail=tail,
        )

    def send(self, data: bytes | memoryview) -> int | None:
        """Write what the request channel takes now: the bytes written (0 when it is full),
        or None when the worker is gone or its channel closed. Under the fd lock: a caller
        handing this worker over may write while another thread retires it, and the fd
        number must not be closed (and reused) in between."""
        with self._fd_lock:
            if not self._input_open:
                return None
            try:
                return os.write(self.stdin, data)
            except BlockingIOError:
                return 0
            except OSError:
                return None

    def end_input(self) -> None:
        """Close the request channel: an idle worker exits by itself at EOF. Idempotent."""
        with self._fd_lock:
            if self._input_open:
                self._input_open = False
                os.close(self.stdin)

    def _channel_fds(self) -> tuple[int, ...]:
        return (self.stdout,)
