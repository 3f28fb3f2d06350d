"""`POST /v1/studies/import`: a patient's CD (pydicom's DICOMDIR test tree: six studies of
three patients, DICOMDIRs, pixel-less objects and READMEs), a folder or a ZIP of it, on SQLite
and PostgreSQL."""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from api_helpers import CT_SMALL, assert_error, ct_of_new_study, ct_with, make_api, upload_ct
from pydicom.data import get_testdata_file
from sqlalchemy import select

from tinyllava_med.server.db.models import AuditEvent, Image, Job, Study

CD = Path(get_testdata_file("DICOMDIR", download=False)).parent  # pydicom's dicomdirtests
CD_FILES = sorted(p for p in CD.rglob("*") if p.is_file())


def _images_by_study() -> Counter[str]:
    """Study Instance UID -> images, read with pydicom: what the import must file."""
    out: Counter[str] = Counter()
    for path in CD_FILES:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False)
        except Exception:
            continue
        if "PixelData" in ds and "StudyInstanceUID" in ds:
            out[ds.StudyInstanceUID] += 1
    return out


def send(api, files, role="pacs"):
    return api.post(
        "/v1/studies/import",
        headers=api.h(role),
        files=[("files", (name, data, "application/octet-stream")) for name, data in files],
    )


def cd_files():
    return [(p.relative_to(CD).as_posix(), p.read_bytes()) for p in CD_FILES]


def zipped(files) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(f"CD/{name}", data)
    return buf.getvalue()


@pytest.fixture
def api(tmp_path, database_url, tiny_lm):
    yield from make_api(
        tmp_path, database_url, tiny_lm, auto_report_prompts={"MR": "Describe the findings."}
    )


def test_a_cd_brings_each_of_its_studies_and_skips_what_is_not_an_image(api):
    expected = _images_by_study()
    assert len(expected) == 6 and sum(expected.values()) == 31  # the tree is what we think

    r = send(api, cd_files())
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["stored"], body["already"], body["failed"]) == (31, 0, {})
    # DICOMDIRs and the CT series without pixels; the READMEs
    assert body["skipped"] == {"no_image": 58, "not_dicom": 2}
    got = {s["StudyInstanceUID"]: len(s["images"]) for s in body["studies"]}
    assert got == dict(expected)
    with api.app.state.session_factory() as s:
        assert s.query(Study).count() == 6 and s.query(Image).count() == 31
        jobs = s.scalars(select(Job).where(Job.kind == "auto_report")).all()
        mr = [st for st in s.scalars(select(Study)) if st.Modality == "MR"]
        assert sorted(j.study_id for j in jobs) == sorted(st.id for st in mr)
        assert sorted(body["jobs"]) == sorted(j.id for j in jobs)
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.import")).all()
    assert sum(e.detail["stored"] for e in events) == 31  # an event per chunk of files
    # no file or folder name (a CD's may name the patient) in the response or the audit
    names = {part for p in CD_FILES for part in p.relative_to(CD).parts}
    text = r.text + json.dumps([e.detail for e in events])
    # (the folders of the patients are named by their IDs: 77654033, ...; short all-digit file
    # names can match any number, so they are left out)
    assert not [n for n in names if (len(n) >= 6 or not n.isdigit()) and n in text]

    again = send(api, cd_files())  # the same CD again: nothing copied, the studies named
    assert again.status_code == 200, again.text
    assert (again.json()["stored"], again.json()["already"]) == (0, 31)
    assert {s["id"] for s in again.json()["studies"]} == {s["id"] for s in body["studies"]}
    with api.app.state.session_factory() as s:
        assert s.query(Study).count() == 6 and s.query(Image).count() == 31
        # the answer showed six held studies: the audit says which, though nothing was stored
        shown = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "study.read").order_by(AuditEvent.id)
        ).all()
    assert sorted(shown[-1].detail["studies"]) == sorted(s["id"] for s in body["studies"])
    assert shown[-1].detail["via"] == "import" and shown[-1].status_code == 200


def test_a_zip_of_the_cd_and_a_broken_file_beside_it(api):
    truncated = CT_SMALL.read_bytes()[:4000]
    r = send(api, [("cd.zip", zipped(cd_files())), ("IM0001", truncated)])
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["stored"], body["failed"]) == (31, {"truncated": 1})
    assert body["skipped"] == {"no_image": 58, "not_dicom": 2}
    assert len(body["studies"]) == 6


def test_another_patients_image_under_a_held_study_is_refused_and_its_study_not_shown(api):
    """A CD whose image carries the Study Instance UID of another patient's study here (a
    device that reused a UID): refused as STOW-RS refuses it, and that study is neither in the
    answer nor in the importer's audit (before, both named it: the importer appeared to have
    read another patient's study); alone, the 422 says it was refused, not that it held no
    image."""
    held = upload_ct(api)
    other = ct_with(PatientID="OTHER-PATIENT", SOPInstanceUID="1.2.3.4.5.6.7")
    r = send(api, [("IM1", ct_of_new_study()), ("IM2", other)])
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["stored"], body["failed"]) == (1, {"uid_conflict": 1})
    assert [s["id"] for s in body["studies"]] != [held["id"]] and len(body["studies"]) == 1
    assert "OTHER-PATIENT" not in r.text
    with api.app.state.session_factory() as s:
        shown = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "study.read").order_by(AuditEvent.id)
        ).all()[-1]
        assert shown.detail["studies"] == [body["studies"][0]["id"]]
        assert [i.SOPInstanceUID for i in s.get(Study, held["id"]).images] == [
            pydicom.dcmread(CT_SMALL).SOPInstanceUID
        ]
        assert s.query(Image).count() == 2

    r = send(api, [("IM2", other)])
    assert_error(r, 422, "no_images")
    assert "could be imported" in r.json()["error"]["message"]
    assert r.json()["error"]["detail"]["failed"] == {"uid_conflict": 1}


def test_nothing_to_import_is_422_and_limits_are_413(tmp_path, tiny_lm):
    def sqlite_url(name):
        return f"sqlite:///{tmp_path}/{name}.db"

    for api in make_api(tmp_path / "a", sqlite_url("a"), tiny_lm):
        readme = [("README.txt", (CD / "README.txt").read_bytes())]
        r = send(api, readme + [("DICOMDIR", (CD / "DICOMDIR").read_bytes())])
        assert_error(r, 422, "no_images")
        assert r.json()["error"]["detail"] == {
            "skipped": {"not_dicom": 1, "no_image": 1},
            "failed": {},
        }
        assert_error(send(api, []), 422)
        assert_error(api.post("/v1/studies/import", files=[("files", ("x", b"x"))]), 401)
    small = {
        "max_import_files": 40,
        "max_files_per_upload": 8,
        "max_import_bytes": 2**20,
        "max_upload_bytes": 2**20,
    }
    for api in make_api(tmp_path / "b", sqlite_url("b"), tiny_lm, **small):
        r = send(api, cd_files())  # 91 files: the multipart parser refuses the 41st
        assert_error(r, 413, "too_large")
        assert "Maximum number of files is 40" in r.json()["error"]["message"]
        r = send(api, [("cd.zip", zipped(cd_files()))])  # counted by the ZIP's directory
        assert_error(r, 413, "too_large")
        assert "at most 40 files" in r.json()["error"]["message"]
        # an archive that unpacks past the limit is refused by its directory, before any file
        # is read: 3 MB of zeros deflate to a few kB
        bomb = zipped([("IM1", b"\0" * 3 * 2**20)] + cd_files()[:10])
        assert len(bomb) < 2**20
        assert_error(send(api, [("cd.zip", bomb)]), 413, "too_large")
        with api.app.state.session_factory() as s:
            assert s.query(Image).count() == 0  # refused whole: nothing filed
    for api in make_api(tmp_path / "c", sqlite_url("c"), tiny_lm, max_upload_bytes=2**20):
        # one member over the per-file limit fails alone; the rest of the archive is filed
        r = send(api, [("cd.zip", zipped([("IM1", b"\0" * 3 * 2**20)] + cd_files()))])
        assert r.status_code == 201, r.text
        assert (r.json()["stored"], r.json()["failed"]) == (31, {"too_large": 1})


def test_a_chunk_holds_at_most_one_uploads_worth(tmp_path, tiny_lm, monkeypatch):
    """Files are filed in chunks of 32 files or `max_upload_bytes`, whichever comes first: a ZIP
    of a few MB whose members inflate to 64 MiB each held 32 of them (2 GB) at once."""
    from tinyllava_med.server import media_import
    from tinyllava_med.server.storage import ImageStore

    held: list[int] = []
    file_chunk = media_import._file_chunk

    def counted(sessions, store, settings, chunk, summary, actor):
        held.append(sum(map(len, chunk)))
        return file_chunk(sessions, store, settings, chunk, summary, actor)

    monkeypatch.setattr(media_import, "_file_chunk", counted)
    for api in make_api(tmp_path, f"sqlite:///{tmp_path}/db.db", tiny_lm):
        settings = api.app.state.settings.model_copy(update={"max_upload_bytes": 16 * 1024})
        summary = media_import.import_media(
            api.app.state.session_factory,
            ImageStore(settings.images_dir),
            settings,
            list(CD_FILES),
            actor="cli",
        )
    assert summary.stored == 31
    assert sum(held) == sum(p.stat().st_size for p in CD_FILES)  # every file, once
    largest = max(p.stat().st_size for p in CD_FILES)
    assert all(size < 16 * 1024 + largest for size in held), held
    assert len(held) > 91 // 32 + 1  # by bytes, not by count alone


def test_a_request_may_carry_more_files_than_starlettes_default(tmp_path, tiny_lm):
    """A PACS integrator's script posts a CD's files in one request: past the multipart
    parser's default of 1000 files, up to `max_import_files` (before, 400 "Too many files")."""
    padding = [(f"VIEWER/F{i:04}.JS", b"//") for i in range(1100)]
    for api in make_api(tmp_path, f"sqlite:///{tmp_path}/db.db", tiny_lm):
        r = send(api, [("IM0001", CT_SMALL.read_bytes()), *padding])
        assert r.status_code == 201, r.text
        assert (r.json()["stored"], r.json()["skipped"]) == (1, {"not_dicom": 1100})


def test_the_console_imports_a_mounted_cd(tmp_path, tiny_lm, monkeypatch, capsys):
    """`tinyllava-med import /media/cdrom` at the server's console: the same filing, audited as
    `cli`; the server then lists the studies."""
    from tinyllava_med.cli import main

    monkeypatch.setenv("TINYLLAVA_MED_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TINYLLAVA_MED_DATABASE_URL", raising=False)
    assert main(["import", str(CD)]) == 0
    out = capsys.readouterr().out
    assert "91 files: 31 new images, 0 already here, in 6 studies" in out
    assert "skipped: 58 no_image, 2 not_dicom" in out
    archive = tmp_path / "cd.zip"
    archive.write_bytes(zipped(cd_files()))
    assert main(["import", str(archive)]) == 0
    assert "1 file: 0 new images, 31 already here, in 6 studies" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such file or folder"):
        main(["import", str(tmp_path / "nowhere")])
    assert main(["import", str(CD / "README.txt")]) == 1  # nothing to import

    url = f"sqlite:///{tmp_path / 'data' / 'tinyllava_med.db'}"
    for api in make_api(tmp_path, url, tiny_lm):  # the same data directory and database
        listed = api.get("/v1/studies", headers=api.h()).json()
        assert listed["count"] == 6
        first = listed["data"][0]["id"]
        r = api.get(f"/v1/studies/{first}/images/0", headers=api.h())  # the files are where
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"  # it looks
        events = api.get(
            "/v1/audit", params={"action": "study.import"}, headers=api.h("admin")
        ).json()["data"]
        assert events and {e["actor"] for e in events} == {"cli"}
