"""The evaluation protocol of SPEC 1, as orchestration: predictions at original resolution, counted.

The metrics themselves are pure functions in :mod:`referseg.metrics`. Here, a method's
square logits (ours from :func:`referseg.predict.split_logits`, a baseline's from its
``predict_logits``) are mapped back to each image's original size in both evaluation
modes and counted against the unresized ground truth (:func:`evaluate_stream`); each
method's per-sample CSV and summary JSON are written (:func:`save_method`), and the
paper's table is laid out (:func:`paper_table`). ``evaluate_run`` evaluates a run
folder's two stages; ``referseg.baselines.evaluate_all`` adds every baseline.

ReferIt's text files give each region as a box: :func:`box_counts` counts a prediction shared
by many pairs (a model without visual features predicts the same for the same words, a prior
the same for every pair) once per image size against every pair's box, and
:func:`evaluate_words_alone` scores such a model beside the whole image and a mean-box prior.
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
from referseg.data.refer import EXPRESSION_GROUPS, expression_group
from referseg.data.transforms import box_coverage, prediction_mask, undo_letterbox_matrices
from referseg.features import compute_features
from referseg.io import atomic_open, atomic_write_text
from referseg.metrics import (
    PRECISION_THRESHOLDS,
    box_intersection_union,
    intersection_union,
    iou_from_counts,
    summarize,
    summarize_groups,
)
from referseg.predict import split_logits, text_only_logits
from referseg.runs import Run, SplitData, checkpoint_path, load_checkpoint, stage_checkpoints, train_hint

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


def current_summary(run: Run, stage: int, split: str) -> dict | None:
    """The saved summary of ``stage`` on ``split`` when it still describes the stage's checkpoint:
    this profile's, in its evaluation mode and written after the checkpoint; else None."""
    checkpoint = checkpoint_path(run.run_dir, stage)
    method = STAGE_METHOD[stage]
    saved = saved_summary(run, method, split)
    saved_file = run.eval_dir / f"{method}_{split}.json"
    if (saved is not None and checkpoint.is_file() and saved["mode"] == run.profile.eval_mode
            and saved_file.stat().st_mtime >= checkpoint.stat().st_mtime):
        return saved
    return None


def stage_summary(run: Run, stage: int, split: str) -> dict | None:
    """The evaluation summary of a run's ``stage`` on ``split``: the saved one while it is current
    (:func:`current_summary`), else the stage evaluated now. None without a checkpoint."""
    if not checkpoint_path(run.run_dir, stage).is_file():
        return None
    return current_summary(run, stage, split) or evaluate_models(run, split, stages=[stage])[STAGE_METHOD[stage]]


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


# --- boxes: what the words alone know (ReferIt's text files) --------------------------------------

WORDS_ALONE = {"text-only": "words alone (no visual features)", "mean-box": "mean-box prior",
               "whole-image": "whole image"}


def box_counts(data: SplitData, groups: Iterable[tuple[np.ndarray, np.ndarray]], mode: str = "logits"
               ) -> np.ndarray:
    """Per-pair (I, U), (N, 2) int64, against each pair's box at the original image size (SPEC 1).

    ``groups`` yields ``(pair indices, S x S logits)``: one prediction shared by several pairs (a
    model without visual features gives the same words the same map; a prior gives every pair the
    same). It is mapped back once per image size (``prediction_mask``) and counted against every box
    of its pairs (:func:`referseg.metrics.box_intersection_union`). Pairs in no group keep (-1, -1).
    """
    boxes = getattr(data.dataset.refer, "boxes", None)
    if boxes is None:
        raise ValueError(f"{data.dataset.refer.name} gives masks, not boxes: count with evaluate_stream")
    counts = np.full((len(data), 2), -1, dtype=np.int64)
    for pairs, square in groups:
        masks: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
        for i in np.asarray(pairs).tolist():
            size = data.size(i)
            if size not in masks:
                mask = prediction_mask(square, *size, mode)
                masks[size] = mask, int(np.count_nonzero(mask))
            mask, predicted = masks[size]
            counts[i] = box_intersection_union(mask, boxes[data.pairs[i].ann_id], predicted)
    return counts


def positive_runs(rows: np.ndarray, size: int, stride: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Where bilinearly upsampled logits are > 0 at the original size, as runs: ``(start, stop)``, each
    (..., grid + 1) float64 holding whole numbers: pixels ``start <= x < stop`` of an original row (SPEC 1).

    ``rows`` (..., grid) holds, for original rows, the logits of the grid's columns of cells interpolated
    to that row. Along a row the map is the hat (linear) interpolation of those values between cell
    centres ``s * j + s / 2`` of the S-wide square, read at ``x' = alpha * x + gamma`` when the letterbox
    is undone (SPEC 3: rescale by side / S, crop ``left``, bilinear sampling). So it is linear between
    two centres and positive on a prefix or a suffix of their pixels: one run per interval between
    centres, plus the two edges, where only the outer cell reaches and its sign decides.
    """
    side = int(round(size * max(height / size, width / size)))
    alpha = size / side
    gamma = (((side - width) // 2) + 0.5) * alpha - 0.5
    centres = stride * np.arange(rows.shape[-1]) + stride / 2
    bounds = np.clip(np.ceil((centres - gamma) / alpha), 0, width)  # first pixel at or past each centre
    first, last = bounds[:-1], bounds[1:]  # interval j: pixels [first[j], last[j]) between centres j, j + 1
    rows = np.asarray(rows, dtype=np.float64)
    a, b = rows[..., :-1], rows[..., 1:]  # the logits at the two centres of each interval
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = a / (a - b)  # where the line crosses 0, as a fraction of the interval
    cross *= stride / alpha
    cross += (centres[:-1] - gamma) / alpha  # ... in original columns
    np.floor(cross, out=cross)
    cross += 1  # the first pixel past the crossing
    np.clip(cross, first, last, out=cross)
    rising = b > a
    start, stop = np.where(rising, cross, first), np.where(rising, last, cross)
    flat = a == b
    if flat.any():  # no crossing: all the interval or none of it
        start = np.where(flat, first, start)
        stop = np.where(flat, np.where(a > 0, last, first), stop)
    lead, tail = rows[..., :1] > 0, rows[..., -1:] > 0
    zero = np.zeros(lead.shape)
    start = np.concatenate([zero, start, np.where(tail, bounds[-1], width)], axis=-1)
    stop = np.concatenate([np.where(lead, bounds[0], 0.0), stop, zero + width], axis=-1)
    return start, stop


def text_only_box_counts(model: torch.nn.Module, data: SplitData, pairs: np.ndarray, mode: str = "logits",
                         batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True,
                         chunk: int = 256) -> np.ndarray:
    """:func:`box_counts` of a model without visual features on ``pairs`` of a split, (N, 2).

    While its deconvolution is the bilinear initialisation (a stage-1 model: ``bilinear_upsampling``)
    and ``mode="logits"``, no S x S map is made: per image size, each expression's cell logits are
    interpolated to the original rows (``undo_letterbox_matrices`` times the hat matrix: the linear
    maps of ``prediction_mask``) and each row's positive pixels found as runs (:func:`positive_runs`),
    which count a box's I in a few steps. Equal to the pixel path up to float rounding.
    """
    from referseg.model.segmenter import bilinear_upsampling

    hats = bilinear_upsampling(model.upsample, data.profile.grid) if mode == "logits" else None
    if hats is None:
        return box_counts(data, text_only_logits(model, data, batch_size, device, pairs, progress), mode)
    groups = list(text_only_logits(model, data, batch_size, device, pairs, progress, high_res=False))
    lowres = np.stack([logits for _, logits in groups])
    expression = np.full(len(data), -1, dtype=np.int64)
    for index, (members, _) in enumerate(groups):
        expression[members] = index
    boxes = data.dataset.refer.boxes
    counts = np.full((len(data), 2), -1, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64)
    sizes = np.array([data.size(i) for i in pairs.tolist()], dtype=np.int64).reshape(-1, 2)
    profile = data.profile
    for height, width in np.unique(sizes, axis=0).tolist():
        members = pairs[(sizes[:, 0] == height) & (sizes[:, 1] == width)]
        interpolate = undo_letterbox_matrices(profile.input_size, height, width)[0] @ hats  # (height, g)
        used, inverse = np.unique(expression[members], return_inverse=True)
        order = np.argsort(inverse.reshape(-1), kind="stable")
        bounds = np.searchsorted(inverse.reshape(-1)[order], np.arange(len(used) + 1))
        for begin in range(0, len(used), chunk):
            rows = interpolate @ lowres[used[begin:begin + chunk]]  # (e, height, g): cells read at each row
            start, stop = positive_runs(rows, profile.input_size, profile.stride, height, width)
            totals = (stop - start).sum(axis=(1, 2))
            for k in range(len(rows)):
                for i in members[order[bounds[begin + k]:bounds[begin + k + 1]]].tolist():
                    x0, y0, x1, y1 = boxes[data.pairs[i].ann_id]
                    inside = np.minimum(stop[k, y0:y1 + 1], x1 + 1) - np.maximum(start[k, y0:y1 + 1], x0)
                    inter = int(np.maximum(inside, 0, out=inside).sum())
                    counts[i] = inter, int(totals[k]) + (x1 - x0 + 1) * (y1 - y0 + 1) - inter
    return counts


def mean_box_prior(data: SplitData) -> tuple[np.ndarray, float]:
    """The mean-box prior of a split: ``(coverage, level)``, coverage the (S, S) fraction of the pairs'
    letterboxed boxes that cover each pixel, level the one whose upper set scores best on them.

    A fixed mask P scored against N boxes has I = N * sum of the coverage over P and
    U = N |P| + sum of the box areas - I, so overall IoU (SPEC 1, here in the letterbox) is
    computed for every upper set {coverage >= v} at once; ``level`` lies between the best v and
    the next lower value. The prior's prediction is the logit map ``coverage - level``.
    """
    size = data.profile.input_size
    square = data.dataset.refer.square_boxes(size)
    coverage = box_coverage(np.array([square[p.ann_id] for p in data.pairs]), size) / len(data)
    values, pixels = np.unique(coverage, return_counts=True)
    values, pixels = values[::-1], pixels[::-1]  # highest coverage first
    area, mass = np.cumsum(pixels), np.cumsum(values * pixels)
    best = int(np.argmax(mass / (area + coverage.sum() - mass)))
    level = (values[best] + values[best + 1]) / 2 if best + 1 < len(values) else values[best] - 1.0
    return coverage, float(level)


def evaluate_words_alone(model: torch.nn.Module, test: SplitData, train: SplitData,
                         pairs: Sequence[int] | np.ndarray | None = None, mode: str = "logits",
                         batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = True
                         ) -> dict[str, pd.DataFrame]:
    """Per-sample results on ``test``'s boxes (all pairs, or ``pairs``) of a model without visual
    features, the mean-box prior of ``train`` and the whole image, ``{method: frame}`` (keys of
    :data:`WORDS_ALONE`); each frame has the expression, what it says (``expression_group``), I, U, IoU."""
    import pandas as pd

    wanted = np.arange(len(test)) if pairs is None else np.asarray(pairs, dtype=np.int64)
    coverage, level = mean_box_prior(train)
    side = test.profile.input_size
    counts_of = {
        "text-only": lambda: text_only_box_counts(model, test, wanted, mode, batch_size, device, progress),
        "mean-box": lambda: box_counts(test, [(wanted, (coverage - level).astype(np.float32))], mode),
        "whole-image": lambda: box_counts(test, [(wanted, np.ones((side, side), dtype=np.float32))], mode),
    }
    says = [expression_group(test.pairs[i].expression) for i in wanted.tolist()]
    frames = {}
    for method, count in counts_of.items():
        counts = count()[wanted]
        frames[method] = pd.DataFrame({
            "sent_id": [test.pairs[i].sent_id for i in wanted.tolist()],
            "expression": [test.pairs[i].expression for i in wanted.tolist()],
            "says": says, "intersection": counts[:, 0], "union": counts[:, 1],
            "iou": iou_from_counts(counts[:, 0], counts[:, 1], EMPTY_UNION_IOU[mode]),
        })
    frames["mean-box"].attrs["level"] = level
    return frames


def words_alone_table(frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's table of :func:`evaluate_words_alone`'s frames (in %), and overall IoU (%) by what
    the expressions say, with the number of pairs of each group."""
    import pandas as pd

    summaries = {m: {"label": WORDS_ALONE[m], **summarize(f["intersection"], f["union"])} for m, f in frames.items()}
    first = next(iter(frames.values()))
    groups = pd.DataFrame({WORDS_ALONE[m]: {g: 100 * s["overall_iou"] for g, s in
                                            summarize_groups(f, "says").items()} for m, f in frames.items()})
    groups.insert(0, "pairs", first["says"].value_counts())
    groups.index.name = "the expression says"
    return paper_table(summaries), groups.loc[[g for g in EXPRESSION_GROUPS if g in groups.index]].round(2)
