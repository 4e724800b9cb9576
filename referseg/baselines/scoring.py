"""Scoring proposals against an expression: the model shared by box retrieval and proposal classification.

In the spirit of SCRC (Hu et al., CVPR 2016): each proposal is described by its pooled
frozen backbone features, the whole image's pooled features (context) and its box
geometry; the expression by the model's LSTM encoder (SPEC 4). A small network scores
every proposal of an image; it is trained with a softmax over the image's proposals,
the positive being the proposal that best overlaps the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from referseg.baselines.common import Baseline, image_batches
from referseg.baselines.proposals import (
    GEOMETRY_FEATURES,
    Content,
    SegmentProposals,
    box_coverage,
    dot,
    geometry,
    segment_proposals,
)
from referseg.config import Profile, seeded
from referseg.model.language import LanguageEncoder
from referseg.runs import SplitData


class ProposalScorer(nn.Module):
    """Scores regions against expressions: the dot product of a region embedding and a text embedding.

    Regions (P, F) go through a small MLP (per image, once), the expression through the
    model's LSTM encoder (SPEC 4) and a linear map; the score is their dot product, so a
    word can select region features ("red" and colour, "left" and x) and scoring every
    proposal of an image for every expression is one matrix product.
    """

    def __init__(self, profile: Profile, vocab_size: int, region_dim: int, hidden: int, text_dim: int):
        super().__init__()
        # SPEC 4's encoder (embedding + LSTM, final state h_T, forget bias 1), at a baseline's width.
        self.text = LanguageEncoder(profile.replace(d_embed=text_dim, d_text=text_dim), vocab_size)
        self.text_in = nn.Linear(text_dim, hidden + 1)  # the last unit scores a region prior
        self.region_in = nn.Sequential(nn.Linear(region_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.region_prior = nn.Linear(hidden, 1)

    def embed_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """(..., P, F) descriptors -> (..., P, hidden + 1) embeddings."""
        embedded = self.region_in(regions)
        return torch.cat([embedded, self.region_prior(F.relu(embedded))], dim=-1)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, hidden + 1); the last unit multiplies the region prior."""
        return self.text_in(F.normalize(self.text(tokens), dim=1))

    def score_images(self, tokens: torch.Tensor, regions: torch.Tensor, image_of: torch.Tensor) -> torch.Tensor:
        """Scores (B, P) of expression b against the regions (U, P, F) of its image ``image_of[b]``."""
        embedded = self.embed_regions(regions)  # (U, P, H + 1), once per image
        text = self.embed_text(tokens)  # (B, H + 1)
        every = torch.einsum("uph,bh->ubp", embedded, text)  # every image x every expression: one matmul
        return every[image_of, torch.arange(len(tokens), device=tokens.device)]

    def forward(self, tokens: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Scores (B, P) of the regions (P, F) of one image for expressions (B, T)."""
        return self.embed_text(tokens) @ self.embed_regions(regions).T


@dataclass
class Candidates:
    """The proposals of one image on the letterbox at resolution R, with what scoring needs."""

    content: Content
    boxes: np.ndarray  # (P, 4) [x0, y0, x1, y1)
    areas: np.ndarray  # (P,) pixels at R
    coverage: np.ndarray  # (P, g, g) fraction of each feature cell inside the proposal
    segments: SegmentProposals | None = None  # region proposals (None for boxes)

    def __len__(self) -> int:
        return len(self.boxes)


def region_descriptors(features: np.ndarray, candidates: Candidates) -> np.ndarray:
    """(P, 2C + 9) float32: L2-normalised mask-pooled features, the image's pooled features, geometry."""
    channels = features.shape[0]
    flat = features.reshape(channels, -1).astype(np.float32)
    coverage = candidates.coverage.reshape(len(candidates), -1)
    pooled = dot(coverage, flat.T) / np.maximum(coverage.sum(axis=1, keepdims=True), 1e-6)
    content = candidates.content
    whole = [content.left, content.top, content.left + content.width, content.top + content.height]
    image_cells = box_coverage(np.array([whole]), content.size, features.shape[-1]).reshape(1, -1)
    context = dot(image_cells, flat.T) / np.maximum(image_cells.sum(), 1e-6)
    return np.concatenate([
        _l2(pooled),
        np.repeat(_l2(context), len(candidates), axis=0),
        geometry(candidates.boxes, candidates.areas, candidates.content),
    ], axis=1).astype(np.float32)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def logits_of(mask: np.ndarray) -> np.ndarray:
    """A boolean square mask as +1 / -1 logits (foreground where > 0, as the model's)."""
    return np.where(mask, 1.0, -1.0).astype(np.float32)


class ProposalBaseline(Baseline):
    """Scores an image's proposals against each expression and answers with the best one.

    Subclasses say what the proposals are (``candidates``), how a proposal's overlap with
    the ground truth is measured (``overlaps``) and what the chosen proposal predicts
    (``outputs``).
    """

    region_dim_extra: ClassVar[int] = GEOMETRY_FEATURES
    scorer: ProposalScorer

    @property
    def resolution(self) -> int:
        """R: the side of the letterbox the proposals live on (a multiple of the feature grid)."""
        return self.settings.proposal_resolution(self.profile)

    def content(self, data: SplitData, image_index: int) -> Content:
        return Content.of(*data.image_size(image_index), self.resolution)

    def segments(self, data: SplitData, image_index: int) -> SegmentProposals:
        """The image's region proposals, computed once per split and shared by the baselines."""
        key = f"segments@{self.resolution}"
        store = data.cache.setdefault(key, {})
        if image_index not in store:
            settings = self.settings
            square = data.square_image(image_index, self.resolution)
            store[image_index] = segment_proposals(
                square, self.content(data, image_index), settings.felzenszwalb_scale,
                settings.felzenszwalb_min_size, settings.max_segments, sigma=settings.felzenszwalb_sigma)
        return store[image_index]

    def candidates(self, data: SplitData, image_index: int) -> Candidates:
        raise NotImplementedError

    def overlaps(self, candidates: Candidates, target: np.ndarray) -> np.ndarray:
        """(P,) overlap of each proposal with the (R, R) ground-truth mask."""
        raise NotImplementedError

    def outputs(self, data: SplitData, image_index: int, candidates: Candidates, best: np.ndarray
                ) -> dict[str, np.ndarray]:
        """``{variant: (n, R, R) logits}`` for the chosen proposal index of each pair."""
        raise NotImplementedError

    def learn(self, train: SplitData) -> None:
        settings = self.settings
        images = train.training_images(settings.max_train_images, self.seed_of("images"))
        regions, targets, best_overlap = [], [], []
        for image_index in tqdm(images, desc=f"{self.name} proposals", unit="img",
                                disable=not self.progress, leave=False):
            candidates = self.candidates(train, int(image_index))
            regions.append(region_descriptors(np.asarray(train.features[image_index], np.float32), candidates))
            overlap_of_region: dict[int, np.ndarray] = {}  # expressions of one region share its target
            for i in train.by_image[image_index].tolist():
                ann_id = train.pairs[i].ann_id
                if ann_id not in overlap_of_region:
                    overlap_of_region[ann_id] = self.overlaps(candidates, train.square_mask(i, self.resolution))
                overlap = overlap_of_region[ann_id]
                targets.append(int(np.argmax(overlap)))
                best_overlap.append(float(overlap.max()))
        # The best a perfect scorer could do with these proposals (mean over training pairs).
        self.fit_stats = {"proposals_per_image": float(np.mean([len(r) for r in regions])),
                          "best_overlap": float(np.mean(best_overlap))}
        largest = max(len(r) for r in regions)
        padded = np.zeros((len(regions), largest, regions[0].shape[1]), dtype=np.float32)
        valid = np.zeros((len(regions), largest), dtype=bool)
        for row, r in enumerate(regions):
            padded[row, : len(r)] = r
            valid[row, : len(r)] = True
        padded_t, valid_t = torch.from_numpy(padded).to(self.device), torch.from_numpy(valid).to(self.device)
        pairs_of_row = [train.by_image[i] for i in images]
        targets_of_row = np.split(np.asarray(targets, dtype=np.int64), np.cumsum([len(p) for p in pairs_of_row])[:-1])

        with seeded(self.seed, f"{self.name}/init"):
            self.scorer = ProposalScorer(self.profile, len(self.vocab), padded.shape[2], settings.hidden,
                                         settings.text_dim).to(self.device)
        optimizer = torch.optim.Adam([p for p in self.scorer.parameters() if p.requires_grad], lr=settings.lr)
        self.scorer.train()
        for rows in tqdm(image_batches(len(images), settings.batch_images, settings.iterations, self.seed_of("batches")),
                         total=settings.iterations, desc=f"{self.name} fit", unit="it",
                         disable=not self.progress, leave=False):
            # Every pair of the batch's images; each image's regions are embedded once.
            counts = torch.tensor([len(pairs_of_row[r]) for r in rows])
            image_of = torch.repeat_interleave(torch.arange(len(rows)), counts).to(self.device)
            pairs = np.concatenate([pairs_of_row[r] for r in rows])
            target = torch.from_numpy(np.concatenate([targets_of_row[r] for r in rows])).to(self.device)
            rows_t = torch.from_numpy(rows).to(self.device)
            scores = self.scorer.score_images(train.tokens[pairs].to(self.device), padded_t[rows_t], image_of)
            scores = scores.masked_fill(~valid_t[rows_t][image_of], float("-inf"))
            loss = F.cross_entropy(scores, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.scorer.eval()

    @torch.no_grad()
    def choose(self, data: SplitData, image_index: int, pairs: np.ndarray) -> tuple[Candidates, np.ndarray]:
        """The image's candidates and the best-scoring one for each pair."""
        candidates = self.candidates(data, image_index)
        regions = torch.from_numpy(region_descriptors(np.asarray(data.features[image_index], np.float32),
                                                      candidates)).to(self.device)
        tokens = data.tokens[pairs].to(self.device)
        scores = self.scorer(tokens, regions)
        return candidates, scores.argmax(dim=1).cpu().numpy()

    def predict_image(self, data: SplitData, image_index: int, pairs: np.ndarray) -> dict[str, np.ndarray]:
        candidates, best = self.choose(data, image_index, pairs)
        return self.outputs(data, image_index, candidates, best)
