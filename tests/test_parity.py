"""The library's parity with the CLI and ``_jsonnet`` (issue 23): the output modes, a call's
own ``max_stack``/``max_output``, and the batch calls ``map``/``amap``; on real pools, both
call paths."""

from __future__ import annotations

import asyncio
import importlib
import json
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import jsonnet_worker
from conftest import full, wait_until
from jsonnet_worker import (
    InvalidArgument,
    InvalidType,
    JsonnetError,
    OutputTooLarge,
    TenantOverloaded,
    WorkerPool,
)
from jsonnet_worker._cli import output as cli_output
from jsonnet_worker._pool.connection import MAX_CALL_OUTPUT, ConnectionBroken, WorkerConnection
from jsonnet_worker._wire.framing import encode
from jsonnet_worker._wire.messages import EvalRequest

PATHS = ("blocking", "asyncio")
SMALL_OUTPUT = 1000
DEEP = "local f(n) = if n == 0 then 0 else 1 + f(n - 1); f(100)"
# A call that runs until its (long) timeout: for interrupts and cancellations.
SLOW = "local f(n) = f(n + 1) tailstrict; f(0)"


@pytest.fixture(scope="module")
def small_pool() -> Iterator[WorkerPool]:
    """max_output 1000 bytes, and no caller may wait for a worker (queue_limit 0)."""
    with WorkerPool(2, max_output=SMALL_OUTPUT, queue_limit=0, timeout=30.0) as shared:
        yield shared


def call(pool: WorkerPool, path: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """``pool.<method>`` on the blocking path, or ``pool.a<method>`` on the asyncio one."""
    if path == "blocking":
        return getattr(pool, method)(*args, **kwargs)
    return asyncio.run(getattr(pool, "a" + method)(*args, **kwargs))


# -- output modes ------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_output_modes_give_what_jsonnet_prints(go_pool: WorkerPool, path: str) -> None:
    assert call(go_pool, path, "evaluate_string", '"a\\nb" + std.extVar("x")', {"x": "!"}) == (
        "a\nb!\n"
    )
    assert call(go_pool, path, "evaluate_multi", '{a: {x: [1, 2.5]}, "b/c.txt": "s"}') == {
        "a": '{\n   "x": [\n      1,\n      2.5\n   ]\n}\n',
        "b/c.txt": '"s"\n',
    }
    assert call(go_pool, path, "evaluate_multi", '{a: "x", b: "y"}', string=True) == {
        "a": "x\n",
        "b": "y\n",
    }
    assert call(go_pool, path, "evaluate_stream", "[1, {a: 2}]") == (
        '---\n1\n---\n{\n   "a": 2\n}\n...\n'
    )
    assert call(go_pool, path, "evaluate_stream", "[]") == ""


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("method", "snippet", "kwargs", "message"),
    [
        ("evaluate_string", "1", {}, "expected string result, got: number"),
        ("evaluate_multi", "[]", {}, "multi mode: top-level object was a array"),
        ("evaluate_multi", "{a: 1}", {"string": True}, "key a has a value of type float64"),
        ("evaluate_stream", "{}", {}, "stream mode: top-level object was a object"),
    ],
)
def test_an_output_mode_refuses_a_wrong_type_as_jsonnet_words_it(
    go_pool: WorkerPool, path: str, method: str, snippet: str, kwargs: Any, message: str
) -> None:
    with pytest.raises(JsonnetError, match="RUNTIME ERROR: ") as caught:
        call(go_pool, path, method, snippet, **kwargs)
    assert message in str(caught.value)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/x", "", ".", "a/", "x\x00y"])
def test_multi_refuses_a_name_outside_its_directory(
    go_pool: WorkerPool, path: str, name: str
) -> None:
    snippet = f"{{{json.dumps(name)}: 1, ok: 2}}"
    with pytest.raises(InvalidArgument, match="multi mode: the file name"):
        call(go_pool, path, "evaluate_multi", snippet)
    # The CLI writes each key under its -m directory as go-jsonnet does, names as they are.
    if name == "../x":
        text = go_pool.evaluate_json(snippet)
        assert cli_output.multi(text, "out") == {"out/../x": "1\n", "out/ok": "2\n"}


def test_multi_keeps_a_name_that_stays_inside(go_pool: WorkerPool) -> None:
    files = go_pool.evaluate_multi('{"a/../b": 1, "c/d": 2, "...": 3}')
    assert files == {"a/../b": "1\n", "c/d": "2\n", "...": "3\n"}


def test_the_module_level_output_modes_use_the_default_pool(go_pool: WorkerPool) -> None:
    previous = jsonnet_worker.set_default_pool(go_pool)
    try:
        assert jsonnet_worker.evaluate_string('"s"', max_output=100) == "s\n"
        assert jsonnet_worker.evaluate_multi("{a: 1}", timeout=5.0) == {"a": "1\n"}
        assert jsonnet_worker.evaluate_stream("[std.extVar('x')]", {"x": "y"}) == (
            '---\n"y"\n...\n'
        )
        assert asyncio.run(jsonnet_worker.aevaluate_string('"s"')) == "s\n"
        assert asyncio.run(jsonnet_worker.aevaluate_multi('{a: "b"}', string=True)) == {"a": "b\n"}
        assert asyncio.run(jsonnet_worker.aevaluate_stream("[]")) == ""
        with pytest.raises(JsonnetError, match="max stack frames exceeded"):
            jsonnet_worker.evaluate(DEEP, max_stack=50)
    finally:
        jsonnet_worker.set_default_pool(previous)


# -- a call's own max_stack and max_output -------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_calls_max_stack_governs_it(go_pool: WorkerPool, path: str) -> None:
    assert call(go_pool, path, "evaluate", DEEP) == 100  # the pool's 500 frames suffice
    with pytest.raises(JsonnetError, match="max stack frames exceeded"):
        call(go_pool, path, "evaluate", DEEP, max_stack=50)
    with pytest.raises(JsonnetError, match="max stack frames exceeded"):
        call(go_pool, path, "evaluate_json", DEEP, max_stack=50)
    assert call(go_pool, path, "evaluate", DEEP) == 100  # the next call has the pool's again


@pytest.mark.parametrize("path", PATHS)
def test_a_calls_max_output_governs_the_worker_and_the_parents_cap(
    small_pool: WorkerPool, path: str
) -> None:
    big = 'std.join("", std.makeArray(30, function(i) std.repeat("a", 100)))'  # 3002 bytes
    with pytest.raises(OutputTooLarge):
        call(small_pool, path, "evaluate", big)  # the pool's 1000 bytes
    # Over the pool's max_output: the parent's answer cap follows the call's.
    assert len(call(small_pool, path, "evaluate", big, max_output=5000)) == 3000
    assert len(call(small_pool, path, "evaluate_string", big, max_output=5000)) == 3001
    with pytest.raises(OutputTooLarge):
        call(small_pool, path, "evaluate", '"' + "b" * 200 + '"', max_output=100)
    assert len(call(small_pool, path, "evaluate", big, max_output=MAX_CALL_OUTPUT)) == 3000


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("keyword", "value", "error", "message"),
    [
        ("max_output", 0, InvalidArgument, "this call's max_output must be at least 1, not 0"),
        ("max_stack", -1, InvalidArgument, "this call's max_stack must be at least 1"),
        ("max_stack", True, InvalidType, "this call's max_stack must be an int, not bool"),
        ("max_output", "1", InvalidType, "this call's max_output must be an int, not str"),
        ("max_output", MAX_CALL_OUTPUT + 1, InvalidArgument, "bytes a call may ask for"),
    ],
)
def test_a_calls_limits_are_checked_as_the_pools_are(
    small_pool: WorkerPool, path: str, keyword: str, value: Any, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        call(small_pool, path, "evaluate", "1", **{keyword: value})


def test_a_pool_whose_max_output_is_over_the_call_bound_keeps_it_as_a_ceiling() -> None:
    with WorkerPool(1, max_output=MAX_CALL_OUTPUT + 10, spares=0) as pool:
        assert pool.evaluate("1", max_output=MAX_CALL_OUTPUT + 10) == 1
        with pytest.raises(InvalidArgument, match="bytes a call may ask for"):
            pool.evaluate("1", max_output=MAX_CALL_OUTPUT + 11)


def test_the_connection_caps_an_answer_by_its_requests_max_output() -> None:
    """A worker whose result is over its call's max_output breaks the conversation, though
    it is under the pool's (the connection's default)."""
    connection = WorkerConnection(max_output=1 << 20)
    hello = importlib.import_module("test_connection").HELLO  # the tests' valid hello
    connection.receive_data(encode(dict(hello)))
    connection.next_event()
    connection.send_request(EvalRequest(1, "{}", max_output=100))
    connection.receive_data(encode({"t": "result", "id": 1, "json": json.dumps("x" * 200)}))
    event = connection.next_event()
    assert isinstance(event, ConnectionBroken) and "over max_output 100" in event.reason


# -- map / amap ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_map_returns_results_in_input_order(go_pool: WorkerPool, path: str) -> None:
    inputs = [{"x": i} for i in range(12)]
    assert call(go_pool, path, "map", 'std.extVar("x") * 2', inputs) == [i * 2 for i in range(12)]
    tla = call(go_pool, path, "map", "function(x, y=1) x * y", inputs, inputs_as="tla_vars")
    assert tla == list(range(12))
    assert call(go_pool, path, "map", "1", []) == []


@pytest.mark.parametrize("path", PATHS)
def test_map_raises_the_first_error_or_returns_each_in_place(
    go_pool: WorkerPool, path: str
) -> None:
    snippet = 'if std.extVar("x") == 3 then error "three" else std.extVar("x")'
    inputs = [{"x": i} for i in range(6)]
    results = call(go_pool, path, "map", snippet, inputs, return_exceptions=True)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], JsonnetError) and "three" in str(results[3])
    with pytest.raises(JsonnetError, match="three"):
        call(go_pool, path, "map", snippet, inputs)
    bad = call(go_pool, path, "map", "1", [{"x": 1}, {"x": object()}], return_exceptions=True)
    assert bad[0] == 1 and isinstance(bad[1], InvalidType)


@pytest.mark.parametrize("path", PATHS)
def test_map_keeps_to_what_the_pool_can_serve(small_pool: WorkerPool, path: str) -> None:
    """A pool whose callers may not wait (queue_limit 0): a batch wider than the pool
    would be refused (TenantOverloaded); map keeps to the pool's size."""
    wait_until(lambda: full(small_pool))
    inputs = [{"x": i} for i in range(20)]
    for concurrency in (None, 2, 50):
        results = call(small_pool, path, "map", 'std.extVar("x")', inputs, concurrency=concurrency)
        assert results == list(range(20))
    assert call(small_pool, path, "map", 'std.extVar("x")', inputs, concurrency=1) == list(
        range(20)
    )


def test_without_the_bound_such_a_batch_is_refused(small_pool: WorkerPool) -> None:
    """The check of the test above: three calls at once on that pool are refused."""
    wait_until(lambda: full(small_pool))

    async def three() -> list[Any]:
        return await asyncio.gather(
            *(small_pool.aevaluate(SLOW, timeout=1.0) for _ in range(3)), return_exceptions=True
        )

    results = asyncio.run(three())
    assert any(isinstance(result, TenantOverloaded) for result in results)
    wait_until(lambda: full(small_pool))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"concurrency": 0}, InvalidArgument),
        ({"concurrency": "2"}, InvalidType),
        ({"inputs_as": "vars"}, InvalidArgument),
    ],
)
def test_map_checks_its_options(
    go_pool: WorkerPool, path: str, kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        call(go_pool, path, "map", "1", [{}], **kwargs)


def test_map_from_a_coroutine_is_refused(go_pool: WorkerPool) -> None:
    async def inside() -> None:
        go_pool.map("1", [{}])

    with pytest.raises(InvalidArgument, match=r"await WorkerPool\.amap"):
        asyncio.run(inside())


def _running(pool: WorkerPool, calls: int) -> bool:
    return pool.stats().busy >= calls


def test_an_interrupt_mid_batch_leaves_no_call_running(small_pool: WorkerPool) -> None:
    wait_until(lambda: full(small_pool))
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def interrupt() -> None:
        wait_until(lambda: _running(small_pool, 2))
        assert main is not None
        signal.pthread_kill(main, signal.SIGINT)

    helper = threading.Thread(target=interrupt)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            small_pool.map(SLOW, [{}] * 6, timeout=30.0)
    finally:
        helper.join(30.0)
    assert small_pool.stats().busy == 0  # no call left running
    wait_until(lambda: full(small_pool))  # and no worker lost: both replaced
    assert small_pool.evaluate("1") == 1


def test_a_cancelled_amap_leaves_no_call_running(small_pool: WorkerPool) -> None:
    wait_until(lambda: full(small_pool))

    async def cancel_mid_batch() -> None:
        batch = asyncio.create_task(small_pool.amap(SLOW, [{}] * 6, timeout=30.0))
        for _ in range(1000):  # bounded: until both calls run (or the batch ended)
            if _running(small_pool, 2) or batch.done():
                break
            await asyncio.sleep(0.01)
        assert not batch.done()
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        assert small_pool.stats().busy == 0

    asyncio.run(cancel_mid_batch())
    wait_until(lambda: full(small_pool))
    assert small_pool.evaluate("2") == 2
