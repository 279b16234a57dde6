"""``jsonnet-worker doctor``: start a worker per engine, as a pool would, and report every
layer of its sandbox.

Goals: one command that says whether this machine gives workers their sandbox, judged as the
pool, ``/healthz`` and the service's start-up log judge it (``judge_sandbox``), and about the
worker a pool would start: its settings come from ``PoolConfig``'s defaults through the pool
side's ``settings_for``, never built by hand.

Plan: for each engine, ``greet`` starts one worker and reads its hello (or its reason for
failing), ``_print_hello`` prints each layer, and ``template_report`` starts a template and
forks one worker from it, to say whether a pool here forks its workers. The exit status is 1
when any layer is missing or no worker starts; an engine that is not installed fails only
when it was asked for by name.

Weak spots: the report is about a pool with the default options: a pool configured with
another ``worker_user`` (a uid range), memory limit or CPU budget gets its own values.
"""

from __future__ import annotations

import time

from .._config import ENGINES, PoolConfig
from .._errors import Error, WorkerStartError
from .._pool.connection import WorkerConnection, sandbox_status
from .._pool.forking import WorkerSource
from .._pool.launch import await_hello
from .._pool.processes import WorkerProcess, settings_for
from .._report import SandboxStatus, judge_sandbox
from .._wire.layers import LayerState, LayerStatus
from .._wire.messages import WorkerHello
from .._wire.values import replace

EXIT_UNHEALTHY = 1


def greet(config: PoolConfig) -> tuple[WorkerHello | str, float, int]:
    """Start one worker of a pool with ``config``, wait for its hello (or its reason for
    failing, within ``spawn_timeout``), stop it."""
    started = time.monotonic()
    worker = WorkerProcess(settings_for(config))
    try:
        try:
            hello: WorkerHello | str = await_hello(
                worker, WorkerConnection(config.max_output), config.spawn_timeout
            )
        except WorkerStartError as exc:
            hello = str(exc)
        return hello, time.monotonic() - started, worker.pid
    finally:
        worker.close(grace=1.0)


def template_report(config: PoolConfig) -> LayerStatus:
    """Whether a pool with ``config`` forks its workers from a template: start one, fork a
    worker, read its hello. The template's ``LayerStatus`` (missing: re-exec workers, and
    why)."""
    source = WorkerSource(settings_for(config))
    try:
        started = time.monotonic()
        worker = source.spawn()
        try:
            await_hello(worker, WorkerConnection(config.max_output), config.spawn_timeout)
            elapsed = time.monotonic() - started
        finally:
            worker.close(grace=1.0)
        status = source.status()
        if status.active:
            template = source.fork_server
            start = f"template start-up {template.hello.startup_ms:.1f} ms; " if template else ""
            took = f"template start + fork to the hello {elapsed * 1000:.1f} ms"
            status = replace(status, detail=f"{status.detail} ({start}{took})")
        return status
    except (OSError, Error) as exc:
        return LayerStatus("template", LayerState.MISSING, reason=f"{type(exc).__name__}: {exc}")
    finally:
        source.close()


def _greet_safely(config: PoolConfig) -> tuple[WorkerHello | str, float, int]:
    """``greet``, with a machine that cannot start a worker at all (no pidfd, not Linux)
    reported as the reason instead of a traceback."""
    try:
        return greet(config)
    except (OSError, AttributeError, Error) as exc:
        return f"cannot start a worker here: {type(exc).__name__}: {exc}", 0.0, 0


def run_doctor(engine: str) -> int:
    """The command: ``engine`` is one of ``ENGINES`` or ``all``. Each engine's worker gets
    the one verdict (``judge_sandbox``: ok, degraded or unprotected), then the last line
    sums them up: 0 only when every worker started and is ok, else 1."""
    engines = list(ENGINES) if engine == "all" else [engine]
    healthy = True
    unprotected = False
    verdicts: list[str] = []
    for name in engines:
        try:
            config = PoolConfig(engine=name)
        except Error as exc:  # an engine not installed (the cpp extra)
            print(f"engine {name}: not available: {exc}")
            healthy = healthy and engine == "all"
            continue
        hello, elapsed, pid = _greet_safely(config)
        print(f"engine {name}: worker pid {pid}")
        if isinstance(hello, str):
            healthy, unprotected = False, True
            print(f"  FAILED: {hello}")
            continue
        sandbox = _print_hello(hello, elapsed)
        verdict = judge_sandbox(sandbox)
        healthy = verdict.complete and healthy
        unprotected = unprotected or not verdict.enforced
        verdicts.append(f"engine {name}: {verdict.summary()}")
        template = template_report(config)
        if template.active:
            print(f"  {'template:':<16} active: {template.detail}")
        else:  # re-exec workers: slower to start, as isolated
            print(f"  {'template:':<16} MISSING: {template.reason}")
    for line in verdicts:
        print(line)
    if healthy:
        print("sandbox: ok")
    else:
        print(f"sandbox: {'unprotected' if unprotected else 'degraded'} (see above)")
    return 0 if healthy else EXIT_UNHEALTHY


def _print_hello(hello: WorkerHello, elapsed: float) -> SandboxStatus:
    """Print what the worker said of itself and each layer; return its sandbox report."""
    landlock = hello.landlock
    print(f"  engine version:  {hello.engine_version} (Python {hello.python})")
    print(
        f"  worker start:    {elapsed * 1000:.1f} ms to hello "
        f"({hello.startup_ms:.1f} ms inside the worker)"
    )
    if landlock.enforced:
        print(f"  Landlock:        ABI {landlock.abi} enforced (errata {landlock.errata:#x})")
        print(f"  filesystem:      {', '.join(landlock.handled_fs)} (all denied, no rule)")
        print(f"  network:         {', '.join(landlock.handled_net) or 'not handled (ABI < 4)'}")
        print(f"  scopes:          {', '.join(landlock.scoped) or 'none (ABI < 6)'}")
        print(f"  restrict flags:  {', '.join(landlock.restrict_flags) or 'none (ABI < 7)'}")
        if landlock.dropped:
            print(f"  kernel lacks:    {', '.join(landlock.dropped)}")
    else:
        print(f"  Landlock:        NOT ENFORCED: {landlock.reason}")
    print(f"  self-check:      {hello.self_check}")
    sandbox = sandbox_status(hello)
    for layer in sandbox.layers[1:]:
        label = f"{layer.name}:"
        if layer.active:
            print(f"  {label:<16} active: {layer.detail}")
        elif layer.off:
            print(f"  {label:<16} off: {layer.reason}")
        else:
            print(f"  {label:<16} MISSING: {layer.reason}")
    return sandbox
