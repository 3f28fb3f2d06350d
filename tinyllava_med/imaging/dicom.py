"""DICOM Part 10 bytes -> `StudyFile`: header checks, one decoded frame, rescale, VOI, colour.

Order: parse the header (pixels stay encoded); refuse a truncated file, a missing Image Pixel
module and sizes over `ImageLimits` from Rows x Columns x NumberOfFrames x SamplesPerPixel;
refuse a compressed frame whose own header claims more pixels (`codestream`); decode only the
requested frame (pydicom 3 decoders: JPEG, JPEG-LS and JPEG 2000 through the pylibjpeg plugins,
RLE and deflate built in); then `dicom_pixels` turns it into the 8-bit image. A deflated data
set is inflated in bounded steps first, so a deflate bomb is refused before pydicom inflates it.
Anything pydicom raises on malformed input is re-raised as `ImagingError` (`from e`).
"""

from __future__ import annotations

import math
import zlib
from io import BytesIO
from typing import NamedTuple

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import (  # dcmread's first steps: where a deflated stream starts
    _read_command_set_elements,
    _read_file_meta_info,
    read_preamble,
)
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options, get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from tinyllava_med.imaging.budget import DECODE_BUDGET, DICOM_BYTES_PER_SAMPLE
from tinyllava_med.imaging.codestream import declared_size
from tinyllava_med.imaging.dicom_pixels import gray_image, rgb_image
from tinyllava_med.imaging.errors import ImagingError
from tinyllava_med.imaging.limits import DEFAULT_LIMITS, ImageLimits, check_side
from tinyllava_med.imaging.metadata import safe_metadata
from tinyllava_med.imaging.study import StudyFile
from tinyllava_med.imaging.window import check_window_name

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The start of a Pixel Data element in explicit VR little/big endian and implicit VR files.
_PIXEL_DATA_STARTS = (
    b"\xe0\x7f\x10\x00OB",
    b"\xe0\x7f\x10\x00OW",
    b"\x7f\xe0\x00\x10OB",
    b"\x7f\xe0\x00\x10OW",
)
_PIXEL_DATA_IMPLICIT = b"\xe0\x7f\x10\x00"
_IMAGE_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
)
_INTEGER_PIXEL_KEYWORDS = ("BitsStored", "PixelRepresentation")
_CODESTREAM_SYNTAXES = frozenset(
    JPEGTransferSyntaxes + JPEGLSTransferSyntaxes + JPEG2000TransferSyntaxes
)


def is_dicom(data: bytes) -> bool:
    """True for DICOM Part 10 bytes: a 128-byte preamble then "DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_dicom(
    data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS, size_checked: bool = False
) -> FileDataset:
    """Parse DICOM Part 10 bytes into a dataset; the pixel data stays encoded. `size_checked`:
    the caller has checked a deflated data set's inflated size."""
    if not is_dicom(data):
        raise ImagingError(
            "not_dicom",
            f"expected DICOM Part 10 (128-byte preamble, then 'DICM'); got {len(data)} bytes "
            "without that prefix",
        )
    if not size_checked:
        _check_inflated_size(data, limits)
    try:
        ds = dcmread(BytesIO(data))
    except InvalidDicomError as e:
        raise ImagingError(
            "not_dicom", "expected DICOM file meta information after 'DICM'; it is missing"
        ) from e
    except Exception as e:  # pydicom raises many types on malformed headers
        raise ImagingError("decode_failed", "the DICOM data set could not be parsed") from e
    if _ends_early(ds):
        raise ImagingError(
            "truncated",
            f"the DICOM file ends inside an element ({len(data)} bytes received): it was cut "
            "short, or an element's length points past its end",
        )
    return ds


def load_dicom(
    data: bytes,
    *,
    frame: int | None = None,
    window: str | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> StudyFile:
    """Decode one frame of a DICOM Part 10 file into a `StudyFile` (see module docstring)."""
    name = check_window_name(window)
    # a deflated data set is inflated whole by the parse: its size is held from there on
    inflated = _check_inflated_size(data, limits)
    try:
        with DECODE_BUDGET.reserve(2 * inflated):
            ds = read_dicom(data, limits=limits, size_checked=True)
            return _load_frame(ds, data, frame=frame, window=name, limits=limits)
    except ImagingError:
        raise
    except Exception as e:  # malformed attributes surface as many exception types
        raise ImagingError(
            "decode_failed", "the DICOM image attributes are malformed or inconsistent"
        ) from e


def _load_frame(
    ds: FileDataset, data: bytes, *, frame: int | None, window: str, limits: ImageLimits
) -> StudyFile:
    header = _check_pixel_header(ds, data, limits)
    n_frames = header.frames
    index = _pick_frame(frame, n_frames)
    samples = header.rows * header.columns * int(ds.get("SamplesPerPixel", 1) or 1)
    with DECODE_BUDGET.reserve(samples * DICOM_BYTES_PER_SAMPLE):
        arr, photometric = _decode_frame(ds, index, header)
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            image = gray_image(arr, ds, index, window, invert=photometric == "MONOCHROME1")
            applied: str | None = window
        else:
            image = rgb_image(arr, photometric, ds)
            applied = None
        del arr
    return StudyFile(
        image=image,
        kind="dicom",
        metadata=safe_metadata(ds, n_frames=n_frames),
        n_frames=n_frames,
        frame=index,
        window=applied,
    )


def file_meta(data: bytes) -> tuple[FileMetaDataset, int] | None:
    """The file meta group of Part 10 bytes and the offset of the data set after it, read as
    `dcmread` reads them (preamble, group 0002 element by element, any command set), without
    touching the data set; None where that header cannot be read."""
    fp = BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        _read_command_set_elements(fp)
    except Exception:  # noqa: BLE001 - pydicom raises many types on malformed headers
        return None
    return meta, fp.tell()


def _check_inflated_size(data: bytes, limits: ImageLimits) -> int:
    """A deflated data set's inflated size (0: not deflated); refuse one that inflates past
    `limits.max_bytes_decoded` or is cut.

    The deflated stream starts where pydicom's own reader leaves it: after the preamble, the
    file meta group read element by element (its group length may be absent or wrong, its
    elements padded) and any command set elements, the steps `dcmread` takes before it inflates
    the rest in one call."""
    found = file_meta(data)
    if found is None or found[0].get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return 0  # not deflated, or a broken header dcmread reports the same way
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = data[found[1] :], 0
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, 1 << 20))
            if total > limits.max_bytes_decoded:
                raise ImagingError(
                    "decompression_bomb",
                    f"expected a deflated data set of at most {limits.max_bytes_decoded} bytes; "
                    f"{len(data)} bytes inflate past that",
                )
            pending = inflater.unconsumed_tail
    except zlib.error as e:
        raise ImagingError(
            "decode_failed", "the deflated data set is not a valid deflate stream"
        ) from e
    if not inflater.eof:
        raise ImagingError(
            "truncated", f"the deflated data set ends early ({len(data)} bytes received)"
        )
    return total


def _ends_early(ds: Dataset) -> bool:
    """True when the last element read is shorter than its declared length (a cut file)."""
    tags = list(ds.keys())
    if not tags:
        return False
    try:
        elem = ds.get_item(tags[-1])
    except Exception:  # not readable at all: the decoding steps report it
        return False
    if not isinstance(elem, RawDataElement) or elem.value is None:
        return False
    return elem.length != 0xFFFFFFFF and len(elem.value) < elem.length


def _header_int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except Exception as e:
        raise ImagingError(
            "decode_failed", f"expected an integer {keyword}; it is malformed"
        ) from e


class _PixelHeader(NamedTuple):
    """The checked Image Pixel numbers the decoding steps use."""

    rows: int
    columns: int
    frames: int


# Objects whose pixels are not an image to read or to ask about: a segmentation's frames are
# label masks (the model described a binary mask, and an SR cited it as the finding's best
# illustration), a dose grid is Gray per voxel, a parametric map is values of a fit. Refused
# as objects without pixels are (STOW-RS and DIMSE 0x0122, skipped by imports and retrieves).
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.8": "Height Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose Storage",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map Storage",
}


def _not_image_class(sop: UID) -> bool:
    """Whether a known SOP class is no image (an SR, a PDF, a presentation state): every image
    storage class's name says "Image Storage" (CT, Enhanced MR, Secondary Capture, Digital
    X-Ray ... Image Storage); an image object without pixels is a broken image, not another
    kind of object."""
    return "Image Storage" not in sop.name


def _check_pixel_header(ds: Dataset, data: bytes, limits: ImageLimits) -> _PixelHeader:
    """Validate the Image Pixel attributes against `limits` before any decoding."""
    not_image = _NOT_IMAGES.get(str(ds.get("SOPClassUID", "")))
    if not_image is not None:
        raise ImagingError(
            "no_pixel_data",
            f"expected an image; this DICOM object ({not_image}) holds pixels that are not one "
            "(labels, doses or fitted values), so it is not stored",
            not_an_image=True,
        )
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        implicit = ds.original_encoding[0] and _PIXEL_DATA_IMPLICIT in data
        if implicit or any(start in data for start in _PIXEL_DATA_STARTS):
            raise ImagingError(
                "truncated",
                "a (7FE0,0010) Pixel Data element starts but could not be read to its end "
                f"({len(data)} bytes received)",
            )
        if len(ds) == 0:
            raise ImagingError(
                "truncated", f"the DICOM file ends before its data set ({len(data)} bytes)"
            )
        sop = UID(str(ds.get("SOPClassUID", "")))
        what = f" ({sop.name})" if sop.is_valid and sop.name != sop else ""
        cut = " (it describes an image: the file may be cut short)" if "Rows" in ds else ""
        raise ImagingError(
            "no_pixel_data",
            f"expected an image with (7FE0,0010) Pixel Data; this DICOM object{what} has none{cut}",
            not_an_image=_not_image_class(sop) if sop.is_valid and sop.name != sop else not cut,
        )
    required = _IMAGE_PIXEL_KEYWORDS + (_INTEGER_PIXEL_KEYWORDS if "PixelData" in ds else ())
    missing = [keyword for keyword in required if keyword not in ds]
    if missing:
        raise ImagingError(
            "decode_failed", f"expected the Image Pixel attributes {', '.join(missing)}; missing"
        )
    rows, cols = _header_int(ds, "Rows", 0) or 0, _header_int(ds, "Columns", 0) or 0
    if rows <= 0 or cols <= 0:
        raise ImagingError(
            "decode_failed", f"expected positive Rows and Columns; got {rows} x {cols}"
        )
    frames = max(1, _header_int(ds, "NumberOfFrames", 1) or 1)
    samples = max(1, _header_int(ds, "SamplesPerPixel", 1) or 1)
    bits = max(1, _header_int(ds, "BitsAllocated", 8) or 8)
    if rows * cols > limits.max_pixels:
        raise ImagingError(
            "too_large",
            f"expected at most {limits.max_pixels} pixels per frame; the header declares "
            f"{rows} x {cols} = {rows * cols}",
        )
    check_side(cols, rows, limits)
    if frames > limits.max_frames:
        raise ImagingError(
            "too_large",
            f"expected at most {limits.max_frames} frames; the header declares {frames}",
        )
    total = rows * cols * frames * samples * math.ceil(bits / 8)
    if total > limits.max_bytes_decoded:
        raise ImagingError(
            "too_large",
            f"expected at most {limits.max_bytes_decoded} decoded bytes; the header declares "
            f"{rows} x {cols} x {frames} frames x {samples} samples x {bits} bits = {total}",
        )
    return _PixelHeader(rows, cols, frames)


def _pick_frame(frame: int | None, n_frames: int) -> int:
    if frame is None:
        return n_frames // 2
    if not isinstance(frame, int) or not 0 <= frame < n_frames:
        raise ImagingError(
            "bad_frame", f"expected a frame index in 0..{n_frames - 1}; got {frame!r}"
        )
    return frame


def _decode_frame(ds: FileDataset, index: int, header: _PixelHeader) -> tuple[np.ndarray, str]:
    """Decode frame `index`; return it and its photometric interpretation after decoding."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if not tsyntax:
        raise ImagingError(
            "not_dicom", "expected a (0002,0010) Transfer Syntax UID in the file meta; none found"
        )
    shown = f"{tsyntax} ({tsyntax.name})" if tsyntax.is_valid else "an invalid UID"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise ImagingError(
            "unsupported_transfer_syntax",
            f"expected a transfer syntax pydicom can decode; got {shown}",
        ) from e
    if not decoder.is_available:
        raise ImagingError(
            "unsupported_transfer_syntax",
            f"no installed decoder plugin handles {shown}",
        )
    if tsyntax in _CODESTREAM_SYNTAXES:
        _check_codestream(ds, index, header)
    if decoder.is_native and "PixelData" in ds:
        expected = get_expected_length(ds, "bytes")
        got = len(ds.PixelData)
        if got < expected:
            raise ImagingError(
                "truncated", f"expected {expected} bytes of native pixel data; got {got}"
            )
    try:
        arr, props = decoder.as_array(ds, index=index, validate=True, **as_pixel_options(ds))
    except ImagingError:
        raise
    except Exception as e:
        raise ImagingError(
            "decode_failed", f"frame {index} of the {shown} pixel data could not be decoded"
        ) from e
    photometric = str(props.get("photometric_interpretation", ds.get("PhotometricInterpretation")))
    return arr, photometric


def _check_codestream(ds: Dataset, index: int, header: _PixelHeader) -> None:
    """Refuse a JPEG-family frame whose own header declares more pixels than the DICOM one."""
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frame = get_frame(
            ds.PixelData, index, extended_offsets=offsets, number_of_frames=header.frames
        )
    except Exception:
        return  # broken encapsulation: the decoder reports it
    size = declared_size(frame)
    if size is not None and size[0] * size[1] > header.rows * header.columns:
        raise ImagingError(
            "decompression_bomb",
            f"compressed frame {index} declares {size[0]} x {size[1]} pixels; the DICOM header "
            f"declares {header.columns} x {header.rows}",
        )
