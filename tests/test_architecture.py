"""The package's architecture, checked on the real thing (issue 20, item 2).

- A live worker, re-executed exactly as the pool starts one and asked to evaluate, imports
  only the worker side, the sandbox primitives and the wire format: what runs inside the
  sandbox is one unit that holds nothing of the pool. An audit hook put in front of the real
  bootstrap reports every ``jsonnet_worker`` module the process imports, on its stderr.
- Importing the package (the pool, the CLI, the service) loads no worker-side module.
- No module-level import cycle exists anywhere in the package.

The import contracts in pyproject.toml (``lint-imports``) state the same layers statically;
these tests check what a process really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from jsonnet_worker._pool.processes import WorkerSettings, worker_command
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME
from rawworker import RawWorker

PACKAGE = Path(__file__).resolve().parent.parent / "jsonnet_worker"
WORKER_SIDE = ("jsonnet_worker._worker", "jsonnet_worker._sandbox", "jsonnet_worker._wire")
MARK = "imported-module:"
# Prepended to the worker's own bootstrap: report each jsonnet_worker module as it is imported.
AUDIT_HOOK = (
    "import sys\n"
    "def _report(event, args):\n"
    "    if event == 'import' and str(args[0]).startswith('jsonnet_worker'):\n"
    f"        sys.stderr.write('{MARK}' + str(args[0]) + '\\n'); sys.stderr.flush()\n"
    "sys.addaudithook(_report)\n"
)


def worker_side(module: str) -> bool:
    return module == "jsonnet_worker" or module.startswith(tuple(f"{p}" for p in WORKER_SIDE))


def test_a_live_worker_loads_only_the_worker_side() -> None:
    command = worker_command(WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME))
    assert command[3] == "-c"
    command[4] = AUDIT_HOOK + command[4]
    with RawWorker(command=command) as worker:
        answer = worker.request("std.manifestYamlDoc({a: [1, 2]}) + std.md5('x')")
        assert answer["t"] == "result"
        worker.process.close(grace=5.0)
        worker.process.drain_stderr()
        stderr = worker.process.stderr.text()
    imported = {line[len(MARK) :] for line in stderr.splitlines() if line.startswith(MARK)}
    # The hook sees the start-up (a positive control: an empty set would prove nothing).
    assert {"jsonnet_worker._worker.bootstrap", "jsonnet_worker._worker.startup"} <= imported
    assert {module for module in imported if not worker_side(module)} == set()


def test_importing_the_package_loads_no_worker_side_module() -> None:
    probe = (
        "import sys, jsonnet_worker, jsonnet_worker.compat, jsonnet_worker.service, "
        "jsonnet_worker._cli.main\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('jsonnet_worker'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "jsonnet_worker._pool.facade" in loaded  # the probe imported the pool
    assert [m for m in loaded if m.startswith("jsonnet_worker._worker")] == []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports when it is loaded: imports at module level, not
    inside functions (deferred on purpose) nor under ``if TYPE_CHECKING``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # a submodule imported by name
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
    found.discard(name)
    return found


def test_no_import_cycle_in_the_package() -> None:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): top_level_imports(path, modules) for path in paths}
    assert graph["jsonnet_worker._pool.facade"]  # the walk finds imports at all

    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []
