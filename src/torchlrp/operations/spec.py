"""What the operation table says about one operation, and the one interface both engines give its entries.

An :class:`OperationEntry` is the whole description of an operation: its kind of rule (:class:`RuleKind`), the row
the docs show, the facts the analysis needs (sign, gate, attention), and how to explain one call (``build``: an
operation module that replaces the call, ``None`` to keep it -- its gradient is its rule --, or
:class:`Unsupported` with the reason). ``build`` receives the call and a :class:`CallView`; both engines provide
them: :func:`torchlrp.convert`'s traced engine over ``torch.fx`` nodes, the run-time engine over live calls.
A call has ``op`` (``"call_function"``, ``"call_method"``, ``"call_module"``), ``target`` (the function, the
method's name or the module's path), ``args`` and ``kwargs``; a ``torch.fx.Node`` is one.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch

Sign = Literal["none", "preserve", "nonnegative"]


class RuleKind(enum.Enum):
    """The kind of relevance rule an operation takes (the docs' operation table groups by it)."""

    #: relevance follows the index map (its gradient): views, concatenations, indexing, gathers, padding
    INDEX_MAP = "index map"
    #: relevance passes by the gradient (max pooling with indices, dropout in eval mode, a user's own entries)
    GRADIENT = "gradient"
    #: relevance passes unchanged (element-wise activations, the rms norm)
    IDENTITY = "identity"
    #: rectifiers: relevance where the unit is active
    RECTIFIER = "rectifier"
    #: the proportional split of a linear map without parameters (mean, sum, average pooling, interpolation)
    PROPORTIONAL = "proportional"
    #: the proportional split of a sum of summands
    SUM = "sum"
    #: a product or quotient with a constant (or a gate) held constant: all relevance to the signal
    SCALE = "scale"
    #: AttnLRP's uniform rule for a product of two activations
    BILINEAR = "bilinear"
    #: AttnLRP's softmax rule inside a model; the identity at its output
    SOFTMAX = "softmax"
    #: a normalization with its statistics held constant
    NORMALIZATION = "normalization"
    #: a linear map or convolution on parameters: the composite's layer rule
    AFFINE = "affine"
    #: attention: AttnLRP or CP-LRP inside, projections by the layer rule
    ATTENTION = "attention"
    #: a statistic or a choice computed from an activation, held constant where it only scales an activation
    HELD_CONSTANT = "held constant"
    #: sizes and other values that are not tensors
    SHAPE = "shape"
    #: a value computed from an activation that carries no relevance (``zeros_like``, ``detach``)
    NO_RELEVANCE = "no relevance"
    #: explained by the operation module ``build`` makes (what a user's own entry with a ``build`` is)
    OPERATION = "operation module"


class Unsupported(Exception):
    """Raised by an entry's ``build`` when this particular call cannot be explained; the message says why."""


class CallView(Protocol):
    """What an entry's ``build`` may ask about a call's arguments (each engine provides it)."""

    def is_activation(self, argument: Any) -> bool:
        """Whether ``argument`` carries relevance (derived from the model input)."""

    def is_gate(self, argument: Any) -> bool:
        """Whether ``argument`` is the output of a gate (sigmoid-like), possibly reshaped."""

    def is_attention(self, argument: Any) -> bool:
        """Whether ``argument`` is attention weights (a softmax inside the model), possibly reshaped."""

    def is_constant_tensor(self, argument: Any) -> bool:
        """Whether ``argument`` is a tensor that carries no relevance (a parameter, a buffer, a constant)."""

    def constant_name(self, argument: Any) -> str | None:
        """The name of the parameter or buffer the constant ``argument`` is (or is a view of), else None."""

    def additive_constant(self, argument: Any) -> tuple[Any, Any] | None:
        """``(scores, mask)`` where the activation ``argument`` is ``scores + mask`` with a constant tensor ``mask``
        (the run-time engine tracks it; the traced engine answers None)."""

    def is_output(self, call: Any) -> bool:
        """Whether the call's value is (part of) the model's output (the run-time engine cannot know: False)."""

    def only_scales(self, call: Any) -> bool:
        """Whether every use of the call's value ends, through constant arithmetic, in a product or quotient with
        an activation (a normalizer). The run-time engine answers as the uses come: it holds the value constant
        and takes the computed value back where a use turns out to be something else."""

    def owner_type(self, call: Any) -> type | None:
        """The class of the module whose forward made the call (None for the model's own forward)."""

    def submodule(self, target: str) -> torch.nn.Module:
        """The module a ``call_module`` call calls."""

    def take_padding(self, call: Any, argument: int, dims: int) -> tuple[tuple[int, ...], str] | None:
        """If argument ``argument`` of the call is a constant-size padding of an activation used by this call only
        (``F.pad``, a padding module), bypass it and return ``(pad, mode)`` (``F.pad``'s order and mode)."""


#: ``build(call, view)``: the module that replaces the call, or None to keep it
Build = Callable[[Any, CallView], "torch.nn.Module | None"]

#: the rule names of earlier releases, read as kinds (``OperationEntry("identity")``)
_KIND_OF_NAME = {kind.value: kind for kind in RuleKind}


@dataclass(frozen=True)
class OperationEntry:
    """How relevance passes through one operation.

    Parameters
    ----------
    rule : str
        The relevance rule as the docs' operation table shows it (``"index map"``, ``"proportional"``, ...).
    build : callable or None
        ``build(call, view)`` returns the module that replaces the call (called with the call's arguments), or
        None to keep it, or raises :class:`Unsupported`. None keeps every call: its gradient is its rule.
    sign : {"none", "preserve", "nonnegative"}
        Whether the output is non-negative: always, when every tensor input is, or not known.
    gate : bool
        The output is a gate (sigmoid-like, in ``[0, 1]``): a product with it scales a signal.
    shape : bool
        The call returns sizes or other non-tensor values (``x.size()``, ``x.shape``).
    constant : bool
        The output carries no relevance although computed from an activation (``zeros_like``, ``detach``).
    attention : bool
        The output is attention weights (a softmax inside the model): CP-LRP holds them constant.
    inplace : bool
        The call modifies its first argument (``x.add_(y)``; ``F.relu(x, inplace=True)`` is found from its
        keyword): it is explained as its out-of-place form, whose result is written into the argument.
    folds : bool
        A per-channel affine map (an eval-mode batch norm) folded into the linear/conv layer before it where that
        layer's output feeds it alone.
    constant_when : callable, optional
        ``constant_when(call, view)``: this call is held constant (as with ``constant``) where it returns True
        (``x / x.amax(...)``: a normalizer), otherwise explained by ``build`` (``amax`` as a max pooling).
    kind : RuleKind, optional
        The kind of rule. Default: the kind ``rule`` names (``"index map"``, ``"identity"``, ...), else
        :attr:`RuleKind.GRADIENT` for an entry without ``build`` and :attr:`RuleKind.OPERATION` for one with.
    references : tuple of int
        Positions of arguments that give only a size or a type (``x.expand_as(other)``'s ``other``): no relevance
        flows into them.
    """

    rule: str
    build: Build | None = None
    sign: Sign = "none"
    gate: bool = False
    shape: bool = False
    constant: bool = False
    attention: bool = False
    inplace: bool = False
    folds: bool = False
    constant_when: Callable[[Any, CallView], bool] | None = None
    kind: RuleKind | None = field(default=None)
    references: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.sign not in ("none", "preserve", "nonnegative"):
            raise ValueError(f"sign must be 'none', 'preserve' or 'nonnegative', got {self.sign!r}")
        if self.kind is None:
            kind = _KIND_OF_NAME.get(self.rule, RuleKind.GRADIENT if self.build is None else RuleKind.OPERATION)
            object.__setattr__(self, "kind", kind)
        elif not isinstance(self.kind, RuleKind):
            raise TypeError(f"kind must be a torchlrp.operations.RuleKind, got {self.kind!r}")


@dataclass(frozen=True)
class Facts:
    """What the analysis knows of a value that carries relevance: a gate, attention weights, non-negative."""

    gate: bool = False
    attention: bool = False
    nonnegative: bool = False


#: a value nothing is known of
NO_FACTS = Facts()


def derive_facts(entry: OperationEntry, inputs: list[Facts]) -> Facts:
    """The facts of a call's output from its entry and the facts of its activation inputs (both engines).

    A reshaped gate is a gate; reshaped attention weights, attention weights after dropout, and a linear map of them
    over the heads (talking heads) are attention weights; an output is non-negative where the entry says so or
    preserves the sign of non-negative inputs.

    Parameters
    ----------
    entry : OperationEntry
        The call's entry.
    inputs : list of Facts
        The facts of the call's arguments that carry relevance.

    Returns
    -------
    Facts
        The output's facts.
    """
    passing = entry.kind in (RuleKind.INDEX_MAP, RuleKind.IDENTITY) and bool(inputs)
    mixed = entry.kind is RuleKind.AFFINE and bool(inputs)  # a linear map over the heads ("talking heads")
    return Facts(gate=entry.gate or (entry.kind is RuleKind.INDEX_MAP and bool(inputs) and all(f.gate for f in inputs)),
                 attention=entry.attention or ((passing or mixed) and all(f.attention for f in inputs)),
                 nonnegative=entry.sign == "nonnegative" or (entry.sign == "preserve" and bool(inputs) and all(
                     f.nonnegative for f in inputs)))


__all__ = ["Build", "CallView", "Facts", "NO_FACTS", "OperationEntry", "RuleKind", "Sign", "Unsupported",
           "derive_facts"]
