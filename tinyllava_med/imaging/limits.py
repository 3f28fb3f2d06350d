"""Size limits checked from headers before any pixel is decoded (`ImageLimits`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageLimits:
    """Per-call limits; a request that declares more is refused with `too_large`.

    max_pixels: Rows x Columns of one frame (PNG/JPEG: width x height).
    max_frames: NumberOfFrames of one DICOM file.
    max_bytes_decoded: declared size of all decoded frames (Rows x Columns x NumberOfFrames x
        SamplesPerPixel x bytes per sample), and the inflated size of a deflated DICOM dataset.
    """

    max_pixels: int = 64_000_000
    max_frames: int = 5_000
    max_bytes_decoded: int = 2 * 1024**3


DEFAULT_LIMITS = ImageLimits()
