"""The jsonnet-worker command line, run as a real subprocess."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import run_command
from jsonnet_worker import InvalidArgument, PoolConfig, UnsupportedPlatform
from jsonnet_worker._cli import doctor, main
from jsonnet_worker._sandbox.landlock import probe

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_command(*args, cwd=ROOT, stdin=stdin, env=env)


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
    assert cli("eval").returncode == 2  # no file: argparse's usage error
    assert cli("eval", "-", "--no-such-flag").returncode == 2
    assert "_worker" not in cli("--help").stdout  # the worker mode stays hidden


def test_input_errors_exit_1_with_jsonnets_messages(tmp_path: Path) -> None:
    """Each as go-jsonnet's jsonnet prints it (cmd/jsonnet/cmd.go, cmd/internal/cmd)."""
    cases = [
        (("eval", "no/such/file.jsonnet"), "Opening input file: no/such/file.jsonnet: "
         "no such file or directory\n"),
        (("eval", str(tmp_path)), f"Reading input file: {tmp_path}: is a directory\n"),
        (("eval", "-e", "1", "-V", "UNSET_VAR"), "ERROR: environment variable UNSET_VAR was "
         "undefined\n"),
        (("eval", "-e", "1", "--tla-code", "UNSET_VAR"), "ERROR: environment variable "
         "UNSET_VAR was undefined\n"),
        (("eval", "-e", "1", "--ext-code-file", "nofile"), 'ERROR: argument not in form '
         '<var>=<file> "nofile"\n'),
        (("eval", "-e", "1", "-s", "0"), "ERROR: invalid --max-stack value: 0\n"),
        (("eval", "-e", "1", "--max-stack", "x"), 'Invalid integer "x"\n'),
        (("eval", "-e", "1", "-t", "-1"), "ERROR: invalid --max-trace value: -1\n"),
        (("eval", "-e", "1", "-o", ""), "ERROR: -o argument was empty string\n"),
        (("eval", "-e", "1", "-m", ""), "ERROR: -m argument was empty string\n"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "UNSET_VAR"}
    for args, stderr in cases:
        done = cli(*args, env=env)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", stderr), args
    unreadable = cli("eval", "-e", "1", "--ext-str-file", f"v={tmp_path / 'none'}")
    assert unreadable.returncode == 1
    assert unreadable.stderr.startswith("ERROR: --ext-str-file v: no such file or directory")


# -- compared case by case with go-jsonnet (its C API, in this process) -----------------------


class GoJsonnet:
    """go-jsonnet's own evaluation, multi and stream modes through the C API its Python
    extension exports (the jsonnet command calls the same functions), and the command's
    printing (cmd/jsonnet/cmd.go): the reference the CLI's output is compared with."""

    def __init__(self) -> None:
        import _gojsonnet

        lib = ctypes.CDLL(_gojsonnet.__file__)
        lib.jsonnet_make.restype = ctypes.c_void_p
        for name in ("", "_multi", "_stream"):
            function = getattr(lib, f"jsonnet_evaluate_snippet{name}")
            function.restype = ctypes.c_void_p
            function.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                 ctypes.POINTER(ctypes.c_int)]  # fmt: skip
        for name in ("jsonnet_ext_var", "jsonnet_ext_code", "jsonnet_tla_var", "jsonnet_tla_code"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        for name in ("jsonnet_string_output", "jsonnet_max_stack", "jsonnet_max_trace"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.jsonnet_destroy.argtypes = [ctypes.c_void_p]
        lib.jsonnet_fmt_snippet.restype = ctypes.c_void_p
        lib.jsonnet_fmt_snippet.argtypes = lib.jsonnet_evaluate_snippet.argtypes
        self.lib = lib

    def format(self, code: str, filename: str) -> str:
        vm = self.lib.jsonnet_make()
        try:
            error = ctypes.c_int()
            result = self.lib.jsonnet_fmt_snippet(
                vm, filename.encode(), code.encode(), ctypes.byref(error)
            )
            assert not error.value
            return ctypes.string_at(result).decode()
        finally:
            self.lib.jsonnet_destroy(vm)

    def run(
        self,
        code: str,
        mode: str = "",
        *,
        filename: str = "<cmdline>",
        string: bool = False,
        options: dict[str, int] | None = None,
        variables: dict[str, dict[str, str]] | None = None,
    ) -> tuple[int, str | list[str]]:
        """(error flag, text) or, for multi/stream, (0, the NUL-separated parts)."""
        vm = self.lib.jsonnet_make()
        try:
            if string:
                self.lib.jsonnet_string_output(vm, 1)
            for name, value in (options or {}).items():
                getattr(self.lib, f"jsonnet_{name}")(vm, value)
            for kind, mapping in (variables or {}).items():
                for key, text in mapping.items():
                    getattr(self.lib, f"jsonnet_{kind}")(vm, key.encode(), text.encode())
            error = ctypes.c_int()
            function = getattr(self.lib, f"jsonnet_evaluate_snippet{mode}")
            result = function(vm, filename.encode(), code.encode(), ctypes.byref(error))
            if not mode or error.value:
                return error.value, ctypes.string_at(result).decode()
            parts, offset = [], 0
            while part := ctypes.string_at(result + offset):
                parts.append(part.decode())
                offset += len(part) + 1
            return 0, parts
        finally:
            self.lib.jsonnet_destroy(vm)

    def command(self, code: str, *, multi: str | None = None, stream: bool = False,
                **kwargs: Any) -> tuple[int, str, str, dict[str, str]]:  # fmt: skip
        """What ``jsonnet`` prints: (exit status, stdout, stderr, files written)."""
        mode = "_multi" if multi is not None else "_stream" if stream else ""
        error, out = self.run(code, mode, **kwargs)
        if error:
            assert isinstance(out, str)
            return 1, "", out + "\n", {}  # fmt.Fprintln(os.Stderr, err.Error())
        if isinstance(out, str):
            return 0, out, "", {}
        if stream:
            return 0, "".join(f"---\n{doc}" for doc in out) + ("...\n" if out else ""), "", {}
        assert multi is not None
        prefix = multi if multi.endswith("/") else multi + "/"
        files = {prefix + out[i]: out[i + 1] for i in range(0, len(out), 2)}
        return 0, "".join(f"{path}\n" for path in sorted(files)), "", files


@pytest.fixture(scope="module")
def go() -> GoJsonnet:
    return GoJsonnet()


COMPARED = [
    "{a: 1, b: [1, 2.5, 1e100, -0.0, 1/3], c: {}, d: [], e: 'tab\\t\\u0001\\u007f\\u00e9'}",
    "[{x: null, y: true}, 'two', 3]",
    "'just a string'",
    "{files: {'a.json': {n: 1}, 'b c': 'x'}, 'z': [1, [2, [3]]], e: {}}",
    "error 'nope'",
    "{a: error 'lazy'}",
    "local f(n) = if n == 0 then 0 else 1 + f(n - 1); f(100)",
    "std.extVar('missing')",
    "{a: 1",
    "function(x) x",
    "[]",
    "{}",
]


@pytest.mark.parametrize("code", COMPARED)
@pytest.mark.parametrize(
    "flags", [(), ("-S",), ("-y",), ("-m", "out"), ("-S", "-m", "out")], ids=str
)
def test_eval_matches_go_jsonnet(
    go: GoJsonnet, tmp_path: Path, code: str, flags: tuple[str, ...]
) -> None:
    multi = flags[flags.index("-m") + 1] if "-m" in flags else None
    expected = go.command(code, multi=multi, stream="-y" in flags, string="-S" in flags)
    if flags == ("-S",) and code == "{a: error 'lazy'}":
        # The one documented difference (README): the worker manifests the whole result, so
        # the field's error is reported where jsonnet -S reports the type first.
        expected = go.command(code)
    if multi is not None:
        (tmp_path / multi).mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "jsonnet_worker", "eval", *flags, "-e", code],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    files = {
        str(path.relative_to(tmp_path)): path.read_text()
        for path in tmp_path.rglob("*")
        if path.is_file()
    }
    # go-jsonnet reports the first non-string field of -S -m in Go's random map order, so
    # which one is named varies from run to run: compare the words around it
    pattern = re.compile(r"key \S+ has a value of type [^,]+,")
    actual = (done.returncode, done.stdout, pattern.sub("key K ...,", done.stderr), files)
    assert actual == (*expected[:2], pattern.sub("key K ...,", expected[2]), expected[3])


def test_file_and_stdin_names_and_output_file(go: GoJsonnet, tmp_path: Path) -> None:
    source = tmp_path / "m.jsonnet"
    source.write_text("{a: std.extVar('v')} + error 'at ' + std.thisFile")
    variables = {"ext_var": {"v": "x"}}
    from_file = cli("eval", str(source), "-V", "v=x")
    assert (from_file.returncode, from_file.stderr) == go.command(
        source.read_text(), filename=str(source), variables=variables
    )[:3:2]
    from_stdin = cli("eval", "-", "-V", "v=x", stdin=source.read_text())
    expected = go.command(source.read_text(), filename="<stdin>", variables=variables)
    assert (from_stdin.returncode, from_stdin.stderr) == expected[:3:2]
    out = tmp_path / "deep" / "out.json"
    written = cli("eval", "-e", "{a: 1}", "-c", "-o", str(out))
    assert (written.returncode, written.stdout) == (0, "")
    assert out.read_text() == go.command("{a: 1}")[1]
    missing = cli("eval", "-e", "{b: 2, a: 1}", "-m", str(tmp_path / "none"))
    # as jsonnet: each path is listed before its file is written, so the first one is there
    assert (missing.returncode, missing.stdout, missing.stderr) == (
        1,
        f"{tmp_path}/none/a\n",
        f"open {tmp_path}/none/a: no such file or directory\n",
    )
    listing = tmp_path / "listing.txt"
    multi = cli("eval", "-e", "{'x.json': 1}", "-m", str(tmp_path), "-o", str(listing))
    assert multi.returncode == 0 and listing.read_text() == f"{tmp_path}/x.json\n"


def test_variables_last_flag_wins_as_in_jsonnet(go: GoJsonnet) -> None:
    code = "[std.extVar('a'), std.extVar('b')]"
    done = cli("eval", "-e", code, "-V", "a=1", "--ext-code", "a=2", "--ext-code", "b=3",
               "-V", "b=4")  # fmt: skip
    expected = go.command(code, variables={"ext_code": {"a": "2"}, "ext_var": {"b": "4"}})
    assert (done.returncode, done.stdout) == expected[:2]


def test_max_stack_matches_go_jsonnet(go: GoJsonnet) -> None:
    code = "local f(n) = if n == 0 then 0 else 1 + f(n - 1); f(50)"
    for stack in (10, 200):
        done = cli("eval", "-s", str(stack), "-e", code)
        expected = go.command(code, options={"max_stack": stack})
        assert (done.returncode, done.stdout, done.stderr) == expected[:3], stack


def test_max_trace_matches_go_jsonnet(go: GoJsonnet) -> None:
    """Needs ENGINE's worker to act on EvalRequest.max_trace."""
    code = "local f(n) = if n == 0 then error 'bottom' else 1 + f(n - 1); f(30)"
    for trace in (0, 3, 20):
        done = cli("eval", "-t", str(trace), "-e", code)
        expected = go.command(code, options={"max_trace": trace})
        assert (done.returncode, done.stderr) == (1, expected[2]), trace


def test_pool_flags_cover_every_pool_option() -> None:
    help_text = cli("eval", "--help").stdout
    for option in dataclasses.fields(PoolConfig):
        flag = "--allow-unsandboxed" if option.name == "require_sandbox" else (
            "--" + option.name.replace("_", "-"))  # fmt: skip
        assert flag in help_text, flag
    bad = cli("eval", "-e", "1", "--queue-limit", "-1")
    assert (bad.returncode, bad.stderr) == (1, "ERROR: queue_limit must be at least 0, not -1\n")


def test_eval_fails_closed_by_default() -> None:
    """require_sandbox is PoolConfig's (True) unless --allow-unsandboxed is given."""
    parser = main.build_parser()
    assert main.pool_config(parser.parse_args(["eval", "x"]), main.CLI_POOL).require_sandbox
    opted_out = parser.parse_args(["eval", "x", "--allow-unsandboxed"])
    assert main.pool_config(opted_out, main.CLI_POOL).require_sandbox is False
    for command in ("test", "check", "fmt"):
        assert main.pool_config(parser.parse_args([command, "x"]), main.CLI_POOL).require_sandbox


def test_cpp_engine_without_its_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "_jsonnet", None)  # as if the cpp extra were absent
    with pytest.raises(InvalidArgument, match=r"pip install 'jsonnet-worker\[cpp\]'"):
        PoolConfig(engine="cpp")
    args = main.build_parser().parse_args(["eval", "x", "--engine", "cpp"])
    with pytest.raises(main.Failed, match=r"^ERROR: engine 'cpp' needs the C\+\+ binding"):
        main.pool_config(args, main.CLI_POOL)
    assert doctor.run_doctor("cpp") == 1


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSYS, "Function not implemented"),  # pidfd_open on Linux < 5.3
        UnsupportedPlatform("the worker sandbox needs Linux"),
        AttributeError("module 'os' has no attribute 'pidfd_open'"),  # not Linux
    ],
    ids=["no-pidfd", "unsupported-platform", "not-linux"],
)
def test_doctor_reports_a_machine_where_no_worker_can_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failure: Exception
) -> None:
    def greet(config: PoolConfig) -> Any:
        raise failure

    monkeypatch.setattr(doctor, "greet", greet)
    assert doctor.run_doctor("go") == 1
    out = capsys.readouterr().out
    assert f"FAILED: cannot start a worker here: {type(failure).__name__}: {failure}" in out
    assert out.endswith("sandbox: unprotected (see above)\n")


# -- check and fmt (need POOL's check/format call paths and ENGINE's worker side) ------------


def test_check_parses_without_evaluating(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonnet"
    good.write_text("local claims = std.extVar('claims'); error 'never evaluated'\n")
    bad = tmp_path / "bad.jsonnet"
    bad.write_text("{\n  a: 1,\n  b: ,\n}\n")
    unknown = tmp_path / "unknown.jsonnet"
    unknown.write_text("{a: nope}\n")
    assert cli("check", str(good)).returncode == 0
    failed = cli("check", str(good), str(bad), str(unknown))
    assert failed.returncode == 1
    assert f"{bad}:3:" in failed.stderr  # file:line:col
    assert f"{unknown}:1:" in failed.stderr and "nope" in failed.stderr
    assert "never evaluated" not in failed.stderr


def test_fmt_matches_go_jsonnets_formatter(go: GoJsonnet, tmp_path: Path) -> None:
    source = tmp_path / "m.jsonnet"
    source.write_text('{  a:1,"b" : [1,2],  c: "x" }')
    expected = go.format(source.read_text(), str(source))
    printed = cli("fmt", str(source))
    assert (printed.returncode, printed.stdout) == (0, expected)
    assert cli("fmt", "--test", str(source)).returncode == 2  # not formatted
    assert cli("fmt", "-i", str(source)).returncode == 0
    assert source.read_text() == expected
    again = cli("fmt", "--test", str(source))  # fmt's own output passes --test
    assert (again.returncode, again.stdout) == (0, "")
    broken = cli("fmt", "-", stdin="{a: }")
    assert broken.returncode == 1 and "<stdin>:1:" in broken.stderr


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
    # Both engines' verdicts: every layer the configuration asks for is active (root here).
    assert out.count("sandbox: every layer active") == 2, out
