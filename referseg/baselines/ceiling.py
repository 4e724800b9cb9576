"""The bottom-up ceiling: how well the best segment proposal fits each referred region.

A method that picks one of an image's proposals (classification over segmentation
proposals, SPEC 7) can do no better than the proposal that overlaps the ground truth
most. The mean of that best IoU over a split's pairs, things and stuff apart, says how
much of the task bottom-up segmentation solves before any word is read. The data chapter
measures it on SynthRef's test images in both looks (``referseg.data.synthetic.LOOKS``),
the same scenes painted flat and photographic; the baselines chapter quotes it beside the
proposal baseline's own picks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from referseg.baselines.common import BaselineSettings
from referseg.baselines.proposals import Content, segment_proposals
from referseg.config import Profile
from referseg.data.refer import Refer
from referseg.data.transforms import letterbox_image, letterbox_mask


def best_overlaps(image: np.ndarray, masks: Sequence[np.ndarray], profile: Profile,
                  settings: BaselineSettings | None = None) -> np.ndarray:
    """(M,) IoU of the best segment proposal of ``image`` with each of its (H, W) ``masks``, on the
    R x R letterbox where the proposal baselines work (their settings: Felzenszwalb and merges)."""
    settings = settings or BaselineSettings()
    side = settings.proposal_resolution(profile)
    height, width = image.shape[:2]
    square = np.clip(letterbox_image(image, side) + 0.5, 0, 255).astype(np.uint8)
    segments = segment_proposals(square, Content.of(height, width, side), settings.felzenszwalb_scale,
                                 settings.felzenszwalb_min_size, settings.max_segments,
                                 sigma=settings.felzenszwalb_sigma)
    return np.array([float(segments.overlaps(letterbox_mask(mask, side)).max()) for mask in masks])


def look_ceiling(profile: Profile, refer: Refer, split: str = "test", looks: Sequence[str] | None = None,
                 settings: BaselineSettings | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """The bottom-up ceiling of ``split``'s pairs with its images painted in each SynthRef look.

    Each image is regenerated from the profile's SynthRef seed (the same scene in every
    look; the photo look is checked to be the stored image, pixel for pixel) and its
    proposals cut; every pair counts its region's best IoU once. Returns
    ``{look: {"thing" | "stuff": {"ceiling": mean best IoU, "pairs": n, "regions": n}}}``.
    """
    from referseg.data.synthetic import LOOK, LOOKS, synthref_image

    if profile.dataset != "synthref":
        raise ValueError(f"the looks are SynthRef's; profile {profile.name!r} uses {profile.dataset!r}")
    looks = tuple(looks or LOOKS)
    pairs = refer.pairs(split)
    by_image: dict[int, dict[int, list]] = {}
    for pair in pairs:
        by_image.setdefault(pair.image_id, {}).setdefault(pair.ann_id, []).append(pair)
    best: dict[str, dict[str, list[float]]] = {look: {"thing": [], "stuff": []} for look in looks}
    regions = {"thing": 0, "stuff": 0}
    for image_id, anns in sorted(by_image.items()):
        ann_ids = sorted(anns)
        masks = [refer.load_mask(ann_id) for ann_id in ann_ids]
        kinds = ["stuff" if anns[a][0].is_stuff else "thing" for a in ann_ids]
        for kind in kinds:
            regions[kind] += 1
        for look in looks:
            _, pixels, _ = synthref_image(profile.synth_seed, image_id, look)
            if look == LOOK and not np.array_equal(pixels, refer.load_image(image_id)):
                raise ValueError(f"SynthRef image {image_id} at {profile.data_root} is not the one its seed "
                                 f"paints; delete {profile.data_root} and generate it again")
            for kind, value, ann_id in zip(kinds, best_overlaps(pixels, masks, profile, settings), ann_ids,
                                           strict=True):
                best[look][kind] += [value] * len(anns[ann_id])
    return {look: {kind: {"ceiling": float(np.mean(values)), "pairs": len(values), "regions": regions[kind]}
                   for kind, values in by_kind.items() if values}
            for look, by_kind in best.items()}
