"""Copy on write of what the backward keeps, for forwards that update tensors in place while explained at run time."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchlrp.conversion.runtime.calls import is_parameter


def storage_key(tensor: Tensor) -> int:
    """The address of ``tensor``'s storage (shared by all its views), without making a storage object."""
    return tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()


class SavedCopies:
    """Saved-tensor hooks that let an in-place update leave what the backward kept intact (copy on write).

    While a run-time explanation's forward runs, every tensor autograd saves for the backward is packed in a slot,
    indexed by its storage; before a call updates a tensor in place, the slots of its storage get a copy of the
    values it is about to lose. Tensors never updated in place are not copied.
    """

    def __init__(self) -> None:
        self.slots: dict[int, list[list[Tensor]]] = {}
        self._context: Any = None

    def pack(self, tensor: Tensor) -> "list[Tensor] | Tensor":
        """Keep ``tensor`` in a slot (autograd's pack hook); a parameter as it is (a forward that updates its own
        parameters in place has no explanation: the layers refuse it)."""
        if is_parameter(tensor):
            return tensor
        slot = [tensor]
        try:
            key = storage_key(tensor)
        except (RuntimeError, NotImplementedError):  # no storage (a tensor subclass): kept as it is
            return slot
        slots = self.slots.get(key)
        if slots is None:
            self.slots[key] = [slot]
        else:
            slots.append(slot)
        return slot

    @staticmethod
    def unpack(slot: "list[Tensor] | Tensor") -> Tensor:
        """The kept tensor (autograd's unpack hook)."""
        return slot[0] if type(slot) is list else slot

    def before_update(self, tensor: Tensor) -> None:
        """Copy the values the backward kept of ``tensor``'s storage before it is updated in place."""
        try:
            key = storage_key(tensor)
        except (RuntimeError, NotImplementedError):
            return
        for slot in self.slots.pop(key, []):
            slot[0] = slot[0].clone()

    def __enter__(self) -> "SavedCopies":
        self._context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)
        self.slots.clear()  # the slots live on in the autograd graph, as long as the backward needs them


def updated_in_place(func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """The tensor a call updates in place (``x.add_(y)``, ``x[i] = v``, ``F.relu(x, inplace=True)``, ``out=``)."""
    name = getattr(func, "__name__", "")
    if "out" in kwargs and isinstance(kwargs["out"], Tensor):
        return kwargs["out"]
    if not args or not isinstance(args[0], Tensor):
        return None
    if (name.endswith("_") and not name.endswith("__")) or name in (
            "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__") or kwargs.get("inplace") is True:
        return args[0]
    return None


__all__ = ["SavedCopies", "storage_key", "updated_in_place"]
