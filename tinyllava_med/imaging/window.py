"""Windowing: modality values (e.g. Hounsfield units) -> 8-bit grey levels.

`WINDOW_PRESETS` holds the named CT windows (centre/width in HU, the usual radiology values).
"default" is not a preset: it means the file's own VOI LUT or Window Center/Width, else the
modality's preset (CT: soft-tissue), else min-max; `dicom.py` resolves it. `apply_window` is the
numeric step (DICOM PS3.3 C.11.2.1.2 LINEAR, LINEAR_EXACT and SIGMOID) and also serves callers
that hold a modality-value array and want another window without re-reading the file.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import numpy as np
from PIL import Image

from tinyllava_med.imaging.errors import ImagingError

VoiFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]
WindowName = Literal["default", "soft-tissue", "lung", "bone", "brain"]


class Window(NamedTuple):
    """A VOI window: centre and width in modality units, and the DICOM VOI LUT Function."""

    center: float
    width: float
    function: VoiFunction = "LINEAR"


WINDOW_PRESETS: dict[str, Window] = {
    "soft-tissue": Window(40.0, 400.0),
    "lung": Window(-600.0, 1500.0),
    "bone": Window(400.0, 1800.0),
    "brain": Window(40.0, 80.0),
}

# The preset a file of this Modality gets when it carries no VOI LUT or window of its own.
MODALITY_DEFAULT_PRESET: dict[str, str] = {"CT": "soft-tissue"}

WINDOW_NAMES: tuple[str, ...] = get_args(WindowName)


def check_window_name(window: str | None) -> str:
    """Return the window name to apply ("default" for None); `bad_window` for unknown names."""
    name = "default" if window is None else window
    if name not in WINDOW_NAMES:
        shown = repr(name[:40]) if isinstance(name, str) else type(name).__name__
        raise ImagingError("bad_window", f"expected one of {', '.join(WINDOW_NAMES)}; got {shown}")
    return name


def apply_window(
    values: np.ndarray,
    window: Window | tuple[float, float] | str | None,
    *,
    invert: bool = False,
) -> Image.Image:
    """Map modality values to an 8-bit "L" image through `window`.

    `window` is a `Window`, a `(center, width)` pair, a `WINDOW_PRESETS` name, or None for the
    array's own min-max. `invert=True` shows MONOCHROME1 data (low values bright).
    """
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ImagingError(
                "bad_window",
                f"expected a preset ({', '.join(WINDOW_PRESETS)}); got {window[:40]!r}",
            )
        window = WINDOW_PRESETS[window]
    unit = minmax_unit(values) if window is None else window_unit(values, Window(*window))
    return unit_to_image(unit, invert=invert)


def unit_to_image(unit: np.ndarray, *, invert: bool = False) -> Image.Image:
    """[0, 1] values as an 8-bit "L" image; `invert` flips the grey levels exactly."""
    pixels = np.rint(unit * 255.0).astype(np.uint8)
    return Image.fromarray(255 - pixels if invert else pixels, mode="L")


def window_unit(values: np.ndarray, window: Window) -> np.ndarray:
    """DICOM VOI windowing of `values` to [0, 1] (float32)."""
    x = values.astype(np.float32, copy=False)
    c, w = float(window.center), float(window.width)
    if window.function == "SIGMOID" and w > 0:
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -80.0, 80.0)))
    elif window.function == "LINEAR_EXACT" and w > 0:
        out = (x - c) / w + 0.5
    elif w > 1:  # LINEAR, PS3.3 C.11.2.1.2.1
        out = (x - (c - 0.5)) / (w - 1.0) + 0.5
    else:  # a width of 1 or less is a threshold at the centre
        out = (x > c - 0.5).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def minmax_unit(values: np.ndarray) -> np.ndarray:
    """Stretch `values` linearly to [0, 1] (float32); a constant array maps to 0."""
    x = values.astype(np.float32, copy=False)
    if x.size == 0:
        return x
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, 0.0).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return ((x - lo) / (hi - lo)).astype(np.float32, copy=False)
