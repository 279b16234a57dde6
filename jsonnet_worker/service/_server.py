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
path and status only.

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
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from .. import HostSandbox, WorkerPool, restrict_host
from ._app import create_app
from ._config import ConfigError, ServiceConfig, load_config

logger = logging.getLogger("jsonnet_worker.service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4455
EXIT_CONFIG = 2
EXIT_START = 3


def apply_host_sandbox(pool: WorkerPool, config: ServiceConfig) -> Mapping[str, Any]:
    """The ``restrict_host`` step, after the pool has started and before the server
    listens; returns the host sandbox's status for /healthz.

    Runs on the event loop's thread, the one that serves every request, before any other
    thread exists but the pool's supervisor (``restrict_host`` refuses otherwise). Raises
    (and so the lifespan start-up fails, and the process exits before listening) where
    Landlock is supported but the layer cannot be applied, or the section is invalid.
    """
    config_files = [] if config.path is None else [config.path]
    sandbox = restrict_host(config.raw, config_files=config_files, pool=pool)
    return host_sandbox_json(sandbox)


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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, and the
    exception's text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """The ``logging.config`` dictionary for this process and uvicorn's loggers alike."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    )
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
        "handlers": {"service": handler},
        "root": {"handlers": ["service"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in names},
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


def serve(options: ServeOptions) -> int:
    """Run the service until SIGTERM or SIGINT; returns the exit status."""
    log_config = logging_config(options.log_format, options.log_level)
    logging.config.dictConfig(log_config)
    try:
        config = load_config(options.config_path)
    except ConfigError as exc:
        print(f"jsonnet-worker serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logger.info(
        "config %s: %d mappers, %d templates",
        config.path or "(embedded default)",
        len(config.mappers),
        len(config.templates),
    )
    warn_if_exposed(config, options.host)
    server_config = uvicorn.Config(
        create_app(config, after_start=apply_host_sandbox),
        host=options.host,
        port=options.port,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout),
        timeout_keep_alive=math.ceil(config.keep_alive_timeout),
        access_log=options.access_log,
        log_config=log_config,
        log_level=options.log_level,
        server_header=False,
    )
    server_config.load()  # import what uvicorn would import lazily, before the sandbox
    importlib.import_module("anyio._backends._asyncio")  # imported by anyio on first use
    server = uvicorn.Server(server_config)
    server.run()
    return 0 if server.started else EXIT_START
