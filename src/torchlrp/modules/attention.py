"""Attention explained through its math: ``torch.nn.MultiheadAttention``'s twin and ``F.scaled_dot_product_attention``.

Outside an explanation both compute exactly what torch computes (its own kernels). While explaining, the
projections take the rule of a linear layer (the composite's rule for the attention module: by name, by type
``torch.nn.MultiheadAttention``, or the default; ``Epsilon`` in AttnLRP's preset) and the attention itself is
written out of rule-carrying operations (:func:`torchlrp.functional.attention.attention_rule`): AttnLRP's softmax and
uniform product rules, or CP-LRP's constant attention weights under a composite with ``attention="cp"``.
"""
from __future__ import annotations

import inspect

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from torchlrp.functional.affine import AffineOp
from torchlrp.functional.attention import additive_mask, attention_rule, attention_weights, scaled_attention_rule
from torchlrp.functional.operations import bilinear_rule, scale_rule
from torchlrp.functional.relevance import AffineRelevance
from torchlrp.core.kinds import Attention
from torchlrp.core.rules import Rule
from torchlrp.core.state import current
from torchlrp.modules.affine import ExplainableAffine
from torchlrp.modules.operation import Operation


def _projection(input: Tensor, weight: Tensor, bias: Tensor | None, rule: Rule, fused: bool) -> Tensor:
    return AffineRelevance.apply(input, AffineOp(weight, bias, fused=fused), rule)


def explained_attention(query: Tensor, key: Tensor, value: Tensor, weights: Sequence[Tensor],
                        biases: Sequence[Tensor | None], out_weight: Tensor, out_bias: Tensor | None, heads: int,
                        batch_first: bool, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
                        is_causal: bool, need_weights: bool, average_attn_weights: bool, rule: Rule,
                        out_projection: torch.nn.Module | None = None) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention``'s computation, explained: the projections by ``rule``, the attention by AttnLRP
    (or CP-LRP, per the active explanation), masks as additive constants.

    Parameters
    ----------
    query, key, value : Tensor
        ``(L, E)`` unbatched, ``(N, L, E)`` with ``batch_first``, else ``(L, N, E)``.
    weights, biases : sequence of Tensor
        The query, key and value projections' weights and biases.
    out_weight, out_bias : Tensor
        The output projection's.
    heads : int
        The number of heads.
    batch_first : bool
        The layout of the inputs and the output.
    key_padding_mask, attn_mask, is_causal, need_weights, average_attn_weights
        As for :meth:`torch.nn.MultiheadAttention.forward`.
    rule : Rule
        The projections' rule.
    out_projection : torch.nn.Module, optional
        The output projection as a layer twin, called as a module (its input, the concatenated heads, can be
        tapped); default: the map of ``out_weight`` and ``out_bias``.

    Returns
    -------
    tuple
        The output and the (detached) attention weights, or None.
    """
    state = current()
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
    q, k, v = (_projection(tensor, weight, bias, rule, state.fused)
               for tensor, weight, bias in zip((query, key, value), weights, biases))
    batch, length, source = q.shape[0], q.shape[1], k.shape[1]
    q, k, v = (tensor.unflatten(-1, (heads, -1)).transpose(1, 2) for tensor in (q, k, v))
    if attn_mask is not None and attn_mask.dim() == 3:  # (batch * heads, L, S)
        attn_mask = attn_mask.reshape(batch, heads, length, source)
    if key_padding_mask is not None:  # (batch, S)
        key_padding_mask = key_padding_mask.reshape(batch, 1, 1, source)
    mask = additive_mask([(attn_mask, False), (key_padding_mask, False)], q.dtype)
    epsilon = min(getattr(rule, "epsilon", 1e-6), 1e-6)  # the proportional split's, as for other operations
    output, attention = attention_rule(q, k, v, mask, is_causal and mask is None, mode=state.attention,
                                       epsilon=epsilon, need_weights=need_weights)
    output = output.transpose(1, 2).flatten(2)
    if out_projection is not None:  # called as the module: its input is the heads (a tap)
        output = out_projection(output, explain=True, rule=rule)
    else:
        output = _projection(output, out_weight, out_bias, rule, state.fused)
    if unbatched:
        output = output.squeeze(0)
    elif not batch_first:
        output = output.transpose(0, 1)
    if not need_weights:
        return output, None
    attention = attention.detach().squeeze(0) if unbatched else attention.detach()
    return output, attention.mean(dim=-3) if average_attn_weights else attention


@Attention.register
class MultiheadAttentionCall(torch.nn.Module):
    """A ``F.multi_head_attention_forward`` call (open_clip's attention pooling), explained as
    :class:`MultiheadAttention` is: the projections by the rule the composite gives this module, the attention by
    AttnLRP (or CP-LRP)."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """Attend (see :func:`torch.nn.functional.multi_head_attention_forward`).

        Parameters
        ----------
        *args, **kwargs
            As for :func:`torch.nn.functional.multi_head_attention_forward`.

        Returns
        -------
        tuple
            The output and the attention weights (or None).

        Raises
        ------
        ValueError
            While explaining, for ``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v`` or dropout
            in training mode.
        """
        state = current()
        rule = None if state is None else state.rules.get(self)
        if rule is None or rule.propagates_gradient:
            return F.multi_head_attention_forward(*args, **kwargs)
        bound = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        if call["bias_k"] is not None or call["bias_v"] is not None or call["add_zero_attn"] or \
                call["static_k"] is not None or call["static_v"] is not None or (call["training"] and
                                                                                 call["dropout_p"]):
            raise ValueError("torchlrp explains F.multi_head_attention_forward without bias_k/bias_v, "
                             "add_zero_attn, static_k/static_v and dropout")
        if call["use_separate_proj_weight"]:
            weights = (call["q_proj_weight"], call["k_proj_weight"], call["v_proj_weight"])
        else:
            weights = call["in_proj_weight"].chunk(3)
        biases = (None,) * 3 if call["in_proj_bias"] is None else call["in_proj_bias"].chunk(3)
        return explained_attention(call["query"], call["key"], call["value"], weights, biases,
                                   call["out_proj_weight"], call["out_proj_bias"], call["num_heads"], False,
                                   call["key_padding_mask"], call["attn_mask"], call["is_causal"],
                                   call["need_weights"], call["average_attn_weights"], rule)


@Attention.register
class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose explain-mode forward is written out of rule-carrying operations.

    :func:`torchlrp.convert` turns a model's ``nn.MultiheadAttention`` into this twin in place (same parameters and
    state dict). Supported while explaining: self- and cross-attention, ``batch_first`` either way, unbatched
    inputs, separate key/value dimensions, ``key_padding_mask`` and ``attn_mask`` (boolean or additive),
    ``is_causal``, ``need_weights`` (the weights are returned as torch returns them). Not supported while explaining
    (a ``ValueError`` says so): ``add_bias_kv`` and ``add_zero_attn``.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend; in explain mode through the relevance rules.

        Parameters
        ----------
        query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            As for :meth:`torch.nn.MultiheadAttention.forward`.

        Returns
        -------
        tuple
            The output and the attention weights (or None), as torch returns them.

        Raises
        ------
        ValueError
            While explaining, for ``add_bias_kv`` or ``add_zero_attn``.
        """
        state = current()
        rule = None if state is None else state.rules.get(self)
        if rule is None or rule.propagates_gradient:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("torchlrp explains nn.MultiheadAttention without add_bias_kv and add_zero_attn")
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        out_projection = self.out_proj if isinstance(self.out_proj, ExplainableAffine) else None
        return explained_attention(query, key, value, weights, biases, self.out_proj.weight, self.out_proj.bias,
                                   self.num_heads, self.batch_first, key_padding_mask, attn_mask, is_causal,
                                   need_weights, average_attn_weights, rule, out_projection)


class ScaledDotProductAttention(Operation, torch.nn.Module):
    """A ``F.scaled_dot_product_attention`` call in a model made by :func:`torchlrp.convert`.

    Outside an explanation (or under a gradient rule) it calls torch's function (any kernel); while explaining it
    computes the attention through its math with AttnLRP's rules (or CP-LRP's, per the composite).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                **kwargs: Any) -> Tensor:
        """Attend.

        Parameters
        ----------
        query, key, value, attn_mask, dropout_p, is_causal, scale, **kwargs
            As for :func:`torch.nn.functional.scaled_dot_product_attention`.

        Returns
        -------
        Tensor
            The attention output.

        Raises
        ------
        ValueError
            While explaining, for ``dropout_p > 0`` (explanations are of the eval-mode model).
        """
        rule = self.operation_rule()
        if rule is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **kwargs)
        if dropout_p:
            raise ValueError(f"scaled_dot_product_attention with dropout_p={dropout_p} while explaining: "
                             f"explanations are of the eval-mode model; pass dropout_p=0.0 outside training")
        state = current()
        if state.attention != "cp":
            state.losses_allowed.add("AttnLRP's softmax rule (absorbs like a bias)")
        output, _ = attention_rule(query, key, value, attn_mask, is_causal, scale, state.attention,
                                   rule.epsilon, need_weights=False, enable_gqa=bool(kwargs.get("enable_gqa")))
        return output


#: modules whose explained forward contains attention projections (they take a linear layer's rule)


@Attention.register
class ShiftedWindowAttention(torch.nn.Module):
    """torchvision's ``shifted_window_attention`` call (Swin, Swin V2) in a model made by :func:`torchlrp.convert`.

    Outside an explanation (or under a gradient rule) it calls torchvision's function. While explaining, the
    function's steps are repeated with rules: the qkv and output projections take the rule of a linear layer (the
    composite's rule for this module: by name, or the default), the two products AttnLRP's uniform rule, the
    softmax AttnLRP's rule (or CP-LRP's constant weights), the relative position bias and the shifted-window mask
    are additive constants (they take their proportional share), Swin V2's cosine normalization of queries and keys
    and its logit scale are held constant; padding, cyclic shifts and window partitions are index maps.

    Parameters
    ----------
    function : callable
        ``torchvision.models.swin_transformer.shifted_window_attention``.
    """

    def __init__(self, function: Any) -> None:
        super().__init__()
        self.function = function

    def forward(self, input: Tensor, qkv_weight: Tensor, proj_weight: Tensor, relative_position_bias: Tensor,
                window_size: list[int], num_heads: int, shift_size: list[int], attention_dropout: float = 0.0,
                dropout: float = 0.0, qkv_bias: Tensor | None = None, proj_bias: Tensor | None = None,
                logit_scale: Tensor | None = None, training: bool = True) -> Tensor:
        """Window attention; in explain mode through the relevance rules.

        Parameters
        ----------
        input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size,
        attention_dropout, dropout, qkv_bias, proj_bias, logit_scale, training
            As for ``torchvision.models.swin_transformer.shifted_window_attention``.

        Returns
        -------
        Tensor
            ``(N, H, W, C)``, as torchvision's function returns it.
        """
        state = current()
        rule = None if state is None else state.rules.get(self)
        if rule is None or rule.propagates_gradient:
            return self.function(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
                                 shift_size, attention_dropout, dropout, qkv_bias, proj_bias, logit_scale, training)
        epsilon = min(getattr(rule, "epsilon", 1e-6), 1e-6)
        batch, height, width, channels = input.shape
        pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
        pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
        x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
        _, pad_h, pad_w, _ = x.shape
        shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
        x = x.view(batch, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, window_size[0] * window_size[1], channels)
        if logit_scale is not None and qkv_bias is not None:
            qkv_bias = qkv_bias.clone()
            length = qkv_bias.numel() // 3
            qkv_bias[length:2 * length].zero_()
        qkv = _projection(x, qkv_weight, qkv_bias, rule, state.fused)
        tokens = x.size(1)
        qkv = qkv.reshape(x.size(0), tokens, 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k, factor = self._factors(q, k, logit_scale, channels // num_heads)
        constant = relative_position_bias.unsqueeze(0)  # (1, 1, heads, N, N)
        if sum(shift) > 0:
            constant = constant + self._window_mask(x, pad_h, pad_w, window_size, shift, windows).unsqueeze(0)
        constant = constant.detach()  # (1, 1 or windows, heads or 1, N, N): per window of each image
        if state.attention == "cp":
            x = bilinear_rule(torch.matmul, attention_weights(q, k, constant, factor), v, (0.0, 1.0), epsilon)
        else:  # the bias and the mask are additive constants of the logits
            x = scaled_attention_rule(q, k, v, constant, factor, epsilon)
        x = x.transpose(1, 2).reshape(x.size(0), tokens, channels)
        x = _projection(x, proj_weight, proj_bias, rule, state.fused)
        x = x.view(batch, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()

    @staticmethod
    def _factors(q: Tensor, k: Tensor, logit_scale: Tensor | None, head_dim: int) -> tuple[Tensor, Tensor,
                                                                                            float | Tensor]:
        """The factors of the scores and their scale: ``q``, ``k`` and ``1 / sqrt(d)`` (Swin), or the unit queries
        and keys and the per-head logit scale (Swin V2: cosine similarities, the norms and scales held constant)."""
        if logit_scale is None:
            return q, k, head_dim ** -0.5
        factor = torch.clamp(logit_scale, max=math.log(100.0)).exp().detach()
        q = scale_rule(q, q.detach().norm(dim=-1, keepdim=True).clamp(min=1e-12), torch.div)
        k = scale_rule(k, k.detach().norm(dim=-1, keepdim=True).clamp(min=1e-12), torch.div)
        return q, k, factor

    @staticmethod
    def _window_mask(x: Tensor, pad_h: int, pad_w: int, window_size: list[int], shift: list[int],
                     windows: int) -> Tensor:
        """torchvision's shifted-window mask, ``(windows, 1, N, N)`` with 0 inside a region and -100 across."""
        regions = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                regions[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        regions = regions.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
        regions = regions.permute(0, 2, 1, 3).reshape(windows, window_size[0] * window_size[1])
        difference = regions.unsqueeze(1) - regions.unsqueeze(2)
        return difference.masked_fill(difference != 0, -100.0).masked_fill(difference == 0, 0.0).unsqueeze(1)
