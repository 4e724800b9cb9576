"""Classification over segmentation proposals (SPEC 7): the best-scoring region proposal is the mask.

The paper scored MCG proposals; here the proposals are Felzenszwalb segments and their
greedy merges (:func:`~referseg.baselines.proposals.segment_proposals`), scored by the
shared :class:`~referseg.baselines.scoring.ProposalScorer` with mask-pooled features,
trained with the proposal of best mask IoU as the positive.
"""

from __future__ import annotations

import numpy as np

from referseg.baselines.scoring import Candidates, ProposalBaseline, logits_of
from referseg.runs import SplitData


class ProposalClassification(ProposalBaseline):
    """Scores segment proposals against the expression and predicts the best one."""

    name = "proposal-classification"
    variants = {"proposal-classification": "classification over segmentation proposals"}

    def candidates(self, data: SplitData, image_index: int) -> Candidates:
        segments = self.segments(data, image_index)
        return Candidates(self.content(data, image_index), segments.boxes(), segments.areas(),
                          segments.coverage(self.profile.grid), segments)

    def overlaps(self, candidates: Candidates, target: np.ndarray) -> np.ndarray:
        assert candidates.segments is not None
        return candidates.segments.overlaps(target)

    def outputs(self, data: SplitData, image_index: int, candidates: Candidates, best: np.ndarray
                ) -> dict[str, np.ndarray]:
        assert candidates.segments is not None
        return {"proposal-classification": np.stack([logits_of(m) for m in candidates.segments.masks(best)])}
