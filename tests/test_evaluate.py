"""The evaluation protocol of SPEC 1: metrics on hand-computed cases, modes, and run evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from referseg.metrics import evaluate_masks, summarize


def _mask(shape, *boxes):
    m = np.zeros(shape, dtype=bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_two_pairs_of_different_sizes():
    # pair 0 (4x4): prediction rows 0-1 (8 px), target rows 1-2 (8 px): I = 4, U = 12, IoU 1/3
    # pair 1 (3x5): prediction 3 px, target 5 px containing it: I = 3, U = 5, IoU 0.6
    p0, t0 = _mask((4, 4), (0, 2, 0, 4)), _mask((4, 4), (1, 3, 0, 4))
    p1, t1 = _mask((3, 5), (0, 1, 0, 3)), _mask((3, 5), (0, 1, 0, 5))
    result = evaluate_masks([p0, p1], [t0, t1])
    assert result["intersections"].tolist() == [4, 3]
    assert result["unions"].tolist() == [12, 5]
    assert result["overall_iou"] == pytest.approx(7 / 17)
    assert result["mean_iou"] == pytest.approx((1 / 3 + 0.6) / 2)
    assert result["precision@0.5"] == pytest.approx(0.5)
    assert result["precision@0.6"] == pytest.approx(0.5)  # IoU exactly 0.6 counts (>=)
    assert result["precision@0.7"] == 0.0
    assert result["precision@0.9"] == 0.0


def test_perfect_prediction_scores_one_everywhere():
    target = _mask((6, 7), (1, 4, 2, 6))
    result = evaluate_masks([target.copy()], [target])
    assert result["overall_iou"] == 1.0 and result["mean_iou"] == 1.0
    assert all(result[f"precision@{t}"] == 1.0 for t in (0.5, 0.6, 0.7, 0.8, 0.9))


def test_empty_masks():
    empty = np.zeros((5, 5), dtype=bool)
    target = _mask((5, 5), (0, 2, 0, 2))  # 4 pixels
    # (empty, empty): U = 0 -> IoU 1; (empty, target): I 0, U 4 -> IoU 0; (target, empty): IoU 0
    result = evaluate_masks([empty, empty, target], [empty, target, empty])
    assert result["intersections"].tolist() == [0, 0, 0]
    assert result["unions"].tolist() == [0, 4, 4]
    assert result["mean_iou"] == pytest.approx(1 / 3)
    assert result["overall_iou"] == 0.0
    assert result["precision@0.9"] == pytest.approx(1 / 3)
    # only empty pairs: everything is perfect
    only_empty = evaluate_masks([empty], [empty])
    assert only_empty["overall_iou"] == 1.0 and only_empty["precision@0.9"] == 1.0


def test_overall_iou_weights_large_regions_mean_iou_does_not():
    big_t = _mask((10, 10), (0, 10, 0, 10))
    big_p = _mask((10, 10), (0, 9, 0, 10))  # 90 / 100
    small_t = _mask((10, 10), (0, 1, 0, 2))
    small_p = _mask((10, 10), (5, 6, 5, 7))  # 0 / 4
    result = evaluate_masks([big_p, small_p], [big_t, small_t])
    assert result["overall_iou"] == pytest.approx(90 / 104)
    assert result["mean_iou"] == pytest.approx(0.45)


def test_non_boolean_inputs_are_read_as_masks():
    result = evaluate_masks([np.array([[0, 2], [0, 0]])], [np.array([[1.0, 1.0], [0.0, 0.0]])])
    assert result["intersections"].tolist() == [1] and result["unions"].tolist() == [2]


def test_different_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        evaluate_masks([np.zeros((2, 2), bool)] * 2, [np.zeros((2, 2), bool)])


def test_shape_mismatch_names_the_index_and_both_shapes():
    good = np.zeros((3, 3), dtype=bool)
    with pytest.raises(ValueError, match=r"pair 1: prediction shape \(4, 3\) differs from target shape \(3, 4\)"):
        evaluate_masks([good, np.zeros((4, 3), bool)], [good, np.zeros((3, 4), bool)])


def test_summarize_rejects_no_samples():
    with pytest.raises(ValueError, match="no samples"):
        summarize([], [])


def test_overall_iou_follows_summarize_when_every_union_is_empty():
    from referseg.metrics import overall_iou

    assert float(overall_iou([0, 0], [0, 0])) == 1.0 == summarize([0, 0], [0, 0])["overall_iou"]
    assert float(overall_iou([4, 3], [12, 5])) == pytest.approx(7 / 17) == summarize([4, 3], [12, 5])["overall_iou"]
    # (runs, samples): one overall IoU per run, along the last axis
    per_run = overall_iou(np.array([[4, 3], [0, 0]]), np.array([[12, 5], [0, 0]]))
    assert per_run.tolist() == pytest.approx([7 / 17, 1.0])
    # the columns of a per-sample CSV, as the notebooks pass them
    import pandas as pd

    frame = pd.DataFrame({"intersection": [4, 3], "union": [12, 5]})
    assert float(overall_iou(frame["intersection"], frame["union"])) == pytest.approx(7 / 17)


# --- the two evaluation modes on a real letterboxed case (SPEC 1) --------------------------------


def test_official_mode_dilates_the_logits_mode_prediction(smoke_trained_run):
    """Undoing the letterbox on the 0/1 map (official) keeps every pixel the logits mode keeps, and more."""
    import cv2

    from referseg.data.transforms import letterbox_mask, prediction_mask
    from referseg.runs import Run

    run = Run(smoke_trained_run, device="cpu", progress=False)
    data = run.split("test")
    size = run.profile.input_size
    grown = 0
    for i in range(min(len(data), 5)):
        target = data.original_mask(i)  # a real SynthRef region at its original size (e.g. 360 x 480)
        height, width = target.shape
        # smooth logits: positive inside the letterboxed region, negative outside, like a network's
        square = cv2.GaussianBlur(np.where(letterbox_mask(target, size), 4.0, -4.0).astype(np.float32), (5, 5), 1.5)
        by_logits = prediction_mask(square, height, width, "logits")
        official = prediction_mask(square, height, width, "official")
        assert by_logits.shape == official.shape == (height, width)
        assert not (by_logits & ~official).any()  # official contains the logits-mode mask
        assert official.sum() >= by_logits.sum()
        grown += int(official.sum() - by_logits.sum())
        # about one letterbox pixel of dilation: the extra pixels lie within one letterbox pixel
        # (max(h, w) / S original pixels) of the logits-mode mask
        reach = int(np.ceil(max(height, width) / size)) + 1
        near = cv2.dilate(by_logits.astype(np.uint8), np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)).astype(bool)
        assert not (official & ~near).any()
    assert grown > 0


# --- evaluating a run folder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_trained_run(tmp_path_factory):
    """A smoke run trained for a few iterations of both stages on a tiny generated SynthRef."""
    import torch

    from referseg.config import get_profile
    from referseg.train import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    profile = get_profile("smoke", data_root=str(root / "synthref"), synth_images=12, checkpoint_every=4,
                          stage1={"iterations": 4, "lr_step": 4}, stage2={"iterations": 2, "lr_step": 2})
    run_dir = root / "run"
    train(profile, 1, run_dir, device="cpu", progress=False)
    train(profile, 2, run_dir, device="cpu", progress=False)
    return run_dir


def test_evaluate_run_writes_per_sample_csv_and_summary_json(smoke_trained_run, capsys):
    import json

    import pandas as pd

    from referseg.evaluate import evaluate_run
    from referseg.predict import predict
    from referseg.runs import load_checkpoint

    table = evaluate_run(smoke_trained_run, split="test", device="cpu", progress=False)
    assert list(table.index) == ["ours, low resolution", "ours, high resolution"]
    assert list(table.columns) == ["P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "overall IoU", "mean IoU"]
    assert "ours, high resolution" in capsys.readouterr().out
    eval_dir = smoke_trained_run / "eval"
    for method in ("ours-lowres", "ours-highres"):
        frame = pd.read_csv(eval_dir / f"{method}_test.csv")
        summary = json.loads((eval_dir / f"{method}_test.json").read_text())
        assert summary["samples"] == len(frame) > 0 and summary["mode"] == "logits"
        for column in ("ref_id", "ann_id", "image_id", "sent_id", "expression", "type", "region",
                       "intersection", "union", "iou", "intersection_official", "union_official"):
            assert column in frame.columns
        assert set(frame["region"]) <= {"stuff", "thing"}
        assert (frame["intersection"] <= frame["union"]).all()
        # the summary is the metric of the per-sample counts, and the table shows it in percent
        recomputed = frame["intersection"].sum() / frame["union"].sum()
        assert summary["overall_iou"] == pytest.approx(recomputed)
        assert table.loc[summary["label"], "overall IoU"] == pytest.approx(100 * recomputed, abs=0.01)
        assert set(summary["by_mode"]) == {"logits", "official"}
        # official mode's prediction contains the logits mode's, so neither I nor U can shrink
        assert (frame["intersection_official"] >= frame["intersection"]).all()
        assert (frame["union_official"] >= frame["union"]).all()
    # the evaluation path agrees with predicting one pair from its image (features cached as float16)
    frame = pd.read_csv(eval_dir / "ours-highres_test.csv")
    model, profile, vocab = load_checkpoint(smoke_trained_run / "stage2" / "checkpoint.pt")
    from referseg.runs import Run

    data = Run(smoke_trained_run, device="cpu", progress=False).split("test")
    for i in range(3):
        image = data.dataset.refer.load_image(data.pairs[i].image_id)
        mask = predict(model, image, data.pairs[i].expression, vocab, profile)
        target = data.original_mask(i)
        inter, union = int((mask & target).sum()), int((mask | target).sum())
        assert abs(inter - frame.loc[i, "intersection"]) <= 0.02 * max(union, 1) + 2
        assert abs(union - frame.loc[i, "union"]) <= 0.02 * max(union, 1) + 2


def test_evaluate_models_evaluates_only_the_stages_and_modes_asked_for(smoke_trained_run, tmp_path):
    import shutil

    from referseg.evaluate import evaluate_models
    from referseg.runs import Run

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_trained_run, run_dir, symlinks=True, ignore=shutil.ignore_patterns("eval"))
    run = Run(run_dir, device="cpu", progress=False)
    summaries = evaluate_models(run, "test", stages=(1,), modes=("logits",))
    assert list(summaries) == ["ours-lowres"]
    assert set(summaries["ours-lowres"]["by_mode"]) == {"logits"}
    assert sorted(p.name for p in run.eval_dir.iterdir()) == ["ours-lowres_test.csv", "ours-lowres_test.json"]


def test_a_run_without_checkpoint_says_which_stage_to_train(tmp_path, capsys):
    from referseg.cli import main
    from referseg.config import get_profile
    from referseg.evaluate import evaluate_run

    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    get_profile("smoke").save(run_dir / "config.json")
    with pytest.raises(FileNotFoundError, match=r"referseg train --profile smoke --stage 1"):
        evaluate_run(run_dir)
    assert main(["evaluate", "--run", str(tmp_path / "nothing-here")]) == 2
    assert "referseg train --profile cpu --stage 1" in capsys.readouterr().err
