"""Robust downloads of the LLaVA-Med data files and of their PMC figures.

`tinyllava-med data download --what instruct-60k-inline --out data/llava_med --images` calls
`download_llava_med(["instruct-60k-inline"], "data/llava_med", images=True)`.

`download_file` is the one transfer routine: it writes `<dest>.part`, resumes it with an HTTP
Range request after a broken transfer or a restart, retries connection errors and 5xx/429 with
exponential backoff (progress resets the retry budget), fails at once and clearly on 404/410,
checks the size (known size or Content-Length) and the sha256 when known, and renames the part
file onto `dest` only when it is complete and verified. A file already complete is not fetched.

`download_images` follows LLaVA-Med's `download_images.py`: each line of the image-URL list
names a PMC article archive (`pmc_tar_url`), the figure inside it (`image_file_path`) and the
name to save it under (`<pair_id>.jpg`). Each archive is fetched once for all the figures it
holds; only the named regular file is read out of it (nothing is extracted by path, so an
archive cannot write outside `images/`). A figure already present is skipped; a figure that
fails (archive gone from PMC, missing member, broken archive) is logged and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

from tinyllava_med.training.datasets.sources import (
    FILES,
    GROUPS,
    IMAGE_URLS_FILE,
    WHAT_CHOICES,
    DataFile,
    What,
    resolve_base_url,
    url_of,
)

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 20
MAX_BACKOFF_S = 60.0
MAX_FIGURE_BYTES = 256 << 20
USER_AGENT = "tinyllava-med-data/0.1"


class DownloadError(RuntimeError):
    """A file could not be fetched (after retries where retrying makes sense)."""


class NotFoundError(DownloadError):
    """The server has no such file (HTTP 404/410): retrying would not help."""


class SizeMismatchError(DownloadError):
    """The file's size is not the expected one."""


class ChecksumMismatchError(DownloadError):
    """The file's sha256 is not the expected one."""


class _Retry(Exception):
    """A transient failure of one attempt (5xx, 429, short body, bad resume)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def make_client(timeout: float = 60.0) -> httpx.Client:
    """An httpx client for downloads: redirects followed, no transfer compression."""
    return httpx.Client(
        follow_redirects=True,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a `Content-Range: bytes a-b/N` (or `bytes */N`) header."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fetch_once(
    client: httpx.Client,
    url: str,
    part: Path,
    expected_size: int | None,
    progress: bool,
    desc: str,
) -> int | None:
    """One GET that appends to `part` from where it stops; returns the file's total size if known."""
    offset = _size(part)
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size and offset > 0:
        return expected_size
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", url, headers=headers) as r:
        status = r.status_code
        if status in (404, 410):
            raise NotFoundError(f"{url}: HTTP {status}, the server has no such file")
        if status == 416 and offset:
            _, total = _content_range(r.headers.get("content-range"))
            if total == offset:
                return total
            part.unlink()
            raise _Retry(f"HTTP 416 for a resume at byte {offset} (server size {total})")
        if status in RETRY_STATUS or status >= 500:
            raise _Retry(f"HTTP {status} {r.reason_phrase}", _retry_after(r))
        length = r.headers.get("content-length")
        if status == 206:
            start, total = _content_range(r.headers.get("content-range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retry(f"asked to resume at byte {offset}, server resumed at {start}")
            if total is None and length is not None:
                total = offset + int(length)
            mode = "ab"
        elif status == 200:
            if offset:
                logger.info("%s: server ignored the Range request, starting again", desc)
            offset = 0
            total = int(length) if length is not None else None
            mode = "wb"
        else:
            raise DownloadError(f"{url}: HTTP {status} {r.reason_phrase}")
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise SizeMismatchError(
                f"{desc}: the server has {total} bytes, expected {expected_size} ({url})"
            )
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            for chunk in r.iter_raw():  # unbuffered: a broken transfer keeps what came
                f.write(chunk)
                bar.update(len(chunk))
        return total


def download_file(
    url: str,
    dest: str | Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    client: httpx.Client | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Fetch `url` to `dest` (resumable, retried, verified, atomic); see the module docstring.

    Raises `NotFoundError` (404/410), `SizeMismatchError`, `ChecksumMismatchError` or
    `DownloadError` (other 4xx, or retries exhausted). A failed check deletes the part file.
    """
    dest = Path(dest)
    want_sha = sha256.lower() if sha256 else None
    if dest.is_file() and (expected_size is None or _size(dest) == expected_size):
        if want_sha is None or sha256_of(dest) == want_sha:
            logger.info("%s: already complete", dest)
            return dest
        logger.warning("%s: present but its sha256 differs, downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_client = client is None
    http = make_client() if client is None else client
    try:
        failures = 0
        while True:
            before = _size(part)
            try:
                total = _fetch_once(http, url, part, expected_size, progress, dest.name)
                if total is not None and _size(part) < total:
                    raise _Retry(f"the transfer stopped at byte {_size(part)} of {total}")
                break
            except httpx.UnsupportedProtocol as e:
                raise DownloadError(f"{url}: not an http(s) URL ({e})") from e
            except (httpx.TransportError, _Retry) as e:
                failures = 1 if _size(part) > before else failures + 1
                if failures > retries:
                    raise DownloadError(
                        f"{url}: gave up after {retries} retries without progress: {e}"
                    ) from e
                delay = getattr(e, "retry_after", None) or backoff * 2 ** (failures - 1)
                delay = min(delay, MAX_BACKOFF_S)
                logger.warning(
                    "%s: %s; retry %d/%d in %.1f s (resuming at byte %d)",
                    dest.name,
                    str(e) or type(e).__name__,
                    failures,
                    retries,
                    delay,
                    _size(part),
                )
                time.sleep(delay)
    finally:
        if own_client:
            http.close()

    got = _size(part)
    if expected_size is not None and got != expected_size:
        part.unlink(missing_ok=True)
        raise SizeMismatchError(f"{dest.name}: got {got} bytes, expected {expected_size} ({url})")
    if want_sha is not None:
        digest = sha256_of(part)
        if digest != want_sha:
            part.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"{dest.name}: sha256 {digest}, expected {want_sha} ({url}); the part file "
                "was deleted"
            )
    os.replace(part, dest)
    return dest


# --- PMC figures ------------------------------------------------------------------------------


@dataclass
class ImagesReport:
    """What `download_images` did; `failures` holds (pair_id, reason)."""

    images_dir: Path
    downloaded: int = 0
    skipped: int = 0
    failed: int = 0
    not_listed: int = 0  # wanted by the json files, absent from the image-URL list
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images_dir": str(self.images_dir),
            "downloaded": self.downloaded,
            "skipped": self.skipped,
            "failed": self.failed,
            "not_listed": self.not_listed,
            "failures": [{"pair_id": p, "reason": r} for p, r in self.failures[:100]],
        }


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _read_url_list(path: Path, report: ImagesReport) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({k: str(row[k]) for k in ("pair_id", "pmc_tar_url", "image_file_path")})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                report.failed += 1
                report.failures.append((f"line {n}", f"bad line in {path.name}: {e!r}"))
    return rows


def _archive_name(url: str) -> str:
    base = os.path.basename(urlparse(url).path) or "archive.tar.gz"
    return hashlib.sha1(url.encode()).hexdigest()[:10] + "-" + base


def _extract_figures(
    archive: Path, rows: list[dict[str, str]], images_dir: Path
) -> list[tuple[str, str | None]]:
    """Copy each row's member out of the archive to `images_dir/<pair_id>.jpg`."""
    results: list[tuple[str, str | None]] = []
    with tarfile.open(archive, "r:*") as tar:
        for row in rows:
            pair_id, member_name = row["pair_id"], row["image_file_path"]
            try:
                member = tar.getmember(member_name)
            except KeyError:
                results.append((pair_id, f"{member_name} is not in {archive.name}"))
                continue
            if not member.isfile() or member.size > MAX_FIGURE_BYTES:
                results.append((pair_id, f"{member_name} is not a regular file of sane size"))
                continue
            src = tar.extractfile(member)
            if src is None:
                results.append((pair_id, f"{member_name} cannot be read"))
                continue
            dst = images_dir / f"{pair_id}.jpg"
            tmp = dst.with_name(dst.name + ".part")
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
            os.replace(tmp, dst)
            results.append((pair_id, None))
    return results


def download_images(
    urls_file: str | Path,
    images_dir: str | Path,
    *,
    pair_ids: Iterable[str] | None = None,
    archive_dir: str | Path | None = None,
    keep_archives: bool = False,
    workers: int = 4,
    client: httpx.Client | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool = True,
) -> ImagesReport:
    """Fetch the PMC figures listed in `urls_file` into `images_dir` as `<pair_id>.jpg`.

    `pair_ids` restricts the work to those figures (the ones a json file references); None
    means every line. A pair_id listed twice is fetched from its first line. Archives go to `archive_dir` (default `<images_dir>/../pmc_articles`) and
    are deleted after extraction unless `keep_archives`.
    """
    urls_file, images_dir = Path(urls_file), Path(images_dir)
    if not urls_file.is_file():
        raise FileNotFoundError(f"image-URL list not found: {urls_file}")
    images_dir.mkdir(parents=True, exist_ok=True)
    archives = Path(archive_dir) if archive_dir else images_dir.parent / "pmc_articles"
    archives.mkdir(parents=True, exist_ok=True)
    report = ImagesReport(images_dir=images_dir)
    rows = _read_url_list(urls_file, report)

    wanted = None if pair_ids is None else set(pair_ids)
    if wanted is not None:
        listed = {r["pair_id"] for r in rows}
        report.not_listed = len(wanted - listed)
        rows = [r for r in rows if r["pair_id"] in wanted]

    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    seen: set[str] = set()
    for row in rows:
        pair_id = row["pair_id"]
        if pair_id in seen:
            continue
        seen.add(pair_id)
        if not _SAFE_NAME.fullmatch(pair_id):
            report.failed += 1
            report.failures.append((pair_id, "pair_id is not a safe file name"))
        elif (images_dir / f"{pair_id}.jpg").is_file():
            report.skipped += 1
        else:
            groups[row["pmc_tar_url"]].append(row)

    def fetch(url: str, group: list[dict[str, str]]) -> list[tuple[str, str | None]]:
        archive = archives / _archive_name(url)
        try:
            download_file(
                url, archive, client=http, retries=retries, backoff=backoff, progress=False
            )
            return _extract_figures(archive, group, images_dir)
        except NotFoundError:
            return [(r["pair_id"], f"archive not found (HTTP 404): {url}") for r in group]
        except (DownloadError, OSError, tarfile.TarError, EOFError) as e:
            return [(r["pair_id"], f"{type(e).__name__}: {e}") for r in group]
        finally:
            if not keep_archives:
                archive.unlink(missing_ok=True)
                archive.with_name(archive.name + ".part").unlink(missing_ok=True)

    own_client = client is None
    http = make_client() if client is None else client
    total = sum(len(g) for g in groups.values())
    try:
        with (
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
            tqdm(total=total, unit="img", desc="PMC figures", disable=not progress) as bar,
        ):
            futures = [pool.submit(fetch, url, g) for url, g in groups.items()]
            for fut in as_completed(futures):
                for pair_id, error in fut.result():
                    if error is None:
                        report.downloaded += 1
                    else:
                        report.failed += 1
                        report.failures.append((pair_id, error))
                        logger.warning("figure %s failed: %s", pair_id, error)
                    bar.update(1)
    finally:
        if own_client:
            http.close()
    return report


# --- the LLaVA-Med files ----------------------------------------------------------------------

_IMAGE_FIELD = re.compile(r'"image"\s*:\s*"([^"\\]+)"')


def referenced_pair_ids(path: str | Path) -> set[str]:
    """pair_ids of the images a LLaVA-Med json/jsonl file references (`"image": "<id>.jpg"`)."""
    text = Path(path).read_text(encoding="utf-8")
    return {Path(name).stem for name in _IMAGE_FIELD.findall(text)}


@dataclass
class DownloadReport:
    """What `download_llava_med` did."""

    out_dir: Path
    base_url: str
    files: list[Path] = field(default_factory=list)
    images: ImagesReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "base_url": self.base_url,
            "files": [str(p) for p in self.files],
            "images": self.images.to_dict() if self.images else None,
        }


def download_llava_med(
    what: What | Iterable[What],
    out_dir: str | Path,
    *,
    base_url: str | None = None,
    images: bool = False,
    verify: bool = True,
    catalog: Mapping[str, DataFile] | None = None,
    client: httpx.Client | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    workers: int = 4,
    keep_archives: bool = False,
    progress: bool = True,
) -> DownloadReport:
    """Download the LLaVA-Med files of the `what` group(s) into `out_dir` (README layout).

    `out_dir/alignment/…`, `out_dir/instruct/…`, `out_dir/eval/…`, `out_dir/<image-URL list>`;
    with `images=True` also `out_dir/images/<pair_id>.jpg` for every image the downloaded files
    reference (every listed image for `image-urls`), fetching the image-URL list if needed.
    `verify=False` skips the sha256 check (a mirror with other bytes); sizes are still checked.
    """
    groups: list[What] = [what] if isinstance(what, str) else list(what)  # type: ignore[list-item]
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"unknown data group {g!r}; expected one of {', '.join(WHAT_CHOICES)}")
    table = FILES if catalog is None else catalog
    base = resolve_base_url(base_url)
    out = Path(out_dir)
    report = DownloadReport(out_dir=out, base_url=base)

    def fetch(file: DataFile) -> Path:
        return download_file(
            url_of(file, base),
            out / file.path,
            expected_size=file.size,
            sha256=file.sha256 if verify else None,
            client=http,
            retries=retries,
            backoff=backoff,
            progress=progress,
        )

    own_client = client is None
    http = make_client() if client is None else client
    try:
        names = list(dict.fromkeys(name for g in groups for name in GROUPS[g]))
        for name in names:
            report.files.append(fetch(table[name]))
        if images:
            urls_file = fetch(table[IMAGE_URLS_FILE])
            wanted: set[str] | None = None
            if "image-urls" not in groups:
                wanted = set()
                for path in report.files:
                    wanted |= referenced_pair_ids(path)
            report.images = download_images(
                urls_file,
                out / "images",
                pair_ids=wanted,
                keep_archives=keep_archives,
                workers=workers,
                client=http,
                retries=retries,
                backoff=backoff,
                progress=progress,
            )
    finally:
        if own_client:
            http.close()
    return report
