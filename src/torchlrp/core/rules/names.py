"""The string keys of the rules (``"epsilon"``, ``("gamma", 0.25)``, ...) and turning a key into a rule."""
from __future__ import annotations

from typing import Any

from torchlrp.core.rules.base import Rule
from torchlrp.core.rules.gradient import Gradient, PatternAttribution, PatternNet
from torchlrp.core.rules.input_layer import Flat, WSquare, ZPlusOnes
from torchlrp.core.rules.proportional import AlphaBeta, Epsilon, Gamma, Zero, ZPlus


def _rule_factories() -> dict[str, type[Rule] | Any]:
    return {
        "gradient": Gradient,
        "epsilon": Epsilon,
        "zero": Zero,
        "simple": Zero,
        "gamma": Gamma,
        "gamma+epsilon": lambda: Gamma(gamma=0.1, stabilizer=0.1),
        "alpha1beta0": lambda: AlphaBeta(alpha=1.0, beta=0.0),
        "alpha2beta1": lambda: AlphaBeta(alpha=2.0, beta=1.0),
        "alphabeta": AlphaBeta,
        "zplus": ZPlus,
        "flat": Flat,
        "wsquare": WSquare,
        "ww": WSquare,
        "zplus_ones": ZPlusOnes,
        "patternnet": PatternNet,
        "patternattribution": PatternAttribution,
    }


#: keys that take one number: ``(key, parameter)``, as the seeds' ``lrp_rule_param``
_PARAMETERIZED = {
    "epsilon": lambda epsilon: Epsilon(epsilon),
    "gamma": lambda gamma: Gamma(gamma),
    "alphabeta": lambda alpha: AlphaBeta(alpha),
}


def rule_names() -> list[str]:
    """Return the string keys accepted wherever a rule is.

    Returns
    -------
    list of str
        ``"gradient"``, ``"epsilon"``, ``"zero"`` (alias ``"simple"``, LRP-0), ``"gamma"``, ``"gamma+epsilon"``,
        ``"alpha1beta0"``, ``"alpha2beta1"``, ``"alphabeta"`` (alpha 2, beta 1), ``"zplus"``, ``"flat"``,
        ``"wsquare"`` (alias ``"ww"``), ``"zplus_ones"``, ``"patternnet"``, ``"patternattribution"``. The composite
        keys of :func:`torchlrp.composites.composite_names` are accepted wherever a model's rule is.
    """
    return list(_rule_factories())


def _unknown(rule: Any, composite_names: tuple[str, ...]) -> ValueError:
    keys = ", ".join(repr(k) for k in (*_rule_factories(), *composite_names))
    parameterized = ", ".join(f"({k!r}, number)" for k in _PARAMETERIZED)
    if isinstance(rule, (str, tuple, list)):
        return ValueError(f"unknown rule {rule!r}; valid keys are {keys}, and {parameterized}; or a "
                          f"torchlrp.rules.Rule object")
    return ValueError(f"a rule must be a torchlrp.rules.Rule, a composite, one of the keys {keys}, or "
                      f"{parameterized}; got {type(rule).__name__} {rule!r}")


def resolve(rule: "str | tuple[str, float] | Rule", composite_names: tuple[str, ...] = ()) -> Rule:
    """Turn a string key, a ``(key, parameter)`` pair or a rule into a rule.

    Parameters
    ----------
    rule : str, tuple or Rule
        A key from :func:`rule_names` (each maps to the rule with default parameters; ``"gamma+epsilon"`` is
        ``Gamma(gamma=0.1, stabilizer=0.1)`` as in TorchLRP), a pair ``("epsilon", eps)``, ``("gamma", gamma)``
        or ``("alphabeta", alpha)`` (beta = alpha - 1; the seeds' ``lrp_rule_param``), or a :class:`Rule`.
    composite_names : tuple of str
        Keys of composite presets, named in the error for an unknown key (used by
        :func:`torchlrp.composites.as_composite`).

    Returns
    -------
    Rule
        The rule.

    Raises
    ------
    ValueError
        For an unknown key, a bad parameter or a value that is not a rule.
    """
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        factories = _rule_factories()
        key = rule.strip().lower()
        if key not in factories:
            raise _unknown(rule, composite_names)
        return factories[key]()
    if isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
        key = rule[0].strip().lower()
        if key not in _PARAMETERIZED:
            raise _unknown(rule, composite_names)
        return _PARAMETERIZED[key](rule[1])
    raise _unknown(rule, composite_names)
