"""Content-addressed image store: uploaded bytes live on disk under their sha256, never in the DB.

`put` is idempotent (the same file uploaded twice is stored once) and atomic (write to a temp
file, then rename), so a failed request never leaves a half-written image behind.

`ImageStore.rendered` is a bounded LRU of decoded images (what `serving.render` makes of a file
for a frame and window), so asking many questions about one study decodes its DICOM once. Files
never change under their sha256, so entries never go stale.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

from PIL import Image


class RenderCache:
    """Least-recently-used decoded images, at most `max_bytes` of pixels. Thread-safe; callers
    must not modify the images they get (PIL operations return new images)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Image.Image, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_make(self, key: Hashable, make: Callable[[], Image.Image]) -> Image.Image:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return item[0]
            self.misses += 1
        image = make()  # outside the lock: decoding is slow and may raise
        size = image.width * image.height * len(image.getbands())
        if size > self.max_bytes:
            return image
        with self._lock:
            if key not in self._items:
                self._items[key] = (image, size)
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return image


class ImageStore:
    def __init__(self, root: str | Path, render_cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rendered = RenderCache(render_cache_bytes)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        dest = self.path(digest)
        if dest.is_file():
            return digest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()
