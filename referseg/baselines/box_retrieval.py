"""Foreground from bounding boxes (SPEC 7): retrieve a box for the expression, then (a) fill it, (b) GrabCut it.

The paper used SCRC (Hu et al., CVPR 2016) on EdgeBox proposals. Here the proposals are
sliding boxes at several scales and aspect ratios plus the boxes of the segment
proposals, scored by the shared :class:`~referseg.baselines.scoring.ProposalScorer`,
trained with the box of best IoU with the ground-truth box as the positive.
"""

from __future__ import annotations

import numpy as np

from referseg.baselines.proposals import box_coverage, box_masks, grabcut
from referseg.baselines.scoring import Candidates, ProposalBaseline, logits_of
from referseg.data.boxes import box_iou, mask_boxes, sliding_boxes, unique_boxes
from referseg.runs import SplitData


class BoxRetrieval(ProposalBaseline):
    """SCRC-style box retrieval; the box as the mask, and GrabCut initialised with the box."""

    name = "box-retrieval"
    variants = {
        "box-retrieval-box": "box retrieval (SCRC-style), box as mask",
        "box-retrieval-grabcut": "box retrieval (SCRC-style), GrabCut of the box",
    }

    def candidates(self, data: SplitData, image_index: int) -> Candidates:
        content = self.content(data, image_index)
        segments = self.segments(data, image_index)
        boxes = np.concatenate([
            sliding_boxes(content, self.settings.box_scales, self.settings.box_aspects),
            segments.boxes(),
        ])
        boxes = unique_boxes(boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])])
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float64)
        return Candidates(content, boxes, areas, box_coverage(boxes, content.size, self.profile.grid))

    def overlaps(self, candidates: Candidates, target: np.ndarray) -> np.ndarray:
        return box_iou(candidates.boxes, mask_boxes(target[None])[0])

    def outputs(self, data: SplitData, image_index: int, candidates: Candidates, best: np.ndarray
                ) -> dict[str, np.ndarray]:
        size = candidates.content.size
        chosen = np.unique(best)
        boxes = {int(b): box_masks(candidates.boxes[b][None], size)[0] for b in chosen}
        square = data.square_image(image_index, size)  # GrabCut runs on the small letterbox, for speed
        cuts = {int(b): grabcut(square, candidates.boxes[b], candidates.content, self.settings.grabcut_iterations)
                for b in chosen}
        return {
            "box-retrieval-box": np.stack([logits_of(boxes[int(b)]) for b in best]),
            "box-retrieval-grabcut": np.stack([logits_of(cuts[int(b)]) for b in best]),
        }
