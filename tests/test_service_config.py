"""The service's config loading (in-process, no server) and the CLI without the extra."""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
from pathlib import Path

import pytest

import jsonnet_worker
from conftest import DATA, write_tree
from jsonnet_worker import PoolConfig, kratos_allow_list
from jsonnet_worker._cli import main
from jsonnet_worker.service import ApiError, ConfigError, SnippetKind, load_config
from jsonnet_worker.service._config import parse_config


def test_test_config_names_every_snippet_and_rewrites_paths() -> None:
    config = load_config(DATA / "service" / "config.yaml")
    assert sorted(config.mappers) == [
        "facebook", "github", "hydra", "invalid", "linkedin", "missing-subject",
    ]  # fmt: skip
    github = config.mappers["github"]
    assert github.kind is SnippetKind.MAPPER and github.filename == "oidc-github.jsonnet"
    assert github.source == (DATA / "kratos" / "oidc-github.jsonnet").read_text()
    assert config.templates["registration-after-0"].key == (
        "selfservice.flows.registration.after.hooks[0].config.body"
    )
    assert config.templates["bad-template"].uri.startswith("base64://")
    # restrict_host sees the absolute path of the file that was read.
    provider = config.raw["selfservice"]["methods"]["oidc"]["config"]["providers"][0]
    assert provider["mapper_url"] == "file://" + str(DATA / "kratos" / "oidc-github.jsonnet")
    assert config.pool.size == 2 and config.pool.require_sandbox is True
    assert config.max_body == 262144 and config.evaluate_enabled is True


def test_embedded_default() -> None:
    config = load_config()
    assert sorted(config.mappers) == ["github", "google"]
    assert sorted(config.templates) == ["registration-audit", "sms"]
    assert config.pool.size is None
    assert kratos_allow_list(config.raw).disabled_by == ""  # the host layer is on


def test_base64_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "m.jsonnet").write_text("{a: 1}")
    encoded = base64.b64encode(b"function(ctx) ctx").decode()
    text = (
        "selfservice: {methods: {oidc: {config: {providers: "
        "[{id: m, mapper_url: 'file://m.jsonnet'}]}}}}\n"
        f"courier: {{channels: [{{id: t, request_config: {{body: 'base64://{encoded}'}}}}]}}\n"
    )
    config = parse_config(text, tmp_path / "c.yaml")
    assert config.mappers["m"].source == "{a: 1}"
    assert config.templates["t"].source == "function(ctx) ctx"


def test_library_sets_are_read_named_and_their_paths_rewritten(tmp_path: Path) -> None:
    tree: dict[str, str | bytes] = {
        "libs/util.libsonnet": "{u: 1}",
        "libs/k8s/apps.libsonnet": "{a: 1}",
        "one.libsonnet": "{one: 1}",
        "m.jsonnet": "(import 'util.libsonnet').u",
    }
    write_tree(tmp_path, tree)
    text = (
        "libraries:\n"
        "  helpers:\n"
        "    sources:\n"
        "      - file://libs\n"
        "      - file://one.libsonnet\n"
        "      - {path: vendor, source: file://libs/k8s}\n"
        "      - {path: named/two.libsonnet, source: file://one.libsonnet}\n"
        "      - {path: b64.libsonnet, source: 'base64://e2I6IDJ9'}\n"
        "  open: {sources: [file://one.libsonnet], adhoc: true}\n"
        "selfservice: {methods: {oidc: {config: {providers: "
        "[{id: m, mapper_url: 'file://m.jsonnet', library: helpers}, "
        "{id: n, mapper_url: 'file://m.jsonnet'}]}}}}\n"
    )
    config = parse_config(text, tmp_path / "c.yaml", {})
    helpers = config.libraries["helpers"]
    assert dict(helpers.library.files) == {
        "util.libsonnet": b"{u: 1}",
        "k8s/apps.libsonnet": b"{a: 1}",
        "one.libsonnet": b"{one: 1}",
        "vendor/apps.libsonnet": b"{a: 1}",
        "named/two.libsonnet": b"{one: 1}",
        "b64.libsonnet": b"{b: 2}",
    }
    assert helpers.adhoc is False and config.libraries["open"].adhoc is True
    assert helpers.where == f"{tmp_path / 'c.yaml'}:2: libraries.helpers"
    assert config.mappers["m"].library is helpers and config.mappers["n"].library is None
    # restrict_host sees the absolute paths of what was read (base64 is no path).
    assert config.raw["libraries"]["helpers"]["sources"] == [
        f"file://{tmp_path / 'libs'}",
        f"file://{tmp_path / 'one.libsonnet'}",
        {"path": "vendor", "source": f"file://{tmp_path / 'libs' / 'k8s'}"},
        {"path": "named/two.libsonnet", "source": f"file://{tmp_path / 'one.libsonnet'}"},
        {"path": "b64.libsonnet", "source": "base64://e2I6IDJ9"},
    ]
    granted = kratos_allow_list(config.raw).ro_paths
    assert str(tmp_path / "libs") in granted and str(tmp_path / "one.libsonnet") in granted


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "mapping at the top level"),
        ("a: [", "c.yaml:1:5: not valid YAML"),
        ("pool: {size: 0}", "pool.size"),
        ("pool: {engine: rust}", "pool.engine"),
        ("pool: {timeout: -1}", "pool.timeout"),
        ("pool: {queue_limit: 1.5}", "pool.queue_limit"),
        ("pool: {workers: 2}", "c.yaml:1: pool.workers: unknown key"),
        ("pool: {require_sandbox: false}", "security.require_sandbox"),
        ("security: {require_sandbox: 1}", "security.require_sandbox: must be true or false"),
        ("serve: {auth: {bearer_token_file: missing.txt}}", "bearer_token_file: cannot read"),
        ("serve: {max_body_bytes: 0}", "serve.max_body_bytes: must be positive"),
        ("serve: {evaluate: {enabled: 'no'}}", "serve.evaluate.enabled"),
        ("serve: []", "serve: must be a mapping"),
        (
            "selfservice: {methods: {oidc: {config: {providers: [{mapper_url: 'file://x'}]}}}}",
            "providers[0].id",
        ),
        (
            "selfservice: {methods: {oidc: {config: {providers: [{id: a, mapper_url: 'file://missing.jsonnet'}]}}}}",
            "providers[0].mapper_url: cannot read",
        ),
        (
            "selfservice: {methods: {oidc: {config: {providers: [{id: a, mapper_url: 'https://x/m'}]}}}}",
            "file:// or base64://",
        ),
        ("courier: {channels: [{id: a, request_config: {body: 'base64://!!'}}]}", "bad base64"),
        ("libraries: {h: {sources: [file://missing]}}", "c.yaml:1: libraries.h.sources[0]: cannot"),
        (
            "libraries: {h: {sources: [{path: a, source: 'base64://!!'}]}}",
            "libraries.h.sources[0]: bad base64",
        ),
        (
            "libraries: {h: {sources: [{path: /abs, source: 'base64://e30='}]}}",
            "libraries.h.sources[0]: library file name '/abs' lies outside the library",
        ),
        (
            "libraries: {h: {sources: [{path: a//b, source: 'base64://e30='}]}}",
            "not in its clean form 'a/b'",
        ),
        (
            "libraries: {h: {sources: [{path: a, source: 'base64://e30='}, "
            "{path: a, source: 'base64://e30='}]}}",
            "libraries.h.sources[1]: serves 'a' again (first from libraries.h.sources[0])",
        ),
        ("libraries: {h: {sources: ['https://x/lib']}}", "file:// or base64:// URI, not"),
        (
            "libraries: {h: {sources: [{path: a, source: 'base64://e30='}]}}\n"
            "courier: {channels: [{id: a, request_config: {body: 'base64://MQ==', "
            "library: g}}]}",
            "c.yaml:2: courier.channels[0].request_config.library: no library set named 'g' "
            "(configured under 'libraries': h)",
        ),
        (
            "courier: {channels: [{id: a, request_config: {body: 'base64://MQ=='}}, "
            "{id: a, request_config: {body: 'base64://MQ=='}}]}",
            "used twice",
        ),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "c.yaml")
    assert message in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the config: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_serve_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(sys.modules):
        if name.startswith("jsonnet_worker.service"):
            monkeypatch.delitem(sys.modules, name)
        elif name == "starlette" or name.startswith("starlette."):
            monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.setitem(sys.modules, "starlette", None)
    assert main.main(["serve"]) == main.EXIT_USAGE
    error = capsys.readouterr().err
    assert "jsonnet-worker[serve]" in error and "starlette" in error


def test_every_pool_option_is_a_pool_key_with_its_default(tmp_path: Path) -> None:
    values = {
        "size": 3,
        "engine": "cpp",
        "timeout": 2.5,
        "memory_limit": 1 << 28,
        "max_output": 4096,
        "max_stack": 200,
        "max_trace": 0,
        "max_trace_lines": 50,
        "max_trace_bytes": 8192,
        "queue_limit": 7,
        "queue_timeout": 1.5,
        "spawn_timeout": 4.0,
        "max_request": 1 << 20,
        "spares": 2,
        "worker_user": "70000-70009",
        "max_calls_per_worker": 10,
        "cpu_budget": 60.0,
        "queue_limit_total": 20,
        "tenant_share": 0.5,
        "max_workers": 5,
        "interactive_budget": 0.2,
        "timeout_clock": "cpu",
        "task_limit": 64,
    }
    names = {option.name for option in dataclasses.fields(PoolConfig)}
    assert names - set(values) == {"require_sandbox"}  # from security.require_sandbox
    config = parse_config(json.dumps({"pool": values}), tmp_path / "c.yaml")
    expected = {**values, "worker_user": range(70000, 70010), "require_sandbox": True}
    assert dataclasses.asdict(config.pool) == expected
    assert parse_config("{}", tmp_path / "c.yaml").pool == PoolConfig()  # fails closed


def test_environment_overrides_keys(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    environ = {
        "JSONNET_WORKER_POOL_SIZE": "4",
        "JSONNET_WORKER_POOL_MAX_CALLS_PER_WORKER": "null",
        "JSONNET_WORKER_SECURITY_REQUIRE_SANDBOX": "false",
        "JSONNET_WORKER_SERVE_EVALUATE_ENABLED": "false",
        "JSONNET_WORKER_SERVE_AUTH_BEARER_TOKEN_FILE": str(token),
        "UNRELATED": "1",
    }
    config = parse_config("pool: {size: 2, max_calls_per_worker: 5}", tmp_path / "c", environ)
    assert config.pool.size == 4 and config.pool.max_calls_per_worker is None
    assert config.pool.require_sandbox is False and config.evaluate_enabled is False
    assert config.bearer_token == "s3cret"
    with pytest.raises(ConfigError, match="JSONNET_WORKER_POOL_SIZ names no config key"):
        parse_config("{}", tmp_path / "c", {"JSONNET_WORKER_POOL_SIZ": "4"})
    with pytest.raises(ConfigError, match=r"pool\.size"):
        parse_config("{}", tmp_path / "c", {"JSONNET_WORKER_POOL_SIZE": "four"})


def test_config_errors_are_library_errors() -> None:
    assert issubclass(ConfigError, jsonnet_worker.InvalidArgument)
    assert issubclass(ApiError, jsonnet_worker.Error)


def test_check_config_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = DATA / "service" / "config.yaml"
    assert main.main(["serve", "--check-config", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{good}: OK (6 mappers, 5 templates)\n" and err == ""
    (tmp_path / "lib.libsonnet").write_text("{}")
    with_sets = tmp_path / "sets.yaml"
    with_sets.write_text("libraries: {a: {sources: [file://lib.libsonnet]}}\n")
    assert main.main(["serve", "--check-config", str(with_sets)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{with_sets}: OK (0 mappers, 0 templates, 1 library sets of 1 files)\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  auth:\n    bearer_token_fil: token\n")
    assert main.main(["serve", "--check-config", str(bad)]) == main.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"jsonnet-worker serve: {bad}:3: serve.auth.bearer_token_fil: unknown key; "
        "known here: bearer_token_file, metrics_token_file\n"
    )
    bad.write_text("pool: {size: [1}\n")
    assert main.main(["serve", "--check-config", str(bad)]) == main.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"jsonnet-worker serve: {bad}:1:") and err.count("\n") == 1
