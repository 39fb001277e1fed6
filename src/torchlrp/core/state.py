"""The explanation in progress, kept per thread and per context (never on the modules).

:func:`torchlrp.rules_applied` activates an :class:`ExplainState` in a :class:`contextvars.ContextVar`;
the torchlrp modules read it in their forward, in the caller's thread. Two threads (or asyncio tasks) explaining
the same model with different rules therefore never see each other's rules, and nothing is left on the model
when the context ends.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchlrp.core.rules import Rule


@dataclass(eq=False)
class ExplainState:
    """What one active explanation has decided for the modules of its model.

    Attributes
    ----------
    rules : dict
        Module to rule, for every torchlrp layer and mixing layer being explained.
    patterns : dict
        Layer to PatternNet pattern.
    batchnorms : dict
        Layer to the batch norm right after it, folded into it while explaining.
    nonnegative : set
        Layers whose input is known to be non-negative in this model.
    feeds_rectifier : set
        Layers whose output goes straight into a :class:`torchlrp.ReLU` (besides those marked by
        :func:`torchlrp.convert`): explained together with it where the rule can.
    fused : bool
        Run the rules' elementwise work fused by ``torch.compile`` (see :mod:`torchlrp.functional.kernels`).
    first_layer : torch.nn.Module or None
        The first layer the input meets; ``rules[first_layer]`` is the composite's rule for it.
    repeat_rule : Rule or None
        The rule of ``first_layer`` at its later calls, for a layer called more than once (weight tying) whose calls
        :func:`torchlrp.convert` told apart, or that a ``Sequential`` calls more than once.
    counts_first_calls : bool
        ``first_layer`` is called more than once in a ``Sequential`` (no per-call marks from :func:`torchlrp.convert`):
        its first call in this forward takes its rule, the later ones ``repeat_rule``.
    first_calls : int
        Calls of ``first_layer`` so far in this forward (counted where ``counts_first_calls``).
    attention : {"attnlrp", "cp"}
        How attention passes relevance (the composite's choice, see :class:`torchlrp.Composite`).
    output_scores : Tensor or None
        The scores a final softmax of the model took (set in the forward; detached): relevance passes that softmax
        unchanged, so they are what is explained, and ``start="logit"`` starts at them.
    absorbed : list of (str, Tensor)
        The constants added to activations in this forward (see :meth:`absorb`): their gradient is the relevance
        they took (``explain(..., return_absorbed=True)`` reports it by the sum's name).
    run_time : bool
        The model's forward is explained call by call (:mod:`torchlrp.conversion.runtime`): it is checked for conservation.
    unruled : dict of str to Tensor
        Run time: the relevance each call without a rule changed as it passed its gradient (filled in the
        backward; see :class:`torchlrp.accounting.Conservation`).
    losses_allowed : set of str
        Run time: why the rules in play may take a share of relevance themselves (empty where all conserve).
    biases : list of Tensor
        Run time: the biases of the layers explained in this forward (a non-zero one takes a share; read only where
        the conservation check needs them).
    layer_shares : dict of str to Tensor
        Run time: what the layers nearest the output whose rule has a stabilizer took of the relevance that reached
        them (their output relevance minus their input relevance, measured in the backward): the stabilizers' and
        biases' share.
    measured_layers : int
        Run time: how many layers have had their share measured in this backward.
    """

    rules: dict[torch.nn.Module, Rule] = field(default_factory=dict)
    patterns: dict[torch.nn.Module, Tensor] = field(default_factory=dict)
    batchnorms: dict[torch.nn.Module, torch.nn.Module] = field(default_factory=dict)
    nonnegative: set[torch.nn.Module] = field(default_factory=set)
    feeds_rectifier: set[torch.nn.Module] = field(default_factory=set)
    fused: bool = False
    first_layer: torch.nn.Module | None = None
    repeat_rule: Rule | None = None
    counts_first_calls: bool = False
    first_calls: int = 0
    attention: str = "attnlrp"
    output_scores: Tensor | None = None
    absorbed: list[tuple[str, Tensor]] = field(default_factory=list)
    run_time: bool = False
    unruled: dict[str, Tensor] = field(default_factory=dict)
    losses_allowed: set[str] = field(default_factory=set)
    biases: list[Tensor] = field(default_factory=list)
    layer_shares: dict[str, Tensor] = field(default_factory=dict)
    measured_layers: int = 0

    def absorb(self, value: Tensor, label: str) -> Tensor:
        """A constant summand (a position embedding, a buffer, a number as a tensor) as a new leaf whose gradient
        is the relevance it takes, recorded under ``label``; the relevance goes no further (the parameters it is
        made of would otherwise each receive it: counted twice for ``interpolate(p) + tile(q)``).

        Parameters
        ----------
        value : Tensor
            The constant.
        label : str
            The site (the sum's name).

        Returns
        -------
        Tensor
            A leaf with ``value``'s values that requires grad.
        """
        leaf = value.detach().requires_grad_(True)
        self.absorbed.append((label, leaf))
        return leaf


@dataclass(eq=False)
class InPlaceRecord:
    """What the explanations of a model explained at run time have seen of its in-place updates (``convert`` puts
    one on the model it returns; :mod:`torchlrp.conversion.runtime` reads and updates it).

    Attributes
    ----------
    updates : bool or None
        Whether its forward updates a tensor that carries relevance in place (``x.add_(y)``, ``score += bias``):
        None until the first explanation; then the saved-tensor copies that keep what the backward needs run only
        for models that do.
    """

    updates: bool | None = None


ACTIVE: ContextVar[ExplainState | None] = ContextVar("torchlrp_explain_state", default=None)


def current() -> ExplainState | None:
    """Return the explanation active in this thread/context, or None.

    Returns
    -------
    ExplainState or None
        The active state.
    """
    return ACTIVE.get()
