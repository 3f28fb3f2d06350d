"""The database: typed models (`models`), engines and sessions (`session`), data access and its
rules (`crud`), and migrations run from code (`migrate`, imported on its own: it pulls in Alembic).

API keys are created and verified in `tinyllava_med.server.auth`.
"""

from tinyllava_med.server.db.crud import (
    DomainError,
    InvalidReportUpdate,
    ReportFinalized,
    add_image,
    audit,
    count_reports,
    count_studies,
    create_report,
    create_study,
    enqueue_job,
    get_image,
    get_report,
    get_study,
    list_audit_events,
    list_reports,
    list_studies,
    update_report,
)
from tinyllava_med.server.db.models import (
    ApiKey,
    AuditEvent,
    Base,
    Image,
    Job,
    Report,
    ReportEdit,
    Study,
)
from tinyllava_med.server.db.session import make_engine, ping, session_factory

__all__ = [
    "ApiKey",
    "AuditEvent",
    "Base",
    "DomainError",
    "Image",
    "InvalidReportUpdate",
    "Job",
    "Report",
    "ReportEdit",
    "ReportFinalized",
    "Study",
    "add_image",
    "audit",
    "count_reports",
    "count_studies",
    "create_report",
    "create_study",
    "enqueue_job",
    "get_image",
    "get_report",
    "get_study",
    "list_audit_events",
    "list_reports",
    "list_studies",
    "make_engine",
    "ping",
    "session_factory",
    "update_report",
]
