"""Every DICOM file shipped with pydicom and pydicom-data, and files whose values are longer
than their VRs allow, uploaded through the API: each is stored (201) or refused with a 4xx in the
error shape; nothing gives a 500."""

from __future__ import annotations

from pathlib import Path

from pydicom.data.data_manager import DATA_ROOT, DataTypes, external_data_sources


def shipped() -> list[Path]:
    files = sorted(Path(DATA_ROOT).glob("**/*.dcm"))
    for _name, source in sorted(external_data_sources().items()):
        files += sorted(Path(p) for p in source.get_paths("**/*.dcm", DataTypes.DATASET))
    return files


def test_every_shipped_dicom_is_201_or_4xx(api):
    """On both databases: PostgreSQL enforces the columns' lengths, SQLite does not. Each study
    is deleted once checked: many files are one image in several transfer syntaxes, under the
    same UIDs, and an upload files an instance held already once (200, not stored again)."""
    files = shipped()
    assert len(files) > 100, "pydicom and pydicom-data test files are expected"
    outcomes: dict[int, int] = {}
    codes: dict[str, int] = {}
    for path in files:
        r = api.post(
            "/v1/studies",
            headers=api.h("pacs"),
            files=[("files", (path.name, path.read_bytes(), "application/dicom"))],
        )
        outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
        assert r.status_code == 201 or 400 <= r.status_code < 500, (path.name, r.text)
        if r.status_code != 201:
            err = r.json()["error"]
            assert err["code"] and err["message"], path.name
            codes[err["code"]] = codes.get(err["code"], 0) + 1
        else:
            image = r.json()["images"][0]
            png = api.get(f"/v1/studies/{r.json()['id']}/images/0", headers=api.h("pacs"))
            assert png.status_code == 200, (path.name, png.text)
            assert image["kind"] == "dicom"
            gone = api.delete(f"/v1/studies/{r.json()['id']}", headers=api.h("admin"))
            assert gone.status_code == 204, gone.text
    # what is refused is refused for a reason a user can act on (no pixels, broken files)
    assert set(codes) <= {
        "no_pixel_data",
        "truncated",
        "decode_failed",
        "not_dicom",
        "unsupported_transfer_syntax",
        "too_large",
        "unsupported_format",
        "decompression_bomb",
        "bad_frame",
        "invalid_dicom",
    }, codes
    assert outcomes.get(201, 0) > len(files) * 0.7, (outcomes, codes)


def test_pixels_that_are_not_an_image_are_refused(api):
    """A segmentation (label masks) and an RT dose grid hold pixel data but are no image to read
    or ask about: they were stored, and the model described a mask (a PACS integrator's
    review). Refused as objects without pixels are, by upload and by STOW-RS (0x0122)."""
    from api_helpers import assert_error, multipart_related
    from pydicom.data import get_testdata_file

    for name in ("liver.dcm", "rtdose.dcm"):
        data = Path(get_testdata_file(name, download=False)).read_bytes()
        r = api.post(
            "/v1/studies",
            headers=api.h("pacs"),
            files=[("files", (name, data, "application/dicom"))],
        )
        assert_error(r, 400, "no_pixel_data")
        assert "holds pixels that are not one" in r.json()["error"]["message"]
        body, ctype = multipart_related(data)
        stow = api.post(
            "/dicomweb/studies", content=body, headers={**api.h("pacs"), "Content-Type": ctype}
        )
        assert stow.status_code == 409, stow.text
        assert stow.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0122]
    assert api.get("/v1/studies", headers=api.h()).json()["count"] == 0


def test_values_longer_than_their_vr_allows_are_not_a_500(api):
    """An accession number past DICOM's 16 characters (some RIS issue them) is kept and found;
    a modality or body part past its length is dropped and the file stored; a UID past 64
    characters is dropped: an upload stores the image without it, STOW-RS refuses that
    instance (0xC000) and stores the others. On PostgreSQL each was a 500, the file lost."""
    from api_helpers import ct_with, multipart_related, upload
    from pydicom.uid import generate_uid

    def new(**values):
        return ct_with(
            **{"StudyInstanceUID": generate_uid(), "SOPInstanceUID": generate_uid(), **values}
        )

    accession = "RIS-2026-" + "7" * 15  # 24 characters
    for values in (
        {"AccessionNumber": accession},
        {"Modality": "X" * 40, "BodyPartExamined": "B" * 100},
        {"StudyInstanceUID": "1." + "2" * 100},
    ):
        r = upload(api, ("x.dcm", new(**values), "application/dicom"))
        assert r.status_code == 201, (values, r.text)
    found = api.get("/v1/studies", headers=api.h(), params={"accession_number": accession}).json()
    assert [s["AccessionNumber"] for s in found["data"]] == [accession]
    studies = api.get("/v1/studies", headers=api.h()).json()["data"]
    assert sorted(s["Modality"] or "-" for s in studies) == ["-", "CT", "CT"]
    assert sum(s["StudyInstanceUID"] is None for s in studies) == 1

    good, bad = new(), new(SOPInstanceUID="1." + "3" * 100)
    body, ctype = multipart_related(good, bad)
    r = api.post(
        "/dicomweb/studies", content=body, headers={**api.h("pacs"), "Content-Type": ctype}
    )
    assert r.status_code == 202, r.text  # some stored, some not
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xC000]]
    assert len(r.json()["00081199"]["Value"]) == 1
