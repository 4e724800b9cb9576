"""What every baseline and the evaluation share: a run's data, cached features, and the predict interface.

A :class:`Run` is a run folder (``config.json``, ``vocab.txt``); ``run.split("test")`` is a
:class:`SplitData` with the split's pairs, token ids and the frozen backbone's cached
features (:mod:`referseg.features`). A :class:`Baseline` learns from one ``SplitData``
(``fit``) and predicts square logits for another (``predict_logits``), which
``predict_masks`` maps back to the original image size exactly as the model's logits are
(``prediction_mask``, SPEC 1).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from referseg.baselines.proposals import single_thread
from referseg.config import PROFILES, Profile
from referseg.data.transforms import letterbox_image, letterbox_mask, lowres_labels, prediction_mask
from referseg.text import Vocabulary

if TYPE_CHECKING:
    from referseg.data.refer import Refer, ReferSegDataset


@dataclass(frozen=True)
class BaselineSettings:
    """Sizes of the baselines (the paper gives none): small enough for the cpu profile's budget."""

    proposal_divisor: int = 2  # proposals live on the letterbox at R = input_size / proposal_divisor
    felzenszwalb_scale: float = 100.0  # segment size preference (scikit-image felzenszwalb)
    felzenszwalb_sigma: float = 0.5  # pre-smoothing
    felzenszwalb_min_size: int = 20  # smallest segment, in pixels at R
    max_segments: int = 160  # segment proposals kept per image (segments and their merges)
    box_scales: tuple[float, ...] = (0.3, 0.5, 0.75, 1.0)  # sliding box side / sqrt(image area)
    box_aspects: tuple[float, ...] = (0.5, 1.0, 2.0)  # sliding box width / height
    grabcut_iterations: int = 1  # as good as 2-3 on SynthRef val (mean IoU 0.80 from true boxes), faster
    hidden: int = 64  # width of the scoring model and of the per-word FCN head
    text_dim: int = 64  # word embedding and LSTM width of the scoring model's expression encoder
    iterations: int = 300  # training steps of each learned baseline
    batch_images: int = 8  # images per step, with all their (region, expression) pairs
    lr: float = 3e-3  # Adam
    max_train_images: int = 0  # learn from at most this many training images (0: all)
    seed: int = 0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    from referseg.train import resolve_device as resolve

    return resolve(device)


class FrozenBackbone(nn.Module):
    """Just the profile's frozen convolutions, in the shape :class:`referseg.features.FeatureCache` reads."""

    def __init__(self, profile: Profile):
        super().__init__()
        from referseg.model.backbones import build_backbone

        self.backbone = build_backbone(profile).freeze()

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


class Run:
    """A run folder's profile, vocabulary and dataset; ``split(name)`` gives its :class:`SplitData`."""

    def __init__(self, run_dir: str | Path, device: str | torch.device = "auto", progress: bool = True):
        self.run_dir = Path(run_dir)
        config_file, vocab_file = self.run_dir / "config.json", self.run_dir / "vocab.txt"
        missing = [f.name for f in (config_file, vocab_file) if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.run_dir} is not a run folder: {' and '.join(missing)} missing. Train stage 1 first: "
                f"referseg train --profile {guess_profile_name(self.run_dir)} --stage 1"
                + ("" if self.run_dir.parent == Path("runs") else f" --run-dir {self.run_dir}")
            )
        self.profile = Profile.load(config_file)
        self.vocab = Vocabulary.load(vocab_file)
        self.device = resolve_device(device)
        self.progress = progress
        self._refer: Refer | None = None
        self._splits: dict[str, SplitData] = {}
        self._feature_model: nn.Module | None = None

    @property
    def refer(self) -> Refer:
        if self._refer is None:
            from referseg.data.refer import load_refer

            self._refer = load_refer(self.profile)
        return self._refer

    def feature_model(self) -> nn.Module:
        """A module whose ``backbone`` is the profile's frozen, pretrained convolutions."""
        if self._feature_model is None:
            self._feature_model = FrozenBackbone(self.profile).to(self.device)
        return self._feature_model

    def split(self, name: str) -> SplitData:
        if name not in self._splits:
            from referseg.data.refer import ReferSegDataset

            dataset = ReferSegDataset(self.refer, name, self.vocab, self.profile)
            self._splits[name] = SplitData(dataset, self)
        return self._splits[name]

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"


def guess_profile_name(run_dir: Path) -> str:
    """The profile a run folder was probably made with: its config, else its name, else ``cpu``."""
    config_file = run_dir / "config.json"
    if config_file.is_file():
        try:
            return str(json.loads(config_file.read_text())["name"])
        except (OSError, ValueError, KeyError):
            pass
    return run_dir.name if run_dir.name in PROFILES else "cpu"


class SplitData:
    """One split of a run: pairs, token ids, per-image pair lists, cached features, masks on demand."""

    def __init__(self, dataset: ReferSegDataset, run: Run | None = None, features: np.ndarray | None = None):
        self.dataset = dataset
        self.run = run
        self.profile: Profile = dataset.profile
        self.vocab: Vocabulary = dataset.vocab
        self.split: str = dataset.split
        self.pairs = dataset.pairs
        index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
        self.pair_image = np.array([index_of[p.image_id] for p in self.pairs], dtype=np.int64)
        self.by_image: list[np.ndarray] = [np.flatnonzero(self.pair_image == i) for i in range(len(dataset.image_ids))]
        self.tokens = torch.tensor([self.vocab.encode(p.expression, self.profile.seq_len) for p in self.pairs],
                                   dtype=torch.int64)  # SPEC 2: T ids, left-padded
        self._features = features
        self._square_masks: dict[tuple[int, int], np.ndarray] = {}
        self._square_images: dict[tuple[int, int], np.ndarray] = {}  # small letterboxes (proposals, GrabCut)
        self.cache: dict[str, Any] = {}  # per-split results shared between baselines (e.g. proposals)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_images(self) -> int:
        return len(self.dataset.image_ids)

    @property
    def features(self) -> np.ndarray:
        """(images, C, g, g) frozen backbone features, from the run's feature cache (built once)."""
        if self._features is None:
            from referseg.features import FeatureCache

            if self.run is None:
                raise ValueError("SplitData without a run needs its features passed in")
            cache = FeatureCache(self.run.feature_model(), self.dataset, self.profile, self.run.run_dir / "features",
                                 device=self.run.device, progress=self.run.progress)
            self._features = cache.load()
        return self._features

    def image_features(self, image_indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Float32 features of some images, (n, C, g, g)."""
        return torch.from_numpy(np.asarray(self.features[np.asarray(image_indices)], dtype=np.float32))

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) of pair ``i``'s image."""
        image = self.dataset.refer.images[self.pairs[i].image_id]
        return image["height"], image["width"]

    def image_size(self, image_index: int) -> tuple[int, int]:
        image = self.dataset.refer.images[self.dataset.image_ids[image_index]]
        return image["height"], image["width"]

    def square_image(self, image_index: int, size: int) -> np.ndarray:
        """The image letterboxed to ``size x size`` (SPEC 3), uint8 RGB; kept for the next caller."""
        key = (image_index, size)
        if key not in self._square_images:
            image = self.dataset.refer.load_image(self.dataset.image_ids[image_index])
            self._square_images[key] = np.clip(letterbox_image(image, size) + 0.5, 0, 255).astype(np.uint8)
        return self._square_images[key]

    def original_mask(self, i: int) -> np.ndarray:
        return self.dataset.original_mask(i)

    def square_mask(self, i: int, size: int) -> np.ndarray:
        """Pair ``i``'s ground truth letterboxed to ``size x size`` (SPEC 3), cached per region."""
        key = (self.pairs[i].ann_id, size)
        if key not in self._square_masks:
            self._square_masks[key] = letterbox_mask(self.original_mask(i), size)
        return self._square_masks[key]

    def lowres_label(self, i: int) -> np.ndarray:
        """The g x g label of SPEC 5 (OR-pooled letterboxed mask by default)."""
        square = self.square_mask(i, self.profile.input_size)
        return lowres_labels(square, self.profile.grid, self.profile.lowres_labels)

    def meta(self, i: int) -> dict:
        return self.dataset.meta(i)

    def training_images(self, limit: int, seed: int) -> np.ndarray:
        """Indices of at most ``limit`` images (all when 0), a seeded random choice, sorted."""
        if not limit or limit >= self.num_images:
            return np.arange(self.num_images)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.num_images, size=limit, replace=False))


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
        self.device = resolve_device(device)
        self.progress = progress

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


class Adam:
    """Adam (Kingma & Ba) in a few lines: ``torch.optim``'s constructors import ``torch._dynamo``,
    seconds of start-up that a baseline training for a few seconds should not pay."""

    def __init__(self, params: Iterator[nn.Parameter] | list[nn.Parameter], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.steps = lr, betas, eps, 0
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        for p, m, v in zip(self.params, self.first, self.second, strict=True):
            if p.grad is None:
                continue
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m / correction1, (v / correction2).sqrt_().add_(self.eps), value=-self.lr)
