"""Element-wise activations explained by the identity rule: relevance passes them unchanged.

zennit and AttnLRP treat every element-wise non-linearity this way (zennit's ``Pass`` rule, AttnLRP's identity
rule for GELU/SiLU): ``R_x = R_y``. Each class subclasses its torch activation (same constructor, same
``state_dict``); outside an explanation (or under a gradient-type rule) its forward is the torch one.
``torchlrp.convert`` swaps a model's activations for these and makes them out-of-place.

``torchlrp.ReLU`` is not among them: a ReLU passes relevance where it is active, which is its gradient, and a layer
before it can take it in (see :mod:`torchlrp.modules.rectifier`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchlrp.functional.operations import identity_rule
from torchlrp.modules.operation import Operation


class IdentityRuleActivation(Operation):
    """Mixin: a torch activation whose explain-mode backward passes relevance unchanged."""

    def forward(self, input: Tensor) -> Tensor:
        """Apply the activation.

        Parameters
        ----------
        input : Tensor
            The input.

        Returns
        -------
        Tensor
            The torch activation's output; while explaining, its backward is the identity rule.
        """
        if self.operation_rule() is None:
            return super().forward(input)
        return identity_rule(input, super().forward)


class ReLU6(IdentityRuleActivation, torch.nn.ReLU6):
    """``torch.nn.ReLU6`` explained by the identity rule."""


class LeakyReLU(IdentityRuleActivation, torch.nn.LeakyReLU):
    """``torch.nn.LeakyReLU`` explained by the identity rule."""


class PReLU(IdentityRuleActivation, torch.nn.PReLU):
    """``torch.nn.PReLU`` explained by the identity rule."""


class Hardtanh(IdentityRuleActivation, torch.nn.Hardtanh):
    """``torch.nn.Hardtanh`` explained by the identity rule."""


class ELU(IdentityRuleActivation, torch.nn.ELU):
    """``torch.nn.ELU`` explained by the identity rule."""


class CELU(IdentityRuleActivation, torch.nn.CELU):
    """``torch.nn.CELU`` explained by the identity rule."""


class SELU(IdentityRuleActivation, torch.nn.SELU):
    """``torch.nn.SELU`` explained by the identity rule."""


class SiLU(IdentityRuleActivation, torch.nn.SiLU):
    """``torch.nn.SiLU`` explained by the identity rule."""


class GELU(IdentityRuleActivation, torch.nn.GELU):
    """``torch.nn.GELU`` explained by the identity rule."""


class Mish(IdentityRuleActivation, torch.nn.Mish):
    """``torch.nn.Mish`` explained by the identity rule."""


class Hardswish(IdentityRuleActivation, torch.nn.Hardswish):
    """``torch.nn.Hardswish`` explained by the identity rule."""


class Hardsigmoid(IdentityRuleActivation, torch.nn.Hardsigmoid):
    """``torch.nn.Hardsigmoid`` explained by the identity rule (as a gate it receives no relevance)."""


class Sigmoid(IdentityRuleActivation, torch.nn.Sigmoid):
    """``torch.nn.Sigmoid`` explained by the identity rule (as a gate it receives no relevance)."""


class Tanh(IdentityRuleActivation, torch.nn.Tanh):
    """``torch.nn.Tanh`` explained by the identity rule."""


class Softplus(IdentityRuleActivation, torch.nn.Softplus):
    """``torch.nn.Softplus`` explained by the identity rule."""


#: torch activation class -> its identity-rule twin
ACTIVATION_TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.ReLU6: ReLU6, torch.nn.LeakyReLU: LeakyReLU, torch.nn.PReLU: PReLU, torch.nn.Hardtanh: Hardtanh,
    torch.nn.ELU: ELU, torch.nn.CELU: CELU, torch.nn.SELU: SELU, torch.nn.SiLU: SiLU, torch.nn.GELU: GELU,
    torch.nn.Mish: Mish, torch.nn.Hardswish: Hardswish, torch.nn.Hardsigmoid: Hardsigmoid,
    torch.nn.Sigmoid: Sigmoid, torch.nn.Tanh: Tanh, torch.nn.Softplus: Softplus,
}
