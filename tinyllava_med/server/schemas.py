"""Pydantic schemas of the REST API (requests in, public objects out)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict

from tinyllava_med.model.prompts import control_in

ReportStatus = Literal["draft", "final", "amended"]


def _plain(value: str) -> str:
    if (found := control_in(value)) is not None:
        raise ValueError(
            f"holds a control character ({found}); only tab and line breaks may be used"
        )
    return value


# text that goes into reports and their exports (DICOM SR, FHIR, XML), which refuse control
# characters other than tab and line breaks: so does this, with a 422 that names the character,
# never the text
# (the pattern, in JSON Schema's regex dialect, tells clients and API fuzzers so; `_plain` checks)
PLAIN_PATTERN: JsonDict = {"pattern": "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f]*$"}
PlainText = Annotated[str, AfterValidator(_plain), Field(json_schema_extra=PLAIN_PATTERN)]


class ImagePublic(BaseModel):
    index: int
    kind: Literal["dicom", "png", "jpeg"]
    sha256: str
    Modality: str | None = None
    SOPInstanceUID: str | None = None
    SeriesInstanceUID: str | None = None
    rows: int | None = None
    columns: int | None = None
    n_frames: int = 1
    metadata: dict[str, Any] = Field(default_factory=dict)
    url: str
    released_at: datetime | None = Field(
        default=None,
        description="when its pixels were released past the image retention (the PACS keeps "
        "them; retrieve the study to see it again); null: held here",
    )


class StudyPublic(BaseModel):
    id: str
    created_at: datetime
    StudyInstanceUID: str | None = None
    AccessionNumber: str | None = None
    Modality: str | None = None
    BodyPartExamined: str | None = None
    StudyDate: str | None = None
    images: list[ImagePublic]
    reports: int = 0
    drafts: int = Field(default=0, description="reports awaiting a signature")
    report_status: Literal["none", "draft", "signed"] = Field(
        default="none", description="none: no report; draft: one awaits a signature; signed"
    )


class StudyList(BaseModel):
    data: list[StudyPublic]
    count: int


class ImportResult(BaseModel):
    """What a media import did. `studies`: those its images are in (new or held already), with
    all their images;
    `skipped` and `failed` count files by reason (`no_image`: DICOM without pixels, such as the
    DICOMDIR; `not_dicom`: a CD's other files; failures: `truncated`, `too_large`, ...)."""

    studies: list[StudyPublic]
    stored: int = Field(description="images new here")
    already: int = Field(description="images this server held already (not copied again)")
    skipped: dict[str, int]
    failed: dict[str, int]
    jobs: list[int] = Field(description="automatic reports queued")


_WILDCARDS = re.compile(r"[*?\\\x00-\x1f]")


class RetrieveRequest(BaseModel):
    """Which study to fetch from the PACS: exactly one of the two."""

    model_config = ConfigDict(extra="forbid")
    # VR SH: 16 in the standard; longer ones are kept, as some RIS issue them. Matched as it is:
    # a C-FIND or QIDO-RS takes * and ? as wildcards, \ as a list and blanks as "any", so one
    # such value would queue half the archive; none of them is in a real accession number.
    accession_number: str | None = Field(default=None, min_length=1, max_length=64)
    study_instance_uid: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$"
    )

    @field_validator("accession_number")
    @classmethod
    def _exact(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip(" ") or _WILDCARDS.search(value)):
            raise ValueError(
                "an accession number to retrieve by cannot be blank or hold *, ?, \\ or control "
                "characters: the PACS would read them as wildcards and lists"
            )
        # leading and trailing spaces are not significant in SH (PS3.5 6.2): "ACC1 " is ACC1
        return value.strip(" ") if value is not None else None

    @model_validator(mode="after")
    def _one(self) -> RetrieveRequest:
        if (self.accession_number is None) == (self.study_instance_uid is None):
            raise ValueError("give exactly one of accession_number and study_instance_uid")
        return self


class RetrieveQueued(BaseModel):
    """One `retrieve_study` job per study the PACS found; each job's result, once done, names
    the study here (`study_id`) and counts the instances stored, already held and failed."""

    jobs: list[int]
    study_instance_uids: list[str]


class QuestionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # control characters answer 422 in the route, which also applies the question length limit
    question: str = Field(min_length=1, json_schema_extra=PLAIN_PATTERN)
    image_index: int = Field(default=0, ge=0, le=2**31 - 1)
    frame: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(
        default=0.0, ge=0.0, le=2.0, description="0 (or below 1e-5): greedy decoding"
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class Prepared(BaseModel):
    """`POST .../images/{n}/prepare`: `queued` (computed while the model is idle, unless a
    question comes first) or `not_needed` (this model gains nothing from it: a small vision
    tower, or a GPU without a prefix cache)."""

    status: Literal["queued", "not_needed"]


class Tokens(BaseModel):
    prompt: int
    completion: int


class ReportPublic(BaseModel):
    id: str
    study_id: str
    image_index: int | None
    question: str
    answer: str
    text: str
    status: ReportStatus
    model: str
    variant: str | None
    quantization: str
    model_version: str | None = None
    model_weights: str | None = Field(
        None,
        description="sha256 over the weight files of the checkpoint that answered: which "
        "weights, where name and version say which model",
    )
    server_version: str | None = None
    latency_ms: float
    tokens: Tokens
    finish_reason: str | None = None
    version: str = Field(
        description="changes with every change to the report (its ETag): send it back as "
        '`If-Match: "<version>"` with a PATCH, which then answers 412 `report_changed` if '
        "someone else changed the report meanwhile"
    )
    frame: int | None = Field(
        default=None,
        description="the frame of a multi-frame image asked about (0-based); null: the middle one",
    )
    created_at: datetime
    updated_at: datetime | None = None
    signed_by: str | None = None
    signed_by_name: str | None = Field(
        default=None, description="the signing key's name (keys are named for their holder)"
    )
    signed_at: datetime | None = None


class ReportList(BaseModel):
    data: list[ReportPublic]
    count: int


class ReportUpdate(BaseModel):
    """Edit a draft (`text`), sign it (`status: final`), or amend a signed report (`status:
    amended` with the corrected `text` and a `reason`)."""

    model_config = ConfigDict(extra="forbid")
    text: PlainText | None = Field(default=None, max_length=100_000)
    status: ReportStatus | None = None
    reason: PlainText | None = Field(default=None, max_length=2000)


class ReportEditPublic(BaseModel):
    """One change to a report: the text and status before and after, who made it, when, and
    for an amendment why."""

    previous_status: ReportStatus
    new_status: ReportStatus
    previous_text: str
    new_text: str
    edited_by: str
    edited_at: datetime
    reason: str | None = None


class ReportHistory(BaseModel):
    """A report's changes, oldest first (the model's answer is the first `previous_text`)."""

    data: list[ReportEditPublic]
    count: int


class AskResponse(BaseModel):
    study: StudyPublic
    report: ReportPublic


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["pacs", "radiologist", "admin"]
    name: PlainText = Field(default="", max_length=128)
    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, description="default: the server's `api_key_days`"
    )


class ApiKeyCreated(BaseModel):
    id: str
    role: str
    name: str
    key: str  # shown once
    expires_at: datetime | None


class Caller(BaseModel):
    """The key a request is made with: who it is and what its role may do, so a client shows
    only the actions the server will allow."""

    id: str
    name: str
    role: str
    permissions: list[str]
    features: list[str] = Field(
        default_factory=list,
        description="what this server is configured for, beyond the core, that the key may "
        "use: retrieve (POST /v1/studies/retrieve has a PACS to ask)",
    )


class JobPublic(BaseModel):
    id: int
    kind: str
    status: Literal["queued", "running", "done", "failed"]
    study_id: str | None
    attempts: int
    max_attempts: int
    last_error: str | None
    result: dict[str, Any] | None = Field(description="e.g. {report_id} once done")
    run_after: datetime
    created_at: datetime
    updated_at: datetime


class JobsRetried(BaseModel):
    """The ids of the failed jobs queued again, oldest first."""

    data: list[int]
    count: int


class JobList(BaseModel):
    data: list[JobPublic]
    count: int


class ApiKeyPublic(BaseModel):
    """A key as an admin sees it: never the key or its hash."""

    id: str
    name: str
    role: str
    prefix: str = Field(description="the key's first characters after `tlm_`, to recognise it")
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    expires_at: datetime | None
    active: bool = Field(description="neither revoked nor expired")


class ApiKeyList(BaseModel):
    data: list[ApiKeyPublic]
    count: int


class AuditEventPublic(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description="API key id, 'anonymous' or 'system'")
    action: str
    resource_type: str
    resource_id: str | None
    outcome: str
    status_code: int
    detail: dict[str, Any] | None


class AuditEventList(BaseModel):
    data: list[AuditEventPublic]
    count: int
