"""Stage 0, the box-retrieval pretraining (SPEC 5): samples on known boxes, box features, the stage on
the smoke SynthRef, its checkpoint, and stage 1 starting from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from referseg.config import component_seed, get_profile, seeded
from referseg.data.boxes import box_iou, mask_boxes, official_box_features
from referseg.data.refer import ReferSegDataset, build_vocab, load_refer
from referseg.losses import weighted_sigmoid_ce
from referseg.model.segmenter import build_model
from referseg.pretrain import (
    TRAINED,
    box_crops,
    box_features,
    box_scores,
    box_vectors,
    build_samples,
    image_proposals,
    pretrain,
    select_samples,
    split_proposals,
)
from referseg.runs import Run, SplitData, read_checkpoint, read_log
from referseg.train import initial_model, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def smoke(synth_root):
    def make(**overrides):
        return get_profile("smoke", data_root=str(synth_root), **overrides)

    return make


@pytest.fixture(scope="module")
def stage0_run(synth_root, tmp_path_factory) -> Path:
    """A finished stage-0 smoke run with pretrain=true (30 iterations at lr 0.1: the loss visibly falls)."""
    run_dir = tmp_path_factory.mktemp("stage0") / "run"
    pretrain(learning_profile(synth_root), run_dir, device="cpu", progress=False)
    return run_dir


def learning_profile(synth_root):
    return get_profile("smoke", data_root=str(synth_root), pretrain=True,
                       stage0={"iterations": 30, "lr_step": 30, "lr": 0.1})


def split(profile, name="train") -> SplitData:
    refer = load_refer(profile)
    return SplitData(ReferSegDataset(refer, name, build_vocab(profile, refer), profile))


# --- samples: positives, negatives and 1:1 sampling on known boxes --------------------------------


def test_positives_and_negatives_of_known_boxes():
    gt = np.array([10, 10, 30, 30])  # 20 x 20
    proposals = np.array([
        [10, 10, 30, 30],  # IoU 1: positive
        [10, 10, 30, 32],  # 400 / 440 = 0.91: positive
        [12, 10, 30, 30],  # 360 / 400 = 0.9: positive
        [10, 10, 30, 40],  # 400 / 600 = 0.67: neither
        [20, 20, 40, 40],  # 100 / 700: neither
        [30, 10, 50, 30],  # touching on the right edge: IoU 0, negative
        [60, 60, 80, 80],  # disjoint: negative
        [29, 29, 31, 31],  # 1 / 403 > 1e-6: neither
    ])
    assert box_iou(proposals, gt)[3] == pytest.approx(2 / 3)
    positives, negatives = split_proposals(proposals, gt)
    assert positives.tolist() == [0, 1, 2]
    assert negatives.tolist() == [5, 6]


def test_negatives_are_subsampled_one_per_positive_with_the_component_seed():
    positives = np.stack([np.arange(5), np.arange(5)], axis=1)
    negatives = np.stack([np.arange(100, 120), np.arange(200, 220)], axis=1)
    samples, labels = select_samples(positives, negatives, seed=0)
    assert labels.tolist() == [1] * 5 + [0] * 5
    np.testing.assert_array_equal(samples[:5], positives)
    chosen = samples[5:]
    assert len({tuple(row) for row in chosen}) == 5, "without replacement"
    assert {tuple(row) for row in chosen} <= {tuple(row) for row in negatives}
    rng = np.random.default_rng(component_seed(0, "stage0/sampling"))
    np.testing.assert_array_equal(chosen, negatives[np.sort(rng.choice(20, size=5, replace=False))])
    np.testing.assert_array_equal(select_samples(positives, negatives, seed=0)[0], samples)  # repeatable
    assert not np.array_equal(select_samples(positives, negatives, seed=1)[0], samples)
    few, few_labels = select_samples(positives, negatives[:2], seed=0)  # fewer negatives than positives: all kept
    assert few_labels.tolist() == [1] * 5 + [0] * 2 and {tuple(r) for r in few[5:]} == {(100, 200), (101, 201)}


def test_samples_of_the_smoke_split_follow_the_official_rules(smoke):
    data = split(smoke())
    samples = build_samples(data, seed=0, progress=False)
    counts = samples.counts()
    assert counts["positives"] == counts["negatives"] > len(data)  # every expression has its ground-truth box
    assert set(np.unique(samples.pair)) == set(range(len(data)))
    gt_seen = np.zeros(len(data), dtype=bool)
    for k in range(len(samples)):
        pair, box = int(samples.pair[k]), samples.boxes[samples.box[k]]
        assert samples.box_image[samples.box[k]] == data.pair_image[pair], "a box of the expression's own image"
        gt = mask_boxes(data.original_mask(pair)[None])[0]
        iou = float(box_iou(box[None], gt)[0])
        if samples.label[k] == 1:
            assert iou >= 0.7
            gt_seen[pair] |= bool(np.array_equal(box, gt))
        else:
            assert iou < 1e-6
    assert gt_seen.all(), "the ground-truth box is a positive of each expression"
    height, width = data.image_size(0)
    assert len(image_proposals(height, width)) > 50
    sizes = np.array([data.image_size(int(i)) for i in samples.box_image])
    np.testing.assert_array_equal(samples.spatial, official_box_features(samples.boxes, sizes[:, 0], sizes[:, 1]))


# --- box features -------------------------------------------------------------------------------------


def test_the_official_box_feature_by_hand():
    # [10, 5, 60, 25) in a 100 x 50 image is the official inclusive [10, 5, 59, 24]
    feature = official_box_features(np.array([[10, 5, 60, 25]]), 50, 100)[0]
    x1, y1, x2, y2 = 10 * 2 / 100 - 1, 5 * 2 / 50 - 1, 59 * 2 / 100 - 1, 24 * 2 / 50 - 1
    np.testing.assert_allclose(feature, [x1, y1, x2, y2, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], atol=1e-6)
    whole = official_box_features(np.array([[0, 0, 100, 50]]), 50, 100)[0]
    np.testing.assert_allclose(whole[:4], [-1, -1, 0.98, 0.96], atol=1e-6)


def test_a_box_crop_is_the_official_slice_resized_and_normalised(smoke):
    profile = smoke()
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[10:20, 30:50] = (200, 10, 10)  # the box [30, 10, 50, 20) exactly
    crop = box_crops(image, np.array([[30, 10, 50, 20]]), 48, profile)
    assert crop.shape == (1, 3, 48, 48)
    expected = (torch.tensor([200.0, 10.0, 10.0]) - torch.tensor(profile.pixel_mean)) / torch.tensor(profile.pixel_std)
    torch.testing.assert_close(crop[0], expected[:, None, None].expand(3, 48, 48))


def test_box_vectors_at_the_fc6_size_are_the_official_fully_connected_fc6(smoke):
    """smoke: a 48 crop at stride 16 is 3 x 3 cells, fc6 is 3 x 3: unpadded, it is one fully connected layer."""
    profile = smoke()
    with seeded(0):
        model = build_model(profile, 50).eval()
        crops = torch.randn(4, 3, profile.stage0_crop, profile.stage0_crop)
    with torch.no_grad():
        pool = model.backbone(crops)
        assert pool.shape[-2:] == (profile.fc6_kernel, profile.fc6_kernel)
        head = model.head
        fc6 = F.relu(pool.flatten(1) @ head.fc6.weight.flatten(1).T + head.fc6.bias)
        fc7 = F.relu(fc6 @ head.fc7.weight.flatten(1).T + head.fc7.bias)
        fc8 = fc7 @ head.fc8.weight.flatten(1).T + head.fc8.bias
    torch.testing.assert_close(box_vectors(model, crops), fc8, rtol=1e-4, atol=1e-5)


def test_box_scores_are_the_segmenters_classifier_on_one_cell(smoke):
    """A box whose visual vector and box feature equal a cell's gets that cell's stage-1 logit."""
    profile = smoke()
    with seeded(0):
        model = build_model(profile, 50).eval()
        tokens = torch.randint(0, 50, (2, profile.seq_len))
        features = torch.randn(2, model.backbone.out_channels, profile.grid, profile.grid)
    with torch.no_grad():
        logits = model(tokens, features=features)
        visual = model.head(features)[:, :, 3, 5]
        spatial = model.spatial[:, 3, 5].expand(2, -1)
        torch.testing.assert_close(box_scores(model, tokens, visual, spatial), logits[:, 3, 5])


# --- the stage on the smoke SynthRef ----------------------------------------------------------------------


def test_stage0_lowers_its_loss_and_writes_a_safe_checkpoint(synth_root, stage0_run):
    profile = learning_profile(synth_root)
    path = stage0_run / "stage0" / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    assert state["stage"] == 0 and state["finished"] and state["iteration"] == 30
    assert set(state["model"]) and all(name.startswith(TRAINED) for name in state["model"])
    assert {"text.embedding.weight", "text.lstm.weight_ih_l0", "classifier.0.weight", "classifier.2.bias"} <= \
        set(state["model"])
    assert state["samples"]["positives"] == state["samples"]["negatives"] > 0
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["optimizer"]["state"]
    log = read_log(stage0_run / "stage0" / "log.jsonl")
    assert [r["iteration"] for r in log] == [1, 5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(r["loss"]) for r in log) and {"accuracy", "lr", "samples_per_s"} <= set(log[0])
    # over every sample, from the initial weights to stage 0's (the same box features, cached)
    run = Run(stage0_run, device="cpu", progress=False)
    data = run.split("train")
    with seeded(profile.seed):
        model = build_model(profile, len(run.vocab)).eval()
    samples = build_samples(data, profile.seed, progress=False)
    cache = run.features_dir
    files = sorted(cache.glob("train-stage0-boxes-*.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    features = box_features(model, data, samples)
    assert isinstance(features, np.memmap) and files[0].stat().st_mtime_ns == mtime, "reused, not rebuilt"
    labels = torch.from_numpy(samples.label)

    def full_loss() -> float:
        with torch.no_grad():
            scores = box_scores(model, data.tokens[samples.pair], torch.from_numpy(
                np.asarray(features[samples.box], dtype=np.float32)), torch.from_numpy(samples.spatial[samples.box]))
        return float(weighted_sigmoid_ce(scores, labels))

    before = full_loss()
    model.load_state_dict(state["model"], strict=False)
    after = full_loss()
    assert np.isfinite(before) and after < 0.95 * before


def test_stage0_resume_ends_with_the_same_weights(smoke, tmp_path):
    profile = smoke()  # 10 iterations
    straight = pretrain(profile, tmp_path / "straight", device="cpu", progress=False)
    interrupted = pretrain(profile, tmp_path / "resumed", device="cpu", progress=False, stop_after=4)
    assert read_checkpoint(interrupted)["iteration"] == 4 and not read_checkpoint(interrupted)["finished"]
    resumed = pretrain(profile, tmp_path / "resumed", device="cpu", progress=False, resume=True)
    a, b = read_checkpoint(straight)["model"], read_checkpoint(resumed)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["iteration"] for r in read_log(resumed.parent / "log.jsonl")] == [1, 5, 10]


def test_a_crop_too_small_for_fc6_is_refused(smoke, tmp_path):
    with pytest.raises(ValueError, match="stage0_crop=32: .*--set stage0_crop=48"):
        pretrain(smoke(stage0_crop=32), tmp_path / "run", device="cpu", progress=False)


# --- stage 1 from stage 0 --------------------------------------------------------------------------------------


def test_stage1_with_pretrain_starts_from_stage0s_text_and_classifier(synth_root, stage0_run, tmp_path):
    profile = learning_profile(synth_root)
    run_dir = tmp_path / "run"
    shutil.copytree(stage0_run, run_dir)
    stage0 = read_checkpoint(run_dir / "stage0" / "checkpoint.pt")["model"]
    vocab_size = len(Run(run_dir, device="cpu").vocab)
    model = initial_model(profile, 1, run_dir, vocab_size)  # what stage 1 trains from, before its first step
    with seeded(profile.seed):
        fresh = build_model(profile, vocab_size)
    for name, tensor in model.state_dict().items():
        if name.startswith(TRAINED):
            assert torch.equal(tensor, stage0[name]), f"{name} is not stage 0's"
            assert not torch.equal(tensor, fresh.state_dict()[name]) or name.endswith("bias_hh_l0")
        else:  # backbone, fc6-fc8 and deconvolution: as stage 1 builds them
            assert torch.equal(tensor, fresh.state_dict()[name]), f"{name} changed"
    # and stage 1 trains from there
    checkpoint = train(profile, 1, run_dir, device="cpu", progress=False, stop_after=2)
    assert read_checkpoint(checkpoint)["iteration"] == 2


def test_stage1_with_pretrain_and_no_stage0_is_a_clear_error(smoke, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stage 1 starts from stage 0's final checkpoint \(pretrain=true\)"
                       r".*train stage 0 first: referseg train --profile smoke --stage 0.*or set pretrain=false"):
        train(smoke(pretrain=True), 1, tmp_path / "run", device="cpu", progress=False)


def test_stage1_with_pretrain_refuses_an_unfinished_stage0(smoke, tmp_path):
    pretrain(smoke(pretrain=True), tmp_path / "run", device="cpu", progress=False, stop_after=3)
    with pytest.raises(ValueError, match="iteration 3 of 10.*--stage 0 --resume"):
        train(smoke(pretrain=True), 1, tmp_path / "run", device="cpu", progress=False)


def test_the_train_command_runs_stage0_and_explains_a_missing_one(synth_root, tmp_path, capsys):
    from referseg.cli import main as cli_main

    common = ["--profile", "smoke", "--set", f"data_root={synth_root}", "--set", "pretrain=true",
              "--set", "stage0.iterations=2", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert cli_main(["train", "--stage", "1", *common]) == 2
    assert "train stage 0 first: referseg train --profile smoke --stage 0" in capsys.readouterr().err
    assert cli_main(["train", "--stage", "0", *common]) == 0
    assert read_checkpoint(tmp_path / "run" / "stage0" / "checkpoint.pt")["finished"]
