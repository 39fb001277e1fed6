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

#: checked on every run: the families whose smallest model runs in about a second here (picked from
#: benchmarks/timm_sweep.py's timings; the CNN, ViT-style and hybrid kinds are all among them)
DEFAULT = ("byobnet", "convnext", "cpubone", "cspnet", "cspnext", "deit", "dla", "efficientnet", "fasternet",
           "ghostnet", "hgnet", "levit", "maxxvit", "nest", "resnest", "resnet", "senet", "starnet", "swiftformer",
           "twins", "visformer", "vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos",
           "vovnet")
#: families that are not explained, with the reason measured by benchmarks/timm_sweep.py (96 of the 98 are, the
#: other two are too large to run here); one listed here runs under -m slow as an expected failure (XPASS once fixed)
NOT_EXPLAINED: dict[str, str] = {}
#: families too large to run on this 2-core, 24 GB machine in float64 (not counted as explained)
TOO_LARGE = {
    "deepseek_vit": "412M parameters: the float64 model and the copies convert makes exceed 24 GB",
    "gemma4_vit": "167M parameters: over the sweep's memory limit; before clamp had a rule it stopped at clamp",
}


def cases():
    for family, entry in sorted(FAMILIES.items()):
        marks = [] if family in DEFAULT else [pytest.mark.slow]
        if family in NOT_EXPLAINED:
            marks.append(pytest.mark.xfail(reason=NOT_EXPLAINED[family], strict=False))
        if family in TOO_LARGE:
            marks.append(pytest.mark.skip(reason=TOO_LARGE[family]))
        yield pytest.param(entry["model"], marks=marks, id=family)


def test_default_families_exist():
    assert set(DEFAULT) <= set(FAMILIES) and len(FAMILIES) >= 90


@pytest.mark.parametrize("name", list(cases()))
def test_timm_family(name):
    result = check(name)
    assert result["conservation"] < 1e-6


def every_model():
    try:
        import timm
    except ImportError:
        return []
    smallest = {entry["model"] for entry in FAMILIES.values()}
    return [pytest.param(name, marks=pytest.mark.timm_all, id=name) for name in timm.list_models()
            if name not in smallest]


@pytest.mark.parametrize("name", every_model())
def test_every_timm_model(name):
    """Every other timm model (1,273 more; hours here): ``python -m pytest -m timm_all tests/test_timm_models.py``."""
    assert check(name)["conservation"] < 1e-6
