"""The evaluation protocol of SPEC 1, as orchestration: predictions at original resolution, counted.

The metrics themselves are pure functions in :mod:`referseg.metrics`. Here, a method's
square logits (ours from :func:`referseg.predict.split_logits`, a baseline's from its
``predict_logits``) are mapped back to each image's original size in both evaluation
modes and counted against the unresized ground truth (:func:`evaluate_stream`); each
method's per-sample CSV and summary JSON are written (:func:`save_method`), and the
paper's table is laid out (:func:`paper_table`). ``evaluate_run`` evaluates a run
folder's two stages; ``referseg.baselines.evaluate_all`` adds every baseline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from referseg.config import EVAL_MODES
from referseg.data.transforms import prediction_mask
from referseg.features import compute_features
from referseg.io import atomic_open, atomic_write_text
from referseg.metrics import (
    PRECISION_THRESHOLDS,
    intersection_union,
    iou_from_counts,
    summarize,
    summarize_groups,
)
from referseg.predict import split_logits
from referseg.runs import Run, SplitData, load_checkpoint, stage_checkpoints, train_hint

if TYPE_CHECKING:
    import pandas as pd

# --- evaluating methods on a run's split ----------------------------------------------------------

OURS = {"ours-lowres": (1, "ours, low resolution"), "ours-highres": (2, "ours, high resolution")}
STAGE_METHOD = {stage: method for method, (stage, _) in OURS.items()}
# IoU of a sample whose union is empty: 1 in the study's mode; the official script divides 0 by 0
# (NaN), which fails every precision threshold (SPEC 8).
EMPTY_UNION_IOU = {"logits": 1.0, "official": 0.0}
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


def results_frame(data: SplitData, counts: np.ndarray, mode: str = "logits") -> pd.DataFrame:
    """Per-sample results: ids, expression, type tag, stuff or thing, I, U and IoU (``mode``'s rule for U = 0)."""
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
        "iou": iou_from_counts(counts[:, 0], counts[:, 1], EMPTY_UNION_IOU[mode]),
    })


def save_method(run: Run, data: SplitData, method: str, label: str, counts_by_mode: dict[str, np.ndarray],
                mode: str, seconds: float, extra: dict | None = None) -> dict:
    """Write ``<run>/eval/<method>_<split>.csv`` and ``.json`` (atomically); return the summary."""
    frame = results_frame(data, counts_by_mode[mode], mode)
    for other, counts in counts_by_mode.items():
        if other != mode:  # the other protocol's figures beside the primary ones
            frame[f"intersection_{other}"] = counts[:, 0]
            frame[f"union_{other}"] = counts[:, 1]
    summary = {
        "method": method, "label": label, "split": data.split, "mode": mode, "samples": len(data),
        **summarize(counts_by_mode[mode][:, 0], counts_by_mode[mode][:, 1], EMPTY_UNION_IOU[mode]),
        "by_mode": {m: summarize(c[:, 0], c[:, 1], EMPTY_UNION_IOU[m]) for m, c in counts_by_mode.items()},
        "by_region": summarize_groups(frame, "region", EMPTY_UNION_IOU[mode]),
        "seconds": round(seconds, 2),
        "profile": run.profile.name,
        **(extra or {}),
    }
    stem = run.eval_dir / f"{method}_{data.split}"
    with atomic_open(stem.with_suffix(".csv")) as handle:
        frame.to_csv(handle, index=False)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    return summary


def saved_summary(run: Run, method: str, split: str) -> dict | None:
    """The summary JSON that :func:`save_method` wrote for ``method`` on ``split``, if it is this profile's."""
    path = run.eval_dir / f"{method}_{split}.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("profile") == run.profile.name else None


def modes_for(mode: str) -> tuple[str, ...]:
    """The primary mode first, then the other one (both are cheap next to inference)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluation mode {mode!r}: use one of {', '.join(EVAL_MODES)}")
    return (mode,) + tuple(m for m in EVAL_MODES if m != mode)


def evaluate_models(run: Run, split: str = "test", mode: str | None = None, stages: Sequence[int] | None = None,
                    modes: Sequence[str] | None = None) -> dict[str, dict]:
    """Evaluate the run's stage-1 (low resolution) and stage-2 (high resolution) models on ``split``.

    ``stages`` picks some of them (default: every trained stage); ``modes`` the evaluation
    modes to count (default: the primary one, then the other). A trained (unfrozen)
    backbone's features are computed once per image from that model.
    """
    checkpoints = stage_checkpoints(run.run_dir)
    if stages is not None:
        missing = [stage for stage in stages if stage not in checkpoints]
        if missing:
            raise FileNotFoundError(f"no stage-{missing[0]} checkpoint in {run.run_dir}: train it first: "
                                    f"{train_hint(run.run_dir, missing[0])}")
        checkpoints = {stage: checkpoints[stage] for stage in stages}
    mode = mode or run.profile.eval_mode
    start = time.perf_counter()
    models: dict[str, torch.nn.Module] = {}
    for stage, path in checkpoints.items():
        model, _, _ = load_checkpoint(path, run.device, profile=run.profile, vocab=run.vocab)
        models[STAGE_METHOD[stage]] = model
    data = run.split(split)
    features = None  # frozen: the cache (SPEC 5)
    if not run.profile.freeze_backbone:
        features = {method: compute_features(model, data.dataset, device=run.device) for method, model in models.items()}
    stream = split_logits(models, data, run.profile.eval_batch_size, run.device, features, progress=run.progress)
    counts = evaluate_stream(data, stream, modes or modes_for(mode))
    seconds = time.perf_counter() - start
    return {method: save_method(run, data, method, OURS[method][1], counts[method], mode, seconds / len(models),
                                {"checkpoint": str(checkpoints[OURS[method][0]])})
            for method in models}


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


def write_table(run: Run, split: str, table: pd.DataFrame, title: str) -> Path:
    """``<run>/eval/table_<split>.csv`` and ``.md`` (atomically); returns the markdown file."""
    stem = run.eval_dir / f"table_{split}"
    with atomic_open(stem.with_suffix(".csv")) as handle:
        table.to_csv(handle)
    atomic_write_text(stem.with_suffix(".md"), f"{title}\n\n{table_markdown(table)}")
    return stem.with_suffix(".md")


def report(run: Run, split: str, mode: str, summaries: dict[str, dict], seconds: float,
           write: bool = False) -> pd.DataFrame:
    """Print (and with ``write`` save) the paper's table of ``summaries``; notes on ours' official mode."""
    table = paper_table(summaries)
    title = (f"{run.profile.name} profile, {run.profile.dataset} {split} ({len(run.split(split))} pairs), "
             f"{mode} mode, in %; {seconds:.1f} s")
    if write:
        write_table(run, split, table, title)
    print(title)
    print(table.to_string())
    ours = summaries.get("ours-highres")
    if ours and "official" in ours["by_mode"] and mode == "logits":
        official = ours["by_mode"]["official"]["overall_iou"]
        print(f"ours, high resolution, official mode (dilated resize): overall IoU {100 * official:.2f}")
    if ours is None:
        print(f"no stage-2 model in {run.run_dir}: train it for the high-resolution row: "
              f"referseg train --profile {run.profile.name} --stage 2")
    return table


def evaluate_run(run_dir: str | Path, split: str = "test", mode: str | None = None, device: str = "auto",
                 progress: bool = True) -> pd.DataFrame:
    """Evaluate a run folder's models on ``split``: ``<run>/eval/<method>_<split>.csv`` and ``.json``.

    Prints and returns the table (rows: our two stages; columns in %). The whole paper's
    table, baselines included, is :func:`referseg.baselines.evaluate_all`.
    """
    run_dir = Path(run_dir)
    stage_checkpoints(run_dir)  # a run without a model says which stage to train, before any work
    run = Run(run_dir, device=device, progress=progress)
    mode = mode or run.profile.eval_mode
    started = time.perf_counter()
    summaries = evaluate_models(run, split, mode)
    return report(run, split, mode, {m: summaries[m] for m in OURS if m in summaries}, time.perf_counter() - started)
