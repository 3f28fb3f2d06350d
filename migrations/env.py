"""Alembic environment for tinyllava_med.

Where the database comes from, first match wins:
1. `config.attributes["connection"]`: an open connection passed by code
   (`tinyllava_med.server.db.migrate`, tests);
2. `config.attributes["database_url"]` or the `sqlalchemy.url` option, set by code;
3. `Settings().database_url`: `TINYLLAVA_MED_DATABASE_URL`, else SQLite under the data dir.

SQLite runs in batch mode (`render_as_batch`) with foreign keys OFF during the migration:
batch mode rebuilds a table by copy, drop and rename, which must not cascade to child rows.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from tinyllava_med.server.db.models import Base
from tinyllava_med.server.db.session import make_engine, normalize_database_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if url:
        return str(url)
    from tinyllava_med.server.settings import Settings

    return Settings().database_url


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    url = normalize_database_url(_database_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_database_url(), sqlite_foreign_keys=False)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
