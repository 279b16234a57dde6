"""The ``jsonnet-worker`` console script: ``eval``'s worker starts on its first line, then the
command runs (``commands``: the parser, every command).

Goals: nothing stands between the command's start and its worker's but the interpreter and
what it needs to write the worker's command line: this module imports ``early`` alone, and
``commands`` (argparse, the config, the wire format) only once the worker is running.

Plan: ``main_entry`` starts ``eval``'s worker (``early.start``), runs ``commands.main`` with
it, and closes it on every path (a worker handed to the call is closed by the call; one
never used is killed and reaped here), then exits without the interpreter's finalization.
``main(argv)`` runs a command in this process (tests, ``python -m jsonnet_worker``); every
other name of ``commands`` is read through this module too (``main.build_parser``), as
before the two were split.

Weak spots: a name read through this module's ``__getattr__`` is typed ``Any`` here; code
in the package imports it from ``commands``.
"""

from __future__ import annotations

import os
import sys

from . import early

TYPE_CHECKING = False  # typing's, without importing typing (9 ms before the worker starts)
if TYPE_CHECKING:
    from typing import Any

EXIT_INTERRUPTED = 130  # as commands.EXIT_INTERRUPTED: 128 + SIGINT


def main(argv: list[str] | None = None, worker: early.EarlyWorker | None = None) -> int:
    """The command's exit status (``commands.main``)."""
    from . import commands

    return commands.main(argv, worker)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system's questions (``__path__``): not a command's
        raise AttributeError(name)
    from . import commands

    return getattr(commands, name)


def main_entry() -> None:
    """The ``jsonnet-worker`` console script."""
    worker = None
    try:
        worker = early.start(sys.argv[1:])
        code = main(None, worker)
    except KeyboardInterrupt:  # before the command could catch it
        code = EXIT_INTERRUPTED
    finally:
        if worker is not None:
            worker.close()
    if sys.argv[1:2] == ["serve"]:  # its libraries may have exit handlers to run
        sys.exit(code)
    # Every file is closed and every worker reaped by now: the interpreter's finalization
    # (unloading every module) would cost more CPU than an eval's call.
    from .terminal import die_of_sigpipe

    try:
        sys.stdout.flush()
    except BrokenPipeError:
        die_of_sigpipe()
    sys.stderr.flush()
    os._exit(code)
