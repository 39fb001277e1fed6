"""ImageNet input handling shared by the VGG example and the command line."""
from __future__ import annotations

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Apply ImageNet normalization to ``(N, 3, H, W)`` images in ``[0, 1]``.

    Parameters
    ----------
    images : Tensor
        Images in ``[0, 1]``.

    Returns
    -------
    Tensor
        Normalized images.
    """
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def bounds(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the lowest and highest normalized pixel values per channel (for ``ZBox``/``EpsilonGammaBox``).

    Parameters
    ----------
    dtype : torch.dtype
        Dtype of the bounds.

    Returns
    -------
    tuple of Tensor
        ``(low, high)``, each of shape ``(1, 3, 1, 1)``: the images of 0 and 1 under the normalization.
    """
    return normalize(torch.zeros(1, 3, 1, 1, dtype=dtype)), normalize(torch.ones(1, 3, 1, 1, dtype=dtype))


def load_image(path: str, size: int = 224) -> torch.Tensor:
    """Read an image file, resize its shorter side to ``size`` and centre-crop it to ``size x size``.

    Parameters
    ----------
    path : str
        Image file readable by Pillow.
    size : int
        Output side length.

    Returns
    -------
    Tensor
        ``(3, size, size)`` float32 in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the file cannot be read as an image, is larger than Pillow's decompression limit
        (``PIL.Image.MAX_IMAGE_PIXELS``, a guard against decompression bombs), or ``size`` is not positive.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                picture = opened.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path!r} is larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (a guard "
                         f"against decompression bombs); shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if you "
                         f"trust the file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path!r} as an image: {error}") from None
    return from_array(np.asarray(picture), size)


def from_array(array: np.ndarray, size: int = 224) -> torch.Tensor:
    """Resize and centre-crop an ``(H, W, 3)`` uint8 or float array to a ``(3, size, size)`` tensor in [0, 1].

    Parameters
    ----------
    array : ndarray
        RGB image.
    size : int
        Output side length.

    Returns
    -------
    Tensor
        The image.
    """
    image = torch.as_tensor(np.array(array, dtype=np.float32)).permute(2, 0, 1)
    if array.dtype == np.uint8:
        image = image / 255.0
    height, width = image.shape[1:]
    scale = size / min(height, width)
    resized = torch.nn.functional.interpolate(image[None], size=(max(size, round(height * scale)),
                                                                 max(size, round(width * scale))),
                                              mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (resized.shape[1] - size) // 2, (resized.shape[2] - size) // 2
    return resized[:, top:top + size, left:left + size].clamp(0, 1)


def categories() -> list[str]:
    """Return the 1000 ImageNet class names (shipped with torchvision, no download).

    Returns
    -------
    list of str
        Class names by index.
    """
    import torchvision

    return list(torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])
