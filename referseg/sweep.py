"""The learning-rate sweep that chooses a profile's learning rates on validation, never on test.

SPEC 5's learning rate is 0.01 in both stages for 48,000 iterations; a short profile (``cpu``:
2,100) may need more. The sweep trains stage 1 at each of ``STAGE1_LRS``, with and without the
box pretraining (stage 0), with the profile's initialisation; then the other initialisation at
the best rate, with and without stage 0; then stage 2 at each of ``STAGE2_LRS`` from the chosen
stage 1. Every run is an ablation :class:`~referseg.ablations.Variant` of the profile, trained
and evaluated on the validation split by :func:`referseg.ablations.run_variant`, so it resumes
and is reused like the ablations. :func:`choose` takes the most SPEC-like setting (lr 0.01, the
official initialisation, stage 0) among those within ``PREFER_SPEC_WITHIN`` points of the best.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from referseg.ablations import Variant, load_samples, run_variant
from referseg.config import INITS, Profile
from referseg.io import atomic_write_text
from referseg.metrics import overall_iou_by

if TYPE_CHECKING:
    import pandas as pd

STAGE1_LRS = (0.01, 0.03, 0.1, 0.3)
STAGE2_LRS = (0.01, 0.03, 0.1)
SPEC_LR = 0.01  # SPEC 5, both stages
PREFER_SPEC_WITHIN = 1.0  # points of validation overall IoU (about twice the cpu run's seed sd)
SWEEP_DIR = "sweep"
CHOSEN = ("init", "pretrain", "stage1.lr", "stage2.lr")  # the profile fields the sweep chooses


def stage1_variant(lr: float, pretrain: bool, init: str) -> Variant:
    """Stage 1 at ``lr`` with ``init``, from scratch or from stage 0 (stage 0 keeps the profile's lr)."""
    return Variant(f"stage1-{init}-lr{lr:g}-" + ("stage0" if pretrain else "scratch"), "stage 1",
                   f"{init} init, lr {lr:g}" + (", from stage 0" if pretrain else ""),
                   {"stage1": {"lr": float(lr)}, "pretrain": pretrain, "init": init, "eval_split": "val"})


def stage2_variants(stage1: Variant, lrs: Sequence[float] = STAGE2_LRS) -> list[Variant]:
    """Stage 2 at each lr, after the chosen stage 1."""
    return [Variant(f"{stage1.name}-stage2-lr{lr:g}", "stage 2", f"{stage1.label}; stage 2 lr {lr:g}",
                    {**stage1.overrides, "stage2": {"lr": float(lr)}}) for lr in lrs]


def spec_likeness(row: dict[str, Any]) -> int:
    """How many of the official recipe's choices a row makes: lr 0.01, the official init, stage 0."""
    return int(row["lr"] == SPEC_LR) + int(row["init"] == "official") + int(bool(row["pretrain"]))


def choose(rows: Sequence[dict[str, Any]], key: str = "overall_iou") -> dict[str, Any]:
    """The most SPEC-like row among those within ``PREFER_SPEC_WITHIN`` points of the best validation
    ``key`` (the better of equally SPEC-like ones)."""
    rows = [row for row in rows if math.isfinite(row[key])]  # a diverged run has no score
    best = max(row[key] for row in rows)
    close = [row for row in rows if best - row[key] <= PREFER_SPEC_WITHIN / 100]
    return max(close, key=lambda row: (spec_likeness(row), row[key]))


def _row(reference: Profile, variant: Variant, seed: int, run_dir: Path, stages: tuple[int, ...],
         device: str, progress: bool) -> dict[str, Any]:
    profile = variant.profile(reference, seed)
    row = run_variant(profile, variant, seed, run_dir, stages, device, progress=progress)
    regions = {}
    samples = load_samples(run_dir, variant.name, [seed], stage=max(stages))
    if samples is not None:
        regions = {f"{kind}_iou": float(value) for kind, value in overall_iou_by(samples, "region").items()}
    return {**{k: row.get(k, math.nan) for k in ("variant", "label", "seed", "status", "overall_iou", "ci_low",
                                                 "ci_high", "mean_iou", "train_s")},
            "stage": max(stages), "lr": getattr(profile, f"stage{max(stages)}").lr, "pretrain": profile.pretrain,
            "init": profile.init, "stage1_lr": profile.stage1.lr, **regions}


def run_sweep(reference: Profile, run_dir: str | Path, seed: int = 0, device: str = "auto",
              stage1_lrs: Sequence[float] = STAGE1_LRS, stage2_lrs: Sequence[float] = STAGE2_LRS,
              threads: int | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run (or reuse) the sweep in ``<run_dir>/sweep/``: its rows and the chosen settings."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    run_dir = Path(run_dir) / SWEEP_DIR
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        def stage1(variants: list[Variant], desc: str) -> list[dict[str, Any]]:
            return [_row(reference, v, seed, run_dir, (1,), device, False)
                    for v in tqdm(variants, desc=desc, unit="run", disable=not progress)]

        first = [stage1_variant(lr, pretrain, reference.init) for pretrain in (False, True) for lr in stage1_lrs]
        rows = stage1(first, f"sweep, stage 1 ({reference.init} init)")
        lr = max((row for row in rows if math.isfinite(row["overall_iou"])), key=lambda row: row["overall_iou"])["lr"]
        other = next(init for init in INITS if init != reference.init)
        first += [stage1_variant(lr, pretrain, other) for pretrain in (False, True)]
        rows += stage1(first[-2:], f"sweep, stage 1 ({other} init, lr {lr:g})")
        chosen1 = choose(rows)
        second = stage2_variants(next(v for v in first if v.name == chosen1["variant"]), stage2_lrs)
        rows += [_row(reference, v, seed, run_dir, (1, 2), device, False)
                 for v in tqdm(second, desc="sweep, stage 2", unit="run", disable=not progress)]
        chosen2 = choose([row for row in rows if row["stage"] == 2])
    finally:
        torch.set_num_threads(default_threads)
    choice = {"init": chosen1["init"], "pretrain": chosen1["pretrain"], "stage1_lr": chosen1["lr"],
              "stage2_lr": chosen2["lr"], "seed": seed,
              "rule": f"the most SPEC-like setting (lr {SPEC_LR:g}, official init, stage 0) within "
                      f"{PREFER_SPEC_WITHIN:g} point of the best validation overall IoU"}
    frame = pd.DataFrame(rows)
    atomic_write_text(run_dir / "results.json", json.dumps({"choice": choice, "rows": rows}, indent=2) + "\n")
    return frame, choice
