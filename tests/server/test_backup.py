"""`tinyllava-med db backup`: a consistent copy of the SQLite database taken while a writer is
busy, the image files copied once each and checked against their names, missing and corrupt
files reported (exit code 1), every backup audited."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from api_helpers import make_api, png_bytes, upload, upload_ct
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tinyllava_med.server.backup import _snapshot, backup
from tinyllava_med.server.db.models import AuditEvent


def _rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_backup_copies_a_consistent_database_and_checked_files(tmp_path, sqlite_url, tiny_lm):
    for api in make_api(tmp_path, sqlite_url, tiny_lm):
        settings = api.app.state.settings
        study = upload_ct(api)
        r = api.post(
            f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "Organ?"}
        )
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"text": "Signed text."})
        assert r.status_code == 200, r.text
        assert upload(api, ("x.png", png_bytes(), "image/png")).status_code == 201
        source = Path(make_url(sqlite_url).database or "")

        # a writer in the middle of a transaction: the copy neither waits for it nor holds
        # its uncommitted change
        writer = sqlite3.connect(source, timeout=30)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE reports SET text = 'uncommitted' WHERE id = ?", (rid,))
        try:
            snap = _snapshot(source, tmp_path / "snap")
        finally:
            writer.rollback()
            writer.close()
        assert _rows(snap, "SELECT text FROM reports") == [("Signed text.",)]

        dest = tmp_path / "backup"
        done = backup(settings, dest)
        assert done.complete and done.database is not None and done.database.parent == dest
        assert _rows(done.database, "PRAGMA integrity_check") == [("ok",)]
        assert _rows(done.database, "SELECT id, text FROM reports") == [(rid, "Signed text.")]
        hashes = [h for (h,) in _rows(done.database, "SELECT sha256 FROM images ORDER BY n")]
        assert len(hashes) == 2 and done.files_copied == 2 and done.files_present == 0
        for sha in hashes:
            copy = dest / "images" / sha[:2] / sha
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha
        assert not list(dest.rglob("*.part")) and not list(dest.rglob(".tmp-*"))

        # the next run copies only what is new
        again = backup(settings, dest)
        assert (again.files_copied, again.files_present) == (0, 2) and again.complete
        assert again.database != done.database  # each run its own database copy

        # a copy damaged in the backup (cut short) is copied again, not counted as present
        damaged = dest / "images" / hashes[0][:2] / hashes[0]
        damaged.write_bytes(damaged.read_bytes()[:100])
        third = backup(settings, dest)
        assert (third.files_copied, third.files_present) == (1, 1) and third.complete
        assert hashlib.sha256(damaged.read_bytes()).hexdigest() == hashes[0]

        # into a fresh folder, from a damaged store: reported, nothing wrong copied, exit 1
        store = api.app.state.store
        ct, png = hashes
        store.path(ct).write_bytes(b"not the file any more")
        store.path(png).unlink()
        out = subprocess.run(
            [sys.executable, "-m", "tinyllava_med.cli", "db", "backup", str(tmp_path / "b2")],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **os.environ,
                "TINYLLAVA_MED_DATA_DIR": str(settings.data_dir),
                "TINYLLAVA_MED_DATABASE_URL": sqlite_url,
            },
        )
        assert out.returncode == 1, out.stdout + out.stderr
        assert "missing from the store" in out.stdout and "corrupt" in out.stdout
        assert not (tmp_path / "b2" / "images" / ct[:2] / ct).exists()
        assert len(list((tmp_path / "b2").glob("tinyllava_med-*.db"))) == 1

        events = _rows(
            source,
            "SELECT actor, outcome, detail FROM audit_events WHERE action = 'backup.create' "
            "ORDER BY id",
        )
        assert [(actor, outcome) for actor, outcome, _ in events] == [
            ("cli", "ok"),
            ("cli", "ok"),
            ("cli", "ok"),
            ("cli", "error"),
        ]


def test_backup_on_postgresql_copies_the_files_and_leaves_the_database_to_pg_dump(
    tmp_path, postgres_url, tiny_lm
):
    for api in make_api(tmp_path, postgres_url, tiny_lm):
        upload_ct(api)
        done = backup(api.app.state.settings, tmp_path / "backup")
        assert done.database is None and done.complete
        assert (done.files_copied, done.files_present) == (1, 0)
        assert not list((tmp_path / "backup").glob("*.db"))
        with api.app.state.session_factory() as s:
            (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "backup.create"))
            assert event.outcome == "ok" and event.detail["files_copied"] == 1
