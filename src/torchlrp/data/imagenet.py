"""ImageNet input handling shared by the VGG example and the command line: loading, normalizing, folders of
images as datasets."""
from __future__ import annotations

import os
from typing import Any

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
    """Read an image file, centre-crop it to a square and resize that to ``size x size`` (16-bit and float images
    are scaled to ``[0, 1]``, not clipped).

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
        If the file cannot be read as an image, is a float image with values outside ``[0, 1]``, is larger than Pillow's decompression limit
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
                picture = _rgb_array(opened, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path!r} is larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels (a guard "
                         f"against decompression bombs); shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if you "
                         f"trust the file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path!r} as an image: {error}") from None
    return from_array(picture, size)


def _rgb_array(opened: Any, path: str) -> np.ndarray:
    """An opened image as ``(H, W, 3)``: uint8 for 8-bit modes, float32 in ``[0, 1]`` for 16-bit and 32-bit integer
    and float modes (which Pillow's ``convert("RGB")`` would clip to black and white)."""
    if opened.mode.startswith("I;16") or opened.mode in ("I", "F"):
        values = np.asarray(opened, dtype=np.float64)
        if opened.mode == "F":
            low, high = float(np.nanmin(values)), float(np.nanmax(values))
            if not (np.isfinite(values).all() and 0.0 <= low and high <= 1.0):
                raise ValueError(f"{path!r} is a float image with values in [{low:g}, {high:g}]; torchlrp reads float "
                                 f"images with values in [0, 1]: rescale it")
        else:
            peak = 65535.0 if opened.mode.startswith("I;16") or values.max() <= 65535 else 2.0 ** 32 - 1
            values = values / peak
            if values.min() < 0:
                raise ValueError(f"{path!r} holds negative pixel values (mode {opened.mode}); torchlrp reads "
                                 f"unsigned images")
        return np.repeat(values.astype(np.float32)[:, :, None], 3, axis=2)
    return np.asarray(opened.convert("RGB"))


def from_array(array: np.ndarray, size: int = 224) -> torch.Tensor:
    """Centre-crop an ``(H, W, 3)`` uint8 or float (``[0, 1]``) array to a square and resize it to a
    ``(3, size, size)`` tensor in [0, 1] (the crop comes first, so memory stays bounded at any aspect ratio).

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
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    window = array[top:top + side, left:left + side]  # cropped first: a 20000x1 image resizes 1x1 pixels
    image = torch.as_tensor(np.array(window, dtype=np.float32)).permute(2, 0, 1)
    if array.dtype == np.uint8:
        image = image / 255.0
    resized = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)[0]
    return resized.clamp(0, 1)


def categories() -> list[str]:
    """Return the 1000 ImageNet class names (shipped with torchvision, no download).

    Returns
    -------
    list of str
        Class names by index.
    """
    import torchvision

    return list(torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])


#: file name endings :class:`ImageFiles` reads
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder as a dataset of normalized ``(3, size, size)`` tensors with labels.

    A folder of class folders (``root/<class>/<image>``, torchvision's ``ImageFolder`` layout) gives each image its
    class folder's index in sorted order; a flat folder of images gives label -1.

    Parameters
    ----------
    root : str
        The folder.
    size : int
        Side length after resizing the shorter side and centre-cropping (:func:`load_image`).
    normalize : bool
        Apply the ImageNet normalization (:func:`normalize`).

    Attributes
    ----------
    files : list of str
        The image paths, sorted (class folders first, then file names).
    labels : list of int
        Each file's label.
    classes : list of str
        The class folder names (empty for a flat folder).

    Raises
    ------
    ValueError
        If ``root`` is not a folder or holds no images.
    """

    def __init__(self, root: str, size: int = 224, normalize: bool = True) -> None:
        if not os.path.isdir(root):
            raise ValueError(f"{root!r} is not a folder")
        entries = sorted(os.listdir(root))
        self.classes = [entry for entry in entries if os.path.isdir(os.path.join(root, entry))]
        self.files, self.labels = [], []
        if self.classes:
            for label, name in enumerate(self.classes):
                for current, _, names in sorted(os.walk(os.path.join(root, name))):
                    images = [os.path.join(current, file) for file in sorted(names) if _is_image(file)]
                    self.files += images
                    self.labels += [label] * len(images)
        else:
            self.files = [os.path.join(root, entry) for entry in entries if _is_image(entry)]
            self.labels = [-1] * len(self.files)
        if not self.files:
            raise ValueError(f"{root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), neither directly nor in "
                             f"class folders")
        self.size, self.normalize = size, normalize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        picture = load_image(self.files[index], self.size)
        return (normalize(picture[None])[0] if self.normalize else picture), self.labels[index]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
