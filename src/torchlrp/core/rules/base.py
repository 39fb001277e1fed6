"""The rule interface: :class:`Rule` and the checks its subclasses share (see :mod:`torchlrp.rules` for the notation)."""
from __future__ import annotations

import abc
import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from torchlrp.functional.affine import AffineOp
from torchlrp.functional.rectified import RectifiedForm

#: what a rule's forward keeps for its backward
Saved = tuple[Tensor, ...]


def check_number(name: str, value: Any, minimum: float = 0.0) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name`` unless it is a finite number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def positive_part(tensor: Tensor | None) -> Tensor | None:
    """``max(tensor, 0)`` (None stays None)."""
    return None if tensor is None else tensor.clamp(min=0)


def absolute_value(tensor: Tensor | None) -> Tensor | None:
    """``|tensor|`` (None stays None)."""
    return None if tensor is None else tensor.abs()


class Rule(abc.ABC):
    """Base class of all rules for affine layers.

    Subclasses implement :meth:`forward` and :meth:`backward`. ``propagates_gradient`` tells the engine whether
    the rule propagates a (modified) gradient rather than relevance; parameter-free mixing layers (average pooling,
    residual sums) then pass the plain gradient instead of splitting proportionally. ``needs_pattern`` marks the
    rules that need a layer pattern (:mod:`torchlrp.patterns`).

    Rules that can take in a ReLU directly following their layer answer True to :meth:`folds_rectifier` and give
    their form on the units the ReLU lets through by :meth:`rectified_form`; the engine then explains layer and
    ReLU together (:mod:`torchlrp.functional.rectified`), keeping less from the forward.
    """

    propagates_gradient: bool = False
    needs_pattern: bool = False

    @abc.abstractmethod
    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:
        """Compute the layer output and the tensors the backward needs.

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        input : Tensor
            The layer input.

        Returns
        -------
        tuple
            ``(output, saved)``: the unmodified layer output and a tuple of tensors for :meth:`backward`.
        """

    @abc.abstractmethod
    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:
        """Compute the input relevance.

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        relevance : Tensor
            Relevance of the layer output.
        saved : tuple of Tensor
            What :meth:`forward` returned to save.
        input_shape : torch.Size
            Shape of the layer input.

        Returns
        -------
        Tensor
            Relevance of the layer input.
        """

    def folds_rectifier(self, op: AffineOp) -> bool:
        """Whether a ReLU directly following the layer can be explained together with it.

        Parameters
        ----------
        op : AffineOp
            The layer's map.

        Returns
        -------
        bool
            False by default; True where :meth:`rectified_form` is implemented for ``op``.
        """
        return False

    def forward_rectified(self, op: AffineOp, input: Tensor) -> Tensor:
        """Return ``relu(z)`` for a layer whose following ReLU is folded into it (see :meth:`folds_rectifier`).

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        input : Tensor
            The layer input.

        Returns
        -------
        Tensor
            The rectified output; the engine keeps it and the input for the backward, nothing else.
        """
        return op(input, op.weight, op.bias).relu_()

    def rectified_form(self, op: AffineOp, input: Tensor) -> RectifiedForm:
        """Return the rule's form on the units a following ReLU lets through (``z > 0``); called in the backward.

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        input : Tensor
            The layer input.

        Returns
        -------
        RectifiedForm
            The modified map and stabilizer (see :mod:`torchlrp.functional.rectified`).

        Raises
        ------
        NotImplementedError
            For a rule whose :meth:`folds_rectifier` is False.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot fold a following ReLU")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
