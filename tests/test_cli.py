"""The jsonnet-worker command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jsonnet_worker._landlock import probe

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsonnet_worker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def test_readme_main_job_maps_the_bundled_claims() -> None:
    done = cli(
        "eval",
        "fixtures/oidc-google.jsonnet",
        "--ext-code-file",
        f"claims={FIXTURES / 'claims-google.json'}",
    )
    assert done.returncode == 0, done.stderr
    traits = json.loads(done.stdout)["identity"]["traits"]
    assert traits["email"] == "ada@example.com" and traits["subject"] == "110169484474386276334"


def test_every_variable_flag(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("from a file")
    (tmp_path / "c.jsonnet").write_text("{n: 2}")
    snippet = (
        "function(ta, tb, tc, td) {"
        " a: std.extVar('a'), b: std.extVar('b'), c: std.extVar('c'), d: std.extVar('d'),"
        " e: std.extVar('e'), ta: ta, tb: tb, tc: tc, td: td }"
    )
    done = cli(
        "eval",
        "-",
        "-V",
        "a=plain",
        "--ext-str",
        "b=two words",
        "--ext-str-file",
        f"c={tmp_path / 's.txt'}",
        "--ext-code",
        "d=[1, 2]",
        "--ext-code-file",
        f"e={tmp_path / 'c.jsonnet'}",
        "-A",
        "ta=x",
        "--tla-str-file",
        f"tb={tmp_path / 's.txt'}",
        "--tla-code",
        "tc=true",
        "--tla-code-file",
        f"td={tmp_path / 'c.jsonnet'}",
        "-V",
        "FROM_ENV",
        stdin=snippet.replace(
            "e: std.extVar('e'),", "e: std.extVar('e'), f: std.extVar('FROM_ENV'),"
        ),
        env={"FROM_ENV": "env value", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "a": "plain",
        "b": "two words",
        "c": "from a file",
        "d": [1, 2],
        "e": {"n": 2},
        "f": "env value",
        "ta": "x",
        "tb": "from a file",
        "tc": True,
        "td": {"n": 2},
    }


def test_a_jsonnet_error_goes_to_stderr_with_a_nonzero_exit() -> None:
    done = cli("eval", "-", stdin="error 'nope'")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "RUNTIME ERROR: nope" in done.stderr


def test_refused_import_timeout_output_limit_and_engine() -> None:
    refused = cli("eval", "-", stdin='importstr "/etc/passwd"')
    assert refused.returncode == 1 and "import not available" in refused.stderr
    assert "root:" not in refused.stderr + refused.stdout
    slow = cli(
        "eval",
        "-",
        "--timeout",
        "0.3",
        stdin="local d(i) = if i == 0 then 0 else 1 + d(i - 1); "
        "std.foldl(function(a, b) a + d(400), std.range(1, 1000000), 0)",
    )
    assert slow.returncode == 1 and "EvaluationTimeout" in slow.stderr
    big = cli("eval", "-", "--max-output", "100", stdin="std.makeArray(100, function(i) i)")
    assert big.returncode == 1 and "OutputTooLarge" in big.stderr
    cpp = cli("eval", "-", "--engine", "cpp", stdin="{engine: 'cpp', n: 1 + 1}")
    assert cpp.returncode == 0 and json.loads(cpp.stdout) == {"engine": "cpp", "n": 2}


def test_usage_errors_exit_2() -> None:
    missing = cli("eval", "no/such/file.jsonnet")
    assert missing.returncode == 2 and "no/such/file.jsonnet" in missing.stderr
    bad_flag = cli("eval", "-", "--ext-code-file", "nofile")
    assert bad_flag.returncode == 2 and "NAME=FILE" in bad_flag.stderr
    twice = cli("eval", "-", "-V", "a=1", "-V", "a=2", stdin="1")
    assert twice.returncode == 2 and "given twice" in twice.stderr
    assert "_worker" not in cli("--help").stdout  # the worker mode stays hidden


@pytest.mark.skipif(not probe().available, reason=f"kernel has no Landlock: {probe().state.value}")
def test_doctor_reports_the_enforced_sandbox() -> None:
    done = cli("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count(f"ABI {probe().abi} enforced") == 2  # one worker per engine
    assert "self-check:      refused" in out
    if probe().abi >= 4:
        assert "network:         BIND_TCP, CONNECT_TCP" in out
    if probe().abi >= 6:
        assert "scopes:          ABSTRACT_UNIX_SOCKET, SIGNAL" in out
    assert "sandbox: OK" in out
