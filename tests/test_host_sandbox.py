"""restrict_host in a real host process: the config-derived allow-list, workers that keep
respawning under it, irrevocability, certificate renewal through symlinks, and $ref files.

The restricted host is tests/harness/sandboxed_host.py, started here in a temporary copy of
fixtures/host/ with real files and symlinks (a restriction cannot be undone, so never in the
test process). It answers one JSON command per line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jsonnet_worker import HostAllowList, SandboxConfigError, _host, _kratos, restrict_host
from jsonnet_worker._pool.idlegroup import IdleGroup
from jsonnet_worker._sandbox.landlock import probe

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "fixtures"
HOST = Path(__file__).parent / "harness" / "sandboxed_host.py"
EACCES = 13


def build_layout(base: Path) -> None:
    """The files the fixture config names, a certbot tree, and files it must not reach."""
    shutil.copy(FIXTURES / "host" / "kratos.yml", base / "kratos.yml")
    files = {
        "schemas/identity.schema.json": (FIXTURES / "host" / "identity.schema.json").read_text(),
        "schemas/name.schema.json": '{"type": "string"}',
        "schemas/address.schema.json": '{"type": "string"}',
        "mappers/oidc-google.jsonnet": (FIXTURES / "oidc-google.jsonnet").read_text(),
        "mappers/session-claims.jsonnet": "{claims: {sub: std.extVar('session').identity.id}}",
        "templates/webhook-body.jsonnet": "function(ctx) {identity: ctx.identity}",
        "templates/courier-sms.jsonnet": (FIXTURES / "courier-sms.jsonnet").read_text(),
        "jwks/session.jwks.json": '{"keys": []}',
        "courier-templates/verification/valid/email.body.gotmpl": "Hi {{ .To }}",
        "smtp/client.pem": "SMTP CERT",
        "smtp/client.key": "SMTP KEY",
        "extra/notes.txt": "listed through a directory in allowed_paths",
        "secret.txt": "an unlisted sibling of the config file",
        "tls/archive/auth/cert1.pem": "CERT 1",
        "tls/archive/auth/privkey1.pem": "KEY 1",
        "tls/archive/auth/cert2.pem": "CERT 2 (renewed)",
        "letsencrypt/archive/admin/fullchain1.pem": "ADMIN CERT 1",
        "letsencrypt/archive/admin/privkey1.pem": "ADMIN KEY 1",
        "letsencrypt/archive/admin/fullchain2.pem": "ADMIN CERT 2 (renewed)",
    }
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    for live, target in (
        ("tls/live/auth/cert.pem", "../../archive/auth/cert1.pem"),
        ("tls/live/auth/privkey.pem", "../../archive/auth/privkey1.pem"),
        ("letsencrypt/live/admin/fullchain.pem", "../../archive/admin/fullchain1.pem"),
        ("letsencrypt/live/admin/privkey.pem", "../../archive/admin/privkey1.pem"),
    ):
        (base / live).parent.mkdir(parents=True, exist_ok=True)
        (base / live).symlink_to(target)
    (base / "data").mkdir()
    (base / "tmp").mkdir()
    (base / "run" / "metrics").mkdir(parents=True)  # the private_dirs grant: metrics only
    (base / "run" / "metrics").chmod(0o700)
    (base / "run" / "sibling.txt").write_text("beside the private directory")


def renew(link: Path, new_target: str) -> None:
    """What certbot does: a new symlink beside the old one, renamed over it."""
    staging = link.with_name(link.name + ".new")
    staging.symlink_to(new_target)
    staging.replace(link)


SYSTEM_PYTHON = "/usr/bin/python3"
# The host under each kind of interpreter: the one running the tests (a pyenv build here),
# the distribution's own (Debian builds ``select`` and more into it), and a venv made from
# that one.
INTERPRETERS = ("this", "system", "system-venv")


def system_python_problem() -> str | None:
    """Why the distribution's interpreter cannot run this project's code here, or None."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON}"
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys, venv; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"{SYSTEM_PYTHON} has no venv module (apt-get install python3-venv)"
    if done.stdout.strip() != str(tuple(sys.version_info[:2])):
        # The engines' extension modules in this venv are built for this minor version.
        return f"{SYSTEM_PYTHON} is Python {done.stdout.strip()}, not {sys.version_info[:2]}"
    return None


def interpreter(kind: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(executable, PYTHONPATH) for one kind of interpreter. The system ones borrow this
    venv's installed packages (msgpack, the engines, PyYAML): the same files a pip install
    into them would give, without a network."""
    if kind == "this":
        return sys.executable, str(ROOT)
    problem = system_python_problem()
    if problem:
        pytest.skip(problem)
    borrowed = [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)]
    if kind == "system":
        return SYSTEM_PYTHON, os.pathsep.join([str(ROOT), *borrowed])
    venv = tmp_path_factory.mktemp("system-venv")
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (venv / "lib" / version / "site-packages" / "borrowed.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in borrowed)
    )
    return str(venv / "bin" / "python"), str(ROOT)


class Host:
    def __init__(self, base: Path, executable: str = sys.executable, path: str = "") -> None:
        env = {
            **os.environ,
            "TMPDIR": str(base / "tmp"),
            "HOST_PRIVATE_DIR": str(base / "run" / "metrics"),
            "PYTHONPATH": path or str(ROOT),
        }
        env.pop("SQLITE_TMPDIR", None)
        env.pop("VIRTUAL_ENV", None)
        self.base = base
        self.executable = executable
        self.process = subprocess.Popen(
            [executable, str(HOST), "kratos.yml"],
            cwd=base,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started = self._answer()

    def _answer(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.kill()
            assert self.process.stderr is not None
            raise AssertionError("the host died: " + self.process.stderr.read()[-3000:])
        return json.loads(line)

    def ask(self, op: str, arg: Any = None, **extra: Any) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, "arg": arg, **extra}) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module", params=INTERPRETERS)
def host(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Host]:
    executable, path = interpreter(request.param, tmp_path_factory)
    base = tmp_path_factory.mktemp("host")
    build_layout(base)
    running = Host(base, executable, path)
    yield running
    running.close()


def test_the_host_runs_the_interpreter_it_was_given(host: Host) -> None:
    """The parametrisation is real: each host runs its own interpreter, and the system one
    has ``select`` built in (the case that once granted all of /usr/lib)."""
    answer = host.ask("interpreter")
    assert answer["ok"], answer
    assert answer["value"]["executable"] == host.executable
    if host.executable.startswith("/usr/bin/") or "system-venv" in host.executable:
        assert answer["value"]["select_file"] is None, answer


def test_the_log_records_come_in_order_and_the_layer_is_active(host: Host) -> None:
    sandbox, records = host.started["sandbox"], host.started["records"]
    assert sandbox["status"]["enforced"] is True
    assert sandbox["skipped"] == []
    ro = [i for i, r in enumerate(records) if r.startswith("DEBUG Landlock: collected roPaths. [")]
    rw = [i for i, r in enumerate(records) if r.startswith("DEBUG Landlock: collected rwDirs. [")]
    summary = [i for i, r in enumerate(records) if r.startswith("INFO Landlock: granting ")]
    active = [
        i for i, r in enumerate(records) if r == "INFO Landlock filesystem sandbox is active."
    ]
    assert len(ro) == 1 and len(rw) == 1 and len(summary) == 1
    assert ro[0] < rw[0] < summary[0] < active[-1]
    assert f"{len(sandbox['rw_dirs'])} read-write directories" in records[summary[0]]
    assert json.loads(records[rw[0]].split(". ", 1)[1]) == sandbox["rw_dirs"]


def test_what_the_config_names_is_granted_and_only_that(host: Host) -> None:
    base = host.base
    sandbox = host.started["sandbox"]
    assert set(sandbox["rw_dirs"]) == {
        str(base / "data"),
        str(base / "tmp"),
        str(base / "run" / "metrics"),
    }
    assert not any(p.startswith("/etc/ssl") or p == "/etc" for p in sandbox["ro_paths"])
    assert not any(p in ("/usr", "/usr/lib", "/lib", "/proc", "/sys") for p in sandbox["ro_paths"])
    readable = [
        "kratos.yml",
        "tls/live/auth/cert.pem",
        "tls/live/auth/privkey.pem",
        "letsencrypt/live/admin/fullchain.pem",
        "smtp/client.pem",
        "smtp/client.key",
        "courier-templates/verification/valid/email.body.gotmpl",
        "mappers/oidc-google.jsonnet",
        "mappers/session-claims.jsonnet",
        "templates/webhook-body.jsonnet",
        "templates/courier-sms.jsonnet",
        "schemas/identity.schema.json",
        "jwks/session.jwks.json",
        "extra/notes.txt",
        "/etc/hosts",
        "/dev/null",
    ]
    for name in readable:
        answer = host.ask("read", str(base / name))
        assert answer["ok"], (name, answer)
    assert host.ask("write_in", str(base / "data"))["ok"]
    assert host.ask("write_in", str(base / "tmp"))["ok"]
    assert host.ask("sqlite", str(base / "data" / "kratos.sqlite")) == {"ok": True, "value": 1}


def test_what_the_config_does_not_name_is_refused(host: Host) -> None:
    base = host.base
    for path in (
        "/etc/passwd",
        "/etc/ssl/openssl.cnf",
        "/proc/self/status",
        str(Path.home() / ".bashrc"),
        str(base / "secret.txt"),
        str(base / "tls" / "archive" / "auth" / "cert2.pem"),
    ):
        if not Path(path).exists():
            continue
        answer = host.ask("read", path)
        assert answer == {"ok": False, "errno": EACCES, "error": answer["error"]}, path
    for directory in (str(base), str(base / "schemas")):
        answer = host.ask("write_in", directory)
        assert not answer["ok"] and answer["errno"] == EACCES


def test_a_private_dir_is_read_write_and_nothing_above_it_is(host: Host) -> None:
    """The service's multiprocess metrics directory: files are made, grown, read, listed
    and removed in it (and beneath it); its parent is neither readable nor writable."""
    metrics = host.base / "run" / "metrics"
    assert host.ask("write_in", str(metrics))["ok"]
    assert host.ask("list", str(metrics)) == {"ok": True, "value": 0}
    (metrics / "nested").mkdir()
    assert host.ask("write_in", str(metrics / "nested"))["ok"]
    for op, path in (
        ("write_in", metrics.parent),
        ("list", metrics.parent),
        ("read", metrics.parent / "sibling.txt"),
        ("write_in", host.base),
    ):
        answer = host.ask(op, str(path))
        assert not answer["ok"] and answer["errno"] == EACCES, (op, path, answer)


def test_a_private_dir_must_be_private_and_nothing_is_applied_otherwise(tmp_path: Path) -> None:
    """In a process of its own: a validation bug would otherwise restrict the test run."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    (tmp_path / "link").symlink_to(private)
    cases = {
        str(shared): "mode 0700",
        str(tmp_path / "link"): "no symlink",
        "relative/dir": "absolute",
        str(tmp_path / "missing"): "No such file",
    }
    done = run_python(
        "import jsonnet_worker\n"
        f"for path in {list(cases)!r}:\n"
        "    try:\n"
        "        jsonnet_worker.restrict_host({}, private_dirs=[path])\n"
        "    except jsonnet_worker.SandboxConfigError as exc:\n"
        "        print('refused:', exc)\n"
        "open('/etc/passwd').close()\n"
        "print('unrestricted')\n"
    )
    refusals = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == len(cases), done
    for line, message in zip(refusals, cases.values(), strict=True):
        assert message in line, (line, message)
    assert done.stdout.splitlines()[-1] == "unrestricted", done
    assert _host.private_dir(private) == str(private)


def test_a_schema_ref_is_refused_unless_listed_in_allowed_paths(host: Host) -> None:
    base = host.base
    assert host.ask("read", str(base / "schemas" / "name.schema.json"))["ok"]
    answer = host.ask("read", str(base / "schemas" / "address.schema.json"))
    assert not answer["ok"] and answer["errno"] == EACCES


def test_workers_keep_respawning_after_the_host_is_restricted(host: Host) -> None:
    assert host.ask("evaluate", "{a: 1 + 1}") == {"ok": True, "value": {"a": 2}}
    killed = host.ask("kill_a_worker")
    assert killed["ok"], killed
    assert killed["value"]["victim"] not in killed["value"]["pids"]
    assert killed["value"]["respawns"] >= 1
    both = host.ask("timeout_then_evaluate")
    assert both["slow"] == {"ok": False, "error": "EvaluationTimeout"}
    assert both["next"] == {"ok": True, "value": {"next": 2}}
    mapper = (FIXTURES / "oidc-google.jsonnet").read_text()
    claims = json.loads((FIXTURES / "claims-google.json").read_text())
    answer = host.ask("evaluate", mapper, ext_vars={"claims": claims})
    assert answer["ok"] and answer["value"]["identity"]["traits"]["subject"] == claims["sub"], (
        answer
    )
    assert host.ask("new_pool", "[1, 2]") == {"ok": True, "value": [1, 2]}


def test_a_long_calls_worker_is_demoted_under_the_host_layer(host: Host) -> None:
    """The layer refuses /proc, so the worker's threads cannot be listed (its process group
    gets nice 19, docs/SANDBOX.md), but the idle cpu cgroup, found before the layer, is
    granted: the worker is moved into it all the same. Where this host has none (not root,
    no cpu.idle), the pool said why at INFO when it was restricted."""
    long = host.ask("long_call")
    assert long["call"] == {"ok": False, "error": "EvaluationTimeout"}
    demoted = [line for line in long["records"] if "demotion fell short" in line]
    assert len(demoted) == 1 and "its process group to nice 19" in demoted[0], long
    if IdleGroup.find().directory and os.geteuid() == 0:
        assert "its process to the idle cpu cgroup" in demoted[0], demoted
        assert "idle cgroup" not in demoted[0].split(":", 2)[-1]  # nothing refused of it


def test_processes_and_the_supervisor_inherit_the_layer(host: Host) -> None:
    """Workers start from the supervisor thread: it must be inside the host's domain."""
    refused = host.ask("supervisor_reads", "/etc/passwd")
    assert not refused["ok"] and refused["errno"] == EACCES
    assert host.ask("supervisor_reads", str(host.base / "kratos.yml"))["ok"]
    child = host.ask("child_reads", "/etc/passwd")
    assert not child["ok"] and "PermissionError" in child["stderr"]


def test_the_restriction_is_irrevocable(host: Host) -> None:
    config = yaml.safe_load((host.base / "kratos.yml").read_text())
    config["security"]["landlock"] = {"disabled": True, "allowed_paths": ["/etc"]}
    again = host.ask("restrict_again", config)
    assert again["sandbox"]["restart_required"] is True
    assert again["sandbox"]["status"]["enforced"] is True
    assert any("restart is required" in record for record in again["records"])
    for path in ("/etc/passwd", str(host.base / "secret.txt")):
        assert host.ask("read", path)["errno"] == EACCES
    assert host.ask("evaluate", "{still: 'works'}")["ok"]


def test_certificate_renewal_leaf_grant_refused_directory_grant_survives(host: Host) -> None:
    base = host.base
    leaf = base / "tls" / "live" / "auth" / "cert.pem"
    in_granted_dir = base / "letsencrypt" / "live" / "admin" / "fullchain.pem"
    assert host.ask("read", str(leaf))["ok"]
    assert host.ask("read", str(in_granted_dir))["ok"]
    renew(leaf, "../../archive/auth/cert2.pem")
    renew(in_granted_dir, "../../archive/admin/fullchain2.pem")
    assert leaf.read_text() == "CERT 2 (renewed)"
    answer = host.ask("read", str(leaf))
    assert not answer["ok"] and answer["errno"] == EACCES
    assert host.ask("read", str(base / "tls" / "archive" / "auth" / "cert1.pem"))["ok"]
    assert host.ask("read", str(in_granted_dir)) == {
        "ok": True,
        "value": len("ADMIN CERT 2 (renewed)"),
    }


# -- the config walk, in this process (nothing is applied) ---------------------------------


def test_file_urls_are_found_anywhere_and_bodies_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {
        "a": {"b": [{"c": "file:///srv/mapper.jsonnet"}, "file://./rel.json#/defs"]},
        "d": "https://example.test/x",
        "e": "base64://e30=",
        "legacy_path": "/srv/legacy.pem",
    }
    monkeypatch.chdir(tmp_path)  # undone after the test: later tests run from the checkout
    assert _kratos.file_urls(config) == ["/srv/mapper.jsonnet", str(tmp_path / "rel.json")]


def test_sqlite_dsns_are_recognised() -> None:
    assert _kratos.sqlite_database("sqlite:///var/lib/kratos/db.sqlite?_fk=true") == (
        True,
        "/var/lib/kratos/db.sqlite",
    )
    assert _kratos.sqlite_database("memory") == (True, None)
    assert _kratos.sqlite_database("sqlite://file::memory:?cache=shared") == (True, None)
    assert _kratos.sqlite_database("postgres://kratos:secret@db:5432/kratos") == (False, None)


def test_a_kratos_config_becomes_a_generic_allow_list(tmp_path: Path) -> None:
    (tmp_path / "kratos.yml").write_text("{}")
    (tmp_path / "mapper.jsonnet").write_text("{}")
    (tmp_path / "data").mkdir()
    config = {
        "dsn": f"sqlite://{tmp_path}/data/db.sqlite",
        "serve": {"public": {"tls": {"cert": {"path": str(tmp_path / "gone.pem")}}}},
        "selfservice": {"mapper_url": f"file://{tmp_path}/mapper.jsonnet"},
        "security": {"landlock": {"disabled": True, "allowed_paths": [str(tmp_path / "data")]}},
    }
    allow = _kratos.kratos_allow_list(config, [tmp_path / "kratos.yml"])
    assert allow.ro_paths == (
        str(tmp_path / "data"),
        str(tmp_path / "kratos.yml"),
        str(tmp_path / "mapper.jsonnet"),
    )
    assert allow.rw_dirs[0] == str(tmp_path / "data")  # and SQLite's temp directory
    assert allow.skipped == (
        f"{tmp_path / 'gone.pem'}: does not exist (serve.public.tls.cert.path)",
    )
    assert allow.disabled_by == "security.landlock.disabled"


def test_a_host_allow_list_is_checked_when_made() -> None:
    assert HostAllowList(ro_paths=("rel",)).ro_paths == (os.path.abspath("rel"),)
    with pytest.raises(SandboxConfigError, match="ro_paths must be a sequence of paths"):
        HostAllowList(ro_paths="/etc")  # type: ignore[arg-type]
    with pytest.raises(SandboxConfigError, match="is not a path"):
        HostAllowList(rw_dirs=("",))
    with pytest.raises(SandboxConfigError, match="config_files goes with a Kratos config"):
        restrict_host(HostAllowList(), config_files=["/etc/kratos.yml"])


@pytest.mark.skipif(not probe().available, reason=f"kernel has no Landlock: {probe().state.value}")
def test_a_generic_allow_list_is_all_the_host_may_open(tmp_path: Path) -> None:
    """restrict_host without any configuration format: the listed file and what workers
    need, nothing else; the pool's workers still start."""
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("ok")
    done = run_python(
        "import jsonnet_worker\n"
        "pool = jsonnet_worker.WorkerPool(1, spares=0)\n"
        f"allow = jsonnet_worker.HostAllowList(ro_paths=({str(allowed)!r},))\n"
        "sandbox = jsonnet_worker.restrict_host(allow, pool=pool)\n"
        f"print(sandbox.enforced, open({str(allowed)!r}).read())\n"
        "try:\n"
        "    open('/etc/passwd').close()\n"
        "except PermissionError:\n"
        "    print('refused')\n"
        "print(pool.evaluate('1 + 1'))\n"
        "pool.close()\n"
    )
    assert done.stdout.splitlines() == ["True ok", "refused", "2"], done


def test_a_bad_landlock_section_is_a_typed_error_and_applies_nothing() -> None:
    with pytest.raises(SandboxConfigError, match="allowed_paths"):
        restrict_host({"security": {"landlock": {"allowed_paths": "/etc"}}})
    with pytest.raises(SandboxConfigError, match="disabled"):
        restrict_host({"security": {"landlock": {"disabled": "yes"}}})
    with open("/etc/passwd") as file:
        assert file.read(1)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_other_threads_make_it_refuse_and_apply_nothing() -> None:
    """A layer binds only the applying thread (before ABI 8): fail closed, do not half-apply."""
    done = run_python(
        "import threading, jsonnet_worker\n"
        "stop = threading.Event()\n"
        "threading.Thread(target=stop.wait, name='web-server').start()\n"
        "try:\n"
        "    jsonnet_worker.restrict_host({})\n"
        "except jsonnet_worker.HostSandboxError as exc:\n"
        "    print('refused:', exc)\n"
        "stop.set()\n"
        "open('/etc/passwd').close()\n"
        "print('unrestricted')\n"
    )
    assert "refused:" in done.stdout and "web-server" in done.stdout, done
    assert "unrestricted" in done.stdout


def test_disabled_opts_out_with_a_warning() -> None:
    done = run_python(
        "import logging, jsonnet_worker\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "s = jsonnet_worker.restrict_host({'security': {'landlock': {'disabled': True}}})\n"
        "open('/etc/passwd').close()\n"
        "print(s.enforced, s.disabled, s.reason)\n"
    )
    assert done.stdout.strip() == "False True disabled by security.landlock.disabled", done
    assert "WARNING Landlock filesystem sandbox is not active" in done.stderr
