"""A hypothesis generator of snippets that try to read a secret file through the imports.

Goals: reach a secret marker file (and other files) by every way Jsonnet can name a path,
from every place a snippet or its variables can hold an import, so that a refusal that only
covers the obvious spelling is caught.

Plan: ``SecretFiles`` makes the marker file, symlinks to it and to its folder; ``attempts``
draws a path (its shape), spells it as a string literal (its style), wraps it in an import
form, and places that expression in a snippet, an ext code or a TLA code. The secret file
holds a Jsonnet object with the marker, so ``import`` of it would put the marker in the result,
``importstr`` in the result or an error message. For library sets (issue 24), ``library_for``
writes a set beside the secret whose decoys carry the secret's own names, ``library_names``
aims names at it (its names and the secret's, climbing out, absolute, encoded, cut by a NUL,
over-long, re-rooted on disk) and ``expected_resolution`` says what the rule serves for each.

Weak spots: a literal style that the engine rejects as a syntax error still tests nothing
beyond the parser; ``check_controls`` proves that the plain shapes do reach the secret in an
unrestricted in-process engine, so the generator is not merely producing dead paths.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from jsonnet_worker import Library, WorkerPool
from jsonnet_worker._wire.imports import Resolution, resolve

IMPORT_FORMS = ("import", "importstr", "importbin")
SPECIAL_FILES = (
    "/proc/self/environ",
    "/proc/self/fd/0",
    "/proc/self/fd/1",
    "/proc/self/fd/2",
    "/proc/self/fd/3",
    "/proc/self/fd/4",
    "/proc/self/cmdline",
    "/proc/self/maps",
    "/dev/stdin",
    "/dev/fd/0",
    "/dev/fd/3",
    "/etc/passwd",
    "/etc/shadow",
)


@dataclass
class SecretFiles:
    """The secret marker file and the symlinks a test makes to it."""

    root: Path
    marker: str = field(default_factory=lambda: "MARKER-" + secrets.token_hex(16))
    # What a library set's decoys hold (``library_for``): never the marker.
    decoy: str = field(default_factory=lambda: "DECOY-" + secrets.token_hex(16))

    def __post_init__(self) -> None:
        self.folder = self.root / "sécret dir ü"  # unicode and a space on the way
        self.folder.mkdir(parents=True, exist_ok=True)
        self.secret = self.folder / "secret.jsonnet"
        self.secret.write_text(f'{{ "secret": "{self.marker}" }}\n')
        self.link = self.root / "link-to-secret"
        self.folder_link = self.root / "link-to-folder"
        self.chain_link = self.root / "link-to-link"
        for link, target in (
            (self.link, self.secret),
            (self.folder_link, self.folder),
            (self.chain_link, self.link),
        ):
            if not link.is_symlink():
                link.symlink_to(target)
        os.chmod(self.root, 0o755)

    def secret_names(self) -> list[Path]:
        """The secret and the links to it, as paths under ``root``."""
        return [self.secret, self.link, self.chain_link, self.folder_link / "secret.jsonnet"]

    def direct_paths(self) -> list[str]:
        """Paths that an unrestricted engine resolves to the secret."""
        absolute = str(self.secret)
        depth = absolute.count("/")
        return [
            absolute,
            os.path.relpath(absolute),
            "../" * (depth + 3) + absolute.lstrip("/"),
            absolute.replace("/", "//"),
            absolute.replace("/", "/./"),
            str(self.link),
            str(self.chain_link),
            str(self.folder_link / "secret.jsonnet"),
            f"/proc/{os.getpid()}/root{absolute}",
            f"/proc/{os.getpid()}/cwd/{os.path.relpath(absolute)}",
        ]


def path_shapes(files: SecretFiles) -> st.SearchStrategy[str]:
    absolute = str(files.secret)
    base = st.sampled_from(files.direct_paths())
    mangled = base.flatmap(
        lambda path: st.sampled_from(
            [
                path + "/",  # trailing slash
                "file://" + path,
                "file:" + path,
                path + "\x00.txt",  # NUL: C strings would end here
                "\x00" + path,
                "/" + "./" * 2100 + path.lstrip("/"),  # longer than PATH_MAX
                "a/../" * 900 + path,
                path.replace("/", "\uff0f"),  # fullwidth solidus
                path.upper(),
                path + "\n",
                " " + path,
            ]
        )
    )
    return st.one_of(
        base,
        mangled,
        st.sampled_from(SPECIAL_FILES),
        st.sampled_from([str(files.folder), str(files.folder) + "/", os.path.dirname(absolute)]),
        st.text(min_size=1, max_size=40).map(lambda noise: f"{absolute}{noise}"),
        st.text(min_size=1, max_size=40),
    )


def _escape(path: str, quote: str) -> str:
    out = []
    for char in path:
        if char in (quote, "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif not char.isprintable() or ord(char) > 0xFFFF:
            out.extend(f"\\u{unit:04x}" for unit in _utf16_units(char))
        else:
            out.append(char)
    return "".join(out)


def _utf16_units(char: str) -> list[int]:
    data = char.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def spell(path: str, style: str) -> str:
    """``path`` as a Jsonnet string literal of ``style``."""
    if style == "single":
        return f"'{_escape(path, chr(39))}'"
    if style == "double":
        return f'"{_escape(path, chr(34))}"'
    if style == "unicode-escapes":  # every slash as \u002f, every dot as \u002e
        return '"' + _escape(path, '"').replace("/", "\\u002f").replace(".", "\\u002e") + '"'
    if style == "all-escaped":
        return '"' + "".join(f"\\u{unit:04x}" for c in path for unit in _utf16_units(c)) + '"'
    if style == "verbatim":  # raw characters, NUL included (the worker refuses raw NUL)
        return "@'" + path.replace("'", "''") + "'"
    if style == "verbatim-double":
        return '@"' + path.replace('"', '""') + '"'
    if style == "text-block":
        if "\n" in path or "|||" in path:
            return spell(path, "double")
        return "|||-\n  " + path + "\n|||"
    raise ValueError(style)


LITERAL_STYLES = (
    "single",
    "double",
    "unicode-escapes",
    "all-escaped",
    "verbatim",
    "verbatim-double",
    "text-block",
)

# Where the import expression X goes; every placement forces X when the result is manifested.
PLACEMENTS = {
    "top": "{X}",
    "object": "{{a: {{b: [1, {X}]}}}}",
    "field-name": "{{[std.toString({X})]: 1}}",
    "function": "local f(x) = {X}; f(1)",
    "default-arg": "local f(x={X}) = x; f()",
    "comprehension": "[v for v in [{X}]]",
    "object-comprehension": "{{[k]: {X} for k in ['a']}}",
    "std-call": "std.length(std.toString({X}))",
    "std-map": "std.map(function(v) {X}, [1])",
    "assert": "assert {X} != null : 'refused'; true",
    "assert-message": "assert false : {X}; true",
    "error": "error {X}",
    "error-concat": "error 'leak: ' + std.toString({X})",
    "trace": "std.trace(std.toString({X}), 1)",
    "parse": "std.parseJson(std.toString({X}))",
    "conditional": "if std.length(std.toString({X})) > 0 then 1 else 2",
    "ext-code": "ext code",
    "tla-code": "tla code",
}


@dataclass(frozen=True)
class Attempt:
    snippet: str
    ext_codes: dict[str, str]
    tla_codes: dict[str, str]
    path: str
    style: str
    form: str
    placement: str

    def describe(self) -> str:
        return f"{self.form} {self.style} in {self.placement}: {self.path[:80]!r}"


def build(path: str, style: str, form: str, placement: str) -> Attempt:
    expression = f"{form} {spell(path, style)}"
    ext_codes: dict[str, str] = {}
    tla_codes: dict[str, str] = {}
    if placement == "ext-code":
        snippet, ext_codes = "std.extVar('v')", {"v": expression}
    elif placement == "tla-code":
        snippet, tla_codes = "function(v) v", {"v": expression}
    else:
        snippet = PLACEMENTS[placement].format(X=f"({expression})")
    return Attempt(snippet, ext_codes, tla_codes, path, style, form, placement)


def attempts(files: SecretFiles) -> st.SearchStrategy[Attempt]:
    return st.builds(
        build,
        path_shapes(files),
        st.sampled_from(LITERAL_STYLES),
        st.sampled_from(IMPORT_FORMS),
        st.sampled_from(list(PLACEMENTS)),
    )


# -- library sets (issue 24): names a call's set may or may not serve ----------------------

LIBRARY_TOP = "library"  # where the host read the set from, beside the secret's folder


def library_for(files: SecretFiles) -> Library:
    """A set written beside the secret (as ``Library.from_directory`` reads one): helpers at
    its top and under the search path "vendor", a file that imports another by "..", and
    decoys under the secret's own names relative to its root (the secret's file, its links),
    each holding ``files.decoy``: a name that reaches a decoy was served from the set, one that
    reaches the marker was read from disk."""
    decoy = f'{{ "decoy": "{files.decoy}" }}\n'
    sources = {
        "util.libsonnet": "{ greet(n):: 'hi ' + n, file: std.thisFile }\n",
        "vendor/strings.libsonnet": "{ upper(s):: std.asciiUpper(s) }\n",
        "k8s/apps.libsonnet": "{ name: (import '../util.libsonnet').greet('k8s') }\n",
        "data/notes.txt": "notes\n",
        **{os.path.relpath(path, files.root): decoy for path in files.secret_names()},
    }
    top = files.root / LIBRARY_TOP
    for name, text in sources.items():
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_text(text)
    return Library.from_directory(top, search=("", "vendor"))


def _mangled(name: str, files: SecretFiles) -> list[str]:
    """``name`` climbing out, made absolute, encoded, cut by a NUL, over-long, or re-rooted
    where it lies on disk."""
    return [
        name,
        "./" + name,
        "../" + name,
        "../../" + name,
        "../" * 40 + name,
        "vendor/../" + name,
        "vendor/../../" + name,
        "x/" * 30 + "../" * 30 + name,
        "x/" * 30 + "../" * 31 + name,
        "/" + name,
        "//" + name,
        name + "/",
        name.replace("/", "//"),
        name + "\x00",
        name + "\x00/../../../etc/passwd",
        "\x00" + name,
        "./" * 2100 + name,  # over MAX_IMPORT_NAME bytes
        name.replace("/", "%2f"),
        name.replace(".", "%2e"),
        "%2e%2e/" + name,
        "..%2f" + name,
        name.replace("/", "\uff0f"),  # fullwidth solidus
        "\u2025/" + name,  # two dot leader
        name.replace(".", "\u2024"),  # one dot leader
        name.upper(),
        " " + name,
        name + "\n",
        str(files.root / LIBRARY_TOP / name),  # where the host read it
        str(files.root / name),  # the secret's own root
    ]


def library_names(files: SecretFiles, library: Library) -> st.SearchStrategy[str]:
    """Import names aimed at a set: its own names and the secret's (relative to the
    secret's root) mangled every way ``_mangled`` knows, the escape corpus's paths, and
    noise built from the characters paths are made of."""
    names = sorted(library.files) + [os.path.relpath(p, files.root) for p in files.secret_names()]
    through_search = [name.split("/", 1)[1] for name in names if name.startswith("vendor/")]
    return st.one_of(
        st.sampled_from(names + through_search),
        st.sampled_from(names).flatmap(lambda name: st.sampled_from(_mangled(name, files))),
        path_shapes(files),
        st.text(st.sampled_from("./a\x00%\\u2e"), min_size=1, max_size=30),
    )


def expected_resolution(library: Library, name: str) -> Resolution:
    """What a worker must answer for ``name`` imported by a snippet at the top: the rule,
    applied to the name up to its first NUL (every engine's C glue hands an import name
    to its callback as a C string, so the callback never sees what follows a NUL)."""
    seen = name.split("\x00", 1)[0]
    return resolve(library.files, library.search, library.boundaries, "", seen)


def assert_nothing_leaked(pool: WorkerPool, records: list[logging.LogRecord], marker: str) -> None:
    """After a fuzz run on ``pool``: the marker in no log record, and the pool whole (every
    worker alive, none crashed or timed out)."""
    for record in records:
        assert marker not in record.getMessage()
        assert marker not in repr(record.__dict__)
    stats = pool.stats()
    assert stats.alive == pool.size and stats.crashes == 0 and stats.timeouts == 0
