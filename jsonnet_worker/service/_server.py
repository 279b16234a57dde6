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

Weak spots: a module imported lazily somewhere deep in a dependency after the sandbox is on
fails with PermissionError; the service tests run the real restricted server so such an
import shows up there.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import uvicorn

from .._pool import WorkerPool
from ._app import create_app
from ._config import ConfigError, ServiceConfig, load_config

logger = logging.getLogger("jsonnet_worker.service")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4455
EXIT_CONFIG = 2
EXIT_START = 3


def apply_host_sandbox(pool: WorkerPool, config: ServiceConfig) -> Mapping[str, Any]:
    """The ``restrict_host`` step (issue 6), after the pool has started and before the
    server listens; returns the host sandbox's status for /healthz."""
    return {"applied": False, "reason": "restrict_host is not available in this build"}


def serve(config_path: str | Path | None, host: str, port: int) -> int:
    """Run the service until SIGTERM or SIGINT; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"jsonnet-worker serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logger.info(
        "config %s: %d mappers, %d templates",
        config.path or "(embedded default)",
        len(config.mappers),
        len(config.templates),
    )
    server_config = uvicorn.Config(
        create_app(config, after_start=apply_host_sandbox),
        host=host,
        port=port,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout),
        access_log=False,
        server_header=False,
    )
    server_config.load()  # import what uvicorn would import lazily, before the sandbox
    server = uvicorn.Server(server_config)
    server.run()
    return 0 if server.started else EXIT_START
