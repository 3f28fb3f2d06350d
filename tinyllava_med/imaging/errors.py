"""The one error type of `tinyllava_med.imaging`: a machine `code` plus a patient-free `message`.

Every bad input (unknown format, truncated or malformed file, missing pixels, unsupported
transfer syntax, too many pixels, decompression bomb, out-of-range frame, unknown window) is
raised as `ImagingError`; the server maps `code` to a 4xx once. Messages say what was expected
and what came, and never carry patient data (names, IDs, dates of birth): they are built from
sizes, tags and UIDs of transfer syntaxes only, never from the text of a lower-level exception,
which stays reachable as `__cause__` for debugging.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "unsupported_format",  # bytes are none of DICOM Part 10, PNG, JPEG (or a pixel layout we can't show)
    "not_dicom",  # DICOM was required and the bytes are not a DICOM Part 10 file
    "truncated",  # the file ends before its declared content
    "no_pixel_data",  # a DICOM file without (0028,xxxx)/(7FE0,0010) image content
    "unsupported_transfer_syntax",  # no decoder for the file's Transfer Syntax UID
    "too_large",  # declared size over `ImageLimits`, refused before decoding
    "decompression_bomb",  # compressed stream that inflates past the limits
    "decode_failed",  # the codec or pydicom could not decode the content
    "bad_frame",  # frame index outside 0..n_frames-1
    "bad_window",  # window name that is not "default" or a `WINDOW_PRESETS` key
    "decode_busy",  # other large decodes hold the process's memory budget (`budget.py`): retry
]


class ImagingError(Exception):
    """Bad image input. `code` is one of `ErrorCode`; `message` is safe to show to a client."""

    def __init__(self, code: ErrorCode, message: str, *, not_an_image: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message
        # with "no_pixel_data": the object is no image at all (an SR, a PDF, a segmentation),
        # not an image whose pixels are missing
        self.not_an_image = not_an_image
