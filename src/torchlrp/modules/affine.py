"""``Linear`` and ``Conv1d/2d/3d`` with an explain mode.

Each class subclasses its torch layer (same constructor, same ``state_dict``). With ``explain=False`` the forward
*is* the torch layer's; with ``explain=True`` the output is the same (or, for a layer explained together with the
ReLU after it, already rectified), and the backward computes the input relevance by a rule through
:class:`~torchlrp.functional.AffineRelevance`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from torchlrp.core.composites import Composite
from torchlrp.core.kinds import AffineLayer
from torchlrp.functional.folding import fold_batchnorm
from torchlrp.functional.affine import AffineOp
from torchlrp.functional.relevance import AffineRelevance
from torchlrp.core.recorder import recorder
from torchlrp.core.rules import Rule, resolve
from torchlrp.core.rules.conservation import stabilizer
from torchlrp.core.state import ExplainState, current


#: the name under which the run-time check reports what the layers' stabilizers and biases took
LAYER_SHARE = "layers (stabilizers and biases)"


#: how many layers, nearest the output, have their stabilizers' share measured: there the outputs are the logits,
#: whose size (small where a class is unlikely) sets how much of the relevance a stabilizer takes
MEASURED_LAYERS = 2


def _measuring(record: Callable[[Tensor, Tensor], None], state: ExplainState) -> Callable[[Tensor, Tensor], None]:
    """``record``, also adding what the layer took (output relevance minus input relevance) to the explanation's
    ``layer_shares`` -- where the check needs it: for the :data:`MEASURED_LAYERS` layers the backward meets first
    (those nearest the output), and not where another allowed loss (AttnLRP's softmax) already lets relevance go."""
    def measure(input_relevance: Tensor, output_relevance: Tensor) -> None:
        record(input_relevance, output_relevance)
        shares = state.layer_shares
        if state.losses_allowed or state.measured_layers >= MEASURED_LAYERS:
            return
        state.measured_layers += 1
        taken = (output_relevance.sum() - input_relevance.sum()).detach()
        shares[LAYER_SHARE] = shares[LAYER_SHARE] + taken if LAYER_SHARE in shares else taken
    return measure


@AffineLayer.register
class ExplainableAffine:
    """Mixin giving an affine torch layer its explain mode.

    While :func:`torchlrp.rules_applied` is active (in this thread), the layer finds its rule, pattern and
    any batch norm to fold in the active :class:`~torchlrp.core.state.ExplainState`. ``input_nonnegative`` marks a
    layer whose input is known to be non-negative (it follows a ReLU; set by :func:`torchlrp.convert`); rules then
    skip their negative-input terms. ``feeds_rectifier`` marks a layer whose output goes straight (through nothing
    but a folded batch norm) into a :class:`torchlrp.ReLU` (set by :func:`torchlrp.convert`): while explaining, a
    rule that can (:meth:`~torchlrp.rules.Rule.folds_rectifier`) explains layer and ReLU together.
    """

    input_nonnegative: bool = False
    feeds_rectifier: bool = False
    #: which argument of a call is the layer input (``torch.addmm(bias, input, weight)``: 1)
    input_argument: int = 0

    def forward(self, input: Tensor, explain: bool | None = None, rule: "str | Rule | Composite | None" = None,
                pattern: Tensor | None = None, *, input_nonnegative: bool | None = None,
                feeds_rectifier: bool | None = None, first: bool | None = None) -> Tensor:
        """Apply the layer; in explain mode, attach the rule's relevance backward.

        Parameters
        ----------
        input : Tensor
            The layer input.
        explain : bool or None
            True: explain mode; False: exactly the torch layer; None (default): explain mode while an explanation
            of a model holding this layer is active (:func:`torchlrp.explain`, :class:`torchlrp.Sequential` or
            :func:`torchlrp.rules_applied`).
        rule : str, Rule, Composite or None
            The rule; None uses the rule set on the layer, else ``"epsilon"`` (TorchLRP's default).
        pattern : Tensor or None
            The layer's pattern for ``"patternnet"``/``"patternattribution"``.
        input_nonnegative, feeds_rectifier : bool or None
            What :func:`torchlrp.convert` found for this call: its input is non-negative (it follows a ReLU), its
            output goes straight into a ``torchlrp.ReLU``. None: the layer's attributes of the same names (and, in
            a ``Sequential``, what the active explanation found by position).
        first : bool or None
            Whether this call is the first layer the input meets (it then takes a composite's ``first`` rule).
            None: decided per module (the first layer registered, or the one ``convert`` found).

        Returns
        -------
        Tensor
            The layer output (identical to the torch layer's), or its ReLU where the layer is explained together
            with the ``torchlrp.ReLU`` after it (``feeds_rectifier``; that ReLU then passes it on unchanged, so the
            model's output is the same). Forward hooks on the layer see that rectified output.
        """
        return self._run(input, {}, explain, rule, pattern, input_nonnegative, feeds_rectifier, first)

    def _run(self, input: Tensor, call: dict[str, Any], explain: bool | None, rule: "str | Rule | Composite | None",
             pattern: Tensor | None, input_nonnegative: bool | None, feeds_rectifier: bool | None,
             first: bool | None) -> Tensor:
        """The forward, with ``call`` the torch layer's own extra arguments (``output_size``)."""
        return self._explained(input, call, explain, rule, pattern, input_nonnegative, feeds_rectifier, first,
                               self._plain_forward, self._extra_geometry)

    def _explained(self, input: Tensor, call: dict[str, Any], explain: bool | None,
                   rule: "str | Rule | Composite | None", pattern: Tensor | None, input_nonnegative: bool | None,
                   feeds_rectifier: bool | None, first: bool | None, plain: Any, geometry: Any,
                   parameters: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """The forward: ``plain(input, **call)`` outside explanations, else the rule's autograd Function on the map
        of ``parameters`` (default: the layer's own weight and bias) with ``geometry(input, **call)``."""
        state = current()
        active = state is not None and self in state.rules
        if explain is None:
            explain = active
        if not explain:
            return plain(input, **call)
        rule = self._explain_rule(rule, state, first)
        op = self._operator(pattern, state, input_nonnegative, geometry(input, **call), parameters)
        record = recorder().record
        if state is not None and state.run_time:  # the conservation check: what its bias and stabilizer may take
            if op.bias is not None:
                state.biases.append(op.bias)  # (read only where the residual needs it)
            if stabilizer(rule) > 0:
                record = _measuring(record, state)
        # an explicit feeds_rectifier (the converted graph's, or False from a concept tap) wins over the marks
        rectified = (self.feeds_rectifier or (active and self in state.feeds_rectifier)) if feeds_rectifier is None \
            else feeds_rectifier
        if active and rectified and rule.folds_rectifier(op):
            op = dataclasses.replace(op, rectified=True)
        return AffineRelevance.apply(input, op, rule, record)

    def explained_with(self, input: Tensor, rule: Rule | None, parameters: tuple[Tensor, Tensor | None]) -> Tensor:
        """The layer explained on ``input`` with other parameters (a batch norm folded into it at run time).

        Parameters
        ----------
        input : Tensor
            The layer input.
        rule : Rule or None
            The rule (None: the active explanation's rule for this layer).
        parameters : tuple of Tensor
            ``(weight, bias)`` to use instead of the layer's own.

        Returns
        -------
        Tensor
            The output of the map of ``parameters``, explained by ``rule``.
        """
        return self._explained(input, {}, True, rule, None, None, None, None, self._plain_forward,
                               self._extra_geometry, parameters)

    def _plain_forward(self, input: Tensor) -> Tensor:
        return super().forward(input)

    def _extra_geometry(self, input: Tensor) -> dict[str, Any]:
        """Keyword arguments of :class:`AffineOp` that depend on the call (none but for transposed convolutions)."""
        return {}

    def _explain_rule(self, rule: "str | Rule | Composite | None", state: ExplainState | None,
                      first: bool | None) -> Rule:
        if rule is None:
            if state is None or self not in state.rules:
                return resolve("epsilon")
            if state.first_layer is self and first is None and state.counts_first_calls:
                first, state.first_calls = state.first_calls == 0, state.first_calls + 1
            if first is False and state.first_layer is self and state.repeat_rule is not None:
                return state.repeat_rule
            return state.rules[self]
        if isinstance(rule, Composite):
            return rule.rule_for("", self, is_first=True)
        return resolve(rule)

    def affine_op(self, pattern: Tensor | None = None) -> AffineOp:
        """Return the layer's map and transpose as an :class:`~torchlrp.functional.AffineOp`.

        The active explanation (if any) is read once: a batch norm to fold, the layer's pattern and whether its
        input is non-negative.

        Parameters
        ----------
        pattern : Tensor or None
            Pattern to attach (defaults to the active explanation's pattern for this layer).

        Returns
        -------
        AffineOp
            The operator.

        Raises
        ------
        ValueError
            If the pattern does not have the weight's shape.
        """
        return self._operator(pattern, current())

    def _operator(self, pattern: Tensor | None, state: ExplainState | None, input_nonnegative: bool | None = None,
                  extra: dict[str, Any] | None = None,
                  parameters: tuple[Tensor, Tensor | None] | None = None) -> AffineOp:
        weight, bias = (self.weight, self.bias) if parameters is None else parameters
        shape = weight.shape
        nonnegative = self.input_nonnegative if input_nonnegative is None else input_nonnegative
        fused = False
        if state is not None:
            fused = state.fused
            batchnorm = state.batchnorms.get(self)
            if batchnorm is not None:
                weight, bias = fold_batchnorm(weight, bias, batchnorm)
            pattern = state.patterns.get(self) if pattern is None else pattern
            nonnegative = nonnegative or (input_nonnegative is None and self in state.nonnegative)
        if pattern is not None and pattern.shape != shape:
            raise ValueError(f"pattern of shape {tuple(pattern.shape)} does not match the weight shape "
                             f"{tuple(shape)} of {type(self).__name__}")
        return AffineOp(weight, bias, input_nonnegative=nonnegative, pattern=pattern, fused=fused, **self._geometry(),
                        **(extra or {}))

    def _geometry(self) -> dict[str, Any]:
        """Keyword arguments of :class:`AffineOp` describing the map (none for a linear layer)."""
        return {}

    @classmethod
    def from_torch(cls, module: torch.nn.Module) -> "ExplainableAffine":
        """Return a twin of a torch layer with a copy of its parameters and buffers.

        Parameters
        ----------
        module : torch.nn.Module
            A layer of the torch class this class subclasses.

        Returns
        -------
        ExplainableAffine
            The new layer, in the same training mode, on the same device and dtype.

        Raises
        ------
        TypeError
            If ``module`` is not an instance of the matching torch class.
        """
        base = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn"))
        if not isinstance(module, base):
            raise TypeError(f"{cls.__name__}.from_torch expects a {base.__module__}.{base.__name__}, "
                            f"got {type(module).__name__}")
        twin = cls(**cls._constructor_arguments(module), device=module.weight.device, dtype=module.weight.dtype)
        twin.load_state_dict(module.state_dict())
        twin.train(module.training)
        return twin

    @staticmethod
    def _constructor_arguments(module: torch.nn.Module) -> dict[str, Any]:
        raise NotImplementedError


class Linear(ExplainableAffine, torch.nn.Linear):
    """``torch.nn.Linear`` with an explain mode (see :class:`ExplainableAffine`)."""

    @staticmethod
    def _constructor_arguments(module: torch.nn.Linear) -> dict[str, Any]:
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}


class _ExplainableConv(ExplainableAffine):
    """Convolution twins: the padding is split into what the convolution does and what must be padded first."""

    def _geometry(self) -> dict[str, Any]:
        n = len(self.kernel_size)
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            conv_padding, explicit, mode = tuple(self.padding), None, "constant"
        else:
            conv_padding = (0,) * n
            explicit = tuple(self._reversed_padding_repeated_twice)
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            if not any(explicit):
                explicit = None
        return {"spatial_dims": n, "stride": tuple(self.stride), "padding": conv_padding,
                "dilation": tuple(self.dilation), "groups": self.groups, "explicit_padding": explicit,
                "padding_mode": mode}

    @staticmethod
    def _constructor_arguments(module: torch.nn.Module) -> dict[str, Any]:
        return {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}


class Conv1d(_ExplainableConv, torch.nn.Conv1d):
    """``torch.nn.Conv1d`` with an explain mode (see :class:`ExplainableAffine`)."""


class Conv2d(_ExplainableConv, torch.nn.Conv2d):
    """``torch.nn.Conv2d`` with an explain mode (see :class:`ExplainableAffine`)."""


class Conv3d(_ExplainableConv, torch.nn.Conv3d):
    """``torch.nn.Conv3d`` with an explain mode (see :class:`ExplainableAffine`)."""


class _ExplainableConvTranspose(_ExplainableConv):
    """Transposed-convolution twins: the map is ``conv_transpose``, its transpose the convolution."""

    def forward(self, input: Tensor, output_size: list[int] | None = None, explain: bool | None = None,
                rule: "str | Rule | Composite | None" = None, pattern: Tensor | None = None, *,
                input_nonnegative: bool | None = None, feeds_rectifier: bool | None = None,
                first: bool | None = None) -> Tensor:
        """Apply the transposed convolution; in explain mode, attach the rule's relevance backward.

        Parameters
        ----------
        input : Tensor
            The layer input.
        output_size : list of int, optional
            As for the torch layer (chooses the output padding).
        explain, rule, pattern, input_nonnegative, feeds_rectifier, first
            As for :meth:`ExplainableAffine.forward`.

        Returns
        -------
        Tensor
            The layer output (identical to the torch layer's).
        """
        return self._run(input, {"output_size": output_size}, explain, rule, pattern, input_nonnegative,
                         feeds_rectifier, first)

    def _plain_forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        return super(ExplainableAffine, self).forward(input, output_size)

    def _extra_geometry(self, input: Tensor, output_size: list[int] | None = None) -> dict[str, Any]:
        n = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, list(self.stride), list(self.padding),
                                              list(self.kernel_size), n, list(self.dilation))
        return {"transposed": True, "output_padding": tuple(output_padding)}

    def _geometry(self) -> dict[str, Any]:
        geometry = super()._geometry()
        geometry["explicit_padding"] = None
        return geometry

    @staticmethod
    def _constructor_arguments(module: torch.nn.Module) -> dict[str, Any]:
        arguments = _ExplainableConv._constructor_arguments(module)
        arguments["output_padding"] = module.output_padding
        return arguments


class ConvTranspose1d(_ExplainableConvTranspose, torch.nn.ConvTranspose1d):
    """``torch.nn.ConvTranspose1d`` with an explain mode (see :class:`ExplainableAffine`)."""


class ConvTranspose2d(_ExplainableConvTranspose, torch.nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` with an explain mode (see :class:`ExplainableAffine`)."""


class ConvTranspose3d(_ExplainableConvTranspose, torch.nn.ConvTranspose3d):
    """``torch.nn.ConvTranspose3d`` with an explain mode (see :class:`ExplainableAffine`)."""
