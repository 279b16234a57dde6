"""The service's configuration: a Kratos-style YAML file, its snippets loaded into memory.

Goals: one place that turns a YAML file into typed, validated values (pool settings, limits,
the named mappers and templates with their source already read), so the rest of the service
never touches the filesystem after start-up (the host sandbox may forbid it by then), and a
bad config fails at start with a message naming the key, never on the first request.

Plan: the file is parsed with PyYAML's safe loader into a plain mapping (kept as ``raw`` for
``restrict_host``, with every ``file://`` value we read rewritten to its absolute form), then
three Kratos places are walked for snippets:

- OIDC claim mappers: ``selfservice.methods.oidc.config.providers[].mapper_url``, named by
  the provider's ``id``;
- courier templates: ``courier.channels[].request_config.body``, named by the channel's
  ``id``, and ``courier.http.request_config.body``, named ``http``;
- web-hook body templates: ``selfservice.flows.<flow>.<before|after>[.<method>].hooks[]``
  with ``hook: web_hook`` and ``config.body``, named by the hook's ``name`` (an addition of
  ours) or else ``<flow>-<phase>[-<method>]-<index>``.

URIs are ``file://`` (relative paths are resolved against the config file's directory, so
the embedded default works from any working directory) or ``base64://`` as in Kratos.

Weak spots: only the keys above are walked (a Kratos key added later needs a line here), and
http(s) URIs are refused: fetching code over the network at start is out of scope.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .._pool import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_STACK,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_QUEUE_LIMIT,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_TIMEOUT,
)

DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_REQUEST_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
EMBEDDED_CONFIG = "default.yaml"


class ConfigError(ValueError):
    """The configuration file is missing, not YAML, or has a bad value (the message names
    the key)."""


class SnippetKind(Enum):
    MAPPER = "mapper"
    TEMPLATE = "template"


@dataclass(frozen=True)
class Snippet:
    """A named mapper or template, its source read at start."""

    name: str
    kind: SnippetKind
    uri: str
    source: str
    key: str  # where in the config it was found, for messages

    @property
    def filename(self) -> str:
        """The name the engine shows in error messages: the file's base name."""
        return (
            self.uri.rstrip("/").rsplit("/", 1)[-1]
            if self.uri.startswith("file://")
            else (f"{self.name}.jsonnet")
        )


@dataclass(frozen=True)
class PoolSettings:
    """The ``pool`` section: keyword arguments of ``WorkerPool``."""

    size: int | None = None
    engine: str = "go"
    timeout: float = DEFAULT_TIMEOUT
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    max_output: int = DEFAULT_MAX_OUTPUT
    max_stack: int = DEFAULT_MAX_STACK
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    require_sandbox: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "timeout": self.timeout,
            "memory_limit": self.memory_limit,
            "max_output": self.max_output,
            "max_stack": self.max_stack,
            "queue_limit": self.queue_limit,
            "queue_timeout": self.queue_timeout,
            "require_sandbox": self.require_sandbox,
        }


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs, validated; ``raw`` is the mapping for ``restrict_host``."""

    pool: PoolSettings = field(default_factory=PoolSettings)
    mappers: Mapping[str, Snippet] = field(default_factory=dict)
    templates: Mapping[str, Snippet] = field(default_factory=dict)
    evaluate_enabled: bool = True
    max_body: int = DEFAULT_MAX_BODY
    max_request_timeout: float = DEFAULT_MAX_REQUEST_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    raw: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file read (the packaged default.yaml without --config)

    @property
    def sandbox_disabled(self) -> bool:
        landlock = _section(self.raw, "security", "landlock")
        return landlock.get("disabled") is True


def load_config(path: str | Path | None = None) -> ServiceConfig:
    """Read and validate a config file (None: the embedded default) and every snippet it
    names. Raises ConfigError."""
    if path is None:
        embedded = resources.files(__package__).joinpath(EMBEDDED_CONFIG)
        with resources.as_file(embedded) as embedded_path:
            return parse_config(embedded_path.read_text(encoding="utf-8"), embedded_path)
    config_path = Path(path)
    return parse_config(_read_text(config_path, "the config"), config_path)


def _read_text(path: Path, what: str) -> str:
    """The file's text; ConfigError naming ``what`` when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8") from None


def parse_config(text: str, path: Path | None = None) -> ServiceConfig:
    """Validate YAML ``text``; relative ``file://`` URIs are resolved against ``path``'s
    directory (the working directory when ``path`` is None)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config is not valid YAML: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError("the config must be a mapping at the top level")
    raw: dict[str, Any] = copy.deepcopy(document)
    base = path.parent.resolve() if path is not None else Path.cwd()
    serve = _section(raw, "serve")
    evaluate = _section(serve, "evaluate", where="serve")
    mappers: dict[str, Snippet] = {}
    templates: dict[str, Snippet] = {}
    for name, key, holder, field_name in _mapper_places(raw):
        _add(mappers, _load_snippet(name, SnippetKind.MAPPER, key, holder, field_name, base))
    for name, key, holder, field_name in _template_places(raw):
        _add(templates, _load_snippet(name, SnippetKind.TEMPLATE, key, holder, field_name, base))
    return ServiceConfig(
        pool=_pool_settings(_section(raw, "pool")),
        mappers=mappers,
        templates=templates,
        evaluate_enabled=_typed(evaluate, "enabled", bool, True, "serve.evaluate"),
        max_body=_positive(serve, "max_body_bytes", int, DEFAULT_MAX_BODY, "serve"),
        max_request_timeout=_positive(
            serve, "max_request_timeout", float, DEFAULT_MAX_REQUEST_TIMEOUT, "serve"
        ),
        shutdown_timeout=_positive(
            serve, "shutdown_timeout", float, DEFAULT_SHUTDOWN_TIMEOUT, "serve"
        ),
        raw=raw,
        path=path,
    )


# -- where Kratos keeps its snippets ------------------------------------------------------

_Place = tuple[str, str, dict[str, Any], str]  # name, key for messages, holder, field


def _mapper_places(raw: Mapping[str, Any]) -> Iterator[_Place]:
    oidc = _section(raw, "selfservice", "methods", "oidc", "config")
    for index, provider in enumerate(_list(oidc, "providers", "selfservice.methods.oidc.config")):
        key = f"selfservice.methods.oidc.config.providers[{index}]"
        if not isinstance(provider, dict):
            raise ConfigError(f"{key} must be a mapping")
        if "mapper_url" not in provider:
            continue
        yield _name(provider, "id", key), f"{key}.mapper_url", provider, "mapper_url"


def _template_places(raw: Mapping[str, Any]) -> Iterator[_Place]:
    courier = _section(raw, "courier")
    for index, channel in enumerate(_list(courier, "channels", "courier")):
        key = f"courier.channels[{index}]"
        if not isinstance(channel, dict):
            raise ConfigError(f"{key} must be a mapping")
        request = _section(channel, "request_config", where=key)
        if "body" in request:
            yield _name(channel, "id", key), f"{key}.request_config.body", request, "body"
    http = _section(courier, "http", "request_config", where="courier")
    if "body" in http:
        yield "http", "courier.http.request_config.body", http, "body"
    flows = _section(raw, "selfservice", "flows")
    for flow, phases in flows.items():
        if not isinstance(phases, dict):
            continue
        for phase in ("before", "after"):
            section = phases.get(phase)
            if not isinstance(section, dict):
                continue
            yield from _hooks(section, f"selfservice.flows.{flow}.{phase}", [str(flow), phase])
            for method, nested in section.items():
                if method != "hooks" and isinstance(nested, dict):
                    yield from _hooks(
                        nested,
                        f"selfservice.flows.{flow}.{phase}.{method}",
                        [str(flow), phase, str(method)],
                    )


def _hooks(section: Mapping[str, Any], where: str, parts: list[str]) -> Iterator[_Place]:
    for index, hook in enumerate(_list(section, "hooks", where)):
        key = f"{where}.hooks[{index}]"
        if not isinstance(hook, dict) or hook.get("hook") != "web_hook":
            continue
        config = _section(hook, "config", where=key)
        if "body" not in config:
            continue
        name = hook.get("name", "-".join([*parts, str(index)]))
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}.name must be a non-empty string")
        yield name, f"{key}.config.body", config, "body"


def _load_snippet(
    name: str, kind: SnippetKind, key: str, holder: dict[str, Any], field_name: str, base: Path
) -> Snippet:
    uri = holder[field_name]
    if not isinstance(uri, str):
        raise ConfigError(f"{key} must be a file:// or base64:// URI")
    if uri.startswith("base64://"):
        try:
            source = base64.b64decode(uri[len("base64://") :], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{key}: bad base64:// value ({exc})") from None
        return Snippet(name, kind, uri, source, key)
    if not uri.startswith("file://"):
        raise ConfigError(f"{key} must be a file:// or base64:// URI, not {uri!r}")
    file_path = base / uri[len("file://") :]
    source = _read_text(file_path, key)
    absolute = "file://" + str(file_path.resolve())
    holder[field_name] = absolute  # restrict_host then sees the file we really read
    return Snippet(name, kind, absolute, source, key)


def _add(snippets: dict[str, Snippet], snippet: Snippet) -> None:
    if snippet.name in snippets:
        first = snippets[snippet.name]
        raise ConfigError(
            f"{snippet.kind.value} name {snippet.name!r} is used twice: {first.key} and "
            f"{snippet.key}"
        )
    snippets[snippet.name] = snippet


# -- typed access -------------------------------------------------------------------------


def _pool_settings(pool: Mapping[str, Any]) -> PoolSettings:
    known = set(PoolSettings.__dataclass_fields__)
    unknown = sorted(set(pool) - known)
    if unknown:
        raise ConfigError(f"pool: unknown keys {unknown}; known: {sorted(known)}")
    size = pool.get("size")
    if size is not None and (not _is_int(size) or size < 1):
        raise ConfigError("pool.size must be a positive integer or null")
    engine = _typed(pool, "engine", str, "go", "pool")
    if engine not in ("go", "cpp"):
        raise ConfigError("pool.engine must be 'go' or 'cpp'")
    return PoolSettings(
        size=size,
        engine=engine,
        timeout=_positive(pool, "timeout", float, DEFAULT_TIMEOUT, "pool"),
        memory_limit=_positive(pool, "memory_limit", int, DEFAULT_MEMORY_LIMIT, "pool"),
        max_output=_positive(pool, "max_output", int, DEFAULT_MAX_OUTPUT, "pool"),
        max_stack=_positive(pool, "max_stack", int, DEFAULT_MAX_STACK, "pool"),
        queue_limit=_positive(pool, "queue_limit", int, DEFAULT_QUEUE_LIMIT, "pool"),
        queue_timeout=_positive(pool, "queue_timeout", float, DEFAULT_QUEUE_TIMEOUT, "pool"),
        require_sandbox=_typed(pool, "require_sandbox", bool, False, "pool"),
    )


def _section(mapping: Mapping[str, Any], *keys: str, where: str = "") -> dict[str, Any]:
    """The nested mapping at ``keys`` ({} when absent); ConfigError when not a mapping."""
    current: Any = mapping
    path = where
    for key in keys:
        path = f"{path}.{key}" if path else key
        current = current.get(key) if isinstance(current, dict) else None
        if current is None:
            return {}
        if not isinstance(current, dict):
            raise ConfigError(f"{path} must be a mapping")
    return current if isinstance(current, dict) else {}


def _list(mapping: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = mapping.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key} must be a list")
    return value


def _name(mapping: Mapping[str, Any], key: str, where: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key} must be a non-empty string")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(mapping: Mapping[str, Any], key: str, kind: type[Any], default: Any, where: str) -> Any:
    value = mapping.get(key, default)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}.{key} must be a {kind.__name__}")


def _positive(
    mapping: Mapping[str, Any], key: str, kind: type[int] | type[float], default: Any, where: str
) -> Any:
    value = mapping.get(key, default)
    number_ok = (
        _is_int(value)
        if kind is int
        else ((_is_int(value) or isinstance(value, float)) and math.isfinite(value))
    )
    if not number_ok or value <= 0:
        raise ConfigError(f"{where}.{key} must be a positive {kind.__name__}")
    return kind(value)
