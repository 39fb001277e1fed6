"""Parity with zennit-crp 0.6 (VGG-16, ResNet-18): conditional heatmaps and reference-sample indices.

zennit-crp pins ``zennit<=0.4.6``, so it needs an environment of its own; this test runs only where one is named::

    python -m venv crpenv && crpenv/bin/pip install torch torchvision "zennit-crp==0.6.0"
    TORCHLRP_CRP_PYTHON=crpenv/bin/python python -m pytest tests/test_crp_parity.py

(``benchmarks/crp_parity.py`` prints the same figures; the README quotes them.)
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRP_PYTHON = os.environ.get("TORCHLRP_CRP_PYTHON")

pytestmark = pytest.mark.skipif(not CRP_PYTHON, reason="needs zennit-crp in its own environment: set "
                                                       "TORCHLRP_CRP_PYTHON to its python (see the module docstring)")


@pytest.mark.parametrize("model", ["vgg16", "resnet18"])
def test_same_heatmaps_and_reference_samples_as_zennit_crp(model):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from crp_parity import main

    figures = main(["--crp-python", CRP_PYTHON, "--models", model, "--samples", "48"])[model]
    for name, value in figures.items():
        if "indices equal" in name:
            assert value == 1.0, name
        elif "value difference" in name:
            assert value < 1e-6, name  # the store keeps the statistics in float32
        else:
            assert value < 1e-12, name
