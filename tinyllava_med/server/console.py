"""The server's console commands, run on its data directory and database beside (or instead
of) `serve`: `db backup`, `db restore`, `db release-images`, `apikey`, `import` and `pacs check`.
Each takes the server's settings, prints what it did, audits what changed (actor `cli`) and
returns the exit status; `cli.py` parses their arguments."""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from tinyllava_med.imaging.budget import DECODE_BUDGET
from tinyllava_med.server.auth import (
    create_api_key,
    get_api_key,
    is_last_admin_key,
    list_api_keys,
    revoke_api_key,
)
from tinyllava_med.server.backup import backup, restore
from tinyllava_med.server.backup_keep import prune
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.db.session import make_engine, session_factory
from tinyllava_med.server.errors import APIError, storage_full
from tinyllava_med.server.logs import quiet_libraries
from tinyllava_med.server.media_import import Source, import_media
from tinyllava_med.server.pacs_check import check
from tinyllava_med.server.retention import audit_release, release_due
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import DataDirInUse, ImageStore, hold_data_dir


@contextmanager
def console_db(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """The server's database for a console command: the SQLite default made and migrated as
    `serve` would (PostgreSQL is migrated by `db upgrade`); a session factory, disposed after."""

    hold_data_dir(settings.data_dir)  # `db restore` refuses while this command runs
    if settings.database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def release_images(settings: Settings, days: float | None, draft_days: float | None) -> int:
    """Release now what the hourly job would (`retention.py`): for a disk filling up."""

    if days is not None:
        settings = settings.model_copy(update={"image_retention_days": days})
    if draft_days is not None:
        settings = settings.model_copy(update={"image_retention_draft_days": draft_days})
    if settings.image_retention_days is None:
        raise SystemExit(
            "db release-images needs --days N (or TINYLLAVA_MED_IMAGE_RETENTION_DAYS): studies "
            "older than that without drafts give their pixels back to the PACS"
        )
    total = {"studies": 0, "images": 0, "files_removed": 0, "headers_lost": 0}
    with console_db(settings) as sessions:
        while True:  # all that is due, in the job's runs of up to STUDIES_PER_RUN studies
            result = release_due(sessions, ImageStore(settings.images_dir), settings)
            with sessions.begin() as s:
                audit_release(s, "cli", result)
            total = {k: v + result[k] for k, v in total.items()}
            if not (result["more"] and result["studies"]):
                break
    result = total
    drafts = "no draft"
    if settings.image_retention_draft_days is not None:
        drafts += f" changed in the last {settings.image_retention_draft_days:g} days"
    print(
        f"released {result['images']} images of {result['studies']} studies that received no "
        f"image for {settings.image_retention_days:g} days and have {drafts}; "
        f"{result['files_removed']} files removed"
    )
    if result["headers_lost"]:
        print(f"{result['headers_lost']} DICOM headers could not be written (disk full?)")
        return 1
    return 0


def restore_backup(settings: Settings, source: str, images_only: bool) -> int:

    try:
        done = restore(settings, Path(source), images_only=images_only)
    except (FileNotFoundError, DataDirInUse, ValueError, RuntimeError) as e:
        raise SystemExit(f"db restore: {e}") from None
    if done.database is not None:
        print(f"database: {done.database} restored from {source}")
    for path in done.replaced:
        print(f"replaced, kept as {path}")
    repaired = f" ({done.files_repaired} over damaged files)" if done.files_repaired else ""
    print(f"files: {done.files_copied} copied back{repaired}, {done.files_present} in place")
    if done.missing:
        print(
            f"{len(done.missing)} files the database refers to are in neither the store nor "
            "the backup"
        )
        return 1
    return 0


def make_backup(settings: Settings, dest: str, verify: bool, keep: int | None = None) -> int:

    if keep is not None and not settings.database_url.startswith("sqlite"):
        raise SystemExit(
            "db backup: --keep is for SQLite: on PostgreSQL the database is backed up by "
            "pg_dump, whose dumps may need any image file in the folder; rotate them together"
        )
    try:
        done = backup(settings, Path(dest), verify=verify)
    except FileNotFoundError as e:
        raise SystemExit(f"db backup: {e}") from None
    except PermissionError as e:
        raise SystemExit(
            f"db backup: {e.strerror}: {e.filename} (the containers run as uid 10001: "
            f"`chown 10001 {dest}` on the host)"
        ) from None
    except (OSError, sqlite3.OperationalError) as e:  # sqlite3's: writing the copy
        if not (storage_full(e) or "database or disk is full" in str(e)):
            raise
        raise SystemExit(
            "db backup: a disk is full: no database copy was kept of this run; free space "
            f"where {dest} is, or back up to another disk"
        ) from None
    if done.database is not None:
        print(f"database: {done.database}")
    else:
        print("database: PostgreSQL, not copied here: back it up with pg_dump")
    print(
        f"files: {done.files_copied} copied ({done.bytes_copied} bytes), "
        f"{done.files_present} already in the backup"
    )
    if done.files_repaired:
        print(
            f"{done.files_repaired} damaged copies in the backup were replaced: check the "
            "backup disk"
        )
    for label, hashes in (("missing from the store", done.missing), ("corrupt", done.corrupt)):
        if hashes:
            print(f"{len(hashes)} image file(s) {label}: {', '.join(h[:12] for h in hashes)}")
    if done.not_audited:
        print(f"the backup is made, but could not be recorded in the audit log: {done.not_audited}")
    if keep is not None:
        if done.complete:
            _prune_backups(settings, Path(dest), keep)
        else:
            print("older backups kept: this one is incomplete")
    return 0 if done.complete else 1


def _prune_backups(settings: Settings, dest: Path, keep: int) -> None:
    pruned = prune(settings, dest, keep)
    if pruned.nothing_because:
        print(f"older backups kept: {pruned.nothing_because}")
        return
    print(
        f"kept the {keep} newest backups: removed {len(pruned.databases)} older ones and "
        f"{pruned.files} image files ({pruned.bytes} bytes) that no kept backup refers to"
    )
    if pruned.failed:
        print(f"{pruned.failed} older copies or files could not be removed: check the backup disk")
    if pruned.not_audited:
        print(f"the removal could not be recorded in the audit log: {pruned.not_audited}")


def pacs_check(settings: Settings) -> int:

    quiet_libraries()  # no query URLs or credentials in the output, even with -v
    checks = check(settings)
    if not checks:
        print(
            "no PACS is configured (TINYLLAVA_MED_DICOMWEB_PUSH_URL, _DICOMWEB_PULL_URL, "
            "_DIMSE_PUSH, _DIMSE_PULL)"
        )
        return 0
    for c in checks:
        print(c.line())
    return 0 if all(c.ok for c in checks) else 1


def apikey(settings: Settings, args: argparse.Namespace) -> int:
    """create (the key is printed once), list (never the keys), revoke KEY_ID; create and
    revoke are audited with actor `cli`."""
    key = None
    with console_db(settings) as sessions, sessions.begin() as session:
        if args.apikey_cmd == "list":
            keys = list_api_keys(session, include_revoked=True)
            if keys:
                print(
                    f"{'id':<36}  {'role':<11}  {'key':<16}  {'state':<24}  {'last used':<16}  name"
                )
            for k in keys:
                state = "active"
                if k.revoked_at:
                    state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}"
                elif k.expires_at:
                    verb = "expired" if k.expired else "expires"
                    state = f"{verb} {k.expires_at:%Y-%m-%d %H:%M}"
                used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
                print(
                    f"{k.id}  {k.role:<11}  tlm_{k.prefix}_...  {state:<24}  {used:<16}  {k.name}"
                )
            return 0
        if args.apikey_cmd == "revoke":
            row = get_api_key(session, args.key_id)
            if row is None:
                raise SystemExit(f"no API key with id {args.key_id}")
            if row.revoked_at is not None:
                print(
                    f"{row.role} key {row.id} was revoked already ({row.revoked_at:%Y-%m-%d %H:%M})"
                )
                return 0
            if is_last_admin_key(session, row) and not args.force:
                raise SystemExit(
                    f"{row.id} is the last active admin key: without it nobody can manage keys, "
                    "read the audit log or delete studies through the API. Create another first "
                    "(apikey create --role admin), or revoke it anyway with --force (a leaked "
                    "key, say) and create one afterwards"
                )
            revoke_api_key(session, row)
            action, status = "apikey.revoke", 204
            print(
                f"revoked {row.role} key {row.id}; a running server stops accepting it "
                f"within {settings.auth_cache_s:g} s"
            )
        else:
            days = (
                args.expires_in_days if args.expires_in_days is not None else settings.api_key_days
            )
            row, key = create_api_key(
                session,
                role=args.role,
                name=args.name or f"{args.role} key",
                expires_in_days=days,
            )
            action, status = "apikey.create", 201
            until = f", expires {row.expires_at:%Y-%m-%d %H:%M} UTC" if days else ""
            print(f"created {row.role} key {row.id} (shown once{until}):")
        crud.audit(
            session,
            actor="cli",
            action=action,
            resource_type="apikey",
            resource_id=row.id,
            outcome="ok",
            status_code=status,
            detail={"role": row.role},
        )
    if key is not None:
        print(key)
    return 0


def import_paths(settings: Settings, paths: list[str]) -> int:
    """File the DICOM images of a CD, USB stick, folder or ZIP on this machine into the server's
    database and file store (the server may be running); audited with actor `cli`."""

    DECODE_BUDGET.resize(settings.decode_memory_mb * 1024 * 1024)  # as `serve` does
    sources: list[Source] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            sources += sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        elif path.is_file():
            sources.append(path)
        else:
            raise SystemExit(f"import: no such file or folder: {arg}")
    with console_db(settings) as sessions:
        try:
            summary = import_media(
                sessions, ImageStore(settings.images_dir), settings, sources, actor="cli"
            )
        except APIError as e:
            raise SystemExit(f"import: {e.message}") from None
    studies = len(summary.study_uids)
    print(
        f"{_n(len(sources), 'file')}: {_n(summary.stored, 'new image')}, {summary.already} "
        f"already here, in {_n(studies, 'study', 'studies')}; automatic reports queued: "
        f"{len(summary.jobs)}"
    )
    for label, counts in (("skipped", summary.skipped), ("failed", summary.failed)):
        if counts:
            print(f"{label}: " + ", ".join(f"{n} {why}" for why, n in sorted(counts.items())))
    return 0 if (summary.stored or summary.already) and not summary.failed else 1


def _n(count: int, one: str, many: str | None = None) -> str:
    """`count` and the word for that many: 1 file, 2 files, 1 study, 6 studies."""
    return f"{count} {one if count == 1 else many or one + 's'}"
