"""The service config is strict, and its published JSON Schema says the same as the loader:
the shipped ``config.schema.json`` is what the key table generates, every example config in
the repository passes both, and bad configs fail both. The schema is checked here with a
small validator of the keywords the generator uses (no ``jsonschema`` dependency)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from jsonnet_worker.service import ConfigError, load_config
from jsonnet_worker.service._config import ENV_KEYS, parse_config
from jsonnet_worker.service._schema import CONFIG, Section, Value, problems, schema_text

ROOT = Path(__file__).resolve().parent.parent
OUR_SECTIONS = {"serve", "pool", "security", "selfservice", "courier", "libraries"}


def shipped_schema() -> dict[str, Any]:
    text = resources.files("jsonnet_worker.service").joinpath("config.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


# -- a validator for the keywords config_schema() uses -------------------------------------


def schema_errors(
    value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = ""
) -> list[str]:
    """What is wrong with ``value`` by ``schema`` (JSON Schema 2020-12, the keywords the
    generator emits: $ref, type, properties, additionalProperties, items, anyOf,
    exclusiveMinimum, minLength)."""
    errors = _any_of_errors(value, schema, root, at)
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        errors += schema_errors(value, root["$defs"][name], root, at)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, kind) for kind in types):
            return [*errors, f"{at}: not {types}"]
    errors += _scalar_errors(value, schema, at)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        others = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], root, f"{at}.{key}")
            elif others is False:
                errors.append(f"{at}.{key}: not allowed")
            elif isinstance(others, dict):
                errors += schema_errors(item, others, root, f"{at}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{at}[{index}]")
    return errors


def _any_of_errors(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str) -> list[str]:
    options = schema.get("anyOf", [])
    if options and all(schema_errors(value, option, root, at) for option in options):
        return [f"{at}: none of anyOf"]
    return []


def _scalar_errors(value: Any, schema: dict[str, Any], at: str) -> list[str]:
    errors = []
    minimum = schema.get("exclusiveMinimum")
    if minimum is not None and _is(value, "number") and not value > minimum:
        errors.append(f"{at}: not > {minimum}")
    if "minLength" in schema and isinstance(value, str) and len(value) < schema["minLength"]:
        errors.append(f"{at}: too short")
    return errors


def _is(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return {
        "integer": isinstance(value, int),
        "number": isinstance(value, int | float),
        "string": isinstance(value, str),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[kind]


# -- one source of truth -------------------------------------------------------------------


def test_the_shipped_schema_is_the_one_the_loaders_table_generates() -> None:
    shipped = (ROOT / "jsonnet_worker" / "service" / "config.schema.json").read_text()
    assert shipped == schema_text(), (
        "config.schema.json is stale: regenerate it (jsonnet_worker/service/_schema.py, "
        "schema_text's docstring)"
    )
    assert '"config.schema.json"' in (ROOT / "pyproject.toml").read_text()  # package-data


def test_every_environment_key_is_a_typed_key_of_the_table() -> None:
    for key in ENV_KEYS:
        node: Any = CONFIG
        for part in key:
            assert isinstance(node, Section) and part in node.keys, key
            node = node.keys[part]
        assert isinstance(node, Value), key


def readme_config() -> str:
    """The README's example config: the yaml block of "The service" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The service: `jsonnet-worker serve`") :]
    found = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert found, "the README's service section has no yaml block"
    return found.group(1)


def example_configs() -> Iterator[tuple[str, str]]:
    """Every YAML file and Markdown yaml block of the repository that is a service (or
    Kratos) config: a mapping with one of the service's top-level sections."""
    files = [
        path
        for pattern in ("*.yaml", "*.yml")
        for path in ROOT.rglob(pattern)
        if not {".git", ".venv", "node_modules"} & set(path.relative_to(ROOT).parts)
    ]
    for path in sorted(files):
        yield str(path.relative_to(ROOT)), path.read_text()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for index, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", doc.read_text(), re.S)):
            yield f"{doc.relative_to(ROOT)} block {index}", block


EXAMPLES = [
    (name, text)
    for name, text in example_configs()
    if isinstance(document := yaml.safe_load(text), dict) and OUR_SECTIONS & set(document)
]


def test_the_examples_are_found() -> None:
    names = {name for name, _ in EXAMPLES}
    for expected in (
        "jsonnet_worker/service/default.yaml",
        "tests/data/service/config.yaml",
        "fixtures/host/kratos.yml",  # a real Kratos config: its own keys are accepted
        "docs/SANDBOX.md block 0",
    ):
        assert expected in names, sorted(names)
    assert any(name.startswith("README.md block") for name in names)


@pytest.mark.parametrize(("name", "text"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_every_example_config_passes_the_schema_and_the_loader(name: str, text: str) -> None:
    document = yaml.safe_load(text)
    assert schema_errors(document, shipped_schema(), shipped_schema()) == []
    assert list(problems(document)) == []


BAD = [
    "serve: {auth: {bearer_token_fil: token}}",
    "serve: {evaluate: {enable: false}}",
    "security: {require_sandbx: false}",
    "security: {landlock: {allowed_paths: [/a, '']}}",
    "serve: {workers: 0}",
    "serve: {max_request_timeout: '10'}",
    "serve: {evaluate: {enabled: 'no'}}",
    "pool: {size: two}",
    "pool: {timeout: true}",
    "pool: {spare: 1}",
    "selfservice: {methods: {oidc: {confg: {}}}}",
    "selfservice: {methods: {oidc: {config: {providers: [{id: a, mapper_ur: file://m}]}}}}",
    "selfservice: {methods: {oidc: {config: {providers: [null]}}}}",
    "selfservice: {flows: {registration: {after: {hooks: [{hook: web_hook, confg: {}}]}}}}",
    "selfservice: {flows: {registration: {after: {pasword: {hooks: []}}}}}",
    "selfservice: {flows: {registraton: {}}}",
    "courier: {channels: [{id: a, request_config: {bdy: file://t}}]}",
    "courier: {htp: {}}",
    "libraries: {h: {sources: [file://x], adhok: true}}",
    "libraries: {h: {sources: file://x}}",
    "libraries: {h: {sources: [1]}}",
    "libraries: {h: {sources: [null]}}",
    "libraries: {h: {sources: [{sorce: file://x}]}}",
    "libraries: {h: {sources: [{source: file://x, path: 1}]}}",
    "libraries: {h: {sources: [file://x], adhoc: 'yes'}}",
    "libraries: {h: [file://x]}",
    "courier: {http: {request_config: {body: file://t, library: 1}}}",
    "serv\u0435: {}",  # a Cyrillic e
    "kratos_key_that_does_not_exist: 1",
]


@pytest.mark.parametrize("text", BAD)
def test_bad_configs_fail_the_schema_and_the_loader(tmp_path: Path, text: str) -> None:
    document = yaml.safe_load(text)
    assert schema_errors(document, shipped_schema(), shipped_schema()) != []
    assert list(problems(document)) != []
    with pytest.raises(ConfigError):
        parse_config(text, tmp_path / "c.yaml", {})


# -- the cases: refused at start, with the file, the line and the key ---------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "serve:\n  auth:\n    bearer_token_fil: token\n",
            "c.yaml:3: serve.auth.bearer_token_fil: unknown key; known here: "
            "bearer_token_file, metrics_token_file",
        ),
        ("serve:\n  evaluate:\n    enable: false\n", "c.yaml:3: serve.evaluate.enable: unknown"),
        ("security:\n  require_sandbx: false\n", "c.yaml:2: security.require_sandbx: unknown"),
        (
            "serve:\n  workers: 1\npool: {}\nserve:\n  workers: 2\n",
            "c.yaml:4: serve: duplicate key (first on line 1)",
        ),
        (
            "courier:\n  channels:\n    - id: a\n      id: b\n",
            "c.yaml:4: courier.channels[0].id: duplicate key (first on line 3)",
        ),
        ("pool:\n  size: two\n", "c.yaml:2: pool.size: must be an integer or null"),
        ("serve:\n  workers: [1\n", "c.yaml:3:1: not valid YAML"),
        (
            "selfservice:\n  methods:\n    oidc:\n      config:\n        providers:\n"
            "          - id: a\n            mapper_url: file://missing.jsonnet\n",
            "c.yaml:7: selfservice.methods.oidc.config.providers[0].mapper_url: cannot read",
        ),
        (
            "libraries:\n  h:\n    sources:\n      - base64://e30=\n",
            "c.yaml:4: libraries.h.sources[0]: a base64:// source needs the name",
        ),
        (
            "libraries:\n  h:\n    sources:\n      - {path: a}\n",
            "c.yaml:4: libraries.h.sources[0]: a source is a file:// or base64:// URI",
        ),
        ("libraries:\n  h:\n    adhoc: true\n", "c.yaml:2: libraries.h: names no sources"),
        (
            "libraries:\n  h:\n    sources: [1]\n",
            "c.yaml:3: libraries.h.sources[0]: must be a string or a mapping",
        ),
        (
            "courier:\n  http:\n    request_config:\n      body: base64://e30=\n"
            "      library: none\n",
            "c.yaml:5: courier.http.request_config.library: no library set named 'none' "
            "(configured under 'libraries': none)",
        ),
    ],
)
def test_mistakes_are_refused_with_file_line_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "c.yaml", {})
    assert f"{tmp_path}/{message}" in str(caught.value)
    assert "<unicode string>" not in str(caught.value)


def test_an_environment_override_is_checked_and_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^environment JSONNET_WORKER_SERVE_WORKERS: serve"):
        parse_config("serve:\n", tmp_path / "c.yaml", {"JSONNET_WORKER_SERVE_WORKERS": "0"})
    config = parse_config("serve:\n", tmp_path / "c.yaml", {"JSONNET_WORKER_SERVE_WORKERS": "3"})
    assert config.workers == 3


def test_the_readme_example_config_loads(tmp_path: Path) -> None:
    text = readme_config()
    document = yaml.safe_load(text)
    for uri in re.findall(r"file://([\w./-]+)", text):
        target = tmp_path / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("function(ctx) ctx" if "mapper" not in uri else "{}")
    token = document["serve"]["auth"]["bearer_token_file"]
    assert not Path(token).is_absolute()  # relative to the config file, so it loads here
    (tmp_path / token).write_text("a-token\n")
    (tmp_path / "service.yaml").write_text(text)
    config = load_config(tmp_path / "service.yaml", environ={})
    assert config.bearer_token == "a-token" and config.evaluate_enabled is True
    assert config.max_body == 1048576 and config.workers == 1  # the first serve block's keys
    assert sorted(config.mappers) == ["github"]
    assert sorted(config.templates) == ["audit", "sms"]
