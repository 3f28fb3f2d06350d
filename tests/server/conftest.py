"""Database fixtures: a real SQLite file and a real PostgreSQL database, never mocks.

- `sqlite_url`: a fresh SQLite file per test.
- `postgres_url`: a PostgreSQL database created once per test session (dropped at its end),
  whose `public` schema is emptied before each test.
- `database_url`: both of the above, as parameters `sqlite` and `postgresql` (marked `postgres`).
- `migrated_url`, `db_engine`, `db_session`: the same, upgraded to the head migration.

PostgreSQL comes from `TINYLLAVA_MED_TEST_POSTGRES_URL` (a role that may CREATE DATABASE), or
else from the local cluster on 127.0.0.1:5432, where the role `tinyllava_med_test` is created
(idempotently) by running psql as the `postgres` OS user. When PostgreSQL is not running the
tests FAIL, they do not skip: start it with `pg_ctlcluster 15 main start` (`.ci/run` does).
`pytest -m "not postgres"` runs the SQLite half alone.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from api_helpers import Api, make_api
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session

from tinyllava_med.server.db import migrate
from tinyllava_med.server.db.session import make_engine, normalize_database_url, session_factory

POSTGRES_URL_ENV = "TINYLLAVA_MED_TEST_POSTGRES_URL"
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ROLE = PG_PASSWORD = "tinyllava_med_test"
DB_PREFIX = "tlm_test_"

_NOT_RUNNING = (
    "PostgreSQL is not accepting connections on {where}. The database tests need it (they do "
    "not skip). Start the local cluster as root: `pg_ctlcluster 15 main start` (.ci/run does), "
    f"or set {POSTGRES_URL_ENV}=postgresql://USER:PASSWORD@HOST:PORT/postgres for a role with "
    "CREATEDB. To run only the SQLite half: pytest -m 'not postgres'."
)

_ENSURE_ROLE_SQL = f"""
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PG_ROLE}') THEN
    CREATE ROLE {PG_ROLE} LOGIN CREATEDB PASSWORD '{PG_PASSWORD}';
  ELSE
    ALTER ROLE {PG_ROLE} LOGIN CREATEDB PASSWORD '{PG_PASSWORD}';
  END IF;
END
$$;
"""


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _psql_as_postgres(sql: str) -> None:
    """Run `sql` through psql as the `postgres` OS user (peer authentication, local socket)."""
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql]
    if getpass.getuser() == "postgres":
        cmd = psql
    elif os.geteuid() == 0 and shutil.which("runuser"):
        cmd = ["runuser", "-u", "postgres", "--", *psql]
    else:
        pytest.fail(
            f"cannot create the test role: run the tests as root or as postgres, or set "
            f"{POSTGRES_URL_ENV} to a role that may CREATE DATABASE"
        )
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"creating the PostgreSQL test role failed: {e.stderr.strip()}")


def _admin_url() -> URL:
    """A URL to the maintenance database for a role that may create databases."""
    configured = os.environ.get(POSTGRES_URL_ENV)
    if configured:
        url = normalize_database_url(configured)
        if not _accepts_connections(url.host or "localhost", url.port or 5432):
            pytest.fail(_NOT_RUNNING.format(where=f"{url.host}:{url.port or 5432}"))
        return url
    if not _accepts_connections(PG_HOST, PG_PORT):
        pytest.fail(_NOT_RUNNING.format(where=f"{PG_HOST}:{PG_PORT}"))
    _psql_as_postgres(_ENSURE_ROLE_SQL)
    return URL.create(
        "postgresql+psycopg",
        username=PG_ROLE,
        password=PG_PASSWORD,
        host=PG_HOST,
        port=PG_PORT,
        database="postgres",
    )


def _drop_stale_databases(admin: Engine) -> None:
    """Drop test databases left by sessions that crashed (their process is gone)."""
    with admin.connect() as conn:
        names = conn.scalars(
            text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": DB_PREFIX + "%"}
        ).all()
        for name in names:
            pid = name[len(DB_PREFIX) :].split("_", 1)[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at its end."""
    admin_url = _admin_url()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{DB_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        if not os.environ.get(POSTGRES_URL_ENV):
            _drop_stale_databases(admin)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        admin.dispose()
        pytest.fail(f"cannot create the test database as {admin_url.username!r}: {e}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """The session's PostgreSQL database with an empty `public` schema."""
    engine = create_engine(make_url(postgres_database))
    try:
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
    return postgres_database


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    return f"sqlite:///{tmp_path}/tinyllava_med.db"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database: a SQLite file, then PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def migrated_url(database_url: str) -> str:
    migrate.upgrade(database_url)
    return database_url


@pytest.fixture
def db_engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_session(db_engine: Engine) -> Iterator[Session]:
    """A session on a migrated database; the test commits what it wants kept."""
    with session_factory(db_engine)() as session:
        yield session


@pytest.fixture
def api(tmp_path, database_url, tiny_lm) -> Iterator[Api]:
    """The app on SQLite and on PostgreSQL."""
    yield from make_api(tmp_path, database_url, tiny_lm)


@pytest.fixture
def sqlite_api(tmp_path, sqlite_url, tiny_lm) -> Iterator[Api]:
    """The app on SQLite only (for tests whose subject is not the database)."""
    yield from make_api(tmp_path, sqlite_url, tiny_lm)
