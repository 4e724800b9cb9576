"""The evaluation protocol of SPEC 1: overall IoU, mean IoU and precision@k at original resolution.

``evaluate_masks`` is the metric on plain boolean arrays. ``evaluate_run`` evaluates a
trained run folder (and, with ``all_methods``, every baseline) on a split, writes the
per-sample CSV and the summary JSON of each method, and the paper's table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from referseg.baselines.common import Run, SplitData, guess_profile_name
from referseg.config import EVAL_MODES
from referseg.data.transforms import prediction_mask
from referseg.io import atomic_open, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

    from referseg.baselines.common import BaselineSettings

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


# --- evaluating methods on a run's split ----------------------------------------------------------

OURS = {"ours-lowres": ("stage1", "ours, low resolution"), "ours-highres": ("stage2", "ours, high resolution")}
TABLE_COLUMNS = tuple(f"P@{t}" for t in PRECISION_THRESHOLDS) + ("overall IoU", "mean IoU")


def evaluate_stream(data: SplitData, stream: Iterable[tuple[int, dict[str, np.ndarray]]],
                    modes: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample (I, U) of every method and mode from ``(pair index, {method: square logits})``.

    Each prediction is mapped back to the original image size (``prediction_mask``, SPEC 1)
    and compared with the unresized ground truth, loaded once per pair for all methods.
    Returns ``{method: {mode: (N, 2) int64 counts}}``; every pair of the split must appear.
    """
    counts: dict[str, dict[str, np.ndarray]] = {}
    seen = np.zeros(len(data), dtype=bool)
    for i, logits in stream:
        target = data.original_mask(i)
        height, width = target.shape
        for method, square in logits.items():
            by_mode = counts.setdefault(method, {m: np.full((len(data), 2), -1, dtype=np.int64) for m in modes})
            for mode in modes:
                by_mode[mode][i] = intersection_union(prediction_mask(square, height, width, mode), target, index=i)
        seen[i] = True
    if not seen.all():
        raise ValueError(f"predictions cover {int(seen.sum())} of {len(data)} pairs of split {data.split!r}")
    return counts


def results_frame(data: SplitData, counts: np.ndarray) -> pd.DataFrame:
    """Per-sample results: ids, expression, type tag, stuff or thing, I, U and IoU."""
    import pandas as pd

    pairs = data.pairs
    return pd.DataFrame({
        "ref_id": [p.ref_id for p in pairs],
        "ann_id": [p.ann_id for p in pairs],
        "image_id": [p.image_id for p in pairs],
        "sent_id": [p.sent_id for p in pairs],
        "expression": [p.expression for p in pairs],
        "type": [p.type for p in pairs],
        "category": [p.category for p in pairs],
        "region": ["stuff" if p.is_stuff else "thing" for p in pairs],
        "intersection": counts[:, 0],
        "union": counts[:, 1],
        "iou": iou_from_counts(counts[:, 0], counts[:, 1]),
    })


def save_method(run: Run, data: SplitData, method: str, label: str, counts_by_mode: dict[str, np.ndarray],
                mode: str, seconds: float, extra: dict | None = None) -> dict:
    """Write ``<run>/eval/<method>_<split>.csv`` and ``.json`` (atomically); return the summary."""
    frame = results_frame(data, counts_by_mode[mode])
    for other, counts in counts_by_mode.items():
        if other != mode:  # the other protocol's figures beside the primary ones
            frame[f"intersection_{other}"] = counts[:, 0]
            frame[f"union_{other}"] = counts[:, 1]
    summary = {
        "method": method, "label": label, "split": data.split, "mode": mode, "samples": len(data),
        **summarize(counts_by_mode[mode][:, 0], counts_by_mode[mode][:, 1]),
        "by_mode": {m: summarize(c[:, 0], c[:, 1]) for m, c in counts_by_mode.items()},
        "by_region": {kind: summarize(part["intersection"], part["union"])
                      for kind, part in frame.groupby("region")},
        "seconds": round(seconds, 2),
        "profile": run.profile.name,
        **(extra or {}),
    }
    stem = run.eval_dir / f"{method}_{data.split}"
    with atomic_open(stem.with_suffix(".csv")) as handle:
        frame.to_csv(handle, index=False)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _modes(mode: str) -> tuple[str, ...]:
    """The primary mode first, then the other one (both are cheap next to inference)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluation mode {mode!r}: use one of {', '.join(EVAL_MODES)}")
    return (mode,) + tuple(m for m in EVAL_MODES if m != mode)


def stage_checkpoints(run_dir: Path) -> dict[str, Path]:
    """``{method: checkpoint}`` for the stages trained in ``run_dir`` (stage 1: low, stage 2: high resolution)."""
    found = {method: run_dir / stage / "checkpoint.pt" for method, (stage, _) in OURS.items()}
    found = {method: path for method, path in found.items() if path.is_file()}
    if not found:
        profile = guess_profile_name(run_dir)
        raise FileNotFoundError(
            f"no trained model in {run_dir}: {run_dir / 'stage1' / 'checkpoint.pt'} does not exist. "
            f"Train stage 1 first: referseg train --profile {profile} --stage 1"
            + ("" if run_dir.parent == Path("runs") else f" --run-dir {run_dir}")
            + ", then stage 2 (--stage 2) for the high-resolution model"
        )
    return found


@torch.no_grad()
def model_logits(models: dict[str, torch.nn.Module], data: SplitData, batch_size: int, device: torch.device,
                 use_cache: bool = True, progress: bool = True) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(pair index, {method: S x S logits})`` of each model, in batches of pairs of neighbouring images.

    The stage-1 model's high-resolution output is its bilinear-initialised deconvolution
    (SPEC 4), so one forward serves both stages. Frozen features come from the feature cache.
    """
    order = np.argsort(data.pair_image, kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc="ours", unit="batch", disable=not progress,
                      leave=False):
        pairs = order[start:start + batch_size]
        tokens = data.tokens[pairs].to(device)
        rows = data.pair_image[pairs]
        if use_cache:
            inputs = {"features": data.image_features(rows).to(device)}
        else:
            inputs = {"images": torch.stack([data.dataset.image_tensor(int(r)) for r in rows]).to(device)}
        outputs = {method: model(tokens, high_res=True, **inputs).float().cpu().numpy()
                   for method, model in models.items()}
        for row, i in enumerate(pairs.tolist()):
            yield i, {method: out[row] for method, out in outputs.items()}


def evaluate_models(run: Run, split: str = "test", mode: str | None = None) -> dict[str, dict]:
    """Evaluate the run's stage-1 (low resolution) and stage-2 (high resolution) models on ``split``."""
    from referseg.predict import load_checkpoint
    from referseg.train import check_profile, check_vocab

    checkpoints = stage_checkpoints(run.run_dir)
    mode = mode or run.profile.eval_mode
    start = time.perf_counter()
    models: dict[str, torch.nn.Module] = {}
    for method, path in checkpoints.items():
        model, profile, vocab = load_checkpoint(path, run.device)
        check_profile(profile.to_dict(), run.profile, f"checkpoint {path}")
        check_vocab(vocab, run.vocab, f"checkpoint {path}")
        models[method] = model
    data = run.split(split)
    # A frozen backbone is a fixed function of the image: read its features from the cache (SPEC 5).
    use_cache = run.profile.freeze_backbone
    counts = evaluate_stream(data, model_logits(models, data, run.profile.eval_batch_size, run.device,
                                                use_cache, run.progress), _modes(mode))
    seconds = time.perf_counter() - start
    return {method: save_method(run, data, method, OURS[method][1], counts[method], mode, seconds / len(models),
                                {"checkpoint": str(checkpoints[method])})
            for method in checkpoints}


def evaluate_baseline(run: Run, name: str, split: str = "test", mode: str | None = None,
                      settings: BaselineSettings | None = None) -> dict[str, dict]:
    """Fit one baseline on the run's training split, evaluate it on ``split``; summaries by variant."""
    from referseg.baselines import build_baseline

    mode = mode or run.profile.eval_mode
    start = time.perf_counter()
    baseline = build_baseline(name, run.profile, run.vocab, settings=settings, device=str(run.device),
                              progress=run.progress)
    if baseline.learns:
        baseline.fit(run.split(run.profile.train_split))
    fitted = time.perf_counter()
    data = run.split(split)
    counts = evaluate_stream(data, baseline.predict_logits(data), _modes(mode))
    seconds = time.perf_counter() - start
    extra = {"baseline": name, "fit_seconds": round(fitted - start, 2),
             "fit_stats": getattr(baseline, "fit_stats", {})}
    return {variant: save_method(run, data, variant, label, counts[variant], mode,
                                 seconds / len(baseline.variants), extra)
            for variant, label in baseline.variants.items()}


def paper_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """The paper's table layout: one row per method, P@0.5 .. P@0.9, overall IoU, mean IoU, in %."""
    import pandas as pd

    rows = {s["label"]: [100 * s[f"precision@{t}"] for t in PRECISION_THRESHOLDS]
            + [100 * s["overall_iou"], 100 * s["mean_iou"]] for s in summaries.values()}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(TABLE_COLUMNS)).round(2)
    table.index.name = "method"
    return table


def table_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no optional dependency such as tabulate)."""
    header = ["method", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in table.iterrows():
        lines.append("| " + " | ".join([str(label)] + [f"{v:.2f}" for v in row]) + " |")
    return "\n".join(lines) + "\n"


def evaluate_run(run_dir: str | Path, split: str = "test", mode: str | None = None, all_methods: bool = False,
                 device: str = "auto", progress: bool = True, settings: BaselineSettings | None = None
                 ) -> pd.DataFrame:
    """Evaluate a run folder's models on ``split`` (and with ``all_methods`` every baseline too).

    Writes ``<run>/eval/<method>_<split>.csv`` and ``.json`` per method; with ``all_methods``
    also the paper's table as ``<run>/eval/table_<split>.csv`` and ``.md``. Prints and
    returns the table (rows: methods; columns in %).
    """
    from referseg.baselines import BASELINES

    run_dir = Path(run_dir)
    stage_checkpoints(run_dir)  # a run without a model says which stage to train, before any work
    run = Run(run_dir, device=device, progress=progress)
    mode = mode or run.profile.eval_mode
    started = time.perf_counter()
    summaries: dict[str, dict] = {}
    if all_methods:
        for name in BASELINES:
            summaries.update(evaluate_baseline(run, name, split, mode, settings))
    ours = evaluate_models(run, split, mode)
    summaries.update({m: ours[m] for m in OURS if m in ours})
    table = paper_table(summaries)
    elapsed = time.perf_counter() - started
    title = (f"{run.profile.name} profile, {run.profile.dataset} {split} ({len(run.split(split))} pairs), "
             f"{mode} mode, in %; {elapsed:.1f} s")
    if all_methods:
        stem = run.eval_dir / f"table_{split}"
        with atomic_open(stem.with_suffix(".csv")) as handle:
            table.to_csv(handle)
        atomic_write_text(stem.with_suffix(".md"), f"{title}\n\n{table_markdown(table)}")
    print(title)
    print(table.to_string())
    if "ours-highres" in ours and "official" in ours["ours-highres"]["by_mode"] and mode == "logits":
        official = ours["ours-highres"]["by_mode"]["official"]["overall_iou"]
        print(f"ours, high resolution, official mode (dilated resize): overall IoU {100 * official:.2f}")
    if "ours-highres" not in ours:
        print(f"no stage-2 model in {run_dir}: train it for the high-resolution row: "
              f"referseg train --profile {run.profile.name} --stage 2")
    return table
