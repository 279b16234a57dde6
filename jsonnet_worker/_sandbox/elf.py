"""Just enough ELF reading to know what a shared object or program needs at load time.

Goals: the worker preloads an engine's libraries (``DT_NEEDED``) before its sandbox and
copies into its memfd only the part of the engine the loader maps (``loaded_size``), and the
host sandbox grants read on exactly the libraries a worker loads and execute on the program
interpreter (``PT_INTERP``, the dynamic loader). All read the same few headers here.

Plan: read the ELF header, then either the program headers (``PT_INTERP``, the segments'
extent) or the section headers (``SHT_DYNAMIC`` and its string table) and decode the tags
asked for.

Weak spots: 64-bit little-endian objects only (x86_64, aarch64); anything else raises
ValueError and the callers fall back or skip.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from typing import Any

DT_NEEDED = 1
DT_RPATH = 15
DT_RUNPATH = 29
PT_INTERP = 3
SHT_DYNAMIC = 6


def _header(elf: Any, path: str) -> bytes:
    ident: bytes = elf.read(64)
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    return ident


def _table(elf: Any, ident: bytes, offset_at: int, sizes_at: int) -> tuple[bytes, int, int]:
    """A header table (program or section headers): its bytes, entry size and count."""
    (offset,) = struct.unpack_from("<Q", ident, offset_at)
    entry_size, count = struct.unpack_from("<HH", ident, sizes_at)
    elf.seek(offset)
    return elf.read(entry_size * count), entry_size, count


def dynamic_strings(path: str) -> dict[int, list[str]]:
    """The string-valued dynamic entries (DT_NEEDED, DT_RPATH, DT_RUNPATH), by tag."""
    with open(path, "rb") as elf:
        sections, shentsize, shnum = _table(elf, _header(elf, path), 0x28, 0x3A)
        headers = [
            struct.unpack_from("<IIQQQQIIQQ", sections, index * shentsize) for index in range(shnum)
        ]
        dynamic = [h for h in headers if h[1] == SHT_DYNAMIC]
        if not dynamic:
            return {}
        _, _, _, _, dyn_offset, dyn_size, strtab_index, _, _, _ = dynamic[0]
        strtab = headers[strtab_index]
        elf.seek(strtab[4])
        strings = elf.read(strtab[5])
        elf.seek(dyn_offset)
        entries = elf.read(dyn_size)
    found: dict[int, list[str]] = {}
    for offset in range(0, len(entries) - 15, 16):
        tag, value = struct.unpack_from("<qQ", entries, offset)
        if tag == 0:
            break
        if tag in (DT_NEEDED, DT_RPATH, DT_RUNPATH):
            text = strings[value : strings.index(b"\0", value)].decode()
            found.setdefault(tag, []).append(text)
    return found


def elf_needed(path: str) -> list[str]:
    """The DT_NEEDED sonames of a 64-bit little-endian ELF shared object."""
    return dynamic_strings(path).get(DT_NEEDED, [])


def loaded_size(path: str) -> int:
    """How many leading bytes of an ELF object the dynamic loader reads: its headers and
    every segment's bytes in the file (the program headers). Nothing maps what follows them
    (the section headers, the symbol tables, the debug information)."""
    with open(path, "rb") as elf:
        ident = _header(elf, path)
        table, phentsize, phnum = _table(elf, ident, 0x20, 0x36)
    (table_offset,) = struct.unpack_from("<Q", ident, 0x20)
    end: int = max(len(ident), table_offset + len(table))
    for index in range(phnum):
        _, _, offset, _, _, size, _, _ = struct.unpack_from("<IIQQQQQQ", table, index * phentsize)
        end = max(end, offset + size)
    return end


def interpreter(path: str) -> str | None:
    """The program interpreter (PT_INTERP) of an executable, None for a static one."""
    with open(path, "rb") as elf:
        table, phentsize, phnum = _table(elf, _header(elf, path), 0x20, 0x36)
        for index in range(phnum):
            kind, _, offset, _, _, size, _, _ = struct.unpack_from(
                "<IIQQQQQQ", table, index * phentsize
            )
            if kind == PT_INTERP:
                elf.seek(offset)
                return elf.read(size).rstrip(b"\0").decode()
    return None
