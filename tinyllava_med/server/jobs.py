"""Background jobs on the `jobs` table: automatic reports for studies stored over STOW-RS, and
pushing SRs back to the PACS.

Durability: a job is a row, written in the same transaction as what caused it (the stored
instances, the signed report), so a crash or restart loses nothing that was acknowledged.

Claiming: `claim()` picks the oldest due row with `SELECT ... FOR UPDATE SKIP LOCKED` on
PostgreSQL (several server processes share the queue without waiting on each other) and then
takes it with a conditional UPDATE (status and attempt count unchanged), which is also what
makes SQLite, whose writers are serialized, safe. A `running` row whose worker has been silent
for `job_lease_s` (the process died) is claimed again; every claim counts an attempt, and a job
that used all its attempts is `failed`. Failures are retried after `job_retry_base_s * 2^n`.

Kinds:
- `auto_report`: ask the study's modality prompt (`auto_report_prompts`) about its middle DICOM
  image, store the answer as a draft report (created by `job:<id>`), and queue `push_sr` when a
  push target is configured; report, push job and completion commit together.
- `push_sr`: send the report's SR to the PACS: STOW-RS to `dicomweb_push_url` (dicomweb-client),
  or C-STORE to `dimse_push` (pynetdicom, `dimse.send`) when that is set. The SR's UIDs are
  derived from the report's state, so a retried push stores the same instance again.
- `sweep_images`: remove a deleted study's files once no image holds them (`schedule_sweep`).
- `retrieve_study`: fetch a study from the PACS (WADO-RS, or a C-MOVE to our own Storage SCP;
  `pull.py`), asked for by
  `POST /v1/studies/retrieve`, and file it as pushed studies are filed.
- `push_rejection`: send (as `push_sr` does) the IOCM rejection note of a deleted study's pushed SRs
  (`rejection.py`) from the file store, then remove it there.
- `release_images`: release the pixel data of studies past `image_retention_days`
  (`retention.py`), then queue the next run.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pydicom
from sqlalchemy import and_, event, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from tinyllava_med.model.generate import SamplingParams
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.models import Image, Job, Report, Study, utcnow
from tinyllava_med.server.dicom_sr import missing_uid, pushed_versions, report_sr
from tinyllava_med.server.logs import error_text
from tinyllava_med.server.serving import STORED_FILES, render, save_report, stored_image_key
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore

if TYPE_CHECKING:
    from tinyllava_med.server.ingest import Audit

log = logging.getLogger(__name__)

AUTO_REPORT = "auto_report"
PUSH_SR = "push_sr"
SWEEP_IMAGES = "sweep_images"
PUSH_REJECTION = "push_rejection"
RETRIEVE_STUDY = "retrieve_study"
RELEASE_IMAGES = "release_images"  # retention.py
# every kind, for the API's `kind` filters (an unknown kind is a 422, not an empty list)
JobKind = Literal[
    "auto_report", "push_sr", "sweep_images", "push_rejection", "retrieve_study", "release_images"
]
# what runs while the model is loading, failed to load, or busy: only automatic reports ask it
NEEDS_NO_MODEL = (PUSH_SR, SWEEP_IMAGES, PUSH_REJECTION, RETRIEVE_STUDY, RELEASE_IMAGES)
SYSTEM_ACTOR = "system"
# one STOW-RS of an SR or rejection note: tried once, for at most this long per read (the
# queue's backoff retries it): dicomweb-client's own retries held a worker ~85 s on a PACS that
# took the connection and never answered
PUSH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Claimed:
    id: int
    kind: str
    study_id: str | None
    payload: dict[str, Any]
    attempts: int
    worker: str = ""  # who claimed it: only that claim may finish or fail it


# --- scheduling --------------------------------------------------------------------------------


def auto_prompt(settings: Settings, modality: str | None) -> str | None:
    prompts = {k.upper(): v for k, v in settings.auto_report_prompts.items()}
    return prompts.get((modality or "").upper()) or prompts.get("*")


def schedule_auto_report(session: Session, settings: Settings, study: Study) -> Job | None:
    """Queue (or postpone the queued) automatic report of `study`; None when its modality has
    no prompt. Postponing lets a study that arrives in several requests get one report."""
    question = auto_prompt(settings, study.Modality)
    if question is None:
        return None
    run_after = utcnow() + timedelta(seconds=settings.auto_report_delay_s)
    pending = select(Job).where(
        Job.kind == AUTO_REPORT, Job.study_id == study.id, Job.status == "queued"
    )
    if session.get_bind().dialect.name == "postgresql":
        pending = pending.with_for_update(skip_locked=True)
    job = session.scalar(pending)
    if job is not None:
        job.run_after = run_after
        job.payload = {"question": question}
        return job
    job = crud.enqueue_job(
        session,
        kind=AUTO_REPORT,
        study_id=study.id,
        payload={"question": question},
        max_attempts=settings.job_max_attempts,
    )
    job.run_after = run_after
    return job


def retrieve_audit() -> Audit:
    """The audit of a retrieve's batches (`study.retrieve_store`, each as it commits): objects
    that are no image are counted as skipped, as the job's result says, not as failed."""
    from tinyllava_med.server.ingest import audit_as

    return audit_as(SYSTEM_ACTOR, "study.retrieve_store", skips_non_images=True)


def report_image(images: list[Image]) -> Image:
    """The image an automatic report is about: the middle one of the study's largest series
    (a CT's axial series, not its scout or its dose screen, which are series of their own and
    may come first); the middle of all images when none is DICOM."""
    if not images:
        raise LookupError("the study has no images")
    series: dict[str | None, list[Image]] = {}
    for im in images:
        if im.kind == "dicom":
            series.setdefault(im.SeriesInstanceUID, []).append(im)
    largest = max(series.values(), key=len, default=images)  # the first of equal ones
    return largest[len(largest) // 2]


def schedule_push(session: Session, settings: Settings, report: Report) -> Job | None:
    """Queue pushing the SR of `report` as it is now (its `updated_at` names the version: a
    later edit does not change what this job sends) when a push target is set and its image is
    DICOM with the UIDs an SR references (`report_sr` refuses the others)."""
    image = report.image
    if not settings.pushes_to_pacs or image is None or image.kind != "dicom":
        return None
    if missing_uid(report) is not None:
        return None
    return crud.enqueue_job(
        session,
        kind=PUSH_SR,
        study_id=report.study_id,
        payload={"report_id": report.id, "version": report.updated_at.isoformat()},
        max_attempts=settings.job_max_attempts,
    )


def _names_file(key: object, sha256: str) -> bool:
    """Whether an engine cache key (`stored_image_key`, or a prefix key holding one) names the
    stored file `sha256`."""
    if not isinstance(key, tuple) or not key:
        return False
    return key[0] == sha256 or _names_file(key[0], sha256)


def schedule_retrieve(session: Session, settings: Settings, study_uid: str) -> Job:
    """Queue fetching the study `study_uid` from the PACS (`pull.py`), unless a retrieve of it
    is queued or running: that job is the answer (a viewer's second click, or a RIS asking
    again, would fetch a whole CT twice and hold up pushes and reports behind it)."""
    active = session.scalars(
        select(Job).where(Job.kind == RETRIEVE_STUDY, Job.status.in_(("queued", "running")))
    )
    for job in active:
        if (job.payload or {}).get("study_instance_uid") == study_uid:
            return job
    return crud.enqueue_job(
        session,
        kind=RETRIEVE_STUDY,
        payload={"study_instance_uid": study_uid},
        max_attempts=settings.job_max_attempts,
    )


def schedule_sweep(session: Session, settings: Settings, hashes: list[str]) -> Job | None:
    """Queue removing the files of a deleted study's images once `image_sweep_grace_s` has
    passed (the job keeps those another study holds, or an upload stored again meanwhile)."""
    if not hashes:
        return None
    job = crud.enqueue_job(
        session,
        kind=SWEEP_IMAGES,
        payload={"sha256": hashes},
        max_attempts=settings.job_max_attempts,
    )
    job.run_after = utcnow() + timedelta(seconds=settings.image_sweep_grace_s)
    return job


def sweep_unnamed_files(
    sessions: sessionmaker[Session], settings: Settings, store: ImageStore, chunk: int = 1000
) -> int:
    """Queue a sweep of every stored file the database does not need (`crud.files_in_use`):
    what a crash or a full disk left behind when an upload's transaction never ended, so no
    rollback queued its sweep (not the files a queued sweep names already: a deleted study's,
    which a restart before their grace period ended reported as a crash's, and swept twice).
    `serve` calls it as it starts; the sweep keeps a file an upload
    stored or touched within `image_sweep_grace_s` (another process's, in flight). How many;
    an error is logged, not raised (it runs beside the server's start)."""
    queued = 0
    try:
        with sessions() as s:  # a deleted study's files, waiting for their sweep: no crash's
            pending = s.scalars(
                select(Job.payload).where(
                    Job.kind == SWEEP_IMAGES, Job.status.in_(("queued", "running"))
                )
            ).all()
        sweeping = {sha for payload in pending for sha in payload.get("sha256", [])}
        names = [sha for sha in store.names() if sha not in sweeping]
        for i in range(0, len(names), chunk):
            part = names[i : i + chunk]
            with sessions.begin() as s:
                in_use = crud.files_in_use(s, part)
                unnamed = [sha for sha in part if sha not in in_use]
                if unnamed:
                    schedule_sweep(s, settings, unnamed)
            queued += len(unnamed)
    except Exception as e:
        log.error("the sweep of files no image names stopped: %s", type(e).__name__)
    if queued:
        log.warning("%d stored file(s) no image names (left by a crash): sweep queued", queued)
    return queued


def sweep_on_rollback(sessions: sessionmaker[Session], settings: Settings) -> None:
    """When a transaction that stored files rolls back (a later file of the upload failed, the
    commit found the disk full), queue a sweep of them: no row names them, and without it they
    stayed in the store for good. The sweep keeps any another upload took meanwhile."""

    @event.listens_for(sessions, "after_commit")
    def _kept(session: Session) -> None:
        session.info.pop(STORED_FILES, None)

    @event.listens_for(sessions, "after_soft_rollback")
    def _dropped(session: Session, previous_transaction: Any) -> None:
        if session.in_transaction():  # a savepoint's: the transaction (and its locks) goes on
            return
        stored = session.info.pop(STORED_FILES, None)
        if not stored:
            return
        try:
            with sessions.begin() as s:
                schedule_sweep(s, settings, list(dict.fromkeys(stored)))
        except Exception as e:  # the database itself failed: the files wait for a later sweep
            log.error("could not queue the sweep of a failed upload's files: %s", type(e).__name__)


def schedule_rejection(
    session: Session, settings: Settings, sha256: str, rejected: int
) -> Job | None:
    """Queue sending the rejection note stored as `sha256` (it names `rejected` SR instances).
    The job belongs to no study: the study it is about is being deleted."""
    if not settings.pushes_to_pacs:
        return None
    return crud.enqueue_job(
        session,
        kind=PUSH_REJECTION,
        payload={"sha256": sha256, "rejected": rejected},
        max_attempts=settings.job_max_attempts,
    )


# --- claiming and finishing --------------------------------------------------------------------


def claim(
    session: Session,
    worker: str,
    lease_s: float,
    kinds: Collection[str] | None = None,
    abandoned: list[str] | None = None,
) -> Claimed | None:
    """Take the oldest due job (of `kinds`, when given) for `worker`, or None. Commit the
    session to publish the claim. A job whose workers died on its every attempt fails here;
    its kind goes into `abandoned` (for the failed-jobs metric)."""
    now = utcnow()
    due = or_(
        and_(Job.status == "queued", Job.run_after <= now),
        and_(Job.status == "running", Job.locked_at < now - timedelta(seconds=lease_s)),
    )
    stmt = select(Job).where(due)
    if kinds is not None:
        stmt = stmt.where(Job.kind.in_(kinds))
    stmt = stmt.order_by(Job.run_after, Job.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    job = session.scalar(stmt)
    if job is None:
        return None
    if job.attempts >= job.max_attempts:  # its last worker died mid-run
        job.status = "failed"
        job.last_error = job.last_error or "the worker running this job stopped"
        if abandoned is not None:
            abandoned.append(job.kind)
        return None
    taken = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status, Job.attempts == job.attempts)
        .values(
            status="running",
            attempts=job.attempts + 1,
            locked_by=worker,
            locked_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        return None  # another worker took it between our read and our write
    return Claimed(job.id, job.kind, job.study_id, dict(job.payload), job.attempts + 1, worker)


def _held(session: Session, claimed: Claimed) -> Job | None:
    """The job's row while `claimed` still holds it; None once the job was deleted (with its
    study: SQLite may even give its id to a newer job) or claimed again after its lease ran out
    (its new worker owns it now)."""
    job = session.get(Job, claimed.id, with_for_update=True)  # PostgreSQL: until the commit
    if job is None or (job.kind, job.locked_by, job.attempts) != (
        claimed.kind,
        claimed.worker,
        claimed.attempts,
    ):
        return None
    return job


def finish(
    session: Session, claimed: Claimed, result: dict[str, Any], study_id: str | None = None
) -> str:
    """Record a job's result (and the study it made, for a job queued before there was one):
    `done`, or `gone` when the claim no longer holds the job."""
    job = _held(session, claimed)
    if job is None:
        return "gone"
    if study_id is not None and job.study_id is None:
        job.study_id = study_id
    job.status = "done"
    job.payload = {**job.payload, "result": result}
    job.locked_by = job.locked_at = None
    job.last_error = None
    return "done"


def fail(session: Session, claimed: Claimed, error: str, retry_base_s: float) -> str:
    """Record a failed attempt: queued again after a backoff, or failed for good; `gone` when
    the claim no longer holds the job (deleted with its study, or claimed again)."""
    job = _held(session, claimed)
    if job is None:
        return "gone"
    job.last_error = error[:1000]
    job.locked_by = job.locked_at = None
    if job.attempts >= job.max_attempts:
        job.status = "failed"
    else:
        job.status = "queued"
        job.run_after = utcnow() + timedelta(seconds=retry_base_s * 2 ** (job.attempts - 1))
    return job.status


def give_back(session: Session, claimed: Claimed) -> bool:
    """Queue a job this worker holds again, as it was before this attempt: the server is
    stopping with it unfinished, so another worker (or this server once restarted) runs it now
    rather than after its lease, and the attempt does not count against it. A later `finish` or
    `fail` by the interrupted attempt is then `gone`. Whether the job was given back."""
    job = _held(session, claimed)
    if job is None or job.status != "running":
        return False
    job.status = "queued"
    job.attempts = max(job.attempts - 1, 0)
    job.locked_by = job.locked_at = None
    job.run_after = utcnow()
    return True


def retry_failed(
    session: Session, *, job_id: int | None = None, kind: str | None = None
) -> list[int]:
    """Queue failed jobs again with all their attempts (the PACS is back, say): the one with
    `job_id`, or every failed one (of `kind`). Their last error stays until they run. The ids
    queued again, oldest first."""
    where = [Job.status == "failed"]
    if job_id is not None:
        where.append(Job.id == job_id)
    if kind is not None:
        where.append(Job.kind == kind)
    ids = list(session.scalars(select(Job.id).where(*where).order_by(Job.id)))
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == "failed")
            .values(status="queued", attempts=0, run_after=utcnow(), updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return ids


# --- running -----------------------------------------------------------------------------------


class Swept(NamedTuple):
    """What `remove_unused` did with each file: removed, kept as the database needs it, or kept
    as it was stored again within the grace period (`fresh`: for a later sweep)."""

    removed: list[str]
    in_use: set[str]
    fresh: list[str]


def remove_unused(
    sessions: sessionmaker[Session], store: ImageStore, hashes: list[str], grace_s: float
) -> Swept:
    """Remove those of `hashes` the database no longer needs (`crud.files_in_use`) and no upload
    touched within `grace_s`: for a deleted study's sweep and for the image retention."""
    with sessions() as s:
        in_use = crud.files_in_use(s, hashes)
    removed: list[str] = []
    fresh: list[str] = []
    for sha in hashes:
        if sha not in in_use:
            (removed if store.remove_if_stale(sha, grace_s) else fresh).append(sha)
    return Swept(removed, in_use, fresh)


def release_running_jobs(session: Session, lease_s: float) -> list[int]:
    """Make due at once every job left `running`, instead of after its lease (`job_lease_s`,
    10 minutes): for a server starting alone on its SQLite database's data directory, where
    every such job is a stopped (killed, crashed) server's. Their ids."""
    expired = utcnow() - timedelta(seconds=lease_s + 1)
    jobs = list(session.scalars(select(Job).where(Job.status == "running")))
    for job in jobs:
        job.locked_at = expired
    return [job.id for job in jobs]


class JobRunner:
    """`workers` threads that claim and run jobs until `stop()`; while the model is not ready
    or the engine's queue is full they take only jobs that need no model (`NEEDS_NO_MODEL`), so
    an SR push or a retrieve does not wait for a model that is loading or failed to load."""

    def __init__(self, app: Any, workers: int) -> None:
        self.app = app
        self.settings: Settings = app.state.settings
        self.sessions: sessionmaker[Session] = app.state.session_factory
        self._stop = threading.Event()
        self._running: dict[int, Claimed] = {}  # by worker: the job it runs now
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"jobs-{i}", daemon=True)
            for i in range(workers)
        ]
        self.handlers: dict[str, Callable[[Claimed], str]] = {
            AUTO_REPORT: self._auto_report,
            PUSH_SR: self._push_sr,
            SWEEP_IMAGES: self._sweep_images,
            PUSH_REJECTION: self._push_rejection,
            RETRIEVE_STUDY: self._retrieve_study,
            RELEASE_IMAGES: self._release_images,
        }
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:  # every outcome from 0: a first failure is an increase to alert on
            for kind in self.handlers:
                for outcome in ("done", "retry", "failed", "gone"):
                    metrics.jobs.labels(kind, outcome)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop_claiming(self) -> None:
        """Claim no more jobs; those running go on (`stop` waits for them and gives back the
        rest). A stopping server's drain."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, wait up to `timeout` in all for the jobs running, and give back
        (`give_back`) those still unfinished: a restart or an upgrade costs them no attempt and
        no lease's wait."""
        self.stop_claiming()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        unfinished = list(self._running.values())
        if not unfinished:
            return
        try:
            with self.sessions.begin() as s:
                given = [c for c in unfinished if give_back(s, c)]
        except Exception:  # the database is away too: their leases run out instead
            log.exception("could not queue the unfinished jobs again")
            return
        for c in given:
            log.warning("stopping: job %s (%s) unfinished, queued again", c.id, c.kind)

    def _loop(self, i: int) -> None:
        worker = f"{socket.gethostname()}:{os.getpid()}:{i}"
        engine = self.app.state.engine
        while not self._stop.is_set():
            # while the model cannot take a question (loading, failed, or its queue full: jobs
            # never push interactive requests out), pushes, sweeps and retrieves still run
            kinds = None if engine.ready and not engine.is_full() else NEEDS_NO_MODEL
            abandoned: list[str] = []
            try:
                with self.sessions.begin() as s:
                    job = claim(s, worker, self.settings.job_lease_s, kinds, abandoned)
            except Exception:  # database away: try again later
                log.exception("claiming a job failed")
                job, abandoned = None, []
            for kind in abandoned:  # a job that crashed its workers (say, out of memory)
                log.warning("a %s job failed: its workers stopped on every attempt", kind)
                self.app.state.metrics.jobs.labels(kind, "failed").inc()
            if job is None:
                self._stop.wait(self.settings.job_poll_s)
                continue
            self._running[i] = job
            try:
                self.run(job)
            finally:
                self._running.pop(i, None)

    def run(self, job: Claimed) -> None:
        metrics = self.app.state.metrics
        try:
            handler = self.handlers.get(job.kind)
            if handler is None:
                raise ValueError(f"unknown job kind {job.kind!r}")
            # the handler's `finish`: done, or gone (another claim, or deleted, meanwhile)
            metrics.jobs.labels(job.kind, handler(job)).inc()
        except Exception as e:
            # messages of our own errors carry no patient data; a database's lose their values
            error = error_text(e)
            log.warning("job %s (%s) attempt %d failed: %s", job.id, job.kind, job.attempts, error)
            with self.sessions.begin() as s:
                outcome = fail(s, job, error, self.settings.job_retry_base_s)
            labels = {"queued": "retry", "gone": "gone"}
            metrics.jobs.labels(job.kind, labels.get(outcome, "failed")).inc()

    # --- kinds -------------------------------------------------------------------------------

    def _auto_report(self, job: Claimed) -> str:
        settings, store, engine = self.settings, self.app.state.store, self.app.state.engine
        with self.sessions() as s:
            study = crud.get_study(s, job.study_id or "")
            if study is None:
                raise LookupError("the study no longer exists")
            image = report_image(list(study.images))
            image_id, sha256 = image.id, image.sha256
        pil = render(store, sha256, settings)
        question = str(job.payload["question"])
        start = time.perf_counter()
        params = SamplingParams(max_new_tokens=settings.default_max_new_tokens)
        req = engine.submit(pil, question, params, image_key=stored_image_key(sha256))
        answer = req.future.result(settings.request_timeout_s)
        latency_ms = (time.perf_counter() - start) * 1000
        with self.sessions.begin() as s:
            if _held(s, job) is None:  # given back while the model answered, or claimed again:
                return "gone"  # its next run writes the report, once
            study = crud.get_study(s, job.study_id or "")
            assert study is not None
            img = s.get(Image, image_id)
            assert img is not None
            report = save_report(
                s,
                study=study,
                image=img,
                question=question,
                answer=answer,
                info=engine.lm.info if engine.lm is not None else {},
                actor=f"job:{job.id}",
                latency_ms=latency_ms,
            )
            crud.audit(
                s,
                actor=SYSTEM_ACTOR,
                action="job.auto_report",
                resource_type="study",
                resource_id=study.id,
                outcome="ok",
                status_code=201,
                detail={"job_id": job.id, "report_id": report.id},
            )
            push = schedule_push(s, settings, report)
            return finish(
                s, job, {"report_id": report.id, "push_job_id": push.id if push else None}
            )

    def _sweep_images(self, job: Claimed) -> str:
        """Remove the files no image refers to any more, and what the caches derived from
        them; a file stored again within the grace period waits for another sweep."""
        hashes = [str(h) for h in job.payload["sha256"]]
        swept = remove_unused(
            self.sessions, self.app.state.store, hashes, self.settings.image_sweep_grace_s
        )
        self._forget(swept.removed)
        with self.sessions.begin() as s:
            again = schedule_sweep(s, self.settings, swept.fresh)
            return finish(
                s,
                job,
                {
                    "removed": len(swept.removed),
                    "kept": len(swept.in_use),
                    "again": again.id if again else None,
                },
            )

    def _forget(self, removed: list[str]) -> None:
        """Drop what the engine's caches derived from removed files."""
        engine = getattr(self.app.state, "engine", None)
        for sha in removed:
            for cache in (getattr(engine, "pixels", None), getattr(engine, "prefixes", None)):
                if cache is not None:
                    cache.discard(lambda key, sha=sha: _names_file(key, sha))

    def _release_images(self, job: Claimed) -> str:
        from tinyllava_med.server.retention import (
            RELEASE_EVERY_S,
            audit_release,
            release_due,
            schedule_release,
        )

        if self.settings.image_retention_days is None:  # turned off since this run was queued
            with self.sessions.begin() as s:
                return finish(s, job, {"skipped": "image_retention_days is not set"})
        result = release_due(self.sessions, self.app.state.store, self.settings)
        self._forget(result.pop("hashes"))
        with self.sessions.begin() as s:
            audit_release(s, SYSTEM_ACTOR, result)
            # more were due than one run takes: the next run follows at once
            delay_s = 0.0 if result["more"] and result["studies"] else RELEASE_EVERY_S
            following = schedule_release(s, self.settings, delay_s=delay_s, besides=job.id)
            counts = {k: v for k, v in result.items() if k != "released"}  # (audited above)
            outcome = finish(s, job, {**counts, "next": following.id if following else None})
        self.app.state.metrics.images_released.inc(result["images"])
        return outcome

    def _retrieve_study(self, job: Claimed) -> str:
        from tinyllava_med.server.pull import retrieve_study

        uid = str(job.payload["study_instance_uid"])
        stored = retrieve_audit()
        result = retrieve_study(self.settings, self.sessions, self.app.state.store, uid, stored)
        with self.sessions.begin() as s:
            crud.audit(
                s,
                actor=SYSTEM_ACTOR,
                action=f"job.{job.kind}",
                resource_type="study",
                resource_id=result["study_id"],
                outcome="ok",
                status_code=200,
                detail={
                    "job_id": job.id,
                    **{k: result[k] for k in ("stored", "already", "failed")},
                    **{k: result[k] for k in ("skipped", "skipped_series") if k in result},
                },
            )
            # the study it filed lists it (`GET /v1/jobs?study_id=`) beside its other jobs
            return finish(s, job, result, study_id=result["study_id"])

    def _deliver(self, ds: pydicom.Dataset) -> None:
        """Send `ds` to the configured PACS: C-STORE to `dimse_push`, else STOW-RS."""
        from tinyllava_med.server.pull import one_try_client

        settings = self.settings
        if settings.dimse_push:
            from tinyllava_med.server import dimse

            dimse.send(ds, dimse.Target.parse(settings.dimse_push), settings)
            return
        if not settings.dicomweb_push_url:
            raise RuntimeError("no dicomweb_push_url is configured")
        client = one_try_client(
            settings.dicomweb_push_url, settings.dicomweb_push_headers, PUSH_TIMEOUT_S
        )
        client.store_instances([ds])

    def _send(
        self, job: Claimed, ds: pydicom.Dataset, resource_type: str, resource_id: str | None
    ) -> str:
        """Send `ds`, then audit it as `job.<kind>` and finish the job, in one transaction."""
        self._deliver(ds)
        uid = str(ds.SOPInstanceUID)
        with self.sessions.begin() as s:
            crud.audit(
                s,
                actor=SYSTEM_ACTOR,
                action=f"job.{job.kind}",
                resource_type=resource_type,
                resource_id=resource_id,
                outcome="ok",
                status_code=200,
                detail={"job_id": job.id, "sop_instance_uid": uid},
            )
            return finish(s, job, {"sop_instance_uid": uid})

    def _push_sr(self, job: Claimed) -> str:
        settings = self.settings
        report_id = str(job.payload["report_id"])
        with self.sessions() as s:
            report = crud.get_report(s, report_id)
            if report is None:
                raise LookupError("the report no longer exists")
            # jobs queued before versions were recorded send the current version
            version = job.payload.get("version")
            at = datetime.fromisoformat(version) if version else None
            data = None  # a later version reached the PACS first: this one stays out of it
            if at is None or not any(v > at for v in pushed_versions(s, report, "done")):
                data = report_sr(s, self.app.state.store, report, settings.institution_name, at)
        if data is None:
            with self.sessions.begin() as s:
                return finish(s, job, {"skipped": "a later version of the report was sent"})
        return self._send(job, pydicom.dcmread(io.BytesIO(data)), "report", report_id)

    def _push_rejection(self, job: Claimed) -> str:
        store = self.app.state.store
        sha = str(job.payload["sha256"])
        if not store.exists(sha):
            raise LookupError("the rejection note's file is gone")
        outcome = self._send(job, pydicom.dcmread(store.path(sha)), "study", None)
        store.remove_if_stale(sha, grace_s=0)  # sent: the patient's data goes from the store
        return outcome
