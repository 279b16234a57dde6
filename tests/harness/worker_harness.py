"""Test harness: the real worker start-up, with one thing changed for a test.

Run as ``python -I worker_harness.py MODE [--without LAYER,...] [--seccomp-errno N]
[--parent-uid UID] [worker args...]``. Modes:
  no-barrier      the engine evaluates without the import callback: only the kernel refuses
  python          each request's snippet is Python source run after restriction; the JSON of
                  its ``result`` variable is returned (a model of a fully compromised engine)
  broken-engine   the engine extension cannot be found
  landlock-enosys / landlock-eperm
                  a seccomp filter makes the Landlock syscalls fail with ENOSYS / EPERM, as on
                  a kernel without Landlock or under a container's seccomp profile
  full            the product's start-up unchanged (with ``--without``: minus some layers)
  seccomp-refused the kernel refuses the seccomp filter (the worker must not start)
  seccomp-enosys  an outer seccomp filter makes seccomp(2) answer ENOSYS, as an old kernel or
                  a sandbox around us would (the layer must be reported missing, not fatal)
  ipc-refused     a seccomp filter makes unshare() fail with EPERM, as Docker's default
                  profile does (the IPC namespace must be reported missing, not fatal)
  limits-refused  setrlimit refuses RLIMIT_RTPRIO and RLIMIT_MSGQUEUE, as an emulating
                  kernel might (reported in the limits layer, not fatal)
``--without`` leaves layers out, to measure what each one refuses (docs/ISOLATION.md):
  seccomp         no seccomp filter
  limits          none of the project's limits (RLIMIT_NPROC, NOFILE, FSIZE, CORE) but the
                  memory limit, which Kratos has too (RLIMIT_AS)
  landlock-net-scopes
                  Landlock filesystem rights only, as Ory Kratos applies it
  ipc_namespace   no IPC namespace of the worker's own (the host's System V objects and
                  message queues stay in reach)
  issue-12        the filter, limits and IPC namespace as they were before issue 12 (the
                  old deny-list, clone/clone3 the only argument checks, RLIMIT_CORE, FSIZE
                  and DATA only): what benchmarks/bench_layers.py compares against
(the privilege drop happens only when the worker args carry ``--uid``/``--gid``).
``--seccomp-errno N`` makes the filter refuse with errno N instead of EPERM, so a test can
tell the filter's refusals from everyone else's. ``--parent-uid UID`` makes a root test
process stand in for a non-root parent: the harness becomes UID (no groups) before the
worker starts, so the worker has nothing to drop and no IPC namespace to make.
This is not a switch in the product: it lives in tests/ and patches the product's modules.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import struct
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jsonnet_worker._sandbox import landlock, privileges, seccomp
from jsonnet_worker._wire.layers import LayerState, LayerStatus
from jsonnet_worker._wire.messages import EngineKind, EvalRequest
from jsonnet_worker._worker import engines, startup

LAYERS = ("seccomp", "limits", "landlock-net-scopes", "ipc_namespace", "issue-12")

# The filter and limits as they were before issue 12, for benchmarks/bench_layers.py.
_BEFORE_ISSUE_12_DENIED = (
    *("execve", "execveat", "fork", "vfork", "socket", "ptrace", "process_vm_readv"),
    *("process_vm_writev", "pidfd_getfd", "chmod", "fchmod", "fchmodat", "fchmodat2"),
    *("chown", "fchown", "lchown", "fchownat", "utime", "utimes", "futimesat", "utimensat"),
    *seccomp.DENIED_FAMILIES["xattr"],
    *seccomp.DENIED_FAMILIES["namespaces and mounts"],
    *("memfd_create", "memfd_secret", "bpf", "perf_event_open", "keyctl", "add_key"),
    *("request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd"),
    *("personality", "kexec_load", "kexec_file_load", "init_module", "finit_module"),
    *("delete_module", "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm", "acct"),
    *("swapon", "swapoff", "reboot"),
)


def leave_out(layers: set[str]) -> None:
    unknown = layers - set(LAYERS)
    if unknown:
        raise SystemExit(f"unknown layers {sorted(unknown)}")
    if "seccomp" in layers:

        def left_out(
            machine: str | None = None,
            refusal: int = errno.EPERM,
            *,
            process_clone: int | None = None,
        ) -> seccomp.SeccompResult:
            return seccomp.SeccompResult(
                False, os.uname().machine, reason="left out by the test harness"
            )

        seccomp.install = left_out
    if "limits" in layers:

        def memory_limit_only(memory_limit: int, cpu_budget: float | None = None) -> str:
            resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
            return f"RLIMIT_DATA {memory_limit}"

        startup.set_limits = memory_limit_only
        privileges.set_task_and_file_limits = lambda uid: LayerStatus(
            "limits", LayerState.MISSING, reason="left out by the test harness"
        )
    if "issue-12" in layers:
        seccomp.DENIED = _BEFORE_ISSUE_12_DENIED
        seccomp.ARGUMENT_RULES = {
            name: rule
            for name, rule in seccomp.ARGUMENT_RULES.items()
            if name in ("clone", "clone3")
        }

        def limits_before_issue_12(memory_limit: int, cpu_budget: float | None = None) -> str:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
            resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
            return f"RLIMIT_DATA {memory_limit}, RLIMIT_FSIZE 0, RLIMIT_CORE 0"

        startup.set_limits = limits_before_issue_12
        layers = layers | {"ipc_namespace"}
    if "ipc_namespace" in layers:
        privileges.new_ipc_namespace = lambda: LayerStatus(
            "ipc_namespace", LayerState.MISSING, reason="left out by the test harness"
        )
    if "landlock-net-scopes" in layers:
        everything = landlock.Ruleset.deny_everything

        def filesystem_only() -> landlock.Ruleset:
            ruleset = everything()
            return landlock.Ruleset(fs=ruleset.fs, restrict_flags=ruleset.restrict_flags)

        landlock.Ruleset.deny_everything = staticmethod(filesystem_only)  # type: ignore[method-assign]


def refuse_with(error: int) -> None:
    install = seccomp.install

    def refusing_with_error(
        machine: str | None = None, refusal: int = errno.EPERM, *, process_clone: int | None = None
    ) -> seccomp.SeccompResult:
        return install(machine, error, process_clone=process_clone)

    seccomp.install = refusing_with_error


def install_landlock_filter(error: int) -> None:
    """seccomp: syscalls 444-446 return ``error``; everything else is allowed."""
    ret_errno = 0x00050000 | error
    allow = 0x7FFF0000
    install_filter(
        [
            (0x20, 0, 0, 0),  # ld [nr]
            (0x35, 0, 3, 444),  # jge 444 ? next : allow
            (0x35, 2, 0, 447),  # jge 447 ? allow : next
            (0x06, 0, 0, ret_errno),
            (0x06, 0, 0, allow),
            (0x06, 0, 0, allow),
        ]
    )


def install_unshare_filter(error: int, call: str = "unshare") -> None:
    """seccomp: ``call`` (unshare) returns ``error``; everything else is allowed. Installed
    with prctl(PR_SET_SECCOMP), which works without the seccomp(2) call."""
    table = seccomp.AARCH64 if os.uname().machine == "aarch64" else seccomp.X86_64
    unshare = table.number(call)
    install_filter(
        [
            (0x20, 0, 0, 0),  # ld [nr]
            (0x15, 0, 1, unshare),  # jeq unshare ? next : allow
            (0x06, 0, 0, 0x00050000 | error),
            (0x06, 0, 0, 0x7FFF0000),
        ]
    )


def become_parent_uid(uid: int) -> None:
    """What a non-root parent's worker starts as: that uid, no groups, no capabilities.

    Taken at the start of the worker's start-up (the interpreter has started as root: this
    uid may not be able to read it), with PR_SET_PDEATHSIG re-armed (a credential change
    clears it)."""
    start = startup.start

    def start_as_parent_uid(options: startup.WorkerOptions) -> startup.StartUp:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        startup.tie_to_parent(options.parent_pid)
        return start(options)

    startup.start = start_as_parent_uid


def install_filter(bpf: list[tuple[int, int, int, int]]) -> None:
    program = b"".join(struct.pack("=HBBI", *insn) for insn in bpf)
    buffer = ctypes.create_string_buffer(program)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(bpf), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "no_new_privs")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "seccomp")


def seccomp_refused() -> None:
    def refuse(machine: str | None = None, refusal: int = errno.EPERM) -> None:
        raise seccomp.SeccompError(errno.EACCES, "seccomp(SET_MODE_FILTER): refused")

    seccomp.install = refuse  # type: ignore[assignment]


def no_barrier() -> None:
    # The binding without its import callback (the C API path is turned off: its barrier
    # is the VM's callback itself), so only the kernel can refuse.
    original = engines.Engine.run

    def run_without_barrier(self: engines.Engine, request: object) -> str:
        self._capi = None
        evaluate = self._module_evaluate
        self._module_evaluate = lambda *a, **kw: evaluate(
            *a, **{k: v for k, v in kw.items() if k != "import_callback"}
        )
        try:
            return original(self, request)  # type: ignore[arg-type]
        finally:
            self._module_evaluate = evaluate

    engines.Engine.run = run_without_barrier  # type: ignore[method-assign]


def python_engine() -> None:
    # What the probes of tests/test_isolation_matrix.py use: nothing can be imported
    # once the worker is restricted, so load it now.
    import socket  # noqa: F401
    import threading  # noqa: F401

    # Per-thread state of the main thread, read once start-up is over (snippets run on
    # the loop thread): PR_SET_PDEATHSIG is a property of the thread that set it.
    main_thread: dict[str, object] = {}
    start = startup.start

    def start_and_record(options: startup.WorkerOptions) -> startup.StartUp:
        with open("/proc/self/maps") as maps:  # before restriction: the main stack
            for line in maps:
                if line.rstrip().endswith("[stack]"):
                    low, high = line.split()[0].split("-")
                    main_thread["stack"] = [int(low, 16), int(high, 16)]
        started = start(options)
        pdeathsig = ctypes.c_int(-1)
        ctypes.CDLL(None).prctl(2, ctypes.byref(pdeathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
        main_thread["pdeathsig"] = pdeathsig.value
        return started

    startup.start = start_and_record

    def run_python(self: engines.Engine, request: EvalRequest) -> str:
        scope: dict[str, object] = {"main_thread": main_thread}
        exec(request.snippet, scope)
        return json.dumps(scope.get("result"))

    engines.Engine.run = run_python  # type: ignore[method-assign]


def broken_engine() -> None:
    EngineKind.module_name = property(  # type: ignore[method-assign,assignment]
        lambda self: "_no_such_jsonnet_engine"
    )


def limits_refused() -> None:
    setrlimit = resource.setrlimit

    def refusing(limit: int, value: tuple[int, int]) -> None:
        if limit in (resource.RLIMIT_RTPRIO, resource.RLIMIT_MSGQUEUE):
            raise OSError(errno.EINVAL, "Invalid argument")
        setrlimit(limit, value)

    resource.setrlimit = refusing


# Each mode: what it changes in this process before the real worker's main runs.
MODES: dict[str, Callable[[], None]] = {
    "full": lambda: None,
    "seccomp-refused": seccomp_refused,
    "no-barrier": no_barrier,
    "python": python_engine,
    "broken-engine": broken_engine,
    "landlock-enosys": lambda: install_landlock_filter(errno.ENOSYS),
    "landlock-eperm": lambda: install_landlock_filter(errno.EPERM),
    "ipc-refused": lambda: install_unshare_filter(errno.EPERM),
    "seccomp-enosys": lambda: install_unshare_filter(errno.ENOSYS, "seccomp"),
    "limits-refused": limits_refused,
}


def apply_options(argv: list[str]) -> list[str]:
    """Apply the leading --without/--seccomp-errno/--parent-uid options; the rest is the
    worker's own argv."""
    while argv and argv[0] in ("--without", "--seccomp-errno", "--parent-uid"):
        option, value, argv = argv[0], argv[1], argv[2:]
        if option == "--without":
            leave_out({layer for layer in value.split(",") if layer})
        elif option == "--parent-uid":
            become_parent_uid(int(value))
        else:
            refuse_with(int(value))
    return argv


def main() -> int:
    mode = sys.argv[1]
    argv = apply_options(sys.argv[2:])
    if mode not in MODES:
        raise SystemExit(f"unknown harness mode {mode}")
    MODES[mode]()
    code = startup.main(argv)
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
