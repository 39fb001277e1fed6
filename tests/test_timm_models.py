"""timm models: one per family (the smallest), with the torchvision sweep's checks (``tests/timm_check.py``).

The families whose smallest model runs in seconds here are checked on every run; the others (large smallest models,
e.g. BEiT base, NASNet-A large) and the families listed in :data:`NOT_EXPLAINED` with their measured reason run with
``python -m pytest -m slow`` (``benchmarks/timm_sweep.py`` runs the whole list, or every timm model with ``--all``).
"""
import importlib.util

import pytest

from tests.timm_check import FAMILIES, check

pytestmark = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="needs timm: pip install -e '.[test]' (or '.[timm]')")

#: checked on every run: small and quick (each well under 10 s on 2 cores)
DEFAULT = ("byobnet", "convnext", "efficientnet", "mobilenetv3", "nfnet", "regnet", "resnet", "vision_transformer",
           "ghostnet", "starnet")
#: families that do not pass yet, with the reason measured by benchmarks/timm_sweep.py (they run under -m slow
#: as expected failures, so a fix shows up as XPASS)
NOT_EXPLAINED = {
    "convit": "attn /= attn.sum(...) in place on a tensor a rule keeps (autograd: modified by an inplace operation)",
    "mvitv2": "an in-place update of a view that a rule keeps (autograd: modified by an inplace operation)",
    "naflexvit": "an in-place update of a layer output (a view made inside AffineRelevance)",
    "csatv2": "amax of an activation used other than as a normalizer (ConversionError)",
    "metaformer": "a power other than a norm's square (PoolFormer v2's StarReLU: relu(x) ** 2; ConversionError)",
    "efficientvit_mit": "a quotient of two activations (its linear attention; ConversionError)",
    "gemma4_vit": "clamp of activations in its projections (ConversionError at run time)",
    "densenet": "LRP-0 conservation off (0.89 of 0.68): not diagnosed this session",
    "efficientvim": "LRP-0 conservation off (0.0016 of 0.0022): not diagnosed this session",
    "hiera": "non-finite or zero epsilon relevance: not diagnosed this session",
    "hieradet_sam2": "non-finite or zero epsilon relevance: not diagnosed this session",
    "mlp_mixer": "gMLP: non-finite or zero epsilon relevance: not diagnosed this session",
    "deepseek_vit": "412M parameters: over 240 s here",
}


def cases():
    for family, entry in sorted(FAMILIES.items()):
        marks = [] if family in DEFAULT else [pytest.mark.slow]
        if family in NOT_EXPLAINED:
            marks.append(pytest.mark.xfail(reason=NOT_EXPLAINED[family], strict=False))
        yield pytest.param(entry["model"], marks=marks, id=family)


def test_default_families_exist():
    assert set(DEFAULT) <= set(FAMILIES) and len(FAMILIES) >= 90


@pytest.mark.parametrize("name", list(cases()))
def test_timm_family(name):
    result = check(name)
    assert result["conservation"] < 1e-6
