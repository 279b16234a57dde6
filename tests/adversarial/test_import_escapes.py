"""Fuzzing against import escapes: the pool on both engines, and the barrier-less worker.

Every generated snippet must end in ``JsonnetError`` with the secret marker in no result, no
error message, no log record and no ``stats()``; the pool must answer correctly afterwards.
Without the import barrier (the harness worker) the kernel alone must refuse every read.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given

from conftest import ENGINES, harness_command
from jsonnet_worker import JsonnetError, WorkerPool
from jsonnet_worker._wire.imports import IMPORT_REFUSED
from jsonnet_worker._wire.messages import EngineKind
from rawworker import RawWorker

from .conftest import Tier
from .escapes import LITERAL_STYLES, Attempt, SecretFiles, assert_nothing_leaked, attempts, build
from .ledger import LEDGER

TIMEOUTS = {"go": 2.0, "cpp": 5.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SecretFiles:
    return SecretFiles(tmp_path_factory.mktemp("escape"))


@pytest.fixture(scope="module", params=ENGINES)
def engine_pool(request: pytest.FixtureRequest) -> Iterator[WorkerPool]:
    with WorkerPool(2, engine=request.param, timeout=TIMEOUTS[request.param]) as pool:
        yield pool


@pytest.mark.parametrize("engine", ENGINES)
def test_controls_reach_the_secret_without_a_sandbox(files: SecretFiles, engine: str) -> None:
    """The generator's plain shapes and styles do reach the secret in an unrestricted,
    in-process engine: a refusal in the worker is the sandbox's doing, not a dead path."""
    module = importlib.import_module(EngineKind(engine).module_name)
    styles = LITERAL_STYLES if engine == "go" else ("all-escaped", "text-block")
    reached = 0
    for path in files.direct_paths():
        for style in styles:
            for form in ("importstr", "import"):
                attempt = build(path, style, form, "top")
                try:
                    result = module.evaluate_snippet("control.jsonnet", attempt.snippet)
                except RuntimeError as exc:  # neither parser takes a text block in an import
                    assert style == "text-block", exc
                    assert "text block" in str(exc).lower().replace("block string", "text block")
                    continue
                assert files.marker in result
                reached += 1
    assert reached >= len(files.direct_paths()) * 2 * (len(styles) - 1)
    LEDGER.count("import-escape", engine, controls_reaching_secret=reached)


def assert_clean(text: str, files: SecretFiles, attempt: Attempt) -> None:
    assert files.marker not in text, f"secret leaked by {attempt.describe()}"


def test_pool_refuses_every_escape(
    tier: Tier, engine_pool: WorkerPool, files: SecretFiles, caplog: pytest.LogCaptureFixture
) -> None:
    pool = engine_pool
    engine = pool.engine
    caplog.set_level(logging.DEBUG)
    tried: list[int] = [0]

    @tier.hypothesis()
    @given(attempts(files))
    def attempt_escape(attempt: Attempt) -> None:
        tried[0] += 1
        with pytest.raises(JsonnetError) as caught:
            pool.evaluate(attempt.snippet, ext_codes=attempt.ext_codes, tla_codes=attempt.tla_codes)
        assert_clean(caught.value.message, files, attempt)
        assert_clean(str(caught.value), files, attempt)
        assert_clean(repr(pool.stats()), files, attempt)
        refused = IMPORT_REFUSED in caught.value.message
        LEDGER.count(
            "import-escape",
            engine,
            tried=1,
            refused_by_barrier=int(refused),
            other_jsonnet_error=int(not refused),
            escapes=0,
        )
        assert pool.evaluate("std.extVar('n') * 2", {"n": tried[0]}) == tried[0] * 2

    attempt_escape()
    assert_nothing_leaked(pool, caplog.records, files.marker)
    print(f"\nimport escapes ({tier.name}, {engine}): {tried[0]} attempts, 0 escapes")


@pytest.fixture(scope="module", params=ENGINES)
def barrierless(request: pytest.FixtureRequest) -> Iterator[RawWorker]:
    command = harness_command("no-barrier", request.param)
    with RawWorker(request.param, command=command) as raw:
        assert raw.hello.pid == raw.process.pid
        yield raw


def test_kernel_refuses_every_escape_without_the_barrier(
    tier: Tier, barrierless: RawWorker, files: SecretFiles
) -> None:
    engine = barrierless.engine
    tried: list[int] = [0]

    @tier.hypothesis()
    @given(attempts(files))
    def attempt_escape(attempt: Attempt) -> None:
        tried[0] += 1
        answer = barrierless.request(
            attempt.snippet, ext_codes=attempt.ext_codes, tla_codes=attempt.tla_codes
        )
        assert answer["t"] == "error" and answer["kind"] == "jsonnet", (attempt.describe(), answer)
        assert_clean(answer["message"], files, attempt)
        assert IMPORT_REFUSED not in answer["message"]  # the barrier really is absent
        message = answer["message"].lower()
        by_kernel = any(
            text in message for text in ("permission denied", "no such device", "no match locally")
        )
        LEDGER.count(
            "kernel-only",
            engine,
            tried=1,
            refused_by_kernel=int(by_kernel),
            other_jsonnet_error=int(not by_kernel),
            escapes=0,
        )
        control = barrierless.request("std.extVar('n') + 1", ext_codes={"n": str(tried[0])})
        assert control["t"] == "result" and json.loads(control["json"]) == tried[0] + 1

    attempt_escape()
    assert not barrierless.process.exited()
    print(f"\nkernel only ({tier.name}, {engine}): {tried[0]} attempts, 0 escapes")


def test_secret_file_is_really_there(files: SecretFiles) -> None:
    assert Path(files.secret).read_text().count(files.marker) == 1
    assert Path(files.link).resolve() == files.secret.resolve()
