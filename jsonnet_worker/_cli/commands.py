"""The ``jsonnet-worker`` command: ``eval`` a file in the sandbox (with the ``jsonnet`` CLI's
flags), ``test`` mappers against suites, ``check`` and ``fmt`` snippets, ``doctor`` the
sandbox (``doctor.py``), ``serve`` the HTTP service (needs the ``serve`` extra, imported only
when asked for).

Goals: ``eval`` behaves as go-jsonnet's ``jsonnet`` command does (output, messages, exit 1
for every evaluation or input error) except where the sandbox forbids it (README: "The
command line"); every ``PoolConfig`` option is a flag of every command that starts a worker.

Plan: the pool flags are generated from ``PoolConfig``'s fields (name, help, type; an
option whose help starts with "bytes" takes a size, ``sizes``), so an option added there is
a flag here. ``eval`` makes one call, in one worker started for it (``oneshot``), before it
reads its input; the other commands run a pool. ``terminal`` holds how the command meets its
terminal: its log lines, a closed standard output (SIGPIPE), input that is not UTF-8.
``-S``, ``-m`` and ``-y`` are applied in this process to the JSON text the worker returns
(see ``output``): the worker protocol knows one output.
Variable flags are collected in order and resolved after parsing, so that an undefined
environment variable or an unreadable file is jsonnet's ``ERROR: ...`` with exit 1, and the
last of two flags naming one variable wins, as in jsonnet.
``-J/--jpath`` and ``JSONNET_PATH`` make go-jsonnet's search list (``_imports.jsonnet_path``);
``eval`` reads the files its input imports (``_imports.collect``: the input's own directory,
then the search list) and sends them with its one call as a ``Library``: the worker serves
imports from memory and never opens a file. ``test`` passes the list to the test runner;
``check`` and ``fmt`` take the flags as jsonnet's do, but neither follows an import.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._config import ENGINES, PoolConfig
from .._errors import Error, JsonnetError
from .._wire.values import field, valueclass
from .sizes import format_size, parse_size
from .terminal import command_logging, die_of_sigpipe, utf8_text
from .versions import VersionAction

if TYPE_CHECKING:
    from .._wire.messages import FormatStyle
    from .early import EarlyWorker
    from .oneshot import OneShot

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a command Ctrl-C ended
SERVE_MODULES = {"starlette", "uvicorn", "prometheus_client", "yaml", "anyio"}
# The CLI runs one short command: one worker and no spare unless asked (a spare would be
# started only to be killed at exit).
CLI_POOL: dict[str, Any] = {"size": 1, "spares": 0}
# eval, check and fmt work on a user's own files, as jsonnet and jsonnetfmt do: the
# library's 1 s and 1 MiB (sized for a service's untrusted calls) would refuse ordinary
# work, so these are generous, and still bounded. ``test`` keeps the library's limits: a
# mapper that passes its tests must also pass them in the service.
CLI_LIMITS: dict[str, Any] = {**CLI_POOL, "timeout": 60.0, "max_output": 256 << 20}
# Options whose flags parse their value as go-jsonnet does (messages and exit 1), with the
# smallest value each takes.
_JSONNET_STYLE = {"max_stack": ("-s", 1), "max_trace": ("-t", 0)}


class Failed(Exception):
    """A command's input error: the message (as jsonnet words it) goes to stderr, exit 1."""


@valueclass
class VariableFlag:
    flag: str
    text: str
    space: str  # "ext" or "tla"
    is_code: bool
    from_file: bool


@valueclass(frozen=False)
class Variables:
    """The four maps ``WorkerPool.evaluate`` takes."""

    ext_vars: dict[str, str] = field(default_factory=dict)
    ext_codes: dict[str, str] = field(default_factory=dict)
    tla_vars: dict[str, str] = field(default_factory=dict)
    tla_codes: dict[str, str] = field(default_factory=dict)

    def add(self, space: str, name: str, value: str, is_code: bool) -> None:
        strings, codes = (
            (self.ext_vars, self.ext_codes) if space == "ext" else (self.tla_vars, self.tla_codes)
        )
        strings.pop(name, None)  # the last flag naming a variable wins, as in jsonnet
        codes.pop(name, None)
        (codes if is_code else strings)[name] = value


class _CollectVariable(argparse.Action):
    def __init__(self, *args: Any, space: str, is_code: bool, from_file: bool, **kw: Any) -> None:
        self.space, self.is_code, self.from_file = space, is_code, from_file
        super().__init__(*args, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        flag = VariableFlag(
            option_string or "", str(values), self.space, self.is_code, self.from_file
        )
        namespace.variables = [*namespace.variables, flag]


def resolve_variables(flags: Sequence[VariableFlag]) -> Variables:
    """The variables the flags name; ``Failed`` with jsonnet's message for an undefined
    environment variable or a ``*-file`` flag without ``=``."""
    variables = Variables()
    for flag in flags:
        name, sep, value = flag.text.partition("=")
        name = _argument_text(name, f"ERROR: {flag.flag} {name!a}")
        if flag.from_file:
            if not sep:
                raise Failed(f'ERROR: argument not in form <var>=<file> "{flag.text}"')
            value = _read_variable_file(flag, name, value)
        elif not sep:
            if name not in os.environ:
                raise Failed(f"ERROR: environment variable {name} was undefined")
            value = _argument_text(os.environ[name], f"ERROR: {flag.flag} {name}: environment")
        else:
            value = _argument_text(value, f"ERROR: {flag.flag} {name}")
        variables.add(flag.space, name, value, flag.is_code)
    return variables


def _read_variable_file(flag: VariableFlag, name: str, path: str) -> str:
    # jsonnet imports the file when the variable is used; imports cannot cross into the
    # sandbox, so it is read here, before the evaluation (README: differences).
    try:
        with open(path, "rb") as source:
            data = source.read()
    except OSError as exc:
        raise Failed(f"ERROR: {flag.flag} {name}: {_strerror(exc)}: {path}") from None
    return _utf8(data, f"ERROR: {flag.flag} {name}: {path}")


def _utf8(data: bytes, where: str) -> str:
    """``data`` decoded; ``Failed`` naming ``where`` and the first bad byte's offset."""
    try:
        return utf8_text(data)
    except ValueError as exc:
        raise Failed(f"{where}: {exc}") from None


def _argument_text(text: str, where: str) -> str:
    """A command-line (or environment) string as the bytes it was given, checked: Python
    decodes undecodable bytes to lone surrogates, which no request can carry."""
    return _utf8(os.fsencode(text), where)


def _strerror(exc: OSError) -> str:
    """The error as Go words it (lower case: "no such file or directory")."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _add_variable_flags(parser: argparse.ArgumentParser) -> None:
    flags = [
        (("-V", "--ext-str"), "ext", False, False, "external string variable NAME[=VALUE]"),
        (("--ext-str-file",), "ext", False, True, "external string variable read from a file"),
        (("--ext-code",), "ext", True, False, "external code variable NAME[=CODE]"),
        (("--ext-code-file",), "ext", True, True, "external code variable read from a file"),
        (("-A", "--tla-str"), "tla", False, False, "top-level string argument NAME[=VALUE]"),
        (("--tla-str-file",), "tla", False, True, "top-level string argument read from a file"),
        (("--tla-code",), "tla", True, False, "top-level code argument NAME[=CODE]"),
        (("--tla-code-file",), "tla", True, True, "top-level code argument read from a file"),
    ]
    for names, space, is_code, from_file, help_text in flags:
        parser.add_argument(
            *names,
            action=_CollectVariable,
            space=space,
            is_code=is_code,
            from_file=from_file,
            metavar="NAME=FILE" if from_file else "NAME[=VALUE]",
            help=help_text + ("" if from_file else " (no VALUE: from the environment)"),
        )
    parser.set_defaults(variables=[])


def add_jpath_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """jsonnet's ``-J/--jpath DIR``, repeatable; ``what`` says what the command does with it."""
    parser.add_argument(
        "-J",
        "--jpath",
        action="append",
        default=[],
        metavar="DIR",
        help="a library search directory, as jsonnet's -J: repeatable, the last given is "
        "searched first (after the importing file's own directory), then JSONNET_PATH's "
        f"directories, left-most first; {what}",
    )


def search_paths(args: argparse.Namespace) -> tuple[str, ...]:
    """go-jsonnet's search list from ``-J`` and ``JSONNET_PATH``; ``Failed`` with jsonnet's
    message for an empty ``-J``, or a directory that is not UTF-8 (no request carries it)."""
    if not args.jpath and not os.environ.get("JSONNET_PATH"):  # _imports.JSONNET_PATH
        return ()  # jsonnet_path's answer, without importing _imports (eval's start-up)
    from .._imports import JSONNET_PATH, jsonnet_path

    jpath = [_argument_text(directory, "ERROR: -J") for directory in args.jpath]
    environ = {
        JSONNET_PATH: _argument_text(os.environ.get(JSONNET_PATH, ""), "ERROR: JSONNET_PATH")
    }
    try:
        return jsonnet_path(jpath, environ)
    except Error as exc:
        raise Failed(f"ERROR: {exc}") from None


# -- pool flags, from PoolConfig ---------------------------------------------------------------


def _optional(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _worker_user(text: str) -> str | range | None:
    """A user name, ``FIRST-LAST`` (a uid range, both included) or ``none``."""
    if text.lower() == "none":
        return None
    first, sep, last = text.partition("-")
    if sep and first.isdigit() and last.isdigit():
        return range(int(first), int(last) + 1)
    return text


def _flag_type(annotation: str, help_text: str) -> Any:
    if "range" in annotation:
        return _worker_user
    if help_text.startswith("bytes"):  # a size: K/M/G and KiB/MiB/GiB (``sizes``)
        return _optional(parse_size) if "None" in annotation else parse_size
    base = {"int": int, "float": float, "str": str}[annotation.split("|")[0].strip()]
    return _optional(base) if "None" in annotation else base


def add_pool_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """One flag per ``PoolConfig`` field (``--allow-unsandboxed`` for ``require_sandbox``);
    a flag not given leaves the option at ``defaults`` or PoolConfig's default."""
    group = parser.add_argument_group("pool options (PoolConfig)")
    helps = PoolConfig.help()
    for option in dataclasses.fields(PoolConfig):
        name = option.name
        # this command's own default, or PoolConfig's
        where, default = (
            ("here", defaults[name]) if name in defaults else ("default", option.default)
        )
        is_size = helps[name].startswith("bytes")
        shown = format_size(default) if is_size and isinstance(default, int) else default
        units = "; K, M, G or KiB, MiB, GiB: powers of 1024" if is_size else ""
        help_text = f"{helps[name]}{units} ({where}: {shown})"
        dest = f"pool_{name}"
        if name == "require_sandbox":
            group.add_argument(
                "--allow-unsandboxed",
                dest=dest,
                action="store_const",
                const=False,
                default=None,
                help="evaluate even where the workers get no Landlock sandbox (a WARNING is "
                "logged); by default the command fails closed",
            )
            continue
        flags = [f"--{name.replace('_', '-')}"]
        short = _JSONNET_STYLE.get(name)
        if short is not None:
            # parsed later, so a bad value is jsonnet's message with exit 1
            group.add_argument(short[0], *flags, dest=dest, metavar="N", help=help_text)
            continue
        if name == "engine":
            group.add_argument(*flags, dest=dest, choices=ENGINES, help=help_text)
            continue
        flag_type = _flag_type(str(option.type), helps[name])
        metavar = "BYTES" if is_size else name.upper()
        group.add_argument(*flags, dest=dest, type=flag_type, metavar=metavar, help=help_text)


def pool_config(args: argparse.Namespace, defaults: dict[str, Any]) -> PoolConfig:
    """The ``PoolConfig`` the flags ask for; ``Failed`` with jsonnet's or PoolConfig's
    message for a bad value."""
    given: dict[str, Any] = dict(defaults)
    for option in dataclasses.fields(PoolConfig):
        value = getattr(args, f"pool_{option.name}", None)
        if value is None:
            continue
        if option.name in _JSONNET_STYLE:
            value = _jsonnet_int(option.name, value)
        given[option.name] = value
    try:
        return PoolConfig(**given)
    except Error as exc:
        raise Failed(f"ERROR: {exc}") from None


def _jsonnet_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise Failed(f'Invalid integer "{text}"') from None
    if value < _JSONNET_STYLE[name][1]:
        raise Failed(f"ERROR: invalid --{name.replace('_', '-')} value: {value}")
    return value


# -- the parser ---------------------------------------------------------------------------------


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command's parser. Given the command line (``argv``), only the command it names
    is built, with its flags: neither its ``--help`` nor a message about its line names
    another command, and the others' parsers and hundred-odd flags would cost every
    ``eval`` their building (argparse looks its message catalogues up on disk for each
    parser). Without a command named (``--help``, a typo), every command is there with its
    help line, the top-level help and the typo's message list them all."""
    formatter = help_formatter()
    parser = argparse.ArgumentParser(
        prog="jsonnet-worker",
        description="Evaluate untrusted Jsonnet in sandboxed worker processes.",
        formatter_class=formatter,
    )
    parser.add_argument(
        "--version", action=VersionAction, help="show the version and the engines' versions"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    named = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (help_text, description, add_flags) in COMMANDS.items():
        if named in (None, name):
            command = commands.add_parser(
                name, help=help_text, description=description, formatter_class=formatter
            )
            add_flags(command)
    return parser


def help_formatter() -> Callable[..., argparse.HelpFormatter]:
    """argparse's help formatter at the terminal's width, read once here. argparse makes a
    formatter for every flag it adds (to check its metavar), and each reads the width
    through ``shutil``, whose import (with bz2, lzma and fnmatch) cost every command ~2.5 ms
    of CPU on these machines before a line of help was asked for."""
    return functools.partial(argparse.HelpFormatter, width=terminal_columns() - 2)


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, as argparse reads it: ``COLUMNS`` if it is a
    positive number, else standard output's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (stdout and os.get_terminal_size(stdout.fileno()).columns) or 80
    except (ValueError, OSError):  # standard output closed, or not a terminal
        return 80


def _add_check(check: argparse.ArgumentParser) -> None:
    check.add_argument("files", nargs="+", metavar="FILE", help="Jsonnet files, or - for stdin")
    add_jpath_flag(check, "accepted as jsonnet's; a static check follows no import")
    add_pool_flags(check, CLI_LIMITS)


def _add_fmt(fmt: argparse.ArgumentParser) -> None:
    fmt.add_argument("files", nargs="+", metavar="FILE", help="Jsonnet files, or - for stdin")
    fmt.add_argument("-i", "--in-place", action="store_true", help="rewrite each file")
    fmt.add_argument(
        "--test", action="store_true", help="exit 2 when a file is not formatted; print nothing"
    )
    add_style_flags(fmt)
    add_jpath_flag(fmt, "accepted as jsonnet's; formatting follows no import")
    add_pool_flags(fmt, CLI_LIMITS)


def _add_doctor(doctor: argparse.ArgumentParser) -> None:
    doctor.add_argument("--engine", choices=[*ENGINES, "all"], default="all")


def _add_serve(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", help="Kratos-style YAML config (default: the embedded one)")
    serve.add_argument(
        "--check-config",
        metavar="FILE",
        help="only load and validate FILE (with the JSONNET_WORKER_* overrides): exit 0 and "
        "one OK line, or the error and exit 2",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=4455, help="port to listen on")
    serve.add_argument("--log-format", choices=["text", "json"], default="text")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="no access log lines"
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="server processes on one socket, each with its own pool (default: the config's "
        "serve.workers, 1); /metrics sums them all",
    )


def _add_eval(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("file", help="the Jsonnet file, - for standard input, or code with -e")
    evaluate.add_argument("-e", "--exec", action="store_true", help="treat FILE as code")
    evaluate.add_argument(
        "-S", "--string", action="store_true", help="expect a string, manifest as plain text"
    )
    evaluate.add_argument(
        "-m", "--multi", metavar="DIR", help="write one file per field to DIR, list them"
    )
    evaluate.add_argument(
        "-c", "--create-output-dirs", action="store_true", help="create missing directories"
    )
    evaluate.add_argument(
        "-y", "--yaml-stream", action="store_true", help="write a YAML stream of JSON documents"
    )
    evaluate.add_argument("-o", "--output-file", metavar="FILE", help="write to FILE")
    add_jpath_flag(
        evaluate,
        "the command reads the files the input imports (bounded) and the sandbox "
        "gets them from memory",
    )
    _add_variable_flags(evaluate)
    add_pool_flags(evaluate, CLI_LIMITS)


def _add_test(test: argparse.ArgumentParser) -> None:
    test.add_argument("suites", nargs="+", metavar="SUITE", help="suite files")
    test.add_argument("--junit-xml", metavar="FILE", help="also write a JUnit XML report")
    test.add_argument(
        "-k",
        dest="keywords",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only the cases whose name contains PATTERN (case-insensitive); "
        "given again, the cases matching any",
    )
    test.add_argument(
        "--update",
        action="store_true",
        help="write the results of the cases that failed on their expect/expect_subset back "
        "into the suite files (errors are never written; the rest of each file is kept)",
    )
    add_jpath_flag(test, "relative to the current directory, searched before a suite's own 'jpath'")
    add_pool_flags(test, CLI_POOL)


# Each command: its help line, its description (None: argparse shows the help line) and what
# adds its flags, in the order ``--help`` lists them.
COMMANDS: dict[str, tuple[str, str | None, Callable[[argparse.ArgumentParser], None]]] = {
    "eval": (
        "evaluate a Jsonnet file (or - for stdin), as the jsonnet command does",
        "Evaluate in the sandbox. Output, messages and exit codes follow go-jsonnet's jsonnet "
        "command (README: the command line).",
        _add_eval,
    ),
    "test": (
        "run mapper/template test suites (YAML or JSON) in the sandbox",
        "Run each suite's cases; exit 0 when all pass, 1 when any fails, 2 when a suite "
        "cannot be read or updated, 5 when -k selects no case. Suite format: README, "
        "'Testing mappers'.",
        _add_test,
    ),
    "check": ("parse and statically check files (no evaluation)", None, _add_check),
    "fmt": ("format files with go-jsonnet's formatter", None, _add_fmt),
    "doctor": ("start a worker and report its sandbox", None, _add_doctor),
    "serve": ("run the HTTP service (extra: serve)", None, _add_serve),
}


# -- commands -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None, early: EarlyWorker | None = None) -> int:
    """The command's exit status. Ctrl-C ends it quietly with 130 (its worker killed and
    reaped on the way out); a closed standard output ends it as jsonnet ends, by SIGPIPE.
    ``early``: ``eval``'s worker, started before this module was imported (``early``), used
    if it is the one the config asks for; the caller closes it."""
    try:
        parser = build_parser(sys.argv[1:] if argv is None else argv)
        return _run(parser.parse_args(argv), early)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        die_of_sigpipe()


def _run(args: argparse.Namespace, early: EarlyWorker | None = None) -> int:
    if args.command == "serve":
        return run_serve(args)
    if args.command == "doctor":
        from . import doctor

        return doctor.run_doctor(args.engine)
    runner = {"eval": run_eval, "test": run_test, "check": run_check, "fmt": run_fmt}
    try:
        if args.command == "eval":  # its log line is set up where it is written (``oneshot``)
            return run_eval(args, early)
        with command_logging():
            return runner[args.command](args)
    except Failed as exc:
        print(exc, file=sys.stderr)
        return EXIT_ERROR


def run_serve(args: argparse.Namespace) -> int:
    try:
        from ..service import _server
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in SERVE_MODULES:
            raise
        print(
            f"jsonnet-worker serve needs the 'serve' extra ({missing} is missing): "
            "pip install -e '.[serve]' in a checkout, or pip install 'jsonnet-worker[serve]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.check_config is not None:
        return _server.check_config(args.check_config)
    options = _server.ServeOptions(
        config_path=args.config,
        host=args.host,
        port=args.port,
        log_format=args.log_format,
        log_level=args.log_level,
        access_log=args.access_log,
        workers=args.workers,
    )
    return _server.serve(options)


def read_input(path: str, is_code: bool = False) -> tuple[str, str]:
    """(source, filename) as jsonnet reads its input; ``Failed`` with its message (a
    source that is not UTF-8: the input and the offset of its first bad byte)."""
    if is_code:
        return _argument_text(path, "ERROR: <cmdline>"), "<cmdline>"
    if path == "-":
        return _utf8(sys.stdin.buffer.read(), "Reading input file: <stdin>"), "<stdin>"
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except IsADirectoryError as exc:
        raise Failed(f"Reading input file: {path}: {_strerror(exc)}") from None
    except OSError as exc:
        raise Failed(f"Opening input file: {path}: {_strerror(exc)}") from None
    return _utf8(data, f"Reading input file: {path}"), path


def _library_error(exc: Error) -> Failed:
    if isinstance(exc, JsonnetError):
        # as jsonnet prints it: the engine's text (which ends in a newline), then a newline
        return Failed(exc.message)
    return Failed(f"jsonnet-worker: {type(exc).__name__}: {exc}")


def run_eval(args: argparse.Namespace, early: EarlyWorker | None = None) -> int:
    if args.output_file == "":
        raise Failed("ERROR: -o argument was empty string")
    if args.multi == "":
        raise Failed("ERROR: -m argument was empty string")
    search = search_paths(args)
    config = pool_config(args, CLI_LIMITS)
    from .oneshot import OneShot

    # The worker starts now (or was started with the command, ``early``): its start-up runs
    # while the input is read. Killed once it has answered, it is reaped when the block
    # ends, after the output is written. Its one log line (a degraded sandbox) is written
    # under ``command_logging`` by ``OneShot`` itself: no other eval imports logging.
    try:
        with OneShot(config, early) as worker:
            _write_output(args, _evaluate(worker, args, search))
    except Error as exc:
        raise _library_error(exc) from None
    return 0


def _write_output(args: argparse.Namespace, text: str) -> None:
    """The result's JSON ``text`` in the output mode ``args`` ask for, where they ask."""
    from . import output as output_modes  # here: json, for -S, -m, -y

    if args.multi is not None:
        files = output_modes.multi(text, args.multi, string=args.string)
    elif args.yaml_stream:
        output = output_modes.stream(text)
    else:
        output = output_modes.string(text) if args.string else text
    try:
        if args.multi is None:
            output_modes.write_text(output, args.output_file, create_dirs=args.create_output_dirs)
        elif args.output_file is None:
            output_modes.write_multi(files, sys.stdout, create_dirs=args.create_output_dirs)
        else:
            with open(args.output_file, "w", encoding="utf-8") as listing:
                output_modes.write_multi(files, listing, create_dirs=args.create_output_dirs)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise Failed(f"open {exc.filename}: {_strerror(exc)}") from None


def _evaluate(worker: OneShot, args: argparse.Namespace, search: tuple[str, ...]) -> str:
    """The manifested JSON of the one evaluation ``args`` ask for, in ``worker``, its imports
    served from the files found on ``search``."""
    from .._pool.exchange import Variables as CallVariables
    from .._pool.exchange import prepare
    from .._wire.messages import Operation
    from .traces import print_trace

    variables = resolve_variables(args.variables)
    source, filename = read_input(args.file, args.exec)
    # the files it imports, as go-jsonnet's jsonnet finds them: beside the input (a
    # snippet's, <cmdline> or <stdin>, in the current directory), then on the search list.
    # An input without the word imports nothing (``import``, ``importstr`` and ``importbin``
    # are keywords): no library then, and _imports and the set's digest stay unloaded.
    library = None
    if "import" in source:
        from .._imports import collect

        library = collect(filename, source, search)
    maps = CallVariables(
        variables.ext_vars, variables.tla_vars, variables.ext_codes, variables.tla_codes
    )
    call = prepare(
        worker.config,
        1,
        Operation.EVAL,
        source,
        filename,
        None,
        None,
        variables=maps,
        on_trace=print_trace,  # on stderr, as go-jsonnet prints them
        library=library,
    )
    return worker.call(call).json_text


def run_test(args: argparse.Namespace) -> int:
    from .._pool.facade import WorkerPool
    from . import testrunner

    search = search_paths(args)
    config = pool_config(args, CLI_POOL)
    suites, problems = testrunner.load_suites(args.suites, search)
    selection = testrunner.Selection(tuple(args.keywords))
    for problem in problems:
        print(problem, file=sys.stderr)
    try:
        with WorkerPool(config=config) as pool:
            reports = [testrunner.run_suite(pool, suite, sys.stdout, selection) for suite in suites]
    except Error as exc:
        raise _library_error(exc) from None
    if args.update:
        problems += testrunner.update_suites(reports, sys.stdout, sys.stderr)
    print(testrunner.summary(reports, selection))
    if args.junit_xml:
        testrunner.write_junit(reports, args.junit_xml)
    return testrunner.exit_status(reports, bool(problems))


def run_check(args: argparse.Namespace) -> int:
    from .._pool.facade import WorkerPool

    search_paths(args)  # checked as jsonnet checks it; a static check imports nothing
    config = pool_config(args, CLI_LIMITS)
    inputs = [read_input(path) for path in args.files]
    failed = False
    try:
        with WorkerPool(config=config) as pool:
            for source, filename in inputs:
                try:
                    pool.check(source, filename=filename)
                except JsonnetError as exc:
                    failed = True
                    sys.stderr.write(exc.message.rstrip("\n") + "\n")
    except Error as exc:
        raise _library_error(exc) from None
    return EXIT_ERROR if failed else 0


EXIT_NOT_FORMATTED = 2  # jsonnetfmt --test


def add_style_flags(parser: argparse.ArgumentParser) -> None:
    """jsonnetfmt's style flags, with its defaults (``FormatStyle``)."""
    group = parser.add_argument_group("style (as jsonnetfmt's flags)")
    group.add_argument("-n", "--indent", type=int, default=2, metavar="N", help="spaces (2)")
    group.add_argument(
        "--max-blank-lines", type=int, default=2, metavar="N", help="blank lines kept (2)"
    )
    group.add_argument(
        "--string-style", choices=["d", "s", "l"], default="s", help="d(ouble), s(ingle), l(eave)"
    )
    group.add_argument(
        "--comment-style", choices=["h", "s", "l"], default="s", help="h(ash), s(lash), l(eave)"
    )
    for flag, default, what in (
        ("pad-arrays", False, "[ 1, 2, 3 ]"),
        ("pad-objects", True, "{ x: 1, y: 2 }"),
        ("pretty-field-names", True, "quotes on field names only where needed"),
        ("sort-imports", True, "sort top-level imports"),
    ):
        group.add_argument(
            f"--{flag}", action=argparse.BooleanOptionalAction, default=default, help=what
        )


def format_style(args: argparse.Namespace) -> FormatStyle:
    """The ``FormatStyle`` of ``fmt``'s style flags (each flag's dest is the field's name); a
    value out of range is a usage error."""
    from .._wire.messages import FormatStyle
    from .._wire.values import fields

    options = {name: getattr(args, name) for name in fields(FormatStyle)}
    style = FormatStyle(**options)
    if problem := style.problem():
        raise Failed(f"ERROR: {problem}")
    return style


def run_fmt(args: argparse.Namespace) -> int:
    from .._pool.facade import WorkerPool
    from . import output as output_modes

    style = format_style(args)
    search_paths(args)  # checked as jsonnet checks it; formatting imports nothing
    config = pool_config(args, CLI_LIMITS)
    inputs = [(path, *read_input(path)) for path in args.files]
    if args.in_place and any(path == "-" for path, _, _ in inputs):
        raise Failed("ERROR: cannot use --in-place with stdin")
    status = 0
    try:
        with WorkerPool(config=config) as pool:
            for path, source, filename in inputs:
                try:
                    formatted = pool.format(source, filename=filename, style=style)
                except JsonnetError as exc:
                    sys.stderr.write(exc.message.rstrip("\n") + "\n")
                    status = EXIT_ERROR
                    continue
                if args.test:
                    if formatted != source:
                        status = status or EXIT_NOT_FORMATTED
                elif args.in_place:
                    if formatted != source:
                        output_modes.write_text(formatted, path, create_dirs=False)
                else:
                    sys.stdout.write(formatted)
    except Error as exc:
        raise _library_error(exc) from None
    return status
