"""``jsonnet-worker serve``: load the config, start the pool, restrict the host, listen.

Goals: the start order that makes the host sandbox worth having. Everything the process will
ever need to open is opened first (the config, every mapper and template, every module the
server imports lazily), then the pool starts, then ``restrict_host`` closes the filesystem,
and only then does the server listen. A failure at any step exits non-zero before a single
request is accepted.

Plan: ``uvicorn.Config.load()`` imports the protocol, loop and lifespan modules up front;
the app's lifespan starts the pool and calls :func:`apply_host_sandbox` (``after_start``);
uvicorn binds its socket after the lifespan's start-up, so the listener opens last. SIGTERM
(uvicorn's handler): stop accepting, let requests in flight finish (at most
``serve.shutdown_timeout``), then the lifespan's end closes the pool, which reaps every worker.

Logging: ``--log-format text`` (timestamp, level, logger, message) or ``json`` (one object a
line with ``time``, ``level``, ``logger``, ``message``), one configuration for this process
and uvicorn's loggers, the access log included (``--no-access-log`` turns it off). Nothing
a request carries (snippets, variables, tokens) is logged; the access log has the method,
path and status only, and, as every record a request causes (the pool's about its call
too), the request's id (``request_id``: a JSON field, or `` request_id=...`` at the end of a
text line; ``_requests.py``).

``--workers N`` (``serve.workers``): ``_multiprocess.py``'s parent process runs N server
processes, each built here (``build_server``) with its own pool and host sandbox and the
shared metrics directory as its one read-write grant.

Weak spots: a module imported lazily somewhere deep in a dependency after the sandbox is on
fails with PermissionError; the service tests run the real restricted server so such an
import shows up there.
"""

from __future__ import annotations

import importlib
import json
import logging
import logging.config
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from .. import HostSandbox, HostSandboxError, WorkerPool, kratos_allow_list, restrict_host
from ._app import create_app
from ._config import ConfigError, ServiceConfig, load_config

logger = logging.getLogger("jsonnet_worker.service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4455
EXIT_CONFIG = 2
EXIT_START = 3


def apply_host_sandbox(
    pool: WorkerPool, config: ServiceConfig, private_dirs: Sequence[str] = ()
) -> Mapping[str, Any]:
    """The ``restrict_host`` step, after the pool has started and before the server
    listens, with what the config names (``kratos_allow_list``); returns the host
    sandbox's status for /healthz.

    Runs on the event loop's thread, the one that serves every request, before any other
    thread exists but the pool's supervisor (``restrict_host`` refuses otherwise). Raises
    (and so the lifespan start-up fails, and the process exits before listening) where
    Landlock is supported but the layer cannot be applied, or the section is invalid.
    ``private_dirs``: the multiprocess metrics directory of ``serve --workers N``, the one
    path this process may write (``restrict_host``'s ``private_dirs``).
    """
    config_files = [] if config.path is None else [config.path]
    allow = kratos_allow_list(config.raw, config_files)
    sandbox = restrict_host(allow, pool=pool, private_dirs=private_dirs)
    status = host_sandbox_json(sandbox)
    if private_dirs and sandbox.enforced:
        status["outside_private_dirs"] = [probe_outside(sandbox, path) for path in private_dirs]
    return status


def probe_outside(sandbox: HostSandbox, private_dir: str) -> dict[str, Any]:
    """Try to list the directory above a read-write grant, once the layer is on: refused
    unless another grant covers it. Anything else means the layer allows more than it
    says, and the process does not serve (HostSandboxError)."""
    above = os.path.dirname(private_dir)
    try:
        os.listdir(above)
        refused = False
    except PermissionError:
        refused = True
    granted = [*sandbox.ro_paths, *sandbox.rw_dirs]
    covered = any(above == path or above.startswith(path.rstrip("/") + "/") for path in granted)
    if not refused and not covered:
        raise HostSandboxError(
            f"the host's Landlock layer lets this process list {above}, above its "
            f"read-write grant {private_dir}, which no grant covers"
        )
    return {"path": above, "refused": refused}


def host_sandbox_json(sandbox: HostSandbox) -> dict[str, Any]:
    """What /healthz says about the host layer: its state and how much it allows (counts,
    not paths: the health endpoint need not map the host's filesystem for anyone)."""
    return {
        "applied": sandbox.enforced,
        "disabled": sandbox.disabled,
        "reason": sandbox.reason,
        "summary": sandbox.status.summary(),
        "allowed": {
            "ro_paths": len(sandbox.ro_paths),
            "rw_dirs": len(sandbox.rw_dirs),
            "exec_paths": len(sandbox.exec_paths),
            "listed_dirs": len(sandbox.listed_dirs),
        },
        "skipped": len(sandbox.skipped),
    }


@dataclass(frozen=True)
class ServeOptions:
    """``jsonnet-worker serve``'s flags."""

    config_path: str | Path | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    log_format: str = "text"  # or "json": one object per line
    log_level: str = "info"
    access_log: bool = True
    workers: int | None = None  # server processes; None: the config's serve.workers (1)


# What every LogRecord has: anything else on a record came from its ``extra``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",  # 3.12+
}


# Attributes written by the formatter itself, or not at all.
_HANDLED = frozenset({"time", "level", "logger", "message", "request_id", "exception"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, the
    request's id on a record a request caused (``_requests.py``), every field the record's
    ``extra`` gave (the pool's ``worker_pid``, ``tenant``, ``backoff_seconds``, ...; a value
    JSON cannot hold is written as its ``str``), and the exception's text when there is
    one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            # (request_id is above: the request filter sets it to None outside a request)
            if key not in _RECORD_ATTRIBUTES and key not in _HANDLED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, then `` request_id=...`` on a record a request caused."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)  # the exception's text follows, if any
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} request_id={request_id}"


# The last line of a traceback that names one of our errors: its class and its message.
_OUR_ERROR = re.compile(r"^jsonnet_worker\.[\w.]*?(\w+): (.*)$", re.MULTILINE)


class StartupFailureLine(logging.Filter):
    """uvicorn logs a failed start-up (the app's lifespan raised: a mapper that does not
    check, a pool option the host refuses) as the whole traceback Starlette formatted. When
    the error is one of ours, its one line says it all: ``start-up failed: <kind>: <what>``
    (the class name and the first line of the message), not ten lines of frames."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Traceback (most recent call last)"):
            return True
        found = list(_OUR_ERROR.finditer(message))
        if found:
            name, text = found[-1].groups()
            record.msg, record.args = "start-up failed: %s: %s", (name, text)
            record.exc_info = record.exc_text = None
        return True


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """The ``logging.config`` dictionary for this process and uvicorn's loggers alike."""
    formatter: dict[str, Any] = {"()": JsonFormatter if log_format == "json" else TextFormatter}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "service",
        "stream": "ext://sys.stderr",
    }
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": formatter},
        "filters": {"startup": {"()": StartupFailureLine}},
        "handlers": {"service": handler},
        "root": {"handlers": ["service"], "level": level.upper()},
        "loggers": {
            name: {
                "handlers": [],
                "propagate": True,
                "filters": ["startup"] if name == "uvicorn.error" else [],
            }
            for name in names
        },
    }


def warn_if_exposed(config: ServiceConfig, host: str) -> None:
    """A WARNING when anyone who reaches the port can run ad-hoc snippets."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if not loopback and config.evaluate_enabled and config.bearer_token is None:
        logger.warning(
            "listening on %s with ad-hoc evaluation (/v1/evaluate) on and no bearer token: "
            "anyone who reaches the port can run snippets; set serve.auth.bearer_token_file "
            "or serve.evaluate.enabled: false",
            host,
        )


def load_or_report(path: str | Path | None) -> ServiceConfig | None:
    """The config (``JSONNET_WORKER_*`` overrides applied), or None once its error is on
    stderr in one line (the file, the line, the key)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"jsonnet-worker serve: {exc}", file=sys.stderr)
        return None


def counts(config: ServiceConfig) -> str:
    """ "2 mappers, 1 templates", and the library sets when there are any."""
    text = f"{len(config.mappers)} mappers, {len(config.templates)} templates"
    if config.libraries:
        files = sum(len(named.library.files) for named in config.libraries.values())
        text += f", {len(config.libraries)} library sets of {files} files"
    return text


def check_config(path: str) -> int:
    """``serve --check-config FILE``: load FILE as ``serve`` would (the environment's
    overrides, every snippet and token file read; no pool started, so a snippet's syntax is
    not checked); one line on stdout and 0, or the error on stderr and EXIT_CONFIG."""
    config = load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    print(f"{path}: OK ({counts(config)})")
    return 0


def serve(options: ServeOptions) -> int:
    """Run the service until SIGTERM or SIGINT; returns the exit status."""
    log_config = logging_config(options.log_format, options.log_level)
    logging.config.dictConfig(log_config)
    config = load_or_report(options.config_path)
    if config is None:
        return EXIT_CONFIG
    workers = config.workers if options.workers is None else options.workers
    if workers < 1:
        print("jsonnet-worker serve: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    logger.info("config %s: %s", config.path or "(embedded default)", counts(config))
    warn_if_exposed(config, options.host)
    if workers > 1:
        # imports nothing of the app's at the top
        from ._multiprocess import run_server_processes

        return run_server_processes(options, config, workers)
    server = build_server(config, options)
    server.run()
    return 0 if server.started else EXIT_START


def build_server(
    config: ServiceConfig,
    options: ServeOptions,
    metrics_dir: str | None = None,
    server_class: Callable[[uvicorn.Config], uvicorn.Server] = uvicorn.Server,
) -> uvicorn.Server:
    """The uvicorn server of one process: the app, restricted after its pool starts, with
    every module uvicorn and anyio import lazily imported now, before the sandbox.
    ``metrics_dir``: shared multiprocess metrics (a server process of ``--workers N``)."""
    private_dirs = () if metrics_dir is None else (metrics_dir,)

    def after_start(pool: WorkerPool, started: ServiceConfig) -> Mapping[str, Any]:
        return apply_host_sandbox(pool, started, private_dirs)

    server_config = uvicorn.Config(
        create_app(config, after_start=after_start, metrics_dir=metrics_dir),
        host=options.host,
        port=options.port,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout),
        timeout_keep_alive=math.ceil(config.keep_alive_timeout),
        access_log=options.access_log,
        log_config=logging_config(options.log_format, options.log_level),
        log_level=options.log_level,
        server_header=False,
    )
    server_config.load()  # import what uvicorn would import lazily, before the sandbox
    importlib.import_module("anyio._backends._asyncio")  # imported by anyio on first use
    return server_class(server_config)
