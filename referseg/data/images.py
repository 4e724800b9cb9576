"""The one image decoder and the one preprocessing of the study (SPEC 3).

``read_image`` turns any file a user or a dataset hands us into uint8 HxWx3 RGB, with one
behaviour everywhere: a missing, truncated or unreadable file, or a bit depth we cannot
map to 8 bits, is refused with a message naming the file; 16-bit images are scaled
(65535 -> 255), not clipped; a huge image can be decoded at a reduced size so memory
stays bounded. ``preprocess`` is decode-free: letterbox to the profile's square, then
normalise with its mean and std. Training, evaluation, prediction, the figures, the
baselines and the ablations all go through these two functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from referseg.data.transforms import letterbox_image, normalize, to_rgb

if TYPE_CHECKING:
    from referseg.config import Profile

# Modes PIL converts to 8-bit RGB without losing what the image means.
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(ValueError):
    """An image file that cannot be decoded faithfully; the message names the file."""


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the file's header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.height, image.width
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image file {path}: {error}") from error


def read_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """The image file as uint8 HxWx3 RGB (gray replicated, alpha dropped; SPEC 3).

    With ``max_side``, an image whose longer side exceeds it is decoded at a reduced size
    (JPEG: by the decoder itself, at 1/2, 1/4 or 1/8 scale) and then shrunk to at most
    ``max_side``, so a 10000 x 10000 photo never needs its full-size pixels in memory.
    The letterbox only ever needs ``input_size`` pixels a side.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with warnings.catch_warnings():
            # Large photos are legitimate here; PIL still refuses the absurd (DecompressionBombError).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if max_side and max(image.size) > max_side:
                    image.draft("RGB", (max_side, max_side))  # JPEG decodes directly at a reduced scale
                image.load()  # a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES stays off)
                array = _to_uint8(image, path)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image file {path}: {error}. Give a complete PNG or JPEG file") from error
    if max_side and max(array.shape[:2]) > max_side:
        scale = max_side / max(array.shape[:2])
        size = (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale)))
        array = np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))
    return to_rgb(array, name=str(path))


def _to_uint8(image: Image.Image, path: Path) -> np.ndarray:
    """Pixels of an opened image as uint8, scaling 16-bit values instead of clipping them."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(f"image file {path}: {image.mode} pixels outside 0..65535; "
                                 "save it as an 8- or 16-bit PNG or as JPEG")
        return np.round(values.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 / 255 = 257
    if image.mode not in _EIGHT_BIT_MODES:
        raise ImageReadError(f"image file {path}: unsupported pixel format {image.mode!r} "
                             "(e.g. floating point); save it as an 8- or 16-bit PNG or as JPEG")
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    return np.asarray(image)


def preprocess(image: np.ndarray, profile: Profile) -> torch.Tensor:
    """(3, S, S) float32: the RGB image letterboxed to ``input_size`` and normalised (SPEC 3)."""
    square = letterbox_image(to_rgb(np.asarray(image)), profile.input_size)
    return normalize(square, profile.pixel_mean, profile.pixel_std)
