"""Real worker processes driven over the protocol, on both engines."""

from __future__ import annotations

import json
import os
import struct

import msgpack
import pytest

from conftest import ENGINES, harness_command, load_cases, read_case_source
from jsonnet_worker._errors import WorkerStartError
from jsonnet_worker._pool.connection import WorkerConnection
from jsonnet_worker._pool.launch import await_hello
from jsonnet_worker._pool.processes import WorkerProcess, WorkerSettings
from jsonnet_worker._sandbox.landlock import probe
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME, encode
from jsonnet_worker._wire.messages import ErrorKind, Failure
from rawworker import RawWorker

needs_landlock = pytest.mark.skipif(
    not probe().available, reason=f"kernel has no Landlock: {probe().state.value}"
)


@pytest.fixture(scope="module", params=ENGINES)
def worker(request: pytest.FixtureRequest):
    with RawWorker(request.param) as raw:
        yield raw


def test_hello_reports_engine_and_sandbox(worker: RawWorker) -> None:
    hello = worker.hello  # parsed and validated by the pool's WorkerConnection
    assert hello.pid == worker.process.pid
    assert hello.engine == worker.engine and hello.engine_version.startswith("v")
    sandbox = hello.landlock
    if probe().available:
        assert sandbox.enforced is True
        assert sandbox.abi == probe().abi
        assert "READ_FILE" in sandbox.handled_fs and "EXECUTE" in sandbox.handled_fs
        assert hello.self_check.startswith("refused")
        if probe().abi >= 4:
            assert sandbox.handled_net == ("BIND_TCP", "CONNECT_TCP")
        if probe().abi >= 6:
            assert sandbox.scoped == ("ABSTRACT_UNIX_SOCKET", "SIGNAL")
        if probe().abi >= 7:
            assert "LOG_SAME_EXEC_OFF" in sandbox.restrict_flags


@pytest.mark.parametrize("case", load_cases(), ids=lambda c: c["file"].split("/")[-1])
def test_fixtures_give_expected_json(worker: RawWorker, case: dict) -> None:
    answer = worker.request(
        read_case_source(case),
        filename=case["file"],
        ext_codes={k: json.dumps(v) for k, v in case.get("ext_vars", {}).items()},
        tla_codes={k: json.dumps(v) for k, v in case.get("tla_vars", {}).items()},
    )
    if "expect" in case:
        assert answer["t"] == "result", answer
        assert json.loads(answer["json"]) == case["expect"]
    else:
        assert answer["t"] == "error" and answer["kind"] == "jsonnet"
        assert case["error"].lower() in answer["message"].lower()


IMPORT_FORMS = ['import "x.libsonnet"', 'importstr "/etc/passwd"', 'importbin "/etc/passwd"']


@pytest.mark.parametrize("form", IMPORT_FORMS)
@pytest.mark.parametrize("place", ["snippet", "ext_codes", "tla_codes"])
def test_every_import_form_is_refused_everywhere(worker: RawWorker, form: str, place: str) -> None:
    if place == "snippet":
        answer = worker.request(form)
    elif place == "ext_codes":
        answer = worker.request('std.extVar("v")', ext_codes={"v": form})
    else:
        answer = worker.request("function(v) v", tla_codes={"v": form})
    assert answer["t"] == "error" and answer["kind"] == "jsonnet", answer
    assert "import not available" in answer["message"]
    assert "root:" not in answer["message"]


def test_import_refusal_text_has_no_trailing_garbage(worker: RawWorker) -> None:
    for _ in range(20):
        answer = worker.request('importstr "/etc/hostname"')
        line = answer["message"].splitlines()[0]
        assert line.endswith("import not available /etc/hostname"), repr(line)


def test_string_variables_and_tla_vars(worker: RawWorker) -> None:
    answer = worker.request(
        "function(who) {greeting: std.extVar('hello') + ', ' + who}",
        ext_vars={"hello": "Hello"},
        tla_vars={"who": "world\u0000!"},
    )
    assert json.loads(answer["json"]) == {"greeting": "Hello, world\u0000!"}


def test_nul_in_source_is_a_jsonnet_error(worker: RawWorker) -> None:
    answer = worker.request('{a: 1}\u0000{"t": "result"}')
    assert answer["kind"] == "jsonnet" and "NUL" in answer["message"]


def test_nul_and_frame_shaped_bytes_in_errors_and_traces(worker: RawWorker) -> None:
    fake = encode({"t": "result", "id": 999, "json": "{}"}).decode("latin-1")
    snippet = (
        f"local fake = {json.dumps(fake)};std.trace('\\u0000' + fake, error 'x\\u0000' + fake)"
    )
    answer = worker.request(snippet)
    assert answer["t"] == "error" and answer["id"] == worker.next_id - 1
    follow = worker.request("{ok: true}")
    assert json.loads(follow["json"]) == {"ok": True}


def test_ten_megabyte_error_is_bounded(worker: RawWorker) -> None:
    # String doubling: 5 * 2**21 characters, about 10 MB, cheap for both engines.
    answer = worker.request(
        'local double(s, n) = if n == 0 then s else double(s + s, n - 1); error double("xxxxx", 21)'
    )
    assert answer["kind"] == "jsonnet"
    assert len(answer["message"]) < 20_000
    assert "truncated" in answer["message"]


def test_trace_flood_does_not_block(worker: RawWorker) -> None:
    answer = worker.request(
        "std.foldl(function(acc, i) std.trace(std.repeat('t', 1000), acc + i), "
        "std.range(1, 3000), 0)"
    )
    assert json.loads(answer["json"]) == 4501500


def test_output_limit(worker: RawWorker) -> None:
    answer = worker.request('std.repeat("y", 2000)', max_output=1000)
    assert answer["kind"] == "output_too_large"
    assert json.loads(worker.request('std.repeat("y", 10)', max_output=1000)["json"]) == "y" * 10


def test_malformed_frames_get_protocol_errors(worker: RawWorker) -> None:
    worker.send_bytes(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid
    event = worker.receive()
    assert isinstance(event, Failure) and event.kind is ErrorKind.PROTOCOL
    worker.send_bytes(encode({"t": "eval", "id": 5}))  # no snippet
    event = worker.receive()
    assert isinstance(event, Failure)
    assert event.kind is ErrorKind.PROTOCOL and event.request_id == 5
    assert "snippet" in event.message
    body = msgpack.packb([1, 2, 3])
    worker.send_bytes(struct.pack(">I", len(body)) + body)
    event = worker.receive()
    assert isinstance(event, Failure) and "not a map" in event.message
    worker.send_bytes(struct.pack(">I", 0))
    event = worker.receive()
    assert isinstance(event, Failure) and event.kind is ErrorKind.PROTOCOL
    assert json.loads(worker.request("1 + 1")["json"]) == 2


def test_oversized_frame_is_refused_and_the_worker_exits() -> None:
    # 4 KiB, not less: the parent reads the hello (about 1.1 KB) under the same limit.
    with RawWorker("go", max_frame=4096) as raw:
        raw.send_bytes(struct.pack(">I", 1 << 30) + b"x" * 100)
        event = raw.receive()
        assert isinstance(event, Failure)
        assert event.kind is ErrorKind.PROTOCOL and "over the limit" in event.message
        assert raw.receive() is None  # EOF: it exits rather than resynchronise
        assert raw.process.wait(5) == 71


@needs_landlock
@pytest.mark.parametrize("engine", ENGINES)
def test_every_thread_has_no_new_privs(engine: str) -> None:
    with RawWorker(engine) as raw:
        raw.request("{a: [x * 2 for x in std.range(1, 1000)]}")
        pid = raw.process.pid
        tids = os.listdir(f"/proc/{pid}/task")
        assert tids
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
            assert fields["NoNewPrivs"].strip() == "1", tid
            assert fields["Seccomp"].strip() in {"0", "2"}


def test_worker_whose_engine_fails_to_load_says_why() -> None:
    settings = WorkerSettings("go", 1 << 30, DEFAULT_MAX_FRAME)
    worker = WorkerProcess(settings, harness_command("broken-engine"))
    try:
        with pytest.raises(WorkerStartError, match="not installed"):
            await_hello(worker, WorkerConnection(1 << 20))
        assert worker.wait(5) == 70
    finally:
        worker.close()


def test_worker_environment_is_minimal() -> None:
    os.environ["JSONNET_WORKER_TEST_SECRET"] = "s3cret"
    try:
        with RawWorker("go") as raw:
            with open(f"/proc/{raw.process.pid}/environ", "rb") as environ:
                names = {item.split(b"=")[0] for item in environ.read().split(b"\0") if item}
    finally:
        del os.environ["JSONNET_WORKER_TEST_SECRET"]
    assert names == {b"GOMAXPROCS", b"GOGC", b"GOMEMLIMIT", b"LC_ALL"}
