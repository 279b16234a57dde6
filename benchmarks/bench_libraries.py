"""Imports from memory, timed: a mapper that imports a 1,000-line library against the same
mapper with the library pasted in, on a warm pool, and the first call of a new set.

    python -m benchmarks.bench_libraries [--quick] [--calls N]

Issue 24's target: once the set is held by the worker and its files parsed in the kept VM
(go-jsonnet's C API path, ``_worker/capi.py``), a call that imports the library costs within
10% of the same call with the library's text pasted into the snippet (p50 ratio <= 1.10). Both
contenders run on one warm pool, interleaved in rounds, so the ratio comes from one run.

The first call of a set pays what a warm call does not: its frame is sent to the worker, and
the worker parses the mapper and the library (a new set is a new VM cache key). Each round
makes a set no worker has seen (the library plus a comment naming the round) and times its
first call, its second (the first through the kept VM's import, which parses the mapper again
but not the library) and a warm one, on the same worker.

The library (``oidc_library``) is what an OIDC mapper's helpers look like: string munging,
claims lookups with defaults, email normalisation, display names, phone numbers, and tables
(locales, e-mail domains to tenants, groups to roles) that make up most of its 1,000 lines;
the tables are generated, with a fixed seed. ``python -m benchmarks.run`` includes this table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import _gojsonnet

from benchmarks import workloads
from benchmarks.bench_latency import percentile
from benchmarks.bench_latency import time_calls as samples
from jsonnet_worker import Library, WorkerPool
from jsonnet_worker._wire.messages import LibrarySet
from jsonnet_worker._worker import capi

LIBRARY_NAME = "oidc.libsonnet"
LIBRARY_LINES = 1000
TARGET_RATIO = 1.10
IMPORTED = "library imported"
PASTED = "library pasted in"

HELPERS = """\
// Helpers shared by a tenant's OIDC mappers (Kratos-style): strings, claims, e-mail,
// names, phone numbers, locales, tenants by e-mail domain, roles by group.
local strings = {
  trim(s):: std.stripChars(s, ' \\t\\n\\r'),
  lower(s):: std.asciiLower(s),
  upper(s):: std.asciiUpper(s),
  collapseSpaces(s)::
    std.join(' ', std.filter(function(part) part != '', std.split(s, ' '))),
  startsWith(s, prefix):: std.startsWith(s, prefix),
  endsWith(s, suffix):: std.endsWith(s, suffix),
  splitOnce(s, sep)::
    local parts = std.split(s, sep);
    [parts[0], std.join(sep, parts[1:])],
  before(s, sep):: self.splitOnce(s, sep)[0],
  after(s, sep):: self.splitOnce(s, sep)[1],
  padLeft(s, width, char=' ')::
    local missing = width - std.length(s);
    if missing > 0 then std.repeat(char, missing) + s else s,
  truncate(s, width, ellipsis='...')::
    if std.length(s) <= width then s
    else std.substr(s, 0, width - std.length(ellipsis)) + ellipsis,
  capitalise(s)::
    if s == '' then s
    else self.upper(std.substr(s, 0, 1)) + self.lower(std.substr(s, 1, std.length(s))),
  titleCase(s)::
    std.join(' ', [self.capitalise(word) for word in std.split(self.collapseSpaces(s), ' ')]),
  slug(s)::
    local allowed(c) = std.member('abcdefghijklmnopqrstuvwxyz0123456789', c);
    local chars = std.stringChars(self.lower(self.trim(s)));
    std.join('', [if allowed(c) then c else '-' for c in chars]),
  replaceAll(s, from, to):: std.strReplace(s, from, to),
  isBlank(s):: s == null || self.trim(s) == '',
  orDefault(s, default):: if self.isBlank(s) then default else s,
};

local claims = {
  // A dotted path into the claims, or the default where any step is missing or null.
  get(obj, path, default=null)::
    local step(value, key) =
      if value != null && std.isObject(value) && std.objectHas(value, key) then value[key]
      else null;
    local found = std.foldl(step, std.split(path, '.'), obj);
    if found == null then default else found,
  first(obj, paths, default=null)::
    local found = std.filter(function(v) v != null, [self.get(obj, p) for p in paths]);
    if std.length(found) == 0 then default else found[0],
  bool(obj, path, default=false)::
    local value = self.get(obj, path);
    if value == null then default
    else if std.isBoolean(value) then value
    else if std.isString(value) then std.member(['true', '1', 'yes'], strings.lower(value))
    else default,
  list(obj, path)::
    local value = self.get(obj, path);
    if value == null then []
    else if std.isArray(value) then value
    else if std.isString(value) then std.split(value, ',')
    else [value],
  has(obj, path):: self.get(obj, path) != null,
};

local email = {
  plusTagDomains:: ['gmail.com', 'googlemail.com', 'fastmail.com', 'outlook.com'],
  dotlessDomains:: ['gmail.com', 'googlemail.com'],
  localPart(address):: strings.before(strings.lower(strings.trim(address)), '@'),
  domain(address):: strings.after(strings.lower(strings.trim(address)), '@'),
  isValid(address)::
    local parts = std.split(strings.trim(address), '@');
    std.length(parts) == 2 && parts[0] != '' && std.length(std.split(parts[1], '.')) > 1,
  normalise(address)::
    local domain = self.domain(address);
    local canonical = if domain == 'googlemail.com' then 'gmail.com' else domain;
    local untagged =
      local name = self.localPart(address);
      if std.member(self.plusTagDomains, canonical) then strings.before(name, '+') else name;
    local dotless =
      if std.member(self.dotlessDomains, canonical) then strings.replaceAll(untagged, '.', '')
      else untagged;
    if self.isValid(address) then dotless + '@' + canonical else null,
};

local names = {
  split(full)::
    local words = std.split(strings.collapseSpaces(strings.trim(full)), ' ');
    local last = std.length(words) - 1;
    if last < 1 then { first: full, last: '' }
    else { first: std.join(' ', words[:last]), last: words[last] },
  of(c)::
    local full = claims.get(c, 'name', '');
    local parts = self.split(full);
    {
      first: strings.titleCase(claims.first(c, ['given_name', 'first_name'], parts.first)),
      last: strings.titleCase(claims.first(c, ['family_name', 'last_name'], parts.last)),
    },
  display(c)::
    local n = self.of(c);
    strings.truncate(strings.collapseSpaces(n.first + ' ' + n.last), 64),
  initials(c)::
    local n = self.of(c);
    std.join('', [strings.upper(std.substr(w, 0, 1)) for w in [n.first, n.last] if w != '']),
};

local phone = {
  digits(s):: std.join('', std.filter(function(c) std.member('0123456789', c), std.stringChars(s))),
  e164(countryCode, number)::
    local d = self.digits(number);
    local national = if strings.startsWith(d, '0') then std.substr(d, 1, std.length(d)) else d;
    if d == '' then null
    else if strings.startsWith(strings.trim(number), '+') then '+' + d
    else '+' + countryCode + national,
};

"""


def _tables(rng: random.Random, lines: int) -> list[str]:
    """Locale, tenant and role tables, enough rows for the library to be ``lines`` long."""
    languages = ["en", "de", "fr", "es", "it", "nl", "pt", "sv", "da", "fi", "nb", "pl", "cs"]
    regions = ["GB", "US", "DE", "AT", "CH", "FR", "BE", "ES", "IT", "NL", "PT", "SE", "CA"]
    plans = ["free", "team", "business", "enterprise"]
    words = ["north", "blue", "acme", "river", "stone", "bright", "green", "atlas", "delta"]
    locale_rows = [
        f"  '{language}-{region}': '{language}_{region}',"
        for language in languages
        for region in regions[: rng.randint(3, 8)]
    ]
    role_rows = [
        f"  '{team}-{level}': ['{team}:{level}'{extra}],"
        for team in [w + str(i) for i in range(12) for w in words[:4]]
        for level, extra in (
            ("read", ""),
            ("write", f", '{team}:read'"),
            ("admin", f", '{team}:read'"),
        )
    ]
    fixed = HELPERS.count("\n") + 40  # the helpers, the table headers and the closing object
    domain_count = max(10, lines - fixed - len(locale_rows) - len(role_rows))
    domain_rows = ["  'example.org': { tenant: 'example', plan: 'business', region: 'GB' },"]
    for index in range(domain_count):
        name = f"{rng.choice(words)}{rng.choice(words)}{index}"
        plan, region = rng.choice(plans), rng.choice(regions)
        domain_rows.append(
            f"  '{name}.example': {{ tenant: '{name}', plan: '{plan}', region: '{region}' }},"
        )
    return [
        "local localeTable = {",
        *locale_rows,
        "};",
        "",
        "local tenantTable = {",
        *domain_rows,
        "};",
        "",
        "local roleTable = {",
        *role_rows,
        "};",
        "",
    ]


EXPORTS = """\
{
  strings: strings,
  claims: claims,
  email: email,
  names: names,
  phone: phone,
  locale: {
    of(tag, default='en_GB')::
      local normal = strings.replaceAll(strings.trim(tag), '_', '-');
      if std.objectHas(localeTable, normal) then localeTable[normal]
      else if std.objectHas(localeTable, normal + '-' + strings.upper(normal)) then
        localeTable[normal + '-' + strings.upper(normal)]
      else default,
  },
  tenants: {
    of(address, default={ tenant: 'public', plan: 'free', region: 'US' })::
      local domain = email.domain(address);
      if std.objectHas(tenantTable, domain) then tenantTable[domain] else default,
  },
  roles: {
    fromGroups(groups)::
      std.set(std.flattenArrays([
        if std.objectHas(roleTable, strings.lower(group)) then roleTable[strings.lower(group)]
        else []
        for group in groups
      ])),
  },
}
"""


def oidc_library(lines: int = LIBRARY_LINES) -> str:
    """The library's source, ``lines`` lines long (generated tables with a fixed seed)."""
    text = HELPERS + "\n".join(_tables(random.Random(24), lines)) + "\n" + EXPORTS
    count = text.count("\n")
    return text + "\n" * max(0, lines - count)


MAPPER_BODY = """\
local claims = { email_verified: false } + std.extVar('claims');
local address = u.email.normalise(u.claims.get(claims, 'email', ''));
{
  identity: {
    traits: {
      [if claims.email_verified && address != null then 'email' else null]: address,
      name: u.names.of(claims),
      display_name: u.names.display(claims),
      [if 'website' in claims then 'website' else null]: claims.website,
      locale: u.locale.of(u.claims.get(claims, 'raw_claims.locale', 'en')),
      phone: u.phone.e164('44', u.claims.get(claims, 'phone_number', '')),
    },
    metadata_public: {
      provider: claims.iss,
      tenant: u.tenants.of(address).tenant,
      roles: u.roles.fromGroups(u.claims.list(claims, 'groups')),
    },
  },
}
"""
# The reference light mapper (../shared/bench) with one helper: the import's own cost is the
# largest share of a call here.
LIGHT_BODY = """\
local claims = { email_verified: false } + std.extVar('claims');
{
  identity: {
    traits: {
      [if 'email' in claims && claims.email_verified then 'email' else null]: claims.email,
      name: { first: u.strings.trim(claims.given_name), last: claims.family_name },
      [if 'website' in claims then 'website' else null]: claims.website,
    },
    metadata_public: { provider: claims.iss },
  },
}
"""
MAPPERS = {"OIDC mapper, 8 helpers": MAPPER_BODY, "light mapper, 1 helper": LIGHT_BODY}


def snippet(body: str, library: str | None) -> str:
    """The mapper importing the library (``library`` None), or with its text pasted in."""
    if library is None:
        return f"local u = import '{LIBRARY_NAME}';\n" + body
    return f"local u = (\n{library});\n" + body


def claims_code() -> str:
    """The reference light workload's claims, with groups and a phone number for the
    helpers to work on."""
    claims = json.loads(workloads.light().ext_codes["claims"])
    claims |= {"groups": ["north0-write", "BLUE1-admin", "unknown"], "phone_number": "07700 900123"}
    return json.dumps(claims)


def interleaved(
    call: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, list[float]]:
    """Per-call seconds of each contender after a warm-up, interleaved in ``rounds`` so that
    the load of a shared machine hits them alike."""
    for name in call:
        samples(call[name], max(5, calls // 20))
    timings: dict[str, list[float]] = {name: [] for name in call}
    for _ in range(rounds):
        for name in call:
            timings[name] += samples(call[name], max(1, calls // rounds))
    return timings


def warm(pool: WorkerPool, library: Library, calls: int, rounds: int = 5) -> dict[str, list[float]]:
    """Per-call timings of each mapper, imported and pasted, on a warm pool, interleaved in
    rounds; keyed "mapper|imported" and "mapper|pasted"."""
    source = library.files[LIBRARY_NAME].decode()
    codes = {"claims": claims_code()}
    call: dict[str, Callable[[], object]] = {}
    for name, body in MAPPERS.items():
        imported, pasted = snippet(body, None), snippet(body, source)
        call[f"{name}|{IMPORTED}"] = partial(
            pool.evaluate_json, imported, ext_codes=codes, library=library
        )
        call[f"{name}|{PASTED}"] = partial(pool.evaluate_json, pasted, ext_codes=codes)
        if call[f"{name}|{IMPORTED}"]() != call[f"{name}|{PASTED}"]():
            raise AssertionError(f"{name}: the imported and the pasted mapper differ")
    return interleaved(call, calls, rounds)


def engine_only(
    library: Library, calls: int, rounds: int = 5
) -> tuple[dict[str, list[float]], str]:
    """The OIDC mapper imported and pasted through the workers' C API path in this process
    (``_worker.capi``: no IPC, no sandbox), interleaved in rounds, and what its cache did:
    whether the parsed library stays in the kept VM, apart from what the wire costs."""
    engine = capi.CapiEngine(capi.bind(str(_gojsonnet.__file__)))
    files = dict(library.files)
    held = LibrarySet(library.digest, library.search, library.boundaries, files)
    source = files[LIBRARY_NAME].decode()
    codes = {"claims": claims_code()}

    def mapper(text: str, served: LibrarySet | None) -> Callable[[], object]:
        return partial(
            engine.evaluate_snippet,
            "mapper.jsonnet",
            text,
            ext_vars={},
            ext_codes=codes,
            tla_vars={},
            tla_codes={},
            max_stack=500,
            max_trace=20,
            library=served,
        )

    call = {
        IMPORTED: mapper(snippet(MAPPER_BODY, None), held),
        PASTED: mapper(snippet(MAPPER_BODY, source), None),
    }
    timings = interleaved(call, calls, rounds)
    stats = engine.stats
    cache = (
        f"the C API cache over the engine-only run: {stats.hits} hits, {stats.misses} misses, "
        f"{stats.uncached} too big to keep, {stats.evictions} evictions"
    )
    return timings, cache


def first_calls(pool: WorkerPool, source: str, sets: int) -> dict[str, list[float]]:
    """For ``sets`` new library sets: the OIDC mapper's first call, its second and a warm
    one."""
    codes = {"claims": claims_code()}
    mapper = snippet(MAPPER_BODY, None)
    timings: dict[str, list[float]] = {"first call": [], "second call": [], "warm call": []}
    for index in range(sets):
        library = Library.from_files({LIBRARY_NAME: f"{source}// set {index}\n"})
        for name in timings:
            timings[name] += samples(
                partial(pool.evaluate_json, mapper, ext_codes=codes, library=library), 1
            )
    return timings


@dataclass
class Measured:
    warm: dict[str, list[float]]  # "mapper|how": per-call seconds on the pool
    first: dict[str, list[float]]  # a new set's "first call", "second call", "warm call"
    engine: dict[str, list[float]]  # how: the OIDC mapper on the C API path, in-process
    cache: str  # what the C API cache did over the engine-only run
    size: int  # the set's bytes


def measure(calls: int, sets: int) -> Measured:
    """Everything, on one pool of one worker (sequential calls all reach one worker anyway:
    the idle list is LIFO), then the engine alone in this process."""
    source = oidc_library()
    library = Library.from_files({LIBRARY_NAME: source})
    with WorkerPool(1, spares=0) as pool:
        warm_timings, first = warm(pool, library, calls), first_calls(pool, source, sets)
    engine, cache = engine_only(library, calls)
    return Measured(warm_timings, first, engine, cache, library.size)


HEADER = ["mapper", "call", "p50 µs", "p90 µs", "vs pasted in (p50)"]


def table(measured: Measured) -> tuple[list[list[str]], dict[str, float], float]:
    """The rows, each mapper's warm ratio (imported / pasted, p50) and a new set's first
    call against a warm call (p50)."""
    rows, ratios = [], {}
    warm_timings, oidc = measured.warm, next(iter(MAPPERS))
    for name in MAPPERS:
        pasted = statistics.median(warm_timings[f"{name}|{PASTED}"])
        for how in (IMPORTED, PASTED):
            timings = warm_timings[f"{name}|{how}"]
            ratio = statistics.median(timings) / pasted
            rows.append([name, how, *_figures(timings), f"{ratio:.2f}x"])
        ratios[name] = statistics.median(warm_timings[f"{name}|{IMPORTED}"]) / pasted
    pasted = statistics.median(warm_timings[f"{oidc}|{PASTED}"])
    for how, timings in measured.first.items():
        ratio = statistics.median(timings) / pasted
        rows.append([oidc, f"new set: {how}", *_figures(timings), f"{ratio:.2f}x"])
    engine_pasted = statistics.median(measured.engine[PASTED])
    for how, timings in measured.engine.items():
        ratio = statistics.median(timings) / engine_pasted
        rows.append([oidc, f"engine only: {how}", *_figures(timings), f"{ratio:.2f}x"])
    first = measured.first
    first_ratio = statistics.median(first["first call"]) / statistics.median(first["warm call"])
    return rows, ratios, first_ratio


def _figures(timings: list[float]) -> list[str]:
    return [f"{statistics.median(timings) * 1e6:.0f}", f"{percentile(timings, 0.9) * 1e6:.0f}"]


def notes(measured: Measured, ratios: dict[str, float], first_ratio: float) -> list[str]:
    lines = []
    for name, ratio in ratios.items():
        met = "met" if ratio <= TARGET_RATIO else "NOT met"
        lines.append(
            f"{name} importing a {LIBRARY_LINES:,}-line library ({measured.size:,} bytes), "
            f"warm pool: {ratio:.2f}x the same mapper with the library pasted in (p50; target "
            f"≤ {TARGET_RATIO:.2f}x: {met})"
        )
    lines.append(
        f"a new library set's first call (its frame sent, the mapper and the library parsed): "
        f"{first_ratio:.1f}x a warm call (p50)"
    )
    lines.append(measured.cache)
    return lines


def run(report: Any, quick: bool) -> None:
    """For ``benchmarks.run``: the table and its notes into ``report``."""
    measured = measure(500 if quick else 3000, 10 if quick else 40)
    rows, ratios, first_ratio = table(measured)
    report.table("Imports from memory: a 1,000-line library, warm pool of 1", HEADER, rows)
    report.notes.extend(notes(measured, ratios, first_ratio))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls: a smoke run")
    parser.add_argument("--calls", type=int, default=3000, help="warm calls of each contender")
    parser.add_argument("--sets", type=int, default=40, help="new sets for the first call")
    args = parser.parse_args()
    calls, sets = (500, 10) if args.quick else (args.calls, args.sets)
    measured = measure(calls, sets)
    rows, ratios, first_ratio = table(measured)
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print("\n".join(notes(measured, ratios, first_ratio)))


if __name__ == "__main__":
    main()
