"""Imaging: DICOM / PNG / JPEG bytes -> validated PIL image + safe metadata; windows; de-id.

    from tinyllava_med.imaging import ImagingError, load_study_file
    try:
        study = load_study_file(data, window="lung")   # StudyFile: image, kind, metadata, ...
    except ImagingError as e:
        return 422, {"error": {"code": e.code, "message": e.message}}

Re-render another frame or window from the stored bytes with `render(data, frame=, window=)`.

Modules: `load` (entry points), `dicom` (Part 10 reading, checks, frame decoding),
`codestream` (sizes inside JPEG / JPEG 2000 frames), `dicom_pixels` (rescale, VOI, colour),
`raster` (PNG/JPEG), `window` (presets, VOI maths), `metadata` (SafeMetadata, patient
identifiers), `deid` and `basic_profile` (PS3.15 Basic Profile), `limits`, `errors`, `study`.
"""

from tinyllava_med.imaging.deid import deidentify
from tinyllava_med.imaging.dicom import read_dicom
from tinyllava_med.imaging.errors import ErrorCode, ImagingError
from tinyllava_med.imaging.limits import DEFAULT_LIMITS, ImageLimits
from tinyllava_med.imaging.load import detect_kind, load_image_file, load_study_file, render
from tinyllava_med.imaging.metadata import SafeMetadata, patient_identifiers
from tinyllava_med.imaging.study import Kind, StudyFile
from tinyllava_med.imaging.window import WINDOW_PRESETS, Window, WindowName, apply_window

__all__ = [
    "DEFAULT_LIMITS",
    "WINDOW_PRESETS",
    "ErrorCode",
    "ImageLimits",
    "ImagingError",
    "Kind",
    "SafeMetadata",
    "StudyFile",
    "Window",
    "WindowName",
    "apply_window",
    "deidentify",
    "detect_kind",
    "load_image_file",
    "load_study_file",
    "patient_identifiers",
    "read_dicom",
    "render",
]
