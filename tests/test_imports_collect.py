"""The host's import collector (``_imports``): go-jsonnet's search list, its lexer's reading
of import names, and the files read from disk, checked against go-jsonnet itself.

Two oracles run in this process: ``_gojsonnet`` with a recording import callback says which
names go-jsonnet's own lexer and parser import (``import_names`` must give the same, in
order), and ``_gojsonnet.evaluate_file(..., jpathdir=...)`` (go-jsonnet's ``FileImporter`` on
the disk) must give the same result as the same file evaluated with its imports served only
from the collected ``Library`` through ``_wire.imports.resolve`` (the worker's rule).
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_tree
from jsonnet_worker._errors import InputTooLarge, InvalidArgument
from jsonnet_worker._imports import (
    ImportKind,
    ImportName,
    collect,
    import_names,
    jsonnet_path,
)
from jsonnet_worker._library import Library
from jsonnet_worker._wire.imports import Found, resolve

gojsonnet = pytest.importorskip("_gojsonnet")

CODE, STRING, BINARY = ImportKind.CODE, ImportKind.STRING, ImportKind.BINARY


# -- the search list ---------------------------------------------------------------------------


def test_jsonnet_path_is_go_jsonnets_order() -> None:
    # go-jsonnet's usage text: these three are equivalent
    assert jsonnet_path(["c", "d"], {"JSONNET_PATH": "a:b"}) == ("b", "a", "c", "d")
    assert jsonnet_path([], {"JSONNET_PATH": "d:c:a:b"}) == ("b", "a", "c", "d")
    assert jsonnet_path(["b", "a", "c", "d"], {}) == ("b", "a", "c", "d")


def test_jsonnet_path_keeps_entries_as_given() -> None:
    # Go's filepath.SplitList: "" is no entry, an empty entry between colons is kept
    assert jsonnet_path(["lib/", "/abs/lib"], {"JSONNET_PATH": ""}) == ("lib/", "/abs/lib")
    assert jsonnet_path([], {"JSONNET_PATH": "a::b/"}) == ("b/", "", "a")


def test_an_empty_jpath_is_go_jsonnets_error() -> None:
    with pytest.raises(InvalidArgument, match=r"^-J argument was empty string$"):
        jsonnet_path(["lib", ""], {})


# -- the lexer ---------------------------------------------------------------------------------


def test_import_names_skips_comments_strings_and_text_blocks() -> None:
    source = r"""
// import "no1"
# import "no2"
/* import "no3" */ /*/ import "no3b" */
local a = import "a.libsonnet";
local b = importstr 'b\u0041\/.txt';
local c = importbin @"c""q";
local t = |||
  import "no4"

   import "no5"
|||;
local u = |||-
	import "no6"
  |||;
local s = "import \"no7\"" + 'import \'no8\'' + @'import ''no9''';
local d = import /* a comment */ # another
  'd';
ximport "no10"; import_x "no11"; importstrx "no12";
local e = import |||
  no13
|||;
local f = 1import "f" + $import 'g';
"""
    assert list(import_names(source)) == [
        ImportName(CODE, "a.libsonnet"),
        ImportName(STRING, "bA/.txt"),
        ImportName(BINARY, 'c"q'),
        ImportName(CODE, "d"),
        ImportName(CODE, "f"),
        ImportName(CODE, "g"),
    ]


@pytest.mark.parametrize(
    "source",
    [
        'import "a" + "unterminated',
        "import 'a' /* unterminated",
        "import 'a' + |||\n  unterminated",
        "import 'a' + |||\nno indent\n|||",
        "import 'a' + ||| junk\n  x\n|||",
        "import 'a' + @x",
        "import 'a' + '\\",
        'import \'a\' + @"x""',  # the doubled quote is one quote: unterminated
    ],
)
def test_import_names_stops_where_go_jsonnet_cannot_lex(source: str) -> None:
    assert list(import_names(source)) == [ImportName(CODE, "a")]


def test_bad_escapes_import_nothing() -> None:
    # go-jsonnet's StringUnescape fails on each: the file does not parse
    for literal in (r'"\q"', r'"\u12"', r'"\ud800"', r'"\ud800\u12"', r'"\uzzzz"'):
        assert list(import_names(f"import {literal}")) == []
        assert _go_imports(f"import {literal}") is None
    assert list(import_names(r'import "\ud83d\ude00"')) == [ImportName(CODE, "\U0001f600")]


def _go_imports(source: str) -> list[ImportName] | None:
    """The imports go-jsonnet makes evaluating ``source``, in order (None: it failed)."""
    seen: list[ImportName] = []

    def record(base: str, name: str) -> tuple[str, bytes]:
        seen.append(ImportName(CODE, name))
        return name, b"null"

    try:
        gojsonnet.evaluate_snippet("main.jsonnet", source, import_callback=record)
    except RuntimeError:
        return None
    return seen


_tricky = st.sampled_from(
    [
        "import",
        "importstr",
        "importbin",
        '"',
        "'",
        "@",
        "|||",
        "\n",
        " ",
        "\t",
        "#",
        "//",
        "/*",
        "*/",
        "\\",
        '\\"',
        "x",
        "1",
        "+",
        "-",
        "|",
        "$",
        "_",
    ]
)
_literal_forms = st.sampled_from(['"{}"', "'{}'", '@"{}"', "@'{}'"])
_names = st.text(alphabet="ab/._\\\"'\n @#|*", min_size=1, max_size=8)


@st.composite
def _element(draw: Any) -> str:
    """One array element: an import of a literal, possibly with comments around it, or a
    string or text block that only looks like one."""
    keyword = draw(st.sampled_from(["import", "importstr", "importbin"]))
    name = draw(_names)
    form = draw(_literal_forms)
    if form.startswith("@"):
        body = name.replace(form[1], form[1] * 2)
    else:
        body = (
            json.dumps(name)[1:-1].replace("'", "\\'") if form[0] == "'" else json.dumps(name)[1:-1]
        )
    gap = draw(st.sampled_from([" ", "", " /* c */ ", "\n// c\n", " # c\n", "\t"]))
    element = f"{keyword}{gap}{form.format(body)}"
    if draw(st.booleans()):
        element = f"std.length({element})" if keyword == "importbin" else f"[{element}]"
    decoy = draw(st.sampled_from(["", ' + "import \\"no\\""', " + |||\n  import 'no'\n|||"]))
    return element if keyword != "import" or not decoy else f"[{element}, null{decoy}]"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_element(), max_size=6), st.lists(_tricky, max_size=12))
def test_import_names_agree_with_go_jsonnet(elements: list[str], noise: list[str]) -> None:
    noise_text = "".join(noise)
    while "*/" in noise_text:
        noise_text = noise_text.replace("*/", "")
    source = f"/* {noise_text} */\n[{', '.join(elements)}]"
    expected = _go_imports(source)
    assert expected is not None, source
    found = [name.name for name in import_names(source)]
    assert list(dict.fromkeys(found)) == list(dict.fromkeys(e.name for e in expected))


@settings(max_examples=200, deadline=None)
@given(st.lists(_tricky, max_size=40))
def test_import_names_never_misses_one_go_jsonnet_makes(tokens: list[str]) -> None:
    source = "".join(tokens)
    expected = _go_imports(source)
    if expected is not None:  # a program go-jsonnet runs: every import it made is found
        found = [name.name for name in import_names(source)]
        assert all(name.name in found for name in expected), (source, expected, found)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_import_names_ends_on_any_text(source: str) -> None:
    assert all(isinstance(found.name, str) for found in import_names(source))


def test_import_names_on_hostile_shapes() -> None:
    depth = 200_000
    assert list(import_names("[" * depth + "import 'a'" + "]" * depth)) == [ImportName(CODE, "a")]
    assert list(import_names("import " + '"' + "x" * 100_000)) == []
    assert list(import_names("|||\n" + "  x\n" * 50_000)) == []
    assert len(list(import_names("import 'a';" * 50_000))) == 50_000


# -- collecting from disk ----------------------------------------------------------------------


def _served_by(library: Library) -> Any:
    """An import callback serving only ``library``, by the worker's rule."""

    def serve(base: str, name: str) -> tuple[str, bytes]:
        resolution = resolve(library.files, library.search, library.boundaries, base, name)
        if not isinstance(resolution, Found):
            raise RuntimeError(resolution.message)
        return resolution.path, library.files[resolution.path]

    return serve


def _both(filename: str, jpath: list[str]) -> tuple[str, str, Library]:
    """go-jsonnet's result reading the disk, and its result served from the collection."""
    source = Path(filename).read_text()
    library = collect(filename, source, tuple(jpath))
    on_disk = gojsonnet.evaluate_file(filename, jpathdir=jpath)
    served = gojsonnet.evaluate_snippet(filename, source, import_callback=_served_by(library))
    return on_disk, served, library


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_tree(
        tmp_path,
        {
            "app/main.jsonnet": (
                "local util = import 'util.libsonnet';\n"
                "{ util: util, shared: import 'shared.libsonnet', text: importstr 'notes.txt',\n"
                "  bin: importbin 'blob.bin', here: std.thisFile }\n"
            ),
            "app/util.libsonnet": "{ nested: import 'sub/inner.libsonnet', file: std.thisFile }",
            "app/sub/inner.libsonnet": "{ up: import 'leaf.libsonnet', file: std.thisFile }",
            "app/sub/leaf.libsonnet": "{ leaf: 'sub', file: std.thisFile }",
            "app/notes.txt": "import 'never-read.libsonnet'\n",
            "app/blob.bin": bytes([0, 1, 255]),
            "lib1/shared.libsonnet": "{ from: 'lib1', file: std.thisFile }",
            "lib2/shared.libsonnet": (
                "{ from: 'lib2', file: std.thisFile, cycle: import 'cycle.libsonnet' }"
            ),
            "lib2/cycle.libsonnet": "{ again: (import 'cycle.libsonnet').x, x: 1 }",
            "lib1/leaf.libsonnet": "{ leaf: 'lib1' }",
            "never-read.libsonnet": "{}",
        },
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_collect_serves_what_go_jsonnet_reads(tree: Path) -> None:
    on_disk, served, library = _both("app/main.jsonnet", ["lib1", "lib2"])
    assert on_disk == served
    result = json.loads(on_disk)
    assert result["shared"]["from"] == "lib2"  # the right-most -J wins
    assert result["util"]["nested"]["file"] == "app/sub/inner.libsonnet"  # beside its importer
    assert result["util"]["nested"]["up"]["leaf"] == "sub"
    assert sorted(library.files) == [
        "app/blob.bin",
        "app/notes.txt",
        "app/sub/inner.libsonnet",
        "app/sub/leaf.libsonnet",
        "app/util.libsonnet",
        "lib2/cycle.libsonnet",
        "lib2/shared.libsonnet",
    ]  # notes.txt is read (importstr), not scanned; the cycle is read once
    assert library.search == ("lib1", "lib2")
    assert library.boundaries == ("lib1", "lib2", "app/")


def test_collect_with_the_order_reversed(tree: Path) -> None:
    on_disk, served, _ = _both("app/main.jsonnet", ["lib2", "lib1"])
    assert on_disk == served
    assert json.loads(on_disk)["shared"] == {"from": "lib1", "file": "lib1/shared.libsonnet"}


def test_collect_names_files_as_the_jpath_was_given(tree: Path) -> None:
    absolute = str(tree / "lib2") + "/"
    for jpath in (["./lib1/", absolute], ["lib1//", "../" + tree.name + "/lib2"]):
        on_disk, served, library = _both("./app/main.jsonnet", jpath)
        assert on_disk == served
        assert json.loads(on_disk)["shared"]["file"] in library.files


def test_collect_a_snippet_imports_from_the_current_directory(tree: Path) -> None:
    library = collect("<cmdline>", "import 'app/util.libsonnet'", ())
    assert "app/util.libsonnet" in library.files and "app/sub/inner.libsonnet" in library.files
    served = gojsonnet.evaluate_snippet(
        "<cmdline>", "import 'app/util.libsonnet'", import_callback=_served_by(library)
    )
    assert served == gojsonnet.evaluate_snippet("<cmdline>", "import 'app/util.libsonnet'")


def test_collect_leaves_missing_files_out(tree: Path) -> None:
    library = collect("app/main.jsonnet", "import 'nowhere.libsonnet'", ("lib1",))
    assert dict(library.files) == {}


def _opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fsdecode(path))
        return int(real_open(path, *args, **kwargs))

    monkeypatch.setattr("jsonnet_worker._imports.os.open", recording_open)
    return opened


def test_collect_never_opens_a_refused_name(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = _opened(monkeypatch)
    source = (
        f"[import '{tree}/never-read.libsonnet', import '../never-read.libsonnet', "
        "import '../../etc/passwd', importstr '', import 'a\\u0000b']"
    )
    library = collect("app/main.jsonnet", source, ("lib1",))
    assert dict(library.files) == {}
    # absolute, empty or NUL: refused; "../" climbs out of both app/ and lib1 (every
    # candidate cleans to a name outside every boundary): nothing is opened at all
    assert opened == []


def test_collect_reads_the_first_candidate_that_exists(tree: Path) -> None:
    # a directory beside the importer shadows the library file: go-jsonnet fails reading it,
    # and nothing is read here
    (tree / "app" / "shared.libsonnet").mkdir()
    library = collect("app/main.jsonnet", "import 'shared.libsonnet'", ("lib1",))
    assert dict(library.files) == {}
    with pytest.raises(RuntimeError, match="is a directory"):
        gojsonnet.evaluate_snippet(
            "app/main.jsonnet", "import 'shared.libsonnet'", jpathdir=["lib1"]
        )


def test_collect_never_blocks_on_a_fifo(tree: Path) -> None:
    os.mkfifo(tree / "lib1" / "pipe.libsonnet")
    library = collect("main.jsonnet", "import 'pipe.libsonnet'", ("lib1",))
    assert dict(library.files) == {}


def test_collect_is_bounded_in_files(tree: Path) -> None:
    with pytest.raises(InputTooLarge, match=r"limit of 3 files \(at 'app/blob.bin'\)"):
        collect("app/main.jsonnet", Path("app/main.jsonnet").read_text(), ("lib2",), max_files=3)


def test_collect_is_bounded_in_bytes_without_reading_a_huge_file(tree: Path) -> None:
    with open(tree / "lib1" / "huge.libsonnet", "wb") as huge:
        huge.truncate(256 << 20)  # sparse: 256 MiB of zeros, nothing on disk
    tracemalloc.start()
    try:
        with pytest.raises(InputTooLarge, match=r"limit of 65536 bytes \(at 'lib1/huge"):
            collect("main.jsonnet", "importstr 'huge.libsonnet'", ("lib1",), max_bytes=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_collect_reads_each_path_once(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = _opened(monkeypatch)
    source = "[import 'cycle.libsonnet', import 'cycle.libsonnet', importstr 'cycle.libsonnet']"
    library = collect("main.jsonnet", source, ("lib2",))
    assert sorted(library.files) == ["lib2/cycle.libsonnet"]
    assert opened == ["cycle.libsonnet", "lib2/cycle.libsonnet"]


def test_collect_root_reads_relative_names_under_it(tree: Path) -> None:
    library = collect("main.jsonnet", "import 'util.libsonnet'", (), root=str(tree / "app"))
    assert sorted(library.files) == [
        "sub/inner.libsonnet",
        "sub/leaf.libsonnet",
        "util.libsonnet",
    ]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(contents=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_collect_survives_hostile_files(tmp_path: Path, contents: list[bytes]) -> None:
    # every file imports the next, and holds random bytes besides: a bounded, typed outcome
    root = tempfile.mkdtemp(dir=tmp_path)  # one per example: tmp_path is the test's
    for index, content in enumerate(contents):
        following = f"import 'f{index + 1}.libsonnet'\n".encode()
        Path(root, f"f{index}.libsonnet").write_bytes(following + content + following)
    try:
        library = collect("main.jsonnet", "import 'f0.libsonnet'", (), root=root, max_files=3)
    except InputTooLarge:
        assert len(contents) > 3
    else:
        assert len(library.files) == len(contents)
