"""The CLI's printer of ``std.trace`` lines: on stderr, as the ``jsonnet`` command prints them.

Goals: ``jsonnet-worker eval`` shows a snippet's traces exactly where and as go-jsonnet's
``jsonnet`` does (``TRACE: <file>:<line> <message>``, one per line, on stderr, before the
result or the error), so a mapper author's habit carries over.

Plan: ``print_trace`` is the ``on_trace`` receiver the CLI passes to the pool
(``_pool/traces.py`` says where the lines come from and how they are bounded and escaped).
It looks ``sys.stderr`` up at each call, so a redirected stderr gets them.

Weak spots: the pool gives the lines once the worker has answered, not as the engine prints
them: a snippet that runs into its timeout shows the lines read before its deadline, after
the fact.
"""

from __future__ import annotations

import sys


def print_trace(line: str) -> None:
    """One trace line, on stderr, flushed (it precedes the result on stdout)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
