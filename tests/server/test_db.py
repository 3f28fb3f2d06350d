"""Database layer on real SQLite and real PostgreSQL: migrations match the models and round-trip,
data access keeps its rules (report history, signing), API keys store only hashes, audit rows
are written, and the auth dependencies answer 401/403 and audit the denial."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tinyllava_med import __version__
from tinyllava_med.server import auth
from tinyllava_med.server.db import crud, migrate
from tinyllava_med.server.db.models import ApiKey, AuditEvent, Base, Image, Report, ReportEdit
from tinyllava_med.server.db.session import make_engine, normalize_database_url, session_factory
from tinyllava_med.server.errors import install_error_handlers
from tinyllava_med.server.logs import quiet_libraries, without_values
from tinyllava_med.server.report_writer import ReportWriter
from tinyllava_med.server.settings import Settings

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


def _a_study(conn, status: str) -> None:
    """Study `s`, made on 2026-01-01, in `status`."""
    conn.execute(
        text("INSERT INTO studies (id, created_at, status) VALUES ('s', :t, :status)"),
        {"t": "2026-01-01 00:00:00", "status": status},
    )


# --- settings ----------------------------------------------------------------------------------


def test_settings_defaults_are_local_and_secure(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/tinyllava_med.db"
    assert s.images_dir == tmp_path.resolve() / "images"
    assert (s.model, s.quant, s.host, s.port) == ("demo", None, "127.0.0.1", 8000)
    assert s.auth_disabled is False and s.allow_remote_image_urls is False
    assert s.max_upload_bytes == 64 * 1024 * 1024 and s.max_question_chars == 2000
    assert (s.max_new_tokens, s.default_max_new_tokens) == (512, 128)
    assert (s.max_batch_size, s.batch_window_ms, s.max_queue) == (8, 50.0, 64)


def test_settings_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINYLLAVA_MED_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TINYLLAVA_MED_PORT", "9001")
    monkeypatch.setenv("TINYLLAVA_MED_QUANT", "4bit")
    monkeypatch.setenv("TINYLLAVA_MED_TEST_POSTGRES_URL", "not a setting: ignored")
    s = Settings()
    assert (s.port, s.quant, s.data_dir) == (9001, "4bit", tmp_path.resolve())
    s = Settings(port=9002, quant="auto", database_url="postgresql://u:p@db/tlm")  # type: ignore[arg-type]
    assert (s.port, s.quant, s.database_url) == (9002, None, "postgresql://u:p@db/tlm")


@pytest.mark.parametrize(
    "overrides",
    [
        {"quant": "3bit"},
        {"port": 0},
        {"database_url": "mysql://u:p@h/db"},
        {"max_new_tokens": 64, "default_max_new_tokens": 128},
        {"prot": 8000},  # a misspelt override is an error, not ignored
        {"auth_disabled": True, "host": "0.0.0.0"},  # every caller an admin, on the network
        {"auth_disabled": True, "host": "10.0.0.5"},
    ],
)
def test_settings_refuse_bad_values(overrides: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def test_auth_disabled_is_for_this_machine_only(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert Settings(data_dir=tmp_path, auth_disabled=True, host=host).auth_disabled
    with pytest.raises(ValueError, match="auth_disabled makes every caller an admin"):
        Settings(data_dir=tmp_path, auth_disabled=True, host="0.0.0.0")


def test_postgresql_urls_use_psycopg3() -> None:
    assert normalize_database_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_database_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    with pytest.raises(ValueError, match="unsupported database"):
        normalize_database_url("mysql://u@h/d")


# --- migrations --------------------------------------------------------------------------------


def test_head_matches_models(database_url: str) -> None:
    assert migrate.current_revision(database_url) is None
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision() == "0016"
    assert migrate.check_models_match_migrations(database_url) == []


def test_0002_keeps_existing_reports(database_url: str) -> None:
    """A database made before reports recorded their finish reason upgrades in place."""
    migrate.upgrade(database_url, "0001")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO studies (id, created_at, status) VALUES ('s', :t, 'reported')"),
                {"t": "2026-01-01 00:00:00"},
            )
            conn.execute(
                text(
                    "INSERT INTO reports (id, study_id, question, answer, text, status, model, "
                    "quantization, server_version, created_at, updated_at) VALUES ('r', 's', 'q', "
                    "'a', 'a', 'draft', 'm', 'none', '0.1.0', :t, :t)"
                ),
                {"t": "2026-01-01 00:00:00"},
            )
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT answer, finish_reason FROM reports WHERE id = 'r'")
            ).one()
        assert tuple(row) == ("a", None)
        migrate.downgrade(database_url, "0001", accept_data_loss=True)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT answer FROM reports")).scalar_one() == "a"
    finally:
        engine.dispose()


# image 'i' of study 's', as the columns were before 0011
_AN_IMAGE = text(
    "INSERT INTO images (id, study_id, n, sha256, kind, size_bytes, rows, columns, n_frames, "
    "safe_metadata, created_at) VALUES ('i', 's', 0, 'h', 'png', 1, 1, 1, 1, '{}', :t)"
)


def test_0008_widens_accession_numbers_and_keeps_every_study_child(database_url: str) -> None:
    """0008 rebuilds `studies` on SQLite (batch mode): a populated database keeps its studies,
    their images and reports (no cascade), and takes 64-character accession numbers; a
    downgrade refuses while a longer one is held (cut short, it could be another order's), or
    empties them when told to."""
    migrate.upgrade(database_url, "0007")
    engine = make_engine(database_url)
    t = {"t": "2026-01-01 00:00:00"}
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (id, created_at, status, accession_number) "
                    "VALUES ('s', :t, 'reported', 'ACC-16-CHARS-OK!')"
                ),
                t,
            )
            conn.execute(_AN_IMAGE, t)
            conn.execute(
                text(
                    "INSERT INTO reports (id, study_id, image_id, question, answer, text, status, "
                    "model, quantization, server_version, created_at, updated_at) VALUES ('r', "
                    "'s', 'i', 'q', 'a', 'a', 'draft', 'm', 'none', '0.1.0', :t, :t)"
                ),
                t,
            )
        migrate.upgrade(database_url)
        long = "RIS-2026-" + "7" * 55  # 64 characters
        with engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM images")).scalar_one() == 1
            assert conn.execute(text("SELECT image_id FROM reports")).scalar_one() == "i"
            conn.execute(text("UPDATE studies SET accession_number = :a"), {"a": long})
        assert migrate.check_models_match_migrations(database_url) == []
        with pytest.raises(migrate.MigrationError, match="1 studies hold accession numbers"):
            migrate.downgrade(database_url, "0007", accept_data_loss=True)
        assert migrate.current_revision(database_url) == migrate.head_revision()  # untouched
        with engine.connect() as conn:
            assert conn.execute(text("SELECT accession_number FROM studies")).scalar_one() == long
        migrate.downgrade(
            database_url, "0007", clear_long_accession_numbers=True, accept_data_loss=True
        )
        with engine.connect() as conn:
            assert conn.execute(text("SELECT accession_number FROM studies")).scalar_one() is None
            assert conn.execute(text("SELECT count(*) FROM reports")).scalar_one() == 1
        with pytest.raises(migrate.MigrationError, match="0099.*revisions here: 0001 to 00"):
            migrate.downgrade(database_url, "0099")
    finally:
        engine.dispose()


def test_0013_a_signed_study_with_a_draft_awaits_a_signature(database_url: str) -> None:
    """Before 0013 a study stayed `signed` when a later question added a draft; the upgrade
    makes such a study `reported`, as the worklist lists it, and leaves the others."""
    migrate.upgrade(database_url, "0012")
    engine = make_engine(database_url)
    t = {"t": "2026-01-01 00:00:00"}
    report = text(
        "INSERT INTO reports (id, study_id, question, answer, text, status, model, "
        "quantization, server_version, created_at, updated_at) VALUES (:id, :s, 'q', 'a', 'a', "
        ":status, 'm', 'none', '0.1.0', :t, :t)"
    )
    try:
        with engine.begin() as conn:
            for study in ("with-draft", "all-signed", "unsigned"):
                status = "reported" if study == "unsigned" else "signed"
                conn.execute(
                    text("INSERT INTO studies (id, created_at, status) VALUES (:s, :t, :st)"),
                    {**t, "s": study, "st": status},
                )
            for rid, study, status in (
                ("r1", "with-draft", "final"),
                ("r2", "with-draft", "draft"),
                ("r3", "all-signed", "amended"),
                ("r4", "unsigned", "draft"),
            ):
                conn.execute(report, {**t, "id": rid, "s": study, "status": status})
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            got = dict(conn.execute(text("SELECT id, status FROM studies")).all())
        assert got == {"with-draft": "reported", "all-signed": "signed", "unsigned": "reported"}
        migrate.downgrade(database_url, "0012", accept_data_loss=True)
    finally:
        engine.dispose()


def test_a_downgrade_that_drops_data_for_good_is_refused_naming_it(database_url: str) -> None:
    """`db downgrade` dropped amendments, key expiry, the release of images and weights digests
    without a word, and an upgrade again did not bring them back: it now names what it would
    drop and goes on only with `accept_data_loss`. A downgrade that drops nothing goes on."""
    migrate.upgrade(database_url)
    head = migrate.head_revision()
    engine = make_engine(database_url)
    t = {"t": "2026-01-01 00:00:00"}
    try:
        with engine.begin() as conn:
            _a_study(conn, "signed")
            conn.execute(
                text(
                    "INSERT INTO reports (id, study_id, question, answer, text, status, model, "
                    "quantization, server_version, model_weights, created_at, updated_at) VALUES "
                    "('r', 's', 'q', 'a', 'a', 'amended', 'm', 'none', '0.1.0', 'w', :t, :t)"
                ),
                t,
            )
        with pytest.raises(migrate.MigrationError) as refused:
            migrate.downgrade(database_url, "0002")
        said = str(refused.value)
        assert "below 0012, the weights digest recorded with 1 reports" in said
        assert "below 0003, 1 amendments" in said and "--accept-data-loss" in said
        assert migrate.current_revision(database_url) == head  # nothing done
        migrate.downgrade(database_url, "-3")  # 0016 -> 0013 drops nothing
        assert migrate.current_revision(database_url) == "0013"
        migrate.downgrade(database_url, "0011", accept_data_loss=True)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT status FROM reports")).scalar_one() == "amended"
        assert migrate.current_revision(database_url) == "0011"
    finally:
        engine.dispose()


def test_0016_stores_long_quantization_labels_and_going_back_cuts_them_to_the_scheme(
    database_url: str,
) -> None:
    """`cpu-int8+tower+lm_head` (22 characters) did not fit VARCHAR(16): PostgreSQL refused
    every answer of such a model. Going back below 0016 says so, and cuts it to its scheme."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    t = {"t": "2026-01-01 00:00:00"}
    try:
        with engine.begin() as conn:
            _a_study(conn, "reported")
            for rid, quant in (("a", "cpu-int8+tower+lm_head"), ("b", "4bit+tower+projector")):
                conn.execute(
                    text(
                        "INSERT INTO reports (id, study_id, question, answer, text, status, "
                        "model, quantization, server_version, created_at, updated_at) VALUES "
                        "(:id, 's', 'q', 'a', 'a', 'draft', 'm', :q, '0.1.0', :t, :t)"
                    ),
                    {**t, "id": rid, "q": quant},
                )
        with pytest.raises(migrate.MigrationError, match="full quantization label of 2 reports"):
            migrate.downgrade(database_url, "0015")
        migrate.downgrade(database_url, "0015", accept_data_loss=True)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, quantization FROM reports ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [("a", "cpu-int8"), ("b", "4bit")]
    finally:
        engine.dispose()


def test_0011_counts_existing_images_stored_when_they_arrived(database_url: str) -> None:
    """Image retention counts from `images.stored_at`; images stored before 0011 take their
    `created_at`, so an upgrade releases nothing sooner or later than before it."""
    migrate.upgrade(database_url, "0010")
    engine = make_engine(database_url)
    t = {"t": "2026-01-01 00:00:00"}
    try:
        with engine.begin() as conn:
            _a_study(conn, "received")
            conn.execute(_AN_IMAGE, t)
        migrate.upgrade(database_url)
        with Session(engine) as session:
            image = session.get(Image, "i")
            assert image is not None and image.stored_at == image.created_at
            assert image.stored_at.replace(tzinfo=None) == datetime(2026, 1, 1)
        migrate.downgrade(database_url, "0010", accept_data_loss=True)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM images")).scalar_one() == 1
    finally:
        engine.dispose()


def test_0003_allows_amended_reports_and_downgrades_them_to_final(database_url: str) -> None:
    """0003 lets a signed report be amended (a status the constraints refused) and keeps what
    each edit replaced; downgrading makes amended reports final again, text and history kept."""
    migrate.upgrade(database_url, "0002")
    engine = make_engine(database_url)
    report = (
        "INSERT INTO reports (id, study_id, question, answer, text, status, model, quantization, "
        "server_version, created_at, updated_at) VALUES (:id, 's', 'q', 'a', 'b', :status, 'm', "
        "'none', '0.1.0', :t, :t)"
    )
    edit = (
        "INSERT INTO report_edits (report_id, previous_text, new_text, previous_status, "
        "new_status, edited_by, edited_at) VALUES ('r', 'a', 'b', 'final', :status, 'k', :t)"
    )
    t = {"t": "2026-01-01 00:00:00"}
    try:
        with engine.begin() as conn:
            _a_study(conn, "signed")
            conn.execute(text(report), {"id": "r", "status": "final", **t})
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(report), {"id": "r2", "status": "amended", **t})
        migrate.upgrade(database_url, "0003")
        with engine.begin() as conn:
            conn.execute(text("UPDATE reports SET status = 'amended' WHERE id = 'r'"))
            conn.execute(text(edit), {"status": "amended", **t})
            conn.execute(text("UPDATE report_edits SET reason = 'typo'"))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(report), {"id": "r3", "status": "signed", **t})
        migrate.downgrade(database_url, "0002", accept_data_loss=True)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT status, text FROM reports")).one() == ("final", "b")
            row = conn.execute(text("SELECT previous_status, new_status FROM report_edits")).one()
            assert tuple(row) == ("final", "final")
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(report), {"id": "r4", "status": "amended", **t})
    finally:
        engine.dispose()


def test_a_migration_that_fails_halfway_leaves_sqlite_as_it_was(tmp_path: Path) -> None:
    """A downgrade to 0007 that 0008 refuses, after 0014 to 0009 have run (alembic itself, not
    `migrate.downgrade`, which asks first): the database is at the head as before, with 0014's
    tables, and no half-built table left. Before, Python's sqlite3 ran each CREATE, DROP and
    ALTER outside the transaction: 0014's rebuilds stayed, with a temporary table, so the next
    migration failed on it."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'half.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (id, created_at, status, accession_number) "
                "VALUES ('s', '2026-01-01 00:00:00', 'reported', :a)"
            ),
            {"a": "A" * 20},
        )

    def schema() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            return sorted(conn.execute(text("SELECT name, sql FROM sqlite_master")).all())

    before = schema()
    with (
        pytest.raises(migrate.MigrationError, match="1 studies hold accession numbers"),
        migrate._migration_connection(url) as conn,
    ):
        command.downgrade(migrate.alembic_config(conn), "0007")
    assert migrate.current_revision(url) == migrate.head_revision()
    assert schema() == before and not any("_alembic_tmp" in name for name, _ in before)
    engine.dispose()
    migrate.downgrade(
        url, "0007", clear_long_accession_numbers=True, accept_data_loss=True
    )  # and it still works
    assert migrate.current_revision(url) == "0007"


def test_0014_job_ids_are_never_handed_out_again(database_url: str) -> None:
    """A deleted study's jobs go with it (ON DELETE CASCADE). The next job must not get one of
    their ids, which the audit log and a retrieve's answer still name: before 0014, SQLite's
    INTEGER PRIMARY KEY gave it max(id) + 1. 0014 rebuilds the table with AUTOINCREMENT and
    keeps the rows it copies; downgraded, the table is rebuilt without it, rows kept."""
    migrate.upgrade(database_url, "0013")
    engine = make_engine(database_url)
    t = {"t": "2026-01-01 00:00:00"}
    try:
        with engine.begin() as conn:
            _a_study(conn, "reported")
            for study in ("NULL", "'s'", "'s'"):
                conn.execute(
                    text(
                        "INSERT INTO jobs (kind, study_id, payload, status, attempts, "
                        f"max_attempts, run_after, created_at, updated_at) VALUES ('k', {study}, "
                        "'{}', 'done', 1, 3, :t, :t, :t)"
                    ),
                    t,
                )
        migrate.upgrade(database_url)
        with engine.begin() as conn:
            ids = conn.execute(text("SELECT id FROM jobs ORDER BY id")).scalars().all()
            assert len(ids) == 3
            conn.execute(text("DELETE FROM studies WHERE id = 's'"))  # its two jobs go
            assert conn.execute(text("SELECT id FROM jobs")).scalars().all() == ids[:1]
        with session_factory(engine).begin() as session:
            job = crud.enqueue_job(session, kind="sweep_images")
            session.flush()
            assert job.id > ids[-1]
        migrate.downgrade(database_url, "0013", accept_data_loss=True)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 2
        migrate.upgrade(database_url)
        assert migrate.check_models_match_migrations(database_url) == []
    finally:
        engine.dispose()


def test_the_sqlite_database_is_its_owners_only(tmp_path: Path) -> None:
    """The database holds every report: created 0600 whatever the umask, with its -wal and
    -shm files (SQLite gives them its mode), also in a data folder that existed with 0755; one
    left readable by others (an older version, a 022 umask) is closed to them at the next
    start."""
    import os
    import sqlite3

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        engine = make_engine(f"sqlite:///{data / 'new.db'}")
        migrate.upgrade(f"sqlite:///{data / 'new.db'}")
        with engine.begin() as conn:  # WAL mode: the -wal and -shm files exist while open
            conn.execute(text("SELECT count(*) FROM studies"))
            modes = {p.name: p.stat().st_mode & 0o777 for p in data.iterdir()}
        engine.dispose()
        assert modes == {"new.db": 0o600, "new.db-wal": 0o600, "new.db-shm": 0o600}, modes
        sqlite3.connect(data / "older.db").execute("CREATE TABLE t (x)").connection.close()
        (data / "older.db").chmod(0o644)
        make_engine(f"sqlite:///{data / 'older.db'}").dispose()
        assert (data / "older.db").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_downgrade_to_base_and_upgrade_round_trips(database_url: str) -> None:
    migrate.upgrade(database_url)
    migrate.downgrade(database_url, "base", accept_data_loss=True)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    assert migrate.current_revision(database_url) is None
    diffs = migrate.check_models_match_migrations(database_url)
    assert {d[1].name for d in diffs if d[0] == "add_table"} == set(Base.metadata.tables)
    migrate.upgrade(database_url)
    assert migrate.check_models_match_migrations(database_url) == []


@pytest.mark.postgres
def test_serve_refuses_a_postgresql_schema_behind_the_code(
    postgres_url: str, tmp_path: Path, tiny_lm: object
) -> None:
    """PostgreSQL is migrated as its own step: an app started on an older schema stops at once,
    saying what to run, instead of failing requests on a missing column."""
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app

    migrate.upgrade(postgres_url, "0003")
    import subprocess
    import sys

    from api_helpers import free_port

    out = subprocess.run(  # `serve` says so in one line, before "serving on" or a traceback
        [sys.executable, "-m", "tinyllava_med.cli", "serve", "--port", str(free_port())],
        env={
            **os.environ,
            "TINYLLAVA_MED_DATA_DIR": str(tmp_path / "cli"),
            "TINYLLAVA_MED_DATABASE_URL": postgres_url,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "tinyllava-med serve: the database schema is at revision 0003" in out.stderr
    assert "Traceback" not in out.stderr and "serving on" not in out.stderr
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=postgres_url), model=tiny_lm)
    with (
        pytest.raises(
            migrate.MigrationError,
            match=rf"revision 0003, this version needs {migrate.head_revision()}.*"
            r"tinyllava-med db upgrade",
        ),
        TestClient(app),
    ):
        pass
    migrate.upgrade(postgres_url)
    with TestClient(
        create_app(Settings(data_dir=tmp_path / "data", database_url=postgres_url), model=tiny_lm)
    ) as client:
        assert client.get("/healthz").status_code == 200


def test_drift_is_reported(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_studies_modality"))
    finally:
        engine.dispose()
    diffs = migrate.check_models_match_migrations(migrated_url)
    assert [d[0] for d in diffs] == ["add_index"]


# --- studies and images ------------------------------------------------------------------------


def test_columns_hold_what_the_imaging_layer_keeps() -> None:
    """Every DICOM value the server files into a column fits it: `MAX_LENGTH` bounds what the
    imaging layer keeps (PostgreSQL refuses a longer value, and with it the whole file)."""
    from tinyllava_med.imaging.metadata import MAX_LENGTH
    from tinyllava_med.server.db.models import Study

    filed = 0
    for model in (Study, Image):
        for attr in inspect(model).column_attrs:
            if attr.key in MAX_LENGTH:
                assert attr.columns[0].type.length >= MAX_LENGTH[attr.key], (model, attr.key)
                filed += 1
    assert filed == 8  # the study's UID, accession, modality, body part; the image's 3 UIDs,
    # modality


def test_studies_and_images(db_engine: Engine) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        ct = crud.create_study(
            s, StudyInstanceUID="1.2.3", Modality="CT", StudyDate="20240131", description="head"
        )
        mr = crud.create_study(s, StudyDate="not a date")
        first = crud.add_image(s, study=ct, sha256=SHA_A, kind="dicom", size_bytes=10, rows=512)
        second = crud.add_image(
            s,
            study=ct,
            sha256=SHA_B,
            kind="png",
            size_bytes=20,
            safe_metadata={"Modality": "CT", "window": [40, 400]},
        )
        crud.add_image(s, study=mr, sha256=SHA_A, kind="dicom", size_bytes=10, Modality="MR")
        assert (first.n, second.n) == (0, 1)
        ct_id, mr_id = ct.id, mr.id

    with Session_() as s:
        study = crud.get_study(s, ct_id)
    assert study is not None  # read after the session closed: images were loaded with it
    assert study.StudyDate == date(2024, 1, 31) and study.status == "received"
    assert [(i.n, i.kind) for i in study.images] == [(0, "dicom"), (1, "png")]
    assert study.images[1].safe_metadata == {"Modality": "CT", "window": [40, 400]}
    assert study.created_at.tzinfo is not None and study.created_at.utcoffset() == timedelta(0)

    with Session_() as s:
        mr_study = crud.get_study(s, mr_id)
        assert mr_study is not None
        assert mr_study.StudyDate is None and mr_study.Modality == "MR"  # from its first image
        assert crud.get_study(s, "no-such-id") is None
        assert [x.id for x in crud.list_studies(s, limit=10)] == [mr_id, ct_id]
        assert [x.id for x in crud.list_studies(s, crud.StudyFilter(modality="CT"), limit=10)] == [
            ct_id
        ]
        assert [x.id for x in crud.list_studies(s, limit=1, offset=1)] == [ct_id]
        assert (crud.count_studies(s), crud.count_studies(s, crud.StudyFilter(modality="MR"))) == (
            2,
            1,
        )
        image = crud.get_image(s, ct_id, 1)
        assert image is not None and image.sha256 == SHA_B
        assert crud.get_image(s, ct_id, 2) is None
        with pytest.raises(ValueError, match="limit"):
            crud.list_studies(s, limit=0)


def test_image_index_is_unique_within_a_study(db_session: Session) -> None:
    study = crud.create_study(db_session)
    crud.add_image(db_session, study=study, sha256=SHA_A, kind="png", size_bytes=1)
    with pytest.raises(IntegrityError):
        crud.add_image(db_session, study=study, sha256=SHA_B, kind="png", size_bytes=1, n=0)


def test_foreign_keys_are_enforced(db_session: Session) -> None:
    db_session.add(Image(study_id="missing", n=0, sha256=SHA_A, kind="png", size_bytes=1))
    with pytest.raises(IntegrityError):
        db_session.flush()


def test_database_errors_never_show_the_values_they_carried(db_session: Session, caplog) -> None:
    """A failed statement's message (logged, and kept as a job's `last_error`) names the SQL but
    not its parameters: they hold questions, answers, report text and DICOM values."""
    phi = "Patient Doe, Jane: 3 cm mass"
    db_session.add(
        Report(
            study_id="missing",
            image_id=None,
            question=phi,
            answer=phi,
            text=phi,
            model="m",
            quantization="none",
        )
    )
    with pytest.raises(IntegrityError) as raised:
        db_session.flush()
    assert "hidden" in str(raised.value)  # SQLAlchemy's parameters
    # PostgreSQL's message quotes the failing row ("DETAIL:  Failing row contains ..."): it goes
    message = without_values(str(raised.value))
    assert "INSERT INTO reports" in message and "Jane" not in message
    quiet_libraries()  # what the app does: every logged traceback loses such lines too
    with caplog.at_level(logging.ERROR):
        logging.getLogger("tinyllava_med.test").error("failed", exc_info=raised.value)
    assert "IntegrityError" in caplog.text and "INSERT INTO reports" in caplog.text
    assert "Jane" not in caplog.text


def test_check_constraints_are_enforced(db_session: Session) -> None:
    study = crud.create_study(db_session)
    db_session.add(Image(study_id=study.id, n=0, sha256=SHA_A, kind="gif", size_bytes=1))
    with pytest.raises(IntegrityError):
        db_session.flush()


# --- reports -----------------------------------------------------------------------------------


def _report(s: Session) -> Report:
    study = crud.create_study(s, Modality="CT")
    image = crud.add_image(s, study=study, sha256=SHA_A, kind="dicom", size_bytes=1)
    return crud.create_report(
        s,
        study=study,
        image=image,
        question="Is there a fracture?",
        answer="No fracture.",
        model="demo",
        variant="demo",
        quantization="none",
        model_version="abc123",
        latency_ms=12.5,
        prompt_tokens=30,
        completion_tokens=4,
        created_by="key-1",
    )


M = {"model": "m", "quantization": "none"}


def test_a_study_is_signed_while_no_draft_awaits_a_signature(db_engine: Engine) -> None:
    """Signing one of two drafts leaves the study `reported`; signing the other makes it
    `signed`; a new draft, by the ORM or by the answering hot path, takes it back."""
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        first = _report(s)
        study = first.study
        second = crud.create_report(
            s, study=study, image=study.images[0], question="Any mass?", answer="No.", **M
        )
        crud.update_report(s, first, status="final", actor="rad-1")
        assert study.status == "reported"
        crud.update_report(s, second, status="final", actor="rad-1")
        assert study.status == "signed"
        crud.create_report(s, study=study, image=None, question="Size?", answer="-", **M)
        assert study.status == "reported"
        crud.update_report(s, study.reports[-1], status="final", actor="rad-1")
        assert study.status == "signed"
        study_id = study.id
    row = crud.draft_report_row(
        study_id=study_id, image_id=None, question="q", answer="a", model="m"
    )
    with db_engine.begin() as conn:
        crud.insert_draft_reports(conn, [{**row, "quantization": "none"}])
    with Session_() as s:
        assert crud.get_study(s, study_id).status == "reported"


def test_report_records_provenance(db_engine: Engine) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        report_id = _report(s).id
    with Session_() as s:
        r = crud.get_report(s, report_id)
        assert r is not None
        assert (r.answer, r.text, r.status) == ("No fracture.", "No fracture.", "draft")
        assert (r.model, r.variant, r.quantization, r.model_version) == (
            "demo",
            "demo",
            "none",
            "abc123",
        )
        assert r.server_version == __version__
        assert (r.latency_ms, r.prompt_tokens, r.completion_tokens) == (12.5, 30, 4)
        assert r.study.status == "reported"


def test_insert_draft_reports_writes_what_create_report_writes(db_engine: Engine) -> None:
    """The answering hot path's Core INSERT: same row as the ORM path, study marked reported."""
    fields = {
        "question": "Is there a fracture?",
        "answer": "No fracture.",
        "model": "demo",
        "variant": "demo",
        "quantization": "none",
        "model_version": "abc123",
        "latency_ms": 12.5,
        "prompt_tokens": 30,
        "completion_tokens": 4,
        "created_by": "key-1",
        "finish_reason": "stop",
    }
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        orm_id = _report(s).id
        study = crud.create_study(s, Modality="CT")
        image = crud.add_image(s, study=study, sha256=SHA_A, kind="dicom", size_bytes=1)
        study_id, image_id = study.id, image.id
    with Session_.begin() as s:
        row = crud.draft_report_row(study_id=study_id, image_id=image_id, **fields)
        crud.insert_draft_reports(s, [row])
        detached = Report(**row)
    columns = [
        c.key for c in Report.__table__.columns if c.key not in ("id", "study_id", "image_id")
    ]
    with Session_() as s:
        stored, orm = crud.get_report(s, detached.id), crud.get_report(s, orm_id)
        assert stored is not None and orm is not None and stored.study.status == "reported"
        assert stored.image_id == image_id and stored.image.n == 0
        for key in columns:  # the detached object says what the row says
            assert getattr(detached, key) == getattr(stored, key), key
        same = {k: getattr(stored, k) for k in columns if k not in ("created_at", "updated_at")}
        assert same == {k: getattr(orm, k) for k in same} | {"finish_reason": "stop"}


def test_insert_draft_reports_for_a_deleted_study_fails_its_transaction(db_engine: Engine) -> None:
    with pytest.raises(IntegrityError), session_factory(db_engine).begin() as s:
        row = crud.draft_report_row(
            study_id="gone", image_id=None, question="q", answer="a", model="m", quantization="none"
        )
        crud.insert_draft_reports(s, [row])


def test_report_writer_stores_answers_finishing_together_in_one_transaction(
    db_engine: Engine,
) -> None:
    """Answers that finish together are stored in one commit, each with its audit event; a
    study deleted meanwhile fails only its own request, and the others are still stored."""
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        study = crud.create_study(s, Modality="CT")
        image = crud.add_image(s, study=study, sha256=SHA_A, kind="dicom", size_bytes=1)
        study_id, image_id = study.id, image.id
    commits: list[int] = []
    event.listen(db_engine, "commit", lambda conn: commits.append(1))

    def row(study: str, i: int) -> tuple[dict, dict]:
        r = crud.draft_report_row(
            study_id=study,
            image_id=image_id if study == study_id else None,
            question=f"q{i}",
            answer=f"a{i}",
            model="m",
            quantization="none",
        )
        a = crud.audit_row(
            actor="key-1",
            action="question.ask",
            resource_type="study",
            resource_id=study,
            outcome="ok",
            status_code=201,
            detail={"report_id": r["id"]},
        )
        return r, a

    async def write_all(rows: list[tuple[dict, dict]], group: bool = True) -> list[object]:
        writer = ReportWriter(db_engine, group=group)
        return await asyncio.gather(*(writer.write(r, a) for r, a in rows), return_exceptions=True)

    together = [row(study_id, i) for i in range(3)]
    assert asyncio.run(write_all(together)) == [None, None, None]
    assert len(commits) == 1
    one_by_one = [row(study_id, i) for i in range(6, 8)]
    assert asyncio.run(write_all(one_by_one, group=False)) == [None, None]
    assert len(commits) == 3
    together += one_by_one

    mixed = [row(study_id, 3), row("deleted-meanwhile", 4), row(study_id, 5)]
    results = asyncio.run(write_all(mixed))
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], IntegrityError)

    with Session_() as s:
        stored = {r.id for r in s.scalars(select(Report))}
        audited = {
            e.detail["report_id"]
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "question.ask"))
        }
        assert crud.get_study(s, study_id).status == "reported"
    ok = [r["id"] for r, _ in together + [mixed[0], mixed[2]]]
    assert set(ok) <= stored and set(ok) <= audited
    assert mixed[1][0]["id"] not in stored | audited


def test_an_answer_marks_its_study_reported_only_while_it_is_received(db_engine: Engine) -> None:
    """The first answer about a study marks it reported; an answer whose question saw the study
    reported (or signed) already writes no UPDATE: statuses never go back to received."""
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        study = crud.create_study(s, Modality="CT")
        crud.add_image(s, study=study, sha256=SHA_A, kind="dicom", size_bytes=1)
        study_id = study.id
    with db_engine.connect() as conn:
        assert crud.image_ref(conn, study_id, 0)[1:] == (SHA_A, "received")
        assert crud.image_ref(conn, study_id, 1) is None
    updates: list[str] = []
    event.listen(
        db_engine,
        "before_cursor_execute",
        lambda conn, cursor, stmt, *args: (
            stmt.lstrip().upper().startswith("UPDATE") and updates.append(stmt)
        ),
    )

    def answer(i: int, received: bool) -> None:
        r = crud.draft_report_row(
            study_id=study_id,
            image_id=None,
            question=f"q{i}",
            answer="a",
            model="m",
            quantization="none",
        )
        with db_engine.begin() as conn:
            crud.insert_draft_reports(conn, [r], [study_id] if received else [])

    answer(0, received=True)
    assert len(updates) == 1
    with db_engine.connect() as conn:
        assert crud.image_ref(conn, study_id, 0)[2] == "reported"
    answer(1, received=False)
    assert len(updates) == 1
    with Session_() as s:
        assert len(s.scalars(select(Report)).all()) == 2
        assert crud.get_study(s, study_id).status == "reported"


def test_report_edit_history_and_signing(db_engine: Engine) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        report = _report(s)
        report_id = report.id
        crud.update_report(s, report, text="No acute fracture.", actor="rad-1")
        crud.update_report(s, report, text="No acute fracture.", actor="rad-1")  # no change
        with pytest.raises(crud.InvalidReportUpdate):
            crud.update_report(s, report, text="  ", status="final", actor="rad-1")
        crud.update_report(s, report, status="final", actor="rad-2")

    with Session_.begin() as s:
        signed = crud.get_report(s, report_id)
        assert signed is not None
        assert (signed.status, signed.text, signed.answer) == (
            "final",
            "No acute fracture.",
            "No fracture.",  # the model's original answer never changes
        )
        assert signed.signed_by == "rad-2" and signed.signed_at is not None
        assert signed.study.status == "signed"
        edits = [
            (e.previous_text, e.new_text, e.previous_status, e.new_status, e.edited_by)
            for e in signed.edits
        ]
        assert edits == [
            ("No fracture.", "No acute fracture.", "draft", "draft", "rad-1"),
            ("No acute fracture.", "No acute fracture.", "draft", "final", "rad-2"),
        ]
        with pytest.raises(crud.ReportFinalized):
            crud.update_report(s, signed, text="changed", actor="rad-1")
        with pytest.raises(crud.ReportFinalized):
            crud.update_report(s, signed, status="draft", actor="admin")

    with Session_() as s:
        reloaded = crud.get_report(s, report_id)
        assert reloaded is not None and reloaded.text == "No acute fracture."
        assert s.scalar(select(ReportEdit.id).where(ReportEdit.new_text == "changed")) is None
        assert [r.id for r in crud.list_reports(s, crud.ReportFilter(status="final"))] == [
            report_id
        ]
        assert crud.list_reports(s, crud.ReportFilter(status="draft")) == []
        assert crud.count_reports(s, crud.ReportFilter(study_id=reloaded.study_id)) == 1


def test_a_signed_report_changes_only_by_an_amendment_with_a_reason(db_engine: Engine) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        report = _report(s)
        report_id = report.id
        with pytest.raises(crud.InvalidReportUpdate, match="only a signed report"):
            crud.update_report(s, report, text="x", status="amended", reason="r", actor="rad-1")
        with pytest.raises(crud.InvalidReportUpdate, match="reason is given only"):
            crud.update_report(s, report, status="final", reason="why", actor="rad-1")
        crud.update_report(s, report, text="No fracture.", status="final", actor="rad-1")
        signed_version = report.updated_at
    with Session_.begin() as s:
        report = crud.get_report(s, report_id)
        assert report is not None
        with pytest.raises(crud.InvalidReportUpdate, match="needs a reason"):
            crud.update_report(s, report, text="Fracture.", status="amended", actor="rad-2")
        with pytest.raises(crud.InvalidReportUpdate, match="needs a reason"):
            crud.update_report(s, report, text="F.", status="amended", reason=" ", actor="rad-2")
        with pytest.raises(crud.InvalidReportUpdate, match="must change"):
            crud.update_report(s, report, status="amended", reason="typo", actor="rad-2")
        with pytest.raises(crud.ReportFinalized, match="only amended"):
            crud.update_report(s, report, text="Fracture.", actor="rad-2")
        crud.update_report(
            s,
            report,
            text="Hairline fracture of the left 5th rib.",
            status="amended",
            reason=" missed on first read ",
            actor="rad-2",
        )
        amended_version = report.updated_at
        crud.update_report(
            s,
            report,
            text="Hairline fracture, left 6th rib.",
            status="amended",
            reason="level",
            actor="rad-3",
        )
    with Session_() as s:
        report = crud.get_report(s, report_id)
        assert report is not None
        assert (report.status, report.text, report.signed_by) == (
            "amended",
            "Hairline fracture, left 6th rib.",
            "rad-3",
        )
        assert report.signed_at == report.updated_at and report.study.status == "signed"
        history = [
            (e.previous_status, e.new_status, e.previous_text, e.edited_by, e.reason)
            for e in report.edits
        ]
        assert history == [
            ("draft", "final", "No fracture.", "rad-1", None),
            ("final", "amended", "No fracture.", "rad-2", "missed on first read"),
            ("amended", "amended", "Hairline fracture of the left 5th rib.", "rad-3", "level"),
        ]
        # each edit names the version it replaced: the signed one, then the first amendment
        assert [e.previous_updated_at for e in report.edits[1:]] == [
            signed_version,
            amended_version,
        ]
        assert [r.id for r in crud.list_reports(s, crud.ReportFilter(status="amended"))] == [
            report_id
        ]
        assert crud.list_reports(s, crud.ReportFilter(status="final")) == []


def test_report_image_must_belong_to_the_study(db_session: Session) -> None:
    other = crud.create_study(db_session)
    image = crud.add_image(db_session, study=other, sha256=SHA_A, kind="png", size_bytes=1)
    with pytest.raises(ValueError, match="another study"):
        crud.create_report(
            db_session,
            study=crud.create_study(db_session),
            image=image,
            question="q",
            answer="a",
            model="demo",
            quantization="none",
        )


# --- API keys ----------------------------------------------------------------------------------


def test_api_key_stores_only_its_hash(db_engine: Engine) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        row, key = auth.create_api_key(s, role="radiologist", name="reading room 1")
        key_id = row.id
    assert key.startswith(f"tlm_{row.prefix}_") and len(row.prefix) == 8
    with db_engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM api_keys")).mappings().one()
    assert stored["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    secret_part = key.split("_", 2)[2]
    assert not any(secret_part in str(v) for v in stored.values())

    with Session_.begin() as s:
        found = auth.verify_api_key(s, key)
        assert found is not None and (found.id, found.role) == (key_id, "radiologist")
        assert found.last_used_at is not None
        assert auth.verify_api_key(s, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert auth.verify_api_key(s, "tlm_00000000_" + "x" * 43) is None
        assert auth.verify_api_key(s, "not a key") is None
        assert auth.verify_api_key(s, "") is None

    with Session_.begin() as s:
        row2 = auth.get_api_key(s, key_id)
        assert row2 is not None
        auth.revoke_api_key(s, row2)
    with Session_.begin() as s:
        assert auth.verify_api_key(s, key) is None
        assert auth.list_api_keys(s) == []
        assert [k.id for k in auth.list_api_keys(s, include_revoked=True)] == [key_id]

    with Session_() as s, pytest.raises(ValueError, match="role"):
        auth.create_api_key(s, role="root", name="x")  # type: ignore[arg-type]


def test_first_admin_key_only_once(db_engine: Engine) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        key = auth.ensure_first_admin_key(s)
    assert key is not None
    with Session_.begin() as s:
        assert auth.ensure_first_admin_key(s) is None
        row = auth.verify_api_key(s, key)
        assert row is not None and row.role == "admin"
        auth.revoke_api_key(s, row)
    with Session_.begin() as s:  # a revoked key still counts: no new admin key appears
        assert auth.ensure_first_admin_key(s) is None
        assert s.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None))) is None


@pytest.mark.postgres
def test_first_admin_key_is_created_once_under_concurrency(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    Session_ = session_factory(engine)
    results: list[str | None] = []
    try:
        with Session_() as first:
            results.append(auth.ensure_first_admin_key(first))  # holds the table lock

            def second() -> None:
                with Session_.begin() as s:
                    results.append(auth.ensure_first_admin_key(s))

            t = threading.Thread(target=second)
            t.start()
            t.join(0.5)
            assert t.is_alive()  # waiting for the first transaction
            first.commit()
        t.join(10)
        assert results[0] is not None and results[1] is None
        with Session_() as s:
            assert len(auth.list_api_keys(s)) == 1
    finally:
        engine.dispose()


def test_roles_grow_by_inclusion() -> None:
    assert auth.has_permission("pacs", "study.upload")
    assert auth.has_permission("pacs", "question.ask")
    assert not auth.has_permission("pacs", "report.sign")
    assert auth.has_permission("radiologist", "report.sign")
    assert not auth.has_permission("radiologist", "apikey.manage")
    assert auth.has_permission("admin", "apikey.manage")
    assert auth.has_permission("admin", "radiologist") and not auth.has_permission("pacs", "admin")
    assert auth.ROLE_PERMISSIONS["pacs"] < auth.ROLE_PERMISSIONS["radiologist"]
    with pytest.raises(ValueError):
        auth.require("report.delete")  # type: ignore[arg-type]


# --- audit -------------------------------------------------------------------------------------


def test_audit_rows_are_written(db_engine: Engine) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        crud.audit(
            s,
            actor="key-1",
            action="study.read",
            resource_type="study",
            resource_id="s-1",
            outcome="ok",
            status_code=200,
            detail={"images": 2},
        )
        crud.audit(
            s,
            actor="anonymous",
            action="study.read",
            resource_type="study",
            resource_id="s-2",
            outcome="not_found",
            status_code=404,
        )
        with pytest.raises(ValueError, match="patient identifier"):
            crud.audit(
                s,
                actor="key-1",
                action="study.upload",
                resource_type="study",
                resource_id=None,
                outcome="ok",
                status_code=201,
                detail={"files": [{"PatientName": "DOE^JOHN"}]},
            )
    with Session_() as s:
        events = crud.list_audit_events(s)
        assert [(e.actor, e.outcome, e.status_code, e.detail) for e in events] == [
            ("anonymous", "not_found", 404, None),
            ("key-1", "ok", 200, {"images": 2}),
        ]
        assert [e.resource_id for e in crud.list_audit_events(s, actor="key-1")] == ["s-1"]
        assert events[0].at <= datetime.now(timezone.utc)


def test_jobs_can_be_enqueued(db_session: Session) -> None:
    study = crud.create_study(db_session)
    job = crud.enqueue_job(db_session, kind="answer", payload={"report": "r"}, study_id=study.id)
    assert (job.status, job.attempts, job.max_attempts, job.payload) == (
        "queued",
        0,
        3,
        {"report": "r"},
    )
    assert job.id is not None and job.run_after <= datetime.now(timezone.utc)


# --- FastAPI dependencies ----------------------------------------------------------------------


def _app(engine: Engine, tmp_path: Path, *, auth_disabled: bool = False) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.state.settings = Settings(data_dir=tmp_path, auth_disabled=auth_disabled)
    app.state.session_factory = session_factory(engine)

    @app.get("/v1/reports/{report_id}")
    def read(
        report_id: str, p: Annotated[auth.Principal, Depends(auth.require("report.read"))]
    ) -> dict[str, str]:
        return {"role": p.role}

    @app.patch("/v1/reports/{report_id}")
    def sign(
        report_id: str, p: Annotated[auth.Principal, Depends(auth.require("report.sign"))]
    ) -> dict[str, str]:
        return {"actor": p.actor}

    return app


def test_require_answers_401_403_and_audits(db_engine: Engine, tmp_path: Path) -> None:
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        pacs_row, pacs = auth.create_api_key(s, role="pacs", name="pacs")
        rad_row, rad = auth.create_api_key(s, role="radiologist", name="rad")
        pacs_id, rad_id = pacs_row.id, rad_row.id

    client = TestClient(_app(db_engine, tmp_path))
    r = client.get("/v1/reports/1")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/reports/1", headers={"X-API-Key": "tlm_bad"}).status_code == 401
    ok = client.get("/v1/reports/1", headers={"Authorization": f"Bearer {pacs}"})
    assert ok.status_code == 200 and ok.json() == {"role": "pacs"}
    r = client.patch("/v1/reports/1", headers={"X-API-Key": pacs})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.patch("/v1/reports/1", headers={"X-API-Key": rad})
    assert r.status_code == 200 and r.json() == {"actor": rad_id}

    with Session_() as s:
        denied = s.scalars(
            select(AuditEvent).where(AuditEvent.outcome == "denied").order_by(AuditEvent.id)
        ).all()
        assert [(e.actor, e.action, e.status_code, e.resource_id) for e in denied] == [
            ("anonymous", "auth.authenticate", 401, "GET /v1/reports/{report_id}"),
            ("anonymous", "auth.authenticate", 401, "GET /v1/reports/{report_id}"),
            (pacs_id, "report.sign", 403, "PATCH /v1/reports/{report_id}"),
        ]

    open_client = TestClient(_app(db_engine, tmp_path, auth_disabled=True))
    assert open_client.patch("/v1/reports/1").json() == {"actor": "anonymous"}


def test_editing_a_draft_deleted_with_its_study_meanwhile_is_a_404(db_engine: Engine) -> None:
    """The report was read, then its study deleted (with its drafts) by another request before
    the edit: the edit says the report is gone instead of failing."""
    Session_ = session_factory(db_engine)
    with Session_.begin() as s:
        report_id = _report(s).id
    with Session_() as s:
        stale = crud.get_report(s, report_id)
        assert stale is not None
        with Session_.begin() as other:
            study = crud.get_report(other, report_id).study
            crud.delete_study(other, study)
        with pytest.raises(crud.ReportGone):
            crud.update_report(s, stale, text="edited", actor="rad-1")
