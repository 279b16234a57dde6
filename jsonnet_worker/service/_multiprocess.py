"""``jsonnet-worker serve --workers N``: a parent process that starts N server processes on
one listening socket and stops them all together, with Prometheus metrics shared between
them.

Goals: N times the request handling of one process without giving up the start order that
makes each process's host sandbox worth having: every server process builds its own
WorkerPool in its own lifespan (never one inherited across a fork), checks the snippets,
applies its own ``restrict_host`` layer, and only then accepts a connection. ``/metrics``,
in whichever process answers, counts every process's requests and pool.

Plan: the parent (this process, which never reads a request) makes a private
directory for prometheus_client's multiprocess mode (``tempfile.mkdtemp``: new, empty,
mode 0700), binds and listens on the socket, and starts each server process as a fresh
interpreter (``sys.executable -c``; no fork, so nothing of this process's state, threads
or locks is inherited) with three descriptors: the listening socket, a pipe on which it
says "ready" once its lifespan has started (pool up, snippets checked, host sandbox on)
and a lifeline pipe whose end of file tells it the parent is gone. Its environment
names the directory in ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is imported.
uvicorn's own ``workers=`` mode does not fit: its server processes start a ping
thread before the app's lifespan, and ``restrict_host`` refuses to run beside a thread its
layer would not bind.

The parent waits for signals and for its children. SIGTERM or SIGINT: SIGTERM to every
server process (each then stops as one process does: finish requests in flight, close the
pool, reap its workers), SIGKILL to one still running after twice ``serve.shutdown_timeout``
and a margin, then the directory is removed and the parent exits by re-raising the
signal. A server process that fails before it is ready stops the start (exit 3, as one
process does); one that dies while serving stops the service (exit 1): the orchestrator
that restarts a single process restarts this one, and no process runs without the others
noticing.

Weak spots: a SIGKILLed parent leaves its directory in the temporary directory (its
server processes stop when their lifeline ends); the socket is listening from the start,
so connections that arrive before the first server process is ready wait in its backlog
(none is accepted before a sandbox is on). Each server process has its own pool: N
processes run N times ``pool.size`` workers (README: "The service").
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from types import FrameType
from typing import TYPE_CHECKING

from .. import Error
from ._config import ServiceConfig
from ._metrics import MULTIPROC_ENV

if TYPE_CHECKING:
    from ._server import ServeOptions

logger = logging.getLogger("jsonnet_worker.service")

EXIT_STOPPED = 1  # a server process died while serving
EXIT_CONFIG = 2
EXIT_START = 3
STOP_MARGIN = 10.0  # seconds past twice the shutdown timeout before SIGKILL
READY = b"ready\n"
SERVER_PROCESS_CODE = (
    "import sys\n"
    "from jsonnet_worker.service._multiprocess import server_process\n"
    "sys.exit(server_process(sys.argv[1]))\n"
)


@dataclass(frozen=True)
class ProcessSpec:
    """What a server process is told on its command line (nothing secret: no token, no
    snippet; it reads its config itself, with the same environment)."""

    index: int
    config_path: str | None
    host: str
    port: int
    log_format: str
    log_level: str
    access_log: bool
    listener_fd: int
    ready_fd: int
    lifeline_fd: int
    metrics_dir: str


@dataclass
class ServerProcess:
    index: int
    process: subprocess.Popen[bytes]
    ready_fd: int  # the parent's end; -1 once read
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


class ServerProcessesError(Error):
    """The parent of ``serve --workers N`` could not make its directory or socket."""

    kind = "server_processes"


def make_metrics_dir() -> str:
    """A new, empty directory only this user can enter (``mkdtemp``: mode 0700)."""
    path = tempfile.mkdtemp(prefix="jsonnet-worker-metrics-")
    if os.listdir(path):  # mkdtemp made it: a file in it means someone else is in there
        raise ServerProcessesError(f"the new metrics directory {path} is not empty")
    return os.path.realpath(path)


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket every server process accepts on, bound as uvicorn binds it."""
    import uvicorn

    # log_config=None: the service's logging stays as configured
    return uvicorn.Config(app="unused:app", host=host, port=port, log_config=None).bind_socket()


def run_server_processes(options: ServeOptions, config: ServiceConfig, workers: int) -> int:
    """Run ``workers`` server processes until SIGTERM or SIGINT or until one of them ends
    (none is restarted); returns the exit status (or re-raises the signal that stopped it)."""
    received: list[int] = []

    def on_stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    os.set_blocking(wake_read, False)
    previous_wakeup = signal.set_wakeup_fd(wake_write)
    handlers = {
        signum: signal.signal(signum, on_stop) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    metrics_dir = make_metrics_dir()
    lifeline_read, lifeline_write = os.pipe()
    processes: list[ServerProcess] = []
    status = 0
    try:
        listener = bind_listener(options.host, options.port)
        try:
            for index in range(workers):
                processes.append(
                    start_server_process(
                        index, options, listener.fileno(), lifeline_read, metrics_dir
                    )
                )
            os.close(lifeline_read)
            lifeline_read = -1
            logger.info(
                "parent %d: %d server processes on one socket (pids %s), metrics in %s",
                os.getpid(),
                workers,
                " ".join(str(p.pid) for p in processes),
                metrics_dir,
            )
            status = watch(processes, received, wake_read)
        finally:
            stop_all(processes, config.shutdown_timeout, metrics_dir)
            listener.close()
    finally:
        if lifeline_read >= 0:
            os.close(lifeline_read)
        os.close(lifeline_write)  # a server process still alive now sees its lifeline end
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_read)
        os.close(wake_write)
    logger.info("parent %d: every server process stopped, %s removed", os.getpid(), metrics_dir)
    if received:
        signal.raise_signal(received[0])  # exit as the signal says, as uvicorn does
    return status


def start_server_process(
    index: int, options: ServeOptions, listener_fd: int, lifeline_fd: int, metrics_dir: str
) -> ServerProcess:
    ready_read, ready_write = os.pipe()
    spec = ProcessSpec(
        index=index,
        config_path=None if options.config_path is None else str(options.config_path),
        host=options.host,
        port=options.port,
        log_format=options.log_format,
        log_level=options.log_level,
        access_log=options.access_log,
        listener_fd=listener_fd,
        ready_fd=ready_write,
        lifeline_fd=lifeline_fd,
        metrics_dir=metrics_dir,
    )
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER_PROCESS_CODE, json.dumps(asdict(spec))],
            pass_fds=(listener_fd, ready_write, lifeline_fd),
            env={**os.environ, MULTIPROC_ENV: metrics_dir},
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        os.close(ready_read)
        raise
    finally:
        os.close(ready_write)
    return ServerProcess(index, process, ready_read)


def watch(processes: list[ServerProcess], received: list[int], wake_read: int) -> int:
    """Until a stop signal: note each process's "ready", and stop the service (with its
    exit status) when a process ends on its own."""
    announced = False
    while not received:
        waiting = [p.ready_fd for p in processes if p.ready_fd >= 0]
        readable, _, _ = select.select([wake_read, *waiting], [], [], 5.0)
        if wake_read in readable:
            while True:
                try:
                    if not os.read(wake_read, 512):
                        break
                except BlockingIOError:
                    break
        for process in processes:
            if process.ready_fd in readable:
                process.ready = os.read(process.ready_fd, len(READY)) == READY
                os.close(process.ready_fd)
                process.ready_fd = -1
        for process in processes:
            code = process.process.poll()
            if code is None:
                continue
            if not process.ready:
                logger.error(
                    "server process %d (pid %d) exited (%s) before it was ready: stopping",
                    process.index,
                    process.pid,
                    code,
                )
                return EXIT_CONFIG if code == EXIT_CONFIG else EXIT_START
            logger.error(
                "server process %d (pid %d) exited (%s) while serving: stopping the service",
                process.index,
                process.pid,
                code,
            )
            return EXIT_STOPPED
        if not announced and all(p.ready for p in processes):
            announced = True
            logger.info("all %d server processes are ready", len(processes))
    logger.info("parent %d: %s, stopping", os.getpid(), signal.Signals(received[0]).name)
    return 0


def stop_all(processes: list[ServerProcess], shutdown_timeout: float, metrics_dir: str) -> None:
    """SIGTERM to every process, then wait; SIGKILL to one that overruns (and say so)."""
    from prometheus_client.multiprocess import mark_process_dead

    for process in processes:
        if process.process.poll() is None:
            process.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2 * shutdown_timeout + STOP_MARGIN
    for process in processes:
        try:
            process.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("server process %d (pid %d) overran its stop: SIGKILL", *_ids(process))
            process.process.kill()
            process.process.wait()
        if process.ready_fd >= 0:
            os.close(process.ready_fd)
            process.ready_fd = -1
        mark_process_dead(process.pid, metrics_dir)  # type: ignore[no-untyped-call]


def _ids(process: ServerProcess) -> tuple[int, int]:
    return process.index, process.pid


# -- in a server process ------------------------------------------------------------------


def server_process(spec_json: str) -> int:
    """The body of one server process (run by the parent as ``python -c``)."""
    from ._server import ServeOptions, build_server, load_or_report, logging_config

    fields = json.loads(spec_json)
    spec = ProcessSpec(**fields)
    logging.config.dictConfig(logging_config(spec.log_format, spec.log_level))
    options = ServeOptions(
        config_path=spec.config_path,
        host=spec.host,
        port=spec.port,
        log_format=spec.log_format,
        log_level=spec.log_level,
        access_log=spec.access_log,
    )
    config = load_or_report(spec.config_path)
    if config is None:
        return EXIT_CONFIG
    listener = socket.socket(fileno=spec.listener_fd)

    import uvicorn

    class LifelineServer(uvicorn.Server):
        """Says "ready" to the parent once listening, and stops when it is gone."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)  # a failed lifespan exits here (status 3)
            if self.should_exit:
                return
            asyncio.get_running_loop().add_reader(spec.lifeline_fd, self.parent_gone)
            try:
                os.write(spec.ready_fd, READY)
            except BrokenPipeError:  # the parent died during our start: the lifeline says so
                pass
            finally:
                os.close(spec.ready_fd)

        def parent_gone(self) -> None:
            asyncio.get_running_loop().remove_reader(spec.lifeline_fd)
            if not self.should_exit:
                logger.warning("the parent process is gone: stopping")
                self.should_exit = True

    server = build_server(config, options, spec.metrics_dir, LifelineServer)
    server.run(sockets=[listener])
    return 0 if server.started else EXIT_START
