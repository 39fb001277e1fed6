"""What a concept of a layer is: channels, groups of channels (attention heads), or directions.

A concept definition turns the relevance ``R`` and activation ``a`` at a layer into per-concept values and masks
``R`` down to a selection of concepts. Each concept ``k`` takes a share ``W[k, c]`` of the relevance of each unit
``c`` along the concept dimension (the channel dimension of a convolution's ``(N, C, H, W)`` output, the last
dimension of a transformer's ``(N, T, D)`` hidden states), at every position ``p`` of the other dimensions:

* :class:`Channels` -- each unit is a concept (``W = I``);
* :class:`Groups` -- disjoint sets of units (``W[k, c] = 1`` where unit ``c`` belongs to group ``k``), e.g.
  :meth:`Groups.heads` for the heads of an attention's concatenated output;
* :class:`Directions` -- orthonormal directions ``v_k`` of the unit space, each the activation's component
  ``z_k = v_k . a`` along it; unit ``c``'s relevance goes to the directions as LRP-0 would through the change of
  basis ``a_c = sum_k v_kc z_k`` (``W[k, c] = v_kc z_k / a_c``).

The concept relevance is ``R_k(p) = sum_c W[k, c] R_c(p)``; conditioning on a set ``S`` keeps
``R'_c(p) = sum_{k in S} W[k, c] R_c(p)``. Where the concepts cover every unit (all channels; groups that
partition them; a complete orthonormal basis) the shares sum to one, so conditional heatmaps of a partition of the
concepts sum to the unconditional heatmap.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: where a concept definition reads a module's tensor: its output (default) or its first input
PLACES = ("output", "input")


class Concepts:
    """Base class of concept definitions (see the module docstring).

    Parameters
    ----------
    dim : int
        The unit dimension of the layer's tensor (1 for ``(N, C, ...)`` convolution outputs, -1 for
        ``(N, T, D)`` hidden states).
    at : {"output", "input"}
        Read the module's output (default) or its first input (e.g. an attention's output projection, whose input
        is the concatenation of the heads).
    """

    def __init__(self, dim: int = 1, at: str = "output") -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim == 0:
            raise ValueError(f"dim must be a non-zero int (the unit dimension; 0 is the batch), got {dim!r}")
        if at not in PLACES:
            raise ValueError(f"at must be one of {PLACES}, got {at!r}")
        self.dim, self.at = dim, at

    def units(self, tensor: Tensor) -> Tensor:
        """``tensor`` as ``(N, P, C)``: batch, positions (every other dimension, flattened), units.

        Parameters
        ----------
        tensor : Tensor
            The layer's relevance or activation, ``(N, ...)``.

        Returns
        -------
        Tensor
            A view or copy of shape ``(N, P, C)``.
        """
        if tensor.dim() < 2 or not -tensor.dim() <= self.dim < tensor.dim():
            raise ValueError(f"{type(self).__name__}(dim={self.dim}) does not fit a layer tensor of shape "
                             f"{tuple(tensor.shape)}: it needs a batch dimension and the unit dimension {self.dim}")
        moved = tensor.movedim(self.dim, -1)
        return moved.reshape(moved.shape[0], -1, moved.shape[-1])

    def count(self, units: int) -> int:
        """Number of concepts of a layer with ``units`` units.

        Parameters
        ----------
        units : int
            Size of the unit dimension.

        Returns
        -------
        int
        """
        raise NotImplementedError

    def relevance(self, relevance: Tensor, activation: Tensor) -> Tensor:
        """Per-position concept relevance.

        Parameters
        ----------
        relevance, activation : Tensor
            The layer's relevance and activation, ``(N, ...)``.

        Returns
        -------
        Tensor
            ``(N, P, K)``.
        """
        raise NotImplementedError

    def activation(self, activation: Tensor) -> Tensor:
        """Per-position concept activation.

        Parameters
        ----------
        activation : Tensor
            The layer's activation, ``(N, ...)``.

        Returns
        -------
        Tensor
            ``(N, P, K)``.
        """
        raise NotImplementedError

    def shares(self, selected: Tensor, activation: Tensor) -> Tensor:
        """The share of each unit's relevance that the selected concepts keep.

        Parameters
        ----------
        selected : Tensor
            ``(N, K)`` float, 1 for the concepts a row is conditioned on.
        activation : Tensor
            The layer's activation, ``(N, ...)``.

        Returns
        -------
        Tensor
            ``(N, P, C)`` or broadcastable to it (``(N, 1, C)``).
        """
        raise NotImplementedError

    def mask(self, relevance: Tensor, activation: Tensor, selected: Tensor) -> Tensor:
        """``relevance`` kept for the selected concepts only (the conditioning of CRP).

        Parameters
        ----------
        relevance, activation : Tensor
            The layer's relevance and activation, ``(N, ...)``.
        selected : Tensor
            ``(N, K)`` float, 1 for the concepts a row is conditioned on.

        Returns
        -------
        Tensor
            Of ``relevance``'s shape.
        """
        units = self.units(relevance)
        return self._like(units * self.shares(selected.to(units.dtype), activation), relevance)

    def mask_at(self, relevance: Tensor, activation: Tensor, selected: Tensor, positions: Tensor) -> Tensor:
        """As :meth:`mask`, and zero everywhere but one position per sample (one neuron of each concept).

        Parameters
        ----------
        relevance, activation : Tensor
            The layer's relevance and activation, ``(N, ...)``.
        selected : Tensor
            ``(N, K)`` float, 1 for the concepts a row is conditioned on.
        positions : Tensor
            ``(N,)`` int: the position (index into the flattened non-unit dimensions, as :meth:`units` orders
            them) kept in each row.

        Returns
        -------
        Tensor
            Of ``relevance``'s shape.
        """
        units = self.units(relevance)
        only = torch.zeros(units.shape[:2], dtype=units.dtype, device=units.device)
        only[torch.arange(len(units), device=units.device), positions.to(units.device)] = 1.0
        return self._like(units * self.shares(selected.to(units.dtype), activation) * only[..., None], relevance)

    def _like(self, units: Tensor, tensor: Tensor) -> Tensor:
        """``(N, P, C)`` units back in the layout of ``tensor`` (the inverse of :meth:`units`)."""
        return units.reshape(tensor.movedim(self.dim, -1).shape).movedim(-1, self.dim)

    def _check_units(self, units: int, expected: int) -> None:
        if units != expected:
            raise ValueError(f"{self!r} is defined on {expected} units, the layer has {units} along dim {self.dim}")


class Channels(Concepts):
    """Every unit (channel, neuron) along ``dim`` is one concept: zennit-crp's ``ChannelConcept``.

    Parameters
    ----------
    dim : int
        The unit dimension (1 for convolutions and ``(N, D)`` linear outputs, -1 for ``(N, T, D)`` hidden states,
        e.g. the neurons of a transformer MLP).
    at : {"output", "input"}
        Read the module's output or first input.
    """

    def __repr__(self) -> str:
        return f"Channels(dim={self.dim}, at={self.at!r})"

    def count(self, units: int) -> int:
        return units

    def relevance(self, relevance: Tensor, activation: Tensor) -> Tensor:
        return self.units(relevance)

    def activation(self, activation: Tensor) -> Tensor:
        return self.units(activation)

    def shares(self, selected: Tensor, activation: Tensor) -> Tensor:
        return selected[:, None, :]


class _MatrixConcepts(Concepts):
    """Concepts given by a ``(K, C)`` matrix over the ``C`` units (group membership, directions)."""

    def _matrix(self) -> Tensor:
        raise NotImplementedError

    def count(self, units: int) -> int:
        self._check_units(units, self._matrix().shape[1])
        return self._matrix().shape[0]

    def _matrix_like(self, units: Tensor) -> Tensor:
        """The ``(K, C)`` matrix on ``units``' device and dtype (``units``: ``(N, P, C)``)."""
        self._check_units(units.shape[-1], self._matrix().shape[1])
        return self._matrix().to(units.device, units.dtype)


class Groups(_MatrixConcepts):
    """Disjoint groups of units, each one concept (an attention head, a user-given set of channels).

    Parameters
    ----------
    groups : sequence of sequences of int
        The units of each group; no unit in two groups (units in no group belong to no concept).
    units : int
        Size of the unit dimension.
    dim : int
        The unit dimension.
    at : {"output", "input"}
        Read the module's output or first input.
    """

    def __init__(self, groups: Sequence[Sequence[int]], units: int, dim: int = 1, at: str = "output") -> None:
        super().__init__(dim, at)
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive int, got {units!r}")
        if not len(groups):
            raise ValueError("groups is empty: give at least one group of units")
        membership = torch.zeros(len(groups), units)
        seen: dict[int, int] = {}
        for index, group in enumerate(groups):
            members = [int(unit) for unit in group]
            if not members:
                raise ValueError(f"group {index} is empty")
            for unit in members:
                if not 0 <= unit < units:
                    raise ValueError(f"group {index} holds unit {unit}, out of range 0..{units - 1}")
                if unit in seen:
                    raise ValueError(f"unit {unit} is in group {seen[unit]} and group {index}: groups must be "
                                     f"disjoint (a unit's relevance is given to one concept)")
                seen[unit] = index
            membership[index, members] = 1.0
        self.membership = membership

    @classmethod
    def heads(cls, heads: int, head_size: int, dim: int = -1, at: str = "input") -> "Groups":
        """The heads of an attention layer's concatenated output (``heads`` contiguous blocks of ``head_size``).

        The concatenated heads are the *input* of the attention's output projection (``o_proj``, ``out_proj``,
        ``attention.output.dense``), hence the default ``at="input"``: condition on that module's name.

        Parameters
        ----------
        heads, head_size : int
            Number and size of the heads.
        dim : int
            The unit dimension (-1: ``(N, T, heads * head_size)``).
        at : {"output", "input"}
            Where the concatenated heads are read.

        Returns
        -------
        Groups
        """
        return cls([range(h * head_size, (h + 1) * head_size) for h in range(heads)], heads * head_size, dim, at)

    def __repr__(self) -> str:
        return f"Groups({self.membership.shape[0]} groups of {self.membership.shape[1]} units, dim={self.dim})"

    def _matrix(self) -> Tensor:
        return self.membership

    def relevance(self, relevance: Tensor, activation: Tensor) -> Tensor:
        units = self.units(relevance)
        return units @ self._matrix_like(units).T

    def activation(self, activation: Tensor) -> Tensor:
        units = self.units(activation)
        return units @ self._matrix_like(units).T

    def shares(self, selected: Tensor, activation: Tensor) -> Tensor:
        return (selected @ self._matrix_like(self.units(activation)))[:, None, :]


class Directions(_MatrixConcepts):
    """Orthonormal directions of the unit space, each one concept (a learned or user-given basis).

    Parameters
    ----------
    directions : Tensor
        ``(K, C)`` with orthonormal rows (``K <= C``); a complete basis (``K == C``) makes the concepts partition
        the relevance.
    dim : int
        The unit dimension.
    at : {"output", "input"}
        Read the module's output or first input.
    eps : float
        Stabilizer of the division by the activation (units with ``|a_c| <= eps`` give their relevance to no
        direction).
    """

    def __init__(self, directions: Tensor, dim: int = 1, at: str = "output", eps: float = 1e-12) -> None:
        super().__init__(dim, at)
        directions = torch.as_tensor(directions)
        if directions.dim() != 2 or directions.shape[0] > directions.shape[1] or not directions.is_floating_point():
            raise ValueError(f"directions must be a float (K, C) tensor with K <= C, got {tuple(directions.shape)} "
                             f"{directions.dtype}")
        gram = directions.double() @ directions.double().T
        if not torch.allclose(gram, torch.eye(len(gram), dtype=torch.float64), atol=1e-5):
            raise ValueError("directions must have orthonormal rows (directions @ directions.T == I); "
                             "orthonormalize them first, e.g. with torch.linalg.qr(directions.T).Q.T")
        self.directions, self.eps = directions, eps

    def __repr__(self) -> str:
        return f"Directions({self.directions.shape[0]} of {self.directions.shape[1]} units, dim={self.dim})"

    def _matrix(self) -> Tensor:
        return self.directions

    def _parts(self, activation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Units ``a`` (N, P, C), components ``z`` (N, P, K) and ``1 / a`` stabilized (0 where ``|a| <= eps``)."""
        units = self.units(activation)
        basis = self._matrix_like(units)
        safe = torch.where(units.abs() > self.eps, units, torch.ones_like(units))
        inverse = torch.where(units.abs() > self.eps, 1.0 / safe, torch.zeros_like(units))
        return basis, units @ basis.T, inverse

    def relevance(self, relevance: Tensor, activation: Tensor) -> Tensor:
        basis, components, inverse = self._parts(activation)
        return components * ((self.units(relevance) * inverse) @ basis.T)

    def activation(self, activation: Tensor) -> Tensor:
        units = self.units(activation)
        return units @ self._matrix_like(units).T

    def shares(self, selected: Tensor, activation: Tensor) -> Tensor:
        basis, components, inverse = self._parts(activation)
        return ((components * selected[:, None, :]) @ basis) * inverse


def as_concepts(value: "Concepts | None") -> Concepts:
    """``value``, or :class:`Channels` (dim 1) for None.

    Parameters
    ----------
    value : Concepts or None

    Returns
    -------
    Concepts

    Raises
    ------
    ValueError
        For anything else.
    """
    if value is None:
        return Channels()
    if not isinstance(value, Concepts):
        raise ValueError(f"a concept definition must be a torchlrp.concepts.Concepts (Channels, Groups, "
                         f"Directions), got {type(value).__name__}")
    return value
