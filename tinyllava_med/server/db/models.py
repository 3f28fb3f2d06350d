"""The database schema as typed SQLAlchemy 2 models: studies, images, reports and their edit
history, API keys, audit events and background jobs.

The schema changes only through an Alembic migration (`migrations/versions/`);
`check_models_match_migrations` in `migrate.py` keeps this file and the migrations in step.

- DICOM attributes keep their DICOM keywords in Python (`Study.StudyInstanceUID`) and are
  snake_case columns in SQL (`study_instance_uid`), so raw SQL needs no quoting.
- Choices are `Literal` types in Python and VARCHAR + named CHECK constraints in SQL (no native
  enum types, which PostgreSQL cannot alter inside a transaction and SQLite does not have).
- Timestamps are timezone-aware UTC on both databases (`UTCDateTime`).
- Nothing that identifies a patient is stored: no PatientName/PatientID/PatientBirthDate.
  Image files live on disk under their sha256 (see `server/storage.py`), never in the database.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# received: no report yet; reported: a draft awaits a signature; signed: every report signed.
# A new draft takes a signed study back to reported (`crud.create_report`, `_MARK_REPORTED`),
# and signing its last draft makes it signed (`crud.update_report`): the worklist's
# `report_status` (none / draft / signed) and /metrics' studies by status say the same.
StudyStatus = Literal["received", "reported", "signed"]
ImageKind = Literal["dicom", "png", "jpeg"]
ReportStatus = Literal["draft", "final", "amended"]
Role = Literal["pacs", "radiologist", "admin"]
Outcome = Literal["ok", "denied", "not_found", "invalid", "error"]
JobStatus = Literal["queued", "running", "done", "failed"]

STUDY_STATUSES: tuple[str, ...] = get_args(StudyStatus)
IMAGE_KINDS: tuple[str, ...] = get_args(ImageKind)
REPORT_STATUSES: tuple[str, ...] = get_args(ReportStatus)
# signed: `final` (signed once) or `amended` (corrected after signing, and signed again)
SIGNED_STATUSES: tuple[str, ...] = ("final", "amended")
ROLES: tuple[str, ...] = get_args(Role)
OUTCOMES: tuple[str, ...] = get_args(Outcome)
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)

# Deterministic constraint names on both databases: later migrations (and SQLite batch mode)
# can only drop or alter a constraint they can name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """`TIMESTAMP WITH TIME ZONE` that always gives back aware UTC datetimes.

    SQLite stores no offset and returns naive values; they were written as UTC, so UTC is
    attached on the way out. Naive datetimes are refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware datetime (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _choice(column: str, values: tuple[str, ...]) -> CheckConstraint:
    quoted = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({quoted})", name=column)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        _choice("status", STUDY_STATUSES),
        Index(None, "created_at"),
        Index(None, "status", "created_at"),
        Index(None, "modality"),
        Index(None, "study_instance_uid"),
        Index(None, "accession_number"),
        Index(None, "study_date"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[StudyStatus] = mapped_column(String(16), default="received")
    StudyInstanceUID: Mapped[str | None] = mapped_column("study_instance_uid", String(64))
    AccessionNumber: Mapped[str | None] = mapped_column("accession_number", String(64))
    Modality: Mapped[str | None] = mapped_column("modality", String(16))
    BodyPartExamined: Mapped[str | None] = mapped_column("body_part_examined", String(64))
    StudyDate: Mapped[date | None] = mapped_column("study_date", Date)
    description: Mapped[str | None] = mapped_column(String(256))

    images: Mapped[list[Image]] = relationship(
        back_populates="study", order_by="Image.n", cascade="all, delete-orphan"
    )
    reports: Mapped[list[Report]] = relationship(
        back_populates="study", order_by="Report.created_at"
    )


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("study_id", "n"),
        _choice("kind", IMAGE_KINDS),
        CheckConstraint("n >= 0", name="n_nonnegative"),
        Index(None, "sha256"),
        Index(None, "sop_instance_uid"),
        Index(None, "header_sha256"),  # which files are still needed (`crud.files_in_use`): 0015
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    n: Mapped[int] = mapped_column(Integer, doc="0-based index of the image within its study")
    sha256: Mapped[str] = mapped_column(String(64), doc="content address of the stored file")
    kind: Mapped[ImageKind] = mapped_column(String(8))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    SOPInstanceUID: Mapped[str | None] = mapped_column("sop_instance_uid", String(64))
    SeriesInstanceUID: Mapped[str | None] = mapped_column("series_instance_uid", String(64))
    SOPClassUID: Mapped[str | None] = mapped_column("sop_class_uid", String(64))
    Modality: Mapped[str | None] = mapped_column("modality", String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    n_frames: Mapped[int] = mapped_column(Integer, default=1)
    safe_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    stored_at: Mapped[datetime] = mapped_column(
        default=utcnow,
        doc="when its file was last stored: on arrival, and again when a released image is "
        "received again (retention counts from it)",
    )
    released_at: Mapped[datetime | None] = mapped_column(
        default=None, doc="when its pixels were released (`image_retention_days`); None: held"
    )
    header_sha256: Mapped[str | None] = mapped_column(
        String(64), doc="a released DICOM image's header (no pixels), kept for its SRs"
    )

    study: Mapped[Study] = relationship(back_populates="images")


# said beside a report whose text is still a model answer that its token limit cut (SR, FHIR)
CUT_SHORT_NOTE = (
    "The model's answer stopped at its length limit (max_new_tokens) and may be incomplete."
)


class Report(Base):
    """One answer to one question. `answer` is the model's output and never changes; `text` is
    the report a radiologist edits and signs (it starts as a copy of `answer`)."""

    __tablename__ = "reports"
    __table_args__ = (
        _choice("status", REPORT_STATUSES),
        Index(None, "study_id"),
        Index(None, "image_id"),
        Index(None, "status", "created_at"),
        Index(None, "signed_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"))
    image_id: Mapped[str | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[ReportStatus] = mapped_column(String(8), default="draft")
    # provenance: every stored answer records what produced it
    model: Mapped[str] = mapped_column(String(256))
    variant: Mapped[str | None] = mapped_column(String(64))
    quantization: Mapped[str] = mapped_column(String(48))  # `cpu-int8+tower+lm_head`: 0016
    model_version: Mapped[str | None] = mapped_column(String(128))
    model_weights: Mapped[str | None] = mapped_column(
        String(80), doc="sha256 of the weight files that answered (`model.meta.weights_digest`)"
    )
    server_version: Mapped[str] = mapped_column(String(32))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(
        String(16), doc="stop: the model ended the answer; length: cut at max_new_tokens"
    )
    frame: Mapped[int | None] = mapped_column(
        Integer, doc="the frame the model saw, 0-based; NULL: the image's middle one (n // 2)"
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64), doc="API key id or 'anonymous'")
    signed_by: Mapped[str | None] = mapped_column(String(64))
    signed_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="reports")
    image: Mapped[Image | None] = relationship()
    edits: Mapped[list[ReportEdit]] = relationship(
        back_populates="report", order_by="ReportEdit.id", cascade="all, delete-orphan"
    )

    def cut_short(self, text: str) -> bool:
        """`text` (this report's, or one of its versions') is the model's answer, which its
        token limit cut: a reader must hear it may end mid-sentence (`CUT_SHORT_NOTE`)."""
        return self.finish_reason == "length" and text == self.answer

    @property
    def amendment(self) -> ReportEdit | None:
        """The edit that made this version, when this version amends a signed one."""
        last = self.edits[-1] if self.edits else None
        if self.status == "amended" and last is not None and last.new_status == "amended":
            return last
        return None


class ReportEdit(Base):
    """One change to a report's text or status, kept forever: with the version it replaced
    (`previous_updated_at`, from which that version's SR instance UID derives) and, for an
    amendment of a signed report, why."""

    __tablename__ = "report_edits"
    __table_args__ = (
        _choice("previous_status", REPORT_STATUSES),
        _choice("new_status", REPORT_STATUSES),
        Index(None, "report_id"),
        {"sqlite_autoincrement": True},  # ids never reused (0014)
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"))
    previous_text: Mapped[str] = mapped_column(Text)
    new_text: Mapped[str] = mapped_column(Text)
    previous_status: Mapped[ReportStatus] = mapped_column(String(8))
    new_status: Mapped[ReportStatus] = mapped_column(String(8))
    edited_by: Mapped[str] = mapped_column(String(64))
    edited_at: Mapped[datetime] = mapped_column(default=utcnow)
    previous_updated_at: Mapped[datetime | None] = mapped_column(
        doc="the replaced version's updated_at (NULL for edits made before 0003)"
    )
    reason: Mapped[str | None] = mapped_column(Text, doc="why a signed report was amended")

    report: Mapped[Report] = relationship(back_populates="edits")


class ApiKey(Base):
    """An API key: only the sha256 of the full key is stored; `prefix` finds the row and is
    safe to display."""

    __tablename__ = "api_keys"
    __table_args__ = (_choice("role", ROLES), UniqueConstraint("prefix"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[Role] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), doc="sha256 hex of the full key")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()
    expires_at: Mapped[datetime | None] = mapped_column(doc="refused from then on; NULL: never")

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= utcnow()

    @property
    def active(self) -> bool:
        return self.revoked_at is None and not self.expired


class AuditEvent(Base):
    """Who did what to which resource, and how it ended. `detail` never holds patient data."""

    __tablename__ = "audit_events"
    __table_args__ = (
        _choice("outcome", OUTCOMES),
        Index(None, "at"),
        Index(None, "actor", "at"),
        Index(None, "resource_type", "resource_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(64), doc="API key id or 'anonymous'")
    action: Mapped[str] = mapped_column(String(64), doc="e.g. 'study.read', 'report.sign'")
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[Outcome] = mapped_column(String(16))
    status_code: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any] | None] = mapped_column()


class Job(Base):
    """A background job. Workers claim rows with `SELECT ... FOR UPDATE SKIP LOCKED` on
    PostgreSQL (`ix_jobs_status_run_after` serves that query)."""

    __tablename__ = "jobs"
    __table_args__ = (
        _choice("status", JOB_STATUSES),
        Index(None, "status", "run_after"),
        Index(None, "study_id"),
        # a deleted study's jobs go with it; their ids must not name other jobs later (in the
        # audit log, a retrieve's answer): 0014
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[str | None] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[JobStatus] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    last_error: Mapped[str | None] = mapped_column(Text)
    run_after: Mapped[datetime] = mapped_column(default=utcnow, doc="not claimed before this")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    locked_by: Mapped[str | None] = mapped_column(String(128))
    locked_at: Mapped[datetime | None] = mapped_column()
