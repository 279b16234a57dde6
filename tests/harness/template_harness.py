"""Test harness: the real fork server start-up (``forkserver.main``), with one thing changed.

Run as ``python -I template_harness.py MODE [template args...]``. Modes:
  full            the product's template unchanged
  python          forked workers run each request's snippet as Python source (after their
                  whole start-up: nested layer, engine loaded, own seccomp filter) and return
                  the JSON of its ``result`` variable: a fully compromised engine
  domain-probe    ``python``, and each forked worker, right after adding its own Landlock
                  layer (before it loads the engine or starts a thread), clones a probe
                  process that is in exactly that domain: a snippet's ``probe(pid, tids)``
                  has it send signal 0 to each thread and returns the errno of each, so a
                  test can tell the worker's own domain from the template's (a process in
                  a domain may signal only that domain and the ones nested in it)
  clone-refused   a seccomp filter, applied first, makes ``clone`` with CLONE_PARENT fail
                  with EPERM, as a container's profile may
  landlock-enosys the Landlock syscalls answer ENOSYS (a kernel without Landlock)
  broken-engine   the engine extension cannot be found
  die-after-clone the template exits right after its clone, before it sends the worker's
                  pidfd (as if killed in mid-fork): the worker lives on, known to no one
  die-before-clone the template exits when a fork is asked, before any clone
This is not a switch in the product: it lives in tests/ and patches the product's modules.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import worker_harness  # tests/harness, put on sys.path above

from jsonnet_worker._sandbox import landlock
from jsonnet_worker._wire import control
from jsonnet_worker._wire.messages import (
    EngineKind,
    EvalRequest,
    Forked,
    ForkRefused,
    ForkServerHello,
)
from jsonnet_worker._worker import engines, forkserver

CLONE_NR = {"x86_64": 56, "aarch64": 220}
TGKILL_NR = {"x86_64": 234, "aarch64": 131}
DIED_IN_FORK = 9  # the exit status of the die-*-clone modes


def refuse_clone_parent() -> None:
    """seccomp: clone with CLONE_PARENT answers EPERM; everything else is allowed."""
    allow, refuse = 0x7FFF0000, 0x00050000 | errno.EPERM
    bpf = [
        (0x20, 0, 0, 0),  # ld [nr]
        (0x15, 0, 3, CLONE_NR[os.uname().machine]),  # jeq clone ? next : allow
        (0x20, 0, 0, 16),  # ld [args[0] low]
        (0x45, 0, 1, control.CLONE_PARENT),  # jset CLONE_PARENT ? refuse : allow
        (0x06, 0, 0, refuse),
        (0x06, 0, 0, allow),
    ]
    worker_harness.install_filter(bpf)


class DomainProbe:
    """A process in exactly the forked worker's domain, driven over two pipes."""

    def __init__(self) -> None:
        self.clone = forkserver.Cloner()  # bound before restriction
        self.layers = 0
        self.requests = self.answers = -1

    def after_layer(self) -> None:
        self.layers += 1
        if self.layers != 2:  # the first layer is the template's, the second the worker's
            return
        requests_read, self.requests = os.pipe()
        self.answers, answers_write = os.pipe()
        pid, pidfd = self.clone()
        if pid == 0:
            os.close(self.requests)
            os.close(self.answers)
            self.serve(requests_read, answers_write)
        os.close(pidfd)  # the probe is the pool's child (CLONE_PARENT): the test reaps it
        os.close(requests_read)
        os.close(answers_write)

    @staticmethod
    def serve(requests: int, answers: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(requests, 65536)
            if not chunk:
                os._exit(0)
            data += chunk
        targets: list[list[int]] = json.loads(data)
        errors = []
        for pid, tid in targets:
            ctypes.set_errno(0)
            failed = libc.syscall(TGKILL_NR[os.uname().machine], pid, tid, 0) != 0
            errors.append(ctypes.get_errno() if failed else 0)
        os.write(answers, json.dumps({"probe": os.getpid(), "errors": errors}).encode())
        os._exit(0)

    def __call__(self, targets: list[list[int]]) -> dict[str, object]:
        os.write(self.requests, json.dumps(targets).encode() + b"\n")
        answer: dict[str, object] = json.loads(os.read(self.answers, 1 << 20))
        return answer


def probe_domains() -> DomainProbe:
    probe = DomainProbe()
    restrict = landlock.restrict_self_empty

    def restrict_then_probe(support: landlock.LandlockSupport | None = None) -> object:
        status = restrict(support)
        probe.after_layer()
        return status

    landlock.restrict_self_empty = restrict_then_probe  # type: ignore[assignment]
    return probe


def run_python_snippets(scope_extra: dict[str, object] | None = None) -> None:
    # What the probes use: nothing can be imported once a worker is restricted.
    import select  # noqa: F401
    import socket  # noqa: F401
    import stat  # noqa: F401
    import threading  # noqa: F401

    def run_python(self: engines.Engine, request: EvalRequest) -> str:
        scope: dict[str, object] = dict(scope_extra or {})
        exec(request.snippet, scope)
        return json.dumps(scope.get("result"))

    engines.Engine.run = run_python  # type: ignore[method-assign]


def die_after_clone() -> None:
    send = forkserver.ForkServer.send

    def send_or_die(
        self: forkserver.ForkServer,
        message: ForkServerHello | Forked | ForkRefused,
        fds: list[int] | None = None,
    ) -> None:
        if isinstance(message, Forked):
            os._exit(DIED_IN_FORK)
        send(self, message, fds)

    forkserver.ForkServer.send = send_or_die  # type: ignore[method-assign]


def die_before_clone() -> None:
    def exit_at_once(self: forkserver.ForkServer, data: bytes, fds: list[int], flags: int) -> None:
        os._exit(DIED_IN_FORK)

    forkserver.ForkServer.answer = exit_at_once  # type: ignore[method-assign]


def main() -> None:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "python":
        run_python_snippets()
    elif mode == "domain-probe":
        run_python_snippets({"probe": probe_domains()})
    elif mode == "clone-refused":
        refuse_clone_parent()
    elif mode == "landlock-enosys":
        worker_harness.install_landlock_filter(errno.ENOSYS)
    elif mode == "broken-engine":
        EngineKind.module_name = property(  # type: ignore[method-assign,assignment]
            lambda self: "_no_such_jsonnet_engine"
        )
    elif mode == "die-after-clone":
        die_after_clone()
    elif mode == "die-before-clone":
        die_before_clone()
    elif mode != "full":
        raise SystemExit(f"unknown harness mode {mode}")
    code = forkserver.main(argv)
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
