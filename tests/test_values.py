"""``_wire.values.valueclass`` behaves as the dataclass it stands for (issue 23, item 6: the
worker side's values without ``dataclasses``).

- A value class and the same class as a ``dataclass`` (frozen, frozen with slots, mutable)
  agree on construction (positional, keyword, defaults, a fresh ``default_factory`` value
  each time), ``repr``, equality (never with another class), hashing (frozen only) and
  ``__match_args__``; a frozen value refuses assignment and deletion with an
  ``AttributeError``; ``replace`` and ``fields`` answer as ``dataclasses.replace`` and
  ``dataclasses.fields`` do; a value copies, deep-copies and pickles to an equal value.
- The wire's messages keep their shape: a parsed request equals the one encoded.
- A class's ``__init__`` is compiled at its first value, not at import (a one-shot worker's
  start-up), or by ``compile_pending`` (a fork server, once for its forks); a value built
  before and after is the same value, and a class is compiled once.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from typing import Any

import pytest

from jsonnet_worker._wire import values
from jsonnet_worker._wire.framing import Message, decode_body
from jsonnet_worker._wire.layers import LayerState, LayerStatus
from jsonnet_worker._wire.messages import EvalRequest, FormatStyle, Operation
from jsonnet_worker._wire.values import FrozenInstanceError, field, fields, replace, valueclass


@valueclass(slots=True)
class Slotted:
    number: int
    text: str = "d"
    KIND = "a constant, not a field"


@dataclasses.dataclass(frozen=True, slots=True)
class SlottedData:
    number: int
    text: str = "d"
    KIND = "a constant, not a field"


@valueclass
class Frozen:
    number: int
    names: dict[str, int] = field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FrozenData:
    number: int
    names: dict[str, int] = dataclasses.field(default_factory=dict)


@valueclass(frozen=False)
class Mutable:
    number: int
    items: list[int] = field(default_factory=list)


@dataclasses.dataclass
class MutableData:
    number: int
    items: list[int] = dataclasses.field(default_factory=list)


@valueclass
class Single:
    number: int


@dataclasses.dataclass(frozen=True)
class SingleData:
    number: int


PAIRS: list[tuple[type[Any], type[Any], tuple[Any, ...]]] = [
    (Single, SingleData, (1,)),
    (Slotted, SlottedData, (1, "x")),
    (Frozen, FrozenData, (1, {"a": 1})),
    (Mutable, MutableData, (1, [2])),
]


@pytest.mark.parametrize(
    ("ours", "theirs", "args"), PAIRS, ids=lambda p: getattr(p, "__name__", "")
)
def test_a_value_class_behaves_as_its_dataclass(
    ours: type[Any], theirs: type[Any], args: tuple[Any, ...]
) -> None:
    value, data = ours(*args), theirs(*args)
    assert repr(value) == repr(data).replace(theirs.__qualname__, ours.__qualname__)
    assert fields(ours) == tuple(option.name for option in dataclasses.fields(theirs))
    assert ours.__match_args__ == theirs.__match_args__
    assert value == ours(*args) and value != ours(2, *args[1:])
    assert value != data  # another class is never equal, as for dataclasses
    assert (ours.__hash__ is None) is (theirs.__hash__ is None)
    if ours.__hash__ is not None and all(type(arg) in (int, str) for arg in args):
        assert hash(value) == hash(data)
    assert ours(1) == ours(number=1)
    defaults = ours(1), theirs(1)
    for name in fields(ours):
        assert getattr(defaults[0], name) == getattr(defaults[1], name)
    changed = replace(value, number=5)
    assert changed == ours(5, *args[1:]) and value.number == 1
    with pytest.raises(TypeError):
        replace(value, nothing=1)
    for copied in (copy.copy(value), copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
        assert copied == value and type(copied) is ours


def test_a_frozen_value_refuses_changes_and_hashes_as_a_dataclass() -> None:
    value, data = Slotted(1, "x"), SlottedData(1, "x")
    assert hash(value) == hash(data)
    for change in (lambda: setattr(value, "number", 2), lambda: delattr(value, "text")):
        with pytest.raises(FrozenInstanceError) as refused:
            change()
        assert isinstance(refused.value, AttributeError)
    assert not hasattr(value, "__dict__")  # slots, as asked
    assert Slotted.KIND == "a constant, not a field"
    with pytest.raises(TypeError):  # a dict field: unhashable, as a frozen dataclass's
        hash(Frozen(1))


def test_a_default_factory_makes_a_new_value_each_time() -> None:
    first, second = Mutable(1), Mutable(1)
    first.items.append(1)
    assert second.items == [] and first.items == [1]
    assert Frozen(1).names is not Frozen(1).names
    with pytest.raises(TypeError):
        hash(first)  # mutable and comparable: unhashable


def test_a_message_keeps_its_shape_through_the_wire() -> None:
    request = EvalRequest(
        7,
        "{a: std.extVar('x')}",
        ext_vars={"x": "1"},
        operation=Operation.FMT,
        style=replace(FormatStyle(), indent=4),
    )
    message = decode_body(request.encode()[4:])  # after its 4-byte length
    assert isinstance(message, Message)
    assert EvalRequest.from_message(message.payload) == request
    assert fields(FormatStyle)[0] == "indent"
    status = LayerStatus("limits", LayerState.ACTIVE, "x")
    assert replace(status, detail="y") == LayerStatus("limits", LayerState.ACTIVE, "y")


def make_classes() -> tuple[type[Any], type[Any]]:
    """Two value classes made now, neither built yet (one frozen with slots, one mutable)."""

    @valueclass(slots=True)
    class Point:
        x: int
        y: int = 2

    @valueclass(frozen=False)
    class Bag:
        items: list[int] = field(default_factory=list)

    return Point, Bag


def test_init_is_compiled_at_the_first_value() -> None:
    point, bag = make_classes()
    stand_in = point.__init__
    assert stand_in.__qualname__.endswith("stand_in.<locals>.__init__")
    first = point(1)
    compiled = point.__init__
    assert compiled is not stand_in
    assert compiled.__qualname__.endswith("Point.__init__")
    assert list(inspect.signature(compiled).parameters) == ["self", "x", "y"]
    assert point(1) == first == point(x=1, y=2)
    assert point.__init__ is compiled  # compiled once
    assert bag.__init__.__qualname__.endswith("stand_in.<locals>.__init__")  # not built yet
    assert bag().items == [] and bag().items is not bag().items


def test_compile_pending_compiles_every_class_not_built_yet() -> None:
    point, bag = make_classes()
    values.compile_pending()
    for cls, name in ((point, "Point.__init__"), (bag, "Bag.__init__")):
        assert cls.__init__.__qualname__.endswith(name)
    assert point(3).y == 2 and bag([1]).items == [1]
    with pytest.raises(TypeError):
        point()  # the compiled __init__'s own check: x is required
