"""Evaluate untrusted Jsonnet in sandboxed worker processes.

    import jsonnet_worker
    traits = jsonnet_worker.evaluate(mapper_source, {"claims": claims})

See README.md for the pool, asyncio, the CLI and the sandbox.
"""

import importlib

from ._errors import (
    Error,
    EvaluationTimeout,
    ForkedPool,
    HostSandboxError,
    InputTooLarge,
    InvalidArgument,
    InvalidType,
    JsonnetError,
    MemoryLimitExceeded,
    OutputTooLarge,
    Overloaded,
    PoolClosed,
    ProtocolError,
    SandboxConfigError,
    SandboxUnavailable,
    TenantOverloaded,
    UnsupportedPlatform,
    WorkerCrashed,
    WorkerStartError,
)

# typing's TYPE_CHECKING without importing typing: ``eval`` starts its worker once this
# package is imported (``_cli.main``), and typing would delay it by ~8 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:  # what the names below are; imported when first used (``__getattr__``)
    from typing import Any

    from ._allowlist import HostAllowList
    from ._config import PoolConfig
    from ._default import (
        aevaluate,
        aevaluate_multi,
        aevaluate_stream,
        aevaluate_string,
        evaluate,
        evaluate_multi,
        evaluate_stream,
        evaluate_string,
        get_default_pool,
        set_default_pool,
    )
    from ._host import HostSandbox, restrict_host
    from ._kratos import kratos_allow_list
    from ._library import Library
    from ._options import PoolOptions
    from ._pool.facade import WorkerPool
    from ._pool.tracing import last_call
    from ._report import SandboxStatus, SandboxVerdict, judge_sandbox
    from ._sandbox.landlock import LandlockStatus
    from ._stats import CallInfo, PoolStats, TenantStats
    from ._wire.layers import LayerState, LayerStatus
    from ._wire.messages import FormatStyle

# Where each name that is not imported above lives. Imported on first use: the command
# line's ``eval`` needs none of the pool's modules (asyncio among them), and importing them
# all would be most of its start-up.
_LAZY = {
    "HostAllowList": "._allowlist",
    "PoolConfig": "._config",
    "aevaluate": "._default",
    "aevaluate_multi": "._default",
    "aevaluate_stream": "._default",
    "aevaluate_string": "._default",
    "evaluate": "._default",
    "evaluate_multi": "._default",
    "evaluate_stream": "._default",
    "evaluate_string": "._default",
    "get_default_pool": "._default",
    "set_default_pool": "._default",
    "HostSandbox": "._host",
    "restrict_host": "._host",
    "kratos_allow_list": "._kratos",
    "Library": "._library",
    "PoolOptions": "._options",
    "WorkerPool": "._pool.facade",
    "last_call": "._pool.tracing",
    "SandboxStatus": "._report",
    "SandboxVerdict": "._report",
    "judge_sandbox": "._report",
    "LandlockStatus": "._sandbox.landlock",
    "CallInfo": "._stats",
    "PoolStats": "._stats",
    "TenantStats": "._stats",
    "LayerState": "._wire.layers",
    "LayerStatus": "._wire.layers",
    "FormatStyle": "._wire.messages",
}


def __getattr__(name: str) -> "Any":
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later reads find it without this function
    return value


__version__ = "0.1.0"

__all__ = [
    "CallInfo",
    "Error",
    "ForkedPool",
    "FormatStyle",
    "InvalidArgument",
    "InvalidType",
    "Library",
    "PoolConfig",
    "PoolOptions",
    "UnsupportedPlatform",
    "EvaluationTimeout",
    "HostAllowList",
    "HostSandbox",
    "HostSandboxError",
    "InputTooLarge",
    "JsonnetError",
    "LandlockStatus",
    "LayerState",
    "LayerStatus",
    "MemoryLimitExceeded",
    "OutputTooLarge",
    "Overloaded",
    "PoolClosed",
    "PoolStats",
    "ProtocolError",
    "SandboxConfigError",
    "SandboxStatus",
    "SandboxUnavailable",
    "SandboxVerdict",
    "TenantOverloaded",
    "TenantStats",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerStartError",
    "aevaluate",
    "aevaluate_multi",
    "aevaluate_stream",
    "aevaluate_string",
    "evaluate",
    "evaluate_multi",
    "evaluate_stream",
    "evaluate_string",
    "get_default_pool",
    "judge_sandbox",
    "kratos_allow_list",
    "last_call",
    "restrict_host",
    "set_default_pool",
]
