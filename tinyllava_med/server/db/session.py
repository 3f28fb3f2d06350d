"""Engines and sessions: one place that knows how SQLite and PostgreSQL differ at connect time.

    engine = make_engine(settings.database_url)     # built by the app's lifespan, never at import
    Session = session_factory(engine)
    with Session.begin() as session:                 # commits on success, rolls back on error
        crud.create_study(session, Modality="CT")

SQLite: `check_same_thread=False` (FastAPI runs sync code in a thread pool), WAL journal (readers
do not block the writer), foreign keys ON, and a busy timeout. PostgreSQL: `pool_pre_ping`, so a
restarted database costs one retry, not a 500. `postgresql://` URLs use psycopg 3.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0


def normalize_database_url(url: str | URL) -> URL:
    """`postgres://` and `postgresql://` -> `postgresql+psycopg://` (psycopg 3 is the driver
    installed); anything that is neither SQLite nor PostgreSQL is refused."""
    u = make_url(url) if isinstance(url, str) else url
    if u.drivername in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported database {u.get_backend_name()!r}: expected sqlite or postgresql"
        )
    return u


def make_engine(url: str | URL, *, sqlite_foreign_keys: bool = True, echo: bool = False) -> Engine:
    """An engine for `url`. For a SQLite file, its folder is created if missing.

    Its errors and echo never show bound parameters: they hold questions, answers, report text
    and DICOM values, and a database error's message reaches logs and a job's `last_error`.

    `sqlite_foreign_keys=False` is for migrations only: SQLite batch mode rebuilds a table by
    dropping and renaming it, which with foreign keys ON would cascade-delete child rows. Such
    an engine's transactions also hold their DDL: Python's sqlite3 runs CREATE, DROP and ALTER
    outside any transaction unless one was begun explicitly, so a migration that failed halfway
    (a refused downgrade, a full disk) left a half-rebuilt schema behind.
    """
    u = normalize_database_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u, foreign_keys=sqlite_foreign_keys, echo=echo)
    # a database host that does not answer fails a connection in 5 s, not the OS's minutes: a
    # scrape then reports database_up 0 within Prometheus' timeout instead of timing out whole
    connect = {"connect_timeout": 5} if u.get_backend_name() == "postgresql" else {}
    return create_engine(
        u, pool_pre_ping=True, echo=echo, hide_parameters=True, connect_args=connect
    )


def _sqlite_engine(u: URL, *, foreign_keys: bool, echo: bool) -> Engine:
    memory = u.database in (None, "", ":memory:") or "mode=memory" in str(u.query)
    if not memory:
        # the owner's only: the database holds every report
        db = Path(u.database or "").expanduser()
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _owner_only(db)
    engine = create_engine(
        u,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        echo=echo,
        hide_parameters=True,  # see make_engine
        # SQLite connections are cheap to keep: enough for every concurrent request, so none
        # is opened (and set up) per request under load
        **({} if memory else {"pool_size": 32, "max_overflow": 32}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        if not foreign_keys:  # a migration's engine: SQLAlchemy's BEGIN below, not sqlite3's
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fewer fsyncs
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    if not foreign_keys:

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

    return engine


def _owner_only(db: Path) -> None:
    """The SQLite database and its write-ahead log and shared-memory files readable by their
    owner only (SQLite gives those two the database file's mode): they hold every report. A new
    database is created so, whatever the umask; one found open to others (made by an older
    version, or in a folder that existed already: `mkdir`'s mode does not change it) is closed
    to them."""
    try:
        if not db.exists():
            os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))  # SQLite starts an empty file
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists() and path.stat().st_mode & 0o077:
                path.chmod(path.stat().st_mode & 0o700)
    except OSError as e:  # another user's file, a read-only volume: SQLite says what it can
        log.warning("could not make the database file owner-only: %s: %s", e.strerror, e.filename)


def sqlite_write_held(url: str | URL, wait_s: float = 2.0, tries: int = 3) -> bool:
    """Whether another connection holds the SQLite file's write lock through `tries` waits of
    `wait_s` (a `sqlite3` shell or a tool with a transaction left open): every write would wait
    out the busy timeout and fail. Several tries, a moment apart: SQLite's busy handler polls,
    and a busy writer's next transaction can take the lock before a poll sees it free. A
    missing file, or another backend, holds none."""
    import sqlite3
    import time

    u = normalize_database_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return False
    db = Path(u.database).expanduser()
    if not db.is_file():
        return False
    for attempt in range(tries):
        if attempt:
            time.sleep(0.2)
        conn = sqlite3.connect(db, timeout=wait_s, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
        finally:
            conn.close()
    return True


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (responses are built after it)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def ping(engine: Engine) -> str | None:
    """The database's schema revision (None: never migrated); raises if it cannot answer (for
    `/readyz`, which compares it with the revision the server started on)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Call `fn` once the request's transaction has committed, and not at all if it rolls back
    (`deps.get_session` runs these): a metric then counts only what the database kept."""
    session.info.setdefault("after_commit", []).append(fn)


def run_after_commit(session: Session) -> None:
    for fn in session.info.pop("after_commit", []):
        fn()
