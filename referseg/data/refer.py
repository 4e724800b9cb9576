"""REFER-format datasets (SPEC 2): ReferIt as ``refclef``, the RefCOCO family, SynthRef.

One loader serves every dataset written in the REFER layout (``instances.json`` plus a
pickled ``refs(<split_by>).p``) and the official implementation's own ReferIt format
(:class:`OfficialReferIt`). :class:`ReferSegDataset` turns either into the letterboxed
tensors the model trains on (SPEC 3, 5).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import statistics
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pycocotools import mask as coco_mask

from referseg.data import transforms
from referseg.data.images import image_size, preprocess, read_image
from referseg.text import Vocabulary, tokenize

if TYPE_CHECKING:
    from referseg.config import Profile

logger = logging.getLogger(__name__)

DATASETS = ("refclef", "refcoco", "refcoco+", "refcocog", "synthref")
# Where each dataset's images live under the root (the REFER API's IMAGE_DIR).
IMAGE_DIRS = {
    "refclef": "images/saiapr_tc-12",
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "synthref": "images/synthref",
}
# The split each dataset is usually opened with (used when guessing, e.g. by dataset_stats).
DEFAULT_SPLIT_BY = {"refclef": "berkeley", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd",
                    "synthref": "synth"}
# SPEC 2: the refclef release lacks these three images (two in train, one in test); loaders skip them.
REFCLEF_MISSING_IMAGES = frozenset({19579, 17975, 19575})
# SAIAPR TC-12 "stuff" concepts (amorphous background regions, as opposed to countable things).
# A refclef category is stuff when its name, or the part of it before the first "-"
# ("sky-blue", "floor-wood", "sand-beach"), is in this list.
SAIAPR_STUFF = frozenset({
    "sky", "cloud", "clouds", "water", "sea", "ocean", "lake", "river", "waterfall", "wave",
    "ground", "grass", "mountain", "hill", "sand", "snow", "ice", "rock", "road", "street",
    "sidewalk", "floor", "wall", "ceiling", "vegetation", "trees", "bush", "forest", "field",
    "dirt", "highway", "trail", "fog",
})
SPLIT_ORDER = ("train", "val", "trainval", "test")
# Words that place a region in the picture ("left guy", "bottom right corner"): what a model without
# visual features can still use, with the spatial channels (the chapter "what the words alone know").
POSITION_WORDS = frozenset({
    "left", "right", "top", "bottom", "middle", "center", "centre", "corner", "upper", "lower",
    "leftmost", "rightmost", "topmost", "bottommost", "uppermost", "lowermost",
})
# The groups of expression_group, in the order the book shows them.
EXPRESSION_GROUPS = ("stuff name", "stuff name and position", "position words", "other")
OBTAIN_HINT = (
    "The original download links are dead; 'referseg data fetch-referit' lists the sources that "
    "remain (the official files on Google Drive, the REFER release on web.archive.org) and fetches "
    "one, or bring your own copy (the REFER release's refclef annotations and the SAIAPR TC-12 "
    "images, or the official implementation's ReferIt files); see data/README.md, and check a copy "
    "with 'referseg data check'. Without ReferIt, use the 'cpu' or 'smoke' profile, which generate SynthRef."
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message says what and how to get it."""


class UnsafePickleError(pickle.UnpicklingError):
    """A refs pickle would build an object other than plain data; it was refused, not run."""


@dataclass(frozen=True)
class Pair:
    """One (region, expression) pair: the unit of training and evaluation (SPEC 5)."""

    ref_id: int
    ann_id: int
    image_id: int
    sent_id: int
    split: str
    expression: str
    type: str | None
    category: str
    is_stuff: bool


# ---------------------------------------------------------------------------- pickles


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds only builtin containers, strings, bytes, numbers, bools and None.

    Those need no ``find_class``; anything else (a class, a function such as ``os.system``)
    must be looked up through it and is refused, so a malicious file is never executed.
    """

    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="latin1")  # SPEC 2: written by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self.path}: refusing to load this pickle: it would build the object "
            f"{module}.{name}, but a REFER refs file holds only lists, dicts, strings and numbers. "
            f"Nothing from it was executed. Use a refs file from a source you trust."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.path}: refusing a pickle with persistent ids; it is not a refs file")


def load_refs_pickle(path: str | Path) -> Any:
    """Read a REFER ``refs(*.p)`` file with the restricted, plain-data unpickler."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetNotFoundError(f"cannot read refs file {path}: {error}") from error
    try:
        return _PlainDataUnpickler(io.BytesIO(data), path).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # truncated or not a pickle at all
        raise pickle.UnpicklingError(f"{path} is not a readable refs pickle ({error})") from error


# ---------------------------------------------------------------------------- helpers


def is_stuff_category(name: str, supercategory: str | None = None, saiapr: bool = False) -> bool:
    """Stuff or thing: SynthRef says so in the supercategory; SAIAPR (refclef) names by
    :data:`SAIAPR_STUFF`; anything else (the COCO objects of the refcoco family) is a thing."""
    if supercategory in ("stuff", "thing"):
        return supercategory == "stuff"
    if not saiapr:
        return False
    name = name.strip().lower()
    return name in SAIAPR_STUFF or name.split("-")[0] in SAIAPR_STUFF


def _coco_decode(rles: Any) -> np.ndarray:
    """pycocotools' decode, without the DeprecationWarning it raises under NumPy 2 on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rles)


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "annotation") -> np.ndarray:
    """A COCO segmentation (RLE, list of RLEs, or polygons) as a bool ``height x width`` mask.

    Several parts (polygons, RLEs) are merged with ``any`` over the last axis (SPEC 2).
    """

    def compressed(rle: dict) -> dict:
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            return coco_mask.frPyObjects(rle, *rle["size"])
        counts = rle["counts"]
        return {"size": list(rle["size"]), "counts": counts.encode("latin1") if isinstance(counts, str) else counts}

    if isinstance(segmentation, dict):
        rles = [compressed(segmentation)]
    elif isinstance(segmentation, list) and segmentation and all(isinstance(s, dict) for s in segmentation):
        rles = [compressed(s) for s in segmentation]
    elif isinstance(segmentation, list) and segmentation and all(isinstance(s, list) for s in segmentation):
        rles = coco_mask.frPyObjects(segmentation, height, width)  # polygons
    else:
        raise ValueError(f"{where}: unsupported segmentation {str(segmentation)[:80]!r}; "
                         "expected an RLE dict, a list of RLEs or a list of polygons")
    for rle in rles:
        if tuple(rle["size"]) != (height, width):
            raise ValueError(f"{where}: mask size {rle['size'][0]}x{rle['size'][1]} differs from its "
                             f"image size {height}x{width} (height x width)")
    decoded = _coco_decode(rles)
    return decoded.any(axis=2) if decoded.ndim == 3 else decoded.astype(bool)


def _check_split(split: str, available: Sequence[str], name: str) -> None:
    if split != "trainval" and split not in available:
        valid = sorted(set(available) | ({"trainval"} if {"train", "val"} <= set(available) else set()),
                       key=_split_key)
        raise ValueError(f"{name} has no split {split!r}; its splits are {', '.join(valid)}")


def _missing_message(what: str, root: Path, missing: list[str], layout: str) -> str:
    return (f"{what} not found under {root}: missing {', '.join(missing)}.\n"
            f"Expected layout:\n{layout}\n{OBTAIN_HINT}")


def _refer_layout(dataset: str, split_by: str) -> str:
    return (f"  <root>/{dataset}/instances.json\n"
            f"  <root>/{dataset}/refs({split_by}).p\n"
            f"  <root>/{IMAGE_DIRS.get(dataset, 'images/<dataset>')}/<file_name of instances.json>"
            + ("\nor the official implementation's format: <root>/referit_query_{trainval,test}.json, "
               "<root>/mask/<imgid>_<k>.mat, <root>/images/<imgid>.jpg" if dataset == "refclef" else ""))


class _PairSource:
    """What both on-disk formats share: pairs by split (``trainval`` = train + val) and images."""

    name: str
    image_dir: Path
    images: dict[int, dict]
    _pairs: dict[str, list[Pair]]

    @property
    def splits(self) -> list[str]:
        """The stored splits, plus ``trainval`` when train and val are there."""
        names = list(self._pairs)
        if "train" in names and "val" in names and "trainval" not in names:
            names.append("trainval")
        return sorted(names, key=_split_key)

    def pairs(self, split: str) -> list[Pair]:
        """Every (region, expression) pair of a split; ``trainval`` = train + val (SPEC 2).

        ``test`` follows the REFER API: every split whose name contains "test" (RefCOCO's testA
        and testB), in name order.
        """
        if split == "test":
            tests = sorted(name for name in self._pairs if "test" in name)
            if tests:
                return [pair for name in tests for pair in self._pairs[name]]
        if split == "trainval" and "trainval" not in self._pairs:
            _check_split("train", list(self._pairs), self.name)
            _check_split("val", list(self._pairs), self.name)
            return self._pairs["train"] + self._pairs["val"]
        _check_split(split, list(self._pairs), self.name)
        return list(self._pairs[split])

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def load_image(self, image_id: int) -> np.ndarray:
        """The image as uint8 HxWx3 RGB (:func:`referseg.data.images.read_image`)."""
        return read_image(self.image_path(image_id))

    def load_mask(self, ann_id: int) -> np.ndarray:
        raise NotImplementedError

    def square_mask(self, ann_id: int, size: int) -> np.ndarray:
        """The region's mask letterboxed to ``size x size`` (SPEC 3)."""
        return transforms.letterbox_mask(self.load_mask(ann_id), size)

    def lowres_mask(self, ann_id: int, size: int, grid: int, mode: str = "or") -> np.ndarray:
        """The region's ``grid x grid`` training labels (SPEC 5): its letterboxed mask, pooled."""
        return transforms.lowres_labels(self.square_mask(ann_id, size), grid, mode)


# ---------------------------------------------------------------------------- REFER


class Refer(_PairSource):
    """One REFER dataset on disk: ``<root>/<dataset>/instances.json`` + ``refs(<split_by>).p``.

    ``Refer(root, "refclef", "berkeley")`` is the paper's ReferIt split (SPEC 2), minus the
    three images the release lacks; the RefCOCO family and SynthRef use the same layout.
    """

    def __init__(self, root: str | Path, dataset: str, split_by: str):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.name = f"{dataset} ({split_by}) at {self.root}"
        folder = self.root / dataset
        self.instances_file = folder / "instances.json"
        self.refs_file = folder / f"refs({split_by}).p"
        self.image_dir = self.root / IMAGE_DIRS[dataset]
        missing = [str(p.relative_to(self.root)) + ("/" if p is self.image_dir else "")
                   for p in (self.instances_file, self.refs_file, self.image_dir) if not p.exists()]
        if missing:
            raise DatasetNotFoundError(_missing_message(f"dataset {dataset} (split_by {split_by})",
                                                        self.root, missing, _refer_layout(dataset, split_by)))
        try:
            instances = json.loads(self.instances_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {self.instances_file}: {error}") from error
        for key in ("images", "annotations", "categories"):
            if key not in instances:
                raise ValueError(f"{self.instances_file} has no {key!r} list; is it a COCO-style instances file?")
        self.images: dict[int, dict] = {}
        for index, im in enumerate(instances["images"]):
            try:
                self.images[int(im["id"])] = {"id": int(im["id"]), "file_name": str(im["file_name"]),
                                              "height": int(im["height"]), "width": int(im["width"])}
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{self.instances_file}: image entry {index} has no valid {error} field; "
                                 "each image needs id, file_name, height and width") from None
        for index, ann in enumerate(instances["annotations"]):
            missing = [key for key in ("id", "image_id", "segmentation") if key not in ann]
            if missing:
                raise ValueError(f"{self.instances_file}: annotation entry {index} has no {', '.join(missing)}; "
                                 "each annotation needs id, image_id and segmentation (polygons or RLE)")
        self.annotations: dict[int, dict] = {int(a["id"]): a for a in instances["annotations"]}
        self.categories: dict[int, dict] = {int(c["id"]): c for c in instances["categories"]}
        refs = load_refs_pickle(self.refs_file)
        if not isinstance(refs, list):
            raise ValueError(f"{self.refs_file}: expected a list of refs, got {type(refs).__name__}")
        self._pairs: dict[str, list[Pair]] = {}
        self._build_pairs(refs)

    def _build_pairs(self, refs: list) -> None:
        known_missing: set[int] = set()
        absent: set[int] = set()
        skipped_refs = skipped_pairs = 0
        for ref in refs:
            image_id = int(ref["image_id"])
            if image_id not in self.images or (self.dataset == "refclef" and image_id in REFCLEF_MISSING_IMAGES):
                (known_missing if self.dataset == "refclef" and image_id in REFCLEF_MISSING_IMAGES
                 else absent).add(image_id)
                skipped_refs += 1
                skipped_pairs += len(ref["sentences"])
                continue
            ann_id = int(ref["ann_id"])
            if ann_id not in self.annotations:
                raise ValueError(f"{self.refs_file}: ref {ref['ref_id']} points to annotation {ann_id}, "
                                 f"which {self.instances_file} does not have")
            category = self.categories.get(int(ref.get("category_id", self.annotations[ann_id]["category_id"])), {})
            category_name = str(category.get("name", ""))
            stuff = is_stuff_category(category_name, category.get("supercategory"), self.dataset == "refclef")
            for sentence in ref["sentences"]:
                expression = sentence.get("raw", sentence.get("sent"))
                self._pairs.setdefault(ref["split"], []).append(Pair(
                    ref_id=int(ref["ref_id"]), ann_id=ann_id, image_id=image_id,
                    sent_id=int(sentence["sent_id"]), split=str(ref["split"]),
                    expression=str(expression), type=sentence.get("type"),
                    category=category_name, is_stuff=stuff,
                ))
        if skipped_refs:  # the three known refclef gaps are expected; other absent images are not
            logger.log(
                logging.WARNING if absent else logging.INFO,
                "%s: skipped %d refs (%d expressions) on %d images: %d missing from the refclef release "
                "(SPEC 2: 19579.jpg, 17975.jpg, 19575.jpg), %d absent from instances.json",
                self.name, skipped_refs, skipped_pairs, len(known_missing | absent), len(known_missing),
                len(absent),
            )
        self.skipped = {"refs": skipped_refs, "pairs": skipped_pairs, "images": len(known_missing | absent)}

    def load_mask(self, ann_id: int) -> np.ndarray:
        """The region's ground truth as bool HxW at the original image size."""
        ann = self.annotations[ann_id]
        image = self.images[int(ann["image_id"])]
        return decode_segmentation(ann["segmentation"], image["height"], image["width"],
                                   where=f"{self.instances_file} annotation {ann_id} (image {image['file_name']})")


def _split_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


# ---------------------------------------------------------------------------- official format


class OfficialReferIt(_PairSource):
    """ReferIt in the official implementation's format (SPEC 2).

    ``referit_query_{split}.json`` (``{"<imgid>_<k>": [expr, ...]}``), masks
    ``mask/<imgid>_<k>.mat`` (foreground where ``segimg_t == 0``), images
    ``images/<imgid>.jpg``; sizes from ``referit_imsize.json`` when present, else the files.
    Region ``<imgid>_<k>`` has ``ann_id = ref_id = imgid * 1000 + k``; its j-th expression
    has ``sent_id = ann_id * 100 + j``. The format has no categories (``category=""``).
    """

    def __init__(self, root: str | Path, split: str | None = None, images_dir: str | Path | None = None,
                 masks_dir: str | Path | None = None):
        self.root = Path(root)
        self.dataset = "referit-official"
        self.split_by = "official"
        self.name = f"ReferIt (official format) at {self.root}"
        self.image_dir = Path(images_dir) if images_dir else self.root / "images"
        self.mask_dir = Path(masks_dir) if masks_dir else self.root / "mask"
        available = {m.group(1): p for p in sorted(self.root.glob("referit_query_*.json"))
                     if (m := re.fullmatch(r"referit_query_(\w+)\.json", p.name))}
        if not available:
            raise DatasetNotFoundError(_missing_message(
                "ReferIt (official format)", self.root, ["referit_query_<split>.json"],
                "  <root>/referit_query_{trainval,test}.json\n  <root>/mask/<imgid>_<k>.mat\n"
                "  <root>/images/<imgid>.jpg\n  <root>/referit_imsize.json (optional)"))
        wanted = [split] if split else list(available)
        if split == "trainval" and "trainval" not in available:
            wanted = ["train", "val"]
        self._pairs: dict[str, list[Pair]] = {}
        for name in wanted:
            if name not in available:
                raise ValueError(f"{self.name} has no referit_query_{name}.json; "
                                 f"its splits are {', '.join(sorted(available, key=_split_key))}")
            self._pairs[name] = self._read_queries(available[name], name)
        sizes_file = self.root / "referit_imsize.json"
        sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
        self.images: dict[int, dict] = {}
        for image_id in sorted({p.image_id for pairs in self._pairs.values() for p in pairs}):
            file_name = f"{image_id}.jpg"
            if file_name in sizes:
                width, height = sizes[file_name]
            else:
                height, width = image_size(self.image_dir / file_name)
            self.images[image_id] = {"id": image_id, "file_name": file_name, "height": int(height),
                                     "width": int(width)}

    @staticmethod
    def _read_queries(path: Path, split: str) -> list[Pair]:
        try:
            queries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path}: {error}") from error
        pairs = []
        for key, expressions in queries.items():
            match = re.fullmatch(r"(\d+)_(\d+)", key)
            if not match or int(match.group(2)) >= 1000 or len(expressions) >= 100:
                raise ValueError(f"{path}: unexpected region key {key!r}; expected '<imgid>_<k>'")
            image_id, k = int(match.group(1)), int(match.group(2))
            ann_id = image_id * 1000 + k
            for j, expression in enumerate(expressions):
                pairs.append(Pair(ref_id=ann_id, ann_id=ann_id, image_id=image_id, sent_id=ann_id * 100 + j,
                                  split=split, expression=expression, type=None, category="", is_stuff=False))
        return pairs

    def load_mask(self, ann_id: int) -> np.ndarray:
        """Ground truth of region ``<imgid>_<k>``: ``loadmat(f)['segimg_t'] == 0`` (SPEC 2)."""
        from scipy.io import loadmat

        path = self.mask_dir / f"{ann_id // 1000}_{ann_id % 1000}.mat"
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} does not exist; the official format keeps masks in "
                                    f"{self.mask_dir}/<imgid>_<k>.mat")
        try:
            segimg = loadmat(path)["segimg_t"]
        except (KeyError, ValueError, OSError) as error:
            raise ValueError(f"cannot read mask file {path} (expected a 'segimg_t' array): {error}") from error
        mask = np.asarray(segimg) == 0
        image = self.images.get(ann_id // 1000)
        if image and mask.shape != (image["height"], image["width"]):
            raise ValueError(f"mask file {path}: mask size {mask.shape[0]}x{mask.shape[1]} differs from its image "
                             f"size {image['height']}x{image['width']} (height x width)")
        return mask


# ---------------------------------------------------------------------------- the official text files

TEXT_FILES_HINT = ("'referseg data fetch-referit-text --out {root}' places them there, from the official "
                   "repository (ronghanghu/text_objseg) or from a copy of its exp-referit/data/ folder "
                   "(--from FOLDER)")


class ReferItText(_PairSource):
    """ReferIt's real expressions and the boxes of their regions: the official text files, no pixels.

    ``referit_query_<split>.json`` gives the pairs (as :class:`OfficialReferIt`: region ``<imgid>_<k>``
    has ``ann_id = imgid * 1000 + k``), ``referit_bbox.json`` each region's box ``[xmin, ymin, xmax,
    ymax]`` (0-based, inclusive) and ``referit_imsize.json`` each image's ``[width, height]``. A region's
    mask is its box at the image's size (:meth:`load_mask`); its letterbox is again a box
    (:meth:`square_boxes`), so its letterboxed mask and low-resolution labels come from corners, equal
    to those of the mask. It serves a model without visual features (``visual_features=False``):
    :meth:`load_image` refuses.
    """

    REQUIRED = ("referit_bbox.json", "referit_imsize.json")

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dataset = "referit-text"
        self.split_by = "official"
        self.name = f"ReferIt text files at {self.root}"
        self.image_dir = self.root / "images"  # there are none; kept for the shared interface
        self._query_files = {m.group(1): p for p in sorted(self.root.glob("referit_query_*.json"))
                             if (m := re.fullmatch(r"referit_query_(\w+)\.json", p.name))}
        missing = [name for name in self.REQUIRED if not (self.root / name).is_file()]
        if not self._query_files or missing:
            raise DatasetNotFoundError(
                f"ReferIt text files not found under {self.root}: missing "
                f"{', '.join(missing + ([] if self._query_files else ['referit_query_<split>.json']))}. "
                + TEXT_FILES_HINT.format(root=self.root))
        boxes, sizes = (self._read_json(self.root / name) for name in self.REQUIRED)
        self.images: dict[int, dict] = {}
        for file_name, size in sizes.items():
            image_id, (width, height) = int(Path(file_name).stem), (int(v) for v in size)
            self.images[image_id] = {"id": image_id, "file_name": file_name, "height": height, "width": width}
        self.boxes: dict[int, tuple[int, int, int, int]] = {}
        for key, box in boxes.items():
            match = re.fullmatch(r"(\d+)_(\d+)", key)
            if not match or int(match.group(1)) not in self.images:
                raise ValueError(f"{self.root / 'referit_bbox.json'}: region {key!r} is not '<imgid>_<k>' of an "
                                 "image of referit_imsize.json; fetch the files again")
            image_id, k = int(match.group(1)), int(match.group(2))
            self.boxes[image_id * 1000 + k] = self._checked_box(box, key, self.images[image_id])
        self._pairs: dict[str, list[Pair]] = {}
        self._square_boxes: dict[int, dict[int, tuple[int, int, int, int]]] = {}

    @property
    def splits(self) -> list[str]:
        names = set(self._query_files) | ({"trainval"} if {"train", "val"} <= set(self._query_files) else set())
        return sorted(names, key=_split_key)

    def pairs(self, split: str) -> list[Pair]:
        """Every (region, expression) pair of a split, read when first asked for; each has a box."""
        if split not in self._pairs:
            if split not in self.splits:
                raise ValueError(f"{self.name} has no referit_query_{split}.json; its splits are "
                                 f"{', '.join(self.splits)}")
            if split in self._query_files:
                pairs = OfficialReferIt._read_queries(self._query_files[split], split)
            else:
                pairs = self.pairs("train") + self.pairs("val")
            lacking = next((p for p in pairs if p.ann_id not in self.boxes), None)
            if lacking is not None:
                raise ValueError(f"{self._query_files.get(split, split)}: region {lacking.image_id}_"
                                 f"{lacking.ann_id % 1000} has no box in referit_bbox.json; fetch the files again")
            self._pairs[split] = pairs
        return list(self._pairs[split])

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path}: {error}") from error

    def _checked_box(self, box: Any, key: str, image: dict) -> tuple[int, int, int, int]:
        try:
            x0, y0, x1, y1 = (int(v) for v in box)
        except (TypeError, ValueError):
            x0 = y0 = 0
            x1 = y1 = -1
        if not (0 <= x0 <= x1 < image["width"] and 0 <= y0 <= y1 < image["height"]):
            raise ValueError(f"{self.root / 'referit_bbox.json'}: region {key}: box {box!r} is not [xmin, ymin, "
                             f"xmax, ymax] inside its {image['width']}x{image['height']} image (0-based, "
                             "inclusive)")
        return x0, y0, x1, y1

    def load_image(self, image_id: int) -> np.ndarray:
        raise FileNotFoundError(
            f"{self.name} hold expressions and boxes, no images (image {image_id}.jpg): they serve a model "
            "without visual features (visual_features=false). For the images, fetch ReferIt: "
            "referseg data fetch-referit")

    def load_mask(self, ann_id: int) -> np.ndarray:
        """The region's box as a bool mask at the original image size (SPEC 1 evaluates there)."""
        image = self.images[ann_id // 1000]
        return transforms.box_mask(self.boxes[ann_id], image["height"], image["width"])

    def square_boxes(self, size: int) -> dict[int, tuple[int, int, int, int]]:
        """Every region's box in the ``size x size`` letterbox (:func:`transforms.letterbox_boxes`),
        computed once per size for all regions, image size by image size."""
        if size not in self._square_boxes:
            by_size: dict[tuple[int, int], list[int]] = {}
            for ann_id in self.boxes:
                image = self.images[ann_id // 1000]
                by_size.setdefault((image["height"], image["width"]), []).append(ann_id)
            square: dict[int, tuple[int, int, int, int]] = {}
            for (height, width), ann_ids in by_size.items():
                boxes = transforms.letterbox_boxes(np.array([self.boxes[a] for a in ann_ids]), height, width, size)
                square.update(zip(ann_ids, map(tuple, boxes.tolist()), strict=True))
            self._square_boxes[size] = square
        return self._square_boxes[size]

    def square_mask(self, ann_id: int, size: int) -> np.ndarray:
        return transforms.box_mask(self.square_boxes(size)[ann_id], size, size)

    def lowres_mask(self, ann_id: int, size: int, grid: int, mode: str = "or") -> np.ndarray:
        return transforms.lowres_box_labels(self.square_boxes(size)[ann_id], size, grid, mode)


def expression_group(expression: str) -> str:
    """What an expression says, one of :data:`EXPRESSION_GROUPS`: a stuff name (:data:`SAIAPR_STUFF`,
    "sky"), a stuff name and a position word (:data:`POSITION_WORDS`, "sky on the left"), position
    words without a stuff name ("left guy"), or neither ("red car")."""
    try:
        words = {token.strip() for token in tokenize(expression)}
    except ValueError:
        return "other"
    stuff, position = bool(words & SAIAPR_STUFF), bool(words & POSITION_WORDS)
    if stuff:
        return "stuff name and position" if position else "stuff name"
    return "position words" if position else "other"


# ---------------------------------------------------------------------------- torch dataset


class ReferSegDataset(torch.utils.data.Dataset):
    """(image, expression) -> mask samples of one split, letterboxed as in SPEC 3 and 5.

    The one description of a split: its pairs, their token ids (encoded once, SPEC 2) and
    the row of each pair's image (``pair_image``, the row in the feature cache). Decoded
    letterboxed masks are cached per annotation as compact RLEs (several expressions share
    a region), so even ReferIt's 50k regions cost little memory.
    """

    def __init__(self, refer: Refer | OfficialReferIt | ReferItText, split: str, vocab: Vocabulary,
                 profile: Profile):
        self.refer = refer
        self.split = split
        self.vocab = vocab
        self.profile = profile
        self.pairs: list[Pair] = refer.pairs(split)
        if not self.pairs:
            raise ValueError(f"split {split!r} of {refer.name} has no (region, expression) pairs; "
                             f"its splits are {', '.join(refer.splits)}")
        self.image_ids: list[int] = list(dict.fromkeys(p.image_id for p in self.pairs))
        self._image_index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.pair_image = np.array([self._image_index[p.image_id] for p in self.pairs], dtype=np.int64)
        self.tokens = torch.tensor(self._encode_all(), dtype=torch.int64)  # SPEC 2: T ids, left-padded
        self._mask_cache: dict[int, tuple[dict, tuple[int, int]]] = {}

    def _encode_all(self) -> list[list[int]]:
        """Every pair's token ids; one warning for all the expressions whose words are all unknown
        (ReferIt's test split has hundreds), not one each."""
        try:
            with warnings.catch_warnings(record=True) as unknown:
                warnings.simplefilter("always", UserWarning)
                return [self.vocab.encode(p.expression, self.profile.seq_len) for p in self.pairs]
        finally:
            if unknown:
                warnings.warn(f"{len(unknown)} of {len(self.pairs)} expressions of split {self.split!r} have "
                              f"only words unknown to the vocabulary (the first: {unknown[0].message})",
                              stacklevel=3)

    def __len__(self) -> int:
        return len(self.pairs)

    def image_tensor(self, image_index: int) -> torch.Tensor:
        """(3, S, S) letterboxed image normalised with the profile's mean/std (SPEC 3)."""
        return preprocess(self.refer.load_image(self.image_ids[image_index]), self.profile)

    def _letterboxed_mask(self, ann_id: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The (S, S) letterboxed mask and the original (h, w), cached as an RLE."""
        if ann_id not in self._mask_cache:
            original = self.refer.load_mask(ann_id)
            boxed = transforms.letterbox_mask(original, self.profile.input_size)
            rle = coco_mask.encode(np.asfortranarray(boxed.astype(np.uint8)))
            self._mask_cache[ann_id] = (rle, original.shape)
        rle, shape = self._mask_cache[ann_id]
        return _coco_decode(rle).astype(bool), shape

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        image = self.refer.load_image(pair.image_id)
        mask, mask_shape = self._letterboxed_mask(pair.ann_id)
        if tuple(mask_shape) != image.shape[:2]:
            raise ValueError(
                f"{self.refer.name}: mask of annotation {pair.ann_id} is {mask_shape[0]}x{mask_shape[1]} but its "
                f"image {self.refer.image_path(pair.image_id)} is {image.shape[0]}x{image.shape[1]} (height x width)"
            )
        lowres = transforms.lowres_labels(mask, self.profile.grid, self.profile.lowres_labels)  # SPEC 5
        return {
            "image": preprocess(image, self.profile),
            "tokens": self.tokens[i],
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "lowres": torch.from_numpy(lowres.astype(np.float32)),
            "image_index": int(self.pair_image[i]),
            "index": i,
        }

    def original_mask(self, i: int) -> np.ndarray:
        """Ground truth of sample ``i`` at the original image size (SPEC 1: evaluate there)."""
        return self.refer.load_mask(self.pairs[i].ann_id)

    def meta(self, i: int) -> dict:
        pair = self.pairs[i]
        image = self.refer.images[pair.image_id]
        return {"ref_id": pair.ref_id, "ann_id": pair.ann_id, "image_id": pair.image_id,
                "sent_id": pair.sent_id, "height": image["height"], "width": image["width"],
                "expression": pair.expression, "type": pair.type, "category": pair.category,
                "is_stuff": pair.is_stuff}


# ---------------------------------------------------------------------------- profiles


def _has_official_layout(root: Path) -> bool:
    return any(root.glob("referit_query_*.json")) and (root / "mask").is_dir()


def load_refer(profile: Profile) -> Refer | OfficialReferIt | ReferItText:
    """The profile's dataset: SynthRef (generated at ``data_root`` when missing), ReferIt, or
    ReferIt's text files alone (``dataset="referit-text"``, :class:`ReferItText`).

    ReferIt is ``Refer(root, "refclef", "berkeley")`` (SPEC 2), or the official format when
    only that is there; otherwise one error naming what is missing and how to get it.
    """
    root = Path(profile.data_root)
    if profile.dataset == "referit-text":
        return ReferItText(root)
    if profile.dataset == "synthref":
        from referseg.data.synthetic import generate_synthref

        if not (root / "synthref" / "instances.json").is_file():
            logger.info("SynthRef not found at %s: generating %d images (seed %d)", root,
                        profile.synth_images, profile.synth_seed)
        # Returns at once when the SynthRef there has the profile's seed and size, and refuses
        # one made with others, so a run never trains on data its profile does not describe.
        generate_synthref(root, seed=profile.synth_seed, images=profile.synth_images)
        return Refer(root, "synthref", "synth")
    if (root / "refclef").is_dir() or not _has_official_layout(root):
        return Refer(root, "refclef", "berkeley")
    return OfficialReferIt(root)


# The files whose contents define a dataset's annotations (pixels aside), by layout.
ANNOTATION_FILES = ("refclef/instances.json", "refclef/refs(berkeley).p", "referit_query_trainval.json",
                    "referit_query_test.json", "referit_query_train.json", "referit_query_val.json",
                    "referit_bbox.json", "referit_imsize.json")


def data_identity(profile: Profile) -> dict[str, Any]:
    """What a run folder's checkpoints and a feature cache were made from, beyond the profile.

    SynthRef: its ``meta.json`` (seed, size and generator version: a new version paints other
    pixels for the same seed). ReferIt: the SHA-256 of each annotation file present.
    """
    from referseg.io import sha256_file

    root = Path(profile.data_root)
    if profile.dataset == "synthref":
        meta = root / "synthref" / "meta.json"
        return {"dataset": "synthref", **(json.loads(meta.read_text()) if meta.is_file() else {})}
    return {"dataset": profile.dataset,
            "files": {name: sha256_file(root / name) for name in ANNOTATION_FILES if (root / name).is_file()}}


def build_vocab(profile: Profile, refer: Refer | OfficialReferIt | ReferItText) -> Vocabulary:
    """``profile.vocab_file`` (e.g. the official one), else built from the training split (SPEC 2)."""
    if profile.vocab_file:
        return Vocabulary.load(profile.vocab_file)
    expressions = [p.expression for p in refer.pairs(profile.train_split)]
    return Vocabulary.build(expressions, min_count=profile.vocab_min_count)


# ---------------------------------------------------------------------------- statistics


def _guess_dataset(root: Path) -> str:
    found = [d for d in DATASETS if (root / d / "instances.json").is_file()]
    if len(found) == 1:
        return found[0]
    if not found and any(root.glob("referit_query_*.json")):
        return "referit-official"
    if not found:
        raise DatasetNotFoundError(
            f"no dataset found under {root}: expected <root>/<dataset>/instances.json for one of "
            f"{', '.join(DATASETS)}, or the official format's referit_query_<split>.json. {OBTAIN_HINT}")
    raise ValueError(f"{root} holds several datasets ({', '.join(found)}); choose one with --dataset")


def _guess_split_by(root: Path, dataset: str) -> str:
    found = sorted(m.group(1) for p in (root / dataset).glob("refs(*).p")
                   if (m := re.fullmatch(r"refs\((.+)\)\.p", p.name)))
    if DEFAULT_SPLIT_BY.get(dataset) in found or not found:
        return DEFAULT_SPLIT_BY[dataset]
    if len(found) == 1:
        return found[0]
    raise ValueError(f"{root / dataset} has several splits ({', '.join(found)}); choose one with --split-by")


def _safe_length(expression: str) -> int:
    try:
        return len(tokenize(expression))
    except ValueError:
        return 0


def stats_table(refer: Refer | OfficialReferIt | ReferItText, vocab: Vocabulary | None) -> Any:
    """Per-split DataFrame: images, regions, pairs, expression lengths, unknown rate, stuff share."""
    import pandas as pd

    rows = []
    for split in refer.splits:
        pairs = refer.pairs(split)
        lengths = [_safe_length(p.expression) for p in pairs]
        nonempty = [p.expression for p, n in zip(pairs, lengths, strict=True) if n]
        real = [n for n in lengths if n]
        known_category = [p for p in pairs if p.category]
        rows.append({
            "split": split,
            "images": len({p.image_id for p in pairs}),
            "regions": len({p.ann_id for p in pairs}),
            "pairs": len(pairs),
            "empty": len(pairs) - len(real),
            "len_mean": round(statistics.fmean(real), 2) if real else float("nan"),
            "len_median": statistics.median(real) if real else float("nan"),
            "len_max": max(real, default=0),
            "over_20": sum(n > 20 for n in real),
            "pct_over_20": round(100 * sum(n > 20 for n in real) / max(len(real), 1), 2),
            "pct_unknown": round(100 * vocab.unknown_rate(nonempty), 2) if vocab else float("nan"),
            "pct_stuff": (round(100 * sum(p.is_stuff for p in known_category) / len(known_category), 1)
                          if known_category else float("nan")),
        })
    return pd.DataFrame(rows).set_index("split")


def dataset_stats(root: str | Path, dataset: str | None = None, split_by: str | None = None,
                  vocab_file: str | None = None) -> str:
    """A printable table of a dataset: sizes, expression lengths, unknown rate, stuff share, types."""
    import pandas as pd

    root = Path(root)
    dataset = dataset or _guess_dataset(root)
    if dataset == "referit-official":
        refer: Refer | OfficialReferIt = OfficialReferIt(root)
    else:
        split_by = split_by or _guess_split_by(root, dataset)
        refer = Refer(root, dataset, split_by)
    if vocab_file:
        vocab, vocab_source = Vocabulary.load(vocab_file), str(vocab_file)
    else:
        train = [p.expression for p in refer.pairs("train") if _safe_length(p.expression)] \
            if "train" in refer.splits else []
        vocab = Vocabulary.build(train) if train else None
        vocab_source = "built from train" if train else "none (no train split)"
    table = stats_table(refer, vocab)
    lines = [refer.name, f"vocabulary: {vocab_source} ({len(vocab) if vocab else 0} tokens)", "",
             table.to_string(), "",
             "len_*: tokens per expression (SPEC 2 rules); over_20 / pct_over_20: expressions longer than T=20 (count / %); "
             "pct_unknown: % tokens mapped to <unk>; pct_stuff: % pairs on stuff regions"]
    if getattr(refer, "skipped", {}).get("refs"):
        lines += ["", f"skipped: {refer.skipped['refs']} refs ({refer.skipped['pairs']} expressions) on "
                      f"{refer.skipped['images']} missing images"]
    type_counts = {split: Counter(p.type or "untagged" for p in refer.pairs(split))
                   for split in refer.splits if any(p.type for p in refer.pairs(split))}
    if type_counts:
        types = pd.DataFrame(type_counts).fillna(0).astype(int)
        lines += ["", "expression types (% of pairs):", (100 * types / types.sum()).round(1).to_string()]
    return "\n".join(lines)
