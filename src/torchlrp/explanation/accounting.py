"""What an explanation knows about its own conservation: where the start relevance went.

Every LRP rule passes on the relevance it receives, except for the shares that biases, stabilizers and constants
take. :func:`torchlrp.explain` with ``return_conservation=True`` returns a :class:`Conservation` report: the start
relevance, the relevance that reached the input, the shares that constants took and were reported (position
embeddings, class tokens), and -- for models explained at run time -- the relevance each call without a rule
changed as it passed its gradient (those ``convert(allow_gradient=...)`` let through).

A model explained at run time is also checked after every explanation: a warning names the calls without a rule
that changed the relevance, and fires when the relevance that reached the input plus the reported shares differs
from the start although every rule in play conserves (no bias, no stabilizer beyond 1e-6, no AttnLRP softmax, no
unreported constant): a rule that does not fit its call.
"""
from __future__ import annotations

import warnings
from typing import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchlrp.core.rules.conservation import CONSERVING_STABILIZER, rule_conserves

def tolerance(dtype: torch.dtype) -> float:
    """The relative conservation error that stabilizers (at most :data:`CONSERVING_STABILIZER`) and rounding explain
    in ``dtype``: 1e-4 in float64, 1e-3 in float32, 5e-2 in half precision.

    Parameters
    ----------
    dtype : torch.dtype
        The dtype of the explanation.

    Returns
    -------
    float
        The tolerance, relative to the start relevance.
    """
    if dtype == torch.float64:
        return 1e-4
    return 1e-3 if dtype == torch.float32 else 5e-2


@dataclass(frozen=True)
class Conservation:
    """Where the start relevance of one explanation went.

    Attributes
    ----------
    start : Tensor
        The start relevance per explained row (``(batch,)``, or ``(batch, k)`` for ``k`` targets per sample).
    input : Tensor
        The relevance that reached the input, per row (the heatmap's sum).
    absorbed : dict of str to Tensor
        The shares reported constants took (``explain(return_absorbed=True)``'s dict), summed over the batch.
    unruled : dict of str to Tensor
        For a model explained at run time: per call without a rule that ``allow_gradient`` let pass (module path:
        function), the relevance it changed as it passed its gradient (relevance into its inputs minus the
        relevance at its output: negative where it lost some), summed over the batch and over its calls.
    losses_allowed : tuple of str
        Why the rules in play may take a share themselves (a bias, a stabilizer, AttnLRP's softmax rule, an
        unreported constant); empty where they all conserve.
    """

    start: Tensor
    input: Tensor
    absorbed: dict[str, Tensor] = field(default_factory=dict)
    unruled: dict[str, Tensor] = field(default_factory=dict)
    losses_allowed: tuple[str, ...] = ()

    @property
    def residual(self) -> Tensor:
        """The start relevance that is neither at the input nor in a reported share (summed over the batch)."""
        total = self.input.sum() + sum(self.absorbed.values(), torch.zeros_like(self.start.sum()))
        return self.start.sum() - total

    @property
    def relative_residual(self) -> float:
        """:attr:`residual` relative to the summed absolute start relevance (0 where it is 0)."""
        scale = float(self.start.abs().sum())
        return 0.0 if scale == 0 else float(self.residual) / scale

    def conserved(self, rtol: float | None = None) -> bool:
        """Whether the start relevance is all at the input or in reported shares, to ``rtol``.

        Parameters
        ----------
        rtol : float, optional
            Relative tolerance; default :func:`tolerance` of the start relevance's dtype.

        Returns
        -------
        bool
            ``|residual| <= rtol * sum(|start|)``.
        """
        rtol = tolerance(self.start.dtype) if rtol is None else rtol
        return abs(self.relative_residual) <= rtol

    def __str__(self) -> str:
        lines = [f"start {float(self.start.sum()):.6g} = input {float(self.input.sum()):.6g}"
                 f" + absorbed {float(sum(self.absorbed.values(), torch.zeros(()))):.6g}"
                 f" + residual {float(self.residual):.3g} ({self.relative_residual:.2e} of the start)"]
        lines += [f"  absorbed by {name}: {float(share):.6g}" for name, share in self.absorbed.items()]
        lines += [f"  changed by {name} (no rule, its gradient): {float(change):.6g}"
                  for name, change in self.unruled.items()]
        lines += [f"  the rules may lose relevance: {reason}" for reason in self.losses_allowed]
        return "\n".join(lines)


def check(report: Conservation, biases: Sequence[Tensor] = ()) -> None:
    """Warn about a run-time explanation whose relevance went missing (see the module docstring).

    Parameters
    ----------
    report : Conservation
        The explanation's report.
    biases : sequence of Tensor
        The biases of the layers the explanation ran: a non-zero one takes a share (read only where the residual
        needs them).
    """
    rtol, scale = tolerance(report.start.dtype), float(report.start.abs().sum())
    changed = {name: float(change) for name, change in report.unruled.items()
               if abs(float(change)) > rtol * scale}
    if changed:
        listed = ", ".join(f"{name}: {change:+.4g}" for name, change in changed.items())
        warnings.warn(f"torchlrp: calls without a relevance rule changed the relevance as they passed their "
                      f"gradient ({listed}; start relevance {float(report.start.sum()):.4g}): the heatmap is not an "
                      f"LRP explanation there; register a rule for them (convert(model, registry=...))",
                      stacklevel=3)
        return
    if report.losses_allowed or report.conserved() or any(bool(bias.detach().any()) for bias in biases):
        return
    warnings.warn(f"torchlrp: every rule in play conserves, yet {report.relative_residual:.3g} of the start relevance "
                  f"({float(report.residual):.4g} of {float(report.start.sum()):.4g}) is neither at the input nor "
                  f"in a reported share: a call was explained by a rule that does not fit it; please report it with "
                  f"the model's code", stacklevel=3)


__all__ = ["CONSERVING_STABILIZER", "Conservation", "check", "rule_conserves", "tolerance"]
