"""``LSTM`` and ``GRU`` with an explain mode: the gates held constant, the signal path by the layer rule (Arras et
al. 2017).

Each step computes ``z = W x_t + U h_{t-1} + b``, the gates ``i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o)``
and the candidate ``g = tanh(z_g)``, then ``c_t = f c_{t-1} + i g`` and ``h_t = o tanh(c_t)``. While explaining,
the gates are constants (they scale the signal and receive no relevance), ``tanh`` passes relevance unchanged (the
identity rule), the cell's sum splits it in proportion between ``f c_{t-1}`` and ``i g``, and ``z_g`` -- a linear
map of ``[x_t, h_{t-1}]`` -- takes the composite's rule for the LSTM module (epsilon by default), so relevance reaches
the inputs and the previous hidden state at every step. With zero biases and zero initial states, LRP-0 conserves.

The GRU likewise: ``n = tanh(W_n x_t + b_in + r (U_n h_{t-1} + b_hn))`` with the reset gate ``r`` constant (both
linear maps by the layer rule, their sum split in proportion) and ``h_t = (1 - z) n + z h_{t-1}`` with the update
gate ``z`` constant (a proportional sum).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchlrp.functional.affine import AffineOp
from torchlrp.functional.operations import identity_rule, scale_rule, weighted_sum_rule
from torchlrp.functional.relevance import AffineRelevance
from torchlrp.core.kinds import Recurrent
from torchlrp.core.rules import Rule
from torchlrp.core.state import current


def _split_epsilon(rule: Rule) -> float:
    """Stabilizer of the proportional sums inside a cell: the rule's epsilon (0 under LRP-0), else 1e-6."""
    return float(getattr(rule, "epsilon", 1e-6))


@Recurrent.register
class _ExplainableRecurrent:
    """Mixin: the explained forward of a recurrent layer, step by step (``_step`` is the cell's rule)."""

    #: how many state tensors the cell carries (LSTM: h and c; GRU: h)
    state_count = 1

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        """Run the layer; while an explanation of its model is active, step by step with the cell's rule.

        Parameters
        ----------
        input : Tensor
            ``(L, N, H_in)`` (``(N, L, H_in)`` with ``batch_first``) or unbatched ``(L, H_in)``.
        hx : Tensor or tuple of Tensor, optional
            The initial state(s), as for the torch layer (zeros if omitted).

        Returns
        -------
        tuple
            ``(output, h_n)`` (GRU) or ``(output, (h_n, c_n))`` (LSTM), as the torch layer returns them.

        Raises
        ------
        ValueError
            For an LSTM with ``proj_size`` while explaining.
        """
        state = current()
        rule = None if state is None else state.rules.get(self)
        if rule is None or rule.propagates_gradient or isinstance(input, torch.nn.utils.rnn.PackedSequence):
            return super().forward(input, hx)
        if getattr(self, "proj_size", 0):
            raise ValueError("an LSTM with proj_size has no relevance rule here")
        return self._explained(input, hx, rule)

    def _explained(self, input: Tensor, hx: Any, rule: Rule) -> Any:
        batched = input.dim() == 3
        sequence = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            sequence = sequence.transpose(0, 1)
        batch = sequence.shape[1]
        directions = 2 if self.bidirectional else 1
        states = (hx,) if isinstance(hx, Tensor) else tuple(hx) if hx is not None else None
        if states is None:
            zeros = sequence.new_zeros(self.num_layers * directions, batch, self.hidden_size)
            states = (zeros,) * self.state_count
        elif not batched:
            states = tuple(s.unsqueeze(1) for s in states)
        finals: list[list[Tensor]] = [[] for _ in range(self.state_count)]
        layer_input = sequence
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                steps, last = self._direction(layer_input, tuple(s[index] for s in states), layer, direction, rule)
                outputs.append(torch.stack(steps, 0))
                for kept, value in zip(finals, last):
                    kept.append(value)
            layer_input = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        output = layer_input.transpose(0, 1) if self.batch_first and batched else layer_input
        last = [torch.stack(kept, 0) for kept in finals]
        if not batched:
            output, last = output.squeeze(1), [value.squeeze(1) for value in last]
        return output, (tuple(last) if self.state_count > 1 else last[0])

    def _direction(self, sequence: Tensor, state: tuple[Tensor, ...], layer: int, direction: int,
                   rule: Rule) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        parameters = {name: getattr(self, name + suffix, None) for name in ("weight_ih", "weight_hh", "bias_ih",
                                                                            "bias_hh")}
        steps: list[Tensor] = [None] * sequence.shape[0]  # type: ignore[list-item]
        order = range(sequence.shape[0] - 1, -1, -1) if direction else range(sequence.shape[0])
        for t in order:
            state = self._step(sequence[t], state, parameters, rule)
            steps[t] = state[0]
        return steps, state


class LSTM(_ExplainableRecurrent, torch.nn.LSTM):
    """``torch.nn.LSTM`` (any layers, bidirectional, ``batch_first``; no ``proj_size``) explained while an
    explanation of its model is active (see the module docstring); otherwise exactly torch's LSTM."""

    state_count = 2

    def _step(self, x: Tensor, state: tuple[Tensor, ...], parameters: dict[str, Tensor | None],
              rule: Rule) -> tuple[Tensor, ...]:
        h, c = state
        size = self.hidden_size
        weight = torch.cat((parameters["weight_ih"], parameters["weight_hh"]), dim=1)  # [x_t, h_{t-1}] -> z
        bias = None if parameters["bias_ih"] is None else parameters["bias_ih"] + parameters["bias_hh"]
        joint = torch.cat((x, h), dim=1)
        with torch.no_grad():  # the gates: constants of the explanation
            in_gate, forget, _, out_gate = torch.nn.functional.linear(joint, weight, bias).chunk(4, dim=1)
            in_gate, forget, out_gate = in_gate.sigmoid(), forget.sigmoid(), out_gate.sigmoid()
        candidate = AffineOp(weight[2 * size:3 * size], None if bias is None else bias[2 * size:3 * size],
                             fused=current().fused)
        g = identity_rule(AffineRelevance.apply(joint, candidate, rule, None), torch.tanh)
        c = weighted_sum_rule([scale_rule(c, forget), scale_rule(g, in_gate)], [1.0, 1.0], None,
                              _split_epsilon(rule))
        return scale_rule(identity_rule(c, torch.tanh), out_gate), c


class GRU(_ExplainableRecurrent, torch.nn.GRU):
    """``torch.nn.GRU`` (any layers, bidirectional, ``batch_first``) explained while an explanation of its model is
    active (see the module docstring); otherwise exactly torch's GRU."""

    def _step(self, x: Tensor, state: tuple[Tensor, ...], parameters: dict[str, Tensor | None],
              rule: Rule) -> tuple[Tensor, ...]:
        (h,) = state
        size = self.hidden_size
        w_ih, w_hh, b_ih, b_hh = (parameters[name] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        with torch.no_grad():  # the reset and update gates: constants of the explanation
            gates_x = torch.nn.functional.linear(x, w_ih, b_ih)
            gates_h = torch.nn.functional.linear(h, w_hh, b_hh)
            reset = (gates_x[:, :size] + gates_h[:, :size]).sigmoid()
            update = (gates_x[:, size:2 * size] + gates_h[:, size:2 * size]).sigmoid()
        fused, epsilon = current().fused, _split_epsilon(rule)
        from_x = AffineRelevance.apply(x, AffineOp(w_ih[2 * size:], None if b_ih is None else b_ih[2 * size:],
                                                   fused=fused), rule, None)
        from_h = AffineRelevance.apply(h, AffineOp(w_hh[2 * size:], None if b_hh is None else b_hh[2 * size:],
                                                   fused=fused), rule, None)
        n = identity_rule(weighted_sum_rule([from_x, scale_rule(from_h, reset)], [1.0, 1.0], None, epsilon),
                          torch.tanh)
        return (weighted_sum_rule([scale_rule(n, 1.0 - update), scale_rule(h, update)], [1.0, 1.0], None,
                                  epsilon),)
