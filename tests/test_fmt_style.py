"""``fmt``'s style options (issue 23, item 6): the sandboxed formatter with each option equals
go-jsonnet's formatter run directly through its C API in this process (the same library,
unsandboxed), and the CLI's jsonnetfmt flags map onto those options. (Checked by hand
against the ``jsonnetfmt`` binary of go-jsonnet v0.20 too: byte for byte, every flag.)"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import _gojsonnet
import pytest

from jsonnet_worker import FormatStyle, InvalidArgument, InvalidType, WorkerPool

SOURCE = (
    'local b = import "b.libsonnet";\nlocal a = import "a.libsonnet";\n\n\n\n'
    '{x: [1,2], "y": "s", # c\n z: {q: 1}, \'w\': b + a}\n'
)
# Each option away from its default, with the jsonnetfmt flags that ask for it.
STYLES = [
    (FormatStyle(), []),
    (FormatStyle(indent=4), ["-n", "4"]),
    (FormatStyle(max_blank_lines=0), ["--max-blank-lines", "0"]),
    (FormatStyle(string_style="d"), ["--string-style", "d"]),
    (FormatStyle(string_style="l"), ["--string-style", "l"]),
    (FormatStyle(comment_style="h"), ["--comment-style", "h"]),
    (FormatStyle(comment_style="l"), ["--comment-style", "l"]),
    (FormatStyle(pad_arrays=True), ["--pad-arrays"]),
    (FormatStyle(pad_objects=False), ["--no-pad-objects"]),
    (FormatStyle(pretty_field_names=False), ["--no-pretty-field-names"]),
    (FormatStyle(sort_imports=False), ["--no-sort-imports"]),
]


def go_jsonnet_formatter(source: str, style: FormatStyle) -> str:
    """go-jsonnet's formatter through its C API in this process, with ``style``."""
    lib = ctypes.CDLL(_gojsonnet.__file__)
    lib.jsonnet_make.restype = ctypes.c_void_p
    lib.jsonnet_fmt_snippet.restype = ctypes.c_void_p
    lib.jsonnet_fmt_snippet.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.jsonnet_realloc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.jsonnet_destroy.argtypes = [ctypes.c_void_p]
    vm = lib.jsonnet_make()
    try:
        for option, value in (
            ("indent", style.indent),
            ("max_blank_lines", style.max_blank_lines),
            ("string", ord(style.string_style)),
            ("comment", ord(style.comment_style)),
            ("pad_arrays", int(style.pad_arrays)),
            ("pad_objects", int(style.pad_objects)),
            ("pretty_field_names", int(style.pretty_field_names)),
            ("sort_imports", int(style.sort_imports)),
        ):
            setter = getattr(lib, f"jsonnet_fmt_{option}")
            setter.argtypes = [ctypes.c_void_p, ctypes.c_int]
            setter(vm, value)
        error = ctypes.c_int(0)
        pointer = lib.jsonnet_fmt_snippet(vm, b"f.jsonnet", source.encode(), ctypes.byref(error))
        text = ctypes.string_at(pointer).decode()
        lib.jsonnet_realloc(vm, pointer, 0)
        assert error.value == 0, text
        return text
    finally:
        lib.jsonnet_destroy(vm)


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(1, spares=0) as shared:
        yield shared


@pytest.mark.parametrize(("style", "flags"), STYLES, ids=lambda s: str(s))
def test_each_option_formats_as_go_jsonnet_does(
    pool: WorkerPool, style: FormatStyle, flags: list[str]
) -> None:
    assert pool.format(SOURCE, filename="f.jsonnet", style=style) == go_jsonnet_formatter(
        SOURCE, style
    )


def test_options_do_not_leak_from_one_call_to_the_next(pool: WorkerPool) -> None:
    """The worker keeps its VM: every option is set on every call."""
    plain = pool.format(SOURCE, filename="f.jsonnet")
    assert pool.format(SOURCE, filename="f.jsonnet", style=FormatStyle(indent=8)) != plain
    assert pool.format(SOURCE, filename="f.jsonnet") == plain


def test_the_cli_flags_are_jsonnetfmts(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonnet"
    path.write_text(SOURCE)
    for style, flags in STYLES:
        done = subprocess.run(
            [sys.executable, "-m", "jsonnet_worker", "fmt", *flags, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == go_jsonnet_formatter(SOURCE, style), flags


def test_bad_options_are_refused(tmp_path: Path, pool: WorkerPool) -> None:
    with pytest.raises(InvalidArgument, match="string_style"):
        pool.format(SOURCE, style=FormatStyle(string_style="x"))
    with pytest.raises(InvalidArgument, match="indent"):
        pool.format(SOURCE, style=FormatStyle(indent=-1))
    with pytest.raises(InvalidType):
        pool.format(SOURCE, style={"indent": 4})  # type: ignore[arg-type]
    path = tmp_path / "f.jsonnet"
    path.write_text(SOURCE)
    done = subprocess.run(
        [sys.executable, "-m", "jsonnet_worker", "fmt", "-n", "-3", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "indent must be" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_style_travels_in_the_request_and_is_checked_on_arrival() -> None:
    from jsonnet_worker._wire import framing
    from jsonnet_worker._wire.framing import ProtocolViolation
    from jsonnet_worker._wire.messages import EvalRequest, Operation

    request = EvalRequest(1, "{}", operation=Operation.FMT, style=FormatStyle(indent=3))
    event = framing.decode_body(request.encode()[framing.HEADER_SIZE :])
    assert isinstance(event, framing.Message)
    payload = event.payload
    assert EvalRequest.from_message(payload) == request
    assert "style" not in EvalRequest(2, "{}").to_message()  # an evaluation carries none
    for bad in ({"indent": 3}, {**payload["style"], "indent": 10_000}, "s"):
        with pytest.raises(ProtocolViolation, match="style"):
            EvalRequest.from_message({**payload, "style": bad})
