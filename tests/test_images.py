"""pathalign_ray.images: decoding every mode to one form, clear errors, PNG and contact sheets."""

import io

import numpy as np
import pytest
from PIL import Image

from pathalign_ray.images import (
    ImageError,
    contact_sheet,
    decode_image,
    encode_png,
    from_model_range,
    normalise_array,
    to_model_range,
)


def _rgb(height=24, width=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(image: Image.Image, format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_png_round_trip_is_exact():
    image = _rgb()
    assert np.array_equal(decode_image(encode_png(image), 24, "x"), image)


@pytest.mark.parametrize(
    "image, format",
    [
        (Image.fromarray(_rgb()[..., 0]), "PNG"),  # L
        (Image.fromarray(_rgb()[..., 0] > 128), "PNG"),  # 1
        (Image.fromarray(_rgb()[..., :2].copy(), "LA"), "PNG"),
        (Image.fromarray(np.dstack([_rgb(), _rgb(seed=1)[..., :1]])), "PNG"),  # RGBA
        (Image.fromarray(_rgb()).convert("P"), "PNG"),
        (Image.fromarray(_rgb()).convert("P"), "GIF"),
        (Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)), "PNG"),  # I;16
        (Image.fromarray(_rgb()).convert("CMYK"), "TIFF"),
        (Image.fromarray(_rgb()[..., 0].astype(np.float32) / 255), "TIFF"),  # F
        (Image.fromarray(_rgb()), "JPEG"),
        (Image.fromarray(_rgb()), "BMP"),
    ],
    ids=["L", "1", "LA", "RGBA", "P", "P-gif", "I;16", "CMYK", "F", "jpeg", "bmp"],
)
def test_every_mode_decodes_to_rgb_uint8(image, format):
    out = decode_image(_encode(image, format), 16, "x")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_alpha_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # black, fully transparent
    rgba[:4, :, 3] = 255  # top half opaque
    out = decode_image(_encode(Image.fromarray(rgba)), 8, "x")
    assert (out[:4] == 0).all() and (out[4:] == 255).all()


def test_sixteen_bit_spans_the_full_range():
    grey = np.array([[0, 257], [32896, 65535]], np.uint16)
    out = decode_image(_encode(Image.fromarray(grey)), 2, "x")
    assert out[..., 0].tolist() == [[0, 1], [128, 255]]


def test_non_square_is_centre_cropped():
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, 10:20] = 200  # the centre square
    assert (decode_image(encode_png(image), 10, "x") == 200).all()


def test_resize_changes_size_only():
    out = decode_image(encode_png(np.full((40, 40, 3), 77, np.uint8)), 7, "x")
    assert out.shape == (7, 7, 3) and (out == 77).all()


def _flip_a_data_byte(png: bytes) -> bytes:
    position = png.index(b"IDAT") + 20
    return png[:position] + bytes([png[position] ^ 0xFF]) + png[position + 1 :]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image"),
        (encode_png(_rgb())[:1000], "truncated"),
        (_encode(Image.fromarray(_rgb()), "JPEG")[:300], "truncated"),
        (_flip_a_data_byte(encode_png(_rgb())), "corrupt"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "bad-crc"],
)
def test_bad_bytes_raise_image_error_naming_the_file(data, message):
    with pytest.raises(ImageError, match=f"cells/a.png: .*{message}"):
        decode_image(data, 16, "cells/a.png")


@pytest.mark.parametrize("pixels", [150, 400], ids=["over-limit", "over-twice-limit"])
def test_decompression_bomb_is_a_clear_error(monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    side = int(pixels**0.5)
    with pytest.raises(ImageError, match="bomb.png: refused as a possible decompression bomb"):
        decode_image(encode_png(_rgb(side, side)), 8, "bomb.png")


@pytest.mark.parametrize(
    "row, dtype, expected",
    [
        ([0, 255], np.uint8, [0, 255]),
        ([0.0, 1.0], np.float64, [0, 255]),
        ([0.0, 200.0], np.float32, [0, 200]),
        ([0, 32896, 65535], np.uint16, [0, 128, 255]),
        ([3, 250], np.int64, [3, 250]),
        ([0, 65535], np.int32, [0, 255]),
        ([False, True], np.bool_, [0, 255]),
    ],
)
def test_normalise_array_value_rules(row, dtype, expected):
    array = np.array([row] * len(row), dtype)  # square, so no crop and no resize
    out = normalise_array(array, len(row))
    assert out.dtype == np.uint8 and out.shape == (len(row), len(row), 3)
    assert out[0, :, 0].tolist() == expected and (out[..., 0] == out[..., 2]).all()


def test_normalise_array_grey_and_rgb():
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert np.array_equal(normalise_array(grey, 4), np.repeat(grey[..., None], 3, axis=-1))
    assert np.array_equal(normalise_array(grey[..., None], 4), normalise_array(grey, 4))
    rgb = _rgb(4, 4)
    assert np.array_equal(normalise_array(rgb, 4), rgb)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([[-0.5, 0.5]]), "float values"),
        (np.array([[np.nan, 0.5]]), "float values"),
        (np.array([[0, 70000]]), "fit neither"),
        (np.zeros((2, 2, 5), np.uint8), "shape"),
        (np.zeros((0, 0), np.uint8), "empty"),
    ],
)
def test_normalise_array_refuses_ambiguous_input(array, message):
    with pytest.raises(ImageError, match=f"img7: .*{message}"):
        normalise_array(array, 4, "img7")


def test_model_range_round_trip():
    images = np.stack([_rgb(), _rgb(seed=1)])
    x = to_model_range(images)
    assert x.shape == (2, 3, 24, 24) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert np.array_equal(from_model_range(x), images)
    assert from_model_range(np.array([[[[-3.0]], [[0.0]], [[3.0]]]])).tolist() == [[[[0, 128, 255]]]]


def test_encode_png_refuses_wrong_arrays():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("side", [5, 64, 100])
def test_contact_sheet_any_size(tmp_path, side):
    images = np.stack([_rgb(side, side, seed) for seed in range(5)])
    labels = np.array([0, 0, 0, 2, 0])  # class 1 has no image
    path = contact_sheet(images, labels, ["first", "second", "third"], tmp_path / "sub" / "sheet.png", per_class=2)
    scale = max(1, -(-64 // side))
    cell = side * scale
    assert decode_image(path.read_bytes(), 8, "sheet").shape == (8, 8, 3)  # a whole, valid PNG
    with Image.open(path) as opened:
        sheet = np.asarray(opened.convert("RGB"))
    assert sheet.shape[0] == 3 * (cell + 2) + 2 and sheet.shape[1] > 2 * cell
    last_cell_of_first_row = sheet[2 : 2 + cell, -cell - 2 : -2]  # class 0's second image
    assert np.array_equal(last_cell_of_first_row[::scale, ::scale], images[1])
    assert [p.name for p in path.parent.iterdir()] == ["sheet.png"]  # no temporary file left
