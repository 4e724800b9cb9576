"""Per-word segmentation (SPEC 7): one segmentation map per vocabulary word, combined per expression.

One FCN head on the cached frozen features (plus the model's spatial channels, SPEC 4)
has one output channel per word. A word's channel is trained with the low-resolution
masks (SPEC 5) of the training expressions that contain it. An expression's map
combines its words' maps: the mean of their logits, or their intersection (a pixel is
foreground only if every word's map says so: the minimum of the logits).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from referseg.baselines.common import Baseline, image_batches
from referseg.config import seeded
from referseg.model.language import PAD_ID
from referseg.runs import SplitData


class PerWordHead(nn.Module):
    """Features (B, C, g, g) and token ids (B, T) -> each token's word map (B, T, g, g)."""

    def __init__(self, in_channels: int, hidden: int, vocab_size: int, spatial: torch.Tensor):
        super().__init__()
        self.register_buffer("spatial", spatial, persistent=False)  # (n, g, g), SPEC 4 coordinates
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels + spatial.shape[0], hidden, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=1), nn.ReLU(),
        )
        # One 1x1 output channel per vocabulary word, looked up only for the words present.
        self.word_weight = nn.Embedding(vocab_size, hidden)
        self.word_bias = nn.Embedding(vocab_size, 1)
        nn.init.normal_(self.word_weight.weight, std=0.01)
        nn.init.zeros_(self.word_bias.weight)

    def trunk_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) backbone features -> (B, hidden, g, g) shared by every word."""
        spatial = self.spatial.expand(len(features), -1, -1, -1)
        return self.trunk(torch.cat([F.normalize(features, dim=1), spatial], dim=1))

    def word_maps(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, hidden, g, g) and (B, T) -> (B, T, g, g): each token's own output channel."""
        weight, bias = self.word_weight(tokens), self.word_bias(tokens)  # (B, T, H), (B, T, 1)
        return torch.einsum("bth,bhyx->btyx", weight, hidden) + bias[..., None]

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_maps(self.trunk_features(features), tokens)


def combine_word_maps(word_logits: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, T, g, g) word maps -> (B, g, g) expression maps: mean of logits, and intersection (minimum)."""
    is_word = (tokens != PAD_ID)[..., None, None]  # (B, T, 1, 1)
    count = is_word.sum(dim=1).clamp(min=1)
    mean = (word_logits * is_word).sum(dim=1) / count
    intersection = word_logits.masked_fill(~is_word, float("inf")).amin(dim=1)
    return {"per-word-mean": mean, "per-word-intersection": intersection}


class PerWordSegmentation(Baseline):
    """A per-word FCN head on the frozen features; two rules combine an expression's words."""

    name = "per-word"
    variants = {
        "per-word-mean": "per-word segmentation (mean of word logits)",
        "per-word-intersection": "per-word segmentation (intersection of word masks)",
    }

    head: PerWordHead

    def learn(self, train: SplitData) -> None:
        from referseg.model.segmenter import spatial_channels

        settings, profile = self.settings, self.profile
        images = train.training_images(settings.max_train_images, self.seed_of("images"))
        features = train.image_features(images).to(self.device)  # (n_img, C, g, g), float32 in memory
        pairs_of_row = [train.by_image[i] for i in images]
        labels_of_row = [torch.from_numpy(np.stack([train.lowres_label(int(i)) for i in p]).astype(np.float32))
                         for p in pairs_of_row]  # SPEC 5 low-resolution labels
        spatial = spatial_channels(profile.grid, profile.spatial_channels)  # SPEC 4
        with seeded(self.seed, f"{self.name}/init"):
            self.head = PerWordHead(features.shape[1], settings.hidden, len(self.vocab), spatial).to(self.device)
        optimizer = torch.optim.Adam([p for p in self.head.parameters() if p.requires_grad], lr=settings.lr)
        self.head.train()
        for rows in tqdm(image_batches(len(images), settings.batch_images, settings.iterations, self.seed_of("batches")),
                         total=settings.iterations, desc="per-word fit", unit="it", disable=not self.progress,
                         leave=False):
            # Every pair of the batch's images; the trunk runs once per image.
            counts = torch.tensor([len(pairs_of_row[r]) for r in rows], device=self.device)
            pairs = np.concatenate([pairs_of_row[r] for r in rows])
            tokens = train.tokens[pairs].to(self.device)
            hidden = self.head.trunk_features(features[torch.from_numpy(rows).to(self.device)])
            word_logits = self.head.word_maps(hidden.repeat_interleave(counts, dim=0), tokens)  # (B, T, g, g)
            target = torch.cat([labels_of_row[r] for r in rows]).to(self.device)[:, None].expand_as(word_logits)
            is_word = (tokens != PAD_ID)[..., None, None].expand_as(word_logits)
            loss = F.binary_cross_entropy_with_logits(word_logits[is_word], target[is_word])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.head.eval()

    @torch.no_grad()
    def predict_image(self, data: SplitData, image_index: int, pairs: np.ndarray) -> dict[str, np.ndarray]:
        size = self.profile.input_size
        hidden = self.head.trunk_features(data.image_features([image_index]).to(self.device))
        tokens = data.tokens[pairs].to(self.device)
        maps = combine_word_maps(self.head.word_maps(hidden.expand(len(pairs), -1, -1, -1), tokens), tokens)
        # Bilinear upsampling to the letterbox, as the stage-1 model's deconvolution (SPEC 4).
        return {variant: F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                .cpu().numpy() for variant, m in maps.items()}
