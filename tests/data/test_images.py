"""Image loading: every mode to RGB uint8 with exact values, EXIF orientation, unreadable files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.data.images import ImageError, displayed_size, load_image, to_rgb_array, to_tensor

from .conftest import save_image


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return exif.tobytes()


def test_sixteen_bit_png_is_scaled_by_257_and_rounded_never_saturated(tmp_path):
    values = np.array([[0, 128, 129, 257, 385, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
        assert np.asarray(img.convert("L")).tolist() == [[0, 128, 129, 255, 255, 255, 255]]  # Pillow saturates
    out = load_image(path)
    # round(v / 257): 128/257 = 0.498, 129/257 = 0.502, 385/257 = 1.498, 32896/257 = 128
    assert out.dtype == np.uint8 and out.shape == (1, 7, 3)
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 1, 128, 255]
    assert (out == out[:, :, :1]).all()


def test_big_endian_sixteen_bit_tiff(tmp_path):
    img = Image.frombytes("I;16B", (2, 1), bytes([0x80, 0x80, 0xFF, 0xFF]))  # 32896, 65535
    path = tmp_path / "be.tif"
    img.save(path)
    assert load_image(path)[0].tolist() == [[128, 128, 128], [255, 255, 255]]


def test_i_mode_is_read_as_sixteen_bit_and_out_of_range_is_an_error(tmp_path):
    path = tmp_path / "i.tif"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    assert load_image(path)[0, :, 1].tolist() == [0, 128, 255]
    with pytest.raises(ImageError, match="outside 0..65535"):
        to_rgb_array(Image.fromarray(np.array([[70000]], dtype=np.int32)), "big.tif")


def test_grayscale_la_and_rgba(tmp_path):
    assert load_image(save_image(tmp_path / "g.png", [[77, 0]]))[0].tolist() == [[77, 77, 77], [0, 0, 0]]
    la = Image.fromarray(np.array([[[10, 0], [20, 255]]], dtype=np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[0].tolist() == [[10, 10, 10], [20, 20, 20]]  # alpha dropped
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 128]]], dtype=np.uint8), mode="RGBA")
    rgba.save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png")[0].tolist() == [[10, 20, 30], [40, 50, 60]]


def test_palette_with_transparency_gives_palette_colors_without_warnings(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    img.save(tmp_path / "p.png", transparency=bytes([0, 128, 255]))
    img.save(tmp_path / "p.gif", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("p.png", "p.gif"):
            assert load_image(tmp_path / name)[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]], name


def test_cmyk_as_pillow_converts(tmp_path):
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))
    img.putpixel((1, 0), (10, 20, 30, 40))
    img.save(tmp_path / "c.tif")
    out = load_image(tmp_path / "c.tif")
    # (255 - c) * (255 - k) / 255: 245 * 215 / 255 = 206.6, 235 * 215 / 255 = 198.1, 225 * 215 / 255 = 189.7
    assert out[0].tolist() == [[0, 255, 255], [207, 198, 190]]
    assert (out == np.asarray(img.convert("RGB"))).all()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_6_rotates_clockwise(tmp_path, suffix):
    stored = np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8) * 4  # (2, 3): stored height 2, width 3
    path = tmp_path / f"rot{suffix}"
    kwargs = {"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}
    Image.fromarray(stored).convert("RGB").save(path, exif=_exif(6), **kwargs)
    assert displayed_size(path) == (3, 2)  # header only: the displayed image is 3 high, 2 wide
    out = load_image(path)
    assert out.shape == (3, 2, 3)
    expected = [[160, 40], [200, 80], [240, 120]]  # rotated 90 degrees clockwise: left column becomes top row
    assert np.abs(out[:, :, 0].astype(int) - np.array(expected)).max() <= (0 if suffix == ".png" else 3)


def test_orientation_without_swap_keeps_size(tmp_path):
    path = tmp_path / "flip.png"
    Image.fromarray(np.array([[1, 2, 3]], dtype=np.uint8)).save(path, exif=_exif(2))  # mirrored
    assert displayed_size(path) == (1, 3)
    assert load_image(path)[0, :, 0].tolist() == [3, 2, 1]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_an_error_naming_the_file_and_is_not_written(tmp_path, suffix):
    rng = np.random.default_rng(0)
    path = save_image(tmp_path / f"cut{suffix}", rng.integers(0, 256, size=(64, 64, 3)))
    data = path.read_bytes()[:-200]
    path.write_bytes(data)
    assert displayed_size(path) == (64, 64)  # the header is intact
    with pytest.raises(ImageError, match="cannot read image") as err:
        load_image(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == data


def test_not_an_image_missing_file_and_float_mode(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    for path in (junk, tmp_path / "absent.png"):
        for read in (load_image, displayed_size):
            with pytest.raises(ImageError) as err:
                read(path)
            assert str(err.value).startswith(f"{path}: ")
    Image.fromarray(np.array([[0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="mode F"):
        load_image(tmp_path / "f.tif")


def test_to_tensor_layout_and_scale():
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[1, 2] = [255, 51, 0]
    t = to_tensor(array)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[:, 1, 2].tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert t.sum().item() == pytest.approx(1.2)
