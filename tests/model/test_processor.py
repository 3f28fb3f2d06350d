"""`pixel_values` gives the library image processor's values bit for bit, on its direct path
(pad, resize, scale, normalise) and where it hands over to the library."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tinyllava_med.model.processor import (
    VISION_SPECS,
    _square_target,
    build_image_processor,
    pixel_values,
)


class _Processor:  # what `pixel_values` reads of a `LlavaProcessor`
    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor


def _image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 4096, (height, width), dtype=np.uint16), "I;16")
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba.convert("P") if mode == "P" else rgba.convert(mode)


def _library(image_processor, image: Image.Image) -> torch.Tensor:
    return image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]


SIZES = [(45, 20), (17, 40), (32, 32), (31, 31), (1, 9), (300, 120), (64, 63)]
MODES = ["L", "RGB", "RGBA", "P", "LA", "1", "I;16"]


@pytest.mark.parametrize("spec", ["clip", "siglip"])
@pytest.mark.parametrize("pad", [True, False])
def test_pixel_values_equal_the_library_processor(spec: str, pad: bool) -> None:
    """Every mode and shape, upscaled and downscaled, CLIP's mean-colour padding (not gray, so
    a grayscale image is padded in colour) and SigLIP's gray one; unpadded too, where CLIP's
    shortest-edge resize and centre crop of a non-square image is left to the library."""
    ip = build_image_processor(VISION_SPECS[spec], 32, pad=pad)
    direct = 0
    for i, (mode, (w, h)) in enumerate((m, s) for m in MODES for s in SIZES):
        image = _image(mode, w, h, seed=i)
        got = pixel_values(_Processor(ip), image)
        want = _library(ip, image)
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want), (spec, pad, mode, (w, h))
        direct += _square_target(ip, image.size) is not None
    # the direct path was what got compared, apart from CLIP's unpadded non-square images
    square = sum(w == h for w, h in SIZES) * len(MODES)
    assert direct == (square if (spec, pad) == ("clip", False) else len(MODES) * len(SIZES))


def test_processors_the_direct_path_does_not_reproduce_go_to_the_library() -> None:
    """A crop smaller than the resize, a non-square target, a per-channel-less mean: each would
    need steps the direct path does not take, so the library computes them (and they still
    agree with it)."""
    base = build_image_processor(VISION_SPECS["clip"], 32, pad=True)
    cropped = build_image_processor(VISION_SPECS["siglip"], 32, pad=True)
    cropped.do_center_crop, cropped.crop_size = True, type(base.crop_size)(height=24, width=24)
    oblong = build_image_processor(VISION_SPECS["siglip"], 32, pad=False)
    oblong.size = type(base.size)(height=32, width=48)
    scalar_mean = build_image_processor(VISION_SPECS["siglip"], 32, pad=False)
    scalar_mean.image_mean, scalar_mean.image_std = 0.5, 0.5
    image = _image("L", 45, 20, seed=1)
    for ip in (cropped, oblong, scalar_mean):
        assert _square_target(ip, image.size) is None
        assert torch.equal(pixel_values(_Processor(ip), image), _library(ip, image))


def test_sizes_held_as_plain_dicts_take_the_direct_path_too() -> None:
    """Older processor configs load `size` and `crop_size` as plain dicts, not `SizeDict`s."""
    ip = build_image_processor(VISION_SPECS["clip"], 32, pad=True)
    ip.size, ip.crop_size = {"shortest_edge": 32}, {"height": 32, "width": 32}
    image = _image("L", 45, 20, seed=2)
    assert _square_target(ip, image.size) == 32
    assert torch.equal(pixel_values(_Processor(ip), image), _library(ip, image))
