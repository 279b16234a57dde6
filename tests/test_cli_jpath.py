"""``-J/--jpath`` and ``JSONNET_PATH``: the command, run as a real subprocess on a trusted tree
under tmp_path, against go-jsonnet's own importer on the same tree, in this process
(``_gojsonnet.evaluate_file``/``evaluate_snippet`` with ``jpathdir``, the list go-jsonnet's
``jsonnet`` command builds): the same output, the same message, exit 1 for an error.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import run_command, write_tree

gojsonnet = pytest.importorskip("_gojsonnet")

ROOT = Path(__file__).resolve().parent.parent

TREE: dict[str, str | bytes] = {
    "app/main.jsonnet": (
        "local util = import 'util.libsonnet';\n"
        "{ util: util, shared: import 'shared.libsonnet', here: std.thisFile }\n"
    ),
    "app/util.libsonnet": "{ nested: import 'sub/inner.libsonnet', file: std.thisFile }",
    "app/sub/inner.libsonnet": "{ leaf: import 'leaf.libsonnet', file: std.thisFile }",
    "app/sub/leaf.libsonnet": "'the leaf beside inner.libsonnet'",
    "app/leaf.libsonnet": "'the leaf beside main.jsonnet: wrong'",
    "app/texts.jsonnet": "{ text: importstr 'notes.txt', bytes: importbin 'blob.bin' }",
    "app/notes.txt": "line one\nimport 'not-code'\n",
    "app/blob.bin": b"\x00\x01\xfe\xff",
    "app/missing.jsonnet": "{ a: 1, b: import 'nowhere.libsonnet' }",
    "app/broken.jsonnet": "local b = import 'broken.libsonnet'; b",
    "lib1/shared.libsonnet": "{ from: 'lib1', file: std.thisFile }",
    "lib2/shared.libsonnet": "{ from: 'lib2', file: std.thisFile }",
    "lib2/broken.libsonnet": "{ a: }",
    "lib1/top.libsonnet": "'top of lib1'",
    "app/escape.jsonnet": "import '../lib1/top.libsonnet'",
}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_tree(tmp_path, TREE)
    monkeypatch.chdir(tmp_path)  # go-jsonnet, in this process, reads relative to it too
    return tmp_path


def cli(
    tree: Path, *args: str, stdin: str = "", environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "JSONNET_PATH"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(environ or {})
    return run_command(*args, cwd=tree, stdin=stdin, env=env)


def assert_as_go_jsonnet(done: subprocess.CompletedProcess[str], go: Callable[[], str]) -> None:
    """The command did what go-jsonnet's ``jsonnet`` does: its output, or its message and
    exit 1 (jsonnet prints the engine's text and an empty line)."""
    try:
        expected = go()
    except RuntimeError as exc:
        assert (done.returncode, done.stdout, done.stderr) == (1, "", f"{exc}\n")
    else:
        assert (done.returncode, done.stderr, done.stdout) == (0, "", expected)


@pytest.mark.parametrize("jpath", [["lib1", "lib2"], ["lib2", "lib1"], ["lib1/", "./lib2"]])
def test_relative_and_nested_imports_and_the_jpath_order(tree: Path, jpath: list[str]) -> None:
    flags = [flag for directory in jpath for flag in ("-J", directory)]
    done = cli(tree, "eval", *flags, "app/main.jsonnet")
    assert_as_go_jsonnet(done, lambda: gojsonnet.evaluate_file("app/main.jsonnet", jpathdir=jpath))
    assert f'"from": "{jpath[-1].strip("./")}"' in done.stdout  # the right-most -J wins
    assert '"leaf": "the leaf beside inner.libsonnet"' in done.stdout


@pytest.mark.parametrize("environ", ["lib1:lib2", "lib2:lib1", "lib2::lib1"])
def test_jsonnet_path_order(tree: Path, environ: str) -> None:
    done = cli(tree, "eval", "app/main.jsonnet", environ={"JSONNET_PATH": environ})
    jpathdir = list(reversed(environ.split(":")))  # as go-jsonnet's command builds it
    assert_as_go_jsonnet(
        done, lambda: gojsonnet.evaluate_file("app/main.jsonnet", jpathdir=jpathdir)
    )
    assert f'"from": "{environ.split(":")[0]}"' in done.stdout  # the left-most wins


def test_jpath_wins_over_jsonnet_path(tree: Path) -> None:
    done = cli(
        tree, "eval", "--jpath", "lib1", "app/main.jsonnet", environ={"JSONNET_PATH": "lib2"}
    )
    assert_as_go_jsonnet(
        done, lambda: gojsonnet.evaluate_file("app/main.jsonnet", jpathdir=["lib2", "lib1"])
    )
    assert '"from": "lib1"' in done.stdout


def test_importstr_and_importbin(tree: Path) -> None:
    done = cli(tree, "eval", "app/texts.jsonnet")
    assert_as_go_jsonnet(done, lambda: gojsonnet.evaluate_file("app/texts.jsonnet"))


def test_a_missing_import(tree: Path) -> None:
    done = cli(tree, "eval", "-J", "lib1", "app/missing.jsonnet")
    assert_as_go_jsonnet(
        done, lambda: gojsonnet.evaluate_file("app/missing.jsonnet", jpathdir=["lib1"])
    )
    assert 'couldn\'t open import "nowhere.libsonnet"' in done.stderr


def test_a_syntax_error_inside_an_imported_file(tree: Path) -> None:
    done = cli(tree, "eval", "-J", "lib2", "app/broken.jsonnet")
    assert_as_go_jsonnet(
        done, lambda: gojsonnet.evaluate_file("app/broken.jsonnet", jpathdir=["lib2"])
    )
    assert "lib2/broken.libsonnet:1:" in done.stderr


@pytest.mark.parametrize("how", ["-e", "-"])
def test_a_snippet_imports_from_the_current_directory(tree: Path, how: str) -> None:
    snippet = "[import 'app/util.libsonnet', import 'top.libsonnet', std.thisFile]"
    if how == "-e":
        done = cli(tree, "eval", "-J", "lib1", "-e", snippet)
        name = "<cmdline>"
    else:
        done = cli(tree, "eval", "-J", "lib1", "-", stdin=snippet)
        name = "<stdin>"
    assert_as_go_jsonnet(done, lambda: gojsonnet.evaluate_snippet(name, snippet, jpathdir=["lib1"]))


def test_an_absolute_jpath_names_files_as_given(tree: Path) -> None:
    absolute = str(tree / "lib2")
    done = cli(tree, "eval", "-J", absolute, "-e", "import 'shared.libsonnet'")
    assert_as_go_jsonnet(
        done,
        lambda: gojsonnet.evaluate_snippet(
            "<cmdline>", "import 'shared.libsonnet'", jpathdir=[absolute]
        ),
    )
    assert f'"file": "{absolute}/shared.libsonnet"' in done.stdout


def test_an_empty_jpath_is_jsonnets_error(tree: Path) -> None:
    for command in (
        ["eval", "-e", "1"],
        ["check", "app/main.jsonnet"],
        ["fmt", "app/main.jsonnet"],
    ):
        done = cli(tree, command[0], "-J", "", *command[1:])
        assert (done.returncode, done.stdout) == (1, ""), command
        assert done.stderr == "ERROR: -J argument was empty string\n", command


def test_check_and_fmt_take_the_flags(tree: Path) -> None:
    done = cli(tree, "check", "-J", "lib1", "--jpath", "lib2", "app/main.jsonnet")
    assert (done.returncode, done.stderr) == (0, "")
    done = cli(tree, "fmt", "-J", "lib1", "app/util.libsonnet")
    assert (done.returncode, done.stdout) == (
        0,
        "{ nested: import 'sub/inner.libsonnet', file: std.thisFile }\n",
    )


def test_what_the_sandbox_does_not_serve(tree: Path) -> None:
    # the documented differences: an absolute name, and a file outside the main file's
    # directory and the -J dirs, are refused where go-jsonnet reads both
    absolute = f"import '{tree}/lib1/top.libsonnet'"
    assert gojsonnet.evaluate_snippet("<cmdline>", absolute) == '"top of lib1"\n'
    done = cli(tree, "eval", "-J", "lib1", "-e", absolute)
    assert (done.returncode, done.stdout) == (1, "")
    assert f"import not available {tree}/lib1/top.libsonnet" in done.stderr, done.stderr
    assert gojsonnet.evaluate_file("app/escape.jsonnet", jpathdir=["lib2"]) == '"top of lib1"\n'
    done = cli(tree, "eval", "-J", "lib2", "app/escape.jsonnet")
    assert (done.returncode, done.stdout) == (1, "")
    assert "import not available ../lib1/top.libsonnet" in done.stderr, done.stderr
