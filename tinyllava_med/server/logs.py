"""How `serve` logs: text lines for a console (the default), or one JSON object per line for a
log collector (Loki, Elasticsearch, a cloud's logging) with `TINYLLAVA_MED_LOG_FORMAT=json`.

In JSON, every record, the server's and uvicorn's (errors and, with `ACCESS_LOG`, one line per
request), has `time` (ISO 8601, UTC), `level`, `logger` and `message`, plus `exc_info` for an
exception; an access line also has `method`, `path`, `status` and `client` as fields, so a
collector can filter on them without parsing text. Access lines, in either format, name the
route (`access_path`): no query string, and only the server's own ids from the path.
python-json-logger formats; uvicorn takes the same `logging.config` dictionary. What is
logged never holds patient identifiers (URLs carry only the server's ids), in either format,
also at DEBUG: `quiet_libraries` keeps the libraries that talk to the PACS from logging
queries, identifiers and credentials.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from tinyllava_med.server.route_table import route_table

JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


class UTCJsonFormatter(JsonFormatter):
    converter = staticmethod(time.gmtime)  # `time` in UTC, whatever the host's zone


class NoColour(logging.Filter):
    """uvicorn's terminal-coloured copy of a message (`color_message`) is not a field."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)
        return True


# The server's own ids, which a path may name: studies, reports and keys are UUID4s
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# a segment of a path of no API route kept as it is: a word such as `static`, `app.js`, `docs`
_WORD = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9]+)?$")
NO_ROUTE = "(no route)"
_served: list[Any] = []  # the app whose routes access lines name (`name_routes_of`)


def name_routes_of(app: Any) -> None:
    """Access lines name `app`'s routes (`serve` calls it with the app it serves)."""
    _served[:] = [app]


def access_path(path: str) -> str:
    """What an access line names for a request's path: its API route's template, with the
    server's ids (UUIDs, and integers where the route takes one) in place, and `{name}` for
    anything else a client put there: a STOW-RS path's Study Instance UID, or a name or an
    accession number a RIS put where an id goes. Another path is kept when it is made of plain
    words (`/static/app.js`), else it is `(no route)` (`//dicomweb/studies/1.2...`)."""
    path = path.split("?", 1)[0]
    for route in route_table(_served[0]) if _served else ():
        if m := route.regex.match(path):
            named = route.template
            for name, value in m.groupdict().items():
                ours = _UUID.match(value) or (name in route.int_params and value.isdigit())
                named = named.replace(f"{{{name}}}", value if ours else f"{{{name}}}")
            return named
    if path == "/" or all(_WORD.match(seg) for seg in path.removeprefix("/").split("/")):
        return path
    return NO_ROUTE


class NoQueryString(NoColour):
    """uvicorn's access record keeps its parts in `args` (client, method, path with the query
    string, HTTP version, status). The path becomes `access_path`'s: the query string can carry
    an identifier (`/v1/studies?accession_number=...`), and so can the path itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path = access_path(args[2])
            record.args = (args[0], args[1], path, args[3], args[4])
        return True


class AccessFields(NoQueryString):
    """The access record's parts as named fields, for JSON."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            record.client, record.method, record.path, _, record.status = args
        return True


def text_log_config() -> dict[str, Any]:
    """uvicorn's own text logging (`uvicorn.config.LOGGING_CONFIG`), its access lines without
    query strings."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["access"] = {"()": NoQueryString}
    config["handlers"]["access"].setdefault("filters", []).append("access")
    return config


def say(message: str, log_format: str = "text") -> None:
    """A line for the operator on stderr (where `serve` listens, where the first key is): the
    message alone, or with `LOG_FORMAT=json` a JSON object like the log records around it, so a
    collector reading JSON lines does not trip over it."""
    if log_format == "json":
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = {"time": now, "level": "INFO", "logger": "tinyllava_med", "message": message}
        message = json.dumps(line, ensure_ascii=False)
    print(message, file=sys.stderr, flush=True)


def json_log_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary sending the root logger and uvicorn's loggers to
    stderr as JSON lines; uvicorn.run(log_config=...) applies it when the server starts."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"plain": {"()": NoColour}, "access": {"()": AccessFields}},
        "formatters": {
            "json": {
                "()": UTCJsonFormatter,
                "fmt": JSON_FIELDS,
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
                "datefmt": "%Y-%m-%dT%H:%M:%SZ",
            }
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["plain"],
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["access"],
                "stream": "ext://sys.stderr",
            },
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


# The most these libraries may log, whatever the server's level: below it they log what must not
# reach a log file. dicomweb-client and urllib3 log each request's URL (a QIDO query's accession
# number) and dicomweb-client its headers (the PACS's credentials) at DEBUG; pynetdicom logs a
# line per DIMSE message at INFO (thousands for a CT). pydicom's and highdicom's validation
# messages quote element values (a patient's name, IDs), as log records and as warnings
# (highdicom warns with the name of a patient whose name has one component).
LIBRARY_LEVELS = {
    "dicomweb_client": logging.INFO,
    "urllib3": logging.INFO,
    "pynetdicom": logging.WARNING,
    "pydicom": logging.ERROR,
    "highdicom": logging.ERROR,
}
QUIET_WARNINGS = r"(pydicom|highdicom)(\.|$)"


# PostgreSQL's error messages quote the values of the failing row or key on lines of their own
# ("DETAIL:  Failing row contains (...)", "Key (sha256)=(...) already exists"): a question, an
# answer, a report's text, a DICOM value. (SQLAlchemy's own `[parameters: ...]` are hidden by the
# engines, `db.session.make_engine`.)
_DATABASE_DETAIL = re.compile(r"^[ \t]*(DETAIL|HINT|CONTEXT):.*(\n|$)", re.MULTILINE)


def without_values(text: str) -> str:
    """`text` (an error message, a traceback) without the lines where a database quotes
    values."""
    return _DATABASE_DETAIL.sub("", text)


_PACKAGE = str(Path(__file__).resolve().parents[1]) + os.sep  # .../tinyllava_med/


def _origin(e: BaseException) -> str | None:
    """The file of the frame that raised `e` (None without a traceback)."""
    tb = e.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


def _raised_in(e: BaseException) -> str:
    """The module where `e` was raised, as a dotted path (from its file), or "?"."""
    origin = _origin(e)
    if origin is None:
        return "?"
    parts = Path(origin).with_suffix("").parts
    for root in ("site-packages", "dist-packages", "lib"):
        if root in parts:
            parts = parts[len(parts) - parts[::-1].index(root) :]
            break
    return ".".join(parts[-3:])


def _kept_message(e: BaseException) -> bool:
    return (
        (_origin(e) or "").startswith(_PACKAGE)
        or (type(e).__module__ == "builtins" and isinstance(e, OSError))
        or type(e).__module__.startswith("sqlalchemy")
    )


def error_text(e: BaseException) -> str:
    """What may be kept of an exception where people read it (a job's `last_error`, which keys
    that read studies may list, and its log line): the messages of errors raised in this
    package (written with no patient data), of a database (without the values it quotes) and of
    the operating system (a refused connection), and for any other library only the error's type
    and where it was raised: pydicom's and highdicom's messages quote element values (a birth
    date, a name), and HTTP clients' the URL of a query (an accession number)."""
    name = type(e).__name__
    if _kept_message(e):
        message = getattr(e, "message", None)  # the project's APIError
        return f"{name}: {message if isinstance(message, str) else without_values(str(e))}"
    status = getattr(getattr(e, "response", None), "status_code", None)  # a PACS's answer
    http = f"HTTP {status}, " if isinstance(status, int) else ""
    return f"{name} ({http}raised in {_raised_in(e)}; its message is not kept)"


def scrubbed_traceback(e: BaseException) -> str:
    """`e`'s traceback with its chain, as Python prints it, but each exception's message as
    `error_text` keeps it and without a database's quoted values: the frames (file, line, code)
    hold no data, the messages of other libraries may."""
    parts: list[str] = []
    seen: set[int] = set()

    def add(exc: BaseException) -> None:
        seen.add(id(exc))
        cause = exc.__cause__
        context = None if exc.__suppress_context__ else exc.__context__
        if cause is not None and id(cause) not in seen:
            add(cause)
            parts.append(
                "\nThe above exception was the direct cause of the following exception:\n\n"
            )
        elif context is not None and id(context) not in seen:
            add(context)
            parts.append(
                "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        if exc.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(exc.__traceback__))
        parts.append(error_text(exc) + "\n")

    add(e)
    return without_values("".join(parts)).rstrip("\n")


def _record_without_values(factory: Callable[..., logging.LogRecord]) -> Any:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if record.exc_info and record.exc_info[1] is not None:
            # formatted here, once, for every handler and format (text and JSON use exc_text)
            record.exc_text = scrubbed_traceback(record.exc_info[1])
            record.exc_info = None
        return record

    make.without_values = True  # type: ignore[attr-defined]
    return make


def quiet_libraries() -> None:
    """Apply `LIBRARY_LEVELS`, turn off pynetdicom's dumps of every query's and answer's
    identifier (accession numbers, and any patient attributes a PACS returns), which it logs at
    INFO, silence `QUIET_WARNINGS`' warnings, and log every traceback as `scrubbed_traceback`
    writes it: no database's quoted values, no other library's messages (process-wide, once)."""
    warnings.filterwarnings("ignore", module=QUIET_WARNINGS)
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "without_values", False):
        logging.setLogRecordFactory(_record_without_values(factory))
    for name, level in LIBRARY_LEVELS.items():
        # the logger's own level, not the effective one: `serve` lowers the root logger to
        # TINYLLAVA_MED_LOG_LEVEL after this, and a logger left unset would follow it down
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < level:
            logger.setLevel(level)
    try:
        from pynetdicom import _config as pynetdicom_config
    except ImportError:  # pragma: no cover - the server extra installs it
        return
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
