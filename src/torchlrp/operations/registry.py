"""The operation table: every operation torchlrp explains, declared once, read by both engines.

:func:`torchlrp.convert` traces a model with ``torch.fx`` and looks every call up here; a model ``torch.fx`` cannot
trace is explained at run time, and each call of its forward is looked up here too -- a function (``torch.cat``,
``operator.add``, ``F.silu``), a tensor method (``"mean"``, ``"view"``; ``a + b`` is ``operator.add``) or a leaf
module type (``nn.MaxPool2d``, ``lrp.SiLU``). The :class:`~torchlrp.operations.spec.OperationEntry` found says
which rule applies and how to explain the call; both engines ask its ``build`` the same question through one
interface, so a model gets the same explanation whichever engine runs it.

A new operation is one entry::

    registry = torchlrp.default_registry()
    registry.add(OperationEntry("proportional", lambda call, view: Proportional(torch.cumsum)),
                 torch.cumsum, "cumsum")
    converted = torchlrp.convert(model, registry=registry)

The registry is built fresh by :func:`~torchlrp.operations.default.default_registry` (no process-wide state);
``convert`` uses a fresh one unless given one.
"""
from __future__ import annotations

import builtins
import importlib
import operator
from typing import Any, Iterator

import torch

from torchlrp.operations.spec import OperationEntry, RuleKind


class OperationRegistry:
    """Operations (functions, tensor methods, leaf module types) mapped to their :class:`OperationEntry`."""

    def __init__(self) -> None:
        self.functions: dict[Any, OperationEntry] = {}
        self.methods: dict[str, OperationEntry] = {}
        self.modules: dict[type, OperationEntry] = {}

    def add(self, entry: OperationEntry, *calls: Any) -> None:
        """Declare the calls one entry covers: functions, tensor method names and module types at once.

        Parameters
        ----------
        entry : OperationEntry
            How relevance passes through the operation.
        *calls : callable, str or type
            A function (``torch.cumsum``, ``operator.add``), a tensor method's name (``"cumsum"``) or a module
            class (a ``torch.nn.Module`` subclass, or a mixin of such classes).

        Raises
        ------
        TypeError
            If a call is none of these, or ``entry`` is not an :class:`OperationEntry`.
        """
        if not isinstance(entry, OperationEntry):
            raise TypeError(f"entry must be a torchlrp.OperationEntry, got {type(entry).__name__}")
        for call in calls:
            if isinstance(call, str):
                self.add_method(call, entry)
            elif isinstance(call, type):  # a module type (or a mixin of module types: ExplainableAffine)
                self.add_module(call, entry)
            elif callable(call):
                self.add_function(call, entry)
            else:
                raise TypeError(f"a call is a function, a tensor method's name or a module type, got {call!r}")

    def add_function(self, function: Any, entry: OperationEntry) -> None:
        """Register a function (or any callable that ``torch.fx`` records as ``call_function``).

        Parameters
        ----------
        function : callable
            The function object, e.g. ``torch.cat`` or ``operator.add``.
        entry : OperationEntry
            How relevance passes through it.
        """
        self.functions[function] = entry

    def add_method(self, name: str, entry: OperationEntry) -> None:
        """Register a tensor method by name (``"mean"`` for ``x.mean(...)``).

        Parameters
        ----------
        name : str
            The method name.
        entry : OperationEntry
            How relevance passes through it.
        """
        self.methods[name] = entry

    def add_module(self, module_type: type, entry: OperationEntry) -> None:
        """Register a leaf module type (subclasses match unless registered themselves).

        Parameters
        ----------
        module_type : type
            A ``torch.nn.Module`` subclass; ``convert`` keeps its instances as leaves of the trace.
        entry : OperationEntry
            How relevance passes through it.
        """
        self.modules[module_type] = entry

    def for_module(self, module: torch.nn.Module) -> OperationEntry | None:
        """Return the entry of a module (by its type, then its base classes), or None.

        A subclass with a ``forward`` of its own (timm's ``Conv2dSame``, ``BatchNormAct2d``; a user's
        ``class MyConv(nn.Conv2d)``) does not take its base class's entry: it is explained through what its forward
        does.

        Parameters
        ----------
        module : torch.nn.Module
            A leaf module.

        Returns
        -------
        OperationEntry or None
            The entry.
        """
        forward = getattr(type(module), "forward", None)
        for cls in type(module).__mro__:
            if cls in self.modules:
                return self.modules[cls] if getattr(cls, "forward", None) is forward else None
        return None

    def lookup(self, call: Any, modules: dict[str, torch.nn.Module] | None = None) -> OperationEntry | None:
        """Return the entry of a call, or None if the operation is unknown.

        Parameters
        ----------
        call : torch.fx.Node or live call
            Anything with ``op`` (``"call_function"``, ``"call_method"``, ``"call_module"``) and ``target``.
        modules : dict, optional
            The model's modules by dotted name (for ``call_module``).

        Returns
        -------
        OperationEntry or None
            The entry.
        """
        if call.op == "call_function":
            try:
                return self.functions.get(call.target)
            except TypeError:  # an unhashable callable
                return None
        if call.op == "call_method":
            return self.methods.get(call.target)
        if call.op == "call_module" and modules is not None:
            return self.for_module(modules[call.target])
        return None

    def rows(self) -> Iterator[tuple[str, str, str]]:
        """The docs' operation table: one row per entry, its calls together.

        Yields
        ------
        tuple of str
            ``(calls, kind, rule)``: the calls an entry covers (comma-separated, sorted), its kind's name and its
            rule as the docs show it, in the order the kinds are declared.
        """
        calls: dict[tuple[Any, str], list[str]] = {}
        for table in (self.functions, self.methods, self.modules):
            for key, entry in table.items():
                calls.setdefault((entry.kind, entry.rule), []).append(call_label(key))
        kinds = list(RuleKind)
        for (kind, rule), names in sorted(calls.items(), key=lambda item: (kinds.index(item[0][0]), item[0][1])):
            yield ", ".join(sorted(set(names))), kind.value, rule


def call_label(call: Any) -> str:
    """A registered call's name as a user writes it: ``torch.cat``, ``F.gelu``, ``operator.add``, ``Tensor.view``,
    ``torch.nn.MaxPool2d`` (the docs' operation table and the tests use it).

    Parameters
    ----------
    call : callable, str or type
        A registered function, tensor method name or module type.

    Returns
    -------
    str
        The name.
    """
    if isinstance(call, str):
        return f"Tensor.{call}"
    if isinstance(call, type):
        module = call.__module__
        for public in ("torch.nn", "torchlrp.modules", "torchlrp"):
            if module.startswith(public + ".") and getattr(importlib.import_module(public), call.__name__,
                                                           None) is call:
                return f"{public}.{call.__name__}"
        return f"{module}.{call.__qualname__}"
    for prefix, namespace in (("F", torch.nn.functional), ("torch", torch), ("torch.linalg", torch.linalg),
                              ("operator", operator), ("", builtins)):
        for name, value in vars(namespace).items():
            if value is call and not name.startswith("__"):
                return f"{prefix}.{name}" if prefix else name
    return f"{getattr(call, '__module__', '')}.{getattr(call, '__qualname__', repr(call))}"


__all__ = ["OperationRegistry", "call_label"]
