"""``jsonnet-worker eval`` does only what one call needs before and beside its worker
(issue 23: the command as quick as jsonnet's).

- The parser built for a command line adds the flags of the command it names only, and
  parses every command's line exactly as the parser with every command's flags does; its
  help is argparse's stock formatter's at any width, without ``shutil`` (eval never loads it).
- ``eval`` loads none of what only a pool or a tracer needs (OpenTelemetry, asyncio, the
  pool's facade, its state machine, supervisor, fairness, accounting and tracing, the
  steps only a pool's call takes, the pool's counters (``_stats``), logging when its
  sandbox is complete), checked in a real process that ran the command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jsonnet_worker._cli import commands, main

COMMAND_LINES = [
    ["eval", "-e", "{a: 1}", "--memory-limit", "512M", "-V", "x=1", "--mem", "256M"],
    ["eval", "file.jsonnet", "-o", "out", "--allow-unsandboxed", "--engine", "go"],
    ["test", "suite.yaml", "-k", "one", "--update", "--size", "3"],
    ["check", "a.jsonnet", "b.jsonnet", "--timeout", "2"],
    ["fmt", "a.jsonnet", "-n", "4", "--no-pad-objects", "--string-style", "d"],
    ["doctor", "--engine", "cpp"],
    ["serve", "--port", "1", "--workers", "2", "--no-access-log"],
]


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=[argv[0] for argv in COMMAND_LINES])
def test_a_command_line_parses_as_with_every_commands_flags(argv: list[str]) -> None:
    assert main.build_parser(argv).parse_args(argv) == main.build_parser().parse_args(argv)


def test_only_the_named_commands_flags_are_built() -> None:
    for_eval = main.build_parser(["eval", "x"])
    assert for_eval.parse_args(["eval", "x", "--memory-limit", "1G"]).pool_memory_limit == 1 << 30
    for other in (["check", "x", "--timeout", "2"], ["fmt", "x", "--indent", "4"]):
        with pytest.raises(SystemExit):  # "unrecognized arguments": not built
            for_eval.parse_args(other)
        main.build_parser().parse_args(other)  # no command named (--help): every flag


@pytest.mark.parametrize("columns", ["37", "81", "200", "", "not a number"])
@pytest.mark.parametrize("argv", [["eval", "x"], ["fmt", "x"], []], ids=["eval", "fmt", "all"])
def test_help_is_argparse_s_at_the_terminal_s_width(
    monkeypatch: pytest.MonkeyPatch, columns: str, argv: list[str]
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    ours = [main.build_parser(argv).format_help(), main.build_parser(argv).format_usage()]
    monkeypatch.setattr(commands, "help_formatter", lambda: argparse.HelpFormatter)
    stock = [main.build_parser(argv).format_help(), main.build_parser(argv).format_usage()]
    assert ours == stock


# The pool's modules no one-call command needs (``_pool.exchange`` has the steps it takes).
POOL_ONLY = ("facade", "calls", "supervisor", "state", "fairness", "accounting", "tracing")
# Run in a fresh interpreter: eval, then what it loaded (on its own line after the output).
PROBE = (
    "import sys, json\n"
    "from jsonnet_worker._cli.main import main\n"
    "code = main(['eval', '-e', '{a: 1}'])\n"
    "print(json.dumps([code, sorted(sys.modules)]))\n"
)


def test_eval_loads_nothing_only_a_pool_or_a_tracer_needs() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    code, modules = json.loads(done.stdout.splitlines()[-1])
    assert code == 0 and '"a": 1' in done.stdout
    assert "jsonnet_worker._pool.exchange" in modules  # the probe saw the call's modules
    loaded = {name.partition(".")[0] for name in modules} | set(modules)
    only_a_pools = {"opentelemetry", "asyncio", "logging", "concurrent", "jsonnet_worker._default"}
    only_a_pools.add("shutil")  # argparse's formatters read the width through it (help_formatter)
    only_a_pools |= {f"jsonnet_worker._pool.{name}" for name in POOL_ONLY}
    only_a_pools.add("jsonnet_worker._stats")  # a pool's counters: a command counts nothing
    assert loaded.isdisjoint(only_a_pools), sorted(loaded & only_a_pools)


def test_an_input_that_imports_nothing_collects_no_library(tmp_path: Path) -> None:
    """Without the word ``import`` (``import``, ``importstr`` and ``importbin`` are
    keywords) there is nothing to collect: eval loads neither the collector nor the set's
    digest (hashlib). With it, the files are collected and served as before."""
    (tmp_path / "lib.libsonnet").write_text("{b: 2}")
    with_import = PROBE.replace("'{a: 1}'", "'(import \"lib.libsonnet\") + {a: 1}'")
    answers = []
    for probe in (PROBE, with_import):
        done = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            cwd=tmp_path,
        )
        answers.append(json.loads(done.stdout.splitlines()[-1]))
        assert '"a": 1' in done.stdout and (probe == PROBE or '"b": 2' in done.stdout)
    (code, modules), (code_with, modules_with) = answers
    assert code == 0 and code_with == 0
    assert {"jsonnet_worker._imports", "hashlib"}.isdisjoint(modules)
    assert {"jsonnet_worker._imports", "hashlib"} <= set(modules_with)
