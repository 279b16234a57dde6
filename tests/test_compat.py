"""``jsonnet_worker.compat``: the ``_jsonnet`` drop-in, compared with the binding itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_tree
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
    # the message says what to do instead
    with pytest.raises(
        TypeError, match=r"import_callback .*pass jpathdir.*jsonnet_worker\.Library"
    ):
        compat.evaluate_snippet("f", "1", import_callback=lambda base, rel: (rel, b""))
    with pytest.raises(TypeError, match="jpathdir must be a str or a list of str"):
        compat.evaluate_snippet("f", "1", jpathdir=("a",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        compat.evaluate_snippet("f", "1", nope=1)
    with pytest.raises(TypeError, match="ext_vars values must be str"):
        compat.evaluate_snippet("f", "1", ext_vars={"a": 1})  # type: ignore[dict-item]
    assert compat.evaluate_snippet("f", "1", gc_min_objects=10) == "1\n"


def _library_tree(top: Path) -> None:
    files: dict[str, str | bytes] = {
        "app/main.jsonnet": "{ util: import 'util.libsonnet', shared: import 'shared.libsonnet' }",
        "app/util.libsonnet": "{ text: importstr 'notes.txt', file: std.thisFile }",
        "app/notes.txt": "beside util\n",
        "lib1/shared.libsonnet": "{ from: 'lib1', file: std.thisFile }",
        "lib2/shared.libsonnet": "{ from: 'lib2', file: std.thisFile }",
        "secret.txt": "not for a snippet",
    }
    write_tree(top, files)


@pytest.mark.parametrize("jpathdir", ["lib1", ["lib1", "lib2"], ["lib2", "lib1"]])
def test_evaluate_file_honours_jpathdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jpathdir: str | list[str]
) -> None:
    _library_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    main = "app/main.jsonnet"
    ours = compat.evaluate_file(main, jpathdir=jpathdir)
    assert ours == _jsonnet.evaluate_file(main, jpathdir=jpathdir)
    last = jpathdir if isinstance(jpathdir, str) else jpathdir[-1]
    assert f'"from": "{last}"' in ours  # the last directory is searched first


def test_evaluate_snippet_honours_jpathdir_only(tmp_path: Path) -> None:
    _library_tree(tmp_path)
    lib1, lib2 = str(tmp_path / "lib1"), str(tmp_path / "lib2")
    snippet = "import 'shared.libsonnet'"
    ours = compat.evaluate_snippet("snippet", snippet, jpathdir=[lib2, lib1])
    assert ours == _jsonnet.evaluate_snippet("snippet", snippet, jpathdir=[lib2, lib1])
    # without jpathdir every import is refused, as before; with it, a snippet's own
    # directory (here the file's, elsewhere the process's current one) is not served
    with pytest.raises(RuntimeError, match="import not available"):
        compat.evaluate_snippet("snippet", snippet)
    beside = str(tmp_path / "snippet.jsonnet")
    assert "not for a snippet" in _jsonnet.evaluate_snippet(
        beside, "importstr 'secret.txt'", jpathdir=[lib1]
    )
    with pytest.raises(RuntimeError, match=r'couldn.t open import "secret\.txt"'):
        compat.evaluate_snippet(beside, "importstr 'secret.txt'", jpathdir=[lib1])


def test_evaluate_file_over_the_library_bounds(tmp_path: Path) -> None:
    _library_tree(tmp_path)
    with open(tmp_path / "lib1" / "huge.txt", "wb") as huge:
        huge.truncate(64 << 20)  # sparse, over the library's 16 MiB
    main = tmp_path / "main.jsonnet"
    main.write_text("std.length(importstr 'huge.txt')")
    with pytest.raises(RuntimeError, match="over the limit of 16777216 bytes"):
        compat.evaluate_file(str(main), jpathdir=str(tmp_path / "lib1"))
