"""PNG and JPEG through Pillow: in-memory round trips, mode handling, limits and bombs."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from tinyllava_med.imaging import ImageLimits, ImagingError, detect_kind, load_study_file

RNG = np.random.default_rng(0)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _code(data: bytes, **kwargs) -> str:
    with pytest.raises(ImagingError) as info:
        load_study_file(data, **kwargs)
    return info.value.code


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """`png` with its IHDR claiming `width` x `height` (CRC fixed); the pixels stay tiny."""
    at = png.index(b"IHDR")
    chunk = bytearray(png[at : at + 17])
    chunk[4:12] = struct.pack(">II", width, height)
    return png[:at] + bytes(chunk) + struct.pack(">I", zlib.crc32(chunk)) + png[at + 21 :]


GRAY = RNG.integers(0, 256, (48, 64), dtype=np.uint8)
COLOUR = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("array, mode", [(GRAY, "L"), (COLOUR, "RGB")])
def test_png_round_trip_is_lossless(array: np.ndarray, mode: str):
    data = _encode(Image.fromarray(array), "PNG")
    study = load_study_file(data)
    assert (study.kind, study.image.mode, study.n_frames, study.frame) == ("png", mode, 1, 0)
    assert np.array_equal(np.asarray(study.image), array)
    assert (study.metadata.Rows, study.metadata.Columns) == (48, 64)


@pytest.mark.parametrize("array, mode", [(GRAY, "L"), (COLOUR, "RGB")])
def test_jpeg_round_trip_is_close(array: np.ndarray, mode: str):
    smooth = np.repeat(np.repeat(array[::8, ::8], 8, axis=0), 8, axis=1)
    data = _encode(Image.fromarray(smooth), "JPEG", quality=95, subsampling=0)
    study = load_study_file(data)
    assert (study.kind, study.image.mode) == ("jpeg", mode)
    diff = np.abs(np.asarray(study.image).astype(int) - smooth.astype(int))
    assert diff.mean() < 6


def test_sixteen_bit_png_is_stretched_to_eight_bits():
    array = (GRAY.astype(np.uint16) * 200 + 1000).astype(np.uint16)
    image = load_study_file(_encode(Image.fromarray(array), "PNG")).image
    assert image.mode == "L"
    pixels = np.asarray(image)
    assert (pixels.min(), pixels.max()) == (0, 255)
    assert np.corrcoef(pixels.ravel(), array.ravel())[0, 1] > 0.999


@pytest.mark.parametrize(
    "image, mode",
    [
        (Image.fromarray(COLOUR).convert("RGBA"), "RGB"),
        (Image.fromarray(COLOUR).convert("P"), "RGB"),
        (Image.fromarray(GRAY).convert("LA"), "L"),
        (Image.fromarray(GRAY).convert("1"), "L"),
    ],
)
def test_other_modes_become_l_or_rgb(image: Image.Image, mode: str):
    assert load_study_file(_encode(image, "PNG")).image.mode == mode


def test_jpeg_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(Image.fromarray(COLOUR), "JPEG", exif=exif.tobytes())
    assert load_study_file(data).image.size == (48, 64)


def test_png_header_claiming_50000_squared_is_refused_without_decoding():
    bomb = _with_ihdr_size(_encode(Image.new("1", (1, 1)), "PNG"), 50_000, 50_000)
    assert len(bomb) < 200
    start = time.perf_counter()
    assert _code(bomb) in {"decompression_bomb", "too_large"}
    assert time.perf_counter() - start < 1.0


def test_our_limit_holds_when_pillow_guard_is_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = _with_ihdr_size(_encode(Image.new("1", (1, 1)), "PNG"), 50_000, 50_000)
    with pytest.raises(ImagingError) as info:
        load_study_file(bomb)
    assert info.value.code == "too_large" and "50000 x 50000" in info.value.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_real_one_bit_bomb_built_with_pillow_is_refused():
    data = _encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 Mpx in a few KB
    assert len(data) < 100_000
    assert _code(data) in {"decompression_bomb", "too_large"}


def test_pixel_limit_is_per_call():
    data = _encode(Image.fromarray(GRAY), "PNG")
    assert _code(data, limits=ImageLimits(max_pixels=48 * 64 - 1)) == "too_large"
    assert load_study_file(data, limits=ImageLimits(max_pixels=48 * 64)).image.size == (64, 48)


def test_a_strip_longer_than_max_side_is_refused_however_few_its_pixels():
    """A 9000 x 2 PNG has 18000 pixels, but the model would pad it to a 9000 x 9000 square."""
    data = _encode(Image.new("L", (9000, 2), 100), "PNG")
    assert _code(data) == "too_large"
    with pytest.raises(ImagingError, match="at most 8192 pixels on the longer side"):
        load_study_file(data)
    assert load_study_file(data, limits=ImageLimits(max_side=9000)).image.size == (9000, 2)
    assert _code(_encode(Image.new("L", (2, 9000), 100), "PNG")) == "too_large"  # tall too


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_raster_is_truncated(fmt: str):
    data = _encode(Image.fromarray(COLOUR), fmt)
    assert _code(data[: len(data) // 2]) == "truncated"


def test_garbage_after_a_png_signature_is_decode_failed():
    assert _code(b"\x89PNG\r\n\x1a\n" + bytes(64)) == "decode_failed"


def test_frame_and_window_on_raster():
    data = _encode(Image.fromarray(GRAY), "PNG")
    assert _code(data, frame=1) == "bad_frame"
    assert _code(data, window="nope") == "bad_window"
    assert load_study_file(data, window="lung").window is None


def test_detect_kind():
    assert detect_kind(_encode(Image.fromarray(GRAY), "PNG")) == "png"
    assert detect_kind(_encode(Image.fromarray(GRAY), "JPEG")) == "jpeg"
    assert detect_kind(bytes(128) + b"DICM") == "dicom"
    assert detect_kind(b"GIF89a") is None and detect_kind(b"") is None
    assert _code(_encode(Image.fromarray(GRAY), "GIF")) == "unsupported_format"
