"""Actions ``check`` and ``fmt`` and ``max_trace``, through real sandboxed workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import ENGINES
from jsonnet_worker._wire.messages import EngineKind, Operation
from rawworker import ENGINE_APIS, RawWorker, api_worker

WORKERS = [api for api in ENGINE_APIS if ENGINE_APIS[api][0] in ENGINES]

# Each of these would fail, loop or print if evaluated; a check must not evaluate.
NEVER_EVALUATED = [
    "error 'evaluated'",
    "local f(x) = f(x) tailstrict; f(0)",
    "std.trace('evaluated', 1)",
    "assert false : 'evaluated'; {}",
    "function(x) error 'evaluated'",
    "local big = std.makeArray(1e9, function(i) i); big[0]",
]
STATIC_ERRORS = [
    "{a: ",
    "local x = y; x",
    "{a: 1, a: 2}",
    "[1, 2",
    "'unterminated",
    "|||\n  text",
    "$.a",
    "function(x) z",
    "{a: 1}\n\n  // comment\n  + b",
]


@pytest.fixture(scope="module", params=sorted(WORKERS))
def worker(request: pytest.FixtureRequest) -> Iterator[RawWorker]:
    with api_worker(request.param) as raw:
        yield raw


def _ask(worker: RawWorker, snippet: str, action: str, **fields: Any) -> dict[str, Any]:
    return worker.request(snippet, operation=Operation(action), **fields)


def test_hello_says_which_api(worker: RawWorker, request: pytest.FixtureRequest) -> None:
    api = worker.hello.engine_api
    if request.node.callspec.params["worker"] == "go-capi":
        assert api == "capi"
    else:
        assert api.startswith("binding: ") and len(api) > len("binding: ")


@pytest.mark.parametrize("snippet", NEVER_EVALUATED)
def test_check_passes_without_evaluating(worker: RawWorker, snippet: str) -> None:
    answer = _ask(worker, snippet, "check")
    assert answer["t"] == "result", answer
    assert answer["json"] == "null"


@pytest.mark.parametrize("snippet", STATIC_ERRORS)
def test_check_reports_the_static_error_evaluation_reports(worker: RawWorker, snippet: str) -> None:
    evaluated = _ask(worker, snippet, "eval", filename="dir/mapper.jsonnet")
    checked = _ask(worker, snippet, "check", filename="dir/mapper.jsonnet")
    assert evaluated["t"] == checked["t"] == "error"
    assert checked["kind"] == evaluated["kind"] == "jsonnet"
    assert checked["message"] == evaluated["message"]
    assert "dir/mapper.jsonnet:" in checked["message"]


def test_check_with_a_filename_like_the_probe(worker: RawWorker) -> None:
    for filename in ("check", "RUNTIME ERROR: max stack frames exceeded."):
        evaluated = _ask(worker, "{a: ", "eval", filename=filename)
        checked = _ask(worker, "{a: ", "check", filename=filename)
        assert checked["t"] == "error" and checked["message"] == evaluated["message"]
        assert _ask(worker, "{a: 1}", "check", filename=filename)["json"] == "null"


def test_check_refuses_nul_like_eval(worker: RawWorker) -> None:
    checked = _ask(worker, "{a: 1}\0", "check")
    assert checked["t"] == "error"
    assert checked["message"] == _ask(worker, "{a: 1}\0", "eval")["message"]


def test_fmt(worker: RawWorker) -> None:
    answer = _ask(worker, "{b:2,   a :1, c: [1,2  ,3] }", "fmt")
    if worker.hello.engine_api != "capi":
        assert answer["t"] == "error" and answer["kind"] == "jsonnet"
        assert "action 'fmt' is not available" in answer["message"]
        return
    assert answer["t"] == "result", answer
    assert json.loads(answer["json"]) == "{ b: 2, a: 1, c: [1, 2, 3] }\n"
    # jsonnetfmt's defaults: two-space indent, single quotes, comments kept.
    source = 'local x = "s";  // why\n{\n        a: x,\n}\n'
    formatted = json.loads(_ask(worker, source, "fmt")["json"])
    assert formatted == "local x = 's';  // why\n{\n  a: x,\n}\n"
    error = _ask(worker, "{a: ", "fmt", filename="f.jsonnet")
    assert error["t"] == "error" and error["message"].startswith("f.jsonnet:1:5")
    too_big = _ask(worker, "[" + "1," * 1000 + "]", "fmt", max_output=100)
    assert too_big["t"] == "error" and too_big["kind"] == "output_too_large"


@pytest.mark.parametrize("max_trace", [0, 1, 2, 3, 6, 20])
def test_max_trace_cuts_the_trace_as_the_binding_does(worker: RawWorker, max_trace: int) -> None:
    snippet = "local f(n) = if n == 0 then error 'bottom' else f(n - 1) + 1; f(30)"
    engine = pytest.importorskip("_gojsonnet" if worker.engine == "go" else "_jsonnet")
    try:
        engine.evaluate_snippet("test.jsonnet", snippet, max_trace=max_trace)
    except RuntimeError as exc:
        expected = str(exc)
    for _ in range(3):  # the C API path: direct, then through its cached VM
        answer = _ask(worker, snippet, "eval", max_trace=max_trace)
        assert answer["t"] == "error" and answer["message"] == expected
    frames = expected.count("\n\t")
    if max_trace:
        assert frames <= max_trace + 1  # the "..." line
    else:
        assert frames > 30


def test_without_the_c_api_the_binding_is_used_and_the_hello_says_why() -> None:
    """The fallback, in-process: an extension without the symbols (libc stands in for an
    old gojsonnet) or not loaded at all gives the binding path and a reason."""
    import types

    from jsonnet_worker._wire.messages import EvalRequest, Operation
    from jsonnet_worker._worker import capi, engines

    with pytest.raises(capi.CapiUnavailable, match="symbols are missing: jsonnet_make"):
        capi.bind("libc.so.6")
    with pytest.raises(capi.CapiUnavailable, match="not loaded"):
        capi.bind("/nonexistent/_gojsonnet.so")
    gojsonnet = pytest.importorskip("_gojsonnet")
    old = types.ModuleType("_gojsonnet")
    old.__file__ = "libc.so.6"
    old.evaluate_snippet = gojsonnet.evaluate_snippet  # type: ignore[attr-defined]
    engine = engines.Engine(EngineKind.GO, old)
    assert engine.api.startswith("binding: the C API symbols are missing: jsonnet_make")
    assert engine.run(EvalRequest(id=1, snippet="{a: 1 + 1}")) == '{\n   "a": 2\n}\n'
    with pytest.raises(engines.EvaluationFailed, match="action 'fmt' is not available"):
        engine.run(EvalRequest(id=2, snippet="{a: 1}", operation=Operation.FMT))
    assert engines.Engine(EngineKind.GO, gojsonnet).api == "capi"
