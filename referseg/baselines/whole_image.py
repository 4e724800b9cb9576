"""Whole image (SPEC 7): every pixel is foreground, whatever the expression."""

from __future__ import annotations

import numpy as np

from referseg.baselines.common import Baseline
from referseg.runs import SplitData


class WholeImage(Baseline):
    """Predicts the whole image; a floor that measures how much of the image regions cover."""

    name = "whole-image"
    variants = {"whole-image": "whole image"}
    learns = False

    def predict_image(self, data: SplitData, image_index: int, pairs: np.ndarray) -> dict[str, np.ndarray]:
        # Positive everywhere, padding included: undoing the letterbox keeps every original pixel.
        grid = self.profile.grid
        return {"whole-image": np.ones((len(pairs), grid, grid), dtype=np.float32)}
