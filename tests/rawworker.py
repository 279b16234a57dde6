"""A worker driven frame by frame, for tests of the worker and its protocol.

``RawWorker`` starts a worker through ``_pool.launch.await_hello`` (so ``hello`` is the validated,
typed ``WorkerHello`` the pool sees) and then offers two views of the same response channel:
``request()`` talks through the pool's own ``WorkerConnection`` (a real worker's answers
must pass the pool's validation), while ``send_bytes()``/``receive()`` are raw, for tests
that send the worker garbage and read its answers back frame by frame (errors with no id,
several frames, the end of the stream), which the pool's conversation would rightly refuse;
each answer is still parsed by ``messages.read_answer``.
Use one view at a time: each request's answer must be read before the next request.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from typing import Any

from jsonnet_worker._library import Library
from jsonnet_worker._pool.connection import NEED_DATA, Answer, Failure, WorkerConnection
from jsonnet_worker._pool.launch import await_hello
from jsonnet_worker._pool.processes import WorkerProcess, WorkerSettings, worker_command
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME, FrameReader, Message
from jsonnet_worker._wire.messages import EvalRequest, Result, WorkerHello, read_answer

MAX_OUTPUT = 1 << 20
# Each way a worker can run an engine: name -> (engine, extra worker arguments).
ENGINE_APIS = {
    "go-capi": ("go", []),
    "go-binding": ("go", ["--engine-api", "binding"]),
    "cpp": ("cpp", []),
}


def api_worker(api: str) -> RawWorker:
    """A RawWorker running one of ``ENGINE_APIS`` (use it as a context manager)."""
    engine, extra = ENGINE_APIS[api]
    command = [*worker_command(WorkerSettings(engine, 1 << 30, 64 << 20)), *extra]
    return RawWorker(engine, command=command)


class RawWorker:
    def __init__(
        self,
        engine: str = "go",
        command: list[str] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        cpu_budget: float | None = None,
        process: WorkerProcess | None = None,
    ) -> None:
        """Start a worker (``command``: the pool's unless given), or drive ``process``, one
        started elsewhere (a fork) whose hello is still to be read."""
        self.engine = engine
        settings = WorkerSettings(engine, 1 << 30, max_frame, cpu_budget=cpu_budget)
        self.process = process or WorkerProcess(settings, command)
        self.connection = WorkerConnection(MAX_OUTPUT)
        self.frames = FrameReader(DEFAULT_MAX_FRAME)
        self.next_id = 1
        try:
            self.hello: WorkerHello = await_hello(self.process, self.connection, timeout=20.0)
        except BaseException:
            self.process.close()
            raise

    def __enter__(self) -> RawWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.close()

    def send_bytes(self, data: bytes) -> None:
        os.set_blocking(self.process.stdin, True)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.process.stdin, view) :]
        finally:
            os.set_blocking(self.process.stdin, False)

    def _read(self, timeout: float) -> bytes:
        """The next bytes of the response channel (b"" at EOF). Drains stderr meanwhile."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.process.stdout, select.POLLIN)
        if self.process.stderr_open:
            poller.register(self.process.stderr_fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the worker")
            for fd, _ in poller.poll(left * 1000):
                if fd == self.process.stderr_fd:
                    if not self.process.drain_stderr():
                        poller.unregister(fd)
                    continue
                data = self.process.read_stdout()
                if data is not None:
                    return data

    def _last_words(self) -> str:
        """What the worker printed and how it ended (None: not yet), for a failure's message:
        its stderr read as far as it holds now (``drain_stderr`` reads to EAGAIN or EOF)."""
        if self.process.stderr_open:
            with contextlib.suppress(OSError):
                self.process.drain_stderr()
        ended = self.process.returncode
        return f"; the worker's exit status: {ended}; its stderr: {self.process.stderr.text()!r}"

    def receive(self, timeout: float = 20.0) -> Result | Failure | None:
        """The worker's next answer frame, whatever came before it (any id, several in a row,
        an error with no id), parsed by the one parser of answers; None at EOF."""
        deadline = time.monotonic() + timeout
        while (event := self.frames.next_event()) is None:
            data = self._read(deadline - time.monotonic())
            if not data:
                return None
            self.frames.feed(data)
        assert isinstance(event, Message), event
        return read_answer(event.payload)

    def request(self, snippet: str, **fields: Any) -> dict[str, Any]:
        """Evaluate through the pool's conversation; the answer, once the pool has validated
        it, as the worker's message (``t`` result with ``json``, or ``t`` error with ``kind``
        and ``message``), for tests that compare answers whole. ``library``: a ``Library``
        whose set is sent first unless this worker holds it (as the pool sends it)."""
        fields.setdefault("filename", "test.jsonnet")
        fields.setdefault("max_output", MAX_OUTPUT)
        library: Library | None = fields.pop("library", None)
        if library is not None:
            fields["library"] = library.digest
        request = EvalRequest(self.next_id, snippet, **fields)
        self.next_id += 1
        self.send_bytes(self.connection.send_request(request, library=library))
        deadline = time.monotonic() + 20.0
        while (event := self.connection.next_event()) is NEED_DATA:
            self.connection.receive_data(self._read(deadline - time.monotonic()))
        if isinstance(event, Answer):
            return Result(event.request_id, event.json_text, event.retire).to_message()
        if isinstance(event, Failure):
            return event.to_message()
        raise AssertionError(f"the worker's answer was refused: {event}{self._last_words()}")
