"""Letterbox geometry of SPEC 3 and its inverse used by evaluation (SPEC 1)."""

import numpy as np
import pytest

from referseg.data.transforms import (
    Letterbox,
    letterbox_image,
    letterbox_mask,
    lowres_labels,
    normalize,
    prediction_mask,
    to_rgb,
    undo_letterbox,
)

REFERIT_SIZES = [(360, 480), (480, 360), (320, 480), (480, 320)]
ODD_SIZES = [(333, 517), (101, 77), (512, 512), (1000, 37)]


@pytest.mark.parametrize("height,width", REFERIT_SIZES + ODD_SIZES)
@pytest.mark.parametrize("size", [512, 256])
def test_letterbox_geometry_is_the_official_one(height, width, size):
    box = Letterbox(height, width, size)
    scale = min(size / height, size / width)
    assert box.resized == (round(height * scale), round(width * scale))
    assert max(box.resized) == size
    assert box.pad == ((size - box.resized[0]) // 2, (size - box.resized[1]) // 2)


@pytest.mark.parametrize("height,width", REFERIT_SIZES + ODD_SIZES)
def test_image_lands_inside_zero_padding(height, width):
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    out = letterbox_image(image, 256)
    box = Letterbox(height, width, 256)
    (top, left), (rh, rw) = box.pad, box.resized
    assert out.shape == (256, 256, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[top : top + rh, left : left + rw], 200.0, atol=1e-3)
    assert out.sum() == pytest.approx(200.0 * rh * rw * 3, rel=1e-5)  # padding is exactly zero


@pytest.mark.parametrize("height,width", REFERIT_SIZES + ODD_SIZES)
@pytest.mark.parametrize("size", [512, 256])
def test_mask_round_trip_recovers_the_region(height, width, size):
    """letterbox_mask then undo_letterbox gives back the region, up to a pixel at its border."""
    rng = np.random.default_rng(height * 7 + width)
    mask = np.zeros((height, width), dtype=bool)
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[y0 : y0 + max(height // 3, 4), x0 : x0 + max(width // 3, 4)] = True
    square = letterbox_mask(mask, size)
    back = undo_letterbox(np.where(square, 1.0, -1.0), height, width) > 0
    assert back.shape == (height, width)
    # every pixel that differs lies within 2 original pixels (plus one letterbox cell) of the border
    from scipy.ndimage import binary_dilation, binary_erosion

    scale_px = int(np.ceil(max(height, width) / size)) + 1
    border = binary_dilation(mask, iterations=scale_px) & ~binary_erosion(mask, iterations=scale_px)
    assert not ((back ^ mask) & ~border).any()


@pytest.mark.parametrize("height,width", REFERIT_SIZES)
def test_padding_is_cropped_away_exactly(height, width):
    """A map that is 1 on the image area and -1 on the padding undoes to ones.

    The official geometry rounds the resized size, so the outermost row or column can
    blend with the padding (320x480 at 512: 341.33 rows become 341); inside it, all ones.
    """
    size = 512
    box = Letterbox(height, width, size)
    (top, left), (rh, rw) = box.pad, box.resized
    square = -np.ones((size, size), dtype=np.float32)
    square[top : top + rh, left : left + rw] = 1.0
    back = undo_letterbox(square, height, width)
    assert back.shape == (height, width)
    assert (back[1:-1, 1:-1] > 0).all()


def test_official_mode_dilates_and_never_shrinks():
    height, width, size = 360, 480, 512
    logits = -np.ones((size, size), dtype=np.float32)
    logits[200:260, 150:330] = 1.0
    default = prediction_mask(logits, height, width, "logits")
    official = prediction_mask(logits, height, width, "official")
    assert (official >= default).all() and official.sum() > default.sum()
    with pytest.raises(ValueError, match="evaluation mode"):
        prediction_mask(logits, height, width, "nope")


def test_lowres_labels_or_pooling_and_nearest():
    mask = np.zeros((64, 64), dtype=bool)
    mask[5, 37] = True  # one pixel in block (0, 2) of a 4x4 grid with 16-pixel blocks
    grid_or = lowres_labels(mask, 4, "or")
    assert grid_or.shape == (4, 4) and grid_or.sum() == 1 and grid_or[0, 2]
    assert lowres_labels(mask, 4, "nearest").sum() == 0  # the block centre (8, 40) is background
    mask[8, 40] = True
    assert lowres_labels(mask, 4, "nearest")[0, 2]
    with pytest.raises(ValueError, match="cannot be pooled"):
        lowres_labels(np.zeros((60, 60), dtype=bool), 16)


def test_to_rgb_handles_gray_and_rgba():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb(gray).shape == (3, 4, 3) and (to_rgb(gray)[..., 2] == gray).all()
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    assert to_rgb(rgba).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="channels"):
        to_rgb(np.zeros((3, 4, 2), dtype=np.uint8))


def test_normalize_is_mean_std_on_the_255_scale():
    image = np.full((2, 2, 3), 127.0, dtype=np.float32)
    out = normalize(image, (100.0, 127.0, 27.0), (1.0, 2.0, 50.0))
    assert out.shape == (3, 2, 2)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), [27.0, 0.0, 2.0])
