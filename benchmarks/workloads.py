"""The benchmark workloads: the same snippets and inputs for every contender."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import bench_latency
from jsonnet_worker._worker.capi import CapiEngine

ROOT = Path(__file__).resolve().parent.parent
SHARED_BENCH = bench_latency.SHARED_BENCH


@dataclass(frozen=True)
class Workload:
    name: str
    snippet: str
    ext_codes: dict[str, str] = field(default_factory=dict)
    tla_codes: dict[str, str] = field(default_factory=dict)
    filename: str = "bench.jsonnet"

    def evaluate_in_process(self, engine: object) -> str:
        result: str = engine.evaluate_snippet(  # type: ignore[attr-defined]
            self.filename, self.snippet, ext_codes=self.ext_codes, tla_codes=self.tla_codes
        )
        return result

    def evaluate_capi(self, capi: CapiEngine, ext_codes: dict[str, str] | None = None) -> str:
        """Through the workers' C API path (``_worker.capi``), in this process: no sandbox, no IPC;
        ``ext_codes`` in place of the workload's (a fresh text per call defeats no cache)."""
        return capi.evaluate_snippet(
            self.filename,
            self.snippet,
            ext_vars={},
            ext_codes=self.ext_codes if ext_codes is None else ext_codes,
            tla_vars={},
            tla_codes=self.tla_codes,
            max_stack=500,
            max_trace=20,
        )


def light() -> Workload:
    """The reference light workload: a Kratos-style OIDC mapper (../shared/bench), or the
    bundled Google mapper where shared/ is absent."""
    if (SHARED_BENCH / "oidc-mapper.jsonnet").exists():
        return Workload(
            "light OIDC mapper",
            (SHARED_BENCH / "oidc-mapper.jsonnet").read_text(),
            ext_codes={"claims": (SHARED_BENCH / "claims.json").read_text()},
            filename="oidc-mapper.jsonnet",
        )
    return Workload(
        "light OIDC mapper (bundled)",
        (ROOT / "fixtures" / "oidc-google.jsonnet").read_text(),
        ext_codes={"claims": (ROOT / "fixtures" / "claims-google.json").read_text()},
        filename="oidc-google.jsonnet",
    )


def courier() -> Workload:
    return Workload(
        "courier template (ctx)",
        (ROOT / "fixtures" / "courier-sms.jsonnet").read_text(),
        tla_codes={"ctx": (ROOT / "fixtures" / "courier-ctx.json").read_text()},
        filename="courier-sms.jsonnet",
    )


def heavy() -> Workload:
    return Workload(
        "heavy mapper (~1 ms)",
        (ROOT / "fixtures" / "heavy-mapper.jsonnet").read_text(),
        ext_codes={"claims": (ROOT / "fixtures" / "claims-heavy.json").read_text()},
        filename="heavy-mapper.jsonnet",
    )


def sized_input(size: int) -> Workload:
    """A mapper whose ext var is about ``size`` bytes of JSON; the output stays small."""
    item = {"k": "v" * 40}
    count = max(1, size // (len(json.dumps(item)) + 1))
    return Workload(
        f"ext var {size} B",
        "local c = std.extVar('claims'); {n: std.length(c.items), first: c.items[0].k}",
        ext_codes={"claims": json.dumps({"items": [item] * count})},
    )


def sized_output(size: int) -> Workload:
    """A snippet whose manifested JSON is about ``size`` bytes."""
    count = max(1, size // 48)
    return Workload(
        f"output {size} B",
        f"std.makeArray({count}, function(i) 'item-' + i + '-' + std.repeat('x', 24))",
    )
