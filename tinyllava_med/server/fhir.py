"""A report as a FHIR R4B `DiagnosticReport` (built and validated with `fhir.resources`).

- status `preliminary` for a draft, `final` once signed, `amended` once corrected after signing
  (the reason is a note on the finding); category RAD; code LOINC 18748-4;
- `imagingStudy` references the study by its DICOM Study Instance UID (`urn:oid:...`), and
  `basedOn` the order by its accession number (identifier type ACSN), which most RIS match
  results on;
- the text is the `conclusion`, a `presentedForm` (text/plain) and the narrative; a draft with
  no text (the model answered nothing, or a reader cleared it; signing one is refused) has
  neither, since FHIR strings may not be blank, and its finding's value is absent as
  `temp-unknown`;
- the model is a contained `Device` (name, variant, quantization and version as `version`s).
  R4's `DiagnosticReport.performer` may only point at people and organisations, so the device
  is attached where FHIR allows a device: a contained `Observation` holding the finding, with
  `device` -> the model and `derivedFrom` -> the ImagingStudy; the report's `result` lists it.
  A signed report names its signer as `resultsInterpreter` (display only: keys are not people
  the RIS knows).

No patient identifiers: the server does not keep them, and the RIS links the report to its
patient through the order (accession number) or the study UID.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from tinyllava_med import __version__
from tinyllava_med.model.prompts import without_controls
from tinyllava_med.server.db.models import CUT_SHORT_NOTE, SIGNED_STATUSES, Report

# a draft is preliminary; a signed report final, and amended once corrected after signing
FHIR_STATUS = {"draft": "preliminary", "final": "final", "amended": "amended"}

LOINC = "http://loinc.org"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
MEDIA_TYPE = "application/fhir+json"


def _study_reference(study_uid: str) -> dict[str, Any]:
    return {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
    }


def build_diagnostic_report(
    report: Report, *, signer_name: str | None = None, institution: str | None = None
) -> DiagnosticReport:
    status = FHIR_STATUS[report.status]
    # FHIR strings and the XHTML narrative refuse control characters but tab and line breaks;
    # the API refuses them, and a report stored before it did loses them here
    text, question = without_controls(report.text), without_controls(report.question)
    study_uid = report.study.StudyInstanceUID
    studies = [_study_reference(study_uid)] if study_uid else []
    device = {
        "resourceType": "Device",
        "id": "model",
        "status": "active",
        "manufacturer": "TinyLLaVA-Med server",
        "deviceName": [{"name": report.model, "type": "model-name"}],
        "type": {"text": "Multimodal language model (AI)"},
        "version": [
            {"type": {"text": "variant"}, "value": report.variant or report.model},
            {"type": {"text": "quantization"}, "value": report.quantization},
            {"type": {"text": "model version"}, "value": report.model_version or "unknown"},
            {"type": {"text": "model weights"}, "value": report.model_weights or "unknown"},
            {"type": {"text": "server version"}, "value": report.server_version},
        ],
    }
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "finding",
        "status": status,
        "code": {
            "coding": [
                {
                    "system": LOINC,
                    "code": "18782-3",
                    "display": "Radiology Study observation (narrative)",
                }
            ]
        },
        "device": {"reference": "#model", "display": report.model},
        "note": [{"text": f"Question: {question}"}],
    }
    if text.strip():
        observation["valueString"] = text
    else:
        observation["dataAbsentReason"] = {
            "coding": [
                {"system": DATA_ABSENT, "code": "temp-unknown", "display": "Temporarily Unknown"}
            ],
            "text": "The draft has no text yet.",
        }
    if studies:
        observation["derivedFrom"] = studies
    if report.text != report.answer:
        answer = without_controls(report.answer)
        observation["note"].append({"text": f"Unedited model answer: {answer}"})
    cut_short = report.cut_short(report.text)  # the stored text, not the copy made clean
    if cut_short:
        observation["note"].append({"text": CUT_SHORT_NOTE})
    if (amendment := report.amendment) is not None:
        reason = without_controls(amendment.reason or "")
        observation["note"].append({"text": f"Amended: {reason}"})
    cut = f"<p><b>Note:</b> {html.escape(CUT_SHORT_NOTE)}</p>" if cut_short else ""
    narrative = (
        f"<p><b>Question:</b> {html.escape(question)}</p>"
        f"<p><b>Report ({status}):</b> {html.escape(text)}</p>{cut}"
        f"<p>Generated by {html.escape(report.model)} ({html.escape(report.quantization)}).</p>"
    )
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report.id,
        "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{narrative}</div>',
        },
        "contained": [device, observation],
        "identifier": [{"system": "urn:tinyllava-med:report", "value": report.id}],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]
        },
        "issued": report.updated_at.isoformat(),
        "result": [{"reference": "#finding"}],
    }
    if text.strip():
        resource["conclusion"] = text
        resource["presentedForm"] = [
            {
                "contentType": "text/plain; charset=utf-8",
                "data": base64.b64encode(text.encode()).decode(),
                "title": f"AI report ({status}), server {__version__}",
            }
        ]
    if studies:
        resource["imagingStudy"] = studies
    if accession := without_controls(report.study.AccessionNumber or "").strip():
        resource["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "ACSN",
                                "display": "Accession ID",
                            }
                        ]
                    },
                    "value": accession,
                },
            }
        ]
    if report.study.StudyDate is not None:
        resource["effectiveDateTime"] = report.study.StudyDate.isoformat()
    if institution:
        resource["performer"] = [{"type": "Organization", "display": without_controls(institution)}]
    if report.status in SIGNED_STATUSES and signer_name:
        signer = without_controls(signer_name)
        resource["resultsInterpreter"] = [{"type": "Practitioner", "display": signer}]
    return DiagnosticReport.model_validate(resource)
