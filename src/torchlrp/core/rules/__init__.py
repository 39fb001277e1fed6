"""LRP rules for linear and convolutional layers.

A rule is a small, immutable object holding its parameters. Its :meth:`Rule.forward` computes the layer's output
together with what the backward needs (kept from the forward instead of recomputed), and :meth:`Rule.backward`
turns the output relevance into the input relevance. Both receive an :class:`~torchlrp.functional.AffineOp`, which
applies the layer's map and its transpose with every convolution hyperparameter, so the rules are written once for
``Linear`` and ``Conv1d/2d/3d``.

Notation below: ``x`` the layer input, ``W``/``b`` its parameters, ``z = Wx + b``, ``R`` the output relevance,
``W+ = max(W, 0)``, ``W- = min(W, 0)``, ``x+``/``x-`` likewise, ``stab(d) = d + eps * sign(d)`` with ``sign(0)=1``.
The formulas are those of Bach et al. (2015), Montavon et al. (2019) and, for the generalized gamma rule,
Andéol et al. (2021); parameters have the meanings zennit gives them.
"""
from torchlrp.core.rules.base import Rule
from torchlrp.core.rules.gradient import Gradient, PatternAttribution, PatternNet
from torchlrp.core.rules.input_layer import Flat, WSquare, ZBox, ZPlusOnes
from torchlrp.core.rules.names import resolve, rule_names
from torchlrp.core.rules.proportional import AlphaBeta, Epsilon, Gamma, Zero, ZPlus

__all__ = ["AlphaBeta", "Epsilon", "Flat", "Gamma", "Gradient", "PatternAttribution", "PatternNet", "Rule", "WSquare",
           "ZBox", "ZPlus", "ZPlusOnes", "Zero", "resolve", "rule_names"]
