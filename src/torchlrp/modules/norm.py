"""Normalization layers explained as the affine maps they are.

* ``BatchNorm1d/2d/3d`` that do not follow a linear/conv layer (DenseNet's norm -> ReLU -> conv, pre-activation
  blocks): in eval mode the per-channel affine map ``y = a x + b``, explained by the epsilon rule
  ``R_x = a x R / stab(y)`` (``b`` absorbs its share, like a bias). A batch norm that follows a linear/conv layer
  is folded into it by :func:`torchlrp.convert` instead.
* ``LayerNorm`` and ``GroupNorm``: the division by the standard deviation held constant (AttnLRP, Achtibat et al.
  2024), which makes them linear; see :class:`~torchlrp.functional.operations.NormalizationRelevance`.
* ``RMSNorm`` (torch >= 2.4): the root mean square held constant, which makes it diagonal: relevance passes
  unchanged (the identity rule, as for the activations).

Each class subclasses its torch layer (same constructor, same ``state_dict``). Outside an explanation, under a
gradient-type rule, or (batch norm) in training mode, the forward is the torch one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchlrp.functional.operations import ChannelAffineRelevance, group_norm_rule, layer_norm_rule
from torchlrp.modules.activation import IdentityRuleActivation
from torchlrp.modules.operation import Operation


class _ExplainableBatchNorm(Operation):
    """Mixin: an eval-mode batch norm explained as its per-channel affine map."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize.

        Parameters
        ----------
        input : Tensor
            ``(N, C, ...)`` input.

        Returns
        -------
        Tensor
            The torch batch norm's output; while explaining (eval mode), its backward is the epsilon rule.
        """
        rule = self.operation_rule()
        if rule is None or self.training or self.running_mean is None:
            return super().forward(input)
        return ChannelAffineRelevance.apply(input, self.running_mean, self.running_var, self.weight, self.bias,
                                            self.eps, rule.epsilon)


class BatchNorm1d(_ExplainableBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` explained as its per-channel affine map (see the module docstring)."""


class BatchNorm2d(_ExplainableBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` explained as its per-channel affine map (see the module docstring)."""


class BatchNorm3d(_ExplainableBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` explained as its per-channel affine map (see the module docstring)."""


class LayerNorm(Operation, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the standard deviation held constant while explaining (AttnLRP)."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize over the last ``len(normalized_shape)`` dimensions.

        Parameters
        ----------
        input : Tensor
            The input.

        Returns
        -------
        Tensor
            The torch layer norm's output.
        """
        rule = self.operation_rule()
        if rule is None:
            return super().forward(input)
        return layer_norm_rule(input, self.normalized_shape, self.weight, self.bias, self.eps, rule.epsilon)


class GroupNorm(Operation, torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with the standard deviation held constant while explaining (AttnLRP)."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize over each group of channels.

        Parameters
        ----------
        input : Tensor
            ``(N, C, ...)`` input.

        Returns
        -------
        Tensor
            The torch group norm's output.
        """
        rule = self.operation_rule()
        if rule is None:
            return super().forward(input)
        return group_norm_rule(input, self.num_groups, self.weight, self.bias, self.eps, rule.epsilon)


class BatchNormCall(Operation, torch.nn.Module):
    """``torch.nn.functional.batch_norm`` called in a forward (timm's ``BatchNormAct2d``) with eval statistics, where
    it does not follow a layer it folds into: explained as the per-channel affine map it is, as
    :class:`BatchNorm2d` is."""

    #: composites' ``by_name`` also matches the name of the module whose forward made the call
    addressed_by_owner = True

    def forward(self, input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None = None,
                bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
                eps: float = 1e-5) -> Tensor:
        """Normalize with the running statistics.

        Parameters
        ----------
        input, running_mean, running_var, weight, bias, training, momentum, eps
            As for :func:`torch.nn.functional.batch_norm` (``training`` must be False).

        Returns
        -------
        Tensor
            The batch norm's output; while explaining, its backward is the epsilon rule.
        """
        rule = self.operation_rule()
        if rule is None or training:
            return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                                  eps)
        return ChannelAffineRelevance.apply(input, running_mean, running_var, weight, bias, eps, rule.epsilon)


class GroupNormCall(Operation, torch.nn.Module):
    """``torch.nn.functional.group_norm`` called in a forward: explained as :class:`GroupNorm` is."""

    addressed_by_owner = True

    def forward(self, input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float = 1e-5) -> Tensor:
        """Normalize over each group of channels.

        Parameters
        ----------
        input, num_groups, weight, bias, eps
            As for :func:`torch.nn.functional.group_norm`.

        Returns
        -------
        Tensor
            The group norm's output.
        """
        rule = self.operation_rule()
        if rule is None:
            return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
        return group_norm_rule(input, num_groups, weight, bias, eps, rule.epsilon)


class RMSNorm(IdentityRuleActivation, getattr(torch.nn, "RMSNorm", torch.nn.Module)):
    """``torch.nn.RMSNorm`` (torch >= 2.4) with the root mean square held constant while explaining (AttnLRP).

    With ``s = 1 / rms(x)`` constant, ``y_i = w_i s x_i`` is a diagonal linear map without bias, and the epsilon
    rule ``x_i w_i s R_i / y_i`` gives ``R_i``: relevance passes the norm unchanged (the identity rule).
    """


#: torch normalization class -> its explainable twin
NORM_TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LayerNorm: LayerNorm, torch.nn.GroupNorm: GroupNorm,
    **({torch.nn.RMSNorm: RMSNorm} if hasattr(torch.nn, "RMSNorm") else {}),
}
