"""Stage 0, optional: the official code's box-retrieval pretraining (SPEC 5), top to bottom.

Before the segmentation stages the official code trains the embedding, the LSTM and the
classifier to score boxes against an expression (``exp_train_referit_det.py``), and its
stage 1 starts from those weights (``init_referit_seg_lowres_from_det.py``). The paper does
not describe it. ``referseg train --stage 0`` replays it; ``pretrain=true`` makes stage 1
start from it (:func:`referseg.train.initial_model`).

One (expression, box) sample is scored by the segmenter's own classifier on a 1 x 1 map
(:meth:`~referseg.model.segmenter.Segmenter.classify`): ``[L2(h_T), L2(visual), box]``, so
its weights are stage 1's 1 x 1 convolutions unchanged (the same state-dict keys), which is
the official conversion. Here

- ``visual`` is the frozen backbone and fc6-fc8 on the box's crop ``im[y1:y2+1, x1:x2+1]``,
  resized to ``stage0_crop`` squared (224 for VGG-16; no context, aspect not kept). fc6 runs
  without padding: at 224 its 7 x 7 window covers VGG's 7 x 7 pool5 map once, as the
  official fully connected fc6 does, and fc8 is 1 x 1. The fc8 map is then averaged over its
  cells: at 224 that is the official fc8 itself; a larger crop, or the 4 x 4 map of the cpu
  profile's 64 crop with its 3 x 3 fc6, leaves a few cells to average. The segmenter's fc6
  is padded (SPEC 4), the official one on boxes is not; the weights are the same.
- ``box`` is the official 8-d ``[x1, y1, x2, y2, xc, yc, w, h]`` in [-1, 1] image
  coordinates (:func:`referseg.data.boxes.official_box_features`); its centre alone with
  ``spatial_channels=2``, nothing with 0, so the classifier keeps stage 1's input size.

Samples (the official ``build_training_batches_det.py``): for each region of the training
split and each of its expressions, the ground-truth box (the region mask's tight box) and
every proposal with IoU >= 0.7 are positives, proposals with IoU < 1e-6 negatives, and the
negatives are subsampled to one per positive (seeded by the component seed
``stage0/sampling``). The official proposals are the top 100 EdgeBoxes; no EdgeBoxes
implementation is available here, so the proposals are the sliding boxes that the
box-retrieval baseline also scores (:func:`referseg.data.boxes.sliding_boxes`, at
``BOX_SCALES`` x ``BOX_ASPECTS``, on the original image). The baseline's segment-proposal
boxes are left out: they need a graph segmentation per image, on the letterbox.

Every VGG layer is frozen in stage 0, fc6-fc8 included (SPEC 5), so a box's visual vector is
a function of the image, the box and the initial weights: computed once per box, it is kept
in the run's ``features/`` folder beside the feature cache (a memory-mapped file, keyed by
the weights, the crop size and the boxes). A training step is then: gather the vectors,
tokens and labels, LSTM, classifier, loss, SGD step; SGD, momentum, weight decay (weights
only) and the step schedule are those of the other stages, with ``stage0`` and
``stage0_batch_size``. Stage 0 runs in float32 (its forward is small).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from referseg.config import (
    STAGE0_NEG_IOU,
    STAGE0_NEG_PER_POS,
    STAGE0_POS_IOU,
    Profile,
    component_seed,
    seeded,
)
from referseg.data.boxes import (
    BOX_ASPECTS,
    BOX_SCALES,
    Content,
    box_iou,
    mask_boxes,
    official_box_features,
    sliding_boxes,
)
from referseg.data.transforms import normalize, to_rgb
from referseg.features import FeatureCache, weights_id
from referseg.losses import weighted_sigmoid_ce
from referseg.model.segmenter import Segmenter, build_model, param_groups
from referseg.runs import (
    LOG,
    Run,
    SplitData,
    append_log,
    checkpoint_path,
    save_checkpoint,
    stage_dir,
)
from referseg.train import (
    BatchOrder,
    TrainingDivergedError,
    all_finite,
    learning_rate,
    rng_states,
    start_stage,
)

STAGE = 0
TRAINED = ("text.", "classifier.")  # what stage 0 trains and saves: embedding, LSTM, classifier (SPEC 5)
BOX_CHANNELS = {8: list(range(8)), 2: [4, 5], 0: []}  # the box feature for each spatial_channels (SPEC 4)


# --- samples: boxes, positives and negatives (SPEC 5) -----------------------------------


def image_proposals(height: int, width: int) -> np.ndarray:
    """Box proposals of an ``height x width`` image in its own pixels: sliding boxes, standing in for EdgeBoxes."""
    return sliding_boxes(Content(0, 0, height, width, max(height, width)), BOX_SCALES, BOX_ASPECTS)


def split_proposals(proposals: np.ndarray, gt_box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the proposals that are positives (IoU >= 0.7 with ``gt_box``) and negatives (IoU < 1e-6).

    The ground-truth box itself is a positive too; the caller adds it (SPEC 5).
    """
    iou = box_iou(proposals, gt_box)
    return np.flatnonzero(iou >= STAGE0_POS_IOU), np.flatnonzero(iou < STAGE0_NEG_IOU)


@dataclass
class BoxSamples:
    """Stage 0's (expression, box, label) samples of a split, and the boxes they use."""

    pair: np.ndarray  # (N,) int64: the sample's expression, a pair index of the split
    box: np.ndarray  # (N,) int64: its box, a row of ``boxes``
    label: np.ndarray  # (N,) float32: 1 positive, 0 negative
    boxes: np.ndarray  # (B, 4) int64 [x0, y0, x1, y1) in the original image's pixels, sorted by image
    box_image: np.ndarray  # (B,) int64: the image row (the split's image index) of each box
    spatial: np.ndarray  # (B, 8) float32: the official box feature of each box

    def __len__(self) -> int:
        return len(self.pair)

    def counts(self) -> dict[str, int]:
        positives = int(self.label.sum())
        return {"samples": len(self), "positives": positives, "negatives": len(self) - positives,
                "boxes": len(self.boxes)}


def select_samples(positives: np.ndarray, negatives: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)``: every positive ``(pair, box)`` row and a seeded choice of negatives, one per
    positive (SPEC 5: the official ``np.random.choice`` without replacement, here the component seed)."""
    keep = min(len(negatives), int(STAGE0_NEG_PER_POS * len(positives)))
    rng = np.random.default_rng(component_seed(seed, "stage0/sampling"))
    chosen = negatives[np.sort(rng.choice(len(negatives), size=keep, replace=False))]
    labels = np.concatenate([np.ones(len(positives)), np.zeros(keep)]).astype(np.float32)
    return np.concatenate([positives, chosen]).reshape(-1, 2), labels


def build_samples(data: SplitData, seed: int, progress: bool = True) -> BoxSamples:
    """Stage 0's samples of a split (SPEC 5): per region, the ground-truth box and the proposals with
    IoU >= 0.7 as positives and those with IoU < 1e-6 as negatives, for each of its expressions."""
    refer = data.dataset.refer
    tables, positives, negatives = [], [], []
    offset = 0
    for image_index in tqdm(range(data.num_images), desc="stage 0 boxes", unit="img", disable=not progress,
                            leave=False):
        height, width = data.image_size(image_index)
        proposals = image_proposals(height, width)
        expressions: dict[int, list[int]] = {}  # region -> its pairs (expressions)
        for i in data.by_image[image_index].tolist():
            expressions.setdefault(data.pairs[i].ann_id, []).append(i)
        gt_boxes = mask_boxes(np.stack([refer.load_mask(ann_id) for ann_id in expressions]))
        for r, (pairs, gt_box) in enumerate(zip(expressions.values(), gt_boxes, strict=True)):
            if gt_box[2] <= gt_box[0]:
                continue  # an empty mask has no box
            pos, neg = split_proposals(proposals, gt_box)
            for rows, out in ((np.concatenate([[len(proposals) + r], pos]), positives), (neg, negatives)):
                out.append(np.stack([np.repeat(pairs, len(rows)), np.tile(offset + rows, len(pairs))], axis=1))
        table = np.concatenate([proposals, gt_boxes])
        tables.append(np.concatenate([table, np.full((len(table), 1), image_index)], axis=1))
        offset += len(table)
    if not positives:
        raise ValueError(f"stage 0: split {data.split!r} has no region with a non-empty mask, so no box to learn")
    samples, labels = select_samples(np.concatenate(positives), np.concatenate(negatives or [np.empty((0, 2))]),
                                     seed)
    samples = samples.astype(np.int64)
    used, box = np.unique(samples[:, 1], return_inverse=True)  # only boxes some sample uses get features
    table = np.concatenate(tables)[used]
    sizes = np.array([data.image_size(int(i)) for i in table[:, 4]]).reshape(-1, 2)
    return BoxSamples(pair=samples[:, 0], box=box.astype(np.int64), label=labels, boxes=table[:, :4],
                      box_image=table[:, 4], spatial=official_box_features(table[:, :4], sizes[:, 0], sizes[:, 1]))


# --- box features: frozen backbone and fc6-fc8 on each box's crop, cached ----------------------


def check_crop(profile: Profile) -> None:
    """The crop must give the backbone a map fc6 (unpadded) fits in; SPEC 5: 224 for VGG-16 (7 x 7)."""
    if profile.stage0_crop % profile.stride or profile.stage0_crop // profile.stride < profile.fc6_kernel:
        raise ValueError(
            f"stage0_crop={profile.stage0_crop}: use a multiple of stride={profile.stride} that gives at least "
            f"fc6_kernel={profile.fc6_kernel} cells a side, e.g. --set stage0_crop={profile.stride * profile.fc6_kernel}"
            " (SPEC 5: 224 for VGG-16, whose fc6 then sees the whole 7 x 7 pool5 map)"
        )


def box_crops(image: np.ndarray, boxes: np.ndarray, size: int, profile: Profile) -> torch.Tensor:
    """(n, 3, size, size): each box's crop ``im[y1:y2+1, x1:x2+1]`` resized to ``size`` squared (bilinear, no
    context, aspect not kept: the official crops) and normalised with the profile's mean and std (SPEC 3, 5)."""
    image = to_rgb(image).astype(np.float32)
    return torch.stack([
        normalize(cv2.resize(image[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_LINEAR),
                  profile.pixel_mean, profile.pixel_std)
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    ])


@torch.no_grad()
def box_vectors(model: Segmenter, crops: torch.Tensor) -> torch.Tensor:
    """(n, d_im) visual vectors of normalised crops: frozen backbone, fc6 unpadded, fc7, fc8, mean over cells."""
    head = model.head
    hidden = F.relu(F.conv2d(model.backbone(crops), head.fc6.weight, head.fc6.bias))  # the official fc6 at 224
    hidden = F.relu(head.fc7(hidden))
    return head.fc8(hidden).mean(dim=(2, 3))


class _BoxEncoder(nn.Module):
    """The model as :class:`~referseg.features.FeatureCache` reads it: ``backbone_features`` of box crops."""

    def __init__(self, model: Segmenter):
        super().__init__()
        self.model, self.backbone = model, model.backbone

    def backbone_features(self, crops: torch.Tensor) -> torch.Tensor:
        return box_vectors(self.model, crops)


class _BoxCrops:
    """The boxes as :class:`~referseg.features.FeatureCache` reads a dataset: row ``i`` is box ``i``'s crop.

    Boxes are sorted by image, so each image is decoded once."""

    def __init__(self, data: SplitData, samples: BoxSamples, profile: Profile):
        self.data, self.samples, self.profile = data, samples, profile
        self.split = f"{data.split}-stage0-boxes"
        self.image_ids = list(range(len(samples.boxes)))
        self._image: tuple[int, np.ndarray] | None = None

    def image_tensor(self, i: int) -> torch.Tensor:
        row = int(self.samples.box_image[i])
        if self._image is None or self._image[0] != row:
            self._image = (row, self.data.dataset.refer.load_image(self.data.dataset.image_ids[row]))
        return box_crops(self._image[1], self.samples.boxes[i], self.profile.stage0_crop, self.profile)[0]


def box_features(model: Segmenter, data: SplitData, samples: BoxSamples, dtype: str = "float16") -> np.ndarray:
    """(boxes, d_im) visual vectors of every box of ``samples``, from the run's cache (built once).

    Keyed by the backbone's and fc6-fc8's weights, the preprocessing, the crop size, the images
    and the boxes, so any change builds a new file.
    """
    profile, run = data.profile, data.run
    if run is None:
        raise ValueError("stage 0 box features need a run folder (SplitData of a Run)")
    digest = hashlib.sha256(np.ascontiguousarray(np.concatenate(
        [samples.boxes, samples.box_image[:, None]], axis=1), dtype=np.int64).tobytes())
    extra = {"stage0": {"head": weights_id(model.head), "crop": profile.stage0_crop, "boxes": digest.hexdigest(),
                        "images": hashlib.sha256(str(list(data.dataset.image_ids)).encode()).hexdigest()}}
    return FeatureCache(_BoxEncoder(model), _BoxCrops(data, samples, profile), profile, run.features_dir, dtype=dtype,
                        batch_size=32, device=run.device, progress=run.progress, extra_key=extra).load()


def box_scores(model: Segmenter, tokens: torch.Tensor, visual: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """(B,) scores of boxes (visual (B, d_im), box features (B, n)) against expressions: the segmenter's
    L2 normalisation and classifier on 1 x 1 maps (SPEC 4, 5)."""
    return model.classify(model.text(tokens), visual[:, :, None, None], spatial[:, :, None, None])[:, 0, 0, 0]


def stage0_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights stage 0 trains, under the segmenter's own names: ``text.*`` and ``classifier.*``."""
    return {name: tensor for name, tensor in model.state_dict().items() if name.startswith(TRAINED)}


# --- the stage-0 trainer -------------------------------------------------------------------


def pretrain(
    profile: Profile,
    run_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    stop_after: int | None = None,
    feature_dtype: str = "float16",
    progress: bool = True,
) -> Path:
    """Train stage 0 of SPEC 5 in ``run_dir``; returns its checkpoint path (``stage0/checkpoint.pt``).

    ``resume``, ``stop_after`` and ``feature_dtype`` as in :func:`referseg.train.train`. The model
    is built as stage 1 builds it (``init``, seed), so stage 0 scores boxes with the fc6-fc8 that
    stage 1 starts from; only its embedding, LSTM and classifier train and are saved.
    """
    config, run_dir = profile.stage0, Path(run_dir)
    check_crop(profile)
    checkpoint_file, log_path = checkpoint_path(run_dir, STAGE), stage_dir(run_dir, STAGE) / LOG

    # data, vocabulary and the run folder
    run = Run.prepare(run_dir, profile, device, progress)
    device_, vocab = run.device, run.vocab
    data = run.split(profile.train_split)  # raises when the split is empty

    # the model as stage 1 builds it; every VGG layer frozen (fc6-fc8 too), so only text and classifier train
    with seeded(profile.seed):
        model = build_model(profile, len(vocab))
    model.to(device_)
    trained = nn.ModuleDict({"text": model.text, "classifier": model.classifier})
    optimizer = torch.optim.SGD(param_groups(trained, profile.weight_decay), lr=config.lr, momentum=profile.momentum)

    # resume: weights, optimizer, RNG states and the iteration of the last checkpoint
    resumed = start_stage(STAGE, run_dir, resume, model, optimizer, profile, vocab, device_, strict=False)
    if resumed is None:
        return checkpoint_file
    start, elapsed_before = resumed

    # samples and box features: computed once, gathered by each step
    samples = build_samples(data, profile.seed, progress)
    features = box_features(model, data, samples, feature_dtype)
    spatial = torch.from_numpy(samples.spatial[:, BOX_CHANNELS[profile.spatial_channels]]).to(device_)
    labels_all = torch.from_numpy(samples.label)
    order = BatchOrder(len(samples), profile.stage0_batch_size, profile.seed, STAGE, profile.batching)

    def checkpoint(iteration: int, loss: float) -> None:
        if not all_finite(trained):
            raise TrainingDivergedError(
                f"stage 0: a weight became NaN or infinite at iteration {iteration}; kept the last good checkpoint "
                f"{checkpoint_file}. Lower the learning rate (now stage0.lr={config.lr}).", iteration)
        save_checkpoint(
            checkpoint_file, model=stage0_weights(model), optimizer=optimizer.state_dict(), iteration=iteration,
            stage=STAGE, finished=iteration >= config.iterations, loss=loss, rng=rng_states(),
            shuffle=order.state(iteration), profile=profile.to_dict(), vocab=list(vocab.tokens),
            samples=samples.counts(), elapsed=time.perf_counter() - run_start,
        )

    # the loop
    model.train()  # a frozen backbone stays in eval mode
    end = config.iterations if stop_after is None else min(config.iterations, stop_after)
    bar = tqdm(range(start, end), desc="stage 0", unit="it", initial=start, total=config.iterations,
               disable=not progress)
    window: dict[str, float] = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
    window_start = time.perf_counter()
    run_start = time.perf_counter() - elapsed_before
    for iteration in bar:
        lr = learning_rate(config, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = order.batch(iteration)
        boxes = samples.box[rows]
        tokens = data.tokens[samples.pair[rows]].to(device_)
        visual = torch.from_numpy(np.asarray(features[boxes], dtype=np.float32)).to(device_)
        labels = labels_all[rows].to(device_)
        scores = box_scores(model, tokens, visual, spatial[torch.from_numpy(boxes).to(device_)])
        loss = weighted_sigmoid_ce(scores, labels, config.pos_weight, config.neg_weight)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise TrainingDivergedError(
                f"stage 0: the loss became {loss_value} at iteration {iteration + 1}; kept the last good checkpoint "
                f"{checkpoint_file if checkpoint_file.is_file() else '(none yet)'}. Lower the learning rate "
                f"(now stage0.lr={config.lr}).", iteration + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        done = iteration + 1
        window["loss"] += loss_value
        window["accuracy"] += float(((scores.detach() > 0) == (labels > 0)).float().mean())  # as the official log
        window["steps"] += 1
        if done == 1 or done % profile.log_every == 0 or done == config.iterations:
            now, steps = time.perf_counter(), window["steps"]
            append_log(log_path, _log_record(done, window, lr, steps * profile.stage0_batch_size / max(
                now - window_start, 1e-9), now - run_start))
            bar.set_postfix(loss=f"{window['loss'] / steps:.4f}", lr=f"{lr:g}")
            window, window_start = {"loss": 0.0, "accuracy": 0.0, "steps": 0}, now
        if done % profile.checkpoint_every == 0 or done == end:
            checkpoint(done, loss_value)
    bar.close()
    return checkpoint_file


def _log_record(done: int, window: dict[str, float], lr: float, samples_per_s: float, elapsed: float
                ) -> dict[str, Any]:
    steps = window["steps"]
    return {"iteration": done, "loss": window["loss"] / steps, "accuracy": window["accuracy"] / steps, "lr": lr,
            "samples_per_s": samples_per_s, "elapsed": elapsed}
