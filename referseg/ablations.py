"""Ablations beyond the paper: which parts of the method matter, each one a profile override away.

A :class:`Variant` is a named set of profile overrides relative to a *reference* profile
(the study's profile, possibly with fewer iterations so the grid fits a budget);
:func:`ablation_grid` lists them. :func:`run_ablations` trains and evaluates every
(variant, seed) in ``<run_dir>/ablations/<variant>/seed<k>/``, reusing finished runs and
the reference's feature cache, and collects one row per run; :func:`load_samples` gives
the per-sample intersections and unions behind each row, from which
:func:`bootstrap_overall_iou` and :func:`bootstrap_difference` compute 95% confidence
intervals of overall IoU over test samples (SPEC 1).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from referseg.config import Profile, get_profile
from referseg.io import atomic_open, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

REFERENCE = "reference"
ABLATIONS_DIR = "ablations"
PLAN_FILE = "plan.json"
# SynthRef expression types that name a place in the image ("circle on the left", "leftmost one");
# the spatial channels should matter most for these (SynthRef's `type` tag, DESIGN "SynthRef").
POSITION_TYPES = ("position", "superlative")
RESULT_COLUMNS = (
    "variant", "group", "label", "seed", "status", "stage", "iterations", "train_s", "run_s", "cpu_s", "samples",
    "overall_iou", "ci_low", "ci_high", "mean_iou", "position_iou", "other_iou",
)


@dataclass(frozen=True)
class Variant:
    """One ablation: a folder name, the question it answers, and its profile overrides."""

    name: str  # folder under <run_dir>/ablations/
    group: str  # the question, e.g. "spatial channels"; variants of a group are compared with the reference
    label: str  # what this variant is, e.g. "0 channels"
    overrides: dict[str, Any] = field(default_factory=dict)  # relative to the reference profile
    time_matched: bool = False  # iteration counts chosen to take the reference's training time

    def profile(self, reference: Profile, seed: int | None = None, **extra: Any) -> Profile:
        """The reference with this variant's overrides (and a seed); never a fork of the code."""
        changes = dict(self.overrides)
        if seed is not None:
            changes["seed"] = seed
        changes.update(extra)
        return reference.replace(**changes) if changes else reference


def scaled_stage(profile: Profile, stage: str, iterations: int) -> dict[str, int]:
    """Stage overrides for another iteration count, keeping the step schedule's shape (SPEC 5).

    The learning rate still drops at the same fractions of training: ``lr_step`` is scaled
    by the same factor as the iterations.
    """
    config = getattr(profile, stage)
    if iterations < 1:
        raise ValueError(f"{stage} iterations={iterations}: give at least 1")
    step = max(1, round(config.lr_step * iterations / config.iterations))
    return {"iterations": int(iterations), "lr_step": int(step)}


def reference_profile(profile: str | Profile = "cpu", overrides: dict[str, Any] | None = None,
                      stage1_iterations: int | None = None, stage2_iterations: int | None = None) -> Profile:
    """The profile every variant is compared with: ``profile`` plus ``overrides``, optionally with
    fewer iterations per stage (the same counts for every variant; lr steps scaled alike)."""
    base = get_profile(profile, **(overrides or {})) if isinstance(profile, str) else profile.replace(
        **(overrides or {}))
    changes: dict[str, Any] = {}
    if stage1_iterations is not None:
        changes["stage1"] = scaled_stage(base, "stage1", stage1_iterations)
    if stage2_iterations is not None:
        changes["stage2"] = scaled_stage(base, "stage2", stage2_iterations)
    return base.replace(**changes) if changes else base


def ablation_grid(reference: Profile, slim_width_mult: float = 0.25) -> list[Variant]:
    """The reference and every ablation of the chapter, each as profile overrides.

    The slim VGG-16 keeps the reference's input size and stride, so its grid is the
    reference's (16 x 16 for ``cpu``); it is trained from scratch (no ImageNet weights
    exist for it), so nothing is frozen or cached, and its iterations are set later to
    take the reference's training time (``time_matched``).
    """
    stage2_neg = reference.stage2.neg_weight
    return [
        Variant(REFERENCE, "reference", "reference"),
        Variant("spatial-2", "spatial channels", "2 channels (paper)", {"spatial_channels": 2}),
        Variant("spatial-0", "spatial channels", "0 channels", {"spatial_channels": 0}),
        Variant("no-l2-norm", "L2 normalisation", "off", {"l2_normalize": False}),
        Variant("bag-of-words", "text encoder", "bag of words", {"text_encoder": "bow"}),
        Variant("nearest-labels", "low-resolution labels", "nearest (block centre)", {"lowres_labels": "nearest"}),
        Variant("neg-weight-1", "stage-2 negative weight", f"1 (reference: {stage2_neg:.3g})",
                {"stage2": {"neg_weight": 1.0}}),
        Variant("slim-vgg16-scratch", "backbone", f"slim VGG-16 x{slim_width_mult:g} from scratch (same time)",
                {"backbone": "slim_vgg16", "backbone_weights": None, "width_mult": slim_width_mult,
                 "freeze_backbone": False, "cache_features": False}, time_matched=True),
    ]


def reference_labels(reference: Profile) -> dict[str, str]:
    """What the reference is in each group, for tables ("8 channels (code)", "on", ...)."""
    return {
        "spatial channels": f"{reference.spatial_channels} channels" + (" (code)" if reference.spatial_channels == 8
                                                                         else ""),
        "L2 normalisation": "on" if reference.l2_normalize else "off",
        "text encoder": {"lstm": "LSTM", "bow": "bag of words"}[reference.text_encoder],
        "low-resolution labels": {"or": "OR-pooled (any pixel)", "nearest": "nearest"}[reference.lowres_labels],
        "stage-2 negative weight": f"{reference.stage2.neg_weight:.3g}",
        "backbone": f"{reference.backbone}" + (", pretrained, frozen" if reference.freeze_backbone else ""),
    }


def profile_changes(reference: Profile, profile: Profile) -> dict[str, Any]:
    """Fields (and stage sub-fields as ``stage2.neg_weight``) where ``profile`` differs from ``reference``."""
    a, b = json.loads(json.dumps(reference.to_dict())), json.loads(json.dumps(profile.to_dict()))
    changes: dict[str, Any] = {}
    for key in a:
        if isinstance(a[key], dict):
            changes.update({f"{key}.{k}": b[key][k] for k in a[key] if a[key][k] != b[key][k]})
        elif a[key] != b[key]:
            changes[key] = b[key]
    return changes


# --- bootstrap confidence intervals (over test samples) -------------------------------------------


def _as_runs(values: Sequence | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"expected per-sample counts of shape (samples,) or (runs, samples), got {array.shape}")
    return array


def overall_iou(intersections: Sequence | np.ndarray, unions: Sequence | np.ndarray) -> float:
    """SPEC 1 overall IoU (sum I / sum U), averaged over runs when given as (runs, samples)."""
    inter, union = _as_runs(intersections), _as_runs(unions)
    return float(np.mean(inter.sum(1) / np.maximum(union.sum(1), 1e-12)))


def _bootstrap(statistic: Callable[[np.ndarray], np.ndarray], samples: int, resamples: int, level: float,
               seed: int, chunk: int = 64) -> tuple[float, float]:
    """Percentile interval of ``statistic(index matrix (b, samples)) -> (b,)`` over resampled test sets."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level {level}: give a fraction such as 0.95")
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, chunk):
        index = rng.integers(0, samples, size=(min(chunk, resamples - start), samples))
        values.append(statistic(index))
    values = np.concatenate(values)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


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

    def statistic(index: np.ndarray) -> np.ndarray:
        return (inter[:, index].sum(-1) / np.maximum(union[:, index].sum(-1), 1e-12)).mean(0)

    low, high = _bootstrap(statistic, inter.shape[1], resamples, level, seed)
    return overall_iou(inter, union), low, high


def bootstrap_difference(intersections_a: Sequence | np.ndarray, unions_a: Sequence | np.ndarray,
                         intersections_b: Sequence | np.ndarray, unions_b: Sequence | np.ndarray,
                         resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(IoU_a - IoU_b, low, high)``, paired: both methods are scored on the same resampled test samples."""
    ia, ua, ib, ub = (_as_runs(x) for x in (intersections_a, unions_a, intersections_b, unions_b))
    if ia.shape[1] != ib.shape[1]:
        raise ValueError(f"the two methods were tested on {ia.shape[1]} and {ib.shape[1]} samples; "
                         "a paired difference needs the same test samples")

    def statistic(index: np.ndarray) -> np.ndarray:
        a = (ia[:, index].sum(-1) / np.maximum(ua[:, index].sum(-1), 1e-12)).mean(0)
        b = (ib[:, index].sum(-1) / np.maximum(ub[:, index].sum(-1), 1e-12)).mean(0)
        return a - b

    low, high = _bootstrap(statistic, ia.shape[1], resamples, level, seed)
    return overall_iou(ia, ua) - overall_iou(ib, ub), low, high


# --- training and evaluating one variant -----------------------------------------------------------


def result_file(folder: Path, stage: int) -> Path:
    """The saved result of a run folder evaluated after ``stage`` (stage-1 and stage-2 results coexist)."""
    return folder / f"result-stage{stage}.json"


def variant_dir(run_dir: str | Path, variant: str, seed: int) -> Path:
    """``<run_dir>/ablations/<variant>/seed<seed>``: one trained and evaluated run."""
    return Path(run_dir) / ABLATIONS_DIR / variant / f"seed{seed}"


def share_features(run_folder: Path, shared: Path) -> None:
    """Point ``run_folder/features`` at the shared feature cache, so variants with the reference's
    backbone reuse its features (the cache key in the file name tells backbones apart)."""
    link = run_folder / "features"
    shared.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        return
    try:
        link.symlink_to(os.path.relpath(shared.resolve(), run_folder.resolve()), target_is_directory=True)
    except OSError:  # no symlinks (some Windows setups): the run builds its own cache
        pass


def _stale(run_folder: Path, profile: Profile) -> list[str]:
    """Profile fields whose saved value in the run folder differs from ``profile`` (empty when it matches)."""
    config = run_folder / "config.json"
    if not config.is_file():
        return []
    saved = Profile.from_dict(json.loads(config.read_text()))
    return sorted(profile_changes(saved, profile))


def train_stages(profile: Profile, run_folder: Path, stages: Sequence[int], device: str = "auto",
                 progress: bool = False) -> dict[int, float]:
    """Train the stages in ``run_folder`` (resuming or skipping finished ones); training-loop seconds per stage.

    The seconds come from the stage's own log (wall time of its loop, excluding data
    preparation and the one-off feature cache).
    """
    from referseg.train import CHECKPOINT, LOG, read_checkpoint, read_log, train

    seconds = {}
    for stage in stages:
        checkpoint = run_folder / f"stage{stage}" / CHECKPOINT
        finished = checkpoint.is_file() and read_checkpoint(checkpoint).get("finished", False)
        if not finished:
            train(profile, stage, run_folder, resume=checkpoint.is_file(), device=device, progress=progress)
        log = read_log(run_folder / f"stage{stage}" / LOG)
        seconds[stage] = float(log[-1]["elapsed"]) if log else float("nan")
    return seconds


def trained_features(model: Any, dataset: Any, profile: Profile, device: Any, batch_size: int = 16) -> np.ndarray:
    """Backbone features of every image of ``dataset`` from a model whose backbone was trained (not cached)."""
    import torch

    rows = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset.image_ids), batch_size):
            stop = min(start + batch_size, len(dataset.image_ids))
            images = torch.stack([dataset.image_tensor(i) for i in range(start, stop)]).to(device)
            rows.append(model.backbone_features(images).float().cpu().numpy())
    return np.concatenate(rows)


def evaluate_stage(run_folder: Path, stage: int, split: str, device: str = "auto", progress: bool = False
                   ) -> Path:
    """Evaluate one stage's checkpoint on ``split`` (the run's evaluation mode only); the per-sample CSV.

    Writes ``<run_folder>/eval/<method>_<split>.csv``/``.json`` as the evaluation chapter does
    (method ``ours-lowres`` for stage 1, ``ours-highres`` for stage 2).
    """
    from referseg.baselines.common import Run, SplitData
    from referseg.evaluate import OURS, evaluate_stream, model_logits, save_method
    from referseg.predict import load_checkpoint

    method = {1: "ours-lowres", 2: "ours-highres"}[stage]
    run = Run(run_folder, device=device, progress=progress)
    start = time.perf_counter()
    model, profile, _ = load_checkpoint(run_folder / f"stage{stage}" / "checkpoint.pt", run.device,
                                        profile=run.profile, vocab=run.vocab)
    data = run.split(split)
    if not profile.freeze_backbone:  # a trained backbone: its features once per image, not once per pair
        data = SplitData(data.dataset, run, features=trained_features(model, data.dataset, profile, run.device))
    mode = profile.eval_mode
    counts = evaluate_stream(data, model_logits({method: model}, data, profile.eval_batch_size, run.device,
                                                use_cache=True, progress=progress), (mode,))
    save_method(run, data, method, OURS[method][1], counts[method], mode, time.perf_counter() - start,
                {"checkpoint": str(run_folder / f"stage{stage}" / "checkpoint.pt")})
    return run.eval_dir / f"{method}_{split}.csv"


def summarize_samples(frame: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Overall IoU with its bootstrap CI, mean IoU, and overall IoU on position / other expressions."""
    inter, union = frame["intersection"].to_numpy(), frame["union"].to_numpy()
    estimate, low, high = bootstrap_overall_iou(inter, union, resamples=resamples, seed=seed)
    position = frame["type"].isin(POSITION_TYPES).to_numpy()
    return {
        "samples": int(len(frame)),
        "overall_iou": estimate, "ci_low": low, "ci_high": high,
        "mean_iou": float(frame["iou"].mean()),
        "position_iou": overall_iou(inter[position], union[position]) if position.any() else float("nan"),
        "other_iou": overall_iou(inter[~position], union[~position]) if (~position).any() else float("nan"),
    }


def run_variant(profile: Profile, variant: Variant, seed: int, run_dir: str | Path, stages: Sequence[int],
                device: str = "auto", resamples: int = 1000, progress: bool = False) -> dict[str, Any]:
    """Train (or reuse) and evaluate one (variant, seed); write and return its ``result.json`` row."""
    folder = variant_dir(run_dir, variant.name, seed)
    saved_file = result_file(folder, max(stages))
    profile_dict = json.loads(json.dumps(profile.to_dict()))
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        if saved.get("profile") == profile_dict and saved.get("stages") == list(stages):
            return {**saved["row"], "group": variant.group, "label": variant.label, "status": "reused"}
    stale = _stale(folder, profile)
    if stale:  # settings changed since that run: it is this runner's own folder, so retrain it
        print(f"{variant.name} seed {seed}: settings changed since its run ({', '.join(stale)}); retraining")
        shutil.rmtree(folder)  # removes the features link, never the shared cache behind it
    folder.mkdir(parents=True, exist_ok=True)
    if profile.freeze_backbone and profile.cache_features:
        share_features(folder, Path(run_dir) / "features")
    from referseg.train import TrainingDivergedError

    row: dict[str, Any] = {"variant": variant.name, "group": variant.group, "label": variant.label, "seed": seed,
                           "stage": max(stages), "iterations": "/".join(str(getattr(profile, f"stage{s}").iterations)
                                                                        for s in stages)}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        seconds = train_stages(profile, folder, stages, device, progress)
    except TrainingDivergedError as err:
        row.update(status=f"diverged at iteration {err.iteration}", train_s=float("nan"))
        return row
    csv = evaluate_stage(folder, max(stages), profile.eval_split, device, progress)
    import pandas as pd

    row.update(status="trained", train_s=round(sum(seconds.values()), 2),
               run_s=round(time.perf_counter() - wall, 2), cpu_s=round(time.process_time() - cpu, 2),
               stage_seconds={str(k): v for k, v in seconds.items()},
               **summarize_samples(pd.read_csv(csv, keep_default_na=False), resamples, seed))
    atomic_write_text(saved_file, json.dumps({"profile": profile_dict, "stages": list(stages), "row": row,
                                               "samples_csv": str(csv.relative_to(folder))}, indent=2) + "\n")
    return row


# --- time-matched variants (the slim VGG-16 from scratch) ------------------------------------------


def measure_seconds_per_iteration(profile: Profile, folder: Path, stages: Sequence[int], iterations: int,
                                  device: str = "auto") -> dict[int, float]:
    """Wall seconds per training iteration of each stage, from a short probe run in ``folder``.

    The first iteration (warm-up) is left out: (elapsed at the last - at the first) / (n - 1).
    """
    from referseg.train import LOG, read_log

    if iterations < 3:
        raise ValueError(f"probe iterations={iterations}: use at least 3")
    probe = profile.replace(**{f"stage{s}": scaled_stage(profile, f"stage{s}", iterations) for s in stages},
                            log_every=iterations, checkpoint_every=iterations)
    if folder.exists():
        shutil.rmtree(folder)
    train_stages(probe, folder, stages, device)
    result = {}
    for stage in stages:
        log = read_log(folder / f"stage{stage}" / LOG)
        first, last = log[0], log[-1]
        result[stage] = (last["elapsed"] - first["elapsed"]) / max(last["iteration"] - first["iteration"], 1)
    shutil.rmtree(folder)
    return result


def time_matched_profile(reference: Profile, variant: Variant, seed: int, run_dir: str | Path,
                         reference_seconds: dict[int, float], stages: Sequence[int], probe_iterations: int = 10,
                         device: str = "auto") -> tuple[Profile, dict[str, Any]]:
    """The variant's profile with iteration counts that take the reference's training time per stage.

    The trainer has no time-budget stop, so a short probe measures the variant's seconds per
    iteration and the counts follow (lr steps scaled alike). The plan is saved in
    ``<run_dir>/ablations/<variant>/plan.json`` and reused while the reference is unchanged.
    """
    plan_file = Path(run_dir) / ABLATIONS_DIR / variant.name / PLAN_FILE
    base = variant.profile(reference, seed)
    key = {"reference": json.loads(json.dumps(reference.to_dict())), "overrides": variant.overrides,
           "stages": list(stages), "seed": seed}
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if plan is None or plan.get("key") != key:
        per_iteration = measure_seconds_per_iteration(base, plan_file.parent / "probe", stages, probe_iterations,
                                                      device)
        iterations = {s: max(3, math.floor(reference_seconds[s] / max(per_iteration[s], 1e-9))) for s in stages}
        plan = {"key": key, "reference_seconds": {str(s): reference_seconds[s] for s in stages},
                "seconds_per_iteration": {str(s): per_iteration[s] for s in stages},
                "iterations": {str(s): iterations[s] for s in stages}, "probe_iterations": probe_iterations}
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_file, json.dumps(plan, indent=2) + "\n")
    changes = {f"stage{s}": scaled_stage(base, f"stage{s}", int(plan["iterations"][str(s)])) for s in stages}
    return base.replace(**changes), plan


# --- the whole grid ------------------------------------------------------------------------------


def _run_jobs(jobs: Any, reference: Profile, run_dir: Path, stages: tuple[int, ...], device: str,
              budget_s: float | None, resamples: int, probe_iterations: int, started: float) -> list[dict[str, Any]]:
    """The loop of :func:`run_ablations`: one row per (seed, variant) job, in order."""
    durations: list[float] = []
    rows: list[dict[str, Any]] = []
    reference_seconds: dict[int, dict[int, float]] = {}
    for seed, variant in jobs:
        if hasattr(jobs, "set_postfix_str"):
            jobs.set_postfix_str(f"{variant.name} seed {seed}")
        base = {"variant": variant.name, "group": variant.group, "label": variant.label, "seed": seed}
        if "stage2" in variant.overrides and 2 not in stages:
            rows.append({**base, "status": "skipped: needs stage 2"})
            continue
        elapsed = time.perf_counter() - started
        if budget_s is not None and durations and elapsed + float(np.mean(durations)) > budget_s:
            if not result_file(variant_dir(run_dir, variant.name, seed), max(stages)).is_file():
                rows.append({**base, "status": f"skipped: budget ({budget_s:.0f} s)"})
                continue
        run_start = time.perf_counter()
        if variant.time_matched:
            if seed not in reference_seconds:
                rows.append({**base, "status": "skipped: no reference time for this seed"})
                continue
            profile, _ = time_matched_profile(reference, variant, seed, run_dir, reference_seconds[seed], stages,
                                              probe_iterations, device)
        else:
            profile = variant.profile(reference, seed)
        row = run_variant(profile, variant, seed, run_dir, stages, device, resamples)
        if row["status"] == "trained":
            durations.append(time.perf_counter() - run_start)
        if variant.name == REFERENCE and "stage_seconds" in row:
            reference_seconds[seed] = {int(k): v for k, v in row["stage_seconds"].items()}
        rows.append(row)
    return rows


def run_ablations(reference: Profile, variants: Sequence[Variant], run_dir: str | Path, seeds: Sequence[int] = (0,),
                  stages: Sequence[int] = (1, 2), device: str = "auto", budget_s: float | None = None,
                  resamples: int = 1000, probe_iterations: int = 10, threads: int | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Train and evaluate every (variant, seed); one row each, saved as ``ablations/results.csv`` and ``.json``.

    Seeds run in order, all variants of one seed before the next seed (the reference first,
    then the time-matched variants, then the others in the given order). Finished runs are
    reused. With ``budget_s``, a run that would probably end past the budget (judged from
    the runs trained so far) is skipped and marked so. Variants needing stage 2 (their
    overrides touch ``stage2``) are skipped when ``stages`` has no stage 2. ``threads`` sets
    PyTorch's CPU threads for the runs (restored afterwards): on a machine whose cores are
    busy with other work, one thread is often faster than a pool.
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    stages = tuple(sorted(set(stages)))
    if not stages or set(stages) - {1, 2} or stages[0] != 1:
        raise ValueError(f"stages={stages}: use (1,) for the low-resolution model or (1, 2) for both")
    names = [v.name for v in variants]
    if REFERENCE not in names:
        raise ValueError(f"the grid must include the {REFERENCE!r} variant: every variant is compared with it")
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique: {names}")
    # the reference first, then the time-matched variants (they need its time), so that a tight
    # budget skips one of the cheap variants rather than the comparison that needs the probe
    variants = sorted(variants, key=lambda v: (v.name != REFERENCE, not v.time_matched))
    run_dir = Path(run_dir)
    out_dir = run_dir / ABLATIONS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(seed, v) for seed in seeds for v in variants]
    bar = tqdm(jobs, desc="ablations", unit="run", disable=not progress)
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = _run_jobs(bar, reference, run_dir, stages, device, budget_s, resamples, probe_iterations, started)
    finally:
        torch.set_num_threads(default_threads)
        bar.close()
    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    frame = frame[list(RESULT_COLUMNS)]
    with atomic_open(out_dir / "results.csv") as handle:
        frame.to_csv(handle, index=False)
    settings = {"reference": json.loads(json.dumps(reference.to_dict())), "stages": list(stages),
                "seeds": list(seeds), "budget_s": budget_s, "resamples": resamples,
                "variants": [{"name": v.name, "group": v.group, "label": v.label, "overrides": v.overrides,
                              "time_matched": v.time_matched} for v in variants],
                "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out_dir / "results.json", json.dumps({"settings": settings, "rows": json.loads(
        frame.to_json(orient="records"))}, indent=2) + "\n")
    return frame


def load_samples(run_dir: str | Path, variant: str, seeds: Sequence[int], stage: int = 2) -> pd.DataFrame | None:
    """Per-sample results of a variant's finished seeds after ``stage``, stacked (a ``seed`` column);
    None when none finished."""
    import pandas as pd

    frames = []
    for seed in seeds:
        folder = variant_dir(run_dir, variant, seed)
        saved = result_file(folder, stage)
        if saved.is_file():
            csv = folder / json.loads(saved.read_text())["samples_csv"]
            frames.append(pd.read_csv(csv, keep_default_na=False).assign(seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else None


def counts_by_seed(samples: pd.DataFrame, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(runs, samples) intersections and unions of stacked per-sample results (seeds aligned by test sample)."""
    inter, union = [], []
    for _, part in samples.groupby("seed", sort=True):
        part = part.sort_values("sent_id", kind="stable")
        keep = np.ones(len(part), dtype=bool) if subset is None else subset(part)
        inter.append(part["intersection"].to_numpy()[keep])
        union.append(part["union"].to_numpy()[keep])
    return np.stack(inter), np.stack(union)


def comparison_table(run_dir: str | Path, results: pd.DataFrame, reference: Profile, resamples: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """One row per variant: overall IoU over its seeds with a 95% bootstrap CI, and the paired
    difference to the reference (same test samples, same seeds) on all, position and other
    expressions, in percentage points."""
    import pandas as pd

    done = results[results["status"].isin(["trained", "reused"])]
    seeds = sorted(done["seed"].unique().tolist())
    position: Callable[[Any], np.ndarray] = lambda part: part["type"].isin(POSITION_TYPES).to_numpy()  # noqa: E731
    other: Callable[[Any], np.ndarray] = lambda part: ~part["type"].isin(POSITION_TYPES).to_numpy()  # noqa: E731
    stage = int(done["stage"].max()) if len(done) else 2
    ref_samples = load_samples(run_dir, REFERENCE, seeds, stage)
    ref_labels = reference_labels(reference)
    rows = []
    for name, part in done.groupby("variant", sort=False):
        variant_seeds = sorted(part["seed"].tolist())
        samples = load_samples(run_dir, name, variant_seeds, stage)
        if samples is None:
            continue
        inter, union = counts_by_seed(samples)
        estimate, low, high = bootstrap_overall_iou(inter, union, resamples, seed=seed)
        row = {"variant": name, "group": part["group"].iloc[0], "label": part["label"].iloc[0],
               "seeds": len(variant_seeds), "overall IoU": 100 * estimate, "CI low": 100 * low,
               "CI high": 100 * high,
               "seed sd": 100 * float(np.std(inter.sum(1) / np.maximum(union.sum(1), 1e-12), ddof=1))
               if len(variant_seeds) > 1 else np.nan,
               "train s": float(part["train_s"].mean()), "iterations": part["iterations"].iloc[0]}
        if name == REFERENCE:
            row["label"] = "; ".join(f"{k}: {v}" for k, v in ref_labels.items())
        if ref_samples is not None and name != REFERENCE:
            common = sorted(set(variant_seeds) & set(ref_samples["seed"]))
            if common:
                mine, ref = samples[samples["seed"].isin(common)], ref_samples[ref_samples["seed"].isin(common)]
                for title, subset in (("all", None), ("position", position), ("other", other)):
                    a, b = counts_by_seed(mine, subset), counts_by_seed(ref, subset)
                    if a[0].shape[1] == 0:
                        continue
                    diff, d_low, d_high = bootstrap_difference(*a, *b, resamples=resamples, seed=seed)
                    row[f"Δ {title}"] = 100 * diff
                    row[f"Δ {title} low"], row[f"Δ {title} high"] = 100 * d_low, 100 * d_high
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


# --- reading the results: sentences and figures -------------------------------------------------

SUBSETS = {"all": "all expressions", "position": "position expressions", "other": "other expressions"}


def describe_difference(table: pd.DataFrame, variant: str, subset: str = "all") -> str:
    """One sentence, from the numbers, on how ``variant`` differs from the reference on ``subset``.

    A difference counts as measured only when its 95% paired bootstrap interval excludes 0.
    """
    if variant not in table.index:
        return f"{variant}: not run (see the status column of the results)."
    row = table.loc[variant]
    key = f"Δ {subset}"
    if key not in row or not np.isfinite(row[key]):
        return f"{row['label']}: no {SUBSETS[subset]} to compare."
    diff, low, high = row[key], row[f"{key} low"], row[f"{key} high"]
    if low > 0:
        verdict = f"raises overall IoU on {SUBSETS[subset]} by {diff:.1f} points"
    elif high < 0:
        verdict = f"lowers overall IoU on {SUBSETS[subset]} by {-diff:.1f} points"
    else:
        verdict = f"changes overall IoU on {SUBSETS[subset]} by {diff:+.1f} points, which is within the noise"
    seeds = int(row["seeds"])
    return (f"{row['group']} = {row['label']} {verdict} (95% CI {low:+.1f} to {high:+.1f}; "
            f"{seeds} seed{'s' if seeds > 1 else ''}).")


def plot_group(table: pd.DataFrame, variants: Sequence[str], subsets: Sequence[str] = ("all", "position", "other"),
               axes: Any = None, title: str | None = None) -> Any:
    """Left: overall IoU of the reference and the variants with 95% CIs; right, on the same rows:
    the paired differences to the reference per expression subset, with their 95% CIs."""
    import matplotlib.pyplot as plt

    subsets = [s for s in subsets if f"Δ {s}" in table.columns]
    names = [n for n in (REFERENCE, *variants) if n in table.index]
    if axes is None:
        per_row = 0.45 if len(subsets) < 2 else 0.75
        _, axes = plt.subplots(1, 2, figsize=(12, 1.3 + per_row * len(names)), sharey=True,
                               gridspec_kw={"width_ratios": [1, 1.3]})
    rows = table.loc[names]
    # several questions in one figure: name the question too ("L2 normalisation: off")
    others = [n for n in names if n != REFERENCE]
    mixed = rows.loc[others, "group"].nunique() > 1
    labels = ["reference" if n == REFERENCE else f"{rows.loc[n, 'group']}: {rows.loc[n, 'label']}" if mixed
              else rows.loc[n, "label"] for n in names]
    y = np.arange(len(names))[::-1].astype(float)
    errors = np.vstack([rows["overall IoU"] - rows["CI low"], rows["CI high"] - rows["overall IoU"]])
    axes[0].errorbar(rows["overall IoU"], y, xerr=errors, fmt="o", capsize=4, color="black")
    axes[0].set_yticks(y, labels)
    axes[0].set_xlabel("overall IoU (%), 95% CI")
    height = 0.6 / max(len(subsets), 1)
    y_others = y[[names.index(n) for n in others]]
    part = table.loc[others]
    for k, subset in enumerate(subsets):
        offset = (k - (len(subsets) - 1) / 2) * height
        err = np.vstack([part[f"Δ {subset}"] - part[f"Δ {subset} low"], part[f"Δ {subset} high"] - part[f"Δ {subset}"]])
        axes[1].errorbar(part[f"Δ {subset}"], y_others - offset, xerr=err, fmt="o", capsize=3, label=SUBSETS[subset])
    axes[1].axvline(0, color="grey", lw=1, ls="--")
    axes[1].set_xlabel("difference to the reference (points), paired 95% CI")
    if len(subsets) > 1:
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    if title:
        axes[0].figure.suptitle(title)
    axes[0].figure.tight_layout()
    return axes
