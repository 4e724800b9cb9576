"""Shared fixtures: tiny REFER-format datasets built with pycocotools and Pillow, and the
official ReferIt files from ``../shared`` (skipped with a reason when absent).

Builders are plain functions (``write_refer_dataset``, ``write_official_referit``) exposed
through factory fixtures, so any test can lay a dataset out in its own ``tmp_path``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

OFFICIAL_REFERIT = Path(__file__).resolve().parents[2] / "shared" / "data" / "referit-official"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models gain nothing from threads, and on a busy machine extra
    threads only spin. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """A smoke-profile SynthRef, generated once per test module."""
    from referseg.config import get_profile
    from referseg.data.synthetic import generate_synthref

    root = tmp_path_factory.mktemp("synthref") / "smoke"
    profile = get_profile("smoke")
    generate_synthref(root, seed=profile.synth_seed, images=profile.synth_images, progress=False)
    return root


@pytest.fixture(scope="session")
def official_referit() -> Path:
    """The official implementation's ReferIt expressions and splits (no images), or a skip."""
    if not (OFFICIAL_REFERIT / "referit_query_test.json").is_file():
        pytest.skip(f"official ReferIt files not found at {OFFICIAL_REFERIT} (../shared is absent)")
    return OFFICIAL_REFERIT


# ---------------------------------------------------------------------------- Python 2 pickles


def python2_pickle(obj: Any) -> bytes:
    """Protocol-2 pickle bytes as Python 2 writes them: ``bytes`` become Python 2 ``str``
    (SHORT_BINSTRING/BINSTRING, undecoded), ``str`` becomes ``unicode`` (BINUNICODE).

    Python 3's own pickler cannot write a Python 2 ``str``; the REFER refs files are full of them.
    """
    out = bytearray(b"\x80\x02")

    def put(value: Any) -> None:
        if value is None:
            out.extend(b"N")
        elif value is True or value is False:
            out.extend(b"\x88" if value else b"\x89")
        elif isinstance(value, int):
            if -(2**31) <= value < 2**31:
                out.extend(b"J" + struct.pack("<i", value))
            else:
                raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(value, float):
            out.extend(b"G" + struct.pack(">d", value))
        elif isinstance(value, bytes):
            if len(value) < 256:
                out.extend(b"U" + bytes([len(value)]) + value)
            else:
                out.extend(b"T" + struct.pack("<i", len(value)) + value)
        elif isinstance(value, str):
            data = value.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(value, list):
            out.extend(b"](")
            for item in value:
                put(item)
            out.extend(b"e")
        elif isinstance(value, tuple):
            out.extend(b"(")
            for item in value:
                put(item)
            out.extend(b"t")
        elif isinstance(value, dict):
            out.extend(b"}(")
            for key, item in value.items():
                put(key)
                put(item)
            out.extend(b"u")
        else:
            raise TypeError(f"python2_pickle: unsupported {type(value).__name__}")

    put(obj)
    out.extend(b".")
    return bytes(out)


# ---------------------------------------------------------------------------- REFER fixtures

# (image_id, (height, width), PIL mode, split). 102 is grayscale, 103 is RGBA (saved as PNG).
FIXTURE_IMAGES = [
    (101, (48, 64), "RGB", "train"),
    (102, (64, 48), "L", "train"),
    (103, (40, 56), "RGBA", "val"),
    (104, (48, 64), "RGB", "test"),
    (105, (56, 40), "RGB", "test"),
]
# SPEC 2: images the refclef release lacks; their refs are in the pickle, not in instances.json.
FIXTURE_MISSING = [(19579, "train"), (17975, "train"), (19575, "test")]
COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "kite", "supercategory": "sports"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]
FIXTURE_CATEGORIES = [
    {"id": 1, "name": "man", "supercategory": "humans"},
    {"id": 2, "name": "sky-blue", "supercategory": "landscape"},
    {"id": 3, "name": "car", "supercategory": "vehicles"},
]


def _rect(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _polygon(top: int, left: int, bottom: int, right: int) -> list[float]:
    return [float(left), float(top), float(right), float(top), float(right), float(bottom),
            float(left), float(bottom)]


def _file_name(dataset: str, image_id: int, mode: str) -> str:
    ext = "png" if mode == "RGBA" else "jpg"
    if dataset == "refclef":
        return f"{image_id // 100:02d}/images/{image_id}.{ext}"  # SAIAPR's nested folders
    if dataset == "synthref":
        return f"{image_id:05d}.png"
    return f"COCO_train2014_{image_id:012d}.{ext}"


def write_refer_dataset(root: Path, dataset: str = "refclef", split_by: str = "berkeley") -> dict:
    """Write a tiny REFER dataset under ``root`` and return what a loader should find.

    refclef/synthref segmentations are RLEs (a list of RLE dicts, a two-part list and a bare
    dict, like the release); the refcoco family's are polygons (one region in two parts).
    Strings in the refs pickle are Python 2 ``str`` (bytes, one with a latin-1 "é").
    Returns ``{"masks": {ann_id: bool mask (RLE) or (rect parts) (polygons)}, "pairs": {split: n},
    "regions": {split: n}, "images": {split: n}, "stuff": {ann_id: bool}, "root": root}``.
    """
    from referseg.data.refer import IMAGE_DIRS

    rng = np.random.default_rng(0)
    polygons = dataset in ("refcoco", "refcoco+", "refcocog")
    image_dir = root / IMAGE_DIRS[dataset]
    images, annotations, refs = [], [], []
    expected: dict[str, Any] = {"root": root, "masks": {}, "rects": {}, "pairs": {}, "regions": {}, "images": {},
                                "stuff": {}, "split_of_image": {}}
    sent_id = 0
    for image_id, (h, w), mode, split in FIXTURE_IMAGES:
        file_name = _file_name(dataset, image_id, mode)
        path = image_dir / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode).save(path)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        expected["split_of_image"][image_id] = split
        # Region 1: a thing (rectangle); region 2: sky band at the top (stuff in SAIAPR).
        thing = (h // 3, w // 4, h // 3 + h // 3, w // 4 + w // 3)
        sky = (0, 0, h // 4, w)
        regions = [(image_id * 10 + 1, 1, [thing]), (image_id * 10 + 2, 2, [sky])]
        if image_id == 101:  # a two-part region: parts are merged
            regions.append((image_id * 10 + 3, 3, [(2, 2, 8, 10), (h - 10, w - 12, h - 2, w - 2)]))
        for k, (ann_id, category_id, parts) in enumerate(regions):
            masks = [_rect((h, w), *part) for part in parts]
            if polygons:
                segmentation: Any = [_polygon(*part) for part in parts]
            elif len(parts) > 1:
                segmentation = [_rle(m) for m in masks]
            elif k == 1:
                segmentation = _rle(masks[0])  # a bare RLE dict
            else:
                segmentation = [_rle(masks[0])]
            union = np.any(masks, axis=0)
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id,
                                "bbox": [0, 0, w, h], "area": int(union.sum()), "iscrowd": 0,
                                "segmentation": segmentation})
            expected["masks"][ann_id] = union
            expected["rects"][ann_id] = parts
            expected["stuff"][ann_id] = dataset == "refclef" and category_id == 2
            phrasings = {1: [b"man on the left", b"guy, in the middle"], 2: [b"sky"],
                         3: [b"caf\xe9 sign"]}[category_id]
            sentences = []
            for raw in phrasings:
                sentences.append({b"tokens": raw.split(), b"raw": raw, b"sent": raw.lower(), b"sent_id": sent_id})
                sent_id += 1
            refs.append({b"ref_id": ann_id, b"ann_id": ann_id, b"image_id": image_id, b"category_id": category_id,
                         b"split": split.encode(), b"sent_ids": [s[b"sent_id"] for s in sentences],
                         b"sentences": sentences, b"file_name": file_name.encode()})
            expected["pairs"][split] = expected["pairs"].get(split, 0) + len(sentences)
            expected["regions"][split] = expected["regions"].get(split, 0) + 1
        expected["images"][split] = expected["images"].get(split, 0) + 1
    if dataset == "refclef":
        for image_id, split in FIXTURE_MISSING:
            refs.append({b"ref_id": image_id * 10, b"ann_id": image_id * 10, b"image_id": image_id,
                         b"category_id": 1, b"split": split.encode(), b"sent_ids": [sent_id],
                         b"sentences": [{b"tokens": [b"tree"], b"raw": b"tree", b"sent": b"tree",
                                         b"sent_id": sent_id}]})
            sent_id += 1
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES if polygons else FIXTURE_CATEGORIES}))
    (folder / f"refs({split_by}).p").write_bytes(python2_pickle(refs))
    return expected


@pytest.fixture
def make_refer(tmp_path: Path):
    """Factory: ``make_refer(dataset="refclef", split_by="berkeley", root=None)`` -> expected dict."""

    def make(dataset: str = "refclef", split_by: str = "berkeley", root: Path | None = None) -> dict:
        return write_refer_dataset(root or tmp_path / f"{dataset}-{split_by}", dataset, split_by)

    return make


@pytest.fixture
def refclef_data(make_refer) -> dict:
    return make_refer("refclef", "berkeley")


@pytest.fixture
def refcoco_data(make_refer) -> dict:
    return make_refer("refcoco", "unc")


# ---------------------------------------------------------------------------- official format

OFFICIAL_FIXTURE = {  # image_id: ((height, width), PIL mode, {k: [expressions]}, split)
    201: ((48, 64), "RGB", {1: ["the sky"], 2: ["man on the left", "left guy"]}, "train"),
    202: ((64, 48), "L", {1: ["water"]}, "val"),
    203: ((40, 56), "RGB", {1: ["red car"], 3: ["tree , right"]}, "test"),
}


def write_official_referit(root: Path, with_imsize: bool = False) -> dict:
    """Official-format ReferIt fixture: query JSONs, ``mask/*.mat`` and ``images/*.jpg``."""
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(parents=True, exist_ok=True)
    queries: dict[str, dict] = {}
    masks, sizes = {}, {}
    for image_id, ((h, w), mode, regions, split) in OFFICIAL_FIXTURE.items():
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels).save(root / "images" / f"{image_id}.jpg")
        sizes[f"{image_id}.jpg"] = [w, h]
        for k, expressions in regions.items():
            mask = _rect((h, w), k * 3, k * 2, k * 3 + h // 2, k * 2 + w // 3)
            segimg = np.where(mask, 0, 1 + k).astype(np.uint8)  # region pixels are 0
            savemat(root / "mask" / f"{image_id}_{k}.mat", {"segimg_t": segimg})
            masks[image_id * 1000 + k] = mask
            queries.setdefault(split, {})[f"{image_id}_{k}"] = expressions
    for split, query in queries.items():
        (root / f"referit_query_{split}.json").write_text(json.dumps(query))
    if with_imsize:
        (root / "referit_imsize.json").write_text(json.dumps(sizes))
    return {"root": root, "masks": masks, "queries": queries}


@pytest.fixture
def official_data(tmp_path: Path) -> dict:
    return write_official_referit(tmp_path / "referit-official")


# ---------------------------------------------------------------------------- official text files

# The ReferIt text files in miniature: {image_id: ((height, width), split, {k: (box, [expressions])})},
# boxes [xmin, ymin, xmax, ymax] (0-based, inclusive). Training: two left halves and one whole
# 64x64 image (their letterbox is the image itself); test: a right half, a corner, and a small box
# on a 32x64 image (letterboxed with 16 rows of padding above and below).
REFERIT_TEXT_FIXTURE = {
    301: ((64, 64), "train", {1: ([0, 0, 31, 63], ["left half", "the left"]), 2: ([0, 0, 63, 63], ["everything"])}),
    302: ((64, 64), "val", {1: ([0, 0, 31, 63], ["sky"])}),
    303: ((64, 64), "test", {1: ([32, 0, 63, 63], ["right half"]), 2: ([0, 0, 15, 15], ["top left corner"])}),
    304: ((32, 64), "test", {1: ([10, 5, 19, 14], ["car"])}),
    305: ((48, 40), "none", {1: ([1, 2, 30, 40], [])}),  # a box of the files that no query uses
}


def write_referit_text(root: Path) -> dict:
    """The official text files' layout under ``root``: ``referit_query_{train,val,trainval,test}.json``,
    ``referit_bbox.json`` and ``referit_imsize.json`` (``[width, height]``), from REFERIT_TEXT_FIXTURE."""
    root.mkdir(parents=True, exist_ok=True)
    queries: dict[str, dict] = {"train": {}, "val": {}, "test": {}}
    boxes, sizes = {}, {}
    for image_id, ((height, width), split, regions) in REFERIT_TEXT_FIXTURE.items():
        sizes[f"{image_id}.jpg"] = [width, height]
        for k, (box, expressions) in regions.items():
            boxes[f"{image_id}_{k}"] = box
            if split in queries:
                queries[split][f"{image_id}_{k}"] = expressions
    queries["trainval"] = {**queries["train"], **queries["val"]}
    for split, query in queries.items():
        (root / f"referit_query_{split}.json").write_text(json.dumps(query))
    (root / "referit_bbox.json").write_text(json.dumps(boxes))
    (root / "referit_imsize.json").write_text(json.dumps(sizes))
    return {"root": root, "boxes": boxes, "sizes": sizes, "queries": queries}


@pytest.fixture
def referit_text(tmp_path: Path) -> dict:
    return write_referit_text(tmp_path / "referit-text")
