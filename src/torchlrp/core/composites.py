"""Per-layer rules: composites map each layer of a model to a rule.

Precedence: ``by_name`` > ``first`` > ``by_type`` > ``default``. Parameter-free operations (average pooling, sums,
means, interpolation, normalizations, gates, activations: the :class:`~torchlrp.modules.operation.Operation`
modules) split relevance proportionally (``Epsilon(1e-6)``, zennit's ``Norm``; ``Epsilon(0)`` under LRP-0, which
then conserves exactly) unless the default rule propagates a gradient; ``by_name``/``by_type`` may give them another
``Epsilon`` or ``Gradient``.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Mapping

import torch

from torchlrp.core.kinds import MIXING, PROJECTING, AffineLayer, MaxPooling
from torchlrp.functional.attention import ATTENTION_MODES
from torchlrp.core.rules import AlphaBeta, Epsilon, Flat, Gamma, Gradient, Rule, WSquare, ZBox, ZPlus, resolve

MAX_POOLING_CHOICES = ("winner", "proportional")
CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def matches_type(module: torch.nn.Module, types: type | tuple[type, ...]) -> bool:
    """Whether a ``by_type`` key names ``module``: an instance of it, or a layer called as a function whose layer
    class or owning module's class it names (:class:`~torchlrp.modules.affine_call.AffineCall`).

    Parameters
    ----------
    module : torch.nn.Module
        The module.
    types : type or tuple of type
        The key.

    Returns
    -------
    bool
        Whether the key applies.
    """
    if isinstance(module, types):
        return True
    matches = getattr(module, "matches_type", None)
    return matches is not None and matches(types)


def _names(name: str, module: torch.nn.Module) -> tuple[str, ...]:
    """The names ``by_name`` matches: the module's, and for a layer called as a function (``F.conv2d`` in a
    forward, ``addressed_by_owner``) the name of the module whose forward made the call too."""
    return (name, name.rpartition(".")[0]) if getattr(module, "addressed_by_owner", False) else (name,)


def _layer_rule(rule: "str | tuple[str, float] | Rule") -> Rule:
    """The rule of one group of layers; a composite key here is an error that says so."""
    if isinstance(rule, str) and rule.strip().lower() in _presets():
        raise ValueError(f"{rule!r} is a composite (a rule per layer), not the rule of one layer; pass it as the "
                         f"model's rule (explain(model, x, rule={rule!r})) or give a layer a rule of "
                         f"torchlrp.rules.rule_names()")
    return resolve(rule)


class Composite:
    """Rules chosen per layer.

    Parameters
    ----------
    by_name : mapping of str to rule, optional
        Dotted module names (as ``model.named_modules()`` gives them; glob patterns such as ``"features.*"``
        allowed) to rules. The first matching entry wins. A glob pattern gives its rule to the parametric layers it
        matches and to the parameter-free modules the rule fits (``Epsilon`` or a gradient-type rule); the others
        (``"blocks.0.*": Gamma(0.5)`` matching an activation) keep the rule they would get without the pattern. An
        exact name given a rule that does not fit its module is an error.
    by_type : mapping of type (or tuple of types) to rule, optional
        Layer classes to rules (``isinstance``; torch classes match their torchlrp twins).
    first : rule, optional
        Rule of the first torchlrp layer the input meets: in a model made by :func:`torchlrp.convert`, the first
        layer called in its forward (at that call only, if the layer is called again); otherwise the first layer
        registered.
    default : rule, optional
        Rule of every other layer (``Epsilon()`` when omitted).
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance unless ``by_name``/``by_type`` say otherwise: all of a window's relevance
        to its maximum (``"winner"``, the gradient; TorchLRP's and zennit's choice) or in proportion to the window's
        activations (``"proportional"``, seed 004's ``pooling_type``). Per layer, ``by_name``/``by_type`` give a max
        pooling ``Gradient()`` (winner) or ``Epsilon(eps)`` (proportional).
    attention : {"attnlrp", "cp"}
        How attention passes relevance: AttnLRP's rules (softmax rule, uniform rule on the two matrix products;
        Achtibat et al. 2024), or the attention weights held constant (``"cp"``, CP-LRP, Ali et al. 2022: relevance
        only through the values).

    Rules may be given as :class:`~torchlrp.rules.Rule` objects, string keys or ``(key, parameter)`` pairs (see
    :func:`torchlrp.rules.resolve`).
    """

    def __init__(self, by_name: Mapping[str, "str | Rule"] | None = None,
                 by_type: Mapping[type | tuple[type, ...], "str | Rule"] | None = None,
                 first: "str | Rule | None" = None, default: "str | Rule | None" = None,
                 max_pooling: str = "winner", attention: str = "attnlrp") -> None:
        if max_pooling not in MAX_POOLING_CHOICES:
            raise ValueError(f"max_pooling must be one of {MAX_POOLING_CHOICES}, got {max_pooling!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.max_pooling = max_pooling
        self.attention = attention
        self.by_name = {str(k): _layer_rule(v) for k, v in (by_name or {}).items()}
        for key in (by_type or {}):
            types = key if isinstance(key, tuple) else (key,)
            if not all(isinstance(t, type) for t in types):
                raise ValueError(f"by_type keys must be classes or tuples of classes, got {key!r}")
        self.by_type = {k: _layer_rule(v) for k, v in (by_type or {}).items()}
        self.first = None if first is None else _layer_rule(first)
        self.default = Epsilon() if default is None else _layer_rule(default)

    def rule_for(self, name: str, module: torch.nn.Module, is_first: bool = False) -> Rule:
        """Return the rule of one module.

        Parameters
        ----------
        name : str
            The module's dotted name.
        module : torch.nn.Module
            The module.
        is_first : bool
            Whether it is the first layer the input meets.

        Returns
        -------
        Rule
            The rule.
        """
        names = _names(name, module)
        for pattern, rule in self.by_name.items():
            if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in names):
                if _is_glob(pattern) and not _fits(module, rule):
                    continue  # "blocks.0.*" names a block's layers; its parameter-free modules keep their rule
                return rule
        if is_first and self.first is not None and isinstance(module, AffineLayer):
            return self.first
        for types, rule in self.by_type.items():
            if matches_type(module, types):
                return rule
        if isinstance(module, MaxPooling):
            return Gradient() if self.max_pooling == "winner" else self.proportional_rule()
        if isinstance(module, MIXING):
            return self.default if self.default.propagates_gradient else self.proportional_rule()
        return self.default

    def proportional_rule(self) -> Epsilon:
        """Return the rule of parameter-free operations (the proportional split).

        Returns
        -------
        Epsilon
            Epsilon 1e-6, or the default rule's epsilon if that is smaller (0 under LRP-0).
        """
        return Epsilon(min(self.default.epsilon, 1e-6) if isinstance(self.default, Epsilon) else 1e-6)

    def assign(self, model: torch.nn.Module, first_layer: torch.nn.Module | None = None) -> dict[torch.nn.Module, Rule]:
        """Map every torchlrp layer and operation module of ``model`` to its rule.

        Parameters
        ----------
        model : torch.nn.Module
            The model.
        first_layer : torch.nn.Module, optional
            The first layer the input meets (found by :func:`torchlrp.convert` from the forward); default: the
            first torchlrp layer registered.

        Returns
        -------
        dict
            Module to rule, in registration order.

        Raises
        ------
        ValueError
            If a mixing layer is given a rule other than ``Epsilon`` or a gradient-type rule.
        """
        assignment: dict[torch.nn.Module, Rule] = {}
        if first_layer is None:
            first_layer = next((m for m in model.modules() if isinstance(m, AffineLayer)), None)
        for name, module in model.named_modules():
            if isinstance(module, AffineLayer):
                assignment[module] = self.rule_for(name, module, is_first=module is first_layer)
            elif isinstance(module, PROJECTING):  # its projections take the rule of a linear layer
                assignment[module] = self.rule_for(name, module)
            elif isinstance(module, MIXING):
                rule = self.rule_for(name, module)
                if not _fits(module, rule):
                    raise ValueError(f"{name or 'the model'} ({type(module).__name__}) has no parameters; it takes "
                                     f"Epsilon (proportional split) or Gradient, not {rule!r}")
                assignment[module] = rule
        return assignment

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(by_name={self.by_name!r}, by_type={self.by_type!r}, first={self.first!r}, "
                f"default={self.default!r}, max_pooling={self.max_pooling!r}, attention={self.attention!r})")


def _is_glob(pattern: str) -> bool:
    """Whether a ``by_name`` key is a glob pattern rather than one module's name."""
    return any(character in pattern for character in "*?[")


def _fits(module: torch.nn.Module, rule: Rule) -> bool:
    """Whether ``rule`` can be given to ``module``: a parameter-free mixing module takes only Epsilon or a
    gradient-type rule."""
    return not isinstance(module, MIXING) or isinstance(rule, Epsilon) or rule.propagates_gradient


def as_composite(rule: "str | tuple[str, float] | Rule | Composite") -> Composite:
    """Return ``rule`` as a composite (a single rule becomes the default of every layer).

    Parameters
    ----------
    rule : str, tuple, Rule or Composite
        What the user passed: a composite, a key of :func:`composite_names`, or anything
        :func:`torchlrp.rules.resolve` takes.

    Returns
    -------
    Composite
        The composite.

    Raises
    ------
    ValueError
        For an unknown key (the message lists every rule and composite key).
    """
    if isinstance(rule, Composite):
        return rule
    if isinstance(rule, str) and rule.strip().lower() in _presets():
        return _presets()[rule.strip().lower()]()
    return Composite(default=resolve(rule, tuple(_presets())))


class EpsilonPlus(Composite):
    """zennit's EpsilonPlus: ``ZPlus`` for convolutions, ``Epsilon(epsilon)`` for linear layers.

    Parameters
    ----------
    epsilon : float
        Epsilon of the linear layers.
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance (see :class:`Composite`).
    """

    def __init__(self, epsilon: float = 1e-6, max_pooling: str = "winner") -> None:
        super().__init__(by_type={CONVOLUTIONS: ZPlus()}, default=Epsilon(epsilon), max_pooling=max_pooling)


class EpsilonAlpha2Beta1(Composite):
    """zennit's EpsilonAlpha2Beta1: ``AlphaBeta(2, 1)`` for convolutions, ``Epsilon(epsilon)`` for linear layers.

    Parameters
    ----------
    epsilon : float
        Epsilon of the linear layers.
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance (see :class:`Composite`).
    """

    def __init__(self, epsilon: float = 1e-6, max_pooling: str = "winner") -> None:
        super().__init__(by_type={CONVOLUTIONS: AlphaBeta(2.0, 1.0)}, default=Epsilon(epsilon),
                         max_pooling=max_pooling)


class EpsilonPlusFlat(Composite):
    """zennit's EpsilonPlusFlat: ``Flat`` first layer, ``ZPlus`` convolutions, ``Epsilon(epsilon)`` linear layers.

    Parameters
    ----------
    epsilon : float
        Epsilon of the linear layers.
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance (see :class:`Composite`).
    """

    def __init__(self, epsilon: float = 1e-6, max_pooling: str = "winner") -> None:
        super().__init__(by_type={CONVOLUTIONS: ZPlus()}, first=Flat(), default=Epsilon(epsilon),
                         max_pooling=max_pooling)


class EpsilonGammaBox(Composite):
    """zennit's EpsilonGammaBox: ``ZBox(low, high)`` first layer, ``Gamma(gamma)`` convolutions, ``Epsilon``
    linear layers.

    As in zennit, the ``ZBox`` first rule applies only when the first layer is a convolution.

    Parameters
    ----------
    low, high : float or Tensor
        Input bounds (see :class:`~torchlrp.rules.ZBox`).
    epsilon : float
        Epsilon of the linear layers.
    gamma : float
        Gamma of the convolutions.
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance (see :class:`Composite`).
    """

    def __init__(self, low: "float | torch.Tensor | None", high: "float | torch.Tensor | None",
                 epsilon: float = 1e-6, gamma: float = 0.25, max_pooling: str = "winner") -> None:
        super().__init__(by_type={CONVOLUTIONS: Gamma(gamma)}, first=ZBox(low, high), default=Epsilon(epsilon),
                         max_pooling=max_pooling)

    def rule_for(self, name: str, module: torch.nn.Module, is_first: bool = False) -> Rule:  # noqa: D102
        return super().rule_for(name, module, is_first and matches_type(module, CONVOLUTIONS))


class DeepTaylor(Composite):
    """Deep Taylor decomposition (seed 001's ``"deeptaylor"``): ``ZBox(low, high)`` first layer, ``ZPlus`` above.

    Parameters
    ----------
    low, high : float, Tensor or None
        Input bounds (see :class:`~torchlrp.rules.ZBox`); None (the default) takes each sample's own minimum and
        maximum.
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance (see :class:`Composite`).
    """

    def __init__(self, low: "float | torch.Tensor | None" = None, high: "float | torch.Tensor | None" = None,
                 max_pooling: str = "winner") -> None:
        super().__init__(first=ZBox(low, high), default=ZPlus(), max_pooling=max_pooling)


class ZBoxAlpha2Beta1(Composite):
    """Seed 001's ``"zbab"``: ``ZBox(low, high)`` first layer, ``AlphaBeta(2, 1)`` above.

    Parameters
    ----------
    low, high : float, Tensor or None
        Input bounds (see :class:`~torchlrp.rules.ZBox`); None (the default) takes each sample's own minimum and
        maximum.
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance (see :class:`Composite`).
    """

    def __init__(self, low: "float | torch.Tensor | None" = None, high: "float | torch.Tensor | None" = None,
                 max_pooling: str = "winner") -> None:
        super().__init__(first=ZBox(low, high), default=AlphaBeta(2.0, 1.0), max_pooling=max_pooling)


class WSquareAlpha2Beta1(Composite):
    """Seed 001's ``"wwab"``: ``WSquare`` first layer, ``AlphaBeta(2, 1)`` above.

    Parameters
    ----------
    max_pooling : {"winner", "proportional"}
        How max poolings pass relevance (see :class:`Composite`).
    """

    def __init__(self, max_pooling: str = "winner") -> None:
        super().__init__(first=WSquare(), default=AlphaBeta(2.0, 1.0), max_pooling=max_pooling)


def _presets() -> dict[str, Callable[[], Composite]]:
    return {
        "deeptaylor": DeepTaylor,
        "zbab": ZBoxAlpha2Beta1,
        "wwab": WSquareAlpha2Beta1,
        "epsilon-plus": EpsilonPlus,
        "epsilon-plus-flat": EpsilonPlusFlat,
        "epsilon-alpha2-beta1": EpsilonAlpha2Beta1,
    }


def composite_names() -> list[str]:
    """Return the composite keys accepted wherever a model's rule is (not for a single layer).

    Returns
    -------
    list of str
        ``"deeptaylor"`` (:class:`DeepTaylor` with each sample's range as bounds; seed 001), ``"zbab"``
        (:class:`ZBoxAlpha2Beta1`), ``"wwab"`` (:class:`WSquareAlpha2Beta1`), ``"epsilon-plus"``,
        ``"epsilon-plus-flat"``, ``"epsilon-alpha2-beta1"`` (the presets with default parameters).
    """
    return list(_presets())
