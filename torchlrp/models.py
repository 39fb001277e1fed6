"""Building torchvision classifiers with weights from torchvision, a local file, or none."""
from __future__ import annotations

import os

import torch
import torchvision

#: the torchvision architectures torchlrp knows how to convert
ARCHITECTURES = ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                 "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def torchvision_model(name: str, weights: str | None = "DEFAULT") -> torch.nn.Module:
    """Build a torchvision classifier in eval mode.

    Parameters
    ----------
    name : str
        One of :data:`ARCHITECTURES`.
    weights : str or None
        ``"DEFAULT"`` (or another torchvision weights name such as ``"IMAGENET1K_V1"``): torchvision's pretrained
        weights, from the local torch cache or downloaded; a path to a ``state_dict`` file, loaded with
        ``torch.load(..., weights_only=True)`` (no code is unpickled); None: random weights.

    Returns
    -------
    torch.nn.Module
        The model, in eval mode.

    Raises
    ------
    ValueError
        For an unknown architecture.
    FileNotFoundError
        For a weights path that does not exist.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    builder = getattr(torchvision.models, name)
    if weights is None:
        return builder(weights=None).eval()
    looks_like_path = os.sep in weights or weights.endswith((".pt", ".pth", ".bin"))
    if looks_like_path or os.path.exists(weights):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file {weights!r} does not exist")
        model = builder(weights=None)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return model.eval()
    return builder(weights=weights).eval()


def cached_weights_available(name: str) -> bool:
    """Whether torchvision's default pretrained weights for ``name`` are in the local torch cache.

    Parameters
    ----------
    name : str
        One of :data:`ARCHITECTURES`.

    Returns
    -------
    bool
        True when building with ``weights="DEFAULT"`` needs no download.
    """
    weights = torchvision.models.get_model_weights(name).DEFAULT
    filename = os.path.basename(weights.url)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", filename))
