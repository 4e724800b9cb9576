"""Segment one image with one expression: load a checkpoint, letterbox in, mask out.

The high-resolution output serves both stages: a stage-1 model's deconvolution is
still its bilinear initialisation (SPEC 4), so one forward pass gives the S x S
logits, which are mapped back to the image's original size (SPEC 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from referseg.config import Profile
from referseg.data.transforms import letterbox_image, normalize, prediction_mask, to_rgb
from referseg.io import atomic_write_bytes
from referseg.text import Vocabulary
from referseg.train import check_profile, check_vocab, read_checkpoint, resolve_device


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    profile: Profile | None = None,
    vocab: Vocabulary | None = None,
) -> tuple[torch.nn.Module, Profile, Vocabulary]:
    """The model, profile and vocabulary of a training checkpoint, in eval mode.

    With ``profile`` or ``vocab`` given, a checkpoint made with another profile or an
    incompatible vocabulary is refused with a message naming both.
    """
    from referseg.model.segmenter import build_model

    path = Path(path)
    device = resolve_device(device)
    state = read_checkpoint(path, "cpu")
    for key in ("model", "profile", "vocab"):
        if key not in state:
            raise ValueError(f"{path} is not a referseg training checkpoint (no {key!r} entry)")
    saved_profile = Profile.from_dict(state["profile"])
    saved_vocab = Vocabulary(state["vocab"])
    if profile is not None:
        check_profile(state["profile"], profile, f"checkpoint {path}")
    if vocab is not None:
        check_vocab(saved_vocab, vocab, f"checkpoint {path}")
    model = build_model(saved_profile, len(saved_vocab))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    model.vocab = saved_vocab  # so predict() needs only the model
    model.profile = saved_profile
    return model, saved_profile, saved_vocab


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB; a missing or unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read image {path}: not an image format OpenCV knows (use PNG or JPEG)")
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code)
    return to_rgb(image, str(path))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, image: np.ndarray, expression: str,
                   vocab: Vocabulary, profile: Profile) -> np.ndarray:
    """The S x S high-resolution logits of one letterboxed image and expression."""
    device = next(model.parameters()).device
    square = letterbox_image(to_rgb(image), profile.input_size)  # SPEC 3
    images = normalize(square, profile.pixel_mean, profile.pixel_std)[None].to(device)
    tokens = torch.tensor([vocab.encode(expression, profile.seq_len)], dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(tokens, images=images, high_res=True)
    finally:
        model.train(was_training)
    return logits[0].float().cpu().numpy()


def predict(
    model: torch.nn.Module,
    image: np.ndarray | str | Path,
    expression: str,
    vocab: Vocabulary | None = None,
    profile: Profile | None = None,
) -> np.ndarray:
    """Boolean mask of the region ``expression`` refers to, at the image's original size."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"empty referring expression {expression!r}: give at least one word, e.g. 'sky'")
    vocab = vocab if vocab is not None else getattr(model, "vocab", None)
    profile = profile if profile is not None else getattr(model, "profile", None)
    if vocab is None or profile is None:
        raise ValueError("predict needs the vocabulary and profile: pass them, or load the model with "
                         "load_checkpoint(), which attaches both")
    if isinstance(image, (str, Path)):
        image = read_image(image)
    image = to_rgb(np.asarray(image))
    logits = predict_logits(model, image, expression, vocab, profile)
    return prediction_mask(logits, image.shape[0], image.shape[1], mode=profile.eval_mode)  # SPEC 1


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    dataset: Any,
    profile: Profile,
    cache_folder: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """Boolean masks at original size for every pair of a ReferSegDataset, in order.

    With a frozen backbone and ``cache_folder`` (e.g. ``run_dir / "features"``) the
    backbone features come from the feature cache; otherwise images go through the model.
    """
    from referseg.features import FeatureCache

    device = next(model.parameters()).device
    batch_size = batch_size or profile.eval_batch_size
    was_training = model.training
    model.eval()
    cache = None
    if cache_folder is not None and profile.freeze_backbone:
        cache = FeatureCache(model, dataset, profile, cache_folder, device=device, progress=progress).load()
    image_row = {image_id: row for row, image_id in enumerate(dataset.image_ids)}
    vocab = dataset.vocab
    try:
        for start in tqdm(range(0, len(dataset.pairs), batch_size), desc=f"predict {dataset.split}",
                          unit="batch", disable=not progress):
            pairs = dataset.pairs[start : start + batch_size]
            tokens = torch.tensor([vocab.encode(p.expression, profile.seq_len) for p in pairs],
                                  dtype=torch.int64, device=device)
            rows = np.array([image_row[p.image_id] for p in pairs])
            if cache is not None:
                features = torch.from_numpy(np.asarray(cache[rows], dtype=np.float32)).to(device)
                logits = model(tokens, features=features, high_res=True)
            else:
                images = torch.stack([dataset.image_tensor(int(r)) for r in rows]).to(device)
                logits = model(tokens, images=images, high_res=True)
            logits = logits.float().cpu().numpy()
            for index, square in enumerate(logits, start=start):
                meta = dataset.meta(index)
                yield prediction_mask(square, meta["height"], meta["width"], mode=profile.eval_mode)
    finally:
        model.train(was_training)


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
    """Write the mask (0/255 PNG at the image's size) and ``<out stem>_overlay.png`` beside it."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"empty referring expression {expression!r}: give at least one word, e.g. 'sky'")
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise ValueError(f"--out {out_png}: the mask is written as PNG; give a path ending in .png")
    image = read_image(image_path)
    model, profile, vocab = load_checkpoint(checkpoint, device)
    mask = predict(model, image, expression, vocab, profile)
    overlay_png = out_png.with_name(f"{out_png.stem}_overlay.png")
    _write_png(out_png, mask.astype(np.uint8) * 255)
    _write_png(overlay_png, overlay(image, mask))
    print(f"mask: {out_png} ({int(mask.sum())} of {mask.size} pixels)  overlay: {overlay_png}")
    return out_png, overlay_png
