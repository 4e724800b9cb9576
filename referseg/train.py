"""The two-stage trainer of SPEC 5, readable top to bottom.

Stage 1 trains the low-resolution model (a g x g logit map against OR-pooled labels);
stage 2 starts from stage 1's final weights and trains the high-resolution output
(the deconvolution's S x S map against the letterboxed mask). The pretrained
convolutions are frozen, so their output is read from the feature cache
(:mod:`referseg.features`) and a training step is only: gather cached features,
tokens and labels, forward, loss, SGD step.

Run folder (``runs/<profile>``): ``config.json``, ``vocab.txt``, ``features/``,
``stage1/{checkpoint.pt,log.jsonl}``, ``stage2/{checkpoint.pt,log.jsonl}``.
A checkpoint holds everything needed to continue bit for bit on CPU: weights,
optimizer, iteration, RNG states, the shuffle order, the profile and the vocabulary.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from referseg.config import Profile, StageConfig
from referseg.data.transforms import letterbox_mask, lowres_labels
from referseg.features import FeatureCache
from referseg.io import atomic_open, atomic_save
from referseg.text import Vocabulary

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


class TrainingDivergedError(FloatingPointError, ValueError):
    """The loss (or a weight) became NaN or infinite; the last good checkpoint is kept.

    A ValueError too, so the command line prints the message instead of a traceback.
    """

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration  # the 1-based iteration that diverged


# --- small helpers --------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def stage_config(profile: Profile, stage: int) -> StageConfig:
    if stage not in (1, 2):
        raise ValueError(f"stage {stage}: use 1 (low resolution) or 2 (high resolution)")
    return profile.stage1 if stage == 1 else profile.stage2


def learning_rate(config: StageConfig, iteration: int) -> float:
    """SPEC 5 step schedule: lr * gamma ** (iteration // lr_step), iteration counted from 0."""
    return config.lr * config.lr_gamma ** (iteration // config.lr_step)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def profile_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_profile(saved: dict[str, Any], profile: Profile, where: str) -> None:
    """Refuse to continue a run that belongs to another profile (names both, lists differences)."""
    current = json.loads(json.dumps(profile.to_dict()))  # tuples -> lists, as in the JSON file
    saved = json.loads(json.dumps(saved))
    if saved != current:
        diffs = profile_differences(saved, current)
        if saved.get("name") == profile.name:
            owner = f"was made with other settings of profile {profile.name!r}"
        else:
            owner = f"belongs to profile {saved.get('name')!r}, not to this run's profile {profile.name!r}"
        raise ValueError(
            f"{where} {owner} (differences, saved vs this run: {'; '.join(diffs[:6])}). "
            "Use another --run-dir, or delete the folder to start over."
        )


def check_vocab(saved: Vocabulary, vocab: Vocabulary, where: str) -> None:
    """Refuse a run folder or checkpoint whose vocabulary differs from this run's."""
    if saved != vocab:
        first = next(
            (i for i, (a, b) in enumerate(zip(saved.tokens, vocab.tokens, strict=False)) if a != b),
            min(len(saved), len(vocab)),
        )
        raise ValueError(
            f"the vocabulary of {where} ({len(saved)} tokens) differs from this run's "
            f"({len(vocab)} tokens) from token {first} on; the ids would not match. "
            "Use another --run-dir, or the data and vocab_file the run was made with."
        )


def prepare_run_dir(run_dir: Path, profile: Profile, vocab: Vocabulary) -> None:
    """Write config.json and vocab.txt, or check that the existing ones match this run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file, vocab_file = run_dir / "config.json", run_dir / "vocab.txt"
    if config_file.is_file():
        check_profile(json.loads(config_file.read_text()), profile, f"run folder {run_dir} ({config_file})")
    else:
        profile.save(config_file)
    if vocab_file.is_file():
        check_vocab(Vocabulary.load(vocab_file), vocab, f"run folder {run_dir} ({vocab_file})")
    else:
        vocab.save(vocab_file)


# --- targets: everything a step needs, precomputed once --------------------------


@dataclass
class Targets:
    """Per-pair tokens, image rows and labels, so a step only gathers rows."""

    tokens: torch.Tensor  # (N, T) int64
    image_index: np.ndarray  # (N,) row of the image in the feature cache / dataset
    label_index: np.ndarray  # (N,) row of the region's labels (pairs of a region share it)
    labels: np.ndarray  # stage 1: (R, g, g) uint8; stage 2: (R, S*S/8) bit-packed uint8
    side: int  # g (stage 1) or S (stage 2)
    packed: bool

    def batch_labels(self, pairs: np.ndarray) -> torch.Tensor:
        rows = self.labels[self.label_index[pairs]]
        if self.packed:
            rows = np.unpackbits(rows, axis=1, count=self.side * self.side)
        return torch.from_numpy(rows.reshape(len(pairs), self.side, self.side).astype(np.float32))


def build_targets(dataset: Any, vocab: Vocabulary, profile: Profile, stage: int, progress: bool = True) -> Targets:
    """Tokens and labels of every training pair (SPEC 5 labels), computed once.

    Stage 1: ``lowres_labels`` of the letterboxed mask (OR-pooled by default);
    stage 2: the letterboxed mask > 0 at S x S (SPEC 3), bit-packed.
    """
    refer, pairs = dataset.refer, dataset.pairs
    image_row = {image_id: row for row, image_id in enumerate(dataset.image_ids)}
    tokens = torch.tensor([vocab.encode(p.expression, profile.seq_len) for p in pairs], dtype=torch.int64)
    region_row: dict[int, int] = {}
    labels = []
    for pair in tqdm(pairs, desc=f"stage {stage} labels", unit="pair", disable=not progress, leave=False):
        if pair.ann_id in region_row:
            continue
        region_row[pair.ann_id] = len(labels)
        square = letterbox_mask(refer.load_mask(pair.ann_id), profile.input_size)
        if stage == 1:
            labels.append(lowres_labels(square, profile.grid, profile.lowres_labels).astype(np.uint8))
        else:
            labels.append(np.packbits(square.reshape(-1)))
    return Targets(
        tokens=tokens,
        image_index=np.array([image_row[p.image_id] for p in pairs], dtype=np.int64),
        label_index=np.array([region_row[p.ann_id] for p in pairs], dtype=np.int64),
        labels=np.stack(labels),
        side=profile.grid if stage == 1 else profile.input_size,
        packed=stage == 2,
    )


# --- batch order: SPEC 5 "shuffled once, then batch order re-shuffled each epoch" ---


class BatchOrder:
    """Fixed batches of a once-shuffled pair order; each epoch visits them in a new order.

    A pure function of (seed, stage, iteration), so resuming needs only the iteration;
    the checkpoint still records the order for inspection. The last batch is filled up
    from the start of the shuffled order so every batch has ``batch_size`` pairs.
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, stage: int):
        self.seed, self.stage = seed, stage
        self.pairs = np.random.default_rng([seed, stage, 0]).permutation(num_pairs)
        self.num_batches = math.ceil(num_pairs / batch_size)
        padded = np.resize(self.pairs, self.num_batches * batch_size)  # wraps around
        self.batches = padded.reshape(self.num_batches, batch_size)
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, self.stage, 1, epoch]).permutation(self.num_batches)
        return self._order

    def batch(self, iteration: int) -> np.ndarray:
        """Pair indices of the batch at 0-based ``iteration``."""
        epoch, position = divmod(iteration, self.num_batches)
        return self.batches[self.epoch_order(epoch)[position]]

    def state(self, iteration: int) -> dict[str, Any]:
        epoch = iteration // self.num_batches
        return {"pairs": self.pairs, "epoch": epoch, "batch_order": self.epoch_order(epoch),
                "position": iteration % self.num_batches}


# --- checkpoints -------------------------------------------------------------------


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write a checkpoint atomically: a crash leaves the previous one intact."""
    atomic_save(path, lambda handle: torch.save(state, handle))


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # Our own files hold numpy arrays and Python RNG state next to tensors.
    return torch.load(path, map_location=device, weights_only=False)


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def freeze_backbone(model: torch.nn.Module, profile: Profile) -> None:
    """SPEC 5: the pretrained convolutions are frozen (no gradients, BatchNorm statistics fixed)."""
    if profile.freeze_backbone:
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
        model.backbone.eval()


def append_log(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per log point (training loss averaged since the previous one)."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(path: Path, iteration: int) -> None:
    """Drop log lines past ``iteration`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    with atomic_open(path) as handle:
        handle.write("".join(line + "\n" for line in kept))


# --- the trainer --------------------------------------------------------------------


def train(
    profile: Profile,
    stage: int,
    run_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    stop_after: int | None = None,
    feature_dtype: str = "float16",
    progress: bool = True,
) -> Path:
    """Train one stage of SPEC 5 in ``run_dir``; returns the stage's checkpoint path.

    ``resume`` continues from the stage's last checkpoint. ``stop_after`` stops (with a
    checkpoint) after that many iterations, as an interruption would.
    ``feature_dtype`` is the feature cache's dtype (float32 for exact comparisons).
    """
    from referseg.data.refer import ReferSegDataset, build_vocab, load_refer
    from referseg.losses import weighted_sigmoid_ce
    from referseg.model.segmenter import build_model, param_groups

    config = stage_config(profile, stage)
    run_dir = Path(run_dir)
    stage_dir = run_dir / f"stage{stage}"
    checkpoint_path, log_path = stage_dir / CHECKPOINT, stage_dir / LOG
    device_ = resolve_device(device)

    # data, vocabulary and the run folder
    refer = load_refer(profile)
    vocab = build_vocab(profile, refer)
    prepare_run_dir(run_dir, profile, vocab)
    dataset = ReferSegDataset(refer, profile.train_split, vocab, profile)  # raises when the split is empty

    # the model: stage 1 from the pretrained backbone, stage 2 from stage 1's final weights
    seed_everything(profile.seed)
    model = build_model(profile, len(vocab))
    if stage == 2:
        stage1_path = run_dir / "stage1" / CHECKPOINT
        if not stage1_path.is_file():
            raise FileNotFoundError(
                f"stage 2 starts from stage 1's final checkpoint, but {stage1_path} does not exist: "
                f"train stage 1 first: referseg train --profile {profile.name} --stage 1"
                + (f" --run-dir {run_dir}" if run_dir != Path("runs") / profile.name else "")
            )
        stage1 = read_checkpoint(stage1_path)
        check_profile(stage1["profile"], profile, f"stage 1 checkpoint {stage1_path}")
        if not stage1.get("finished"):
            raise ValueError(
                f"stage 1 checkpoint {stage1_path} is at iteration {stage1['iteration']} of "
                f"{profile.stage1.iterations}: finish it first: referseg train --profile {profile.name} "
                "--stage 1 --resume"
            )
        model.load_state_dict(stage1["model"])
    model.to(device_)
    freeze_backbone(model, profile)
    use_cache = profile.freeze_backbone and profile.cache_features
    optimizer = torch.optim.SGD(
        param_groups(model, profile.weight_decay),  # SPEC 5: weight decay on weights only
        lr=config.lr,
        momentum=profile.momentum,
    )

    # resume: weights, optimizer, RNG states and the iteration of the last checkpoint
    start, elapsed_before = 0, 0.0
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint at {checkpoint_path}; start stage {stage} without --resume"
            )
        state = read_checkpoint(checkpoint_path, device_)
        check_profile(state["profile"], profile, f"checkpoint {checkpoint_path}")
        check_vocab(Vocabulary(state["vocab"]), vocab, f"checkpoint {checkpoint_path}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["iteration"], state.get("elapsed", 0.0)
        set_rng_states(state["rng"])
        truncate_log(log_path, start)
        if start >= config.iterations:
            print(f"stage {stage} already finished ({start} iterations): {checkpoint_path}")
            return checkpoint_path
    else:  # a fresh start replaces the stage's earlier checkpoint and log
        stage_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_path.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)

    # targets and features: computed once, gathered by each step
    targets = build_targets(dataset, vocab, profile, stage, progress)
    if use_cache:
        cache = FeatureCache(model, dataset, profile, run_dir / "features", dtype=feature_dtype,
                             device=device_, progress=progress).load()
        features_all = torch.from_numpy(np.ascontiguousarray(cache)).to(device_) if device_.type == "cuda" else cache
    order = BatchOrder(len(dataset.pairs), profile.batch_size, profile.seed, stage)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device_.type == "cuda" else contextlib.nullcontext()
    )

    def checkpoint(iteration: int, loss: float) -> None:
        if not all_finite(model):
            raise TrainingDivergedError(
                f"stage {stage}: a weight became NaN or infinite at iteration {iteration}; "
                f"kept the last good checkpoint {checkpoint_path}. Lower the learning rate "
                f"(now stage{stage}.lr={config.lr}).",
                iteration,
            )
        save_checkpoint(
            checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(), iteration=iteration,
            stage=stage, finished=iteration >= config.iterations, loss=loss, rng=rng_states(),
            shuffle=order.state(iteration), profile=profile.to_dict(), vocab=list(vocab.tokens),
            elapsed=time.perf_counter() - run_start,
        )

    # the loop
    model.train()
    freeze_backbone(model, profile)
    end = config.iterations if stop_after is None else min(config.iterations, stop_after)
    bar = tqdm(range(start, end), desc=f"stage {stage}", unit="it", initial=start, total=config.iterations,
               disable=not progress)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    run_start = time.perf_counter() - elapsed_before  # a resumed run's clock goes on
    for iteration in bar:
        lr = learning_rate(config, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pairs = order.batch(iteration)
        tokens = targets.tokens[pairs].to(device_)
        labels = targets.batch_labels(pairs).to(device_)
        rows = targets.image_index[pairs]
        with autocast:
            if use_cache:
                if device_.type == "cuda":
                    features = features_all[torch.from_numpy(rows).to(device_)].float()
                else:
                    features = torch.from_numpy(np.asarray(features_all[rows], dtype=np.float32))
                logits = model(tokens, features=features, high_res=stage == 2)
            else:
                images = torch.stack([dataset.image_tensor(int(r)) for r in rows]).to(device_)
                logits = model(tokens, images=images, high_res=stage == 2)
        loss = weighted_sigmoid_ce(logits.float(), labels, config.pos_weight, config.neg_weight)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise TrainingDivergedError(
                f"stage {stage}: the loss became {loss_value} at iteration {iteration + 1}; "
                f"kept the last good checkpoint {checkpoint_path if checkpoint_path.is_file() else '(none yet)'}. "
                f"Lower the learning rate (now stage{stage}.lr={config.lr}).",
                iteration + 1,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        done = iteration + 1
        window_loss, window_steps = window_loss + loss_value, window_steps + 1
        if done == 1 or done % profile.log_every == 0 or done == config.iterations:
            now = time.perf_counter()
            append_log(log_path, {
                "iteration": done, "loss": window_loss / window_steps, "lr": lr,
                "pairs_per_s": window_steps * profile.batch_size / max(now - window_start, 1e-9),
                "elapsed": now - run_start,
            })
            bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", lr=f"{lr:g}")
            window_loss, window_steps, window_start = 0.0, 0, now
        if done % profile.checkpoint_every == 0 or done == end:
            checkpoint(done, loss_value)
    bar.close()
    return checkpoint_path


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The JSONL training log as a list of records."""
    return [json.loads(line) for line in io.StringIO(Path(path).read_text()) if line.strip()]
