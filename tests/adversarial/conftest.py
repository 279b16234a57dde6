"""Tiers and the session summary of the adversarial suite.

The fast tier runs with the default ``python -m pytest -q``; the soak tier is the same tests
with the ``soak`` mark (deselected by default), sized by ``--soak-examples`` and
``--soak-seconds`` (declared in tests/conftest.py: pytest reads options only from the
top-level conftest). Both print what they tried at the end of the session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from .ledger import LEDGER


@dataclass(frozen=True)
class Tier:
    """How hard one run tries: ``examples`` per fuzz test, ``seconds`` of chaos."""

    name: str
    examples: int
    seconds: float
    corpus_repeats: int

    def hypothesis(self, examples: int | None = None) -> settings:
        """Fast: derandomized (the same examples every run); soak: random, more of them.
        Hypothesis prints the seed needed to reproduce a failure."""
        return settings(
            max_examples=examples or self.examples,
            deadline=None,
            derandomize=self.name == "fast",
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )


@pytest.fixture(scope="session", params=["fast", pytest.param("soak", marks=pytest.mark.soak)])
def tier(request: pytest.FixtureRequest) -> Tier:
    if request.param == "fast":
        return Tier("fast", examples=30, seconds=4.0, corpus_repeats=1)
    config = request.config
    return Tier(
        "soak",
        examples=config.getoption("--soak-examples"),
        seconds=config.getoption("--soak-seconds"),
        corpus_repeats=3,
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = LEDGER.summary_lines()
    if not lines:
        return
    terminalreporter.section("adversarial suite: what was tried")
    for line in lines:
        terminalreporter.write_line(line)
    target = terminalreporter.config.getoption("--reliability-json")
    if target:
        Path(target).write_text(json.dumps(LEDGER.to_json(), indent=2))
