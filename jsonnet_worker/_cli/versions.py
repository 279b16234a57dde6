"""``jsonnet-worker --version``: this package's version and each installed engine's.

Goals: say which Jsonnet a worker runs, as ``jsonnet --version`` does: go-jsonnet's version
as the gojsonnet extension carries it, and the C++ jsonnet's when its extension is
installed, without starting a worker.

Plan: both extensions export libjsonnet's C API, whose ``jsonnet_version()`` returns the
engine's version string; the extension is loaded as a shared library (ctypes), only when
``--version`` is asked for (the go one starts the Go runtime in this process). An engine
that is not installed, or whose library will not load, is said so.

Weak spots: the engine a worker runs is the extension found here, in this interpreter's
paths (the workers are started with the same paths).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

# engine name -> (its extension module, what the engine is called)
ENGINE_MODULES = {"go": ("_gojsonnet", "go-jsonnet"), "cpp": ("_jsonnet", "C++ jsonnet")}


def engine_version(module: str) -> str:
    """What the extension ``module``'s ``jsonnet_version()`` returns, or why there is none."""
    import ctypes  # here: only --version needs them
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return "not installed"
    try:
        library = ctypes.CDLL(spec.origin)
        version = library.jsonnet_version
    except (OSError, AttributeError) as exc:
        return f"unknown ({exc})"
    version.restype = ctypes.c_char_p
    version.argtypes = []
    text: bytes = version()
    return text.decode("utf-8", "replace")


def version_text() -> str:
    from .. import __version__

    lines = [f"jsonnet-worker {__version__}"]
    for engine, (module, name) in ENGINE_MODULES.items():
        version = engine_version(module).removesuffix(f" ({name})")  # go-jsonnet names itself
        lines.append(f"engine {engine}: {name} {version} (extension {module})")
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """Prints ``version_text()`` and exits, as argparse's ``version`` action does."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *given: Any) -> None:
        print(version_text())  # to stdout, as argparse's own version action
        parser.exit()
