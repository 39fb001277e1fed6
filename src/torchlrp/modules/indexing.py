"""Operation modules for calls that move entries around and take constants in: concatenations with constant parts,
and ``index_add`` (a mixture of experts gathering its experts' outputs)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from torchlrp.core.state import current
from torchlrp.functional.operations import weighted_sum_rule
from torchlrp.functional.relevance import proportional
from torchlrp.modules.operation import Operation


class Concatenation(Operation, torch.nn.Module):
    """``torch.cat`` of activations and constants (a class token, registers, a parameter): an index map whose
    constant parts take the relevance that reaches them, reported under ``label``
    (``explain(..., return_absorbed=True)``) instead of flowing into the parameters.

    Parameters
    ----------
    function : callable
        ``torch.cat`` (or ``torch.concat``/``torch.concatenate``).
    constant_parts : sequence of int
        Which of the concatenated tensors are constants.
    label : str
        The name the absorbed shares are reported under (set by the engine: the site's name).
    names : sequence of str
        Per constant part, the name of the parameter or buffer it is (or is a view of), under which its share is
        reported instead; ``""`` where it has none.
    """

    def __init__(self, function: Callable[..., Tensor], constant_parts: Sequence[int], label: str = "",
                 names: Sequence[str] = ()) -> None:
        super().__init__()
        self.function = function
        self.constant_parts = tuple(constant_parts)
        self.label = label
        self.names = dict(zip(self.constant_parts, names))

    def forward(self, tensors: Sequence[Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """Concatenate ``tensors``.

        Parameters
        ----------
        tensors : sequence of Tensor
            The parts.
        *args, **kwargs
            The call's other arguments (``dim``).

        Returns
        -------
        Tensor
            ``function(tensors, *args, **kwargs)``.
        """
        state = current()
        if state is not None and self in state.rules:
            tensors = [state.absorb(part, self.names.get(index) or self.label or "cat")
                       if index in self.constant_parts and part.dtype.is_floating_point else part
                       for index, part in enumerate(tensors)]
        return self.function(tensors, *args, **kwargs)

    def extra_repr(self) -> str:  # noqa: D102
        return f"constant_parts={self.constant_parts}"


class IndexAdd(Operation, torch.nn.Module):
    """``input.index_add(dim, index, source, alpha=)``: the sources summed into rows of ``input``, each row's
    relevance split in proportion to ``input`` and the sources added to it (a constant ``input`` absorbs its
    share).

    Parameters
    ----------
    input_active : bool
        Whether ``input`` carries relevance (else it is a constant, such as the zeros experts' outputs are added
        into).
    """

    def __init__(self, input_active: bool = True) -> None:
        super().__init__()
        self.input_active = input_active

    def forward(self, input: Tensor, dim: int, index: Tensor, source: Tensor, *, alpha: float = 1) -> Tensor:
        """Add ``alpha * source`` into the rows ``index`` of ``input`` along ``dim``.

        Parameters
        ----------
        input, dim, index, source, alpha
            As for :meth:`torch.Tensor.index_add`.

        Returns
        -------
        Tensor
            The sum.
        """
        rule = self.operation_rule()
        if rule is None:
            return input.index_add(dim, index, source, alpha=alpha)
        zeros = torch.zeros_like(input, dtype=torch.result_type(input, source))
        scattered = proportional(source, lambda rows: zeros.index_add(dim, index, rows, alpha=alpha), rule.epsilon)
        if self.input_active:
            return weighted_sum_rule([input, scattered], (1.0, 1.0), epsilon=rule.epsilon)
        return weighted_sum_rule([scattered], (1.0,), constant=input, epsilon=rule.epsilon)

    def extra_repr(self) -> str:  # noqa: D102
        return f"input_active={self.input_active}"


__all__ = ["Concatenation", "IndexAdd"]
