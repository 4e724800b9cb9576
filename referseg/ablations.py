"""Ablations beyond the paper: the grid of variants and the runner that trains and evaluates them.

A :class:`Variant` is a named set of profile overrides relative to a *reference* profile; :func:`ablation_grid`
lists them. :func:`run_ablations` trains and evaluates every (variant, seed) in ``<run_dir>/ablations/<variant>/
seed<k>/``, reusing finished runs and the reference's feature cache; :func:`load_samples` reads results back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from referseg.config import Profile, get_profile, profile_changes
from referseg.io import atomic_open, atomic_write_text, code_hash
from referseg.metrics import summarize_with_interval

if TYPE_CHECKING:
    import pandas as pd

REFERENCE = "reference"
ABLATIONS_DIR = "ablations"
PLAN_FILE = "plan-seed{seed}.json"  # one per seed: seeds may run in parallel, and --collect reads each back
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
        changes = {**self.overrides, **({} if seed is None else {"seed": seed}), **extra}
        return reference.replace(**changes) if changes else reference


def scaled_stage(profile: Profile, stage: str, iterations: int) -> dict[str, int]:
    """Stage overrides for another iteration count, keeping the step schedule's shape (SPEC 5):
    ``lr_step`` is scaled by the same factor, so the learning rate drops at the same fractions."""
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
        Variant("init-official", "initialisation", "official (SPEC 4)", {"init": "official"}),
        Variant("stage0", "stage 0 (box pretraining)", "on", {"pretrain": True}),
        Variant("stage0-official", "stage 0 (box pretraining)", "on, official init", {"pretrain": True, "init": "official"}),
        Variant("slim-vgg16-scratch", "backbone", f"slim VGG-16 x{slim_width_mult:g} from scratch (same time)",
                {"backbone": "slim_vgg16", "backbone_weights": None, "width_mult": slim_width_mult,
                 "freeze_backbone": False, "cache_features": False}, time_matched=True),
    ]


def position_subsets() -> dict[str, Any]:
    """Row masks of per-sample results: expressions that name a place, and the others."""
    return {"position": lambda part: part["type"].isin(POSITION_TYPES).to_numpy(),
            "other": lambda part: ~part["type"].isin(POSITION_TYPES).to_numpy()}


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
    return sorted(profile_changes(Profile.load(config), profile)) if config.is_file() else []


def train_stages(profile: Profile, run_folder: Path, stages: Sequence[int], device: str = "auto",
                 progress: bool = False) -> dict[int, float]:
    """Train the stages in ``run_folder`` (resuming or skipping finished ones); each stage's loop seconds."""
    from referseg.pretrain import pretrain
    from referseg.runs import CHECKPOINT, LOG, read_checkpoint, read_log
    from referseg.train import train

    seconds = {}
    for stage in ((0,) if profile.pretrain else ()) + tuple(stages):  # stage 1 then starts from stage 0
        checkpoint = run_folder / f"stage{stage}" / CHECKPOINT
        finished = checkpoint.is_file() and read_checkpoint(checkpoint).get("finished", False)
        if not finished:
            (pretrain if stage == 0 else partial(train, stage=stage))(
                profile, run_dir=run_folder, resume=checkpoint.is_file(), device=device, progress=progress)
        log = read_log(run_folder / f"stage{stage}" / LOG)
        seconds[stage] = float(log[-1]["elapsed"]) if log else float("nan")
    return seconds


def run_variant(profile: Profile, variant: Variant, seed: int, run_dir: str | Path, stages: Sequence[int],
                device: str = "auto", resamples: int = 1000, progress: bool = False, train: bool = True) -> dict:
    """Train (or reuse) and evaluate one (variant, seed), return its row; ``train=False`` never trains."""
    folder = variant_dir(run_dir, variant.name, seed)
    saved_file = result_file(folder, max(stages))
    profile_dict = json.loads(json.dumps(profile.to_dict()))
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    if saved.get("profile") == profile_dict and saved.get("stages") == list(stages):
        if saved.get("code_hash") == code_hash():
            return {**saved["row"], "group": variant.group, "label": variant.label, "status": "reused"}
        if not train:
            return {"variant": variant.name, "seed": seed, "status": "skipped: made by other code"}
        shutil.rmtree(folder)  # this runner's own folder, made by other training or evaluation code: retrain
    stale = _stale(folder, profile)
    if not train:  # a run of other settings is reported as such, never removed or retrained
        return {"variant": variant.name, "seed": seed, "status": "skipped: made with other settings"}
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
    import pandas as pd

    from referseg.evaluate import STAGE_METHOD, evaluate_models
    from referseg.runs import Run

    run = Run(folder, device=device, progress=progress)
    evaluate_models(run, profile.eval_split, stages=(max(stages),), modes=(profile.eval_mode,))
    csv = run.eval_dir / f"{STAGE_METHOD[max(stages)]}_{profile.eval_split}.csv"
    row.update(status="trained", train_s=round(sum(seconds.values()), 2),
               run_s=round(time.perf_counter() - wall, 2), cpu_s=round(time.process_time() - cpu, 2),
               stage_seconds={str(k): v for k, v in seconds.items()},
               **summarize_with_interval(pd.read_csv(csv, keep_default_na=False), position_subsets(), resamples, seed))
    atomic_write_text(saved_file, json.dumps({"profile": profile_dict, "stages": list(stages), "row": row,
                                               "code_hash": code_hash(),
                                               "samples_csv": str(csv.relative_to(folder))}, indent=2) + "\n")
    return row


# --- time-matched variants (the slim VGG-16 from scratch) ------------------------------------------


def time_matched_profile(reference: Profile, variant: Variant, seed: int, run_dir: str | Path,
                         reference_seconds: dict[int, float], stages: Sequence[int], probe_iterations: int = 10,
                         device: str = "auto") -> tuple[Profile, dict[str, Any]]:
    """The variant's profile with iteration counts that take the reference's training time per stage.

    A short probe run measures the variant's wall seconds per iteration (the first, warm-up,
    iteration left out) and the counts follow, lr steps scaled alike. The plan is saved in
    ``<run_dir>/ablations/<variant>/plan-seed<k>.json`` and reused while the reference is unchanged.
    """
    from referseg.runs import LOG, read_log

    plan_file = Path(run_dir) / ABLATIONS_DIR / variant.name / PLAN_FILE.format(seed=seed)
    base = variant.profile(reference, seed)
    key = {"reference": json.loads(json.dumps(reference.to_dict())), "overrides": variant.overrides,
           "stages": list(stages), "seed": seed}
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if plan is None or plan.get("key") != key:
        if probe_iterations < 3:
            raise ValueError(f"probe iterations={probe_iterations}: use at least 3")
        probe_dir = plan_file.parent / f"probe-seed{seed}"
        shutil.rmtree(probe_dir, ignore_errors=True)
        train_stages(base.replace(**{f"stage{s}": scaled_stage(base, f"stage{s}", probe_iterations) for s in stages},
                                  log_every=probe_iterations, checkpoint_every=probe_iterations),
                     probe_dir, stages, device)
        per_iteration = {}
        for s in stages:
            first, last = (log := read_log(probe_dir / f"stage{s}" / LOG))[0], log[-1]
            per_iteration[s] = (last["elapsed"] - first["elapsed"]) / max(last["iteration"] - first["iteration"], 1)
        shutil.rmtree(probe_dir)
        plan = {"key": key, "reference_seconds": {str(s): reference_seconds[s] for s in stages},
                "seconds_per_iteration": {str(s): per_iteration[s] for s in stages},
                "iterations": {str(s): max(3, math.floor(reference_seconds[s] / max(per_iteration[s], 1e-9)))
                               for s in stages}, "probe_iterations": probe_iterations}
        atomic_write_text(plan_file, json.dumps(plan, indent=2) + "\n")
    changes = {f"stage{s}": scaled_stage(base, f"stage{s}", int(plan["iterations"][str(s)])) for s in stages}
    return base.replace(**changes), plan


# --- the whole grid ------------------------------------------------------------------------------


def run_ablations(reference: Profile, variants: Sequence[Variant], run_dir: str | Path, seeds: Sequence[int] = (0,),
                  stages: Sequence[int] = (1, 2), device: str = "auto", budget_s: float | None = None,
                  resamples: int = 1000, probe_iterations: int = 10, threads: int | None = None,
                  progress: bool = True, only_finished: bool = False) -> pd.DataFrame:
    """Train and evaluate every (variant, seed); one row each, saved as ``ablations/results.csv`` and ``.json``.

    Seed by seed, the reference first, then the time-matched variants (they need its time); finished
    runs are reused. With ``budget_s``, a run that would probably end past it is skipped and marked
    so. ``threads``: PyTorch's CPU threads (one is often faster on busy cores); ``only_finished``
    trains nothing and reports the runs that have finished.
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    stages, names = tuple(sorted(set(stages))), [v.name for v in variants]
    if not stages or set(stages) - {1, 2} or stages[0] != 1:
        raise ValueError(f"stages={stages}: use (1,) for the low-resolution model or (1, 2) for both")
    if REFERENCE not in names or len(set(names)) != len(names):
        raise ValueError(f"variants {names}: give unique names, {REFERENCE!r} among them (all are compared with it)")
    variants = sorted(variants, key=lambda v: (v.name != REFERENCE, not v.time_matched))
    run_dir, started = Path(run_dir), time.perf_counter()
    durations: list[float] = []
    rows: list[dict[str, Any]] = []
    reference_seconds: dict[int, dict[int, float]] = {}
    jobs = tqdm([(seed, v) for seed in seeds for v in variants], desc="ablations", unit="run", disable=not progress)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        for seed, variant in jobs:
            jobs.set_postfix_str(f"{variant.name} seed {seed}")
            base = {"variant": variant.name, "group": variant.group, "label": variant.label, "seed": seed}
            late = only_finished or (budget_s is not None and bool(durations)
                                     and time.perf_counter() - started + float(np.mean(durations)) > budget_s)
            if "stage2" in variant.overrides and 2 not in stages:
                rows.append({**base, "status": "skipped: needs stage 2"})
            elif late and not result_file(variant_dir(run_dir, variant.name, seed), max(stages)).is_file():
                rows.append({**base, "status": "skipped: not run" if only_finished else f"skipped: budget ({budget_s:.0f} s)"})
            elif variant.time_matched and seed not in reference_seconds:
                rows.append({**base, "status": "skipped: no reference time for this seed"})
            else:
                run_start = time.perf_counter()
                profile = (time_matched_profile(reference, variant, seed, run_dir, reference_seconds[seed], stages,
                                                probe_iterations, device)[0]
                           if variant.time_matched else variant.profile(reference, seed))
                row = run_variant(profile, variant, seed, run_dir, stages, device, resamples, train=not only_finished)
                if row["status"] == "trained":
                    durations.append(time.perf_counter() - run_start)
                if variant.name == REFERENCE and "stage_seconds" in row:
                    reference_seconds[seed] = {int(k): v for k, v in row["stage_seconds"].items()}
                rows.append(row)
    finally:
        torch.set_num_threads(default_threads)
        jobs.close()
    frame = pd.DataFrame(rows).reindex(columns=list(RESULT_COLUMNS))
    out_dir = run_dir / ABLATIONS_DIR
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
    """Per-sample results of a variant's finished seeds after ``stage`` (a ``seed`` column), or None."""
    import pandas as pd

    frames = []
    for seed in seeds:
        folder = variant_dir(run_dir, variant, seed)
        saved = result_file(folder, stage)
        if saved.is_file():
            csv = folder / json.loads(saved.read_text())["samples_csv"]
            frames.append(pd.read_csv(csv, keep_default_na=False).assign(seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else None
