"""The command line's messages instead of tracebacks, its limits, sizes and version, and its
one-shot worker: each run as a real subprocess of the real CLI (issue 23, items 5 and 6)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from jsonnet_worker import (
    Error,
    EvaluationTimeout,
    InvalidArgument,
    MemoryLimitExceeded,
    PoolConfig,
    SandboxStatus,
    SandboxUnavailable,
)
from jsonnet_worker._cli import main
from jsonnet_worker._cli.oneshot import OneShot
from jsonnet_worker._cli.sizes import format_size, parse_size
from jsonnet_worker._config import MIN_MEMORY_LIMIT
from jsonnet_worker._pool import connection, exchange
from jsonnet_worker._pool.identities import WorkerIdentities
from jsonnet_worker._wire.layers import SupportState
from jsonnet_worker._wire.messages import Operation
from jsonnet_worker._wire.values import replace

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "jsonnet_worker"]
# CPU only, with a flat heap (benchmarks.run's HEAVY_LOOP): well over 20 s on go-jsonnet, so
# still running when a test interrupts it or its deadline comes, and never a memory death
# (a longer range made an array that hit the memory limit first on a quiet machine).
LONG_CALL = (
    "local d(i) = if i == 0 then 0 else 1 + d(i - 1); "
    "std.foldl(function(a, b) a + d(400), std.range(1, 1000000), 0)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="workers drop to a user only as root")


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*COMMAND, *args], input=stdin, capture_output=True, timeout=120, cwd=ROOT
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def children(pid: int) -> list[int]:
    listing = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(word) for word in listing.stdout.split()]


def wait_for_child(process: subprocess.Popen[bytes], seconds: float = 30.0) -> int:
    """The pid of the CLI's worker, once it has one (bounded in time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = children(process.pid)
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the CLI started no worker")


# -- messages, not tracebacks ---------------------------------------------------------------


@needs_root
def test_an_unknown_worker_user_is_a_message_and_invalid_argument() -> None:
    done = cli("eval", "--worker-user", "no-such-user-here", "-e", "1")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "jsonnet-worker: InvalidArgument: worker_user 'no-such-user-here': no such user\n"
    )
    with pytest.raises(InvalidArgument, match="no such user"):
        WorkerIdentities("no-such-user-here")
    with pytest.raises(InvalidArgument, match="root or in group root"):
        WorkerIdentities("root")


def test_ctrl_c_exits_130_quietly_and_the_worker_is_reaped() -> None:
    process = subprocess.Popen(
        [*COMMAND, "eval", "-e", LONG_CALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        worker = wait_for_child(process)
        time.sleep(0.5)  # well into the call: the worker has said its hello and evaluates
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert (process.returncode, out, err) == (130, b"", b"")
    assert not Path(f"/proc/{worker}").exists()  # killed and reaped by the CLI


def test_a_closed_standard_output_ends_the_command_by_sigpipe() -> None:
    """As go-jsonnet's and C++ jsonnet's binaries: killed by SIGPIPE (141 in a shell)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes
    try:
        done = subprocess.run(
            [*COMMAND, "eval", "-e", "std.range(1, 100000)"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (-signal.SIGPIPE, b"")


def test_input_that_is_not_utf8_names_the_input_and_the_offset(tmp_path: Path) -> None:
    stdin = cli("eval", "-", stdin=b"{a: '\xff'}")
    assert (stdin.returncode, stdin.stderr) == (
        1,
        "Reading input file: <stdin>: not valid UTF-8 (byte 0xff at offset 5)\n",
    )
    binary = tmp_path / "binary.jsonnet"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xfa\x00")
    from_file = cli("eval", str(binary))
    assert (from_file.returncode, from_file.stderr) == (
        1,
        f"Reading input file: {binary}: not valid UTF-8 (byte 0xfa at offset 8)\n",
    )
    variable = subprocess.run(
        [*COMMAND, "eval", "-e", "std.extVar('a')", b"-V", b"a=ok\xfe"],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    assert (variable.returncode, variable.stderr) == (
        1,
        b"ERROR: -V a: not valid UTF-8 (byte 0xfe at offset 2)\n",
    )
    code = subprocess.run(
        [*COMMAND, "eval", "-e", b"'\xc3'"], capture_output=True, timeout=120, cwd=ROOT
    )
    assert (code.returncode, code.stderr) == (
        1,
        b"ERROR: <cmdline>: not valid UTF-8 (byte 0xc3 at offset 1)\n",
    )


def test_a_memory_limit_no_worker_can_start_with_is_refused_when_configured() -> None:
    with pytest.raises(InvalidArgument, match=r"memory_limit must be at least 134217728 bytes"):
        PoolConfig(memory_limit=10)
    with pytest.raises(InvalidArgument, match="a cpp worker cannot start with less"):
        PoolConfig(engine="cpp", memory_limit=MIN_MEMORY_LIMIT["cpp"] - 1)
    PoolConfig(engine="cpp", memory_limit=MIN_MEMORY_LIMIT["cpp"])
    done = cli("eval", "--memory-limit", "10", "-e", "1")
    assert (done.returncode, done.stderr) == (
        1,
        "ERROR: memory_limit must be at least 134217728 bytes (128 MiB): a go worker "
        "cannot start with less, not 10\n",
    )


@pytest.mark.parametrize("engine", ["go", "cpp"])
def test_a_worker_starts_and_answers_at_the_memory_floor(engine: str) -> None:
    """The floor is no guess: a worker given exactly that much starts and evaluates."""
    limit = format_size(MIN_MEMORY_LIMIT[engine])
    done = cli("eval", "--engine", engine, "--memory-limit", limit, "-e", "std.range(1, 1000)")
    assert (done.returncode, done.stderr) == (0, "")


# -- limits that fit a command line -----------------------------------------------------------


def test_ordinary_cli_work_fits_the_cli_limits() -> None:
    big = cli("eval", "-e", "std.range(1, 200000)")
    assert big.returncode == 0, big.stderr
    assert big.stdout.endswith("   200000\n]\n")
    help_text = cli("eval", "--help").stdout
    assert "(here: 60.0)" in help_text and "(here: 256M)" in help_text
    assert "(default: 1.0)" in cli("test", "--help").stdout  # test keeps the library's


def test_a_limit_error_is_the_documented_line_alone() -> None:
    slow = cli("eval", "--timeout", "0.5", "-e", LONG_CALL)
    assert (slow.returncode, slow.stdout) == (1, "")
    assert re.fullmatch(
        r"jsonnet-worker: EvaluationTimeout: the evaluation ran past its 0.5 s deadline "
        r"\(wall clock\); its worker was killed\n",
        slow.stderr,
    ), slow.stderr
    big = cli("eval", "--max-output", "1K", "-e", "std.range(1, 1000)")
    assert big.returncode == 1
    assert big.stderr.startswith("jsonnet-worker: OutputTooLarge: ")
    assert big.stderr.count("\n") == 1, big.stderr


def test_a_pools_lines_about_one_worker_are_not_printed(tmp_path: Path) -> None:
    """check and fmt still run a pool: its WARNING about the killed worker is not shown."""
    suite = tmp_path / "slow.test.yaml"
    suite.write_text(f"source: {LONG_CALL!r}\ncases:\n  - name: slow\n    expect: 0\n")
    done = cli("test", "--timeout", "0.5", str(suite))
    assert done.returncode == 1 and "EvaluationTimeout" in done.stdout, done
    assert "worker " not in done.stderr and "WARNING" not in done.stderr, done.stderr


# -- sizes and the version --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), ("512M", 512 << 20), ("512mib", 512 << 20), ("2G", 2 << 30),
     ("64KiB", 64 << 10), ("64k", 64 << 10), ("100B", 100), (" 3 GiB ", 3 << 30)],
)  # fmt: skip
def test_sizes_take_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5G", "10MB", "-1", "1T", "12X"])
def test_a_bad_size_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        parse_size(text)


def test_every_size_flag_takes_units() -> None:
    done = cli("eval", "--memory-limit", "512M", "--max-output", "1MiB", "--max-request", "1M",
               "-e", "std.length(std.range(1, 10))")  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "10\n", "")
    refused = cli("eval", "--memory-limit", "512X", "-e", "1")
    assert refused.returncode == 2 and "invalid size '512X'" in refused.stderr


def test_version_names_the_engines_and_their_versions() -> None:
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("jsonnet-worker ")
    # the gojsonnet binding's version is the go-jsonnet release it carries
    assert f"engine go: go-jsonnet v{metadata.version('gojsonnet')} " in done.stdout
    assert re.search(r"^engine cpp: C\+\+ jsonnet (v\d+\.\d+\.\d+|not installed)", done.stdout,
                     re.M)  # fmt: skip


# -- the one-shot worker ----------------------------------------------------------------------


def _reported_without_landlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's hello read as if its kernel had no Landlock (the real worker runs, fully
    sandboxed: only what the parent believes of it changes)."""
    real = connection.sandbox_status

    def without_landlock(hello: Any) -> SandboxStatus:
        status = real(hello)
        landlock = replace(  # a worker-side value (``_wire.values``)
            status.landlock,
            enforced=False,
            state=SupportState.DISABLED_AT_BOOT,
            reason="as if Landlock were not in the lsm= list",
        )
        return replace(status, landlock=landlock)  # a value class too

    monkeypatch.setattr(connection, "sandbox_status", without_landlock)


def _one_call(config: PoolConfig, code: str) -> tuple[str, int]:
    """(the JSON text or the error's kind, the worker's pid) of one one-shot call."""
    with OneShot(config) as worker:
        pid = worker.process.pid
        call = exchange.prepare(config, 1, Operation.EVAL, code, "t.jsonnet", None, None,
                                variables=exchange.NO_VARIABLES)  # fmt: skip
        try:
            return worker.call(call).json_text, pid
        except Error as exc:
            return exc.kind, pid


def test_the_one_shot_worker_fails_closed_without_landlock(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _reported_without_landlock(monkeypatch)
    config = PoolConfig(size=1, spares=0)
    result, pid = _one_call(config, "{a: 1}")
    assert result == SandboxUnavailable.kind
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped when the one-shot closed
    opted_out, _ = _one_call(config.replace(require_sandbox=False), "{a: 1}")
    assert json.loads(opted_out) == {"a": 1}
    # as the command writes its log lines (``command_logging``), which it enters to write it
    warning = "jsonnet-worker: WARNING: the worker's sandbox: unprotected: landlock missing: as if"
    assert warning in capsys.readouterr().err


def test_the_one_shot_worker_dies_typed_and_is_reaped() -> None:
    config = PoolConfig(size=1, spares=0, memory_limit=256 << 20, timeout=20)
    bomb = "std.length(std.makeArray(100000000, function(i) 'x' + i))"
    result, pid = _one_call(config, bomb)
    assert result == MemoryLimitExceeded.kind
    assert not Path(f"/proc/{pid}").exists()
    # The loop's heap grows too: at the bomb's 256 MiB a quick machine reached that limit
    # before the deadline (seen in CI), so it runs under the default limit.
    looping, pid = _one_call(config.replace(timeout=0.3, memory_limit=1 << 30), LONG_CALL)
    assert looping == EvaluationTimeout.kind
    assert not Path(f"/proc/{pid}").exists()


def test_main_gives_the_package_logger_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caller of ``main()`` in its own process (the tests, an embedding tool) keeps its
    logging: the command's handler is there only while the command runs."""
    logger = logging.getLogger("jsonnet_worker")
    before = (list(logger.handlers), logger.level, logger.propagate)
    source = tmp_path / "ok.jsonnet"
    source.write_text("{a: 1}\n")
    assert main.main(["eval", str(source)]) == 0
    assert main.main(["check", str(source)]) == 0
    assert (logger.handlers, logger.level, logger.propagate) == before
    assert capsys.readouterr().out == '{\n   "a": 1\n}\n'
