"""Without the import barrier, the kernel still refuses: the Landlock layer alone holds.

The harness (tests/harness/worker_harness.py) runs the real worker start-up with one part
left out or replaced; it is not a switch in the product.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from pathlib import Path

import pytest

from conftest import ENGINES, harness_command
from jsonnet_worker._sandbox.landlock import probe
from jsonnet_worker._wire.messages import EngineKind
from rawworker import RawWorker

pytestmark = pytest.mark.skipif(
    not probe().available, reason=f"kernel has no Landlock: {probe().state.value}"
)


@pytest.fixture(params=ENGINES)
def barrierless(request: pytest.FixtureRequest):
    with RawWorker(request.param, command=harness_command("no-barrier", request.param)) as raw:
        assert raw.hello.pid == raw.process.pid
        yield raw


@pytest.fixture
def python_worker():
    # Without the seccomp filter, which would refuse exec before Landlock does.
    with RawWorker("go", command=harness_command("python", without=("seccomp",))) as raw:
        assert raw.hello.pid == raw.process.pid
        yield raw


def test_harness_really_has_no_barrier(barrierless: RawWorker) -> None:
    answer = barrierless.request('importstr "/definitely/not/here"')
    assert answer["t"] == "error"
    assert "import not available" not in answer["message"]


@pytest.mark.parametrize(
    "target", ["secret", "/etc/passwd", "/proc/self/environ", "/dev/stdin", "/proc/self/fd/0"]
)
@pytest.mark.parametrize("form", ["importstr", "importbin", "import"])
def test_kernel_refuses_reads(
    barrierless: RawWorker, tmp_path: Path, target: str, form: str
) -> None:
    if target == "secret":
        secret = tmp_path / "secret.txt"
        secret.write_text("TOP-SECRET-MARKER")
        os.chmod(tmp_path, 0o755)
        target = str(secret)
    snippet = f'{form} "{target}"'
    if target.startswith(("/etc", "/tmp")) and form != "import":
        # Control: the same engine, in this unrestricted process, reads the file.
        engine = importlib.import_module(EngineKind(barrierless.engine).module_name)
        assert engine.evaluate_snippet("control.jsonnet", snippet)
    answer = barrierless.request(snippet)
    assert answer["t"] == "error", answer
    # go-jsonnet passes the kernel's errno through; the C++ importer hides it.
    refusal = "permission denied" if barrierless.engine == "go" else "no match locally"
    assert refusal in answer["message"].lower(), answer["message"]
    assert "TOP-SECRET-MARKER" not in answer["message"]
    assert "root:" not in answer["message"]


def test_python_after_restriction_cannot_open_list_or_exec(
    python_worker: RawWorker, tmp_path: Path
) -> None:
    probe_file = tmp_path / "readable.txt"
    probe_file.write_text("x")
    code = f"""
import os
outcomes = {{}}
def attempt(name, action):
    try:
        action()
        outcomes[name] = "allowed"
    except OSError as exc:
        outcomes[name] = exc.__class__.__name__ + ":" + str(exc.errno)
attempt("open_tmp", lambda: open({str(probe_file)!r}).read())
attempt("open_passwd", lambda: open("/etc/passwd").read())
attempt("listdir", lambda: os.listdir("/"))
attempt("create", lambda: open({str(tmp_path / "new.txt")!r}, "w"))
attempt("exec", lambda: os.execv("/bin/true", ["/bin/true"]))
result = outcomes
"""
    answer = python_worker.request(code)
    assert answer["t"] == "result", answer
    outcomes = json.loads(answer["json"])
    assert outcomes == {
        "open_tmp": "PermissionError:13",
        "open_passwd": "PermissionError:13",
        "listdir": "PermissionError:13",
        "create": "PermissionError:13",
        "exec": "PermissionError:13",
    }
    assert not (tmp_path / "new.txt").exists()


def test_python_after_restriction_cannot_connect_tcp(python_worker: RawWorker) -> None:
    if probe().abi < 4:
        pytest.skip("Landlock ABI < 4 has no network rights")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        code = f"""
import socket
s = socket.socket()
try:
    s.connect(("127.0.0.1", {port}))
    result = "connected"
except OSError as exc:
    result = exc.errno
"""
        answer = python_worker.request(code)
        assert json.loads(answer["json"]) == 13  # EACCES from Landlock
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
