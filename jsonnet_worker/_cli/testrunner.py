"""``jsonnet-worker test``: test suites for mappers and templates, run in the sandbox.

A suite is a YAML (or JSON) file::

    snippet: file://oidc-google.jsonnet   # relative to the suite file; or `source: |` inline
    cases:
      - name: verified e-mail becomes a trait
        ext_vars: {claims: {sub: "1", email: a@example.com, email_verified: true}}
        expect: {identity: {traits: {email: a@example.com}}}
      - name: only the keys given are checked
        ext_vars: {claims: {sub: "1", email: a@example.com, email_verified: true}}
        expect_subset: {identity: {traits: {email: a@example.com}}}
      - name: claims without sub fail
        ext_vars: {claims: {}}
        expect_error: "claim sub not set"     # a substring of the JsonnetError message

A suite may name library directories, relative to the suite file, as ``jsonnet -J`` takes
them (the last is searched first)::

    jpath: [lib, vendor]

The snippet's imports are read from its own directory, then from the suite's ``jpath``, then
from the command's ``-J`` and ``JSONNET_PATH`` directories (relative to the current
directory), as go-jsonnet's importer finds them (``_imports.collect``), once per suite; the
cases' evaluations get them from memory. Names in messages (and ``std.thisFile``) are relative
to the suite's directory: ``snippet: file://mappers/x.jsonnet`` is ``mappers/x.jsonnet``.

``ext_vars``/``tla_vars`` are passed as ``WorkerPool.evaluate`` takes them (a str is a string,
other JSON is code), ``ext_codes``/``tla_codes`` as Jsonnet code. ``expect`` is compared with
the result exactly (JSON types kept apart: ``true`` is not ``1``); ``expect_subset`` checks
only the keys it gives, at every depth (``subset_of``: an array matches element by element and
has the same length). On a mismatch the case prints a unified diff, pretty-printed with sorted
keys (for ``expect_subset``, of the result cut down to the keys given).

``-k PATTERN`` runs the cases whose name contains PATTERN (case-insensitive, pytest's simple
form). ``--update`` writes the results of the cases that failed on their expectation back into
the suite (``update_suite``): only those ``expect``/``expect_subset`` values change, the rest
of the file is kept byte for byte (comments, layout, line endings).

Goals: what Kratos users asked for (ory/kratos#391) without writing Python: one line per
case, an exit status CI understands, a JUnit report, and the snapshot workflow (write an
empty ``expect``, run with ``--update``, review the diff in version control).

Plan: ``--update`` is a text-level rewrite with PyYAML's node positions, not a round trip
through a comment-keeping YAML library (no new dependency, and nothing outside the rewritten
values can move): each value's span is found with ``yaml.compose``, replaced by the new value
(one line in flow style where the old one was inline and the line fits in 100 columns,
block style at the old indentation otherwise), and the new text must parse to the old
document with exactly the new values before it replaces the file (a temporary file in the
same directory, then a rename).
Anything the rewrite cannot place for sure (an anchor, an alias, an ``expect`` that comes from
a merge key) is refused with its reason, and the file is left as it was.

A case's ``std.trace`` lines (the pool's ``on_trace``, bounded by the pool's
``max_trace_lines``/``max_trace_bytes``) are kept in ``CaseResult.trace`` when the case fails
or errors: printed under its failure and written as its JUnit ``system-err``. A passing
case's lines are dropped, as pytest drops a passing test's captured output.

Weak spots: comments inside a rewritten value are lost with the value; a JSON suite is
located through PyYAML too, so updating one needs PyYAML and no tab indentation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import json
import os
import stat
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .._errors import Error, JsonnetError
from .._library import Library
from .._pool.facade import WorkerPool

_VARIABLE_KEYS = ("ext_vars", "tla_vars", "ext_codes", "tla_codes")
_SUITE_KEYS = {"snippet", "source", "cases", "name", "jpath"}

# Exit statuses: every selected case passed (or was updated), one failed, a suite could not be
# read or updated, -k selected no case (as pytest's "no tests collected").
EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_SUITE_PROBLEM = 2
EXIT_NO_CASE_SELECTED = 5

# An inline value that would make its line longer than this is rewritten in block style.
_INLINE_WIDTH = 100


class SuiteError(Error):
    """A suite file cannot be read or is not a valid suite (the message names the file)."""

    kind = "invalid_suite"
    http_status = 400


class SuiteNotUpdated(SuiteError):
    """--update left a suite file as it was: why, naming the file (and the case)."""

    kind = "suite_not_updated"
    http_status = 500


class Expect(enum.Enum):
    """How a case checks its outcome; the value is the suite key that says so."""

    EXACT = "expect"
    SUBSET = "expect_subset"
    ERROR = "expect_error"


_CASE_KEYS = {"name", *_VARIABLE_KEYS, *(expect.value for expect in Expect)}


@dataclass(frozen=True)
class Case:
    name: str
    variables: Mapping[str, Mapping[str, Any]]
    expect: Expect
    expected: Any  # the value of the key ``expect`` names (for ERROR: a message substring)


@dataclass(frozen=True)
class Suite:
    path: Path
    name: str
    source: str
    filename: str
    cases: tuple[Case, ...]
    text: str = ""  # the file as read (line endings kept): what --update rewrites
    library: Library | None = None  # the files the snippet imports (names: see the module)


@dataclass(frozen=True)
class NewExpectation:
    value: Any  # JSON; None is null, not "nothing to write"


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    seconds: float
    failure: str = ""  # the diff, or what was wrong
    error: bool = False  # an unexpected error rather than a wrong result
    # What --update writes for the case's expectation key: set only when the case failed on
    # its expectation with a result (never for an error) and the new value is well defined.
    rewrite: NewExpectation | None = None
    # The case's std.trace lines, printed under a failure and written as JUnit system-err
    # (kept for a case that failed or erred only).
    trace: tuple[str, ...] = ()


@dataclass
class SuiteReport:
    suite: Suite
    results: list[CaseResult] = field(default_factory=list)
    deselected: int = 0  # cases -k left out
    updated: list[str] = field(default_factory=list)  # names of the cases --update rewrote

    @property
    def failed(self) -> list[CaseResult]:
        """The cases that failed and were not rewritten by --update."""
        return [r for r in self.results if not r.passed and r.name not in self.updated]

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Selection:
    """``-k``: a case runs when its name contains one of the patterns (case-insensitive);
    no pattern selects every case."""

    patterns: tuple[str, ...] = ()

    def selects(self, case: Case) -> bool:
        name = case.name.casefold()
        return not self.patterns or any(p.casefold() in name for p in self.patterns)


# -- loading -------------------------------------------------------------------------------


def _parse(path: Path, text: str) -> Any:
    if path.suffix == ".json":
        return json.loads(text)
    yaml = _yaml()
    if yaml is None:
        raise SuiteError(f"{path}: YAML suites need {_NO_YAML}; or write the suite as JSON")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None


_NO_YAML = "PyYAML (the 'serve' extra)"


def _yaml() -> Any:
    """The ``yaml`` module, or None where PyYAML is not installed."""
    try:
        import yaml
    except ImportError:
        return None
    return yaml


def _read(path: Path) -> str:
    # newline="": the text exactly as stored, so that --update keeps CRLF line endings
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def load_suite(path: str | Path, search: Sequence[str] = ()) -> Suite:
    """Read and validate one suite and the files its snippet imports (``search``: the
    command's ``-J``/``JSONNET_PATH`` list, relative to the current directory); ``SuiteError``
    naming the file and the key."""
    suite_path = Path(path)
    try:
        text = _read(suite_path)
        document = _parse(suite_path, text)
    except OSError as exc:
        raise SuiteError(f"{suite_path}: cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SuiteError(f"{suite_path}: not valid JSON/UTF-8: {exc}") from None
    if not isinstance(document, dict):
        raise SuiteError(f"{suite_path}: a suite is a mapping with 'snippet' and 'cases'")
    unknown = sorted(set(document) - _SUITE_KEYS)
    if unknown:
        raise SuiteError(f"{suite_path}: unknown keys {unknown}; known: {sorted(_SUITE_KEYS)}")
    source, filename = _snippet(suite_path, document)
    cases = document.get("cases")
    if not isinstance(cases, list) or not cases:
        raise SuiteError(f"{suite_path}: 'cases' must be a non-empty list")
    parsed = tuple(_case(suite_path, index, case) for index, case in enumerate(cases))
    names = [case.name for case in parsed]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SuiteError(f"{suite_path}: case names used twice: {duplicates}")
    name = document.get("name", suite_path.stem)
    library = _suite_library(suite_path, document, source, filename, search)
    return Suite(suite_path, str(name), source, filename, parsed, text, library)


def _suite_library(
    path: Path, document: Mapping[str, Any], source: str, filename: str, search: Sequence[str]
) -> Library:
    """The files the suite's snippet imports: names relative to the suite's directory, the
    command's directories first, then the suite's ``jpath`` (the last searched first)."""
    from .._imports import collect

    jpath = document.get("jpath", [])
    if not isinstance(jpath, list) or not all(isinstance(d, str) and d for d in jpath):
        raise SuiteError(f"{path}: 'jpath' must be a list of directories (non-empty strings)")
    top = os.path.abspath(path.parent)
    given = [d if os.path.isabs(d) else os.path.relpath(os.path.abspath(d), top) for d in search]
    try:
        return collect(filename, source, (*given, *jpath), root=top)
    except Error as exc:  # InputTooLarge
        raise SuiteError(f"{path}: the snippet's imports: {exc}") from None


def _snippet(path: Path, document: Mapping[str, Any]) -> tuple[str, str]:
    if ("snippet" in document) == ("source" in document):
        raise SuiteError(f"{path}: give exactly one of 'snippet: file://...' and 'source'")
    if "source" in document:
        if not isinstance(document["source"], str):
            raise SuiteError(f"{path}: 'source' must be a string")
        return document["source"], f"{path.stem}.jsonnet"
    uri = document["snippet"]
    if not isinstance(uri, str) or not uri.startswith("file://"):
        raise SuiteError(f"{path}: 'snippet' must be a file:// URI, relative to the suite")
    filename = uri[len("file://") :]  # as written: relative to the suite, or absolute
    snippet_path = path.parent / filename
    try:
        return snippet_path.read_text(encoding="utf-8"), filename
    except OSError as exc:
        raise SuiteError(f"{path}: snippet {snippet_path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SuiteError(f"{path}: snippet {snippet_path} is not UTF-8") from None


def _case(path: Path, index: int, case: Any) -> Case:
    where = f"{path}: cases[{index}]"
    if not isinstance(case, dict):
        raise SuiteError(f"{where} must be a mapping")
    unknown = sorted(set(case) - _CASE_KEYS)
    if unknown:
        raise SuiteError(f"{where}: unknown keys {unknown}; known: {sorted(_CASE_KEYS)}")
    name = case.get("name")
    if not isinstance(name, str) or not name:
        raise SuiteError(f"{where}: 'name' must be a non-empty string")
    given = [expect for expect in Expect if expect.value in case]
    if len(given) != 1:
        keys = " and ".join(f"'{expect.value}'" for expect in given) or "none"
        raise SuiteError(
            f"{where} ({name}): give exactly one of 'expect', 'expect_subset' and "
            f"'expect_error' (given: {keys})"
        )
    (expect,) = given
    expected = case[expect.value]
    if expect is Expect.ERROR and not isinstance(expected, str):
        raise SuiteError(f"{where} ({name}): 'expect_error' must be a string")
    variables: dict[str, Mapping[str, Any]] = {}
    for key in _VARIABLE_KEYS:
        value = case.get(key) or {}
        if not isinstance(value, dict):
            raise SuiteError(f"{where} ({name}): '{key}' must be a mapping")
        if key.endswith("_codes") and not all(isinstance(code, str) for code in value.values()):
            raise SuiteError(f"{where} ({name}): '{key}' values must be Jsonnet code (strings)")
        variables[key] = value
    return Case(name, variables, expect, expected)


def load_suites(paths: Iterable[str], search: Sequence[str] = ()) -> tuple[list[Suite], list[str]]:
    """The suites that could be read, and a message for each that could not."""
    suites: list[Suite] = []
    problems: list[str] = []
    for path in paths:
        try:
            suites.append(load_suite(path, search))
        except SuiteError as exc:
            problems.append(f"ERROR: {exc}")
    return suites, problems


# -- comparing -----------------------------------------------------------------------------


def same_json(left: Any, right: Any) -> bool:
    """Equal as JSON values: ``true`` is not ``1``, ``1`` equals ``1.0``."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_json(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    return type(left) is type(right) and left == right


@dataclass(frozen=True)
class Projection:
    """``actual`` cut down to the shape of an ``expect_subset`` value."""

    value: Any
    missing: tuple[str, ...]  # paths of keys the subset gives and the result lacks


def subset_of(subset: Any, actual: Any, path: str = "") -> Projection:
    """The rule of ``expect_subset``: where both are objects, only the subset's keys count
    (each must be present, and match by this rule); where both are arrays of one length,
    element by element by this rule; anywhere else the whole value, as ``same_json``. The
    case passes when ``same_json(subset, projection.value)``; the projection is also what
    the diff shows and what --update writes (the subset's keys, in its order)."""
    if isinstance(subset, dict) and isinstance(actual, dict):
        kept: dict[str, Any] = {}
        missing: list[str] = []
        for key, wanted in subset.items():
            key_path = f"{path}.{key}" if path else key
            if key not in actual:
                missing.append(key_path)
                continue
            inner = subset_of(wanted, actual[key], key_path)
            kept[key] = inner.value
            missing.extend(inner.missing)
        return Projection(kept, tuple(missing))
    if isinstance(subset, list) and isinstance(actual, list) and len(subset) == len(actual):
        pairs = enumerate(zip(subset, actual, strict=True))
        items = [subset_of(wanted, got, f"{path}[{i}]") for i, (wanted, got) in pairs]
        missing_in_items = tuple(key for item in items for key in item.missing)
        return Projection([item.value for item in items], missing_in_items)
    return Projection(actual, ())


def _pretty(value: Any) -> list[str]:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def diff(expected: Any, actual: Any) -> str:
    lines = difflib.unified_diff(
        _pretty(expected), _pretty(actual), "expected", "actual", lineterm=""
    )
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------


def run_case(pool: WorkerPool, suite: Suite, case: Case) -> CaseResult:
    """The case's result, with its ``std.trace`` lines when it did not pass."""
    trace: list[str] = []
    result = _run_case(pool, suite, case, trace.append)
    if result.passed or not trace:
        return result
    return dataclasses.replace(result, trace=tuple(trace))


def _run_case(
    pool: WorkerPool, suite: Suite, case: Case, on_trace: Callable[[str], None]
) -> CaseResult:
    started = time.perf_counter()
    try:
        actual = pool.evaluate(
            suite.source,
            case.variables["ext_vars"],
            tla_vars=case.variables["tla_vars"],
            ext_codes=case.variables["ext_codes"],
            tla_codes=case.variables["tla_codes"],
            filename=suite.filename,
            on_trace=on_trace,
            library=suite.library,
        )
    except JsonnetError as exc:
        seconds = time.perf_counter() - started
        if case.expect is Expect.ERROR and case.expected in exc.message:
            return CaseResult(case.name, True, seconds)
        wanted = (
            f"expected an error containing {case.expected!r}, got:\n"
            if case.expect is Expect.ERROR
            else "unexpected error:\n"
        )
        unexpected = case.expect is not Expect.ERROR
        detail = wanted + exc.message.rstrip()
        return CaseResult(case.name, False, seconds, detail, error=unexpected)
    except (Error, ValueError, TypeError) as exc:  # a variable the pool refused, a timeout
        seconds = time.perf_counter() - started
        detail = f"unexpected error: {type(exc).__name__}: {exc}"
        return CaseResult(case.name, False, seconds, detail, error=True)
    return _check_result(case, actual, time.perf_counter() - started)


def _check_result(case: Case, actual: Any, seconds: float) -> CaseResult:
    if case.expect is Expect.ERROR:
        got = "\n".join(_pretty(actual))
        return CaseResult(
            case.name, False, seconds, f"expected an error containing {case.expected!r}, "
            f"got a result:\n{got}"
        )  # fmt: skip
    if case.expect is Expect.EXACT:
        if same_json(case.expected, actual):
            return CaseResult(case.name, True, seconds)
        failure = diff(case.expected, actual)
        return CaseResult(case.name, False, seconds, failure, rewrite=NewExpectation(actual))
    projection = subset_of(case.expected, actual)
    if same_json(case.expected, projection.value):
        return CaseResult(case.name, True, seconds)
    failure = diff(case.expected, projection.value)
    if projection.missing:
        # --update would have to drop these keys, and with them what the case checks
        failure += f"\nmissing keys: {', '.join(projection.missing)} (not updatable)"
        return CaseResult(case.name, False, seconds, failure)
    return CaseResult(case.name, False, seconds, failure, rewrite=NewExpectation(projection.value))


def case_lines(suite: Suite, result: CaseResult) -> list[str]:
    """What one case prints: its status line, then its failure and trace, indented."""
    label = "PASS" if result.passed else ("ERROR" if result.error else "FAIL")
    lines = [f"{label} {suite.path}::{result.name}"]
    lines += [f"    {line}" for line in result.failure.splitlines()]
    if result.trace:
        lines.append("    trace:")
        lines += [f"      {line}" for line in result.trace]
    return lines


def run_suite(
    pool: WorkerPool, suite: Suite, out: TextIO, selection: Selection | None = None
) -> SuiteReport:
    """Run the cases of ``suite`` that ``selection`` selects (all by default), printing one
    line per case (and a diff when it fails)."""
    selection = selection or Selection()
    report = SuiteReport(suite)
    for case in suite.cases:
        if not selection.selects(case):
            report.deselected += 1
            continue
        result = run_case(pool, suite, case)
        report.results.append(result)
        for line in case_lines(suite, result):
            print(line, file=out)
    return report


def summary(reports: Sequence[SuiteReport], selection: Selection | None = None) -> str:
    results = [result for report in reports for result in report.results]
    failed = sum(len(report.failed) for report in reports)
    updated = sum(len(report.updated) for report in reports)
    passed = sum(result.passed for result in results)
    parts = [f"{passed} passed", f"{failed} failed"]
    if updated:
        parts.append(f"{updated} updated")
    if selection is not None and selection.patterns:
        parts.append(f"{sum(report.deselected for report in reports)} deselected")
    line = f"{', '.join(parts)}, in {len(reports)} suite(s)"
    if selection is not None and selection.patterns and not results:
        patterns = " or ".join(repr(pattern) for pattern in selection.patterns)
        line += f": no case name contains {patterns}"
    return line


def exit_status(reports: Sequence[SuiteReport], suite_problems: bool) -> int:
    if suite_problems:
        return EXIT_SUITE_PROBLEM
    if reports and not any(report.results for report in reports):
        return EXIT_NO_CASE_SELECTED
    return EXIT_PASSED if all(report.passed for report in reports) else EXIT_FAILED


def write_junit(reports: Sequence[SuiteReport], path: str | Path) -> None:
    """A JUnit XML report (one ``testsuite`` per suite), as CI systems read it."""
    root = ElementTree.Element("testsuites", name="jsonnet-worker test")
    for report in reports:
        failures = sum(not r.passed and not r.error for r in report.results)
        errors = sum(r.error for r in report.results)
        element = ElementTree.SubElement(
            root,
            "testsuite",
            name=report.suite.name,
            file=str(report.suite.path),
            tests=str(len(report.results)),
            failures=str(failures),
            errors=str(errors),
            time=f"{sum(r.seconds for r in report.results):.6f}",
        )
        for result in report.results:
            case = ElementTree.SubElement(
                element,
                "testcase",
                classname=report.suite.name,
                name=result.name,
                time=f"{result.seconds:.6f}",
            )
            if not result.passed:
                tag = "error" if result.error else "failure"
                problem = ElementTree.SubElement(
                    case, tag, message=result.failure.splitlines()[0] if result.failure else ""
                )
                problem.text = result.failure
            if result.trace:
                ElementTree.SubElement(case, "system-err").text = "\n".join(result.trace)
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


# -- updating expectations -----------------------------------------------------------------


@dataclass(frozen=True)
class _Slot:
    """Where one case's expectation value stands in the suite text."""

    start: int  # the value's first character (or, for an empty value, just after the ':')
    end: int  # just after its last character (trailing blank lines and comments excluded)
    key_end: int  # just after the key's ':'
    line_start: int  # the start of the value's first line
    key_indent: int  # the column of the key
    block: bool  # the value is a block mapping or sequence (so it starts on a line of its own)
    in_flow: bool  # the case is written in flow style: only a flow value fits
    multiline: bool  # the value spans several lines


def update_suites(reports: Iterable[SuiteReport], out: TextIO, err: TextIO) -> list[str]:
    """``update_suite`` for each report; a message (also printed to ``err``) for each suite
    that could not be updated."""
    problems: list[str] = []
    for report in reports:
        try:
            update_suite(report, out)
        except SuiteError as exc:
            problems.append(f"ERROR: {exc}")
            print(problems[-1], file=err)
    return problems


def update_suite(report: SuiteReport, out: TextIO) -> None:
    """Write the new expectations of the cases in ``report`` that failed on their
    expectation with a result (``CaseResult.rewrite``) into the suite file, keeping the rest
    of the text as it is; print ``UPDATED`` per case and record them in ``report.updated``.
    ``SuiteNotUpdated`` (the file untouched) when the file changed since it was read, a value
    cannot be placed for sure, the new text would not parse to the old suite with just the
    new values, or the file cannot be written."""
    suite = report.suite
    rewrites = {r.name: r.rewrite for r in report.results if r.rewrite is not None}
    if not rewrites:
        return
    path = suite.path
    try:
        current = _read(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteNotUpdated(f"{path}: not updated: cannot read it again: {exc}") from None
    if current != suite.text:
        raise SuiteNotUpdated(f"{path}: not updated: the file changed while its cases ran")
    _replace_file(path, _rewritten(suite, {name: new.value for name, new in rewrites.items()}))
    for name in rewrites:
        report.updated.append(name)
        print(f"UPDATED {path}::{name}", file=out)


def _rewritten(suite: Suite, values: Mapping[str, Any]) -> str:
    """The suite's text with the named cases' expectations replaced by ``values``, checked
    to parse to the suite's document with those values and nothing else changed."""
    path = suite.path
    slots = _locate(suite, values.keys())
    document = _parse(path, suite.text)
    replacements: list[tuple[int, int, str]] = []
    for index, case in enumerate(suite.cases):
        if case.name in values:
            slot = slots[case.name]
            start, replacement = _render(path, suite.text, slot, values[case.name])
            replacements.append((start, slot.end, replacement))
            document["cases"][index][case.expect.value] = values[case.name]
    text = suite.text
    for start, end, replacement in sorted(replacements, reverse=True):  # the last first
        text = text[:start] + replacement + text[end:]
    try:
        reparsed = _parse(path, text)
    except (SuiteError, ValueError) as exc:
        raise SuiteNotUpdated(
            f"{path}: not updated: the rewritten text does not parse: {exc}"
        ) from None
    if not same_json(reparsed, document):
        raise SuiteNotUpdated(f"{path}: not updated: the rewrite would change more than the values")
    return text


def _locate(suite: Suite, names: Iterable[str]) -> dict[str, _Slot]:
    """The slot of each named case's expectation value, from PyYAML's node positions (JSON
    is located as the YAML it also is)."""
    path, text = suite.path, suite.text
    yaml = _yaml()
    if yaml is None:
        raise SuiteNotUpdated(f"{path}: not updated: --update needs {_NO_YAML}")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise SuiteNotUpdated(f"{path}: not updated: cannot locate the values: {exc}") from None
    case_nodes = _value_node(root, "cases").value
    indexes = {case.name: index for index, case in enumerate(suite.cases)}
    slots: dict[str, _Slot] = {}
    for name in names:
        case = suite.cases[indexes[name]]
        where = f"{path}: not updated: case {name!r}"
        case_node = case_nodes[indexes[name]]
        found = [(k, v) for k, v in case_node.value if k.value == case.expect.value]
        if not found:
            raise SuiteNotUpdated(f"{where}: its '{case.expect.value}' comes from a merge key")
        key, value = found[-1]  # as the loader, the last of repeated keys wins
        if value.start_mark.index < key.end_mark.index:
            raise SuiteNotUpdated(f"{where}: its '{case.expect.value}' is an alias")
        if text[value.start_mark.index : value.start_mark.index + 1] in ("&", "!"):
            raise SuiteNotUpdated(f"{where}: its '{case.expect.value}' has an anchor or a tag")
        start = value.start_mark.index
        end = max(start, len(text[: _end_of(value)].rstrip()))
        slots[name] = _Slot(
            start=start,
            end=end,
            key_end=text.index(":", key.end_mark.index) + 1,
            line_start=text.rfind("\n", 0, start) + 1,
            key_indent=key.start_mark.column,
            block=_is_block(value),
            in_flow=bool(case_node.flow_style),
            multiline=value.start_mark.line != value.end_mark.line,
        )
    return slots


def _value_node(mapping: Any, key: str) -> Any:
    return next(v for k, v in reversed(mapping.value) if k.value == key)


def _is_block(node: Any) -> bool:
    return isinstance(node.value, list) and not node.flow_style


def _end_of(node: Any) -> int:
    """The end of a node's own text: a block collection's end mark lies after the blank
    lines and comments that follow it, so it ends where its last item does."""
    if _is_block(node) and node.value:
        last = node.value[-1]
        return _end_of(last[1] if isinstance(last, tuple) else last)
    return int(node.end_mark.index)


def _render(path: Path, text: str, slot: _Slot, value: Any) -> tuple[int, str]:
    """Where the replacement starts (it ends at ``slot.end``) and its text."""
    newline = "\r\n" if "\r\n" in text else "\n"
    spaced = " " if slot.start == slot.key_end else ""  # `expect:` with an empty value
    if path.suffix == ".json":
        if not slot.multiline:
            return slot.start, spaced + json.dumps(value, ensure_ascii=False)
        indent = len(text[slot.line_start :]) - len(text[slot.line_start :].lstrip(" "))
        lines = json.dumps(value, indent=2, ensure_ascii=False).splitlines()
        return slot.start, (newline + " " * indent).join(lines)
    inline = _yaml_flow(value)
    nested = isinstance(value, dict | list) and bool(value)
    if slot.in_flow or not nested:
        if slot.block:  # a block value stands on a line of its own: keep it there
            return slot.start, inline
        return slot.start, spaced + inline
    if slot.block:
        column = slot.start - slot.line_start
        indent = column if column > slot.key_indent else slot.key_indent + 2
        return slot.line_start, _indented(_yaml_block(value), indent, newline)
    line_length = slot.start - text.rfind("\n", 0, slot.start) - 1 + len(spaced + inline)
    if line_length <= _INLINE_WIDTH:
        return slot.start, spaced + inline
    block = _indented(_yaml_block(value), slot.key_indent + 2, newline)
    return slot.key_end, newline + block


def _indented(block: str, indent: int, newline: str) -> str:
    return newline.join(" " * indent + line for line in block.splitlines())


@functools.cache
def _dumper() -> Any:
    import yaml

    class OneLineStrings(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML has no types
        """Strings on one line (``"a\\nb"``), so that a value fits where it is put."""

        def choose_scalar_style(self) -> str:
            style: str = super().choose_scalar_style()
            if self.analysis is not None and self.analysis.multiline:
                return '"'
            return style

    return OneLineStrings


def _yaml_dump(value: Any, flow: bool) -> str:
    import yaml

    dumped: str = yaml.dump(
        value,
        Dumper=_dumper(),
        default_flow_style=flow,
        width=sys.maxsize,  # never folded: lines break only between block items
        allow_unicode=True,
        sort_keys=False,
    )
    return dumped.removesuffix("...\n").rstrip("\n")


def _yaml_flow(value: Any) -> str:
    # dumped inside a list, so that scalars are quoted as a flow collection needs
    return _yaml_dump([value], flow=True)[1:-1]


def _yaml_block(value: Any) -> str:
    return _yaml_dump(value, flow=False)


def _replace_file(path: Path, text: str) -> None:
    """``path`` holds ``text`` or is unchanged: a temporary file in the same directory (a
    link's target's), fsynced, given the old file's mode, then renamed over it."""
    target = path.resolve()
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
        descriptor, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise SuiteNotUpdated(f"{path}: not updated: {exc}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise SuiteNotUpdated(f"{path}: not updated: {exc}") from None
