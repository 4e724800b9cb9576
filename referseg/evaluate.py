"""The evaluation protocol of SPEC 1: overall IoU, mean IoU and precision@k at original resolution.

``evaluate_masks`` is the metric on plain boolean arrays. ``evaluate_run`` evaluates a
trained run folder (and, with ``all_methods``, every baseline) on a split, writes the
per-sample CSV and the summary JSON of each method, and the paper's table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # SPEC 1: precision@t
SUMMARY_KEYS = ("overall_iou", "mean_iou") + tuple(f"precision@{t}" for t in PRECISION_THRESHOLDS)


def intersection_union(prediction: np.ndarray, target: np.ndarray, index: int = 0) -> tuple[int, int]:
    """``(|P and G|, |P or G|)`` of one pair of boolean masks of the same shape (SPEC 1)."""
    prediction = np.asarray(prediction)
    target = np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(
            f"pair {index}: prediction shape {prediction.shape} differs from target shape {target.shape}; "
            "map predictions back to the original image size first (referseg.data.transforms.prediction_mask)"
        )
    prediction = prediction.astype(bool, copy=False)
    target = target.astype(bool, copy=False)
    return int(np.count_nonzero(prediction & target)), int(np.count_nonzero(prediction | target))


def iou_from_counts(intersections: Sequence[int] | np.ndarray, unions: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-sample I/U; a sample whose union is empty (nothing predicted, nothing to find) has IoU 1."""
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def summarize(intersections: Sequence[int] | np.ndarray, unions: Sequence[int] | np.ndarray) -> dict[str, float]:
    """The SPEC 1 summary from per-sample counts: overall IoU = sum I / sum U, mean IoU, precision@t."""
    inter = np.asarray(intersections, dtype=np.int64)
    union = np.asarray(unions, dtype=np.int64)
    if inter.shape != union.shape or inter.ndim != 1:
        raise ValueError(f"expected two 1-D count arrays of one length, got {inter.shape} and {union.shape}")
    if len(inter) == 0:
        raise ValueError("nothing to evaluate: no samples")
    iou = iou_from_counts(inter, union)
    total_union = int(union.sum())
    summary = {
        # All unions empty means every prediction matched an empty target exactly.
        "overall_iou": float(inter.sum() / total_union) if total_union else 1.0,
        "mean_iou": float(iou.mean()),
    }
    for t in PRECISION_THRESHOLDS:
        # A small tolerance so that an IoU of exactly t (e.g. 3/5 = 0.6) counts despite rounding.
        summary[f"precision@{t}"] = float(np.mean(iou >= t - 1e-12))
    return summary


def evaluate_masks(predictions: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> dict:
    """Compare predicted and ground-truth boolean masks pairwise (SPEC 1).

    Each pair must share a shape; shapes may differ between pairs. Returns ``overall_iou``,
    ``mean_iou``, ``precision@0.5`` .. ``precision@0.9`` (fractions) and the per-sample
    ``intersections`` and ``unions`` (int64 arrays).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets; give one prediction per target")
    counts = np.array(
        [intersection_union(p, t, index=i) for i, (p, t) in enumerate(zip(predictions, targets, strict=True))],
        dtype=np.int64,
    ).reshape(-1, 2)
    result: dict = summarize(counts[:, 0], counts[:, 1])
    result["intersections"] = counts[:, 0]
    result["unions"] = counts[:, 1]
    return result
