"""A thread-safe least-recently-used cache bounded by the bytes of what it holds.

The server keeps three: decoded images (`ImageStore.rendered`), the pixel values the model's
processor makes of them (`BatchingEngine.pixels`) and the attention caches of prompts up to
their image (`BatchingEngine.prefixes`). Their keys name immutable content (a stored file's
sha256 and frame, with the prompt's tokens), so entries never go stale; callers must not modify
what they get.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """At most `max_bytes` (as `size_of` counts them) of values; an oversized value is handed
    out but not kept. `hits` and `misses` count `get_or_make` calls and `get` hits."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable, *, count_miss: bool = False) -> V | None:
        """The cached value, or None (a miss is counted only if asked: `get_or_make` does)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += count_miss
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def __contains__(self, key: object) -> bool:
        """Whether `key` is held (not counted as a hit or a miss, not moved)."""
        with self._lock:
            return key in self._items

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        if (hit := self.get(key, count_miss=True)) is not None:
            return hit
        value = make()  # outside the lock: making is slow and may raise
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: V) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def discard(self, matches: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key `matches`; how many were dropped."""
        with self._lock:
            gone = [k for k in self._items if matches(k)]
            for k in gone:
                self._bytes -= self._items.pop(k)[1]
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
