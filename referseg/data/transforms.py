"""Image and mask geometry of SPEC 3: letterbox in, undo the letterbox for evaluation.

All resizing is bilinear (OpenCV, vectorised). The official code used
``skimage.transform.resize``; the geometry (scale, rounding, padding, cropping) is
the official one exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
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


@functools.lru_cache(maxsize=16)
def _resize_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) float32: the bilinear resize from ``source`` to ``target`` pixels along one
    axis as a matrix (OpenCV's INTER_LINEAR applied to the identity)."""
    matrix = cv2.resize(np.eye(source, dtype=np.float32), (source, target), interpolation=cv2.INTER_LINEAR)
    matrix.flags.writeable = False
    return matrix


def undo_letterbox_matrices(size: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``, (height, size) and (width, size) float32, with
    ``undo_letterbox(square, height, width) == rows @ square @ cols.T`` up to float rounding: the
    bilinear resize is separable, and the crop keeps some of its rows and columns (SPEC 1, 3)."""
    side = int(round(size * max(height / size, width / size)))
    matrix = _resize_matrix(size, side)
    top, left = (side - height) // 2, (side - width) // 2
    return matrix[top : top + height], matrix[left : left + width]


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


# --- boxes: the official ReferIt files give each region as a box, not a mask -------------------------


def box_mask(box: Sequence[int], height: int, width: int) -> np.ndarray:
    """The ``height x width`` mask of ``box`` = [xmin, ymin, xmax, ymax], 0-based and inclusive
    (``referit_bbox.json``); a box with xmax < xmin or ymax < ymin is empty."""
    x0, y0, x1, y1 = (int(v) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    mask[max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = True
    return mask


@functools.lru_cache(maxsize=64)
def _resize_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first, last)``, each (target,) int: the source pixels that each pixel of a bilinear resize from
    ``source`` to ``target`` pixels reads with a positive weight (OpenCV's INTER_LINEAR along one axis,
    found by resizing the identity): a run of one or two pixels, moving right as the pixel does."""
    taps = cv2.resize(np.eye(source, dtype=np.float32), (source, target), interpolation=cv2.INTER_LINEAR) > 0
    first, last = taps.argmax(axis=1), source - 1 - taps[:, ::-1].argmax(axis=1)
    runs = taps.any(axis=1).all() and (taps.sum(axis=1) == last - first + 1).all()
    if not (runs and (np.diff(first) >= 0).all() and (np.diff(last) >= 0).all()):
        raise AssertionError(f"a bilinear resize {source} -> {target} does not read runs of pixels in order")
    return first, last


def letterbox_boxes(boxes: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Boxes of one ``height x width`` image in the ``size x size`` letterbox (SPEC 3), (n, 4) int:
    ``box_mask(letterbox_boxes(b)[k], size, size) == letterbox_mask(box_mask(b[k], height, width), size)``.

    ``boxes`` is (n, 4) [xmin, ymin, xmax, ymax], 0-based and inclusive. A box mask is the outer
    product of a row and a column indicator and the bilinear resize is separable with non-negative
    weights, so a resized pixel is > 0 exactly when the runs of pixels it reads on both axes meet the
    box: the letterboxed mask is again a box, found without resizing any mask. A box that a strong
    downscale skips comes back empty (xmax < xmin or ymax < ymin).
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    letterbox = Letterbox(height, width, size)
    (rh, rw), (top, left) = letterbox.resized, letterbox.pad
    out = np.empty_like(boxes)
    for axis, (source, target, offset) in enumerate(((width, rw, left), (height, rh, top))):
        first, last = _resize_taps(source, target)
        low, high = boxes[:, axis], boxes[:, axis + 2]
        out[:, axis] = offset + np.searchsorted(last, low, side="left")  # first pixel whose run ends at or after low
        out[:, axis + 2] = offset + np.searchsorted(first, high, side="right") - 1  # last whose run starts by high
    return out


def letterbox_box(box: Sequence[int], height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """One box in the letterbox (:func:`letterbox_boxes`)."""
    x0, y0, x1, y1 = (int(v) for v in letterbox_boxes(np.asarray([box]), height, width, size)[0])
    return x0, y0, x1, y1


def lowres_box_labels(box: Sequence[int], size: int, grid: int, mode: str = "or") -> np.ndarray:
    """``lowres_labels(box_mask(box, size, size), grid, mode)`` of a letterboxed box (SPEC 5), from its corners."""
    if size % grid:
        raise ValueError(f"a {size}x{size} square cannot be pooled to a {grid}x{grid} grid")
    s = size // grid
    x0, y0, x1, y1 = (int(v) for v in box)
    if mode == "or":  # the cells that any pixel of the box falls in
        cells = (x0 // s, y0 // s, x1 // s, y1 // s) if x1 >= x0 and y1 >= y0 else (0, 0, -1, -1)
    elif mode == "nearest":  # the cells whose centre pixel (k s + s // 2) is in the box
        cells = (-((s // 2 - x0) // s), -((s // 2 - y0) // s), (x1 - s // 2) // s, (y1 - s // 2) // s)
    else:
        raise ValueError(f"lowres label mode {mode!r}: use 'or' or 'nearest'")
    return box_mask(cells, grid, grid)


def box_coverage(boxes: np.ndarray, size: int) -> np.ndarray:
    """(size, size) int64: how many of the (n, 4) boxes cover each pixel of a ``size x size`` square
    (their masks summed, through a difference array: no mask is drawn)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    boxes = boxes[(boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])]
    x0, y0 = boxes[:, 0].clip(0, size), boxes[:, 1].clip(0, size)
    x1, y1 = (boxes[:, 2] + 1).clip(0, size), (boxes[:, 3] + 1).clip(0, size)
    corners = np.zeros((size + 1, size + 1), dtype=np.int64)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(corners, (ys, xs), sign)
    return corners.cumsum(axis=0).cumsum(axis=1)[:size, :size]
