"""Typed values for the worker side, without ``dataclasses``: ``@valueclass`` makes a class's
annotated fields its ``__init__``, ``__repr__``, ``__eq__`` and (frozen) ``__hash__``, as
``@dataclass`` does, for every module a worker imports (``_wire``, ``_sandbox``,
``_worker``).

Goals: a quick worker start, for every worker (issue 23, item 6). ``import dataclasses``
costs a fresh interpreter about 18 ms of CPU on these machines (it imports ``inspect``, and
with it ``ast``, ``dis``, ``tokenize``, ``re``), a third of a worker's start before its
hello; and each dataclass costs its module several generated methods at import. A worker
needs none of what makes dataclasses general (``inspect.signature`` for a docstring, field
metadata, ``InitVar``, ``KW_ONLY``, ``__post_init__``, ordering).

Plan: ``@valueclass`` (frozen, the default) or ``@valueclass(frozen=False)``, with ``slots=True``
where the class had it, reads the class's own annotations in order: a field without a
default, then fields with one (a plain default, or ``field(default_factory=...)`` for a
mutable one). Its ``__init__`` is generated as dataclasses generate theirs (one compiled
function per class: a message is built on every call), setting each field with
``object.__setattr__`` when frozen, but compiled when the class's first value is built, not
at import: a process pays only for the classes it builds (a one-shot worker, about a third of
them; compiling all 31 was an eighth of a worker's imports), and a fork server compiles them all
once (``compile_pending``) so that its forks inherit them; ``__eq__`` compares two values
of the same class field by field (their fields as one tuple, read by
``operator.attrgetter``), ``__hash__`` (frozen only) hashes that tuple, ``__repr__`` reads as
a dataclass's
(``Name(a=1, b='x')``); a frozen value refuses ``setattr`` and ``delattr`` with
``FrozenInstanceError`` (an ``AttributeError``, as dataclasses' is), and copies and pickles
through ``__getstate__``/``__setstate__``. ``replace(value, **changes)`` and
``fields(cls)`` (the field names) stand for ``dataclasses.replace`` and
``dataclasses.fields``. For mypy, ``valueclass`` is a ``dataclass_transform`` (PEP 681): it
checks the constructors, the fields and the frozen assignments as for a dataclass.

Weak spots: until its first value, a class's ``__init__`` is a stand-in that takes any
arguments (``inspect.signature`` shows ``*args, **kwargs``; mypy sees the fields). A field
is what the class annotates itself (no inheritance of fields: no value
here derives from another); an unannotated class attribute (a message's ``TYPE``) is a
constant, as for a dataclass. ``dataclasses``' functions (``asdict``, ``replace``,
``fields``, ``is_dataclass``) do not know these values, the public ``LayerStatus``,
``LandlockStatus`` and ``FormatStyle`` among them: they have ``to_dict``/``to_message``
where they are written out. Equality costs about twice a dataclass's generated ``__eq__``
(0.7 against 0.3 us for a request: a Python call around the tuples' comparison); no call
path compares messages.
"""

from __future__ import annotations

import operator

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
    V = TypeVar("V")
else:

    def dataclass_transform(**_options: object) -> Callable[[T], T]:
        return lambda decorated: decorated


FIELDS = "__value_fields__"  # a value class's field names, in order
# Its fields' values as one tuple, read in C (``operator.attrgetter``): what equality and
# hashing compare, as fast as a dataclass's generated ``__eq__``.
FIELD_VALUES = "__value_tuple__"


class FrozenInstanceError(AttributeError):
    """An assignment to (or deletion of) a frozen value's field."""


class _Factory:
    """A field's default made anew for each value (``field(default_factory=...)``)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A field whose default is made for each value (a dict, a list), as dataclasses'."""
    return _Factory(default_factory)  # type: ignore[return-value]  # replaced by @valueclass


def fields(cls: type | object) -> tuple[str, ...]:
    """The field names of a value class (or of a value), in order."""
    names: tuple[str, ...] = getattr(cls, FIELDS)
    return names


def replace(instance: V, **changes: Any) -> V:
    """A copy of ``instance`` with ``changes`` (as ``dataclasses.replace``)."""
    names = fields(instance)
    unknown = set(changes) - set(names)
    if unknown:
        raise TypeError(f"{type(instance).__name__} has no field {sorted(unknown)[0]!r}")
    values = {name: changes.get(name, getattr(instance, name)) for name in names}
    return type(instance)(**values)


def _values(instance: object) -> tuple[object, ...]:
    values: tuple[object, ...] = getattr(type(instance), FIELD_VALUES)(instance)
    return values


def _value_tuple(names: list[str]) -> Callable[[object], tuple[object, ...]]:
    """What reads a value's fields as one tuple (attrgetter gives one field alone, not in
    a tuple, and takes no names at all)."""
    if len(names) > 1:
        return operator.attrgetter(*names)
    return lambda instance: tuple(getattr(instance, name) for name in names)


def _eq(self: object, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented  # type: ignore[no-any-return]  # as __eq__'s protocol asks
    return _values(self) == _values(other)


def _hash(self: object) -> int:
    return hash(_values(self))


def _repr(self: object) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in getattr(self, FIELDS))
    return f"{type(self).__qualname__}({shown})"


def _refuse_set(self: object, name: str, _value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _refuse_delete(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _getstate(self: object) -> tuple[object, ...]:
    return _values(self)


def _setstate(self: object, state: tuple[object, ...]) -> None:
    for name, item in zip(getattr(self, FIELDS), state, strict=True):
        object.__setattr__(self, name, item)


def _init_source(cls: type, names: list[str], frozen: bool) -> tuple[str, dict[str, Any]]:
    """The text of the class's ``__init__`` and the names it reads (the fields' defaults)."""
    defaults: dict[str, object] = {}
    parameters = []
    for name in names:
        default = cls.__dict__.get(name, _NO_DEFAULT)
        if isinstance(default, _Factory):
            defaults[f"_make_{name}"] = default.make
            parameters.append(f"{name}=_NO_DEFAULT")
        elif default is not _NO_DEFAULT:
            defaults[f"_default_{name}"] = default
            parameters.append(f"{name}=_default_{name}")
        else:
            parameters.append(name)
    lines = []
    for name in names:
        given = name
        if f"_make_{name}" in defaults:
            given = f"_make_{name}() if {name} is _NO_DEFAULT else {name}"
        if frozen:
            lines.append(f"  _set(self, {name!r}, {given})")
        else:
            lines.append(f"  self.{name} = {given}")
    source = f"def __init__(self, {', '.join(parameters)}):\n" + ("\n".join(lines) or "  pass")
    namespace: dict[str, Any] = {"_set": object.__setattr__, "_NO_DEFAULT": _NO_DEFAULT}
    return source, namespace | defaults


class _PendingInit:
    """A class's ``__init__`` until its first value: compiled then (as dataclasses compile
    theirs at once), so that an import pays nothing for the classes a process never builds
    (a one-shot worker builds a third of them)."""

    __slots__ = ("namespace", "owner", "source")

    def __init__(self, source: str, namespace: dict[str, Any]) -> None:
        self.owner: type | None = None  # set once the class is made (slots make it anew)
        self.source = source
        self.namespace = namespace

    def compile(self) -> Callable[..., None]:
        owner = self.owner
        assert owner is not None
        exec(self.source, self.namespace)  # our own text: the class's field names
        init: Callable[..., None] = self.namespace["__init__"]
        init.__qualname__ = f"{owner.__qualname__}.__init__"
        owner.__init__ = init  # type: ignore[misc]  # the compiled one, from now on
        _PENDING.discard(self)
        return init

    def stand_in(self) -> Callable[..., None]:
        def __init__(instance: object, *args: Any, **kwargs: Any) -> None:
            self.compile()(instance, *args, **kwargs)

        return __init__


# Classes whose __init__ is not compiled yet: ``compile_pending`` compiles them all (a fork
# server, once, rather than each of its forks on its first call).
_PENDING: set[_PendingInit] = set()


def compile_pending() -> None:
    """Compile every value class's ``__init__`` now."""
    for pending in list(_PENDING):
        pending.compile()


_NO_DEFAULT = object()


def _make(cls: type[T], frozen: bool, slots: bool) -> type[T]:
    # the class's own annotations, in order (inspect.get_annotations: what this module avoids)
    names = list(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    pending = _PendingInit(*_init_source(cls, names, frozen))
    methods: dict[str, object] = {
        FIELDS: tuple(names),
        FIELD_VALUES: _value_tuple(names),
        "__init__": pending.stand_in(),
        "__repr__": _repr,
        "__eq__": _eq,
        "__match_args__": tuple(names),
        # mutable and comparable: unhashable, as a dataclass
        "__hash__": _hash if frozen else None,
    }
    if frozen:
        methods |= {
            "__setattr__": _refuse_set,
            "__delattr__": _refuse_delete,
            "__getstate__": _getstate,
            "__setstate__": _setstate,
        }
    defaults = [name for name in names if name in cls.__dict__]
    if not slots:  # the class itself, as dataclasses do (a factory is no class attribute)
        for name in defaults:
            if isinstance(cls.__dict__[name], _Factory):
                delattr(cls, name)
        for name, method in methods.items():
            setattr(cls, name, method)
        pending.owner = cls
        _PENDING.add(pending)
        return cls
    # A class with slots is made anew (as dataclasses do): its defaults live in __init__ only.
    body = {key: item for key, item in cls.__dict__.items() if key not in defaults}
    body.pop("__dict__", None)
    body.pop("__weakref__", None)
    body |= methods
    body["__slots__"] = tuple(names)
    made: type[T] = type(cls.__name__, cls.__bases__, body)
    made.__qualname__ = cls.__qualname__
    pending.owner = made
    _PENDING.add(pending)
    return made


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def valueclass(cls: type[T] | None = None, /, *, frozen: bool = True, slots: bool = False) -> Any:
    """The class as a value (the module's docstring): ``@valueclass``, ``@valueclass(...)``."""
    if cls is None:
        return lambda undecorated: _make(undecorated, frozen, slots)
    return _make(cls, frozen, slots)
