"""Which rules conserve: pass on all the relevance a bias-free layer receives."""
from __future__ import annotations

from torchlrp.core.rules.base import Rule
from torchlrp.core.rules.input_layer import UnitInput, ZBox
from torchlrp.core.rules.proportional import AlphaBeta, Epsilon

#: the largest stabilizer of a rule that still counts as conserving (its share is below float rounding)
CONSERVING_STABILIZER = 1e-6


def rule_conserves(rule: Rule) -> bool:
    """Whether ``rule`` passes on all the relevance a bias-free layer receives (up to a stabilizer of at most
    :data:`CONSERVING_STABILIZER`): every relevance rule but a larger epsilon; not the gradient-based rules.

    Parameters
    ----------
    rule : Rule
        A layer rule.

    Returns
    -------
    bool
        True for LRP-0, epsilon <= 1e-6 and gamma. Not for the gradient-based rules, nor for the rules that lose
        relevance by design: alpha-beta and z+ where a unit has no positive (or negative) contributions, z-box
        where the bounded contributions cancel, and the unit-input rules (flat, w-square) on layers whose input is
        not the model's.
    """
    if rule.propagates_gradient or isinstance(rule, (AlphaBeta, ZBox, UnitInput)):
        return False
    return not isinstance(rule, Epsilon) or rule.epsilon <= CONSERVING_STABILIZER


def stabilizer(rule: Rule) -> float:
    """The stabilizer a rule adds to its denominators (epsilon, gamma's stabilizer; 0 where it has none).

    Parameters
    ----------
    rule : Rule
        A layer rule.

    Returns
    -------
    float
        The stabilizer.
    """
    return float(getattr(rule, "epsilon", 0.0) or getattr(rule, "stabilizer", 0.0) or 0.0)


__all__ = ["CONSERVING_STABILIZER", "rule_conserves", "stabilizer"]
