"""The service's configuration: a Kratos-style YAML file, its snippets loaded into memory.

Goals: one place that turns a YAML file into typed, validated values (pool settings, limits,
the named mappers and templates with their source already read), so the rest of the service
never touches the filesystem after start-up (the host sandbox may forbid it by then), and a
bad config fails at start with a message naming the file, the line and the key, never on the
first request. Strict: an unknown key, a key written twice in one mapping (at any depth:
YAML would keep the last silently) or a wrong type is a ConfigError, so that a misspelt
security key (``bearer_token_fil``, ``require_sandbx``) is never ignored. What is known is
the key table of ``_schema.py`` (which also generates the published ``config.schema.json``);
it says how strictness applies to Kratos' own keys.

Plan: the file is composed with PyYAML's safe loader (``Source``: each key's line, and a
duplicate key refused), constructed into a plain mapping (kept as ``raw`` for
``kratos_allow_list``, the host sandbox's allow-list, with every ``file://`` value we read
rewritten to its absolute form), the environment's overrides applied, the result checked
against the key table, then three Kratos places are walked for snippets:

- OIDC claim mappers: ``selfservice.methods.oidc.config.providers[].mapper_url``, named by
  the provider's ``id``;
- courier templates: ``courier.channels[].request_config.body``, named by the channel's
  ``id``, and ``courier.http.request_config.body``, named ``http``;
- web-hook body templates: ``selfservice.flows.<flow>.<before|after>[.<method>].hooks[]``
  with ``hook: web_hook`` and ``config.body``, named by the hook's ``name`` (an addition of
  ours) or else ``<flow>-<phase>[-<method>]-<index>``.

URIs are ``file://`` (relative paths are resolved against the config file's directory, so
the embedded default works from any working directory) or ``base64://`` as in Kratos.

Library sets (ours): ``libraries.<name>.sources`` lists ``file://`` directories and files
and ``base64://`` contents (``{path, source}`` names where a source is served), merged into
one ``Library`` per set (``NamedLibrary``); a snippet names its set with ``library:``
beside its URI (``_snippet_library``). Everything is read here, at start, before the host
sandbox exists: the service never opens a library file again. Each ``file://`` value read
(a snippet's or a source's) is written back into ``raw`` as an absolute path, so the host
sandbox's allow-list grants what was read. Every error names the file, the line and the
key (``Source.where``).

Environment variables override keys of the file: ``JSONNET_WORKER_`` and the key's path
in upper case, ``_`` between its parts (``JSONNET_WORKER_POOL_SIZE=4``,
``JSONNET_WORKER_SECURITY_REQUIRE_SANDBOX=false``, ``JSONNET_WORKER_SERVE_MAX_BODY_BYTES``);
the value is read as a YAML scalar (``4``, ``true``, ``null``). Only the keys in
``ENV_KEYS`` can be set this way (every ``pool`` key among them), and an unknown
``JSONNET_WORKER_*`` variable is a ConfigError, so a typo is never ignored.

Weak spots: only the keys above are walked (a Kratos key added later needs a line here), and
http(s) URIs are refused: fetching code over the network at start is out of scope. A
library set's files are not parsed at start (a library may hold data files for
``importstr``); a snippet's import of a name the set lacks fails at its first call, with
go-jsonnet's message.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import inspect
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .. import InputTooLarge, InvalidArgument, InvalidType, Library, PoolConfig
from ._schema import KeyPath, dotted, problems

DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_REQUEST_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# An idle connection is kept longer than the clients that reuse connections keep theirs
# (httpx 5 s, Go's net/http 90 s: Kratos is a Go client). With uvicorn's 5 s, a client that
# reused a connection just as the server closed it got a ReadError (the load test, 1 run in 3).
DEFAULT_KEEP_ALIVE_TIMEOUT = 100.0
EMBEDDED_CONFIG = "default.yaml"


ENV_PREFIX = "JSONNET_WORKER_"
# The keys environment variables may set, as paths into the document.
ENV_KEYS: tuple[tuple[str, ...], ...] = (
    *(("pool", option.name) for option in dataclasses.fields(PoolConfig)),
    ("serve", "max_body_bytes"),
    ("serve", "max_request_timeout"),
    ("serve", "shutdown_timeout"),
    ("serve", "keep_alive_timeout"),
    ("serve", "workers"),
    ("serve", "evaluate", "enabled"),
    ("serve", "evaluate", "traces"),
    ("serve", "auth", "bearer_token_file"),
    ("serve", "auth", "metrics_token_file"),
    ("security", "require_sandbox"),
    ("security", "landlock", "disabled"),
)


class ConfigError(InvalidArgument):
    """The configuration file is missing, not YAML, or has a bad value (the message names
    the key)."""

    kind = "service_config"


class SnippetKind(Enum):
    MAPPER = "mapper"
    TEMPLATE = "template"


@dataclass(frozen=True)
class NamedLibrary:
    """A library set of ``libraries``, its files read and bounded at start."""

    name: str
    library: Library
    adhoc: bool  # /v1/evaluate may name it
    where: str  # FILE:LINE: libraries.NAME, for messages


@dataclass(frozen=True)
class Snippet:
    """A named mapper or template, its source read at start."""

    name: str
    kind: SnippetKind
    uri: str
    source: str
    key: str  # where in the config it was found, for messages
    library: NamedLibrary | None = None  # the set its imports are served from (``library:``)

    @property
    def filename(self) -> str:
        """The name the engine shows in error messages: the file's base name."""
        return (
            self.uri.rstrip("/").rsplit("/", 1)[-1]
            if self.uri.startswith("file://")
            else (f"{self.name}.jsonnet")
        )


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service needs, validated; ``raw`` is the mapping for
    ``kratos_allow_list`` (the host sandbox's allow-list)."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    mappers: Mapping[str, Snippet] = field(default_factory=dict)
    templates: Mapping[str, Snippet] = field(default_factory=dict)
    libraries: Mapping[str, NamedLibrary] = field(default_factory=dict)
    evaluate_enabled: bool = True
    evaluate_traces: bool = False  # /v1/evaluate may return std.trace lines to who asks
    max_body: int = DEFAULT_MAX_BODY
    max_request_timeout: float = DEFAULT_MAX_REQUEST_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    workers: int = 1  # server processes on one socket, each with its own pool
    bearer_token: str | None = None  # serve.auth.bearer_token_file's content, read at start
    metrics_token: str | None = None  # serve.auth.metrics_token_file's, for /metrics only
    raw: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file read (the packaged default.yaml without --config)


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> ServiceConfig:
    """Read and validate a config file (None: the embedded default) and every snippet it
    names, with ``JSONNET_WORKER_*`` variables of ``environ`` (default: ``os.environ``)
    overriding its keys. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    if path is None:
        embedded = resources.files(__package__).joinpath(EMBEDDED_CONFIG)
        with resources.as_file(embedded) as embedded_path:
            text = embedded_path.read_text(encoding="utf-8")
            return parse_config(text, embedded_path, environ)
    config_path = Path(path)
    return parse_config(_read_text(config_path, "the config"), config_path, environ)


def _env_name(key: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(key).upper()


def apply_environment(document: dict[str, Any], environ: Mapping[str, str]) -> dict[KeyPath, str]:
    """Set each key a ``JSONNET_WORKER_*`` variable names (ConfigError for an unknown one);
    returns the keys set, with the variable that set each."""
    known = {_env_name(key): key for key in ENV_KEYS}
    overridden: dict[KeyPath, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        key = known.get(name)
        if key is None:
            raise ConfigError(f"environment: {name} names no config key; known: {sorted(known)}")
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError:
            raise ConfigError(f"environment: {name} is not a YAML scalar") from None
        holder = document
        for part in key[:-1]:
            nested = holder.get(part)
            if nested is None:  # absent, or written empty (``serve:``)
                nested = holder[part] = {}
            if not isinstance(nested, dict):
                raise ConfigError(f"environment {name}: {'.'.join(key[:-1])} must be a mapping")
            holder = nested
        holder[key[-1]] = value
        overridden[key] = name
    return overridden


def _read_text(path: Path, what: str) -> str:
    """The file's text; ConfigError naming ``what`` when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8") from None


def parse_config(
    text: str, path: Path | None = None, environ: Mapping[str, str] | None = None
) -> ServiceConfig:
    """Validate YAML ``text`` (with ``environ``'s ``JSONNET_WORKER_*`` overrides) by the key
    table (``_schema.py``); relative ``file://`` URIs are resolved against ``path``'s
    directory (the working directory when ``path`` is None)."""
    source = Source(path)
    document = source.read(text)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{source.name}: the config must be a mapping at the top level")
    raw: dict[str, Any] = copy.deepcopy(document)
    source.overridden = apply_environment(raw, environ or {})
    found = list(problems(raw))
    if found:
        first = found[0]
        more = f" ({len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise ConfigError(
            f"{source.where(first.path)}: {dotted(first.path)}: {first.message}{more}"
        )
    base = path.parent.resolve() if path is not None else Path.cwd()
    serve = _section(raw, "serve")
    auth = _section(serve, "auth")
    libraries = _load_libraries(raw, base, source)
    mappers: dict[str, Snippet] = {}
    templates: dict[str, Snippet] = {}
    for kind, places in (
        (SnippetKind.MAPPER, _mapper_places(raw)),
        (SnippetKind.TEMPLATE, _template_places(raw)),
    ):
        for place in places:
            snippet = _load_snippet(kind, place, base, source)
            library = _snippet_library(place, libraries, source)
            _add(mappers if kind is SnippetKind.MAPPER else templates, snippet, library)
    return ServiceConfig(
        pool=_pool_config(raw),
        libraries=libraries,
        bearer_token=_token(auth, "bearer_token_file", base),
        metrics_token=_token(auth, "metrics_token_file", base),
        mappers=mappers,
        templates=templates,
        evaluate_enabled=bool(_section(serve, "evaluate").get("enabled", True)),
        evaluate_traces=bool(_section(serve, "evaluate").get("traces", False)),
        max_body=int(serve.get("max_body_bytes", DEFAULT_MAX_BODY)),
        max_request_timeout=float(serve.get("max_request_timeout", DEFAULT_MAX_REQUEST_TIMEOUT)),
        shutdown_timeout=float(serve.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)),
        keep_alive_timeout=float(serve.get("keep_alive_timeout", DEFAULT_KEEP_ALIVE_TIMEOUT)),
        workers=int(serve.get("workers", 1)),
        raw=raw,
        path=path,
    )


@dataclass
class Source:
    """Where each key of a config came from, for messages: the file and line of each key
    path, or the environment variable that set it."""

    path: Path | None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overridden: dict[KeyPath, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "the config" if self.path is None else str(self.path)

    def read(self, text: str) -> Any:
        """The document; ConfigError (naming the file and line) for a YAML error or a key
        written twice in one mapping, at any depth."""
        loader = yaml.SafeLoader(text)
        loader.name = self.name  # PyYAML says "<unicode string>" otherwise
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            self._index(node, (), set())
            return loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:  # one line: where, then what
            mark = exc.problem_mark or exc.context_mark
            at = "" if mark is None else f":{mark.line + 1}:{mark.column + 1}"
            what = " ".join(part for part in (exc.context, exc.problem) if part)
            raise ConfigError(f"{self.name}{at}: not valid YAML: {what}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.name}: not valid YAML: {exc}") from None
        finally:
            loader.dispose()

    def _index(self, node: yaml.Node, path: KeyPath, seen: set[int]) -> None:
        if id(node) in seen:  # an alias: indexed once (and a recursive one ends here)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines.setdefault((*path, index), item.start_mark.line + 1)
                self._index(item, (*path, index), seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # << keeps YAML's own rules
                    continue
                line = key_node.start_mark.line + 1
                key = (key_node.tag, str(key_node.value))
                child = (*path, str(key_node.value))
                if key in first:
                    raise ConfigError(
                        f"{self.name}:{line}: {dotted(child)}: duplicate key (first on line "
                        f"{first[key]}); YAML would silently keep the last one"
                    )
                first[key] = line
                self.lines.setdefault(child, line)
                self._index(value_node, child, seen)

    def where(self, path: KeyPath) -> str:
        """``FILE:LINE`` of the key (or of its nearest parent that is in the file), or the
        environment variable that set it."""
        for length in range(len(path), 0, -1):
            variable = self.overridden.get(path[:length])
            if variable is not None:
                return f"environment {variable}"
            line = self.lines.get(path[:length])
            if line is not None:
                return f"{self.name}:{line}"
        return self.name


# -- where Kratos keeps its snippets ------------------------------------------------------


@dataclass(frozen=True)
class _Place:
    """Where a snippet's URI is: its name, the key's path, the mapping holding it."""

    name: str
    path: KeyPath
    holder: dict[str, Any]
    field: str


def _mapper_places(raw: Mapping[str, Any]) -> Iterator[_Place]:
    oidc = _section(raw, "selfservice", "methods", "oidc", "config")
    for index, provider in enumerate(_list(oidc, "providers", "selfservice.methods.oidc.config")):
        key = f"selfservice.methods.oidc.config.providers[{index}]"
        if not isinstance(provider, dict):
            raise ConfigError(f"{key} must be a mapping")
        if "mapper_url" not in provider:
            continue
        path = ("selfservice", "methods", "oidc", "config", "providers", index, "mapper_url")
        yield _Place(_name(provider, "id", key), path, provider, "mapper_url")


def _template_places(raw: Mapping[str, Any]) -> Iterator[_Place]:
    courier = _section(raw, "courier")
    for index, channel in enumerate(_list(courier, "channels", "courier")):
        key = f"courier.channels[{index}]"
        if not isinstance(channel, dict):
            raise ConfigError(f"{key} must be a mapping")
        request = _section(channel, "request_config", where=key)
        if "body" in request:
            path = ("courier", "channels", index, "request_config", "body")
            yield _Place(_name(channel, "id", key), path, request, "body")
    http = _section(courier, "http", "request_config", where="courier")
    if "body" in http:
        yield _Place("http", ("courier", "http", "request_config", "body"), http, "body")
    flows = _section(raw, "selfservice", "flows")
    for flow, phases in flows.items():
        if not isinstance(phases, dict):
            continue
        for phase in ("before", "after"):
            section = phases.get(phase)
            if not isinstance(section, dict):
                continue
            yield from _hooks(section, ("selfservice", "flows", str(flow), phase))
            for method, nested in section.items():
                if method != "hooks" and isinstance(nested, dict):
                    yield from _hooks(
                        nested, ("selfservice", "flows", str(flow), phase, str(method))
                    )


def _hooks(section: Mapping[str, Any], at: tuple[str, ...]) -> Iterator[_Place]:
    where = dotted(at)
    for index, hook in enumerate(_list(section, "hooks", where)):
        key = f"{where}.hooks[{index}]"
        if not isinstance(hook, dict) or hook.get("hook") != "web_hook":
            continue
        config = _section(hook, "config", where=key)
        if "body" not in config:
            continue
        name = hook.get("name", "-".join([*at[2:], str(index)]))
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}.name must be a non-empty string")
        yield _Place(name, (*at, "hooks", index, "config", "body"), config, "body")


def _load_snippet(kind: SnippetKind, place: _Place, base: Path, lines: Source) -> Snippet:
    """The snippet at ``place``, read; ConfigError naming the file, the line and the key."""
    key = dotted(place.path)
    where = f"{lines.where(place.path)}: {key}"
    uri = place.holder[place.field]
    if not isinstance(uri, str):
        raise ConfigError(f"{where}: must be a file:// or base64:// URI")
    if uri.startswith("base64://"):
        try:
            text = _base64(uri).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: bad base64:// value ({exc})") from None
        return Snippet(place.name, kind, uri, text, key)
    if not uri.startswith("file://"):
        raise ConfigError(f"{where}: must be a file:// or base64:// URI, not {uri!r}")
    file_path = base / uri[len("file://") :]
    text = _read_text(file_path, where)
    place.holder[place.field] = uri = _absolute(file_path)
    return Snippet(place.name, kind, uri, text, key)


def _base64(uri: str) -> bytes:
    return base64.b64decode(uri[len("base64://") :], validate=True)


def _absolute(path: Path) -> str:
    """``path``'s absolute ``file://`` URI, which the loader writes back into the raw
    config in place of the one it read: the host's allow-list then names the file or
    directory we really read (``kratos_allow_list`` would resolve a relative one against
    the working directory)."""
    return "file://" + str(path.resolve())


def _snippet_library(
    place: _Place, libraries: Mapping[str, NamedLibrary], source: Source
) -> NamedLibrary | None:
    """The library set a snippet names beside its URI (``library:``); ConfigError naming
    the file, the line and the key for a name ``libraries`` does not hold."""
    name = place.holder.get("library")
    if name is None:
        return None
    path = (*place.path[:-1], "library")
    found = libraries.get(name)
    if found is None:
        configured = ", ".join(sorted(libraries)) or "none"
        raise ConfigError(
            f"{source.where(path)}: {dotted(path)}: no library set named {name!r} "
            f"(configured under 'libraries': {configured})"
        )
    return found


def _add(snippets: dict[str, Snippet], snippet: Snippet, library: NamedLibrary | None) -> None:
    snippet = dataclasses.replace(snippet, library=library)
    if snippet.name in snippets:
        first = snippets[snippet.name]
        raise ConfigError(
            f"{snippet.kind.value} name {snippet.name!r} is used twice: {first.key} and "
            f"{snippet.key}"
        )
    snippets[snippet.name] = snippet


# -- library sets ------------------------------------------------------------------------


def _load_libraries(raw: Mapping[str, Any], base: Path, source: Source) -> dict[str, NamedLibrary]:
    """Every set of ``libraries``, its sources read now, before the host sandbox is applied
    (nothing is read again later), and bounded by ``Library``'s own bounds (files, bytes;
    whether a set fits a request frame, ``pool.max_request``, the pool itself says when the
    service starts: ``Service.check_libraries``)."""
    found: dict[str, NamedLibrary] = {}
    for name, entry in _section(raw, "libraries").items():
        path: KeyPath = ("libraries", name)
        where = f"{source.where(path)}: {dotted(path)}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: a library set's name must be a non-empty string")
        entry = entry or {}
        sources = entry.get("sources")
        if not sources:
            raise ConfigError(f"{where}: names no sources (sources: [file://DIR, ...])")
        files: dict[str, bytes] = {}
        origin: dict[str, int] = {}
        for index in range(len(sources)):
            item_path = (*path, "sources", index)
            item_where = f"{source.where(item_path)}: {dotted(item_path)}"
            try:
                served = _read_library_source(sources, index, base)
            except (InvalidArgument, InvalidType, InputTooLarge) as exc:
                raise ConfigError(f"{item_where}: {exc}") from None
            for served_name in served:
                if served_name in files:
                    raise ConfigError(
                        f"{item_where}: serves {served_name!r} again (first from "
                        f"{dotted((*path, 'sources', origin[served_name]))})"
                    )
                origin[served_name] = index
            files.update(served)
        try:
            library = Library.from_files(files)
        except (InvalidArgument, InvalidType, InputTooLarge) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        found[name] = NamedLibrary(name, library, bool(entry.get("adhoc", False)), where)
    return found


def _read_library_source(sources: list[Any], index: int, base: Path) -> dict[str, bytes]:
    """The files one source serves, by name: a ``base64://`` file under its ``path``, a
    ``file://`` file under ``path`` or its base name, a ``file://`` directory's files in the
    folder ``path`` (default: the top). Each source is a ``Library`` of its own first, so
    its names and bounds are checked here, with its key in the message (the set's total
    is checked when they are merged)."""
    item = sources[index]
    uri, served_as = (
        (item.get("source"), item.get("path")) if isinstance(item, dict) else (item, None)
    )
    if not isinstance(uri, str):
        raise InvalidArgument("a source is a file:// or base64:// URI")

    def checked(files: Mapping[str, bytes]) -> dict[str, bytes]:
        return dict(Library.from_files(files).files)

    if uri.startswith("base64://"):
        if served_as is None:
            raise InvalidArgument(
                "a base64:// source needs the name it is served under: "
                "{path: NAME.libsonnet, source: base64://...}"
            )
        try:
            content = _base64(uri)
        except binascii.Error as exc:
            raise InvalidArgument(f"bad base64:// value ({exc})") from None
        return checked({served_as: content})
    if not uri.startswith("file://"):
        raise InvalidArgument(f"a source is a file:// or base64:// URI, not {uri!r}")
    file_path = base / uri[len("file://") :]
    if file_path.is_dir():
        directory = Library.from_directory(file_path)
        _rewrite_source(sources, index, file_path)
        prefix = f"{served_as}/" if served_as else ""
        files = {prefix + name: content for name, content in directory.files.items()}
        return checked(files)
    try:
        with open(file_path, "rb") as opened:
            content = opened.read(_MAX_BYTES + 1)  # no more than the bound is ever read
    except OSError as exc:
        raise InvalidArgument(f"cannot read {file_path}: {exc.strerror}") from None
    _rewrite_source(sources, index, file_path)
    return checked({served_as or file_path.name: content})


# Library's own bound on a set's bytes (the default of its public constructors): a file
# source is read no further than that.
_MAX_BYTES: int = inspect.signature(Library.from_files).parameters["max_bytes"].default


def _rewrite_source(sources: list[Any], index: int, path: Path) -> None:
    """The source's URI made absolute in the raw config, as a snippet's (``_absolute``)."""
    if isinstance(sources[index], dict):
        sources[index]["source"] = _absolute(path)
    else:
        sources[index] = _absolute(path)


# -- typed access -------------------------------------------------------------------------


def _pool_config(raw: Mapping[str, Any]) -> PoolConfig:
    """The ``pool`` section as a PoolConfig; ``require_sandbox`` comes from
    ``security.require_sandbox`` (default true: fail closed)."""
    pool = dict(_section(raw, "pool"))
    security = _section(raw, "security")
    required = bool(security.get("require_sandbox", True))
    if pool.get("require_sandbox", required) != required:
        raise ConfigError(
            "pool.require_sandbox and security.require_sandbox differ; set security's only"
        )
    pool["require_sandbox"] = required
    worker_user = pool.get("worker_user")
    if isinstance(worker_user, str) and worker_user.partition("-")[2].isdigit():
        first, _, last = worker_user.partition("-")
        if first.isdigit():
            pool["worker_user"] = range(int(first), int(last) + 1)  # "FIRST-LAST", both in
    try:
        return PoolConfig.from_mapping(pool, "pool")
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _token(auth: Mapping[str, Any], key: str, base: Path) -> str | None:
    """The content of the token file ``serve.auth.<key>`` names (None when unset)."""
    path = auth.get(key)
    if path is None:
        return None
    where = f"serve.auth.{key}"
    if not path:
        raise ConfigError(f"{where} must be a path")
    token = _read_text(base / path, where).strip()
    if not token:
        raise ConfigError(f"{where}: {base / path} is empty")
    return str(token)


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
