"""What every baseline shares: its settings and the model's predict interface.

A :class:`Baseline` learns from one :class:`referseg.runs.SplitData` (``fit``) and predicts
square logits for another (``predict_logits``), which ``predict_masks`` maps back to the
original image size exactly as the model's logits are (``prediction_mask``, SPEC 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from referseg.baselines.proposals import single_thread
from referseg.config import Profile, component_seed
from referseg.data.boxes import BOX_ASPECTS, BOX_SCALES
from referseg.data.transforms import prediction_mask
from referseg.runs import SplitData, resolve_device
from referseg.text import Vocabulary


@dataclass(frozen=True)
class BaselineSettings:
    """Sizes of the baselines (the paper gives none): small enough for the cpu profile's budget."""

    proposal_divisor: int = 2  # proposals live on the letterbox at R = input_size / proposal_divisor
    felzenszwalb_scale: float = 100.0  # segment size preference (scikit-image felzenszwalb)
    felzenszwalb_sigma: float = 0.5  # pre-smoothing
    felzenszwalb_min_size: int = 20  # smallest segment, in pixels at R
    max_segments: int = 160  # segment proposals kept per image (segments and their merges)
    box_scales: tuple[float, ...] = BOX_SCALES  # sliding box side / sqrt(image area)
    box_aspects: tuple[float, ...] = BOX_ASPECTS  # sliding box width / height
    grabcut_iterations: int = 1  # as good as 2-3 on SynthRef val (mean IoU 0.80 from true boxes), faster
    hidden: int = 64  # width of the scoring model and of the per-word FCN head
    text_dim: int = 64  # word embedding and LSTM width of the scoring model's expression encoder
    iterations: int = 300  # training steps of each learned baseline
    batch_images: int = 8  # images per step, with all their (region, expression) pairs
    lr: float = 3e-3  # Adam
    max_train_images: int = 0  # learn from at most this many training images (0: all)
    seed: int | None = None  # None: the profile's seed; each random part derives its own (component_seed)

    def proposal_resolution(self, profile: Profile) -> int:
        """R: the side of the letterbox the proposals live on (a multiple of the feature grid)."""
        side = profile.input_size // self.proposal_divisor
        return max(profile.grid, side - side % profile.grid)


class Baseline:
    """A method with the model's predict interface: ``fit`` on a training split, logits/masks for another.

    Subclasses set ``name`` and ``variants`` (the rows it adds to the paper's table) and
    implement ``predict_image``: square logits (any side) of one image's pairs, per variant.
    """

    name: ClassVar[str] = ""
    variants: ClassVar[dict[str, str]] = {}  # method id -> label in the paper's table
    learns: ClassVar[bool] = True

    def __init__(self, profile: Profile, vocab: Vocabulary, settings: BaselineSettings | None = None,
                 device: str | torch.device = "cpu", progress: bool = True):
        self.profile = profile
        self.vocab = vocab
        self.settings = settings or BaselineSettings()
        self.seed = self.settings.seed if self.settings.seed is not None else profile.seed
        self.device = resolve_device(device)
        self.progress = progress

    def seed_of(self, part: str) -> int:
        """The seed of one random part of this baseline ("init", "batches", ...): independent of
        what ran before, so the baseline gives the same numbers alone and inside a full evaluation."""
        return component_seed(self.seed, f"{self.name}/{part}")

    def fit(self, train: SplitData) -> Baseline:
        """Learn from the training split (a no-op for baselines that do not learn).

        Runs on one torch thread: these models are small, and a thread pool on busy cores
        cost several times more than it saved (measured: 67 s against 9 s of CPU for per-word).
        """
        with single_thread():
            self.learn(train)
        return self

    def learn(self, train: SplitData) -> None:
        """What ``fit`` does; baselines that learn implement it."""

    def predict_image(self, data: SplitData, image_index: int, pairs: np.ndarray) -> dict[str, np.ndarray]:
        """``{variant: (len(pairs), side, side) float32 logits}`` on the letterboxed square."""
        raise NotImplementedError

    def predict_logits(self, data: SplitData, indices: Sequence[int] | None = None
                       ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(pair index, {variant: square logits})`` for the given pairs (all by default), image by image."""
        from tqdm.auto import tqdm

        wanted = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
        images = np.unique(data.pair_image[wanted])
        keep = np.zeros(len(data), dtype=bool)
        keep[wanted] = True
        for image_index in tqdm(images, desc=self.name, unit="img", disable=not self.progress, leave=False):
            pairs = data.by_image[image_index]
            pairs = pairs[keep[pairs]]
            with single_thread():
                logits = self.predict_image(data, int(image_index), pairs)
            for row, i in enumerate(pairs.tolist()):
                yield i, {variant: out[row] for variant, out in logits.items()}

    def predict_masks(self, data: SplitData, indices: Sequence[int] | None = None, mode: str | None = None
                      ) -> dict[str, list[np.ndarray]]:
        """``{variant: [bool mask at the original size]}`` in the order of ``indices`` (SPEC 1)."""
        mode = mode or self.profile.eval_mode
        wanted = list(range(len(data))) if indices is None else [int(i) for i in indices]
        out: dict[str, dict[int, np.ndarray]] = {v: {} for v in self.variants}
        for i, logits in self.predict_logits(data, wanted):
            height, width = data.size(i)
            for variant, square in logits.items():
                out[variant][i] = prediction_mask(square, height, width, mode)
        return {variant: [masks[i] for i in wanted] for variant, masks in out.items()}


def image_batches(count: int, batch_size: int, iterations: int, seed: int) -> Iterator[np.ndarray]:
    """``iterations`` batches of image rows (each step trains on all pairs of its images): a seeded
    shuffle, reshuffled each epoch. Pairs of one image share its features, so a step computes them once."""
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, count)
    order, position = rng.permutation(count), 0
    for _ in range(iterations):
        if position + batch_size > count:
            order, position = rng.permutation(count), 0
        yield order[position:position + batch_size]
        position += batch_size
