"""The whole model of SPEC 4, top to bottom: image + expression -> segmentation logits.

    images (B,3,S,S) --backbone (frozen, SPEC 5)--> features --fc6/fc7/fc8--> visual (B,d_im,g,g)
    tokens (B,T) --embedding + LSTM--> h_T (B,d_text), tiled over the g x g grid
    [L2(text), L2(visual), spatial] --1x1 conv, ReLU, 1x1 conv--> low-res logits (B,g,g)
    --deconv (bilinear init, trained)--> high-res logits (B,S,S)

With ``visual_features=False`` (the chapter "what the words alone know") there is no backbone
and no fc6-fc8: the classifier reads [L2(text), spatial] and ``forward`` takes the tokens alone.

A logit > 0 is foreground (SPEC 1). The backbone's output is a fixed function of the
image when it is frozen, so the trainer may cache ``backbone_features`` and pass
``features=`` instead of ``images=``. fc6-fc8 (``visual_map``) depend on the image alone
too: inference computes them once per image and passes ``visual=`` and ``image_index=``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from referseg.config import Profile
from referseg.model.backbones import build_backbone, build_fc_head
from referseg.model.language import LanguageEncoder


def spatial_channels(grid: int, n: int) -> torch.Tensor:
    """The (n, grid, grid) coordinate channels of SPEC 4; x varies along the last axis.

    n=8: the official code's [xmin, ymin, xmax, ymax, xctr, yctr, 1/W, 1/H], cell edges
    in [-1, 1]; n=2: the paper's (x, y) cell centres; n=0: none (ablation).
    """
    if n not in (0, 2, 8):
        raise ValueError(f"spatial channels n={n}: "
                         "use 8 (official code), 2 (paper) or 0 (ablation)")
    # cell edges 2w/W - 1, w = 0..W
    edges = torch.arange(grid + 1, dtype=torch.float64) * 2 / grid - 1
    low, high = edges[:-1], edges[1:]
    centre = (low + high) / 2
    ones = torch.ones(grid, grid, dtype=torch.float64)

    def along_x(values: torch.Tensor) -> torch.Tensor:
        return values[None, :] * ones

    def along_y(values: torch.Tensor) -> torch.Tensor:
        return values[:, None] * ones

    if n == 8:
        channels = [along_x(low), along_y(low), along_x(high), along_y(high),
                    along_x(centre), along_y(centre), ones / grid, ones / grid]
    elif n == 2:
        channels = [along_x(centre), along_y(centre)]
    else:
        return torch.zeros(0, grid, grid)
    return torch.stack(channels).float()


def bilinear_kernel(stride: int) -> torch.Tensor:
    """(2s, 2s) bilinear upsampling kernel outer(f, f), f = [0, 1/s, ..., 1, ..., 1/s]
    (SPEC 4)."""
    k = torch.arange(2 * stride, dtype=torch.float64)
    f = 1 - (k - stride).abs() / stride  # peak 1 at index s
    return torch.outer(f, f).float()


def bilinear_upsampling(upsample: nn.ConvTranspose2d, grid: int) -> np.ndarray | None:
    """The (S, grid) matrix U with ``upsample(Z) == U @ Z @ U.T`` while the deconvolution is its bilinear
    initialisation (SPEC 4; a stage-1 model's is, only stage 2 trains it), else None. Column i is the
    hat of cell i: 1 at pixel s * i + s / 2, falling to 0 one stride away (linear interpolation)."""
    stride, pad = upsample.stride[0], upsample.padding[0]
    kernel = upsample.weight.detach()[0, 0].cpu()
    if upsample.weight.shape[:2] != (1, 1) or pad != stride // 2 or not torch.equal(kernel, bilinear_kernel(stride)):
        return None
    taps = np.arange(grid * stride)[:, None] + pad - stride * np.arange(grid)[None, :]  # kernel index of (y, i)
    f = bilinear_kernel(stride)[stride].numpy()  # the kernel's middle row: f itself
    return np.where((taps >= 0) & (taps < len(f)), f[taps.clip(0, len(f) - 1)], 0.0).astype(np.float32)


class Segmenter(nn.Module):
    """Hu et al. (2016): segmentation logits from an image and a referring expression (SPEC 4)."""

    def __init__(self, profile: Profile, vocab_size: int):
        super().__init__()
        self.profile = profile
        self.visual_features = profile.visual_features
        self.frozen_backbone = profile.freeze_backbone and self.visual_features
        # Visual features (SPEC 4): convolutions, frozen in SPEC 5, then trained fc6-fc8. Without them
        # (visual_features=False) neither exists: the classifier reads the expression and the cell's place.
        self.backbone: nn.Module | None = build_backbone(profile) if self.visual_features else None
        self.head: nn.Module | None = None
        if self.backbone is not None:
            if self.backbone.stride != profile.stride:
                raise ValueError(
                    f"backbone {profile.backbone!r} has stride {self.backbone.stride} but the profile says "
                    f"stride={profile.stride}; set stride={self.backbone.stride} in the profile"
                )
            if self.frozen_backbone:
                self.backbone.requires_grad_(False)
                self.backbone.eval()
            self.head = build_fc_head(profile, self.backbone.out_channels)
        # Language (SPEC 4): embedding + LSTM, final hidden state.
        self.text = LanguageEncoder(profile, vocab_size)
        # Spatial channels (SPEC 4): a constant, rebuilt from the profile, so not saved.
        self.register_buffer(
            "spatial", spatial_channels(profile.grid, profile.spatial_channels), persistent=False
        )
        # Classifier (SPEC 4): 1x1 conv (d_text + d_im + n) -> d_cls, ReLU, 1x1 conv -> 1 logit.
        fused_channels = profile.d_text + profile.d_im * self.visual_features + profile.spatial_channels
        self.classifier = nn.Sequential(
            nn.Conv2d(fused_channels, profile.d_cls, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(profile.d_cls, 1, kernel_size=1),
        )
        if profile.init == "official":  # SPEC 4: N(0, 0.05) and N(0, 0.1), zero biases
            for layer, std in ((self.classifier[0], 0.05), (self.classifier[2], 0.1)):
                nn.init.normal_(layer.weight, 0.0, std)
                nn.init.zeros_(layer.bias)
        # Upsampling (SPEC 4): 2s x 2s transposed conv, stride s, no bias, bilinear init, trained.
        s = profile.stride
        self.upsample = nn.ConvTranspose2d(1, 1, 2 * s, stride=s, padding=s // 2, bias=False)
        with torch.no_grad():
            self.upsample.weight.copy_(bilinear_kernel(s))

    def train(self, mode: bool = True) -> Segmenter:
        """As nn.Module.train, but a frozen backbone stays in eval mode (fixed features, SPEC 5)."""
        super().train(mode)
        if self.frozen_backbone and self.backbone is not None:
            self.backbone.eval()
        return self

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> backbone features: what the trainer may cache."""
        if self.backbone is None:
            raise ValueError("this model has no visual features (visual_features=False): it needs no images")
        if self.frozen_backbone:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def visual_map(self, features: torch.Tensor) -> torch.Tensor:
        """fc6-fc8 of backbone features: (n, d_im, g, g), one map per image.

        It depends on the image alone, so an image with several expressions needs it once:
        pass it to :meth:`forward` as ``visual=`` with ``image_index=`` (each expression's row).
        """
        visual = self.head(features)
        height, width = visual.shape[2:]
        if (height, width) != tuple(self.spatial.shape[1:]):
            grid = self.spatial.shape[1]
            raise ValueError(
                f"visual feature map is {height}x{width} but the profile's grid is "
                f"{grid}x{grid}; feed {self.profile.input_size}x{self.profile.input_size} "
                f"images (profile {self.profile.name!r})"
            )
        return visual

    def forward(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        high_res: bool = False,
        visual: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, g, g), or (B, S, S) when ``high_res``.

        Give exactly one of images, features or visual (none to a model without visual
        features: the tokens are then all it reads). ``visual`` is :meth:`visual_map` of
        some images; ``image_index`` (B,) picks each expression's image among them
        (default: one image per expression, in order).
        """
        given = sum(x is not None for x in (images, features, visual))
        if not self.visual_features:
            if given:
                raise ValueError("this model has no visual features: give the tokens only")
        elif given != 1:
            raise ValueError("give exactly one of images=, features=, visual=")
        elif visual is None:
            if features is None:
                features = self.backbone_features(images)
            visual = self.visual_map(features)  # fc6-fc8: (B, d_im, g, g)
        elif image_index is not None:
            visual = visual[image_index]  # each expression's image: (B, d_im, g, g)
        text = self.text(tokens)  # h_T: (B, d_text)
        logits = self.classify(text, visual, self.spatial)  # (B, 1, g, g)
        if high_res:
            logits = self.upsample(logits)  # (B, 1, S, S)
        return logits[:, 0]

    def classify(self, text: torch.Tensor, visual: torch.Tensor | None,
                 spatial: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, h, w) of the fused ``[L2(text) tiled, L2(visual), spatial]``.

        ``text`` is (B, d_text), ``visual`` (B, d_im, h, w) or None (no visual features),
        ``spatial`` (n, h, w) or (B, n, h, w) (SPEC 4). Stage 0 (SPEC 5) calls it on 1 x 1
        maps, one per box, so the box classifier is this one.
        """
        batch, (height, width) = len(text), spatial.shape[-2:]
        if self.profile.l2_normalize:  # SPEC 4: each vector on its own, per position
            text = F.normalize(text, dim=1)
            visual = F.normalize(visual, dim=1) if visual is not None else None
        # tile the text vector over the grid
        text_map = text[:, :, None, None].expand(-1, -1, height, width)
        spatial = spatial.expand(batch, -1, height, width)  # not normalised (SPEC 4)
        parts = [text_map, spatial] if visual is None else [text_map, visual, spatial]
        return self.classifier(torch.cat(parts, dim=1))


def build_model(profile: Profile, vocab_size: int) -> Segmenter:
    """The model a profile describes, for a vocabulary of ``vocab_size`` tokens."""
    return Segmenter(profile, vocab_size)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """SGD parameter groups: weight decay on trainable weights only, not biases nor embeddings (SPEC 5)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue  # frozen backbone: not optimised at all
        if param.ndim >= 2 and id(param) not in embeddings:
            decay.append(param)  # conv / LSTM / deconv weights
        else:
            no_decay.append(param)  # biases (1-d) and the word embedding
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
