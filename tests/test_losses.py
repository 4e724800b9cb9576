"""The SPEC 5 loss against values computed by hand with math.log."""

from __future__ import annotations

import math

import pytest
import torch

from referseg.losses import weighted_sigmoid_ce


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Per-cell cross-entropy by hand: label 1 -> -log sigmoid(x) = log(1 + e^-x); label 0 -> log(1 + e^x).
LOGITS = [[0.0, 2.0], [-1.0, 0.5]]
LABELS = [[1.0, 0.0], [1.0, 0.0]]
CE = [softplus(-0.0), softplus(2.0), softplus(1.0), softplus(0.5)]


def test_unweighted_is_the_mean_cross_entropy():
    loss = weighted_sigmoid_ce(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert loss.item() == pytest.approx(sum(CE) / 4, rel=1e-6)
    assert loss.item() == pytest.approx((math.log(2) + 2.126928 + 1.313262 + 0.974077) / 4, rel=1e-5)


def test_pos_and_neg_weights_scale_their_cells_and_divide_by_the_cell_count():
    pos, neg = 2.0, 1 / 3  # stage 2 uses 1 : 1/3 (SPEC 5)
    loss = weighted_sigmoid_ce(torch.tensor(LOGITS), torch.tensor(LABELS), pos_weight=pos, neg_weight=neg)
    expected = (pos * CE[0] + neg * CE[1] + pos * CE[2] + neg * CE[3]) / 4  # not / sum of weights
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_labels_may_be_any_dtype_and_shape_must_match():
    bool_labels = torch.tensor(LABELS).bool()
    assert weighted_sigmoid_ce(torch.tensor(LOGITS), bool_labels).item() == pytest.approx(
        sum(CE) / 4, rel=1e-6
    )
    with pytest.raises(ValueError, match="shape"):
        weighted_sigmoid_ce(torch.zeros(2, 2), torch.zeros(4))


def test_stable_at_large_logits():
    logits = torch.tensor([1000.0, -1000.0, 1000.0, -1000.0], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])  # two right with certainty, two wrong with certainty
    loss = weighted_sigmoid_ce(logits, labels)
    assert loss.item() == pytest.approx((0 + 0 + 1000 + 1000) / 4)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # d/dx of mean CE = (sigmoid(x) - y) / N: 0 where right, +-1/4 where wrong.
    assert logits.grad.tolist() == pytest.approx([0.0, 0.0, 0.25, -0.25])
