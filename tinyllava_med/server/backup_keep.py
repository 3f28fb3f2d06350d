"""What a backup folder keeps: `tinyllava-med db backup DEST --keep N`.

After a complete backup, all but the N newest database copies in DEST
(`tinyllava_med-<UTC time>.db`, `backup.py`) are removed, and then every image file in
`DEST/images` that no database copy left in DEST refers to. The folder's image files are
shared by all its copies (content-addressed), so a file goes only once the last copy that lists
it is gone. This is also how the image retention (`retention.py`) reaches the backups: a copy
made after an image was released lists only its kept header, and once the older copies that
still list the whole file are pruned, the file's pixels leave the backup folder too.

Nothing is removed while another `db backup` or `db restore` uses the folder (`shared_use`),
or when a copy that would be kept fails its check (the older ones may be all that is whole).
SQLite only: a PostgreSQL backup's database is `pg_dump`'s, whose dumps are not read here, so
no file in DEST could be known to be unneeded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tinyllava_med.server.backup import audit_backup_event, checked_copy
from tinyllava_med.server.db.session import make_engine, normalize_database_url
from tinyllava_med.server.settings import Settings
from tinyllava_med.server.storage import DataDirInUse, ImageStore, sole_user

# `backup.py`'s names (`_snapshot`'s stamp: %Y%m%dT%H%M%S%fZ), which sort by time; serve's
# copies before a migration (`-rev<revision>`) and a restore's moved-aside files are not these
BACKUP_NAME = re.compile(r"tinyllava_med-\d{8}T\d{12}Z\.db")


@dataclass
class Pruned:
    databases: list[Path] = field(default_factory=list)  # the copies removed, oldest first
    files: int = 0  # image files removed
    bytes: int = 0
    failed: int = 0  # copies or files that could not be removed
    nothing_because: str | None = None  # why nothing was removed
    not_audited: str | None = None


def prune(settings: Settings, dest: Path, keep: int, *, actor: str = "cli") -> Pruned:
    """Keep the `keep` newest database copies in `dest` and the image files they refer to;
    remove the rest. Audited as `backup.prune` when something was removed (also when a removal
    failed partway: what is gone is recorded)."""
    if keep < 1:
        raise ValueError("keep at least one backup")
    out = Pruned()
    try:
        with sole_user(dest):
            copies = sorted(p for p in dest.iterdir() if BACKUP_NAME.fullmatch(p.name))
            old, kept = copies[:-keep], copies[-keep:]
            others = [p for p in dest.glob("*.db") if p not in copies]
            referenced: set[str] = set()
            for copy in [*kept, *others]:  # each read whole before anything is removed
                try:
                    referenced |= checked_copy(copy)
                except (RuntimeError, OSError) as e:
                    out.nothing_because = f"{copy.name} could not be read: {e}"
                    return out
            try:
                _remove(out, old, ImageStore(dest / "images"), referenced)
            finally:
                _audit(settings, actor, out, len(kept))
    except DataDirInUse:
        out.nothing_because = f"another backup or restore is using {dest}"
    except OSError as e:  # no lock on this folder (a share without locks), or it is read-only
        out.nothing_because = f"{dest} cannot be locked ({e.strerror or type(e).__name__})"
    return out


def _remove(out: Pruned, old: list[Path], store: ImageStore, referenced: set[str]) -> None:
    """Remove the `old` copies, then the files none left refers to; a removal that fails (a
    file removed by hand meanwhile, a permission) is counted and the rest go on."""
    for copy in old:
        try:
            copy.unlink()
            out.databases.append(copy)
        except OSError:
            out.failed += 1
            continue
        for suffix in ("-wal", "-shm", "-journal"):  # what readers of an older copy left
            copy.with_name(copy.name + suffix).unlink(missing_ok=True)
    for sha in [sha for sha in store.names() if sha not in referenced]:
        path = store.path(sha)
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            out.failed += 1
            continue
        out.bytes += size
        out.files += 1


def _audit(settings: Settings, actor: str, out: Pruned, kept: int) -> None:
    if not (out.databases or out.files or out.failed):
        return
    engine = make_engine(normalize_database_url(settings.database_url))
    try:
        out.not_audited = audit_backup_event(
            engine,
            actor,
            "backup.prune",
            None,
            ok=not out.failed,
            detail={
                "kept": kept,
                "removed": len(out.databases),
                "files": out.files,
                "failed": out.failed,
            },
        )
    finally:
        engine.dispose()
