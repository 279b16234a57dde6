# The README's gunicorn recipe ("Prefork servers"), as tests/test_prefork.py runs it.
import os

import jsonnet_worker


def post_fork(server, worker):
    size = max(1, (os.cpu_count() or 1) // server.cfg.workers)
    jsonnet_worker.set_default_pool(jsonnet_worker.WorkerPool(size, spares=0))


def worker_exit(server, worker):
    pool = jsonnet_worker.set_default_pool(None)
    if pool is not None:
        pool.close(timeout=10)
