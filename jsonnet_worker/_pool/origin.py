"""Where a pool's new workers come from: the one strategy a ``WorkerPool`` is given.

Goals: the pool's constructor carries one private choice of how workers start, not a knob
per test hook; the default (forks of a template, re-exec as the fallback) needs nothing;
tests and benchmarks pick another through ``tests/seams.py``.

Plan: the supervisor asks its origin once, on its own thread (PR_SET_PDEATHSIG ties a
template, and every worker it forks, to the thread that started it), for a fork source;
without one, every worker is a fresh interpreter from ``start``.
"""

from __future__ import annotations

from typing import Protocol

from .forking import WorkerSource
from .processes import WorkerProcess, WorkerSettings
from .tasklimit import TaskLimits


class WorkerOrigin(Protocol):
    """How new workers start (see the module docstring)."""

    def fork_source(
        self, settings: WorkerSettings, tasks: TaskLimits | None = None
    ) -> WorkerSource | None:
        """The source that forks new workers from a template, or None: every worker is
        re-executed by ``start``. ``tasks``: the pool's task cgroups, where the source puts
        each fork server it starts (the supervisor puts the workers)."""
        ...

    def start(self, settings: WorkerSettings) -> WorkerProcess:
        """A new worker started as a fresh interpreter (when there is no fork source)."""
        ...

    @property
    def reason(self) -> str:
        """Why the workers are re-executed, for the ``template`` layer of ``pool.sandbox``."""
        ...


class ReExecWorkers:
    """Every worker a fresh interpreter: ``command`` (a test harness's worker), or the real
    worker's command when None (the path a host without what the template needs takes;
    tests and benchmarks take it to compare)."""

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command

    def fork_source(
        self, settings: WorkerSettings, tasks: TaskLimits | None = None
    ) -> WorkerSource | None:
        return None

    def start(self, settings: WorkerSettings) -> WorkerProcess:
        return WorkerProcess(settings, self.command)

    @property
    def reason(self) -> str:
        return "the pool's own worker command" if self.command is not None else "forking is off"


class ForkedWorkers(ReExecWorkers):
    """New workers are forks of a fork server (the default): the real one, or
    ``fork_server_command`` (a test harness's); the source re-executes a worker itself when
    its fork server cannot fork one."""

    def __init__(self, fork_server_command: list[str] | None = None) -> None:
        super().__init__()
        self.fork_server_command = fork_server_command

    def fork_source(
        self, settings: WorkerSettings, tasks: TaskLimits | None = None
    ) -> WorkerSource | None:
        return WorkerSource(settings, fork_server_command=self.fork_server_command, tasks=tasks)


FORKED = ForkedWorkers()
