"""check and format, end to end: the pool sends ``action`` and the worker acts on it (needs the
worker's check/fmt support, ENGINE's part of issue 15), on both call paths."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from jsonnet_worker import JsonnetError, WorkerPool


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(1, spares=0) as shared:
        yield shared


def test_check_accepts_valid_jsonnet_without_evaluating_it(pool: WorkerPool) -> None:
    pool.check("{a: 1, b: self.a + 1}")  # returns None; raises for invalid Jsonnet
    # Never evaluated: the error expression is valid Jsonnet, and so is the infinite loop.
    pool.check("error 'not evaluated'")
    pool.check("local f(n) = f(n + 1) tailstrict; f(0)", timeout=5)
    before = pool.stats().evaluations
    pool.check("{}")
    assert pool.stats().evaluations == before + 1  # counted as an outcome like any call


def test_check_reports_where_the_error_is(pool: WorkerPool) -> None:
    with pytest.raises(JsonnetError) as caught:
        pool.check("{a: 1,\n b: }", filename="mapper.jsonnet")
    assert "mapper.jsonnet:2:" in caught.value.message
    with pytest.raises(JsonnetError, match="Unknown variable"):
        pool.check("{a: nope}")
    assert pool.evaluate("{ok: true}") == {"ok": True}  # the worker is kept


def test_format_is_go_jsonnets_and_stable(pool: WorkerPool) -> None:
    formatted = pool.format("{a:1,  'b':[1,2]}")
    assert formatted == "{ a: 1, b: [1, 2] }\n"
    assert pool.format(formatted) == formatted
    with pytest.raises(JsonnetError):
        pool.format("{a: ")


def test_async_twins_and_tenants(pool: WorkerPool) -> None:
    async def main() -> None:
        await pool.acheck("{a: 1}", tenant="acme")
        assert await pool.aformat("{a:1}", tenant="acme") == "{ a: 1 }\n"
        with pytest.raises(JsonnetError):
            await pool.acheck("{a: }")

    asyncio.run(main())
