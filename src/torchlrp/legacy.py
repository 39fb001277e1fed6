"""State of TorchLRP's global trace API (``enable_and_clean``/``collect_and_disable``), kept per context.

The recorder lives in a :class:`contextvars.ContextVar`, so threads and asyncio tasks each have their own; the
layers read it in their forward (in the caller's thread) and hook the tensors, so the backward never touches it.
"""
from __future__ import annotations

from contextvars import ContextVar

from torch import Tensor

RECORDER: ContextVar[list[Tensor] | None] = ContextVar("torchlrp_legacy_trace", default=None)


def watch(input: Tensor) -> Tensor:
    """If the legacy trace is on, return a view of ``input`` whose relevance gets appended to it.

    Parameters
    ----------
    input : Tensor
        A layer input.

    Returns
    -------
    Tensor
        ``input`` itself, or a hooked view of it.
    """
    recorder = RECORDER.get()
    if recorder is None or not input.requires_grad:
        return input
    view = input.view_as(input)
    view.register_hook(lambda relevance: recorder.append(relevance.detach()))
    return view
