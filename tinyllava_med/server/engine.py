"""The inference engine: one object that batches concurrent requests into one `generate`.

An image is turned into the model's pixel values before it joins the queue (`prepare_async`:
on the event loop if small, in a worker thread if large; cached per image key in `pixels`), so
the batch does not wait for the image processor. Requests wait in a bounded queue; a worker
thread collects up to `max_batch_size` requests that share sampling settings (fewer where rows
cost so much that a full batch would outlast `max_batch_s`; waiting up to a short window for
requests announced as on their way or expected back from the last batch, never for nobody),
runs one left-padded `generate`, and resolves each request's future (a failed batch runs again
in halves, so one bad request or too large a batch fails no other). Tokens reach
streaming callers through per-request callbacks; a cancelled request is dropped from its batch,
and a batch whose requests are all cancelled stops generating. While idle, the engine can
compute an image's prompt prefix ahead of its questions (`prefill`). It also keeps what
`/readyz` knows of the model (`model_check`: recent answers, a probe when idle, stalls). It
knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import DynamicCache

from tinyllava_med.model.generate import (
    Answer,
    GenerationCancelled,
    SamplingParams,
    generate,
    prepare_image,
)
from tinyllava_med.model.load import LoadedModel
from tinyllava_med.model.prefixes import (
    PrefillStopped,
    cache_bytes,
    image_prefix_shared,
    image_prefixes_pay,
    prefill_image,
    prefix_cache_size_mb,
)
from tinyllava_med.model.processor import output_pixels
from tinyllava_med.server.lru import ByteLRU

log = logging.getLogger(__name__)

# Images are turned into pixel values on the event loop when neither they nor the processor's
# output exceed this many pixels: a 128 px CT slice for the demo's 64 px takes 0.6-1 ms, and
# handing it to a thread cost about 1 ms of CPU per request more (A/B at 16 clients, every
# question about a new slice: +10 to +14% requests/s in 3 of 3 pairs). The same slice for a
# real model's 384 px (SigLIP) or 336 px (CLIP) takes 7-9 ms, which must not stall the loop.
INLINE_PIXELS = 256 * 256

# A forming batch may wait for expected requests up to this share of the last batch's duration
# when that is longer than the batch window, but never more than MAX_WAIT_S. A request that
# misses a batch waits for the whole of it, so waiting a quarter of one to take it along is
# cheap; on a GPU, where 16 rows cost little more than 8, it keeps one full batch instead of two
# half batches taking turns (TinyLLaVA-1.5B shape on an H200: a 50 ms cap split 16 clients into
# batches of 8; clients came back within 275 ms). The cap bounds what a lone request pays when
# an expected client does not come back: a CPU batch of a real model takes a minute.
WAIT_SHARE = 0.25
MAX_WAIT_S = 0.5

# An idle server probes the model at most this share of the time: a probe of TinyLLaVA-1.5B on
# a 2-core CPU takes 24 s (fp32), during which a question that arrives waits for it.
PROBE_DUTY = 0.05


def _gray_image() -> Image.Image:
    """What the warm-up and the readiness probe ask about."""
    return Image.new("RGB", (32, 32), (127, 127, 127))


class EngineBusy(Exception):
    """The queue is full; the caller should retry later."""


class EngineNotReady(Exception):
    """No model is loaded (still loading, failed, or shutting down)."""


class EngineFailed(Exception):
    """The model (or the remote engine) could not answer this request."""


class ServedModel(Protocol):
    """What the server reads of the model it serves: its provenance."""

    @property
    def info(self) -> dict[str, Any]: ...


class EngineMetrics(Protocol):
    def on_batch(self, size: int, seconds: float, new_tokens: int, prompt_tokens: int) -> None: ...
    def on_queue(self, depth: int) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_answer(self, seconds: float) -> None: ...
    def on_cancel(self, n: int) -> None: ...
    def on_prefill(self, outcome: str) -> None: ...


@dataclass
class _Request:
    image: Image.Image | torch.Tensor  # pixel values once prepared
    question: str
    params: SamplingParams
    on_token: Callable[[str], None] | None
    history: tuple[tuple[str, str], ...] = ()
    image_key: Hashable | None = None
    future: Future[Answer] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: bool = False


@dataclass
class _Prefill:
    """An image whose prompt prefix is to be computed while the model is idle (`prefill`)."""

    pixels: torch.Tensor
    key: Hashable
    seq: int


class Arrival:
    """A request on its way to the engine (decoding its image, say): while any is announced, a
    forming batch waits for it (up to the batch window) instead of leaving without it."""

    def __init__(self, engine: BatchingEngine) -> None:
        self._engine: BatchingEngine | None = engine

    def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            with engine._lock:
                engine._announced -= 1


class BatchingEngine:
    def __init__(
        self,
        *,
        max_batch_size: int = 8,
        batch_window_ms: float = 50.0,
        max_queue: int = 64,
        metrics: EngineMetrics | None = None,
        pixel_cache_mb: int = 128,
        max_batch_s: float | None = None,
        prefix_cache_mb: int | None = None,
    ) -> None:
        self.lm: ServedModel | None = None
        self.max_batch_size = max_batch_size
        # a batch takes no more rows than fit in `max_batch_s` at the measured seconds per row
        # (`_row_s`, a running average): on a CPU a real model's rows cost about the same alone
        # as together (24 s of prefill each for TinyLLaVA-1.5B), so a full batch would only make
        # every request in it wait for all of them, past the request timeout
        self.max_batch_s = max_batch_s
        self._row_s = 0.0
        # at most this many rows per batch once a larger one ran out of memory (`_failed`)
        self._fit_rows: int | None = None
        self.batch_window_s = batch_window_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: queue.Queue[_Request | _Prefill | None] = queue.Queue()
        self._prefill_seq = 0  # the latest `prefill` asked for; older ones are skipped
        self._prefill_live: _Prefill | None = None  # the latest, while queued or running
        self._waiting_keys: Counter[Hashable] = Counter()  # image keys of pending requests
        self._pending = 0  # queued + running, guarded by _lock
        self._announced = 0  # Arrivals not yet submitted, guarded by _lock
        # most requests in flight (pending + announced) seen since the last batch started:
        # how many the next batch can expect, guarded by _lock
        self._peak = 0
        self._last_batch_s = 0.0  # how long the last generate took
        self.last_expected = 0  # how many requests the last batch expected to gather
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # what /readyz knows of the model (`model_check`): when a request or probe last finished
        # (monotonic) and whether it failed; the probe in flight; when the running batch began
        self.last_done: float | None = None
        self.last_failed = False
        self._probe: Future[Answer] | None = None
        self._probe_s = 0.0  # how long the last probe took
        self._probe_lock = threading.Lock()
        self._batch_started: float | None = None
        # pixel values by image key (a stored file's sha256 and frame): questions about an image
        # run the image processor once; `start` empties it, so keys need not name the model
        self.pixels: ByteLRU[torch.Tensor] = ByteLRU(
            pixel_cache_mb * 1024 * 1024, lambda t: t.element_size() * t.nelement()
        )
        # attention caches of prompts up to their image, by image key and prompt tokens: a
        # follow-up question computes only its own words (`generate`'s `prefixes`), and of the
        # template's opening, which every question shares; `start` sizes it
        # (`prefix_cache_size_mb`) and empties it
        self.prefix_cache_mb = prefix_cache_mb
        self.prefixes: ByteLRU[DynamicCache] = ByteLRU(0, cache_bytes)
        self.image_prefixes = False

    # --- lifecycle -------------------------------------------------------------------------

    def warm_up(self, lm: LoadedModel, sizes: Sequence[int]) -> list[tuple[int, float]]:
        """Before `start`: one batch of each size in `sizes` (gray images, questions of
        different lengths so rows are padded as in service, two new tokens so prefill and a
        decode step both run), so that no request pays a batch size's first use. Seeds the
        measured time per row, which caps batches, and counts as evidence that the model
        answers. Returns (size, seconds) per batch. A failure raises: the model cannot serve
        its configured batch size."""
        image = _gray_image()
        params = SamplingParams(max_new_tokens=2)
        timings = []
        for n in sizes:
            questions = ["Is this image normal?" + " Describe it." * (i % 3) for i in range(n)]
            start = time.perf_counter()
            try:
                generate(lm, [image] * n, questions, params)
            except Exception as e:
                raise RuntimeError(
                    f"the warm-up batch of {n} failed ({type(e).__name__}: {e}); "
                    "lower max_batch_size"
                ) from e
            took = time.perf_counter() - start
            timings.append((n, took))
            self._last_batch_s = took
            self._row_s = took / n
        self.last_done, self.last_failed = time.monotonic(), False
        return timings

    def start(self, lm: LoadedModel) -> None:
        self.pixels.clear()
        self.prefixes.clear()
        self.prefixes.max_bytes = prefix_cache_size_mb(lm, self.prefix_cache_mb) * 1024 * 1024
        # prefixes up to the image for a real tower, or where a size was asked for; otherwise
        # only the template's opening (system prompt), which costs nothing to keep
        self.image_prefixes = image_prefixes_pay(lm) or self.prefix_cache_mb is not None
        self.lm = lm
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self.lm = None

    @property
    def ready(self) -> bool:
        return self.lm is not None and not self._stopping.is_set()

    @property
    def queue_depth(self) -> int:
        return self._pending

    def is_full(self) -> bool:
        return self._pending >= self.max_queue

    # --- requests --------------------------------------------------------------------------

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Announce a request that will be submitted soon (pass the `Arrival` to `submit`)."""
        with self._lock:
            self._announced += 1
            self._peak = max(self._peak, self._pending + self._announced)
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.close()

    def prepare(
        self, image: Image.Image | torch.Tensor, key: Hashable | None = None
    ) -> Image.Image | torch.Tensor:
        """`image` as the batch will take it: the model's pixel values (cached under `key`)."""
        lm = self.lm
        if not isinstance(lm, LoadedModel) or isinstance(image, torch.Tensor):
            return image
        if key is None:
            return prepare_image(lm, image)
        return self.pixels.get_or_make(key, lambda: prepare_image(lm, image))

    async def prepare_async(
        self, image: Image.Image | torch.Tensor, key: Hashable | None = None
    ) -> Image.Image | torch.Tensor:
        """`prepare` for the event loop: a cached image at once; the image processor for a
        small image to a small output too (under a millisecond, less than the thread hop costs),
        else in a worker thread (a 2000 px radiograph: 70 ms; a 128 px slice to 384 px: 9 ms;
        neither may stall the loop). Either way it runs alongside the batch in progress, not
        inside the next one."""
        lm = self.lm
        if not isinstance(lm, LoadedModel) or isinstance(image, torch.Tensor):
            return image
        if key is not None and (hit := self.pixels.get(key)) is not None:
            return hit
        if max(image.width * image.height, output_pixels(lm.processor)) <= INLINE_PIXELS:
            return self.prepare(image, key)
        return await asyncio.to_thread(self.prepare, image, key)

    def submit(
        self,
        image: Image.Image | torch.Tensor,
        question: str,
        params: SamplingParams,
        on_token: Callable[[str], None] | None = None,
        history: Sequence[tuple[str, str]] = (),
        arrival: Arrival | None = None,
        image_key: Hashable | None = None,
    ) -> _Request:
        """Queue a request (preparing its image here, on the caller's thread, unless
        `generate` did). `image_key` names the image's content, for the pixel cache."""
        if not self.ready:
            raise EngineNotReady("the model is not loaded")
        image = self.prepare(image, image_key)
        with self._lock:
            if self._pending >= self.max_queue:
                raise EngineBusy(f"the queue is full ({self.max_queue} requests)")
            self._pending += 1
            self._waiting_keys[image_key] += 1
            depth = self._pending
            # its own announcement ends only after the enqueue: not two requests in flight
            own = 1 if arrival is not None and arrival._engine is self else 0
            self._peak = max(self._peak, self._pending + self._announced - own)
        if self.metrics:
            self.metrics.on_queue(depth)
        req = _Request(image, question, params, on_token, tuple(history), image_key)
        req.future.add_done_callback(partial(self._record, req.submitted))
        self._enqueue(req)
        if arrival is not None:
            arrival.close()  # after the enqueue: a collecting batch sees one or the other
        return req

    def _enqueue(self, req: _Request) -> None:
        self._queue.put(req)

    @property
    def prefills(self) -> bool:
        """Whether `prefill` helps this model: prompts are kept up to their image, and its
        questions share them."""
        lm = self.lm
        return (
            isinstance(lm, LoadedModel)
            and self.image_prefixes
            and self.prefixes.max_bytes > 0
            and image_prefix_shared(lm)
        )

    def prefill(self, image: Image.Image, key: Hashable) -> None:
        """Compute the prompt's attention cache up to and including `image` (named by `key` as
        its questions name it; its pixel values are made here, and cached) while the model is
        idle, so the first question about it answers as fast as a follow-up (`prefill_image`):
        on a CPU, most of the first answer's time. Only the latest one asked for runs, and only
        if no question is waiting or on its way then: a reader moving through a series prepares
        the image they stop at, and a busy server skips it (a question computes its prefix
        anyway). Asked again for the image queued or running (the reader changed its window),
        it goes on. Call only where `prefills`."""
        if not self.ready:
            raise EngineNotReady("the model is not loaded")
        live = self._prefill_live
        if live is not None and live.key == key:
            return
        pixels = self.prepare(image, key)
        assert isinstance(pixels, torch.Tensor)  # `prefills`: a model of our own
        with self._lock:
            self._prefill_seq += 1
            item = self._prefill_live = _Prefill(pixels, key, self._prefill_seq)
        self._queue.put(item)

    async def generate(
        self,
        image: Image.Image | torch.Tensor,
        question: str,
        params: SamplingParams,
        on_token: Callable[[str], None] | None = None,
        history: Sequence[tuple[str, str]] = (),
        arrival: Arrival | None = None,
        image_key: Hashable | None = None,
    ) -> Answer:
        """Submit and await; cancelling the awaiting task cancels the request. `history`:
        earlier (question, answer) turns about the same image; `image_key`: see `submit`."""
        image = await self.prepare_async(image, image_key)
        req = self.submit(image, question, params, on_token, history, arrival, image_key)
        try:
            return await asyncio.wrap_future(req.future)
        except asyncio.CancelledError:
            req.cancelled.set()
            raise

    # --- health ----------------------------------------------------------------------------

    def _record(self, submitted: float, future: Future[Answer]) -> None:
        """Every answered request is evidence about the model, not only probes; an answer's
        time from submission is its end-to-end latency."""
        if future.cancelled():
            return
        self.last_failed = future.exception() is not None
        self.last_done = time.monotonic()
        if not self.last_failed and self.metrics:
            self.metrics.on_answer(time.perf_counter() - submitted)

    def start_probe(self) -> Future[Answer]:
        """A one-token answer about a gray image through the queue, unless one is in flight."""
        with self._probe_lock:
            if self._probe is None or self._probe.done():
                params = SamplingParams(max_new_tokens=1)
                self._probe = self.submit(_gray_image(), "ok?", params).future
                self._probe.add_done_callback(partial(self._probe_took, time.monotonic()))
            return self._probe

    def _probe_took(self, started: float, _: Future[Answer]) -> None:
        self._probe_s = time.monotonic() - started

    def probe(self, timeout: float = 30.0) -> bool:
        """Wait for a probe: proves the model really generates."""
        try:
            self.start_probe().result(timeout)
        except Exception as e:  # readiness reports it; the reason goes to the log
            log.warning("readiness probe failed: %s", e)
            return False
        return True

    def stalled(self, stall_s: float) -> bool:
        """The running batch has taken longer than `stall_s` (and 3x the last one), or the
        engine's thread has died."""
        started = self._batch_started
        if started is not None and time.monotonic() - started > max(
            stall_s, 3 * self._last_batch_s
        ):
            return True
        return self._thread is not None and not self._thread.is_alive()

    async def model_check(self, fresh_s: float, stall_s: float, wait_s: float) -> str:
        """The model check of `/readyz`, answered within about `wait_s`:

        - "stalled": see `stalled`;
        - "ok": a request or probe succeeded within `fresh_s` (or twice the last batch's time,
          or so long that probing takes at most `PROBE_DUTY` of the time), or requests are in
          flight (or an image is being prepared) and the last finished one succeeded;
        - otherwise (idle for a while, nothing answered yet, or the last answer failed) a probe
          runs; if it is not back within `wait_s` (a model on a CPU takes seconds), the answer
          rests on the last evidence: "warming_up" before any, "probe_failed" after a failure,
          else "ok"; the next check sees the probe as the request in flight.
        """
        if self.stalled(stall_s):
            return "stalled"
        now = time.monotonic()
        done, failed = self.last_done, self.last_failed
        if done is not None and not failed:
            recent = now - done < max(fresh_s, 2 * self._last_batch_s, self._probe_s / PROBE_DUTY)
            if recent or self._pending > 0 or self._batch_started is not None:
                return "ok"  # (a probe would stop a prefill, and wait for nothing)
        try:
            probe = self.start_probe()
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(probe)), wait_s)
            return "ok"
        except (TimeoutError, EngineBusy):
            if done is None:
                return "warming_up"
            return "probe_failed" if failed else "ok"
        except Exception as e:  # the reason goes to the log; readiness says probe_failed
            log.warning("readiness probe failed: %s", e)
            return "probe_failed"

    # --- worker ----------------------------------------------------------------------------

    def _collect(self, first: _Request) -> list[_Request]:
        """`first` and what is queued behind it with the same sampling settings; while requests
        are announced (on their way), wait for them up to the batch window. While fewer are
        gathered than were in flight during the last batch, wait for them too, but no longer
        than the last batch took (the most a latecomer would otherwise wait for the next one):
        clients whose answers just came back usually ask again at once, and without this wait
        a steady load splits into two half-size batches that take turns, each paying a whole
        generate. Nobody announced and nobody expected: go at once (a lone request never
        waits). After a long batch (a real model), both waits may grow to `WAIT_SHARE` of it,
        up to `MAX_WAIT_S`."""
        batch = [first]
        now = time.perf_counter()
        budget = max(self.batch_window_s, min(WAIT_SHARE * self._last_batch_s, MAX_WAIT_S))
        deadline = now + budget
        refill_deadline = now + min(budget, self._last_batch_s)
        with self._lock:
            expected = self.last_expected = self._peak
            self._peak = self._pending + self._announced
        leftovers: list[_Request | None] = []
        limit = self.max_batch_size
        if self.max_batch_s is not None and self._row_s > 0:
            limit = max(1, min(limit, int(self.max_batch_s / self._row_s)))
        if self._fit_rows is not None:
            limit = min(limit, self._fit_rows)
        while len(batch) < limit:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                t = time.perf_counter()
                remaining = deadline - t
                if remaining <= 0:
                    break
                if self._announced <= 0:
                    if len(batch) >= expected or t >= refill_deadline:
                        break
                    remaining = refill_deadline - t
                try:
                    nxt = self._queue.get(timeout=min(remaining, 0.002))
                except queue.Empty:
                    continue
            if isinstance(nxt, _Prefill):  # questions are waiting: they go first
                self._prefilled(nxt, "skipped")
                continue
            if nxt is None or nxt.params.key() != first.params.key():
                leftovers.append(nxt)  # other settings (or shutdown) wait for the next batch
                if nxt is None:
                    break
                continue
            batch.append(nxt)
        for item in leftovers:
            self._queue.put(item)
        return batch

    def _prefill(self, item: _Prefill) -> None:
        with self._lock:
            busy = self._pending > 0 or self._announced > 0
        if busy or item.seq != self._prefill_seq:  # questions first; a newer image supersedes
            self._prefilled(item, "skipped")
            return
        assert isinstance(self.lm, LoadedModel)
        self._batch_started = time.monotonic()  # a stuck prefill shows as a stalled model
        try:
            done = prefill_image(
                self.lm,
                item.pixels,
                item.key,
                self.prefixes,
                should_stop=partial(self._yield, item),
            )
        except PrefillStopped:
            self._prefilled(item, "abandoned")
            return
        except Exception:  # a question about the image computes its prefix itself
            log.exception("preparing an image ahead of its questions failed")
            self._prefilled(item, "failed")
            return
        finally:
            self._batch_started = None
        if done:  # the model answered a forward pass: evidence for `/readyz` as an answer is
            self.last_done, self.last_failed = time.monotonic(), False
        self._prefilled(item, "done" if done else "cached")

    def _yield(self, item: _Prefill) -> bool:
        """Whether a running prefill should stop (between layers): a question about another
        image waits (a real model's prefill on a CPU takes 10-25 s, which it must not wait
        for), a newer image was asked for, or the server is shutting down. Questions about
        this image let it finish: they will use it."""
        with self._lock:
            others = any(key != item.key for key in self._waiting_keys)
        return others or item.seq != self._prefill_seq or self._stopping.is_set()

    def _prefilled(self, item: _Prefill, outcome: str) -> None:
        with self._lock:  # done with (any outcome): asking again for its image queues it anew
            if self._prefill_live is item:
                self._prefill_live = None
        if self.metrics:
            self.metrics.on_prefill(outcome)

    def _finish(self, reqs: list[_Request]) -> None:
        with self._lock:
            self._pending -= len(reqs)
            self._waiting_keys.subtract(r.image_key for r in reqs)
            self._waiting_keys += Counter()  # drops the keys no request waits with
            depth = self._pending
        if self.metrics:
            self.metrics.on_queue(depth)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                break
            if isinstance(first, _Prefill):
                self._prefill(first)
                continue
            batch = self._collect(first)
            live = [r for r in batch if not r.cancelled.is_set()]
            for r in batch:
                if r.cancelled.is_set():
                    r.future.cancel()
            if self.metrics and len(live) < len(batch):
                self.metrics.on_cancel(len(batch) - len(live))
            if not live:
                self._finish(batch)
                continue
            self._run(live)
            self._finish(batch)
        # fail whatever is still queued
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request) and not item.future.done():
                item.future.set_exception(EngineNotReady("the server is shutting down"))

    def _failed(self, live: list[_Request], error: Exception) -> None:
        """A failed batch does not fail every request in it. The requests that have streamed
        nothing run again, in two halves, so one request that breaks the model fails alone and
        a batch too large for the memory is answered in smaller ones (and later batches are
        capped below it: `_fit_rows`). A request that has streamed tokens gets the error: a
        second run could not go on with the text it has shown; one whose client went away is
        cancelled, not run again."""
        gone = [r for r in live if r.cancelled.is_set() and not r.future.done()]
        for r in gone:
            r.future.cancel()
        if gone and self.metrics:
            self.metrics.on_cancel(len(gone))
        again = [
            r for r in live if not r.future.done() and (r.on_token is None or not r.first_token)
        ]
        if len(live) == 1 or not again or self._stopping.is_set():
            log.error("generation failed for a batch of %d", len(live), exc_info=error)
            for r in live:
                if not r.future.done():
                    r.future.set_exception(error)
            return
        if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
            fit = max(1, len(live) // 2)
            if self._fit_rows is None or fit < self._fit_rows:
                self._fit_rows = fit
                log.warning(
                    "out of memory generating %d rows: batches now take at most %d until the "
                    "server restarts (lower max_batch_size to keep it so)",
                    len(live),
                    fit,
                )
        log.warning(
            "generation failed for a batch of %d (%s: %s); %d of its requests run again in "
            "smaller batches",
            len(live),
            type(error).__name__,
            error,
            len(again),
        )
        # the traceback holds the failed batch's frames and tensors: free them first
        error = error.with_traceback(None)
        retried = {id(r) for r in again}
        for r in live:
            if id(r) not in retried and not r.future.done():
                r.future.set_exception(error)
        half = (len(again) + 1) // 2
        for part in (again[:half], again[half:]):
            if part:
                self._run(part)

    def _run(self, live: list[_Request]) -> None:
        assert isinstance(self.lm, LoadedModel)

        def on_token(row: int, delta: str) -> None:
            r = live[row]
            if not r.first_token:
                r.first_token = True
                if self.metrics:
                    self.metrics.on_first_token(time.perf_counter() - r.submitted)
            if r.on_token is not None and not r.cancelled.is_set():
                r.on_token(delta)

        start = time.perf_counter()
        self._batch_started = time.monotonic()
        try:
            answers = generate(
                self.lm,
                [r.image for r in live],
                [r.question for r in live],
                [r.params for r in live],
                on_token=on_token,
                should_stop=lambda: all(r.cancelled.is_set() for r in live),
                histories=[r.history for r in live],
                text_rows=[r.on_token is not None for r in live],
                prefixes=self.prefixes if self.prefixes.max_bytes else None,
                image_keys=[r.image_key for r in live] if self.image_prefixes else None,
            )
        except GenerationCancelled:
            for r in live:
                r.future.cancel()
            if self.metrics:
                self.metrics.on_cancel(len(live))
            return
        except Exception as e:
            failed: Exception | None = e
        else:
            failed = None
        finally:
            self._batch_started = None
        if failed is not None:
            self._failed(live, failed)
            return
        self._last_batch_s = time.perf_counter() - start
        row_s = self._last_batch_s / len(live)
        self._row_s = row_s if self._row_s == 0 else (self._row_s + row_s) / 2
        if self.metrics:
            self.metrics.on_batch(
                len(live),
                self._last_batch_s,
                sum(a.new_tokens for a in answers),
                sum(a.prompt_tokens for a in answers),
            )
        for r, a in zip(live, answers, strict=True):
            if r.cancelled.is_set():
                r.future.cancel()
                if self.metrics:
                    self.metrics.on_cancel(1)
            elif not r.future.done():
                r.future.set_result(a)
