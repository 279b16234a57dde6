"""Fuzzing against import escapes with a library set given to the call (issue 24).

A set is served from memory: a name resolves by go-jsonnet's rule to a file of the set, or is
refused, or is missing from it; never looked up on disk. Checked three ways from outside:
the secret marker (escapes.SecretFiles) appears in no result, error, log record or stats; the
set's decoys, filed under the secret's own names, come back where the rule says (so what a
name reached was the set's file); and strace, attached to the worker for the whole run, sees
no syscall of its file class (open, openat, stat, access, readlink...): not even a try that
the kernel would refuse. The watch sees such tries when they are made
(``test_the_watch_sees_a_worker_that_opens_files``), so its silence means something.

Then what a set itself can hold: cycles, a chain of 1,000 imports, directories 100 deep, a
library file that imports outside its set, sets at and over the size bounds (refused by the
host before any worker sees them); and, with the compromised-engine model (the harness worker
that runs Python: it reports the sets its worker holds), that the pool never gives one
tenant's set to another tenant's worker.

The C++ engine parses its standard library again for every imported file (~25-50 ms a file
here, as when it reads the same tree from disk), so a 1,000-import chain cannot end within any
reasonable deadline there: it ends in EvaluationTimeout, a typed error, and runs in the soak
tier only; the fast tier gives that engine a chain of 20 and a tree 20 deep.

Weak spots: the oracle for generated names is the rule itself (``_wire.imports.resolve``, the
code the worker runs), so a mistake in the rule shows only where go-jsonnet's own importer, run
on the set's tree alone, reads something else (and in tests/test_libraries.py); the strace
watch runs on one worker driven frame by frame (``RawWorker``), not on a pool's workers, whose
conversation is the same object.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import _gojsonnet
import pytest
from hypothesis import given
from hypothesis import strategies as st

import seams
from conftest import ENGINES, harness_command
from jsonnet_worker import (
    EvaluationTimeout,
    InputTooLarge,
    JsonnetError,
    Library,
    WorkerPool,
)
from jsonnet_worker._library import MAX_LIBRARY_BYTES, MAX_LIBRARY_FILES
from jsonnet_worker._pool.connection import MAX_HELD_LIBRARY_SETS
from jsonnet_worker._wire.imports import (
    IMPORT_REFUSED,
    NO_MATCH,
    Found,
    Missing,
    Refused,
    resolve,
)
from jsonnet_worker._worker.engines import MAX_HELD_LIBRARIES
from rawworker import ENGINE_APIS, RawWorker, api_worker

from .conftest import Tier
from .escapes import (
    IMPORT_FORMS,
    Attempt,
    SecretFiles,
    assert_nothing_leaked,
    attempts,
    expected_resolution,
    library_for,
    library_names,
    spell,
)
from .ledger import LEDGER

TIMEOUTS = {"go": 2.0, "cpp": 5.0}
# Literal styles that spell any name (a NUL as \u0000): the oracle knows what the engine reads.
# The worker's engine APIs (as tests/test_libraries.py): go-jsonnet's C API, its binding, C++.
WORKERS = [api for api in ENGINE_APIS if ENGINE_APIS[api][0] in ENGINES]
ORACLE_STYLES = ("single", "double", "unicode-escapes", "all-escaped")
KERNEL_REFUSALS = ("permission denied", "operation not permitted", "no such file")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SecretFiles:
    return SecretFiles(tmp_path_factory.mktemp("library-escape"))


@pytest.fixture(scope="module")
def library(files: SecretFiles) -> Library:
    return library_for(files)


def assert_clean(text: str, files: SecretFiles, what: str) -> None:
    assert files.marker not in text, f"secret leaked by {what}"


def assert_not_by_kernel(message: str, name: str, what: str) -> None:
    """The refusal came before any syscall: no kernel error in what the worker said (the
    name itself, quoted in the message, may hold anything)."""
    said = message.replace(name, "").lower()
    assert not any(text in said for text in KERNEL_REFUSALS), (what, message)


# -- watching a worker's file syscalls from outside --------------------------------------------


class FileSyscallWatch:
    """strace attached to a running worker (every thread, and those it starts) for the
    length of a ``with`` block; ``calls()``: the syscalls of strace's %file class it made."""

    def __init__(self, pid: int, log: Path) -> None:
        self.pid = pid
        self.log = log
        self.tracer: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> FileSyscallWatch:
        strace = shutil.which("strace")
        if strace is None:
            pytest.skip("strace is not installed: nothing watches the worker's syscalls")
        command = [strace, "-f", "-qq", "-e", "trace=%file", "-o", str(self.log)]
        self.tracer = subprocess.Popen(
            [*command, "-p", str(self.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10.0
        while not self._all_threads_traced():
            if self.tracer.poll() is not None:
                _, error = self.tracer.communicate()
                raise AssertionError(f"strace could not attach: {error.decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError("strace did not attach to every thread within 10 s")
            time.sleep(0.01)
        return self

    def _all_threads_traced(self) -> bool:
        assert self.tracer is not None
        tracers = set()
        for task in os.listdir(f"/proc/{self.pid}/task"):
            with open(f"/proc/{self.pid}/task/{task}/status") as status:
                for line in status:
                    if line.startswith("TracerPid:"):
                        tracers.add(int(line.split()[1]))
        return tracers == {self.tracer.pid}

    def __exit__(self, *exc: object) -> None:
        assert self.tracer is not None
        self.tracer.send_signal(signal.SIGTERM)  # strace detaches and exits
        self.tracer.communicate(timeout=10)

    def calls(self) -> list[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if not line.split(maxsplit=1)[-1].startswith(("+++", "---"))]


@pytest.fixture(scope="module", params=sorted(WORKERS))
def worker(request: pytest.FixtureRequest) -> Iterator[RawWorker]:
    with api_worker(request.param) as raw:
        yield raw


def test_the_watch_sees_a_worker_that_opens_files(tmp_path: Path) -> None:
    """The control: a worker without the import barrier tries to open what it is asked to
    (the kernel refuses), and the watch sees the try, so a silent watch means no try."""
    with RawWorker("go", command=harness_command("no-barrier")) as raw:
        with FileSyscallWatch(raw.process.pid, tmp_path / "strace.log") as watch:
            answer = raw.request("importstr '/etc/hostname'")
        assert answer["t"] == "error" and "permission denied" in answer["message"].lower()
    assert any("/etc/hostname" in call for call in watch.calls()), watch.calls()


# -- generated names against the rule ---------------------------------------------------------


def go_reads(top: Path, name: str, search: tuple[str, ...]) -> str | None:
    """What go-jsonnet's own importer reads for ``importstr name`` in a snippet at ``top``,
    the set's search paths as ``-J`` (None: it failed)."""
    cwd = os.getcwd()
    os.chdir(top)
    try:
        text = _gojsonnet.evaluate_snippet(
            "snippet.jsonnet",
            f"importstr {spell(name, 'double')}",
            jpathdir=[path or "." for path in search],
        )
    except RuntimeError:
        return None
    finally:
        os.chdir(cwd)
    value: str = json.loads(text)
    return value


def test_names_resolve_by_the_rule_and_nothing_is_opened(
    tier: Tier,
    worker: RawWorker,
    files: SecretFiles,
    library: Library,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Each generated name, spelt every way, served as the rule says: the set's file (the
    decoys included), the refusal, or go-jsonnet's "couldn't open import"; strace sees no file
    syscall meanwhile."""
    api = request.node.callspec.params["worker"]
    tried: list[int] = [0]
    # The set's tree alone on disk, for go-jsonnet's importer: names it resolves outside the
    # tree (which a set never serves) find nothing there.
    alone = tmp_path / "alone"
    for relative, content in library.files.items():
        (alone / relative).parent.mkdir(parents=True, exist_ok=True)
        (alone / relative).write_bytes(content)

    @tier.hypothesis()
    @given(library_names(files, library), st.sampled_from(ORACLE_STYLES))
    def import_by_name(name: str, style: str) -> None:
        tried[0] += 1
        what = f"importstr {style} {name[:80]!r} ({api})"
        answer = worker.request(f"importstr {spell(name, style)}", library=library)
        text = json.dumps(answer)
        assert_clean(text, files, what)
        where = expected_resolution(library, name)
        if isinstance(where, Found):
            assert answer["t"] == "result", (what, answer)
            served_text = json.loads(answer["json"])
            assert served_text == library.files[where.path].decode(), what
            if "\x00" not in name:  # go-jsonnet on disk reads the same file of the tree
                assert go_reads(alone, name, library.search) == served_text, what
            served = int(files.decoy in answer["json"])
        else:
            assert answer["t"] == "error" and answer["kind"] == "jsonnet", (what, answer)
            assert_not_by_kernel(answer["message"], name, what)
            expected = IMPORT_REFUSED if isinstance(where, Refused) else NO_MATCH
            if api == "cpp" and isinstance(where, Missing):
                expected = "couldn't open import"
            assert expected in answer["message"], (what, answer)
            served = 0
        LEDGER.count(
            "library-names",
            api,
            tried=1,
            served_from_set=int(isinstance(where, Found)),
            decoys_served=served,
            refused_by_barrier=int(isinstance(where, Refused)),
            missing_from_set=int(isinstance(where, Missing)),
            escapes=0,
        )

    with FileSyscallWatch(worker.process.pid, tmp_path / "strace.log") as watch:
        import_by_name()
        # The set's own files through every form, so the watch covered serving too.
        for form in IMPORT_FORMS:
            assert worker.request(f"{form} 'util.libsonnet'", library=library)["t"] == "result"
    assert watch.calls() == [], f"the worker made file syscalls: {watch.calls()[:20]}"
    assert not worker.process.exited()
    print(f"\nlibrary names ({tier.name}, {api}): {tried[0]} names, 0 files opened")


def test_nul_ends_a_name_before_the_barrier_sees_it(worker: RawWorker, library: Library) -> None:
    """What the oracle assumes, shown: every engine's C glue ends a name at its first NUL,
    so ``"util.libsonnet\\u0000<anything>"`` is served as util.libsonnet (a file of the set,
    by the rule) and ``"/etc/passwd\\u0000"`` is refused as /etc/passwd; a raw NUL in a
    snippet never reaches an engine."""
    served = worker.request(
        "importstr 'util.libsonnet\\u0000/../../../etc/passwd'", library=library
    )
    assert json.loads(served["json"]) == library.files["util.libsonnet"].decode()
    refused = worker.request("importstr '/etc/passwd\\u0000util.libsonnet'", library=library)
    assert IMPORT_REFUSED in refused["message"]
    raw = worker.request("importstr @'util.libsonnet\x00'", library=library)
    assert raw["t"] == "error" and "NUL" in raw["message"]


# -- the escape corpus, from a snippet and from inside a library file ------------------------


@pytest.fixture(scope="module", params=ENGINES)
def engine_pool(request: pytest.FixtureRequest) -> Iterator[WorkerPool]:
    with WorkerPool(2, engine=request.param, timeout=TIMEOUTS[request.param]) as pool:
        yield pool


def test_escape_corpus_with_a_library_from_a_snippet_or_a_library_file(
    tier: Tier,
    engine_pool: WorkerPool,
    files: SecretFiles,
    library: Library,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """test_import_escapes' corpus (every path shape, literal style and placement) with the
    set given to the call; where the attempt is a snippet, half the time it is moved into a
    library file (``evil/inner.libsonnet``) that the snippet imports: a library that imports
    outside its set."""
    pool = engine_pool
    caplog.set_level(logging.DEBUG)
    tried: list[int] = [0]

    @tier.hypothesis()
    @given(attempts(files), st.booleans())
    def attempt_escape(attempt: Attempt, in_library: bool) -> None:
        tried[0] += 1
        snippet, used = attempt.snippet, library
        in_library = in_library and not (attempt.ext_codes or attempt.tla_codes)
        if in_library:
            inner = {**library.files, "evil/inner.libsonnet": attempt.snippet.encode()}
            used = Library(inner, library.search, library.boundaries)
            snippet = "import 'evil/inner.libsonnet'"
        what = attempt.describe() + (" in a library file" if in_library else "")
        try:
            value = pool.evaluate(
                snippet, ext_codes=attempt.ext_codes, tla_codes=attempt.tla_codes, library=used
            )
        except JsonnetError as error:
            assert_clean(error.message, files, what)
            assert_clean(str(error), files, what)
            assert_not_by_kernel(error.message, attempt.path, what)
            outcome = (
                "refused_by_barrier"
                if IMPORT_REFUSED in error.message
                else "missing_from_set"
                if NO_MATCH in error.message
                else "other_error"  # a syntax error: a text block, a raw NUL
            )
        else:  # a name the set serves (a decoy, by the rule): never the secret
            assert_clean(json.dumps(value), files, what)
            outcome = "served_from_set"
        assert_clean(repr(pool.stats()), files, what)
        LEDGER.count(
            "library-escape",
            pool.engine,
            tried=1,
            in_library_file=int(in_library),
            escapes=0,
            **{outcome: 1},
        )
        assert pool.evaluate("std.extVar('n') * 2", {"n": tried[0]}) == tried[0] * 2

    attempt_escape()
    assert_nothing_leaked(pool, caplog.records, files.marker)
    print(f"\nlibrary escapes ({tier.name}, {pool.engine}): {tried[0]} attempts, 0 escapes")


# Sources of a library file at deep/er/inner.libsonnet; the set lies on disk at
# <root>/library, so "../../../sécret dir ü/secret.jsonnet" is the secret's real relative path.
ESCAPING_LIBRARY_FILES = [
    "importstr '/etc/passwd'",
    "importstr '../../../../../../../../etc/passwd'",
    "import '../../../sécret dir ü/secret.jsonnet'",
    "importstr '../../../link-to-secret'",
    "importbin '/proc/self/environ'",
    "importstr '/dev/stdin'",
    "importstr '" + "../" * 64 + "etc/hostname'",
]


@pytest.mark.parametrize("source", ESCAPING_LIBRARY_FILES)
def test_a_library_file_that_imports_outside_its_set_is_refused(
    engine_pool: WorkerPool, files: SecretFiles, library: Library, source: str
) -> None:
    inner = {**library.files, "deep/er/inner.libsonnet": source.encode()}
    used = Library(inner, library.search, library.boundaries)
    with pytest.raises(JsonnetError, match=IMPORT_REFUSED) as caught:
        engine_pool.evaluate("(import 'deep/er/inner.libsonnet')", library=used)
    assert_clean(caught.value.message, files, source)


def test_the_secrets_own_names_from_a_library_file_are_never_served(
    engine_pool: WorkerPool, files: SecretFiles, library: Library
) -> None:
    # Absolute names are refused; a name relative to the working directory may, through
    # the search path "vendor", land back inside the set's bounds ("vendor/../x" is "x"),
    # where it is missing rather than refused (which depends on how deep the working
    # directory lies): either way as the rule says, and never the secret.
    for name in files.direct_paths():
        inner = {**library.files, "inner.libsonnet": f"importstr {spell(name, 'double')}".encode()}
        used = Library(inner, library.search, library.boundaries)
        where = resolve(used.files, used.search, used.boundaries, "", name)
        assert not isinstance(where, Found), (name, where)
        with pytest.raises(JsonnetError) as caught:
            engine_pool.evaluate("import 'inner.libsonnet'", library=used)
        assert_clean(caught.value.message, files, name)
        expected = IMPORT_REFUSED if isinstance(where, Refused) else NO_MATCH
        assert expected in caught.value.message, (name, caught.value.message)


# -- what a set can hold: cycles, long chains, deep trees --------------------------------------


def chain(length: int) -> dict[str, str]:
    """f0 imports f1 ... imports f<length>: each adds one."""
    return {
        f"chain/f{i}.libsonnet": f"(import 'f{i + 1}.libsonnet') + 1" if i < length else "0"
        for i in range(length + 1)
    }


def deep_tree(depth: int) -> dict[str, str]:
    """x.libsonnet in each of ``depth`` nested directories imports the next one down; the
    deepest climbs back to the top with ``depth`` "..": depth plus the top's text."""
    tree = {
        "d/" * level + "x.libsonnet": (
            "local inner = import 'd/x.libsonnet'; { depth: 1 + inner.depth, top: inner.top }"
        )
        for level in range(depth)
    }
    tree["d/" * depth + "x.libsonnet"] = (
        "{ depth: 0, top: import '" + "../" * depth + "top.libsonnet' }"
    )
    tree["top.libsonnet"] = "'top'"
    return tree


CYCLES = {
    "a imports b imports a": {
        "a.libsonnet": "import 'b.libsonnet'",
        "b.libsonnet": "import 'a.libsonnet'",
    },
    "a imports itself": {"a.libsonnet": "import 'a.libsonnet'"},
    "a imports itself by another name": {
        "a.libsonnet": "import 'sub/../a.libsonnet'",
        "sub/keep.txt": "",
    },
    "a cycle through a search path": {
        "a.libsonnet": "import 'vendor/b.libsonnet'",
        "vendor/b.libsonnet": "import 'a.libsonnet'",  # beside b: missing; then the top
    },
    "objects that hold each other": {
        "a.libsonnet": "{ b: import 'b.libsonnet' }",
        "b.libsonnet": "{ a: import 'a.libsonnet' }",
    },
    "a three-file cycle with importstr": {
        "a.libsonnet": "import 'b.libsonnet'",
        "b.libsonnet": "std.length(importstr 'a.libsonnet') + (import 'c.libsonnet')",
        "c.libsonnet": "import 'a.libsonnet'",
    },
}


def go_file_importer(tree: dict[str, str], main: str, tmp_path: Path) -> tuple[str, str]:
    """go-jsonnet's own file importer, in this process, on the same tree written to disk
    (its top a search path, as a set's is): ("result"|"error", text). (The C++ engine's takes
    seconds on these trees: it parses its standard library again for every file.)"""
    for name, text in tree.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "main.jsonnet").write_text(main)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return "result", _gojsonnet.evaluate_file("main.jsonnet", jpathdir=["."])
    except RuntimeError as exc:
        return "error", str(exc)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("cycle", sorted(CYCLES))
def test_cyclic_imports_end_in_a_typed_error(
    engine_pool: WorkerPool, cycle: str, tmp_path: Path
) -> None:
    """Never a hang or a crash: go-jsonnet's and the C++ engine's stack limit ends the cycle,
    as when the engine reads the same files from disk."""
    tree = CYCLES[cycle]
    kind, text = go_file_importer(tree, "import 'a.libsonnet'", tmp_path)
    assert kind == "error" and "max stack frames exceeded" in text
    with pytest.raises(JsonnetError, match="max stack frames exceeded"):
        engine_pool.evaluate("import 'a.libsonnet'", library=Library.from_files(tree))
    stats = engine_pool.stats()
    assert stats.crashes == 0 and stats.timeouts == 0
    LEDGER.count("library-shapes", engine_pool.engine, cycles=1, typed_errors=1)


def shape_sizes(engine: str, tier: Tier) -> tuple[int, int]:
    """(chain length, tree depth) for the engine in this tier (see the module docstring)."""
    if engine == "cpp" and tier.name == "fast":
        return 20, 20
    return 1000, 100


def test_a_chain_of_imports_and_a_deep_tree(
    tier: Tier, engine_pool: WorkerPool, tmp_path: Path
) -> None:
    """1,000 files each importing the next (a stack frame each: past the default max_stack of
    500 a typed error, with room the sum), and x.libsonnet 100 directories deep, climbing back
    with 100 "..": the same values and errors as the engine's own importer on disk."""
    pool = engine_pool
    length, depth = shape_sizes(pool.engine, tier)
    long_chain = Library.from_files(chain(length))
    start = "import 'chain/f0.libsonnet'"
    room = 4 * length + 100
    if pool.engine == "go":
        kind, text = go_file_importer(chain(length), start, tmp_path / "chain")
        assert kind == "error" and "max stack frames exceeded" in text
    try:
        if length > 250:
            with pytest.raises(JsonnetError, match="max stack frames exceeded"):
                pool.evaluate(start, library=long_chain)
        assert pool.evaluate(start, library=long_chain, max_stack=room, timeout=60) == length
    except EvaluationTimeout:
        # The C++ engine parses its standard library for each file: see the module docstring.
        assert pool.engine == "cpp"
    tree = deep_tree(depth)
    value = pool.evaluate("import 'x.libsonnet'", library=Library.from_files(tree), timeout=60)
    assert value == {"depth": depth, "top": "top"}
    if pool.engine == "go":
        kind, text = go_file_importer(tree, "import 'x.libsonnet'", tmp_path / "tree")
        assert kind == "result" and json.loads(text) == value
    climbing_out = {**tree, "d/" * depth + "x.libsonnet": "import '" + "../" * (depth + 1) + "top'"}
    with pytest.raises(JsonnetError, match=IMPORT_REFUSED):
        pool.evaluate("import 'x.libsonnet'", library=Library.from_files(climbing_out), timeout=60)
    LEDGER.count("library-shapes", pool.engine, chain_files=length, tree_depth=depth)


# -- sets at and over the bounds ----------------------------------------------------------------


def test_a_set_at_the_bounds_is_served(engine_pool: WorkerPool) -> None:
    """MAX_LIBRARY_BYTES (names and contents) in one file, and MAX_LIBRARY_FILES files."""
    name = "big.txt"
    big = Library.from_files({name: "x" * (MAX_LIBRARY_BYTES - len(name))})
    assert big.size == MAX_LIBRARY_BYTES
    assert engine_pool.evaluate(f"std.length(importstr '{name}')", library=big, timeout=60) == (
        MAX_LIBRARY_BYTES - len(name)
    )
    many = Library.from_files({f"many/f{i}.libsonnet": str(i) for i in range(MAX_LIBRARY_FILES)})
    last = MAX_LIBRARY_FILES - 1
    assert engine_pool.evaluate(f"import 'many/f{last}.libsonnet'", library=many) == last


def test_a_set_over_the_bounds_is_refused_by_the_host() -> None:
    """One byte or one file over: InputTooLarge while the value is built, so no pool and no
    worker ever has it."""
    name = "big.txt"
    with pytest.raises(InputTooLarge):
        Library.from_files({name: "x" * (MAX_LIBRARY_BYTES - len(name) + 1)})
    with pytest.raises(InputTooLarge):
        Library.from_files({f"f{i}": "" for i in range(MAX_LIBRARY_FILES + 1)})


# -- a compromised worker's view: the sets it was sent --------------------------------------

# Run by the harness's compromised-engine model (a snippet is Python run in the worker, after
# its sandbox is up): every library set this worker process holds or still has in memory.
HELD_SETS = (
    "import gc\n"
    "objects = gc.get_objects()\n"
    "engine = next(o for o in objects if type(o).__name__ == 'Engine')\n"
    "result = sorted(set(engine.libraries)"
    " | {o.digest for o in objects if type(o).__name__ == 'LibrarySet'})\n"
)


@pytest.fixture
def compromised_pool() -> Iterator[WorkerPool]:
    origin = seams.re_exec(harness_command("python"))
    with seams.pool_of(origin, 1, spares=0, timeout=10, max_request=256 * 1024) as pool:
        yield pool


def test_a_tenants_set_never_reaches_another_tenants_worker(
    compromised_pool: WorkerPool,
) -> None:
    """One worker at a time (a pool of one), two tenants: each worker reports every set it
    was sent. Tenant a's set is seen by a's worker (so the probe sees sets), never by b's,
    nor by the worker after b's."""
    pool = compromised_pool
    mine = Library.from_files({"a.libsonnet": "{ tenant: 'a' }"})
    theirs = Library.from_files({"b.libsonnet": "{ tenant: 'b' }"})
    assert pool.evaluate(HELD_SETS, tenant="a", library=mine) == [mine.digest]
    assert pool.evaluate(HELD_SETS, tenant="a") == [mine.digest]  # a's worker keeps it
    assert pool.evaluate(HELD_SETS, tenant="b") == []
    assert pool.evaluate(HELD_SETS, tenant="b", library=theirs) == [theirs.digest]
    assert pool.evaluate(HELD_SETS) == []  # calls without a tenant: a domain of their own
    assert pool.evaluate(HELD_SETS, tenant="a") == []  # a new worker for a: nothing of b's
    LEDGER.count("library-tenants", "go", worker_changes=4, sets_crossed=0)


def test_a_set_over_max_request_never_reaches_a_worker(compromised_pool: WorkerPool) -> None:
    pool = compromised_pool
    big = Library.from_files({"big.txt": "x" * (256 * 1024)})
    assert pool.evaluate(HELD_SETS) == []
    with pytest.raises(InputTooLarge):
        pool.evaluate(HELD_SETS, library=big)
    assert pool.evaluate(HELD_SETS) == []


# -- a tenant that rotates its sets -------------------------------------------------------------


def test_a_worker_given_many_sets_still_serves_the_first(engine_pool: WorkerPool) -> None:
    """Found by the soak tier: the worker drops every set it holds once it holds
    ``MAX_HELD_LIBRARIES``; the pool must say so first (``replace``), or a call naming a set
    the pool believes held fails as "never received". Sets past that count, twice over."""
    sets = [Library.from_files({"n.libsonnet": str(i)}) for i in range(MAX_HELD_LIBRARIES + 6)]
    assert MAX_HELD_LIBRARY_SETS < MAX_HELD_LIBRARIES
    errors = engine_pool.stats().errors
    for _ in range(2):  # the second round names sets the worker was sent long ago
        for number, library in enumerate(sets):
            assert engine_pool.evaluate("import 'n.libsonnet'", library=library) == number
    assert engine_pool.stats().errors == errors  # none, and no worker retired
