"""``eval``'s worker, started at the command's first line, before its imports: a speculation
on its settings, checked against the real ones before it is used.

Goals: a quick ``eval``. The command's own imports (argparse, the config, the wire format,
the pool's modules: about 45 ms) and its worker's start-up (about as long) each take most of
a command's time; run one beside the other. Never at the price of correctness: the worker a
call uses is exactly the one its ``PoolConfig`` asks for, started exactly as a pool starts
one.

Plan: ``start(argv)`` reads the settings that shape a worker (``--engine``,
``--memory-limit``, ``--max-request``, ``--worker-user``, ``--cpu-budget``; every other
option is the command's, and no environment variable shapes an ``eval`` worker) from the
command line by hand, with the defaults the full config would take (``PREDICTED``), writes
the worker's command line and environment with ``_pool.workerline`` (what
``processes.WorkerProcess`` uses) and spawns it with ``posix_spawn``, as ``subprocess``
would: a session of its own, SIGPIPE and SIGXFSZ at their defaults, no fd of ours but its
three channels. Once the command has built its config, ``worker_for(settings)`` compares the
command line and environment with those ``settings_for(config)`` gives: equal, the worker
is handed to a ``WorkerProcess`` (its one owner from then on); different, it is killed and
reaped and the caller starts the right one. ``close`` kills and reaps a worker never handed
over (the console script calls it on every path: an error, a bad flag, Ctrl-C).

Weak spots: the hand-written reading follows argparse only for the plain forms
(``--flag VALUE``, ``--flag=VALUE``); an abbreviated flag, or one argparse reads otherwise,
makes a different worker, which the comparison catches (correct, one start slower). A uid
range is not speculated (each worker holds a uid of its own). A Ctrl-C between the spawn
and the pidfd leaves the worker to its own death: it exits when it finds its parent gone
(PR_SET_PDEATHSIG, ``startup.tie_to_parent``). ``posix_spawn`` leaves glibc's own two
signals (SIGCANCEL and SIGSETXID, below SIGRTMIN) ignored where ``subprocess`` leaves them at
their default: no program but glibc uses them, and glibc sets its handler before it does.
"""

from __future__ import annotations

import os
import pwd

from .._pool import workerline
from .closing import ClosedOnExit
from .sizes import parse_size

TYPE_CHECKING = False  # typing's, without importing typing (9 ms before the worker starts)
if TYPE_CHECKING:
    import signal as _signal

    from .._pool.processes import WorkerProcess, WorkerSettings
else:  # signal's constants and calls without its enums (4 ms before the worker starts)
    import _signal

# What a worker's settings are when the command line does not give them: PoolConfig's
# defaults (``eval``'s own limits change none of them). A test keeps them equal.
PREDICTED = {
    "--engine": "go",
    "--memory-limit": str(1 << 30),
    "--max-request": str(64 << 20),
    "--worker-user": "nobody",
    "--cpu-budget": "300.0",
}
NOBODY_ID = 65534  # as ``_pool.identities``: nobody's number where /etc/passwd lacks it
_HELP = ("-h", "--help")


class NotPredicted(Exception):
    """The worker's settings are not speculated on: the command decides."""


def given_settings(argv: list[str]) -> dict[str, str] | None:
    """The worker-shaping options ``eval``'s command line gives, over ``PREDICTED``; None
    when no worker should be started now (not ``eval``, or a help request)."""
    if argv[:1] != ["eval"]:
        return None
    given = dict(PREDICTED)
    words = iter(argv[1:])
    for word in words:
        if word == "--":
            break
        if word in _HELP:
            return None
        name, equals, value = word.partition("=")
        if name in given:
            value = value if equals else next(words, "")
            if value.lower() != "none":  # as ``pool_config``: None leaves the default
                given[name] = value
    return given


def predicted_command(argv: list[str]) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment of the worker ``argv`` will most likely ask for; None
    when no worker should be started, or a value is one the command will refuse (its own
    message says why) or does not speculate on (a uid range)."""
    given = given_settings(argv)
    if given is None or given["--engine"] not in ("go", "cpp"):
        return None
    try:
        memory_limit = parse_size(given["--memory-limit"])
        max_frame = parse_size(given["--max-request"])
        cpu_budget = float(given["--cpu-budget"])
        drop = _identity(given["--worker-user"])
    except Exception:  # NotPredicted, or a value the command refuses (its message says why)
        return None
    command = workerline.worker_command(
        given["--engine"], memory_limit, max_frame, drop, cpu_budget
    )
    return command, workerline.worker_environment(memory_limit)


def _identity(user: str) -> tuple[str, int, int, bool] | None:
    """Whom a worker drops to, as ``identities.resolve_identity`` decides it: nobody when
    this process is not root. NotPredicted: an unknown user, root, or a uid range."""
    if os.geteuid() != 0:
        return None
    first, dash, last = user.partition("-")
    if dash and first.strip().isdigit() and last.strip().isdigit():
        raise NotPredicted(f"a uid range: {user}")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if user != "nobody":
            raise NotPredicted(f"no such user: {user}") from None
        return (user, NOBODY_ID, NOBODY_ID, False)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise NotPredicted(f"{user} is root")
    return (user, entry.pw_uid, entry.pw_gid, False)


def _inherited_fds(keep: tuple[int, ...]) -> list[int] | None:
    """This process's inheritable fds above 2 other than ``keep``, which the worker must not
    get (``subprocess``'s close_fds); None where they cannot be listed."""
    try:
        listed = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        return None
    inherited = []
    for fd in listed:
        if fd <= 2 or fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                inherited.append(fd)
        except OSError:  # the listing's own fd, closed by now
            continue
    return inherited


class EarlyWorker(ClosedOnExit):
    """A worker spawned before the command knew its config. Owned here (killed and reaped by
    ``close``) until ``worker_for`` hands it to a ``WorkerProcess``."""

    def __init__(self, command: list[str], environment: dict[str, str]) -> None:
        self.command = command
        self.environment = environment
        self.handed_over = False  # to a WorkerProcess, by ``worker_for``
        child, self.channels = workerline.worker_channels()
        try:
            pid = self._spawn(child)
        except BaseException:
            for fd in self.channels:
                os.close(fd)
            raise
        finally:
            for fd in child:
                os.close(fd)
        self.pid = pid
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except BaseException:
            os.kill(pid, _signal.SIGKILL)
            os.waitpid(pid, 0)
            for fd in self.channels:
                os.close(fd)
            raise

    def _spawn(self, child: tuple[int, int, int]) -> int:
        inherited = _inherited_fds((*child, *self.channels))
        if inherited is None or min(child) <= 2:  # a closed stdio fd: dup2 onto itself
            raise OSError("cannot tell which fds the worker would inherit")
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child)
        ]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited]
        return os.posix_spawn(
            self.command[0],
            self.command,
            self.environment,
            file_actions=actions,
            setsid=True,
            setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),  # Python ignores both
        )

    @property
    def owned(self) -> bool:
        """Whether this object still owns the worker (not handed over, not closed)."""
        return self.pidfd is not None

    def worker_for(self, settings: WorkerSettings) -> WorkerProcess | None:
        """The worker, now a ``WorkerProcess``, if it was started exactly as one for
        ``settings`` is (command line and environment); otherwise None, and it is killed
        and reaped."""
        from .._pool.processes import WorkerProcess, worker_command, worker_environment

        if self.pidfd is None:
            return None
        identity = settings.identities.acquire()
        settings.identities.release(identity)  # a shared one (a uid of its own never matches)
        expected = worker_command(settings, identity), worker_environment(settings)
        if (identity is not None and identity.own_uid) or (self.command, self.environment) != (
            expected
        ):
            self.close()
            return None
        pidfd, self.pidfd = self.pidfd, None
        self.handed_over = True
        return WorkerProcess.adopt(settings, self.pid, pidfd, self.channels)

    def close(self) -> None:
        """Kill and reap the worker and close its fds, unless handed over. Idempotent."""
        if self.pidfd is None:
            return
        pidfd, self.pidfd = self.pidfd, None
        try:
            _signal.pidfd_send_signal(pidfd, _signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        except ChildProcessError:  # reaped by the kernel (SIGCHLD ignored)
            pass
        for fd in (*self.channels, pidfd):
            os.close(fd)


def start(argv: list[str]) -> EarlyWorker | None:
    """``eval``'s worker, started now from its command line ``argv`` (without the program
    name); None for another command, or where it cannot be predicted or spawned (the
    command then starts its worker itself, and says what went wrong)."""
    predicted = predicted_command(argv)
    if predicted is None:
        return None
    try:
        return EarlyWorker(*predicted)
    except OSError:
        return None
