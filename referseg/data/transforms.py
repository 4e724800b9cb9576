"""Image and mask geometry of SPEC 3: letterbox in, undo the letterbox for evaluation.

All resizing is bilinear (OpenCV, vectorised). The official code used
``skimage.transform.resize``; the geometry (scale, rounding, padding, cropping) is
the official one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class Letterbox:
    """Where a ``height x width`` image lands in the ``size x size`` square (SPEC 3)."""

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return min(self.size / self.height, self.size / self.width)

    @property
    def resized(self) -> tuple[int, int]:
        """(h, w) after the resize: round(h * scale), round(w * scale)."""
        return int(round(self.height * self.scale)), int(round(self.width * self.scale))

    @property
    def pad(self) -> tuple[int, int]:
        """(top, left) zero padding: floor((size - resized) / 2)."""
        rh, rw = self.resized
        return (self.size - rh) // 2, (self.size - rw) // 2


def to_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Any uint8 image (grayscale, RGB, RGBA) as HxWx3 RGB (SPEC 3: gray replicated)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"{name}: expected an HxW or HxWxC image, got shape {image.shape}")
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if channels == 3:
        return image
    raise ValueError(f"{name}: {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


def letterbox_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio and zero-pad, centred, to ``size x size``;
    float32, 0-255."""
    image = to_rgb(image)
    box = Letterbox(image.shape[0], image.shape[1], size)
    rh, rw = box.resized
    top, left = box.pad
    out = np.zeros((size, size, 3), dtype=np.float32)
    out[top : top + rh, left : left + rw] = _resize(image.astype(np.float32), rh, rw)
    return out


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask's letterbox: same resize and pad, then bilinear value > 0 (SPEC 3)."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    box = Letterbox(mask.shape[0], mask.shape[1], size)
    rh, rw = box.resized
    top, left = box.pad
    out = np.zeros((size, size), dtype=bool)
    out[top : top + rh, left : left + rw] = _resize(mask.astype(np.float32), rh, rw) > 0
    return out


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """HxWx3 float image on the 0-255 scale -> 3xHxW tensor, ``(x - mean) / std``.

    Padded pixels stay exactly 0 before normalisation, as in the official code.
    """
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    return torch.from_numpy(((image - mean_a) / std_a).transpose(2, 0, 1).copy())


def lowres_labels(mask: np.ndarray, grid: int, mode: str = "or") -> np.ndarray:
    """``grid x grid`` labels of a letterboxed square mask (SPEC 5).

    ``or``: a cell is positive if ANY pixel of its block is (the official code);
    ``nearest``: the pixel at the block's centre (an ablation).
    """
    size = mask.shape[0]
    if mask.shape != (size, size) or size % grid:
        raise ValueError(f"mask of shape {mask.shape} cannot be pooled "
                         f"to a {grid}x{grid} grid")
    s = size // grid
    if mode == "or":
        return mask.reshape(grid, s, grid, s).any(axis=(1, 3))
    if mode == "nearest":
        return mask[s // 2 :: s, s // 2 :: s].copy()
    raise ValueError(f"lowres label mode {mode!r}: use 'or' or 'nearest'")


def undo_letterbox(square: np.ndarray, height: int, width: int) -> np.ndarray:
    """Map a ``size x size`` map (logits or 0/1) back to ``height x width`` (SPEC 1, 3).

    Rescale by max(h/size, w/size) to round(size * scale) on each side (bilinear), then
    crop floor((size' - h)/2) from the top and floor((size' - w)/2) from the left.
    """
    size = square.shape[0]
    if square.shape != (size, size):
        raise ValueError(f"expected a square map, got shape {square.shape}")
    scale = max(height / size, width / size)
    side = int(round(size * scale))
    resized = _resize(np.asarray(square, dtype=np.float32), side, side)
    top, left = (side - height) // 2, (side - width) // 2
    return resized[top : top + height, left : left + width]


def prediction_mask(square_logits: np.ndarray, height: int, width: int,
                    mode: str = "logits") -> np.ndarray:
    """Boolean mask at the original size from ``size x size`` logits (SPEC 1).

    ``logits`` (default): undo the letterbox on the logits, then logit > 0.
    ``official``: threshold at ``size``, resize the 0/1 map, any non-zero is foreground
    (the official code's protocol; it dilates the prediction by about one pixel).
    """
    if mode == "logits":
        return undo_letterbox(square_logits, height, width) > 0
    if mode == "official":
        binary = (square_logits >= 1e-9).astype(np.float32)
        return undo_letterbox(binary, height, width) > 0
    raise ValueError(f"evaluation mode {mode!r}: use 'logits' or 'official'")
