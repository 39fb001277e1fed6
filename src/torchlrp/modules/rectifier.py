"""``torchlrp.ReLU``: a ReLU that an explained layer before it can take in."""
from __future__ import annotations

import torch
from torch import Tensor


class ReLU(torch.nn.ReLU):
    """``torch.nn.ReLU`` that passes on a tensor an explained layer has already rectified.

    While explaining, a torchlrp layer followed directly by this ReLU (found by :func:`torchlrp.convert`, or by
    position in a ``Sequential``) applies the ReLU itself and explains both together
    (:mod:`torchlrp.functional.rectified`), keeping fewer tensors from the forward. Its output's ``grad_fn`` says
    so (``output_rectified``), and this module then returns it unchanged. Any other input is rectified as by
    ``torch.nn.ReLU`` -- the ReLU is idempotent, so the result is the same either way.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Rectify ``input``, unless an explained layer has already done so.

        Parameters
        ----------
        input : Tensor
            Any tensor.

        Returns
        -------
        Tensor
            ``relu(input)`` (``input`` itself when it is already the rectified output of an explained layer).
        """
        if getattr(input.grad_fn, "output_rectified", False):
            return input
        return super().forward(input)
