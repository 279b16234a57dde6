"""``jsonnet-worker test``: test suites for mappers and templates, run in the sandbox.

A suite is a YAML (or JSON) file::

    snippet: file://oidc-google.jsonnet   # relative to the suite file; or `source: |` inline
    cases:
      - name: verified e-mail becomes a trait
        ext_vars: {claims: {sub: "1", email: a@example.com, email_verified: true}}
        expect: {identity: {traits: {email: a@example.com}}}
      - name: claims without sub fail
        ext_vars: {claims: {}}
        expect_error: "claim sub not set"     # a substring of the JsonnetError message

``ext_vars``/``tla_vars`` are passed as ``WorkerPool.evaluate`` takes them (a str is a string,
other JSON is code), ``ext_codes``/``tla_codes`` as Jsonnet code. ``expect`` is compared with
the result exactly (JSON types kept apart: ``true`` is not ``1``); on a mismatch the case
prints a unified diff of the two, pretty-printed with sorted keys.

Goals: what Kratos users asked for (ory/kratos#391) without writing Python: one line per
case, an exit status CI understands, and a JUnit report.
"""

from __future__ import annotations

import difflib
import json
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .._errors import Error, JsonnetError
from .._pool.facade import WorkerPool

_CASE_KEYS = {"name", "ext_vars", "tla_vars", "ext_codes", "tla_codes", "expect", "expect_error"}
_SUITE_KEYS = {"snippet", "source", "cases", "name"}


class SuiteError(Error):
    """A suite file cannot be read or is not a valid suite (the message names the file)."""

    kind = "invalid_suite"
    http_status = 400


@dataclass(frozen=True)
class Case:
    name: str
    variables: Mapping[str, Mapping[str, Any]]
    expect: Any = None
    expect_error: str | None = None


@dataclass(frozen=True)
class Suite:
    path: Path
    name: str
    source: str
    filename: str
    cases: tuple[Case, ...]


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool
    seconds: float
    failure: str = ""  # the diff, or what was wrong
    error: bool = False  # an unexpected error rather than a wrong result


@dataclass
class SuiteReport:
    suite: Suite
    results: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)


# -- loading -------------------------------------------------------------------------------


def _parse(path: Path, text: str) -> Any:
    if path.suffix == ".json":
        return json.loads(text)
    try:
        import yaml
    except ImportError:
        raise SuiteError(
            f"{path}: YAML suites need PyYAML (the 'serve' extra); or write the suite as JSON"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None


def load_suite(path: str | Path) -> Suite:
    """Read and validate one suite; ``SuiteError`` naming the file and the key."""
    suite_path = Path(path)
    try:
        document = _parse(suite_path, suite_path.read_text(encoding="utf-8"))
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
    return Suite(suite_path, str(name), source, filename, parsed)


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
    snippet_path = path.parent / uri[len("file://") :]
    try:
        return snippet_path.read_text(encoding="utf-8"), snippet_path.name
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
    if ("expect" in case) == ("expect_error" in case):
        raise SuiteError(f"{where} ({name}): give exactly one of 'expect' and 'expect_error'")
    expect_error = case.get("expect_error")
    if expect_error is not None and not isinstance(expect_error, str):
        raise SuiteError(f"{where} ({name}): 'expect_error' must be a string")
    variables: dict[str, Mapping[str, Any]] = {}
    for key in ("ext_vars", "tla_vars", "ext_codes", "tla_codes"):
        value = case.get(key) or {}
        if not isinstance(value, dict):
            raise SuiteError(f"{where} ({name}): '{key}' must be a mapping")
        if key.endswith("_codes") and not all(isinstance(code, str) for code in value.values()):
            raise SuiteError(f"{where} ({name}): '{key}' values must be Jsonnet code (strings)")
        variables[key] = value
    return Case(name, variables, case.get("expect"), expect_error)


def load_suites(paths: Iterable[str]) -> tuple[list[Suite], list[str]]:
    """The suites that could be read, and a message for each that could not."""
    suites: list[Suite] = []
    problems: list[str] = []
    for path in paths:
        try:
            suites.append(load_suite(path))
        except SuiteError as exc:
            problems.append(f"ERROR: {exc}")
    return suites, problems


# -- running -------------------------------------------------------------------------------


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


def _pretty(value: Any) -> list[str]:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def diff(expected: Any, actual: Any) -> str:
    lines = difflib.unified_diff(
        _pretty(expected), _pretty(actual), "expected", "actual", lineterm=""
    )
    return "\n".join(lines)


def run_case(pool: WorkerPool, suite: Suite, case: Case) -> CaseResult:
    started = time.perf_counter()
    try:
        actual = pool.evaluate(
            suite.source,
            case.variables["ext_vars"],
            tla_vars=case.variables["tla_vars"],
            ext_codes=case.variables["ext_codes"],
            tla_codes=case.variables["tla_codes"],
            filename=suite.filename,
        )
    except JsonnetError as exc:
        seconds = time.perf_counter() - started
        if case.expect_error is not None and case.expect_error in exc.message:
            return CaseResult(case.name, True, seconds)
        wanted = (
            f"expected an error containing {case.expect_error!r}, got:\n"
            if case.expect_error is not None
            else "unexpected error:\n"
        )
        unexpected = case.expect_error is None
        detail = wanted + exc.message.rstrip()
        return CaseResult(case.name, False, seconds, detail, error=unexpected)
    except (Error, ValueError, TypeError) as exc:  # a variable the pool refused, a timeout
        seconds = time.perf_counter() - started
        detail = f"unexpected error: {type(exc).__name__}: {exc}"
        return CaseResult(case.name, False, seconds, detail, error=True)
    seconds = time.perf_counter() - started
    if case.expect_error is not None:
        got = "\n".join(_pretty(actual))
        return CaseResult(
            case.name, False, seconds, f"expected an error containing {case.expect_error!r}, "
            f"got a result:\n{got}"
        )  # fmt: skip
    if same_json(case.expect, actual):
        return CaseResult(case.name, True, seconds)
    return CaseResult(case.name, False, seconds, diff(case.expect, actual))


def run_suite(pool: WorkerPool, suite: Suite, out: TextIO) -> SuiteReport:
    """Run every case of ``suite``, printing one line per case (and a diff when it fails)."""
    report = SuiteReport(suite)
    for case in suite.cases:
        result = run_case(pool, suite, case)
        report.results.append(result)
        label = "PASS" if result.passed else ("ERROR" if result.error else "FAIL")
        print(f"{label} {suite.path}::{case.name}", file=out)
        for line in result.failure.splitlines():
            print(f"    {line}", file=out)
    return report


def summary(reports: Sequence[SuiteReport]) -> str:
    results = [result for report in reports for result in report.results]
    failed = sum(not result.passed for result in results)
    return f"{len(results) - failed} passed, {failed} failed, in {len(reports)} suite(s)"


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
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
