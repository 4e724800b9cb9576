"""Region and box proposals for the proposal baselines (SPEC 7), and GrabCut from a box.

Everything here works on the letterboxed square at the proposal resolution ``R``
(``Letterbox(h, w, R)``): proposals are boolean ``R x R`` masks, boxes are
``[x0, y0, x1, y1)`` in its pixels, so a chosen proposal maps back to the original
image with the same ``prediction_mask`` the model's logits use.

Segment proposals stand in for the paper's MCG: Felzenszwalb's graph segmentation
(scikit-image) and a greedy hierarchy of merges of adjacent segments by colour and size
(as in selective search). Box proposals stand in for EdgeBox: sliding boxes at several
scales and aspect ratios plus the bounding boxes of the segment proposals. The box geometry
(``Content``, ``sliding_boxes``, ``mask_boxes``, ``box_iou``) lives in
:mod:`referseg.data.boxes`, since the box pretraining (stage 0) uses it too.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from referseg.data.boxes import (  # noqa: F401 - box_iou, mask_boxes, sliding_boxes, unique_boxes re-exported
    Content,
    box_iou,
    mask_boxes,
    sliding_boxes,
    unique_boxes,
)

GEOMETRY_FEATURES = 9  # x0, y0, x1, y1, xc, yc, w, h (in [-1, 1] over the image), area fraction


@contextmanager
def single_thread() -> Iterator[None]:
    """Torch and NumPy's BLAS on one thread for a while: the baselines' products are small, and a
    thread pool on busy cores costs more than it saves (measured: 20 ms against 0.7 ms for a
    (150 x 80) @ (80 x 256) product). ``threadpoolctl`` limits the BLAS; torch has its own setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float32 (callers run inside :func:`single_thread`)."""
    return np.asarray(a, dtype=np.float32) @ np.asarray(b, dtype=np.float32)


def box_masks(boxes: np.ndarray, size: int) -> np.ndarray:
    """(P, size, size) masks of integer boxes ``[x0, y0, x1, y1)``, vectorised."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    coords = np.arange(size)
    inside_x = (coords[None, :] >= boxes[:, 0:1]) & (coords[None, :] < boxes[:, 2:3])  # (P, size)
    inside_y = (coords[None, :] >= boxes[:, 1:2]) & (coords[None, :] < boxes[:, 3:4])
    return inside_y[:, :, None] & inside_x[:, None, :]


def mask_iou(masks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """IoU of each of (P, H, W) masks with one (H, W) mask (matrix products, no pixel loops)."""
    flat = np.asarray(masks, dtype=np.float32).reshape(len(masks), -1)
    target = np.asarray(mask, dtype=np.float32).reshape(-1)
    inter = dot(flat, target)
    union = flat.sum(axis=1) + target.sum() - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass(frozen=True)
class SegmentProposals:
    """Region proposals of one image, stored compactly as unions of segments.

    ``labels`` is the (R, R) segment id of each letterbox pixel (-1 on the padding),
    ``members`` the (P, segments) membership of each proposal. Areas, boxes, feature-cell
    coverage and overlaps are computed per segment (bincounts) and summed over members,
    so no (P, R, R) stack is needed except for the masks actually predicted.
    """

    labels: np.ndarray
    members: np.ndarray

    def __len__(self) -> int:
        return len(self.members)

    def masks(self, which: np.ndarray | slice | None = None) -> np.ndarray:
        """(P, R, R) boolean masks (or those of ``which``)."""
        members = self.members if which is None else self.members[which]
        padded = np.concatenate([members, np.zeros((len(members), 1), dtype=bool)], axis=1)
        return padded[:, self.labels]  # label -1 reads the all-False column

    @property
    def segment_count(self) -> int:
        return self.members.shape[1]

    def _per_segment(self, weights: np.ndarray | None = None) -> np.ndarray:
        inside = self.labels >= 0
        w = None if weights is None else weights[inside]
        return np.bincount(self.labels[inside], weights=w, minlength=self.segment_count)

    def areas(self) -> np.ndarray:
        """(P,) pixels of each proposal."""
        return dot(self.members, self._per_segment()).astype(np.float64)

    def overlaps(self, target: np.ndarray) -> np.ndarray:
        """(P,) IoU of each proposal with an (R, R) boolean mask."""
        inter = dot(self.members, self._per_segment(target.astype(np.float64))).astype(np.float64)
        union = self.areas() + target.sum() - inter
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    def boxes(self) -> np.ndarray:
        """(P, 4) tight boxes ``[x0, y0, x1, y1)``."""
        from scipy.ndimage import find_objects

        slices = find_objects(self.labels + 1, max_label=self.segment_count)
        seg = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] if s is not None else [0, 0, 0, 0]
                        for s in slices], dtype=np.int64).reshape(-1, 4)
        big = np.iinfo(np.int64).max
        lo = np.where(self.members[:, :, None], seg[None, :, :2], big).min(axis=1)
        hi = np.where(self.members[:, :, None], seg[None, :, 2:], -1).max(axis=1)
        return np.concatenate([lo, hi], axis=1)

    def coverage(self, grid: int) -> np.ndarray:
        """(P, grid, grid) fraction of each feature cell covered by each proposal."""
        size = self.labels.shape[0]
        if size % grid:
            raise ValueError(f"proposal resolution {size} is not a multiple of the feature grid {grid}")
        block = size // grid
        cell = (np.arange(size)[:, None] // block) * grid + np.arange(size)[None, :] // block
        inside = self.labels >= 0
        counts = np.bincount(self.labels[inside] * grid * grid + cell[inside],
                             minlength=self.segment_count * grid * grid).reshape(self.segment_count, -1)
        cover = dot(self.members, counts / (block * block))
        return cover.reshape(len(self), grid, grid)


def segment_proposals(square_image: np.ndarray, content: Content, scale: float, min_size: int,
                      max_proposals: int, sigma: float = 0.5, min_area: float = 0.002) -> SegmentProposals:
    """Region proposals of a letterboxed uint8 image: segments and their merges.

    Felzenszwalb (scikit-image) over the image's content gives the segments; adjacent
    segments are then merged greedily, most similar first (mean colour, small sizes first),
    and every merge is kept as a proposal, up to the whole image. Regions smaller than
    ``min_area`` of the image are dropped; of the rest, the ``max_proposals`` largest
    merges are dropped first (the whole image and near-whole merges are kept).
    """
    from skimage.segmentation import felzenszwalb

    rows, cols = content.slices
    crop = square_image[rows, cols]
    segments = felzenszwalb(crop, scale=scale, sigma=sigma, min_size=min_size)
    members = _merge_hierarchy(segments, crop)  # (P, n_segments) bool, segments first, then merges
    sizes = np.bincount(segments.reshape(-1), minlength=members.shape[1]).astype(np.float64)
    members = members[dot(members, sizes) / segments.size >= min_area]
    if len(members) > max_proposals:
        # Keep the last merges (large regions, the whole image) and the earliest proposals.
        keep_last = min(len(members), max_proposals // 4)
        members = np.concatenate([members[: max_proposals - keep_last], members[len(members) - keep_last:]])
    labels = np.full((content.size, content.size), -1, dtype=np.int32)
    labels[rows, cols] = segments
    return SegmentProposals(labels, members)


def _merge_hierarchy(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Membership (P, n) of the segments and every greedy merge of two adjacent regions."""
    n = int(labels.max()) + 1
    flat = labels.reshape(-1)
    size = np.bincount(flat, minlength=n).astype(np.float64)
    colour = np.stack([np.bincount(flat, weights=image[..., c].reshape(-1).astype(np.float64), minlength=n)
                       for c in range(3)], axis=1) / np.maximum(size, 1)[:, None]
    adjacent = np.zeros((n, n), dtype=bool)
    adjacent[labels[:, :-1], labels[:, 1:]] = True  # horizontal neighbours
    adjacent[labels[:-1], labels[1:]] = True  # vertical neighbours
    adjacent |= adjacent.T
    np.fill_diagonal(adjacent, False)
    neighbours: dict[int, set[int]] = {i: set(np.flatnonzero(adjacent[i]).tolist()) for i in range(n)}
    member = {i: np.eye(1, n, i, dtype=bool)[0] for i in range(n)}
    # Plain floats: the loop below makes hundreds of similarity calls per image.
    sizes = {i: float(size[i]) for i in range(n)}
    colours = {i: tuple(colour[i].tolist()) for i in range(n)}
    total = float(size.sum())
    colour_scale = 255.0 * math.sqrt(3.0)
    proposals = [member[i] for i in range(n)]
    next_id = n

    def similarity(a: int, b: int) -> float:
        (r1, g1, b1), (r2, g2, b2) = colours[a], colours[b]
        colour_sim = 1.0 - math.sqrt((r1 - r2) ** 2 + (g1 - g2) ** 2 + (b1 - b2) ** 2) / colour_scale
        size_sim = 1.0 - (sizes[a] + sizes[b]) / total
        return colour_sim + size_sim

    # A heap of adjacent pairs by similarity; pairs whose regions were merged away are skipped.
    heap = [(-similarity(a, b), a, b) for a in neighbours for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    alive = set(range(n))
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in alive or b not in alive:
            continue
        merged = next_id
        next_id += 1
        alive -= {a, b}
        alive.add(merged)
        member[merged] = member[a] | member[b]
        sizes[merged] = sizes[a] + sizes[b]
        colours[merged] = tuple((ca * sizes[a] + cb * sizes[b]) / sizes[merged]
                                for ca, cb in zip(colours[a], colours[b], strict=True))
        neighbours[merged] = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for c in neighbours[merged]:
            neighbours[c] -= {a, b}
            neighbours[c].add(merged)
            heapq.heappush(heap, (-similarity(c, merged), c, merged))
        proposals.append(member[merged])
    return np.stack(proposals)


def geometry(boxes: np.ndarray, areas: np.ndarray, content: Content) -> np.ndarray:
    """(P, 9) float32 box geometry relative to the image: corners and centre in [-1, 1], size, area fraction."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x = (boxes[:, [0, 2]] - content.left) / content.width * 2 - 1
    y = (boxes[:, [1, 3]] - content.top) / content.height * 2 - 1
    out = np.stack([
        x[:, 0], y[:, 0], x[:, 1], y[:, 1],
        x.mean(axis=1), y.mean(axis=1),
        (x[:, 1] - x[:, 0]) / 2, (y[:, 1] - y[:, 0]) / 2,
        np.asarray(areas, dtype=np.float64) / (content.height * content.width),
    ], axis=1)
    return out.astype(np.float32)


def grid_coverage(masks: np.ndarray, grid: int) -> np.ndarray:
    """(P, grid, grid) fraction of each feature cell covered by each (P, R, R) mask (R a multiple of grid)."""
    count, size = len(masks), masks.shape[-1]
    if size % grid:
        raise ValueError(f"proposal resolution {size} is not a multiple of the feature grid {grid}")
    block = size // grid
    return masks.reshape(count, grid, block, grid, block).mean(axis=(2, 4), dtype=np.float32)


def box_coverage(boxes: np.ndarray, size: int, grid: int) -> np.ndarray:
    """(P, grid, grid) fraction of each feature cell inside each box, from interval overlaps."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if size % grid:
        raise ValueError(f"proposal resolution {size} is not a multiple of the feature grid {grid}")
    block = size // grid
    starts = np.arange(grid, dtype=np.float64) * block

    def overlap(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:  # (P, grid)
        return np.clip(np.minimum(hi[:, None], starts + block) - np.maximum(lo[:, None], starts), 0, None) / block

    return (overlap(boxes[:, 1], boxes[:, 3])[:, :, None] * overlap(boxes[:, 0], boxes[:, 2])[:, None, :]
            ).astype(np.float32)


def grabcut(square_image: np.ndarray, box: np.ndarray, content: Content, iterations: int) -> np.ndarray:
    """GrabCut (OpenCV) initialised with ``box`` on the letterboxed image; (R, R) bool foreground.

    Falls back to the box itself when the box leaves no background to model (it covers
    the whole image) or is too thin for GrabCut.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    fallback = box_masks(np.array([[x0, y0, x1, y1]]), content.size)[0]
    rows, cols = content.slices
    crop = np.ascontiguousarray(square_image[rows, cols], dtype=np.uint8)
    # The box in crop coordinates, kept one pixel inside the image so some background remains.
    cx0, cy0 = max(x0 - content.left, 1), max(y0 - content.top, 1)
    cx1, cy1 = min(x1 - content.left, content.width - 1), min(y1 - content.top, content.height - 1)
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        return fallback
    state = np.zeros(crop.shape[:2], dtype=np.uint8)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    # GrabCut seeds its colour models by k-means from OpenCV's global generator: seeded per call,
    # a box's cut is a function of the image and the box alone, whatever ran before.
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(crop, state, (cx0, cy0, cx1 - cx0, cy1 - cy0), background, foreground,
                    iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return fallback
    out = np.zeros((content.size, content.size), dtype=bool)
    out[rows, cols] = (state == cv2.GC_FGD) | (state == cv2.GC_PR_FGD)
    return out
