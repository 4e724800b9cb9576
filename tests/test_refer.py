"""REFER-format loading (SPEC 2): masks, splits, the missing refclef images, the restricted
unpickler, the Dataset's tensors (SPEC 3, 5), errors, and the official format."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_official_referit
from PIL import Image

from referseg.config import get_profile
from referseg.data.refer import (
    DatasetNotFoundError,
    OfficialReferIt,
    Refer,
    ReferSegDataset,
    UnsafePickleError,
    build_vocab,
    dataset_stats,
    load_refer,
    load_refs_pickle,
    stats_table,
)
from referseg.text import Vocabulary

torch.set_num_threads(1)
PROFILE = get_profile("smoke")  # input 128, stride 16: 8x8 grid


def _vocab(refer) -> Vocabulary:
    return Vocabulary.build(p.expression for p in refer.pairs("trainval"))


def _or_pool(mask: np.ndarray, grid: int) -> np.ndarray:
    """Independent OR-pooling: max over each block, written with loops."""
    block = mask.shape[0] // grid
    out = np.zeros((grid, grid), dtype=bool)
    for r in range(grid):
        for c in range(grid):
            out[r, c] = mask[r * block:(r + 1) * block, c * block:(c + 1) * block].max()
    return out


# ---------------------------------------------------------------------------- Refer


def test_refclef_rle_masks_are_decoded_exactly(refclef_data):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    for ann_id, expected in refclef_data["masks"].items():
        mask = refer.load_mask(ann_id)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, expected)  # incl. the two-part region (merged)


def test_refcoco_polygon_masks_cover_their_rectangles(refcoco_data):
    refer = Refer(refcoco_data["root"], "refcoco", "unc")
    for ann_id, parts in refcoco_data["rects"].items():
        mask = refer.load_mask(ann_id)
        image = refer.images[refer.annotations[ann_id]["image_id"]]
        assert mask.shape == (image["height"], image["width"]) and mask.dtype == bool
        inner = np.zeros_like(mask)
        outer = np.zeros_like(mask)
        for top, left, bottom, right in parts:  # rasterised polygons: exact up to the boundary pixels
            inner[top + 1:bottom - 1, left + 1:right - 1] = True
            outer[max(top - 1, 0):bottom + 1, max(left - 1, 0):right + 1] = True
        assert mask[inner].all(), f"annotation {ann_id}: interior not covered"
        assert not mask[~outer].any(), f"annotation {ann_id}: pixels outside the polygon"
    two_part = refer.load_mask(1013)
    assert two_part[4, 5] and two_part[-5, -5] and not two_part[24, 32]


def test_splits_trainval_and_python2_strings(refclef_data):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    for split in ("train", "val", "test"):
        pairs = refer.pairs(split)
        assert len(pairs) == refclef_data["pairs"][split]
        assert len({p.ann_id for p in pairs}) == refclef_data["regions"][split]
        assert len({p.image_id for p in pairs}) == refclef_data["images"][split]
        assert all(p.split == split for p in pairs)
    assert refer.pairs("trainval") == refer.pairs("train") + refer.pairs("val")
    assert refer.splits == ["train", "val", "trainval", "test"]
    expressions = {p.expression for p in refer.pairs("train")}
    assert "café sign" in expressions  # a Python 2 str decoded as latin-1
    assert all(isinstance(p.expression, str) for p in refer.pairs("trainval"))
    with pytest.raises(ValueError, match="has no split 'testA'; its splits are train, val, trainval, test"):
        refer.pairs("testA")


def test_stuff_and_thing(refclef_data, refcoco_data):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    for pair in refer.pairs("trainval") + refer.pairs("test"):
        assert pair.is_stuff == refclef_data["stuff"][pair.ann_id], pair
    assert {p.category for p in refer.pairs("test") if p.is_stuff} == {"sky-blue"}
    coco = Refer(refcoco_data["root"], "refcoco", "unc")
    assert not any(p.is_stuff for p in coco.pairs("trainval"))  # COCO objects are things


def test_missing_refclef_images_are_skipped_with_a_logged_count(refclef_data, caplog):
    caplog.set_level(logging.INFO, logger="referseg.data.refer")
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    image_ids = {p.image_id for s in ("train", "val", "test") for p in refer.pairs(s)}
    assert not image_ids & {19579, 17975, 19575}
    assert refer.skipped == {"refs": 3, "pairs": 3, "images": 3}
    assert "skipped 3 refs" in caplog.text and "19579.jpg" in caplog.text


def test_missing_image_file_is_an_error_naming_it(refclef_data):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    path = refer.image_path(104)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        refer.load_image(104)
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image file .*104.jpg"):
        refer.load_image(104)


def test_grayscale_and_rgba_images_become_rgb(refclef_data):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    for image_id in (101, 102, 103):
        image = refer.load_image(image_id)
        info = refer.images[image_id]
        assert image.shape == (info["height"], info["width"], 3) and image.dtype == np.uint8
    gray = refer.load_image(102)
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    rgba = np.asarray(Image.open(refer.image_path(103)))
    np.testing.assert_array_equal(refer.load_image(103), rgba[:, :, :3])


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path, refclef_data):
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    # Sanity: the payload really would run under a plain unpickler (in a scratch file only).
    bad = tmp_path / "bad.p"
    bad.write_bytes(pickle.dumps([{"ref_id": 1, "x": Exploit()}], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"bad\.p.*(posix|nt)\.system"):
        load_refs_pickle(bad)
    assert not sentinel.exists()

    refs_file = refclef_data["root"] / "refclef" / "refs(berkeley).p"
    shutil.copy(bad, refs_file)
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(berkeley\)\.p.*Nothing from it was executed"):
        Refer(refclef_data["root"], "refclef", "berkeley")
    assert not sentinel.exists()
    pickle.loads(bad.read_bytes())  # the plain unpickler executes it: the test's payload is real
    assert sentinel.exists()


def test_missing_dataset_folder_names_what_is_missing(tmp_path, refclef_data):
    profile = PROFILE.replace(dataset="referit", data_root=str(tmp_path / "nothing"))
    with pytest.raises(DatasetNotFoundError) as error:
        load_refer(profile)
    message = str(error.value)
    for needle in ("refclef/instances.json", "refs(berkeley).p", "images/saiapr_tc-12", "data/README.md",
                   "dead", "Expected layout"):
        assert needle in message
    (refclef_data["root"] / "refclef" / "refs(berkeley).p").unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        load_refer(profile.replace(data_root=str(refclef_data["root"])))
    assert "missing refclef/refs(berkeley).p." in str(error.value)
    assert "instances.json," not in str(error.value).split("Expected")[0]


def test_mask_image_size_mismatch_is_an_error_naming_both_sizes(refclef_data):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    dataset = ReferSegDataset(refer, "test", _vocab(refer), PROFILE)
    index = next(i for i, p in enumerate(dataset.pairs) if p.image_id == 104)
    dataset[index]  # fine before the image is replaced
    Image.fromarray(np.zeros((50, 64, 3), np.uint8)).save(refer.image_path(104))
    with pytest.raises(ValueError, match=r"48x64.*50x64"):
        dataset[index]
    # An RLE whose size differs from instances.json's image size.
    instances_file = refclef_data["root"] / "refclef" / "instances.json"
    instances = json.loads(instances_file.read_text())
    instances["images"][0]["height"] = 47
    instances_file.write_text(json.dumps(instances))
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    with pytest.raises(ValueError, match=r"mask size 48x64 differs from its image size 47x64"):
        refer.load_mask(1011)


# ---------------------------------------------------------------------------- Dataset


@pytest.mark.parametrize("dataset_name, split_by", [("refclef", "berkeley"), ("refcoco", "unc")])
def test_dataset_items(make_refer, dataset_name, split_by):
    data = make_refer(dataset_name, split_by)
    refer = Refer(data["root"], dataset_name, split_by)
    vocab = _vocab(refer)
    dataset = ReferSegDataset(refer, "trainval", vocab, PROFILE)
    size, grid = PROFILE.input_size, PROFILE.grid
    assert len(dataset) == data["pairs"]["train"] + data["pairs"]["val"]
    assert dataset.image_ids == [101, 102, 103]
    for i in range(len(dataset)):
        item = dataset[i]
        pair = dataset.pairs[i]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
        assert item["tokens"].shape == (PROFILE.seq_len,) and item["tokens"].dtype == torch.int64
        assert item["mask"].shape == (size, size) and item["mask"].dtype == torch.float32
        assert item["lowres"].shape == (grid, grid) and item["lowres"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
        np.testing.assert_array_equal(item["lowres"].numpy().astype(bool), _or_pool(item["mask"].numpy() > 0, grid))
        assert dataset.image_ids[item["image_index"]] == pair.image_id and item["index"] == i
        assert item["tokens"].tolist() == vocab.encode(pair.expression, PROFILE.seq_len)
        assert torch.equal(dataset.tokens[i], item["tokens"]) and dataset.pair_image[i] == item["image_index"]
        torch.testing.assert_close(item["image"], dataset.image_tensor(item["image_index"]))
        original = dataset.original_mask(i)
        np.testing.assert_array_equal(original, refer.load_mask(pair.ann_id))
        meta = dataset.meta(i)
        assert (meta["height"], meta["width"]) == original.shape
        assert meta["expression"] == pair.expression and meta["ann_id"] == pair.ann_id
        assert set(meta) == {"ref_id", "ann_id", "image_id", "sent_id", "height", "width", "expression",
                             "type", "category", "is_stuff"}
    assert dataset.tokens.shape == (len(dataset), PROFILE.seq_len) and dataset.tokens.dtype == torch.int64
    assert dataset.pair_image.shape == (len(dataset),) and dataset.pair_image.dtype == np.int64
    # Letterbox: image 101 is 48x64 -> 96x128 with 16 rows of padding above and below.
    item = dataset[dataset.pairs.index(next(p for p in dataset.pairs if p.image_id == 101))]
    assert item["mask"][:16].sum() == 0 and item["mask"][-16:].sum() == 0
    mean = torch.tensor(PROFILE.pixel_mean).view(3, 1)
    std = torch.tensor(PROFILE.pixel_std).view(3, 1)
    torch.testing.assert_close(item["image"][:, 0, :], ((0 - mean) / std).expand(3, size))
    # The grayscale image (102) gives three equal channels before normalisation.
    gray = dataset.image_tensor(1) * std.view(3, 1, 1) + mean.view(3, 1, 1)
    torch.testing.assert_close(gray[0], gray[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(gray[1], gray[2], atol=1e-3, rtol=0)


def test_dataset_batches_through_a_dataloader(refclef_data):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    dataset = ReferSegDataset(refer, "train", _vocab(refer), PROFILE)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, PROFILE.input_size, PROFILE.input_size)
    assert batch["tokens"].shape == (4, PROFILE.seq_len)


def test_empty_split_and_bad_expressions(refclef_data, tmp_path):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    with pytest.raises(ValueError, match=r"refclef \(berkeley\) .* has no split 'testB'"):
        ReferSegDataset(refer, "testB", _vocab(refer), PROFILE)
    official = write_official_referit(tmp_path / "official")
    (official["root"] / "referit_query_val.json").write_text("{}")  # a split without pairs
    refer = OfficialReferIt(official["root"])
    with pytest.raises(ValueError, match=r"split 'val' of ReferIt \(official format\).*no \(region, expression\) pairs"):
        ReferSegDataset(refer, "val", _vocab(refer), PROFILE)
    # An expression of unknown words encodes to <unk> with a warning; an empty one is an error.
    # Token ids are encoded once, when the dataset is built (``dataset.tokens``).
    query = official["root"] / "referit_query_test.json"
    query.write_text(json.dumps({"203_1": ["zzzq xxyq"]}))
    refer = OfficialReferIt(official["root"])
    with pytest.warns(UserWarning, match="unknown"):
        dataset = ReferSegDataset(refer, "test", Vocabulary.build(["red car"]), PROFILE)
    tokens = dataset[0]["tokens"]
    assert tokens[-2:].tolist() == [3, 3] and tokens[:-2].eq(0).all()
    assert torch.equal(dataset.tokens[0], tokens)
    query.write_text(json.dumps({"203_1": ["zzzq xxyq", "   "]}))
    refer = OfficialReferIt(official["root"])
    with pytest.raises(ValueError, match="empty referring expression"), pytest.warns(UserWarning, match="unknown"):
        ReferSegDataset(refer, "test", Vocabulary.build(["red car"]), PROFILE)


def test_build_vocab_and_dataset_stats(refclef_data, tmp_path):
    refer = Refer(refclef_data["root"], "refclef", "berkeley")
    profile = PROFILE.replace(dataset="referit", data_root=str(refclef_data["root"]), train_split="trainval")
    vocab = build_vocab(profile, refer)
    assert "café" in vocab and ", " in vocab and "tree" not in vocab
    vocab.save(tmp_path / "vocab.txt")
    assert build_vocab(profile.replace(vocab_file=str(tmp_path / "vocab.txt")), refer) == vocab
    text = dataset_stats(refclef_data["root"])  # dataset and split_by guessed
    assert text.splitlines()[0].startswith("refclef (berkeley)")
    table = stats_table(refer, vocab)
    for split in ("train", "val", "test"):
        assert table.loc[split, "images"] == refclef_data["images"][split]
        assert table.loc[split, "regions"] == refclef_data["regions"][split]
        assert table.loc[split, "pairs"] == refclef_data["pairs"][split]
    assert table.loc["trainval", "pairs"] == refclef_data["pairs"]["train"] + refclef_data["pairs"]["val"]
    assert table.loc["trainval", "pct_unknown"] == 0  # its own vocabulary knows every word
    assert table.loc["test", "len_max"] == 5  # "guy, in the middle": guy / ", " / in / the / middle
    assert 0 < table.loc["test", "pct_stuff"] < 100
    assert "skipped: 3 refs" in text


# ---------------------------------------------------------------------------- official format


@pytest.mark.parametrize("with_imsize", [False, True])
def test_official_format_fixture(tmp_path, with_imsize):
    data = write_official_referit(tmp_path / "official", with_imsize=with_imsize)
    refer = OfficialReferIt(data["root"])
    assert refer.splits == ["train", "val", "trainval", "test"]
    assert refer.pairs("trainval") == refer.pairs("train") + refer.pairs("val")
    assert [p.expression for p in refer.pairs("train")] == ["the sky", "man on the left", "left guy"]
    assert refer.images[202] == {"id": 202, "file_name": "202.jpg", "height": 64, "width": 48}
    for ann_id, expected in data["masks"].items():
        np.testing.assert_array_equal(refer.load_mask(ann_id), expected)
    assert refer.load_image(202).shape == (64, 48, 3)
    dataset = ReferSegDataset(refer, "test", Vocabulary.build(["red car", "tree , right"]), PROFILE)
    item = dataset[1]
    assert item["mask"].shape == (PROFILE.input_size,) * 2 and item["mask"].sum() > 0
    assert dataset.meta(1)["ann_id"] == 203003 and dataset.meta(1)["expression"] == "tree , right"
    # load_refer picks the official format when there is no refclef folder.
    profile = PROFILE.replace(dataset="referit", data_root=str(data["root"]))
    assert isinstance(load_refer(profile), OfficialReferIt)
    (data["root"] / "mask" / "203_3.mat").unlink()
    dataset[1]  # its letterboxed mask is cached
    with pytest.raises(FileNotFoundError, match=r"mask file .*203_3\.mat does not exist"):
        dataset.original_mask(1)


def test_official_referit_split_counts(official_referit: Path):
    """SPEC 2's table, from the official implementation's query files."""
    refer = OfficialReferIt(official_referit)
    expected = {  # split: (images, regions, pairs), SPEC 2
        "train": (8_995, 44_649, 54_134),
        "val": (1_000, 4_866, 5_842),
        "trainval": (9_995, 49_515, 59_976),
        "test": (9_994, 49_730, 60_105),
    }
    for split, (images, regions, pairs) in expected.items():
        found = refer.pairs(split)
        assert (len({p.image_id for p in found}), len({p.ann_id for p in found}), len(found)) == \
            (images, regions, pairs), split
    trainval = {(p.ann_id, p.expression) for p in refer.pairs("trainval")}
    assert trainval == {(p.ann_id, p.expression) for p in refer.pairs("train") + refer.pairs("val")}
    assert not {p.image_id for p in refer.pairs("trainval")} & {p.image_id for p in refer.pairs("test")}
    sizes = Counter((im["height"], im["width"]) for im in refer.images.values())
    assert {(360, 480), (480, 360)} <= set(sizes)  # SPEC 2: mostly 480x360 and 360x480
    test_only = OfficialReferIt(official_referit, "test")
    assert test_only.splits == ["test"] and len(test_only.pairs("test")) == 60_105


# ---------------------------------------------------------------------------- SynthRef


def test_load_refer_generates_synthref(tmp_path):
    pytest.importorskip("referseg.data.synthetic", reason="SynthRef generator not written yet")
    profile = PROFILE.replace(data_root=str(tmp_path / "synth"), synth_images=6)
    refer = load_refer(profile)
    assert (tmp_path / "synth" / "synthref" / "instances.json").is_file()
    assert refer.dataset == "synthref" and refer.pairs("train")
    pairs = refer.pairs("train")
    assert any(p.is_stuff for p in pairs) and any(not p.is_stuff for p in pairs)
    assert all(p.type for p in pairs)
    dataset = ReferSegDataset(refer, "train", build_vocab(profile, refer), profile)
    assert dataset[0]["mask"].shape == (profile.input_size, profile.input_size)
    assert "expression types" in dataset_stats(tmp_path / "synth")




def test_load_refer_refuses_a_synthref_made_with_other_settings(tmp_path):
    profile = PROFILE.replace(data_root=str(tmp_path / "synth"), synth_images=4)
    first = load_refer(profile)
    assert len(load_refer(profile).pairs("train")) == len(first.pairs("train"))  # reused as it is
    with pytest.raises(FileExistsError, match="SynthRef"):
        load_refer(profile.replace(synth_images=5))
    with pytest.raises(FileExistsError, match="SynthRef"):
        load_refer(profile.replace(synth_seed=1))
