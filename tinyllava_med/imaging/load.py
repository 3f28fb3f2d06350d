"""Entry points: bytes of any supported kind -> `StudyFile` (`load_study_file`) or image (`render`).

    from tinyllava_med.imaging import load_study_file
    study = load_study_file(open("CT_small.dcm", "rb").read(), window="lung")
    study.image.save("ct.png")

The kind is told by magic bytes alone (`detect_kind`), never by a file name or a MIME type.
"""

from __future__ import annotations

import os

from PIL import Image

from tinyllava_med.imaging.dicom import is_dicom, load_dicom
from tinyllava_med.imaging.errors import ImagingError
from tinyllava_med.imaging.limits import DEFAULT_LIMITS, ImageLimits
from tinyllava_med.imaging.raster import load_raster
from tinyllava_med.imaging.study import Kind, StudyFile

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def detect_kind(data: bytes) -> Kind | None:
    """Kind from the magic bytes: "dicom" (Part 10: preamble + "DICM"), "png", "jpeg" from the magic bytes; else None."""
    if is_dicom(data):
        return "dicom"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def load_study_file(
    data: bytes,
    *,
    frame: int | None = None,
    window: str | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> StudyFile:
    """Decode DICOM Part 10, PNG or JPEG bytes into the model's image plus safe metadata.

    frame: DICOM frame to show (0-based; default the middle one). window: "default" (None) or
    a `WINDOW_PRESETS` name, applied to grayscale DICOM. Any bad input raises `ImagingError`.
    """
    kind = detect_kind(data)
    if kind is None:
        raise ImagingError(
            "unsupported_format",
            f"expected DICOM Part 10 (preamble + 'DICM'), PNG or JPEG; got {len(data)} bytes "
            "with none of their signatures",
        )
    if kind == "dicom":
        return load_dicom(data, frame=frame, window=window, limits=limits)
    return load_raster(data, kind, frame=frame, window=window, limits=limits)


def load_image_file(
    path: str | os.PathLike[str], limits: ImageLimits = DEFAULT_LIMITS
) -> Image.Image:
    """The model's RGB image of a DICOM, PNG or JPEG file, decoded as uploads are (16-bit data
    stretched, DICOM with its own window, the same pixel limits): for the tools that read image
    folders (`eval`, the quantize check). Raises `ImagingError`, or `OSError` for the file."""
    with open(path, "rb") as f:
        data = f.read()
    return load_study_file(data, limits=limits).image.convert("RGB")


def render(
    data: bytes,
    *,
    frame: int | None = None,
    window: str | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Image.Image:
    """The image of `load_study_file` alone: re-render a stored file with another frame/window."""
    return load_study_file(data, frame=frame, window=window, limits=limits).image
