"""Parity with LXT 2.1 (AttnLRP and CP-LRP, float64) on the Hugging Face families LXT patches and on torchvision's
vit_b_16.

LXT needs transformers 4.x and patches modules for the whole process, so it needs an environment of its own; this
test runs only where one is named::

    python -m venv lxtenv && lxtenv/bin/pip install "transformers==4.57.6" "lxt==2.1" torch torchvision
    TORCHLRP_LXT_PYTHON=lxtenv/bin/python python -m pytest tests/test_lxt_parity.py

(``benchmarks/lxt_parity.py`` prints the same figures; the README quotes them.) LXT's CP-LRP also holds a gated
MLP's gate constant, where torchlrp's CP-LRP (attention weights constant) keeps AttnLRP's uniform rule: the
comparison with the gate held constant on torchlrp's side too is the one that must agree, and the plain one must
not (the difference is that rule, and it is visible).
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LXT_PYTHON = os.environ.get("TORCHLRP_LXT_PYTHON")

pytestmark = pytest.mark.skipif(not LXT_PYTHON, reason="needs LXT in its own environment: set TORCHLRP_LXT_PYTHON "
                                                       "to its python (see the module docstring)")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "gpt2", "bert", "vit_b_16"])
def test_same_relevance_as_lxt(family):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from lxt_parity import main

    figures = main(["--lxt-python", LXT_PYTHON, "--families", family, "--images", "1"])
    for name, relative in figures.items():
        if name.endswith("cp_LRP") and f"{name}, gate constant" in figures:
            assert relative > 1e-3, name  # LXT's gate rule differs, visibly
        else:
            assert relative < 1e-5, name
