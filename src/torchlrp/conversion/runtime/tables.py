"""Side tables the run-time engine keeps on live tensors while a forward runs, keyed by the tensor and dropped with
it: facts (gates, attention weights), paddings, masked scores, held statistics and written-activation regions."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from torch import Tensor

Value = TypeVar("Value")


class TensorTable(Generic[Value]):
    """A mapping from live tensors (by identity) to values, each entry dropped when its tensor is freed."""

    def __init__(self) -> None:
        self.items: dict[int, tuple[weakref.ref, Value]] = {}

    def put(self, tensor: Tensor, value: Value) -> None:
        """Map ``tensor`` to ``value`` while ``tensor`` lives."""
        key, items = id(tensor), self.items
        items[key] = (weakref.ref(tensor, lambda _: items.pop(key, None)), value)

    def get(self, tensor: Any) -> Value | None:
        """The value of ``tensor``, or None (also for anything that is not a tensor)."""
        found = self.items.get(id(tensor))
        return found[1] if found is not None and found[0]() is tensor else None

    def pop(self, tensor: Any) -> Value | None:
        """Remove ``tensor``'s entry and return its value (or None)."""
        value = self.get(tensor)
        if value is not None:
            self.items.pop(id(tensor), None)
        return value


@dataclass
class Held:
    """A statistic of an activation held constant where it scales an activation (a normalizer); elsewhere it is
    explained as computed (``live()``: the call explained by its entry's build, made once, when first asked)."""

    compute: Callable[[], Any]
    value: Any = None
    computed: bool = False

    def live(self) -> Any:
        """The value as explained where it is not held constant."""
        if not self.computed:
            self.value, self.computed = self.compute(), True
        return self.value


@dataclass(eq=False)
class Region:
    """The element-wise calls made on one activation (``root``) and constants: an activation written as a formula
    where one of them powers the root or multiplies two of its values (``nonlinear``), explained as one activation
    (the identity rule) where its value is used by anything else.

    Attributes
    ----------
    root : Tensor
        The activation the formula is of.
    members : int
        How many calls the region holds.
    nonlinear : bool
        Whether a power of the root or a product of two of its values is among them.
    refusals : list of str
        Calls inside it that have no rule of their own (a power): refused unless the region is one activation.
    closed : bool
        Whether a use outside the region has ended it (a call on its root starts a new one then).
    """

    root: Tensor
    members: int = 0
    nonlinear: bool = False
    refusals: list[str] = field(default_factory=list)
    closed: bool = False

    @property
    def is_activation(self) -> bool:
        """Whether the region is an activation written as a formula (two or more calls, one nonlinear)."""
        return self.nonlinear and self.members >= 2


__all__ = ["Held", "Region", "TensorTable"]
