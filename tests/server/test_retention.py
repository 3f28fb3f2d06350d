"""Image retention (`image_retention_days`, `retention.py`): old studies without drafts give up
their pixel data, keep their reports and SRs, and get their images back when the study arrives
again; on SQLite and PostgreSQL."""

from __future__ import annotations

import errno
import io
from datetime import timedelta

import pydicom
import pytest
from api_helpers import (
    CT_SMALL,
    MR_SMALL,
    assert_error,
    ct_of_new_study,
    ct_with,
    make_api,
    make_old,
    multipart_related,
    png_bytes,
    upload,
    wait_for,
)
from sqlalchemy import select, update

from tinyllava_med.server import retention
from tinyllava_med.server.backup import backup
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import AuditEvent, Image, Job, Report, Study, utcnow
from tinyllava_med.server.retention import (
    RELEASE_EVERY_S,
    due_studies,
    release_due,
    release_study,
)
from tinyllava_med.server.storage import ImageStore


@pytest.fixture
def api(tmp_path, database_url, tiny_lm):
    yield from make_api(
        tmp_path, database_url, tiny_lm, image_retention_days=30, image_sweep_grace_s=0
    )


def _study(api, name, data, ctype):
    r = upload(api, (name, data, ctype))
    assert r.status_code == 201, r.text
    return r.json()


def _ask(api, study_id):
    r = api.post(f"/v1/studies/{study_id}/questions", headers=api.h(), json={"question": "?"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_old_studies_release_their_pixels_and_get_them_back(api, tmp_path):
    sessions, store = api.app.state.session_factory, api.app.state.store
    settings = api.app.state.settings
    signed = _study(api, "ct.dcm", CT_SMALL.read_bytes(), "application/dicom")
    report = _ask(api, signed["id"])
    r = api.patch(f"/v1/reports/{report}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    drafted = _study(api, "mr.dcm", MR_SMALL.read_bytes(), "application/dicom")
    _ask(api, drafted["id"])  # a draft: someone may still be reading it
    unread = _study(api, "x.dcm", ct_of_new_study(), "application/dicom")
    waiting = _study(api, "y.dcm", ct_of_new_study(), "application/dicom")
    with sessions.begin() as s:  # its automatic report is still queued (the model was down)
        crud.enqueue_job(s, kind="auto_report", study_id=waiting["id"]).run_after = (
            utcnow() + timedelta(days=1)
        )
    # a PNG is in no PACS: nothing could bring it back, so it is never released
    photo = _study(api, "x.png", png_bytes(), "image/png")
    old = utcnow() - timedelta(days=31)
    with sessions.begin() as s:
        make_old(
            s,
            old,
            [signed["id"], drafted["id"], unread["id"], waiting["id"], photo["id"]],
            store=api.app.state.store,
        )
    ct_sha, unread_sha = signed["images"][0]["sha256"], unread["images"][0]["sha256"]

    result = release_due(sessions, store, settings)
    assert (result["studies"], result["images"]) == (2, 2)
    assert sorted(result["hashes"]) == sorted([ct_sha, unread_sha])
    assert not store.exists(ct_sha) and not store.exists(unread_sha)
    assert store.exists(photo["images"][0]["sha256"])
    assert release_due(sessions, store, settings)["studies"] == 0  # nothing left to do

    for study in (signed, unread):
        r = api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h())
        assert_error(r, 410, "image_released")
        assert "retrieve it" in r.json()["error"]["message"]
        r = api.post(
            f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "?"}
        )
        assert_error(r, 410, "image_released")
    r = api.post(f"/v1/studies/{signed['id']}/images/0/prepare", headers=api.h())
    assert_error(r, 410, "image_released")
    for study in (drafted, waiting, photo):
        assert api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h()).status_code == 200
    listed = api.get(f"/v1/studies/{signed['id']}", headers=api.h()).json()
    assert listed["images"][0]["released_at"] and listed["report_status"] == "signed"

    # the signed report's SR is still built, from the header kept
    r = api.get(f"/v1/reports/{report}/sr", headers=api.h())
    assert r.status_code == 200, r.text
    sr = pydicom.dcmread(io.BytesIO(r.content))
    assert sr.PatientName == pydicom.dcmread(CT_SMALL).PatientName

    # a backup holds what the database refers to: held files (MR, the waiting CT, the PNG) and
    # the released images' headers
    done = backup(settings, tmp_path / "backup", actor="test")
    assert done.complete and done.files_copied == 5

    # another patient's object under the same UIDs does not take the released image's place
    # behind the signed report (its SR would then name that patient); nor does an object of
    # another class (an MR image under the CT's UIDs)
    mr_class = "1.2.840.10008.5.1.4.1.1.4"
    for other in (ct_with(PatientID="OTHER-PATIENT"), ct_with(SOPClassUID=mr_class)):
        body, ctype = multipart_related(other)
        r = api.post(
            "/dicomweb/studies", content=body, headers={**api.h("pacs"), "Content-Type": ctype}
        )
        assert r.status_code == 409, r.text
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]
        listed = api.get(f"/v1/studies/{signed['id']}", headers=api.h()).json()
        assert listed["images"][0]["released_at"]
    assert "OTHER-PATIENT" not in r.text

    # the PACS sends the study again: the image is back under its row, no new automatic report
    body, ctype = multipart_related(CT_SMALL.read_bytes())
    r = api.post(
        "/dicomweb/studies", content=body, headers={**api.h("pacs"), "Content-Type": ctype}
    )
    assert r.status_code == 200, r.text
    r = api.get(f"/v1/studies/{signed['id']}/images/0", headers=api.h())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with sessions() as s:
        image = s.scalars(select(Image).where(Image.study_id == signed["id"])).one()
        assert image.released_at is None and store.exists(image.sha256)
        assert s.query(Study).count() == 5  # filed into the same study, not a new one
    # and it stays for another retention period, though the study arrived long ago
    assert release_due(sessions, store, settings)["studies"] == 0
    assert api.get(f"/v1/studies/{signed['id']}/images/0", headers=api.h()).status_code == 200


def test_a_released_study_uploaded_again_gets_its_image_back(api):
    """Someone uploads the released study again (from a CD, a workstation): its image is back
    under its row in the same study, where its report is; another patient's object under its
    UIDs, or another class, is refused (409) and leaves it released."""
    sessions, store = api.app.state.session_factory, api.app.state.store
    study = _study(api, "ct.dcm", CT_SMALL.read_bytes(), "application/dicom")
    _ask(api, study["id"])
    with sessions.begin() as s:
        s.execute(update(Report).values(status="final"))
        make_old(s, utcnow() - timedelta(days=31), store=api.app.state.store)
    assert release_due(sessions, store, api.app.state.settings)["images"] == 1

    other_patient = ct_with(PatientID="OTHER-PATIENT")
    assert_error(
        upload(api, ("x.dcm", other_patient, "application/dicom")), 409, "patient_mismatch"
    )
    other_class = ct_with(SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    r = upload(api, ("x.dcm", other_class, "application/dicom"))
    assert_error(r, 409, "instance_conflict")
    assert "OTHER-PATIENT" not in r.text
    assert_error(api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h()), 410)

    again = _study(api, "ct.dcm", CT_SMALL.read_bytes(), "application/dicom")  # 201: restored
    assert again["id"] == study["id"] and again["reports"] == 1
    assert again["images"][0]["released_at"] is None
    r = api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with sessions() as s:
        assert s.query(Study).count() == 1 and s.query(Image).count() == 1


def test_drafts_nobody_changes_release_their_study_with_draft_days(tmp_path, database_url, tiny_lm):
    """`image_retention_draft_days`: a draft left untouched that long (an automatic report at a
    site that signs on its RIS) no longer keeps its study; a draft changed since, even one
    changed between the choice and the release, does. The reports stay drafts."""
    for api in make_api(
        tmp_path,
        database_url,
        tiny_lm,
        image_retention_days=30,
        image_retention_draft_days=14,
        image_sweep_grace_s=0,
    ):
        sessions, store = api.app.state.session_factory, api.app.state.store
        settings = api.app.state.settings
        forgotten, read, racing = (
            _study(api, "x.dcm", ct_of_new_study(), "application/dicom") for _ in range(3)
        )
        drafts = {s["id"]: _ask(api, s["id"]) for s in (forgotten, read, racing)}
        now = utcnow()
        with sessions.begin() as s:
            make_old(s, now - timedelta(days=60), store=api.app.state.store)
            for study, days in ((forgotten, 20), (read, 3), (racing, 20)):
                s.execute(
                    update(Report)
                    .where(Report.id == drafts[study["id"]])
                    .values(updated_at=now - timedelta(days=days))
                )
        with sessions() as s:
            due = due_studies(s, settings, utcnow())
        assert set(due) == {forgotten["id"], racing["id"]}
        # the radiologist opens and edits the racing study's draft before the run gets to it
        r = api.patch(f"/v1/reports/{drafts[racing['id']]}", headers=api.h(), json={"text": "x"})
        assert r.status_code == 200, r.text
        with sessions.begin() as s:
            assert release_study(s, store, racing["id"], settings, utcnow(), {}) == []

        result = release_due(sessions, store, settings)
        assert (result["studies"], result["images"]) == (1, 1)
        assert not store.exists(forgotten["images"][0]["sha256"])
        r = api.get(f"/v1/studies/{forgotten['id']}/images/0", headers=api.h())
        assert_error(r, 410, "image_released")
        for study in (read, racing):
            r = api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h())
            assert r.status_code == 200, r.text
        report = api.get(f"/v1/reports/{drafts[forgotten['id']]}", headers=api.h()).json()
        assert report["status"] == "draft"  # it can still be signed; the SR needs no pixels


def test_draft_days_need_retention_days(tmp_path):
    from tinyllava_med.server.settings import Settings

    with pytest.raises(ValueError, match="image_retention_draft_days needs image_retention_days"):
        Settings(data_dir=tmp_path, image_retention_draft_days=14)
    assert (
        Settings(data_dir=tmp_path, image_retention_draft_days="").image_retention_draft_days
        is None
    )


def test_the_release_runs_as_a_job_and_queues_the_next(api):
    sessions = api.app.state.session_factory

    def first_done():
        with sessions() as s:
            return s.scalars(
                select(Job).where(Job.kind == "release_images", Job.status == "done")
            ).first()

    done = wait_for(first_done, what="the first release run, queued at start")
    assert done.payload["result"]["studies"] == 0
    with sessions() as s:
        following = s.get(Job, done.payload["result"]["next"])
        assert following.status == "queued"
        wait = (following.run_after - utcnow()).total_seconds()
        assert RELEASE_EVERY_S - 120 < wait <= RELEASE_EVERY_S

    # an old signed study, and the next run brought forward: its images are released and
    # counted for Prometheus
    study = _study(api, "x.dcm", ct_of_new_study(), "application/dicom")
    r = api.patch(
        f"/v1/reports/{_ask(api, study['id'])}", headers=api.h(), json={"status": "final"}
    )
    assert r.status_code == 200, r.text
    with sessions.begin() as s:
        make_old(s, utcnow() - timedelta(days=31), [study["id"]], store=api.app.state.store)
        s.execute(update(Job).where(Job.id == following.id).values(run_after=utcnow()))

    def second_done():
        with sessions() as s:
            job = s.get(Job, following.id)
            return job if job.status == "done" else None

    assert wait_for(second_done, what="the second run").payload["result"]["images"] == 1
    assert "tinyllava_med_images_released_total 1.0" in api.get("/metrics").text


def test_without_retention_nothing_is_released(tmp_path, sqlite_url, tiny_lm):
    for api in make_api(tmp_path, sqlite_url, tiny_lm):
        sessions = api.app.state.session_factory
        with sessions() as s:
            assert s.query(Job).filter(Job.kind == "release_images").count() == 0
        # a run queued while retention was on, before a restart without it: it finishes as
        # skipped and queues no next one (it does not fail, nor retry, nor alert)
        with sessions.begin() as s:
            left = crud.enqueue_job(s, kind="release_images").id

        def finished(sessions=sessions, left=left):
            with sessions() as s:
                job = s.get(Job, left)
                return job if job.status not in ("queued", "running") else None

        job = wait_for(finished, what="the left-over release run")
        assert job.status == "done", job.payload
        assert job.payload["result"] == {"skipped": "image_retention_days is not set"}
        with sessions() as s:
            assert s.query(Job).filter(Job.kind == "release_images").count() == 1


def test_the_console_releases_now(tmp_path, monkeypatch, capsys):
    """`tinyllava-med db release-images --days N` for a disk that fills before the next hourly
    run; audited as `cli`."""
    from tinyllava_med.cli import main
    from tinyllava_med.server.db.session import make_engine, session_factory

    monkeypatch.setenv("TINYLLAVA_MED_DATA_DIR", str(tmp_path / "data"))
    for name in ("TINYLLAVA_MED_DATABASE_URL", "TINYLLAVA_MED_IMAGE_RETENTION_DAYS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["import", str(CT_SMALL), str(MR_SMALL)]) == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'tinyllava_med.db'}")
    sessions = session_factory(engine)
    with sessions.begin() as s:
        make_old(s, utcnow() - timedelta(days=10), store=ImageStore(tmp_path / "data" / "images"))
    with pytest.raises(SystemExit, match="needs --days"):
        main(["db", "release-images"])
    for days in ("-1", "0", "nan", "soon"):  # a typo must not release what just arrived
        for flag in ("--days", "--draft-days"):
            with pytest.raises(SystemExit):
                main(["db", "release-images", "--days", "30", flag, days])
            assert flag in capsys.readouterr().err
    capsys.readouterr()
    assert main(["db", "release-images", "--days", "30"]) == 0
    out = capsys.readouterr().out
    assert "released 0 images of 0 studies that received no image for 30 days" in out, out
    # all that is due, not only the hourly job's one run (here of 1 study)
    monkeypatch.setattr(retention, "STUDIES_PER_RUN", 1)
    assert main(["db", "release-images", "--days", "7", "--draft-days", "3"]) == 0
    out = capsys.readouterr().out
    assert "released 2 images of 2 studies" in out and "no draft changed in the last 3 days" in out
    with sessions() as s:
        assert all(i.released_at for i in s.scalars(select(Image)))
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "image.release")).all()
        assert [(e.actor, e.detail["images"]) for e in events] == [("cli", 1), ("cli", 1)]
        # each in the history of its study (the event of a run named none)
        studies = {i.study_id for i in s.scalars(select(Image))}
        assert {e.resource_id for e in events} == studies and len(studies) == 2
    engine.dispose()


def test_a_study_asked_about_while_the_release_runs_keeps_its_pixels(api, monkeypatch):
    """The release ran while the model answered a question about a due study: it released the
    study (no draft yet), then the draft was filed beside an image answering 410. A question
    touches the image's file as it begins, and the release leaves a study touched lately."""
    from tinyllava_med.server.routes import questions

    study, _ = _signed_and_due(api)
    sessions, store, settings = (
        getattr(api.app.state, k) for k in ("session_factory", "store", "settings")
    )
    with sessions() as s:
        assert due_studies(s, settings, utcnow()) == [study["id"]]
    released: list[dict] = []
    render = questions.render_async

    async def release_meanwhile(*args, **kwargs):  # the hourly job, while the model works
        released.append(release_due(sessions, store, settings))
        return await render(*args, **kwargs)

    monkeypatch.setattr(questions, "render_async", release_meanwhile)
    _ask(api, study["id"])
    assert released[0]["studies"] == 0
    r = api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h())
    assert r.status_code == 200, r.text
    with sessions() as s:  # and once the draft is in, it keeps the study
        assert due_studies(s, settings, utcnow()) == []


@pytest.fixture
def sqlite_api(tmp_path, sqlite_url, tiny_lm):
    """`api` on SQLite only: its backups copy the database (PostgreSQL's is pg_dump's)."""
    yield from make_api(
        tmp_path, sqlite_url, tiny_lm, image_retention_days=30, image_sweep_grace_s=0
    )


def test_a_backup_taken_while_the_release_runs_is_whole(sqlite_api, tmp_path, monkeypatch):
    """The release ran while a backup copied the files: the files of the images its snapshot
    held were gone, so the backup was incomplete ("missing") and its restore asked for them. The
    copy now takes the release as the live database has it, with the header kept."""
    import sqlite3

    from tinyllava_med.server import backup as backup_module

    api = sqlite_api
    study, _ = _signed_and_due(api)
    settings, sessions, store = (
        getattr(api.app.state, k) for k in ("settings", "session_factory", "store")
    )
    released: list[dict] = []
    copy_file = backup_module._copy_checked

    def release_first(*args, **kwargs):  # the hourly job, as the backup begins to copy
        if not released:
            released.append(release_due(sessions, store, settings))
        return copy_file(*args, **kwargs)

    monkeypatch.setattr(backup_module, "_copy_checked", release_first)
    done = backup(settings, tmp_path / "backup")
    assert released[0]["studies"] == 1 and released[0]["files_removed"] == 1
    assert done.complete, (done.missing, done.corrupt)
    con = sqlite3.connect(done.database)
    try:
        rows = con.execute("SELECT released_at, header_sha256 FROM images").fetchall()
    finally:
        con.close()
    assert len(rows) == 1 and rows[0][0] is not None and rows[0][1] is not None
    assert ImageStore(tmp_path / "backup" / "images").whole(rows[0][1])
    with sessions() as s:
        (image,) = s.scalars(select(Image).where(Image.study_id == study["id"]))
        assert image.header_sha256 == rows[0][1]


def _signed_and_due(api):
    """A DICOM study with a signed report, arrived 31 days ago: due for release."""
    study = _study(api, "ct.dcm", CT_SMALL.read_bytes(), "application/dicom")
    report = _ask(api, study["id"])
    r = api.patch(f"/v1/reports/{report}", headers=api.h(), json={"status": "final"})
    assert r.status_code == 200, r.text
    with api.app.state.session_factory.begin() as s:
        make_old(s, utcnow() - timedelta(days=31), store=api.app.state.store)
    return study, report


def test_a_full_disk_keeps_the_headers_of_released_images(api, monkeypatch):
    """`db release-images` is run when the disk is full: a header that cannot be written then
    waits until its study's pixel files are removed, and the signed report's SR is still built
    from it. Before, the image was released without its header (the SR 409 no_dicom_source)."""
    sessions, store = api.app.state.session_factory, api.app.state.store
    study, report = _signed_and_due(api)
    pixels, put = study["images"][0]["sha256"], store.put
    full: list[bytes] = []

    def put_on_a_full_disk(data):
        if store.exists(pixels):  # the disk is full until the pixel file goes
            full.append(data)
            raise OSError(errno.ENOSPC, "No space left on device")
        return put(data)

    monkeypatch.setattr(store, "put", put_on_a_full_disk)
    result = release_due(sessions, store, api.app.state.settings)
    assert (result["studies"], result["files_removed"], result["headers_lost"]) == (1, 1, 0)
    assert full and not store.exists(pixels)
    with sessions() as s:
        image = s.scalars(select(Image)).one()
        assert image.released_at and store.exists(image.header_sha256)
    r = api.get(f"/v1/reports/{report}/sr", headers=api.h())
    assert r.status_code == 200, r.text
    assert (
        pydicom.dcmread(io.BytesIO(r.content)).PatientName == pydicom.dcmread(CT_SMALL).PatientName
    )


def test_a_header_the_full_disk_never_takes_is_forgotten_not_left_dangling(api, monkeypatch):
    """The disk stays full even after the pixel files go: the image must not name a header
    file that was never written (its SR then failed with a 500 and every push with it); it has
    no header, which the SR says with 409 no_dicom_source, and the run reports it lost."""
    sessions, store = api.app.state.session_factory, api.app.state.store
    study, report = _signed_and_due(api)

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "put", full)
    result = release_due(sessions, store, api.app.state.settings)
    assert (result["studies"], result["headers_lost"]) == (1, 1)
    # and the study's audit event says so, as its history must
    assert result["released"] == {study["id"]: {"images": 1, "files_removed": 1, "headers_lost": 1}}
    with sessions() as s:
        image = s.scalars(select(Image)).one()
        assert image.released_at and image.header_sha256 is None
    assert_error(api.get(f"/v1/reports/{report}/sr", headers=api.h()), 409, "no_dicom_source")
