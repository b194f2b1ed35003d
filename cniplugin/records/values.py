"""``@value``: ``@dataclass(frozen=True)`` (``order=``, or mutable with ``frozen=False``) for
route-tune's engine records, at a fraction of the class-creation cost.

A dataclass compiles each generated method from source when its class is created: ten for a
frozen ordered class such as ``Rule``, paid again by every plugin process for some twenty
classes. ``@value`` lets ``dataclass`` generate only ``__init__`` and the frozen
``__setattr__``/``__delattr__`` and installs ``__eq__``, ``__hash__``, ``__repr__`` and the
orderings written once here, with the semantics ``dataclass`` gives them: same-class comparison of
the ``compare`` fields as a tuple (else ``NotImplemented``), ``hash`` of the hashed fields, the
``repr`` fields as ``Name(a=1, b='x')``, and no ``__hash__`` on a mutable record. The classes stay
dataclasses (``dataclasses.fields``/``replace``/``is_dataclass`` work as before).
"""

from __future__ import annotations

import dataclasses
from operator import attrgetter

__all__ = ["value"]


def _getter(names: tuple[str, ...]):
    """``obj -> (obj.a, obj.b, ...)`` (one C call; ``attrgetter`` of one name gives no tuple)."""
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return attrgetter(*names) if names else (lambda obj: ())


def _eq(self, other):
    if other.__class__ is self.__class__:
        return self._compared(self) == other._compared(other)
    return NotImplemented


def _lt(self, other):
    if other.__class__ is self.__class__:
        return self._compared(self) < other._compared(other)
    return NotImplemented


def _le(self, other):
    if other.__class__ is self.__class__:
        return self._compared(self) <= other._compared(other)
    return NotImplemented


def _gt(self, other):
    if other.__class__ is self.__class__:
        return self._compared(self) > other._compared(other)
    return NotImplemented


def _ge(self, other):
    if other.__class__ is self.__class__:
        return self._compared(self) >= other._compared(other)
    return NotImplemented


def _hash(self):
    return hash(self._hashed(self))


def _repr(self):
    # These records hold values and tuples of records, never themselves: no recursion guard.
    return (f"{self.__class__.__qualname__}("
            + ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown) + ")")


def value(cls=None, /, *, order: bool = False, frozen: bool = True):
    """``@value`` / ``@value(order=True)`` / ``@value(frozen=False)``: see the module docstring."""

    def wrap(cls):
        cls = dataclasses.dataclass(cls, frozen=frozen, eq=False, repr=False)
        fields = dataclasses.fields(cls)
        cls._compared = staticmethod(_getter(tuple(f.name for f in fields if f.compare)))
        cls._shown = tuple(f.name for f in fields if f.repr)
        cls.__eq__ = _eq
        cls.__repr__ = _repr
        if frozen:
            cls._hashed = staticmethod(_getter(tuple(
                f.name for f in fields if (f.compare if f.hash is None else f.hash))))
            cls.__hash__ = _hash
        else:
            cls.__hash__ = None  # a mutable dataclass with eq is unhashable
        if order:
            cls.__lt__, cls.__le__, cls.__gt__, cls.__ge__ = _lt, _le, _gt, _ge
        return cls

    return wrap if cls is None else wrap(cls)
