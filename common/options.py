"""Options and registries, shared by compressors, algorithms and problems.

Each of the three families is a set of classes, each with a ``name``, a one-line ``summary`` and
``params`` (a tuple of ``Param``), registered by a class decorator and built from a SPEC string
``name[:key=value,...]`` (``common.spec``):

    COMPRESSORS = Registry("compressor")          # one registry per family, in the family's base module
    register = COMPRESSORS.register

    @register
    class TopK(Compressor):
        name = "topk"
        params = (Param("k", int, None, lambda v: v >= 1, "at least 1", "kept coordinates"),)

    COMPRESSORS.build("topk:k=5", dim, n, seed)   # TopK(dim, n, seed, options={"k": 5})

A registered class is constructed as ``cls(*args, options=..., **kwargs)`` and checks its options
with ``parse_options`` in its constructor, so a class built directly checks them the same way.
Errors name what is wrong and what would be right: "unknown compressor 'x' (known: ...)",
"algorithm gd: unknown option 'y' (options: none)", "topk: option k=0 must be at least 1".

This module sits below every family and imports none of them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

from common import spec as specs


@dataclass(frozen=True)
class Param:
    """One ``key=value`` option: its type, default, a check with the message it fails with, and a doc line."""

    name: str
    kind: type
    default: Any = None
    check: Callable[[Any], bool] | None = None
    must: str = ""
    doc: str = ""

    def convert(self, owner: str, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: option {self.name}={value!r} must be true or false")
        elif self.kind is int:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                raise ValueError(f"{owner}: option {self.name}={value!r} must be an integer")
            value = int(value)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{owner}: option {self.name}={value!r} must be a number")
            value = float(value)
        elif self.kind is str:
            value = str(value)
        if self.check is not None and not self.check(value):
            raise ValueError(f"{owner}: option {self.name}={value!r} must be {self.must}")
        return value


def parse_options(owner: str, params: Sequence[Param], given: Mapping[str, Any], *, keep_unset: bool = True) -> dict[str, Any]:
    """Check ``given`` against ``params`` and return every option converted, in ``params`` order.

    An option not given takes its default; with ``keep_unset=False`` one whose default is None is
    left out instead (compressors: ``"k" in options`` then means the user gave k). ``owner`` starts
    every error message ("topk", "algorithm marina", "problem quadratic").
    """
    known = {p.name: p for p in params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{owner}: unknown option {unknown[0]!r} (options: {', '.join(known) or 'none'})")
    parsed: dict[str, Any] = {}
    for p in params:
        if p.name in given:
            parsed[p.name] = p.convert(owner, given[p.name])
        elif keep_unset or p.default is not None:
            parsed[p.name] = p.default
    return parsed


T = TypeVar("T", bound=type)


class Registry(Mapping[str, T], Generic[T]):
    """The classes of one family by name, in registration order (the order ``psc list`` shows).

    ``register`` is a class decorator; ``build(spec, *args, **kwargs)`` parses a one-item SPEC, finds
    the class and returns ``cls(*args, options=spec_options, **kwargs)``. Read like a dict
    (``names in registry``, ``registry[name]``, ``.items()``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` buildable by its ``name``; a name may be registered once."""
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name or not all(ch.isalnum() or ch in "-_" for ch in name) or name != name.lower():
            raise ValueError(f"{self.kind} class {cls.__name__}: name {name!r} must be a lower-case word (letters, digits, - and _)")
        if name in self._classes:
            raise ValueError(f"{self.kind} {name!r} registered twice ({self._classes[name].__qualname__} and {cls.__qualname__})")
        self._classes[name] = cls
        return cls

    def lookup(self, name: str) -> T:
        """The class registered as ``name``; a ValueError lists the known names."""
        cls = self._classes.get(name)
        if cls is None:
            raise ValueError(f"unknown {self.kind} {name!r} (known: {', '.join(sorted(self._classes))})")
        return cls

    def build(self, spec: str | specs.Spec, *args: Any, **kwargs: Any):
        """Parse ``name[:key=value,...]`` (or take a parsed ``Spec``) and construct its class."""
        item = spec if isinstance(spec, specs.Spec) else specs.parse(spec)
        return self.lookup(item.name)(*args, options=item.options, **kwargs)

    def __getitem__(self, name: str) -> T:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._classes)})"
