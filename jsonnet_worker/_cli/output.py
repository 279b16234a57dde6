"""The ``jsonnet`` CLI's output modes (``-S``, ``-m DIR``, ``-y``) and how it writes them.

Goals: what ``jsonnet`` prints and writes, byte for byte as go-jsonnet does.

Plan: the modes themselves are the library's pure functions (``jsonnet_worker._output``:
``string``, ``stream``, and ``multi`` as names); here ``multi`` joins each name to the
``-m`` directory as go-jsonnet does, and ``write_text``/``write_multi`` write.

Weak spots: as go-jsonnet, ``-m`` writes a key such as ``../x`` outside its directory (the
CLI's user chose the snippet); the library refuses such a name.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from .._output import multi_unchecked as _multi_files
from .._output import stream, string

__all__ = ["multi", "stream", "string", "write_multi", "write_text"]


def multi(text: str, directory: str, *, string: bool = False) -> dict[str, str]:
    """``-m DIR``: one file per field of the top-level object, path -> content (each key
    joined to ``directory`` as go-jsonnet joins it: as it is)."""
    prefix = directory if directory.endswith("/") else directory + "/"
    return {prefix + name: content for name, content in _multi_files(text, string=string).items()}


def write_text(text: str, path: str | None, *, create_dirs: bool) -> None:
    """To standard output without ``path``; else into the file (OSError on failure)."""
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if create_dirs and os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_multi(files: dict[str, str], listing: TextIO, *, create_dirs: bool) -> None:
    """As jsonnet does: for each path, sorted, print it to ``listing``, then write the file
    (not when its content is already the same, so that its time stamp stays). OSError on a
    failure, after the paths written so far were listed."""
    for path in sorted(files):
        listing.write(f"{path}\n")
        listing.flush()
        try:
            with open(path, encoding="utf-8", newline="") as existing:
                if existing.read() == files[path]:
                    continue
        except (OSError, UnicodeDecodeError):
            pass
        write_text(files[path], path, create_dirs=create_dirs)
