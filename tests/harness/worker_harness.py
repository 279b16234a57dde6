"""Test harness: the real worker start-up, with one thing changed for a test.

Run as ``python -I worker_harness.py MODE [--without LAYER,...] [--seccomp-errno N]
[worker args...]``. Modes:
  no-barrier      the engine evaluates without the import callback: only the kernel refuses
  python          each request's snippet is Python source run after restriction; the JSON of
                  its ``result`` variable is returned (a model of a fully compromised engine)
  broken-engine   the engine extension cannot be found
  landlock-enosys / landlock-eperm
                  a seccomp filter makes the Landlock syscalls fail with ENOSYS / EPERM, as on
                  a kernel without Landlock or under a container's seccomp profile
  full            the product's start-up unchanged (with ``--without``: minus some layers)
  seccomp-refused the kernel refuses the seccomp filter (the worker must not start)
``--without`` leaves layers out, to measure what each one refuses (docs/ISOLATION.md):
  seccomp         no seccomp filter
  limits          none of the project's limits (RLIMIT_NPROC, NOFILE, FSIZE, CORE) but the
                  memory limit, which Kratos has too (RLIMIT_AS)
  landlock-net-scopes
                  Landlock filesystem rights only, as Ory Kratos applies it
(the privilege drop happens only when the worker args carry ``--uid``/``--gid``).
``--seccomp-errno N`` makes the filter refuse with errno N instead of EPERM, so a test can
tell the filter's refusals from everyone else's.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jsonnet_worker import _engines, _landlock, _privileges, _seccomp, _worker
from jsonnet_worker._protocol import EvalRequest
from jsonnet_worker._status import LayerState, LayerStatus

LAYERS = ("seccomp", "limits", "landlock-net-scopes")


def leave_out(layers: set[str]) -> None:
    unknown = layers - set(LAYERS)
    if unknown:
        raise SystemExit(f"unknown layers {sorted(unknown)}")
    if "seccomp" in layers:
        _seccomp.install = lambda machine=None, refusal=errno.EPERM: _seccomp.SeccompResult(
            False, os.uname().machine, reason="left out by the test harness"
        )
    if "limits" in layers:
        _worker.set_limits = lambda memory_limit: resource.setrlimit(
            resource.RLIMIT_DATA, (memory_limit, memory_limit)
        )
        _privileges.set_task_and_file_limits = lambda uid: LayerStatus(
            "limits", LayerState.MISSING, reason="left out by the test harness"
        )
    if "landlock-net-scopes" in layers:
        everything = _landlock.Ruleset.deny_everything

        def filesystem_only() -> _landlock.Ruleset:
            ruleset = everything()
            return _landlock.Ruleset(fs=ruleset.fs, restrict_flags=ruleset.restrict_flags)

        _landlock.Ruleset.deny_everything = staticmethod(filesystem_only)  # type: ignore[method-assign]


def refuse_with(error: int) -> None:
    install = _seccomp.install
    _seccomp.install = lambda machine=None, refusal=errno.EPERM: install(machine, error)


def install_landlock_filter(error: int) -> None:
    """seccomp: syscalls 444-446 return ``error``; everything else is allowed."""
    ret_errno = 0x00050000 | error
    allow = 0x7FFF0000
    bpf = [
        (0x20, 0, 0, 0),  # ld [nr]
        (0x35, 0, 3, 444),  # jge 444 ? next : allow
        (0x35, 2, 0, 447),  # jge 447 ? allow : next
        (0x06, 0, 0, ret_errno),
        (0x06, 0, 0, allow),
        (0x06, 0, 0, allow),
    ]
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


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    while argv and argv[0] in ("--without", "--seccomp-errno"):
        option, value, argv = argv[0], argv[1], argv[2:]
        if option == "--without":
            leave_out({layer for layer in value.split(",") if layer})
        else:
            refuse_with(int(value))
    if mode == "full":
        pass
    elif mode == "seccomp-refused":

        def refuse(machine: str | None = None, refusal: int = errno.EPERM) -> None:
            raise _seccomp.SeccompError(errno.EACCES, "seccomp(SET_MODE_FILTER): refused")

        _seccomp.install = refuse  # type: ignore[assignment]
    elif mode == "no-barrier":
        original = _engines.Engine.evaluate

        def evaluate_without_barrier(self: _engines.Engine, request: object) -> str:
            evaluate = self._evaluate
            self._evaluate = lambda *a, **kw: evaluate(
                *a, **{k: v for k, v in kw.items() if k != "import_callback"}
            )
            try:
                return original(self, request)  # type: ignore[arg-type]
            finally:
                self._evaluate = evaluate

        _engines.Engine.evaluate = evaluate_without_barrier  # type: ignore[method-assign]
    elif mode == "python":
        # What the probes of tests/test_isolation_matrix.py use: nothing can be imported
        # once the worker is restricted, so load it now.
        import socket  # noqa: F401
        import threading  # noqa: F401

        # Per-thread state of the main thread, read once start-up is over (snippets run on
        # the loop thread): PR_SET_PDEATHSIG is a property of the thread that set it.
        main_thread: dict[str, int] = {}
        start = _worker.start

        def start_and_record(*args: object) -> object:
            started = start(*args)  # type: ignore[arg-type]
            pdeathsig = ctypes.c_int(-1)
            ctypes.CDLL(None).prctl(2, ctypes.byref(pdeathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
            main_thread["pdeathsig"] = pdeathsig.value
            return started

        _worker.start = start_and_record  # type: ignore[assignment]

        def run_python(self: _engines.Engine, request: EvalRequest) -> str:
            scope: dict[str, object] = {"main_thread": main_thread}
            exec(request.snippet, scope)
            return json.dumps(scope.get("result"))

        _engines.Engine.evaluate = run_python  # type: ignore[method-assign]
    elif mode == "broken-engine":
        _engines.EngineKind.module_name = property(  # type: ignore[method-assign,assignment]
            lambda self: "_no_such_jsonnet_engine"
        )
    elif mode == "landlock-enosys":
        install_landlock_filter(errno.ENOSYS)
    elif mode == "landlock-eperm":
        install_landlock_filter(errno.EPERM)
    else:
        raise SystemExit(f"unknown harness mode {mode}")
    code = _worker.main(argv)
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
