"""Sizes on the command line: ``--memory-limit 512M``, ``--max-output 64MiB``, ``1048576``.

Goals: every option counted in bytes takes a plain number of bytes or a number with a unit,
as container tools and ``ulimit`` users write them; the help text shows sizes the same way.

Plan: ``K``, ``M``, ``G`` and ``KiB``, ``MiB``, ``GiB`` (either case) are powers of 1024 (so
``512M`` is 512 MiB, as in Docker's ``--memory``); a number of bytes may end in ``B``. A bad
size is argparse's usage error (exit 2), as for every typed flag. Read by hand, without
``re`` or ``argparse`` (imported for the error only): ``eval``'s early start (``early``)
reads its sizes before it imports anything heavy.

Weak spots: no decimal units (``KB``, ``MB``: 1000 or 1024? refused rather than guessed), no
fractions (``1.5G``: write ``1536M``).
"""

from __future__ import annotations

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
UNITS |= {"g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``text``: a number of bytes, or a number with K/M/G or KiB/MiB/GiB
    (spaces around either allowed)."""
    stripped = text.strip()
    digits = 0
    while digits < len(stripped) and stripped[digits].isdecimal():
        digits += 1
    unit = UNITS.get(stripped[digits:].lstrip().lower()) if digits else None
    if unit is None:
        import argparse

        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: bytes, or a number with K, M, G (or KiB, MiB, GiB)"
        )
    return int(stripped[:digits]) * unit


parse_size.__name__ = "size"  # argparse names the type in its message


def format_size(size: int) -> str:
    """``size`` as the largest unit that divides it: ``256M``, ``1G``, ``1000``."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
