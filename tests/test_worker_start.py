"""A worker's start-up, made quicker (issue 23: ``eval`` of a small file): what it reads from
its command line, the engine copied into its memfd, and what a worker imports.

- ``startup.parse_args`` reads the command line ``processes.worker_command`` writes (by
  hand, not argparse): every option comes back as it was given, and a command line that is
  wrong in any way is a start-up failure that says what is wrong, never a default.
- ``engines.prepare`` copies into the memfd, with ``sendfile``, exactly the installed
  extension's bytes that the loader maps (``elf.loaded_size``), and nothing after them.
- A worker (not a fork server) imports nothing of the fork server, checked on a live worker
  from outside (``-X importtime`` reports each import on its stderr).
"""

from __future__ import annotations

import errno
import importlib.util
import os

import pytest

from jsonnet_worker._errors import WorkerStartError
from jsonnet_worker._pool.connection import WorkerConnection
from jsonnet_worker._pool.identities import WorkerIdentities
from jsonnet_worker._pool.launch import await_hello, launch_and_greet
from jsonnet_worker._pool.processes import WorkerProcess, WorkerSettings, worker_command
from jsonnet_worker._sandbox.elf import loaded_size
from jsonnet_worker._sandbox.privileges import WorkerIdentity
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME
from jsonnet_worker._wire.messages import WORKER_COMMAND, EngineKind
from jsonnet_worker._worker import engines, startup


def worker_argv(command: list[str]) -> list[str]:
    """What ``startup.main`` gets: the words after the mode (``bootstrap`` passes
    ``sys.argv[2:]``; ``sys.argv[0]`` of ``python -c`` is ``-c``)."""
    return command[command.index(WORKER_COMMAND) + 1 :]


@pytest.mark.parametrize(
    ("settings", "identity"),
    [
        (WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME), None),
        (
            WorkerSettings("cpp", 256 << 20, 4096, WorkerIdentities(None), cpu_budget=2.5),
            WorkerIdentity("nobody", 65534, 65534),
        ),
        (WorkerSettings("go", 300 << 20, 1 << 20), WorkerIdentity("u", 70001, 70002, True)),
    ],
)
def test_the_command_line_the_pool_writes_is_read_back_whole(
    settings: WorkerSettings, identity: WorkerIdentity | None
) -> None:
    options = startup.parse_args(worker_argv(worker_command(settings, identity)))
    assert options == startup.WorkerOptions(
        engine=EngineKind(settings.engine),
        memory_limit=settings.memory_limit,
        parent_pid=os.getpid(),
        max_frame=settings.max_frame,
        identity=identity,
        cpu_budget=settings.cpu_budget,
    )


def test_the_engine_api_option_is_read() -> None:
    argv = ["--engine", "go", "--memory-limit", "1", "--parent-pid", "1"]
    assert startup.parse_args(argv).engine_api == "auto"
    assert startup.parse_args([*argv, "--engine-api", "binding"]).engine_api == "binding"


REQUIRED = ["--engine", "go", "--memory-limit", "1073741824", "--parent-pid", "1"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([*REQUIRED, "--memory", "5"], "'--memory' unknown"),
        ([*REQUIRED, "--uid"], "'--uid' unknown or without a value"),
        ([*REQUIRED, "extra"], "'extra' unknown"),
        (REQUIRED[2:], "--engine missing"),
        (REQUIRED[:4], "--parent-pid missing"),
        (["--engine", "rust", *REQUIRED[2:]], "'rust' is not a valid EngineKind"),
        ([*REQUIRED[:3], "1G", *REQUIRED[4:]], "invalid literal for int()"),
        ([*REQUIRED, "--cpu-budget", "lots"], "could not convert string to float"),
        ([*REQUIRED, "--engine-api", "fast"], "--engine-api 'fast'"),
    ],
)
def test_a_wrong_command_line_is_refused_with_its_reason(argv: list[str], says: str) -> None:
    with pytest.raises(startup.StartupError, match="bad worker command line") as refused:
        startup.parse_args(argv)
    assert says in str(refused.value)


def test_a_worker_started_with_a_wrong_command_line_says_why_and_exits() -> None:
    settings = WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME)
    command = [*worker_command(settings), "--no-such-option", "1"]
    with pytest.raises(WorkerStartError, match="bad worker command line: '--no-such-option'"):
        launch_and_greet(settings, command, timeout=20.0)


@pytest.mark.parametrize("kind", list(EngineKind), ids=[kind.value for kind in EngineKind])
def test_the_memfd_holds_what_the_loader_maps_of_the_extension(kind: EngineKind) -> None:
    """Byte for byte, and not the symbol tables and debug information after it (which
    nothing maps); a worker of each engine loads it (every other worker test)."""
    spec = importlib.util.find_spec(kind.module_name)
    if spec is None or not spec.origin:
        pytest.skip(f"{kind.module_name} is not installed")
    prepared = engines.prepare(kind)
    try:
        with open(spec.origin, "rb") as installed:
            whole = installed.read()
        size = os.fstat(prepared.memfd).st_size
        assert size == loaded_size(spec.origin) < len(whole)
        assert os.pread(prepared.memfd, size + 1, 0) == whole[:size]
    finally:
        os.close(prepared.memfd)


def test_where_sendfile_cannot_read_the_file_it_is_read_and_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = importlib.util.find_spec(EngineKind.GO.module_name)
    assert spec is not None and spec.origin

    def refused(*args: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", refused)
    prepared = engines.prepare(EngineKind.GO)
    try:
        size = loaded_size(spec.origin)
        with open(spec.origin, "rb") as installed:
            assert os.pread(prepared.memfd, size + 1, 0) == installed.read(size)
    finally:
        os.close(prepared.memfd)


def test_the_loaded_size_is_where_the_last_segment_ends() -> None:
    """Read again here, field by field (Elf64_Ehdr, Elf64_Phdr): the furthest end of a
    segment's bytes in the file, past the header table."""
    spec = importlib.util.find_spec(EngineKind.GO.module_name)
    assert spec is not None and spec.origin
    with open(spec.origin, "rb") as elf:
        data = elf.read()

    def field(offset: int, size: int) -> int:
        return int.from_bytes(data[offset : offset + size], "little")

    table, entry_size, count = field(0x20, 8), field(0x36, 2), field(0x38, 2)
    ends = [field(table + i * entry_size + 8, 8) + field(table + i * entry_size + 32, 8)
            for i in range(count)]  # fmt: skip
    assert table + entry_size * count <= max(ends) == loaded_size(spec.origin) < len(data)


def test_a_worker_imports_nothing_of_the_fork_server() -> None:
    settings = WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME)
    command = worker_command(settings)
    command[1:1] = ["-X", "importtime"]  # each import, on the worker's stderr
    process = WorkerProcess(settings, command)
    try:
        process.stderr.head_limit = 1 << 20  # keep every line, not a head and a tail
        await_hello(process, WorkerConnection(1 << 20), timeout=20.0)
    finally:
        process.close()
    imported = {line.rpartition("|")[2].strip() for line in process.stderr.text().splitlines()}
    assert "jsonnet_worker._worker.startup" in imported  # the report is there at all
    assert "jsonnet_worker._worker.forkserver" not in imported
    assert "jsonnet_worker._wire.control" not in imported


def test_the_binding_path_waits_for_the_go_runtime_before_the_engine_exists() -> None:
    """go-jsonnet's extension starts the Go runtime on a thread of its own and dlopen returns
    before it is ready. The C API path waits for it (its probe VM); the binding path enters
    the engine once while the Engine is built, so nothing after ``load_engine`` (the memory
    headroom's bisection maps most of the limit) runs beside a runtime still mapping its heap:
    before, a binding worker sometimes died just after its hello, "fatal error: out of
    memory allocating heap arena map" (3 of ~70 runs of ``test_libraries``' go-binding
    cases here, and once in CI)."""
    import types

    calls: list[tuple[str, str]] = []
    binding = types.ModuleType("_gojsonnet")

    def evaluate_snippet(filename: str, snippet: str, **_: object) -> str:
        calls.append((filename, snippet))
        return "null\n"

    binding.evaluate_snippet = evaluate_snippet  # type: ignore[attr-defined]
    engine = engines.Engine(EngineKind.GO, binding, prefer_capi=False)
    assert engine.api.startswith("binding")
    assert calls == [("<start>", "null")]
    calls.clear()
    engines.Engine(EngineKind.CPP, binding)  # no Go runtime: nothing to wait for
    assert calls == []

    def broken(filename: str, snippet: str, **_: object) -> str:
        raise RuntimeError("no runtime")

    binding.evaluate_snippet = broken  # type: ignore[attr-defined]
    with pytest.raises(engines.EngineLoadError, match="cannot evaluate 'null': no runtime"):
        engines.Engine(EngineKind.GO, binding, prefer_capi=False)  # a start-up failure
