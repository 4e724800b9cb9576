"""SynthRef: the generated default dataset, written in the REFER format (DESIGN "SynthRef").

ReferIt cannot be downloaded here, so the book runs on scenes that keep the properties
that matter to the method: ReferIt's image sizes, "stuff" regions (sky, grass, gravel,
brick, water; the ground textures are scikit-image's bundled CC0 photographs) and
"things" (shapes of several categories, colours and sizes, possibly overlapping; masks
are the visible pixels), and short expressions (about 3.5 tokens) that single out their
target among distractors by construction.

The generator is three steps, one function each:

1. :func:`sample_scene` draws a scene description: image size, stuff bands and things
   with their category, colour and visible mask.
2. :func:`render_scene` paints the pixels of that description, in one of two looks:
   ``"flat"`` (version 1: things are shapes of one colour, smoothly shaded, with a dark
   rim) or ``"photo"`` (version 2, the dataset's: things carry a photograph's texture
   and a second tone, every thing casts a soft shadow in the scene's light, and the
   camera blurs and adds noise). The look's random numbers come from a generator of
   their own, so both looks paint the same scene and their masks are identical.
3. :func:`describe_region` writes 1-3 expressions per region. Each expression is a
   :class:`Spec` (category, colour, size, position, superlative) that is true of the
   target and clearly false of every other region (:func:`spec_is_unique`), then put
   into words by :func:`realize`.

:func:`generate_synthref` runs the three steps per image and writes
``images/synthref/<id>.png``, ``synthref/instances.json``, ``synthref/refs(synth).p``
and ``synthref/meta.json``. Splits are disjoint by image: 70% train, 10% val, 20% test
(rounded; with 3 or more images each split gets at least one; with 1 or 2 images,
the first goes to train and the second to test).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from referseg.io import atomic_write_bytes, atomic_write_text
from referseg.text import tokenize

SYNTHREF_VERSION = 2  # bump whenever the generated files change for a given seed (2: the photo look)
DATASET_NAME = "synthref"
SPLIT_BY = "synth"
PNG_COMPRESS_LEVEL = 1  # fast; fixed so the bytes are reproducible

# ReferIt's image sizes (SPEC 2) as (width, height), with how often we draw each.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((480, 360), (360, 480), (480, 320), (320, 480))
IMAGE_SIZE_WEIGHTS = (0.6, 0.25, 0.1, 0.05)
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}

THING_CATEGORIES = ("circle", "square", "triangle", "star", "cross", "diamond")
STUFF_CATEGORIES = ("sky", "grass", "gravel", "brick", "water")
GROUND_CATEGORIES = ("grass", "gravel", "brick")  # what "ground" may name (not water)
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(THING_CATEGORIES + STUFF_CATEGORIES)}

THING_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (45, 165, 60),
    "blue": (40, 75, 205),
    "yellow": (235, 205, 35),
    "white": (238, 238, 238),
    "black": (32, 32, 34),
    "purple": (135, 55, 170),
    "orange": (245, 135, 25),
}
STUFF_COLOURS = {"sky": "blue", "grass": "green", "water": "blue", "gravel": None, "brick": None}

# Things' visible area as a fraction of the image: large enough for a 16x16 grid.
THING_AREA_RANGE = (0.02, 0.25)
THING_DRAW_AREA = (0.03, 0.2)  # full (unoccluded) area drawn log-uniformly in this range
THING_MIN_VISIBLE = 0.6  # an occluded thing keeps at least this fraction of its shape
THINGS_PER_IMAGE = (2, 5)
STUFF_MIN_AREA = 0.01  # stuff regions smaller than this are dropped

# "Clearly" thresholds on normalised centroids (x right, y down, both in [0, 1]):
# a position word is emitted only when it is true of the target (``yes``) and
# clearly false (``no``) of every other candidate.
POSITION_YES = {"left": 0.35, "right": 0.65, "top": 0.35, "bottom": 0.65, "middle": 0.10}
POSITION_NO = {"left": 0.45, "right": 0.55, "top": 0.45, "bottom": 0.55, "middle": 0.20}
SIZE_RATIO = 1.6  # "big X": its area is at least this times every other X's
SUPERLATIVE_AREA_RATIO = 1.3  # "biggest X": at least this times the next biggest
SUPERLATIVE_MARGIN = 0.08  # "leftmost X": centroid at least this far from the next one

# Words. The checker in tests inverts these tables, so every word emitted is listed here.
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circle", "ball", "disc"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "cross", "plus"),
    "diamond": ("diamond",),
    "sky": ("sky",),
    "grass": ("grass", "grass", "lawn"),
    "gravel": ("gravel", "stones", "rocks"),
    "brick": ("bricks", "brick floor", "pavement"),
    "water": ("water", "sea", "lake"),
}
THING_WORDS = ("one", "one", "thing", "shape", "object")  # any thing
GROUND_WORDS = ("ground",)  # any of GROUND_CATEGORIES
SIZE_WORDS = {"big": ("big", "large"), "small": ("small", "little")}
SUPERLATIVE_WORDS = {
    "leftmost": ("leftmost",),
    "rightmost": ("rightmost",),
    "highest": ("highest", "topmost"),
    "lowest": ("lowest", "bottommost"),
    "biggest": ("biggest", "largest"),
    "smallest": ("smallest",),
}
PICTURE_WORDS = ("picture", "image", "photo")
FUNCTION_WORDS = ("the", "on", "at", "in", "of", "side", "floor") + PICTURE_WORDS
NOISE_RATE = 0.06  # share of expressions with a typo, a filler or an odd word
FILLER_WORDS = ("um", "uh", "er")
ODD_THING_WORDS = ("thingy", "whatsit")
TYPOS = {
    "circle": "cirlce", "square": "sqaure", "triangle": "triangel", "yellow": "yelow",
    "purple": "purpel", "orange": "ornage", "left": "lft", "right": "rigth",
    "bottom": "botom", "water": "watr", "diamond": "diamon", "biggest": "bigest",
}

THING_TYPES = ("category", "colour", "size", "position", "superlative")
EXPRESSION_TYPES = THING_TYPES + ("stuff",)
TYPE_WEIGHTS = {"category": 2.0, "colour": 1.2, "size": 1.5, "position": 1.3, "superlative": 0.7}
STUFF_REFER_PROBABILITY = 0.45  # things are referred to more often than stuff, as in ReferIt


# --- 1. scene description ---------------------------------------------------------

@dataclass
class Region:
    """One annotated region: its identity and its VISIBLE mask."""

    kind: str  # "thing" or "stuff"
    category: str
    colour: str | None
    mask: np.ndarray  # bool HxW, visible pixels
    area: int = 0
    centroid: tuple[float, float] = (0.0, 0.0)  # normalised (x, y)
    draw: dict = field(default_factory=dict)  # rendering parameters: a thing's outline polygon

    def update_geometry(self) -> None:
        """Recompute area and centroid from the visible mask."""
        h, w = self.mask.shape
        columns = np.count_nonzero(self.mask, axis=0)  # pixels per column, then per row
        rows = np.count_nonzero(self.mask, axis=1)
        self.area = int(columns.sum())
        # mean x = (sum of x over the pixels) / area: exact integer sums, one division
        self.centroid = ((float(columns @ np.arange(w) / self.area + 0.5) / w,
                          float(rows @ np.arange(h) / self.area + 0.5) / h) if self.area else (0.5, 0.5))


@dataclass
class Scene:
    """A scene description: image size and regions (stuff first, things bottom to top)."""

    image_id: int
    width: int
    height: int
    regions: list[Region]

    @property
    def things(self) -> list[Region]:
        return [r for r in self.regions if r.kind == "thing"]


def _unit_polygon(category: str) -> np.ndarray:
    """Outline of a shape centred at 0 with radius about 1, as (N, 2) x/y points."""
    if category == "circle":
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if category == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if category == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(a), np.sin(a)], 1)
    if category == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if category == "cross":
        t = 0.36
        return np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1],
                         [-t, t], [-1, t], [-1, -t], [-t, -t]], float)
    if category == "diamond":
        return np.array([[0, -1], [0.68, 0], [0, 1], [-0.68, 0]], float)
    raise ValueError(f"unknown thing category {category!r}; known: {', '.join(THING_CATEGORIES)}")


_ROTATION_DEGREES = {"circle": 0, "square": 12, "triangle": 18, "star": 36, "cross": 12, "diamond": 8}


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_polygon(rng: np.random.Generator, category: str, width: int, height: int) -> np.ndarray:
    """A shape of ``category`` with a random size, rotation and position fully inside the image."""
    unit = _unit_polygon(category)
    angle = np.deg2rad(rng.uniform(-1, 1) * _ROTATION_DEGREES[category])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lo, hi = THING_DRAW_AREA
    target = np.exp(rng.uniform(np.log(lo), np.log(hi))) * width * height
    points = unit @ rot.T * np.sqrt(target / _polygon_area(unit))
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    cx = rng.uniform(-x0 + 1, width - x1 - 1)
    cy = rng.uniform(-y0 + 1, height - y1 - 1)
    return points + np.array([cx, cy])


def _fill_polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.view(bool)


def _polygon_box(points: np.ndarray, width: int, height: int) -> tuple[slice, slice]:
    """(rows, columns) of the image holding every pixel that ``_fill_polygon(points)`` may set."""
    x0, y0 = np.round(points).astype(np.int32).min(0)
    x1, y1 = np.round(points).astype(np.int32).max(0) + 1
    return slice(max(int(y0), 0), min(int(y1), height)), slice(max(int(x0), 0), min(int(x1), width))


def _wavy_boundary(rng: np.random.Generator, width: int, level: float, amplitude: float) -> np.ndarray:
    """Row index of a gently wavy horizontal boundary, one value per column."""
    x = np.arange(width)
    period = rng.uniform(0.6, 1.6) * width
    y = level + amplitude * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
    y += 0.35 * amplitude * np.sin(2 * np.pi * x / (period / 3.1) + rng.uniform(0, 2 * np.pi))
    return y


def sample_scene(rng: np.random.Generator, image_id: int) -> Scene:
    """Draw a scene description: size, stuff bands (sky, ground) and 2-5 things with visible masks."""
    width, height = IMAGE_SIZES[rng.choice(len(IMAGE_SIZES), p=IMAGE_SIZE_WEIGHTS)]
    rows = np.arange(height)[:, None]

    # Stuff: sky above a wavy horizon; one ground band, or a far band (water or grass)
    # in front of which lies a near band of another ground.
    horizon = _wavy_boundary(rng, width, rng.uniform(0.3, 0.55) * height, rng.uniform(0.0, 0.05) * height)
    if rng.random() < 0.4:
        far = str(rng.choice(["water", "grass"]))
        near = str(rng.choice([c for c in ("grass", "gravel", "brick") if c != far]))
        split_level = horizon.mean() + rng.uniform(0.25, 0.5) * (height - horizon.mean())
        middle = np.maximum(_wavy_boundary(rng, width, split_level, 0.03 * height), horizon + 4)
        bands = [("sky", None, horizon), (far, horizon, middle), (near, middle, None)]
    else:
        ground = str(rng.choice(["grass", "gravel", "brick", "water"], p=[0.35, 0.25, 0.15, 0.25]))
        bands = [("sky", None, horizon), (ground, horizon, None)]
    stuff: list[Region] = []
    for category, top, bottom in bands:
        mask = np.ones((height, width), bool)
        if top is not None:
            mask &= rows >= top[None, :]
        if bottom is not None:
            mask &= rows < bottom[None, :]
        stuff.append(Region("stuff", category, STUFF_COLOURS[category], mask))

    # Things: a few categories and colours per image, so that distractors share them.
    n_things = int(rng.integers(THINGS_PER_IMAGE[0], THINGS_PER_IMAGE[1] + 1))
    categories = rng.choice(THING_CATEGORIES, size=int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35])), replace=False)
    colours = rng.choice(list(THING_COLOURS), size=int(rng.integers(2, 5)), replace=False)
    image_area = width * height
    min_visible = THING_AREA_RANGE[0] * image_area
    things: list[Region] = []
    full_areas: list[int] = []
    visible_areas: list[int] = []
    for _ in range(60):
        if len(things) == n_things:
            break
        category = str(rng.choice(categories))
        points = _shape_polygon(rng, category, width, height)
        shape = _fill_polygon(points, width, height)
        box = _polygon_box(points, width, height)  # the new shape hides pixels inside its box only
        hidden = [int(np.count_nonzero(t.mask[box] & shape[box])) for t in things]
        if all(visible - lost >= max(THING_MIN_VISIBLE * full, min_visible)
               for visible, lost, full in zip(visible_areas, hidden, full_areas, strict=True)):
            for index, (thing, lost) in enumerate(zip(things, hidden, strict=True)):
                thing.mask[box] &= ~shape[box]
                visible_areas[index] -= lost
            things.append(Region("thing", category, str(rng.choice(colours)), shape,
                                 draw={"polygon": points}))
            full_areas.append(int(np.count_nonzero(shape[box])))
            visible_areas.append(full_areas[-1])

    covered = np.zeros((height, width), bool)
    for thing in things:
        covered |= thing.mask
    regions = []
    for region in stuff:
        region.mask &= ~covered
        if np.count_nonzero(region.mask) >= STUFF_MIN_AREA * image_area:
            regions.append(region)
    regions.extend(things)
    for region in regions:
        region.update_geometry()
    return Scene(image_id, width, height, regions)


# --- 2. rendering --------------------------------------------------------------------

_TEXTURE_TINTS = {  # dark and light RGB a grey photograph is mapped between
    "grass": ((18, 42, 8), (150, 205, 75)),
    "gravel": ((55, 50, 45), (205, 195, 178)),
    "brick": ((65, 22, 18), (205, 118, 90)),
}


@functools.cache
def _texture(name: str) -> np.ndarray:
    """A tinted 512x512x3 float32 texture from scikit-image's bundled CC0 photos.

    Falls back to smooth noise if this scikit-image version lacks the photo.
    """
    try:
        from skimage import data as skdata

        grey = np.asarray(getattr(skdata, name)(), np.float32) / 255.0
        if grey.ndim == 3:
            grey = grey[..., :3].mean(-1)
    except Exception:  # missing file or function: a synthetic stand-in keeps generation offline
        noise_rng = np.random.default_rng(CATEGORY_IDS[name])
        grey = sum(cv2.resize(noise_rng.random((s, s), np.float32), (512, 512), interpolation=cv2.INTER_CUBIC)
                   / 2 ** i for i, s in enumerate((16, 64, 256)))
        grey = (grey - grey.min()) / (grey.max() - grey.min())
    lo, hi = (np.array(c, np.float32) for c in _TEXTURE_TINTS[name])
    tinted = lo + grey[..., None] * (hi - lo)
    tinted.flags.writeable = False  # shared by every image
    return tinted


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: tuple[int, int],
                  band: slice = slice(None)) -> np.ndarray:
    """Low-frequency noise in [0, 1] of shape (height, width), from a (rows, cols) grid; only the
    rows of ``band`` are returned (the noise is drawn for the whole image all the same)."""
    grid = rng.random(cells).astype(np.float32)
    return np.clip(cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)[band], 0, 1)


# Each painter returns the rows ``band`` of a whole-image painting: the random numbers are drawn
# for the whole image, so the pixels do not depend on which rows are painted.

def _paint_sky(rng: np.random.Generator, width: int, height: int, horizon: float, band: slice) -> np.ndarray:
    t = np.clip(np.arange(height, dtype=np.float32)[band] / max(horizon, 1.0), 0, 1)[:, None, None]
    top = np.array([45, 95, 190], np.float32) * rng.uniform(0.85, 1.1)
    low = np.array([165, 200, 238], np.float32)
    sky = top + t * (low - top)  # (rows, 1, 3): one colour per row
    # Cells wider than tall give flat clouds in either orientation.
    coarse = (max(2, height // 60), max(2, width // 80))
    fine = (max(2, height // 22), max(2, width // 30))
    clouds = (0.65 * _smooth_noise(rng, width, height, coarse, band)
              + 0.35 * _smooth_noise(rng, width, height, fine, band))
    amount = np.clip((clouds - rng.uniform(0.45, 0.62)) * 3.0, 0, 0.85)[..., None]
    return sky + amount * (np.float32(245) - sky)


def _paint_water(rng: np.random.Generator, width: int, height: int, band: slice) -> np.ndarray:
    rows = np.arange(height, dtype=np.float32)[band, None]
    warp = _smooth_noise(rng, width, height, (max(2, height // 10), max(2, width // 60)), band)
    waves = np.sin(2 * np.pi * (rows / rng.uniform(5, 9) + 1.5 * warp))
    base = np.array([28, 78, 140], np.float32) * rng.uniform(0.85, 1.15)
    shade = 1.0 + 0.12 * waves + 0.08 * (rng.random((height, width), np.float32)[band] - 0.5)
    water = base * shade[..., None]
    glint = (waves > 0.93) & (rng.random((height, width))[band] < 0.3)
    water[glint] = 0.5 * water[glint] + 0.5 * np.float32(230)
    return water


def _paint_ground(rng: np.random.Generator, category: str, width: int, height: int, squash: float) -> np.ndarray:
    """A random crop of a ground photo, squashed vertically for distance."""
    texture = _texture(category)
    crop_h = min(512, max(1, int(round(height * squash))))
    crop_w = min(512, width)
    y0 = int(rng.integers(0, 512 - crop_h + 1))
    x0 = int(rng.integers(0, 512 - crop_w + 1))
    crop = texture[y0:y0 + crop_h, x0:x0 + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_AREA)
    return crop * np.float32(rng.uniform(0.85, 1.1))


def _paint_thing(rng: np.random.Generator, region: Region, canvas: np.ndarray) -> None:
    """Shade the thing's colour (light from the top left, fine grain, dark rim) onto its visible pixels."""
    points = region.draw["polygon"]
    x0, y0 = np.floor(points.min(0)).astype(int)
    x1, y1 = np.ceil(points.max(0)).astype(int) + 1
    h, w = canvas.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    box = region.mask[y0:y1, x0:x1]
    centre = points.mean(0)
    radius = max(float(np.abs(points - centre).max()), 1.0)
    grain = 10 * (rng.random(box.shape, np.float32) - 0.5)  # drawn for the whole box
    visible = np.flatnonzero(box)  # the only pixels painted, as indices into the box
    ys, xs = np.divmod(visible, box.shape[1])
    dx = (xs + x0).astype(np.float32) - (centre[0] - 0.35 * radius)
    dy = (ys + y0).astype(np.float32) - (centre[1] - 0.35 * radius)
    dist = np.hypot(dx, dy) / (1.6 * radius)
    shade = 1.18 - 0.5 * np.clip(dist, 0, 1)
    highlight = 55 * np.clip(1 - dist / 0.35, 0, 1) ** 2
    colour = np.array(THING_COLOURS[region.colour], np.float32)
    pixels = colour * shade[:, None] + (highlight + grain.reshape(-1)[visible])[:, None]
    full = _fill_polygon(points - [x0, y0], x1 - x0, y1 - y0)
    rim = full & ~cv2.erode(full.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    pixels[rim.reshape(-1)[visible]] *= 0.6
    canvas[ys + y0, xs + x0] = pixels


# The photo look (version 2). Object textures come from scikit-image's bundled CC0 /
# no-restriction photographs that the book never shows as photographs (chapter 10 uses
# the astronaut, the rocket and the coffee, which stay out of training).
THING_TEXTURES = ("chelsea", "camera", "cell", "coins")
TEXTURE_CONTRAST = 0.22  # std of the texture's multiplicative shading
TWO_TONE_PROBABILITY = 0.6  # a thing has a second part: darker (a side) or lighter (a panel)
SHADOW_STRENGTH = (0.35, 0.55)  # share of the light a shadow takes from what lies under it
SHADOW_OFFSET = (0.12, 0.3)  # shadow shift as a fraction of the thing's radius
LIGHT_GRADIENT = 0.12  # +-12% illumination across the image, along the light's direction
CAMERA_BLUR_SIGMA = 0.8  # pixels: focus and lens softness, which blunts every edge
CAMERA_NOISE_SIGMA = 2.5  # grey levels of sensor noise


@functools.cache
def _thing_texture(name: str) -> np.ndarray:
    """A grey photograph with zero mean and unit standard deviation (float32, read-only).

    Falls back to smooth noise if this scikit-image version lacks the photo.
    """
    try:
        from skimage import data as skdata

        grey = np.asarray(getattr(skdata, name)(), np.float32)
        if grey.ndim == 3:
            grey = grey[..., :3].mean(-1)
    except Exception:  # missing file or function: a synthetic stand-in keeps generation offline
        noise_rng = np.random.default_rng(THING_TEXTURES.index(name) + 100)
        grey = sum(cv2.resize(noise_rng.random((s, s), np.float32), (512, 512), interpolation=cv2.INTER_CUBIC)
                   / 2 ** i for i, s in enumerate((16, 64, 256)))
    grey = (grey - grey.mean()) / max(float(grey.std()), 1e-6)
    grey.flags.writeable = False
    return grey


@dataclass(frozen=True)
class Light:
    """One scene's light: where it comes from (a unit vector in the image plane, pointing from
    the light to the scene, so shadows fall along it) and how strongly it shades."""

    direction: tuple[float, float]
    shadow: float  # SHADOW_STRENGTH drawn once per scene

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Light:
        angle = np.deg2rad(rng.uniform(30, 150))  # from above, left or right: shadows fall down and sideways
        return cls((float(np.cos(angle)), float(np.sin(angle))), float(rng.uniform(*SHADOW_STRENGTH)))


def _texture_patch(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random crop of one of THING_TEXTURES, zoomed to ``shape`` (rows, columns)."""
    texture = _thing_texture(THING_TEXTURES[int(rng.integers(len(THING_TEXTURES)))])
    h, w = shape
    zoom = rng.uniform(0.6, 1.6)  # texture pixels per image pixel
    ch = int(min(texture.shape[0], max(2, round(h * zoom))))
    cw = int(min(texture.shape[1], max(2, round(w * zoom))))
    y0 = int(rng.integers(0, texture.shape[0] - ch + 1))
    x0 = int(rng.integers(0, texture.shape[1] - cw + 1))
    return cv2.resize(np.ascontiguousarray(texture[y0:y0 + ch, x0:x0 + cw]), (w, h), interpolation=cv2.INTER_LINEAR)


def _cast_shadow(canvas: np.ndarray, region: Region, light: Light) -> None:
    """Darken what lies under ``region``'s shadow: its outline shifted along the light and blurred.

    Called just before the thing is painted, so the shadow falls on the stuff and on the
    things below it, and the thing itself (painted next) covers its own part of it.
    """
    points = region.draw["polygon"]
    h, w = canvas.shape[:2]
    radius = max(float(np.abs(points - points.mean(0)).max()), 1.0)
    offset = np.array(light.direction) * region.draw["shadow_offset"] * radius
    blur = 0.08 * radius + 1.5
    rows, cols = _polygon_box(points + offset, w, h)
    pad = int(3 * blur) + 1
    rows = slice(max(rows.start - pad, 0), min(rows.stop + pad, h))
    cols = slice(max(cols.start - pad, 0), min(cols.stop + pad, w))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return  # the shadow falls outside the image
    shadow = _fill_polygon(points + offset - [cols.start, rows.start], cols.stop - cols.start,
                           rows.stop - rows.start).astype(np.float32)
    soft = cv2.GaussianBlur(shadow, (0, 0), blur)
    canvas[rows, cols] *= (1 - light.shadow * soft)[..., None]


def _paint_photo_thing(rng: np.random.Generator, look: np.random.Generator, region: Region,
                       canvas: np.ndarray) -> None:
    """The photo look of a thing: its colour (a little varied), a photograph's texture, a
    second tone on one part, and light from the scene's side; no drawn rim."""
    points = region.draw["polygon"]
    x0, y0 = np.floor(points.min(0)).astype(int)
    x1, y1 = np.ceil(points.max(0)).astype(int) + 1
    h, w = canvas.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    box = region.mask[y0:y1, x0:x1]
    centre = points.mean(0)
    radius = max(float(np.abs(points - centre).max()), 1.0)
    grain = 10 * (rng.random(box.shape, np.float32) - 0.5)  # the flat look's draw, kept for its sequence
    visible = np.flatnonzero(box)
    ys, xs = np.divmod(visible, box.shape[1])
    px = (xs + x0).astype(np.float32)
    py = (ys + y0).astype(np.float32)
    light = region.draw["light"]
    # Light from the light's side: brighter towards it, darker away from it.
    along = ((px - centre[0]) * light.direction[0] + (py - centre[1]) * light.direction[1]) / radius
    shade = 1.06 - 0.15 * np.clip(along, -1, 1)  # about the palette colour on average, as the words say
    texture = _texture_patch(look, box.shape).reshape(-1)[visible]
    shade *= np.clip(1 + TEXTURE_CONTRAST * texture, 0.6, 1.4)
    colour = np.array(THING_COLOURS[region.colour], np.float32)
    colour = colour * look.uniform(0.93, 1.07) * look.uniform(0.96, 1.04, 3).astype(np.float32)
    pixels = colour * shade[:, None] + grain.reshape(-1)[visible][:, None] * 0.5
    # Highlights keep their hue: a pixel whose brightest channel would clip is scaled down whole.
    pixels *= np.minimum(1, 250 / np.maximum(pixels.max(1, keepdims=True), 1))
    if look.random() < TWO_TONE_PROBABILITY:
        # A second part: the pixels on one side of a line through the thing, or a band across it.
        angle = look.uniform(0, np.pi)
        normal = np.array([np.cos(angle), np.sin(angle)], np.float32)
        t = ((px - centre[0]) * normal[0] + (py - centre[1]) * normal[1]) / radius
        cut = look.uniform(-0.3, 0.3)
        if look.random() < 0.5:  # a darker side: the half beyond the line
            part = t > cut
            pixels[part] *= np.float32(look.uniform(0.7, 0.85))
        else:  # a lighter band across the thing, narrow enough to leave its colour the main one
            part = np.abs(t - cut) < look.uniform(0.1, 0.22)
            pixels[part] += np.float32(look.uniform(0.15, 0.3)) * (np.float32(250) - pixels[part])
    canvas[ys + y0, xs + x0] = pixels


def _camera(look: np.random.Generator, canvas: np.ndarray, light: Light) -> np.ndarray:
    """Illumination across the image, lens blur and sensor noise (float32 in, float32 out)."""
    h, w = canvas.shape[:2]
    across = (np.arange(w, dtype=np.float32) / w - 0.5) * 2 * light.direction[0]
    down = (np.arange(h, dtype=np.float32) / h - 0.5) * 2 * light.direction[1]
    canvas *= (1 - LIGHT_GRADIENT * np.clip(down[:, None] + across[None, :], -1, 1))[..., None]
    canvas = cv2.GaussianBlur(canvas, (0, 0), CAMERA_BLUR_SIGMA)
    canvas += np.float32(CAMERA_NOISE_SIGMA) * look.standard_normal(canvas.shape, dtype=np.float32)
    return canvas


def _copy_pixels(canvas: np.ndarray, paint: np.ndarray, where: np.ndarray) -> None:
    """``canvas[where] = paint[where]`` for (H, W, 3) float32 images and an (H, W) mask, each RGB pixel
    moved as one 12-byte item: several times faster than ``np.copyto`` with the mask broadcast over RGB."""
    pixel = np.dtype((np.void, 3 * np.dtype(np.float32).itemsize))
    np.copyto(canvas.view(pixel)[..., 0], np.ascontiguousarray(paint, np.float32).view(pixel)[..., 0], where=where)


LOOKS = ("flat", "photo")
LOOK = "photo"  # the dataset's look (SYNTHREF_VERSION 2); "flat" paints version 1's pixels


def render_scene(scene: Scene, rng: np.random.Generator, look: str = LOOK,
                 look_rng: np.random.Generator | None = None) -> np.ndarray:
    """Paint a scene description: uint8 HxWx3 RGB whose regions are exactly the scene's masks.

    ``rng`` draws the same numbers in both looks; the photo look draws its own from
    ``look_rng`` (required for it), so a scene rendered in both looks differs in pixels only.
    """
    if look not in LOOKS:
        raise ValueError(f"unknown SynthRef look {look!r}; known: {', '.join(LOOKS)}")
    if look == "photo" and look_rng is None:
        raise ValueError("the photo look draws from a generator of its own: pass look_rng")
    w, h = scene.width, scene.height
    canvas = np.zeros((h, w, 3), np.float32)
    for region in scene.regions:
        if region.kind != "stuff":
            continue
        ys = np.nonzero(region.mask.any(1))[0]
        top, bottom = int(ys[0]), int(ys[-1]) + 1
        band = slice(top, bottom)  # the rows the region covers: the only ones painted
        if region.category == "sky":
            paint = _paint_sky(rng, w, h, float(bottom), band)
        elif region.category == "water":
            paint = _paint_water(rng, w, h, band)
        else:
            squash = 2.0 if bottom < h else 1.0  # a far band shows more ground per row
            paint = _paint_ground(rng, region.category, w, bottom - top, squash)
        _copy_pixels(canvas[band], paint, region.mask[band])
    if look == "flat":
        for region in scene.things:
            _paint_thing(rng, region, canvas)
    else:
        light = Light.draw(look_rng)
        for region in scene.things:
            region.draw["light"] = light
            region.draw["shadow_offset"] = float(look_rng.uniform(*SHADOW_OFFSET))
            _cast_shadow(canvas, region, light)
            _paint_photo_thing(rng, look_rng, region, canvas)
        canvas = _camera(look_rng, canvas, light)
    canvas += 0.5
    return np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)


def synthref_image(seed: int, image_id: int, look: str = LOOK) -> tuple[Scene, np.ndarray, np.random.Generator]:
    """Image ``image_id`` of the SynthRef of ``seed``: its scene, its pixels in ``look``, and the
    image's generator where the expressions continue drawing (both looks leave it in one state)."""
    rng = _image_rng(seed, image_id)
    scene = sample_scene(rng, image_id)
    pixels = render_scene(scene, rng, look, np.random.default_rng(np.random.SeedSequence([seed, image_id, 1])))
    return scene, pixels, rng


# --- 3. expressions ----------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """What an expression says about its target; ``head`` "thing" means any thing."""

    type: str
    head: str  # a category, "thing" or "ground"
    colour: str | None = None
    size: str | None = None  # "big" | "small"
    horizontal: str | None = None  # "left" | "right" | "middle"
    vertical: str | None = None  # "top" | "bottom"
    superlative: str | None = None  # a key of SUPERLATIVE_WORDS


def _head_matches(head: str, region: Region) -> bool:
    if head == "thing":
        return region.kind == "thing"
    if head == "ground":
        return region.category in GROUND_CATEGORIES
    return region.category == head


def position_truth(word: str, centroid: tuple[float, float]) -> bool | None:
    """True if ``word`` clearly holds at this normalised centroid, False if clearly not, else None."""
    x, y = centroid
    if word == "middle":
        d = abs(x - 0.5)
        return True if d <= POSITION_YES[word] else False if d >= POSITION_NO[word] else None
    value = {"left": -x, "right": x, "top": -y, "bottom": y}[word]
    yes = POSITION_YES[word] if word in ("right", "bottom") else -POSITION_YES[word]
    no = POSITION_NO[word] if word in ("right", "bottom") else -POSITION_NO[word]
    return True if value >= yes else False if value <= no else None


def _relative_holds(spec: Spec, target: Region, peers: Sequence[Region]) -> bool:
    """Size and superlative words, judged against the other members of the target's class."""
    if not peers:
        return False
    areas = [p.area for p in peers]
    if spec.size == "big" and target.area < SIZE_RATIO * max(areas):
        return False
    if spec.size == "small" and SIZE_RATIO * target.area > min(areas):
        return False
    if spec.superlative:
        if spec.superlative == "biggest":
            return target.area >= SUPERLATIVE_AREA_RATIO * max(areas)
        if spec.superlative == "smallest":
            return SUPERLATIVE_AREA_RATIO * target.area <= min(areas)
        axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "highest": (1, 1), "lowest": (1, -1)}[spec.superlative]
        return all(sign * (p.centroid[axis] - target.centroid[axis]) >= SUPERLATIVE_MARGIN for p in peers)
    return True


def spec_is_unique(spec: Spec, target: int, scene: Scene) -> bool:
    """True when ``spec`` clearly holds for region ``target`` and clearly fails for every other region.

    Category and colour are exact; position words need a margin (POSITION_YES/NO); size and
    superlative words compare the target with the other regions of its class (same head
    and colour) and need a clear ratio or margin.
    """
    regions = scene.regions
    region = regions[target]

    def absolute(r: Region) -> list[bool | None]:
        truths: list[bool | None] = [_head_matches(spec.head, r)]
        if spec.colour:
            truths.append(r.colour == spec.colour)
        for word in (spec.horizontal, spec.vertical):
            if word:
                truths.append(position_truth(word, r.centroid))
        return truths

    if not all(t is True for t in absolute(region)):
        return False
    others = [r for i, r in enumerate(regions) if i != target]
    if spec.size or spec.superlative:
        peers = [r for r in others if _head_matches(spec.head, r) and (not spec.colour or r.colour == spec.colour)]
        return _relative_holds(spec, region, peers)
    return all(any(t is False for t in absolute(r)) for r in others)


def candidate_specs(scene: Scene, target: int) -> dict[str, list[Spec]]:
    """Every unique spec for region ``target``, grouped by expression type."""
    region = scene.regions[target]
    found: dict[str, list[Spec]] = {}
    if region.kind == "stuff":
        heads = [region.category] + (["ground"] if region.category in GROUND_CATEGORIES else [])
        specs = [Spec("stuff", h) for h in heads]
        specs += [Spec("stuff", h, vertical=v) for h in heads for v in ("top", "bottom")]
        if region.colour:
            specs.append(Spec("stuff", region.category, colour=region.colour))
    else:
        c, k = region.category, region.colour
        specs = [Spec("category", c), Spec("colour", "thing", colour=k), Spec("colour", c, colour=k)]
        specs += [Spec("size", h, size=s) for h in (c, "thing") for s in SIZE_WORDS]
        specs += [Spec("superlative", h, superlative=s) for h in (c, "thing") for s in SUPERLATIVE_WORDS]
        for hor in (None, "left", "right", "middle"):
            for ver in (None, "top", "bottom"):
                if hor or ver:
                    specs += [Spec("position", h, horizontal=hor, vertical=ver) for h in (c, "thing")]
                    if not ver:
                        specs.append(Spec("position", c, colour=k, horizontal=hor))
    for spec in specs:
        if spec_is_unique(spec, target, scene):
            found.setdefault(spec.type, []).append(spec)
    return found


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def realize(spec: Spec, rng: np.random.Generator) -> str:
    """Put a spec into short words, e.g. ``Spec("position", "circle", horizontal="left")`` -> "circle on the left"."""
    if spec.head == "thing":
        noun = _pick(rng, THING_WORDS)
    elif spec.head == "ground":
        noun = _pick(rng, GROUND_WORDS)
    else:
        noun = _pick(rng, CATEGORY_WORDS[spec.head])
    adjectives = []
    if spec.superlative:
        adjectives.append(_pick(rng, SUPERLATIVE_WORDS[spec.superlative]))
    if spec.size:
        adjectives.append(_pick(rng, SIZE_WORDS[spec.size]))
    if spec.colour:
        adjectives.append(spec.colour)
    place = [w for w in (spec.vertical, spec.horizontal) if w]
    if spec.head == "thing" and not adjectives and not place:
        raise ValueError(f"{spec} does not say anything")
    words = adjectives + [noun]
    if place:
        # "top left circle" or "circle at the top left" / "circle on the left" / "one in the middle"
        bare_noun = spec.head == "thing" and not adjectives
        prefix_ok = spec.type != "stuff" and place != ["middle"] and not (bare_noun and noun != "one")
        if prefix_ok and rng.random() < 0.25:
            words = place + adjectives + [noun]
        else:
            preposition = "in" if place[-1] == "middle" or (len(place) == 2 and rng.random() < 0.5) else (
                "on" if place == ["left"] or place == ["right"] else "at")
            words = words + [preposition, "the"] + place
            if place in (["left"], ["right"]) and rng.random() < 0.3:
                words.append("side")
            elif rng.random() < 0.2:
                words += ["of", "the", _pick(rng, PICTURE_WORDS)]
    if rng.random() < (0.55 if len(words) > 1 else 0.6):
        words = ["the"] + words
    return " ".join(words)


def add_noise(expression: str, rng: np.random.Generator) -> str:
    """A typo, a filler ("um") or an odd word ("thingy"), as annotators write now and then."""
    words = expression.split(" ")
    typo_at = [i for i, w in enumerate(words) if w in TYPOS]
    odd_at = [i for i, w in enumerate(words) if w in ("one", "thing")]
    choice = rng.random()
    if typo_at and choice < 0.5:
        i = typo_at[int(rng.integers(len(typo_at)))]
        words[i] = TYPOS[words[i]]
    elif odd_at and choice < 0.75:
        words[odd_at[0]] = _pick(rng, ODD_THING_WORDS)
    else:
        words.insert(0, _pick(rng, FILLER_WORDS))
    return " ".join(words)


@dataclass(frozen=True)
class Expression:
    text: str
    type: str
    spec: Spec


def describe_region(scene: Scene, target: int, rng: np.random.Generator, count: int) -> list[Expression]:
    """Up to ``count`` distinct expressions that single out region ``target``, varied in type."""
    found = candidate_specs(scene, target)
    expressions: list[Expression] = []
    seen: set[str] = set()
    for _ in range(4 * count):
        if len(expressions) == count or not found:
            break
        types = sorted(found)
        weights = np.array([TYPE_WEIGHTS.get(t, 1.0) for t in types])
        kind = types[rng.choice(len(types), p=weights / weights.sum())]
        spec = found[kind][int(rng.integers(len(found[kind])))]
        text = realize(spec, rng)
        if rng.random() < NOISE_RATE:
            text = add_noise(text, rng)
        if text not in seen:
            seen.add(text)
            expressions.append(Expression(text, spec.type, spec))
            if len(found[kind]) > 1:
                found[kind] = [s for s in found[kind] if s != spec]
            elif len(found) > 1:
                del found[kind]  # vary the type of the next phrasing
    return expressions


# --- writing the REFER format ----------------------------------------------------

def _image_rng(seed: int, image_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, image_id]))


def assign_splits(image_ids: Sequence[int], seed: int) -> dict[int, str]:
    """Image id -> split: 70/10/20 train/val/test, each split non-empty from 3 images on."""
    n = len(image_ids)
    order = np.random.default_rng(np.random.SeedSequence([seed, 2**32 - 1])).permutation(n)
    if n >= 3:
        n_val = max(1, round(SPLIT_FRACTIONS["val"] * n))
        n_test = max(1, round(SPLIT_FRACTIONS["test"] * n))
        n_train = n - n_val - n_test
    else:
        n_train, n_val, n_test = 1, 0, n - 1
        order = np.arange(n)
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return {int(image_ids[i]): names[k] for k, i in enumerate(order)}


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def _encode_mask(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _meta(seed: int, images: int) -> dict:
    return {"dataset": DATASET_NAME, "seed": seed, "images": images, "version": SYNTHREF_VERSION}


def _existing_meta(out: Path) -> dict | None:
    path = out / DATASET_NAME / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_older_version(meta: dict | None, seed: int, images: int) -> bool:
    """True for the meta of this seed and size made by an older version of this generator."""
    version = (meta or {}).get("version")
    return (meta is not None and {**meta, "version": SYNTHREF_VERSION} == _meta(seed, images)
            and isinstance(version, int) and version < SYNTHREF_VERSION)


def _check_existing(out: Path, seed: int, images: int) -> bool:
    """True if ``out`` already holds this very SynthRef; raise if it holds anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"SynthRef output {out} exists and is not a folder; choose another --out or delete it")
    meta = _existing_meta(out)
    if meta == _meta(seed, images):
        return True
    if _is_older_version(meta, seed, images):
        return False  # the same SynthRef from an older generator: generate_synthref replaces it
    if meta is not None:
        raise FileExistsError(
            f"{out} already holds a different SynthRef (seed {meta.get('seed')}, {meta.get('images')} images, "
            f"version {meta.get('version')}) than the one asked for (seed {seed}, {images} images, version "
            f"{SYNTHREF_VERSION}); choose another --out or delete {out}")
    if any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists but holds no complete SynthRef ({out / DATASET_NAME / 'meta.json'} is missing); "
            f"choose another --out or delete {out}")
    out.rmdir()  # an empty folder: take its place
    return False


def _write_dataset(root: Path, seed: int, images: int, progress: bool) -> None:
    """Generate every image and write the REFER files under ``root``."""
    image_dir = root / "images" / DATASET_NAME
    image_dir.mkdir(parents=True)
    image_ids = list(range(1, images + 1))
    splits = assign_splits(image_ids, seed)
    image_entries, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for image_id in tqdm(image_ids, desc="SynthRef", unit="image", disable=not progress):
        scene, pixels, rng = synthref_image(seed, image_id)
        file_name = f"{image_id:05d}.png"
        (image_dir / file_name).write_bytes(_png_bytes(pixels))
        image_entries.append({"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width})
        for index, region in enumerate(scene.regions):
            ann_id += 1
            rle = _encode_mask(region.mask)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[region.category],
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": region.area,
                "segmentation": rle, "iscrowd": 0, "colour": region.colour,
            })
            if region.kind == "thing":
                count = int(rng.integers(1, 4))
            elif rng.random() < STUFF_REFER_PROBABILITY:
                count = int(rng.integers(1, 3))
            else:
                continue
            expressions = describe_region(scene, index, rng, count)
            if not expressions:
                continue
            ref_id += 1
            sentences = []
            for expression in expressions:
                sent_id += 1
                sentences.append({"tokens": tokenize(expression.text), "raw": expression.text,
                                  "sent": expression.text, "sent_id": sent_id, "type": expression.type})
            refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
                         "category_id": CATEGORY_IDS[region.category], "split": splits[image_id],
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
    categories = [{"id": CATEGORY_IDS[name], "name": name, "supercategory": kind}
                  for kind, names in (("thing", THING_CATEGORIES), ("stuff", STUFF_CATEGORIES)) for name in names]
    instances = {"info": {"description": "SynthRef, generated by referseg.data.synthetic", **_meta(seed, images)},
                 "images": image_entries, "annotations": annotations, "categories": categories}
    ann_dir = root / DATASET_NAME
    atomic_write_text(ann_dir / "instances.json", json.dumps(instances, sort_keys=True, separators=(",", ":")))
    # A JSON round trip makes the pickle's object sharing (its memo) depend on the data alone.
    canonical = json.loads(json.dumps(refs, sort_keys=True))
    atomic_write_bytes(ann_dir / f"refs({SPLIT_BY}).p", pickle.dumps(canonical, protocol=2))
    atomic_write_text(ann_dir / "meta.json", json.dumps(_meta(seed, images), sort_keys=True, indent=1) + "\n")


def generate_synthref(out: Path, seed: int = 0, images: int = 600, progress: bool = True) -> Path:
    """Generate SynthRef in the REFER format at ``out`` (``Refer(out, "synthref", "synth")`` reads it).

    The same seed and image count give byte-identical files. Files are written into a
    hidden sibling folder renamed onto ``out`` at the end, so an interrupted run never
    leaves a folder that looks complete. If ``out`` already holds this SynthRef, return at
    once; if it holds the same seed and size from an older ``SYNTHREF_VERSION``, replace it
    (once the new one is complete); if it holds anything else, raise ``FileExistsError``.
    """
    out = Path(out)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"images must be a positive integer, got {images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if _check_existing(out, seed, images):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        partial.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        _write_dataset(partial, seed, images, progress)
        try:
            if out.exists() and _is_older_version(_existing_meta(out), seed, images):
                # Our own older output, regenerable by that version: moved aside only once the
                # new one is complete, then removed (run folders record which version they used).
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.rename(out, old / out.name)
                os.rename(partial, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(partial, out)
        except OSError:
            if _existing_meta(out) == _meta(seed, images):  # another process just finished the same work
                shutil.rmtree(partial)
                return out
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
