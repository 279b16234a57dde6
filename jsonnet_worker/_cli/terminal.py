"""How the command meets its terminal and pipes: its log lines, a closed standard output,
input that is not UTF-8.

Goals: a command prints messages, never a traceback or a log record that repeats its own
error line; it ends as jsonnet ends when the reader of its output goes away
(``jsonnet ... | head`` kills jsonnet with SIGPIPE, quietly).

Plan: while a command runs, ``command_logging`` gives the package's logger one handler of
its own, WARNING and above, as ``jsonnet-worker: WARNING: ...``: a degraded sandbox is said;
what a pool logs about one worker of one call (killed at its deadline, crashed) is not, since
the call's error line already says it. The logger is given back as it was (a caller of
``main()`` in its own process keeps its logging). ``eval`` enters it only to write its one
line, a degraded sandbox's (``oneshot``): an ``eval`` loads no ``logging`` otherwise.
``die_of_sigpipe`` restores SIGPIPE's default disposition (Python ignores it) and raises it:
the exit status is a death by SIGPIPE (141 in a shell), as for go-jsonnet and C++ jsonnet.
``utf8_text`` decodes, naming the first bad byte's offset.

Weak spots: only a write to standard output ends the command by SIGPIPE; Python ignores the
signal everywhere else (the workers' channels are sockets whose peer may die: that must stay
an error, not a death).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import logging

PROGRAM = "jsonnet-worker"


def _not_about_one_worker(record: logging.LogRecord) -> bool:
    """Drops the pool's records about one worker (they carry ``worker_pid``)."""
    return getattr(record, "worker_pid", None) is None


@contextlib.contextmanager
def command_logging() -> Iterator[None]:
    """Within: the package's WARNING records on stderr, one line each, none about one
    worker. Then the logger as it was."""
    import logging  # here: eval imports it once its worker is started

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROGRAM}: %(levelname)s: %(message)s"))
    handler.addFilter(_not_about_one_worker)
    logger = logging.getLogger("jsonnet_worker")
    saved = (logger.handlers, logger.level, logger.propagate)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.handlers, _, logger.propagate = saved
        logger.setLevel(saved[1])


def die_of_sigpipe() -> NoReturn:
    """End this process as a write to a closed pipe ends jsonnet: killed by SIGPIPE."""
    try:  # what is still buffered for the closed pipe must not fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: the signal ends the process first


def utf8_text(data: bytes) -> str:
    """``data`` decoded as UTF-8; ValueError "not valid UTF-8 (byte 0xff at offset 3)"."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
