"""The metrics of SPEC 1 as pure functions: I/U, overall IoU, mean IoU, precision@t, groups, intervals.

Nothing here reads a file or a model: counts in, numbers out. ``summarize`` is the
paper's summary of per-sample (I, U) counts; ``summarize_groups`` the same per value of
any column (expression type, stuff or thing); ``bootstrap_overall_iou`` and
``bootstrap_difference`` percentile intervals over resampled test samples through
``scipy.stats.bootstrap`` (paired, vectorised), with several seeds' runs averaged on each
resampled test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

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


def box_intersection_union(prediction: np.ndarray, box: Sequence[int], predicted: int | None = None
                           ) -> tuple[int, int]:
    """``(|P and G|, |P or G|)`` of a boolean prediction and a box ``G`` = [xmin, ymin, xmax, ymax]
    (0-based, inclusive) on the same image: I counts P inside the box, U = |P| + |G| - I (SPEC 1).
    ``predicted`` is |P| when the caller knows it (one prediction, many boxes)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = np.shape(prediction)
    if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
        raise ValueError(f"box {[x0, y0, x1, y1]} is not inside the {width}x{height} prediction "
                         "([xmin, ymin, xmax, ymax], 0-based, inclusive)")
    inter = int(np.count_nonzero(prediction[y0 : y1 + 1, x0 : x1 + 1]))
    total = int(np.count_nonzero(prediction)) if predicted is None else int(predicted)
    return inter, total + (x1 - x0 + 1) * (y1 - y0 + 1) - inter


def iou_from_counts(intersections: Sequence[int] | np.ndarray, unions: Sequence[int] | np.ndarray,
                    empty: float = 1.0) -> np.ndarray:
    """Per-sample I/U. A sample whose union is empty (nothing predicted, nothing to find) has IoU
    ``empty``: 1 by default (a correct answer); the official test script gets NaN there, which
    fails every precision threshold, i.e. ``empty=0`` (SPEC 8)."""
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    return np.divide(inter, union, out=np.full_like(inter, empty), where=union > 0)


def overall_iou(intersections: Sequence | np.ndarray, unions: Sequence | np.ndarray,
                axis: int = -1) -> float | np.ndarray:
    """SPEC 1 overall IoU, sum I / sum U along ``axis`` (a float for 1-D counts, else an
    array of them); 1 where every union is empty, as :func:`iou_from_counts`."""
    inter = np.asarray(intersections, dtype=np.float64).sum(axis=axis)
    union = np.asarray(unions, dtype=np.float64).sum(axis=axis)
    result = iou_from_counts(inter, union)
    return float(result) if result.ndim == 0 else result


def summarize(intersections: Sequence[int] | np.ndarray,
              unions: Sequence[int] | np.ndarray,
              empty: float = 1.0) -> dict[str, float]:
    """The SPEC 1 summary from per-sample counts: overall IoU = sum I / sum U, mean IoU,
    precision@t.

    ``empty`` is the IoU of a sample with an empty union (:func:`iou_from_counts`).
    """
    inter = np.asarray(intersections, dtype=np.int64)
    union = np.asarray(unions, dtype=np.int64)
    if inter.shape != union.shape or inter.ndim != 1:
        raise ValueError(f"expected two 1-D count arrays of one length, "
                         f"got {inter.shape} and {union.shape}")
    if len(inter) == 0:
        raise ValueError("nothing to evaluate: no samples")
    iou = iou_from_counts(inter, union, empty)
    summary = {"overall_iou": float(overall_iou(inter, union)),
               "mean_iou": float(iou.mean())}
    for t in PRECISION_THRESHOLDS:
        # A small tolerance, so that an IoU of exactly t (e.g. 3/5 = 0.6) counts despite
        # rounding.
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


def summarize_groups(frame: pd.DataFrame, column: str, empty: float = 1.0) -> dict[str, dict[str, float]]:
    """``{value: summary}`` of a per-sample frame (``intersection``, ``union`` columns) grouped by ``column``."""
    return {str(value): summarize(part["intersection"].to_numpy(), part["union"].to_numpy(), empty)
            for value, part in frame.groupby(column, sort=True)}


# --- confidence intervals over test samples (and seeds) -------------------------------------------


def _as_runs(values: Sequence | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"expected per-sample counts of shape (samples,) or (runs, samples), got {array.shape}")
    return array


def _runs_iou(inter: np.ndarray, union: np.ndarray, axis: int = -1) -> np.ndarray:
    """Overall IoU of each run (first axis), averaged over the runs."""
    return overall_iou(inter, union, axis=axis).mean(axis=0)


def _interval(data: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray], resamples: int, level: float,
              seed: int) -> tuple[float, float]:
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"confidence level {level}: give a fraction such as 0.95")
    result = stats.bootstrap(data, statistic, n_resamples=resamples, confidence_level=level, paired=True,
                             vectorized=True, axis=-1, method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_overall_iou(intersections: Sequence | np.ndarray, unions: Sequence | np.ndarray,
                          resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(overall IoU, low, high)``: a percentile bootstrap interval over test samples.

    Test samples are drawn with replacement and overall IoU (sum I / sum U, SPEC 1) is
    recomputed; with (runs, samples) counts of several seeds on the same test samples, each
    draw averages the runs' overall IoUs on the same resampled set.
    """
    inter, union = _as_runs(intersections), _as_runs(unions)
    if inter.shape != union.shape:
        raise ValueError(f"intersections {inter.shape} and unions {union.shape} differ in shape")
    low, high = _interval((inter, union), _runs_iou, resamples, level, seed)
    return float(_runs_iou(inter, union)), low, high


def bootstrap_difference(intersections_a: Sequence | np.ndarray, unions_a: Sequence | np.ndarray,
                         intersections_b: Sequence | np.ndarray, unions_b: Sequence | np.ndarray,
                         resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(IoU_a - IoU_b, low, high)``, paired: both methods are scored on the same resampled test samples."""
    ia, ua, ib, ub = (_as_runs(x) for x in (intersections_a, unions_a, intersections_b, unions_b))
    if ia.shape[1] != ib.shape[1]:
        raise ValueError(f"the two methods were tested on {ia.shape[1]} and {ib.shape[1]} samples; "
                         "a paired difference needs the same test samples")

    def difference(ia: np.ndarray, ua: np.ndarray, ib: np.ndarray, ub: np.ndarray, axis: int = -1) -> np.ndarray:
        return _runs_iou(ia, ua, axis) - _runs_iou(ib, ub, axis)

    low, high = _interval((ia, ua, ib, ub), difference, resamples, level, seed)
    return float(difference(ia, ua, ib, ub)), low, high


def counts_by_seed(samples: pd.DataFrame, subset: Callable[[pd.DataFrame], np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(runs, samples) intersections and unions of stacked per-sample results (seeds aligned by test sample)."""
    inter, union = [], []
    for _, part in samples.groupby("seed", sort=True):
        part = part.sort_values("sent_id", kind="stable")
        keep = np.ones(len(part), dtype=bool) if subset is None else subset(part)
        inter.append(part["intersection"].to_numpy()[keep])
        union.append(part["union"].to_numpy()[keep])
    return np.stack(inter), np.stack(union)


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample standard deviation)`` of one figure over seeds (sd NaN for a single seed)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else float("nan")


def compare_runs(samples: pd.DataFrame, reference: pd.DataFrame | None = None,
                 subsets: dict[str, Callable[[pd.DataFrame], np.ndarray] | None] | None = None,
                 resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """One method's per-sample results over its seeds (a ``seed`` column), against a reference's.

    Returns, in percentage points: overall IoU averaged over seeds with its 95% bootstrap
    interval over test samples, the sd over seeds, and for each of ``subsets`` (name ->
    row mask, None for all) the paired difference to ``reference`` on the seeds both have
    (``Δ name``, ``Δ name low``, ``Δ name high``).
    """
    inter, union = counts_by_seed(samples)
    estimate, low, high = bootstrap_overall_iou(inter, union, resamples, seed=seed)
    row = {"seeds": len(inter), "overall IoU": 100 * estimate, "CI low": 100 * low, "CI high": 100 * high,
           "seed sd": 100 * seed_spread(overall_iou(inter, union))[1]}
    common = sorted(set(samples["seed"]) & set(reference["seed"])) if reference is not None else []
    if not common:
        return row
    mine, ref = samples[samples["seed"].isin(common)], reference[reference["seed"].isin(common)]
    for title, subset in (subsets or {"all": None}).items():
        a, b = counts_by_seed(mine, subset), counts_by_seed(ref, subset)
        if a[0].shape[1] == 0:
            continue
        diff, d_low, d_high = bootstrap_difference(*a, *b, resamples=resamples, seed=seed)
        row[f"Δ {title}"], row[f"Δ {title} low"], row[f"Δ {title} high"] = 100 * diff, 100 * d_low, 100 * d_high
    return row


def summarize_with_interval(frame: pd.DataFrame, subsets: dict[str, Callable[[pd.DataFrame], np.ndarray]],
                            resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Overall IoU of a per-sample frame with its bootstrap CI, mean IoU, and overall IoU per subset
    (``<name>_iou``, NaN for an empty subset)."""
    inter, union = frame["intersection"].to_numpy(), frame["union"].to_numpy()
    estimate, low, high = bootstrap_overall_iou(inter, union, resamples=resamples, seed=seed)
    row = {"samples": int(len(frame)), "overall_iou": estimate, "ci_low": low, "ci_high": high,
           "mean_iou": float(frame["iou"].mean())}
    for name, subset in subsets.items():
        keep = subset(frame)
        row[f"{name}_iou"] = float(overall_iou(inter[keep], union[keep])) if keep.any() else float("nan")
    return row


def overall_iou_by(samples: pd.DataFrame, column: str) -> pd.Series:
    """Overall IoU (fraction) of per-sample results per value of ``column``; with a ``seed``
    column, each seed's overall IoU per value, averaged over the seeds."""
    keys = [column, "seed"] if "seed" in samples else [column]
    sums = samples.groupby(keys)[["intersection", "union"]].sum()
    per_key = sums["intersection"] / sums["union"].where(sums["union"] > 0)
    return per_key.fillna(1.0).groupby(level=0).mean() if "seed" in samples else per_key.fillna(1.0)
