"""The template and its forked workers, with real processes (docs/DESIGN.md, "Forked
workers"). Probes that need code inside a worker use ``tests/harness/template_harness.py``
in ``python`` mode: a fully compromised engine, after the forked worker's whole start-up."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from jsonnet_worker._errors import MemoryLimitExceeded
from jsonnet_worker._pool.connection import (
    NEED_DATA,
    Answer,
    ConnectionClosed,
    Failure,
    WorkerConnection,
    sandbox_status,
)
from jsonnet_worker._pool.forking import (
    ORPHAN_WAIT,
    ForkedWorker,
    ForkServerProcess,
    ForkServerUnavailable,
    WorkerSource,
    fork_server_command,
    isolation_problem,
)
from jsonnet_worker._pool.forkserver_policy import ForkServerState
from jsonnet_worker._pool.identities import DEFAULT_WORKER_USER, WorkerIdentities
from jsonnet_worker._pool.launch import await_hello
from jsonnet_worker._pool.processes import WorkerProcess, WorkerSettings
from jsonnet_worker._sandbox.landlock import probe
from jsonnet_worker._wire.control import (
    CONTROL_MAX,
    FORK_FLAGS,
    ControlError,
    decode_control,
    encode_control,
)
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME, ProtocolViolation
from jsonnet_worker._wire.layers import LayerState
from jsonnet_worker._wire.messages import (
    EvalRequest,
    ForkRefused,
    ForkServerHello,
    Result,
    read_fork_answer,
)

HARNESS = Path(__file__).parent / "harness" / "template_harness.py"
LANDLOCK = probe()
pytestmark = pytest.mark.skipif(
    not LANDLOCK.available or LANDLOCK.abi < 6,
    reason="forked workers need Landlock with the signal scope (ABI 6)",
)
HEAVY_GO = "std.foldl(function(a, b) a + b, std.range(1, 2000000), 0)"


def settings(engine: str = "go") -> WorkerSettings:
    return WorkerSettings(engine, 1 << 30, DEFAULT_MAX_FRAME, WorkerIdentities(DEFAULT_WORKER_USER))


def harness(mode: str, engine: str = "go") -> list[str]:
    real = fork_server_command(settings(engine))
    assert real[3] == "-c" and real[5] == "_template"
    return [sys.executable, "-I", str(HARNESS), mode, *real[6:]]


class Talk:
    """A forked worker driven through the pool's own conversation: its hello and its answers
    are validated as any worker's."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.connection = WorkerConnection(1 << 20)
        self.next_id = 1
        self.hello = await_hello(process, self.connection, timeout=20.0)

    def receive(self, timeout: float = 20.0) -> dict[str, Any] | None:
        """The answer to the request in flight, as the worker's message; None if the worker's
        stream ended instead."""
        process = self.process
        deadline = time.monotonic() + timeout
        while (event := self.connection.next_event()) is NEED_DATA:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the worker")
            ready = select.select([process.stdout, process.stderr_fd], [], [], left)[0]
            if process.stderr_fd in ready:
                process.drain_stderr()
            if process.stdout in ready and (data := process.read_stdout()) is not None:
                self.connection.receive_data(data)
        if isinstance(event, Answer):
            return Result(event.request_id, event.json_text, event.retire).to_message()
        if isinstance(event, Failure):
            return event.to_message()
        assert isinstance(event, ConnectionClosed), (event, process.stderr.text())
        return None

    def send(self, snippet: str, **fields: Any) -> int:
        request_id = self.next_id
        self.next_id += 1
        request = EvalRequest(request_id, snippet, filename="test.jsonnet", **fields)
        data = memoryview(self.connection.send_request(request))
        while data:
            written = self.process.send(data)
            assert written is not None, "the worker's request channel is closed"
            data = data[written:]
            if data:
                select.select([], [self.process.stdin], [], 1.0)
        return request_id

    def request(self, snippet: str, **fields: Any) -> dict[str, Any]:
        request_id = self.send(snippet, **fields)
        answer = self.receive()
        assert answer is not None, self.process.stderr.text()
        assert answer["id"] == request_id, answer
        return answer

    def python(self, source: str) -> Any:
        """Run ``source`` in a ``python``-mode worker; its ``result`` variable."""
        payload = self.request(source)
        assert payload["t"] == "result", payload
        return json.loads(payload["json"])


@pytest.fixture
def template() -> Iterator[ForkServerProcess]:
    process = ForkServerProcess(settings())
    yield process
    process.close()


@pytest.fixture
def python_template() -> Iterator[ForkServerProcess]:
    process = ForkServerProcess(settings(), harness("python"))
    yield process
    process.close()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    owned: list[WorkerProcess] = []
    yield owned
    for worker in owned:
        worker.close()


def fork(template: ForkServerProcess, workers: list[WorkerProcess]) -> Talk:
    worker = template.fork_worker()
    workers.append(worker)
    return Talk(worker)


def status_of(path: str) -> dict[str, str]:
    with open(path) as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


# -- evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["go", "cpp"])
def test_a_forked_worker_evaluates_like_the_engine_in_process(
    engine: str, workers: list[WorkerProcess]
) -> None:
    module = pytest.importorskip("_gojsonnet" if engine == "go" else "_jsonnet")
    template = ForkServerProcess(settings(engine))
    try:
        talk = fork(template, workers)
        assert talk.hello.engine == engine
        cases: list[tuple[str, dict[str, Any]]] = [
            ("{a: 1 + 1, b: std.extVar('x')}", {"ext_vars": {"x": "y"}}),
            ("function(n) [i * i for i in std.range(1, n)]", {"tla_codes": {"n": "5"}}),
            ("std.manifestJsonEx({k: [1, 'two', null]}, '  ')", {}),
        ]
        for snippet, fields in cases:
            expected = module.evaluate_snippet("test.jsonnet", snippet, **fields)
            payload = talk.request(snippet, **fields)
            assert payload == {"t": "result", "id": payload["id"], "json": expected}
        failed = talk.request("error 'no ' + 'way'")
        assert failed["t"] == "error" and failed["kind"] == "jsonnet"
        assert "no way" in failed["message"]
        refused = talk.request("importstr '/etc/passwd'")
        assert refused["t"] == "error" and "import not available" in refused["message"]
    finally:
        template.close()


def test_the_hello_is_a_workers_and_the_pool_is_the_parent(
    template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    talk = fork(template, workers)
    hello = talk.hello
    worker = talk.process
    assert hello.pid == worker.pid != template.pid
    assert hello.landlock.enforced is True
    assert "SIGNAL" in hello.landlock.scoped
    assert hello.self_check.startswith("refused:")
    seccomp = sandbox_status(hello).seccomp
    assert seccomp.state is LayerState.ACTIVE
    assert "checked, TSYNC" in seccomp.detail
    # CLONE_PARENT: our child, not the template's, in a session of its own.
    worker_status = status_of(f"/proc/{worker.pid}/status")
    assert int(worker_status["PPid"]) == os.getpid()
    assert os.getsid(worker.pid) == worker.pid != os.getsid(template.pid)
    assert worker_status["Uid"] == status_of(f"/proc/{template.pid}/status")["Uid"]
    assert sandbox_status(template.hello).landlock.enforced


def test_a_forked_worker_is_reaped_here_with_its_real_status(
    template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    killed = fork(template, workers).process
    killed.kill()
    assert killed.wait(10.0) == -signal.SIGKILL
    assert "killed by SIGKILL" in str(killed.death_error())
    orderly = fork(template, workers).process
    orderly.end_input()  # an idle worker exits by itself at the end of its requests
    assert orderly.wait(10.0) == 0
    assert isinstance(orderly, ForkedWorker) and orderly.exited()


# -- isolation, checked from outside the worker ----------------------------------------------

TGKILL_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def tgkill(pid, tid):
    ctypes.set_errno(0)
    return 0 if libc.syscall(234, pid, tid, 0) == 0 else ctypes.get_errno()
result = {{str(tid): tgkill({pid}, tid) for tid in {tids}}}
"""


def test_every_thread_has_both_filters_and_none_is_reachable_from_a_sibling(
    python_template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the probe uses the x86_64 tgkill number")
    first, second = fork(python_template, workers), fork(python_template, workers)
    first.python("result = 1")  # the loop has run: every thread the worker makes exists
    pid = first.process.pid
    template_filters = int(status_of(f"/proc/{python_template.pid}/status")["Seccomp_filters"])
    tids = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    assert len(tids) > 2  # the main thread, the loop thread and the Go runtime's
    for tid in tids:
        thread = status_of(f"/proc/{pid}/task/{tid}/status")
        assert thread["NoNewPrivs"] == "1", tid
        assert thread["Seccomp"] == "2", tid
        # The template's filter, inherited, and the worker's own on top (TSYNC).
        assert int(thread["Seccomp_filters"]) == template_filters + 1, tid
    # From a sibling's domain, no thread of the first worker can be signalled (the signal
    # scope: a sibling's domain is not nested in ours), while we, outside, can.
    refused = second.python(TGKILL_PROBE.format(pid=pid, tids=tids))
    assert refused == {str(tid): 1 for tid in tids}  # EPERM for every thread
    os.kill(pid, 0)  # from outside every domain: allowed
    # And the sibling's own threads are within its reach: the probe is not vacuous.
    own = sorted(int(tid) for tid in os.listdir(f"/proc/{second.process.pid}/task"))
    assert set(second.python(TGKILL_PROBE.format(pid=second.process.pid, tids=own)).values()) == {0}


def test_every_thread_of_a_forked_worker_is_in_its_own_domain_not_the_templates(
    workers: list[WorkerProcess],
) -> None:
    """Checked from a process in exactly the worker's domain (cloned by the test harness
    right after the worker's layer): a domain may signal only itself and the domains nested
    in it, so a thread left in the template's domain (an engine loaded before the layer)
    would answer EPERM."""
    template = ForkServerProcess(settings(), harness("domain-probe"))
    try:
        first, second = fork(template, workers), fork(template, workers)
        first.python("result = 1")
        pid = first.process.pid
        tids = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
        assert len(tids) > 2  # the main thread, the loop thread and the Go runtime's
        outsiders = [[template.pid, template.pid], [second.process.pid, second.process.pid]]
        targets = [[pid, tid] for tid in tids] + outsiders
        answer = first.python(f"result = probe({targets!r})")
        os.waitpid(answer["probe"], 0)  # the probe is our child too (CLONE_PARENT)
        assert answer["errors"] == [0] * len(tids) + [errno.EPERM, errno.EPERM]
    finally:
        template.close()


SIGNAL_PROBE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def attempt(call):
    try:
        call()
        return 0
    except OSError as exc:
        return exc.errno
def ptrace_attach(pid):
    ctypes.set_errno(0)
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
result = {{
    "kill template": attempt(lambda: os.kill({template}, 0)),
    "kill sibling": attempt(lambda: os.kill({sibling}, 0)),
    "kill self": attempt(lambda: os.kill(os.getpid(), 0)),
    "kill pool": attempt(lambda: os.kill({pool}, 0)),
    "pidfd template": attempt(lambda: __import__("signal").pidfd_send_signal(
        os.pidfd_open({template}), 0)),
    "ptrace template": attempt(lambda: ptrace_attach({template})),
    "ptrace sibling": attempt(lambda: ptrace_attach({sibling})),
    "fork": attempt(lambda: os._exit(0) if os.fork() == 0 else None),
}}
"""


def test_a_forked_worker_cannot_signal_ptrace_or_fork(
    python_template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    first, second = fork(python_template, workers), fork(python_template, workers)
    result = first.python(
        SIGNAL_PROBE.format(
            template=python_template.pid, sibling=second.process.pid, pool=os.getpid()
        )
    )
    eperm = 1
    assert result == {
        "kill template": eperm,
        "kill sibling": eperm,
        "kill self": 0,
        "kill pool": eperm,
        "pidfd template": eperm,
        "ptrace template": eperm,
        "ptrace sibling": eperm,
        "fork": eperm,  # the worker's own filter, on top of the template's
    }


CLONE_PROBE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
pidfd = ctypes.c_int(-1)
ctypes.set_errno(0)
pid = libc.syscall(56, {flags}, None, ctypes.byref(pidfd), None, None)
if pid == 0:
    libc.syscall(60, 0)  # exit, in a child that must never exist
result = [pid, ctypes.get_errno()]
"""


def test_the_templates_fork_form_is_refused_to_its_workers(
    python_template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the probe uses the x86_64 clone number")
    talk = fork(python_template, workers)
    assert talk.python(CLONE_PROBE.format(flags=FORK_FLAGS)) == [-1, 1]


def test_a_forked_worker_cannot_prlimit_its_template_or_a_sibling(
    python_template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    first, second = fork(python_template, workers), fork(python_template, workers)
    result = first.python(
        "import resource\n"
        "def attempt(pid):\n"
        "    try:\n"
        "        resource.prlimit(pid, resource.RLIMIT_NOFILE)\n"
        "        return 0\n"
        "    except OSError as exc:\n"
        "        return exc.errno\n"
        f"result = [attempt({python_template.pid}), attempt({second.process.pid})]"
    )
    assert result == [1, 1]


FD_PROBE = """
import os, stat
kinds = {}
for fd in range(1024):
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        continue
    kinds[fd] = "socket" if stat.S_ISSOCK(mode) else "fifo" if stat.S_ISFIFO(mode) else oct(mode)
result = kinds
"""


def test_a_forked_worker_holds_nothing_of_the_template_or_its_siblings(
    python_template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    first = fork(python_template, workers)
    second = fork(python_template, workers)
    fds = {int(fd): kind for fd, kind in second.python(FD_PROBE).items()}
    sockets = {fd for fd, kind in fds.items() if kind == "socket"}
    # fd 0 is a pipe of its own; 1 and 2 its stderr channel; two more: its requests and
    # responses. No control socket, no memfd, no channel of the first worker.
    assert fds[0] == "fifo" and {1, 2} <= sockets and len(sockets) == 4, fds
    assert all(kind in ("socket", "fifo") for kind in fds.values()), fds
    assert first.python("result = 'still here'") == "still here"


def test_the_template_never_evaluates(
    template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    talk = fork(template, workers)
    assert talk.request("{a: 1}")["t"] == "result"
    status = status_of(f"/proc/{template.pid}/status")
    assert status["Threads"] == "1"  # the Go runtime was never started in it
    with open(f"/proc/{template.pid}/maps") as maps:
        assert "_gojsonnet" not in maps.read()  # the engine is in a memfd, never mapped
    # It answers nothing but forks: an evaluation request is refused, and it forks on.
    refused = control_exchange(template, {"t": "eval", "id": 99, "snippet": "{}"})
    assert refused == ForkRefused(99, "unknown control message 'eval'", 0)
    assert Talk(template.fork_worker()).request("1 + 1")["json"].strip() == "2"


def test_a_fork_request_without_its_channels_is_refused(template: ForkServerProcess) -> None:
    reply = control_exchange(template, {"t": "fork", "id": 7})
    assert reply == ForkRefused(7, "a fork needs 3 channels, got 0")
    assert isinstance(template.fork_worker(), ForkedWorker)


def control_exchange(template: ForkServerProcess, message: dict[str, Any]) -> object:
    """Send one control message (a map, so that a test can send what the pool never would),
    and read the fork server's reply as the pool does."""
    template.control.send(encode_control(message))
    template.control.settimeout(10.0)
    try:
        return read_fork_answer(decode_control(template.control.recv(CONTROL_MAX)))
    finally:
        template.control.settimeout(None)


# -- the template's death ------------------------------------------------------------------


# Says "holding" on stderr, then blocks until the test sends one byte past the request
# frame on the request channel (the only socket of the worker that becomes readable with
# data), so the call is in flight for as long as the test wants; the loop then goes on with
# the byte consumed.
HOLD_UNTIL_RELEASED = """
import os, select, stat
os.write(2, b"holding\\n")
candidates = [fd for fd in range(3, 64) if _is_socket(fd)]
released = False
while not released:
    for fd in select.select(candidates, [], [])[0]:
        data = os.read(fd, 1)
        if data:
            released = True
        else:
            candidates.remove(fd)  # the response channel: shut down for reading
result = "released"
"""
IS_SOCKET = """
def _is_socket(fd):
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
"""


def test_killing_the_template_keeps_its_workers_and_their_calls(
    python_template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    busy, idle = fork(python_template, workers), fork(python_template, workers)
    request_id = busy.send("import os, stat\n" + IS_SOCKET + HOLD_UNTIL_RELEASED)
    deadline = time.monotonic() + 20.0
    while "holding" not in busy.process.stderr.text():  # the frame is read: the call runs
        assert time.monotonic() < deadline, "the snippet never started"
        select.select([busy.process.stderr_fd], [], [], 1.0)
        assert busy.process.drain_stderr(), "the worker died"
    python_template.kill()
    assert python_template.wait(10.0) == -signal.SIGKILL
    assert busy.process.send(b"!") == 1  # the call has been in flight all along: release it
    assert busy.receive() == {"t": "result", "id": request_id, "json": '"released"'}
    assert busy.python("result = 6 * 7") == 42
    assert idle.python("result = 'idle, alive'") == "idle, alive"
    with pytest.raises(ForkServerUnavailable) as refused:
        python_template.fork_worker()
    assert refused.value.permanent is False
    assert "killed by SIGKILL" in refused.value.reason


def test_a_forked_worker_survives_its_templates_death_mid_evaluation(
    template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    talk = fork(template, workers)
    request_id = talk.send(HEAVY_GO)
    template.kill()
    assert template.wait(10.0) == -signal.SIGKILL
    answer = talk.receive()
    assert answer is not None
    answered = {key: answer[key] for key in ("t", "id", "json")}  # and "retire", if it asks
    assert answered == {"t": "result", "id": request_id, "json": "2000001000000\n"}


def test_a_worker_cloned_just_before_its_template_died_is_adopted_not_left_a_zombie(
    workers: list[WorkerProcess],
) -> None:
    template = ForkServerProcess(settings(), harness("die-after-clone"))
    try:
        worker = template.fork_worker()  # no pidfd came: the worker is found by its hello
        workers.append(worker)
        assert template.wait(10.0) == 9
        talk = Talk(worker)
        assert talk.hello.pid == worker.pid
        assert status_of(f"/proc/{worker.pid}/status")["PPid"] == str(os.getpid())
        assert talk.request("[1, 2]")["json"] == "[\n   1,\n   2\n]\n"
        pid = worker.pid
        worker.close()
        assert not os.path.exists(f"/proc/{pid}"), "the adopted worker was not reaped"
        with pytest.raises(ForkServerUnavailable):
            template.fork_worker()
    finally:
        template.close()


def test_a_template_dead_before_its_clone_is_an_error_at_once() -> None:
    template = ForkServerProcess(settings(), harness("die-before-clone"))
    try:
        began = time.monotonic()
        with pytest.raises(ForkServerUnavailable) as refused:
            template.fork_worker()
        # The end of the new worker's channel says no worker exists: no wait for a hello.
        assert time.monotonic() - began < ORPHAN_WAIT
        assert refused.value.permanent is False
        assert "exited" in refused.value.reason
        assert template.wait(10.0) == 9
    finally:
        template.close()


def test_closing_the_template_keeps_its_workers(
    template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    talk = fork(template, workers)
    assert template.close() == 0  # it exits by itself at the end of its control socket
    assert talk.request("[1, 2]")["t"] == "result"
    with pytest.raises(ForkServerUnavailable, match="closed"):
        template.fork_worker()


# -- refusals: the reason the pool falls back with -------------------------------------------


def test_a_refused_clone_is_a_permanent_fallback_with_the_reason() -> None:
    template = ForkServerProcess(settings(), harness("clone-refused"))
    try:
        with pytest.raises(ForkServerUnavailable) as refused:
            template.fork_worker()
        assert refused.value.permanent is True
        assert "CLONE_PARENT" in refused.value.reason
        assert "Operation not permitted" in refused.value.reason
        assert refused.value.kind == "fork_server_unavailable"
    finally:
        template.close()


def test_a_template_without_landlock_is_refused_with_the_reason() -> None:
    with pytest.raises(ForkServerUnavailable) as refused:
        ForkServerProcess(settings(), harness("landlock-enosys"))
    assert refused.value.permanent is True
    assert "no Landlock layer" in refused.value.reason
    assert "not built in" in refused.value.reason


def test_a_template_that_cannot_start_says_why() -> None:
    with pytest.raises(ForkServerUnavailable) as refused:
        ForkServerProcess(settings(), harness("broken-engine"))
    assert refused.value.permanent is True
    assert "_no_such_jsonnet_engine" in refused.value.reason


# -- the parent's checks of what a template says ----------------------------------------------


def hello_message(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "t": "template_hello",
        "protocol": 1,
        "pid": 1234,
        "engine": "go",
        "python": "3.11.7",
        "sandbox": {"enforced": True, "state": "available", "abi": 6, "scoped": ["SIGNAL"]},
        "layers": {"seccomp": {"state": "active", "detail": "x86_64"}},
        "self_check": "refused: ...",
        "startup_ms": 12.5,
        "fork_flags": FORK_FLAGS,
    }
    message.update(changes)
    return message


def test_a_template_hello_is_validated_field_by_field() -> None:
    hello = ForkServerHello.from_message(hello_message())
    assert hello.pid == 1234 and hello.landlock.enforced and hello.fork_flags == FORK_FLAGS
    assert isolation_problem(hello) is None
    bad_fields: list[dict[str, Any]] = [
        {"pid": "1234"},
        {"sandbox": []},
        {"startup_ms": None},
        {"protocol": 2},
    ]
    for bad in bad_fields:
        with pytest.raises(ProtocolViolation):
            ForkServerHello.from_message(hello_message(**bad))


def test_forking_is_refused_where_siblings_could_signal_each_other() -> None:
    unscoped = {"enforced": True, "state": "available", "abi": 5, "scoped": []}
    problem = isolation_problem(ForkServerHello.from_message(hello_message(sandbox=unscoped)))
    assert problem is not None and "no signal scope" in problem
    missing = {"enforced": False, "state": "not built in", "reason": "Landlock not built in"}
    problem = isolation_problem(ForkServerHello.from_message(hello_message(sandbox=missing)))
    assert problem == "no Landlock layer (Landlock not built in)"


def test_control_messages_are_bounded_maps() -> None:
    assert decode_control(encode_control({"t": "fork", "id": 1})) == {"t": "fork", "id": 1}
    for data in (b"\x91\x01", b"\xc1", msgpack.packb({"id": 1}), msgpack.packb({"t": b"x"})):
        with pytest.raises(ControlError):
            decode_control(data)
    with pytest.raises(ControlError):
        encode_control({"t": "fork", "pad": "x" * CONTROL_MAX})


# -- WorkerSource: forks while the template can, re-exec otherwise -----------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_source_forks_and_says_so(workers: list[WorkerProcess]) -> None:
    source = WorkerSource(settings())
    try:
        worker = source.spawn()
        workers.append(worker)
        assert isinstance(worker, ForkedWorker)
        assert Talk(worker).request("{a: 1}")["t"] == "result"
        layer = source.status()
        assert source.policy.state is ForkServerState.FORKING and layer.state is LayerState.ACTIVE
        assert layer.name == "template" and "1 forked" in layer.detail
    finally:
        source.close()


def test_a_refusing_host_gets_re_exec_workers_for_good_with_the_reason(
    workers: list[WorkerProcess],
) -> None:
    source = WorkerSource(settings(), fork_server_command=harness("clone-refused"))
    try:
        for _ in range(2):
            worker = source.spawn()
            workers.append(worker)
            assert not isinstance(worker, ForkedWorker)
            assert Talk(worker).request("{a: 1}")["t"] == "result"
            assert source.policy.state is ForkServerState.REFUSED and source.fork_server is None
        layer = source.status()
        assert layer.state is LayerState.MISSING
        assert layer.reason.startswith("re-exec workers: the fork server cannot fork: clone(")
        assert "Operation not permitted" in layer.reason
    finally:
        source.close()


def test_a_dead_template_is_started_again_after_its_back_off(
    workers: list[WorkerProcess],
) -> None:
    clock = FakeClock()
    source = WorkerSource(settings(), clock=clock)
    try:
        first = source.spawn()
        workers.append(first)
        assert source.fork_server is not None
        dead_pid = source.fork_server.pid
        source.fork_server.kill()
        source.fork_server.wait(10.0)
        interim = source.spawn()  # meanwhile: a re-exec worker, and the reason
        workers.append(interim)
        assert (
            not isinstance(interim, ForkedWorker) and source.policy.state is ForkServerState.WAITING
        )
        assert f"the fork server (pid {dead_pid}) killed by SIGKILL" in source.status().reason
        also_interim = source.spawn()  # the back-off has not passed: no new template yet
        workers.append(also_interim)
        assert not isinstance(also_interim, ForkedWorker) and source.fork_server is None
        clock.now += 0.2
        again = source.spawn()
        workers.append(again)
        assert isinstance(again, ForkedWorker) and again.fork_server_pid != dead_pid
        assert Talk(first).request("[1]")["t"] == "result"  # the old template's worker lives on
        assert Talk(again).request("[2]")["t"] == "result"
    finally:
        source.close()


def test_a_forked_workers_stderr_is_its_own(
    template: ForkServerProcess, workers: list[WorkerProcess]
) -> None:
    talk = fork(template, workers)
    payload = talk.request("std.trace('said by the worker', 1)")
    assert payload["t"] == "result"
    talk.process.drain_stderr()
    assert "said by the worker" in talk.process.stderr.text()
    assert template.close() == 0
    assert "said by the worker" not in template.stderr.text()


def test_a_forked_worker_keeps_the_memory_limit_and_its_death_is_classified(
    workers: list[WorkerProcess],
) -> None:
    limit = 256 << 20
    template = ForkServerProcess(
        WorkerSettings("go", limit, DEFAULT_MAX_FRAME, WorkerIdentities(DEFAULT_WORKER_USER))
    )
    try:
        talk = fork(template, workers)
        talk.send("std.length(std.makeArray(100000000, function(i) [i]))")
        assert talk.receive(timeout=60.0) is None  # the runtime aborts at the limit
        error = talk.process.death_error()
        assert isinstance(error, MemoryLimitExceeded), error
        assert f"limit {limit} bytes" in str(error)
        assert Talk(template.fork_worker()).request("1")["t"] == "result"  # the template is fine
    finally:
        template.close()
