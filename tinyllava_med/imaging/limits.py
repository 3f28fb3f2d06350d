"""Size limits checked from headers before any pixel is decoded (`ImageLimits`, `check_side`)."""

from __future__ import annotations

from dataclasses import dataclass

from tinyllava_med.imaging.errors import ImagingError


@dataclass(frozen=True)
class ImageLimits:
    """Per-call limits; a request that declares more is refused with `too_large`.

    max_pixels: Rows x Columns of one frame (PNG/JPEG: width x height).
    max_side: the longer of Rows and Columns. The models pad every image to a square on its
        longer side before resizing it (LLaVA-Med's and TinyLLaVA's `expand2square`), so a
        1 x 5,000,000 strip, few pixels as it has, would need a 5,000,000-pixel square.
    max_frames: NumberOfFrames of one DICOM file.
    max_bytes_decoded: declared size of all decoded frames (Rows x Columns x NumberOfFrames x
        SamplesPerPixel x bytes per sample), and the inflated size of a deflated DICOM dataset.
    """

    max_pixels: int = 64_000_000
    max_side: int = 8192
    max_frames: int = 5_000
    max_bytes_decoded: int = 2 * 1024**3


DEFAULT_LIMITS = ImageLimits()


def check_side(width: int, height: int, limits: ImageLimits) -> None:
    """`too_large` when the longer side of a `width` x `height` frame exceeds `max_side`."""
    if max(width, height) > limits.max_side:
        raise ImagingError(
            "too_large",
            f"expected at most {limits.max_side} pixels on the longer side; the header "
            f"declares {width} x {height} (the model pads an image to a square on its longer "
            "side)",
        )
