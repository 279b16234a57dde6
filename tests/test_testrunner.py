"""``jsonnet-worker test``: suites of mapper cases run in the sandbox, as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from jsonnet_worker._cli.testrunner import SuiteError, load_suite, same_json

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
        ("source: '1'\ncases: [{name: a}]", "exactly one of 'expect' and 'expect_error'"),
        ("source: '1'\ncases: [{name: a, expect: 1, extra: 2}]", "unknown keys ['extra']"),
        ("source: '1'\ncases: [{expect: 1}]", "'name' must be a non-empty string"),
        ("source: '1'\ncases: [{name: a, expect: 1}, {name: a, expect: 1}]", "used twice"),
        ("snippet: file://nope.jsonnet\ncases: [{name: a, expect: 1}]", "nope.jsonnet"),
        ("source: '1'\ncases: [{name: a, ext_codes: {x: 1}, expect: 1}]", "Jsonnet code"),
        ("[1", "not valid YAML"),
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


def test_same_json_keeps_json_types_apart() -> None:
    assert same_json({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not same_json(True, 1) and not same_json(0, False) and not same_json(None, 0)
    assert not same_json({"a": 1}, {"a": 1, "b": 2}) and not same_json([1], [1, 1])
