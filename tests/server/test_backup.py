"""`tinyllava-med db backup`: a consistent copy of the SQLite database taken while a writer is
busy, the image files copied once each and checked against their names, missing and corrupt
files reported (exit code 1), every backup audited. `db restore`: the copy back in place over a
crashed server's write-ahead log, never while a process holds the data directory, and a
backup a newer version took refused before anything is replaced. `db downgrade` refuses under a
live process too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from api_helpers import assert_error, make_api, png_bytes, upload, upload_ct
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tinyllava_med.server.backup import _snapshot, backup, checked_copy, restore
from tinyllava_med.server.db.models import AuditEvent, Report


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
        old_umask = os.umask(0o022)  # a usual umask: files readable by every local user
        try:
            done = backup(settings, dest)
        finally:
            os.umask(old_umask)
        assert done.complete and done.database is not None and done.database.parent == dest
        # every report's text, the owner's only (0644 before); the folder too
        assert done.database.stat().st_mode & 0o077 == 0 and dest.stat().st_mode & 0o077 == 0
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
        assert (third.files_copied, third.files_present, third.files_repaired) == (1, 1, 1)
        assert third.complete
        assert hashlib.sha256(damaged.read_bytes()).hexdigest() == hashes[0]

        # a byte flipped in place (the size unchanged): a plain run cannot see it, --verify
        # reads every copy and replaces it
        whole = damaged.read_bytes()
        damaged.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0xFF]))
        assert backup(settings, dest).files_present == 2
        out = _cli(settings, sqlite_url, "backup", str(dest), "--verify")
        assert out.returncode == 0 and "1 copied" in out.stdout, out.stdout + out.stderr
        assert "1 damaged copies in the backup were replaced" in out.stdout
        assert damaged.read_bytes() == whole

        # a file damaged in the store after its backup (a byte flipped): a plain run cannot
        # see it; --verify reads the store too, and says so (exit 1), keeping the good copy
        # that `db restore` puts back (before, both runs passed)
        in_store = api.app.state.store.path(hashes[0])
        in_store.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0xFF]))
        assert backup(settings, dest).complete
        out = _cli(settings, sqlite_url, "backup", str(dest), "--verify")
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"1 image file(s) corrupt: {hashes[0][:12]}" in out.stdout, out.stdout
        assert damaged.read_bytes() == whole
        in_store.write_bytes(whole)

        # into a fresh folder, from a damaged store: reported, nothing wrong copied, exit 1
        store = api.app.state.store
        ct, png = hashes
        store.path(ct).write_bytes(b"not the file any more")
        store.path(png).unlink()
        out = _cli(settings, sqlite_url, "backup", str(tmp_path / "b2"))
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
            *[("cli", "ok")] * 6,
            ("cli", "error"),
            ("cli", "error"),
        ]


def test_a_damaged_image_file_is_refused_not_read(tmp_path, sqlite_url, tiny_lm):
    """A stored file whose content is no longer its name (a disk error, a byte flipped) is
    not rendered nor shown to the model: 410 image_damaged, which says how to get it back
    (before, the damaged pixels were shown, and a draft report written on them)."""
    for api in make_api(tmp_path, sqlite_url, tiny_lm):
        study = upload_ct(api)
        path = api.app.state.store.path(study["images"][0]["sha256"])
        data = path.read_bytes()
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        api.app.state.store.rendered.clear()  # as after a restart: the upload's rendering,
        # of the good pixels, is not kept
        r = api.get(f"/v1/studies/{study['id']}/images/0", headers=api.h())
        assert_error(r, 410, "image_damaged")
        assert "db restore" in r.json()["error"]["message"]
        r = api.post(
            f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "?"}
        )
        assert_error(r, 410, "image_damaged")
        with api.app.state.session_factory() as s:
            assert s.query(Report).count() == 0


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


def _cli(settings, database_url, *args):
    """`tinyllava-med db ARGS` in a process of its own, on the server's data and database."""
    return subprocess.run(
        [sys.executable, "-m", "tinyllava_med.cli", "db", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TINYLLAVA_MED_DATA_DIR": str(settings.data_dir),
            "TINYLLAVA_MED_DATABASE_URL": database_url,
        },
    )


# a server that committed a change and died before checkpointing it: the change is only in
# the write-ahead log beside the database
_CRASH = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA wal_autocheckpoint=0")
db.execute("UPDATE reports SET text = 'written after the backup'")
db.commit()
os._exit(0)
"""

_HOLD = """
import sys, time
from tinyllava_med.server.storage import hold_data_dir
hold_data_dir(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_restore_puts_the_backup_back_over_a_crashed_servers_log(tmp_path, sqlite_url, tiny_lm):
    """The restore a crash calls for: the crashed database's write-ahead log must not be
    replayed into the restored copy (copying the .db file over it, as the docs said, did: the
    restored database showed the crashed one's rows). What it replaces is moved aside, files
    lost from the store come back from the backup, and no restore runs under a live process."""
    for api in make_api(tmp_path, sqlite_url, tiny_lm):
        settings, store = api.app.state.settings, api.app.state.store
        study = upload_ct(api)
        r = api.post(
            f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "Organ?"}
        )
        rid = r.json()["id"]
        r = api.patch(f"/v1/reports/{rid}", headers=api.h(), json={"text": "Backed up."})
        assert r.status_code == 200, r.text
        done = backup(settings, tmp_path / "backup")
        assert done.complete and done.database is not None
        assert upload(api, ("x.png", png_bytes(), "image/png")).status_code == 201
    live = Path(make_url(sqlite_url).database or "")
    subprocess.run([sys.executable, "-c", _CRASH, str(live)], check=True, timeout=60)
    wal = live.with_name(live.name + "-wal")
    assert wal.stat().st_size > 0
    # the old procedure, on a scratch copy: the .db file copied over, the log left, replayed
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copyfile(wal, scratch / wal.name)
    shutil.copyfile(done.database, scratch / live.name)
    assert _rows(scratch / live.name, "SELECT text FROM reports") == [("written after the backup",)]
    crashed = {p.name: p.read_bytes() for p in (live, wal)}
    ct = study["images"][0]["sha256"]
    store.path(ct).unlink()  # lost with the disk

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(settings.data_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        out = _cli(settings, sqlite_url, "restore", str(done.database))
        assert out.returncode != 0 and "stop it first" in out.stderr, out.stdout + out.stderr
        assert {p.name: p.read_bytes() for p in (live, wal)} == crashed  # untouched
    finally:
        holder.kill()
        holder.wait(timeout=10)

    out = _cli(settings, sqlite_url, "restore", str(done.database))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 copied back" in out.stdout and "replaced, kept as" in out.stdout
    assert _rows(live, "SELECT text FROM reports") == [("Backed up.",)]
    assert _rows(live, "SELECT COUNT(*) FROM studies") == [(1,)]  # the PNG came later
    assert _rows(live, "PRAGMA integrity_check") == [("ok",)]
    assert hashlib.sha256(store.path(ct).read_bytes()).hexdigest() == ct
    aside = sorted(p.name for p in live.parent.glob(f"{live.name}.replaced-*"))
    assert len(aside) >= 2 and any(n.endswith("-wal") for n in aside), aside
    events = _rows(live, "SELECT actor, outcome FROM audit_events WHERE action = 'backup.restore'")
    assert events == [("cli", "ok")]

    # what is not a backup, or not there, is refused before anything is replaced
    (tmp_path / "junk.db").write_bytes(b"not a database")
    for bad in (tmp_path / "junk.db", tmp_path / "absent.db"):
        out = _cli(settings, sqlite_url, "restore", str(bad))
        assert out.returncode != 0 and "db restore:" in out.stderr, out.stderr
    assert _rows(live, "SELECT text FROM reports") == [("Backed up.",)]


def test_a_backup_this_version_cannot_read_is_refused_before_anything_is_replaced(
    tmp_path, sqlite_url, tiny_lm
):
    """The code rolled back, then the newest backup restored: a newer version took it. The
    restore used to move the live database aside and put the copy in its place, and only then
    fail on its revision, leaving a database `serve` refuses."""
    for api in make_api(tmp_path, sqlite_url, tiny_lm):
        settings = api.app.state.settings
        upload_ct(api)
        done = backup(settings, tmp_path / "backup")
        assert done.complete and done.database is not None
        assert upload(api, ("x.png", png_bytes(), "image/png")).status_code == 201
    newer = done.database.with_name("tinyllava_med-newer.db")
    shutil.copyfile(done.database, newer)
    con = sqlite3.connect(newer)
    con.execute("UPDATE alembic_version SET version_num = '0099'")
    con.commit()
    con.close()
    live = Path(make_url(sqlite_url).database or "")
    before = sorted(p.name for p in live.parent.iterdir())

    out = _cli(settings, sqlite_url, "restore", str(newer))
    assert out.returncode != 0, out.stdout + out.stderr
    assert "nothing was replaced" in out.stderr and "0099" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in live.parent.iterdir()) == before  # no .part, nothing aside
    assert _rows(live, "SELECT COUNT(*) FROM studies") == [(2,)]

    out = _cli(settings, sqlite_url, "restore", str(done.database))  # the older one still works
    assert out.returncode == 0, out.stdout + out.stderr
    assert _rows(live, "SELECT COUNT(*) FROM studies") == [(1,)]
    assert _rows(live, "PRAGMA integrity_check") == [("ok",)]
    assert not live.with_name(live.name + ".part").exists()


def test_a_downgrade_under_a_server_is_refused_and_readyz_sees_the_schema_change(
    tmp_path, database_url, tiny_lm
):
    """`db downgrade` ran under a live server, and every request then failed on a missing
    column (500 on PostgreSQL) while `/readyz` said ready. It now refuses while a process holds
    the data directory, as `db restore` does; a schema changed from elsewhere (a replica's host)
    makes `/readyz` say so."""
    from tinyllava_med.server.db import migrate

    for api in make_api(tmp_path, database_url, tiny_lm):
        settings = api.app.state.settings
        assert api.get("/readyz").json()["checks"]["database"] == "ok"
        head = migrate.current_revision(database_url)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD, str(settings.data_dir)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            out = _cli(settings, database_url, "downgrade", "-1", "--accept-data-loss")
            assert out.returncode == 1 and "stop it first" in out.stderr, out.stdout + out.stderr
            assert "Traceback" not in out.stderr
            assert migrate.current_revision(database_url) == head
        finally:
            holder.kill()
            holder.wait(timeout=10)

        migrate.downgrade(database_url, "-1", accept_data_loss=True)  # from another host
        r = api.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["database"] == "schema_changed"
        migrate.upgrade(database_url)
        assert api.get("/readyz").json()["checks"]["database"] == "ok"
        # a newer version's `db upgrade` (a rolling update): this server serves on
        api.app.state.known_revisions = {"0001"}  # as a server of an older version sees it
        api.app.state.schema_revision = "0001"
        assert api.get("/readyz").json()["checks"]["database"] == "ok"


def test_serve_copies_its_sqlite_database_before_it_migrates_it(tmp_path, sqlite_url, tiny_lm):
    """The embedded default migrates itself as `serve` starts: an update that went wrong left
    no copy of the database as it was to go back to (unless the site had taken a backup)."""
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.db import migrate
    from tinyllava_med.server.settings import Settings

    migrate.upgrade(sqlite_url, "0015")
    live = Path(make_url(sqlite_url).database or "")
    con = sqlite3.connect(live)
    con.execute(
        "INSERT INTO studies (id, created_at, status) VALUES ('s', '2026-01-01 00:00:00', 'received')"
    )
    con.commit()
    con.close()
    settings = Settings(data_dir=tmp_path / "data", database_url=sqlite_url, model="tiny")
    for _ in range(2):  # the second start has nothing to migrate, and copies nothing
        with TestClient(create_app(settings, model=tiny_lm)) as client:
            assert client.get("/readyz").status_code == 200
    (copy,) = (tmp_path / "data" / "backups").glob("*.db")
    assert copy.name.startswith("tinyllava_med-") and copy.name.endswith("-rev0015.db")
    assert _rows(copy, "SELECT version_num FROM alembic_version") == [("0015",)]
    assert _rows(copy, "SELECT id FROM studies") == [("s",)]
    assert copy.stat().st_mode & 0o777 == 0o600
    assert migrate.current_revision(sqlite_url) == migrate.head_revision()
    out = _cli(settings, sqlite_url, "restore", str(copy))  # what it is for
    assert out.returncode == 0, out.stdout + out.stderr


def test_restore_on_postgresql_brings_back_the_image_files(tmp_path, postgres_url, tiny_lm):
    """PostgreSQL's database is pg_restore's; the files its rows name come back from the
    backup folder (--images-only)."""
    for api in make_api(tmp_path, postgres_url, tiny_lm):
        settings, store = api.app.state.settings, api.app.state.store
        sha = upload_ct(api)["images"][0]["sha256"]
        assert backup(settings, tmp_path / "backup").complete
        store.path(sha).unlink()
        try:
            restore(settings, tmp_path / "backup")
        except ValueError as e:
            assert "pg_restore" in str(e)
        else:
            raise AssertionError("a PostgreSQL database is not restored from a .db file")
        # as the README writes it: the option before the folder
        out = _cli(settings, postgres_url, "restore", "--images-only", str(tmp_path / "backup"))
        assert out.returncode == 0, out.stderr
        assert "files: 1 copied back, 0 in place" in out.stdout and "database:" not in out.stdout
        assert store.exists(sha)
        with api.app.state.session_factory() as s:
            (event,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "backup.restore"))
            assert event.outcome == "ok"

        # a dump from before migration 0006 (no released_at): migrated, then its files back
        from tinyllava_med.server.db import migrate

        api.app.state.db_engine.dispose()  # no connection of ours in the way of the ALTERs
        migrate.downgrade(postgres_url, "0005", accept_data_loss=True)
        store.path(sha).unlink()
        done = restore(settings, tmp_path / "backup", images_only=True)
        assert (done.files_copied, done.missing) == (1, [])
        assert migrate.current_revision(postgres_url) == migrate.head_revision()

        # a live file damaged in place (its size unchanged) is read through and replaced
        whole = store.get(sha)
        store.path(sha).write_bytes(whole[:-1] + bytes([whole[-1] ^ 0xFF]))
        done = restore(settings, tmp_path / "backup", images_only=True)
        assert (done.files_copied, done.files_present) == (1, 0)
        assert store.get(sha) == whole


def test_a_backup_from_before_image_retention_is_accepted(tmp_path):
    """A backup taken before migration 0006 has no released_at or header columns: its files
    are read from the columns it has (restore then migrates it), not refused as not ours."""
    from tinyllava_med.server.backup import checked_copy

    old = tmp_path / "tinyllava_med-old.db"
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE images (id TEXT PRIMARY KEY, sha256 TEXT)")
    db.execute("INSERT INTO images VALUES ('i1', 'ab' || 'cd')")
    db.commit()
    db.close()
    assert checked_copy(old) == {"abcd"}


def test_a_backup_cut_short_never_looks_whole_and_an_unrecorded_one_is_said(
    tmp_path, sqlite_url, tiny_lm, monkeypatch, capsys
):
    """A run killed while it copied the files had left a final-named database beside part of
    its files (a restore from it lacked them); a full database made a finished backup end in a
    traceback (its audit event could not be written); a full backup disk left a 0-byte part."""
    import time
    import types

    import pytest
    from sqlalchemy.exc import OperationalError as DatabaseError

    from tinyllava_med.server import backup as backup_module
    from tinyllava_med.server import console
    from tinyllava_med.server.db import crud
    from tinyllava_med.server.storage import ImageStore

    for api in make_api(tmp_path, sqlite_url, tiny_lm):
        settings = api.app.state.settings
        upload_ct(api)
        dest = tmp_path / "backup"

        def killed(*args, **kwargs):
            raise KeyboardInterrupt  # as a kill in the middle of the files

        with monkeypatch.context() as m:
            m.setattr(backup_module, "_copy_checked", killed)
            with pytest.raises(KeyboardInterrupt):
                backup(settings, dest)
        assert not list(dest.glob("*.db")) and not list(dest.glob("*.db.part"))
        part = dest / "tinyllava_med-20260101T000000000000Z.db.part"  # as a kill -9 leaves it
        part.write_bytes(b"every report")
        os.utime(part, (time.time() - 7200, time.time() - 7200))

        def database_full(*args, **kwargs):
            raise DatabaseError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

        with monkeypatch.context() as m:
            m.setattr(crud, "insert_audit_rows", database_full)
            assert console.make_backup(settings, str(dest), verify=False) == 0
        said = capsys.readouterr().out
        assert "could not be recorded in the audit log: database or disk is full" in said
        [db] = dest.glob("*.db")
        assert not part.exists() and not list(dest.glob("*.db.part"))  # the stale one went
        assert len(list(ImageStore(dest / "images").names())) == 1

        class FullDisk:  # sqlite3, whose copy finds the backup's disk full
            OperationalError = sqlite3.OperationalError

            @staticmethod
            def connect(*args, **kwargs):
                real = sqlite3.connect(*args, **kwargs)

                def backup(target):
                    raise sqlite3.OperationalError("database or disk is full")

                return types.SimpleNamespace(backup=backup, close=real.close)

        with monkeypatch.context() as m:
            m.setattr(backup_module, "sqlite3", FullDisk)
            with pytest.raises(SystemExit, match="a disk is full: no database copy was kept"):
                console.make_backup(settings, str(dest), verify=False)
        assert list(dest.glob("*.db")) == [db] and not list(dest.glob("*.db.part"))


def test_backup_keep_removes_older_copies_and_the_files_only_they_list(
    tmp_path, sqlite_url, tiny_lm
):
    """`db backup --keep N`: the N newest copies stay, with every file they list; a file goes
    once no copy left lists it (a deleted study's; a released image's pixels, its header kept).
    A copy that would be kept and cannot be read, a backup in progress, an incomplete backup
    or PostgreSQL: nothing is removed."""
    from datetime import timedelta

    from api_helpers import make_old

    from tinyllava_med.server.backup_keep import prune
    from tinyllava_med.server.db.models import utcnow
    from tinyllava_med.server.retention import release_due
    from tinyllava_med.server.storage import ImageStore, shared_use

    for api in make_api(
        tmp_path, sqlite_url, tiny_lm, image_retention_days=30, image_sweep_grace_s=0
    ):
        settings, store = api.app.state.settings, api.app.state.store
        dest = tmp_path / "backup"
        photo = upload(api, ("gone.png", png_bytes(), "image/png")).json()
        ct = upload_ct(api)
        ct_sha = ct["images"][0]["sha256"]
        first = backup(settings, dest)
        assert first.complete
        r = api.delete(f"/v1/studies/{photo['id']}", headers=api.h("admin"))
        assert r.status_code == 204, r.text
        sessions = api.app.state.session_factory
        with sessions.begin() as s:
            make_old(s, utcnow() - timedelta(days=31), [ct["id"]], store=store)
        assert release_due(sessions, store, settings)["images"] == 1
        header = _rows(
            Path(make_url(sqlite_url).database or ""), "SELECT header_sha256 FROM images"
        )
        assert backup(settings, dest).complete  # lists the CT's header only

        copies = ImageStore(dest / "images")
        held = {photo["images"][0]["sha256"], ct_sha, header[0][0]}
        out = _cli(settings, sqlite_url, "backup", str(dest), "--keep", "3")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "removed 0 older ones and 0 image files" in out.stdout, out.stdout
        assert set(copies.names()) == held

        # a copy that would be kept is damaged: the older ones may be all that is whole
        newest = max(dest.glob("tinyllava_med-*.db"))
        saved = newest.read_bytes()
        newest.write_bytes(b"not a database")
        pruned = prune(settings, dest, 1)
        assert pruned.nothing_because and newest.name in pruned.nothing_because
        assert len(list(dest.glob("tinyllava_med-*.db"))) == 3 and set(copies.names()) == held
        newest.write_bytes(saved)
        with shared_use(dest):  # another run copying into the folder
            pruned = prune(settings, dest, 1)
        assert pruned.nothing_because == f"another backup or restore is using {dest}"

        out = _cli(settings, sqlite_url, "backup", str(dest), "--keep", "1")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "kept the 1 newest backups: removed 3 older ones and 2 image files" in out.stdout
        (kept,) = dest.glob("tinyllava_med-*.db")
        assert set(copies.names()) == {header[0][0]} == checked_copy(kept)
        # each copy one file, whoever read it (a -wal and -shm stayed beside every copy, and
        # beside the removed ones too)
        assert sorted(p.name for p in dest.iterdir() if p.is_file()) == ["in-use.lock", kept.name]
        assert not (dest / "images" / ct_sha[:2] / ct_sha).exists()  # the pixels left too
        events = _rows(
            Path(make_url(sqlite_url).database or ""),
            "SELECT detail FROM audit_events WHERE action = 'backup.prune'",
        )
        assert [json.loads(d) for (d,) in events] == [
            {"kept": 1, "removed": 3, "files": 2, "failed": 0}
        ]

        # an incomplete backup removes nothing
        lost = upload(api, ("lost.png", png_bytes(color=120), "image/png")).json()
        store.path(lost["images"][0]["sha256"]).unlink()
        out = _cli(settings, sqlite_url, "backup", str(dest), "--keep", "1")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "older backups kept: this one is incomplete" in out.stdout
        assert len(list(dest.glob("tinyllava_med-*.db"))) == 2


def test_backup_keep_is_refused_on_postgresql(tmp_path, postgres_url, tiny_lm):
    for api in make_api(tmp_path, postgres_url, tiny_lm):
        out = _cli(
            api.app.state.settings, postgres_url, "backup", str(tmp_path / "b"), "--keep", "2"
        )
        assert out.returncode == 1, out.stdout + out.stderr
        assert "--keep is for SQLite" in out.stderr
        assert not (tmp_path / "b").exists()  # refused before anything is copied
