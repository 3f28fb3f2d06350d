"""Reports out in hospital formats: DICOM SR (highdicom) and FHIR DiagnosticReport."""

from __future__ import annotations

import base64
import html
import io
import re
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from xml.etree import ElementTree

import highdicom as hd
import pydicom
import pytest
from api_helpers import CT_SMALL, assert_error, make_api, png_bytes, upload, upload_ct
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.uid import ComprehensiveSRStorage
from sqlalchemy import event, select

from tinyllava_med.model.meta import weights_digest
from tinyllava_med.server.db.models import AuditEvent, Job, Report, utcnow
from tinyllava_med.server.dicom_sr import report_sr, to_bytes
from tinyllava_med.server.logs import quiet_libraries


def ask(api, study_id, question="What is the modality?"):
    r = api.post(f"/v1/studies/{study_id}/questions", headers=api.h(), json={"question": question})
    assert r.status_code == 201, r.text
    return r.json()


def sr_of(api, report_id) -> pydicom.Dataset:
    r = api.get(f"/v1/reports/{report_id}/sr", headers=api.h("pacs"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    return pydicom.dcmread(io.BytesIO(r.content))


def texts(item) -> dict[str, str]:
    """Every TEXT content item in the tree, by concept meaning."""
    out = {}
    for child in getattr(item, "ContentSequence", []):
        if child.ValueType == "TEXT":
            out[child.ConceptNameCodeSequence[0].CodeMeaning] = child.TextValue
        out.update(texts(child))
    return out


def test_a_blank_report_gives_a_valid_sr_and_a_blank_question_is_refused(api):
    """A TEXT item's value is Type 1: a draft cleared to be rewritten (or a model's empty
    answer) gave an SR with an empty Finding, which a PACS refuses (dciodvfy: empty Type 1C
    TextValue). A question of spaces is refused before a report is made for it."""
    study = upload_ct(api)
    report = ask(api, study["id"])
    for blank in ("", "   "):
        r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"text": blank})
        assert r.status_code == 200, r.text
        assert texts(sr_of(api, report["id"]))["Finding"] == "(no text)"
    r = api.post(
        f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "  \n "}
    )
    assert_error(r, 422, "invalid_request")
    r = api.post(
        "/v1/ask",
        headers=api.h(),
        files={"file": ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")},
        data={"question": "   "},
    )
    assert_error(r, 422, "invalid_request")


def test_sr_draft_then_signed(api):
    study = upload_ct(api)
    report = ask(api, study["id"])
    source = pydicom.dcmread(CT_SMALL)
    # a draft edit with non-ASCII text
    r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"text": "Ödem — 2 cm"})
    assert r.status_code == 200, r.text
    report = r.json()

    draft = sr_of(api, report["id"])
    assert draft.SOPClassUID == ComprehensiveSRStorage and draft.Modality == "SR"
    # filed under the source's patient and study, referencing the source image
    assert draft.PatientID == source.PatientID and draft.StudyInstanceUID == source.StudyInstanceUID
    assert draft.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = draft.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (draft.CompletionFlag, draft.VerificationFlag, draft.PreliminaryFlag) == (
        "PARTIAL",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    t = texts(draft)
    assert t["Finding"] == "Ödem — 2 cm" and t["Request"] == report["question"]
    # TID 2000's rows: the language first (mandatory), the observer context, then CID 7001
    # sections: the question as the Request under Clinical Information, the answer under Findings
    top = [(i.RelationshipType, i.ConceptNameCodeSequence[0]) for i in draft.ContentSequence]
    assert (top[0][0], top[0][1].CodeValue) == ("HAS CONCEPT MOD", "121049")
    assert draft.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "en-US"
    sections = [(code.CodeValue, code.CodingSchemeDesignator) for rel, code in top[-2:]]
    assert sections == [("55752-0", "LN"), ("59776-5", "LN")]
    request = draft.ContentSequence[-2].ContentSequence[0].ConceptNameCodeSequence[0]
    assert (request.CodeValue, request.CodingSchemeDesignator) == ("55115-0", "LN")
    # the model is the observer device (highdicom parses the document back)
    parsed = hd.sr.ComprehensiveSR.from_dataset(draft)
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in parsed.ContentSequence}
    assert items["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert items["Device Observer UID"].UID
    names = {k: getattr(i, "TextValue", None) for k, i in items.items()}
    assert names["Device Observer Name"] == report["model"]
    assert report["quantization"] in names["Device Observer Model Name"]
    # which weights: the start of their digest (sha256: and 16 hex digits)
    digest = report["model_weights"]
    assert names["Device Observer Serial Number"] == f"{report['model_version']} {digest[:23]}"
    # the same report state gives the same instance
    assert sr_of(api, report["id"]).SOPInstanceUID == draft.SOPInstanceUID

    r = api.patch(
        f"/v1/reports/{report['id']}",
        headers=api.h("radiologist"),
        json={"text": "CT of the chest. No acute finding.", "status": "final"},
    )
    assert r.status_code == 200, r.text
    signed = sr_of(api, report["id"])
    assert signed.SOPInstanceUID != draft.SOPInstanceUID
    assert signed.SeriesInstanceUID == draft.SeriesInstanceUID
    # the model's answer was 1, the edited draft 2, the signed report 3: listed in that order
    assert (int(draft.InstanceNumber), int(signed.InstanceNumber)) == (2, 3)
    assert (signed.CompletionFlag, signed.VerificationFlag, signed.PreliminaryFlag) == (
        "COMPLETE",
        "VERIFIED",
        "FINAL",
    )
    verifier = signed.VerifyingObserverSequence[0]
    assert verifier.VerifyingObserverName.family_name == "test radiologist"
    # the signer's key id identifies the observer: two keys may share a name (it was empty)
    (code,) = verifier.VerifyingObserverIdentificationCodeSequence
    signed_by = api.get(f"/v1/reports/{report['id']}", headers=api.h()).json()["signed_by"]
    assert (code.get("CodeValue") or code.get("LongCodeValue")) == signed_by
    assert (code.CodingSchemeDesignator, code.CodeMeaning) == ("99TLLVMED", "test radiologist")
    # the Finding is the radiologist's wording: its observer is that person, not the device
    finding = signed.ContentSequence[-1].ContentSequence[0]
    context = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i
        for i in finding.ContentSequence
        if i.RelationshipType == "HAS OBS CONTEXT"
    }
    assert context["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Person"
    assert context["Person Observer Name"].PersonName.family_name == "test radiologist"
    t = texts(signed)
    assert t["Finding"] == "CT of the chest. No acute finding."
    # the random tiny model's answer has control characters, which DICOM text may not carry
    answer = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", report["answer"])
    assert t["Comment"] == f"Unedited model answer: {answer}"


def test_fhir_diagnostic_report(api, tiny_model_dir):
    study = upload_ct(api)
    report = ask(api, study["id"])
    # which weights answered: the digest of the served folder's weight files
    assert report["model_weights"] == weights_digest(tiny_model_dir)
    assert report["model_weights"].startswith("sha256:")
    r = api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h("pacs"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    dr = DiagnosticReport.model_validate_json(r.text)  # validates the whole resource
    assert dr.status == "preliminary" and dr.id == report["id"]
    assert dr.code.coding[0].code == "18748-4"
    uid = pydicom.dcmread(CT_SMALL).StudyInstanceUID
    assert dr.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
    assert dr.basedOn is None  # CT_small has no accession number
    assert dr.conclusion == report["text"]
    form = r.json()["presentedForm"][0]
    assert base64.b64decode(form["data"]).decode() == report["text"]
    contained = {c.id: c for c in dr.contained}
    device, finding = contained["model"], contained["finding"]
    assert device.get_resource_type() == "Device"
    assert device.deviceName[0].name == report["model"]
    assert {v.value for v in device.version} >= {report["quantization"], report["model_weights"]}
    assert finding.device.reference == "#model" and dr.result[0].reference == "#finding"
    assert finding.valueString == report["text"]
    # the R4 reference rules: performer / resultsInterpreter never point at the device
    for ref in (dr.performer or []) + (dr.resultsInterpreter or []):
        assert ref.reference is None

    api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"status": "final"})
    dr = DiagnosticReport.model_validate_json(
        api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h()).text
    )
    assert dr.status == "final"
    assert dr.resultsInterpreter[0].display == "test radiologist"


def test_an_answer_cut_at_its_token_limit_says_so_in_its_exports(api):
    """A draft that is the model's answer stopped at `max_new_tokens` (`finish_reason`
    "length", an automatic report at 128 tokens) tells the PACS's and the RIS's reader that it
    may end mid-sentence; once a radiologist rewrites it, the note goes."""
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    r = api.post(url, headers=api.h(), json={"question": "Describe.", "max_new_tokens": 1})
    report = r.json()
    assert report["finish_reason"] == "length", report
    note = "The model's answer stopped at its length limit (max_new_tokens) and may be incomplete."
    fhir = api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h()).json()
    finding = next(c for c in fhir["contained"] if c["id"] == "finding")
    assert {"text": note} in finding["note"] and html.escape(note) in fhir["text"]["div"]
    DiagnosticReport.model_validate(fhir)
    assert texts(sr_of(api, report["id"]))["Comment"] == note
    rewritten = {"text": "No acute finding.", "status": "final"}
    assert api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json=rewritten).is_success
    fhir = api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h()).text
    assert note not in fhir
    assert note not in texts(sr_of(api, report["id"])).values()


def test_exports_of_a_report_stored_with_control_characters_are_valid(api):
    """The API refuses control characters (but tab and line breaks) in report text; a report
    stored before it did still exports as valid DICOM text, FHIR strings and XHTML: they go."""
    study = upload_ct(api)
    report = ask(api, study["id"])
    with api.app.state.session_factory.begin() as s:
        row = s.get(Report, report["id"])
        row.question, row.text = "Size\x07?", "Ödem\x0bline two\x1b[31m\tend\r\n"
    r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text

    t = texts(sr_of(api, report["id"]))
    assert t["Finding"] == "Ödemline two[31m\tend\r\n"
    assert t["Request"] == "Size?"

    r = api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h("pacs"))
    assert r.status_code == 200, r.text
    dr = DiagnosticReport.model_validate_json(r.text)
    assert dr.conclusion == "Ödemline two[31m\tend\r\n"

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict | list):
            for v in value.values() if isinstance(value, dict) else value:
                yield from strings(v)

    # FHIR: "Strings SHALL NOT contain Unicode character points below 32, except for u0009,
    # u000D and u000A"; the narrative is XHTML, which an XML parser reads
    for value in strings(r.json()):
        assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f]", value), value
    div = ElementTree.fromstring(r.json()["text"]["div"])
    assert "Size?" in "".join(div.itertext())


def comments(item) -> list[str]:
    """The TEXT content items named Comment, in document order."""
    out = []
    for child in getattr(item, "ContentSequence", []):
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeMeaning == "Comment":
            out.append(child.TextValue)
        out.extend(comments(child))
    return out


def test_a_signed_report_is_amended_with_a_reason_and_its_exports_say_so(api):
    """A radiologist corrects a signed report: the new text is signed again by them, the history
    keeps the signed text and why it changed, the SR is a new verified instance naming the signed
    one as its predecessor, and FHIR calls the report amended."""
    report = ask(api, upload_ct(api)["id"])
    rid, path = report["id"], f"/v1/reports/{report['id']}"
    signed = api.patch(path, headers=api.h(), json={"text": "No fracture.", "status": "final"})
    assert signed.status_code == 200, signed.text
    first_sr = sr_of(api, rid)

    amend = {"text": "Hairline fracture of the 5th rib.", "status": "amended", "reason": "missed"}
    assert_error(api.patch(path, headers=api.h("pacs"), json=amend), 403, "forbidden")
    assert_error(api.patch(path, headers=api.h(), json={"text": "x"}), 409, "report_final")
    no_reason = {"text": amend["text"], "status": "amended"}
    assert_error(api.patch(path, headers=api.h(), json=no_reason), 422, "invalid_report_update")
    r = api.patch(path, headers=api.h("admin"), json=amend)
    assert r.status_code == 200, r.text
    amended = r.json()
    assert (amended["status"], amended["text"], amended["answer"]) == (
        "amended",
        amend["text"],
        report["answer"],
    )
    assert amended["signed_by"] != signed.json()["signed_by"]  # whoever amended signs it
    assert amended["signed_at"] > signed.json()["signed_at"]
    listed = api.get("/v1/reports", params={"status": "amended"}, headers=api.h("pacs")).json()
    assert [x["id"] for x in listed["data"]] == [rid]

    history = api.get(f"{path}/history", headers=api.h("pacs"))
    assert history.status_code == 200, history.text
    steps = [
        (e["previous_status"], e["new_status"], e["previous_text"], e["new_text"], e["reason"])
        for e in history.json()["data"]
    ]
    assert steps == [
        ("draft", "final", report["answer"], "No fracture.", None),
        ("final", "amended", "No fracture.", amend["text"], "missed"),
    ]
    assert_error(api.get("/v1/reports/nope/history", headers=api.h()), 404, "report_not_found")

    sr = sr_of(api, rid)
    assert sr.SOPInstanceUID != first_sr.SOPInstanceUID
    assert sr.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "VERIFIED")
    assert sr.VerifyingObserverSequence[0].VerifyingObserverName.family_name == "first admin"
    assert texts(sr)["Finding"] == amend["text"]
    assert "Amended after signing: missed" in comments(sr)
    predecessor = sr.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == first_sr.StudyInstanceUID
    series = predecessor.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first_sr.SeriesInstanceUID
    ref = series.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        ComprehensiveSRStorage,
        first_sr.SOPInstanceUID,
    )
    assert "PredecessorDocumentsSequence" not in first_sr
    hd.sr.ComprehensiveSR.from_dataset(sr)  # still a document highdicom reads back

    dr = DiagnosticReport.model_validate_json(api.get(f"{path}/fhir", headers=api.h()).text)
    assert dr.status == "amended" and dr.conclusion == amend["text"]
    assert dr.resultsInterpreter[0].display == "first admin"
    finding = {c.id: c for c in dr.contained}["finding"]
    assert finding.status == "amended"
    assert "Amended: missed" in [n.text for n in finding.note]

    with api.app.state.session_factory() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert "report.amend" in actions and "report.history" in actions

    # signed as the model wrote it, or changed first: a model-quality signal for operators
    unchanged = ask(api, upload_ct(api, new_study=True)["id"])
    r = api.patch(f"/v1/reports/{unchanged['id']}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    metrics = api.get("/metrics").text
    for status, changed in (("final", "true"), ("amended", "true"), ("final", "false")):
        line = (
            f'tinyllava_med_reports_signed_total{{changed="{changed}",status="{status}",'
            f'variant="{report["variant"] or report["model"]}"}} 1.0'
        )
        assert line in metrics, line


def test_a_signature_whose_commit_fails_is_not_counted(api):
    """The signed-reports metric counts what the database kept: a signature whose transaction
    fails to commit leaves the report a draft and the counter where it was."""
    report = ask(api, upload_ct(api)["id"])
    path = f"/v1/reports/{report['id']}"
    line = "tinyllava_med_reports_signed_total{"

    def refuse_a_signed_report(session):
        status = session.scalar(select(Report.status).where(Report.id == report["id"]))
        if status == "final":
            raise RuntimeError("the database went away at COMMIT")

    factory = api.app.state.session_factory
    event.listen(factory, "before_commit", refuse_a_signed_report)
    try:
        r = api.patch(path, headers=api.h(), json={"status": "final"})
    finally:
        event.remove(factory, "before_commit", refuse_a_signed_report)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
    assert api.get(path, headers=api.h()).json()["status"] == "draft"
    assert line not in api.get("/metrics").text

    r = api.patch(path, headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    assert f'{line}changed="false",status="final"' in api.get("/metrics").text


def test_a_pacs_that_never_answers_holds_a_push_once_for_its_timeout(
    tmp_path, sqlite_url, tiny_lm, monkeypatch
):
    """A PACS that takes the connection and never answers: one push tries once, for at most
    `PUSH_TIMEOUT_S` per read, and fails to the queue's backoff (dicomweb-client's own retries
    held the only worker about 85 s)."""
    import socket
    import threading

    from tinyllava_med.server import jobs

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def take() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])  # and never a byte back
            except OSError:
                return

    threading.Thread(target=take, daemon=True).start()
    monkeypatch.setattr(jobs, "PUSH_TIMEOUT_S", 0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
    try:
        for api in make_api(tmp_path, sqlite_url, tiny_lm, dicomweb_push_url=url, job_workers=0):
            runner = jobs.JobRunner(api.app, 0)
            with pytest.raises(Exception, match="(?i)timed? ?out"):
                runner._deliver(pydicom.dcmread(CT_SMALL))
            assert len(accepted) == 1  # tried once
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_each_queued_push_sends_the_version_it_was_queued_for(tmp_path, database_url, tiny_lm):
    """Pushes wait in the queue (the PACS is down, say) while a draft is edited, signed and then
    amended: each push job names its version, and the SR rebuilt from the history for it is the
    SR that version had when it was current. So the PACS gets the signed SR that the amended one
    names as its predecessor, not the amended one twice."""
    overrides = {"dicomweb_push_url": "http://127.0.0.1:9/dicom-web", "job_workers": 0}
    for api in make_api(tmp_path, database_url, tiny_lm, **overrides):
        report = ask(api, upload_ct(api)["id"])
        rid, path = report["id"], f"/v1/reports/{report['id']}"
        current = {"draft": sr_of(api, rid)}
        for status, body in (
            ("edited", {"text": "Draft text."}),
            ("final", {"text": "No fracture.", "status": "final"}),
            ("amended", {"text": "Rib fracture.", "status": "amended", "reason": "missed"}),
        ):
            r = api.patch(path, headers=api.h(), json=body)
            assert r.status_code == 200, r.text
            current[status] = sr_of(api, rid)
        with api.app.state.session_factory() as s:
            jobs = s.scalars(select(Job).where(Job.kind == "push_sr").order_by(Job.id)).all()
            versions = [datetime.fromisoformat(j.payload["version"]) for j in jobs]
            assert [j.payload["report_id"] for j in jobs] == [rid, rid]  # signed, amended
            row = s.get(Report, rid)
            store = api.app.state.store
            rebuilt = {
                status: pydicom.dcmread(
                    io.BytesIO(report_sr(s, store, row, "Test", at=uid_version))
                )
                for status, uid_version in (("final", versions[0]), ("amended", versions[1]))
            }
            edits = row.edits
            # the draft versions, before any push was queued, rebuild too
            rebuilt["draft"] = pydicom.dcmread(
                io.BytesIO(report_sr(s, store, row, "Test", at=edits[0].previous_updated_at))
            )
            rebuilt["edited"] = pydicom.dcmread(
                io.BytesIO(report_sr(s, store, row, "Test", at=edits[0].edited_at))
            )
        for status, sr in rebuilt.items():
            then = current[status]
            assert sr.SOPInstanceUID == then.SOPInstanceUID, status
            assert texts(sr) == texts(then) and comments(sr) == comments(then), status
            assert (sr.CompletionFlag, sr.VerificationFlag) == (
                then.CompletionFlag,
                then.VerificationFlag,
            ), status
            verifiers = [
                [str(v.VerifyingObserverName) for v in x.get("VerifyingObserverSequence", [])]
                for x in (sr, then)
            ]
            assert verifiers[0] == verifiers[1], status
            assert ("PredecessorDocumentsSequence" in sr) == (status == "amended"), status
        assert texts(rebuilt["final"])["Finding"] == "No fracture."
        predecessor = rebuilt["amended"].PredecessorDocumentsSequence[0]
        named = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert named.ReferencedSOPInstanceUID == rebuilt["final"].SOPInstanceUID


def test_deleting_a_study_rejects_its_pushed_srs_with_an_iocm_note(tmp_path, database_url, tiny_lm):
    """A study sent by mistake had its draft SR pushed (and an edited version is being pushed
    as it is deleted): the deletion queues an IOCM rejection note, a KOS in the same study
    titled "Rejected for Patient Safety Reasons" naming both SR instances (not the version whose
    push never ran). The note waits in the file store, out of the jobs table; once sent it is
    removed and the job is done."""
    from tinyllava_med.server import jobs

    overrides = {"dicomweb_push_url": "http://127.0.0.1:9/dicom-web", "job_workers": 0}
    for api in make_api(tmp_path, database_url, tiny_lm, **overrides):
        study = upload_ct(api)
        report = ask(api, study["id"])
        rid = report["id"]
        sessions = api.app.state.session_factory
        sent = []
        for status, text in (("done", None), ("running", "Edited."), ("queued", "Again.")):
            if text:
                r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"text": text})
                assert r.status_code == 200, r.text
            with sessions.begin() as s:
                job = jobs.schedule_push(s, api.app.state.settings, s.get(Report, rid))
                job.status = status
            if status != "queued":
                sent.append(str(sr_of(api, rid).SOPInstanceUID))
        # damaged pixels (the header intact) do not keep the study from going with its note
        path = api.app.state.store.path(study["images"][0]["sha256"])
        data = path.read_bytes()
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

        r = api.delete(f"/v1/studies/{study['id']}", headers=api.h("admin"))
        assert r.status_code == 204, r.text
        with sessions() as s:
            (job,) = s.scalars(select(Job).where(Job.kind == "push_rejection")).all()
            assert job.study_id is None and job.status == "queued"
            assert set(job.payload) == {"sha256", "rejected"} and job.payload["rejected"] == 2
            (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.delete"))
            assert event.detail["rejection_job_id"] == job.id
            assert event.detail["rejected_srs"] == 2
        store = api.app.state.store
        kos = pydicom.dcmread(store.path(job.payload["sha256"]))
        source = pydicom.dcmread(CT_SMALL)
        assert kos.Modality == "KO" and kos.StudyInstanceUID == source.StudyInstanceUID
        assert kos.PatientID == source.PatientID
        title = kos.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator) == ("113037", "DCM")
        named = [
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in kos.ContentSequence
            if item.ValueType == "COMPOSITE"
        ]
        assert sorted(named) == sorted(sent)
        evidence = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert {x.ReferencedSOPInstanceUID for x in evidence.ReferencedSOPSequence} == set(sent)
        hd.ko.KeyObjectSelectionDocument.from_dataset(kos)  # a document highdicom reads back
        # its times are in the zone of the SRs it rejects (CT_small's -0500), and say so
        assert kos.TimezoneOffsetFromUTC == source.TimezoneOffsetFromUTC == "-0500"
        made = datetime.strptime(kos.ContentDate + kos.ContentTime[:6] + "-0500", "%Y%m%d%H%M%S%z")
        assert abs((made - datetime.now(timezone.utc)).total_seconds()) < 120
        assert (
            kos.InstanceCreationDate + kos.InstanceCreationTime == kos.ContentDate + kos.ContentTime
        )

        # the job sends it (here to a stand-in for the PACS) and removes the file
        runner = jobs.JobRunner(api.app, workers=0)
        stowed = []
        runner._deliver = stowed.append  # type: ignore[method-assign]
        with sessions.begin() as s:
            claimed = jobs.claim(s, "w1", lease_s=600)
        assert claimed is not None and claimed.kind == "push_rejection"
        runner.run(claimed)
        assert [x.SOPInstanceUID for x in stowed] == [kos.SOPInstanceUID]
        assert not store.exists(job.payload["sha256"])
        with sessions() as s:
            assert s.get(Job, job.id).status == "done"
            actions = s.scalars(select(AuditEvent.action)).all()
            assert "job.push_rejection" in actions

        # a study none of whose SRs reached the PACS is deleted with no note
        other = upload_ct(api)
        ask(api, other["id"])
        r = api.delete(f"/v1/studies/{other['id']}", headers=api.h("admin"))
        assert r.status_code == 204, r.text
        with sessions() as s:
            assert len(s.scalars(select(Job).where(Job.kind == "push_rejection")).all()) == 1


MISSING = {
    "SeriesInstanceUID": "Series Instance UID",
    "SOPInstanceUID": "SOP Instance UID",
    "SOPClassUID": "SOP Class UID",
    "StudyInstanceUID": "Study Instance UID",
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("malformed", [False, True], ids=["absent", "malformed"])
@pytest.mark.parametrize("keyword", list(MISSING))
def test_an_image_without_a_uid_the_sr_references_has_no_sr_and_no_push(
    tmp_path, database_url, tiny_lm, keyword, malformed
):
    """These UIDs are Type 1, but some CDs and converters leave one out or write one that is
    no UID: the image is filed and answered about; its report's SR is a 409 naming the UID (not
    a 500: highdicom raised a KeyError; nor an SR with the malformed UID, which a PACS refuses),
    and no push is queued to fail until its attempts run out."""
    ds = pydicom.dcmread(CT_SMALL)
    if malformed:
        setattr(ds, keyword, "not a uid 1.2")
    else:
        delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf)
    overrides = {"dicomweb_push_url": "http://127.0.0.1:9/dicom-web", "job_workers": 0}
    for api in make_api(tmp_path, database_url, tiny_lm, **overrides):
        r = upload(api, ("noseries.dcm", buf.getvalue(), "application/dicom"))
        assert r.status_code == 201, r.text
        report = ask(api, r.json()["id"])
        r = api.get(f"/v1/reports/{report['id']}/sr", headers=api.h())
        assert_error(r, 409, "no_dicom_source")
        assert MISSING[keyword] in r.json()["error"]["message"]
        assert api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h()).status_code == 200
        r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"status": "final"})
        assert r.status_code == 200, r.text
        with api.app.state.session_factory() as s:
            assert s.scalars(select(Job).where(Job.kind == "push_sr")).all() == []


@pytest.mark.parametrize(
    "sop_class",
    ["1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.5", "1.2.826.0.1.3680043.9.7.1"],
    ids=["retired ultrasound", "retired nuclear medicine", "private"],
)
def test_an_image_of_a_class_highdicom_does_not_know_gets_an_sr(api, sop_class):
    """Old ultrasound machines still send the retired US class; vendors send private ones.
    highdicom finds the modules to copy by the class (a KeyError: a 500, and pushes that could
    never succeed); the SR is built, and references the image under its own class."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    buf = io.BytesIO()
    ds.save_as(buf)
    r = upload(api, ("old.dcm", buf.getvalue(), "application/dicom"))
    assert r.status_code == 201, r.text
    report = ask(api, r.json()["id"])
    r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    sr = sr_of(api, report["id"])
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (item,) = study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (
        sop_class,
        ds.SOPInstanceUID,
    )
    assert sr.PatientID == ds.PatientID and sr.StudyInstanceUID == ds.StudyInstanceUID

    def items(seq):
        for i in seq:
            yield i
            yield from items(i.get("ContentSequence", []))

    referenced = [
        i.ReferencedSOPSequence[0].ReferencedSOPClassUID
        for i in items(sr.ContentSequence)
        if i.ValueType == "IMAGE"
    ]
    assert referenced == [sop_class]


def test_an_sr_of_a_missing_or_damaged_image_file_is_410_not_500(api):
    """The SR copies its image's header from the stored file: a missing one answered 500."""
    study = upload_ct(api)
    report = ask(api, study["id"])
    path = api.app.state.store.path(study["images"][0]["sha256"])
    data = path.read_bytes()
    path.unlink()
    r = api.get(f"/v1/reports/{report['id']}/sr", headers=api.h())
    assert_error(r, 410, "image_missing")
    assert "db restore" in r.json()["error"]["message"]
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert_error(api.get(f"/v1/reports/{report['id']}/sr", headers=api.h()), 410, "image_damaged")
    path.write_bytes(data)
    assert sr_of(api, report["id"]).SOPClassUID == ComprehensiveSRStorage


def test_png_report_has_fhir_but_no_sr(api):
    api = api
    r = upload(api, ("x.png", png_bytes(), "image/png"))
    report = ask(api, r.json()["id"])
    assert_error(api.get(f"/v1/reports/{report['id']}/sr", headers=api.h()), 409, "no_dicom_source")
    dr = DiagnosticReport.model_validate_json(
        api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h()).text
    )
    assert dr.imagingStudy is None
    for form in ("sr", "fhir"):
        assert_error(api.get(f"/v1/reports/nope/{form}", headers=api.h()), 404, "report_not_found")
        assert api.get(f"/v1/reports/{report['id']}/{form}").status_code == 401


def _header_variant(change, n: int) -> bytes:
    """CT_small as another study (its own UIDs) with one header problem seen in real archives."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.77{n}"
    ds.SeriesInstanceUID = ds.StudyInstanceUID + ".1"
    ds.SOPInstanceUID = ds.StudyInstanceUID + ".1.1"
    change(ds)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _without(*keywords):
    def change(ds):
        for keyword in keywords:
            delattr(ds, keyword)

    return change


def _raw(charset: str, **values: bytes):
    """Values written as the bytes given, whatever the character set declares."""

    def change(ds):
        ds.SpecificCharacterSet = charset
        for keyword, value in values.items():
            ds[keyword].value = value

    return change


def _set(**values):
    def change(ds):
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


HEADERS = {  # what the SR must make of it: (Patient's Sex, birth date, accession, name)
    "missing type 2 attributes": (
        _without("AccessionNumber", "StudyID", "PatientSex", "PatientBirthDate", "StudyTime"),
        ("", "", "", "CompressedSamples^CT1"),
    ),
    "sex U, dashed birth date, impossible study date": (
        _set(PatientSex="U", PatientBirthDate="1980-01-02", StudyDate="20240230"),
        ("", "", "", "CompressedSamples^CT1"),
    ),
    "lower-case sex, single-component name": (
        _set(PatientSex="f", PatientName="NAKAMURA", AccessionNumber="A77"),
        ("F", "", "A77", "NAKAMURA"),
    ),
    "ACR-NEMA birth date, over-long name and accession number": (
        # dates in the old dotted form become DICOM's; a name longer than PN allows is left
        # empty; the accession number is kept as sent (the PACS holds the images under it)
        _set(PatientBirthDate="1961.03.17", PatientName="N" * 70, AccessionNumber="R" * 20),
        ("O", "19610317", "R" * 20, ""),
    ),
    "ISO 2022 IR 87 (Japanese)": (
        _set(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎"),
        ("O", "", "", "Yamada^Tarou=山田^太郎"),
    ),
    "Latin-1 bytes under a declared UTF-8": (
        # they do not decode: the SR carried 'M\ufffdller^J\ufffdrgen' as the name; empty now
        _raw("ISO_IR 192", PatientName=b"M\xfcller^J\xfcrgen"),
        ("O", "", "", ""),
    ),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_the_sr_is_built_from_headers_real_archives_send(api, case):
    """Headers that highdicom refused (an AttributeError or ValueError: a 500 on /sr, and every
    push to the PACS failing): missing Type 2 attributes, values DICOM does not allow, an ISO 2022
    character set. The SR leaves what cannot be read empty, keeps the rest, is UTF-8, and no
    warning quotes the patient's name (highdicom warned with it for a single-component name)."""
    change, (sex, birth, accession, name) = HEADERS[case]
    data = _header_variant(change, list(HEADERS).index(case))
    r = upload(api, ("variant.dcm", data, "application/dicom"))
    assert r.status_code == 201, r.text
    report = ask(api, r.json()["id"])
    r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    with warnings.catch_warnings(record=True) as seen:  # pytest resets filters per phase:
        warnings.simplefilter("always")
        quiet_libraries()  # so apply the server's here, as create_app does for serve
        sr = sr_of(api, report["id"])
    assert not [w for w in seen if "NAKAMURA" in str(w.message)]
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert (sr.PatientSex, sr.PatientBirthDate, sr.AccessionNumber) == (sex, birth, accession)
    assert str(sr.PatientName) == name
    assert sr.StudyInstanceUID == pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
    assert sr.VerificationFlag == "VERIFIED"


def test_the_signed_sr_supersedes_the_draft_sent_to_the_pacs(tmp_path, database_url, tiny_lm):
    """An automatic report pushes its preliminary SR; the signed SR names it in its Predecessor
    Documents Sequence (PS3.3: prior or provisional reports it includes), so the PACS links the
    two instead of showing the unedited AI draft as a report of its own. Before, only an
    amendment named a predecessor. Versions never queued for the PACS are not named.

    The PACS is down meanwhile: the draft's push waits in a long backoff, and the signed SR's
    may go first. The signed SR names the draft all the same (its instance UID fixes its
    contents: the same bytes before and after the draft's push), and once the signed SR is sent
    the draft's push is skipped, so the PACS never gets the draft after the report."""
    from tinyllava_med.server import jobs

    overrides = {"dicomweb_push_url": "http://127.0.0.1:9/dicom-web", "job_workers": 0}
    for api in make_api(tmp_path, database_url, tiny_lm, **overrides):
        sessions = api.app.state.session_factory
        rid = ask(api, upload_ct(api)["id"])["id"]
        draft = sr_of(api, rid)
        assert "PredecessorDocumentsSequence" not in draft
        with sessions.begin() as s:  # as the automatic report's push, in a long backoff
            draft_push = jobs.schedule_push(s, api.app.state.settings, s.get(Report, rid))
            draft_push.run_after = draft_push.created_at + timedelta(hours=1)
            s.flush()
            draft_push = draft_push.id
        path = f"/v1/reports/{rid}"
        r = api.patch(path, headers=api.h(), json={"text": "Edited, not sent."})
        assert r.status_code == 200, r.text
        edited = sr_of(api, rid)
        r = api.patch(path, headers=api.h(), json={"status": "final"})
        assert r.status_code == 200, r.text
        signed = sr_of(api, rid)

        # the PACS is back: the signed SR's push is due first, and goes
        runner = jobs.JobRunner(api.app, workers=0)
        stowed = []
        runner._deliver = stowed.append  # type: ignore[method-assign]
        with sessions.begin() as s:
            claimed = jobs.claim(s, "w1", lease_s=600)
        assert claimed is not None and claimed.id != draft_push
        runner.run(claimed)
        assert [x.SOPInstanceUID for x in stowed] == [signed.SOPInstanceUID]
        assert to_bytes(stowed[0]) == to_bytes(signed)
        assert sr_of(api, rid).SOPInstanceUID == signed.SOPInstanceUID
        with sessions.begin() as s:  # the draft's backoff ends
            s.get(Job, draft_push).run_after = utcnow()
        with sessions.begin() as s:
            claimed = jobs.claim(s, "w1", lease_s=600)
        assert claimed is not None and claimed.id == draft_push
        runner.run(claimed)
        assert len(stowed) == 1  # not sent after the report that supersedes it
        with sessions() as s:
            done = s.get(Job, draft_push)
            assert done.status == "done"
            assert done.payload["result"] == {"skipped": "a later version of the report was sent"}
        assert to_bytes(sr_of(api, rid)) == to_bytes(signed)  # one UID, one content

        def named(sr):
            (item,) = sr.PredecessorDocumentsSequence
            assert item.StudyInstanceUID == sr.StudyInstanceUID
            (series,) = item.ReferencedSeriesSequence
            assert series.SeriesInstanceUID == sr.SeriesInstanceUID
            return [sop.ReferencedSOPInstanceUID for sop in series.ReferencedSOPSequence]

        assert named(edited) == [draft.SOPInstanceUID]
        assert named(signed) == [draft.SOPInstanceUID]  # not the edited draft: never queued
        r = api.patch(
            path, headers=api.h(), json={"text": "Amended.", "status": "amended", "reason": "x"}
        )
        assert r.status_code == 200, r.text
        # the sent draft, and the signed version it replaces (its push still queued)
        assert named(sr_of(api, rid)) == [draft.SOPInstanceUID, signed.SOPInstanceUID]


@pytest.mark.parametrize(
    ("source_offset", "server_zone", "sr_offset"),
    [
        ("-0500", "Africa/Nairobi", "-0500"),
        (None, "Africa/Nairobi", "+0300"),
        (None, "UTC", "+0000"),
    ],
)
def test_an_sr_says_when_it_was_signed_and_is_the_same_bytes_each_time(
    api, monkeypatch, source_offset, server_zone, sr_offset
):
    """The verification time is when the report was signed (highdicom wrote the time the SR
    was built: hours late after a PACS outage's retries), and the same version is the same
    bytes whenever it is built or pushed. Every time is in the zone of the Study Date and Time
    the SR copies, as its TimezoneOffsetFromUTC says (DICOM: for every time in the instance):
    the source's offset (CT_small's -0500), or without one the server's zone. Before, the SR
    said +0000 and so moved the copied 07:27 study by five hours."""
    monkeypatch.setenv("TZ", server_zone)
    time.tzset()
    try:
        ds = pydicom.dcmread(CT_SMALL)
        assert ds.TimezoneOffsetFromUTC == "-0500"
        if source_offset is None:
            del ds.TimezoneOffsetFromUTC
        buf = io.BytesIO()
        ds.save_as(buf)
        r = upload(api, ("ct.dcm", buf.getvalue(), "application/dicom"))
        assert r.status_code == 201, r.text
        rid = ask(api, r.json()["id"])["id"]
        r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"status": "final"})
        assert r.status_code == 200, r.text
        signed_at = datetime.fromisoformat(r.json()["signed_at"])
        first = api.get(f"/v1/reports/{rid}/sr", headers=api.h()).content
        time.sleep(1.1)
        assert api.get(f"/v1/reports/{rid}/sr", headers=api.h()).content == first
    finally:
        monkeypatch.undo()
        time.tzset()
    sr = pydicom.dcmread(io.BytesIO(first))
    hours = int(sr_offset[:3])
    stamp = signed_at.astimezone(timezone(timedelta(hours=hours))).strftime("%Y%m%d%H%M%S")
    assert sr.TimezoneOffsetFromUTC == sr_offset
    assert (sr.StudyDate, sr.StudyTime) == (ds.StudyDate, ds.StudyTime)  # copied as they were
    assert sr.VerifyingObserverSequence[0].VerificationDateTime == stamp
    assert (
        sr.ContentDate + sr.ContentTime
        == stamp
        == sr.InstanceCreationDate + sr.InstanceCreationTime
    )


def test_the_fhir_report_names_its_order_by_accession_number(api):
    """Most RIS match a result to its order by accession number, not by Study Instance UID."""
    data = _header_variant(_set(AccessionNumber="ACC-2026-77"), 9)
    r = upload(api, ("acc.dcm", data, "application/dicom"))
    assert r.status_code == 201, r.text
    report = ask(api, r.json()["id"])
    r = api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h("pacs"))
    dr = DiagnosticReport.model_validate_json(r.text)
    (order,) = dr.basedOn
    assert order.type == "ServiceRequest" and order.identifier.value == "ACC-2026-77"
    assert order.identifier.type.coding[0].code == "ACSN"


def _image_reference(sr) -> pydicom.Dataset:
    """The SOP reference of the SR's IMAGE item (the finding's best illustration)."""
    for container in sr.ContentSequence:
        for item in getattr(container, "ContentSequence", []):
            for child in getattr(item, "ContentSequence", []):
                if child.ValueType == "IMAGE":
                    return child.ReferencedSOPSequence[0]
    raise AssertionError("no IMAGE item in the SR")


def test_the_sr_names_the_frame_of_a_multi_frame_image_the_model_saw(api):
    """A question about frame 3 of a 10-frame MR: the report records it and the SR's image
    reference names frame 4 (1-based), so the PACS opens the image where the model looked; a
    question without a frame saw the middle one, and a single-frame image names none."""
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("emri_small.dcm")).read_bytes()
    study = upload(api, ("emri.dcm", data, "application/dicom")).json()
    r = api.post(
        f"/v1/studies/{study['id']}/questions",
        headers=api.h(),
        json={"question": "Which organ?", "frame": 3},
    )
    assert r.status_code == 201, r.text
    asked = r.json()
    assert asked["frame"] == 3
    assert api.get(f"/v1/reports/{asked['id']}", headers=api.h()).json()["frame"] == 3
    middle = ask(api, study["id"])
    assert middle["frame"] is None
    for report, number in ((asked, 4), (middle, 10 // 2 + 1)):
        assert _image_reference(sr_of(api, report["id"])).ReferencedFrameNumber == number
    single = ask(api, upload_ct(api)["id"])
    assert "ReferencedFrameNumber" not in _image_reference(sr_of(api, single["id"]))


@pytest.mark.parametrize("blank", ["", "  \n\t"])
def test_a_draft_without_text_still_exports(api, blank):
    """A draft may hold no text: the model answered nothing at all, or a reader cleared it to
    write anew (signing it is refused). Its FHIR export says the finding is not known yet
    (FHIR strings may not be blank) and its SR still builds; nothing answers 500."""
    study = upload_ct(api)
    report = ask(api, study["id"])
    r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"text": blank})
    assert r.status_code == 200, r.text
    r = api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h("pacs"))
    assert r.status_code == 200, r.text
    dr = DiagnosticReport.model_validate_json(r.text)
    assert dr.status == "preliminary" and dr.conclusion is None and dr.presentedForm is None
    finding = next(c for c in dr.contained if c.id == "finding")
    assert finding.valueString is None
    assert finding.dataAbsentReason.coding[0].code == "temp-unknown"
    assert {"text": f"Unedited model answer: {report['answer']}"} in r.json()["contained"][1][
        "note"
    ]
    t = texts(sr_of(api, report["id"]))
    assert t["Request"] == "What is the modality?"
    # and once written and signed, it exports its text as any report does
    done = {"text": "No acute finding.", "status": "final"}
    assert api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json=done).is_success
    dr = DiagnosticReport.model_validate_json(
        api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h()).text
    )
    assert dr.conclusion == "No acute finding." and dr.status == "final"
