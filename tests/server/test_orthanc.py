"""The PACS round trip with a real Orthanc (Debian's, with its DICOMweb plugin) on loopback.

Orthanc receives CT_small over its REST API, forwards the study to our STOW-RS endpoint (its
DICOMweb client, with our API key as a header) or, in the DIMSE test, C-STOREs it to our Storage
SCP and gets the SR back by C-STORE, our job answers the configured prompt, and the
SR comes back into Orthanc over STOW-RS (dicomweb-client), filed under the same patient and
study, where Orthanc's own WADO-RS serves it. Signing the report sends the verified SR, amending
it the amended one. A study sent by mistake and deleted here gets an IOCM rejection note in
Orthanc naming the draft SR it had received.
"""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import timedelta

import httpx
import pydicom
import pytest
from api_helpers import CT_SMALL, free_port, live_server, make_old, wait_for
from orthanc_helpers import start_orthanc
from pydicom.uid import RLELossless, generate_uid
from pynetdicom.sop_class import XRayRadiationDoseSRStorage  # type: ignore[attr-defined]

from tinyllava_med.server.app import create_app
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.db.models import utcnow
from tinyllava_med.server.retention import release_due
from tinyllava_med.server.settings import Settings


def send_and_forward(orthanc: str, dicom: bytes) -> str:
    """The modality sends an instance to the PACS, and the PACS forwards its study to us
    (STOW-RS); Orthanc's id of the study."""
    r = httpx.post(f"{orthanc}/instances", content=dicom, timeout=10)
    assert r.status_code == 200, r.text
    study = str(r.json()["ParentStudy"])
    r = httpx.post(
        f"{orthanc}/dicom-web/servers/tinyllava/stow",
        json={"Resources": [study], "Synchronous": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return study


def sr_instances(orthanc: str, study: str, modality: str = "SR") -> list[pydicom.Dataset]:
    out = []
    for series in httpx.get(f"{orthanc}/studies/{study}/series", timeout=10).json():
        if series["MainDicomTags"].get("Modality") != modality:
            continue
        for inst in series["Instances"]:
            data = httpx.get(f"{orthanc}/instances/{inst}/file", timeout=10).content
            out.append(pydicom.dcmread(io.BytesIO(data)))
    return out


def finding(sr: pydicom.Dataset) -> str:
    for container in sr.ContentSequence:
        for item in getattr(container, "ContentSequence", []):
            if item.ConceptNameCodeSequence[0].CodeMeaning == "Finding":
                return str(item.TextValue)
    raise AssertionError("no finding in the SR")


def test_orthanc_round_trip(tmp_path, sqlite_url, tiny_lm):
    orthanc_port = free_port()
    orthanc = f"http://127.0.0.1:{orthanc_port}"
    upgrade(sqlite_url)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=sqlite_url,
        auto_report_prompts={"CT": "Describe the findings."},
        auto_report_delay_s=0,
        job_poll_s=0.05,
        dicomweb_push_url=f"{orthanc}/dicom-web",
        institution_name="Test Hospital",
    )
    app = create_app(settings, model=tiny_lm)
    with live_server(app) as base:
        admin = {"Authorization": f"Bearer {app.state.first_admin_key}"}
        keys = {
            role: httpx.post(
                f"{base}/v1/apikeys", json={"role": role, "name": f"{role} key"}, headers=admin
            ).json()["key"]
            for role in ("pacs", "radiologist")
        }
        with start_orthanc(tmp_path / "orthanc", orthanc_port, f"{base}/dicomweb/", keys["pacs"]):
            study = send_and_forward(orthanc, CT_SMALL.read_bytes())
            h = {"Authorization": f"Bearer {keys['radiologist']}"}

            done = wait_for(lambda: _pushed(base, h), what="the report and its SR push")
            report_id = done["auto_report"]["result"]["report_id"]
            report = httpx.get(f"{base}/v1/reports/{report_id}", headers=h).json()

            # the SR is in Orthanc, in the same study, readable by Orthanc's own DICOMweb
            (sr,) = sr_instances(orthanc, study)
            source = pydicom.dcmread(CT_SMALL)
            assert sr.StudyInstanceUID == source.StudyInstanceUID
            assert sr.PatientID == source.PatientID
            assert sr.VerificationFlag == "UNVERIFIED" and sr.InstitutionName == "Test Hospital"
            # the random tiny model's text, less the control characters DICOM text forbids
            assert finding(sr) == re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", report["text"])
            meta = httpx.get(
                f"{orthanc}/dicom-web/studies/{sr.StudyInstanceUID}/series/"
                f"{sr.SeriesInstanceUID}/metadata",
                timeout=10,
            )
            assert meta.status_code == 200 and meta.json()[0]["00080060"]["Value"] == ["SR"]

            # the radiologist signs: the verified SR follows
            r = httpx.patch(
                f"{base}/v1/reports/{report_id}",
                json={"text": "No acute abnormality.", "status": "final"},
                headers=h,
            )
            assert r.status_code == 200, r.text

            def signed_sr():
                srs = [s for s in sr_instances(orthanc, study) if s.VerificationFlag == "VERIFIED"]
                return srs[0] if srs else None

            signed = wait_for(signed_sr, timeout_s=60, what="the signed SR in Orthanc")
            assert finding(signed) == "No acute abnormality."
            assert signed.VerifyingObserverSequence[0].VerifyingObserverName.family_name == (
                "radiologist key"
            )
            assert len(sr_instances(orthanc, study)) == 2  # draft and signed versions

            def supersedes(newer):  # what its Predecessor Documents Sequence names
                series = newer.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
                return [sop.ReferencedSOPInstanceUID for sop in series.ReferencedSOPSequence]

            assert supersedes(signed) == [sr.SOPInstanceUID]  # the AI draft Orthanc holds

            # an error found after signing: the amended SR follows, naming the signed one
            r = httpx.patch(
                f"{base}/v1/reports/{report_id}",
                json={"text": "Rib fracture.", "status": "amended", "reason": "missed"},
                headers=h,
            )
            assert r.status_code == 200, r.text

            def amended_sr():
                srs = [s for s in sr_instances(orthanc, study) if finding(s) == "Rib fracture."]
                return srs[0] if srs else None

            amended = wait_for(amended_sr, timeout_s=60, what="the amended SR in Orthanc")
            assert amended.VerificationFlag == "VERIFIED"
            assert supersedes(amended) == [sr.SOPInstanceUID, signed.SOPInstanceUID]
            assert len(sr_instances(orthanc, study)) == 3

            # a study sent by mistake: its draft SR reached the PACS before an admin deleted
            # the study here, so an IOCM rejection note naming that SR follows it
            wrong = pydicom.dcmread(CT_SMALL)
            wrong.StudyInstanceUID, wrong.SeriesInstanceUID = generate_uid(), generate_uid()
            wrong.SOPInstanceUID = wrong.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buf = io.BytesIO()
            wrong.save_as(buf)
            wrong_study = send_and_forward(orthanc, buf.getvalue())
            (draft,) = wait_for(
                lambda: sr_instances(orthanc, wrong_study) or None,
                timeout_s=60,
                what="the wrong study's draft SR in Orthanc",
            )
            jobs = httpx.get(f"{base}/v1/jobs", headers=h).json()["data"]
            (ours,) = {j["study_id"] for j in jobs if j["study_id"]} - {done["push_sr"]["study_id"]}
            r = httpx.delete(f"{base}/v1/studies/{ours}", headers=admin)
            assert r.status_code == 204, r.text
            (note,) = wait_for(
                lambda: sr_instances(orthanc, wrong_study, "KO") or None,
                timeout_s=60,
                what="the rejection note in Orthanc",
            )
            assert note.ConceptNameCodeSequence[0].CodeValue == "113037"
            assert note.StudyInstanceUID == wrong.StudyInstanceUID
            (named,) = [i for i in note.ContentSequence if i.ValueType == "COMPOSITE"]
            assert named.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == draft.SOPInstanceUID


def _serve_with(tmp_path, sqlite_url, tiny_lm, **settings):
    """Our app on SQLite with `settings`, polling jobs often and answering every CT study at
    once (the app, and `live_server` over it: a context manager yielding the base URL)."""
    upgrade(sqlite_url)
    app = create_app(
        Settings(
            data_dir=tmp_path / "data",
            database_url=sqlite_url,
            job_poll_s=0.05,
            auto_report_prompts={"CT": "Describe the findings."},
            auto_report_delay_s=0,
            **settings,
        ),
        model=tiny_lm,
    )
    return app, live_server(app)


def _job_done(base: str, h: dict[str, str], job_id: int):
    job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=h).json()
    assert job["status"] != "failed", job
    return job if job["status"] == "done" else None


def _pushed(base: str, h: dict[str, str]):
    """The done jobs by kind once the automatic report and its SR push are done."""
    jobs = httpx.get(f"{base}/v1/jobs", headers=h).json()["data"]
    assert not [j for j in jobs if j["status"] == "failed"], jobs
    done = {j["kind"]: j for j in jobs if j["status"] == "done"}
    return done if {"auto_report", "push_sr"} <= set(done) else None


def _put(orthanc: str, ds: pydicom.Dataset) -> str:
    """Store `ds` in Orthanc over its REST API (as a modality would); Orthanc's study id."""
    buf = io.BytesIO()
    ds.save_as(buf)
    r = httpx.post(f"{orthanc}/instances", content=buf.getvalue(), timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["ParentStudy"])


def _ours_as_modality(port: int) -> dict:
    """Orthanc configuration naming our Storage SCP as its DICOM modality `tinyllava`."""
    return {"DicomModalities": {"tinyllava": ["TINYLLAVA_MED", "127.0.0.1", port]}}


def test_orthanc_dimse_round_trip(tmp_path, sqlite_url, tiny_lm):
    """A PACS without DICOMweb: Orthanc C-STOREs the study to our SCP, which it knows as a DICOM
    modality, and our SR comes back to its DIMSE server by C-STORE."""
    orthanc_port, orthanc_dicom, our_dimse = free_port(), free_port(), free_port()
    orthanc = f"http://127.0.0.1:{orthanc_port}"
    app, server = _serve_with(
        tmp_path,
        sqlite_url,
        tiny_lm,
        dimse_port=our_dimse,
        dimse_peers=["TLMPACS@127.0.0.1"],
        dimse_push=f"TLMPACS@127.0.0.1:{orthanc_dicom}",
    )
    with (
        server as base,
        start_orthanc(
            tmp_path / "orthanc",
            orthanc_port,
            dicom_port=orthanc_dicom,
            **_ours_as_modality(our_dimse),
        ),
    ):
        h = {"Authorization": f"Bearer {app.state.first_admin_key}"}
        r = httpx.post(f"{orthanc}/modalities/tinyllava/echo", json={}, timeout=30)
        assert r.status_code == 200, r.text
        study = _put(orthanc, pydicom.dcmread(CT_SMALL))
        r = httpx.post(
            f"{orthanc}/modalities/tinyllava/store",
            json={"Resources": [study], "Synchronous": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text

        done = wait_for(lambda: _pushed(base, h), what="the report and its SR by C-STORE")
        report_id = done["auto_report"]["result"]["report_id"]
        report = httpx.get(f"{base}/v1/reports/{report_id}", headers=h).json()
        (sr,) = sr_instances(orthanc, study)
        assert sr.StudyInstanceUID == pydicom.dcmread(CT_SMALL).StudyInstanceUID
        assert finding(sr) == re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", report["text"])
        events = httpx.get(
            f"{base}/v1/audit", params={"action": "study.dimse_store"}, headers=h
        ).json()["data"]
        assert [e["actor"] for e in events] == ["dimse:TLMPACS"]
        assert events[0]["detail"]["stored"] == 1

        # the PACS sends the study whole again, our SR in it (a re-read, a routing rule): the
        # SR is acknowledged with a warning and not kept, so the send succeeds (0x0122 failed
        # Orthanc's job: HTTP 500, the images stored all the same)
        r = httpx.post(
            f"{orthanc}/modalities/tinyllava/store",
            json={"Resources": [study], "Synchronous": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["FailedInstancesCount"] == 0 and r.json()["InstancesCount"] == 2
        events = httpx.get(
            f"{base}/v1/audit", params={"action": "study.dimse_store"}, headers=h
        ).json()["data"]
        detail = events[0]["detail"]  # newest first
        assert (detail["stored"], detail["already"], detail["not_kept"]) == (0, 1, 1)
        studies = httpx.get(f"{base}/v1/studies", headers=h).json()["data"]
        assert [len(s["images"]) for s in studies] == [1]  # the SR is not an image of it


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_retrieve_a_study_from_orthanc(tmp_path, sqlite_url, tiny_lm, transport, caplog):
    """A study never pushed here: found in Orthanc by accession number (QIDO-RS, or C-FIND),
    fetched by a job (WADO-RS, or a C-MOVE to our own Storage SCP), filed and reported like a
    pushed one; fetched again, nothing is copied. Unknown: 404; the PACS stopped: 502."""
    caplog.set_level(logging.DEBUG)  # what an operator chasing a problem would set
    orthanc_port, orthanc_dicom, our_dimse = free_port(), free_port(), free_port()
    orthanc = f"http://127.0.0.1:{orthanc_port}"
    secret = "Basic dGxtOnNlY3JldA=="  # Orthanc here has no users: sent, and ignored
    pull: dict = {
        "dicomweb_pull_url": f"{orthanc}/dicom-web",
        "dicomweb_pull_headers": {"Authorization": secret},
    }
    if transport == "dimse":
        pull = {
            "dimse_port": our_dimse,
            "dimse_peers": ["TLMPACS@127.0.0.1"],
            "dimse_pull": f"TLMPACS@127.0.0.1:{orthanc_dicom}",
        }
    app, server = _serve_with(
        tmp_path,
        sqlite_url,
        tiny_lm,
        **pull,
    )
    with server as base:
        admin = {"Authorization": f"Bearer {app.state.first_admin_key}"}
        key = httpx.post(
            f"{base}/v1/apikeys", json={"role": "radiologist", "name": "Dr Test"}, headers=admin
        ).json()["key"]
        h = {"Authorization": f"Bearer {key}"}

        def retrieve(**body):
            return httpx.post(f"{base}/v1/studies/retrieve", json=body, headers=h, timeout=30)

        with start_orthanc(
            tmp_path / "orthanc",
            orthanc_port,
            dicom_port=orthanc_dicom,
            **_ours_as_modality(our_dimse),
        ):
            first, second = pydicom.dcmread(CT_SMALL), pydicom.dcmread(CT_SMALL)
            second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            second.compress(RLELossless)  # it arrives as the PACS holds it, not decompressed
            # and, in a series of its own, the CT's dose report, which has no pixels: over
            # DIMSE it is not moved (it was: the Storage SCP refused it, and Orthanc ended the
            # whole C-MOVE, so no CT study with a dose SR could be retrieved), over DICOMweb it
            # is skipped (it counted as failed)
            dose = pydicom.dcmread(CT_SMALL)
            del dose.PixelData
            dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = XRayRadiationDoseSRStorage
            dose.SOPInstanceUID = dose.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dose.SeriesInstanceUID, dose.Modality = generate_uid(), "SR"
            for ds in (dose, first, second):
                ds.AccessionNumber = "ACC-42"
                _put(orthanc, ds)

            # an accession number is matched exactly (Orthanc ignores case: "acc-42" found
            # this study), spaces around it aside
            r = retrieve(accession_number="acc-42")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_in_pacs"
            r = retrieve(accession_number=" ACC-42 ")
            assert r.status_code == 202, r.text
            assert r.json()["study_instance_uids"] == [first.StudyInstanceUID]
            (job_id,) = r.json()["jobs"]
            job = wait_for(lambda: _job_done(base, h, job_id), what="the retrieve job")
            result = job["result"]
            assert (result["stored"], result["already"], result["failed"]) == (2, 0, 0)
            skipped = {"dicomweb": ("skipped", 1), "dimse": ("skipped_series", 1)}[transport]
            assert result[skipped[0]] == skipped[1], result
            # the study lists the job that fetched it among its jobs
            params = {"study_id": result["study_id"], "kind": "retrieve_study"}
            listed = httpx.get(f"{base}/v1/jobs", params=params, headers=h).json()["data"]
            assert [j["id"] for j in listed] == [job_id]
            study = httpx.get(f"{base}/v1/studies/{result['study_id']}", headers=h).json()
            assert study["StudyInstanceUID"] == first.StudyInstanceUID
            assert sorted(i["SOPInstanceUID"] for i in study["images"]) == sorted(
                [first.SOPInstanceUID, second.SOPInstanceUID]
            )
            syntaxes = {
                i["SOPInstanceUID"]: pydicom.dcmread(
                    app.state.store.path(i["sha256"]), stop_before_pixels=True
                ).file_meta.TransferSyntaxUID
                for i in study["images"]
            }
            assert syntaxes[second.SOPInstanceUID] == RLELossless, syntaxes

            def reported():  # the CT prompt's automatic report, as for a pushed study
                jobs = httpx.get(f"{base}/v1/jobs", headers=h).json()["data"]
                auto = [j for j in jobs if j["kind"] == "auto_report"]
                return auto if auto and auto[0]["status"] == "done" else None

            (auto,) = wait_for(reported, what="the automatic report")
            assert auto["study_id"] == result["study_id"] and "report_id" in auto["result"]

            r = retrieve(study_instance_uid=first.StudyInstanceUID)  # again: nothing copied
            assert r.status_code == 202, r.text
            again = wait_for(lambda: _job_done(base, h, r.json()["jobs"][0]), what="again")
            assert again["result"]["study_id"] == result["study_id"]
            assert (again["result"]["stored"], again["result"]["already"]) == (0, 2)

            # signed, then past the image retention: its pixels go, and a retrieve restores them
            report_id = auto["result"]["report_id"]
            r = httpx.patch(f"{base}/v1/reports/{report_id}", json={"status": "final"}, headers=h)
            assert r.status_code == 200, r.text
            with app.state.session_factory.begin() as s:
                make_old(s, utcnow() - timedelta(days=400), store=app.state.store)
            keep_a_year = app.state.settings.model_copy(update={"image_retention_days": 365.0})
            released = release_due(app.state.session_factory, app.state.store, keep_a_year)
            assert released["images"] == 2
            image = f"{base}/v1/studies/{result['study_id']}/images/0"
            assert httpx.get(image, headers=h).status_code == 410
            r = retrieve(study_instance_uid=first.StudyInstanceUID)
            back = wait_for(lambda: _job_done(base, h, r.json()["jobs"][0]), what="the restore")
            assert (back["result"]["stored"], back["result"]["already"]) == (2, 0)
            assert httpx.get(image, headers=h).status_code == 200

            r = retrieve(accession_number="NO-SUCH")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_in_pacs"
            assert retrieve(accession_number="A", study_instance_uid="1.2").status_code == 422
            assert retrieve().status_code == 422
        r = retrieve(accession_number="ACC-42")  # Orthanc has stopped
        assert r.status_code == 502 and r.json()["error"]["code"] == "pacs_unavailable"
        events = httpx.get(
            f"{base}/v1/audit", params={"action": "study.retrieve"}, headers=admin
        ).json()["data"]
        assert sorted(e["outcome"] for e in events) == [
            "error",
            "not_found",
            "not_found",
            "ok",
            "ok",
            "ok",
        ]
        assert "ACC-42" not in json.dumps(events)  # accession numbers stay out of the audit log
        # ... and out of the logs even at DEBUG, with the patient's name and the PACS's
        # credentials (pynetdicom logs queries at INFO, dicomweb-client URLs and headers at DEBUG)
        assert "ACC-42" not in caplog.text and str(first.PatientName) not in caplog.text
        assert "dGxtOnNlY3JldA" not in caplog.text
        if transport == "dimse":  # the moves arrive as associations from the PACS
            stores = httpx.get(
                f"{base}/v1/audit", params={"action": "study.dimse_store"}, headers=admin
            ).json()["data"]
            assert {e["actor"] for e in stores} == {"dimse:TLMPACS"}


def test_pacs_check_names_what_answers_and_what_does_not(tmp_path):
    """`tinyllava-med pacs check`: a line per configured target, exit 1 when any fails."""
    import os
    import subprocess
    import sys

    orthanc_port, orthanc_dicom, closed = free_port(), free_port(), free_port()

    def pacs_check(**env):
        out = subprocess.run(
            [sys.executable, "-m", "tinyllava_med.cli", "pacs", "check"],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("TINYLLAVA_MED_")},
                "TINYLLAVA_MED_DATA_DIR": str(tmp_path / "data"),
                **{f"TINYLLAVA_MED_{k.upper()}": v for k, v in env.items()},
            },
        )
        return out.returncode, out.stdout.splitlines()

    code, lines = pacs_check()
    assert code == 0 and lines[0].startswith("no PACS is configured")
    pacs = f"TLMPACS@127.0.0.1:{orthanc_dicom}"
    # Orthanc checks a modality's host (it compares addresses, never resolves names): the AE
    # title registered by name may echo but not query; the one registered by address may both
    modalities = {
        "by-name": ["TINYLLAVA_MED", "localhost", 11112],
        "by-address": ["TLM_BY_IP", "127.0.0.1", 11112],
    }
    with start_orthanc(
        tmp_path / "orthanc",
        orthanc_port,
        dicom_port=orthanc_dicom,
        DicomCheckModalityHost=True,
        DicomModalities=modalities,
    ):
        code, lines = pacs_check(
            dicomweb_pull_url=f"http://127.0.0.1:{orthanc_port}/dicom-web",
            dicomweb_pull_headers='{"Authorization": "Basic dGxtOnNlY3JldA=="}',
            dimse_push=pacs,
            dimse_pull=pacs,
            dimse_port="11112",
            dimse_peers='["TLMPACS"]',
        )
        assert code == 1, lines
        assert [ln.split(" (")[0] for ln in lines[:2]] == [
            f"ok   dicomweb_pull_url http://127.0.0.1:{orthanc_port}/dicom-web: QIDO-RS answered",
            f"ok   dimse_push {pacs}: C-ECHO answered",
        ]
        assert lines[2].startswith(f"FAIL dimse_pull {pacs}: PacsError: the PACS's C-FIND failed")
        assert "dGxtOnNlY3JldA" not in "\n".join(lines)
        code, lines = pacs_check(
            dimse_ae_title="TLM_BY_IP",
            dimse_pull=pacs,
            dimse_port="11112",
            dimse_peers='["TLMPACS"]',
        )
        assert code == 0 and lines[0].startswith(f"ok   dimse_pull {pacs}: C-ECHO and C-FIND"), (
            lines
        )
    code, lines = pacs_check(dimse_push=f"TLMPACS@127.0.0.1:{closed}")
    assert code == 1 and lines[0].split(" (")[0] == (
        f"FAIL dimse_push TLMPACS@127.0.0.1:{closed}: NoAssociation: no DIMSE association with "
        f"TLMPACS@127.0.0.1:{closed}"
    )


def test_the_shipped_forward_script_sends_images_and_nothing_else(tmp_path, sqlite_url, tiny_lm):
    """docker/orthanc/forward.lua, run by a real Orthanc: a stable image series is forwarded to
    the server over STOW-RS; an SR (the server's own reports coming back), a segmentation and a
    presentation state are not (the server stores images only: each would be refused)."""
    from pathlib import Path

    from pydicom.data import get_testdata_file

    script = Path(__file__).resolve().parents[2] / "docker" / "orthanc" / "forward.lua"
    orthanc_port = free_port()
    orthanc = f"http://127.0.0.1:{orthanc_port}"
    upgrade(sqlite_url)
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=sqlite_url), model=tiny_lm)
    with live_server(app) as base:
        admin = {"Authorization": f"Bearer {app.state.first_admin_key}"}
        r = httpx.post(f"{base}/v1/apikeys", json={"role": "pacs", "name": "pacs"}, headers=admin)
        peer = {
            "Url": f"{base}/dicomweb/",
            "HttpHeaders": {"Authorization": f"Bearer {r.json()['key']}"},
        }
        dicomweb = {"Enable": True, "Root": "/dicom-web/", "Servers": {"tinyllava-med": peer}}
        with start_orthanc(
            tmp_path / "orthanc",
            orthanc_port,
            LuaScripts=[str(script)],
            StableAge=1,
            DicomWeb=dicomweb,
        ):
            sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
            pr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
            pr.Modality, pr.StudyInstanceUID = "PR", generate_uid()
            pr.SeriesInstanceUID, pr.SOPInstanceUID = generate_uid(), generate_uid()
            for ds in (sr, pr, pydicom.dcmread(get_testdata_file("liver.dcm"))):
                out = io.BytesIO()
                ds.save_as(out)
                assert httpx.post(f"{orthanc}/instances", content=out.getvalue()).status_code == 200
            r = httpx.post(f"{orthanc}/instances", content=CT_SMALL.read_bytes(), timeout=10)
            assert r.status_code == 200, r.text

            def stable_series():
                changes = httpx.get(f"{orthanc}/changes?limit=1000", timeout=10).json()
                return sum(c["ChangeType"] == "StableSeries" for c in changes["Changes"])

            def jobs_done():  # the STOW jobs the script started (asynchronous ones)
                jobs = httpx.get(f"{orthanc}/jobs?expand", timeout=10).json()
                return all(job["State"] in ("Success", "Failure") for job in jobs)

            wait_for(lambda: stable_series() == 4, timeout_s=60, what="every series stable")
            wait_for(jobs_done, timeout_s=60, what="Orthanc's forwarding jobs")
            events = httpx.get(f"{base}/v1/audit?action=study.stow", headers=admin).json()["data"]
            assert len(events) == 1 and events[0]["status_code"] == 200, events
            studies = httpx.get(f"{base}/v1/studies", headers=admin).json()["data"]
            assert [s["Modality"] for s in studies] == ["CT"]
