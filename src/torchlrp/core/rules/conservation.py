"""Which rules conserve: pass on all the relevance a bias-free layer receives."""
from __future__ import annotations

from torchlrp.core.rules.base import Rule
from torchlrp.core.rules.proportional import Epsilon

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
        True for LRP-0, epsilon <= 1e-6, gamma, alpha-beta, z+, z-box, flat, w-square.
    """
    if rule.propagates_gradient:
        return False
    return not isinstance(rule, Epsilon) or rule.epsilon <= CONSERVING_STABILIZER


__all__ = ["CONSERVING_STABILIZER", "rule_conserves"]
