"""The service config's key table: every key the loader accepts, its type, and where.

Goals: one source of truth for what a config may say. The loader validates a document with
this table (an unknown key, a duplicate key or a wrong type is refused at start, with the
file, the line and the key's path), and the published JSON Schema
(``config.schema.json``, shipped in the package) is generated from it, so the two cannot
drift (``tests/test_service_schema.py`` fails when the shipped file is not what the table
generates).

Plan: a config is a tree of ``Section`` (a mapping with known keys), ``ListOf``, ``Value``
(a scalar with its JSON types), ``Either`` (one of several nodes, told apart by the value's
JSON type: ``anyOf`` in the schema) and ``Opaque`` nodes. Two kinds of keys live in it:

- our own sections, ``serve``, ``pool``, ``security`` (with ``security.landlock``) and
  ``libraries`` (named library sets, each ``sources`` and ``adhoc``; a source is a URI or
  ``{path, source}``): strict, every key known and typed (``pool``'s keys and types come
  from ``PoolConfig``'s fields, so an option added there is a key here);
- the Kratos paths the service walks for snippets (``selfservice.methods.oidc.config
  .providers[]``, ``selfservice.flows.<flow>.<before|after>[.<method>].hooks[]``,
  ``courier.channels[]``, ``courier.http``): strict too. Every mapping on those paths takes
  only the keys Ory Kratos' own config schema allows there (``embedx/config.schema.json``;
  the names are copied below, their values are Kratos' business and not checked) plus the
  ones we read, which are typed (ours among them: a hook's ``name``, and ``library``
  beside a ``mapper_url`` or a ``body``). A typo such as ``mapper_ur`` or ``confg`` is refused
  instead of silently dropping a mapper.

Any other Kratos key is accepted only as one of Kratos' own top-level keys (``dsn``,
``identity``, ``session``, ...; Kratos' ``serve.public``/``serve.admin`` and its own
``security`` keys likewise), unchecked: the README does not ask for a real Kratos config,
but one loads (the host sandbox's ``kratos_allow_list`` reads its TLS, SMTP and SQLite
paths), and a key Kratos itself would refuse at the top level is refused here too. The
reason for not checking inside those keys: the service never reads them, and copying
Kratos' whole schema would refuse configs of a newer Kratos for keys that cannot matter.

Weak spots: the Kratos names are those of one Kratos version; a key a later Kratos adds on a
walked path is refused until it is added here (the message names the key and the place).
The flows share one list of keys (the union over Kratos' flows), so a key Kratos allows on
one flow only is accepted on all of them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import PoolConfig

# JSON types, as JSON Schema names them.
BOOLEAN, INTEGER, NUMBER, STRING, NULL = "boolean", "integer", "number", "string", "null"
_PYTHON_TYPES = {"int": INTEGER, "float": NUMBER, "str": STRING, "bool": BOOLEAN, "None": NULL}


@dataclass(frozen=True)
class Value:
    """A scalar (or a list of strings, ``items``) of one of ``types``."""

    types: tuple[str, ...]
    description: str
    positive: bool = False  # a number > 0
    string_items: bool = False  # a list of non-empty strings


@dataclass(frozen=True)
class Opaque:
    """Anything: a key of Ory Kratos' that the service does not read."""

    description: str = "Ory Kratos' own key: accepted, not checked (the service does not use it)"


@dataclass(frozen=True)
class ListOf:
    item: Node
    description: str = ""


@dataclass(frozen=True)
class Either:
    """One of ``options``, told apart by the value's JSON type: a ``Section`` takes a
    mapping, a ``ListOf`` a list, a ``Value`` its own types (a library source is a URI or a
    mapping)."""

    options: tuple[Node, ...]
    description: str = ""


@dataclass(frozen=True)
class Section:
    """A mapping: ``keys`` (ours or walked, checked), ``kratos`` (Kratos' own, accepted
    unchecked) and, when ``each`` is set, any other key whose value is an ``each``."""

    keys: Mapping[str, Node]
    description: str = ""
    kratos: frozenset[str] = frozenset()
    definition: str = ""  # a named definition in the JSON Schema ($defs), shared by reference
    each: Node | None = None


Node = Value | Opaque | ListOf | Either | Section


# -- our own sections --------------------------------------------------------------------


def _pool_value(option: dataclasses.Field[Any]) -> Value:
    """A ``pool`` key from a PoolConfig field: its types from the annotation (``range``,
    worker_user's uid range, is written as the string ``"FIRST-LAST"``)."""
    names = [part.strip() for part in str(option.type).split("|")]
    types = tuple(dict.fromkeys(_PYTHON_TYPES.get(name, STRING) for name in names))
    return Value(types, str(option.metadata["help"]))


POOL = Section(
    {option.name: _pool_value(option) for option in dataclasses.fields(PoolConfig)},
    "The WorkerPool's options (README: the pool's options); require_sandbox comes from "
    "security.require_sandbox and may only repeat it. Types here; each value's range is "
    "checked by PoolConfig when the service loads the file.",
)

SERVE = Section(
    {
        "max_body_bytes": Value((INTEGER,), "larger request bodies get 413", positive=True),
        "max_request_timeout": Value(
            (NUMBER,), "the largest 'timeout' a request may ask for (seconds)", positive=True
        ),
        "shutdown_timeout": Value(
            (NUMBER,), "on SIGTERM, how long requests in flight may still run", positive=True
        ),
        "keep_alive_timeout": Value((NUMBER,), "seconds an idle connection is kept", positive=True),
        "workers": Value(
            (INTEGER,), "server processes on one socket, each with its own pool", positive=True
        ),
        "evaluate": Section(
            {
                "enabled": Value((BOOLEAN,), "POST /v1/evaluate (ad-hoc snippets); false: 403"),
                "traces": Value(
                    (BOOLEAN,),
                    "a /v1/evaluate request may ask for its std.trace lines ('traces': true); "
                    "false (the default): such a request gets 403",
                ),
            },
            "ad-hoc evaluation",
        ),
        "auth": Section(
            {
                "bearer_token_file": Value(
                    (STRING, NULL),
                    "a file holding the token /v1/*, /metrics and /healthz's detail need",
                ),
                "metrics_token_file": Value(
                    (STRING, NULL),
                    "a file holding a token for /metrics and /healthz's detail only",
                ),
            },
            "tokens, read at start",
        ),
    },
    "the HTTP service (Kratos' own serve.public and serve.admin are accepted, unchecked)",
    kratos=frozenset({"public", "admin"}),
)

SECURITY = Section(
    {
        "require_sandbox": Value(
            (BOOLEAN,), "false: serve even where workers get no Landlock (WARNING)"
        ),
        "landlock": Section(
            {
                "disabled": Value(
                    (BOOLEAN,), "true: do not restrict the service process (WARNING)"
                ),
                "allowed_paths": Value(
                    ("array",), "extra files or directories it may read", string_items=True
                ),
            },
            "the host process's Landlock layer (restrict_host)",
        ),
    },
    "sandbox requirements (Kratos' own security keys are accepted, unchecked)",
    kratos=frozenset({"account_enumeration", "disallow_ref_in_identity_schemas"}),
)

# -- the Kratos paths walked for snippets (key names from Kratos' embedx/config.schema.json)

_URI = "a file:// URI (relative to the config file) or a base64:// value"
_LIBRARY = Value(
    (STRING,), "ours: the library set (a name under 'libraries') its imports are served from"
)

HOOK_CONFIG = Section(
    {"body": Value((STRING,), "the web hook's body template: " + _URI), "library": _LIBRARY},
    kratos=frozenset(
        {"url", "method", "auth", "headers", "response", "can_interrupt", "emit_analytics_event"}
        | {"id"}
    ),
    definition="hook_config",
)
HOOK = Section(
    {
        "hook": Value((STRING,), "the hook's kind; web_hook's config.body is a template"),
        "name": Value((STRING,), "ours: the template's name (default <flow>-<phase>-<index>)"),
        "config": HOOK_CONFIG,
    },
    definition="hook",
)
HOOKS = ListOf(HOOK)
FLOW_METHODS = frozenset(
    {"password", "oidc", "code", "passkey", "webauthn", "totp", "lookup_secret", "profile"}
)
METHOD_HOOKS = Section(
    {"hooks": HOOKS}, kratos=frozenset({"default_browser_return_url"}), definition="method_hooks"
)
PHASE = Section(
    {"hooks": HOOKS, **dict.fromkeys(sorted(FLOW_METHODS), METHOD_HOOKS)},
    "hooks of the flow, and per method",
    kratos=frozenset({"default_browser_return_url"}),
    definition="phase",
)
FLOW = Section(
    {"before": PHASE, "after": PHASE},
    kratos=frozenset(
        {"ui_url", "lifespan", "style", "enabled", "enable_legacy_one_step", "login_hints"}
        | {"notify_unknown_recipients", "use", "clear_browser_data"}
        | {"privileged_session_max_age", "required_aal"}
    ),
    definition="flow",
)
FLOWS = ("error", "login", "logout", "recovery", "registration", "settings", "verification")
PROVIDER = Section(
    {
        "id": Value((STRING,), "the mapper's name"),
        "mapper_url": Value((STRING,), "the claims mapper: " + _URI),
        "library": _LIBRARY,
    },
    kratos=frozenset(
        {"provider", "label", "client_id", "client_secret", "issuer_url", "auth_url"}
        | {"token_url", "scope", "microsoft_tenant", "subject_source", "apple_team_id"}
        | {"apple_private_key_id", "apple_private_key", "requested_claims", "organization_id"}
        | {"additional_id_token_audiences", "claims_source", "pkce", "fedcm_config_url"}
        | {"net_id_token_origin_header", "account_linking_mode", "update_identity_on_login"}
        | {"aal2_acr_values", "aal2_amr_values"}
    ),
    definition="provider",
)
SELFSERVICE = Section(
    {
        "methods": Section(
            {
                "oidc": Section(
                    {
                        "config": Section(
                            {"providers": ListOf(PROVIDER)},
                            kratos=frozenset({"base_redirect_uri"}),
                        )
                    },
                    kratos=frozenset({"enabled"}),
                )
            },
            kratos=frozenset(
                {"password", "profile", "link", "code", "totp", "lookup_secret", "webauthn"}
                | {"passkey", "b2b"}
            ),
        ),
        "flows": Section(dict.fromkeys(FLOWS, FLOW)),
    },
    "Kratos' self-service: OIDC claim mappers and web hook body templates",
    kratos=frozenset({"default_browser_return_url", "allowed_return_urls"}),
)
REQUEST_CONFIG = Section(
    {"body": Value((STRING,), "the request's body template: " + _URI), "library": _LIBRARY},
    kratos=frozenset({"url", "method", "headers", "auth"}),
    definition="request_config",
)
COURIER = Section(
    {
        "channels": ListOf(
            Section(
                {"id": Value((STRING,), "the template's name"), "request_config": REQUEST_CONFIG},
                kratos=frozenset({"type"}),
            )
        ),
        "http": Section({"request_config": REQUEST_CONFIG}, "the template named 'http'"),
    },
    "Kratos' courier: HTTP message templates",
    kratos=frozenset(
        {"templates", "template_override_path", "message_retries", "worker"}
        | {"delivery_strategy", "smtp"}
    ),
)

# -- our library sets, which the snippets above name (``library:`` beside their URI)

_SOURCE_URI = (
    "file:// a directory (every file under it) or a file (relative to the config file), "
    "or base64:// a file's content"
)
LIBRARY_SOURCE = Section(
    {
        "source": Value((STRING,), _SOURCE_URI),
        "path": Value(
            (STRING,),
            "the name it is served under: a file's (needed for base64://; default: the "
            "file's base name), or the folder a directory's files are served in (default: "
            "the library's top)",
        ),
    },
    definition="library_source",
)
LIBRARY = Section(
    {
        "sources": ListOf(
            Either((Value((STRING,), _SOURCE_URI), LIBRARY_SOURCE)),
            "what the set serves, merged at its top (a name served twice is refused)",
        ),
        "adhoc": Value(
            (BOOLEAN,),
            "POST /v1/evaluate may name this set ('library': NAME); false (the default): 403",
        ),
    },
    "a library set: read at start, bounded, served from memory to the snippets that name it",
    definition="library",
)
LIBRARIES = Section(
    {},
    "ours: named library sets that mappers and templates import from (read at start)",
    each=LIBRARY,
)

KRATOS_TOP_LEVEL = frozenset(
    {"version", "dsn", "database", "identity", "session", "cookies", "secrets", "hashers"}
    | {"ciphers", "log", "tracing", "oauth2_provider", "preview", "dev", "help"}
    | {"sqa-opt-out", "watch-courier", "expose-metrics-port", "config", "clients"}
    | {"feature_flags", "organizations", "enterprise", "revision"}
)
CONFIG = Section(
    {
        "serve": SERVE,
        "pool": POOL,
        "security": SECURITY,
        "selfservice": SELFSERVICE,
        "courier": COURIER,
        "libraries": LIBRARIES,
    },
    "jsonnet-worker serve's configuration (Kratos-style; README: 'The service')",
    kratos=KRATOS_TOP_LEVEL,
)


# -- validation ---------------------------------------------------------------------------

KeyPath = tuple[str | int, ...]


def dotted(path: KeyPath) -> str:
    """``serve.auth.bearer_token_file``, ``courier.channels[0].id``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(the top level)"


@dataclass(frozen=True)
class Problem:
    path: KeyPath
    message: str


def problems(document: Any, node: Node = CONFIG, path: KeyPath = ()) -> Iterator[Problem]:
    """Everything wrong with ``document`` by the table, in document order."""
    if isinstance(node, Opaque):
        return
    if isinstance(node, Value):
        yield from _value_problems(document, node, path)
    elif isinstance(node, Either):
        yield from _either_problems(document, node, path)
    elif document is None:  # an empty section (``serve:`` with nothing under it)
        return
    elif isinstance(node, ListOf):
        yield from _list_problems(document, node, path)
    elif not isinstance(document, dict):
        yield Problem(path, "must be a mapping")
    else:
        yield from _section_problems(document, node, path)


def _list_problems(document: Any, node: ListOf, path: KeyPath) -> Iterator[Problem]:
    if not isinstance(document, list):
        yield Problem(path, "must be a list")
        return
    for index, item in enumerate(document):
        if item is None and isinstance(node.item, Section):  # only a key's may be empty
            yield Problem((*path, index), "must be a mapping")
        else:
            yield from problems(item, node.item, (*path, index))


def _either_problems(document: Any, node: Either, path: KeyPath) -> Iterator[Problem]:
    for option in node.options:
        if _accepts(option, document):
            yield from problems(document, option, path)
            return
    yield Problem(path, f"must be {' or '.join(_kind_name(option) for option in node.options)}")


def _accepts(node: Node, value: Any) -> bool:
    """Whether ``value``'s JSON type is one ``node`` takes (its content aside)."""
    if isinstance(node, Section):
        return isinstance(value, dict)
    if isinstance(node, ListOf):
        return isinstance(value, list)
    if isinstance(node, Value):
        return _has_type(value, node.types)
    if isinstance(node, Either):
        return any(_accepts(option, value) for option in node.options)
    return True


def _kind_name(node: Node) -> str:
    if isinstance(node, Section):
        return "a mapping"
    if isinstance(node, ListOf):
        return "a list"
    if isinstance(node, Value):
        return " or ".join(_NAMES[kind] for kind in node.types)
    if isinstance(node, Either):
        return " or ".join(_kind_name(option) for option in node.options)
    return "anything"


def _section_problems(document: dict[Any, Any], node: Section, path: KeyPath) -> Iterator[Problem]:
    for key, value in document.items():
        child = node.keys.get(key) if isinstance(key, str) else None
        if child is None and node.each is not None:
            child = node.each
        if child is not None:
            yield from problems(value, child, (*path, key))
        elif key not in node.kratos:
            yield Problem((*path, str(key)), f"unknown key; known here: {', '.join(known(node))}")


def known(node: Section) -> list[str]:
    return sorted({*node.keys, *node.kratos})


def _value_problems(value: Any, node: Value, path: KeyPath) -> Iterator[Problem]:
    if not _has_type(value, node.types):
        yield Problem(path, f"must be {' or '.join(_NAMES[kind] for kind in node.types)}")
    elif node.positive and not value > 0:
        yield Problem(path, "must be positive")
    elif node.string_items and not all(isinstance(item, str) and item for item in value):
        yield Problem(path, "must be a list of non-empty strings")


_NAMES = {
    BOOLEAN: "true or false",
    INTEGER: "an integer",
    NUMBER: "a number",
    STRING: "a string",
    NULL: "null",
    "array": "a list",
}


def _has_type(value: Any, types: tuple[str, ...]) -> bool:
    for kind in types:
        if kind == NULL and value is None:
            return True
        if kind == BOOLEAN and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue  # YAML's true is no number
        if kind == INTEGER and isinstance(value, int):
            return True
        if kind == NUMBER and isinstance(value, int | float) and value == value:
            return True
        if kind == STRING and isinstance(value, str):
            return True
        if kind == "array" and isinstance(value, list):
            return True
    return False


# -- the JSON Schema ----------------------------------------------------------------------


@dataclass
class _Generator:
    definitions: dict[str, Any] = field(default_factory=dict)

    def schema(self, node: Node) -> dict[str, Any]:
        if isinstance(node, Opaque):
            return {"description": node.description}
        if isinstance(node, Value):
            return _value_schema(node)
        if isinstance(node, ListOf):
            return _described({"type": "array", "items": self.item(node.item)}, node.description)
        if isinstance(node, Either):
            options = [self.item(option) for option in node.options]
            return _described({"anyOf": options}, node.description)
        if node.definition:
            if node.definition not in self.definitions:
                self.definitions[node.definition] = {}  # a placeholder while it is built
                self.definitions[node.definition] = self.section(node)
            return {"$ref": f"#/$defs/{node.definition}"}
        return self.section(node)

    def item(self, node: Node) -> dict[str, Any]:
        """A list item's or an option's schema: a mapping there is not null (a key's
        empty section is), said beside a $ref too (2020-12)."""
        schema = self.schema(node)
        return {**schema, "type": "object"} if isinstance(node, Section) else schema

    def section(self, node: Section) -> dict[str, Any]:
        properties = {key: self.schema(child) for key, child in sorted(node.keys.items())}
        for key in sorted(node.kratos):
            properties[key] = self.schema(Opaque())
        result: dict[str, Any] = {"type": ["object", "null"], "properties": properties}
        result["additionalProperties"] = False if node.each is None else self.schema(node.each)
        return _described(result, node.description)


def _described(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, **schema} if description else schema


def _value_schema(node: Value) -> dict[str, Any]:
    schema: dict[str, Any] = {"description": node.description}
    schema["type"] = node.types[0] if len(node.types) == 1 else list(node.types)
    if node.positive:
        schema["exclusiveMinimum"] = 0
    if node.string_items:
        schema["items"] = {"type": "string", "minLength": 1}
    return schema


def config_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of the config, generated from the table."""
    generator = _Generator()
    root = generator.schema(CONFIG)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "jsonnet-worker serve configuration",
        **root,
        "$defs": dict(sorted(generator.definitions.items())),
    }


def schema_text() -> str:
    """``config.schema.json``'s content. After a change to the table: ``python -c 'from
    jsonnet_worker.service._schema import schema_text as s; print(s(), end="")' >
    jsonnet_worker/service/config.schema.json``."""
    return json.dumps(config_schema(), indent=2) + "\n"
