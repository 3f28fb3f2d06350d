"""Content-addressed image store: uploaded bytes live on disk under their sha256, never in the DB.

`put` is idempotent (the same file uploaded twice is stored once) and atomic (write to a temp
file, then rename), so a failed request never leaves a half-written image behind; the file and
its directory entry are on disk (fsync) before `put` returns and the database row that names it
is committed, so a power cut cannot leave a row whose file is empty. A stored copy of the wrong
size (damaged) is written again when the same content arrives. Storing a
file that is there already touches it: `remove_if_stale` deletes only files untouched for a
grace period, so an upload of the same content racing a deletion keeps its file. The deletion
moves the file aside before it looks a second time, so an upload between its look and its
removal either touched the file (which goes back) or finds none and writes it again.

`ImageStore.rendered` is a bounded LRU (`lru.ByteLRU`) of decoded images (what
`serving.render` makes of a file for a frame and window), so asking many questions about one
study decodes its DICOM once. Files never change under their sha256, so entries never go stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from tinyllava_med.server.lru import ByteLRU

# Older than this, an entry in data/tmp is a crashed run's: one in use is written as it fills.
STALE_TMP_S = 3600.0
# below this free on the data volume the server cannot work: SQLite cannot even open its
# database, and every read fails as its audit row cannot be written (`serve` does not start;
# `/readyz` says `storage: full`)
MIN_FREE_BYTES = 16 * 1024 * 1024


def storage_free(data_dir: str | Path) -> int:
    """Bytes free on the data volume."""
    return shutil.disk_usage(data_dir).free


def writable(*folders: str | Path) -> bool:
    """Whether each of `folders` takes new files (not on a volume mounted read-only, nor
    closed to this process); one that does not exist yet counts (it is made when needed)."""
    return all(os.access(f, os.W_OK) or not os.path.exists(f) for f in folders)


# Every process that serves or writes a data directory holds this file's lock shared
# (`hold_data_dir`); `db restore` takes it alone (`sole_user`), so it never replaces a database
# under a running server.
IN_USE_LOCK = "in-use.lock"
_held: list[int] = []


class DataDirInUse(RuntimeError):
    pass


def _lock_file(data_dir: str | Path) -> int:
    Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(Path(data_dir) / IN_USE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)


def hold_data_dir(data_dir: str | Path) -> None:
    """Mark `data_dir` in use by this process until it exits (a shared lock)."""
    fd = _lock_file(data_dir)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held.append(fd)


def alone_on(data_dir: str | Path) -> bool:
    """Whether no other process holds `data_dir` now (call it before holding it yourself)."""
    try:
        with sole_user(data_dir):
            return True
    except DataDirInUse:
        return False


@contextmanager
def sole_user(data_dir: str | Path) -> Iterator[None]:
    """Hold `data_dir` alone for the block; `DataDirInUse` if a process holds it."""
    fd = _lock_file(data_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirInUse(
                f"a server or another command is using {data_dir}: stop it first"
            ) from None
        yield
    finally:
        os.close(fd)


@contextmanager
def shared_use(folder: str | Path) -> Iterator[None]:
    """Use `folder` for the block beside others who do the same (a shared lock): `sole_user`
    refuses meanwhile, and this waits for a `sole_user` block to end. Where no lock can be
    taken (a folder mounted read-only, which nothing can prune either; a share without locks)
    the block runs unlocked."""
    try:
        fd = _lock_file(folder)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def private_tmp(data_dir: str | Path) -> Path:
    """Make `data_dir/tmp` (owner only) this process's temporary directory, remove what crashed
    runs left there (untouched for `STALE_TMP_S`: other processes on the same data directory
    may be using theirs), and return it. `serve` calls it: uploads past 1 MB (Starlette spools
    them to a temporary file) and instances received over DIMSE are study data, and they belong
    with the rest of it (the data volume, its encryption and backups), not in a shared `/tmp`
    that outlives a crash."""
    tmp = Path(data_dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o700)
    remove_stale(tmp.iterdir())
    tempfile.tempdir = str(tmp)
    return tmp


def remove_stale(leftovers: Iterable[Path]) -> int:
    """Remove those of `leftovers` (a crashed run's files or folders) untouched for
    `STALE_TMP_S`: a younger one may be another process's, in use; how many went."""
    stale, removed = time.time() - STALE_TMP_S, 0
    for leftover in leftovers:
        try:
            if leftover.lstat().st_mtime >= stale:
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink()
            removed += 1
        except FileNotFoundError:  # its owner removed it meanwhile
            continue
    return removed


def _sync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _untouched_for(path: Path, grace_s: float) -> bool:
    return time.time() - path.stat().st_mtime >= grace_s


def _image_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


class ImageStore:
    def __init__(self, root: str | Path, render_cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rendered: ByteLRU[Image.Image] = ByteLRU(render_cache_bytes, _image_bytes)

    def remove_leftovers(self) -> int:
        """Remove what a crash left in the store: a `put`'s temporary file or a deletion's
        moved-aside file (`.tmp-*`, `.gone-*`), untouched for `STALE_TMP_S` (another process
        may be writing its own now); how many."""
        return remove_stale([*self.root.glob("*/.tmp-*"), *self.root.glob("*/.gone-*")])

    def names(self) -> Iterator[str]:
        """The sha256 of every file in the store."""
        for shard in self.root.iterdir():
            if shard.is_dir() and len(shard.name) == 2:
                for entry in os.scandir(shard):
                    if len(entry.name) == 64 and entry.name.startswith(shard.name):
                        yield entry.name

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, digest: str | None = None, *, replace: bool = False) -> str:
        """Store `data` under its sha256 (`digest`, when the caller has just computed it from
        these bytes); its name. A file already there of the same size is taken as this one,
        unless `replace` (its content was found damaged)."""
        digest = digest or hashlib.sha256(data).hexdigest()
        dest = self.path(digest)
        try:
            if not replace and dest.stat().st_size == len(data):
                os.utime(dest)  # a deletion sweeping it now leaves it: it is in use again
                return digest
        except FileNotFoundError:  # new, or a deletion has just moved it aside: write it
            pass
        if not dest.parent.is_dir():  # a new shard: its entry in the store's root, durable too
            dest.parent.mkdir(parents=True, exist_ok=True)
            _sync_dir(self.root)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _sync_dir(dest.parent)
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def touch(self, sha256: str) -> None:
        """Mark the file in use now (a question about it is being answered): the image
        retention leaves its study for a while (`touched_within`), as a sweep leaves it. Best
        effort: on a volume mounted read-only the question goes on (it writes no file)."""
        with contextlib.suppress(OSError):
            os.utime(self.path(sha256))

    def touched_within(self, sha256: str, seconds: float) -> bool:
        """Whether the file was stored or touched in the last `seconds`."""
        try:
            return not _untouched_for(self.path(sha256), seconds)
        except FileNotFoundError:
            return False

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def whole(self, sha256: str) -> bool:
        """Whether the file `sha256` is there and its content is its name (read through)."""
        try:
            with open(self.path(sha256), "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest() == sha256
        except FileNotFoundError:
            return False

    def remove_if_stale(self, sha256: str, grace_s: float) -> bool:
        """Delete the file (and its renderings) unless it was stored or touched in the last
        `grace_s` seconds; whether it is gone. The caller checks that no image refers to it."""
        path = self.path(sha256)
        try:
            if not _untouched_for(path, grace_s):
                return False
            # An upload of the same content may touch it right now: from here on an upload
            # finds no file and writes its own, and one that touched it in time is seen below.
            aside = path.with_name(f".gone-{sha256}-{secrets.token_hex(4)}")
            path.rename(aside)
            if not _untouched_for(aside, grace_s):
                os.replace(aside, path)  # touched meanwhile: in use again (same bytes if rewritten)
                return False
            aside.unlink()
        except FileNotFoundError:
            pass
        self.rendered.discard(lambda key: isinstance(key, tuple) and key[0] == sha256)
        return True
