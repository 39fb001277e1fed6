"""Functional core of torchlrp: affine operators, stabilizers and the autograd Functions.

The autograd Functions in this subpackage compute a rule's relevance in their ``backward``: the gradient that
reaches their output *is* the output relevance, and what they return is the input relevance.
"""
from torchlrp.functional.affine import AffineOp
from torchlrp.functional import kernels
from torchlrp.functional.relevance import AffineRelevance, ProportionalRelevance, SumRelevance, proportional, sum_relevance
from torchlrp.functional.stabilize import stabilize

__all__ = [
    "AffineOp",
    "AffineRelevance",
    "ProportionalRelevance",
    "SumRelevance",
    "kernels",
    "proportional",
    "stabilize",
    "sum_relevance",
]
