"""fork() after pools exist (Celery, multiprocessing with fork, a hand-written prefork server):
the child never reads, writes, signals or closes anything of the parent's pools, its default
pool starts afresh, an explicit pool inherited from the parent raises ForkedPool, and the
parent goes on with no error. Runs in a fresh interpreter, so that the child can exit the
normal way (atexit handlers and finalisers run, as they would in an application)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import jsonnet_worker
    from jsonnet_worker import ForkedPool, WorkerPool

    MAPPER = "local c = std.extVar('claims'); {id: c.sub, n: c.n * 2}"
    CALLS = int(sys.argv[1])

    def check(evaluate, tag, calls):
        for index in range(calls):
            value = {"sub": f"{tag}-{index}", "n": index}
            answer = evaluate(MAPPER, {"claims": value})
            assert answer == {"id": f"{tag}-{index}", "n": 2 * index}, (tag, index, answer)

    explicit = WorkerPool(2)
    jsonnet_worker.evaluate("1")  # the default pool exists before the fork
    default = jsonnet_worker.get_default_pool()

    def settled(pool):
        stats = pool.stats()
        return stats.spares == pool.spares and stats.starting == 0 and stats.alive == pool.size

    while not (settled(explicit) and settled(default)):
        time.sleep(0.01)  # every worker and spare started: the pid sets below are complete
    pids_before = (set(explicit.stats().worker_pids), set(default.stats().worker_pids))
    errors = []

    def load(evaluate, tag):
        try:
            check(evaluate, tag, CALLS)
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [
        threading.Thread(target=load, args=(explicit.evaluate, f"explicit{i}")) for i in range(2)
    ] + [
        threading.Thread(target=load, args=(jsonnet_worker.evaluate, f"default{i}"))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    while explicit.stats().evaluations < 50 or default.stats().evaluations < 50:
        time.sleep(0.001)  # both pools busy at the moment of the fork

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        report = {}
        try:
            explicit.evaluate("1")
        except ForkedPool as exc:
            report["explicit"] = "ForkedPool: " + str(exc)
        try:
            explicit.stats()
        except ForkedPool:
            report["stats"] = "ForkedPool"
        explicit.close()  # nothing: the workers are the parent's
        explicit.terminate()
        check(jsonnet_worker.evaluate, "child", CALLS)
        fresh = jsonnet_worker.get_default_pool()
        report["fresh_default"] = fresh is not default
        report["child_pids"] = sorted(fresh.stats().worker_pids)
        os.write(write_end, json.dumps(report).encode())
        os.close(write_end)
        sys.exit(0)  # atexit and finalisers run, as in an application
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read() or "{}")
    _, status = os.waitpid(child, 0)
    report["child_status"] = os.waitstatus_to_exitcode(status)
    for thread in threads:
        thread.join()
    check(explicit.evaluate, "after", 200)  # the parent's pools still work
    check(jsonnet_worker.evaluate, "after", 200)
    report["parent_errors"] = errors
    # A worker may have been recycled on purpose meanwhile (a call slowed past the
    # interactive budget by this load is demoted, then recycled): every new pid is one.
    report["replaced"] = len(set(explicit.stats().worker_pids) - pids_before[0]) + len(
        set(default.stats().worker_pids) - pids_before[1]
    )
    report["recycles"] = explicit.stats().recycles + default.stats().recycles
    report["crashes"] = explicit.stats().crashes + default.stats().crashes
    report["parent_stats"] = [repr(explicit.stats()), repr(default.stats())]
    report["parent_pids"] = sorted(pids_before[0] | pids_before[1])
    explicit.close()
    print(json.dumps(report))
    """
)


def test_fork_with_both_pools_busy() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1500"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["child_status"] == 0
    assert report["explicit"].startswith("ForkedPool:") and "after the fork" in report["explicit"]
    assert report["stats"] == "ForkedPool"
    assert report["fresh_default"] is True
    assert not set(report["child_pids"]) & set(report["parent_pids"])
    assert report["parent_errors"] == []
    # Nothing of the parent's was signalled or closed: the same workers but those the pools
    # recycled, none crashed.
    assert report["replaced"] <= report["recycles"] and report["crashes"] == 0, report
