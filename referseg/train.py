"""The two-stage trainer of SPEC 5, readable top to bottom.

Stage 1 trains the low-resolution model (a g x g logit map against OR-pooled labels);
with ``pretrain`` it starts from the embedding, LSTM and classifier of the optional box
pretraining (stage 0, :mod:`referseg.pretrain`). Stage 2 starts from stage 1's final
weights and trains the high-resolution output (the deconvolution's S x S map against
the letterboxed mask). The pretrained convolutions are frozen, so their output is read
from the feature cache (:mod:`referseg.features`) and a training step is only: gather
cached features, tokens and labels, forward, loss, SGD step.

Run folder (``runs/<profile>``): ``config.json``, ``vocab.txt``, ``features/``,
``stage1/{checkpoint.pt,log.jsonl}``, ``stage2/{checkpoint.pt,log.jsonl}`` (and ``stage0/``).
A checkpoint holds everything needed to continue bit for bit on CPU: weights,
optimizer, iteration, RNG states, the shuffle order, the profile and the vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from referseg.config import Profile, StageConfig, seeded
from referseg.losses import weighted_sigmoid_ce
from referseg.model.segmenter import Segmenter, build_model, param_groups
from referseg.runs import (
    CHECKPOINT,
    LOG,
    Run,
    append_log,
    check_profile,
    check_vocab,
    checkpoint_path,
    finished_checkpoint,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    stage_dir,
    truncate_log,
)
from referseg.text import Vocabulary


class TrainingDivergedError(FloatingPointError, ValueError):
    """The loss (or a weight) became NaN or infinite; the last good checkpoint is kept.

    A ValueError too, so the command line prints the message instead of a traceback.
    """

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration  # the 1-based iteration that diverged


# --- small helpers --------------------------------------------------------------


def stage_config(profile: Profile, stage: int) -> StageConfig:
    if stage not in (1, 2):
        raise ValueError(f"stage {stage}: use 1 (low resolution) or 2 (high resolution); stage 0, the box "
                         "pretraining, is referseg.pretrain.pretrain (referseg train --stage 0)")
    return profile.stage1 if stage == 1 else profile.stage2


def learning_rate(config: StageConfig, iteration: int) -> float:
    """SPEC 5 step schedule: lr * gamma ** (iteration // lr_step), iteration counted from 0."""
    return config.lr * config.lr_gamma ** (iteration // config.lr_step)


def rng_states() -> dict[str, Any]:
    """Torch's generator states, as tensors (a checkpoint loads with ``weights_only=True``).

    Nothing in a training step draws random numbers today (the batch order is a pure function
    of the seed, the model is initialised under :func:`referseg.config.seeded`); the states are
    kept so that a future random component still resumes bit for bit.
    """
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- batch order: SPEC 5 "shuffled once, then batch order re-shuffled each epoch" ---


class BatchOrder:
    """Fixed batches of a once-shuffled pair order; each epoch visits them in a new order.

    A pure function of (seed, stage, iteration), so resuming needs only the iteration. With
    ``batching="reshuffle"`` each stage shuffles anew and the last batch is filled up from the
    start; ``"official"`` (SPEC 5, 8) drops the remainder and shares the batches between stages.
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, stage: int, batching: str = "reshuffle"):
        self.seed, self.stage = seed, stage if batching == "reshuffle" else 0
        self.pairs = np.random.default_rng([seed, self.stage, 0]).permutation(num_pairs)
        whole = batching == "official" and num_pairs >= batch_size
        self.num_batches = num_pairs // batch_size if whole else math.ceil(num_pairs / batch_size)
        padded = np.resize(self.pairs, self.num_batches * batch_size)  # wraps around (reshuffle) or cuts
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
        return {"pairs": torch.from_numpy(self.pairs), "epoch": epoch,
                "batch_order": torch.from_numpy(self.epoch_order(epoch)), "position": iteration % self.num_batches}


def start_stage(stage: int, run_dir: Path, resume: bool, model: torch.nn.Module, optimizer: Any, profile: Profile,
                vocab: Vocabulary, device: torch.device, strict: bool = True) -> tuple[int, float] | None:
    """Resume a stage (or clear it for a fresh start): ``(start, elapsed)``, None if already finished."""
    checkpoint_file, log_path = checkpoint_path(run_dir, stage), stage_dir(run_dir, stage) / LOG
    remove_stale_temporaries(stage_dir(run_dir, stage), CHECKPOINT)  # left by a writer that was killed
    if not resume:  # a fresh start replaces the stage's earlier checkpoint and log
        stage_dir(run_dir, stage).mkdir(parents=True, exist_ok=True)
        checkpoint_file.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)
        return 0, 0.0
    if not checkpoint_file.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_file}; start stage {stage} without --resume")
    state = read_checkpoint(checkpoint_file, device)
    check_profile(state["profile"], profile, f"checkpoint {checkpoint_file}")
    check_vocab(Vocabulary(state["vocab"]), vocab, f"checkpoint {checkpoint_file}")
    model.load_state_dict(state["model"], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    truncate_log(log_path, state["iteration"])
    if state["iteration"] >= getattr(profile, f"stage{stage}").iterations:
        print(f"stage {stage} already finished ({state['iteration']} iterations): {checkpoint_file}")
        return None
    return state["iteration"], state.get("elapsed", 0.0)


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def initial_model(profile: Profile, stage: int, run_dir: Path, vocab_size: int) -> Segmenter:
    """The model a stage starts from (SPEC 5): stage 1 from the pretrained backbone, and with ``pretrain``
    from stage 0's embedding, LSTM and classifier; stage 2 from stage 1's final weights."""
    with seeded(profile.seed):  # the model's own draws: independent of whatever ran before
        model = build_model(profile, vocab_size)
    if stage == 2 or profile.pretrain:  # a missing or unfinished previous stage names its command
        previous = finished_checkpoint(run_dir, profile, stage - 1, needed_by=stage)
        model.load_state_dict(previous["model"], strict=stage == 2)  # stage 0 saves text.* and classifier.*
    return model


def freeze_backbone(model: torch.nn.Module, profile: Profile) -> None:
    """SPEC 5: the pretrained convolutions are frozen (no gradients, BatchNorm statistics fixed)."""
    if profile.freeze_backbone and model.backbone is not None:  # None: no visual features
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
        model.backbone.eval()


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
    config = stage_config(profile, stage)
    run_dir = Path(run_dir)
    checkpoint_file, log_path = checkpoint_path(run_dir, stage), stage_dir(run_dir, stage) / LOG

    # data, vocabulary and the run folder
    run = Run.prepare(run_dir, profile, device, progress)
    device_, vocab = run.device, run.vocab
    data = run.split(profile.train_split)  # raises when the split is empty

    # the model: stage 1 from the pretrained backbone (and stage 0), stage 2 from stage 1
    model = initial_model(profile, stage, run_dir, len(vocab)).to(device_)
    freeze_backbone(model, profile)
    use_cache = profile.visual_features and profile.freeze_backbone and profile.cache_features
    optimizer = torch.optim.SGD(
        param_groups(model, profile.weight_decay),  # SPEC 5: weight decay on weights only
        lr=config.lr,
        momentum=profile.momentum,
    )

    # resume (weights, optimizer, RNG states, iteration) or start afresh
    resumed = start_stage(stage, run_dir, resume, model, optimizer, profile, vocab, device_)
    if resumed is None:  # it had already finished
        return checkpoint_file
    start, elapsed_before = resumed

    # targets and features: computed once, gathered by each step
    targets = data.labels(stage, progress)
    if use_cache:
        cache = data.cached_features(model, feature_dtype)
        features_all = torch.from_numpy(np.ascontiguousarray(cache)).to(device_) if device_.type == "cuda" else cache
    order = BatchOrder(len(data), profile.batch_size, profile.seed, stage, profile.batching)
    bf16 = device_.type == "cuda" and profile.precision == "bfloat16"  # SPEC 8: float32 by default
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def checkpoint(iteration: int, loss: float) -> None:
        if not all_finite(model):
            raise TrainingDivergedError(
                f"stage {stage}: a weight became NaN or infinite at iteration {iteration}; "
                f"kept the last good checkpoint {checkpoint_file}. Lower the learning rate "
                f"(now stage{stage}.lr={config.lr}).",
                iteration,
            )
        save_checkpoint(
            checkpoint_file, model=model.state_dict(), optimizer=optimizer.state_dict(), iteration=iteration,
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
        tokens = data.tokens[pairs].to(device_)
        labels = targets.batch_labels(pairs).to(device_)
        rows = data.pair_image[pairs]
        with autocast:
            visual: dict[str, torch.Tensor] = {}  # none for the words alone (visual_features=False)
            if use_cache:
                visual["features"] = (features_all[torch.from_numpy(rows).to(device_)].float() if device_.type == "cuda"
                                      else torch.from_numpy(np.asarray(features_all[rows], dtype=np.float32)))
            elif profile.visual_features:
                visual["images"] = torch.stack([data.dataset.image_tensor(int(r)) for r in rows]).to(device_)
            logits = model(tokens, **visual, high_res=stage == 2)
        loss = weighted_sigmoid_ce(logits.float(), labels, config.pos_weight, config.neg_weight)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise TrainingDivergedError(
                f"stage {stage}: the loss became {loss_value} at iteration {iteration + 1}; "
                f"kept the last good checkpoint {checkpoint_file if checkpoint_file.is_file() else '(none yet)'}. "
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
    return checkpoint_file

