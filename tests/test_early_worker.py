"""``eval``'s worker started on the command's first line (``_cli.early``), before its config
exists (issue 23, item 6: the command as quick as jsonnet's).

- The worker predicted from a command line is the one its config asks for (command line and
  environment), for the default and for each worker-shaping flag given plainly, whatever
  the environment variables; the call then uses it (handed over, not restarted).
- A prediction the config contradicts (an abbreviated flag argparse reads, a value given
  twice) is caught: that worker is killed and reaped and the right one used.
- Started as ``subprocess`` starts a pool's worker: its own session, SIGPIPE and SIGXFSZ at
  their defaults, no inheritable fd of the command's (checked from outside, in /proc).
- Nothing is left behind on any path: a run's worker is reaped by the command itself on
  success, a bad flag, a bad file, an empty -o, a mismatch, and Ctrl-C before the worker
  was handed over. The real command runs under a subreaper that would inherit any child
  the command left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import proc_stat
from jsonnet_worker._cli import commands, early
from jsonnet_worker._cli import main as cli
from jsonnet_worker._pool.connection import WorkerConnection
from jsonnet_worker._pool.launch import await_hello
from jsonnet_worker._pool.processes import (
    WorkerProcess,
    settings_for,
    worker_command,
    worker_environment,
)

ROOT = Path(__file__).resolve().parent.parent

# Each a command line whose every worker-shaping option is given plainly (or not at all).
PREDICTABLE = [
    ["eval", "file.jsonnet"],
    ["eval", "-e", "{a: 1}", "--memory-limit", "512M", "-V", "x=1"],
    ["eval", "file.jsonnet", "--engine=cpp", "--cpu-budget", "none"],  # None: the default
    ["eval", "file.jsonnet", "--max-request", "1M", "--worker-user", "none"],
    ["eval", "file.jsonnet", "--cpu-budget", "12.5", "--allow-unsandboxed", "-o", "out"],
]
# argparse reads each otherwise than the hand-written reading: another worker is asked for.
MISPREDICTED = [
    ["eval", "file.jsonnet", "--memory", "512M"],  # an abbreviation argparse accepts
    ["eval", "file.jsonnet", "--cpu", "7"],
]


def config_of(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment the full config of ``argv`` gives its worker."""
    args = commands.build_parser(argv).parse_args(argv)
    settings = settings_for(commands.pool_config(args, commands.CLI_LIMITS))
    identity = settings.identities.acquire()
    return worker_command(settings, identity), worker_environment(settings)


@pytest.mark.parametrize("argv", PREDICTABLE, ids=lambda argv: " ".join(argv[2:]) or "default")
def test_the_predicted_worker_is_the_one_the_config_asks_for(argv: list[str]) -> None:
    assert early.predicted_command(argv) == config_of(argv)


def test_no_environment_variable_shapes_an_eval_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's overrides and the import path are not the command's worker settings:
    the prediction, which reads none, stays the config's."""
    monkeypatch.setenv("JSONNET_WORKER_POOL_MEMORY_LIMIT", str(512 << 20))
    monkeypatch.setenv("JSONNET_WORKER_POOL_ENGINE", "cpp")
    monkeypatch.setenv("JSONNET_PATH", "/nonexistent")
    argv = ["eval", "file.jsonnet"]
    assert early.predicted_command(argv) == config_of(argv)


@pytest.mark.parametrize("argv", MISPREDICTED, ids=lambda argv: argv[2])
def test_a_misreading_predicts_another_worker(argv: list[str]) -> None:
    predicted = early.predicted_command(argv)
    assert predicted is not None and predicted != config_of(argv)


def test_no_worker_is_predicted_for_another_command_or_help() -> None:
    for argv in (
        ["check", "x"],
        ["eval", "x", "--help"],
        ["eval", "x", "--worker-user", "1-9"],  # a uid each: not speculated on
        ["eval", "x", "--memory-limit", "lots"],  # refused by the command, with its message
        ["eval", "x", "--cpu-budget", "soon"],
    ):
        assert early.predicted_command(argv) is None, argv


def reaped(pid: int) -> bool:
    """Whether ``pid`` is no longer a child of this process (reaped, never a zombie)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return False


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> early.EarlyWorker:
    """``argv`` run as the console script runs it, in this process; its early worker."""
    worker = early.start(argv)
    assert worker is not None
    with worker:
        assert cli.main(argv, worker) == 0
    assert json.loads(capsys.readouterr().out) == {"a": 1}
    assert not worker.owned and reaped(worker.pid)
    return worker


def test_the_call_uses_the_predicted_worker(capsys: pytest.CaptureFixture[str]) -> None:
    worker = run_in_process(["eval", "-e", "{a: 1}", "--memory-limit", "512M"], capsys)
    assert worker.handed_over


def test_a_mispredicted_worker_is_killed_and_the_right_one_used(
    capsys: pytest.CaptureFixture[str],
) -> None:
    worker = run_in_process(["eval", "-e", "{a: 1}", "--memory", "512M"], capsys)
    assert not worker.handed_over


def test_ctrl_c_before_the_hand_over_reaps_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: object) -> tuple[str, ...]:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "search_paths", interrupted)  # before the config is built
    argv = ["eval", "-e", "1"]
    worker = early.start(argv)
    assert worker is not None
    with worker:
        assert cli.main(argv, worker) == commands.EXIT_INTERRUPTED
        assert worker.owned  # nobody took it: the console script's close is what reaps it
    assert not worker.handed_over and reaped(worker.pid)


# glibc's own signals (SIGCANCEL 32, SIGSETXID 33, below SIGRTMIN): posix_spawn leaves them
# ignored in the child, glibc sets its handler where it uses one, and Python cannot name them.
GLIBC_SIGNALS = (1 << 31) | (1 << 32)


def status_of(pid: int) -> dict[str, object]:
    """What the spawn decided for process ``pid``, read from outside."""
    fields = proc_stat(pid)
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "own session": int(fields[3]) == pid,
        "ignored": int(status["SigIgn"], 16) & ~GLIBC_SIGNALS,
        "blocked": status["SigBlk"],
        "fds": sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")),
    }


def test_started_as_a_pool_starts_its_workers() -> None:
    settings = settings_for(
        commands.pool_config(commands.build_parser().parse_args(["eval", "x"]), commands.CLI_LIMITS)
    )
    stray_read, stray_write = os.pipe()  # an fd the command inherited, say from its shell
    os.set_inheritable(stray_read, True)
    early_worker = early.start(["eval", "x"])
    assert early_worker is not None
    adopted = early_worker.worker_for(settings)
    spawned = WorkerProcess(settings)
    try:
        assert adopted is not None
        seen = []
        for process in (adopted, spawned):
            await_hello(process, WorkerConnection(1 << 20))
            seen.append(status_of(process.pid))
        assert seen[0] == seen[1]
        assert seen[0]["own session"] is True
    finally:
        os.close(stray_read)
        os.close(stray_write)
        spawned.close()
        if adopted is not None:
            adopted.close()
        early_worker.close()


# Runs the command as a child of a subreaper: a child the command leaves behind becomes this
# script's when the command exits, where waitpid finds it (alive or a zombie).
SUBREAPER = """
import ctypes, json, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
done = subprocess.run([sys.executable, "-m", "jsonnet_worker", *sys.argv[1:]],
                      capture_output=True, text=True, timeout=120)
try:
    left = os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    left = None
print(json.dumps([done.returncode, done.stdout, done.stderr, left]))
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["eval", "-e", "{a: 1}"], 0),
        (["eval", "-e", "{a: 1}", "--memory", "512M"], 0),  # mispredicted
        (["eval", "-e", "1", "--no-such-flag"], 2),  # argparse's usage error
        (["eval", "/no/such/file.jsonnet"], 1),
        (["eval", "-e", "1", "-o", ""], 1),  # refused before the worker is asked for
        (["eval", "-e", "1", "--memory-limit", "1"], 1),  # a config PoolConfig refuses
    ],
    ids=["ok", "mispredicted", "bad-flag", "bad-file", "empty-o", "bad-config"],
)
def test_the_command_leaves_no_process_behind(argv: list[str], code: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SUBREAPER, *argv],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=True,
    )
    returncode, _, stderr, left = json.loads(done.stdout)
    assert returncode == code, stderr
    assert left is None, f"the command left a child behind: {left}"
