"""The first code a worker or fork server runs: the pool starts a fresh interpreter on
``_pool.processes.BOOTSTRAP``, which imports this module (and not the package's ``__init__``,
which holds the pool) and calls :func:`run`.

``sys.argv[1]`` names the mode: ``WORKER_COMMAND`` starts one worker
(``startup.main``), ``FORK_SERVER_COMMAND`` a fork server that forks workers
(``forkserver.main``). Each mode imports only its own modules, here and before any layer
is applied (no module file can be opened afterwards): a worker's start-up is mostly its
imports, and it needs nothing of the fork server (its control channel, ``socket``).
"""

from __future__ import annotations

import os
import sys

from .._wire.modes import FORK_SERVER_COMMAND


def run() -> None:
    """Run the mode ``sys.argv[1]`` names, then exit without interpreter finalisation: the
    engine's runtime threads are still running."""
    if sys.argv[1:2] == [FORK_SERVER_COMMAND]:
        from . import forkserver

        code = forkserver.main(sys.argv[2:])
    else:
        from . import startup

        code = startup.main(sys.argv[2:])
    sys.stderr.flush()
    os._exit(code)
