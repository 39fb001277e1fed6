"""Max pooling: relevance to the winner (its gradient, the default) or in proportion to the pooled activations.

Seed 004's ``relprop_pool`` offers both for max pooling. A composite chooses per model
(``Composite(max_pooling="proportional")``) or per layer (``by_name``/``by_type`` give a max pooling ``Gradient``
for winner-takes-all or ``Epsilon`` for the proportional split). The proportional split of a window is that of its
mean (or sum: the split does not depend on the window's scale): ``R_i = x_i * sum_w R_w / stab(sum_{j in w} x_j)``,
so an average pooling with the same windows gives it.

``MaxPool1d/2d/3d`` are TorchLRP's names (``from lrp import MaxPool2d``); they are ``torch.nn.MaxPool*d`` and take
the same choice. :class:`MaxPool` replaces ``F.max_pool2d(x, ...)`` calls in models made by
:func:`torchlrp.convert`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from torchlrp.functional.relevance import proportional
from torchlrp.core.kinds import MaxPooling
from torchlrp.modules.operation import FunctionOperation

_AVERAGES = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVERAGES = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_SPATIAL = {torch.nn.MaxPool1d: 1, torch.nn.MaxPool2d: 2, torch.nn.MaxPool3d: 3, torch.nn.AdaptiveMaxPool1d: 1,
            torch.nn.AdaptiveMaxPool2d: 2, torch.nn.AdaptiveMaxPool3d: 3}


class MaxPool1d(torch.nn.MaxPool1d):
    """``torch.nn.MaxPool1d`` under TorchLRP's name; relevance by the composite's max-pooling choice."""


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` under TorchLRP's name (``lrp.MaxPool2d``); relevance by the composite's max-pooling
    choice (winner takes all by default, as TorchLRP)."""


class MaxPool3d(torch.nn.MaxPool3d):
    """``torch.nn.MaxPool3d`` under TorchLRP's name; relevance by the composite's max-pooling choice."""


def _spatial(module: torch.nn.Module) -> int:
    return next(dims for kind, dims in _SPATIAL.items() if isinstance(module, kind))


def window_mean(pool: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """Return the average pooling over the same windows as the max pooling module ``pool``.

    Parameters
    ----------
    pool : torch.nn.Module
        A ``torch.nn.MaxPool1d/2d/3d`` or ``AdaptiveMaxPool1d/2d/3d``.

    Returns
    -------
    callable
        ``input -> mean over each window`` (zero padding counted, which does not change the proportional split).

    Raises
    ------
    ValueError
        For a dilated max pooling (average pooling has no dilation) or one that returns indices.
    """
    if getattr(pool, "return_indices", False):
        raise ValueError(f"{pool!r} returns indices; the proportional split needs a max pooling that returns only "
                         f"the pooled values (or use winner-takes-all, its gradient)")
    spatial = _spatial(pool)
    if isinstance(pool, (torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d)):
        average, output_size = _ADAPTIVE_AVERAGES[spatial], pool.output_size
        return lambda input: average(input, output_size)
    dilation = pool.dilation if isinstance(pool.dilation, tuple) else (pool.dilation,)
    if any(d != 1 for d in dilation):
        raise ValueError(f"{pool!r} is dilated; the proportional split of max pooling supports dilation 1 only "
                         f"(winner-takes-all, its gradient, supports every max pooling)")
    average = _AVERAGES[spatial]
    kernel_size, stride, padding, ceil_mode = pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode
    return lambda input: average(input, kernel_size, stride, padding, ceil_mode, True)


def proportional_max_pool(pool: torch.nn.Module, input: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Max-pool ``input`` with ``pool``; relevance splits in proportion to the pooled activations of each window.

    Parameters
    ----------
    pool : torch.nn.Module
        A torch max pooling module (see :func:`window_mean`).
    input : Tensor
        Its input.
    epsilon : float
        Stabilizer of each window's sum.

    Returns
    -------
    Tensor
        ``pool(input)``; its backward gives ``R_i = x_i * sum_w R_w / stab(sum_{j in w} x_j)``.
    """
    return proportional(input, window_mean(pool), epsilon, value=pool.forward)


_PARAMETERS = {
    F.max_pool1d: (torch.nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool2d: (torch.nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool3d: (torch.nn.MaxPool3d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.adaptive_max_pool1d: (torch.nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    F.adaptive_max_pool2d: (torch.nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    F.adaptive_max_pool3d: (torch.nn.AdaptiveMaxPool3d, ("output_size", "return_indices")),
}


@MaxPooling.register
class MaxPool(FunctionOperation):
    """A functional max pooling call (``F.max_pool2d(x, 3, 2)``) in a model made by :func:`torchlrp.convert`.

    Relevance as for the ``torch.nn.MaxPool*d`` modules: winner takes all (a gradient-type rule), or in
    proportion to the pooled activations (``Epsilon``), as the composite chooses.

    Parameters
    ----------
    function : callable
        One of ``F.max_pool1d/2d/3d``, ``F.adaptive_max_pool1d/2d/3d``.
    """

    def __init__(self, function: Callable[..., Tensor]) -> None:
        if function not in _PARAMETERS:
            raise ValueError(f"MaxPool wraps torch's functional max poolings, not {function!r}")
        super().__init__(function)

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Apply the max pooling.

        Parameters
        ----------
        input : Tensor
            The input.
        *args, **kwargs
            The pooling's other arguments.

        Returns
        -------
        Tensor
            ``function(input, *args, **kwargs)``, explained by the composite's max-pooling choice.
        """
        rule = self.operation_rule()
        if rule is None:
            return self.function(input, *args, **kwargs)
        module_type, names = _PARAMETERS[self.function]
        pool = module_type(**dict(zip(names, args)), **kwargs)
        return proportional_max_pool(pool, input, rule.epsilon)
