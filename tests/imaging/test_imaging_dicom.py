"""DICOM pipeline: presets, the file's own window and VOI LUT, MONOCHROME1, colour, frames,
and every bad-input path (truncated, no pixels, too large, bombs, unknown transfer syntax)."""

from __future__ import annotations

import copy
import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tinyllava_med.imaging import (
    WINDOW_PRESETS,
    ErrorCode,
    ImageLimits,
    ImagingError,
    apply_window,
    load_study_file,
    patient_identifiers,
    read_dicom,
    render,
)

Builder = Callable[[Dataset], bytes]
Testdata = Callable[[str], Path]


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _code(data: bytes, **kwargs) -> str:
    with pytest.raises(ImagingError) as info:
        load_study_file(data, **kwargs)
    return info.value.code


# --- grayscale windowing -------------------------------------------------------------------


def test_ct_without_window_gets_the_soft_tissue_preset(ct_small: Dataset, ct_small_bytes: bytes):
    assert "WindowCenter" not in ct_small and ct_small.Modality == "CT"
    study = load_study_file(ct_small_bytes)
    hounsfield = apply_modality_lut(ct_small.pixel_array, ct_small)
    expected = apply_window(hounsfield, WINDOW_PRESETS["soft-tissue"])
    assert study.image.mode == "L" and study.window == "default"
    assert np.array_equal(_pixels(study.image), _pixels(expected))
    assert study.metadata.Modality == "CT" and (study.metadata.Rows, study.metadata.Columns) == (
        128,
        128,
    )


@pytest.mark.parametrize("name", ["lung", "bone", "brain", "soft-tissue"])
def test_named_presets_render_hounsfield_windows(ct_small: Dataset, ct_small_bytes, name):
    hounsfield = apply_modality_lut(ct_small.pixel_array, ct_small)
    image = render(ct_small_bytes, window=name)
    assert np.array_equal(_pixels(image), _pixels(apply_window(hounsfield, name)))
    assert load_study_file(ct_small_bytes, window=name).window == name


def test_presets_differ_from_each_other(ct_small_bytes: bytes):
    images = {name: _pixels(render(ct_small_bytes, window=name)) for name in WINDOW_PRESETS}
    assert not np.array_equal(images["lung"], images["bone"])
    assert not np.array_equal(images["brain"], images["soft-tissue"])


def test_file_window_center_width_is_the_default(testdata: Testdata):
    ds = pydicom.dcmread(testdata("MR_small.dcm"))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    image = load_study_file(testdata("MR_small.dcm").read_bytes()).image
    values = apply_modality_lut(ds.pixel_array, ds)
    assert np.array_equal(_pixels(image), _pixels(apply_window(values, (600.0, 1600.0))))


def test_voi_lut_sequence_matches_pydicom(testdata: Testdata):
    path = testdata("vlut_04.dcm")  # pydicom-data
    ds = pydicom.dcmread(path)
    assert "VOILUTSequence" in ds
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
    ours = np.asarray(load_study_file(path.read_bytes()).image).astype(float)
    assert np.corrcoef(reference.ravel(), ours.ravel())[0, 1] > 0.99


def test_enhanced_ct_uses_the_functional_group_rescale_and_window(testdata: Testdata):
    path = testdata("eCT_Supplemental.dcm")  # pydicom-data: 2-frame enhanced CT
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds
    groups = ds.SharedFunctionalGroupsSequence[0]
    intercept = float(groups.PixelValueTransformationSequence[0].RescaleIntercept)
    voi = groups.FrameVOILUTSequence[0]
    hounsfield = ds.pixel_array[1].astype(float) + intercept
    expected = apply_window(hounsfield, (float(voi.WindowCenter), float(voi.WindowWidth)))
    image = render(path.read_bytes(), frame=1)
    assert np.array_equal(_pixels(image), _pixels(expected))


def test_monochrome1_is_inverted(ct_small: Dataset, dicom_bytes: Builder, ct_small_bytes):
    ct_small.PhotometricInterpretation = "MONOCHROME1"
    inverted = load_study_file(dicom_bytes(ct_small)).image
    normal = load_study_file(ct_small_bytes).image
    assert np.array_equal(_pixels(inverted), 255 - _pixels(normal))


def test_monochrome1_radiograph_is_inverted_against_apply_voi_lut(testdata: Testdata):
    path = testdata("RG1_UNCR.dcm")  # pydicom-data: CR, MONOCHROME1, with a window
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
    ours = np.asarray(load_study_file(path.read_bytes()).image).astype(float)
    assert np.corrcoef(voi[::4, ::4].ravel(), ours[::4, ::4].ravel())[0, 1] < -0.95


# --- colour --------------------------------------------------------------------------------


def test_palette_colour_gives_rgb_through_the_lut(testdata: Testdata):
    path = testdata("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    study = load_study_file(path.read_bytes())
    assert study.image.mode == "RGB" and study.window is None
    lut = apply_color_lut(ds.pixel_array, ds).astype(float)
    expected = lut / 257.0 if lut.max() > 255 else lut
    assert np.abs(np.asarray(study.image) - expected).mean() < 1.0


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm"]
)
def test_ybr_and_compressed_colour_match_the_rgb_original(testdata: Testdata, name: str):
    original = _pixels(load_study_file(testdata("SC_rgb.dcm").read_bytes()).image)
    study = load_study_file(testdata(name).read_bytes())
    assert study.image.mode == "RGB"
    assert np.abs(_pixels(study.image) - original).mean() < 3.0


def test_window_is_ignored_for_colour(testdata: Testdata):
    data = testdata("SC_rgb.dcm").read_bytes()
    assert load_study_file(data, window="lung").window is None
    assert np.array_equal(_pixels(render(data, window="lung")), _pixels(render(data)))


# --- frames --------------------------------------------------------------------------------


def test_multiframe_defaults_to_the_middle_frame_and_picks_on_request(testdata: Testdata):
    path = testdata("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array.astype(float)
    data = path.read_bytes()
    study = load_study_file(data)
    assert (study.n_frames, study.frame) == (10, 5)
    assert np.array_equal(_pixels(study.image), _pixels(render(data, frame=5)))
    for index in (0, 3, 9):
        shown = np.asarray(render(data, frame=index)).astype(float).ravel()
        scores = [np.corrcoef(shown, frame.ravel())[0, 1] for frame in frames]
        assert int(np.argmax(scores)) == index


@pytest.mark.parametrize("frame", [10, -1, 1000])
def test_out_of_range_frame_is_bad_frame(testdata: Testdata, frame: int):
    data = testdata("emri_small.dcm").read_bytes()
    with pytest.raises(ImagingError) as info:
        load_study_file(data, frame=frame)
    assert info.value.code == "bad_frame" and "0..9" in info.value.message


def test_single_frame_accepts_only_frame_zero(ct_small_bytes: bytes):
    assert load_study_file(ct_small_bytes, frame=0).frame == 0
    assert _code(ct_small_bytes, frame=1) == "bad_frame"


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 0.999])
def test_ct_small_cut_inside_pixel_data_is_truncated(ct_small_bytes: bytes, fraction: float):
    assert _code(ct_small_bytes[: int(len(ct_small_bytes) * fraction)]) == "truncated"


@pytest.mark.parametrize("size", [132, 200, 1000, 3000, 6000])
def test_ct_small_cut_inside_header_is_an_imaging_error(ct_small_bytes: bytes, size: int):
    assert _code(ct_small_bytes[:size]) in {"truncated", "no_pixel_data", "decode_failed"}


def test_shipped_truncated_files(testdata: Testdata):
    assert _code(testdata("MR_truncated.dcm").read_bytes()) == "truncated"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_unsupported(seed: int):
    data = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert _code(data) == "unsupported_format"
    assert _code(b"") == "unsupported_format"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_after_a_dicom_prefix_are_an_imaging_error(seed: int):
    body = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert _code(bytes(128) + b"DICM" + body) in get_args(ErrorCode)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_corrupted_headers_give_an_image_or_imaging_error(testdata: Testdata, name: str):
    """Byte flips in the first kilobytes (found by fuzzing: unknown VRs, missing attributes,
    codestream sizes) never escape as another exception type."""
    base = testdata(name).read_bytes()
    rng = np.random.default_rng(7)
    for _ in range(150):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(132, min(len(data), 4000)))] = int(rng.integers(0, 256))
        try:
            load_study_file(bytes(data))
        except ImagingError as e:
            assert e.code in get_args(ErrorCode)


def test_read_dicom_refuses_other_formats_as_not_dicom():
    with pytest.raises(ImagingError) as info:
        read_dicom(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert info.value.code == "not_dicom"


def test_dicom_without_pixel_data(testdata: Testdata, ct_small: Dataset, dicom_bytes: Builder):
    with pytest.raises(ImagingError) as info:
        load_study_file(testdata("rtplan.dcm").read_bytes())
    assert info.value.code == "no_pixel_data" and "RT Plan Storage" in info.value.message
    del ct_small.PixelData
    assert _code(dicom_bytes(ct_small)) == "no_pixel_data"


def test_huge_rows_and_columns_are_refused_before_decoding(ct_small: Dataset, dicom_bytes):
    ct_small.Rows = ct_small.Columns = 65535  # pixel data stays 128 x 128: decoding would fail
    with pytest.raises(ImagingError) as info:
        load_study_file(dicom_bytes(ct_small))
    assert info.value.code == "too_large" and "65535 x 65535" in info.value.message


def test_too_many_frames_are_refused(ct_small: Dataset, dicom_bytes: Builder):
    ct_small.NumberOfFrames = 100_000
    assert _code(dicom_bytes(ct_small)) == "too_large"


def test_limits_are_per_call(ct_small_bytes: bytes):
    assert _code(ct_small_bytes, limits=ImageLimits(max_pixels=128 * 127)) == "too_large"
    assert _code(ct_small_bytes, limits=ImageLimits(max_bytes_decoded=1000)) == "too_large"
    assert load_study_file(ct_small_bytes, limits=ImageLimits(max_pixels=128 * 128)).frame == 0
    assert _code(ct_small_bytes, limits=ImageLimits(max_side=127)) == "too_large"
    assert load_study_file(ct_small_bytes, limits=ImageLimits(max_side=128)).frame == 0


def test_deflated_file_loads_and_a_deflate_bomb_is_refused(ct_small: Dataset, dicom_bytes):
    ct_small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = dicom_bytes(ct_small)
    assert load_study_file(data).metadata.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    start = time.perf_counter()
    assert _code(data, limits=ImageLimits(max_bytes_decoded=10_000)) == "decompression_bomb"
    assert time.perf_counter() - start < 5
    assert _code(data[:-100]) == "truncated"


def test_deflate_bomb_is_refused_whatever_the_file_meta_looks_like(ct_small: Dataset, dicom_bytes):
    """pydicom finds the deflated stream by reading the file meta element by element, so a file
    without the meta group length, or with a long padded meta element, must be measured too."""
    ct_small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = dicom_bytes(ct_small)
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) UL: 12 bytes
    no_length = data[:132] + data[144:]
    version = b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"
    long_version = version[:8] + struct.pack("<I", 4000) + b"\x00\x01" + b"\x00" * 3998
    padded = no_length.replace(version, long_version, 1)  # the syntax UID moves past 4 kB
    assert len(padded) == len(no_length) + 3998
    small = ImageLimits(max_bytes_decoded=10_000)
    for variant in (no_length, padded):
        assert load_study_file(variant).metadata.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert _code(variant, limits=small) == "decompression_bomb"
    cut = padded[: len(padded) - len(no_length) + 1000]
    assert _code(cut) == "truncated"


def test_unknown_transfer_syntax_is_unsupported(ct_small: Dataset, dicom_bytes: Builder):
    ct_small.PixelData = encapsulate([ct_small.PixelData])
    ct_small.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    with pytest.raises(ImagingError) as info:
        load_study_file(dicom_bytes(ct_small))
    assert info.value.code == "unsupported_transfer_syntax"
    assert "1.2.840.10008.1.2.4.100" in info.value.message


def test_unknown_window_name_is_bad_window(ct_small_bytes: bytes):
    with pytest.raises(ImagingError) as info:
        load_study_file(ct_small_bytes, window="mediastinum-x")
    assert info.value.code == "bad_window" and "lung" in info.value.message


def test_decode_errors_chain_the_codec_error(testdata: Testdata):
    with pytest.raises(ImagingError) as info:
        load_study_file(testdata("JPEG-lossy.dcm").read_bytes())  # a scan libjpeg rejects
    assert info.value.code == "decode_failed" and info.value.__cause__ is not None
    assert "JPEG Extended" in info.value.message


def _patched(data: bytes, marker: bytes, offset: int, value: bytes) -> bytes:
    at = data.index(marker) + offset
    return data[:at] + value + data[at + len(value) :]


@pytest.mark.parametrize(
    "name, marker, offset, value",
    [
        ("JPEG2000.dcm", b"\xff\x4f\xff\x51", 8, struct.pack(">I", 1_376_512)),  # SIZ Xsiz
        ("SC_rgb_jpeg_dcmtk.dcm", b"\xff\xc0", 5, struct.pack(">HH", 30_000, 30_000)),  # SOF0
    ],
)
def test_codestream_claiming_more_pixels_than_the_header_is_refused_before_decoding(
    testdata: Testdata, name: str, marker: bytes, offset: int, value: bytes
):
    data = _patched(testdata(name).read_bytes(), marker, offset, value)
    start = time.perf_counter()
    with pytest.raises(ImagingError) as info:
        load_study_file(data)
    assert info.value.code == "decompression_bomb"
    assert time.perf_counter() - start < 2.0  # openjpeg needs ~30 s for this SIZ


def test_any_exception_inside_the_pipeline_becomes_imaging_error(ct_small: Dataset, dicom_bytes):
    nonsense = copy.deepcopy(ct_small)
    nonsense.PixelRepresentation = 7
    assert _code(dicom_bytes(nonsense)) == "decode_failed"
    del ct_small.BitsAllocated
    assert _code(dicom_bytes(ct_small)) == "decode_failed"


# --- metadata ------------------------------------------------------------------------------

SENTINELS = {
    "PatientName": "Sentinelname^Firstname",
    "PatientID": "SENTINEL-ID-4711",
    "PatientBirthDate": "19230405",
    "OtherPatientIDs": "SENTINEL-OTHER-0815",
}


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
)
def test_metadata_never_carries_patient_identity(testdata: Testdata, dicom_bytes, name):
    ds = pydicom.dcmread(testdata(name))
    for keyword, value in SENTINELS.items():
        setattr(ds, keyword, value)
    data = dicom_bytes(ds)
    study = load_study_file(data)
    serialized = json.dumps(study.metadata.to_dict()) + repr(study.metadata)
    assert not any(value in serialized for value in SENTINELS.values())
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(study.metadata.to_dict())
    assert patient_identifiers(read_dicom(data))["PatientName"] == SENTINELS["PatientName"]


def test_error_messages_never_carry_patient_identity(ct_small: Dataset, dicom_bytes: Builder):
    for keyword, value in SENTINELS.items():
        setattr(ct_small, keyword, value)
    data = dicom_bytes(ct_small)
    for bad, kwargs in [
        (data[: len(data) // 2], {}),
        (data, {"frame": 7}),
        (data, {"limits": ImageLimits(max_pixels=5)}),
    ]:
        with pytest.raises(ImagingError) as info:
            load_study_file(bad, **kwargs)
        assert not any(value in str(info.value) for value in SENTINELS.values())


def test_metadata_fields(ct_small: Dataset, ct_small_bytes: bytes, testdata: Testdata):
    meta = load_study_file(ct_small_bytes).metadata.to_dict()
    assert meta["StudyInstanceUID"] == ct_small.StudyInstanceUID
    assert meta["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert meta["PixelSpacing"] == [float(v) for v in ct_small.PixelSpacing]
    assert meta["NumberOfFrames"] == 1 and "WindowCenter" not in meta
    mr = load_study_file(testdata("MR_small.dcm").read_bytes()).metadata
    assert (mr.WindowCenter, mr.WindowWidth) == (600.0, 1600.0)
