"""From pixels to logits, and from logits to masks at the original size (SPEC 1, 3).

Two paths, one forward: :func:`image_logits` runs one image through the backbone once
and scores any number of expressions on it (``predict``, the figures);
:func:`split_logits` is the batched generator over a whole split, reading frozen
features from the cache (the evaluation, the ablations, ``predict_split``). The
high-resolution output serves both stages: a stage-1 model's deconvolution is still its
bilinear initialisation (SPEC 4), so one forward gives the S x S logits of either.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from referseg.config import Profile
from referseg.data.images import image_size, preprocess, read_image
from referseg.data.transforms import prediction_mask, to_rgb
from referseg.features import compute_features
from referseg.io import atomic_write_bytes
from referseg.runs import load_checkpoint
from referseg.text import Vocabulary

if TYPE_CHECKING:
    from referseg.runs import SplitData

# Images are decoded at most this large before the letterbox shrinks them to input_size:
# a 10000 x 10000 photo never needs its full-size pixels (SPEC 3 only needs input_size).
MAX_DECODE_SIDE = 2048


def encode_expressions(expressions: Sequence[str], vocab: Vocabulary, seq_len: int) -> torch.Tensor:
    """(n, T) int64 token ids, left-padded (SPEC 2)."""
    return torch.tensor([vocab.encode(e, seq_len) for e in expressions], dtype=torch.int64)


@torch.no_grad()
def image_logits(model: torch.nn.Module, image: np.ndarray, expressions: Sequence[str], vocab: Vocabulary,
                 profile: Profile, high_res: bool = True) -> np.ndarray:
    """Logits of several expressions on one image: (n, S, S), or (n, g, g) without ``high_res``.

    The image is letterboxed and normalised once (SPEC 3) and goes through the backbone and
    fc6-fc8 once.
    """
    device = next(model.parameters()).device
    tokens = encode_expressions(expressions, vocab, profile.seq_len).to(device)
    was_training = model.training
    model.eval()
    try:
        if not getattr(model, "visual_features", True):  # the words alone: the image plays no part
            return model(tokens, high_res=high_res).float().cpu().numpy()
        images = preprocess(image, profile)[None].to(device)
        visual = model.visual_map(model.backbone_features(images))  # fc6-fc8 once for the image
        image_index = torch.zeros(len(expressions), dtype=torch.int64, device=device)
        logits = model(tokens, visual=visual, image_index=image_index, high_res=high_res)
    finally:
        model.train(was_training)
    return logits.float().cpu().numpy()


@torch.no_grad()
def split_logits(models: Mapping[str, torch.nn.Module], data: SplitData, batch_size: int,
                 device: torch.device | str = "cpu", features: Mapping[str, np.ndarray] | None = None,
                 pairs: Sequence[int] | np.ndarray | None = None, progress: bool = True
                 ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(pair index, {method: S x S logits})`` for each model, in batches of pairs of neighbouring images.

    Each batch runs fc6-fc8 once per image and fuses every pair's expression with its image's map.

    Backbone features come from ``features[method]`` when given (a trained backbone's,
    see :func:`referseg.features.compute_features`), else from the split's feature cache
    (SPEC 5: frozen convolutions are a fixed function of the image).
    """
    wanted = np.arange(len(data)) if pairs is None else np.asarray(pairs, dtype=np.int64)
    order = wanted[np.argsort(data.pair_image[wanted], kind="stable")]
    for model in models.values():
        model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="ours", unit="batch", disable=not progress,
                      leave=False):
        batch = order[start:start + batch_size]
        tokens = data.tokens[batch].to(device)
        # The batch's images, once each (pairs of an image are neighbours), and each pair's row among them.
        rows, image_index = np.unique(data.pair_image[batch], return_inverse=True)
        image_index = torch.from_numpy(image_index.reshape(-1)).to(device)
        outputs = {}
        for method, model in models.items():
            if not getattr(model, "visual_features", True):  # the words alone: no features to read
                outputs[method] = model(tokens, high_res=True).float().cpu().numpy()
                continue
            if features is not None and method in features:
                inputs = torch.from_numpy(np.asarray(features[method][rows], dtype=np.float32))
            else:
                inputs = data.image_features(rows)
            visual = model.visual_map(inputs.to(device))  # fc6-fc8 once per image, not once per pair
            logits = model(tokens, visual=visual, image_index=image_index, high_res=True)
            outputs[method] = logits.float().cpu().numpy()
        for row, i in enumerate(batch.tolist()):
            yield i, {method: out[row] for method, out in outputs.items()}


@torch.no_grad()
def text_only_logits(model: torch.nn.Module, data: SplitData, batch_size: int = 256,
                     device: torch.device | str = "cpu", pairs: Sequence[int] | np.ndarray | None = None,
                     progress: bool = True, high_res: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(pair indices, S x S logits)`` (``(g, g)`` without ``high_res``) once per distinct expression
    of a split, for a model without visual features (``visual_features=False``): its prediction depends
    on the token ids alone, so the pairs that share them share it (ReferIt's 60,105 test pairs have
    32,933 distinct token sequences)."""
    if getattr(model, "visual_features", True):
        raise ValueError("text_only_logits is for a model without visual features; use split_logits")
    wanted = np.arange(len(data)) if pairs is None else np.asarray(pairs, dtype=np.int64)
    unique, inverse = np.unique(data.tokens[wanted].numpy(), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    model.eval()
    for start in tqdm(range(0, len(unique), batch_size), desc="expressions", unit="batch", disable=not progress,
                      leave=False):
        tokens = torch.from_numpy(unique[start:start + batch_size]).to(device)
        logits = model(tokens, high_res=high_res).float().cpu().numpy()
        for row, expression in enumerate(range(start, start + len(tokens))):
            yield wanted[order[bounds[expression]:bounds[expression + 1]]], logits[row]


def _check_expression(expression: object) -> None:
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"empty referring expression {expression!r}: give at least one word, e.g. 'sky'")


def predict(
    model: torch.nn.Module,
    image: np.ndarray | str | Path,
    expression: str,
    vocab: Vocabulary | None = None,
    profile: Profile | None = None,
) -> np.ndarray:
    """Boolean mask of the region ``expression`` refers to, at the image's original size."""
    _check_expression(expression)
    vocab = vocab if vocab is not None else getattr(model, "vocab", None)
    profile = profile if profile is not None else getattr(model, "profile", None)
    if vocab is None or profile is None:
        raise ValueError("predict needs the vocabulary and profile: pass them, or load the model with "
                         "load_checkpoint(), which attaches both")
    if isinstance(image, (str, Path)):
        height, width = image_size(image)
        image = read_image(image, max_side=MAX_DECODE_SIDE)
    else:
        image = to_rgb(np.asarray(image))
        height, width = image.shape[:2]
    logits = image_logits(model, image, [expression], vocab, profile)[0]
    return prediction_mask(logits, height, width, mode=profile.eval_mode)  # SPEC 1


def predict_split(model: torch.nn.Module, data: SplitData, batch_size: int | None = None,
                  progress: bool = True) -> Iterator[np.ndarray]:
    """Boolean masks at original size for every pair of a split, in the split's order."""
    profile = data.profile
    device = next(model.parameters()).device
    masks: dict[int, np.ndarray] = {}
    # A trained (unfrozen) backbone is the model's own: its features, once per image, not the cache's.
    features = None if profile.freeze_backbone else {"model": compute_features(model, data.dataset, device=device)}
    stream = split_logits({"model": model}, data, batch_size or profile.eval_batch_size, device, features,
                          progress=progress)
    following = 0
    for i, logits in stream:
        height, width = data.size(i)
        masks[i] = prediction_mask(logits["model"], height, width, mode=profile.eval_mode)
        while following in masks:
            yield masks.pop(following)
            following += 1


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
            alpha: float = 0.5) -> np.ndarray:
    """The image with the mask tinted in ``color`` and outlined; uint8 RGB."""
    out = to_rgb(image).astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, 1)
    return out


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    array = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, encoded.tobytes())


def predict_to_file(
    checkpoint: str | Path,
    image_path: str | Path,
    expression: str,
    out_png: str | Path,
    device: str = "auto",
) -> tuple[Path, Path]:
    """Write the mask (0/255 PNG at the image's size) and ``<out stem>_overlay.png`` beside it.

    The overlay is drawn on the decoded image, at most ``MAX_DECODE_SIDE`` pixels a side.
    """
    _check_expression(expression)
    out_png = Path(out_png)
    if out_png.is_dir():
        raise ValueError(f"--out {out_png} is a folder: give the mask's file name, e.g. {out_png / 'mask.png'}")
    if out_png.suffix.lower() != ".png":
        raise ValueError(f"--out {out_png}: the mask is written as PNG; give a path ending in .png")
    height, width = image_size(image_path)
    image = read_image(image_path, max_side=MAX_DECODE_SIDE)
    model, profile, vocab = load_checkpoint(checkpoint, device)
    logits = image_logits(model, image, [expression], vocab, profile)[0]
    mask = prediction_mask(logits, height, width, mode=profile.eval_mode)  # SPEC 1
    shown = prediction_mask(logits, image.shape[0], image.shape[1], mode=profile.eval_mode)
    overlay_png = out_png.with_name(f"{out_png.stem}_overlay.png")
    _write_png(out_png, mask.astype(np.uint8) * 255)
    _write_png(overlay_png, overlay(image, shown))
    print(f"mask: {out_png} ({int(mask.sum())} of {mask.size} pixels)  overlay: {overlay_png}")
    return out_png, overlay_png
