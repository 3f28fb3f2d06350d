"""Backups of what the server keeps: the database (the reports are the medical record) and the
stored image files. `tinyllava-med db backup DEST`, safe to run while the server runs.

- SQLite (the default): sqlite3's online backup API copies the database into
  `DEST/tinyllava_med-<UTC time>.db` in one step, under one read transaction, so the copy is the
  database as committed at that moment while the server goes on writing (WAL). The copy is
  checked with `PRAGMA integrity_check`, and takes its final name only once the files it refers
  to are copied too: a run cut short (killed, a full disk) leaves a `.db.part`, never a
  backup that looks whole, and the next run removes it.
- PostgreSQL: `pg_dump` is the tool for the database (not run here); the files are copied all
  the same.
- Files: content-addressed, so a file already in `DEST/images` is the same file and each run
  copies only new ones (and again one whose size differs from the source's: a damaged copy).
  Every file the database's images refer to is copied and its sha256
  checked against its name: a missing or corrupt source file is reported, never copied. A
  released image (`retention.py`) has only its header here, and that is what is copied; an
  image the retention releases while the files are copied is released in the copy too.

Restore (SQLite): `tinyllava-med db restore DEST/tinyllava_med-<time>.db`, with the server
stopped (it refuses while a `serve` or another command holds the data directory). It checks the
copy, moves the database it replaces aside with its `-wal` and `-shm` files (a crashed server's
write-ahead log would otherwise be replayed into the restored database), puts the copy in place,
and copies back from `DEST/images` each file it refers to that the store lacks or holds damaged.
On PostgreSQL, `pg_restore` the dump and then run the same command with `--images-only DEST`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import OperationalError

from tinyllava_med.server.db import crud
from tinyllava_med.server.db.migrate import (
    MigrationError,
    current_revision,
    head_revision,
    known_revisions,
    upgrade,
)
from tinyllava_med.server.db.models import Image
from tinyllava_med.server.db.session import (
    make_engine,
    normalize_database_url,
    session_factory,
)
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import ImageStore, remove_stale, shared_use, sole_user


@dataclass
class Backup:
    database: Path | None  # None: PostgreSQL (pg_dump's job)
    files_copied: int = 0
    files_present: int = 0  # already in the backup from an earlier run
    files_repaired: int = 0  # of the copied: a damaged copy (wrong size, or found by `verify`)
    bytes_copied: int = 0
    missing: list[str] = field(default_factory=list)  # sha256 of files not in the store
    corrupt: list[str] = field(default_factory=list)  # files whose content is not their name
    not_audited: str | None = None  # why the audit event could not be written

    @property
    def complete(self) -> bool:
        return not self.missing and not self.corrupt


def copy_before_upgrade(settings: Settings) -> Path | None:
    """Before `serve` migrates its SQLite database to a newer revision: a checked copy of it as
    it was, `data/backups/tinyllava_med-<time>-rev<revision>.db`, for `db restore` if the update
    goes wrong (the image files are content-addressed, and no migration changes them). None when
    there is nothing to migrate (no database yet, an empty one, one at this code's revision, or
    one of a newer version, which `upgrade` refuses)."""
    url = normalize_database_url(settings.database_url)
    path = Path(url.database or "")
    if url.get_backend_name() != "sqlite" or not path.is_file():
        return None
    current = current_revision(url)
    if current is None or current == head_revision() or current not in known_revisions():
        return None
    part = _snapshot(path, settings.data_dir / "backups")
    final = part.with_name(part.name.removesuffix(".db.part") + f"-rev{current}.db")
    os.replace(part, final)
    return final


def _snapshot(source: Path, dest_dir: Path) -> Path:
    """A checked copy of the SQLite database at `source`, by the online backup API."""
    if not source.is_file():
        raise FileNotFoundError(f"no SQLite database at {source}")
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = dest_dir / f"tinyllava_med-{stamp}.db"
    part = final.with_name(final.name + ".part")
    remove_stale(dest_dir.glob("tinyllava_med-*.db.part"))  # a run cut short
    part.touch(mode=0o600)  # every report's text: the owner's only, whatever the umask
    try:
        src = sqlite3.connect(source, timeout=30)  # only read: the backup writes to `dst`
        try:
            dst = sqlite3.connect(part)
            try:
                src.backup(dst)  # all pages in one step: one consistent read transaction
                # one self-contained file: the live database's WAL mode came with its pages, and
                # every later reader of the copy left a -wal and -shm beside it (a read-only
                # one cannot remove them), which a copy to another disk would leave behind
                dst.execute("PRAGMA journal_mode=DELETE")
                (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
        if check != "ok":
            raise RuntimeError(f"the database copy failed its integrity check: {check}")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


# the files the database refers to: held images, and the headers kept of released ones (their
# pixels are gone by design: retention.py)
_FILES_SQL = (
    "SELECT sha256 FROM images WHERE released_at IS NULL "
    "UNION SELECT header_sha256 FROM images WHERE header_sha256 IS NOT NULL"
)


def _same_size(a: ImageStore, b: ImageStore, sha: str) -> bool:
    try:
        return a.path(sha).stat().st_size == b.path(sha).stat().st_size
    except FileNotFoundError:  # not in the store: reported as missing, the copy kept
        return True


def _copy_checked(
    source: ImageStore,
    dest: ImageStore,
    sha: str,
    *,
    verify_dest: bool = False,
    verify_source: bool = False,
) -> tuple[str, int]:
    """Copy the file `sha` from `source` to `dest` unless `dest` holds it whole: of the same
    size, and with `verify_dest` also of the right content (a copy otherwise is damaged and
    replaced). "present", "copied" (with its size), "repaired" (copied over a damaged file),
    "missing" from `source`, or "corrupt" (its content in `source` is not its name, so it is
    not copied; with `verify_source` also found so when `dest` holds it already: damage done
    to the store after its first backup, which `db restore` repairs from the copy)."""
    existed = dest.exists(sha)
    there = existed and _same_size(dest, source, sha)
    if there and (not verify_dest or dest.whole(sha)):
        if verify_source and source.exists(sha) and not source.whole(sha):
            return "corrupt", 0
        return "present", 0
    if not source.exists(sha):
        return "missing", 0
    data = source.get(sha)
    if hashlib.sha256(data).hexdigest() != sha:
        return "corrupt", 0
    dest.put(data, sha, replace=there)  # the store's own atomic, content-addressed write
    return ("repaired" if existed else "copied"), len(data)


def _released_meanwhile(
    engine: Any, snapshot: Path, store: ImageStore, copies: ImageStore, result: Backup
) -> None:
    """The files found missing because the image retention released their images after the
    snapshot (the hourly job runs inside `serve`): the copy takes each such release as the live
    database has it (`released_at`, the header kept, which is copied), so the backup is whole
    and its restore asks for no file the store no longer holds. What is still missing stays so."""
    if not result.missing:
        return
    with session_factory(engine)() as s:
        rows = s.execute(
            select(Image.id, Image.released_at, Image.header_sha256).where(
                Image.sha256.in_(result.missing), Image.released_at.is_not(None)
            )
        ).all()
    if not rows:
        return
    copy = create_engine(f"sqlite:///{snapshot}")  # no pragmas: the copy stays as it was made
    try:
        with copy.begin() as conn:
            for image_id, released_at, header in rows:
                conn.execute(
                    update(Image)
                    .where(Image.id == image_id, Image.released_at.is_(None))
                    .values(released_at=released_at, header_sha256=header)
                )
            held = select(Image.sha256).where(
                Image.sha256.in_(result.missing), Image.released_at.is_(None)
            )
            still = set(conn.scalars(held))
    finally:
        copy.dispose()
    result.missing = [sha for sha in result.missing if sha in still]
    for header in sorted({h for _, _, h in rows if h is not None}):
        outcome, size = _copy_checked(store, copies, header)
        if outcome in ("copied", "repaired"):
            result.files_copied += 1
            result.bytes_copied += size
        elif outcome in ("missing", "corrupt"):
            (result.missing if outcome == "missing" else result.corrupt).append(header)


def backup(settings: Settings, dest: Path, *, actor: str = "cli", verify: bool = False) -> Backup:
    """Back up the database (SQLite) and the image files into `dest`; audited as
    `backup.create`. A file copied by an earlier run is kept when it has the right size, or
    with `verify` when its content is right too (a full read of the backup)."""
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    with shared_use(dest):  # `--keep` prunes the folder only while no run copies into it
        return _backup(settings, dest, actor, verify)


def _backup(settings: Settings, dest: Path, actor: str, verify: bool) -> Backup:
    url = normalize_database_url(settings.database_url)
    engine = make_engine(url)
    try:
        snapshot = None
        if url.get_backend_name() == "sqlite":
            snapshot = _snapshot(Path(url.database or ""), dest)
            result = Backup(snapshot.with_suffix(""))  # its name once the files are copied
            copy = sqlite3.connect(snapshot)  # the files the copy refers to
            try:
                hashes = sorted({row[0] for row in copy.execute(_FILES_SQL)})
            finally:
                copy.close()
        else:
            result = Backup(None)
            with session_factory(engine)() as s:
                hashes = sorted(set(s.scalars(text(_FILES_SQL))))
        store, copies = ImageStore(settings.images_dir), ImageStore(dest / "images")
        try:
            for sha in hashes:
                outcome, size = _copy_checked(
                    store, copies, sha, verify_dest=verify, verify_source=verify
                )
                if outcome == "present":
                    result.files_present += 1
                elif outcome in ("copied", "repaired"):
                    result.files_copied += 1
                    result.files_repaired += outcome == "repaired"
                    result.bytes_copied += size
                else:
                    (result.missing if outcome == "missing" else result.corrupt).append(sha)
            if snapshot is not None:
                _released_meanwhile(engine, snapshot, store, copies, result)
        except BaseException:  # a full disk, an interrupt: no copy of every report stays
            if snapshot is not None:
                snapshot.unlink(missing_ok=True)
            raise
        if snapshot is not None:
            os.replace(snapshot, snapshot.with_suffix(""))
        result.not_audited = audit_backup_event(
            engine,
            actor,
            "backup.create",
            result.database.name if result.database else None,
            ok=result.complete,
            detail={
                "files_copied": result.files_copied,
                "files_present": result.files_present,
                "files_repaired": result.files_repaired,
                "missing": len(result.missing),
                "corrupt": len(result.corrupt),
            },
        )
    finally:
        engine.dispose()
    return result


def audit_backup_event(
    engine: Any, actor: str, action: str, name: str | None, *, ok: bool, detail: dict[str, int]
) -> str | None:
    """A backup's audit event (`backup.create`, `backup.prune`); None, or why it could not be
    written: the server's own database is full or locked, and what was done stays done."""
    try:
        with session_factory(engine).begin() as s:
            crud.audit(
                s,
                actor=actor,
                action=action,
                resource_type="backup",
                resource_id=name,
                outcome="ok" if ok else "error",
                status_code=(201 if action == "backup.create" else 200) if ok else 500,
                detail=detail,
            )
    except OperationalError as e:
        return str(e.orig).splitlines()[0] if str(e.orig) else "error"
    return None


@dataclass
class Restored:
    database: Path | None  # the restored database; None: images only (PostgreSQL)
    replaced: list[Path] = field(default_factory=list)  # what it replaced, moved aside
    files_copied: int = 0
    files_present: int = 0
    files_repaired: int = 0  # of the copied: a damaged file in the store replaced
    missing: list[str] = field(default_factory=list)  # in neither the store nor the backup


def checked_copy(copy: Path) -> set[str]:
    """The files a backup's database refers to, once it is found whole and ours."""
    if not copy.is_file():
        raise FileNotFoundError(f"no backup database at {copy}")
    db = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        (check,) = db.execute("PRAGMA integrity_check").fetchone()
        if check != "ok":
            raise RuntimeError(f"{copy.name} failed its integrity check: {check}")
        columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
        if "released_at" not in columns:  # a backup from before image retention (0006)
            return {row[0] for row in db.execute("SELECT sha256 FROM images")}
        return {row[0] for row in db.execute(_FILES_SQL)}
    except sqlite3.DatabaseError:  # not SQLite, or not ours (no images table)
        raise RuntimeError(f"{copy.name} is not a tinyllava-med database") from None
    finally:
        db.close()


def _restore_files(store: ImageStore, copies: ImageStore, hashes: set[str], out: Restored) -> None:
    for sha in sorted(hashes):
        # restoring is rare and is about damage: every file in place is read through
        outcome, _ = _copy_checked(copies, store, sha, verify_dest=True)
        if outcome == "present":
            out.files_present += 1
        elif outcome in ("copied", "repaired"):
            out.files_copied += 1
            out.files_repaired += outcome == "repaired"
        else:  # not in the backup, or not whole there
            out.missing.append(sha)


def _migrated_copy(source: Path, part: Path, part_url: Any) -> None:
    """Copy the backup to `part` and bring the copy to this code's revision (a backup from an
    older version, as `serve` would at its start) before it replaces anything: a backup that a
    newer version took, or one whose migration fails, leaves the live database where it was."""
    part.touch(mode=0o600)
    try:
        shutil.copyfile(source, part)
        try:
            upgrade(part_url)
        except MigrationError as e:
            raise MigrationError(
                f"{source.name} was not restored and nothing was replaced: {e}"
            ) from None
        with closing(sqlite3.connect(part)) as db:  # the log folded in: `part` alone is whole
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA journal_mode=DELETE")
        with open(part, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        for suffix in ("", "-wal", "-shm", "-journal"):
            part.with_name(part.name + suffix).unlink(missing_ok=True)
        raise


def restore(settings: Settings, source: Path, *, images_only: bool = False) -> Restored:
    """Put a backup back: the SQLite database `source` (a `backup` copy) and the image files it
    refers to from the `images` folder beside it; with `images_only` (PostgreSQL, restored by
    `pg_restore`), `source` is the backup folder and the files are those the live database
    refers to, after migrating the restored database to this code's revision. Refuses while
    another process holds the data directory. Audited in the restored database as
    `backup.restore`."""
    url = normalize_database_url(settings.database_url)
    sqlite = url.get_backend_name() == "sqlite"
    if not images_only and not sqlite:
        raise ValueError("PostgreSQL: pg_restore the dump, then restore with --images-only DEST")
    # the backup folder is not pruned (`db backup --keep`) while its copy and files are read
    with sole_user(settings.data_dir), shared_use(source if images_only else source.parent):
        if images_only:
            result = Restored(None)
            # a dump from before this code's migrations (0006 added the columns read below):
            # brought up to date, as `serve` on PostgreSQL requires anyway
            upgrade(settings.database_url)
            engine = make_engine(url)
            try:
                with session_factory(engine)() as s:
                    hashes = set(s.scalars(text(_FILES_SQL)))
            finally:
                engine.dispose()
            folder = source
        else:
            hashes = checked_copy(source)
            live = Path(url.database or "")
            result = Restored(live)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            part = live.with_name(live.name + ".part")
            _migrated_copy(source, part, url.set(database=str(part)))
            for suffix in ("", "-wal", "-shm"):  # never deleted: moved aside, for a second look
                old = live.with_name(live.name + suffix)
                if old.exists():
                    aside = live.with_name(f"{live.name}.replaced-{stamp}{suffix}")
                    os.replace(old, aside)
                    result.replaced.append(aside)
            os.replace(part, live)
            folder = source.parent
        _restore_files(
            ImageStore(settings.images_dir), ImageStore(folder / "images"), hashes, result
        )
        engine = make_engine(url)
        try:
            with session_factory(engine).begin() as s:
                crud.audit(
                    s,
                    actor="cli",
                    action="backup.restore",
                    resource_type="backup",
                    resource_id=source.name,
                    outcome="ok" if not result.missing else "error",
                    status_code=200 if not result.missing else 500,
                    detail={
                        "files_copied": result.files_copied,
                        "files_present": result.files_present,
                        "missing": len(result.missing),
                    },
                )
        finally:
            engine.dispose()
    return result
