"""A decoded DICOM frame -> the 8-bit image: Modality LUT, VOI, MONOCHROME1, colour models.

Grayscale follows PS3.3 (and MONAI Deploy's order): Modality LUT or rescale slope/intercept ->
the window asked for ("default": the file's VOI LUT, else its Window Center/Width, else the
modality's preset, else min-max) -> MONOCHROME1 inversion. Enhanced multi-frame files keep
rescale and window per frame in functional groups; those of the chosen frame are used. Colour:
YBR_FULL(_422) -> RGB, PALETTE COLOR through its LUTs, RGB and YBR_ICT/RCT (already RGB once
decoded) scaled to 8 bits.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.processing import convert_color_space

from tinyllava_med.imaging.errors import ImagingError
from tinyllava_med.imaging.window import (
    MODALITY_DEFAULT_PRESET,
    WINDOW_PRESETS,
    Window,
    minmax_unit,
    unit_to_image,
    window_unit,
)

# Attributes a frame's grayscale rendering reads; functional groups override them per frame.
_FRAME_KEYWORDS = (
    "Modality",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def gray_image(
    arr: np.ndarray, ds: Dataset, index: int, window: str, *, invert: bool
) -> Image.Image:
    """Frame `index` of `ds` (decoded stored values `arr`) through `window` as an "L" image."""
    if arr.ndim != 2:
        raise ImagingError(
            "decode_failed", f"expected one sample per pixel; decoded shape {arr.shape}"
        )
    return unit_to_image(_gray_unit(arr, _frame_view(ds, index), window), invert=invert)


def rgb_image(arr: np.ndarray, photometric: str, ds: Dataset) -> Image.Image:
    """Colour pixels (decoded, `photometric` after decoding) as an "RGB" image."""
    return Image.fromarray(_rgb8(arr, photometric, ds), mode="RGB")


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The attributes that render frame `index`, with functional-group values merged in."""
    view = Dataset()
    for keyword in _FRAME_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    for groups_keyword, item_index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", index),
    ):
        groups = ds.get(groups_keyword)
        if not groups or item_index >= len(groups):
            continue
        for keyword in _FRAME_GROUPS:
            seq = groups[item_index].get(keyword)
            for elem in seq[0] if seq else ():
                view[elem.tag] = elem
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding)
    return view


def _gray_unit(arr: np.ndarray, view: Dataset, name: str) -> np.ndarray:
    """Modality LUT then the window `name` ("default" resolves from the file); values in [0, 1]."""
    try:
        values = apply_modality_lut(arr, view)
    except Exception:  # a malformed rescale or LUT: show stored values
        values = arr
    if name != "default":
        modality = str(view.get("Modality", "")).upper()
        if modality != "CT" and str(view.get("RescaleType", "")).upper() != "HU":
            # the presets are Hounsfield ranges: on an MR's arbitrary units a picture that
            # looks like a window but means nothing
            raise ImagingError(
                "bad_window",
                f"the window presets are CT (Hounsfield unit) ranges; this image's modality is "
                f"{modality or 'not given'}: leave `window` out for its own",
            )
        return window_unit(values, WINDOW_PRESETS[name])
    voi = _voi_lut_unit(values, view)
    if voi is not None:
        return voi
    own = _file_window(view)
    if own is not None:
        return window_unit(values, own)
    preset = MODALITY_DEFAULT_PRESET.get(str(view.get("Modality", "")).upper())
    if preset is not None:
        return window_unit(values, WINDOW_PRESETS[preset])
    return minmax_unit(values)


def _voi_lut_unit(values: np.ndarray, view: Dataset) -> np.ndarray | None:
    """The file's first VOI LUT applied and scaled by the LUT's own range; None if absent/bad."""
    if not view.get("VOILUTSequence"):
        return None
    try:
        item = view.VOILUTSequence[0]
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), view)
        out = apply_voi(np.rint(values).astype(np.int64), view).astype(np.float32)
    except Exception:  # malformed LUT: fall back to the window or a preset
        return None
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def _file_window(view: Dataset) -> Window | None:
    """The first Window Center/Width pair of the file (and its VOI LUT Function), if usable."""
    try:
        center, width = view.get("WindowCenter"), view.get("WindowWidth")
        if center is None or width is None or center == "" or width == "":
            return None
        center = center[0] if not isinstance(center, str | float | int) else center
        width = width[0] if not isinstance(width, str | float | int) else width
        function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        window = Window(float(center), float(width))
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(window.center) and math.isfinite(window.width)) or window.width <= 0:
        return None
    if function == "LINEAR_EXACT":
        return window._replace(function="LINEAR_EXACT")
    if function == "SIGMOID":
        return window._replace(function="SIGMOID")
    return window


def _rgb8(arr: np.ndarray, photometric: str, ds: Dataset) -> np.ndarray:
    """Colour pixels as 8-bit RGB (rows, cols, 3)."""
    from_palette = photometric == "PALETTE COLOR"
    if from_palette:
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise ImagingError(
                "decode_failed", "expected usable palette colour LUTs; they are missing or bad"
            ) from e
        photometric = "RGB"
    elif photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
        photometric = "RGB"
    if photometric not in ("RGB", "YBR_ICT", "YBR_RCT") or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImagingError(
            "unsupported_format",
            "expected MONOCHROME1/2, RGB, YBR_FULL(_422), YBR_ICT/RCT or PALETTE COLOR pixels; "
            f"got {photometric[:32]!r} with decoded shape {arr.shape}",
        )
    if arr.dtype == np.uint8:
        return arr
    if from_palette:  # 16-bit LUT entries; some writers store 8-bit values in them
        bits = 8 if arr.size and int(arr.max()) <= 255 else arr.dtype.itemsize * 8
    else:
        bits = int(ds.get("BitsStored") or 8)
    scale = 255.0 / (2.0 ** min(bits, 32) - 1.0)
    return np.clip(np.rint(arr.astype(np.float32) * scale), 0, 255).astype(np.uint8)
