"""The service's configured library sets (issue 24, item 3): the real server, started with
a config whose ``libraries`` are a directory, a directory served in a folder, and a
``base64://`` file; its mappers and templates import from the set they name, ad-hoc
snippets only from a set marked ``adhoc: true``; a bad set stops the start with the file,
the line and the key; the host sandbox grants what the sets read and nothing beside it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_host_sandbox import EACCES, Host
from test_service import error_of

from jsonnet_worker.service._config import parse_config
from servicekit import (
    ServiceProcess,
    pinned_clients,
    running_service,
    samples,
    server_pids_and_dir,
    wait_for_log,
)

HELPERS = """{
  email(claims):: if std.objectHas(claims, 'email') then claims.email else null,
  verified(claims):: std.get(claims, 'email_verified', false),
}
"""
MAPPER = """local helpers = import 'claims.libsonnet';
local claims = std.extVar('claims');
{identity: {traits: {email: helpers.email(claims), verified: helpers.verified(claims)}}}
"""
# A mapper that names no set: the same import is refused.
PLAIN_MAPPER = "local helpers = import 'claims.libsonnet'; {identity: helpers.email({})}"
FOOTER = "function(name) 'Sent by %s. Do not reply.' % name\n"
BRAND = {"name": "Example Corp", "sender": "+15550000"}
TEMPLATE = """local footer = import 'partials/footer.libsonnet';
local brand = import 'brand.libsonnet';
function(ctx) {
  To: ctx.recipient,
  From: brand.sender,
  Body: 'Your code is %s. %s' % [ctx.template_data.code, footer(brand.name)],
  Legal: importstr 'partials/legal.txt',
}
"""
LEGAL = "Terms apply.\n"
SECRET = "a sibling of the library directory, named by nothing"


def encoded(text: str) -> str:
    return "base64://" + base64.b64encode(text.encode()).decode()


def build(folder: Path) -> Path:
    """The config and its files; every file:// is relative to the config's directory."""
    files = {
        "libs/oidc/claims.libsonnet": HELPERS,
        "libs/oidc/unused/deep.libsonnet": "{deep: true}",
        "libs/secret.txt": SECRET,
        "partials/footer.libsonnet": FOOTER,
        "partials/legal.txt": LEGAL,
        "mappers/github.jsonnet": MAPPER,
        "mappers/plain.jsonnet": PLAIN_MAPPER,
        "templates/sms.jsonnet": TEMPLATE,
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    config: dict[str, Any] = {
        "pool": {"size": 1, "spares": 0},
        "serve": {"max_request_timeout": 30},
        "libraries": {
            "oidc-helpers": {"sources": ["file://libs/oidc"]},
            "courier-partials": {
                "sources": [
                    {"path": "partials", "source": "file://partials"},
                    {"path": "brand.libsonnet", "source": encoded(json.dumps(BRAND))},
                ],
                "adhoc": True,
            },
        },
        "selfservice": {
            "methods": {
                "oidc": {
                    "config": {
                        "providers": [
                            {
                                "id": "github",
                                "mapper_url": "file://mappers/github.jsonnet",
                                "library": "oidc-helpers",
                            },
                            {"id": "plain", "mapper_url": "file://mappers/plain.jsonnet"},
                        ]
                    }
                }
            }
        },
        "courier": {
            "channels": [
                {
                    "id": "sms",
                    "request_config": {
                        "body": "file://templates/sms.jsonnet",
                        "library": "courier-partials",
                    },
                }
            ]
        },
    }
    path = folder / "service.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    folder = tmp_path_factory.mktemp("libraries")
    config = build(folder)
    # debug: the host sandbox's log lists the paths it grants
    with running_service(config, folder, "--log-level", "debug") as running:
        yield running


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base_url, timeout=30) as shared:
        yield shared


# -- configured snippets import the set they name -------------------------------------------


def test_a_mapper_imports_its_helper_library(client: httpx.Client) -> None:
    claims = {"sub": "1", "email": "dev@example.com", "email_verified": True}
    answer = client.post("/v1/mappers/github", json={"claims": claims})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"identity": {"traits": {"email": "dev@example.com", "verified": True}}}


def test_a_courier_template_imports_a_partial_and_a_base64_file(client: httpx.Client) -> None:
    ctx = {"recipient": "+15551234", "template_data": {"code": "042"}}
    answer = client.post("/v1/templates/sms", json={"ctx": ctx})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "To": "+15551234",
        "From": "+15550000",
        "Body": "Your code is 042. Sent by Example Corp. Do not reply.",
        "Legal": LEGAL,
    }


def test_a_snippet_that_names_no_set_imports_nothing(client: httpx.Client) -> None:
    message = error_of(client.post("/v1/mappers/plain", json={"claims": {}}), 422, "jsonnet_error")
    assert "import not available claims.libsonnet" in message


# -- ad-hoc snippets: only a set marked adhoc -----------------------------------------------


def test_adhoc_evaluate_may_name_a_set_marked_adhoc(client: httpx.Client) -> None:
    snippet = "(import 'brand.libsonnet').name + ': ' + importstr 'partials/legal.txt'"
    answer = client.post("/v1/evaluate", json={"snippet": snippet, "library": "courier-partials"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == f"Example Corp: {LEGAL}"


def test_adhoc_evaluate_is_refused_other_sets(client: httpx.Client) -> None:
    snippet = "(import 'claims.libsonnet').email({email: 'x'})"
    message = error_of(
        client.post("/v1/evaluate", json={"snippet": snippet, "library": "oidc-helpers"}),
        403,
        "library_disabled",
    )
    assert "libraries.oidc-helpers.adhoc" in message
    unknown = client.post("/v1/evaluate", json={"snippet": snippet, "library": "nope"})
    assert "'nope'" in error_of(unknown, 404, "unknown_library")
    error_of(client.post("/v1/evaluate", json={"snippet": "1", "library": 1}), 400, "bad_request")
    # Without one, every import is refused, as before.
    message = error_of(client.post("/v1/evaluate", json={"snippet": snippet}), 422, "jsonnet_error")
    assert "import not available claims.libsonnet" in message


def test_openapi_describes_the_library_field(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    evaluate = document["paths"]["/v1/evaluate"]["post"]
    schema = evaluate["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["library"]["type"] == "string"
    assert "library_disabled" in evaluate["responses"]["403"]["description"]
    assert "unknown_library" in evaluate["responses"]["404"]["description"]


def test_metrics_and_health_are_unaffected(client: httpx.Client) -> None:
    client.post("/v1/evaluate", json={"snippet": "1", "library": "oidc-helpers"})
    client.post("/v1/evaluate", json={"snippet": "1", "library": "missing"})
    answer = client.get("/metrics")
    assert answer.status_code == 200
    values = samples(answer.text)
    kinds = {
        dict(labels)["outcome"]
        for (name, labels), value in values.items()
        if name == "jsonnet_worker_evaluations_total" and dict(labels)["endpoint"] == "evaluate"
    }
    assert {"library_disabled", "unknown_library", "ok"} <= kinds
    # Neither the sets' names nor their files become labels or values.
    assert "oidc-helpers" not in answer.text and "claims.libsonnet" not in answer.text
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["libraries"] == {
        "courier-partials": {"files": 3, "bytes": health["libraries"]["courier-partials"]["bytes"]}
        | {"adhoc": True},
        "oidc-helpers": {"files": 2, "bytes": health["libraries"]["oidc-helpers"]["bytes"]}
        | {"adhoc": False},
    }


def test_every_server_process_reads_and_serves_the_sets(tmp_path: Path) -> None:
    """``serve --workers 2``: each server process loads the config (and its sets) itself,
    before its own host layer."""
    with running_service(build(tmp_path), tmp_path, "--workers", "2") as service:
        server_pids, _ = server_pids_and_dir(
            wait_for_log(service, "all 2 server processes are ready")
        )
        claims = {"email": "dev@example.com"}
        with pinned_clients(service.base_url, server_pids) as clients:
            for client in clients.values():
                answer = client.post("/v1/mappers/github", json={"claims": claims})
                assert answer.json()["identity"]["traits"]["email"] == "dev@example.com"


# -- the host sandbox: what the sets read is granted, and nothing beside it -----------------


def granted_paths(log: str) -> list[str]:
    found = re.search(r"Landlock: collected roPaths\. (\[.*\])", log)
    assert found, log
    paths: list[str] = json.loads(found.group(1))
    return paths


def test_the_real_service_grants_the_library_directories_read_only(
    service: ServiceProcess,
) -> None:
    base = Path(service.log_path).parent
    granted = granted_paths(service.log())
    assert str(base / "libs" / "oidc") in granted and str(base / "partials") in granted
    assert not any(path in (str(base), str(base / "libs")) for path in granted)
    assert service.health()["sandbox"]["host"]["applied"] is True


def test_the_host_sandbox_reads_the_sets_and_refuses_their_siblings(tmp_path: Path) -> None:
    """The service's config, its library paths relative to a config file in a folder of
    its own, becomes the host's allow-list as ``serve`` makes it (``config.raw``); the
    restricted host (tests/harness/sandboxed_host.py, working directory elsewhere) may
    read the sets' files and nothing beside them."""
    conf = tmp_path / "conf"
    conf.mkdir()
    loaded = parse_config(build(conf).read_text(), conf / "service.yaml", {})
    (tmp_path / "run" / "metrics").mkdir(parents=True)
    (tmp_path / "run" / "metrics").chmod(0o700)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "kratos.yml").write_text(yaml.safe_dump(dict(loaded.raw)))
    host = Host(tmp_path)
    try:
        for name in ("libs/oidc/claims.libsonnet", "libs/oidc/unused/deep.libsonnet"):
            answer = host.ask("read", str(conf / name))
            assert answer["ok"], (name, answer)
        assert host.ask("read", str(conf / "partials" / "legal.txt"))["ok"]
        for name in ("libs/secret.txt", "service.yaml"):
            answer = host.ask("read", str(conf / name))
            assert answer == {"ok": False, "errno": EACCES, "error": answer["error"]}, name
        assert host.ask("list", str(conf / "libs"))["errno"] == EACCES
    finally:
        host.close()


# -- refused at start, with the file, the line and the key ------------------------------------


def refused_start(tmp_path: Path, text: str, status: int = 2) -> str:
    """Start the real service on ``text``; assert it exits with ``status`` before listening;
    return its output."""
    config = tmp_path / "service.yaml"
    config.write_text(text)
    with pytest.raises(AssertionError, match=rf"exited \({status}\)") as caught:
        with running_service(config, tmp_path):
            pass
    return str(caught.value)


def test_a_missing_directory_is_refused_at_start(tmp_path: Path) -> None:
    text = "pool: {size: 1, spares: 0}\nlibraries:\n  helpers:\n    sources:\n      - file://nope\n"
    output = refused_start(tmp_path, text)
    assert f"{tmp_path}/service.yaml:5: libraries.helpers.sources[0]: cannot read" in output
    assert f"{tmp_path}/nope" in output


def test_a_file_over_the_bounds_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "huge.libsonnet").write_bytes(b" " * (16 * 1024 * 1024 + 1))
    text = "libraries:\n  helpers:\n    sources: [file://huge.libsonnet]\n"
    output = refused_start(tmp_path, text)
    assert f"{tmp_path}/service.yaml:3: libraries.helpers.sources[0]:" in output
    assert "over the limit of 16777216 bytes" in output


def test_a_set_the_pools_requests_cannot_carry_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "big.libsonnet").write_bytes(b" " * 100_000)
    text = (
        "pool: {size: 1, spares: 0, max_request: 131072}\n"
        "libraries:\n  helpers:\n    sources: [file://big.libsonnet]\n"
    )
    output = refused_start(tmp_path, text, status=3)
    assert f"{tmp_path}/service.yaml:3: libraries.helpers: the library set cannot be sent" in output
    assert "max_request=131072" in output


def test_an_unknown_set_name_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "m.jsonnet").write_text("{}")
    text = (
        "libraries:\n  helpers: {sources: [file://m.jsonnet]}\n"
        "selfservice:\n  methods:\n    oidc:\n      config:\n        providers:\n"
        "          - id: m\n            mapper_url: file://m.jsonnet\n"
        "            library: helper\n"
    )
    output = refused_start(tmp_path, text)
    assert (
        f"{tmp_path}/service.yaml:10: selfservice.methods.oidc.config.providers[0].library: "
        "no library set named 'helper' (configured under 'libraries': helpers)"
    ) in output
