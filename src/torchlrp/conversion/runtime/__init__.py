"""The run-time engine: a forward ``torch.fx`` cannot trace, explained call by call from the operation table."""
from torchlrp.conversion.runtime.mode import RunTimeOperations

__all__ = ["RunTimeOperations"]
