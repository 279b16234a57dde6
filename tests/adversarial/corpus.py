"""The DoS and crash corpus: snippets and requests that try to exhaust or crash a worker.

Each ``Case`` names what it attacks and how its request is built; ``expected`` is the set of
typed errors it may end in on each engine (measured, then pinned: a case that starts ending
differently is a change to look at, not noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jsonnet_worker import (
    Error,
    EvaluationTimeout,
    JsonnetError,
    MemoryLimitExceeded,
    OutputTooLarge,
    WorkerCrashed,
)

MB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    build: Callable[[], str]  # built when run: some snippets are 10 MB
    expected: dict[str, tuple[type[Error], ...]]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _both(*errors: type[Error]) -> dict[str, tuple[type[Error], ...]]:
    return {"go": errors, "cpp": errors}


def _nest(opening: str, closing: str, depth: int) -> Callable[[], str]:
    return lambda: opening * depth + "1" + closing * depth


def _text(snippet: str) -> Callable[[], str]:
    return lambda: snippet


DOUBLE = "local d(s, n) = if n == 0 then s else d(s + s, n - 1); "


CRASH_OR_ERROR = (JsonnetError, WorkerCrashed, MemoryLimitExceeded, EvaluationTimeout)
BOMB = (MemoryLimitExceeded, EvaluationTimeout, WorkerCrashed)

CASES = [
    Case("parens-30k", "deep nesting", _nest("(", ")", 30_000), _both(*CRASH_OR_ERROR)),
    Case("arrays-30k", "deep nesting", _nest("[", "]", 30_000), _both(*CRASH_OR_ERROR)),
    Case("objects-30k", "deep nesting", _nest("{a:", "}", 30_000), _both(*CRASH_OR_ERROR)),
    Case(
        "parseJson-50k",
        "deep nesting",
        _text("std.parseJson(std.repeat('[', 50000) + std.repeat(']', 50000))"),
        _both(*CRASH_OR_ERROR),
    ),
    Case(
        "parseYaml-50k",
        "deep nesting",
        _text("std.parseYaml(std.repeat('[', 50000) + std.repeat(']', 50000))"),
        _both(*CRASH_OR_ERROR),
    ),
    Case(
        "object-plus-chain-60k",
        "long o + {...} chain",
        lambda: "local o = {a: 1};\n" + "o" + " + {a: super.a + 1}" * 60_000,
        _both(*CRASH_OR_ERROR),
    ),
    Case("makeArray-1e9", "memory bomb", _text("std.makeArray(1e9, function(i) i)"), _both(*BOMB)),
    Case("repeat-1e9", "memory bomb", _text("std.length(std.repeat('x', 1e9))"), _both(*BOMB)),
    Case(
        "range-1e9",
        "memory bomb",
        _text("std.foldl(function(a, b) a + b, std.range(1, 1e9), 0)"),
        _both(*BOMB),
    ),
    Case(
        "string-doubling",
        "memory bomb",
        _text(DOUBLE + "std.length(d('x', 40))"),
        _both(*BOMB),
    ),
    Case(
        "tailstrict-loop",
        "tailstrict loop",
        _text("local f(n) = f(n + 1) tailstrict; f(0)"),
        _both(*CRASH_OR_ERROR),
    ),
    Case(
        "exponential-object",
        "exponential object",
        _text("local e(n) = if n == 0 then {} else {a: e(n - 1), b: e(n - 1)}; e(40)"),
        _both(*BOMB, OutputTooLarge),
    ),
    Case(
        "exponential-self",
        "exponential object",
        _text(
            "local o = {a: 1, b: self.a + self.a}; local f(n) = if n == 0 then o.b "
            "else f(n - 1) + f(n - 1); f(60)"
        ),
        _both(*BOMB),
    ),
    Case(
        "error-10MB",
        "10 MB error message",
        _text(DOUBLE + "error d('x', 23) + d('y', 21)"),  # 10 MiB
        _both(JsonnetError),
    ),
    Case(
        "trace-flood",
        "std.trace flood",
        _text(
            DOUBLE + "local t = d('t', 16); "  # 64 KiB per trace, 32 MiB in all
            "std.foldl(function(a, i) std.trace(t, a + 1), std.range(1, 512), 0) + error 'end'"
        ),
        _both(JsonnetError),
    ),
    Case(
        "output-over-limit",
        "output over the limit",
        _text(DOUBLE + "d('y', 21)"),
        _both(OutputTooLarge),
    ),
    Case(
        "ext-var-1MB",
        "1 MB ext vars",
        _text("error 'big: ' + std.length(std.extVar('big'))"),
        _both(JsonnetError),
        kwargs={"ext_vars": {"big": "v" * MB}},
    ),
    Case(
        "snippet-10MB",
        "10 MB snippet",
        lambda: "error 'long' // " + "z" * (10 * MB),
        _both(JsonnetError, EvaluationTimeout),
    ),
    Case(
        "snippet-10MB-array",
        "10 MB snippet",
        lambda: "[" + "1," * (5 * MB) + "1][1] + error 'end'",
        _both(JsonnetError, EvaluationTimeout, MemoryLimitExceeded),
    ),
]
