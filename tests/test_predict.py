"""Prediction from a checkpoint: masks at the original size, files, refusals (smoke profile)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from referseg.cli import main as cli_main
from referseg.config import get_profile
from referseg.data.refer import ReferSegDataset, load_refer
from referseg.data.synthetic import generate_synthref
from referseg.features import compute_features
from referseg.predict import image_logits, predict, predict_split, predict_to_file, split_logits
from referseg.runs import Run, SplitData, load_checkpoint
from referseg.text import Vocabulary
from referseg.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A smoke SynthRef and a stage-1 then stage-2 run on it."""
    base = tmp_path_factory.mktemp("predict")
    profile = get_profile("smoke", data_root=str(base / "synthref"))
    generate_synthref(base / "synthref", seed=profile.synth_seed, images=profile.synth_images, progress=False)
    stage1 = train(profile, 1, base / "run", device="cpu", progress=False)
    stage2 = train(profile, 2, base / "run", device="cpu", progress=False)
    refer = load_refer(profile)
    image_id = refer.pairs("test")[0].image_id
    return {"profile": profile, "stage1": stage1, "stage2": stage2, "run": base / "run", "refer": refer,
            "image_path": refer.image_path(image_id), "image": refer.load_image(image_id)}


def test_load_checkpoint_returns_the_trained_model_profile_and_vocab(trained):
    model, profile, vocab = load_checkpoint(trained["stage2"])
    assert profile == trained["profile"]
    assert vocab == Vocabulary.load(trained["run"] / "vocab.txt")
    assert not model.training
    state = torch.load(trained["stage2"], weights_only=False)["model"]
    assert torch.equal(model.upsample.weight, state["upsample.weight"])


def test_predict_gives_a_boolean_mask_of_the_original_size(trained):
    model, profile, vocab = load_checkpoint(trained["stage1"])
    image = trained["image"]
    mask = predict(model, image, "sky", vocab, profile)
    assert mask.dtype == bool and mask.shape == image.shape[:2]
    # the model carries its vocabulary and profile; a path works like the array
    assert np.array_equal(predict(model, trained["image_path"], "sky"), mask)
    # the mask follows the logits: a model whose classifier bias is huge predicts everything
    with torch.no_grad():
        model.classifier[-1].bias.fill_(1e4)
    assert predict(model, image, "sky").all()


def test_predict_split_matches_single_predictions(trained):
    model, profile, vocab = load_checkpoint(trained["stage2"])
    dataset = ReferSegDataset(trained["refer"], "val", vocab, profile)
    # features from the run's float16 cache, and float32 features of the model's own backbone
    cached = list(predict_split(model, Run(trained["run"], device="cpu", progress=False).split("val"),
                                progress=False))
    direct_data = SplitData(dataset, features=compute_features(model, dataset))
    direct = list(predict_split(model, direct_data, batch_size=3, progress=False))
    assert len(cached) == len(direct) == len(dataset)
    for i in (0, len(dataset) - 1):
        single = predict(model, dataset.refer.load_image(dataset.pairs[i].image_id), dataset.pairs[i].expression)
        assert single.shape == dataset.original_mask(i).shape
        assert np.array_equal(direct[i], single)
        # float16 cached features may flip a pixel or two at the threshold
        assert np.mean(cached[i] == single) > 0.995


def test_split_logits_runs_fc6_to_fc8_once_per_image_of_a_batch(trained):
    model, _, _ = load_checkpoint(trained["stage2"])
    data = Run(trained["run"], device="cpu", progress=False).split("test")
    rows = []
    hook = model.head.register_forward_hook(lambda module, inputs, output: rows.append(len(output)))
    try:
        shared = dict(split_logits({"model": model}, data, batch_size=5, progress=False))
    finally:
        hook.remove()
    order = np.argsort(data.pair_image, kind="stable")
    batches = [order[start:start + 5] for start in range(0, len(order), 5)]
    assert rows == [len(np.unique(data.pair_image[batch])) for batch in batches]
    assert sum(rows) < len(data)  # images with several expressions: fewer maps than pairs
    with torch.no_grad():  # the per-pair forward of before: each pair's own fc6-fc8
        for batch in batches[:3]:
            per_pair = model(data.tokens[batch], features=data.image_features(data.pair_image[batch]), high_res=True)
            for row, i in enumerate(batch):
                np.testing.assert_allclose(shared[i]["model"], per_pair[row].numpy(), rtol=0, atol=1e-6)


def test_predict_split_uses_the_models_own_backbone_when_the_profile_trains_it(trained, tmp_path):
    """A backbone trained with the rest (freeze_backbone=False) is no fixed function of the image:
    its features must come from the model, not from a cache of the profile's initial backbone."""
    profile = trained["profile"].replace(backbone="slim_vgg16", backbone_weights=None, width_mult=0.25,
                                         freeze_backbone=False, cache_features=False,
                                         stage1={"iterations": 1, "lr_step": 1})
    checkpoint = train(profile, 1, tmp_path / "run", device="cpu", progress=False)
    model, _, _ = load_checkpoint(checkpoint)
    with torch.no_grad():  # as a longer training would: the backbone moves far from its initial weights
        generator = torch.Generator().manual_seed(0)
        for parameter in model.backbone.parameters():
            parameter.mul_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))
    data = Run(tmp_path / "run", device="cpu", progress=False).split("val")
    images = [data.dataset.refer.load_image(pair.image_id) for pair in data.pairs]
    logits = np.stack([image_logits(model, image, [pair.expression], data.vocab, profile)[0]
                       for image, pair in zip(images, data.pairs, strict=True)])
    with torch.no_grad():  # threshold at the median logit: masks about half full, sensitive to the features
        model.classifier[-1].bias -= float(np.median(logits))
    masks = list(predict_split(model, data, progress=False))
    for i, (image, pair) in enumerate(zip(images, data.pairs, strict=True)):
        single = predict(model, image, pair.expression)
        assert 0.05 < single.mean() < 0.95 or i > 0
        assert np.mean(masks[i] == single) > 0.995, f"pair {i}: {np.mean(masks[i] != single):.1%} of pixels differ"


def test_image_logits_scores_several_expressions_with_one_backbone_pass(trained):
    model, profile, vocab = load_checkpoint(trained["stage2"])
    image = trained["image"]
    expressions = ["sky", "the red circle on the left", "grass"]
    high = image_logits(model, image, expressions, vocab, profile)
    low = image_logits(model, image, expressions, vocab, profile, high_res=False)
    size = profile.input_size
    assert high.shape == (3, size, size) and low.shape == (3, profile.grid, profile.grid)
    for k, expression in enumerate(expressions):  # one expression at a time gives the same logits
        np.testing.assert_allclose(image_logits(model, image, [expression], vocab, profile)[0], high[k],
                                   rtol=1e-5, atol=1e-5)
    model.train()
    image_logits(model, image, ["sky"], vocab, profile)
    assert model.training, "the model's mode is restored"


def test_predict_to_file_writes_the_mask_and_an_overlay(trained, tmp_path):
    out = tmp_path / "out" / "mask.png"
    mask_png, overlay_png = predict_to_file(trained["stage2"], trained["image_path"], "sky", out, device="cpu")
    assert mask_png == out and overlay_png == tmp_path / "out" / "mask_overlay.png"
    written = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    image = trained["image"]
    assert written.shape == image.shape[:2] and set(np.unique(written)) <= {0, 255}
    model, _, _ = load_checkpoint(trained["stage2"])
    assert np.array_equal(written > 0, predict(model, image, "sky"))
    overlay = cv2.imread(str(overlay_png))
    assert overlay.shape == image.shape


def test_the_predict_command_writes_both_files(trained, tmp_path):
    out = tmp_path / "cli.png"
    code = cli_main(["predict", "--checkpoint", str(trained["stage1"]), "--image", str(trained["image_path"]),
                     "--expression", "the sky", "--out", str(out), "--device", "cpu"])
    assert code == 0 and out.is_file() and (tmp_path / "cli_overlay.png").is_file()


def test_missing_image_and_empty_expression_are_clear_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png does not exist"):
        predict_to_file(trained["stage1"], tmp_path / "nothere.png", "sky", tmp_path / "m.png", device="cpu")
    with pytest.raises(ValueError, match="empty referring expression"):
        predict_to_file(trained["stage1"], trained["image_path"], "  ", tmp_path / "m.png", device="cpu")
    model, _, _ = load_checkpoint(trained["stage1"])
    with pytest.raises(ValueError, match="empty referring expression"):
        predict(model, trained["image"], "")
    assert not (tmp_path / "m.png").exists()


def test_a_checkpoint_of_another_profile_or_vocabulary_is_refused(trained):
    other = trained["profile"].replace(name="other", d_cls=8)
    with pytest.raises(ValueError, match="profile 'smoke', not to this run's profile 'other'"):
        load_checkpoint(trained["stage1"], profile=other)
    _, _, vocab = load_checkpoint(trained["stage1"], profile=trained["profile"])
    bigger = Vocabulary(vocab.tokens + ["zebra"])
    with pytest.raises(ValueError, match=r"vocabulary of checkpoint .* \(\d+ tokens\) differs from this run's"):
        load_checkpoint(trained["stage1"], vocab=bigger)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = Path(tmp_path / "weights.pt")
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a referseg training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
