"""std.trace lines: per call, bounded, escaped, never another call's; both engines, both
call paths, the compromised-engine model (tests/harness), and the CLI's printer."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

import seams
from conftest import ENGINES, harness_command, wait_until
from jsonnet_worker import JsonnetError, WorkerPool, set_default_pool
from jsonnet_worker import evaluate as default_evaluate
from jsonnet_worker._pool.processes import StderrCapture
from jsonnet_worker._pool.traces import TraceRequest, lines_of

# A trace, then an error: go-jsonnet evaluates std.trace's second argument first.
TRACED_ERROR = "local t = std.trace('before the error', 1); t + error 'boom'"


def traced(message: str, value: int = 1) -> str:
    return f"std.trace({json.dumps(message)}, {value})"


@pytest.fixture(scope="module", params=ENGINES)
def one_worker(request: pytest.FixtureRequest) -> Iterator[WorkerPool]:
    """One worker, no spare: every call of a test runs on the same process. No interactive
    budget: a C++ call costs about 30 ms of CPU (the engine parses its standard library on
    every evaluation), and on a loaded machine one can pass the 50 ms budget, be demoted and
    have its worker recycled."""
    with WorkerPool(1, spares=0, engine=request.param, timeout=10, interactive_budget=None) as pool:
        yield pool


def collect(pool: WorkerPool, snippet: str, **kwargs: object) -> tuple[object, list[str]]:
    lines: list[str] = []
    value = pool.evaluate(snippet, on_trace=lines.append, **kwargs)  # type: ignore[arg-type]
    return value, lines


# -- per call ------------------------------------------------------------------------------


def test_each_call_gets_its_own_lines_on_one_worker(one_worker: WorkerPool) -> None:
    pid = one_worker.stats().worker_pids
    first = collect(one_worker, f"{traced('first a')} + {traced('first b', 2)}")
    assert first == (3, ["TRACE: snippet.jsonnet:1 first a", "TRACE: snippet.jsonnet:1 first b"])
    assert one_worker.evaluate(traced("nobody asked", 5)) == 5
    second = collect(one_worker, traced("second", 7), filename="other.jsonnet")
    assert second == (7, ["TRACE: other.jsonnet:1 second"])
    assert collect(one_worker, "42") == (42, [])
    assert one_worker.stats().worker_pids == pid  # one process served them all


def test_lines_come_with_an_error_before_it_is_raised(one_worker: WorkerPool) -> None:
    lines: list[str] = []
    with pytest.raises(JsonnetError, match="boom"):
        one_worker.evaluate(TRACED_ERROR, on_trace=lines.append)
    assert lines == ["TRACE: snippet.jsonnet:1 before the error"]
    assert collect(one_worker, "1") == (1, [])


def test_the_asyncio_path_and_submit(one_worker: WorkerPool) -> None:
    async def both() -> tuple[list[str], list[str], str]:
        value: list[str] = []
        text: list[str] = []
        await one_worker.aevaluate(traced("async value"), on_trace=value.append)
        result = await one_worker.aevaluate_json(traced("async json", 3), on_trace=text.append)
        with pytest.raises(JsonnetError):
            await one_worker.aevaluate(TRACED_ERROR, on_trace=text.append)
        return value, text, result

    value, text, result = asyncio.run(both())
    assert value == ["TRACE: snippet.jsonnet:1 async value"]
    assert result == "3\n"
    assert text == [
        "TRACE: snippet.jsonnet:1 async json",
        "TRACE: snippet.jsonnet:1 before the error",
    ]
    submitted: list[str] = []
    assert one_worker.submit(traced("in a thread"), on_trace=submitted.append).result(10) == 1
    assert submitted == ["TRACE: snippet.jsonnet:1 in a thread"]


def test_the_module_level_evaluate() -> None:
    lines: list[str] = []
    with WorkerPool(1, spares=0) as pool:
        previous = set_default_pool(pool)
        try:
            assert default_evaluate(traced("default pool", 4), on_trace=lines.append) == 4
        finally:
            set_default_pool(previous)
    assert lines == ["TRACE: snippet.jsonnet:1 default pool"]


def test_on_trace_must_be_callable(one_worker: WorkerPool) -> None:
    with pytest.raises(TypeError, match="on_trace must be callable"):
        one_worker.evaluate("1", on_trace="print")  # type: ignore[arg-type]


# -- bounds and escaping -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded() -> Iterator[WorkerPool]:
    with WorkerPool(1, spares=0, max_trace_lines=3, max_trace_bytes=200, timeout=10) as pool:
        yield pool


def test_lines_are_bounded_in_count_with_a_marker(bounded: WorkerPool) -> None:
    snippet = "std.foldl(function(a, i) std.trace('line %d' % i, a + i), std.range(1, 10), 0)"
    value, lines = collect(bounded, snippet)
    assert value == 55
    assert lines[:3] == [f"TRACE: snippet.jsonnet:1 line {i}" for i in (1, 2, 3)]
    assert len(lines) == 4
    # the seven lines not kept: each "TRACE: snippet.jsonnet:1 line N\n" (N < 10: 32 bytes)
    assert lines[3] == (
        f"... ({6 * 32 + 33} more bytes of trace output not kept: max_trace_lines=3, "
        "max_trace_bytes=200)"
    )


def test_lines_are_bounded_in_bytes_with_a_marker(bounded: WorkerPool) -> None:
    value, lines = collect(bounded, "std.trace(std.repeat('x', 5000), 2)")
    assert value == 2
    assert lines[0] == "TRACE: snippet.jsonnet:1 " + "x" * (200 - 25)
    assert lines[1].startswith(f"... ({25 + 5000 + 1 - 200} more bytes of trace output not kept")
    assert len(lines) == 2


def test_a_flood_is_drained_during_the_call_and_cut(bounded: WorkerPool) -> None:
    # 4 MB of trace: more than a socket buffer holds, so the call only ends if the pool
    # reads stderr while the call runs.
    snippet = (
        "local s = std.repeat('y', 20000); "
        "std.foldl(function(a, i) std.trace(s, a + 1), std.range(1, 200), 0)"
    )
    value, lines = collect(bounded, snippet)
    assert value == 200
    assert len(lines) == 2 and "more bytes of trace output not kept" in lines[1]


def test_control_characters_are_escaped_tabs_kept(one_worker: WorkerPool) -> None:
    snippet = traced("\x1b[2J\x1b]0;title\x07 a\tb\rc\u202e")
    _, lines = collect(one_worker, snippet)
    assert lines == ["TRACE: snippet.jsonnet:1 \\x1b[2J\\x1b]0;title\\x07 a\tb\\x0dc\\u202e"]


def test_a_message_with_newlines_is_several_lines(one_worker: WorkerPool) -> None:
    _, lines = collect(one_worker, traced("one\ntwo\n"))
    assert lines == ["TRACE: snippet.jsonnet:1 one", "two", ""]


def test_lines_of_cuts_inside_a_character_and_counts_the_tail() -> None:
    capture = StderrCapture()
    capture.mark(8)  # the head never keeps fewer than STDERR_HEAD bytes
    capture.add("é".encode() * 5000 + b"\n")
    request = TraceRequest(print, max_lines=10, max_bytes=5)
    lines = lines_of(capture, request)
    assert lines[0] == "éé\ufffd"
    assert lines[1].startswith(f"... ({10001 - 5} more bytes")
    assert lines_of(StderrCapture(), request) == ()


# -- the same lines as go-jsonnet ----------------------------------------------------------

PRINTED = "local a = std.trace('alpha', 1);\nlocal b = std.trace('beta\\tgamma', 2);\na + b"


def stderr_of(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=True,
    )
    return result.stderr


def test_the_cli_printer_prints_what_go_jsonnet_prints() -> None:
    ours = stderr_of(
        textwrap.dedent(f"""
        from jsonnet_worker import WorkerPool
        from jsonnet_worker._cli.traces import print_trace
        with WorkerPool(1, spares=0) as pool:
            pool.evaluate_json({PRINTED!r}, filename="<cmdline>", on_trace=print_trace)
        """)
    )
    theirs = stderr_of(f"import _gojsonnet; _gojsonnet.evaluate_snippet('<cmdline>', {PRINTED!r})")
    assert theirs == "TRACE: <cmdline>:1 alpha\nTRACE: <cmdline>:2 beta\tgamma\n"
    assert ours.endswith(theirs)  # after the pool's own start-up log, if any
    assert "TRACE" not in ours[: -len(theirs)]


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_traces_as_its_binding_does(engine: str) -> None:
    module = "_gojsonnet" if engine == "go" else "_jsonnet"
    theirs = stderr_of(f"import {module}; {module}.evaluate_snippet('m.jsonnet', {PRINTED!r})")
    with WorkerPool(1, spares=0, engine=engine, timeout=10) as pool:
        lines: list[str] = []
        for _ in range(3):  # the go engine's first call is direct, then through its cache
            lines.clear()
            pool.evaluate(PRINTED, filename="m.jsonnet", on_trace=lines.append)
            assert "".join(f"{line}\n" for line in lines) == theirs


# -- a compromised worker (tests/harness: a snippet is Python run in the worker) -----------


@pytest.fixture
def python_pool() -> Iterator[WorkerPool]:
    with seams.pool_of(seams.re_exec(harness_command("python")), 1, spares=0, timeout=10) as pool:
        yield pool


def stderr_waiting(pool: WorkerPool) -> bool:
    """Whether the idle worker's stderr holds bytes nobody has read."""
    (worker,) = seams.workers(pool, "idle")
    return bool(select.select([worker.process.stderr_fd], [], [], 0)[0])


def test_a_worker_that_writes_after_its_answer_reaches_nobody(python_pool: WorkerPool) -> None:
    late = (
        "import os, threading, time\n"
        "def later():\n"
        "    time.sleep(0.2)\n"
        "    os.write(2, b'TRACE: snippet.jsonnet:1 leaked from call 1\\n')\n"
        "threading.Thread(target=later).start()\n"
        "os.write(2, b'TRACE: snippet.jsonnet:1 in call 1\\n')\n"
        "result = 1\n"
    )
    (before,) = python_pool.stats().worker_pids
    first: list[str] = []
    assert python_pool.evaluate(late, on_trace=first.append) == 1
    assert first == ["TRACE: snippet.jsonnet:1 in call 1"]
    wait_until(lambda: stderr_waiting(python_pool))
    second: list[str] = []
    assert python_pool.evaluate("result = 2", on_trace=second.append) == 2
    assert second == []
    # The worker that wrote while idle was discarded at the check-out, not given the call.
    assert before not in python_pool.stats().worker_pids
    assert python_pool.stats().respawns >= 1


def test_a_worker_that_writes_while_idle_is_discarded(python_pool: WorkerPool) -> None:
    # Early: bytes waiting on its stderr before the next request, as if for the next call.
    early = (
        "import os, threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), os.write(2, b'TRACE: x:1 early\\n')))"
        ".start()\n"
        "result = 1\n"
    )
    (before,) = python_pool.stats().worker_pids
    assert python_pool.evaluate(early) == 1
    wait_until(lambda: stderr_waiting(python_pool))
    lines: list[str] = []
    assert python_pool.evaluate("result = 2", on_trace=lines.append) == 2
    assert lines == []
    assert before not in python_pool.stats().worker_pids


def test_garbage_on_stderr_is_bounded_and_escaped(python_pool: WorkerPool) -> None:
    garbage = (
        "import os\n"
        "os.write(2, b'\\xff\\xfe\\x1b[31m\\x00 not utf-8\\n')\n"
        "os.write(2, b'z' * 3_000_000)\n"
        "result = 3\n"
    )
    lines: list[str] = []
    assert python_pool.evaluate(garbage, on_trace=lines.append) == 3
    assert lines[0] == "\ufffd\ufffd\\x1b[31m\\x00 not utf-8"
    assert lines[1] == "z" * (64 * 1024 - len(b"\xff\xfe\x1b[31m\x00 not utf-8\n"))
    assert lines[2].startswith("... (")
    assert len(lines) == 3


def test_jsonnet_worker_eval_prints_traces_as_jsonnet_does() -> None:
    snippet = "local a = std.trace('alpha', 1);\nlocal b = std.trace('beta', 2);\na + b + error 'x'"
    done = subprocess.run(
        [sys.executable, "-m", "jsonnet_worker", "eval", "-e", snippet],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    theirs = stderr_of(
        f"import _gojsonnet\ntry: _gojsonnet.evaluate_snippet('<cmdline>', {snippet!r})\n"
        "except RuntimeError as e: import sys; sys.stderr.write(str(e) + '\\n')"
    )
    assert theirs.startswith("TRACE: <cmdline>:1 alpha\nTRACE: <cmdline>:2 beta\nRUNTIME ERROR: x")
    assert done.returncode == 1
    assert done.stderr.endswith(theirs)
