"""``LSTM`` with an explain mode: the gates held constant, the signal path by the layer rule (Arras et al. 2017).

Each step computes ``z = W x_t + U h_{t-1} + b``, the gates ``i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o)``
and the candidate ``g = tanh(z_g)``, then ``c_t = f c_{t-1} + i g`` and ``h_t = o tanh(c_t)``. While explaining,
the gates are constants (they scale the signal and receive no relevance), ``tanh`` passes relevance unchanged (the
identity rule), the cell's sum splits it in proportion between ``f c_{t-1}`` and ``i g``, and ``z_g`` -- a linear
map of ``[x_t, h_{t-1}]`` -- takes the composite's rule for the LSTM module (epsilon by default), so relevance reaches
the inputs and the previous hidden state at every step. With zero biases and zero initial states, LRP-0 conserves.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional.affine import AffineOp
from ..functional.operations import identity_rule, scale_rule, weighted_sum_rule
from ..functional.relevance import AffineRelevance
from ..rules import Rule
from ..state import current


class LSTM(torch.nn.LSTM):
    """``torch.nn.LSTM`` (any layers, bidirectional, ``batch_first``; no ``proj_size``) explained while an
    explanation of its model is active (see the module docstring); otherwise exactly torch's LSTM."""

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> Any:  # noqa: D102
        state = current()
        rule = None if state is None else state.rules.get(self)
        if rule is None or rule.propagates_gradient or isinstance(input, torch.nn.utils.rnn.PackedSequence):
            return super().forward(input, hx)
        if self.proj_size:
            raise ValueError("an LSTM with proj_size has no relevance rule here")
        return self._explained(input, hx, rule)

    def _explained(self, input: Tensor, hx: tuple[Tensor, Tensor] | None, rule: Rule) -> Any:
        batched = input.dim() == 3
        sequence = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            sequence = sequence.transpose(0, 1)
        length, batch = sequence.shape[:2]
        directions = 2 if self.bidirectional else 1
        if hx is None:
            zeros = sequence.new_zeros(self.num_layers * directions, batch, self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        finals_h, finals_c = [], []
        layer_input = sequence
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                steps, h_n, c_n = self._direction(layer_input, hx[0][index], hx[1][index], layer, direction, rule)
                outputs.append(torch.stack(steps, 0))
                finals_h.append(h_n)
                finals_c.append(c_n)
            layer_input = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        output = layer_input.transpose(0, 1) if self.batch_first and batched else layer_input
        h_n, c_n = torch.stack(finals_h, 0), torch.stack(finals_c, 0)
        if not batched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _direction(self, sequence: Tensor, h: Tensor, c: Tensor, layer: int, direction: int,
                   rule: Rule) -> tuple[list[Tensor], Tensor, Tensor]:
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        bias = (getattr(self, "bias_ih" + suffix) + getattr(self, "bias_hh" + suffix)) if self.bias else None
        size = self.hidden_size
        weight = torch.cat((w_ih, w_hh), dim=1)  # [x_t, h_{t-1}] -> the four pre-activations
        candidate = AffineOp(weight[2 * size:3 * size], None if bias is None else bias[2 * size:3 * size],
                             fused=current().fused)
        order = range(sequence.shape[0] - 1, -1, -1) if direction else range(sequence.shape[0])
        steps: list[Tensor] = [None] * sequence.shape[0]  # type: ignore[list-item]
        for t in order:
            joint = torch.cat((sequence[t], h), dim=1)
            with torch.no_grad():  # the gates: constants of the explanation
                gates = torch.nn.functional.linear(joint, weight, bias)
                in_gate, forget, _, out_gate = gates.chunk(4, dim=1)
                in_gate, forget, out_gate = in_gate.sigmoid(), forget.sigmoid(), out_gate.sigmoid()
            g = identity_rule(AffineRelevance.apply(joint, candidate, rule, None), torch.tanh)
            c = weighted_sum_rule([scale_rule(c, forget), scale_rule(g, in_gate)], [1.0, 1.0], None, rule.epsilon
                                  if hasattr(rule, "epsilon") else 1e-6)
            h = scale_rule(identity_rule(c, torch.tanh), out_gate)
            steps[t] = h
        return steps, h, c
