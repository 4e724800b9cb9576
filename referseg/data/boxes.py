"""Box geometry shared by the box-retrieval baseline (SPEC 7) and the box pretraining (stage 0, SPEC 5).

Boxes are integer ``[x0, y0, x1, y1)`` (half-open) in the pixels of some image: the
letterbox at a proposal resolution for the baselines, the original image for stage 0.
The official code writes boxes inclusive, ``[x1, y1, x2, y2]`` with the crop
``im[y1:y2+1, x1:x2+1]``; that is ``[x0, y0, x1 - 1, y1 - 1]`` here, and the IoU of
half-open boxes equals the official ``compute_bbox_iou`` with its ``+ 1`` areas.

Sliding boxes stand in for EdgeBoxes (no EdgeBoxes implementation is available offline):
boxes tiling the image at several scales and aspect ratios, and the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from referseg.data.transforms import Letterbox

# Sliding boxes: side = scale * sqrt(image area), aspect = width / height (the paper gives none).
BOX_SCALES = (0.3, 0.5, 0.75, 1.0)
BOX_ASPECTS = (0.5, 1.0, 2.0)
BOX_FEATURES = 8  # the official 8-d box feature (processing_tools.spatial_feature_from_bbox)


@dataclass(frozen=True)
class Content:
    """Where the image lies in the ``size x size`` letterbox: rows top..top+height, cols left..left+width."""

    top: int
    left: int
    height: int
    width: int
    size: int

    @classmethod
    def of(cls, height: int, width: int, size: int) -> Content:
        box = Letterbox(height, width, size)
        (top, left), (rh, rw) = box.pad, box.resized
        return cls(top, left, rh, rw, size)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight integer boxes ``[x0, y0, x1, y1)`` of (P, H, W) masks; an empty mask gets (0, 0, 0, 0)."""
    masks = np.asarray(masks, dtype=bool)
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (P, H), (P, W)
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    has = rows.any(axis=1)
    height, width = masks.shape[1:]
    boxes[:, 0] = np.argmax(cols, axis=1)
    boxes[:, 1] = np.argmax(rows, axis=1)
    boxes[:, 2] = width - np.argmax(cols[:, ::-1], axis=1)
    boxes[:, 3] = height - np.argmax(rows[:, ::-1], axis=1)
    boxes[~has] = 0
    return boxes


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of (P, 4) boxes with one box, all ``[x0, y0, x1, y1)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box = np.asarray(box, dtype=np.float64)
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def sliding_boxes(content: Content, scales: tuple[float, ...], aspects: tuple[float, ...],
                  overlap: float = 0.5) -> np.ndarray:
    """Boxes tiling the image at each scale (side = scale * sqrt(image area)) and aspect (w / h),
    and the whole image."""
    boxes = [(content.left, content.top, content.left + content.width, content.top + content.height)]
    side = np.sqrt(content.height * content.width)
    for scale in scales:
        for aspect in aspects:
            bw = int(round(min(content.width, side * scale * np.sqrt(aspect))))
            bh = int(round(min(content.height, side * scale / np.sqrt(aspect))))
            if bw < 2 or bh < 2:
                continue
            xs = _positions(content.width, bw, overlap)
            ys = _positions(content.height, bh, overlap)
            for y in ys:
                for x in xs:
                    boxes.append((content.left + x, content.top + y, content.left + x + bw, content.top + y + bh))
    return unique_boxes(np.asarray(boxes, dtype=np.int64).reshape(-1, 4))


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """Distinct integer boxes, sorted (one 1-D unique on packed codes, not a row-wise unique)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes
    base = int(boxes.max()) + 1
    codes = ((boxes[:, 0] * base + boxes[:, 1]) * base + boxes[:, 2]) * base + boxes[:, 3]
    _, first = np.unique(codes, return_index=True)
    return boxes[first]


def _positions(extent: int, length: int, overlap: float) -> np.ndarray:
    step = max(1, int(round(length * (1 - overlap))))
    count = max(1, int(np.ceil((extent - length) / step)) + 1)
    return np.linspace(0, extent - length, count).round().astype(np.int64)


def official_box_features(boxes: np.ndarray, height: int | np.ndarray, width: int | np.ndarray) -> np.ndarray:
    """(P, 8) float32 ``[x1, y1, x2, y2, xc, yc, w, h]`` of boxes in ``height x width`` images (SPEC 5).

    ``height`` and ``width`` are one image's, or (P,) arrays: each box's own image.

    The official ``spatial_feature_from_bbox``: the inclusive corners ``x1 = x0``,
    ``x2 = x1_open - 1`` mapped by ``2 x / W - 1`` (``2 y / H - 1``) into [-1, 1], their
    centre, and ``w = x2 - x1``, ``h = y2 - y1`` in those units.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1 = boxes[:, 0] * 2 / width - 1, boxes[:, 1] * 2 / height - 1
    x2, y2 = (boxes[:, 2] - 1) * 2 / width - 1, (boxes[:, 3] - 1) * 2 / height - 1
    return np.stack([x1, y1, x2, y2, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1).astype(np.float32)
