"""The baselines of SPEC 7: proposal geometry on hand-made cases, whole image exactly, and each learned
baseline fitting and predicting on a tiny SynthRef."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from referseg.baselines import BASELINES, build_baseline, evaluate_all, evaluate_baseline, run_baseline
from referseg.baselines.ceiling import best_overlaps, look_ceiling
from referseg.baselines.common import BaselineSettings
from referseg.baselines.per_word import combine_word_maps
from referseg.baselines.proposals import (
    Content,
    box_coverage,
    box_iou,
    box_masks,
    grabcut,
    grid_coverage,
    mask_boxes,
    mask_iou,
    segment_proposals,
    single_thread,
    sliding_boxes,
)
from referseg.config import get_profile
from referseg.metrics import evaluate_masks
from referseg.runs import Run, SplitData

FAST = BaselineSettings(iterations=15, batch_images=4, max_segments=40)


# --- proposals and GrabCut on hand-made images ---------------------------------------------------


def test_box_masks_and_mask_boxes_round_trip():
    boxes = np.array([[0, 0, 3, 2], [2, 1, 5, 5], [4, 4, 5, 5]])
    masks = box_masks(boxes, 6)
    assert masks.shape == (3, 6, 6)
    assert masks.reshape(3, -1).sum(axis=1).tolist() == [6, 12, 1]
    assert masks[1, 1:5, 2:5].all() and masks[1].sum() == 12
    np.testing.assert_array_equal(mask_boxes(masks), boxes)
    assert mask_boxes(np.zeros((1, 4, 4), bool)).tolist() == [[0, 0, 0, 0]]


def test_box_and_mask_iou_hand_computed():
    # [0,0,4,4) and [2,2,6,6): intersection 4, union 28
    assert box_iou(np.array([[0, 0, 4, 4], [0, 0, 2, 2], [10, 10, 12, 12]]), np.array([2, 2, 6, 6])) == \
        pytest.approx([4 / 28, 0.0, 0.0])
    masks = box_masks(np.array([[0, 0, 4, 4], [2, 2, 6, 6]]), 8)
    assert mask_iou(masks, masks[1]) == pytest.approx([4 / 28, 1.0])


def test_box_coverage_matches_pooled_box_masks():
    boxes = np.array([[0, 0, 16, 16], [3, 5, 13, 9], [7, 0, 8, 16]])
    np.testing.assert_allclose(box_coverage(boxes, 16, 4), grid_coverage(box_masks(boxes, 16), 4), atol=1e-6)


def test_sliding_boxes_stay_inside_the_image():
    content = Content.of(360, 480, 128)  # 96 x 128 inside a 128 square, 16 rows of padding on top
    assert (content.top, content.left, content.height, content.width) == (16, 0, 96, 128)
    boxes = sliding_boxes(content, (0.3, 0.6, 1.0), (0.5, 1.0, 2.0))
    assert len(boxes) > 10
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 128).all()
    assert (boxes[:, 1] >= 16).all() and (boxes[:, 3] <= 16 + 96).all()
    assert [0, 16, 128, 112] in boxes.tolist()  # the whole image is a proposal


def _two_shapes_image(size: int = 128):
    """A letterboxed scene: noisy green ground, a red and a blue rectangle; and their masks."""
    content = Content.of(360, 480, size)
    rng = np.random.default_rng(0)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    rows, cols = content.slices
    image[rows, cols] = np.clip(rng.normal((60, 140, 50), 12, (content.height, content.width, 3)), 0, 255)
    red, blue = np.zeros((size, size), bool), np.zeros((size, size), bool)
    red[40:70, 20:50] = True
    blue[60:95, 80:115] = True
    image[red], image[blue] = (220, 30, 30), (30, 40, 220)
    return image, content, red, blue


def test_segment_proposals_contain_each_shape():
    image, content, red, blue = _two_shapes_image()
    proposals = segment_proposals(image, content, scale=100, min_size=20, max_proposals=80)
    masks = proposals.masks()
    assert masks.shape[1:] == (128, 128) and len(proposals) == masks.shape[0] >= 3
    assert not masks[:, : content.top].any()  # nothing on the letterbox padding
    assert mask_iou(masks, red).max() > 0.9 and mask_iou(masks, blue).max() > 0.9
    # merges reach the whole image
    whole = np.zeros((128, 128), bool)
    whole[content.slices] = True
    assert mask_iou(masks, whole).max() > 0.99
    # the per-segment shortcuts equal the same measures on the full mask stack
    np.testing.assert_allclose(proposals.areas(), masks.reshape(len(masks), -1).sum(axis=1))
    np.testing.assert_allclose(proposals.overlaps(red), mask_iou(masks, red), atol=1e-6)
    np.testing.assert_array_equal(proposals.boxes(), mask_boxes(masks))
    np.testing.assert_allclose(proposals.coverage(16), grid_coverage(masks, 16), atol=1e-6)


def test_grabcut_recovers_a_shape_from_a_loose_box():
    image, content, red, _ = _two_shapes_image()
    loose = np.array([14, 34, 56, 76])  # the red square [20,40)-[50,70) with 6 px margins
    cut = grabcut(image, loose, content, iterations=2)
    assert mask_iou(cut[None], red)[0] > 0.85
    assert mask_iou(box_masks(loose[None], 128), red)[0] < 0.55  # the box alone is much worse


def test_grabcut_falls_back_to_the_box_without_background():
    image, content, _, _ = _two_shapes_image()
    whole = np.array([0, content.top, 128, content.top + content.height])
    cut = grabcut(image, whole, content, iterations=1)
    assert cut.shape == (128, 128) and cut.any()


def test_single_thread_limits_torch_and_the_blas_for_a_while_and_dot_is_a_product():
    from threadpoolctl import threadpool_info

    from referseg.baselines.proposals import dot

    before = torch.get_num_threads()
    blas_before = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    with single_thread():
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
        a, b = np.arange(12, dtype=np.float64).reshape(3, 4), np.ones((4, 2))
        product = dot(a, b)
    assert product.dtype == np.float32 and product.tolist() == [[6.0, 6.0], [22.0, 22.0], [38.0, 38.0]]
    assert torch.get_num_threads() == before
    assert [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"] == blas_before


def test_combine_word_maps_mean_and_intersection():
    pad = 0
    tokens = torch.tensor([[pad, 5, 6]])
    word_logits = torch.tensor([[[[9.0]], [[2.0]], [[-4.0]]]])  # (1, 3 tokens, 1, 1); the pad's map is ignored
    maps = combine_word_maps(word_logits, tokens)
    assert maps["per-word-mean"].item() == pytest.approx(-1.0)
    assert maps["per-word-intersection"].item() == pytest.approx(-4.0)


# --- on datasets ------------------------------------------------------------------------------------


def test_whole_image_is_exact_on_a_fixture(make_refer):
    from referseg.data.refer import Refer, ReferSegDataset
    from referseg.text import Vocabulary

    expected = make_refer("synthref", "synth")
    profile = get_profile("smoke", data_root=str(expected["root"]))
    refer = Refer(expected["root"], "synthref", "synth")
    vocab = Vocabulary.build(p.expression for p in refer.pairs("train"))
    data = SplitData(ReferSegDataset(refer, "test", vocab, profile))
    baseline = build_baseline("whole-image", profile, vocab)
    for mode in ("logits", "official"):
        masks = baseline.predict_masks(data, mode=mode)["whole-image"]
        assert len(masks) == len(data)
        for i, mask in enumerate(masks):
            assert mask.shape == data.size(i) and mask.all()
    targets = [data.original_mask(i) for i in range(len(data))]
    result = evaluate_masks(masks, targets)
    areas = np.array([t.sum() for t in targets])
    sizes = np.array([t.size for t in targets])
    assert result["overall_iou"] == pytest.approx(areas.sum() / sizes.sum())
    assert result["mean_iou"] == pytest.approx(np.mean(areas / sizes))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """A run folder (config + vocabulary, no training) on a tiny generated SynthRef."""
    from referseg.data.refer import build_vocab, load_refer

    root = tmp_path_factory.mktemp("baselines")
    profile = get_profile("smoke", data_root=str(root / "synthref"), synth_images=12)
    refer = load_refer(profile)  # generates SynthRef
    run_dir = root / "run"
    run_dir.mkdir()
    profile.save(run_dir / "config.json")
    build_vocab(profile, refer).save(run_dir / "vocab.txt")
    return run_dir


@pytest.mark.parametrize("name", ["per-word", "box-retrieval", "proposal-classification"])
def test_learned_baseline_fits_and_predicts_masks_of_the_right_sizes(smoke_run, name):
    torch.set_num_threads(1)
    run = Run(smoke_run, device="cpu", progress=False)
    baseline = build_baseline(name, run.profile, run.vocab, settings=FAST, progress=False)
    baseline.fit(run.split("train"))
    test = run.split("test")
    indices = list(range(min(len(test), 6)))
    masks = baseline.predict_masks(test, indices)
    assert set(masks) == set(baseline.variants)
    for variant, predicted in masks.items():
        assert len(predicted) == len(indices)
        for i, mask in zip(indices, predicted, strict=True):
            assert mask.dtype == bool and mask.shape == test.original_mask(i).shape, variant
    # logits for the same pairs come on a letterboxed square
    for _, logits in baseline.predict_logits(test, indices[:1]):
        for square in logits.values():
            assert square.ndim == 2 and square.shape[0] == square.shape[1]
    if name != "per-word":
        stats = baseline.fit_stats
        assert stats["proposals_per_image"] > 5 and 0 < stats["best_overlap"] <= 1


def test_run_baseline_writes_results_per_variant(smoke_run):
    summaries = run_baseline("whole-image", smoke_run, split="test", device="cpu")
    assert set(summaries) == {"whole-image"}
    assert (smoke_run / "eval" / "whole-image_test.csv").is_file()
    assert (smoke_run / "eval" / "whole-image_test.json").is_file()
    assert 0 < summaries["whole-image"]["overall_iou"] < 1


def test_evaluate_baseline_takes_a_fitted_baseline_or_a_name(smoke_run):
    run = Run(smoke_run, device="cpu", progress=False)
    by_name = evaluate_baseline(run, "whole-image", split="val", mode="official")
    fitted = build_baseline("whole-image", run.profile, run.vocab, progress=False)
    by_object = evaluate_baseline(run, fitted, split="val", mode="official")
    assert set(by_name) == set(by_object) == {"whole-image"}
    for summary in (by_name["whole-image"], by_object["whole-image"]):
        assert summary["mode"] == "official" and set(summary["by_mode"]) == {"logits", "official"}
        assert summary["samples"] == len(run.split("val"))
    assert by_name["whole-image"]["overall_iou"] == by_object["whole-image"]["overall_iou"]
    assert (smoke_run / "eval" / "whole-image_val.json").is_file()


def test_evaluate_all_makes_the_whole_table(smoke_run, tmp_path):
    import shutil

    from referseg.train import train

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("eval"))
    profile = Run(run_dir).profile.replace(stage1={"iterations": 2, "lr_step": 2})
    (run_dir / "config.json").unlink()
    train(profile, 1, run_dir, device="cpu", progress=False)
    table = evaluate_all(run_dir, split="test", device="cpu", progress=False, settings=FAST)
    labels = [label for name in BASELINES for label in build_baseline(name, profile, Run(run_dir).vocab).variants.values()]
    assert list(table.index) == labels + ["ours, low resolution"]
    assert list(table.columns) == ["P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "overall IoU", "mean IoU"]
    assert (run_dir / "eval" / "table_test.md").is_file() and (run_dir / "eval" / "table_test.csv").is_file()
    assert ((table >= 0) & (table <= 100)).all().all()
    # The book's call reuses what is current: no baseline refitted, the stage not evaluated again...
    saved = run_dir / "eval" / "ours-lowres_test.json"
    written = saved.stat().st_mtime_ns
    again = evaluate_all(run_dir, split="test", device="cpu", progress=False, settings=FAST,
                         reuse_baselines=True, reuse_models=True)
    pd.testing.assert_frame_equal(again, table)
    assert saved.stat().st_mtime_ns == written
    # ...until the checkpoint is newer than its results: then the stage is evaluated again.
    checkpoint = run_dir / "stage1" / "checkpoint.pt"
    os.utime(checkpoint, ns=(written + 10**9, written + 10**9))
    evaluate_all(run_dir, split="test", device="cpu", progress=False, settings=FAST,
                 reuse_baselines=True, reuse_models=True)
    assert saved.stat().st_mtime_ns > written


def test_unknown_baseline_lists_the_names(smoke_run):
    with pytest.raises(ValueError, match="choose one of " + ", ".join(BASELINES)):
        run_baseline("grabcut-only", smoke_run)


def test_best_overlaps_finds_a_clean_shape_and_not_noise():
    """On an image of one flat square the best proposal is that square; on pure noise no
    proposal fits a square that is not in the pixels."""
    profile = get_profile("smoke")
    image = np.full((90, 120, 3), 40, np.uint8)
    square = np.zeros((90, 120), bool)
    square[20:60, 30:80] = True
    image[square] = (220, 30, 30)
    assert best_overlaps(image, [square], profile)[0] > 0.9
    noise = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    assert best_overlaps(noise, [square], profile)[0] < 0.7


def test_look_ceiling_on_both_looks_of_a_synthref(synth_root):
    """The ceiling of each look over the same test pairs; the photo look is checked against the
    stored images, so a SynthRef that its seed does not paint is refused."""
    from referseg.data.refer import load_refer

    profile = get_profile("smoke", data_root=str(synth_root))
    refer = load_refer(profile)
    result = look_ceiling(profile, refer, "test")
    assert set(result) == {"flat", "photo"}
    pairs = refer.pairs("test")
    for look in result.values():
        assert sum(kind["pairs"] for kind in look.values()) == len(pairs)
        assert all(0 < kind["ceiling"] <= 1 for kind in look.values())
    assert result["flat"] != result["photo"]
    with pytest.raises(ValueError, match="SynthRef's"):
        look_ceiling(get_profile("text"), refer)
    other = profile.replace(synth_seed=profile.synth_seed + 1)
    with pytest.raises(ValueError, match="is not the one its seed paints"):
        look_ceiling(other, refer, "test", looks=["photo"])
