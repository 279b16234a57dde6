"""Library sets: imports served from memory by the host, never read from disk in a worker.

The rule alone (``_wire.imports``: go-jsonnet's path rules), the ``Library`` value, the
conversation that sends each set once per worker, then real sandboxed workers of every engine
API, compared with go-jsonnet's own file importer (``_gojsonnet.evaluate_file(jpathdir=)``,
in-process, on the same tree written to a temporary directory), and the pool's call paths.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import _gojsonnet
import pytest
from test_connection import greeted

import jsonnet_worker
from conftest import ENGINES
from jsonnet_worker import InputTooLarge, InvalidArgument, InvalidType, JsonnetError, Library
from jsonnet_worker._pool import connection as connection_module
from jsonnet_worker._pool.connection import WorkerConnection
from jsonnet_worker._wire.framing import FrameReader, Message, encode
from jsonnet_worker._wire.imports import (
    Found,
    Missing,
    Refused,
    directory_of,
    go_clean,
    go_join,
    go_quote,
    resolve,
)
from jsonnet_worker._wire.messages import LIBRARY, ErrorKind, EvalRequest, LibrarySet
from jsonnet_worker._wire.messages import Failure as WireFailure
from rawworker import ENGINE_APIS, RawWorker, api_worker

# -- the rule --------------------------------------------------------------------------------

# Go's path.Clean on these (from its documentation and tests).
GO_CLEAN = {
    "": ".",
    "abc": "abc",
    "abc/def": "abc/def",
    "a/b/c": "a/b/c",
    ".": ".",
    "..": "..",
    "../..": "../..",
    "../../abc": "../../abc",
    "/abc": "/abc",
    "/": "/",
    "abc/": "abc",
    "abc/def/": "abc/def",
    "//abc": "/abc",
    "///abc": "/abc",
    "abc//def//ghi": "abc/def/ghi",
    "abc/./def": "abc/def",
    "/./abc/def": "/abc/def",
    "abc/.": "abc",
    "abc/def/ghi/../jkl": "abc/def/jkl",
    "abc/def/../ghi/../jkl": "abc/jkl",
    "abc/def/..": "abc",
    "abc/def/../..": ".",
    "/abc/def/../..": "/",
    "abc/def/../../..": "..",
    "/abc/def/../../..": "/",
    "abc/def/../../../ghi/jkl/../../../mno": "../../mno",
    "abc/./../def": "def",
    "abc//./../def": "def",
    "abc/../../././../def": "../../def",
}


@pytest.mark.parametrize(("path", "clean"), sorted(GO_CLEAN.items()))
def test_go_clean(path: str, clean: str) -> None:
    assert go_clean(path) == clean


def test_go_join_and_directory() -> None:
    assert go_join("", "x.libsonnet") == "x.libsonnet"
    assert go_join("sub/", "x") == "sub/x"
    assert go_join("a/", "../../x") == "../x"
    assert go_join("/lib/", "../../x") == "/x"
    assert go_join("", "") == ""
    assert directory_of("snippet.jsonnet") == ""
    assert directory_of("a/b/c.jsonnet") == "a/b/"
    assert go_quote('a"b\\c\n\x01') == '"a\\"b\\\\c\\n\\x01"'


FILES = {"util.libsonnet": b"", "k8s/apps.libsonnet": b"", "vendor/x/y.libsonnet": b""}


@pytest.mark.parametrize(
    ("directory", "name", "expected"),
    [
        ("", "util.libsonnet", Found("util.libsonnet")),
        ("k8s/", "apps.libsonnet", Found("k8s/apps.libsonnet")),
        ("k8s/", "../util.libsonnet", Found("util.libsonnet")),
        ("k8s/", "util.libsonnet", Found("util.libsonnet")),  # through the search path ""
        ("elsewhere/", "x/y.libsonnet", Found("vendor/x/y.libsonnet")),  # search "vendor"
        ("", "nope.libsonnet", Missing),
        ("", "../../util.libsonnet", Refused),  # climbs out of the library
        ("", "../util.libsonnet", Found("util.libsonnet")),  # "vendor/../util.libsonnet"
        ("", "k8s/../../etc/passwd", Missing),  # "vendor/k8s/../../etc/passwd" is in bounds
        ("", "k8s/../../../etc/passwd", Refused),
        ("", "/etc/passwd", Refused),
        ("", "util.libsonnet\0", Refused),
        ("", "", Refused),
        ("", "a" * 5000, Refused),
    ],
)
def test_resolve(directory: str, name: str, expected: object) -> None:
    where = resolve(FILES, ("", "vendor"), ("",), directory, name)
    if isinstance(expected, Found):
        assert where == expected
    else:
        assert isinstance(where, expected)  # type: ignore[arg-type]


def test_search_paths_last_wins() -> None:
    files = {"a/x": b"", "b/x": b""}
    assert resolve(files, ("a", "b"), ("",), "", "x") == Found("b/x")
    assert resolve(files, ("b", "a"), ("",), "", "x") == Found("a/x")


# -- the value -------------------------------------------------------------------------------


def test_library_value() -> None:
    one = Library.from_files({"a.libsonnet": "{}", "b.bin": b"\x00\xff"})
    two = Library.from_files({"b.bin": b"\x00\xff", "a.libsonnet": b"{}"})
    assert one == two and hash(one) == hash(two) and one.digest == two.digest
    assert one.files["a.libsonnet"] == b"{}"
    assert one != Library.from_files({"a.libsonnet": "{ }"})
    assert one != Library.from_files({"a.libsonnet": "{}", "b.bin": b"\x00\xff"}, search=())
    with pytest.raises(TypeError):
        one.files["c"] = b""  # type: ignore[index]


def test_library_pickles_and_copies() -> None:
    library = Library.from_files({"a.libsonnet": "{}", "k/b.bin": b"\x00"}, search=("", "k"))
    for again in (pickle.loads(pickle.dumps(library)), copy.deepcopy(library)):
        assert again == library and again.search == ("", "k")
        assert dict(again.files) == dict(library.files)


@pytest.mark.parametrize(
    "name", ["", "/abs.libsonnet", "../up.libsonnet", "a/../../b", "a//b", "./a", "a\0b"]
)
def test_library_refuses_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        Library.from_files({name: "{}"})


def test_library_bounds_and_types() -> None:
    with pytest.raises(InputTooLarge):
        Library.from_files({"a": "x" * 100}, max_bytes=50)
    with pytest.raises(InputTooLarge):
        Library.from_files({f"f{i}": "" for i in range(10)}, max_files=5)
    with pytest.raises(InvalidType):
        Library.from_files({"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidType):
        Library.from_files(["a"])  # type: ignore[arg-type]


def test_library_from_directory(tmp_path: Path) -> None:
    (tmp_path / "k8s").mkdir()
    (tmp_path / "util.libsonnet").write_text("{u: 1}")
    (tmp_path / "k8s" / "apps.libsonnet").write_bytes(b"{a: 2}")
    (tmp_path / "k8s" / "link.libsonnet").symlink_to(tmp_path / "util.libsonnet")
    library = Library.from_directory(tmp_path)
    assert dict(library.files) == {
        "util.libsonnet": b"{u: 1}",
        "k8s/apps.libsonnet": b"{a: 2}",
        "k8s/link.libsonnet": b"{u: 1}",
    }
    with pytest.raises(InputTooLarge):
        Library.from_directory(tmp_path, max_bytes=20)
    with pytest.raises(InputTooLarge):
        Library.from_directory(tmp_path, max_files=2)
    with pytest.raises(InvalidArgument):
        Library.from_directory(tmp_path / "util.libsonnet")


# -- the conversation: each set once per worker ------------------------------------------------


def _frames(data: bytes) -> list[dict[str, object]]:
    reader = FrameReader()
    reader.feed(data)
    payloads = []
    while (event := reader.next_event()) is not None:
        assert isinstance(event, Message)
        payloads.append(event.payload)
    return payloads


def _answered(connection: WorkerConnection, request_id: int) -> None:
    from jsonnet_worker._wire.framing import encode
    from jsonnet_worker._wire.messages import Result

    connection.receive_data(encode(Result(request_id, "1").to_message()))
    connection.next_event()


def test_a_set_is_sent_once_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    library = Library.from_files({"u.libsonnet": "{}"})
    connection = greeted()
    first = _frames(
        connection.send_request(EvalRequest(1, "1", library=library.digest), library=library)
    )
    assert [frame["t"] for frame in first] == [LIBRARY, "eval"]
    assert LibrarySet.from_message(first[0]) == LibrarySet(
        library.digest, ("",), ("",), {"u.libsonnet": b"{}"}, False
    )
    _answered(connection, 1)
    second = _frames(
        connection.send_request(EvalRequest(2, "1", library=library.digest), library=library)
    )
    assert [frame["t"] for frame in second] == ["eval"]
    _answered(connection, 2)
    # Past what a worker holds, a new set replaces the ones before it.
    monkeypatch.setattr(connection_module, "MAX_HELD_LIBRARY_BYTES", library.size + 1)
    other = Library.from_files({"v.libsonnet": "{}"})
    third = _frames(
        connection.send_request(EvalRequest(3, "1", library=other.digest), library=other)
    )
    assert third[0]["t"] == LIBRARY and third[0]["replace"] is True
    assert connection.held == {other.digest}


# -- real workers ------------------------------------------------------------------------------

WORKERS = [api for api in ENGINE_APIS if ENGINE_APIS[api][0] in ENGINES]

TREE = {
    "main.jsonnet": (
        "local u = import 'util.libsonnet';\n"
        "{ greet: u.greet('a'), text: importstr 'data/notes.txt', bin: importbin 'data/b.bin',\n"
        "  nested: (import 'k8s/apps.libsonnet').name, file: std.thisFile, lib: u.file }\n"
    ),
    "util.libsonnet": "{ greet(n):: 'hi ' + n, file: std.thisFile }",
    "data/notes.txt": "notes\n",
    "data/b.bin": "\x00\x01\x7f",
    "k8s/apps.libsonnet": (
        "{ name: (import '../util.libsonnet').greet('k8s')"
        " + (import 'util.libsonnet').greet('again') }"
    ),
    "missing.jsonnet": "local x = import 'nope.libsonnet';\nx",
    "broken.jsonnet": "import 'k8s/broken.libsonnet'",
    "k8s/broken.libsonnet": "{ a: }",
    "error.jsonnet": "(import 'k8s/error.libsonnet').f(1)",
    "k8s/error.libsonnet": "{ f(x):: error 'boom ' + x }",
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("tree")
    for name, text in TREE.items():
        path = top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("latin-1"))
    return top


@pytest.fixture(scope="module")
def library(tree: Path) -> Library:
    return Library.from_directory(tree)


@pytest.fixture(scope="module", params=sorted(WORKERS))
def worker(request: pytest.FixtureRequest) -> Iterator[RawWorker]:
    with api_worker(request.param) as raw:
        yield raw


def _go_file_importer(tree: Path, name: str) -> tuple[str, str]:
    """go-jsonnet's own importer on the tree on disk, its top a search path as a
    library's is: ("result"|"error", text)."""
    cwd = os.getcwd()
    os.chdir(tree)
    try:
        return "result", _gojsonnet.evaluate_file(name, jpathdir=["."])
    except RuntimeError as exc:
        return "error", str(exc)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    "main", ["main.jsonnet", "missing.jsonnet", "broken.jsonnet", "error.jsonnet"]
)
def test_worker_matches_go_jsonnets_file_importer(
    worker: RawWorker, tree: Path, library: Library, main: str, request: pytest.FixtureRequest
) -> None:
    answer = worker.request(TREE[main], filename=main, library=library)
    kind, text = _go_file_importer(tree, main)
    if kind == "result":
        assert answer["t"] == "result", answer
        assert json.loads(answer["json"]) == json.loads(text)
        if request.node.callspec.params["worker"].startswith("go"):
            assert answer["json"] == text
        return
    assert answer["t"] == "error" and answer["kind"] == "jsonnet", answer
    api = request.node.callspec.params["worker"]
    if api == "go-capi":
        assert answer["message"] == text
    elif api == "go-binding":  # its C glue may lose what follows a callback's error text
        assert answer["message"].splitlines()[0] == text.splitlines()[0]
    else:
        assert "nope.libsonnet" in answer["message"] or main != "missing.jsonnet"


def test_worker_serves_each_call_from_its_set_only(worker: RawWorker, library: Library) -> None:
    again = worker.request(TREE["main.jsonnet"], filename="main.jsonnet", library=library)
    assert again["t"] == "result"
    # The same worker, a request without the set: every import refused, as before.
    bare = worker.request("import 'util.libsonnet'")
    assert bare["t"] == "error" and "import not available util.libsonnet" in bare["message"]
    other = Library.from_files({"util.libsonnet": "{ greet(n):: 'other ' + n, file: 0 }"})
    answer = worker.request("(import 'util.libsonnet').greet('x')", library=other)
    assert json.loads(answer["json"]) == "other x"


@pytest.mark.parametrize(
    "snippet",
    [
        "import '../etc/passwd'",
        "importstr '/etc/passwd'",
        "importbin '/proc/self/environ'",
        "import 'k8s/../../../etc/hostname'",
        "importstr 'data/../../tree/data/notes.txt'",
    ],
)
def test_worker_refuses_names_outside_the_set(
    worker: RawWorker, library: Library, snippet: str
) -> None:
    answer = worker.request(snippet, library=library)
    assert answer["t"] == "error" and "import not available" in answer["message"], answer


def test_worker_refuses_a_set_it_never_received(worker: RawWorker) -> None:
    # Past the pool's conversation (which always sends a set first): the worker says so.
    request = EvalRequest(worker.next_id, "import 'a'", library="0" * 64)
    worker.next_id += 1
    worker.send_bytes(encode(request.to_message()))
    answer = worker.receive()
    assert isinstance(answer, WireFailure), answer
    assert answer.kind is ErrorKind.INTERNAL and "was never received" in answer.message


def test_worker_drops_held_sets_on_replace(worker: RawWorker) -> None:
    first = Library.from_files({"r.libsonnet": "1"})
    assert json.loads(worker.request("import 'r.libsonnet'", library=first)["json"]) == 1
    second = LibrarySet("f" * 64, ("",), ("",), {"r.libsonnet": b"2"}, replace=True)
    worker.send_bytes(encode(second.to_message()))
    request = EvalRequest(worker.next_id, "import 'r.libsonnet'", library=first.digest)
    worker.next_id += 1
    worker.send_bytes(encode(request.to_message()))
    answer = worker.receive()
    assert isinstance(answer, WireFailure) and "was never received" in answer.message
    worker.connection.held.clear()  # the test went past the conversation: resync it


# -- the pool ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[jsonnet_worker.WorkerPool]:
    with jsonnet_worker.WorkerPool(size=2) as pool:
        yield pool


MAPPER = "local u = import 'util.libsonnet'; { greeting: u.greet(std.extVar('who')) }"


def test_every_call_path_takes_a_library(pool: jsonnet_worker.WorkerPool, library: Library) -> None:
    who = {"who": "ann"}
    expected = {"greeting": "hi ann"}
    assert pool.evaluate(MAPPER, who, library=library) == expected
    assert json.loads(pool.evaluate_json(MAPPER, who, library=library)) == expected
    assert pool.evaluate_string("(import 'util.libsonnet').greet('s')", library=library) == "hi s\n"
    assert pool.map(MAPPER, [who, {"who": "bob"}], library=library) == [
        expected,
        {"greeting": "hi bob"},
    ]
    assert pool.submit(MAPPER, who, library=library).result(timeout=30) == expected

    async def both() -> list[object]:
        return [
            await pool.aevaluate(MAPPER, who, library=library),
            json.loads(await pool.aevaluate_json(MAPPER, who, library=library)),
        ]

    assert asyncio.run(both()) == [expected, expected]


def test_module_level_evaluate_takes_a_library(library: Library) -> None:
    assert jsonnet_worker.evaluate(MAPPER, {"who": "m"}, library=library) == {"greeting": "hi m"}


def test_the_pool_refuses_what_is_not_a_library(pool: jsonnet_worker.WorkerPool) -> None:
    with pytest.raises(InvalidType):
        pool.evaluate("1", library={"a": "b"})  # type: ignore[arg-type]
    big = Library.from_files({"a": "x" * 2048})
    with jsonnet_worker.WorkerPool(size=1, max_request=4096) as small:
        with pytest.raises(InputTooLarge):
            small.evaluate("1", library=big)


def test_a_tenants_worker_never_holds_another_tenants_set(library: Library) -> None:
    with jsonnet_worker.WorkerPool(size=1, spares=0) as pool:
        assert pool.evaluate(MAPPER, {"who": "a"}, tenant="a", library=library)
        with pytest.raises(JsonnetError, match=r"import not available util\.libsonnet"):
            pool.evaluate("import 'util.libsonnet'", tenant="b")
