"""Validation overall IoU of a run's stage-1 and stage-2 checkpoints, for things, stuff and all.

    python -m benchmarks.train_cpu --run runs/cpu [--split val] [--set NAME=VALUE ...]

Used to tune the ``cpu`` profile: stage 2 must beat stage 1, and things must be learned.
Plain overall IoU (sum I / sum U) at the original resolution (SPEC 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from referseg.data.refer import ReferSegDataset, load_refer
from referseg.evaluate import evaluate_masks
from referseg.predict import load_checkpoint, predict_split


def stage_iou(run_dir: Path, stage: int, split: str = "val", progress: bool = False) -> dict[str, float]:
    """Overall IoU on ``split`` of one stage's checkpoint: {"things", "stuff", "all"}."""
    model, profile, vocab = load_checkpoint(run_dir / f"stage{stage}" / "checkpoint.pt")
    refer = load_refer(profile)
    dataset = ReferSegDataset(refer, split, vocab, profile)
    predictions = list(predict_split(model, dataset, profile, run_dir / "features", progress=progress))
    targets = [dataset.original_mask(i) for i in range(len(dataset))]
    stuff = np.array([p.is_stuff for p in dataset.pairs])
    result = {"pairs": len(dataset), "stuff_pairs": int(stuff.sum())}
    for name, keep in (("things", ~stuff), ("stuff", stuff), ("all", np.ones_like(stuff))):
        chosen = np.flatnonzero(keep)
        if len(chosen):
            scores = evaluate_masks([predictions[i] for i in chosen], [targets[i] for i in chosen])
            result[name] = round(scores["overall_iou"], 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/cpu")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_dir = Path(args.run)
    for stage in (1, 2):
        if (run_dir / f"stage{stage}" / "checkpoint.pt").is_file():
            print(json.dumps({"stage": stage, "split": args.split, **stage_iou(run_dir, stage, args.split)}))


if __name__ == "__main__":
    main()
