"""How much memory image decoding may take at once in this process (`DECODE_BUDGET`).

Each file is checked against its own limits before it is decoded (`ImageLimits`), but several
large files decoded at once are not: an 8192 x 8192 16-bit JPEG 2000 of 7 KB takes about 1.6 GB
while it is decoded and windowed, and a server decoding a handful of them at once (uploads,
renders, chat images) runs out of memory, taking the reports being signed with it. So each
decode reserves its estimated working memory here first (`reserve`), and waits while others
hold the budget, up to `wait_s` (short: a DIMSE sender gives up after about 10 s, and a waiting
decode holds a worker thread); when the wait runs out, or `MAX_WAITING` decodes wait already, it
gives up with `ImagingError("decode_busy")` (the server answers 503 with Retry-After, or DICOM's
0xA700 out of resources). Decodes under `SMALL_BYTES` (a CT or MR slice) never wait; one larger
than the whole budget runs alone. A thread that holds a reservation (a deflated file's inflated
data set) and asks for more (its frame) waits only for what other threads hold: it cannot wait
for itself.
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

# More decodes than this waiting at once: the next one is refused at once (each holds a worker
# thread while it waits, which the server's other requests need too).
MAX_WAITING = 4


class DecodeBudget:
    def __init__(self, total_bytes: int, wait_s: float = 5.0) -> None:
        self.total = total_bytes
        self.wait_s = wait_s
        self.used = 0
        self.waiting = 0
        self._cond = threading.Condition()
        self._own = threading.local()  # what this thread holds

    def resize(self, total_bytes: int, wait_s: float | None = None) -> None:
        with self._cond:
            self.total = total_bytes
            if wait_s is not None:
                self.wait_s = wait_s
            self._cond.notify_all()

    def _busy(self, cost: int) -> ImagingError:
        return ImagingError(
            "decode_busy",
            "the server is decoding other large images and has no memory left for this one "
            f"(about {cost // MiB} MB) now: retry shortly",
        )

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold `cost` bytes of the budget for the block (at most the whole budget)."""
        own = getattr(self._own, "bytes", 0)
        if cost < SMALL_BYTES and not own:
            yield
            return
        with self._cond:
            cost = min(cost, self.total)
            # others' holdings in the way; with nothing of others held, it goes (alone)
            blocked = lambda: self.used - own > 0 and self.used + cost > self.total  # noqa: E731
            if blocked():
                if self.waiting >= MAX_WAITING:
                    raise self._busy(cost)
                self.waiting += 1
                try:
                    deadline = time.monotonic() + self.wait_s
                    while blocked():
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self._busy(cost)
                        self._cond.wait(left)
                finally:
                    self.waiting -= 1
            self.used += cost
        self._own.bytes = own + cost
        try:
            yield
        finally:
            self._own.bytes = own
            with self._cond:
                self.used -= cost
                self._cond.notify_all()


# The process's budget; `serve` and `import` set its size (`decode_memory_mb`).
DECODE_BUDGET = DecodeBudget(2048 * MiB)
