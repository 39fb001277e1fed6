"""State of TorchLRP's trace API (``enable_and_clean``/``collect_and_disable``), kept per context.

Each thread (or asyncio task) has its own :class:`LegacyTrace` in a :class:`contextvars.ContextVar`, made at the
first explain-mode forward there. A torchlrp layer hands that object to its backward at the forward, and the
backward records only if the trace is enabled *by then*: TorchLRP's documented order (forward, then
``enable_and_clean()``, ``backward()``, ``collect_and_disable()``) works, as does enabling before the forward.
The backward reads only that object, never the context variable (autograd may run it on another thread).
"""
from __future__ import annotations

from contextvars import ContextVar

from torch import Tensor


class LegacyTrace:
    """Relevances recorded at the torchlrp layers' inputs while enabled, in backward order."""

    def __init__(self) -> None:
        self.enabled = False
        self.relevances: list[Tensor] = []

    def record(self, relevance: Tensor, output_relevance: Tensor | None = None) -> None:
        """Append a copy of ``relevance`` if the trace is enabled.

        Parameters
        ----------
        relevance : Tensor
            A layer's input relevance.
        output_relevance : Tensor, optional
            The layer's output relevance (not recorded).
        """
        if self.enabled:
            self.relevances.append(relevance.detach().clone())


RECORDER: ContextVar[LegacyTrace | None] = ContextVar("torchlrp_legacy_trace", default=None)


def recorder() -> LegacyTrace:
    """Return this context's trace, making it on first use.

    Returns
    -------
    LegacyTrace
        The trace that layers explained in this context record to.
    """
    trace = RECORDER.get()
    if trace is None:
        trace = LegacyTrace()
        RECORDER.set(trace)
    return trace
