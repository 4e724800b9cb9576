"""SynthRef: expressions unique by construction, visible masks, disjoint splits, reproducible bytes."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from referseg.data import synthetic as sr
from referseg.data.synthetic import assign_splits, generate_synthref
from referseg.text import tokenize

N_IMAGES = 16


class BuiltinsOnly(pickle.Unpickler):
    """Refuses every class or function: the refs must be plain dicts, lists, str, int and float."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refs pickle references {module}.{name}")


def load_dataset(root: Path) -> tuple[dict, list[dict]]:
    instances = json.loads((root / "synthref" / "instances.json").read_text())
    data = (root / "synthref" / "refs(synth).p").read_bytes()
    refs = BuiltinsOnly(io.BytesIO(data), encoding="latin1").load()
    return instances, refs


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate_synthref(tmp_path_factory.mktemp("synth") / "synthref", seed=3, images=N_IMAGES, progress=False)


@pytest.fixture(scope="module")
def dataset(synth):
    return load_dataset(synth)


@pytest.fixture(scope="module")
def regions_by_image(synth, dataset) -> dict[int, list[dict]]:
    """Each image's regions recomputed from the files: category, colour, decoded mask, area, centroid."""
    instances, _ = dataset
    names = {c["id"]: (c["name"], c["supercategory"]) for c in instances["categories"]}
    regions: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        name, kind = names[ann["category_id"]]
        regions.setdefault(ann["image_id"], []).append({
            "ann_id": ann["id"], "category": name, "kind": kind, "colour": ann["colour"], "mask": mask,
            "area": int(mask.sum()), "centroid": ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h) if xs.size else None,
        })
    return regions


# --- an independent reading of the expressions -------------------------------------

def build_lexicon() -> dict[str, tuple[str, object]]:
    """Word -> (slot, meaning), from the word lists the generator draws from."""
    lexicon: dict[str, tuple[str, object]] = {}
    for category, phrases in sr.CATEGORY_WORDS.items():
        for phrase in phrases:
            for word in phrase.split():
                if word not in sr.FUNCTION_WORDS:
                    lexicon[word] = ("heads", frozenset([category]))
    for word in sr.THING_WORDS + sr.ODD_THING_WORDS:
        lexicon[word] = ("heads", frozenset(sr.THING_CATEGORIES))
    for word in sr.GROUND_WORDS:
        lexicon[word] = ("heads", frozenset(sr.GROUND_CATEGORIES))
    for colour in sr.THING_COLOURS:
        lexicon[colour] = ("colour", colour)
    for size, words in sr.SIZE_WORDS.items():
        lexicon.update({w: ("size", size) for w in words})
    for superlative, words in sr.SUPERLATIVE_WORDS.items():
        lexicon.update({w: ("superlative", superlative) for w in words})
    for word in ("left", "right", "middle", "top", "bottom"):
        lexicon[word] = ("position", word)
    for word in sr.FUNCTION_WORDS + sr.FILLER_WORDS:
        lexicon[word] = ("ignore", None)
    return lexicon


LEXICON = build_lexicon()
UNTYPO = {typo: word for word, typo in sr.TYPOS.items()}


def parse(expression: str) -> dict:
    """Meaning of an expression: candidate categories, colour, size, superlative, position words."""
    meaning: dict = {"heads": frozenset(sr.THING_CATEGORIES + sr.STUFF_CATEGORIES), "colour": None,
                     "size": None, "superlative": None, "position": []}
    for token in tokenize(expression):
        word = UNTYPO.get(token, token)
        assert word in LEXICON, f"{expression!r}: word {token!r} is in no word list"
        slot, value = LEXICON[word]
        if slot == "heads":
            meaning["heads"] = meaning["heads"] & value
        elif slot == "position":
            meaning["position"].append(value)
        elif slot != "ignore":
            assert meaning[slot] is None, f"{expression!r}: two {slot} words"
            meaning[slot] = value
    return meaning


def position_truth(word: str, centroid) -> bool | None:
    x, y = centroid
    if word == "middle":
        d = abs(x - 0.5)
        return True if d <= sr.POSITION_YES["middle"] else False if d >= sr.POSITION_NO["middle"] else None
    if word in ("left", "top"):
        v = x if word == "left" else y
        return True if v <= sr.POSITION_YES[word] else False if v >= sr.POSITION_NO[word] else None
    v = x if word == "right" else y
    return True if v >= sr.POSITION_YES[word] else False if v <= sr.POSITION_NO[word] else None


def relative_holds(meaning: dict, region: dict, peers: list[dict]) -> bool:
    if not peers:
        return False
    if meaning["size"] == "big":
        return all(region["area"] >= sr.SIZE_RATIO * p["area"] for p in peers)
    if meaning["size"] == "small":
        return all(sr.SIZE_RATIO * region["area"] <= p["area"] for p in peers)
    sup = meaning["superlative"]
    if sup == "biggest":
        return all(region["area"] >= sr.SUPERLATIVE_AREA_RATIO * p["area"] for p in peers)
    if sup == "smallest":
        return all(sr.SUPERLATIVE_AREA_RATIO * region["area"] <= p["area"] for p in peers)
    (x, y), margin = region["centroid"], sr.SUPERLATIVE_MARGIN
    test = {"leftmost": lambda p: p["centroid"][0] - x >= margin, "rightmost": lambda p: x - p["centroid"][0] >= margin,
            "highest": lambda p: p["centroid"][1] - y >= margin, "lowest": lambda p: y - p["centroid"][1] >= margin}
    return all(test[sup](p) for p in peers)


def referents(meaning: dict, regions: list[dict]) -> list[int]:
    """Indices of the regions the expression picks; with position words, those it may pick.

    Category and colour are exact. A position word counts as satisfied unless clearly false,
    so an expression is unique here only if every other region clearly fails it.
    Size and superlative words compare a region with the others of its class.
    """
    def in_class(r: dict) -> bool:
        return r["category"] in meaning["heads"] and (meaning["colour"] is None or r["colour"] == meaning["colour"])

    if meaning["size"] or meaning["superlative"]:
        members = [i for i, r in enumerate(regions) if in_class(r)]
        return [i for i in members
                if relative_holds(meaning, regions[i], [regions[j] for j in members if j != i])]
    return [i for i, r in enumerate(regions)
            if in_class(r) and all(position_truth(w, r["centroid"]) is not False for w in meaning["position"])]


def test_every_expression_picks_exactly_its_target(dataset, regions_by_image):
    _, refs = dataset
    checked = 0
    for ref in refs:
        regions = regions_by_image[ref["image_id"]]
        target = next(i for i, r in enumerate(regions) if r["ann_id"] == ref["ann_id"])
        for sentence in ref["sentences"]:
            meaning = parse(sentence["sent"])
            picked = referents(meaning, regions)
            assert picked == [target], (
                f"image {ref['image_id']}: {sentence['sent']!r} picks regions "
                f"{[(regions[i]['colour'], regions[i]['category']) for i in picked]}, target "
                f"{regions[target]['colour']} {regions[target]['category']}")
            for word in meaning["position"]:
                assert position_truth(word, regions[target]["centroid"]) is True, (sentence["sent"], word)
            checked += 1
    assert checked >= 5 * N_IMAGES


def test_type_tags_match_the_words(dataset, regions_by_image):
    _, refs = dataset
    types = Counter()
    for ref in refs:
        kind = next(r["kind"] for r in regions_by_image[ref["image_id"]] if r["ann_id"] == ref["ann_id"])
        for sentence in ref["sentences"]:
            meaning, tag = parse(sentence["sent"]), sentence["type"]
            types[tag] += 1
            assert (tag == "stuff") == (kind == "stuff"), sentence
            if tag == "position":
                assert meaning["position"], sentence
            elif tag in ("superlative", "size", "colour"):
                assert meaning[tag] and not meaning["position"], sentence
            elif tag == "category":
                assert not (meaning["colour"] or meaning["size"] or meaning["superlative"] or meaning["position"])
    assert set(types) == set(sr.EXPRESSION_TYPES), types
    things = sum(v for k, v in types.items() if k != "stuff")
    assert things > types["stuff"], "things must be referred to more often than stuff"


def test_refs_are_well_formed(dataset, regions_by_image):
    instances, refs = dataset
    anns = {a["id"]: a for a in instances["annotations"]}
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)
    assert len({r["ref_id"] for r in refs}) == len(refs)
    lengths = []
    for ref in refs:
        ann = anns[ref["ann_id"]]
        assert (ann["image_id"], ann["category_id"]) == (ref["image_id"], ref["category_id"])
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert 1 <= len(ref["sentences"]) <= 3
        for s in ref["sentences"]:
            assert s["tokens"] == tokenize(s["sent"]) and s["raw"] == s["sent"]
            lengths.append(len(s["tokens"]))
    assert 2.8 <= np.mean(lengths) <= 4.2, f"mean expression length {np.mean(lengths):.2f} tokens, ReferIt's is 3.54"
    supercategories = {c["name"]: c["supercategory"] for c in instances["categories"]}
    assert {supercategories[c] for c in sr.THING_CATEGORIES} == {"thing"}
    assert {supercategories[c] for c in sr.STUFF_CATEGORIES} == {"stuff"}


def colour_name(pixel: np.ndarray) -> str:
    """The THING_COLOURS name whose direction in RGB is nearest ``pixel``'s; grey by brightness."""
    names = list(sr.THING_COLOURS)
    palette = np.array([sr.THING_COLOURS[n] for n in names], float)
    unit = palette / np.linalg.norm(palette, axis=1, keepdims=True)
    pixel = np.asarray(pixel, float) + 1
    name = names[int(np.argmax(unit @ (pixel / np.linalg.norm(pixel))))]
    if name in ("white", "black"):
        name = "white" if pixel.mean() > 100 else "black"
    return name


def test_looks_paint_one_scene():
    """Both looks paint the same scene (so the same masks and expressions): the photo look draws
    from a generator of its own and leaves the image's generator where the flat look does."""
    for image_id in (1, 2, 3):
        flat_scene, flat, flat_rng = sr.synthref_image(5, image_id, "flat")
        photo_scene, photo, photo_rng = sr.synthref_image(5, image_id, "photo")
        assert [r.category for r in flat_scene.regions] == [r.category for r in photo_scene.regions]
        for a, b in zip(flat_scene.regions, photo_scene.regions, strict=True):
            assert np.array_equal(a.mask, b.mask)
        assert flat_rng.random() == photo_rng.random()
        assert flat.shape == photo.shape and not np.array_equal(flat, photo)
        # The flat look is version 1: no camera noise, so the sky's top row is smooth there only.
        assert np.abs(np.diff(photo[0].astype(int), axis=0)).mean() > np.abs(np.diff(flat[0].astype(int), axis=0)).mean()
        again = sr.synthref_image(5, image_id, "photo")[1]
        assert np.array_equal(photo, again)
    scene = sr.synthref_image(5, 1, "flat")[0]
    with pytest.raises(ValueError, match="look_rng"):
        sr.render_scene(scene, np.random.default_rng(0), "photo")
    with pytest.raises(ValueError, match="unknown SynthRef look 'glossy'"):
        sr.render_scene(scene, np.random.default_rng(0), "glossy")


def test_photo_look_shades_things_in_the_scene_light():
    """A thing's photo-look pixels vary more than its flat ones (texture and a second tone), and
    every thing casts a shadow: some stuff pixels of the photo look are darker than the flat
    look's same pixels by more than the light's gradient and the noise explain."""
    spread = {"flat": [], "photo": []}
    darker = []
    for image_id in range(1, 7):
        scene, flat, _ = sr.synthref_image(0, image_id, "flat")
        photo = sr.synthref_image(0, image_id, "photo")[1]
        for region in scene.things:
            for look, pixels in (("flat", flat), ("photo", photo)):
                spread[look].append(pixels[region.mask].astype(float).mean(1).std())
        stuff = np.zeros(flat.shape[:2], bool)
        for region in scene.regions:
            if region.kind == "stuff":
                stuff |= region.mask
        ratio = photo[stuff].astype(float).mean(1) / np.maximum(flat[stuff].astype(float).mean(1), 1)
        darker.append(np.mean(ratio < 1 - sr.LIGHT_GRADIENT - 0.15))
    assert np.median(spread["photo"]) > np.median(spread["flat"])
    assert min(darker) > 0.002, darker


def test_masks_are_the_visible_pixels(synth, dataset, regions_by_image):
    instances, _ = dataset
    anns = {a["id"]: a for a in instances["annotations"]}
    for image in instances["images"]:
        assert (image["width"], image["height"]) in sr.IMAGE_SIZES
        pixels = np.asarray(Image.open(synth / "images" / "synthref" / image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3) and pixels.dtype == np.uint8
        regions = regions_by_image[image["id"]]
        assert any(r["category"] == "sky" for r in regions)
        assert sr.THINGS_PER_IMAGE[0] <= sum(r["kind"] == "thing" for r in regions) <= sr.THINGS_PER_IMAGE[1]
        covered = np.zeros(pixels.shape[:2], int)
        for region in regions:
            ann, mask = anns[region["ann_id"]], region["mask"]
            assert isinstance(ann["segmentation"]["counts"], str)
            assert mask.shape == pixels.shape[:2] and mask.any()
            assert ann["area"] == region["area"]
            assert np.allclose(ann["bbox"], mask_utils.toBbox(ann["segmentation"]))
            covered += mask
            if region["kind"] == "thing":
                fraction = region["area"] / mask.size
                assert sr.THING_AREA_RANGE[0] <= fraction <= sr.THING_AREA_RANGE[1], fraction
                # What shows inside a thing's mask is that thing: under the photo look's light,
                # shadow and texture its median pixel still has its colour's hue (white and black,
                # which share one, told apart by brightness).
                seen = colour_name(np.median(pixels[mask].astype(float), 0))
                assert seen == region["colour"], f"image {image['id']}: a {region['colour']} thing looks {seen}"
        assert covered.max() == 1, f"image {image['id']}: regions overlap"


def test_splits_are_disjoint_by_image(dataset):
    instances, refs = dataset
    split_of_image: dict[int, str] = {}
    for ref in refs:
        assert split_of_image.setdefault(ref["image_id"], ref["split"]) == ref["split"]
    assert set(split_of_image.values()) == {"train", "val", "test"}
    for n in (1, 2, 3, 4, 12, 600):
        splits = assign_splits(list(range(1, n + 1)), seed=0)
        assert sorted(splits) == list(range(1, n + 1))
        counts = Counter(splits.values())
        if n >= 3:
            assert all(counts[s] >= 1 for s in ("train", "val", "test")), (n, counts)
        assert counts["train"] >= counts["test"] >= counts["val"]
    assert Counter(assign_splits(list(range(600)), seed=5).values()) == {"train": 420, "val": 60, "test": 120}


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    again = generate_synthref(tmp_path / "again", seed=3, images=N_IMAGES, progress=False)
    assert file_hashes(again) == file_hashes(synth)
    other = generate_synthref(tmp_path / "other", seed=4, images=N_IMAGES, progress=False)
    hashes = file_hashes(other)
    assert hashes.keys() == file_hashes(synth).keys()
    assert hashes["synthref/instances.json"] != file_hashes(synth)["synthref/instances.json"]
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_existing_output_is_reused_or_refused(tmp_path):
    out = generate_synthref(tmp_path / "d", seed=1, images=3, progress=False)
    stamp = (out / "synthref" / "instances.json").stat().st_mtime_ns
    assert generate_synthref(out, seed=1, images=3, progress=False) == out
    assert (out / "synthref" / "instances.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="different SynthRef.*another --out"):
        generate_synthref(out, seed=2, images=3, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no complete SynthRef"):
        generate_synthref(tmp_path / "foreign", seed=1, images=3)
    with pytest.raises(ValueError, match="positive integer"):
        generate_synthref(tmp_path / "zero", images=0)


def test_an_older_version_of_the_same_synthref_is_replaced_whole(tmp_path):
    """Our own output of an older generator (same seed and size) is regenerated in place; a newer
    or unknown version is refused, as anything else is."""
    out = generate_synthref(tmp_path / "d", seed=1, images=3, progress=False)
    current = (out / "synthref" / "instances.json").read_bytes()
    meta_file = out / "synthref" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "version": sr.SYNTHREF_VERSION - 1}))
    (out / "synthref" / "instances.json").write_text("{}")  # what version 1 wrote, say
    assert generate_synthref(out, seed=1, images=3, progress=False) == out
    assert json.loads(meta_file.read_text()) == meta
    assert (out / "synthref" / "instances.json").read_bytes() == current
    assert not list(tmp_path.glob(".d.*"))  # neither the partial nor the old copy is left
    meta_file.write_text(json.dumps({**meta, "version": sr.SYNTHREF_VERSION + 1}))
    with pytest.raises(FileExistsError, match="different SynthRef"):
        generate_synthref(out, seed=1, images=3, progress=False)


def test_refer_loader_reads_it(synth, dataset):
    refer_module = pytest.importorskip("referseg.data.refer", reason="the REFER loader is not written yet")
    refer = refer_module.Refer(synth, "synthref", "synth")
    _, refs = dataset
    pairs = refer.pairs("test")
    assert len(pairs) == sum(len(r["sentences"]) for r in refs if r["split"] == "test")
    first = pairs[0]
    assert first.type in sr.EXPRESSION_TYPES
    image = refer.load_image(first.image_id)
    assert refer.load_mask(first.ann_id).shape == image.shape[:2]
