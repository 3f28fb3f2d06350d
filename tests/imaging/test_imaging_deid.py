"""De-identification (PS3.15 Basic Profile): identity gone, UIDs remapped, pixels kept."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from tinyllava_med.imaging import (
    ImagingError,
    deidentify,
    load_study_file,
    patient_identifiers,
    read_dicom,
)
from tinyllava_med.imaging.basic_profile import BASIC_PROFILE
from tinyllava_med.imaging.deid import ACTIONS

Builder = Callable[[Dataset], bytes]


def _all_text(ds: Dataset) -> str:
    return "\n".join(
        str(elem.value) for elem in ds.iterall() if elem.VR not in ("OB", "OW", "UN", "SQ")
    )


def test_every_profile_keyword_is_a_dicom_keyword():
    keywords = [k for group in BASIC_PROFILE.values() for k in group]
    assert len(keywords) > 600 and len(ACTIONS) == len(set(keywords))
    assert ACTIONS[0x00100010] == "Z"  # PatientName
    assert ACTIONS[0x0020000D] == "U"  # StudyInstanceUID
    assert ACTIONS[0x00101010] == "X"  # PatientAge


def test_ct_small_loses_identity_and_keeps_pixels(ct_small: Dataset, dicom_bytes: Builder):
    before = patient_identifiers(ct_small)
    assert before["PatientName"] and before["PatientID"]
    original = copy.deepcopy(ct_small)
    out = deidentify(ct_small, salt=b"export-1")
    assert ct_small == original  # input untouched
    assert patient_identifiers(out) == {}
    text = _all_text(out)
    assert before["PatientName"] not in text and before["PatientID"] not in text
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not any(elem.tag.is_private for elem in out.iterall())
    assert out.PixelData == ct_small.PixelData
    reloaded = load_study_file(dicom_bytes(out))
    expected = load_study_file(dicom_bytes(ct_small))
    assert np.array_equal(np.asarray(reloaded.image), np.asarray(expected.image))


def test_uids_are_replaced_consistently(ct_small: Dataset):
    first = deidentify(ct_small, salt=b"batch")
    again = deidentify(ct_small, salt=b"batch")
    other = deidentify(ct_small, salt=b"another")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        new = first.get(keyword)
        assert new != ct_small.get(keyword) and UID(new).is_valid
        assert new == again.get(keyword) and new != other.get(keyword)
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.SOPClassUID == ct_small.SOPClassUID
    assert first.file_meta.TransferSyntaxUID == ct_small.file_meta.TransferSyntaxUID
    assert deidentify(ct_small).StudyInstanceUID != deidentify(ct_small).StudyInstanceUID


def test_nested_sequences_overlays_and_curves(ct_small: Dataset):
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = ct_small.SOPClassUID
    referenced.ReferencedSOPInstanceUID = ct_small.SOPInstanceUID
    ct_small.ReferencedImageSequence = Sequence([referenced])
    request = Dataset()
    request.RequestedProcedureID = "REQ-SECRET-1"
    ct_small.RequestAttributesSequence = Sequence([request])
    performer = Dataset()
    performer.PersonName = "Doctor^Secret"
    ct_small.ContentSequence = Sequence([performer])
    ct_small.add_new(0x60003000, "OW", b"\x01\x02" * 8)  # Overlay Data
    ct_small.add_new(0x50000010, "US", 3)  # a curve attribute
    out = deidentify(ct_small, salt=b"s")
    item = out.ReferencedImageSequence[0]
    assert item.ReferencedSOPClassUID == ct_small.SOPClassUID
    assert item.ReferencedSOPInstanceUID == out.SOPInstanceUID  # remapped the same way
    assert "RequestAttributesSequence" not in out
    assert out.ContentSequence[0].PersonName == "ANONYMIZED"
    assert 0x60003000 not in out and 0x50000010 not in out
    assert "SECRET" not in _all_text(out).upper()


@pytest.mark.parametrize("name", ["MR_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_deidentified_files_still_load(testdata: Callable[[str], Path], dicom_bytes, name):
    data = testdata(name).read_bytes()
    out = deidentify(read_dicom(data))
    assert patient_identifiers(out) == {}
    study = load_study_file(dicom_bytes(out))
    assert np.array_equal(np.asarray(study.image), np.asarray(load_study_file(data).image))


def test_deidentify_non_image_objects(testdata: Callable[[str], Path]):
    for name in ("rtplan.dcm", "test-SR.dcm"):
        ds = pydicom.dcmread(testdata(name))
        out = deidentify(ds)
        assert patient_identifiers(out) == {} and out.PatientIdentityRemoved == "YES"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_shipped_file_deidentifies(shipped_dicom: Path, dicom_bytes: Builder):
    data = shipped_dicom.read_bytes()
    try:
        ds = read_dicom(data)
    except ImagingError:
        return
    out = deidentify(ds, salt=b"sweep")
    assert patient_identifiers(out) == {}
    assert out.PatientIdentityRemoved == "YES"
    try:
        before = load_study_file(data)
        dicom_bytes(ds)
    except (ImagingError, TypeError, ValueError):
        return  # no image, or pydicom cannot write even the original (SC_rgb_jpeg.dcm)
    after = load_study_file(dicom_bytes(out))
    assert np.array_equal(np.asarray(after.image), np.asarray(before.image))
