"""A real prefork server: ``gunicorn --preload`` with 3 workers, the app evaluating at import
in the master. Every request gets its own answer, served by the worker processes' own
default pools; a pool created before the fork raises ForkedPool there. 127.0.0.1 only."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
REQUESTS = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=30) as answer:
        body: dict[str, object] = json.loads(answer.read())
        return body


def test_gunicorn_preload_with_three_workers() -> None:
    pytest.importorskip("gunicorn")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "--preload", "--workers", "3",
            "--bind", f"127.0.0.1:{port}", "--chdir", str(TESTS), "--timeout", "60",
            "prefork_app:app",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{base}/?n=0")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)

        def one(n: int) -> int:
            body = get(f"{base}/?n={n}")
            assert body["value"] == {"id": f"u{n}", "n": 2 * n}, (n, body)
            return int(str(body["pid"]))

        with concurrent.futures.ThreadPoolExecutor(8) as executor:
            served_by = set(executor.map(one, range(REQUESTS)))
        assert server.pid not in served_by and len(served_by) >= 2
        assert get(f"{base}/explicit") == {"error": "forked_pool"}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, stderr = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    assert server.returncode == 0, stderr.decode()[-3000:]
    assert b"Traceback" not in stderr, stderr.decode()[-3000:]
