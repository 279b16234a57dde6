"""A service that cannot start says why in one line (issue 23, item 5): a mapper that does
not check, or a pool option the host refuses, is ``start-up failed: <kind>: <what>``, not
the traceback uvicorn prints of the app's lifespan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servicekit import free_port

ROOT = os.geteuid() == 0


def serve(
    config: Path | None, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "jsonnet_worker", "serve", "--port", str(free_port())]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(environ or {})},
    )


def test_a_mapper_that_does_not_check_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonnet").write_text("{a: }\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        "selfservice:\n  methods:\n    oidc:\n      config:\n        providers:\n"
        "          - id: broken\n            mapper_url: file://bad.jsonnet\n"
    )
    done = serve(config)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    failed = [line for line in done.stderr.splitlines() if "start-up failed" in line]
    assert len(failed) == 1, done.stderr
    assert "StartupCheckFailed: mapper 'broken'" in failed[0]
    assert "does not check: bad.jsonnet:1:5" in failed[0]


@pytest.mark.skipif(not ROOT, reason="worker_user names a user only under a root parent")
def test_an_unknown_worker_user_is_one_line() -> None:
    done = serve(None, {"JSONNET_WORKER_POOL_WORKER_USER": "no-such-user-here"})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "start-up failed: InvalidArgument: worker_user 'no-such-user-here': no such user" in (
        done.stderr
    )
