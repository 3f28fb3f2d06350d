"""Reports out in hospital formats: DICOM SR (highdicom) and FHIR DiagnosticReport."""

from __future__ import annotations

import base64
import io
import re

import highdicom as hd
import pydicom
from api_helpers import CT_SMALL, assert_error, png_bytes, upload, upload_ct
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.uid import ComprehensiveSRStorage


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


def test_sr_draft_then_signed(api):
    study = upload_ct(api)
    report = ask(api, study["id"])
    source = pydicom.dcmread(CT_SMALL)
    # a draft edit with non-ASCII text and a stray control character (not allowed in DICOM text)
    r = api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"text": "Ödem\x18 — 2 cm"})
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
    assert t["Finding"] == "Ödem — 2 cm" and t["Clinical information"] == report["question"]
    # the model is the observer device (highdicom parses the document back)
    parsed = hd.sr.ComprehensiveSR.from_dataset(draft)
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in parsed.ContentSequence}
    assert items["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert items["Device Observer UID"].UID
    names = {k: getattr(i, "TextValue", None) for k, i in items.items()}
    assert names["Device Observer Name"] == report["model"]
    assert report["quantization"] in names["Device Observer Model Name"]
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
    assert (signed.CompletionFlag, signed.VerificationFlag, signed.PreliminaryFlag) == (
        "COMPLETE",
        "VERIFIED",
        "FINAL",
    )
    verifier = signed.VerifyingObserverSequence[0]
    assert verifier.VerifyingObserverName.family_name == "test radiologist"
    t = texts(signed)
    assert t["Finding"] == "CT of the chest. No acute finding."
    # the random tiny model's answer has control characters, which DICOM text may not carry
    answer = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", report["answer"])
    assert t["Comment"] == f"Unedited model answer: {answer}"


def test_fhir_diagnostic_report(api):
    study = upload_ct(api)
    report = ask(api, study["id"])
    r = api.get(f"/v1/reports/{report['id']}/fhir", headers=api.h("pacs"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    dr = DiagnosticReport.model_validate_json(r.text)  # validates the whole resource
    assert dr.status == "preliminary" and dr.id == report["id"]
    assert dr.code.coding[0].code == "18748-4"
    uid = pydicom.dcmread(CT_SMALL).StudyInstanceUID
    assert dr.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
    assert dr.conclusion == report["text"]
    form = r.json()["presentedForm"][0]
    assert base64.b64decode(form["data"]).decode() == report["text"]
    contained = {c.id: c for c in dr.contained}
    device, finding = contained["model"], contained["finding"]
    assert device.get_resource_type() == "Device"
    assert device.deviceName[0].name == report["model"]
    assert {v.value for v in device.version} >= {report["quantization"]}
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


def test_png_report_has_fhir_but_no_sr(sqlite_api):
    api = sqlite_api
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
