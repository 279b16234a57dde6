"""The ``jsonnet-worker`` command: ``eval`` a file in the sandbox, ``doctor`` the sandbox,
``serve`` the HTTP service (needs the ``serve`` extra, imported only when asked for)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from ._connection import Hello, WorkerConnection
from ._errors import Error, JsonnetError, WorkerStartError
from ._launch import await_hello
from ._pool import DEFAULT_MAX_OUTPUT, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT, WorkerPool
from ._privileges import DEFAULT_WORKER_USER, resolve_identity
from ._process import WorkerProcess, WorkerSettings
from ._protocol import DEFAULT_MAX_FRAME

EXIT_ERROR = 1
EXIT_USAGE = 2
SERVE_MODULES = {"starlette", "uvicorn", "prometheus_client", "yaml", "anyio"}


class _Variables(argparse.Action):
    """Collects ``NAME=VALUE`` (or ``NAME``, read from the environment, as jsonnet does)
    into one of four maps; ``*-file`` flags read VALUE from a file."""

    def __init__(self, *args: object, target: str, from_file: bool, **kwargs: object) -> None:
        self.target = target
        self.from_file = from_file
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        text = str(values)
        name, sep, value = text.partition("=")
        if not sep:
            if self.from_file:
                parser.error(f"{option_string} takes NAME=FILE")
            if name not in os.environ:
                parser.error(f"{option_string} {name}: no '=' and no such environment variable")
            value = os.environ[name]
        elif self.from_file:
            try:
                with open(value, encoding="utf-8") as source:
                    value = source.read()
            except OSError as exc:
                parser.error(f"{option_string} {name}: {exc.strerror}: {value}")
        mapping = getattr(namespace, self.target)
        if name in mapping:
            parser.error(f"{option_string}: variable {name!r} given twice")
        mapping[name] = value


def _add_variable_flags(parser: argparse.ArgumentParser) -> None:
    flags = [
        (("-V", "--ext-str"), "ext_strs", False, "external string variable NAME=VALUE"),
        (("--ext-str-file",), "ext_strs", True, "external string variable read from a file"),
        (("--ext-code",), "ext_codes", False, "external code variable NAME=CODE"),
        (("--ext-code-file",), "ext_codes", True, "external code variable read from a file"),
        (("-A", "--tla-str"), "tla_strs", False, "top-level string argument NAME=VALUE"),
        (("--tla-str-file",), "tla_strs", True, "top-level string argument read from a file"),
        (("--tla-code",), "tla_codes", False, "top-level code argument NAME=CODE"),
        (("--tla-code-file",), "tla_codes", True, "top-level code argument read from a file"),
    ]
    for names, target, from_file, help_text in flags:
        parser.add_argument(
            *names,
            action=_Variables,
            target=target,
            from_file=from_file,
            metavar="NAME=FILE" if from_file else "NAME=VALUE",
            help=help_text,
        )
    parser.set_defaults(ext_strs={}, ext_codes={}, tla_strs={}, tla_codes={})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jsonnet-worker",
        description="Evaluate untrusted Jsonnet in sandboxed worker processes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    evaluate = commands.add_parser("eval", help="evaluate a Jsonnet file (or - for stdin)")
    evaluate.add_argument("file", help="the Jsonnet file, or - to read standard input")
    _add_variable_flags(evaluate)
    evaluate.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    evaluate.add_argument("--engine", choices=["go", "cpp"], default="go")
    evaluate.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT, help="bytes")
    evaluate.add_argument(
        "--memory-limit", type=int, default=DEFAULT_MEMORY_LIMIT, help="bytes per worker"
    )
    doctor = commands.add_parser("doctor", help="start a worker and report its sandbox")
    doctor.add_argument("--engine", choices=["go", "cpp", "all"], default="all")
    serve = commands.add_parser("serve", help="run the HTTP service (extra: serve)")
    serve.add_argument("--config", help="Kratos-style YAML config (default: the embedded one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=4455, help="port to listen on")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return run_eval(args)
    if args.command == "serve":
        return run_serve(args)
    return run_doctor(args.engine)


def run_serve(args: argparse.Namespace) -> int:
    try:
        from .service import _server
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in SERVE_MODULES:
            raise
        print(
            f"jsonnet-worker serve needs the 'serve' extra ({missing} is missing): "
            "pip install 'jsonnet-worker[serve]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _server.serve(args.config, args.host, args.port)


def run_eval(args: argparse.Namespace) -> int:
    if args.file == "-":
        source, filename = sys.stdin.read(), "<stdin>"
    else:
        try:
            with open(args.file, encoding="utf-8") as handle:
                source = handle.read()
        except OSError as exc:
            print(f"jsonnet-worker: {exc.strerror}: {args.file}", file=sys.stderr)
            return EXIT_USAGE
        filename = args.file
    try:
        with WorkerPool(
            1,
            spares=0,  # one call, then exit: a spare would be started only to be killed
            engine=args.engine,
            timeout=args.timeout,
            max_output=args.max_output,
            memory_limit=args.memory_limit,
        ) as pool:
            output = pool.evaluate_json(
                source,
                args.ext_strs,
                ext_codes=args.ext_codes,
                tla_vars=args.tla_strs,
                tla_codes=args.tla_codes,
                filename=filename,
            )
    except JsonnetError as exc:
        print(exc.message.rstrip("\n"), file=sys.stderr)
        return EXIT_ERROR
    except Error as exc:
        print(f"jsonnet-worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.write(output)
    return 0


def greet(engine: str, timeout: float = 10.0) -> tuple[Hello | str, float, int]:
    """Start one worker, wait for its hello (or its reason for failing), stop it."""
    started = time.monotonic()
    identity = resolve_identity(DEFAULT_WORKER_USER)
    worker = WorkerProcess(
        WorkerSettings(engine, DEFAULT_MEMORY_LIMIT, DEFAULT_MAX_FRAME, identity)
    )
    try:
        try:
            hello: Hello | str = await_hello(worker, WorkerConnection(DEFAULT_MAX_OUTPUT), timeout)
        except WorkerStartError as exc:
            hello = str(exc)
        return hello, time.monotonic() - started, worker.pid
    finally:
        worker.close(grace=1.0)


def run_doctor(engine: str) -> int:
    engines = ["go", "cpp"] if engine == "all" else [engine]
    healthy = True
    for name in engines:
        hello, elapsed, pid = greet(name)
        print(f"engine {name}: worker pid {pid}")
        if isinstance(hello, str):
            healthy = False
            print(f"  FAILED: {hello}")
            continue
        landlock = hello.landlock
        print(f"  engine version:  {hello.engine_version} (Python {hello.python})")
        print(
            f"  worker start:    {elapsed * 1000:.1f} ms to hello "
            f"({hello.startup_ms:.1f} ms inside the worker)"
        )
        if landlock.enforced:
            print(f"  Landlock:        ABI {landlock.abi} enforced (errata {landlock.errata:#x})")
            print(f"  filesystem:      {', '.join(landlock.handled_fs)} (all denied, no rule)")
            print(
                f"  network:         {', '.join(landlock.handled_net) or 'not handled (ABI < 4)'}"
            )
            print(f"  scopes:          {', '.join(landlock.scoped) or 'none (ABI < 6)'}")
            print(f"  restrict flags:  {', '.join(landlock.restrict_flags) or 'none (ABI < 7)'}")
            if landlock.dropped:
                print(f"  kernel lacks:    {', '.join(landlock.dropped)}")
        else:
            healthy = False
            print(f"  Landlock:        NOT ENFORCED: {landlock.reason}")
        print(f"  self-check:      {hello.self_check}")
        if not hello.self_check.startswith("refused"):
            healthy = False
        for layer in hello.sandbox().layers[1:]:
            label = f"{layer.name}:"
            if layer.active:
                print(f"  {label:<16} active: {layer.detail}")
            else:
                healthy = False
                print(f"  {label:<16} MISSING: {layer.reason}")
    print("sandbox: OK" if healthy else "sandbox: NOT fully enforced (see above)")
    return 0 if healthy else EXIT_ERROR


def main_entry() -> None:
    """The ``jsonnet-worker`` console script."""
    sys.exit(main())
