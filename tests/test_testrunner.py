"""``jsonnet-worker test``: suites of mapper cases run in the sandbox, as a subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from conftest import run_command, write_tree
from jsonnet_worker._cli.testrunner import (
    EXIT_NO_CASE_SELECTED,
    CaseResult,
    NewExpectation,
    SuiteError,
    SuiteNotUpdated,
    SuiteReport,
    case_lines,
    load_suite,
    same_json,
    subset_of,
    update_suite,
    write_junit,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "jsonnet_worker" / "service" / "examples"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsonnet_worker", "test", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_the_shipped_example_suites_pass() -> None:
    suites = sorted(str(path) for path in EXAMPLES.glob("*.test.yaml"))
    suites.append(str(ROOT / "fixtures" / "oidc-google.test.yaml"))
    assert len(suites) >= 5
    done = run(*suites)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(line.startswith("PASS ") for line in lines[:-1])
    assert lines[-1].endswith(f"0 failed, in {len(suites)} suite(s)")


SUITE = """
snippet: file://mapper.jsonnet
cases:
  - name: passes
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect: {sub: "1", email: a@example.com, n: 1}
  - name: wrong result
    ext_vars: {claims: {sub: "1", email: b@example.com}}
    expect: {sub: "1", email: a@example.com, n: 1}
  - name: expected error
    ext_vars: {claims: {}}
    expect_error: "Field does not exist: email"
  - name: unexpected error
    ext_vars: {claims: {}}
    expect: {}
  - name: error expected but a result
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect_error: "anything"
  - name: code and tla
    ext_codes: {claims: "{sub: '2', email: 'c@' + 'example.com'}"}
    expect: {sub: "2", email: c@example.com, n: 1}
  - name: true is not 1
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect: {sub: "1", email: a@example.com, n: true}
"""


def write_suite(directory: Path, text: str = SUITE, name: str = "suite.yaml") -> Path:
    (directory / "mapper.jsonnet").write_text(
        "local c = std.extVar('claims'); {sub: c.sub, email: c.email, n: 1}"
    )
    suite = directory / name
    suite.write_text(text)
    return suite


def test_pass_fail_diff_errors_and_junit(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    report = tmp_path / "junit.xml"
    done = run(str(suite), "--junit-xml", str(report))
    assert done.returncode == 1, done.stderr
    out = done.stdout
    for line in (
        f"PASS {suite}::passes",
        f"FAIL {suite}::wrong result",
        f"PASS {suite}::expected error",
        f"ERROR {suite}::unexpected error",
        f"FAIL {suite}::error expected but a result",
        f"PASS {suite}::code and tla",
        f"FAIL {suite}::true is not 1",
    ):
        assert line in out.splitlines(), out
    assert '-  "email": "a@example.com",' in out and '+  "email": "b@example.com",' in out
    assert "Field does not exist: email" in out  # the unexpected error's message
    assert out.splitlines()[-1] == "3 passed, 4 failed, in 1 suite(s)"
    root = ElementTree.parse(report).getroot()
    (element,) = root.findall("testsuite")
    assert (element.get("tests"), element.get("failures"), element.get("errors")) == ("7", "3", "1")
    cases = {case.get("name"): case for case in element.findall("testcase")}
    assert cases["passes"].find("failure") is None
    failure = cases["wrong result"].find("failure")
    assert failure is not None and "b@example.com" in (failure.text or "")
    assert cases["unexpected error"].find("error") is not None


def test_inline_source_and_json_suites(tmp_path: Path) -> None:
    suite = tmp_path / "inline.json"
    suite.write_text(
        json.dumps(
            {
                "source": "function(ctx) {to: ctx.recipient}",
                "cases": [{"name": "tla", "tla_vars": {"ctx": {"recipient": "x"}},
                           "expect": {"to": "x"}}],
            }
        )
    )  # fmt: skip
    done = run(str(suite))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"PASS {suite}::tla" in done.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cases: []", "exactly one of 'snippet: file://...' and 'source'"),
        ("source: '1'\ncases: []", "'cases' must be a non-empty list"),
        ("source: '1'\ncases: [{name: a}]", "(a): give exactly one of 'expect', 'expect_subset'"),
        (
            "source: '1'\ncases: [{name: a, expect: 1}, {name: both, expect: 1, expect_subset: 1}]",
            "cases[1] (both): give exactly one of 'expect', 'expect_subset' and 'expect_error' "
            "(given: 'expect' and 'expect_subset')",
        ),
        ("source: '1'\ncases: [{name: a, expect: 1, extra: 2}]", "unknown keys ['extra']"),
        ("source: '1'\ncases: [{expect: 1}]", "'name' must be a non-empty string"),
        ("source: '1'\ncases: [{name: a, expect: 1}, {name: a, expect: 1}]", "used twice"),
        ("snippet: file://nope.jsonnet\ncases: [{name: a, expect: 1}]", "nope.jsonnet"),
        ("source: '1'\ncases: [{name: a, ext_codes: {x: 1}, expect: 1}]", "Jsonnet code"),
        ("[1", "not valid YAML"),
        ("source: '1'\njpath: lib\ncases: [{name: a, expect: 1}]", "'jpath' must be a list"),
        ("source: '1'\njpath: ['']\ncases: [{name: a, expect: 1}]", "'jpath' must be a list"),
    ],
)
def test_bad_suites_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    suite = write_suite(tmp_path, text)
    with pytest.raises(SuiteError) as caught:
        load_suite(suite)
    assert message in str(caught.value) and str(suite) in str(caught.value)


def test_an_unreadable_suite_exits_2_and_the_others_still_run(tmp_path: Path) -> None:
    good = write_suite(tmp_path, SUITE.split("  - name: wrong result")[0], "good.yaml")
    done = run(str(good), str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert f"PASS {good}::passes" in done.stdout
    assert "missing.yaml: cannot read" in done.stderr


LIBRARY_SUITE = """
snippet: file://mappers/m.jsonnet
jpath: [lib]
cases:
  - name: imports beside the snippet, then from the suite's jpath, then from -J
    expect:
      util: {file: mappers/util.libsonnet}
      shared: {from: suite lib, file: lib/shared.libsonnet}
      extra: {from: command lib}
      here: mappers/m.jsonnet
  - name: a missing import is go-jsonnet's message
    tla_vars: {missing: "yes"}
    expect_error: couldn't open import "nowhere.libsonnet"
"""


def _library_suite(top: Path) -> Path:
    files: dict[str, str | bytes] = {
        "suites/mappers/m.jsonnet": (
            "function(missing='') if missing != '' then import 'nowhere.libsonnet' else "
            "{ util: import 'util.libsonnet', shared: import 'shared.libsonnet', "
            "extra: import 'extra.libsonnet', here: std.thisFile }"
        ),
        "suites/mappers/util.libsonnet": "{ file: std.thisFile }",
        "suites/lib/shared.libsonnet": "{ from: 'suite lib', file: std.thisFile }",
        "command-lib/shared.libsonnet": "{ from: 'command lib: loses to the suite' }",
        "command-lib/extra.libsonnet": "{ from: 'command lib' }",
    }
    write_tree(top, files)
    suite = top / "suites" / "library.yaml"
    suite.write_text(LIBRARY_SUITE)
    return suite


def test_a_suite_imports_from_its_jpath_and_the_commands(tmp_path: Path) -> None:
    suite = _library_suite(tmp_path)
    # -J is relative to the current directory; the suite's names to the suite
    done = run_command("test", "-J", "command-lib", "suites/library.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "2 passed, 0 failed, in 1 suite(s)"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        loaded = load_suite(suite, ("command-lib",))
    assert loaded.library is not None
    assert sorted(loaded.library.files) == [
        "../command-lib/extra.libsonnet",
        "lib/shared.libsonnet",
        "mappers/util.libsonnet",
    ]


def test_a_suites_imports_over_the_bounds_are_a_suite_problem(tmp_path: Path) -> None:
    with open(tmp_path / "big.txt", "wb") as big:
        big.truncate(17 << 20)  # sparse, over the library's 16 MiB
    suite = write_suite(tmp_path, "source: importstr 'big.txt'\ncases: [{name: a, expect: 1}]")
    with pytest.raises(SuiteError, match=r"the snippet's imports: .*limit of 16777216 bytes"):
        load_suite(suite)


def test_same_json_keeps_json_types_apart() -> None:
    assert same_json({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not same_json(True, 1) and not same_json(0, False) and not same_json(None, 0)
    assert not same_json({"a": 1}, {"a": 1, "b": 2}) and not same_json([1], [1, 1])


# -- expect_subset ---------------------------------------------------------------------------


def test_subset_checks_only_the_keys_given_at_every_depth() -> None:
    actual = {"a": {"b": 1, "c": [{"d": True, "e": 2}, 3]}, "f": "x"}

    def matches(subset: object) -> bool:
        return same_json(subset, subset_of(subset, actual).value)

    assert matches({}) and matches({"f": "x"}) and matches({"a": {"b": 1}})
    assert matches({"a": {"c": [{"d": True}, 3]}})  # objects inside arrays are partial too
    assert not matches({"a": {"c": [{"d": True}]}})  # an array keeps its length
    assert not matches({"a": {"c": [{"d": 1}, 3]}})  # JSON types kept apart
    assert not matches({"a": {"b": 1, "z": None}})  # a key given must be present
    assert not matches({"f": {}}) and not matches([actual])
    assert matches(actual) and matches(1) is False
    missing = subset_of({"a": {"z": 1, "c": [{"y": 2}, 3]}, "w": 0}, actual).missing
    assert missing == ("a.z", "a.c[0].y", "w")


SUBSET_SUITE = """
snippet: file://mapper.jsonnet
cases:
  - name: the keys given match
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect_subset: {email: a@example.com}
  - name: a key given differs
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect_subset: {sub: "2"}
  - name: a key given is missing
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect_subset: {sub: "1", nope: 1}
"""


def test_expect_subset_passes_on_the_keys_given_and_diffs_only_them(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, SUBSET_SUITE)
    done = run(str(suite))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert f"PASS {suite}::the keys given match" in lines
    differs = lines.index(f"FAIL {suite}::a key given differs")
    assert lines[differs + 1 : differs + 8] == [  # the result cut down to the keys given
        "    --- expected",
        "    +++ actual",
        "    @@ -1,3 +1,3 @@",
        "     {",
        '    -  "sub": "2"',
        '    +  "sub": "1"',
        "     }",
    ]
    assert "    missing keys: nope (not updatable)" in lines
    assert lines[-1] == "1 passed, 2 failed, in 1 suite(s)"


# -- -k --------------------------------------------------------------------------------------


def test_k_selects_cases_whose_name_contains_a_pattern(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    done = run(str(suite), "-k", "WRONG", "-k", "tla")
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"FAIL {suite}::wrong result",
        *[line for line in done.stdout.splitlines() if line.startswith("    ")],
        f"PASS {suite}::code and tla",
        "1 passed, 1 failed, 5 deselected, in 1 suite(s)",
    ]
    assert run(str(suite), "-k", "passes").returncode == 0


def test_k_without_a_match_exits_5_and_says_so(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    done = run(str(suite), "-k", "nothing like this")
    assert done.returncode == EXIT_NO_CASE_SELECTED == 5, done.stderr
    assert done.stdout.splitlines() == [
        "0 passed, 0 failed, 7 deselected, in 1 suite(s): no case name contains 'nothing like this'"
    ]


# -- --update --------------------------------------------------------------------------------

UPDATE_SUITE = """\
# The suite's own comment.
snippet: file://mapper.jsonnet   # the mapper
cases:
  - name: passes
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect: {sub: "1", email: a@example.com, n: 1}   # stays as written
  - name: wrong block value
    ext_vars: {claims: {sub: "1", email: b@example.com}}
    # a comment before the value
    expect:
      sub: "1"
      email: a@example.com
      n: 1

    # a comment after the value
  - name: empty placeholder
    ext_vars: {claims: {sub: "2", email: c@example.com}}
    expect:   # fill in with --update
  - {name: flow case, ext_vars: {claims: {sub: "3", email: d@x}}, expect: [1]}
  - name: subset
    ext_vars: {claims: {sub: "4", email: e@x}}
    expect_subset: {email: a@x, n: 1}  # only the keys given
  - name: errors
    ext_vars: {claims: {}}
    expect: {}  # an error is never written
  - name: error expected but a result
    ext_vars: {claims: {sub: "1", email: a@example.com}}
    expect_error: anything
  - name: not selected
    ext_vars: {claims: {sub: "5", email: f@x}}
    expect: {}
"""

UPDATED_SUITE = (
    UPDATE_SUITE.replace(
        """\
    expect:
      sub: "1"
      email: a@example.com
      n: 1
""",
        """\
    expect:
      email: b@example.com
      n: 1
      sub: '1'
""",
    )
    .replace("expect:   # fill in", "expect: {email: c@example.com, n: 1, sub: '2'}   # fill in")
    .replace("expect: [1]}", "expect: {email: d@x, n: 1, sub: '3'}}")
    .replace("expect_subset: {email: a@x, n: 1}", "expect_subset: {email: e@x, n: 1}")
)


def test_update_rewrites_only_the_failed_expectations_and_keeps_the_rest(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, UPDATE_SUITE)
    patterns = ("pass", "value", "placeholder", "flow", "subset", "error")
    done = run(str(suite), "--update", *(f"-k{pattern}" for pattern in patterns))
    assert done.returncode == 1, done.stderr  # the two cases --update cannot fix
    lines = done.stdout.splitlines()
    updated = [line for line in lines if line.startswith("UPDATED ")]
    assert updated == [
        f"UPDATED {suite}::{name}"
        for name in ("wrong block value", "empty placeholder", "flow case", "subset")
    ]
    assert f"ERROR {suite}::errors" in lines
    assert lines[-1] == "1 passed, 2 failed, 4 updated, 1 deselected, in 1 suite(s)"
    assert suite.read_text() == UPDATED_SUITE  # byte for byte: comments, layout, other cases
    again = run(str(suite))
    assert again.returncode == 1
    failing = [line for line in again.stdout.splitlines() if line.startswith(("FAIL", "ERR"))]
    assert failing == [
        f"ERROR {suite}::errors",
        f"FAIL {suite}::error expected but a result",
        f"FAIL {suite}::not selected",
    ]
    assert [path.name for path in tmp_path.iterdir()] == sorted(["mapper.jsonnet", "suite.yaml"])


def test_update_leaves_passing_suites_untouched(tmp_path: Path) -> None:
    copies = []
    for example in sorted(EXAMPLES.glob("*")):
        copy = tmp_path / example.name
        copy.write_bytes(example.read_bytes())
        copies.append(copy)
    suites = [copy for copy in copies if copy.name.endswith(".test.yaml")]
    before = {copy: (copy.stat().st_ino, copy.read_bytes()) for copy in suites}
    done = run(*map(str, suites), "--update")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "UPDATED" not in done.stdout
    assert {copy: (copy.stat().st_ino, copy.read_bytes()) for copy in suites} == before


def test_update_that_fixes_every_failure_exits_0(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, SUITE.split("  - name: expected error")[0])
    done = run(str(suite), "--update")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "1 passed, 0 failed, 1 updated, in 1 suite(s)"
    assert run(str(suite)).returncode == 0


def report_with(suite_path: Path, *results: CaseResult) -> SuiteReport:
    return SuiteReport(load_suite(suite_path), list(results))


def rewrite(name: str, value: object) -> CaseResult:
    return CaseResult(name, False, 0.0, "diff", rewrite=NewExpectation(value))


def updated_text(tmp_path: Path, text: str, name: str, value: object, suffix: str = "yaml") -> str:
    suite = write_suite(tmp_path, text, f"suite.{suffix}")
    update_suite(report_with(suite, rewrite(name, value)), io.StringIO())
    assert same_json(load_suite(suite).cases[0].expected, value)
    return suite.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("expect", "value", "written"),
    [
        ("expect: 1", None, "expect: null"),
        ("expect: 1", "a\nb: c, [d]", 'expect: "a\\nb: c, [d]"'),
        ("expect: 1", "yes", "expect: 'yes'"),
        ("expect: 1", 1e100, "expect: 1.0e+100"),
        ("expect: 1", ["é", {}], "expect: [é, {}]"),
        ("expect: |\n      text", {"a": 1}, "expect: {a: 1}"),
        ("expect:\n      - 1", {"a": [1]}, "expect:\n      a:\n      - 1"),
        ("expect:\n    - 1", {"a": 1}, "expect:\n      a: 1"),  # below the key: indented
        ("expect:\n      a: 1", 2, "expect:\n      2"),
        ("expect: {}", {"k": "v" * 100}, "expect:\n      k: " + "v" * 100),  # too long inline
    ],
)
def test_update_places_each_value_where_it_parses_back(
    tmp_path: Path, expect: str, value: object, written: str
) -> None:
    text = f"source: '1'\ncases:\n  - name: a\n    {expect}\n  # after\n"
    assert updated_text(tmp_path, text, "a", value) == (
        f"source: '1'\ncases:\n  - name: a\n    {written}\n  # after\n"
    )


def test_update_quotes_a_string_as_a_flow_collection_needs(tmp_path: Path) -> None:
    text = "source: '1'\ncases: [{name: a, expect: 1}]\n"
    written = updated_text(tmp_path, text, "a", "x, [y]")
    assert written == "source: '1'\ncases: [{name: a, expect: 'x, [y]'}]\n"


def test_update_keeps_crlf_line_endings(tmp_path: Path) -> None:
    text = "source: '1'\r\ncases:\r\n  - name: a\r\n    expect:\r\n      b: 1\r\n# end\r\n"
    suite = write_suite(tmp_path, "")
    suite.write_bytes(text.encode())
    update_suite(report_with(suite, rewrite("a", {"b": 2, "c": [3]})), io.StringIO())
    assert suite.read_bytes().decode() == text.replace(
        "b: 1\r\n", "b: 2\r\n      c:\r\n      - 3\r\n"
    )


def test_update_of_a_json_suite_keeps_its_layout(tmp_path: Path) -> None:
    text = (
        '{"source": "1", "cases": [\n  {"name": "a", "expect": 1},\n  {\n    "name": "b",\n'
        '    "expect": {\n      "x": 1\n    }\n  }\n]}\n'
    )
    suite = write_suite(tmp_path, text, "suite.json")
    out = io.StringIO()
    update_suite(report_with(suite, rewrite("a", {"y": "é"}), rewrite("b", [1])), out)
    assert suite.read_text(encoding="utf-8") == text.replace(
        '"expect": 1}', '"expect": {"y": "é"}}'
    ).replace('{\n      "x": 1\n    }', "[\n      1\n    ]")
    assert out.getvalue() == f"UPDATED {suite}::a\nUPDATED {suite}::b\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "source: '1'\ncases:\n  - {name: a, expect: &x {b: 1}}\n  - {name: c, expect: *x}\n",
            "case 'a': its 'expect' has an anchor or a tag",
        ),
        (
            "source: '1'\ncases:\n  - {name: c, expect: &x 1}\n  - {name: a, expect: *x}\n",
            "case 'a': its 'expect' is an alias",
        ),
        (
            "source: '1'\ncases:\n  - &base {name: c, expect: 1}\n  - {<<: *base, name: a}\n",
            "case 'a': its 'expect' comes from a merge key",
        ),
        (
            "source: '1'\ncases:\n  - {name: a, expect: {b: &x 1}}\n  - {name: c, expect: *x}\n",
            "the rewritten text does not parse",  # the anchor went with the old value
        ),
    ],
)
def test_update_refuses_what_it_cannot_place_and_leaves_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    suite = write_suite(tmp_path, text)
    with pytest.raises(SuiteNotUpdated) as caught:
        update_suite(report_with(suite, rewrite("a", 2)), io.StringIO())
    assert str(caught.value).startswith(f"{suite}: not updated: ")
    assert message in str(caught.value)
    assert suite.read_text() == text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mapper.jsonnet", "suite.yaml"]


def test_update_refuses_a_file_changed_while_its_cases_ran(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "source: '1'\ncases: [{name: a, expect: 1}]\n")
    report = report_with(suite, rewrite("a", 2))
    suite.write_text("source: '1'\ncases: [{name: a, expect: 3}]\n")
    with pytest.raises(SuiteNotUpdated, match="changed while its cases ran"):
        update_suite(report, io.StringIO())
    assert "expect: 3" in suite.read_text()


def test_update_replaces_a_links_target_and_keeps_its_mode(tmp_path: Path) -> None:
    target = write_suite(tmp_path, "source: '1'\ncases: [{name: a, expect: 1}]\n")
    target.chmod(0o640)
    inode = target.stat().st_ino
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link.yaml"
    link.symlink_to(target)
    update_suite(report_with(link, rewrite("a", 2)), io.StringIO())
    assert link.is_symlink() and "expect: 2" in target.read_text()
    assert target.stat().st_mode & 0o777 == 0o640
    assert target.stat().st_ino != inode  # a new file renamed over the old one
    assert list((tmp_path / "elsewhere").iterdir()) == [link]


def test_results_without_a_new_expectation_leave_the_file_alone(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, "source: '1'\ncases: [{name: a, expect: 1}]\n")
    before = suite.stat().st_mtime_ns, suite.stat().st_ino
    error = CaseResult("a", False, 0.0, "unexpected error: ...", error=True)
    update_suite(report_with(suite, error), io.StringIO())
    assert (suite.stat().st_mtime_ns, suite.stat().st_ino) == before


# -- the place for std.trace lines -----------------------------------------------------------


def test_a_failures_trace_lines_are_printed_and_reported(tmp_path: Path) -> None:
    suite = load_suite(write_suite(tmp_path))
    result = CaseResult("a", False, 0.0, "the diff", trace=("TRACE: mapper.jsonnet:1 x",))
    assert case_lines(suite, result) == [
        f"FAIL {suite.path}::a",
        "    the diff",
        "    trace:",
        "      TRACE: mapper.jsonnet:1 x",
    ]
    report = tmp_path / "junit.xml"
    write_junit([SuiteReport(suite, [result])], report)
    (case,) = ElementTree.parse(report).getroot().iter("testcase")
    assert case.findtext("system-err") == "TRACE: mapper.jsonnet:1 x"


TRACED_SUITE = """
snippet: file://traced.jsonnet
cases:
  - name: passes
    ext_vars: {claims: {sub: "1"}}
    expect: {sub: "1"}
  - name: fails
    ext_vars: {claims: {sub: "2"}}
    expect: {sub: "1"}
  - name: errs
    ext_vars: {claims: {}}
    expect: {sub: "1"}
"""


def test_a_failing_or_erring_case_shows_its_own_trace_lines(tmp_path: Path) -> None:
    (tmp_path / "traced.jsonnet").write_text(
        "local c = std.trace('claims: ' + std.manifestJsonMinified(std.extVar('claims')), "
        "std.extVar('claims'));\n{sub: c.sub}\n"
    )
    suite = tmp_path / "suite.yaml"
    suite.write_text(TRACED_SUITE)
    report = tmp_path / "junit.xml"
    done = run(str(suite), "--junit-xml", str(report))
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    passes, fails, errs = (out.index(f"::{name}") for name in ("passes", "fails", "errs"))
    assert 'TRACE: traced.jsonnet:1 claims: {"sub":"1"}' not in out  # a pass shows none
    assert out.index('      TRACE: traced.jsonnet:1 claims: {"sub":"2"}') in range(fails, errs)
    assert out.index("      TRACE: traced.jsonnet:1 claims: {}") > errs
    assert out.count("TRACE:") == 2 and passes < fails
    cases = {
        case.get("name"): case for case in ElementTree.parse(report).getroot().iter("testcase")
    }
    assert cases["passes"].findtext("system-err") is None
    assert cases["fails"].findtext("system-err") == 'TRACE: traced.jsonnet:1 claims: {"sub":"2"}'
    assert cases["errs"].findtext("system-err") == "TRACE: traced.jsonnet:1 claims: {}"
