"""Every DICOM file shipped with pydicom and pydicom-data, uploaded through the API: each is
stored (201) or refused with a 4xx in the error shape; nothing gives a 500."""

from __future__ import annotations

from pathlib import Path

from pydicom.data.data_manager import DATA_ROOT, DataTypes, external_data_sources


def shipped() -> list[Path]:
    files = sorted(Path(DATA_ROOT).glob("**/*.dcm"))
    for _name, source in sorted(external_data_sources().items()):
        files += sorted(Path(p) for p in source.get_paths("**/*.dcm", DataTypes.DATASET))
    return files


def test_every_shipped_dicom_is_201_or_4xx(sqlite_api):
    api = sqlite_api
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
