"""Evaluate untrusted Jsonnet in sandboxed worker processes.

    import jsonnet_worker
    traits = jsonnet_worker.evaluate(mapper_source, {"claims": claims})

See README.md for the pool, asyncio, the CLI and the sandbox.
"""

from ._allowlist import HostAllowList
from ._config import PoolConfig
from ._default import aevaluate, evaluate, get_default_pool, set_default_pool
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
from ._host import HostSandbox, restrict_host
from ._kratos import kratos_allow_list
from ._options import PoolOptions
from ._pool.facade import WorkerPool
from ._pool.tracing import last_call
from ._report import (
    CallInfo,
    PoolStats,
    SandboxStatus,
    SandboxVerdict,
    TenantStats,
    judge_sandbox,
)
from ._sandbox.landlock import LandlockStatus
from ._wire.layers import LayerState, LayerStatus

__version__ = "0.1.0"

__all__ = [
    "CallInfo",
    "Error",
    "ForkedPool",
    "InvalidArgument",
    "InvalidType",
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
    "evaluate",
    "get_default_pool",
    "judge_sandbox",
    "kratos_allow_list",
    "last_call",
    "restrict_host",
    "set_default_pool",
]
