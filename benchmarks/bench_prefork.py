"""What prefork servers cost with jsonnet-worker: processes, RSS and PSS of the whole tree.

    python -m benchmarks.bench_prefork [--requests 1000] [--only NAME ...] [--source DIR]

Each setup is the README's recipe ("Prefork servers", and "Several server processes" for
``serve --workers``) with 2 server processes on 127.0.0.1: it is started, answers
``--requests`` requests (4 client threads, a claims mapper per request; Celery's children
make the same calls at start, there being no broker to send them through), settles for a
second, and then every process below the server's first process is read: how many,
their RSS and their PSS summed from ``/proc/PID/smaps_rollup`` (PSS shares each page among
the processes mapping it, so the sum is what the tree costs the machine). Each server's
master evaluates once at import where the recipe allows it (gunicorn ``--preload``, Celery),
so a default pool exists before the fork.

``--source DIR`` measures another checkout's library (e.g. one before a change), with the
same apps. Bounded: each setup at most 120 s to start and serve, then SIGTERM (SIGKILL after
30 s). gunicorn and celery must be installed (``pip install gunicorn celery``); a setup
whose server is missing is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servicekit import descendants, free_port

CHECKOUT = Path(__file__).resolve().parent.parent

SERVERS = 2  # server processes in every setup
CPUS = len(os.sched_getaffinity(0))
SIZE = max(1, CPUS // SERVERS)  # the README's advice: size = cpus // server processes
WARM_CALLS = 500  # Celery's children: calls made at start, in place of requests
STEP_SECONDS = 120.0

# The apps, written to a temporary directory, so that --source can point at any checkout.
APPS = f"""
import json, os
import jsonnet_worker

MAPPER = "local c = std.extVar('claims'); {{id: c.sub, email: c.email, n: c.n * 2}}"
SIZE = {SIZE}


def claims(n):
    return {{"sub": f"u{{n}}", "email": f"u{{n}}@example.com", "n": n}}


if os.environ.get("BENCH_MASTER_EVALUATES"):  # an app that evaluates at import
    assert jsonnet_worker.evaluate(MAPPER, {{"claims": claims(0)}})["n"] == 0


def wsgi(environ, start_response):
    n = int(environ.get("QUERY_STRING", "n=0").split("=")[1])
    body = json.dumps(jsonnet_worker.evaluate(MAPPER, {{"claims": claims(n)}})).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


# gunicorn hooks: the README's recipe.
def post_fork(server, worker):
    jsonnet_worker.set_default_pool(jsonnet_worker.WorkerPool(SIZE, spares=0))


def worker_exit(server, worker):
    pool = jsonnet_worker.set_default_pool(None)
    if pool is not None:
        pool.close(timeout=10)


# uvicorn --workers: spawned server processes; the pool lives in the app's lifespan.
async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                jsonnet_worker.set_default_pool(jsonnet_worker.WorkerPool(SIZE, spares=0))
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                pool = jsonnet_worker.set_default_pool(None)
                if pool is not None:
                    pool.close(timeout=10)
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    n = int(scope.get("query_string", b"n=0").decode().split("=")[1])
    value = await jsonnet_worker.aevaluate(MAPPER, {{"claims": claims(n)}})
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]}})
    await send({{"type": "http.response.body", "body": json.dumps(value).encode()}})


# Celery's prefork pool: a pool per child, started on worker_process_init.
try:
    from celery import Celery
    from celery.signals import worker_process_init, worker_process_shutdown
except ImportError:
    celery = None
else:
    celery = Celery("bench_prefork_apps", broker="memory://")

    @worker_process_init.connect
    def start_pool(**_):
        jsonnet_worker.set_default_pool(jsonnet_worker.WorkerPool(SIZE, spares=0))
        for n in range({WARM_CALLS}):
            jsonnet_worker.evaluate(MAPPER, {{"claims": claims(n)}})
        with open(os.path.join(os.environ["BENCH_READY_DIR"], str(os.getpid())), "w"):
            pass

    @worker_process_shutdown.connect
    def close_pool(**_):
        pool = jsonnet_worker.set_default_pool(None)
        if pool is not None:
            pool.close(timeout=10)
"""

# What a fork costs when it terminates an idle default pool first: a settled pool (its spare
# started), then os.fork() timed in the parent; the child exits at once.
FORK_DELAY = """
import os, statistics, sys, time
import jsonnet_worker
delays = []
for _ in range(int(sys.argv[1])):
    jsonnet_worker.evaluate("1")
    time.sleep(1.0)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    delays.append(time.perf_counter() - started)
    os.waitpid(pid, 0)
print(f"{1000 * statistics.median(delays):.1f} {1000 * max(delays):.1f}")
"""

MAPPER_CLAIMS = {"sub": "1", "email": "a@example.com", "email_verified": True}


@dataclass
class Tree:
    processes: int
    rss_mb: float
    pss_mb: float
    each: list[tuple[int, str, float, float]]  # pid, command, RSS MB, PSS MB


@dataclass
class Setup:
    name: str
    command: list[str]
    url: str  # a request; "{n}" is replaced by its number ("" for Celery: no requests)
    needs: str  # the module the server is
    env: dict[str, str]
    body: bytes | None = None  # POST body, if any


def measure(root: int) -> Tree:
    """The tree from ``root`` down: processes, and RSS and PSS summed (smaps_rollup)."""
    each = []
    for pid in [root, *descendants(root)]:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                fields = dict(line.split(":", 1) for line in rollup if ":" in line[:20])
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")[:70]
        except (FileNotFoundError, ProcessLookupError):
            continue
        rss, pss = (int(fields[key].split()[0]) / 1024 for key in ("Rss", "Pss"))
        each.append((pid, command, rss, pss))
    return Tree(len(each), sum(e[2] for e in each), sum(e[3] for e in each), each)


def request(url: str, body: bytes | None) -> None:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    call = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(call, timeout=30) as answer:
        json.loads(answer.read())


def wait_until(ready: Callable[[], bool], server: subprocess.Popen[bytes], deadline: float) -> None:
    while not ready():
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start in time")
        time.sleep(0.1)


def answers(url: str, body: bytes | None) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            request(url, body)
        except OSError:
            return False
        return True

    return ready


def run(setup: Setup, requests: int, ready_dir: Path) -> Tree:
    server = subprocess.Popen(
        setup.command,
        env={**os.environ, **setup.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + STEP_SECONDS
    try:
        if setup.url:
            wait_until(answers(setup.url.format(n=0), setup.body), server, deadline)
            with concurrent.futures.ThreadPoolExecutor(4) as clients:
                calls = [
                    clients.submit(request, setup.url.format(n=n), setup.body)
                    for n in range(requests)
                ]
                for call in calls:
                    call.result(timeout=max(1.0, deadline - time.monotonic()))
        else:
            wait_until(lambda: len(os.listdir(ready_dir)) >= SERVERS, server, deadline)
        time.sleep(1.0)  # let spares and replacements settle
        return measure(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, stderr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            _, stderr = server.communicate()
        if server.returncode not in (0, -signal.SIGTERM):
            print(stderr.decode()[-2000:], file=sys.stderr)


def setups(apps: Path, ready_dir: Path) -> list[Setup]:
    python = sys.executable
    master = {"BENCH_MASTER_EVALUATES": "1"}
    github = json.dumps({"claims": MAPPER_CLAIMS}).encode()

    def gunicorn(name: str, hooks: bool, port: int) -> Setup:
        command = [
            python, "-m", "gunicorn", "--preload", "--workers", str(SERVERS),
            "--bind", f"127.0.0.1:{port}", "--timeout", "60", "apps:wsgi",
        ]  # fmt: skip
        if hooks:
            command[3:3] = ["-c", "python:apps"]
        return Setup(name, command, f"http://127.0.0.1:{port}/?n={{n}}", "gunicorn", master)

    def serve(name: str, workers: int, size: int | None, port: int) -> Setup:
        command = [
            python, "-m", "jsonnet_worker", "serve", "--workers", str(workers),
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "error",
        ]  # fmt: skip
        env = {"JSONNET_WORKER_POOL_SIZE": str(size)} if size else {}
        url = f"http://127.0.0.1:{port}/v1/mappers/github"
        return Setup(name, command, url, "starlette", env, body=github)

    uvicorn_port = free_port()
    uvicorn = [
        python, "-m", "uvicorn", "--workers", str(SERVERS), "--host", "127.0.0.1",
        "--port", str(uvicorn_port), "--no-access-log", "--log-level", "error", "apps:asgi",
    ]  # fmt: skip
    celery = [
        python, "-m", "celery", "-A", "apps:celery", "worker", "--pool", "prefork",
        "--concurrency", str(SERVERS), "--without-heartbeat", "--without-gossip",
        "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip
    return [
        gunicorn("gunicorn --preload, no hooks (default pools)", False, free_port()),
        gunicorn(f"gunicorn --preload, post_fork size={SIZE} spares=0", True, free_port()),
        Setup(
            f"uvicorn --workers {SERVERS}, lifespan size={SIZE} spares=0",
            uvicorn,
            f"http://127.0.0.1:{uvicorn_port}/?n={{n}}",
            "uvicorn",
            {},
        ),
        Setup(
            f"celery prefork -c {SERVERS}, worker_process_init size={SIZE} spares=0",
            celery,
            "",
            "celery",
            {**master, "BENCH_READY_DIR": str(ready_dir)},
        ),
        serve(
            f"serve --workers {SERVERS}, pool.size default ({max(2, CPUS)})", 2, None, free_port()
        ),
        serve(f"serve --workers {SERVERS}, pool.size {SIZE}", 2, SIZE, free_port()),
        serve(f"serve (1 process), pool.size default ({max(2, CPUS)})", 1, None, free_port()),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=[], help="setups whose name has this")
    parser.add_argument("--source", type=Path, default=CHECKOUT, help="the library's checkout")
    parser.add_argument("--detail", action="store_true", help="every process's RSS and PSS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prefork-") as scratch:
        apps = Path(scratch)
        (apps / "apps.py").write_text(APPS)
        ready_dir = apps / "ready"
        ready_dir.mkdir()
        os.environ["PYTHONPATH"] = os.pathsep.join([str(apps), str(args.source.resolve())])
        os.chdir(apps)
        print(f"{CPUS} CPUs, {SERVERS} server processes, size {SIZE}, {args.requests} requests,")
        print(f"library from {args.source.resolve()}")
        print(f"{'setup':62} {'processes':>9} {'RSS MB':>8} {'PSS MB':>8}")
        for setup in setups(apps, ready_dir):
            if args.only and not any(word in setup.name for word in args.only):
                continue
            if importlib.util.find_spec(setup.needs) is None:
                print(f"{setup.name:62} skipped: {setup.needs} is not installed")
                continue
            shutil.rmtree(ready_dir)
            ready_dir.mkdir()
            tree = run(setup, args.requests, ready_dir)
            print(f"{setup.name:62} {tree.processes:>9} {tree.rss_mb:>8.0f} {tree.pss_mb:>8.0f}")
            for pid, command, rss, pss in tree.each if args.detail else []:
                print(f"    {pid:>7} {command:70} {rss:>6.1f} {pss:>6.1f}")
    forks = 5
    result = subprocess.run(
        [sys.executable, "-c", FORK_DELAY, str(forks)],
        capture_output=True,
        text=True,
        timeout=STEP_SECONDS,
        check=True,
    )
    median, worst = result.stdout.split()
    print(
        f"os.fork() after an idle default pool: median {median} ms, max {worst} ms ({forks} forks)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
