"""Affine operators (linear maps and N-d convolutions) together with their exact transposes.

A rule needs two things from a layer: the layer's map applied to a (modified) input with (modified) parameters,
and the transposed map, which sends a signal on the output back onto the input. :class:`AffineOp` provides
both for ``Linear`` and ``Conv1d/2d/3d`` with every hyperparameter (stride, dilation, groups, integer/tuple/'same'/
'valid' padding, every ``padding_mode``). Explicit (non-zero or asymmetric) padding is part of the operator: the
transpose folds the padded border back onto the input, so that rules never see padded tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV_FUNCTIONS = (None, F.conv1d, F.conv2d, F.conv3d)
_CONV_TRANSPOSE_FUNCTIONS = (None, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclass(frozen=True)
class AffineOp:
    """An affine layer's map and its transpose, with fixed parameters.

    Parameters
    ----------
    weight : Tensor
        The layer's weight (possibly with a batch norm folded in).
    bias : Tensor or None
        The layer's bias.
    spatial_dims : int
        0 for a linear layer, 1, 2 or 3 for a convolution.
    stride, padding, dilation : tuple of int
        Convolution hyperparameters (``padding`` is the symmetric zero padding done by the convolution itself).
    groups : int
        Convolution groups.
    explicit_padding : tuple of int or None
        Padding done before the convolution with :func:`torch.nn.functional.pad`, in its (reversed) order.
    padding_mode : str
        Mode of the explicit padding, as :func:`torch.nn.functional.pad` names it.
    input_nonnegative : bool
        True when the layer's input is known (statically) to be non-negative, e.g. because it follows a ReLU;
        rules then skip their negative-input terms.
    pattern : Tensor or None
        The layer's signal pattern (weight shape), for the PatternNet/PatternAttribution rules.
    fused : bool
        Run the rule's elementwise work fused by ``torch.compile`` (see :mod:`torchlrp.functional.kernels`).
    rectified : bool
        The layer's output goes straight into a ReLU that is folded into it: the explain-mode forward returns
        ``relu(z)`` and the rule works from that (see :meth:`torchlrp.rules.Rule.forward_rectified`).
    transposed : bool
        A transposed convolution (weight ``(in, out / groups, *kernel)``): the map is ``conv_transpose`` and its
        transpose the convolution with the same hyperparameters.
    output_padding : tuple of int
        The transposed convolution's output padding.
    """

    weight: Tensor
    bias: Tensor | None
    spatial_dims: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    explicit_padding: tuple[int, ...] | None = None
    padding_mode: str = "constant"
    input_nonnegative: bool = False
    pattern: Tensor | None = None
    fused: bool = False
    rectified: bool = False
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    def cast(self, dtype: torch.dtype) -> "AffineOp":
        """This operator with weight, bias and pattern in ``dtype`` (itself when they already are).

        Parameters
        ----------
        dtype : torch.dtype
            The dtype to compute in (under autocast: the layer output's).

        Returns
        -------
        AffineOp
            The operator in ``dtype``.
        """
        if self.weight.dtype == dtype:
            return self
        return dataclasses.replace(self, weight=self.weight.to(dtype),
                                   bias=None if self.bias is None else self.bias.to(dtype),
                                   pattern=None if self.pattern is None else self.pattern.to(dtype))

    def channel_dim(self, ndim: int) -> int:
        """Return the channel (feature) dimension of a layer output with ``ndim`` dimensions.

        Parameters
        ----------
        ndim : int
            Number of dimensions of the output.

        Returns
        -------
        int
            1 for a convolution (``(N, C, ...)``), ``ndim - 1`` for a linear layer (``(..., features)``).
        """
        return 1 if self.spatial_dims else ndim - 1

    @property
    def weight_input_dim(self) -> int:
        """The weight's dimension of input channels: 1 (``Linear``, convolutions), 0 (transposed convolutions)."""
        return 0 if self.transposed else 1

    def __call__(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Apply the layer's map to ``input`` with the given parameters.

        Parameters
        ----------
        input : Tensor
            Input of the layer's shape (or with batch size 1, e.g. for bounds or unit inputs).
        weight : Tensor
            Weight of the layer's weight shape.
        bias : Tensor or None
            Bias, or None for none.

        Returns
        -------
        Tensor
            The output.
        """
        if self.spatial_dims == 0:
            return F.linear(input, weight, bias)
        if self.explicit_padding is not None:
            input = F.pad(input, self.explicit_padding, mode=self.padding_mode)
        if self.transposed:
            return _CONV_TRANSPOSE_FUNCTIONS[self.spatial_dims](input, weight, bias, self.stride, self.padding,
                                                                self.output_padding, self.groups, self.dilation)
        convolution = _CONV_FUNCTIONS[self.spatial_dims]
        return convolution(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, signal: Tensor, input_shape: torch.Size, weight: Tensor) -> Tensor:
        """Send ``signal`` (of the output's shape) back through the transposed map.

        Parameters
        ----------
        signal : Tensor
            Tensor of the output's shape.
        input_shape : torch.Size
            Shape of the (unpadded) input.
        weight : Tensor
            The weight whose transpose to apply.

        Returns
        -------
        Tensor
            Tensor of ``input_shape``: ``W^T signal``.
        """
        if self.spatial_dims == 0:
            return signal.matmul(weight)
        if self.transposed:
            convolution = _CONV_FUNCTIONS[self.spatial_dims]
            mapped = convolution(signal, weight, None, self.stride, self.padding, self.dilation, self.groups)
            crop = (Ellipsis, *(slice(0, size) for size in input_shape[-self.spatial_dims:]))
            return mapped if mapped.shape == input_shape else mapped[crop]
        padded_shape = self._padded_shape(input_shape)
        shape_carrier = signal.new_empty(padded_shape)  # never read; an expanded one would be copied
        n = self.spatial_dims
        transposed = torch.ops.aten.convolution_backward(
            signal, shape_carrier, weight, None, self.stride, self.padding, self.dilation,
            False, (0,) * n, self.groups, (True, False, False),
        )[0]
        if self.explicit_padding is None:
            return transposed
        return self._fold_padding(transposed, input_shape)

    def transpose_each(self, signal: Tensor, input_shape: torch.Size, weights: list[Tensor]) -> list[Tensor]:
        """Send ``signal`` back through the transposed map of each of ``weights``.

        Where the weights are small (``groups == 1`` and together not larger than the signal, e.g. the first
        layer of an image model, whose 3-channel transposed maps are inefficient one by one) this is one transposed
        map of the weights stacked on the input channels, split afterwards.

        Parameters
        ----------
        signal : Tensor
            Tensor of the output's shape.
        input_shape : torch.Size
            Shape of the (unpadded) input.
        weights : list of Tensor
            Weights of the layer's weight shape.

        Returns
        -------
        list of Tensor
            ``W^T signal`` for each weight, each of ``input_shape``.
        """
        if len(weights) == 1 or self.groups != 1 or sum(w.numel() for w in weights) > signal.numel():
            return [self.transpose(signal, input_shape, weight) for weight in weights]
        channels = self.channel_dim(len(input_shape))
        shape = list(input_shape)
        shape[channels] *= len(weights)
        stacked = self.transpose(signal, torch.Size(shape), torch.cat(weights, dim=self.weight_input_dim))
        return list(stacked.chunk(len(weights), dim=channels))

    def _padded_shape(self, input_shape: torch.Size) -> tuple[int, ...]:
        if self.explicit_padding is None:
            return tuple(input_shape)
        shape = list(input_shape)
        for i in range(self.spatial_dims):
            shape[-1 - i] += self.explicit_padding[2 * i] + self.explicit_padding[2 * i + 1]
        return tuple(shape)

    def _fold_padding(self, padded: Tensor, input_shape: torch.Size) -> Tensor:
        """Transpose of the explicit padding: crop (zeros) or sum the border copies back (other modes)."""
        if self.padding_mode == "constant":
            slices = [slice(None)] * (padded.dim() - self.spatial_dims)
            for i in reversed(range(self.spatial_dims)):
                left = self.explicit_padding[2 * i]
                slices.append(slice(left, left + input_shape[-1 - i]))
            return padded[tuple(slices)]
        with torch.enable_grad():
            carrier = padded.new_zeros(input_shape, requires_grad=True)
            padded_carrier = F.pad(carrier, self.explicit_padding, mode=self.padding_mode)
            (folded,) = torch.autograd.grad(padded_carrier, carrier, padded)
        return folded
