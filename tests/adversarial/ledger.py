"""What the adversarial suite tried and what it saw, for the session summary and the report.

Goals: every test says what it tried (cases per category and engine) and what it measured
(escapes, crashes survived, requests lost, zombies, leaked fds, recovery times), so both tiers
print it and the report renders it without re-running anything.

Plan: one process-wide ``LEDGER``; tests call ``count`` and ``measure``; the conftest prints
``summary_lines()`` at the end of the session and, with ``--reliability-json``, writes
``to_json()``.

Weak spots: counts are per test session; a test that fails half way has recorded what it
did up to there (which is what a report of a failing run should show).
"""

from __future__ import annotations

import collections
import statistics
import threading
from typing import Any


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.samples: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
        self.notes: dict[str, str] = {}

    def count(self, category: str, engine: str, **counters: int) -> None:
        with self._lock:
            self.counts[category, engine].update(counters)

    def measure(self, category: str, engine: str, name: str, value: float) -> None:
        with self._lock:
            self.samples[category, engine, name].append(value)

    def note(self, key: str, value: str) -> None:
        with self._lock:
            self.notes[key] = value

    @staticmethod
    def describe(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "n": len(ordered),
            "min": ordered[0],
            "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "max": ordered[-1],
        }

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counts": [
                    {"category": category, "engine": engine, **dict(counter)}
                    for (category, engine), counter in sorted(self.counts.items())
                ],
                "samples": [
                    {"category": c, "engine": e, "name": n, **self.describe(v)}
                    for (c, e, n), v in sorted(self.samples.items())
                    if v
                ],
                "notes": dict(self.notes),
            }

    def summary_lines(self) -> list[str]:
        data = self.to_json()
        lines = []
        for row in data["counts"]:
            fields = ", ".join(
                f"{k}={v}" for k, v in row.items() if k not in ("category", "engine")
            )
            lines.append(f"{row['category']:<16} {row['engine']:<4} {fields}")
        for row in data["samples"]:
            lines.append(
                f"{row['category']:<16} {row['engine']:<4} {row['name']}: n={row['n']} "
                f"min={row['min']:.1f} p50={row['p50']:.1f} p95={row['p95']:.1f} "
                f"max={row['max']:.1f}"
            )
        return lines


LEDGER = Ledger()
