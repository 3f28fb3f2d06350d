"""`StudyFile`: one decoded input file, the image the model sees plus its safe metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

from tinyllava_med.imaging.metadata import SafeMetadata

Kind = Literal["dicom", "png", "jpeg"]


@dataclass(frozen=True)
class StudyFile:
    """A decoded file.

    image: 8-bit "L" or "RGB", the model input (DICOM: the requested window applied).
    kind: the detected container.
    metadata: patient-free attributes (`SafeMetadata`).
    n_frames: frames in the file (PNG/JPEG: 1).
    frame: the frame shown, 0-based (default: the middle one, `n_frames // 2`).
    window: the window name applied to a grayscale DICOM frame ("default", a `WINDOW_PRESETS`
        key); None for colour images and PNG/JPEG, which are shown as stored.
    """

    image: Image.Image
    kind: Kind
    metadata: SafeMetadata
    n_frames: int
    frame: int
    window: str | None
