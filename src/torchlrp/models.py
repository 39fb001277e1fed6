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
        For an unknown architecture, or a weights file that is not a state dict of this architecture (another
        architecture's, or a whole pickled model, which is never unpickled).
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
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle.UnpicklingError, RuntimeError, EOFError, ...: not a plain state dict
            raise ValueError(f"{weights!r} is not a state_dict file that loads without unpickling code (a whole "
                             f"pickled model, or not a torch file?): save model.state_dict() instead "
                             f"({type(error).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise ValueError(f"{weights!r} does not hold a state_dict (a dict of tensors)")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            lines = str(error).strip().splitlines()
            first = lines[1].strip() if len(lines) > 1 else lines[0]
            raise ValueError(f"{weights!r} is not a state_dict of {name}: {first}") from None
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
