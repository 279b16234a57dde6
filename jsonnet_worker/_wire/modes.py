"""The modes a fresh interpreter is started in: its ``sys.argv[1]``, read by
``_worker.bootstrap``, written by the pool's command line (``_pool.command``). Apart from the
messages (``messages``), so that a command can write a worker's command line without
building them."""

from __future__ import annotations

# One worker, or a fork server that forks workers.
WORKER_COMMAND = "_worker"
FORK_SERVER_COMMAND = "_template"
