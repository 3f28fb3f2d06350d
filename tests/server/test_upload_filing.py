"""An upload files DICOM by Study Instance UID (`ingest.file_upload`), as STOW-RS, DIMSE and
imports do: the same file sent again is the study held already, never a second copy of it;
another slice of the study joins it; a UID reused for another patient is refused, by every
route. PNG and JPEG images carry no UID and always make a new study."""

from __future__ import annotations

import io
import logging
import threading

import pydicom
from api_helpers import (
    CT_SMALL,
    assert_error,
    ct_of_new_study,
    ct_with,
    multipart_related,
    png_bytes,
    upload,
)
from sqlalchemy import func, select

from tinyllava_med.server.db.models import AuditEvent, Image, Study

DICOM = "application/dicom"


def _count(api, model) -> int:
    with api.app.state.session_factory() as s:
        return s.scalar(select(func.count()).select_from(model))


def _ask(api, data: bytes, question: str = "Which organ?"):
    return api.post(
        "/v1/ask",
        headers=api.h(),
        files={"file": ("ct.dcm", data, DICOM)},
        data={"question": question},
    )


def test_the_same_study_sent_again_is_the_study_held(api):
    first = upload(api, ("ct.dcm", CT_SMALL.read_bytes(), DICOM))
    assert first.status_code == 201, first.text
    study = first.json()
    r = api.post(f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "?"})
    assert r.status_code == 201, r.text

    again = upload(api, ("again.dcm", CT_SMALL.read_bytes(), DICOM))
    assert again.status_code == 200, again.text  # nothing new
    assert again.json()["id"] == study["id"] and len(again.json()["images"]) == 1
    assert again.json()["reports"] == 1  # what was asked before is there
    assert _count(api, Study) == 1 and _count(api, Image) == 1

    # another slice of the study joins it (201: a new image), numbered after the first
    ds = pydicom.dcmread(CT_SMALL)
    second = ct_with(SOPInstanceUID=pydicom.uid.generate_uid(), InstanceNumber=2)
    r = upload(api, ("two.dcm", second, DICOM))
    assert r.status_code == 201, r.text
    assert r.json()["id"] == study["id"]
    assert [i["SOPInstanceUID"] for i in r.json()["images"]] == [
        ds.SOPInstanceUID,
        pydicom.dcmread(io.BytesIO(second)).SOPInstanceUID,
    ]

    # a one-shot question about the second slice is about that image, in that study
    r = _ask(api, second)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["study"]["id"] == study["id"] and body["report"]["image_index"] == 1
    assert (body["study"]["reports"], len(body["study"]["images"])) == (2, 2)
    assert _count(api, Study) == 1 and _count(api, Image) == 2

    # one file twice in one upload is one image
    fresh = ct_of_new_study()
    r = upload(api, ("a.dcm", fresh, DICOM), ("b.dcm", fresh, DICOM))
    assert r.status_code == 201 and len(r.json()["images"]) == 1, r.text

    with api.app.state.session_factory() as s:
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "study.upload").order_by(AuditEvent.id)
        ).all()
    assert [(e.status_code, e.detail["new"], e.detail["new_study"]) for e in events] == [
        (201, 1, True),
        (200, 0, False),
        (201, 1, False),
        (200, 0, False),  # the one-shot question's file, held already
        (201, 1, True),
    ]


def test_pushed_and_uploaded_instances_share_one_study(api):
    """A study the PACS sent by STOW-RS, uploaded by hand: one study; and the other way."""
    body, ctype = multipart_related(CT_SMALL.read_bytes())
    r = api.post("/dicomweb/studies", content=body, headers={**api.h(), "Content-Type": ctype})
    assert r.status_code == 200, r.text
    r = upload(api, ("ct.dcm", CT_SMALL.read_bytes(), DICOM))
    assert r.status_code == 200, r.text
    uploaded = ct_of_new_study()
    r = upload(api, ("new.dcm", uploaded, DICOM))
    assert r.status_code == 201, r.text
    body, ctype = multipart_related(uploaded)
    r = api.post("/dicomweb/studies", content=body, headers={**api.h(), "Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert _count(api, Study) == 2 and _count(api, Image) == 2


def test_a_uid_reused_for_another_patient_is_refused(api, caplog):
    """A device that reuses a Study Instance UID for another patient: the study held is not
    given that patient's image (a report would sit beside the wrong patient's images), by
    upload, one-shot question or STOW-RS; nothing is stored, and no message names a patient."""
    held = upload(api, ("ct.dcm", CT_SMALL.read_bytes(), DICOM)).json()
    other = ct_with(
        PatientID="OTHER-PATIENT-ID",
        PatientName="Other^Patient",
        SOPInstanceUID=pydicom.uid.generate_uid(),
    )
    caplog.set_level(logging.WARNING)
    r = upload(api, ("other.dcm", other, DICOM))
    assert_error(r, 409, "patient_mismatch")
    assert r.json()["error"]["detail"]["study_id"] == held["id"]
    r = _ask(api, other)
    assert_error(r, 409, "patient_mismatch")
    # both refusals are in the held study's history (they were audited with no study)
    history = api.get(
        "/v1/audit", params={"resource_id": held["id"]}, headers=api.h("admin")
    ).json()["data"]
    refused = [(e["action"], e["detail"]["code"]) for e in history if e["outcome"] == "invalid"]
    assert sorted(refused) == [
        ("question.ask", "patient_mismatch"),
        ("study.upload", "patient_mismatch"),
    ]
    body, ctype = multipart_related(other)
    r = api.post("/dicomweb/studies", content=body, headers={**api.h(), "Content-Type": ctype})
    assert r.status_code == 409, r.text
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]
    assert _count(api, Image) == 1 and _count(api, Study) == 1

    # nor within one new study: its files name one patient
    fresh = ct_of_new_study()
    ds = pydicom.dcmread(io.BytesIO(fresh))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PatientID = "OTHER-PATIENT-ID"
    buf = io.BytesIO()
    ds.save_as(buf)
    r = upload(api, ("a.dcm", fresh, DICOM), ("b.dcm", buf.getvalue(), DICOM))
    assert_error(r, 409, "patient_mismatch")
    assert _count(api, Image) == 1 and _count(api, Study) == 1

    assert "OTHER-PATIENT" not in caplog.text and "Other^Patient" not in caplog.text
    assert "held for another patient" in caplog.text

    # the same patient ID with a corrected name (the PACS sends the rest of the study after a
    # demographics fix): the same patient, it joins the study
    corrected = ct_with(PatientName="Corrected^Name", SOPInstanceUID=pydicom.uid.generate_uid())
    r = upload(api, ("c.dcm", corrected, DICOM))
    assert r.status_code == 201 and r.json()["id"] == held["id"], r.text
    with api.app.state.session_factory() as s:
        details = [str(e.detail) for e in s.scalars(select(AuditEvent))]
    assert not any("OTHER" in d or "Corrected" in d for d in details)


def test_an_instance_held_in_another_study_is_refused(api, caplog):
    """One SOP Instance UID under another Study Instance UID (a device that reused it, a copy
    edited apart from the original): refused by upload, one-shot question, STOW-RS and
    import, and no empty study is left; before, the image was filed in a second study with
    its own automatic report and SR."""
    held = upload(api, ("ct.dcm", CT_SMALL.read_bytes(), DICOM)).json()
    moved = ct_with(StudyInstanceUID=pydicom.uid.generate_uid())  # same SOP Instance UID
    caplog.set_level(logging.WARNING)
    r = upload(api, ("moved.dcm", moved, DICOM))
    assert_error(r, 409, "instance_conflict")
    assert r.json()["error"]["detail"]["study_id"] == held["id"]
    assert_error(_ask(api, moved), 409, "instance_conflict")
    body, ctype = multipart_related(moved)
    r = api.post("/dicomweb/studies", content=body, headers={**api.h(), "Content-Type": ctype})
    assert r.status_code == 409, r.text
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]
    r = api.post("/v1/studies/import", headers=api.h(), files=[("files", ("IM1", moved, DICOM))])
    assert_error(r, 422, "no_images")
    assert r.json()["error"]["detail"]["failed"] == {"uid_conflict": 1}
    assert _count(api, Image) == 1 and _count(api, Study) == 1
    assert f"held here in another study ({held['id']})" in caplog.text
    # the instance itself sent again is still the one held (200), not a conflict
    r = upload(api, ("ct.dcm", CT_SMALL.read_bytes(), DICOM))
    assert r.status_code == 200 and r.json()["id"] == held["id"], r.text


def test_images_without_a_uid_make_a_study_each(api):
    png = png_bytes()
    first = upload(api, ("a.png", png, "image/png"))
    second = upload(api, ("a.png", png, "image/png"))
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"]
    no_uid = pydicom.dcmread(CT_SMALL)
    del no_uid.StudyInstanceUID
    buf = io.BytesIO()
    no_uid.save_as(buf)
    ids = {upload(api, ("x.dcm", buf.getvalue(), DICOM)).json()["id"] for _ in range(2)}
    assert len(ids) == 2


def test_parallel_uploads_of_one_new_study_make_one_study(api):
    """Two workstations upload slices of one study at once: one study, each slice once."""
    slices = []
    uid = pydicom.uid.generate_uid()
    for n in range(8):
        slices.append(
            ct_with(
                StudyInstanceUID=uid, SOPInstanceUID=pydicom.uid.generate_uid(), InstanceNumber=n
            )
        )
    start, statuses = threading.Barrier(len(slices)), []

    def send(data: bytes) -> None:
        start.wait()
        statuses.append(upload(api, ("s.dcm", data, DICOM)).status_code)

    threads = [threading.Thread(target=send, args=(s,)) for s in slices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [201] * len(slices)
    with api.app.state.session_factory() as s:
        studies = s.scalars(select(Study).where(Study.StudyInstanceUID == uid)).all()
        assert len(studies) == 1
        assert sorted(i.n for i in studies[0].images) == list(range(len(slices)))


def test_filings_take_turns_and_always_let_go(api):
    """On SQLite this process's filings queue on one thread lock before the database's write
    lock (SQLite's busy handler slept up to 100 ms between tries). It is let go as the filing's
    transaction ends, whether it commits or is refused: a lock kept would stop every upload."""
    from tinyllava_med.server.ingest import _SQLITE_WRITER

    held = upload(api, ("ct.dcm", ct_of_new_study(), DICOM))
    assert held.status_code == 201 and not _SQLITE_WRITER.locked()
    other = ct_with(
        PatientID="OTHER-PATIENT-ID",
        StudyInstanceUID=pydicom.dcmread(io.BytesIO(ct_of_new_study())).StudyInstanceUID,
        SOPInstanceUID=pydicom.uid.generate_uid(),
    )
    assert upload(api, ("a.dcm", other, DICOM)).status_code == 201
    refused = ct_with(
        PatientID="A-THIRD-PATIENT",
        StudyInstanceUID=pydicom.dcmread(io.BytesIO(other)).StudyInstanceUID,
        SOPInstanceUID=pydicom.uid.generate_uid(),
    )
    assert_error(upload(api, ("b.dcm", refused, DICOM)), 409, "patient_mismatch")
    assert not _SQLITE_WRITER.locked()
    assert_error(_ask(api, refused), 409, "patient_mismatch")
    assert not _SQLITE_WRITER.locked()

    files = [("p.png", png_bytes(color=n), "image/png") for n in range(6)]
    files += [("c.dcm", ct_of_new_study(), DICOM) for _ in range(6)]
    start, statuses = threading.Barrier(len(files)), []

    def send(f) -> None:
        start.wait()
        statuses.append(upload(api, f).status_code)

    threads = [threading.Thread(target=send, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert statuses == [201] * len(files)
    assert not _SQLITE_WRITER.locked()


def test_an_instance_under_another_accession_number_is_filed_and_flagged(api, caplog):
    """An instance of a study held here that names another accession number (an order merged
    or corrected at the modality) is filed with its study, as its UID says, but no longer
    silently: the audit counts it and a warning (naming no value) says so, since a RIS waiting
    for a result under the other number will not find one."""
    study_uid = pydicom.uid.generate_uid()

    def instance(accession: str) -> bytes:
        uid = pydicom.uid.generate_uid()
        return ct_with(StudyInstanceUID=study_uid, SOPInstanceUID=uid, AccessionNumber=accession)

    caplog.set_level(logging.WARNING)
    first = upload(api, ("a.dcm", instance("ACC-1"), DICOM))
    assert first.status_code == 201, first.text
    second = upload(api, ("b.dcm", instance("ACC-2"), DICOM))
    assert second.status_code == 201 and second.json()["id"] == first.json()["id"], second.text
    body, ctype = multipart_related(instance("ACC-3"), instance("ACC-1"))
    r = api.post("/dicomweb/studies", content=body, headers={**api.h(), "Content-Type": ctype})
    assert r.status_code == 200, r.text
    with api.app.state.session_factory() as s:
        events = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.action.in_(("study.upload", "study.stow")))
            .order_by(AuditEvent.id)
        ).all()
        conflicts = [(e.action, e.detail.get("accession_conflicts")) for e in events]
    assert conflicts == [("study.upload", None), ("study.upload", 1), ("study.stow", 1)]
    assert caplog.text.count("names another accession number") == 2
    assert "ACC-2" not in caplog.text and "ACC-3" not in caplog.text
    listed = api.get("/v1/studies", params={"accession_number": "ACC-1"}, headers=api.h())
    assert [len(s["images"]) for s in listed.json()["data"]] == [4]
