"""PNG and JPEG bytes -> `StudyFile` through Pillow, with a per-call pixel limit.

The width and height are read from the header (`Image.open` decodes nothing) and checked
against `ImageLimits.max_pixels` before `load()`; Pillow's own global bomb guard
(`Image.MAX_IMAGE_PIXELS`) is not relied on, but its `DecompressionBombError` is still mapped.
16-bit grayscale is stretched to 8 bits; palette, alpha and CMYK images become RGB; JPEG EXIF
orientation is applied.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tinyllava_med.imaging.budget import DECODE_BUDGET, RASTER_BYTES_PER_SAMPLE
from tinyllava_med.imaging.errors import ImagingError
from tinyllava_med.imaging.limits import DEFAULT_LIMITS, ImageLimits, check_side
from tinyllava_med.imaging.metadata import SafeMetadata
from tinyllava_med.imaging.study import Kind, StudyFile
from tinyllava_med.imaging.window import check_window_name, minmax_unit

_PILLOW_FORMAT = {"png": "PNG", "jpeg": "JPEG"}


def load_raster(
    data: bytes,
    kind: Kind,
    *,
    frame: int | None = None,
    window: str | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> StudyFile:
    """Decode PNG or JPEG bytes (`kind` "png" or "jpeg"); `window` is validated, not applied."""
    check_window_name(window)
    if frame not in (None, 0):
        raise ImagingError("bad_frame", f"expected frame 0 of a 1-frame {kind}; got {frame!r}")
    fmt = _PILLOW_FORMAT[kind]
    try:
        with Image.open(BytesIO(data), formats=[fmt]) as im:
            width, height = im.size
            if width * height > limits.max_pixels:
                raise ImagingError(
                    "too_large",
                    f"expected at most {limits.max_pixels} pixels; the {fmt} header declares "
                    f"{width} x {height} = {width * height}",
                )
            check_side(width, height, limits)
            samples = width * height * len(im.getbands())
            with DECODE_BUDGET.reserve(samples * RASTER_BYTES_PER_SAMPLE):
                im.load()
                image = _to_model_mode(ImageOps.exif_transpose(im) if kind == "jpeg" else im)
    except ImagingError:
        raise
    except Image.DecompressionBombError as e:
        raise ImagingError(
            "decompression_bomb", f"the {fmt} header declares more pixels than Pillow allows"
        ) from e
    except UnidentifiedImageError as e:
        raise ImagingError(
            "decode_failed", f"expected a valid {fmt} header; Pillow rejects it"
        ) from e
    except OSError as e:
        if "truncated" in str(e):
            raise ImagingError(
                "truncated", f"the {fmt} data ends early ({len(data)} bytes received)"
            ) from e
        raise ImagingError("decode_failed", f"the {fmt} data could not be decoded") from e
    except Exception as e:  # Pillow plugins raise SyntaxError, ValueError, struct.error, ...
        raise ImagingError("decode_failed", f"the {fmt} data could not be decoded") from e
    metadata = SafeMetadata(
        Rows=image.height,
        Columns=image.width,
        NumberOfFrames=1,
        SamplesPerPixel=1 if image.mode == "L" else 3,
    )
    return StudyFile(image=image, kind=kind, metadata=metadata, n_frames=1, frame=0, window=None)


def _to_model_mode(im: Image.Image) -> Image.Image:
    """8-bit "L" for grayscale, "RGB" for everything else."""
    if im.mode in ("L", "RGB"):
        return im.copy()
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        unit = minmax_unit(np.asarray(im))
        return Image.fromarray(np.rint(unit * 255.0).astype(np.uint8), mode="L")
    if im.mode in ("1", "LA", "La"):
        return im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")
