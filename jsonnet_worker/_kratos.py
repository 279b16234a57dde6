"""The files an Ory Kratos-style configuration names, as a ``HostAllowList``.

Goals: the service (and any application configured the Kratos way) gets the host sandbox
Kratos gives ``kratos serve``: after start-up it may open what its configuration names, and
nothing else. All knowledge of that configuration's schema is here; ``restrict_host`` takes
the generic list this module makes.

Plan: ``kratos_allow_list`` reads the mapping (no file it names is opened): the
``security.landlock`` section (``allowed_paths``, ``disabled``), the config files themselves,
the listeners' TLS files, the courier's SMTP client certificates and template directory,
every ``file://`` value anywhere (one walk, so a field added later is covered), and, for a
SQLite DSN, the database's directory and SQLite's temp directory read-write. A path that
does not exist is left out and reported in ``skipped`` with the field that named it
(Landlock rules bind inodes: it could not be granted).

Weak spots: legacy fields that hold a bare path (no ``file://``) are found only where they
are read by name (TLS, SMTP, templates); anything a named file pulls in (a schema's local
``$ref``, a mapper's import) is not found. Both belong in ``allowed_paths`` (docs/SANDBOX.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._allowlist import HostAllowList
from ._errors import SandboxConfigError

FILE_URL = "file://"
DISABLED_SETTING = "security.landlock.disabled"
# SQLite's unix VFS takes the first of these that is a writable directory.
SQLITE_TEMP_CANDIDATES = ("/var/tmp", "/usr/tmp", "/tmp", ".")


@dataclass
class _Collected:
    """Paths found so far, in order, each once; missing ones noted with the field."""

    read: dict[str, None] = field(default_factory=dict)
    read_write: dict[str, None] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, path: str, why: str, *, writable: bool = False) -> None:
        path = os.path.abspath(path)
        if not os.path.exists(path):
            self.skipped.append(f"{path}: does not exist ({why})")
            return
        (self.read_write if writable else self.read)[path] = None


def kratos_allow_list(
    config: Mapping[str, Any], config_files: Iterable[str | os.PathLike[str]] = ()
) -> HostAllowList:
    """What a Kratos-style ``config`` (the parsed YAML, a mapping) lets its host open:
    ``config_files`` (the files it was read from, re-read on reload) and every file it names
    (docs/SANDBOX.md, "Allowed automatically"). ``SandboxConfigError`` for a bad
    ``security.landlock`` section."""
    disabled, allowed_paths = _landlock_settings(config)
    found = _Collected()
    for path in allowed_paths:
        found.add(path, "security.landlock.allowed_paths")
    for config_file in config_files:
        found.add(os.fspath(config_file), "config file")
    _add_tls_files(found, config)
    _add_courier_files(found, config)
    for path in file_urls(config):
        found.add(path, "file:// value")
    _add_sqlite_dirs(found, config)
    return HostAllowList(
        ro_paths=tuple(found.read),
        rw_dirs=tuple(found.read_write),
        skipped=tuple(found.skipped),
        disabled_by=DISABLED_SETTING if disabled else "",
    )


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _landlock_settings(config: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """(``security.landlock.disabled``, ``security.landlock.allowed_paths``), checked."""
    if not isinstance(config, Mapping):
        raise SandboxConfigError(f"the config must be a mapping, not {type(config).__name__}")
    disabled = _lookup(config, DISABLED_SETTING)
    if disabled is not None and not isinstance(disabled, bool):
        raise SandboxConfigError(f"{DISABLED_SETTING} must be true or false")
    allowed = _lookup(config, "security.landlock.allowed_paths")
    if allowed is None:
        allowed = []
    if not isinstance(allowed, list) or not all(isinstance(p, str) and p for p in allowed):
        raise SandboxConfigError("security.landlock.allowed_paths must be a list of paths")
    return bool(disabled), list(allowed)


def _walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _walk_strings(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _walk_strings(value)


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` value, as Kratos reads it: the text after the
    scheme, without query or fragment, relative paths against the working directory."""
    path = url[len(FILE_URL) :].split("#", 1)[0].split("?", 1)[0]
    return os.path.abspath(path)


def file_urls(config: Mapping[str, Any]) -> list[str]:
    """Every ``file://`` value anywhere in the config (one walk; file bodies are not read)."""
    return [
        file_url_path(text)
        for text in _walk_strings(config)
        if text.startswith(FILE_URL) and len(text) > len(FILE_URL)
    ]


def sqlite_database(dsn: object) -> tuple[bool, str | None]:
    """(is SQLite, the database file or None when in memory) for a Kratos DSN."""
    if not isinstance(dsn, str):
        return False, None
    if dsn == "memory":
        return True, None
    scheme, separator, rest = dsn.partition("://")
    if not separator or scheme not in ("sqlite", "sqlite3"):
        return False, None
    path, _, query = rest.partition("?")
    path = path.removeprefix("file:")
    if path in ("", ":memory:") or "mode=memory" in query:
        return True, None
    return True, os.path.abspath(path)


def sqlite_temp_dir() -> str | None:
    """The directory SQLite's unix VFS uses for temporary files."""
    candidates = [os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR")]
    for candidate in [*candidates, *SQLITE_TEMP_CANDIDATES]:
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return os.path.abspath(candidate)
    return None


def _add_tls_files(found: _Collected, config: Mapping[str, Any]) -> None:
    """The listeners' certificate and key files."""
    for listener in ("public", "admin"):
        for part in ("cert", "key"):
            key = f"serve.{listener}.tls.{part}.path"
            value = _lookup(config, key)
            if isinstance(value, str) and value:
                found.add(value, key)


def _add_courier_files(found: _Collected, config: Mapping[str, Any]) -> None:
    """The courier's SMTP client certificates (its own and each channel's) and templates."""
    smtp_blocks = [("courier.smtp", _lookup(config, "courier.smtp"))]
    channels = _lookup(config, "courier.channels")
    for index, channel in enumerate(channels if isinstance(channels, list) else []):
        if isinstance(channel, Mapping):
            smtp_blocks.append(
                (f"courier.channels[{index}].smtp_config", channel.get("smtp_config"))
            )
    for where, block in smtp_blocks:
        for key in ("client_cert_path", "client_key_path"):
            value = block.get(key) if isinstance(block, Mapping) else None
            if isinstance(value, str) and value:
                found.add(value, f"{where}.{key}")
    templates = _lookup(config, "courier.template_override_path")
    if isinstance(templates, str) and templates:
        found.add(templates.removeprefix(FILE_URL), "courier.template_override_path")


def _add_sqlite_dirs(found: _Collected, config: Mapping[str, Any]) -> None:
    """A SQLite DSN's database directory and SQLite's temp directory, read-write."""
    is_sqlite, database = sqlite_database(config.get("dsn"))
    if database is not None:
        found.add(os.path.dirname(database), "SQLite database directory", writable=True)
    if is_sqlite:
        temp = sqlite_temp_dir()
        if temp is not None:
            found.add(temp, "SQLite temp directory", writable=True)
