"""Differential test: the C API path, the binding path and in-process ``_gojsonnet`` agree.

Two real, sandboxed go workers (one on go-jsonnet's C API with its parsed-snippet cache, one
started with ``--engine-api binding``) and the in-process binding evaluate the same
hypothesis-generated snippets and variables: results, static and runtime errors, top-level
functions, NUL characters, stacks near ``max_stack``, traces cut by ``max_trace``, refused
imports. Each snippet goes to the C API worker three times (the first call is evaluated
directly, the next ones through its cached VM) and every answer must be the same bytes.

The one accepted difference is a bug of the binding, not of the C API path: its C glue reads
an import callback's error text without a NUL terminator, so bytes of garbage follow the
refusal message (the worker cuts them at the line's end); when they are not UTF-8, or end
the message early, the binding loses it, and the binding path's barrier reports the refusal
it made instead, without the engine's trace (``_ImportBarrier.message``).
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jsonnet_worker._pool.processes import WorkerSettings, worker_command
from jsonnet_worker._wire.messages import escape_controls
from rawworker import RawWorker

gojsonnet = pytest.importorskip("_gojsonnet")

REFUSED = "import not available"
FILENAMES = ("snippet.jsonnet", "mapper.jsonnet", "a/b.jsonnet")


@pytest.fixture(scope="module")
def workers() -> Any:
    settings_ = WorkerSettings("go", 1 << 30, 64 << 20)
    with (
        RawWorker("go") as capi,
        RawWorker("go", command=[*worker_command(settings_), "--engine-api", "binding"]) as binding,
    ):
        if capi.hello.engine_api != "capi":
            pytest.skip(f"no C API here: {capi.hello.engine_api}")
        assert binding.hello.engine_api.startswith("binding: ")
        yield capi, binding


# -- snippets -------------------------------------------------------------------------------

names = st.sampled_from(["a", "b", "claims", "x y", "é"])
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


def _string_literal(value: str) -> str:
    return json.dumps(value)


atoms = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    text.map(_string_literal),
    st.sampled_from(["true", "false", "null", "[]", "{}", "std.thisFile", "$"]),
    names.map(lambda n: f"std.extVar({_string_literal(n)})"),
    st.sampled_from(
        ["import 'x.jsonnet'", "importstr 'snippet.jsonnet'", "importbin '/etc/passwd'"]
    ),
    text.map(lambda t: f"error {_string_literal(t)}"),
    st.sampled_from(["nope", "std.nope", "1/0", "'a' + {}", "[1][3]", "{}.f"]),
)


def _compose(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, children).map(lambda p: f"[{p[0]}, {p[1]}]"),
        st.tuples(names, children).map(lambda p: f"{{{_string_literal(p[0])}: {p[1]}}}"),
        st.tuples(children, children).map(lambda p: f"({p[0]}) + ({p[1]})"),
        st.tuples(children, children).map(lambda p: f"if {p[0]} == null then {p[1]} else 1"),
        st.tuples(children, children).map(lambda p: f"local v = {p[0]}; [v, {p[1]}]"),
        st.tuples(children, children).map(lambda p: f"assert {p[0]} != 1 : {p[1]}; 2"),
        children.map(lambda c: f"{{f: {c}, g: self.f}}"),
        children.map(lambda c: f"std.length(std.toString({c}))"),
    )


expressions = st.recursive(atoms, _compose, max_leaves=6)


def _recursion(depth: int, where: str, ending: str) -> str:
    body = f"local f(n) = if n <= 0 then {ending} else f(n - 1) + 1; f({depth})"
    return f"{{r: {body}}}" if where == "field" else body


recursions = st.builds(
    _recursion,
    st.integers(0, 40),
    st.sampled_from(["top", "field"]),
    st.sampled_from(["0", "error 'bottom'"]),
)
functions = st.tuples(expressions, expressions).map(
    lambda p: f"function(a, b={p[1]}) [a, b, {p[0]}]"
)


def _mangle(source: str, cut: int, junk: str) -> str:
    """A syntax or lexing error: the source cut short, or with junk in the middle."""
    point = cut % (len(source) + 1)
    return source[:point] + junk + source[point:]


broken = st.builds(
    _mangle, expressions, st.integers(0, 200), st.sampled_from(["", "{", ")", "|||", "'", "\0"])
)
snippets = st.one_of(expressions, expressions, recursions, functions, broken)

variables = st.dictionaries(names, st.one_of(text, st.just("with\0nul")), max_size=2)
codes = st.dictionaries(names, st.one_of(expressions, st.sampled_from(["{", "1 +"])), max_size=2)
# go-jsonnet names the first unknown top-level argument in Go's random map order: at most one
# name the generated functions lack keeps its messages deterministic.
tla_names = st.sampled_from(["a", "b", "claims"])
tla_variables = st.dictionaries(tla_names, st.one_of(text, st.just("with\0nul")), max_size=2)
tla_codes = st.dictionaries(tla_names, st.one_of(expressions, st.just("{")), max_size=2)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "snippet": draw(snippets),
        "filename": draw(st.sampled_from(FILENAMES)),
        "ext_vars": draw(variables),
        "ext_codes": draw(codes),
        "tla_vars": draw(tla_variables),
        "tla_codes": draw(tla_codes),
        "max_stack": draw(st.sampled_from([5, 12, 30, 500])),
        "max_trace": draw(st.sampled_from([0, 1, 2, 3, 4, 7, 20])),
    }


# -- the three evaluators -------------------------------------------------------------------


def in_process(request: dict[str, Any]) -> tuple[str, str] | None:
    """In-process ``_gojsonnet`` with the worker's NUL rules; None where its garbage bug
    makes the answer unknowable."""
    texts = [request["snippet"], request["filename"]]
    texts += [*request["ext_codes"].values(), *request["tla_codes"].values()]
    if any("\0" in t for t in texts):
        return None  # the worker refuses these itself; compared between the two workers
    ext_vars, ext_codes = dict(request["ext_vars"]), dict(request["ext_codes"])
    tla_vars, tla_codes = dict(request["tla_vars"]), dict(request["tla_codes"])
    for plain, coded in ((ext_vars, ext_codes), (tla_vars, tla_codes)):
        for key in [k for k, v in plain.items() if "\0" in v]:
            if key in coded:
                return None
            coded[key] = json.dumps(plain.pop(key))
    refused: list[str] = []

    def refuse(base: str, rel: str) -> tuple[str, bytes]:
        refused.append(rel)
        raise RuntimeError(f"{REFUSED} {rel}")

    try:
        result = gojsonnet.evaluate_snippet(
            request["filename"],
            request["snippet"],
            ext_vars=ext_vars,
            ext_codes=ext_codes,
            tla_vars=tla_vars,
            tla_codes=tla_codes,
            max_stack=request["max_stack"],
            max_trace=request["max_trace"],
            import_callback=refuse,
        )
    except RuntimeError as exc:
        message = str(exc)
        if refused:
            for rel in refused:
                marker = f"{REFUSED} {rel}"
                at = message.find(marker)
                if at != -1:
                    end = message.find("\n", at)
                    end = len(message) if end == -1 else end
                    message = message[: at + len(marker)] + message[end:]
        # The pool's conversation escapes control characters in every failure's message (a
        # worker's text reaches logs, terminals and HTTP bodies): so does the expectation.
        return "jsonnet", escape_controls(message)
    except UnicodeDecodeError:
        if refused:
            return None
        raise
    return "result", result


def _answer(payload: dict[str, Any]) -> tuple[str, str]:
    if payload["t"] == "result":
        return "result", payload["json"]
    return payload["kind"], payload["message"]


def _binding_garbled(answer: tuple[str, str]) -> bool:
    """The binding lost the engine's message to its garbage bug: its barrier's stand-in
    (one line, no trace) or, from an older binding path, the decoding error itself."""
    kind, message = answer
    stand_in = message.startswith(f"RUNTIME ERROR: importer error: {REFUSED} ")
    return kind == "jsonnet" and (
        (stand_in and "\n" not in message)
        or message.startswith("UnicodeDecodeError: 'utf-8' codec")
    )


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_capi_binding_and_in_process_agree(workers: Any, request: dict[str, Any]) -> None:
    capi, binding = workers
    first, second, third = (_answer(capi.request(**request)) for _ in range(3))
    assert first == second == third
    by_binding = _answer(binding.request(**request))
    if not _binding_garbled(by_binding):
        assert _past_garbage(first) == _past_garbage(by_binding)
    expected = in_process(request)
    if expected is not None:
        assert _past_garbage(first) == _past_garbage(expected)
        if REFUSED not in expected[1]:
            assert first == expected  # byte for byte wherever the binding's bug cannot reach


def _past_garbage(answer: tuple[str, str]) -> tuple[str, str]:
    """The answer with whatever the binding's garbage bug may put between a refusal's
    message and the engine's trace (more lines, a line break) cut out; the C API path has
    none, so this only forgives the binding and in-process sides."""
    kind, message = answer
    start = message.find(REFUSED)
    if kind != "jsonnet" or start == -1:
        return answer
    line_end = message.find("\n", start)
    trace = message.find("\n\t", start)
    if line_end == -1:
        return answer
    return kind, message[:line_end] + (message[trace:] if trace != -1 else "")


def test_cached_snippets_with_one_filename_stay_apart(workers: Any) -> None:
    """Two snippets under the same filename, alternating, each served from its own VM; the
    second import of the filename from inside a snippet is refused, as in-process."""
    capi, _ = workers
    one = capi.request("{who: 'one', file: std.thisFile}", filename="same.jsonnet")
    two = capi.request("{who: 'two', file: std.thisFile}", filename="same.jsonnet")
    for _ in range(3):
        assert capi.request("{who: 'one', file: std.thisFile}", filename="same.jsonnet") == {
            **one,
            "id": capi.next_id - 1,
        }
        assert capi.request("{who: 'two', file: std.thisFile}", filename="same.jsonnet") == {
            **two,
            "id": capi.next_id - 1,
        }
    assert json.loads(one["json"]) == {"who": "one", "file": "same.jsonnet"}
    assert json.loads(two["json"]) == {"who": "two", "file": "same.jsonnet"}
    for form in ("import", "importstr", "importbin"):
        for guess in ("same.jsonnet", "./same.jsonnet", "snippet", "/snippet", ""):
            snippet = f"{{who: 'one', file: std.thisFile, peek: {form} {json.dumps(guess)}}}"
            for _ in range(2):
                answer = capi.request(snippet, filename="same.jsonnet")
                assert answer["t"] == "error", answer
                assert f"{REFUSED} {guess}\n" in answer["message"]


def test_cache_bounds_evict_and_answers_stay_right(workers: Any) -> None:
    """More distinct snippets than the cache holds, then the first ones again."""
    capi, _ = workers
    for round_ in range(2):
        for n in range(90):
            answer = capi.request(f"{{n: {n}, pad: {json.dumps(string.ascii_letters * 4)}}}")
            assert json.loads(answer["json"])["n"] == n, (round_, answer)


def test_a_kept_vm_keeps_nothing_of_the_previous_call(workers: Any) -> None:
    """Values a cached VM computed under one call's limits or variables never answer the
    next call: each call's answer is the in-process one for that call alone."""
    capi, _ = workers
    deep = "local f(n) = if n == 0 then 0 else 1 + f(n - 1); {depth: f(20)}"
    for max_stack in (500, 10, 500, 10, 21, 22, 500):
        request: dict[str, Any] = {
            "snippet": deep,
            "filename": "deep.jsonnet",
            "max_stack": max_stack,
        }
        request.update(ext_vars={}, ext_codes={}, tla_vars={}, tla_codes={}, max_trace=20)
        assert _answer(capi.request(**request)) == in_process(request), max_stack
    for value in ("first", "second", "", "third"):
        request = {"snippet": "{v: std.extVar('a')}", "filename": "v.jsonnet", "max_stack": 500}
        request.update(ext_vars={"a": value}, ext_codes={}, tla_vars={}, tla_codes={})
        request["max_trace"] = 20
        assert json.loads(capi.request(**request)["json"]) == {"v": value}
