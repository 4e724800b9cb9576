"""The training loss of SPEC 5: weighted sigmoid cross-entropy, averaged over all output cells."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_sigmoid_ce(
    logits: torch.Tensor, labels: torch.Tensor, pos_weight: float = 1.0,
    neg_weight: float = 1.0,
) -> torch.Tensor:
    """Mean over every cell of w * BCE(sigmoid(logit), label), w = pos_weight on 1s and
    neg_weight on 0s.

    As the official ``weighed_logistic_loss``: the weight is label * (pos - neg) + neg,
    and the mean divides by the number of cells, not by the sum of the weights. Stable
    for large logits.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} differ in shape")
    labels = labels.to(logits.dtype)
    weights = labels * (pos_weight - neg_weight) + neg_weight
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weights,
                                              reduction="mean")
