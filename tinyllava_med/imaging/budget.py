"""How much memory image decoding may take at once in this process (`DECODE_BUDGET`).

Each file is checked against its own limits before it is decoded (`ImageLimits`), but several
large files decoded at once are not: an 8192 x 8192 16-bit JPEG 2000 of 7 KB takes about 1.6 GB
while it is decoded and windowed, and a server decoding a handful of them at once (uploads,
renders, chat images) runs out of memory, taking the reports being signed with it. So each
decode reserves its estimated working memory here first (`reserve`), and waits while others
hold the budget, up to `wait_s`; then it gives up with `ImagingError("decode_busy")` (the
server answers 503 with Retry-After, or DICOM's 0xA700 out of resources). Decodes under
`SMALL_BYTES` (a CT slice, a chest radiograph) never wait; one larger than the whole budget runs
alone. A thread that holds a reservation (a deflated file's inflated data set) adds its frame's
to it without waiting: it cannot wait for itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tinyllava_med.imaging.errors import ImagingError

MiB = 1024 * 1024

# Peak bytes per decoded sample, measured with tracemalloc on a 4096 x 4096 16-bit DICOM (with
# and without a window): 24.0 (the decoded array, its float copies while windowing, the 8-bit
# result). Pillow's own buffers for PNG and JPEG are smaller: RASTER_BYTES_PER_SAMPLE.
DICOM_BYTES_PER_SAMPLE = 24
RASTER_BYTES_PER_SAMPLE = 8

# Decodes estimated under this never wait: 2.8 M samples of DICOM (a 1672 x 1672 slice).
SMALL_BYTES = 64 * MiB


class DecodeBudget:
    def __init__(self, total_bytes: int, wait_s: float = 30.0) -> None:
        self.total = total_bytes
        self.wait_s = wait_s
        self.used = 0
        self._cond = threading.Condition()
        self._held = threading.local()

    def resize(self, total_bytes: int, wait_s: float | None = None) -> None:
        with self._cond:
            self.total = total_bytes
            if wait_s is not None:
                self.wait_s = wait_s
            self._cond.notify_all()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold `cost` bytes of the budget for the block (at most the whole budget)."""
        nested = getattr(self._held, "depth", 0) > 0
        if cost < SMALL_BYTES and not nested:
            yield
            return
        with self._cond:
            cost = min(cost, self.total)
            if not nested:
                deadline = time.monotonic() + self.wait_s
                while self.used + cost > self.total:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ImagingError(
                            "decode_busy",
                            "the server is decoding other large images and has no memory "
                            f"left for this one (about {cost // MiB} MB) now: retry shortly",
                        )
                    self._cond.wait(left)
            self.used += cost
        self._held.depth = getattr(self._held, "depth", 0) + 1
        try:
            yield
        finally:
            self._held.depth -= 1
            with self._cond:
                self.used -= cost
                self._cond.notify_all()


# The process's budget; `serve` sets its size (`decode_memory_mb`).
DECODE_BUDGET = DecodeBudget(2048 * MiB)
