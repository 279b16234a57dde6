"""``ClosedOnExit``: a context manager whose exit is its ``close()``, for the command's
objects that own a worker (``early.EarlyWorker``, ``oneshot.OneShot``): leaving the block on
any path (an error, Ctrl-C) kills and reaps what they hold. Imports nothing: ``early`` uses
it before the command's imports."""

from __future__ import annotations

from types import TracebackType

TYPE_CHECKING = False  # typing's, without importing typing (before the worker starts)
if TYPE_CHECKING:
    from typing import TypeVar

    _Closing = TypeVar("_Closing", bound="ClosedOnExit")


class ClosedOnExit:
    """``with`` it: ``close()`` when the block ends, however it ends."""

    def __enter__(self: _Closing) -> _Closing:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError
