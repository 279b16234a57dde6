"""``jsonnet_worker.compat``: the ``_jsonnet`` drop-in, compared with the binding itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from jsonnet_worker import compat

_jsonnet = pytest.importorskip("_jsonnet")  # the [cpp] extra (in the test extra)

RECURSE = "local f(n) = if n == 0 then error 'bottom' else 1 + f(n - 1); f(40)"


def test_evaluate_file_matches_the_binding(tmp_path: Path) -> None:
    source = tmp_path / "m.jsonnet"
    source.write_text("function(t) {a: std.extVar('e'), t: t, f: std.thisFile}")
    ext_vars, tla_codes = {"e": "x"}, {"t": "[1, 2]"}
    assert compat.evaluate_file(
        str(source), ext_vars=ext_vars, tla_codes=tla_codes
    ) == _jsonnet.evaluate_file(str(source), ext_vars=ext_vars, tla_codes=tla_codes)


def test_evaluate_file_that_cannot_be_read(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.jsonnet")
    with pytest.raises(RuntimeError) as ours:
        compat.evaluate_file(missing)
    with pytest.raises(RuntimeError) as theirs:
        _jsonnet.evaluate_file(missing)
    assert str(ours.value) == str(theirs.value)
    # where the binding aborts the whole process (basic_filebuf::underflow), a RuntimeError
    with pytest.raises(RuntimeError, match="Is a directory"):
        compat.evaluate_file(str(tmp_path))


def test_max_stack_is_honoured() -> None:
    assert compat.evaluate_snippet("f", RECURSE.replace("error 'bottom'", "0")) == "40\n"
    with pytest.raises(RuntimeError, match="max stack frames exceeded"):
        compat.evaluate_snippet("f", RECURSE.replace("error 'bottom'", "0"), max_stack=10)


def test_max_trace_is_honoured() -> None:
    """Compared with go-jsonnet's binding (the default engine). Needs ENGINE's worker to act
    on EvalRequest.max_trace."""
    import _gojsonnet

    for trace in (0, 3, 20):
        with pytest.raises(RuntimeError) as ours:
            compat.evaluate_snippet("f", RECURSE, max_trace=trace)
        with pytest.raises(RuntimeError) as theirs:
            _gojsonnet.evaluate_snippet("f", RECURSE, max_trace=trace)
        assert str(ours.value) == str(theirs.value), trace


def test_refused_and_unknown_arguments() -> None:
    with pytest.raises(TypeError, match="jpathdir"):
        compat.evaluate_file("x.jsonnet", jpathdir="/")
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        compat.evaluate_snippet("f", "1", nope=1)
    with pytest.raises(TypeError, match="ext_vars values must be str"):
        compat.evaluate_snippet("f", "1", ext_vars={"a": 1})  # type: ignore[dict-item]
    assert compat.evaluate_snippet("f", "1", gc_min_objects=10) == "1\n"
