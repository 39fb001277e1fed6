"""Sums of branches as a module, so that relevance is split between the summands instead of copied to each."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from torchlrp.functional.kernels import sum_forward
from torchlrp.functional.operations import weighted_sum_rule
from torchlrp.functional.relevance import sum_relevance
from torchlrp.core.state import ExplainState, current
from torchlrp.modules.operation import Operation


def _absorbing(value: Tensor | float, reference: Tensor, state: ExplainState, label: str) -> Tensor | float:
    """A constant summand as a tensor whose relevance the explanation records under ``label``."""
    if not isinstance(value, Tensor):
        if not isinstance(value, (int, float)):
            return value
        value = torch.tensor(float(value), dtype=reference.dtype, device=reference.device)
    if not value.dtype.is_floating_point:
        return value
    return state.absorb(value, label)


class Add(Operation, torch.nn.Module):
    """Sum of tensors (a skip connection, ``x + y``, ``x - y``, ``x + constant``), explainable.

    While an explanation of its model is active (:func:`torchlrp.rules_applied`) each summand receives
    relevance in proportion to its contribution, ``R_i = s_i x_i R / stab(sum_j s_j x_j + c)`` (``s_i`` the
    summand's sign, ``c`` a constant -- a number -- which absorbs its share like a bias; a summand broadcast
    against the others gets its relevance summed over the broadcast dimensions). Without it (or for
    gradient-type rules) this is the plain sum. A plain ``a + b`` in a model would send the full relevance down
    both branches and double it at every block; :func:`torchlrp.convert` puts an ``Add`` in place of every sum
    through which relevance flows.

    ``feeds_rectifier`` marks a sum that goes straight into a :class:`torchlrp.ReLU`: while explaining, the ReLU
    is applied here and explained together with the sum (same relevance, one tensor less kept). ``convert`` sets
    it per call (keyword ``feeds_rectifier=`` of :meth:`forward`); the attribute is the default for other calls.

    Parameters
    ----------
    signs : sequence of float, optional
        ``1.0`` or ``-1.0`` per argument (default: all ``1.0``); ``Add(signs=(1, -1))(a, b)`` is ``a - b``.
    constant_summands : sequence of int
        Arguments that carry no relevance (a position embedding, a constant computed from parameters or buffers;
        set by :func:`torchlrp.convert`): the relevance they take is recorded under ``label``
        (``explain(..., return_absorbed=True)``), not passed on.
    label : str
        The name the absorbed share is reported under (the module's name in its model).
    """

    feeds_rectifier: bool = False

    def __init__(self, signs: Sequence[float] | None = None, constant_summands: Sequence[int] = (),
                 label: str = "") -> None:
        super().__init__()
        if signs is not None and any(float(s) not in (1.0, -1.0) for s in signs):
            raise ValueError(f"signs must be 1 or -1, got {tuple(signs)}")
        self.signs = None if signs is None else tuple(float(s) for s in signs)
        self.constant_summands = tuple(constant_summands)
        self.label = label

    def forward(self, *inputs: Tensor | float, feeds_rectifier: bool | None = None) -> Tensor:
        """Sum ``inputs`` (each with its sign).

        Parameters
        ----------
        *inputs : Tensor or number
            Two or more summands, broadcastable to one shape.
        feeds_rectifier : bool or None
            Whether this call's output goes straight into a ``torchlrp.ReLU`` (None: the module's attribute).

        Returns
        -------
        Tensor
            Their sum (while explaining a sum that feeds a ReLU: its ReLU, which the following
            ``torchlrp.ReLU`` passes on unchanged).

        Raises
        ------
        ValueError
            If ``signs`` was given and does not have one entry per argument.
        """
        signs = self.signs or (1.0,) * len(inputs)
        if len(signs) != len(inputs):
            raise ValueError(f"Add with signs {self.signs} takes {len(signs)} arguments, got {len(inputs)}")
        rule = self.operation_rule()
        if rule is None:
            return self._plain(inputs, signs)
        state = current()
        if self.constant_summands:  # constants (a position embedding, a buffer, a number): their share is reported
            label = self.label or "add"
            reference = next(x for x in inputs if isinstance(x, Tensor))
            inputs = tuple(_absorbing(x, reference, state, label) if index in self.constant_summands else x
                           for index, x in enumerate(inputs))
        tensors = [(x, s) for x, s in zip(inputs, signs) if isinstance(x, Tensor)]
        constants = [x * s for x, s in zip(inputs, signs) if not isinstance(x, Tensor)]
        if not tensors:
            return self._plain(inputs, signs)
        shapes = {t.shape for t, _ in tensors}
        if not constants and len(tensors) > 1 and len(shapes) == 1 and all(s == 1.0 for s in signs):
            rectified = self.feeds_rectifier if feeds_rectifier is None else feeds_rectifier
            rectified = rectified or self in state.feeds_rectifier
            return sum_relevance(inputs, rule.epsilon, fused=state.fused, rectified=rectified)
        constant = sum(constants) if constants else None
        return weighted_sum_rule([t for t, _ in tensors], [s for _, s in tensors], constant, rule.epsilon)

    @staticmethod
    def _plain(inputs: tuple, signs: tuple[float, ...]) -> Tensor:
        if len(inputs) == 2 and signs == (1.0, -1.0):
            return inputs[0] - inputs[1]
        if all(s == 1.0 for s in signs):
            return sum_forward(*inputs)
        total = inputs[0] if signs[0] == 1.0 else -inputs[0]
        for summand, sign in zip(inputs[1:], signs[1:]):
            total = total + summand if sign == 1.0 else total - summand
        return total

    def extra_repr(self) -> str:  # noqa: D102
        extra = "" if self.signs is None else f"signs={self.signs}"
        return extra + (f", constant_summands={self.constant_summands}" if self.constant_summands else "")
