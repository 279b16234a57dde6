"""A worker driven frame by frame, for tests of the worker and its protocol."""

from __future__ import annotations

import os
import select
import time
from typing import Any

from jsonnet_worker._process import WorkerProcess, WorkerSettings
from jsonnet_worker._protocol import DEFAULT_MAX_FRAME, Event, Message, encode


class RawWorker:
    def __init__(
        self,
        engine: str = "go",
        command: list[str] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        cpu_budget: float | None = None,
    ) -> None:
        self.engine = engine
        settings = WorkerSettings(engine, 1 << 30, max_frame, cpu_budget=cpu_budget)
        self.process = WorkerProcess(settings, command)
        self.next_id = 1
        self.hello = self.receive()

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

    def receive(self, timeout: float = 20.0) -> Event | None:
        """The next event, or None at EOF. Drains stderr meanwhile."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.process.stdout, select.POLLIN)
        poller.register(self.process.stderr_fd, select.POLLIN)
        while True:
            event = self.process.reader.next_event()
            if event is not None:
                return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the worker")
            for fd, _ in poller.poll(left * 1000):
                if fd == self.process.stderr_fd:
                    if not self.process.drain_stderr():
                        poller.unregister(fd)
                elif not self.process.read_stdout():
                    return None

    def request(self, snippet: str, **fields: Any) -> dict[str, Any]:
        message = {
            "t": "eval",
            "id": self.next_id,
            "snippet": snippet,
            "filename": "test.jsonnet",
            "ext_vars": {},
            "ext_codes": {},
            "tla_vars": {},
            "tla_codes": {},
            "max_stack": 500,
            "max_output": 1 << 20,
        }
        message.update(fields)
        self.next_id += 1
        self.send_bytes(encode(message))
        event = self.receive()
        assert isinstance(event, Message), event
        return event.payload
