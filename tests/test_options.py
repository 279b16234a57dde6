"""WorkerPool's options are typed for users: ``PoolOptions`` stays in step with
``PoolConfig`` (names and types, nothing missing or extra), and mypy, run as a user would
on a file outside the source tree, reports a misspelled or mistyped option and passes a
correct one."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import jsonnet_worker
from jsonnet_worker import PoolConfig, PoolOptions
from jsonnet_worker._options import WIDENED

# The package this test imports (the checkout under test, whatever is installed).
SOURCE_ROOT = Path(jsonnet_worker.__file__).resolve().parent.parent
POSITIONAL = "size"  # WorkerPool's own parameter, not a keyword option


def test_pool_options_name_every_pool_config_field_once() -> None:
    fields = {f.name for f in dataclasses.fields(PoolConfig)} - {POSITIONAL}
    keys = set(PoolOptions.__annotations__)
    assert keys == fields, {"missing": fields - keys, "extra": keys - fields}
    assert PoolOptions.__required_keys__ == frozenset()  # every option has its default


def test_pool_options_have_pool_config_types() -> None:
    config_types = typing.get_type_hints(PoolConfig)
    option_types = typing.get_type_hints(PoolOptions)
    for name, option_type in option_types.items():
        expected = config_types[name] | None if name in WIDENED else config_types[name]
        assert option_type == expected, (name, option_type, expected)
    # A widened option really is wider, and WorkerPool maps its None to the default.
    for name in WIDENED:
        assert typing.get_args(config_types[name]) == (), name  # PoolConfig's is not optional


USER_CORRECT = """\
    import jsonnet_worker

    options: jsonnet_worker.PoolOptions = {"timeout": 2.0, "engine": "go"}


    def traits(claims: dict[str, object]) -> object:
        config = jsonnet_worker.PoolConfig(spares=0)
        with jsonnet_worker.WorkerPool(2, config=config, max_stack=200) as pool:
            return pool.evaluate("std.extVar('claims')", {"claims": claims})


    pool = jsonnet_worker.WorkerPool(queue_limit=None, worker_user=range(1000, 1010))
    from_options = jsonnet_worker.WorkerPool(1, **options)
    """

USER_WRONG = """\
    import jsonnet_worker

    misspelled = jsonnet_worker.WorkerPool(2, timout=1.0)
    mistyped = jsonnet_worker.WorkerPool(2, spares="1")
    """


def run_mypy(tmp_path: Path, files: dict[str, str]) -> dict[str, list[str]]:
    """mypy --strict over the user's files (in tmp_path, outside the source tree), as a user
    runs it; the errors by file. The package is found on MYPYPATH (the checkout under test
    comes first, whatever the environment has installed); its own modules' lines are
    not the user's and are left out."""
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--hide-error-context",
            "--cache-dir", str(tmp_path / "mypy-cache"), *files,
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(SOURCE_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr
    errors: dict[str, list[str]] = {name: [] for name in files}
    for line in result.stdout.splitlines():
        name = line.split(":", 1)[0]
        if name in errors and ": error:" in line:
            errors[name].append(line)
    return errors


def test_mypy_reports_a_misspelled_or_mistyped_option_and_passes_correct_ones(
    tmp_path: Path,
) -> None:
    errors = run_mypy(tmp_path, {"correct.py": USER_CORRECT, "wrong.py": USER_WRONG})
    assert errors["correct.py"] == []
    wrong = errors["wrong.py"]
    assert len(wrong) == 2, wrong
    assert 'wrong.py:3: error: Unexpected keyword argument "timout" for "WorkerPool"' in wrong[0]
    assert 'wrong.py:4: error: Argument "spares" to "WorkerPool" has incompatible type' in wrong[1]
