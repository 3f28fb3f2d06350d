"""Run Alembic migrations from code, and check that the models and the migrations agree.

    upgrade("sqlite:///data/tinyllava_med.db")        # what `tinyllava-med db upgrade` does
    require_head("postgresql://...")                   # `serve` on PostgreSQL, at start
    assert check_models_match_migrations(url) == []    # after upgrading to head

Migrations are a separate step, never a side effect of import or of starting the app. The
Alembic environment is the repository's `migrations/` folder, found from this file's location
(`<repo>/tinyllava_med/server/db/migrate.py` -> `<repo>/migrations`); an installed wheel would
have to ship it as package data. No `alembic.ini` is read here, so the caller's logging setup
is left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import CheckConstraint, inspect, text
from sqlalchemy.engine import URL, Connection

from tinyllava_med.server.db.models import Base
from tinyllava_med.server.db.session import make_engine

REPO_ROOT = Path(__file__).resolve().parents[3]
MIGRATIONS_DIR = REPO_ROOT / "migrations"


class MigrationError(RuntimeError):
    pass


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for `migrations/`, bound to `connection` when given."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise MigrationError(
            f"Alembic environment not found at {MIGRATIONS_DIR}: run from a source checkout "
            "(an installed wheel does not ship migrations/)"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["configure_logger"] = False
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def _migration_connection(database_url: str | URL) -> Iterator[Connection]:
    # SQLite: foreign keys OFF while migrating (batch mode rebuilds tables), then verified.
    engine = make_engine(database_url, sqlite_foreign_keys=False)
    try:
        with engine.begin() as conn:
            yield conn
            if conn.dialect.name == "sqlite":
                bad = conn.execute(text("PRAGMA foreign_key_check")).fetchall()
                if bad:
                    raise MigrationError(f"foreign key violations after migrating: {bad[:5]}")
    finally:
        engine.dispose()


def _refuse_unknown(conn: Connection) -> None:
    """MigrationError when the database is at a revision this code does not have: a newer
    version migrated it (and this one was rolled back to), so neither upgrading nor serving
    can work."""
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None:
        return
    if current not in known_revisions():
        raise MigrationError(
            f"the database schema is at revision {current}, which this version does not know "
            f"(its newest is {head_revision()}): a newer version of the server migrated it. "
            f"Run that version again, or go back with it first (`tinyllava-med db downgrade "
            f"{head_revision()}`, run by the newer version), or restore the backup taken before "
            "the upgrade"
        )


def known_revisions() -> set[str]:
    """Every revision this code has (its head and those before it)."""
    return {
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    }


def refuse_unknown(database_url: str | URL) -> None:
    """`_refuse_unknown` for a database by its URL."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            _refuse_unknown(conn)
    finally:
        engine.dispose()


@contextmanager
def _said_plainly() -> Iterator[None]:
    """Alembic's refusals (a revision it does not have: `db downgrade 0099`) as a
    MigrationError, which the console prints as one line, not a traceback."""
    try:
        yield
    except (CommandError, RevisionError) as e:
        raise MigrationError(f"{e} (revisions here: 0001 to {head_revision()})") from None


def upgrade(database_url: str | URL, revision: str = "head") -> None:
    with _migration_connection(database_url) as conn:
        _refuse_unknown(conn)
        with _said_plainly():
            command.upgrade(alembic_config(conn), revision)


# What going below each revision drops for good (its downgrade removes the column, and an
# upgrade again cannot bring it back), counted in the database as it is: (what, SQL).
LOSSES: dict[str, tuple[str, str]] = {
    "0016": (
        "the full quantization label of {n} reports (cut to the scheme: cpu-int8+tower+lm_head "
        "becomes cpu-int8)",
        "SELECT count(*) FROM reports WHERE length(quantization) > 16",
    ),
    "0012": (
        "the weights digest recorded with {n} reports",
        "SELECT count(*) FROM reports WHERE model_weights IS NOT NULL",
    ),
    "0011": (
        "when {n} images were stored",
        "SELECT count(*) FROM images WHERE stored_at IS NOT NULL",
    ),
    "0010": (
        "which frame {n} reports were asked about",
        "SELECT count(*) FROM reports WHERE frame IS NOT NULL",
    ),
    "0006": (
        "that {n} images were released (their pixels are gone: they would read as missing, "
        "and their SRs fail)",
        "SELECT count(*) FROM images WHERE released_at IS NOT NULL",
    ),
    "0004": (
        "the expiry of {n} API keys (they would never expire)",
        "SELECT count(*) FROM api_keys WHERE expires_at IS NOT NULL",
    ),
    "0003": (
        "{n} amendments (amended reports become final, and amendment reasons go)",
        "SELECT (SELECT count(*) FROM reports WHERE status = 'amended') "
        "+ (SELECT count(*) FROM report_edits WHERE reason IS NOT NULL)",
    ),
    "0002": (
        "why {n} answers ended (cut short by the token limit, or not)",
        "SELECT count(*) FROM reports WHERE finish_reason IS NOT NULL",
    ),
    "0001": (
        "everything: {n} studies and API keys, with their images, reports and audit events",
        "SELECT (SELECT count(*) FROM studies) + (SELECT count(*) FROM api_keys)",
    ),
}


def _losses(conn: Connection, cfg: Config, target: str) -> list[str]:
    """What a downgrade to `target` drops for good, revision by revision (none for a target
    alembic does not know: it says so itself)."""
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None:
        return []
    try:
        passed = ScriptDirectory.from_config(cfg).iterate_revisions(current, target)
        revisions = [script.revision for script in passed]
    except (CommandError, RevisionError):
        return []
    lost = []
    for rev in revisions:
        if rev in LOSSES:
            what, sql = LOSSES[rev]
            n = conn.execute(text(sql)).scalar_one()
            if n:
                lost.append(f"below {rev}, " + what.format(n=n))
    return lost


def downgrade(
    database_url: str | URL,
    revision: str = "base",
    *,
    clear_long_accession_numbers: bool = False,
    accept_data_loss: bool = False,
) -> None:
    """Go back to `revision`. Refused when that drops data for good (`LOSSES`: a later upgrade
    does not bring it back), naming it, unless `accept_data_loss`. Below 0008, studies with
    accession numbers longer than 16 characters refuse it unless `clear_long_accession_numbers`
    (then they are emptied)."""
    with _migration_connection(database_url) as conn:
        cfg = alembic_config(conn)
        lost = _losses(conn, cfg, revision)
        if lost and not accept_data_loss:
            raise MigrationError(
                f"going back to {revision} drops for good: " + "; ".join(lost) + ". Back the "
                "database up first (`tinyllava-med db backup`), then downgrade with "
                "--accept-data-loss, or stay on this version"
            )
        cfg.attributes["clear_long_accession_numbers"] = clear_long_accession_numbers
        with _said_plainly():  # a refusal of 0008's rolls back every revision it passed
            command.downgrade(cfg, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(database_url: str | URL) -> str | None:
    """The database's revision; None for a database never migrated."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def require_head(database_url: str | URL) -> None:
    """MigrationError unless the database is at the code's head revision: a server on an older
    schema would fail request by request (a missing column) instead of once, at start."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            _refuse_unknown(conn)
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    head = head_revision()
    if current != head:
        raise MigrationError(
            f"the database schema is at revision {current or 'none (empty database)'}, this "
            f"version needs {head}: run `tinyllava-med db upgrade` (with the same "
            "TINYLLAVA_MED_DATABASE_URL) before `serve`; back the database up first"
        )


def check_models_match_migrations(database_url: str | URL) -> list[Any]:
    """Differences between `models.py` and the migrated database, as Alembic's autogenerate
    diff entries (`("add_column", ...)`, `[("modify_type", ...)]`), plus
    `("check_constraints", table, in_models, in_database)` for CHECK constraints, which
    autogenerate does not compare. Empty when they agree. Upgrade the database first."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs: list[Any] = list(compare_metadata(ctx, Base.metadata))
            inspector = inspect(conn)
            existing = set(inspector.get_table_names())
            for table in Base.metadata.sorted_tables:
                if table.name not in existing:
                    continue  # already reported as add_table
                wanted = sorted(
                    str(c.name) for c in table.constraints if isinstance(c, CheckConstraint)
                )
                found = sorted(str(c["name"]) for c in inspector.get_check_constraints(table.name))
                if wanted != found:
                    diffs.append(("check_constraints", table.name, wanted, found))
            return diffs
    finally:
        engine.dispose()
