"""The one image decoder and preprocessing (SPEC 3): formats, bit depths, refusals, bounded decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from referseg.config import get_profile
from referseg.data.images import ImageReadError, image_size, preprocess, read_image
from referseg.data.transforms import letterbox_image, normalize

PROFILE = get_profile("smoke")


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=2).astype(
        np.uint8)


def test_rgb_gray_rgba_and_palette_files_become_uint8_rgb(tmp_path):
    rgb = _gradient(20, 30)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (20, 30, 3) and gray.dtype == np.uint8
    assert (gray == rgb[:, :, :1]).all()  # replicated to three channels
    rgba = np.dstack([rgb, np.full((20, 30), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    palette = read_image(tmp_path / "palette.png")
    assert palette.shape == (20, 30, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette, np.asarray(Image.open(tmp_path / "palette.png").convert("RGB")))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 257 * 20)  # k * 257 -> k on the 8-bit scale
    values[-1, -1] = 65535
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == np.uint8 and image.shape == (3, 4, 3)
    expected = (np.arange(12).reshape(3, 4) * 20).astype(np.uint8)
    expected[-1, -1] = 255
    np.testing.assert_array_equal(image[:, :, 0], expected)
    assert image.max() == 255 and len(np.unique(image)) == 12  # not all clipped to 255


def test_missing_truncated_and_unreadable_files_are_refused_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        image_size(tmp_path / "missing.png")
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cannot read image file .*cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file .*text.jpg"):  # ImageReadError is a ValueError
        read_image(tmp_path / "text.jpg")
    with pytest.raises(ImageReadError, match="text.jpg"):
        image_size(tmp_path / "text.jpg")


def test_floating_point_images_are_refused(tmp_path):
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match="float.tif.*unsupported pixel format"):
        read_image(tmp_path / "float.tif")


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_max_side_bounds_the_decoded_size_and_keeps_the_aspect_ratio(tmp_path, suffix):
    path = tmp_path / f"large.{suffix}"
    Image.fromarray(_gradient(600, 900)).save(path)
    assert image_size(path) == (600, 900)
    full = read_image(path)
    assert full.shape == (600, 900, 3)
    small = read_image(path, max_side=300)
    assert small.shape == (200, 300, 3) and small.dtype == np.uint8
    assert read_image(path, max_side=2000).shape == (600, 900, 3)  # never enlarged
    # the reduced image is the full one, smaller: its mean colour barely moves
    np.testing.assert_allclose(small.reshape(-1, 3).mean(0), full.reshape(-1, 3).mean(0), atol=3)


def test_preprocess_letterboxes_and_normalises_with_the_profile(tmp_path):
    image = _gradient(48, 64)
    tensor = preprocess(image, PROFILE)
    size = PROFILE.input_size
    assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
    expected = normalize(letterbox_image(image, size), PROFILE.pixel_mean, PROFILE.pixel_std)
    torch.testing.assert_close(tensor, expected)
    # a grayscale array is replicated like a grayscale file
    torch.testing.assert_close(preprocess(image[:, :, 0], PROFILE),
                               preprocess(np.repeat(image[:, :, :1], 3, axis=2), PROFILE))
