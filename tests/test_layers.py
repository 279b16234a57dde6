"""The layers beyond Landlock (seccomp, privilege drop, limits, a uid per worker, an IPC
namespace): applied on both engines, reported in the hello, ``pool.sandbox`` and ``doctor``,
best effort where missing, fail closed where they cannot be applied; the runtimes keep
working under the filter's rules. What each layer refuses is tests/test_isolation_matrix.py;
the filter's program itself is tests/test_seccomp_program.py.
"""

from __future__ import annotations

import concurrent.futures
import errno
import glob
import json
import logging
import os
import pwd
import signal

import pytest

import seams
from conftest import full, harness_command, wait_until
from jsonnet_worker import (
    EvaluationTimeout,
    InvalidArgument,
    JsonnetError,
    SandboxStatus,
    WorkerPool,
    WorkerStartError,
    judge_sandbox,
)
from jsonnet_worker._cli import main
from jsonnet_worker._pool.identities import WorkerIdentities, parse_worker_user, resolve_identity
from jsonnet_worker._sandbox.seccomp import TABLES, build_program, install
from jsonnet_worker._wire.layers import LayerState
from rawworker import RawWorker

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the privilege drop needs a root parent")


def status_fields(pid: int) -> list[dict[str, str]]:
    """The ``/proc/PID/task/*/status`` of every thread, as dicts."""
    threads = []
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        with open(path) as status:
            threads.append(
                dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
            )
    return threads


# The defence-in-depth layers a default pool lacks on this host (a non-root parent can give
# neither), and those its configuration turns off (one worker_user shared by every worker).
DEFAULT_MISSING = [] if ROOT else ["uid", "ipc_namespace"]
DEFAULT_OFF = ["uid"] if ROOT else []


def test_pool_reports_every_layer(pool: WorkerPool) -> None:
    sandbox = pool.sandbox
    assert isinstance(sandbox, SandboxStatus)
    assert [layer.name for layer in sandbox.layers] == [
        "landlock",
        "limits",
        "privileges",
        "seccomp",
        "uid",
        "ipc_namespace",
    ]
    assert sandbox.missing == (), sandbox.summary()
    assert [layer.name for layer in sandbox.missing_in_depth] == DEFAULT_MISSING
    assert all(not layer.required for layer in sandbox.missing_in_depth)
    assert [layer.name for layer in sandbox.off] == DEFAULT_OFF
    # One verdict: ok where every layer the configuration asks for is active, degraded
    # (with each missing layer) where the host cannot give one, the off ones listed.
    verdict = judge_sandbox(sandbox)
    assert verdict.state == ("ok" if ROOT else "degraded"), verdict
    assert [reason.split(" missing")[0] for reason in verdict.reasons] == DEFAULT_MISSING + (
        [] if ROOT else ["tasks"]
    )
    assert [entry.split(":")[0] for entry in verdict.off] == DEFAULT_OFF
    limits = sandbox.limits.detail
    assert limits.endswith("; 0: FSIZE, CORE, MEMLOCK, RTPRIO, NICE, MSGQUEUE"), limits
    assert "RLIMIT_NPROC" in limits and "RLIMIT_NOFILE" in limits and "RLIMIT_STACK" in limits
    assert "RLIMIT_CPU 300/301" in limits  # the default cpu_budget, SIGKILL one second later
    assert "TSYNC" in sandbox.seccomp.detail and "checked" in sandbox.seccomp.detail
    if ROOT:
        assert sandbox.privileges.detail.startswith("nobody: uid 65534")
        assert "is shared by every worker" in sandbox.uid.reason
        assert sandbox.ipc_namespace.active
    else:
        assert "the parent is not root, so" in sandbox.uid.reason
        assert "the parent is not root, so" in sandbox.ipc_namespace.reason
    assert "seccomp: active" in sandbox.summary()


def test_every_thread_is_filtered_and_unprivileged(pool: WorkerPool) -> None:
    # Enough work that the Go runtime has made every thread it will make.
    for index in range(200):
        assert pool.evaluate("std.length(std.range(1, std.extVar('n')))", {"n": index + 1})
    wait_until(lambda: full(pool))  # the spare too has finished its start-up
    for pid in pool.stats().worker_pids:
        threads = status_fields(pid)
        assert threads
        for thread in threads:
            assert thread["Seccomp"] == "2", thread  # filter mode
            assert thread["NoNewPrivs"] == "1"
            assert int(thread["Seccomp_filters"]) >= 1
            if ROOT:
                assert thread["Uid"].split() == ["65534"] * 4
                assert thread["Gid"].split() == ["65534"] * 4
                assert thread["Groups"].strip() == ""
                assert int(thread["CapEff"], 16) == 0 and int(thread["CapPrm"], 16) == 0


def test_error_paths_work_under_the_filter(pool: WorkerPool) -> None:
    """stderr writes, engine errors and refused imports still reach the caller typed."""
    assert pool.evaluate("std.trace('to stderr', {a: 1})") == {"a": 1}
    with pytest.raises(JsonnetError, match="boom"):
        pool.evaluate("error 'boom'")
    with pytest.raises(JsonnetError, match="import not available"):
        pool.evaluate('import "x.libsonnet"')
    assert pool.evaluate("{ok: true}") == {"ok": True}


def test_several_workers_share_the_task_limit() -> None:
    """RLIMIT_NPROC counts every task of the worker user: a pool of six Go workers and
    calls from eight threads must not hit it."""
    # Eight callers on this 2-CPU machine slow some light calls past the interactive budget:
    # their workers would be recycled on purpose, and this test counts respawns.
    with WorkerPool(6, engine="go", interactive_budget=None) as pool:
        with concurrent.futures.ThreadPoolExecutor(8) as threads:
            results = list(threads.map(lambda n: pool.evaluate(f"{n} * 2"), range(600)))
        assert results == [n * 2 for n in range(600)]
        stats = pool.stats()
        assert stats.alive == 6 and stats.crashes == 0 and stats.respawns == 0


def test_a_missing_layer_is_reported_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="jsonnet_worker")
    command = harness_command("full", without=("seccomp",), identity=resolve_identity("nobody"))
    with seams.pool_of(seams.re_exec(command), 1) as pool:
        sandbox = pool.sandbox
        assert sandbox is not None and sandbox.enforced
        assert sandbox.seccomp.state is LayerState.MISSING
        assert sandbox.seccomp.reason == "left out by the test harness"
        assert [layer.name for layer in sandbox.missing] == ["seccomp"]
        assert pool.evaluate("1 + 1") == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    verdicts = [message for message in warnings if message.startswith("sandbox: degraded: ")]
    assert len(verdicts) == 1, warnings
    assert "seccomp missing: left out by the test harness" in verdicts[0]


def test_a_filter_the_kernel_refuses_stops_the_worker() -> None:
    with pytest.raises(WorkerStartError) as caught:
        seams.pool_of(seams.re_exec(harness_command("seccomp-refused")), 1, spawn_timeout=5)
    assert "cannot apply the seccomp filter" in caught.value.cause


def test_a_kernel_without_seccomp_2_is_missing_not_fatal() -> None:
    with seams.pool_of(seams.re_exec(harness_command("seccomp-enosys")), 1, spares=0) as pool:
        sandbox = pool.sandbox
        assert sandbox is not None and not sandbox.seccomp.active
        assert "seccomp(2): Function not implemented" in sandbox.seccomp.reason
        assert pool.evaluate("1 + 1") == 2


def test_an_architecture_without_a_table_is_missing_not_fatal() -> None:
    result = install(machine="sparc64")
    assert not result.applied and "sparc64" in result.reason


@pytest.mark.parametrize("arch", sorted(TABLES))
def test_every_table_assembles(arch: str) -> None:
    program = build_program(TABLES[arch], os.getpid())
    assert len(program) % 8 == 0 and 0 < len(program) // 8 < 4096
    assert build_program(TABLES[arch], os.getpid(), errno.ENOSYS) != program


@needs_root
def test_worker_user_is_configurable() -> None:
    daemon = pwd.getpwnam("daemon")
    with WorkerPool(1, worker_user="daemon", spares=0) as pool:
        assert pool.sandbox is not None
        assert f"uid {daemon.pw_uid}, gid {daemon.pw_gid}" in pool.sandbox.privileges.detail
        (pid,) = pool.stats().worker_pids
        assert status_fields(pid)[0]["Uid"].split() == [str(daemon.pw_uid)] * 4
    with pytest.raises(ValueError, match="no such user"):
        WorkerPool(1, worker_user="no-such-user-here")
    with pytest.raises(ValueError, match="root"):
        WorkerPool(1, worker_user="root")


@needs_root
def test_keeping_root_is_reported_missing(caplog: pytest.LogCaptureFixture) -> None:
    with WorkerPool(1, worker_user=None) as pool:
        assert pool.sandbox is not None
        missing = {layer.name: layer.reason for layer in pool.sandbox.missing}
        assert set(missing) == {"privileges", "limits"}
        assert [layer.name for layer in pool.sandbox.missing_in_depth] == ["uid"]
        assert judge_sandbox(pool.sandbox).state == "degraded"
        assert "worker_user=None" in missing["privileges"]
        assert "RLIMIT_NPROC" in missing["limits"]
    assert any("privileges missing: " in r.getMessage() for r in caplog.records)


def test_doctor_lists_every_layer(capsys: pytest.CaptureFixture[str]) -> None:
    """Every layer is listed, the defence-in-depth ones too: off (the configuration's choice)
    or missing with the reason; the verdict line and the exit status follow the one rule:
    0 only when every layer the configuration asks for is active (a root parent here; a
    non-root one cannot drop the uid or make an IPC namespace: degraded, 1)."""
    assert main.main(["doctor", "--engine", "go"]) == (0 if ROOT else 1)
    out = capsys.readouterr().out
    for layer in ("limits:", "privileges:", "seccomp:"):
        assert f"  {layer:<16} active:" in out, out
    for layer in ("uid:", "ipc_namespace:"):
        assert f"  {layer:<16}" in out, out
    assert ("  uid:             off: " in out) == ROOT
    assert ("  uid:             MISSING: " in out) == (not ROOT)
    assert ("  ipc_namespace:   active: " in out) == ROOT
    verdict = "engine go: sandbox: every layer active" if ROOT else "engine go: sandbox: degraded: "
    assert verdict in out, out


@needs_root
def test_death_signal_survives_the_privilege_drop() -> None:
    """The kernel clears PR_SET_PDEATHSIG when credentials change; the worker re-arms it."""
    command = harness_command("python", identity=resolve_identity("nobody"))
    code = "import os\nresult = [main_thread['pdeathsig'], os.getuid()]"
    with RawWorker("go", command=command) as raw:
        answer = raw.request(code)
    assert answer["t"] == "result", answer
    assert json.loads(answer["json"]) == [signal.SIGKILL, 65534]


# -- the runtimes under the filter's rules ---------------------------------------------------


def python_worker(*, cpu_budget: float | None = None) -> RawWorker:
    """The compromised-engine model: a full worker that runs each snippet as Python."""
    identity = resolve_identity("nobody")
    command = harness_command("python", identity=identity, cpu_budget=cpu_budget)
    raw = RawWorker("go", command=command, cpu_budget=cpu_budget)
    assert raw.hello.pid == raw.process.pid, raw.hello
    return raw


def test_what_the_worker_aims_at_itself_still_works() -> None:
    """The calls the filter checks pass when aimed at the worker itself: pid 0 or its pid.
    Another thread's id of the same worker is refused (the filter knows the process id
    only), and nothing the worker runs needs that."""
    code = """
import ctypes, os, resource, threading
import _signal as signal  # the worker has signal's calls, not its module (never imported)
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
def check(value):
    if value == -1:
        raise OSError(ctypes.get_errno(), "syscall")
def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as exc:
        return exc.errno
pid = os.getpid()
release = threading.Event()
other = threading.Thread(target=release.wait)
other.start()
other_tid = other.native_id
nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
result = {
    "prlimit 0": attempt(lambda: resource.prlimit(0, resource.RLIMIT_NOFILE, nofile)),
    "prlimit pid": attempt(lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, nofile)),
    "prlimit other thread": attempt(lambda: resource.prlimit(other_tid, resource.RLIMIT_NOFILE)),
    "setrlimit": attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)),
    "affinity 0": attempt(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
    "affinity pid": attempt(lambda: os.sched_setaffinity(pid, os.sched_getaffinity(0))),
    "getaffinity other thread": attempt(lambda: os.sched_getaffinity(other_tid)),
    "setpriority self": attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 0)),
    "ioprio self": attempt(lambda: check(libc.syscall(L({ioprio_set}), L(1), L(0), L(0)))),
    "kill self 0": attempt(lambda: os.kill(pid, 0)),
    "tgkill own thread": attempt(lambda: signal.pthread_kill(threading.get_ident(), 0)),
}
release.set()
other.join()
"""
    ioprio_set = TABLES[os.uname().machine].number("ioprio_set")
    with python_worker() as raw:
        answer = raw.request(code.replace("{ioprio_set}", str(ioprio_set)))
    assert answer["t"] == "result", answer
    outcomes = json.loads(answer["json"])
    assert outcomes == {
        "prlimit 0": "allowed",
        "prlimit pid": "allowed",
        "prlimit other thread": errno.EPERM,
        "setrlimit": "allowed",
        "affinity 0": "allowed",
        "affinity pid": "allowed",
        "getaffinity other thread": "allowed",
        "setpriority self": "allowed",
        "ioprio self": "allowed",
        "kill self 0": "allowed",
        "tgkill own thread": "allowed",
    }


def test_ctypes_callbacks_and_large_reallocs_work_under_the_filter() -> None:
    """libffi maps a private anonymous page for a ctypes callback (the C API binding of the
    go engine calls back into Python through one); glibc's realloc of a large chunk falls
    back to allocate-copy-free when mremap is refused; threads still start."""
    code = """
import ctypes, threading
libc = ctypes.CDLL(None, use_errno=True)
compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
values = (ctypes.c_int * 5)(5, 3, 4, 1, 2)
libc.qsort(values, 5, ctypes.sizeof(ctypes.c_int), compare(lambda a, b: a[0] - b[0]))
libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
block = libc.malloc(1 << 20)
ctypes.memset(block, 7, 1 << 20)
for size in (8 << 20, 64 << 20):  # mmapped chunks: realloc would use mremap
    block = libc.realloc(ctypes.c_void_p(block), size)
    assert block
kept = ctypes.string_at(block, 16)
libc.free(ctypes.c_void_p(block))
grown = bytearray()
for _ in range(64):
    grown += b"x" * (1 << 20)
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
add_one = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
live = [add_one(lambda x: x + 1) for _ in range(3000)]  # beyond one trampoline table
result = [list(values), kept.hex(), len(grown), sum(callback(1) for callback in live)]
"""
    with python_worker() as raw:
        answer = raw.request(code)
    assert answer["t"] == "result", (answer, raw.process.stderr.text())
    assert json.loads(answer["json"]) == [[1, 2, 3, 4, 5], "07" * 16, 64 << 20, 6000]


@pytest.mark.parametrize("engine", ["go", "cpp"])
def test_both_engines_under_load_with_every_rule(engine: str) -> None:
    """Concurrent calls, heavy ones, refused imports (the go engine's import callback runs
    through cgo on its own threads) and errors: no worker crashes under the filter."""
    snippets = [
        "std.length(std.range(1, std.extVar('n') * 100))",
        "std.manifestJson({a: std.range(1, 500), b: std.extVar('n')})",
        "local f(n) = if n == 0 then 0 else 1 + f(n - 1); f(300) + std.extVar('n')",
        "std.join(',', [std.toString(x) for x in std.range(1, 2000)]) + std.extVar('n')",
    ]
    calls = 120 if engine == "cpp" else 400
    # Calls past the interactive budget would be recycled on purpose; this test counts
    # respawns as crashes of the filter's making.
    with WorkerPool(2, engine=engine, timeout=10, interactive_budget=None) as pool:

        def call(n: int) -> object:
            if n % 10 == 0:
                with pytest.raises(JsonnetError, match="import not available"):
                    pool.evaluate('import "x.libsonnet"')
                return "refused"
            return pool.evaluate(snippets[n % len(snippets)], {"n": str(n)} if n % 4 else {"n": n})

        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            list(threads.map(call, range(calls)))
        stats = pool.stats()
        assert stats.crashes == 0 and stats.respawns == 0, stats


# -- the CPU budget --------------------------------------------------------------------------

CPU_BOUND = (
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(400), std.range(1, 1000000), 0)"
)


def test_a_worker_past_its_cpu_budget_dies_typed_and_a_pool_refuses_a_call_it_cannot_fit() -> None:
    """RLIMIT_CPU ends a worker with SIGXCPU, classified as EvaluationTimeout. The pool
    never lets a call that keeps to its timeout get there (issue 21): a timeout whose CPU
    headroom no fresh worker's budget fits is refused before any worker sees it."""
    with python_worker(cpu_budget=1) as raw:
        with pytest.raises(AssertionError):  # no answer: the worker dies mid-call
            raw.request("while True:\n    pass\n")
        assert raw.process.wait(10) is not None, "the worker outlived its CPU budget"
        error = raw.process.death_error()
    assert isinstance(error, EvaluationTimeout), error
    assert "CPU budget of 1 s" in str(error) and "SIGXCPU" in str(error)
    assert "CPU clock" in str(error) and error.clock == "cpu"
    with WorkerPool(1, cpu_budget=1, timeout=0.4, spares=0) as pool:
        assert pool.sandbox is not None and "RLIMIT_CPU 1/2" in pool.sandbox.limits.detail
        with pytest.raises(InvalidArgument, match="cpu_budget=1"):
            pool.evaluate(CPU_BOUND, timeout=30)
        assert pool.evaluate("1 + 1") == 2


def test_a_worker_that_ignores_sigxcpu_is_killed_a_second_later_and_still_classified() -> None:
    code = """
import ctypes
import _signal as signal  # the worker has signal's calls, not its module
libc = ctypes.CDLL(None)
libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.signal(signal.SIGXCPU, ctypes.c_void_p(1))  # SIG_IGN, process-wide
while True:
    pass
"""
    with python_worker(cpu_budget=1) as raw:
        with pytest.raises(AssertionError):  # no answer: the worker dies mid-call
            raw.request(code)
        assert raw.process.wait(10) is not None, "the worker outlived its CPU budget"
        error = raw.process.death_error()
    assert isinstance(error, EvaluationTimeout), error
    assert "CPU budget of 1 s" in str(error) and "SIGKILL" in str(error)
    assert error.clock == "cpu"


def test_without_a_budget_a_kill_is_a_crash() -> None:
    """Only a worker with a budget is classified by it: a SIGKILL from outside stays a
    crash."""
    with python_worker() as raw:
        os.kill(raw.process.pid, signal.SIGKILL)
        assert raw.process.wait(10) is not None
        error = raw.process.death_error()
    assert type(error).__name__ == "WorkerCrashed", error


# -- a uid per worker, an IPC namespace per worker -------------------------------------------


def test_worker_user_ranges_are_parsed_and_checked() -> None:
    assert parse_worker_user("100000-100009") == range(100000, 100010)
    assert parse_worker_user(" 7-7 ") == range(7, 8)
    assert parse_worker_user("nobody") == "nobody"
    assert parse_worker_user(None) is None
    with pytest.raises(InvalidArgument, match="FIRST <= LAST"):
        parse_worker_user("10-9")
    with pytest.raises(InvalidArgument, match="within"):
        parse_worker_user(range(0, 5))


@needs_root
def test_a_uid_range_naming_existing_users_is_refused() -> None:
    daemon = pwd.getpwnam("daemon").pw_uid
    with pytest.raises(InvalidArgument, match="daemon"):
        WorkerIdentities(f"{daemon}-{daemon + 1}")


@needs_root
def test_identities_from_a_range_are_handed_out_once_and_given_back() -> None:
    identities = WorkerIdentities(range(200100, 200102))
    first, second = identities.acquire(), identities.acquire()
    assert first is not None and second is not None
    assert {first.uid, second.uid} == {200100, 200101} and first.own_uid
    with pytest.raises(OSError) as caught:
        identities.acquire()
    assert caught.value.errno == errno.EUSERS
    identities.release(first)
    identities.release(first)  # twice: still one uid back
    again = identities.acquire()
    assert again is not None and again.uid == first.uid
    with pytest.raises(OSError):
        identities.acquire()


def test_a_non_root_parent_has_no_identities_to_hand_out() -> None:
    if ROOT:
        assert WorkerIdentities(None).acquire() is None
    else:
        identities = WorkerIdentities("200100-200109")
        assert not identities.drops and identities.acquire() is None


@needs_root
def test_a_uid_range_gives_each_live_worker_its_own_uid() -> None:
    with WorkerPool(3, worker_user="200000-200009", spares=1) as pool:
        wait_until(lambda: full(pool))
        sandbox = pool.sandbox
        assert sandbox is not None
        assert sandbox.missing == (), sandbox.summary()
        assert sandbox.missing_in_depth == (), sandbox.summary()
        assert "this worker's alone" in sandbox.uid.detail
        # RLIMIT_NPROC counts this worker's tasks only: nothing ran as its uid before.
        assert "(0 + 256)" in sandbox.limits.detail, sandbox.limits.detail
        uids = {pid: status_fields(pid)[0]["Uid"].split()[0] for pid in pool.stats().worker_pids}
        assert len(set(uids.values())) == 4 and all(
            200000 <= int(u) <= 200009 for u in uids.values()
        )
        victim = next(iter(uids))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in pool.stats().worker_pids and full(pool))
        now = {status_fields(pid)[0]["Uid"].split()[0] for pid in pool.stats().worker_pids}
        assert len(now) == 4 and all(200000 <= int(u) <= 200009 for u in now)
        identities = seams.worker_identities(pool)
        assert identities.in_use() == 4
        assert pool.evaluate("[1, 2]") == [1, 2]
    assert identities.in_use() == 0


@needs_root
def test_each_worker_has_an_ipc_namespace_of_its_own(pool: WorkerPool) -> None:
    """Forked workers (issue 14) share their template's namespace, made before it dropped
    privileges: one per template, never the host's; re-exec workers have one each."""
    mine = os.readlink("/proc/self/ns/ipc")
    stats = pool.stats()
    namespaces = {os.readlink(f"/proc/{pid}/ns/ipc") for pid in stats.worker_pids}
    assert mine not in namespaces
    if stats.template_pid is not None and stats.fork_fallbacks == 0:
        assert namespaces == {os.readlink(f"/proc/{stats.template_pid}/ns/ipc")}
        assert pool.sandbox is not None
        assert "one per fork server" in pool.sandbox.ipc_namespace.detail, pool.sandbox.summary()
    with seams.pool_of(seams.re_exec(), 2, spares=0) as re_exec:
        pids = re_exec.stats().worker_pids
        own = {os.readlink(f"/proc/{pid}/ns/ipc") for pid in pids}
        assert mine not in own and len(own) == len(pids)


def test_an_ipc_namespace_the_kernel_refuses_is_missing_not_fatal() -> None:
    """As under Docker's default seccomp profile (unshare refused): reported, not fatal."""
    command = harness_command("ipc-refused", identity=resolve_identity("nobody"))
    with seams.pool_of(seams.re_exec(command), 1, spares=0) as pool:
        sandbox = pool.sandbox
        assert sandbox is not None and not sandbox.ipc_namespace.active
        if ROOT:
            assert "unshare(CLONE_NEWIPC): Operation not permitted" in sandbox.ipc_namespace.reason
        assert pool.evaluate("1 + 1") == 2


def test_a_limit_the_kernel_refuses_is_named_not_fatal() -> None:
    command = harness_command("limits-refused", identity=resolve_identity("nobody"))
    with seams.pool_of(seams.re_exec(command), 1, spares=0) as pool:
        sandbox = pool.sandbox
        assert sandbox is not None
        assert "refused by the kernel: RLIMIT_RTPRIO" in sandbox.limits.detail
        assert (
            "RLIMIT_MSGQUEUE" in sandbox.limits.detail
            and "0: FSIZE, CORE, MEMLOCK, NICE;" in sandbox.limits.detail
        )
        assert pool.evaluate("1 + 1") == 2
