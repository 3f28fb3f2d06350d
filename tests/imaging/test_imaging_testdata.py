"""Every .dcm shipped with pydicom and pydicom-data gives an image or an `ImagingError`.

The files are listed from the installed packages by `conftest.shipped_dicom_files` (pydicom's
data folder and pydicom-data), so the sweep never downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pydicom
import pytest
from pydicom.data.data_manager import external_data_sources

from tinyllava_med.imaging import ErrorCode, ImagingError, load_study_file, patient_identifiers

# Valid files that must decode: one or more per transfer syntax family and colour model.
MUST_DECODE = {
    "CT_small.dcm": "L",  # explicit VR LE, rescale, no window
    "MR_small.dcm": "L",
    "MR_small_bigendian.dcm": "L",
    "MR_small_implicit.dcm": "L",
    "MR_small_RLE.dcm": "L",
    "MR_small_jp2klossless.dcm": "L",
    "JPEG2000.dcm": "L",
    "JPEG-LL.dcm": "L",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "L",
    "MR_small_jpeg_ls_lossless.dcm": "L",
    "image_dfl.dcm": "L",  # deflated
    "emri_small.dcm": "L",  # multi-frame
    "SC_rgb.dcm": "RGB",
    "SC_rgb_jpeg_dcmtk.dcm": "RGB",  # YBR_FULL JPEG baseline
    "SC_ybr_full_422_uncompressed.dcm": "RGB",
    "SC_rgb_rle_2frame.dcm": "RGB",
    "examples_palette.dcm": "RGB",
    "examples_jpeg2k.dcm": "RGB",  # YBR_RCT
}

# Deliberately broken (or not Part 10) shipped files and the error they must give.
EXPECTED_ERRORS = {
    "MR_truncated.dcm": "truncated",
    "rtplan_truncated.dcm": "truncated",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "JPEG-lossy.dcm": "decode_failed",  # a scan header libjpeg rejects
    "JPEG2000-embedded-sequence-delimiter.dcm": "decompression_bomb",  # SIZ claims 3.7e9 columns
    "badVR.dcm": "no_pixel_data",  # an RT Dose grid (with NumberOfFrames "1A"): no image
    "no_meta.dcm": "unsupported_format",  # no preamble: not DICOM Part 10
    "rtplan.dcm": "no_pixel_data",
    "waveform_ecg.dcm": "no_pixel_data",
}


def _patient_values(path: Path) -> list[str]:
    """Patient name and ID of a file where long enough not to match other text by chance.

    (Short IDs such as "0010" equal other attributes of the test files, e.g. AccessionNumber;
    `test_imaging_dicom` checks with sentinel values instead.)
    """
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        found = patient_identifiers(ds)
    except Exception:
        return []
    name, patient_id = found.get("PatientName", ""), found.get("PatientID", "")
    return [v for v in (name,) if len(v) >= 4] + [v for v in (patient_id,) if len(v) >= 6]


def _reference_frame(path: Path, index: int) -> np.ndarray | None:
    """pydicom's own decoding of frame `index`, or None where pydicom fails too."""
    try:
        return pydicom.pixels.pixel_array(str(path), index=index)
    except Exception:
        return None


def test_the_sweep_sees_pydicom_and_pydicom_data_files(
    shipped_dicom_list: list[tuple[str, Path]],
) -> None:
    files = shipped_dicom_list
    names = {path.name for _, path in files}
    assert len([f for f, _ in files if f.startswith("pydicom/")]) >= 79
    assert {"CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"} <= names
    if "pydicom-data" in external_data_sources():
        assert len([f for f, _ in files if f.startswith("pydicom-data/")]) >= 60
        assert set(MUST_DECODE) <= names


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shipped_file_gives_image_or_imaging_error(shipped_dicom: Path) -> None:
    path = shipped_dicom
    data = path.read_bytes()
    secrets = _patient_values(path)
    try:
        study = load_study_file(data)
    except ImagingError as e:
        assert e.code in get_args(ErrorCode)
        assert e.message and not any(s in e.message for s in secrets)
        assert path.name not in MUST_DECODE, f"{path.name}: {e.code}: {e.message}"
        assert EXPECTED_ERRORS.get(path.name, e.code) == e.code
        return
    assert path.name not in EXPECTED_ERRORS
    image = study.image
    assert study.kind == "dicom"
    assert image.mode in ("L", "RGB")
    assert (image.width, image.height) == (study.metadata.Columns, study.metadata.Rows)
    assert 0 <= study.frame < study.n_frames == study.metadata.NumberOfFrames
    if path.name in MUST_DECODE:
        assert image.mode == MUST_DECODE[path.name]
    reference = _reference_frame(path, study.frame)
    if reference is not None and np.ptp(reference) > 0:
        assert np.ptp(np.asarray(image)) > 0, "real content rendered as a constant image"
    serialized = json.dumps(study.metadata.to_dict())
    assert not any(s in serialized for s in secrets)
