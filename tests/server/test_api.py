"""The REST API end to end: real tiny model, real DICOM files, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import get_args

import httpx
import pydicom
import pytest
from api_helpers import (
    CT_SMALL,
    MR_SMALL,
    assert_error,
    ct_of_new_study,
    ct_with,
    make_api,
    multipart_related,
    png_bytes,
    upload,
    upload_ct,
    wait_for,
)
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from tinyllava_med.server.db.models import AuditEvent, Job, Report, ReportEdit, Study, utcnow


def test_health_ready_metrics_need_no_key(api):
    assert api.get("/healthz").json()["status"] == "ok"
    r = api.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"model": "ok", "database": "ok"}
    model = r.json()["model"]
    assert (model["model"], model["device"], model["dtype"]) == ("tiny-test", "cpu", "float32")
    assert "tinyllava_med_model_info" in api.get("/metrics").text
    for method in ("ZZ0", "ZZ1", "PROPFIND"):  # h11 passes any method token on
        assert api.request(method, "/healthz").status_code == 405
    text = api.get("/metrics").text
    assert "ZZ0" not in text and "PROPFIND" not in text
    assert 'method="other",route="/healthz",status="405"} 3.0' in text
    # Allow names every method of the path, not those of its first route (a PUT to
    # /v1/studies was told "Allow: POST")
    for path, allowed in (
        ("/v1/studies", "GET, POST"),
        ("/v1/reports/x", "GET, PATCH"),
        ("/healthz", "GET"),
    ):
        r = api.request("PUT", path, headers=api.h("admin"))
        assert r.status_code == 405 and r.headers["allow"] == allowed, (path, r.headers)
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_upload_ask_edit_sign_flow(api):
    assert api.app.state.report_writer.group  # answers finishing together share a commit
    study = upload_ct(api)
    ds = pydicom.dcmread(CT_SMALL)
    assert study["StudyInstanceUID"] == ds.StudyInstanceUID
    assert study["Modality"] == "CT"
    assert study["images"][0]["kind"] == "dicom"
    assert str(ds.PatientName) not in json.dumps(study)
    assert ds.PatientID not in json.dumps(study)

    r = api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h("pacs"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "no-store"  # a patient's image: in no browser cache
    lung = api.get(f"/v1/studies/{study['id']}/images/0?window=lung", headers=api.h("pacs"))
    assert lung.status_code == 200 and lung.content != r.content

    r = api.post(
        f"/v1/studies/{study['id']}/questions",
        headers=api.h("pacs"),
        json={"question": "Which organ is shown?", "max_new_tokens": 5},
    )
    assert r.status_code == 201, r.text
    report = r.json()
    for key in (
        "id",
        "answer",
        "text",
        "status",
        "model",
        "variant",
        "quantization",
        "latency_ms",
        "tokens",
    ):
        assert key in report
    assert report["status"] == "draft" and report["text"] == report["answer"]
    assert report["model"] == "tiny-test" and report["quantization"] == "none"
    assert 0 < report["tokens"]["completion"] <= 5

    # pacs may not edit; radiologist edits, then signs
    rid = report["id"]
    assert_error(
        api.patch(f"/v1/reports/{rid}", headers=api.h("pacs"), json={"text": "x"}), 403, "forbidden"
    )
    r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"text": "No acute findings."})
    assert r.status_code == 200 and r.json()["text"] == "No acute findings."
    assert r.json()["answer"] == report["answer"]
    r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200 and r.json()["status"] == "final" and r.json()["signed_by"]
    assert_error(api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"text": "changed"}), 409)

    listed = api.get("/v1/reports?status=final", headers=api.h("pacs")).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == rid
    # who signed, by the key's name (keys are named for their holder), in lists and reads
    assert listed["data"][0]["signed_by_name"] == "test radiologist"
    one = api.get(f"/v1/reports/{rid}", headers=api.h("pacs")).json()
    assert (one["signed_by_name"], one["signed_by"]) == ("test radiologist", r.json()["signed_by"])
    assert api.get("/v1/studies", headers=api.h("pacs")).json()["count"] == 1

    with api.app.state.session_factory() as s:
        row = s.get(Report, rid)
        assert row.answer == report["answer"] and row.text == "No acute findings."
        assert row.model == "tiny-test" and row.server_version
        assert len(s.scalars(select(ReportEdit).where(ReportEdit.report_id == rid)).all()) == 2
        actions = {e.action for e in s.scalars(select(AuditEvent)).all()}
        assert {
            "study.upload",
            "image.read",
            "question.ask",
            "report.edit",
            "report.sign",
            "report.list",
            "study.list",
        } <= actions
        denied = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).all()
        assert denied, "the 403 must be audited"


def test_each_key_reads_its_own_role_and_permissions(api):
    """`/v1/apikeys/me` tells a client what its key may do, and it is what the server enforces:
    a permission it lists is granted, one it leaves out is a 403."""
    keys = api.get("/v1/apikeys", headers=api.h("admin")).json()["data"]
    by_name = {k["name"]: k for k in keys}
    for role in ("pacs", "radiologist", "admin"):
        r = api.get("/v1/apikeys/me", headers=api.h(role))
        assert r.status_code == 200, r.text
        me = r.json()
        assert me["role"] == role and "key" not in me and "hash" not in str(me)
        if role != "admin":  # the first admin key is the server's own
            assert me["id"] == by_name[f"test {role}"]["id"]
        # two probes of the contract: signing and deleting a study
        assert ("report.sign" in me["permissions"]) == (role != "pacs")
        assert ("study.delete" in me["permissions"]) == (role == "admin")
        deleted = api.delete("/v1/studies/no-such-study", headers=api.h(role))
        assert deleted.status_code == (404 if "study.delete" in me["permissions"] else 403)
    assert_error(api.get("/v1/apikeys/me"), 401, "unauthorized")
    assert api.get("/v1/apikeys/me", headers=api.h()).json()["features"] == []  # no PACS here


def test_a_key_learns_it_may_retrieve_where_a_pacs_is_configured(tmp_path, sqlite_url, tiny_lm):
    from api_helpers import make_api

    for api in make_api(tmp_path, sqlite_url, tiny_lm, dicomweb_pull_url="http://pacs/dicom-web"):
        for role in ("pacs", "radiologist", "admin"):
            me = api.get("/v1/apikeys/me", headers=api.h(role)).json()
            assert me["features"] == ["retrieve"], role


def test_admin_queues_failed_jobs_again_once_the_pacs_is_back(tmp_path, database_url, tiny_lm):
    """Pushes that used all their attempts while the PACS was down are not lost: an admin
    queues them again, one by id or all of a kind, with all their attempts; jobs that have not
    failed are left alone. The test claims the jobs itself: no worker of the app's races it."""
    for api in make_api(tmp_path, database_url, tiny_lm, job_workers=0):
        _queue_failed_jobs_again(api)


def _queue_failed_jobs_again(api):
    from tinyllava_med.server import jobs
    from tinyllava_med.server.db import crud

    sessions = api.app.state.session_factory
    ids = {}
    with sessions.begin() as s:
        for name, kind, status in (
            ("push", "push_sr", "failed"),
            ("push2", "push_sr", "failed"),
            ("sweep", "sweep_images", "failed"),
            ("queued", "push_sr", "queued"),
        ):
            job = crud.enqueue_job(s, kind=kind, payload={"report_id": "r"}, max_attempts=3)
            s.flush()
            if status == "failed":
                job.status, job.attempts, job.last_error = "failed", 3, "ConnectionError: refused"
            ids[name] = job.id

    for role in ("pacs", "radiologist"):
        assert_error(api.post("/v1/jobs/retry", headers=api.h(role)), 403, "forbidden")
    assert_error(api.post("/v1/jobs/999999/retry", headers=api.h("admin")), 404, "job_not_found")
    assert_error(
        api.post(f"/v1/jobs/{ids['queued']}/retry", headers=api.h("admin")), 409, "job_not_failed"
    )

    r = api.post(f"/v1/jobs/{ids['sweep']}/retry", headers=api.h("admin"))
    assert r.status_code == 200 and r.json() == {"data": [ids["sweep"]], "count": 1}, r.text
    assert_error(api.post("/v1/jobs/retry?kind=push", headers=api.h("admin")), 422)
    assert_error(api.get("/v1/jobs?kind=bogus", headers=api.h("admin")), 422)  # not an empty list
    r = api.post("/v1/jobs/retry?kind=push_sr", headers=api.h("admin"))
    assert r.json() == {"data": [ids["push"], ids["push2"]], "count": 2}, r.text
    assert set(get_args(jobs.JobKind)) == {*jobs.NEEDS_NO_MODEL, jobs.AUTO_REPORT}
    assert api.post("/v1/jobs/retry", headers=api.h("admin")).json()["count"] == 0  # none left

    with sessions() as s:
        for name in ("push", "push2", "sweep"):
            job = s.get(Job, ids[name])
            assert (job.status, job.attempts) == ("queued", 0), name
            assert job.last_error == "ConnectionError: refused"  # until it runs again
        assert s.get(Job, ids["queued"]).attempts == 0
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.retry")).all()
        assert [(e.resource_id, e.detail["count"]) for e in events if e.outcome == "ok"] == [
            (str(ids["sweep"]), 1),
            (None, 2),
            (None, 0),
        ]
    claimed = []
    while True:  # workers take them again, each with its first attempt
        with sessions.begin() as s:
            job = jobs.claim(s, "w1", lease_s=600)
        if job is None:
            break
        claimed.append((job.id, job.attempts))
    assert sorted(claimed) == sorted((i, 1) for i in ids.values())


def test_worklist_says_which_studies_await_a_signature(api):
    """Each listed study carries its report counts and state (none, draft, signed), and the
    list filters on that state, so a radiologist finds the drafts to sign in one request."""

    def ask(study_id):
        r = api.post(
            f"/v1/studies/{study_id}/questions", headers=api.h(), json={"question": "Organ?"}
        )
        assert r.status_code == 201, r.text
        return r.json()["id"]

    none, draft, signed, mixed = (upload_ct(api, new_study=True)["id"] for _ in range(4))
    ask(draft)
    r = api.patch(f"/v1/reports/{ask(signed)}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    ask(mixed)
    r = api.patch(f"/v1/reports/{ask(mixed)}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text

    listed = {s["id"]: s for s in api.get("/v1/studies", headers=api.h()).json()["data"]}
    assert {k: (s["reports"], s["drafts"], s["report_status"]) for k, s in listed.items()} == {
        none: (0, 0, "none"),
        draft: (1, 1, "draft"),
        signed: (1, 0, "signed"),
        mixed: (2, 1, "draft"),
    }
    for state, expected in (("none", {none}), ("draft", {draft, mixed}), ("signed", {signed})):
        got = api.get(f"/v1/studies?report_status={state}", headers=api.h()).json()
        assert {s["id"] for s in got["data"]} == expected and got["count"] == len(expected)
    got = api.get("/v1/studies?report_status=draft&limit=1", headers=api.h()).json()
    assert got["count"] == 2 and len(got["data"]) == 1
    one = api.get(f"/v1/studies/{mixed}", headers=api.h()).json()
    assert (one["drafts"], one["report_status"]) == (1, "draft")
    assert_error(api.get("/v1/studies?report_status=final", headers=api.h()), 422)


def test_worklist_finds_a_study_by_accession_number_uid_and_date(api):
    """A reader looks a study up by the accession number the RIS gives, an integrator by its
    Study Instance UID, and a day's studies by study date; filters combine with the others. The
    audit says which filters were used, never their values."""
    ids = {}
    for name, accession, day, uid in (
        ("a", "ACC001", "20261101", "1.2.826.0.1.3680043.8.498.1"),
        ("b", "ACC002", "20261115", "1.2.826.0.1.3680043.8.498.2"),
        ("c", "ACC002", "20261130", "1.2.826.0.1.3680043.8.498.3"),
    ):
        data = ct_with(
            AccessionNumber=accession,
            StudyDate=day,
            StudyInstanceUID=uid,
            SOPInstanceUID=uid + ".1",
        )
        r = upload(api, (f"{name}.dcm", data, "application/dicom"))
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]

    def found(query):
        r = api.get(f"/v1/studies?{query}", headers=api.h())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == (2 if "limit=1" in query else len(body["data"]))
        return [next(k for k, v in ids.items() if v == s["id"]) for s in body["data"]]

    assert found("accession_number=ACC001") == ["a"]
    assert found("accession_number=%20ACC002%20") == ["c", "b"]  # newest first, trimmed
    assert found("accession_number=ACC003") == []
    assert found("accession_number=acc001") == ["a"]  # as a reader types it
    assert found("study_instance_uid=1.2.826.0.1.3680043.8.498.2") == ["b"]
    assert found("study_date_from=2026-11-15") == ["c", "b"]
    assert found("study_date_to=2026-11-15") == ["b", "a"]
    assert found("study_date_from=2026-11-02&study_date_to=2026-11-29") == ["b"]
    assert found("study_date_from=2026-11-15&study_date_to=2026-11-15") == ["b"]
    # DICOM's own form, as a PACS writes a Study Date
    assert found("study_date_from=20261115&study_date_to=20261115") == ["b"]
    assert found("accession_number=ACC002&study_date_to=2026-11-20") == ["b"]
    assert found("accession_number=ACC002&modality=MR") == []
    assert found("accession_number=ACC002&report_status=none&limit=1") == ["c"]

    assert_error(
        api.get("/v1/studies?study_date_from=2026-11-30&study_date_to=2026-11-01", headers=api.h()),
        422,
        "invalid_request",
    )
    assert_error(api.get("/v1/studies?study_date_from=yesterday", headers=api.h()), 422)
    # other digits than DICOM's YYYYMMDD are no date (not seconds since 1970)
    for bad in ("1731628800", "20261332"):
        assert_error(api.get(f"/v1/studies?study_date_from={bad}", headers=api.h()), 422)
    r = api.get(f"/v1/studies?accession_number={'9' * 65}", headers=api.h())
    assert_error(r, 422, "invalid_request")
    assert "9" * 65 not in r.text  # a bad value is not echoed back
    assert_error(api.get("/v1/studies?accession_number=ACC001"), 401)

    with api.app.state.session_factory() as s:
        listed = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "study.list").order_by(AuditEvent.id)
        ).all()
        details = [e.detail for e in listed]
    assert len(details) == 13 and "ACC00" not in json.dumps(details).upper()
    assert details[-2]["filters"] == ["modality", "accession_number"]
    assert details[-1]["filters"] == ["report_state", "accession_number"]


def test_a_ris_finds_reports_by_accession_number_and_polls_for_new_signatures(api):
    """`GET /v1/reports` by the study's accession number or Study Instance UID, and
    `signed_since` for a RIS that polls for results signed (or amended) since its last poll;
    filters combine; a time without an offset is UTC; the audit names the filters, not values."""
    reports = {}
    for name, accession in (("a", "ACC-77"), ("b", "ACC-77"), ("c", "ACC-78")):
        study = upload(
            api,
            (
                f"{name}.dcm",
                ct_with(
                    AccessionNumber=accession,
                    StudyInstanceUID=generate_uid(),
                    SOPInstanceUID=generate_uid(),
                ),
                "application/dicom",
            ),
        ).json()
        r = api.post(
            f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "?"}
        )
        assert r.status_code == 201, r.text
        reports[name] = (r.json()["id"], study["StudyInstanceUID"])

    def sign(name, **body):
        r = api.patch(
            f"/v1/reports/{reports[name][0]}", headers=api.h(), json={"status": "final", **body}
        )
        assert r.status_code == 200, r.text
        return datetime.fromisoformat(r.json()["signed_at"])

    def listed(**params):
        r = api.get("/v1/reports", headers=api.h(), params=params)
        assert r.status_code == 200, r.text
        assert r.json()["count"] == len(r.json()["data"])
        ids = {v[0]: k for k, v in reports.items()}
        return sorted(ids[x["id"]] for x in r.json()["data"])

    assert listed(accession_number="ACC-77") == ["a", "b"]
    assert listed(accession_number=" ACC-78 ") == ["c"]
    assert listed(study_instance_uid=reports["b"][1]) == ["b"]
    assert listed(accession_number="ACC-79") == []
    assert listed(signed_since="2000-01-01T00:00:00Z") == []  # nothing signed yet

    first = sign("a")
    assert listed(signed_since=first.isoformat()) == ["a"]
    poll = datetime.now(timezone.utc)  # the RIS's last poll
    time.sleep(0.01)
    sign("c")
    r = api.patch(
        f"/v1/reports/{reports['a'][0]}",
        headers=api.h(),
        json={"text": "Corrected.", "status": "amended", "reason": "typo"},
    )
    assert r.status_code == 200, r.text
    # since the last poll: c, signed, and a, amended (signed again)
    assert listed(signed_since=poll.isoformat()) == ["a", "c"]
    assert listed(signed_since=poll.replace(tzinfo=None).isoformat()) == ["a", "c"]  # UTC
    assert listed(signed_since=poll.isoformat(), accession_number="ACC-77") == ["a"]
    assert listed(signed_since=poll.isoformat(), status="final") == ["c"]
    assert listed(status="draft", accession_number="ACC-77") == ["b"]
    assert_error(api.get("/v1/reports?signed_since=yesterday", headers=api.h()), 422)
    for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):  # past year 1/9999
        r = api.get("/v1/reports", headers=api.h(), params={"signed_since": edge})
        assert_error(r, 422, "invalid_request")
        r = api.get("/v1/audit", headers=api.h("admin"), params={"until": edge})
        assert_error(r, 422, "invalid_request")
    assert_error(api.get(f"/v1/reports?accession_number={'9' * 65}", headers=api.h()), 422)

    with api.app.state.session_factory() as s:
        listed_events = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "report.list").order_by(AuditEvent.id)
        ).all()
    assert "ACC-7" not in json.dumps([e.detail for e in listed_events])
    assert listed_events[-1].detail["filters"] == ["status", "accession_number"]
    assert ["accession_number", "signed_since"] in [e.detail["filters"] for e in listed_events]


def test_files_of_an_upload_that_fails_part_way_are_swept(
    tmp_path, sqlite_url, tiny_lm, monkeypatch
):
    """The first file of an upload is in the store when the second finds the disk full: the
    request's transaction rolls back (507, no rows), and a sweep removes the file no row names.
    A file another study holds is kept by that sweep."""
    import errno

    from tinyllava_med.server.storage import ImageStore

    real_put = ImageStore.put
    for api in make_api(tmp_path, sqlite_url, tiny_lm, image_sweep_grace_s=0):
        held = upload(api, ("held.png", png_bytes(color=7), "image/png")).json()
        held_sha = held["images"][0]["sha256"]
        puts = []

        def second_fails(self, data, digest=None, puts=puts, **kw):
            puts.append(digest)
            if len(puts) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_put(self, data, digest, **kw)

        monkeypatch.setattr(ImageStore, "put", second_fails)
        files = [(f"{c}.png", png_bytes(color=c), "image/png") for c in (7, 9, 11)]
        assert_error(upload(api, *files), 507, "insufficient_storage")
        monkeypatch.undo()
        new_sha = puts[1]
        store = api.app.state.store
        assert store.exists(new_sha)  # written before the third file failed
        assert api.get("/v1/studies", headers=api.h()).json()["count"] == 1
        wait_for(lambda s=store, h=new_sha: not s.exists(h), timeout_s=30, what="the sweep")
        assert store.exists(held_sha)  # the held study's file stays
        r = api.get(f"/v1/studies/{held['id']}/images/0", headers=api.h())
        assert r.status_code == 200


def test_only_a_transactions_own_rollback_queues_the_sweep_of_its_files(api):
    """A savepoint rolled back inside the transaction leaves its files to the transaction (it
    may still commit them, and a sweep written meanwhile would wait on its lock); the
    transaction's own rollback queues one sweep of them."""
    from tinyllava_med.server.serving import STORED_FILES

    sessions = api.app.state.session_factory

    def sweeps():
        with sessions() as s:
            return [j.payload["sha256"] for j in s.scalars(select(Job)) if j.kind == "sweep_images"]

    session = sessions()
    session.begin()
    session.info[STORED_FILES] = ["a" * 64]
    nested = session.begin_nested()
    nested.rollback()
    assert sweeps() == [] and session.info[STORED_FILES] == ["a" * 64]
    session.rollback()
    session.close()
    assert sweeps() == [["a" * 64]]


def test_files_no_row_names_are_swept_and_a_pending_rejection_note_is_kept(api, monkeypatch):
    """A crash between storing an upload's files and its commit left them in the store with no
    row, and no rollback queued their sweep: `serve` queues one as it starts. Rejection notes
    waiting for their push are named by their job, and stay."""
    from tinyllava_med.server.db import crud
    from tinyllava_med.server.jobs import remove_unused, sweep_unnamed_files

    sessions, store = api.app.state.session_factory, api.app.state.store
    held = upload_ct(api)["images"][0]["sha256"]
    orphan, note = store.put(b"a crashed upload's file"), store.put(b"a rejection note")
    with sessions.begin() as s:
        crud.enqueue_job(s, kind="push_rejection", payload={"sha256": note}, max_attempts=3)
    settings = api.app.state.settings
    asked = []
    files_in_use = crud.files_in_use
    monkeypatch.setattr(crud, "files_in_use", lambda s, h: asked.append(h) or files_in_use(s, h))
    assert sweep_unnamed_files(sessions, settings, store, chunk=2) == 1
    assert len(asked) == 2  # a query per chunk of names, not per file (3 files)
    with sessions() as s:
        sweeps = [j.payload["sha256"] for j in s.scalars(select(Job)) if j.kind == "sweep_images"]
    assert sweeps == [[orphan]]
    # started again before that sweep ran (a restart within the grace period, as after a
    # study's deletion): its files are not reported as a crash's again, nor swept twice
    assert sweep_unnamed_files(sessions, settings, store, chunk=2) == 0
    swept = remove_unused(sessions, store, [orphan, note, held], grace_s=0)
    assert swept.removed == [orphan] and swept.in_use == {note, held}
    assert store.exists(note) and store.exists(held)


def test_readyz_says_when_the_data_volume_is_full(api, monkeypatch):
    """With the data volume full nothing can be stored and no read audited (507s): /readyz
    said ready all the same, so monitoring and load balancers saw a healthy server."""
    import shutil

    usage = shutil.disk_usage(api.app.state.settings.data_dir)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    r = api.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json()["checks"] == {"model": "ok", "database": "ok", "storage": "full"}
    monkeypatch.undo()
    assert api.get("/readyz").status_code == 200


def test_a_full_disk_answers_507_and_keeps_what_is_stored(api, monkeypatch):
    """A write that fails for want of space (ENOSPC on the data volume, "database or disk is
    full" in the database) answers 507 in the error shape, never a 500, stores nothing of that
    request, and leaves what was stored before readable; the refusal is audited."""
    import errno
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from tinyllava_med.server.db import crud
    from tinyllava_med.server.storage import ImageStore

    before = upload_ct(api)

    def no_space(self, data, digest=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ImageStore, "put", no_space)
        r = upload(api, ("ct.dcm", ct_of_new_study(), "application/dicom"))
        assert_error(r, 507, "insufficient_storage")
        assert "storage is full" in r.json()["error"]["message"]
        ask = api.post(
            "/v1/ask",
            headers=api.h(),
            files={"file": ("x.png", png_bytes(), "image/png")},
            data={"question": "Organ?"},
        )
        assert_error(ask, 507, "insufficient_storage")
        body, ctype = multipart_related(ct_of_new_study())
        stow = api.post(
            "/dicomweb/studies", content=body, headers={**api.h("pacs"), "Content-Type": ctype}
        )
        assert_error(stow, 507, "insufficient_storage")

    def database_full(*args, **kwargs):
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    with monkeypatch.context() as m:
        m.setattr(crud, "create_study", database_full)
        r = upload(api, ("x.png", png_bytes(), "image/png"))
        assert_error(r, 507, "insufficient_storage")
    with monkeypatch.context() as m:  # a read whose audit event cannot be written: refused,
        # and said so (it read "nothing was stored")
        m.setattr(crud, "insert_audit_rows", database_full)
        r = api.get(f"/v1/studies/{before['id']}", headers=api.h())
        assert_error(r, 507, "insufficient_storage")
        assert "could not be recorded in the audit log" in r.json()["error"]["message"]

    listed = api.get("/v1/studies", headers=api.h()).json()
    assert [s["id"] for s in listed["data"]] == [before["id"]] and listed["count"] == 1
    r = api.get(f"/v1/studies/{before['id']}/images/0", headers=api.h())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with api.app.state.session_factory() as s:
        refused = s.scalars(select(AuditEvent).where(AuditEvent.status_code == 507)).all()
    assert len(refused) >= 3 and {e.outcome for e in refused} == {"error"}
    assert {e.detail["code"] for e in refused} == {"insufficient_storage"}


def test_a_read_only_data_volume_answers_503_and_readyz_says_so(api, monkeypatch):
    """A data volume mounted read-only (or closed to the server's user, or failing) answered
    500 `internal_error` to every upload while `/readyz` said ready; a full one was handled."""
    import errno
    import os

    from tinyllava_med.server.storage import ImageStore

    before = upload_ct(api)
    images_dir = str(api.app.state.settings.images_dir)
    for code in (errno.EROFS, errno.EACCES, errno.EIO):

        def refused(self, data, digest=None, *, replace=False, code=code):
            raise OSError(code, os.strerror(code))

        with monkeypatch.context() as m:
            m.setattr(ImageStore, "put", refused)
            r = upload(api, ("ct.dcm", ct_of_new_study(), "application/dicom"))
            assert_error(r, 503, "storage_unavailable")
            assert "refuses writes" in r.json()["error"]["message"]
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from tinyllava_med.server.db import crud

    def read_only_database(*args, **kwargs):  # SQLite's file on that volume
        raise OperationalError(
            "INSERT", {}, sqlite3.OperationalError("attempt to write a readonly database")
        )

    with monkeypatch.context() as m:
        m.setattr(crud, "create_study", read_only_database)
        r = upload(api, ("x.png", png_bytes(), "image/png"))
        assert_error(r, 503, "storage_unavailable")  # not "try again" (database_unavailable)
    access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda f, mode: False if str(f) == images_dir else access(f, mode))
        r = api.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"] == {"model": "ok", "database": "ok", "storage": "read_only"}
    assert api.get("/readyz").status_code == 200
    listed = api.get("/v1/studies", headers=api.h()).json()
    assert [s["id"] for s in listed["data"]] == [before["id"]]


def test_the_audit_names_what_list_pages_showed_and_finds_them_by_study(api):
    """A privacy officer asking who saw one patient's study finds the list pages that showed
    it (the worklist, a report list) beside the study's own events; a page that did not show
    it is not found, and the audit holds this server's ids, never the filter values."""
    seen, other = upload_ct(api), upload(api, ("b.png", png_bytes(), "image/png")).json()
    r = api.post(f"/v1/studies/{seen['id']}/questions", headers=api.h(), json={"question": "?"})
    assert r.status_code == 201, r.text
    report_id = r.json()["id"]
    for params in ({}, {"modality": "CT"}):
        assert api.get("/v1/studies", headers=api.h(), params=params).status_code == 200
    assert api.get("/v1/studies", headers=api.h(), params={"modality": "MR"}).status_code == 200
    r = api.get("/v1/reports", headers=api.h(), params={"study_id": seen["id"]})
    assert [x["id"] for x in r.json()["data"]] == [report_id]

    def found(**params):
        r = api.get("/v1/audit", headers=api.h("admin"), params={**params, "limit": 200})
        assert r.status_code == 200, r.text
        return [(e["action"], e["detail"].get("filters")) for e in r.json()["data"]]

    lists = [e for e in found(resource_id=seen["id"]) if e[0].endswith(".list")]
    assert lists == [
        ("report.list", ["study_id"]),
        ("study.list", ["modality"]),
        ("study.list", []),
    ]
    assert ("question.ask", None) in found(resource_id=seen["id"])
    assert found(resource_id=other["id"], action="study.list") == [
        ("study.list", []),  # the worklist showed both; the CT filter did not show the PNG
    ]
    assert found(resource_id=report_id, resource_type="report")[0] == ("report.list", ["study_id"])
    assert found(resource_id="%") == []  # LIKE's wildcards are matched as text


def test_admin_reads_the_audit_log_and_lists_keys(api):
    admin = api.h("admin")
    created = api.post("/v1/apikeys", headers=admin, json={"role": "radiologist", "name": "Dr. A"})
    assert created.status_code == 201, created.text
    key_id, key = created.json()["id"], created.json()["key"]
    h = {"Authorization": f"Bearer {key}"}
    study = upload_ct(api)
    r = api.post(f"/v1/studies/{study['id']}/questions", headers=h, json={"question": "Organ?"})
    assert r.status_code == 201, r.text
    report_id = r.json()["id"]
    for path in ("/v1/audit", "/v1/apikeys"):  # admins only, and the refusal is audited
        assert_error(api.get(path, headers=h), 403, "forbidden")

    r = api.get("/v1/audit", params={"actor": key_id}, headers=admin)
    assert r.status_code == 200, r.text
    events = r.json()["data"]
    assert [e["action"] for e in events][-1] == "question.ask"  # newest first
    assert {e["outcome"] for e in events} == {"ok", "denied"}
    ask = next(e for e in events if e["action"] == "question.ask")
    assert ask["resource_id"] == study["id"] and ask["status_code"] == 201
    assert ask["detail"] == {"report_id": report_id}
    ds = pydicom.dcmread(CT_SMALL)
    assert str(ds.PatientName) not in r.text and ds.PatientID not in r.text
    denied = api.get("/v1/audit", params={"actor": key_id, "outcome": "denied"}, headers=admin)
    assert denied.json()["count"] == 2
    one = api.get("/v1/audit", params={"limit": 1}, headers=admin).json()
    assert len(one["data"]) == 1 and one["count"] > 1
    assert one["data"][0]["action"] == "audit.read"  # the previous read is in the log
    later = api.get("/v1/audit", params={"since": "2999-01-01T00:00:00Z"}, headers=admin).json()
    assert later == {"data": [], "count": 0}
    assert_error(api.get("/v1/audit", params={"outcome": "maybe"}, headers=admin), 422)

    keys = api.get("/v1/apikeys", headers=admin)
    assert keys.status_code == 200, keys.text
    mine = next(k for k in keys.json()["data"] if k["id"] == key_id)
    assert (mine["name"], mine["role"], mine["active"]) == ("Dr. A", "radiologist", True)
    assert key.startswith(f"tlm_{mine['prefix']}_") and mine["last_used_at"] is not None
    assert key not in keys.text and "hash" not in keys.text
    assert api.delete(f"/v1/apikeys/{key_id}", headers=admin).status_code == 204
    active = api.get("/v1/apikeys", params={"active": True}, headers=admin).json()["data"]
    assert key_id not in {k["id"] for k in active}
    revoked = api.get("/v1/apikeys", params={"active": False}, headers=admin).json()["data"]
    assert [k["id"] for k in revoked] == [key_id] and revoked[0]["revoked_at"]


def test_auth_is_required(api):
    assert_error(api.get("/v1/studies"), 401, "unauthorized")
    assert_error(api.get("/v1/studies", headers={"Authorization": "Bearer tlm_nope"}), 401)
    assert_error(api.post("/v1/apikeys", headers=api.h("radiologist"), json={"role": "admin"}), 403)


def test_a_body_without_a_key_is_refused_before_it_is_read(tmp_path, sqlite_url, tiny_lm):
    """FastAPI reads a request's body (spooling uploads to disk) before it checks the key, so a
    caller with no key could make the server take in MAX_UPLOAD_BYTES a request. The key of a
    request with a body is checked first: a client that announces 50 MB and sends none of it
    hears 401 at once, and the refusal is audited. A bad key is refused the same way; a good
    one goes on to the route; every body route of the API takes a key (OpenAPI security)."""
    import socket

    from api_helpers import live_server

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.db.migrate import upgrade
    from tinyllava_med.server.settings import Settings

    upgrade(sqlite_url)
    app = create_app(Settings(data_dir=tmp_path / "d", database_url=sqlite_url), model=tiny_lm)

    def announce(path: str, auth: str = "") -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}"
                "Content-Type: multipart/form-data; boundary=b\r\n"
                "Content-Length: 50000000\r\n\r\n".encode()
            )
            return sock.recv(4096)  # times out if the server waits for the 50 MB

    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        key = app.state.first_admin_key  # made as the server started
        for path in ("/v1/studies", "/v1/studies/import", "/dicomweb/studies", "/v1/ask"):
            answer = announce(path)
            assert answer.startswith(b"HTTP/1.1 401"), (path, answer[:200])
            assert b'"code":"unauthorized"' in answer and b"www-authenticate: Bearer" in answer
        answer = announce("/v1/studies", "Authorization: Bearer tlm_00000000_nope\r\n")
        assert answer.startswith(b"HTTP/1.1 401") and b"invalid API key" in answer
        r = httpx.post(
            f"{base}/v1/studies",
            headers={"Authorization": f"Bearer {key}"},
            files={"files": ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")},
        )
        assert r.status_code == 201, r.text
        refused = httpx.get(
            f"{base}/v1/audit",
            params={"action": "auth.authenticate"},
            headers={"Authorization": f"Bearer {key}"},
        ).json()["data"]
        assert len(refused) == 5 and {e["status_code"] for e in refused} == {401}
        # refused before routing, audited under the route it was for
        assert {e["resource_id"] for e in refused} == {
            "POST /v1/studies",
            "POST /v1/studies/import",
            "POST /dicomweb/studies",
            "POST /v1/ask",
        }
    for path, ops in app.openapi()["paths"].items():
        for method, op in ops.items():
            if method in ("post", "put", "patch") and path.startswith(("/v1/", "/dicomweb/")):
                assert op.get("security"), f"{method} {path} takes a body without a key"


def test_a_flood_of_keyless_requests_is_counted_not_written_row_by_row(api):
    """Per client address, the first refusals of a minute are audited one row each; the rest
    are counted and the next row says how many were left out. The 401s themselves go out."""
    from tinyllava_med.server.auth import DenialLog

    now = [0.0]
    api.app.state.denial_log = DenialLog(burst=3, window_s=60, clock=lambda: now[0])
    for _ in range(8):
        assert_error(api.get("/v1/studies"), 401, "unauthorized")
    now[0] = 61.0
    assert_error(api.get("/v1/reports", headers={"X-API-Key": "tlm_x_y"}), 401)
    with api.app.state.session_factory() as s:
        rows = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == "auth.authenticate")
            .order_by(AuditEvent.id)
        ).all()
    assert [r.detail for r in rows] == [{"reason": "missing API key"}] * 3 + [
        {"reason": "invalid API key", "not_audited_before": 5}
    ]


def test_one_shot_ask_with_png(api):
    r = api.post(
        "/v1/ask",
        headers=api.h("pacs"),
        files={"file": ("x.png", png_bytes(), "image/png")},
        data={"question": "Is there a fracture?", "max_new_tokens": "4"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["study"]["images"][0]["kind"] == "png"
    assert body["report"]["study_id"] == body["study"]["id"]
    two = [
        ("file", ("x.png", png_bytes(), "image/png")),
        ("file", ("y.png", png_bytes(color=1), "image/png")),
    ]
    r = api.post("/v1/ask", headers=api.h("pacs"), files=two, data={"question": "Fracture?"})
    assert_error(r, 422, "invalid_request")  # the second file was dropped without a word
    assert api.get("/v1/studies", headers=api.h()).json()["count"] == 1


def test_a_one_shot_ask_that_fails_after_storing_names_the_study(api, monkeypatch):
    """`/v1/ask` stores the study before the model answers. When the answer then fails, the
    error names the stored study (detail and message), so the client asks again about it
    rather than uploading the file again; the failure's audit names it too."""
    from tinyllava_med.server.engine import EngineFailed

    async def fail(*args, **kwargs):
        raise EngineFailed("the model failed")

    monkeypatch.setattr(api.app.state.engine, "generate", fail)
    r = api.post(
        "/v1/ask",
        headers=api.h("pacs"),
        files={"file": ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")},
        data={"question": "Is there a fracture?"},
    )
    assert_error(r, 502, "engine_failed")
    study_id = r.json()["error"]["detail"]["study_id"]
    assert f"POST /v1/studies/{study_id}/questions" in r.json()["error"]["message"]
    monkeypatch.undo()
    r = api.post(f"/v1/studies/{study_id}/questions", headers=api.h(), json={"question": "?"})
    assert r.status_code == 201, r.text
    assert api.get("/v1/studies", headers=api.h()).json()["count"] == 1
    with api.app.state.session_factory() as s:
        failed = s.scalars(select(AuditEvent).where(AuditEvent.status_code == 502)).one()
    assert (failed.action, failed.resource_id) == ("question.ask", study_id)


def test_stream_sends_tokens_then_stores_report(api):
    api = api
    study = upload_ct(api)
    with api.stream(
        "POST",
        f"/v1/studies/{study['id']}/questions?stream=true",
        headers=api.h("pacs"),
        json={"question": "Describe the findings.", "max_new_tokens": 6},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store"
        raw = "".join(r.iter_text())
    events = [b for b in raw.split("\n\n") if b.strip()]
    kinds = [e.split("\n")[0].removeprefix("event: ") for e in events]
    assert kinds[-1] == "report" and set(kinds[:-1]) <= {"token"}
    report = json.loads(events[-1].split("data: ", 1)[1])
    tokens = "".join(json.loads(e.split("data: ", 1)[1])["text"] for e in events[:-1])
    assert tokens.strip() == report["answer"]
    stored = api.get(f"/v1/reports/{report['id']}", headers=api.h("pacs")).json()
    assert stored["answer"] == report["answer"]


def test_a_streamed_answer_that_fails_says_so_and_is_audited(api, monkeypatch, caplog):
    """With `?stream=true` the 200 went out before the answer: a failure of the model (a
    timeout) or of storing the report (the database) ends the stream with an `error` event in
    the error shape, audited as the same request without streaming is; the log line names the
    route, not the question."""
    from sqlalchemy.exc import OperationalError

    from tinyllava_med.server.errors import APIError
    from tinyllava_med.server.routes import questions

    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions?stream=true"

    def streamed(question):
        with api.stream("POST", url, headers=api.h(), json={"question": question}) as r:
            assert r.status_code == 200
            events = [b for b in "".join(r.iter_text()).split("\n\n") if b.strip()]
        kind, data = events[-1].split("\n", 1)
        assert kind == "event: error", events
        return json.loads(data.removeprefix("data: "))["error"]

    async def times_out(*args, **kwargs):
        raise APIError(504, "timeout", "no answer within 1 s")

    monkeypatch.setattr(questions, "answer", times_out)
    assert streamed("Mass in Jane Doe's liver?")["code"] == "timeout"
    monkeypatch.undo()

    async def database_gone(*args, **kwargs):
        raise OperationalError("INSERT INTO reports ...", {}, Exception("server closed"))

    monkeypatch.setattr(questions, "_store_answer", database_gone)
    with caplog.at_level(logging.ERROR):
        assert streamed("Mass in Jane Doe's liver?")["code"] == "database_unavailable"
    assert "/v1/studies/{study_id}/questions" in caplog.text and "Jane" not in caplog.text
    assert study["id"] not in caplog.text
    with api.app.state.session_factory() as s:
        asked = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "question.ask").order_by(AuditEvent.id)
        ).all()
    assert [(e.outcome, e.status_code, e.resource_id) for e in asked[-2:]] == [
        ("error", 504, study["id"]),
        ("error", 503, study["id"]),
    ]
    assert api.get("/v1/reports", headers=api.h()).json()["count"] == 0


@pytest.mark.parametrize(
    "name,data,ctype,status,code",
    [
        ("junk.bin", b"\x00\x01not an image at all" * 10, "application/octet-stream", 415, None),
        ("cut.dcm", CT_SMALL.read_bytes()[:3000], "application/dicom", 400, None),
        ("empty.dcm", b"", "application/dicom", 400, "empty_file"),
    ],
)
def test_bad_files_are_4xx_and_store_nothing(api, name, data, ctype, status, code):
    api = api
    before = api.get("/v1/studies", headers=api.h("pacs")).json()["count"]
    r = upload(api, ("good.png", png_bytes(), "image/png"), (name, data, ctype))
    assert 400 <= r.status_code < 500
    assert_error(r, status, code)
    assert api.get("/v1/studies", headers=api.h("pacs")).json()["count"] == before


def test_one_upload_is_one_study(api):
    """Files of different studies, or DICOM beside PNG, are one upload no more: 422
    `mixed_studies` and nothing stored. Before, they became one study carrying the first file's
    UID and accession number, so a report about the second patient's MR was filed under the
    first patient's CT order (FHIR) while its SR named the MR's study."""
    mr = ("mr.dcm", MR_SMALL.read_bytes(), "application/dicom")
    ct = ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")
    png = ("x.png", png_bytes(), "image/png")
    for files in [(ct, mr), (ct, png), (png, ct)]:
        r = upload(api, *files)
        assert_error(r, 422, "mixed_studies")
        assert r.json()["error"]["detail"] == {"file": files[1][0]}
    assert api.get("/v1/studies", headers=api.h()).json()["count"] == 0
    # two instances of one study, and two images, are one study each
    second = ("ct2.dcm", ct_with(SOPInstanceUID=generate_uid()), "application/dicom")
    assert len(upload(api, ct, second).json()["images"]) == 2
    assert len(upload(api, png, ("y.png", png_bytes(color=9), "image/png")).json()["images"]) == 2


def test_an_upload_holds_one_decoded_image_at_a_time(tmp_path, sqlite_url, tiny_lm, monkeypatch):
    """Each file's pixels are dropped once it is checked (its rendering goes to the render
    cache, here off): 64 files of 8192 x 8192 RGB held together were 13 GB."""
    import weakref

    import tinyllava_med.server.serving as serving

    live: list[weakref.ref] = []
    held: list[int] = []
    real = serving.load_study_file

    def load(*args, **kwargs):
        held.append(sum(ref() is not None for ref in live))  # decoded images still alive
        d = real(*args, **kwargs)
        live.append(weakref.ref(d.image))
        return d

    monkeypatch.setattr(serving, "load_study_file", load)
    for api in make_api(tmp_path, sqlite_url, tiny_lm, render_cache_mb=0):
        files = [(f"{i}.png", png_bytes(color=i), "image/png") for i in range(6)]
        r = upload(api, *files)
        assert r.status_code == 201 and len(r.json()["images"]) == 6, r.text
    assert held == [0] * 6, held


def test_png_decompression_bomb_is_413(api):
    buf = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buf, format="PNG")
    r = upload(api, ("bomb.png", buf.getvalue(), "image/png"))
    assert_error(r, 413)
    with api.app.state.session_factory() as s:  # the refused upload is audited
        (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.upload")).all()
    assert (event.outcome, event.status_code, event.resource_id) == ("invalid", 413, None)


def test_deflated_dicom_bomb_is_413_under_max_decoded_bytes(
    tmp_path, sqlite_url, tiny_lm, monkeypatch
):
    """A deflated data set is measured against `max_decoded_bytes` before pydicom inflates it,
    with or without the file meta group length (pydicom needs none to find the stream). STOW
    names the refused instance from its file meta: pydicom never inflates the bomb."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.PixelData = bytes(len(ds.PixelData))  # zeros deflate well: the file stays small
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    no_length = data[:132] + data[144:]  # (0002,0000) dropped
    for api in make_api(tmp_path, sqlite_url, tiny_lm, max_decoded_bytes=20_000):
        for body in (data, no_length):
            r = upload(api, ("ct.dcm", body, "application/dicom"))
            assert_error(r, 413, "decompression_bomb")
        monkeypatch.setattr(pydicom.filereader, "zlib", None)  # pydicom inflating: TypeError
        body, ctype = multipart_related(no_length)
        r = api.post(
            "/dicomweb/studies", content=body, headers={**api.h("pacs"), "Content-Type": ctype}
        )
        assert r.status_code == 409, r.text
        (failed,) = r.json()["00081198"]["Value"]
        assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]
        assert failed["00081197"]["Value"] == [0xA700]  # out of resources


def test_an_image_too_long_for_the_model_is_413_at_upload_and_when_asked_about(
    tmp_path, sqlite_url, tiny_lm
):
    """A 9000 x 2 strip passes the pixel limit, but padded to a square it would need 81M pixels
    (a 1 x 5,000,000 one ran out of memory: a 500). The upload is refused with 413; an image
    stored under a larger `max_side` is kept, and a question about it is refused the same way."""
    strip = io.BytesIO()
    Image.new("L", (9000, 2), 100).save(strip, format="PNG")
    data = ("strip.png", strip.getvalue(), "image/png")
    for api in make_api(tmp_path / "a", sqlite_url, tiny_lm):
        r = upload(api, data)
        assert_error(r, 413, "too_large")
        assert "8192 pixels on the longer side" in r.json()["error"]["message"]
        assert api.get("/v1/studies", headers=api.h("pacs")).json()["count"] == 0
    for api in make_api(tmp_path / "b", sqlite_url.replace(".db", "b.db"), tiny_lm, max_side=9000):
        study = upload(api, data).json()
        api.app.state.settings.max_side = 8192  # as if restarted with the default
        url = f"/v1/studies/{study['id']}/questions"
        assert_error(api.post(url, headers=api.h(), json={"question": "q?"}), 413, "too_large")
        assert api.get(f"/v1/studies/{study['id']}", headers=api.h()).status_code == 200


def test_request_validation(api):
    api = api
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    assert_error(api.post(url, headers=api.h(), json={}), 422, "invalid_request")
    assert_error(api.post(url, headers=api.h(), json={"question": 5, "image_index": "x"}), 422)
    assert_error(
        api.post(url, headers=api.h(), json={"question": "q" * 5000}), 422, "question_too_long"
    )
    assert_error(
        api.post(url, headers=api.h(), json={"question": "q", "max_new_tokens": 10**6}),
        422,
        "max_new_tokens_too_large",
    )
    assert_error(
        api.post(url, headers=api.h(), json={"question": "q", "image_index": 3}),
        404,
        "image_not_found",
    )
    assert_error(
        api.post("/v1/studies/nope/questions", headers=api.h(), json={"question": "q"}),
        404,
        "study_not_found",
    )
    assert_error(
        api.post(
            url,
            headers=api.h(),
            content=b"{not json",
        ),
        422,
    )
    # a JSON route's body sent as text or a form: the content type is named, not the schema
    for sent in (
        {"content": b"question=q", "headers": {"Content-Type": "text/plain"}},
        {"data": {"question": "q"}},
    ):
        r = api.post(url, **{**sent, "headers": {**api.h(), **sent.get("headers", {})}})
        assert_error(r, 415, "unsupported_media_type")
        assert "application/json" in r.json()["error"]["message"]
    assert_error(api.get("/v1/reports/nope", headers=api.h()), 404, "report_not_found")
    assert_error(upload(api), 422)
    assert_error(
        api.get(f"/v1/studies/{study['id']}/images/0?window=rainbow", headers=api.h()), 422
    )


def test_ct_window_presets_are_for_ct(api):
    """The presets are Hounsfield ranges: on an MR they made a picture that looked windowed
    and meant nothing (200). Now 422 `bad_window`; its own window still shows."""
    mr = upload(api, ("mr.dcm", MR_SMALL.read_bytes(), "application/dicom")).json()
    url = f"/v1/studies/{mr['id']}/images/0"
    r = api.get(f"{url}?window=lung", headers=api.h())
    assert_error(r, 422, "bad_window")
    assert "MR" in r.json()["error"]["message"]
    assert api.get(url, headers=api.h()).status_code == 200
    ct = upload_ct(api)
    lung = api.get(f"/v1/studies/{ct['id']}/images/0?window=lung", headers=api.h())
    assert lung.status_code == 200


def test_nul_characters_are_refused_not_a_500(api):
    """A NUL (U+0000) in a question, a report edit, a key's name, a filter or a path: 422 on
    both databases, and what is stored stays (PostgreSQL text cannot hold NUL: each was a 500
    there). A backslash before "u0000" is text, not a NUL."""
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    r = api.post(url, headers=api.h(), json={"question": "is it \\u0000 or not?"})
    assert r.status_code == 201, r.text
    assert r.json()["question"] == "is it \\u0000 or not?"
    report = r.json()["id"]
    refused = [
        api.post(url, headers=api.h(), json={"question": "a\u0000b", "max_new_tokens": 2}),
        api.patch(f"/v1/reports/{report}", headers=api.h(), json={"text": "x\u0000y"}),
        api.post("/v1/apikeys", headers=api.h("admin"), json={"role": "pacs", "name": "a\0"}),
        api.patch(  # the media type's case does not matter to the JSON parser, nor here
            f"/v1/reports/{report}",
            headers={**api.h(), "Content-Type": "Application/JSON"},
            content=b'{"text": "x\\u0000y"}',
        ),
        api.get("/v1/studies?accession_number=%00", headers=api.h()),
        api.get("/v1/reports?status=draft%00", headers=api.h()),
        api.get("/v1/reports/%00", headers=api.h()),
        api.post(
            "/v1/ask",
            headers=api.h(),
            files={"file": ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")},
            data={"question": "a\0b"},
        ),
    ]
    for r in refused:
        assert_error(r, 422, "invalid_request")
        assert "U+0000" in r.json()["error"]["message"]
    r = api.get(f"/v1/reports/{report}", headers=api.h())
    assert r.status_code == 200 and r.json()["status"] == "draft", r.text
    assert api.get("/v1/studies", headers=api.h()).json()["count"] == 1  # /v1/ask stored none


def test_a_body_without_a_key_is_not_read(sqlite_api):
    """A JSON body to a route that needs a key, or to none at all, is not read before the
    answer (401, 404, 405): the NUL check read a whole body (up to max_upload_bytes) for
    anyone before, and a slow sender could hold many such bodies."""

    def call(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        reads, sent = 0, []

        async def receive():
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b" " * (1 << 20), "more_body": reads < 40}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), *headers],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
        }
        asyncio.run(sqlite_api.app(scope, receive, send))
        return sent[0]["status"], reads

    assert call("POST", "/healthz", []) == (405, 0)
    assert call("POST", "/anything", []) == (404, 0)
    assert call("DELETE", "/v1/studies/x", [])[0] == 401
    assert call("DELETE", "/v1/studies/x", [])[1] == 0
    assert call("POST", "/v1/apikeys", []) == (401, 0)  # `KeyBeforeBody`, as before


def test_control_characters_are_refused_where_reports_get_them(api):
    """A question, a report edit, an amendment's reason or a key's name (the signer in the
    exports) with a control character other than tab and line breaks: 422 naming the character,
    not echoing the text, and nothing changes. DICOM SR, FHIR and XML refuse them (a vertical
    tab from a word processor made an invalid FHIR narrative)."""
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    fine = "Line one\twith a tab\r\nline two\nline three"
    r = api.post(url, headers=api.h(), json={"question": fine, "max_new_tokens": 2})
    assert r.status_code == 201, r.text
    report = f"/v1/reports/{r.json()['id']}"
    assert api.patch(report, headers=api.h(), json={"text": fine}).json()["text"] == fine
    secret = "Mrs Example"
    ask_file = {"file": ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")}
    png = base64.b64encode(png_bytes()).decode()
    content = [
        {"type": "text", "text": f"{secret}\x1f?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    refused = [
        api.post(url, headers=api.h(), json={"question": f"{secret}\x1b[31m?"}),
        api.post("/v1/ask", headers=api.h(), files=ask_file, data={"question": f"{secret}\x07"}),
        api.post(
            "/v1/chat/completions",
            headers=api.h(),
            json={"model": "tiny-test", "messages": [{"role": "user", "content": content}]},
        ),
        api.patch(report, headers=api.h(), json={"text": f"{secret}\x0bsecond line"}),
        api.patch(report, headers=api.h(), json={"text": f"{secret}\x0c"}),
        api.post("/v1/apikeys", headers=api.h("admin"), json={"role": "pacs", "name": "a\x7f"}),
        # JSON's escape for half a UTF-16 pair, which no UTF-8 text holds (a 500 before)
        api.patch(
            report,
            headers={**api.h(), "Content-Type": "application/json"},
            content=b'{"text": "Mrs Example\\ud800"}',
        ),
    ]
    codes = ["U+001B", "U+0007", "U+001F", "U+000B", "U+000C", "U+007F", "U+D800"]
    for r, code in zip(refused, codes, strict=True):
        assert_error(r, 422, "invalid_request")
        assert code in r.text and secret not in r.text, r.text
    r = api.patch(report, headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    r = api.patch(
        report, headers=api.h(), json={"status": "amended", "text": "x", "reason": "typo\x08"}
    )
    assert_error(r, 422, "invalid_request")
    r = api.get(report, headers=api.h())
    assert (r.json()["status"], r.json()["text"]) == ("final", fine)
    assert api.get("/v1/studies", headers=api.h()).json()["count"] == 1  # /v1/ask stored none
    assert api.get("/v1/reports", headers=api.h()).json()["count"] == 1


def test_numbers_past_the_database_and_times_without_an_offset(api):
    """An offset, a job id or an image index larger than the database's integers is a 422 on
    both databases (a 500 on PostgreSQL before), as is a report text past 100 000 characters;
    an audit time without an offset is UTC (a 500 before)."""
    study = upload_ct(api)
    r = api.post(f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "?"})
    assert r.status_code == 201, r.text
    big, h, admin = 2**63, api.h(), api.h("admin")
    for url in ("/v1/studies", "/v1/reports", "/v1/audit", "/v1/jobs"):
        assert_error(api.get(f"{url}?offset={big}", headers=admin), 422, "invalid_request")
        assert api.get(f"{url}?offset={big - 1}", headers=admin).json()["data"] == []
    assert_error(api.get(f"/v1/jobs/{big}", headers=admin), 422, "invalid_request")
    assert_error(api.get(f"/v1/jobs/{big - 1}", headers=admin), 404, "job_not_found")
    assert_error(api.post(f"/v1/jobs/{big}/retry", headers=admin), 422, "invalid_request")
    url = f"/v1/studies/{study['id']}/questions"
    assert_error(api.post(url, headers=h, json={"question": "?", "image_index": big}), 422)
    report = f"/v1/reports/{r.json()['id']}"
    assert_error(api.patch(report, headers=h, json={"text": "x" * 100_001}), 422)
    assert api.patch(report, headers=h, json={"text": "x" * 100_000}).status_code == 200

    def events(**times):  # the upload's event (every listing adds an audit.read event)
        r = api.get("/v1/audit", headers=admin, params={"action": "study.upload", **times})
        assert r.status_code == 200, r.text
        return r.json()["count"]

    now = datetime.now(timezone.utc)
    naive = (now - timedelta(hours=1)).replace(tzinfo=None).isoformat()
    assert events(since=naive) == events(since=(now - timedelta(hours=1)).isoformat()) == 1
    assert events(until=naive) == 0  # an hour ago in UTC, whatever the server's zone
    assert events(since="0001-01-01T00:00:00") == 1


def test_queue_full_is_503_with_retry_after(sqlite_api):
    api = sqlite_api
    study = upload_ct(api)
    api.app.state.engine.max_queue = 0  # every slot taken
    r = api.post(f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "q"})
    assert_error(r, 503, "queue_full")
    assert r.headers["Retry-After"]
    assert (
        'tinyllava_med_rejected_requests_total{reason="queue_full"} 1.0' in api.get("/metrics").text
    )


def test_readyz_is_503_until_a_model_loads(tmp_path, sqlite_url):
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "d", database_url=sqlite_url, model=str(tmp_path / "no-such-model")
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        deadline = 50
        while deadline and client.app.state.load_error is None:
            import time

            time.sleep(0.1)
            deadline -= 1
        r = client.get("/readyz")
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json()["checks"]["model"] == "failed"
        key = client.app.state.first_admin_key
        study = client.post(
            "/v1/studies",
            headers={"Authorization": f"Bearer {key}"},
            files=[("files", ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom"))],
        )
        assert study.status_code == 201  # storing studies does not need the model
        r = client.post(
            f"/v1/studies/{study.json()['id']}/questions",
            headers={"Authorization": f"Bearer {key}"},
            json={"question": "q"},
        )
        assert_error(r, 503, "model_not_ready")


@contextmanager
def _serve_until_loaded(settings, own_process=False):
    """A started server once its model has loaded (or failed to)."""
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app

    app = create_app(settings, own_process=own_process)
    with TestClient(app, raise_server_exceptions=False) as client:
        state = client.app.state
        wait_for(lambda: state.engine.ready or state.load_error, what="the model to load")
        yield client


@pytest.mark.parametrize("warmup", ["on", "auto"])
def test_warm_up_before_serving_on_request_or_on_a_gpu(
    tmp_path, sqlite_url, tiny_model_dir, warmup, caplog
):
    """`warmup=on` generates a batch of each size 1 to max_batch_size before the engine
    takes requests, and that counts as the model answering (/readyz ok without a probe);
    `auto` does so only on a GPU, so not here."""
    from tinyllava_med.server.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "d",
        database_url=sqlite_url,
        model=str(tiny_model_dir),
        max_batch_size=3,
        warmup=warmup,
    )
    caplog.set_level(logging.INFO, logger="tinyllava_med.server.app")
    with _serve_until_loaded(settings) as client:
        assert client.app.state.load_error is None
        warm = [m for m in caplog.messages if m.startswith("warm")]
        if warmup == "on":
            assert warm[0] == "warming up: one batch of each size 1 to 3"
            assert re.fullmatch(
                r"warm-up took [\d.]+ s for 1, [\d.]+ s for 2, [\d.]+ s for 3", warm[1]
            )
        else:
            assert warm == []
        assert client.get("/readyz").status_code == 200
        batches = "tinyllava_med_batch_size_count 1.0" in client.get("/metrics").text
        assert batches == (warmup == "auto")  # here no warm-up: /readyz probed once


@pytest.mark.parametrize("own_process", [True, False])
def test_a_serving_process_settles_its_heap_once_the_model_is_loaded(
    tmp_path, sqlite_url, tiny_model_dir, own_process
):
    """`serve` (`own_process`) freezes what the loaded model and libraries allocated and
    collects young objects less often, and holds its data directory against `db restore`; an
    app embedded in another process leaves its collector alone."""
    from tinyllava_med.server.app import GC_YOUNG_THRESHOLD
    from tinyllava_med.server.settings import Settings
    from tinyllava_med.server.storage import DataDirInUse, sole_user

    settings = Settings(data_dir=tmp_path / "d", database_url=sqlite_url, model=str(tiny_model_dir))
    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        with _serve_until_loaded(settings, own_process=own_process) as client:
            assert client.app.state.load_error is None
            if own_process:
                assert gc.get_freeze_count() > frozen
                assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
                with pytest.raises(DataDirInUse), sole_user(settings.data_dir):
                    pass
            else:
                assert (gc.get_freeze_count(), gc.get_threshold()) == (frozen, threshold)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_a_failed_warm_up_leaves_the_server_not_ready_saying_why(
    tmp_path, sqlite_url, tiny_model_dir, monkeypatch
):
    import tinyllava_med.server.engine as engine_mod
    from tinyllava_med.server.settings import Settings

    def out_of_memory(lm, images, *args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine_mod, "generate", out_of_memory)
    settings = Settings(
        data_dir=tmp_path / "d", database_url=sqlite_url, model=str(tiny_model_dir), warmup="on"
    )
    with _serve_until_loaded(settings) as client:
        assert "warm-up batch of 1 failed" in client.app.state.load_error
        assert "lower max_batch_size" in client.app.state.load_error
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["model"] == "failed"


def test_failed_accesses_are_audited(api):
    """A failed access is audited with the id it asked for when that has the form of this
    server's ids; other path text (a name typed where an id goes, a STOW URL's Study Instance
    UID) is not written to the audit log."""
    missing = "0b7f3c1e-2d4a-4e8b-9c6f-1a2b3c4d5e6f"
    assert_error(api.get(f"/v1/studies/{missing}", headers=api.h("pacs")), 404, "study_not_found")
    assert_error(api.get("/v1/reports/DOE^JOHN", headers=api.h("pacs")), 404, "report_not_found")
    uid = "1.2.840.113619.2.55.3.604688119.971.1234567890.123"
    wrong_type = {**api.h("pacs"), "Content-Type": "application/json"}
    assert_error(api.post(f"/dicomweb/studies/{uid}", content=b"{}", headers=wrong_type), 415)
    with api.app.state.session_factory() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.outcome != "ok")).all()
        got = {
            (r.action, r.resource_type, r.resource_id, r.detail.get("resource_id")) for r in rows
        }
        assert got == {
            ("study.read", "study", missing, None),
            ("report.read", "report", None, "not an id of this server"),
            ("study.stow", "study", None, "not an id of this server"),
        }
        assert "DOE" not in repr([r.detail for r in rows]) and uid not in repr(
            [r.detail for r in rows]
        )


def test_questions_about_one_image_decode_and_process_it_once(sqlite_api):
    api = sqlite_api
    study = upload_ct(api)
    cache = api.app.state.store.rendered
    answers = []
    for _ in range(3):
        r = api.post(
            f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "Organ?"}
        )
        assert r.status_code == 201, r.text
        answers.append(r.json()["answer"])
    assert len(set(answers)) == 1
    # the upload decoded the file once; the questions reuse that rendering
    assert (cache.misses, cache.hits) == (0, 3)
    # and the model's image processor ran once, outside the batch (its pixel values are cached)
    pixels = api.app.state.engine.pixels
    assert (pixels.misses, pixels.hits) == (1, 2)
    # and the prompt up to the image was computed once (vision tower included), then reused
    prefixes = api.app.state.engine.prefixes
    assert (prefixes.misses, prefixes.hits) == (1, 2) and prefixes.bytes > 0
    assert r.json()["finish_reason"] in ("stop", "length")
    # a different window is a different rendering
    assert (
        api.get(f"/v1/studies/{study['id']}/images/0?window=lung", headers=api.h()).status_code
        == 200
    )
    assert cache.misses == 1


def test_revoked_keys_stop_working(tmp_path, sqlite_url, tiny_lm):
    """Verified keys are cached briefly; revoking through the API drops the key at once, and
    with the cache off a revocation made elsewhere (another replica) is seen at once too. The
    401 says the key was revoked (as one for an expired key says it expired)."""

    from tinyllava_med.server.db.models import ApiKey, utcnow

    for ttl in (10.0, 0.0):
        for api in make_api(
            tmp_path / str(ttl), sqlite_url.replace(".db", f"{ttl}.db"), tiny_lm, auth_cache_s=ttl
        ):
            made = api.post("/v1/apikeys", headers=api.h("admin"), json={"role": "pacs"}).json()
            h = {"Authorization": f"Bearer {made['key']}"}
            assert api.get("/v1/studies", headers=h).status_code == 200  # now cached
            if ttl:
                r = api.delete(f"/v1/apikeys/{made['id']}", headers=api.h("admin"))
                assert r.status_code == 204
            else:
                with api.app.state.session_factory.begin() as s:
                    s.get(ApiKey, made["id"]).revoked_at = utcnow()
            r = api.get("/v1/studies", headers=h)
            assert_error(r, 401, "unauthorized")
            # its holder is told it was revoked, not shown the header's syntax
            assert r.json()["error"]["message"].startswith("revoked API key: it was revoked at ")
            assert "ask an admin for a new key" in r.json()["error"]["message"]


def test_the_last_admin_key_stays_and_key_names_are_checked(api):
    """Revoking the last active admin key (the first one, say, by itself) is refused with 409:
    the API would have no admin left. A key's name of 129 characters is a 422 (a 500 before),
    one of spaces gets the default name."""
    first = api.h("admin")
    me = api.get("/v1/apikeys/me", headers=first).json()
    assert_error(api.delete(f"/v1/apikeys/{me['id']}", headers=first), 409, "last_admin_key")
    r = api.post("/v1/apikeys", headers=first, json={"role": "admin", "name": "second admin"})
    assert r.status_code == 201, r.text
    second = r.json()
    other = {"Authorization": f"Bearer {second['key']}"}
    assert api.delete(f"/v1/apikeys/{me['id']}", headers=other).status_code == 204
    assert_error(api.get("/v1/apikeys", headers=first), 401, "unauthorized")
    assert_error(api.delete(f"/v1/apikeys/{second['id']}", headers=other), 409, "last_admin_key")
    assert api.get("/v1/apikeys", headers=other).status_code == 200  # still an admin

    r = api.post("/v1/apikeys", headers=other, json={"role": "pacs", "name": "x" * 129})
    assert_error(r, 422, "invalid_request")
    r = api.post("/v1/apikeys", headers=other, json={"role": "pacs", "name": "x" * 128})
    assert r.status_code == 201, r.text
    r = api.post("/v1/apikeys", headers=other, json={"role": "pacs", "name": "   "})
    assert r.status_code == 201 and r.json()["name"] == "pacs key", r.text


def test_a_refused_signature_is_audited_as_a_signature(api):
    """A signature or amendment the report's state refuses (409, 422) is in the audit log under
    `report.sign` / `report.amend` with its status, where a search for them finds it."""
    study = upload_ct(api)
    r = api.post(f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "?"})
    report = f"/v1/reports/{r.json()['id']}"
    assert api.patch(report, headers=api.h(), json={"status": "final"}).status_code == 200
    r = api.patch(report, headers=api.h(), json={"text": "changed", "status": "final"})
    assert_error(r, 409, "report_final")
    r = api.patch(report, headers=api.h(), json={"text": "changed", "status": "amended"})
    assert_error(r, 422, "invalid_report_update")  # no reason
    with api.app.state.session_factory() as s:
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.resource_type == "report").order_by(AuditEvent.id)
        ).all()
    got = [(e.action, e.outcome, e.status_code) for e in events if e.action != "report.create"]
    assert got[-3:] == [
        ("report.sign", "ok", 200),
        ("report.sign", "invalid", 409),
        ("report.amend", "invalid", 422),
    ], got


def test_signing_needs_the_sign_permission_not_only_edit(api, monkeypatch):
    """A role that may edit but not sign (a site's resident) drafts the text; its signature or
    amendment is 403, audited as a denied `report.sign`. PATCH checked only `report.edit`."""
    from tinyllava_med.server import auth

    edit_only = auth._GRANTS["radiologist"] - {"report.sign"}
    monkeypatch.setitem(auth._GRANTS, "radiologist", edit_only)
    study = upload_ct(api)
    r = api.post(f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "?"})
    report = f"/v1/reports/{r.json()['id']}"
    resident = api.h("radiologist")
    assert api.patch(report, headers=resident, json={"text": "Drafted."}).status_code == 200
    assert_error(api.patch(report, headers=resident, json={"status": "final"}), 403, "forbidden")
    assert api.get(report, headers=api.h()).json()["status"] == "draft"
    assert api.patch(report, headers=api.h("admin"), json={"status": "final"}).status_code == 200
    amend = {"status": "amended", "text": "Amended.", "reason": "typo"}
    assert_error(api.patch(report, headers=resident, json=amend), 403, "forbidden")
    with api.app.state.session_factory() as s:
        denied = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).all()
    assert [(e.action, e.status_code) for e in denied] == [("report.sign", 403)] * 2


def test_keys_expire(api, monkeypatch):
    """A key made to expire is refused from then on, also while it sits in the key cache, with
    a 401 that says it expired; the listing shows it inactive. The server's `api_key_days`
    is the default lifetime; keys made without either never expire."""
    from datetime import datetime, timezone

    from tinyllava_med.server import auth
    from tinyllava_med.server.db import models

    admin = api.h("admin")
    for days in (0, 3651):
        r = api.post("/v1/apikeys", headers=admin, json={"role": "pacs", "expires_in_days": days})
        assert_error(r, 422)
    made = api.post("/v1/apikeys", headers=admin, json={"role": "pacs", "expires_in_days": 2})
    assert made.status_code == 201, made.text
    made = made.json()
    expires = datetime.fromisoformat(made["expires_at"])
    left = (expires - datetime.now(timezone.utc)).total_seconds()
    assert 2 * 86400 - 60 < left <= 2 * 86400
    api.app.state.settings.api_key_days = 30
    policy = api.post("/v1/apikeys", headers=admin, json={"role": "pacs"}).json()
    left = datetime.fromisoformat(policy["expires_at"]) - datetime.now(timezone.utc)
    assert 29 < left.total_seconds() / 86400 <= 30
    h = {"Authorization": f"Bearer {made['key']}"}
    assert api.get("/v1/studies", headers=h).status_code == 200  # cached from now on

    # three days later
    later = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=3)
    monkeypatch.setattr(models, "utcnow", lambda: later)
    monkeypatch.setattr(auth, "utcnow", lambda: later)
    r = api.get("/v1/studies", headers=h)
    assert_error(r, 401, "unauthorized")
    assert "expired" in r.json()["error"]["message"] and "new key" in r.json()["error"]["message"]
    assert api.get("/v1/studies", headers=api.h("pacs")).status_code == 200  # no expiry
    inactive = api.get("/v1/apikeys?active=false", headers=admin).json()["data"]
    assert [(k["id"], k["active"]) for k in inactive] == [(made["id"], False)]
    active = {k["id"] for k in api.get("/v1/apikeys?active=true", headers=admin).json()["data"]}
    assert made["id"] not in active and policy["id"] in active
    with api.app.state.session_factory() as s:
        denied = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).all()
        assert denied[-1].detail == {"reason": "expired API key"}


def test_question_announcements_never_leak(sqlite_api):
    """Every question request announces itself to the engine on arrival (so forming batches
    wait for it); whatever its outcome, nothing stays announced afterwards."""
    api = sqlite_api
    engine = api.app.state.engine
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    outcomes = [
        api.post(url, headers=api.h(), json={"question": "Organ?"}).status_code,
        api.post(url + "?stream=true", headers=api.h(), json={"question": "Organ?"}).status_code,
        api.post(url, json={"question": "no key"}).status_code,
        api.post("/v1/studies/nope/questions", headers=api.h(), json={"question": "q"}).status_code,
        api.post(url, headers=api.h(), json={"question": ""}).status_code,
        api.post(
            "/v1/ask",
            headers=api.h(),
            files={"file": ("x.png", png_bytes(), "image/png")},
            data={"question": "Organ?"},
        ).status_code,
    ]
    assert outcomes == [201, 200, 401, 404, 422, 201]
    assert engine._announced == 0 and engine.queue_depth == 0


def test_model_ready_metric_needs_no_readiness_poll(sqlite_api):
    """`tinyllava_med_model_ready` is read at scrape time (alerts work without /readyz calls)."""
    api = sqlite_api
    assert "tinyllava_med_model_ready 1.0" in api.get("/metrics").text
    api.app.state.shutting_down = True
    try:
        assert "tinyllava_med_model_ready 0.0" in api.get("/metrics").text
    finally:
        api.app.state.shutting_down = False
    engine = api.app.state.engine
    engine._batch_started = time.monotonic() - 3600  # a batch hung for an hour
    try:
        assert "tinyllava_med_model_ready 0.0" in api.get("/metrics").text
    finally:
        engine._batch_started = None
    assert "tinyllava_med_model_ready 1.0" in api.get("/metrics").text


def test_a_locked_database_never_stalls_the_event_loop(sqlite_api, sqlite_url):
    """Storing an answer waits for a database locked by another writer (another request's
    transaction, whose commit may itself need the event loop), but never on the event loop:
    meanwhile the server answers others, and the answer is stored once the lock is free."""
    import sqlite3
    import threading

    api = sqlite_api
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    api.post(url, headers=api.h(), json={"question": "Organ?"})  # warm: model, caches
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock():
        db = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(30)
        db.execute("COMMIT")
        db.close()

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    locked.wait(10)
    asked: dict = {}
    asking = threading.Thread(
        target=lambda: asked.update(
            r=api.post(url, headers=api.h(), json={"question": "Lung?", "max_new_tokens": 2})
        )
    )
    asking.start()
    time.sleep(1.0)  # the answer is ready and waits for the lock
    start = time.monotonic()
    assert api.get("/healthz").status_code == 200
    assert time.monotonic() - start < 0.4, "the event loop waited for the database"
    assert asking.is_alive()  # still waiting to store its report
    release.set()
    holder.join()
    asking.join(30)
    assert asked["r"].status_code == 201, asked["r"].text
    with api.app.state.session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Report)) == 2


def test_a_write_is_answered_only_once_committed(api, monkeypatch):
    """A request's transaction commits before its response is sent: a commit that fails
    answers 503 `database_unavailable` (try again), never a success whose write was lost, and
    the report stays as it was. (FastAPI ends dependencies with yield after the response unless
    told otherwise; then a sign-off could answer 200 and be gone.)"""
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import SessionTransaction

    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    rid = api.post(url, headers=api.h(), json={"question": "Organ?", "max_new_tokens": 3}).json()
    rid = rid["id"]
    assert api.get(f"/v1/reports/{rid}", headers=api.h()).status_code == 200  # key cached

    commit = SessionTransaction.commit

    def commit_fails(self, *args, **kwargs):  # the request's own COMMIT; savepoints go on
        if self.nested or self.parent is not None:
            return commit(self, *args, **kwargs)
        raise OperationalError("COMMIT", {}, Exception("database is locked"))

    with monkeypatch.context() as m:
        m.setattr(SessionTransaction, "commit", commit_fails)
        r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"status": "final"})
    assert_error(r, 503, "database_unavailable")
    assert int(r.headers["retry-after"]) >= 1
    report = api.get(f"/v1/reports/{rid}", headers=api.h()).json()
    assert (report["status"], report["signed_by"]) == ("draft", None)
    r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200 and r.json()["status"] == "final"


def test_studies_say_how_many_reports_they_have(api):
    """A study's `reports` counts its reports (listed and read alone), whatever their number."""
    asked, other = upload_ct(api), upload(api, ("a.png", png_bytes(), "image/png")).json()
    for q in ("Organ?", "Modality?", "Normal?"):
        r = api.post(
            f"/v1/studies/{asked['id']}/questions",
            headers=api.h(),
            json={"question": q, "max_new_tokens": 2},
        )
        assert r.status_code == 201, r.text
    assert api.get(f"/v1/studies/{asked['id']}", headers=api.h()).json()["reports"] == 3
    assert api.get(f"/v1/studies/{other['id']}", headers=api.h()).json()["reports"] == 0
    listed = api.get("/v1/studies", headers=api.h()).json()["data"]
    assert {s["id"]: s["reports"] for s in listed} == {asked["id"]: 3, other["id"]: 0}


def _sign_at_once(api, rid: str, texts: tuple[str, ...], status: str | None = "final") -> dict:
    """PATCH `rid` with each text (and `status`), all at the same moment; the responses by
    text."""
    import threading

    start, done = threading.Barrier(len(texts)), {}

    def sign(text: str) -> None:
        start.wait()
        body = {"text": text, **({"status": status} if status else {})}
        done[text] = api.patch(f"/v1/reports/{rid}", headers=api.h(), json=body)

    threads = [threading.Thread(target=sign, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return done


def test_two_sign_offs_at_once_sign_once(api):
    """Two radiologists sign one draft at the same moment, with different texts: one signs, the
    other hears 409 `report_final`; the signed text is the winner's, and the history holds one
    signature. (On SQLite the draft was read without a lock, so both answered 200 and the later
    text replaced the signed one.)"""
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    for _ in range(3):
        asked = api.post(url, headers=api.h(), json={"question": "Organ?", "max_new_tokens": 2})
        rid = asked.json()["id"]
        done = _sign_at_once(api, rid, ("first", "second"))
        codes = {text: r.status_code for text, r in done.items()}
        assert sorted(codes.values()) == [200, 409], codes
        [winner] = [text for text, code in codes.items() if code == 200]
        [loser] = [text for text, code in codes.items() if code == 409]
        assert_error(done[loser], 409, "report_final")
        report = api.get(f"/v1/reports/{rid}", headers=api.h()).json()
        assert (report["status"], report["text"]) == ("final", winner)
        with api.app.state.session_factory() as s:
            edits = s.scalars(select(ReportEdit).where(ReportEdit.report_id == rid)).all()
        assert [(e.new_status, e.new_text) for e in edits] == [("final", winner)]


def test_nobody_signs_a_version_they_have_not_read(api):
    """Dr A reads a draft; Dr B changes it; A's signature sent with A's version (`If-Match`)
    is refused with 412 `report_changed` and nothing changes. Before, A's `{"status": "final"}`
    signed B's text under A's name. Read again, A signs."""
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    asked = api.post(url, headers=api.h(), json={"question": "Organ?", "max_new_tokens": 2})
    report = f"/v1/reports/{asked.json()['id']}"
    read = api.get(report, headers=api.h("radiologist"))
    version = read.json()["version"]
    assert read.headers["ETag"] == f'"{version}"' and version == asked.json()["version"]
    b = api.patch(report, headers=api.h("admin"), json={"text": "B: no acute finding"})
    assert b.status_code == 200 and b.json()["version"] != version
    assert b.headers["ETag"] == f'"{b.json()["version"]}"'
    a = {**api.h("radiologist"), "If-Match": f'"{version}"'}
    for change in ({"status": "final"}, {"text": "A: right"}):
        r = api.patch(report, headers=a, json=change)
        assert_error(r, 412, "report_changed")
        assert r.json()["error"]["detail"]["status"] == "draft"
    now = api.get(report, headers=api.h()).json()
    assert (now["status"], now["text"]) == ("draft", "B: no acute finding")
    fresh = {**api.h("radiologist"), "If-Match": f'W/"{now["version"]}"'}
    signed = api.patch(report, headers=fresh, json={"status": "final"})
    assert signed.status_code == 200 and signed.json()["status"] == "final", signed.text
    # an amendment is held to the signed version alike; `*` or no If-Match: as before
    amend = {"status": "amended", "text": "A: right, amended", "reason": "side"}
    assert_error(api.patch(report, headers=a, json=amend), 412, "report_changed")
    anyone = {**api.h("radiologist"), "If-Match": "*"}
    assert api.patch(report, headers=anyone, json=amend).status_code == 200
    two = {**api.h("radiologist"), "If-Match": '"a", "b"'}
    assert_error(api.patch(report, headers=two, json={"text": "x"}), 400, "bad_if_match")


def test_a_signature_sent_again_is_not_a_conflict(api):
    """A RIS whose signature's answer was lost sends it again: 200, the report as signed, no
    second signature. Another signer, or another text, still hears 409."""
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    asked = api.post(url, headers=api.h(), json={"question": "Organ?", "max_new_tokens": 2})
    report = f"/v1/reports/{asked.json()['id']}"
    sign = {"text": "No acute finding.", "status": "final"}
    first = api.patch(report, headers=api.h("radiologist"), json=sign)
    assert first.status_code == 200, first.text
    once = {**api.h("radiologist"), "If-Match": f'"{asked.json()["version"]}"'}
    for headers in (api.h("radiologist"), once):
        again = api.patch(report, headers=headers, json=sign)
        assert again.status_code == 200 and again.json() == first.json(), again.text
    assert api.patch(report, headers=api.h("radiologist"), json={"status": "final"}).is_success
    assert_error(api.patch(report, headers=api.h("admin"), json=sign), 409, "report_final")
    other = {"text": "Other text.", "status": "final"}
    assert_error(api.patch(report, headers=api.h("radiologist"), json=other), 409, "report_final")
    with api.app.state.session_factory() as s:
        assert len(s.scalars(select(ReportEdit)).all()) == 1  # one signature


def test_edits_at_once_lose_nothing(api):
    """Two edits of one draft at the same moment: each is applied on top of the other (its
    history chains: every edit's previous text is the text before it) or refused with 409
    `report_changed`; none is silently lost."""
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/questions"
    asked = api.post(url, headers=api.h(), json={"question": "Organ?", "max_new_tokens": 2})
    rid, original = asked.json()["id"], asked.json()["text"]
    done = _sign_at_once(api, rid, ("one", "two"), status=None)
    applied = [text for text, r in done.items() if r.status_code == 200]
    for r in done.values():
        if r.status_code != 200:
            assert_error(r, 409, "report_changed")
    with api.app.state.session_factory() as s:
        edits = s.scalars(
            select(ReportEdit).where(ReportEdit.report_id == rid).order_by(ReportEdit.id)
        ).all()
    assert sorted(e.new_text for e in edits) == sorted(applied) and applied
    assert [e.previous_text for e in edits] == [original] + [e.new_text for e in edits[:-1]]
    assert api.get(f"/v1/reports/{rid}", headers=api.h()).json()["text"] == edits[-1].new_text


def test_admin_deletes_a_study_sent_by_mistake(tmp_path, database_url, tiny_lm):
    """A study with draft reports only is deleted with them; one with a signed report stays.
    The files go by a sweep job after the grace period, except those another study holds (the
    same PNG uploaded twice), and so do the engine's cached pixel values of them."""
    overrides = {"image_sweep_grace_s": 0, "job_poll_s": 0.05}
    for api in make_api(tmp_path, database_url, tiny_lm, **overrides):
        admin = api.h("admin")
        wrong, kept = upload_ct(api, new_study=True), upload_png(api)
        signed = upload_ct(api, new_study=True)
        report = api.post(
            f"/v1/studies/{wrong['id']}/questions", headers=api.h(), json={"question": "Organ?"}
        ).json()
        ct_sha = wrong["images"][0]["sha256"]
        png = upload_png(api)  # the same file as `kept`: one stored file
        png_sha = png["images"][0]["sha256"]
        assert png_sha == kept["images"][0]["sha256"]
        api.post(f"/v1/studies/{png['id']}/questions", headers=api.h(), json={"question": "Q?"})
        engine = api.app.state.engine
        assert (png_sha, None) in engine.pixels
        r = api.post(
            f"/v1/studies/{signed['id']}/questions", headers=api.h(), json={"question": "Q"}
        )
        signed_report = r.json()["id"]
        r = api.patch(f"/v1/reports/{signed_report}", headers=api.h(), json={"status": "final"})
        assert r.status_code == 200, r.text

        assert_error(api.delete(f"/v1/studies/{wrong['id']}", headers=api.h()), 403, "forbidden")
        assert_error(
            api.delete(f"/v1/studies/{signed['id']}", headers=admin),
            409,
            "study_has_signed_reports",
        )
        assert api.get(f"/v1/reports/{signed_report}", headers=admin).status_code == 200
        assert_error(api.delete("/v1/studies/nope", headers=admin), 404, "study_not_found")

        assert api.delete(f"/v1/studies/{wrong['id']}", headers=admin).status_code == 204
        assert_error(api.get(f"/v1/studies/{wrong['id']}", headers=admin), 404)
        assert_error(api.get(f"/v1/reports/{report['id']}", headers=admin), 404)
        assert api.get(f"/v1/studies/{signed['id']}/images/0", headers=admin).status_code == 200
        assert api.delete(f"/v1/studies/{png['id']}", headers=admin).status_code == 204

        store = api.app.state.store

        results = wait_for(partial(_done_sweeps, api, 2), timeout_s=30, what="the sweeps")
        # CT: nobody else holds it; PNG: `kept` does
        assert [(r["removed"], r["kept"]) for r in results] == [(1, 0), (0, 1)]
        assert not store.exists(ct_sha) and store.exists(png_sha)
        assert (png_sha, None) in engine.pixels  # `kept` still holds the file

        assert api.delete(f"/v1/studies/{kept['id']}", headers=admin).status_code == 204

        results = wait_for(partial(_done_sweeps, api, 3), timeout_s=30, what="the last sweep")
        assert results[-1]["removed"] == 1
        assert not store.exists(png_sha) and (png_sha, None) not in engine.pixels
        with api.app.state.session_factory() as s:
            events = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.delete"))
            outcomes = {(e.resource_id, e.outcome) for e in events}
        assert (wrong["id"], "ok") in outcomes and (signed["id"], "invalid") in outcomes
        assert (None, "not_found") in outcomes  # "nope": not an id of this server
        # the same file uploaded again is stored again
        again = upload_png(api)
        assert store.exists(png_sha) and again["images"][0]["sha256"] == png_sha


def _done_sweeps(api, n: int) -> list[dict] | None:
    """The results of the sweep jobs, oldest first, once `n` are done."""
    with api.app.state.session_factory() as s:
        jobs = s.scalars(select(Job).where(Job.kind == "sweep_images").order_by(Job.id)).all()
        done = [j.payload["result"] for j in jobs if j.status == "done"]
    return done if len(done) == n else None


def upload_png(api):
    r = upload(api, ("slice.png", png_bytes(color=9), "image/png"))
    assert r.status_code == 201, r.text
    return r.json()


def test_a_server_stopping_mid_job_queues_it_again_without_spending_an_attempt(
    tmp_path, database_url, tiny_lm
):
    """A restart or an upgrade while a job runs longer than the stop's wait (an automatic
    report on a CPU): the job is queued again at once with the attempt it lost, instead of
    waiting out its lease (10 minutes) as `running` and spending one of its attempts, and the
    interrupted attempt's late finish changes nothing."""
    import threading

    from tinyllava_med.server import jobs
    from tinyllava_med.server.db import crud

    for api in make_api(tmp_path, database_url, tiny_lm, job_workers=0, job_poll_s=0.05):
        sessions = api.app.state.session_factory
        started, release, outcome = threading.Event(), threading.Event(), []

        def slow(job, started=started, release=release, sessions=sessions, outcome=outcome):
            started.set()
            release.wait(30)
            with sessions.begin() as s:
                outcome.append(jobs.finish(s, job, {"ok": True}))
                return outcome[-1]

        runner = jobs.JobRunner(api.app, 1)
        runner.handlers["slow"] = slow
        with sessions.begin() as s:
            job = crud.enqueue_job(s, kind="slow", payload={}, max_attempts=3)
            s.flush()
            job_id = job.id
        runner.start()
        assert started.wait(30)
        runner.stop(timeout=0.2)  # the server stops; the job is still running
        with sessions() as s:
            row = s.get(Job, job_id)
            assert (row.status, row.attempts, row.locked_by) == ("queued", 0, None)
        release.set()
        wait_for(lambda outcome=outcome: outcome, what="the interrupted attempt to end")
        assert outcome == ["gone"]
        with sessions() as s:
            assert s.get(Job, job_id).status == "queued"  # for the next server to run


def test_an_automatic_report_given_back_while_the_model_answered_is_not_written(
    tmp_path, sqlite_url, tiny_lm
):
    """The job was given back (the server stopping) or claimed again while its attempt waited
    for the model: that attempt writes no report, so the job's next run writes the only one."""
    from tinyllava_med.server import jobs

    prompts = {"CT": "Describe the findings."}
    overrides = {"job_workers": 0, "auto_report_prompts": prompts, "auto_report_delay_s": 0}
    for api in make_api(tmp_path, sqlite_url, tiny_lm, **overrides):
        sessions = api.app.state.session_factory
        study_id = upload_ct(api)["id"]
        with sessions.begin() as s:  # as a study from the PACS gets (STOW-RS, DIMSE, import)
            study = s.get(Study, study_id)
            assert jobs.schedule_auto_report(s, api.app.state.settings, study) is not None
        with sessions.begin() as s:
            claimed = jobs.claim(s, "w1", lease_s=600)
        assert claimed is not None and claimed.kind == jobs.AUTO_REPORT
        runner = jobs.JobRunner(api.app, workers=0)
        engine, submit = api.app.state.engine, api.app.state.engine.submit

        def give_back_meanwhile(*args, sessions=sessions, claimed=claimed, submit=submit, **kwargs):
            with sessions.begin() as s:
                assert jobs.give_back(s, claimed)
            return submit(*args, **kwargs)

        engine.submit = give_back_meanwhile
        try:
            assert runner._auto_report(claimed) == "gone"
        finally:
            engine.submit = submit
        with sessions() as s:
            assert s.query(Report).count() == 0
            assert s.get(Job, claimed.id).status == "queued"


def test_only_the_claim_that_holds_a_job_finishes_or_fails_it(tmp_path, sqlite_url, tiny_lm):
    """A job deleted with its study while a worker runs it (SQLite may give its id to the
    deletion's own sweep job), or claimed again by another worker after its lease ran out, is
    no longer the first worker's: finishing or failing it changes nothing, the worker lives on,
    and the jobs metric counts the run as gone, not done."""
    from tinyllava_med.server import jobs
    from tinyllava_med.server.db import crud

    for api in make_api(tmp_path, sqlite_url, tiny_lm, job_workers=0):
        sessions = api.app.state.session_factory
        runner = jobs.JobRunner(api.app, workers=0)
        for fails in (True, False):
            study = upload_ct(api)
            with sessions.begin() as s:
                crud.enqueue_job(s, kind="probe", study_id=study["id"])
            with sessions.begin() as s:
                claimed = jobs.claim(s, "w1", lease_s=600)
            assert claimed is not None and claimed.worker == "w1"

            def handler(job, api=api, sessions=sessions, study_id=study["id"], fails=fails):
                r = api.delete(f"/v1/studies/{study_id}", headers=api.h("admin"))
                assert r.status_code == 204, r.text
                if fails:
                    raise RuntimeError("the study is gone")
                with sessions.begin() as s:
                    return jobs.finish(s, job, {"ok": True})

            runner.handlers["probe"] = handler
            runner.run(claimed)  # returns: the worker's loop goes on
            with sessions() as s:
                rows = s.scalars(select(Job)).all()
                # only the sweep jobs are left, queued and untouched, whatever their ids
                assert {(j.kind, j.status, j.attempts, j.last_error) for j in rows} == {
                    ("sweep_images", "queued", 0, None)
                }
        outcomes = {
            sample.labels["outcome"]: sample.value
            for metric in api.app.state.metrics.jobs.collect()
            for sample in metric.samples
            if sample.name.endswith("_total") and sample.labels["kind"] == "probe"
        }
        assert outcomes == {"gone": 2.0}  # neither run is counted as done

        # a lease that ran out: another worker claims the job; the first one's word is void
        with sessions.begin() as s:
            crud.enqueue_job(s, kind="probe")
        with sessions.begin() as s:
            s.execute(update(Job).where(Job.kind == "sweep_images").values(status="done"))
            first = jobs.claim(s, "w1", lease_s=600)
        with sessions.begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == first.id)
                .values(locked_at=utcnow() - timedelta(hours=1))
            )
        with sessions.begin() as s:
            second = jobs.claim(s, "w2", lease_s=600)
        assert second is not None and second.id == first.id
        with sessions.begin() as s:
            assert jobs.finish(s, first, {"late": True}) == "gone"
            assert jobs.fail(s, first, "late", retry_base_s=0) == "gone"
        with sessions() as s:
            row = s.get(Job, first.id)
            assert (row.status, row.locked_by, row.attempts) == ("running", "w2", 2)
        with sessions.begin() as s:
            assert jobs.finish(s, second, {"ok": True}) == "done"
        with sessions() as s:
            assert s.get(Job, first.id).status == "done"


def test_without_keys_the_server_answers_only_this_machines_own_names(tmp_path, tiny_lm):
    """With auth_disabled every caller is an admin, on a loopback address only; but any web
    page the user visits could post to it (no preflight for a form), and a name of an
    attacker's resolving to 127.0.0.1 (DNS rebinding) read everything. Only loopback names are
    answered now, as Host and as Origin."""
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.db import migrate
    from tinyllava_med.server.settings import Settings

    url = f"sqlite:///{tmp_path}/db.db"
    migrate.upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, auth_disabled=True)
    app = create_app(settings, model=tiny_lm)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/v1/studies").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert client.get("/v1/studies", headers={"Host": host}).status_code == 200
        rebound = client.get("/v1/studies", headers={"Host": "rebind.attacker.example:8000"})
        assert_error(rebound, 403, "not_local")
        page = {"Origin": "https://evil.example"}
        posted = client.post("/v1/studies", headers=page, files={"files": ("x.png", png_bytes())})
        assert_error(posted, 403, "not_local")
        ours = client.get("/v1/studies", headers={"Origin": "http://localhost:8000"})
        assert ours.status_code == 200
        explorer = {"Origin": "http://localhost:8042"}  # another local web app: another origin
        assert_error(client.get("/v1/studies", headers=explorer), 403, "not_local")
        assert_error(client.get("/v1/studies", headers={"Host": "127.0.0.1:x"}), 403)
        assert client.get("/v1/studies").json()["count"] == 0


def test_a_model_with_a_long_quantization_label_stores_its_answers(
    tmp_path, database_url, tiny_model_dir
):
    """`quantize --method cpu-int8` gives `cpu-int8+tower+lm_head` (22 characters): PostgreSQL
    refused every report of it (VARCHAR(16)) with a 500."""
    from tinyllava_med.model.load import load_model
    from tinyllava_med.quantize.export import quantize_checkpoint

    lm = load_model(str(quantize_checkpoint(tiny_model_dir, tmp_path / "q", method="cpu-int8")))
    assert lm.info["quantization"] == "cpu-int8+tower+lm_head"
    for api in make_api(tmp_path, database_url, lm):
        study = upload_ct(api)
        r = api.post(
            f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "Organ?"}
        )
        assert r.status_code == 201, r.text
        assert r.json()["quantization"] == "cpu-int8+tower+lm_head"
        r = api.get(f"/v1/reports/{r.json()['id']}", headers=api.h())
        assert r.json()["quantization"] == "cpu-int8+tower+lm_head"


def test_a_body_over_the_limit_is_413_with_or_without_its_length(tmp_path, sqlite_url, tiny_lm):
    """A body over `max_upload_bytes` is 413 payload_too_large whether it declares its length
    or comes in chunks (chunked, it was 400 bad_request: the form parser took the limit's
    signal for a broken body)."""
    for api in make_api(tmp_path, sqlite_url, tiny_lm, max_upload_bytes=100_000):
        ctype = {**api.h(), "Content-Type": "multipart/form-data; boundary=zz"}

        def chunks() -> Iterator[bytes]:
            yield b"--zz\r\nContent-Disposition: form-data; name=files; filename=a.dcm\r\n\r\n"
            for _ in range(30):
                yield b"x" * 10_000

        for body in (b"x" * 200_000, chunks()):
            r = api.post("/v1/studies", content=body, headers=ctype)
            assert_error(r, 413, "payload_too_large")
        metrics = api.get("/metrics").text  # counted as what the client got, not as a 500
        assert 'method="POST",route="/v1/studies",status="500"' not in metrics
        assert 'method="POST",route="/v1/studies",status="413"} 1.0' in metrics
