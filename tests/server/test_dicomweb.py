"""STOW-RS in, the jobs it queues, and the job queue itself (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import threading
import time
from datetime import timedelta

import pydicom
import pytest
from api_helpers import (
    CT_SMALL,
    MR_SMALL,
    assert_error,
    live_server,
    make_api,
    multipart_related,
    png_bytes,
    wait_for,
)
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.encaps import encapsulate
from sqlalchemy import select, update

from tinyllava_med.server.db.models import AuditEvent, Image, Job, Report, Study, utcnow
from tinyllava_med.server.db.session import make_engine, session_factory
from tinyllava_med.server.jobs import claim

CT = CT_SMALL.read_bytes()
MR = MR_SMALL.read_bytes()
PROMPTS = {"CT": "Describe the findings.", "*": "What is the modality?"}


def stow(api, *parts, path="/dicomweb/studies", role="pacs", **kw):
    body, ctype = multipart_related(*parts, **kw)
    return api.post(path, content=body, headers={**api.h(role), "Content-Type": ctype})


def rows(api, model):
    with api.app.state.session_factory() as s:
        return list(s.scalars(select(model)))


def sop_seq(body, tag):
    return [
        tuple(i.get(t, {}).get("Value", [None])[0] for t in ("00081150", "00081155"))
        + (i.get("00081197", {}).get("Value"),)
        for i in body.get(tag, {}).get("Value", [])
    ]


@pytest.fixture
def jobs_api(tmp_path, database_url, tiny_lm):
    yield from make_api(
        tmp_path,
        database_url,
        tiny_lm,
        auto_report_prompts=PROMPTS,
        auto_report_delay_s=0,
        job_poll_s=0.05,
    )


def test_stow_two_studies_then_again(api):
    api = api
    r = stow(api, CT, MR)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    ct, mr = pydicom.dcmread(CT_SMALL), pydicom.dcmread(MR_SMALL)
    assert sop_seq(r.json(), "00081199") == [
        (ct.SOPClassUID, ct.SOPInstanceUID, None),
        (mr.SOPClassUID, mr.SOPInstanceUID, None),
    ]
    # Retrieve URL is Type 2 (PS3.18 Table I.1-1): present, empty (no WADO-RS here)
    assert r.json()["00081190"] == {"vr": "UR"}
    assert [i["00081190"] for i in r.json()["00081199"]["Value"]] == [{"vr": "UR"}] * 2
    studies = {s.StudyInstanceUID: s for s in rows(api, Study)}
    assert set(studies) == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    # the stored bytes are the sent bytes
    store = api.app.state.store
    assert {store.get(i.sha256) for i in rows(api, Image)} == {CT, MR}
    # sending an instance again acknowledges it without a second copy; the study is reused
    r = stow(api, CT, path=f"/dicomweb/studies/{ct.StudyInstanceUID}")
    assert r.status_code == 200 and len(rows(api, Image)) == 2 and len(rows(api, Study)) == 2
    # no prompts configured: no jobs
    assert rows(api, Job) == []


def _instances_of_one_study(n: int) -> list[bytes]:
    """`n` instances (distinct SOP Instance UIDs) of one new study."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        buf = io.BytesIO()
        ds.save_as(buf)
        out.append(buf.getvalue())
    return out


def _send_in_parallel(api, files: list[bytes]) -> None:
    """STOW each file in a request of its own, all at once; each must be stored (200), all of
    them in one study numbered 0..n-1."""
    uid = pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID
    start, statuses = threading.Barrier(len(files)), []

    def send(data: bytes) -> None:
        start.wait()
        statuses.append(stow(api, data).status_code)

    threads = [threading.Thread(target=send, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * len(files)
    studies = [s for s in rows(api, Study) if s.StudyInstanceUID == uid]
    assert len(studies) == 1
    numbers = sorted(i.n for i in rows(api, Image) if i.study_id == studies[0].id)
    assert numbers == list(range(len(files)))


def test_concurrent_stows_of_one_study_make_one_study(api):
    """A PACS sending a study's instances in parallel requests: every request is stored (no
    5xx), in one study, numbered 0..n-1 without gaps or clashes. Before, each request that
    found no study yet made its own: 12 requests, 9-12 studies."""
    _send_in_parallel(api, _instances_of_one_study(12))


def test_processes_sharing_the_database_make_one_study(
    tmp_path, database_url, tiny_lm, monkeypatch
):
    """The same without the process's lock, as for processes sharing the database: server
    processes on one PostgreSQL database (its advisory locks), or `tinyllava-med import` beside
    the server on the SQLite default (its write lock taken before the lookup; before, 12
    requests made 2-4 studies)."""
    import contextlib

    import tinyllava_med.server.ingest as ingest

    monkeypatch.setattr(ingest, "_STORING", contextlib.nullcontext())
    for api in make_api(tmp_path, database_url, tiny_lm):
        _send_in_parallel(api, _instances_of_one_study(12))


def test_stow_partial_mismatch_and_bad_requests(api):
    api = api
    r = stow(api, CT, b"DICM not really")
    assert r.status_code == 202, r.text
    body = r.json()
    assert len(sop_seq(body, "00081199")) == 1
    assert [f[2] for f in sop_seq(body, "00081198")] == [[0xC000]]

    # an instance of another study than the URL names: nothing stored, 409
    r = stow(api, MR, path="/dicomweb/studies/1.2.3.4")
    assert r.status_code == 409, r.text
    assert [f[2] for f in sop_seq(r.json(), "00081198")] == [[0xA900]]
    assert len(rows(api, Image)) == 1

    h = api.h("pacs")
    form = api.post("/dicomweb/studies", files={"file": ("ct.dcm", CT)}, headers=h)
    assert_error(form, 415, "unsupported_media_type")
    assert_error(stow(api, CT, part_type="image/png"), 415, "unsupported_media_type")
    ctype = 'multipart/related; type="application/dicom+json"; boundary=x'
    assert_error(
        api.post("/dicomweb/studies", content=b"--x--", headers={**h, "Content-Type": ctype}),
        415,
    )
    no_boundary = {**h, "Content-Type": 'multipart/related; type="application/dicom"'}
    assert_error(api.post("/dicomweb/studies", content=b"x", headers=no_boundary), 400)
    garbage = {**h, "Content-Type": "multipart/related; boundary=zz"}
    assert_error(api.post("/dicomweb/studies", content=b"no parts", headers=garbage), 400)
    # Content-Types the multipart parser cannot take (they were 500s): a boundary over its
    # 256 bytes, bytes that are not UTF-8 in a parameter or the media type
    for bad in (
        'multipart/related; type="application/dicom"; boundary=' + "b" * 257,
        b'multipart/related; type="application/dicom"; boundary=\xff',
    ):
        r = api.post("/dicomweb/studies", content=b"--b--", headers={**h, "Content-Type": bad})
        assert_error(r, 400, "bad_multipart")
    odd_media = {**h, "Content-Type": b"multipart/related\xe9; boundary=b"}
    assert_error(api.post("/dicomweb/studies", content=b"--b--", headers=odd_media), 415)
    # a client asking for the XML response (dcm4che's stowrs by default) gets it in JSON: its
    # images are stored, not refused over the reply's format
    body, ctype = multipart_related(CT)
    r = api.post(
        "/dicomweb/studies",
        content=body,
        headers={**h, "Content-Type": ctype, "Accept": "application/dicom+xml"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json", r.text
    # more parts than max_files_per_upload (64): refused as the 65th begins, before the rest
    # of the body is split (a malformed header after it would otherwise answer 400)
    many = b"--b\r\n\r\n\r\n" * 65 + b"--b\r\n\x00bad\r\n\r\n"
    ctype = {**h, "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    refused = api.post("/dicomweb/studies", content=many, headers=ctype)
    assert_error(refused, 413, "too_many_files")
    assert refused.json()["error"]["message"] == "at most 64 instances per request, got more"
    # a PNG is not a DICOM instance
    r = stow(api, png_bytes())
    assert r.status_code == 409 and [f[2] for f in sop_seq(r.json(), "00081198")] == [[0xC000]]
    # an instance without pixels (an SR, a PDF) or in a transfer syntax nothing here decodes:
    # the sender learns which instance, and that resending will not help
    report, odd = pydicom.dcmread(io.BytesIO(MR)), pydicom.dcmread(io.BytesIO(MR))
    del report.PixelData
    report.SOPInstanceUID, odd.SOPInstanceUID = (
        "1.2.826.0.1.3680043.8.498.5",
        "1.2.826.0.1.3680043.8.498.6",
    )
    odd.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here
    odd.PixelData = encapsulate([b"\0" * 64])
    parts = []
    for ds in (report, odd):
        out = io.BytesIO()
        ds.save_as(out)
        parts.append(out.getvalue())
    r = stow(api, *parts)
    assert r.status_code == 409, r.text
    assert sop_seq(r.json(), "00081198") == [
        (str(report.SOPClassUID), report.SOPInstanceUID, [0x0122]),
        (str(odd.SOPClassUID), odd.SOPInstanceUID, [0xC122]),
    ]
    # to another study's URL, each is first of all not of that study (PS3.18: 0xA900; the
    # object without pixels was 0x0122)
    r = stow(api, *parts, path="/dicomweb/studies/1.2.3.4")
    assert r.status_code == 409, r.text
    assert [f[2] for f in sop_seq(r.json(), "00081198")] == [[0xA900], [0xA900]]
    body, ctype = multipart_related(CT)
    assert (
        api.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code
        == 401
    )
    assert len(rows(api, Image)) == 1  # nothing lost, nothing added


def test_stow_queues_an_automatic_report(jobs_api):
    api = jobs_api
    r = stow(api, CT)
    assert r.status_code == 200
    jobs = rows(api, Job)
    assert len(jobs) == 1 and jobs[0].kind == "auto_report"  # durable before the response
    assert jobs[0].payload["question"] == PROMPTS["CT"]

    def done():
        body = api.get(f"/v1/jobs/{jobs[0].id}", headers=api.h()).json()
        return body if body["status"] == "done" else None

    job = wait_for(done, what="the automatic report")
    assert job["attempts"] == 1 and job["last_error"] is None
    report = api.get(f"/v1/reports/{job['result']['report_id']}", headers=api.h()).json()
    assert report["question"] == "Describe the findings." and report["status"] == "draft"
    assert report["study_id"] == jobs[0].study_id
    listed = api.get("/v1/jobs?status=done&kind=auto_report", headers=api.h()).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == job["id"]
    (stored,) = rows(api, Report)
    assert stored.created_by == f"job:{job['id']}"
    assert_error(api.get("/v1/jobs/999999", headers=api.h()), 404, "job_not_found")
    assert api.get("/v1/jobs").status_code == 401
    # a job shows its study and result: reading it is audited as a study read
    reads = {e.action: e for e in rows(api, AuditEvent) if e.action.startswith("job.")}
    assert reads["job.read"].resource_id == str(job["id"])
    assert reads["job.read"].detail == {"studies": [jobs[0].study_id]}
    assert reads["job.list"].detail == {
        "studies": [jobs[0].study_id],
        "count": 1,
        "filters": ["status", "kind"],
        "jobs": [job["id"]],
    }


def test_a_study_sent_in_pieces_gets_one_job(tmp_path, sqlite_url, tiny_lm):
    for api in make_api(
        tmp_path, sqlite_url, tiny_lm, auto_report_prompts=PROMPTS, auto_report_delay_s=30
    ):
        ds = pydicom.dcmread(CT_SMALL)
        assert stow(api, CT).status_code == 200
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        second = io.BytesIO()
        pydicom.dcmwrite(second, ds, enforce_file_format=True)
        assert stow(api, second.getvalue()).status_code == 200
        jobs = rows(api, Job)
        assert len(jobs) == 1 and jobs[0].status == "queued"
        assert len(rows(api, Image)) == 2


def test_failed_jobs_are_retried_then_failed(tmp_path, sqlite_url, tiny_lm):
    for api in make_api(
        tmp_path,
        sqlite_url,
        tiny_lm,
        auto_report_prompts=PROMPTS,
        auto_report_delay_s=0.5,
        job_poll_s=0.05,
        job_retry_base_s=0,
        job_max_attempts=2,
    ):
        assert stow(api, CT).status_code == 200
        (image,) = rows(api, Image)
        # the file is gone, and so is the rendering the upload cached: rendering fails
        api.app.state.store.path(image.sha256).unlink()
        api.app.state.store.rendered.clear()

        def failed(api=api):
            (job,) = rows(api, Job)
            return job if job.status == "failed" else None

        job = wait_for(failed, what="the job to fail")
        assert job.attempts == 2 and "image file is missing" in job.last_error
        assert rows(api, Report) == []
        text = api.get("/metrics").text
        assert 'tinyllava_med_jobs_total{kind="auto_report",outcome="retry"} 1.0' in text
        assert 'tinyllava_med_jobs_total{kind="auto_report",outcome="failed"} 1.0' in text


def test_queued_jobs_survive_a_restart(tmp_path, sqlite_url, tiny_lm):
    common = {"auto_report_prompts": PROMPTS, "auto_report_delay_s": 0, "job_poll_s": 0.05}
    for api in make_api(tmp_path, sqlite_url, tiny_lm, job_workers=0, **common):
        assert stow(api, CT).status_code == 200
        keys = api.keys
    # the first server stopped with its job still queued; a new one picks it up
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url, **common)
    with TestClient(create_app(settings, model=tiny_lm)) as client:
        h = {"Authorization": f"Bearer {keys['pacs']}"}
        job = wait_for(
            lambda: next(
                (
                    j
                    for j in client.get("/v1/jobs", headers=h).json()["data"]
                    if j["status"] == "done"
                ),
                None,
            ),
            what="the queued job after the restart",
        )
        assert job["result"]["report_id"]


def test_jobs_a_stopped_server_left_running_are_due_when_serve_starts_alone(tmp_path, tiny_lm):
    """A job whose server was killed mid-run stayed `running` for its lease (10 minutes) after
    the restart. A `serve` that starts alone on its SQLite database's data directory makes
    every such job due at once; with another process on it, they wait for their lease."""
    import fcntl
    import os

    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.db.migrate import upgrade
    from tinyllava_med.server.settings import Settings
    from tinyllava_med.server.storage import IN_USE_LOCK

    def left_running(data) -> tuple[int, Settings]:
        data.mkdir()
        url = f"sqlite:///{data}/tinyllava_med.db"
        upgrade(url)
        engine = make_engine(url)
        try:
            with session_factory(engine).begin() as s:
                job = Job(kind="noop", status="running", locked_by="h:1:0", locked_at=utcnow())
                s.add(job)
                s.flush()
                job_id = job.id
        finally:
            engine.dispose()
        return job_id, Settings(data_dir=data, database_url=url, job_workers=0)

    def due(settings: Settings, job_id: int) -> bool:
        engine = make_engine(settings.database_url)
        try:
            with session_factory(engine)() as s:
                return s.get(Job, job_id).locked_at < utcnow() - timedelta(minutes=10)
        finally:
            engine.dispose()

    job, settings = left_running(tmp_path / "alone")
    with TestClient(create_app(settings, model=tiny_lm, own_process=True)):
        pass
    assert due(settings, job)

    job, settings = left_running(tmp_path / "shared")
    other = os.open(settings.data_dir / IN_USE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_SH)  # another server on the directory
    try:
        with TestClient(create_app(settings, model=tiny_lm, own_process=True)):
            pass
    finally:
        os.close(other)
    assert not due(settings, job)


def test_claim_takes_each_job_once_and_reclaims_dead_workers(migrated_url):
    engine = make_engine(migrated_url)
    sessions = session_factory(engine)
    try:
        with sessions.begin() as s:
            s.add_all(Job(kind="noop", payload={"n": i}) for i in range(40))
        claimed: list[int] = []
        lock = threading.Lock()

        def worker(name: str) -> None:
            while True:
                with sessions.begin() as s:
                    job = claim(s, name, lease_s=600)
                if job is None:
                    with sessions() as s:
                        if s.scalar(select(Job.id).where(Job.status == "queued").limit(1)) is None:
                            return
                    continue
                with lock:
                    claimed.append(job.id)

        threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 40

        # a running job whose worker went silent past the lease is claimed again
        first = min(claimed)
        with sessions.begin() as s:
            s.execute(
                update(Job).where(Job.id == first).values(locked_at=utcnow() - timedelta(hours=1))
            )
        with sessions.begin() as s:
            again = claim(s, "w-new", lease_s=600)
        assert again is not None and again.id == first and again.attempts == 2
        with sessions() as s:
            assert s.get(Job, first).locked_by == "w-new"
    finally:
        engine.dispose()


def test_dicomweb_client_against_a_live_server(tmp_path, sqlite_url, tiny_lm):
    """The dicomweb-client library (what many PACS bridges use) stores through our endpoint."""
    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.db.migrate import upgrade
    from tinyllava_med.server.settings import Settings

    upgrade(sqlite_url)
    app = create_app(
        Settings(data_dir=tmp_path / "d", database_url=sqlite_url, auth_disabled=True),
        model=tiny_lm,
    )
    with live_server(app) as base:
        client = DICOMwebClient(url=f"{base}/dicomweb")
        result: Dataset = client.store_instances([pydicom.dcmread(CT_SMALL)])
        assert (
            result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == pydicom.dcmread(CT_SMALL).SOPInstanceUID
        )


@pytest.mark.postgres
def test_two_servers_share_one_postgres_queue(tmp_path, postgres_url, tiny_lm):
    """Two server instances (own engines, pools and workers) on one PostgreSQL: every study's
    job runs exactly once."""
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.db.migrate import upgrade
    from tinyllava_med.server.settings import Settings

    upgrade(postgres_url)
    common = dict(
        database_url=postgres_url,
        auto_report_prompts=PROMPTS,
        auto_report_delay_s=0.3,
        job_poll_s=0.02,
        job_workers=2,
        auth_disabled=True,
    )
    apps = [
        create_app(Settings(data_dir=tmp_path / "shared", **common), model=tiny_lm)
        for _ in range(2)
    ]
    local = "http://127.0.0.1"  # auth_disabled answers loopback names only
    with TestClient(apps[0], base_url=local) as a, TestClient(apps[1], base_url=local) as b:
        ds = pydicom.dcmread(CT_SMALL)
        for i in range(6):
            ds.StudyInstanceUID = pydicom.uid.generate_uid()
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            body, ctype = multipart_related(buf.getvalue())
            client = (a, b)[i % 2]
            r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text

        def all_done():
            jobs = a.get("/v1/jobs").json()["data"]
            return jobs if len(jobs) == 6 and all(j["status"] == "done" for j in jobs) else None

        jobs = wait_for(all_done, what="six jobs on two servers")
        assert all(j["attempts"] == 1 for j in jobs)
        reports = a.get("/v1/reports?limit=100").json()
        assert reports["count"] == 6
        assert len({r["study_id"] for r in reports["data"]}) == 6


def test_retrieve_needs_a_key_a_body_and_a_pacs(api):
    """The Orthanc test covers the retrieve itself; here what is refused before the PACS."""
    body = {"accession_number": "ACC-1"}
    assert_error(api.post("/v1/studies/retrieve", json=body), 401)
    assert_error(api.post("/v1/studies/retrieve", json={}, headers=api.h("pacs")), 422)
    r = api.post("/v1/studies/retrieve", json=body, headers=api.h("pacs"))
    assert_error(r, 501, "pacs_not_configured")
    assert not rows(api, Job)


def test_a_retrieve_never_asks_the_pacs_for_more_than_a_few_studies(api, monkeypatch):
    """A C-FIND or QIDO-RS reads *, ? and \\ in an accession number as wildcards and lists, and
    blanks as "any": such a value (a typo, a test) would queue one retrieve per match, half the
    archive's patients onto a small server. They are refused before the PACS is asked, and a
    search that still finds more than MAX_RETRIEVE_STUDIES queues nothing."""
    from tinyllava_med.server.routes import studies

    asked: list[str] = []

    def pacs(settings, accession_number=None, study_uid=None):
        asked.append(accession_number)
        return [f"1.2.3.{i}" for i in range(studies.MAX_RETRIEVE_STUDIES + 1)]

    monkeypatch.setattr(studies, "find_studies", pacs)
    api.app.state.settings = api.app.state.settings.model_copy(
        update={"dicomweb_pull_url": "http://pacs.invalid/dicom-web"}
    )
    for value in ("*", "ACC*", "AC?1", "ACC1\\ACC2", "   ", "ACC\x001"):
        r = api.post(
            "/v1/studies/retrieve", json={"accession_number": value}, headers=api.h("pacs")
        )
        assert_error(r, 422, "invalid_request")
        if value == "*":  # says why
            assert "wildcards" in r.json()["error"]["detail"][0]["msg"], r.text
    assert asked == []
    r = api.post("/v1/studies/retrieve", json={"accession_number": "ACC-1"}, headers=api.h("pacs"))
    assert_error(r, 409, "too_many_studies")
    assert asked == ["ACC-1"] and not rows(api, Job)


def test_a_study_being_retrieved_is_not_queued_twice(tmp_path, database_url, tiny_lm, monkeypatch):
    """A second retrieve of a study whose retrieve is queued or running answers that job; once
    it is done, a new retrieve queues a new one. Before, every click queued a whole study's
    download again."""
    from tinyllava_med.server.routes import studies

    monkeypatch.setattr(studies, "find_studies", lambda settings, **query: ["1.2.3.4"])
    pacs = {"dicomweb_pull_url": "http://pacs.invalid/dicom-web", "job_workers": 0}
    for api in make_api(tmp_path, database_url, tiny_lm, **pacs):
        ask = {"study_instance_uid": "1.2.3.4"}
        first = api.post("/v1/studies/retrieve", json=ask, headers=api.h("pacs")).json()
        again = api.post("/v1/studies/retrieve", json=ask, headers=api.h("pacs")).json()
        assert again == first and len(rows(api, Job)) == 1
        with api.app.state.session_factory.begin() as s:
            s.get(Job, first["jobs"][0]).status = "running"
        assert api.post("/v1/studies/retrieve", json=ask, headers=api.h("pacs")).json() == first
        with api.app.state.session_factory.begin() as s:
            s.get(Job, first["jobs"][0]).status = "done"
        later = api.post("/v1/studies/retrieve", json=ask, headers=api.h("pacs")).json()
        assert later["jobs"] != first["jobs"] and len(rows(api, Job)) == 2


@pytest.fixture
def no_model_api(tmp_path, sqlite_url):
    yield from make_api(
        tmp_path,
        sqlite_url,
        None,  # "tiny" is no checkpoint here: loading fails
        auto_report_prompts=PROMPTS,
        auto_report_delay_s=0,
        image_sweep_grace_s=0,
        job_poll_s=0.05,
    )


def test_jobs_that_need_no_model_run_while_it_cannot_answer(no_model_api):
    """The model failed to load: the automatic report waits for it, but a deleted study's file
    sweep (like SR pushes and retrieves) runs. Before, every job waited for the model."""
    from tinyllava_med.server import jobs

    api = no_model_api
    wait_for(lambda: api.app.state.load_error, what="the model load to fail")
    assert stow(api, CT).status_code == 200
    study = rows(api, Study)[0].id
    (image,) = rows(api, Image)
    path = api.app.state.store.path(image.sha256)
    assert path.exists()
    assert api.delete(f"/v1/studies/{study}", headers=api.h("admin")).status_code == 204
    wait_for(lambda: not path.exists(), what="the sweep job to remove the file")
    # the job removes the file, then commits itself done: wait for that too (the study's auto
    # report went with the study)
    done = {jobs.SWEEP_IMAGES: "done"}
    wait_for(lambda: {j.kind: j.status for j in rows(api, Job)} == done, what="the job done")

    assert stow(api, MR).status_code == 200  # a new study: its report waits for the model
    time.sleep(0.5)
    auto = [j.status for j in rows(api, Job) if j.kind == jobs.AUTO_REPORT]
    assert auto == ["queued"]


def test_a_retrieve_that_fails_halfway_audits_what_it_stored(api, monkeypatch):
    """A DICOMweb retrieve commits its instances in batches; when the PACS goes away halfway,
    the batches already stored are each in the audit log (before, only a finished retrieve
    wrote an event, so a job that failed for good left stored instances unaudited)."""
    from pydicom.uid import generate_uid

    from tinyllava_med.server import pull
    from tinyllava_med.server.db.models import AuditEvent
    from tinyllava_med.server.jobs import retrieve_audit

    settings = api.app.state.settings.model_copy(
        update={"dicomweb_pull_url": "http://pacs.invalid/dicom-web"}
    )
    uid = generate_uid()

    class PacsThatDrops:  # the WADO-RS stream of a study's slices breaks after 20
        def iter_study(self, study_uid, media_types=None):
            assert media_types == (("application/dicom", "*"),)  # as the PACS stores them
            assert study_uid == uid
            for i in range(pull.BATCH + 4):
                ds = pydicom.dcmread(CT_SMALL)
                ds.StudyInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
                ds.InstanceNumber = i + 1
                if i == 3:  # a report in the study (a dose SR, this server's own): no image
                    del ds.PixelData, ds.Rows, ds.Columns
                    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
                yield ds
            raise ConnectionError("the PACS went away")

    monkeypatch.setattr(pull, "client", lambda settings, timeout_s: PacsThatDrops())
    sessions, store = api.app.state.session_factory, api.app.state.store
    with pytest.raises(ConnectionError):
        pull.retrieve_study(settings, sessions, store, uid, retrieve_audit())
    with sessions() as s:
        study = s.scalars(select(Study).where(Study.StudyInstanceUID == uid)).one()
        assert s.query(Image).filter(Image.study_id == study.id).count() == pull.BATCH - 1
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "study.retrieve_store")
        ).all()
    # the SR is skipped, as the retrieve's result says, not counted as a failure
    assert [
        (e.actor, e.resource_id, e.detail["stored"], e.detail["failed"], e.detail["skipped"])
        for e in events
    ] == [("system", study.id, pull.BATCH - 1, 0, 1)]


def test_the_automatic_report_is_about_the_middle_of_the_largest_series():
    """Not the middle of all images in arrival order: a CT's scout and dose screen are series
    of their own, and a PACS may send them first (the middle of 1 + 1 + 3 was the axial's first
    slice, or with more screens a screen)."""
    from tinyllava_med.server.db.models import Image
    from tinyllava_med.server.jobs import report_image

    def image(n: int, series: str | None, kind: str = "dicom") -> Image:
        return Image(n=n, kind=kind, SeriesInstanceUID=series)

    scout, dose = image(0, "scout"), image(1, "dose")
    axial = [image(i, "axial") for i in range(2, 5)]
    screens = [image(i, f"screen{i}") for i in range(5, 8)]
    assert report_image([scout, dose, *axial]) is axial[1]
    assert report_image([*screens, scout, *axial[:2]]) is axial[1]  # 2 slices: the second
    pngs = [image(i, None, "png") for i in range(3)]
    assert report_image(pngs) is pngs[1]
    with pytest.raises(LookupError):
        report_image([])
