"""What a worker's start imports, and why it can leave ``typing``, ``json``, ``re`` and
``dataclasses`` out (issue 23, item 6: a quicker worker start, for every worker).

- A live worker, started exactly as the pool starts one and asked to evaluate (a string
  variable with a NUL: JSON code) and to format, never imports ``typing``, ``json``,
  ``dataclasses``, ``inspect``, ``re``, ``signal`` or ``contextlib`` (an audit hook in
  front of the real bootstrap reports each import of them).
- The worker side's values (``_wire.values.valueclass``) have the same fields in a process
  without ``typing`` (as a worker runs) as in one with it (as the pool runs), so a message
  is one shape on both sides of the wire; and none of its classes is a dataclass.
"""

from __future__ import annotations

import json
import subprocess
import sys

from jsonnet_worker._pool.processes import WorkerSettings, worker_command
from jsonnet_worker._pool.workerline import PACKAGE_DIR, package_paths
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME
from jsonnet_worker._wire.messages import FormatStyle, Operation
from rawworker import RawWorker

MARK = "imported:"
# What a worker never imports: typing (its annotations are for mypy only), json (its
# encoders come from ``_json``: json loads its decoder and ``re``), dataclasses and the
# inspect it loads (the worker side's values are ``_wire.values.valueclass``es), re (texts
# are escaped through a ``str.translate`` table), signal (its enums: the worker needs one
# constant, from ``_signal``) and contextlib (through importlib.util: the engine is found
# and loaded with importlib.machinery alone).
NEVER_IMPORTED = ("typing", "json", "dataclasses", "inspect", "re", "signal", "contextlib")
AUDIT_HOOK = (
    "import sys\n"
    "def _report(event, args):\n"
    f"    if event == 'import' and args[0].partition('.')[0] in {NEVER_IMPORTED!r}:\n"
    f"        sys.stderr.write('{MARK}' + args[0] + '\\n'); sys.stderr.flush()\n"
    "sys.addaudithook(_report)\n"
)
WORKER_SIDE = ("_wire", "_worker", "_sandbox")
# Every value class of the worker side (and every dataclass: there should be none), by
# module and name, with its fields, as the process that runs this sees them; ``typing``
# loaded or not, as its first line says.
FIELDS = """
import dataclasses, importlib, json, pathlib, sys, types
if sys.argv[1] == "with-typing":
    import typing
root = pathlib.Path(sys.argv[2])
sys.path[:0] = json.loads(sys.argv[3])  # the package's and its dependencies', as a worker's
package = types.ModuleType("jsonnet_worker"); package.__path__ = [str(root)]
sys.modules["jsonnet_worker"] = package
found = {}
for folder in sys.argv[4:]:
    for path in sorted((root / folder).glob("*.py")):
        module = importlib.import_module(f"jsonnet_worker.{folder}.{path.stem}")
        for name, value in vars(module).items():
            if not isinstance(value, type) or value.__module__ != module.__name__:
                continue
            if dataclasses.is_dataclass(value):
                found[f"{module.__name__}.{name}"] = "a dataclass"
            elif "__value_fields__" in vars(value):
                found[f"{module.__name__}.{name}"] = list(value.__value_fields__)
print(json.dumps(["typing" in sys.modules, found]))
"""


def test_a_live_worker_imports_none_of_what_it_does_without() -> None:
    command = worker_command(WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME))
    assert command[3] == "-c"
    command[4] = AUDIT_HOOK + command[4]
    with RawWorker(command=command) as worker:
        snippet = "std.manifestYamlDoc({a: [1, std.extVar('x')]})"
        answer = worker.request(snippet, ext_vars={"x": "a\0"})  # a NUL: passed as JSON code
        assert answer["t"] == "result", answer
        formatted = worker.request("{a:1}", operation=Operation.FMT, style=FormatStyle())
        assert formatted["t"] == "result"
        worker.process.close(grace=5.0)
        worker.process.drain_stderr()
        stderr = worker.process.stderr.text()
    assert MARK not in stderr, stderr


def value_fields(typing_loaded: bool) -> dict[str, list[str] | str]:
    mode = "with-typing" if typing_loaded else "without-typing"
    paths = json.dumps(package_paths())
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", FIELDS, mode, PACKAGE_DIR, paths, *WORKER_SIDE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    loaded, found = json.loads(done.stdout)
    assert loaded is typing_loaded  # the probe ran as asked: a worker's case, or the pool's
    return dict(found)


def test_worker_side_values_have_one_shape_with_or_without_typing() -> None:
    without = value_fields(typing_loaded=False)
    assert "jsonnet_worker._wire.messages.EvalRequest" in without  # the probe saw them
    assert "TYPE" not in without["jsonnet_worker._wire.messages.EvalRequest"]
    assert "a dataclass" not in without.values(), without
    assert without == value_fields(typing_loaded=True)
