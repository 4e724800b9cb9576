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

from referseg.metrics import evaluate_masks
from referseg.predict import predict_split
from referseg.runs import Run, checkpoint_path, load_checkpoint


def stage_iou(run_dir: Path, stage: int, split: str = "val", progress: bool = False) -> dict[str, float]:
    """Overall IoU on ``split`` of one stage's checkpoint: {"things", "stuff", "all"}."""
    run = Run(run_dir, progress=progress)
    model, _, _ = load_checkpoint(checkpoint_path(run_dir, stage), run.device, profile=run.profile, vocab=run.vocab)
    data = run.split(split)  # features from the run's cache
    predictions = list(predict_split(model, data, progress=progress))
    targets = [data.original_mask(i) for i in range(len(data))]
    stuff = np.array([p.is_stuff for p in data.pairs])
    result = {"pairs": len(data), "stuff_pairs": int(stuff.sum())}
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
        if checkpoint_path(run_dir, stage).is_file():
            print(json.dumps({"stage": stage, "split": args.split, **stage_iou(run_dir, stage, args.split)}))


if __name__ == "__main__":
    main()
