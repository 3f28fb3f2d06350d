"""Large images decoded at once share one memory budget (`DECODE_MEMORY_MB`): a 2048 x 2048
16-bit slice deflated to a few KB takes about 100 MB to decode, and such uploads, renders and
STOW-RS instances arriving together ran at once (a security review: 4 of 8192 x 8192 JPEG 2000,
7 KB each, peaked at 6.3 GB). Here the budget is held by a decode in progress: an upload of
another large image waits its turn, then answers 503 `decode_busy` with Retry-After (STOW-RS:
0xA700 out of resources), storing nothing; once the budget is free it is stored."""

from __future__ import annotations

import io

import pydicom
from api_helpers import CT_SMALL, assert_error, make_api, multipart_related, upload
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from tinyllava_med.imaging.budget import DECODE_BUDGET


def _large_deflated_slice() -> bytes:
    ds = pydicom.dcmread(CT_SMALL)
    ds.Rows = ds.Columns = 2048
    ds.PixelData = bytes(2048 * 2048 * 2)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_large_decodes_wait_for_the_memory_budget(tmp_path, sqlite_url, tiny_lm):
    data = _large_deflated_slice()
    assert len(data) < 64 * 1024  # a few KB on the wire
    for api in make_api(tmp_path, sqlite_url, tiny_lm, decode_memory_mb=80):
        assert DECODE_BUDGET.total == 80 * 1024 * 1024
        DECODE_BUDGET.resize(DECODE_BUDGET.total, wait_s=0.5)
        try:
            with DECODE_BUDGET.reserve(DECODE_BUDGET.total):  # another large decode, running
                r = upload(api, ("big.dcm", data, "application/dicom"))
                assert_error(r, 503, "decode_busy")
                assert r.headers["Retry-After"] == "10"
                body, ctype = multipart_related(data)
                stow = api.post(
                    "/dicomweb/studies", content=body, headers={**api.h(), "Content-Type": ctype}
                )
                assert stow.status_code == 409, stow.text
                failed = stow.json()["00081198"]["Value"][0]
                assert failed["00081197"]["Value"] == [0xA700]
                assert api.get("/v1/studies", headers=api.h()).json()["count"] == 0
            assert DECODE_BUDGET.used == 0
            r = upload(api, ("big.dcm", data, "application/dicom"))
            assert r.status_code == 201, r.text
            assert r.json()["images"][0]["rows"] == 2048
        finally:
            DECODE_BUDGET.resize(DECODE_BUDGET.total, wait_s=5.0)
