"""The batching engine on the real tiny model: batching, queue limits, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import ExitStack, contextmanager

import pytest
import torch
from PIL import Image

from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.model.prefixes import template_prefix
from tinyllava_med.server.engine import (
    BatchingEngine,
    EngineBusy,
    EngineNotReady,
)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.first_tokens = 0
        self.answers = 0
        self.prompt_tokens = 0
        self.depths: list[int] = []

    def on_batch(self, size, seconds, new_tokens, prompt_tokens):
        self.batches.append(size)
        self.prompt_tokens += prompt_tokens

    def on_answer(self, seconds):
        assert seconds > 0
        self.answers += 1

    def on_queue(self, depth):
        self.depths.append(depth)

    def on_first_token(self, seconds):
        self.first_tokens += 1

    def on_cancel(self, n):
        self.cancelled = getattr(self, "cancelled", 0) + n


@pytest.fixture
def engine(tiny_lm):
    rec = Recorder()
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=50, max_queue=16, metrics=rec)
    eng.start(tiny_lm)
    yield eng, rec
    eng.shutdown()


def _img(v: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (v, v, v))


def test_concurrent_requests_share_a_batch_and_match_single_answers(engine, tiny_lm):
    eng, rec = engine
    params = SamplingParams(max_new_tokens=5)
    questions = [f"Question number {i}?" for i in range(6)]

    async def run():
        return await asyncio.gather(
            *(eng.generate(_img(20 * i), q, params) for i, q in enumerate(questions))
        )

    answers = asyncio.run(run())
    assert max(rec.batches) > 1, f"expected batching, got batch sizes {rec.batches}"
    alone = [
        generate(tiny_lm, [_img(20 * i)], [q], params)[0].text for i, q in enumerate(questions)
    ]
    assert [a.text for a in answers] == alone
    assert rec.first_tokens == 6
    assert rec.answers == 6  # each answer's end-to-end latency
    assert rec.prompt_tokens == sum(a.prompt_tokens for a in answers) > 0
    assert rec.depths[-1] == 0


def _threads_preparing_images(monkeypatch) -> list[str]:
    """The names of the threads that run the image processor, in order."""
    import threading

    from tinyllava_med.server import engine as engine_module

    where: list[str] = []
    real = engine_module.prepare_image

    def spy(lm, image):
        where.append(threading.current_thread().name)
        return real(lm, image)

    monkeypatch.setattr(engine_module, "prepare_image", spy)
    return where


def test_images_are_processed_before_the_batch_and_cached_per_key(engine, monkeypatch):
    """The image processor runs as a request arrives, not in the engine's batch: on the event
    loop for a small image, in a worker thread for a large one (it must not stall the loop),
    once per image key; an image without a key is processed every time."""
    import threading

    eng, _ = engine
    where = _threads_preparing_images(monkeypatch)
    params = SamplingParams(max_new_tokens=3)
    small, large = _img(60), Image.new("RGB", (300, 300), (60, 60, 60))

    async def ask(image, key):
        return (await eng.generate(image, "Organ?", params, image_key=key)).text

    async def run():
        return [
            await ask(small, ("a", None)),
            await ask(small, ("a", None)),
            await ask(large, ("b", None)),
            await ask(large, ("b", None)),
            await ask(small, None),
            await ask(small, None),
        ]

    texts = asyncio.run(run())
    main = threading.main_thread().name
    assert where[0] == main and where[2] == main  # small: on the loop (keyed, then unkeyed)
    assert where[1] not in (main, "engine")  # large: a worker thread, never the engine's
    assert len(where) == 4  # one per key, one per unkeyed request
    assert (eng.pixels.misses, eng.pixels.hits) == (2, 2)
    assert texts[0] == texts[1] == texts[4] == texts[5]
    # the cached pixel values answer as the image does
    assert texts[2] == texts[3] == generate(eng.lm, [large], ["Organ?"], params)[0].text


def test_queue_full_raises_busy(tiny_lm):
    eng = BatchingEngine(max_batch_size=1, batch_window_ms=0, max_queue=2)
    eng.start(tiny_lm)
    try:
        slow = SamplingParams(max_new_tokens=64)
        reqs = [eng.submit(_img(1), "q", slow), eng.submit(_img(2), "q", slow)]
        with pytest.raises(EngineBusy):
            eng.submit(_img(3), "q", slow)
        for r in reqs:
            r.future.result(timeout=60)
        assert not eng.is_full()
    finally:
        eng.shutdown()


def test_cancelled_request_stops_and_others_complete(engine):
    eng, rec = engine
    deltas: list[str] = []

    async def run():
        long = asyncio.ensure_future(
            eng.generate(
                _img(5),
                "tell me everything",
                SamplingParams(max_new_tokens=200),
                on_token=deltas.append,
            )
        )
        short = asyncio.ensure_future(eng.generate(_img(9), "q", SamplingParams(max_new_tokens=3)))
        while not deltas:
            await asyncio.sleep(0.005)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return await short

    start = time.perf_counter()
    short_answer = asyncio.run(run())
    assert short_answer.new_tokens <= 3
    assert len(deltas) < 200
    assert time.perf_counter() - start < 60


def test_not_ready_without_model():
    eng = BatchingEngine()
    with pytest.raises(EngineNotReady):
        eng.submit(_img(1), "q", SamplingParams())


def test_probe(engine):
    eng, _ = engine
    assert eng.probe() and eng.last_done is not None and not eng.last_failed


def _slow_model(monkeypatch, seconds: float, fail: list[bool] | None = None) -> None:
    """The engine's `generate` takes `seconds` (a real model on a CPU), and raises while
    `fail[0]` is set."""
    import tinyllava_med.server.engine as engine_mod

    def slow(*args, **kwargs):
        time.sleep(seconds)
        if fail and fail[0]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "generate", slow)


def _per_row_model(monkeypatch, seconds: float) -> list[tuple[int, int, SamplingParams]]:
    """The engine's `generate` takes `seconds` per row (a real model's prefill on a CPU: rows
    cost as much together as alone); returns the log of its calls (rows, distinct questions,
    params)."""
    import tinyllava_med.server.engine as engine_mod

    calls = []

    def per_row(lm, images, questions, params, **kwargs):
        calls.append((len(images), len(set(questions)), params))
        time.sleep(seconds * len(images))
        return generate(lm, images, questions, params, **kwargs)

    monkeypatch.setattr(engine_mod, "generate", per_row)
    return calls


def _burst(eng: BatchingEngine, n: int) -> None:
    """`n` requests that arrive together (one batch if nothing caps it and the engine's window
    outlasts their submission: give it a long one, a loaded machine may take 50 ms), answered."""
    params = SamplingParams(max_new_tokens=2)
    with eng.arriving() as arrival:
        reqs = [eng.submit(_img(10 + i), f"q {i}?", params) for i in range(n)]
        arrival.close()
    for r in reqs:
        r.future.result(60)


@pytest.mark.parametrize("budget", [None, 1.0])
def test_batches_fit_the_time_budget_at_the_measured_cost_per_row(tiny_lm, monkeypatch, budget):
    """Rows that cost as much together as alone (here 0.2 s each): with `max_batch_s` 1 s no
    batch takes more than 5 of them (fewer when this machine is slow), though all six wait
    together; without it, one batch takes all six."""
    _per_row_model(monkeypatch, 0.2)
    rec = Recorder()
    eng = BatchingEngine(max_batch_size=8, metrics=rec, max_batch_s=budget, batch_window_ms=1000)
    eng.start(tiny_lm)
    try:
        eng.submit(_img(1), "first?", SamplingParams(max_new_tokens=2)).future.result(60)
        _burst(eng, 6)  # the first request measured a row
    finally:
        eng.shutdown()
    if budget is None:
        assert rec.batches == [1, 6]
    else:
        assert sum(rec.batches) == 7 and 2 <= max(rec.batches[1:]) <= 5, rec.batches


def test_readiness_counts_answers_and_probes_only_when_idle(tiny_lm):
    """A real answer proves the model works as well as a probe: no probe while answers are
    fresh; after `fresh_s` of idleness one probe runs."""
    rec = Recorder()
    eng = BatchingEngine(metrics=rec)
    eng.start(tiny_lm)
    try:
        eng.submit(_img(3), "real?", SamplingParams(max_new_tokens=2)).future.result(60)
        check = eng.model_check(fresh_s=0.5, stall_s=60, wait_s=30)
        assert asyncio.run(check) == "ok" and rec.batches == [1]  # the answer counted
        time.sleep(0.6)
        assert asyncio.run(eng.model_check(fresh_s=0.5, stall_s=60, wait_s=30)) == "ok"
        assert rec.batches == [1, 1]  # stale: a probe ran
    finally:
        eng.shutdown()


def test_readiness_answers_in_time_while_a_slow_first_probe_runs(tiny_lm, monkeypatch):
    """A model that takes seconds per answer: /readyz does not wait for the probe beyond
    `wait_s`; it says warming_up until the first answer, and never starts a second probe; an
    idle server repeats so costly a probe only rarely (at most `PROBE_DUTY` of the time)."""
    _slow_model(monkeypatch, 1.5)
    rec = Recorder()
    eng = BatchingEngine(metrics=rec)
    eng.start(tiny_lm)
    try:

        async def checks() -> list[tuple[str, float]]:
            out = []
            for _ in range(3):
                t = time.perf_counter()
                out.append((await eng.model_check(60, 60, 0.2), time.perf_counter() - t))
            return out

        got = asyncio.run(checks())
        assert [c for c, _ in got] == ["warming_up"] * 3
        assert all(t < 1.0 for _, t in got), got
        assert eng.probe(timeout=10)  # the same probe, still in flight
        assert rec.batches == [1]
        assert asyncio.run(eng.model_check(60, 60, 0.2)) == "ok"
        # a probe this costly is not repeated after fresh_s (0.2 s) but after 20x its time
        time.sleep(0.3)
        assert asyncio.run(eng.model_check(0.2, 60, 0.2)) == "ok"
        assert rec.batches == [1]
    finally:
        eng.shutdown()


def test_readiness_after_a_failed_batch_and_a_stalled_one(tiny_lm, monkeypatch):
    """A failed batch makes the check probe: probe_failed until a probe succeeds again. A batch
    running past `stall_s` (and 3x the last batch) is "stalled"."""
    fail = [True]
    _slow_model(monkeypatch, 0.1, fail)
    eng = BatchingEngine()
    eng.start(tiny_lm)
    try:
        with pytest.raises(RuntimeError, match="CUDA error"):
            eng.submit(_img(1), "q?", SamplingParams(max_new_tokens=2)).future.result(60)
        assert eng.last_failed
        assert asyncio.run(eng.model_check(60, 60, 10)) == "probe_failed"  # the probe fails too
        fail[0] = False
        assert asyncio.run(eng.model_check(60, 60, 10)) == "ok"  # a new probe succeeds
        assert not eng.last_failed
        _slow_model(monkeypatch, 4.0)  # the next batch hangs (a wedged GPU, say)
        req = eng.submit(_img(2), "slow?", SamplingParams(max_new_tokens=2))
        time.sleep(0.2)  # running, within max(stall_s 0.5, 3x the last batch's ~0.1 s): fine
        assert asyncio.run(eng.model_check(60, 0.5, 10)) == "ok"
        time.sleep(2.0)
        assert asyncio.run(eng.model_check(60, 0.5, 10)) == "stalled"
        req.future.result(60)
        assert asyncio.run(eng.model_check(60, 0.5, 10)) == "ok"
    finally:
        eng.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_readiness_when_the_engine_thread_has_died(tiny_lm, monkeypatch):
    """A bug that kills the engine's thread leaves requests queued forever: "stalled"."""
    eng = BatchingEngine()
    eng.start(tiny_lm)
    try:
        eng.submit(_img(1), "q?", SamplingParams(max_new_tokens=2)).future.result(60)

        def broken(first):
            raise RuntimeError("a bug in batching")

        monkeypatch.setattr(eng, "_collect", broken)
        eng.submit(_img(2), "lost?", SamplingParams(max_new_tokens=2))
        assert eng._thread is not None
        eng._thread.join(10)
        assert asyncio.run(eng.model_check(60, 60, 1)) == "stalled"
    finally:
        eng.shutdown()


def test_a_lone_request_never_waits_for_the_window(tiny_lm):
    rec = Recorder()
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000, metrics=rec)
    eng.start(tiny_lm)
    try:
        req = eng.submit(_img(5), "alone?", SamplingParams(max_new_tokens=2))
        req.future.result(timeout=20)  # a minute-long window would time this out
        assert rec.batches == [1]
    finally:
        eng.shutdown()


def test_an_announced_request_joins_the_forming_batch(tiny_lm):
    """A request on its way (announced, still decoding its image) is waited for; once it is
    submitted the batch leaves with both."""
    import threading

    rec = Recorder()
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000, metrics=rec)
    eng.start(tiny_lm)
    params = SamplingParams(max_new_tokens=2)
    try:
        with eng.arriving() as arrival:
            first = eng.submit(_img(1), "first?", params)
            time.sleep(0.3)  # the batch is forming and waits for the announced request
            assert not first.future.done()
            second = eng.submit(_img(2), "second?", params, arrival=arrival)
        first.future.result(timeout=20)
        second.future.result(timeout=20)
        assert rec.batches == [2]

        # an announcement that never becomes a request (its route failed) releases the batch
        done = threading.Event()
        with eng.arriving():
            third = eng.submit(_img(3), "third?", params)
            third.future.add_done_callback(lambda f: done.set())
            time.sleep(0.2)
            assert not done.is_set()
        assert done.wait(20) and rec.batches == [2, 1]
    finally:
        eng.shutdown()


def test_clients_coming_back_refill_the_batch_instead_of_splitting_it(tiny_lm):
    """Requests expected back (as many as were in flight during the last batch) are waited for,
    up to the last batch's duration, so a steady load keeps one full batch instead of two
    half batches taking turns; a request nobody follows waits no longer than that."""
    params = SamplingParams(max_new_tokens=24)

    def run(primed: bool) -> list[int]:
        rec = Recorder()
        eng = BatchingEngine(max_batch_size=8, batch_window_ms=5_000, metrics=rec)
        eng.start(tiny_lm)
        try:
            if primed:  # one batch of four, held together by announcing them first
                arrivals = [eng.arriving() for _ in range(4)]
                handles = [a.__enter__() for a in arrivals]
                first = [
                    eng.submit(_img(i), f"first {i}?", params, arrival=h)
                    for i, h in enumerate(handles)
                ]
                for a in arrivals:
                    a.__exit__(None, None, None)
                for r in first:
                    r.future.result(timeout=60)
                assert rec.batches == [4]
            gap = max(eng._last_batch_s / 4, 0.005)
            lead = eng.submit(_img(9), "back first?", params)
            time.sleep(gap)  # the others come back a little later
            rest = [eng.submit(_img(10 + i), f"back {i}?", params) for i in range(3)]
            for r in [lead, *rest]:
                r.future.result(timeout=60)
            return rec.batches
        finally:
            eng.shutdown()

    assert run(primed=False) == [1, 3]  # nobody expected: the first goes alone

    rec = Recorder()
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000, metrics=rec)
    eng.start(tiny_lm)
    try:
        first = [eng.submit(_img(i), f"q {i}?", params) for i in range(3)]
        for r in first:
            r.future.result(timeout=60)
        before = eng._last_batch_s
        t = time.perf_counter()
        eng.submit(_img(7), "alone now?", params).future.result(timeout=60)
        waited = time.perf_counter() - t
        # it waited at most the last batch's duration, then generated: not the minute's window
        assert waited < before + eng._last_batch_s + 1.0
        assert rec.batches[-1] == 1
    finally:
        eng.shutdown()


def test_a_small_image_for_a_large_model_input_is_prepared_off_the_loop(tiny_lm, monkeypatch):
    """A 32 px slice that the processor turns into 384 px (a real TinyLLaVA's SigLIP input:
    about 9 ms of work) goes to a worker thread like a large image; the tiny model's own 32 px
    output stays on the loop."""
    import copy
    import dataclasses
    import threading

    from transformers.image_utils import SizeDict

    where = _threads_preparing_images(monkeypatch)
    big = copy.deepcopy(tiny_lm.processor)
    big.image_processor.size = SizeDict(height=384, width=384)
    shapes = []
    for lm in (tiny_lm, dataclasses.replace(tiny_lm, processor=big)):
        eng = BatchingEngine()
        eng.start(lm)
        try:
            shapes.append(tuple(asyncio.run(eng.prepare_async(_img(5), key="k")).shape))
        finally:
            eng.shutdown()
    main = threading.main_thread().name
    assert where[0] == main and where[1] not in (main, "engine"), where
    assert shapes[1] == (3, 384, 384) and shapes[0] != shapes[1]


@pytest.mark.parametrize("slow, cap", [(False, 0.5), (True, 0.5), (True, 0.1)])
def test_after_a_long_batch_the_refill_waits_past_the_window(tiny_lm, monkeypatch, slow, cap):
    """A real model's batch takes seconds: clients coming back 150 ms after it are waited for
    (up to a quarter of that batch), though the window is 20 ms. After a batch of the tiny
    model's few milliseconds, the window (and that batch's time) bound the wait as before; with
    the cap below 150 ms, they are not waited for either."""
    import tinyllava_med.server.engine as engine_mod

    if slow:
        _slow_model(monkeypatch, 1.2)
    monkeypatch.setattr(engine_mod, "MAX_WAIT_S", cap)
    params = SamplingParams(max_new_tokens=2)
    rec = Recorder()
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=20, metrics=rec)
    eng.start(tiny_lm)
    try:
        arrivals = [eng.arriving() for _ in range(4)]
        handles = [a.__enter__() for a in arrivals]
        first = [
            eng.submit(_img(i), f"first {i}?", params, arrival=h) for i, h in enumerate(handles)
        ]
        for a in arrivals:
            a.__exit__(None, None, None)
        for r in first:
            r.future.result(timeout=60)
        lead = eng.submit(_img(9), "back first?", params)
        time.sleep(0.15)
        rest = [eng.submit(_img(10 + i), f"back {i}?", params) for i in range(3)]
        for r in [lead, *rest]:
            r.future.result(timeout=60)
    finally:
        eng.shutdown()
    if slow and cap > 0.15:
        assert rec.batches == [4, 4]
    else:  # the lead left alone; the three behind it may split by timing
        assert rec.batches[:2] == [4, 1] and sum(rec.batches) == 8


def test_an_announced_request_counts_once_in_flight(tiny_lm):
    """The HTTP path announces a request, then submits it: one client in a row is one request
    in flight, so its next question is not waited for as if another were expected."""
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000)
    eng.start(tiny_lm)
    try:
        for i in range(3):
            with eng.arriving() as arrival:
                req = eng.submit(
                    _img(i),
                    f"one at a time {i}?",
                    SamplingParams(max_new_tokens=2),
                    arrival=arrival,
                )
            req.future.result(timeout=60)
            assert eng.last_expected == 1
    finally:
        eng.shutdown()


def test_warm_up_runs_each_size_and_then_the_first_burst_fits_the_time_budget(tiny_lm, monkeypatch):
    """The warm-up generates one padded batch per size (rows of different lengths, prefill and
    a decode step) outside the request metrics. What it measures (0.2 s per row here, a real
    model on a CPU) caps the first burst of requests at `max_batch_s` (1 s: at most 5 rows);
    without it the burst would go as one batch of 6. It also proves the model answers: the
    first readiness check is ok without a probe."""
    calls = _per_row_model(monkeypatch, 0.2)
    rec = Recorder()
    eng = BatchingEngine(max_batch_size=8, metrics=rec, max_batch_s=1.0, batch_window_ms=1000)
    timings = eng.warm_up(tiny_lm, [1, 2, 4])
    assert [n for n, _ in timings] == [1, 2, 4] and timings[-1][1] >= 0.8
    assert [(n, k) for n, k, _ in calls] == [(1, 1), (2, 2), (4, 3)]
    assert all(p.max_new_tokens == 2 for _, _, p in calls)
    assert rec.batches == []  # warm-up batches are not requests
    eng.start(tiny_lm)
    try:
        assert asyncio.run(eng.model_check(fresh_s=60, stall_s=60, wait_s=5)) == "ok"
        assert rec.batches == []  # no probe was needed
        _burst(eng, 6)
    finally:
        eng.shutdown()
    assert sum(rec.batches) == 6 and max(rec.batches) <= 5, rec.batches


def test_a_failed_warm_up_names_the_batch_size(tiny_lm, monkeypatch):
    import tinyllava_med.server.engine as engine_mod

    def out_of_memory(lm, images, *args, **kwargs):
        if len(images) >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(lm, images, *args, **kwargs)

    monkeypatch.setattr(engine_mod, "generate", out_of_memory)
    eng = BatchingEngine(max_batch_size=8)
    with pytest.raises(RuntimeError, match=r"warm-up batch of 4 failed .*lower max_batch_size"):
        eng.warm_up(tiny_lm, [1, 2, 4, 8])
    assert eng.last_done is None


def _failing_model(monkeypatch, fail) -> list[int]:
    """The engine's `generate` raises what `fail(questions, kwargs)` returns (None: answers).
    Returns the sizes of the batches it was given."""
    import tinyllava_med.server.engine as engine_mod

    sizes: list[int] = []

    def gen(lm, images, questions, *args, **kwargs):
        sizes.append(len(questions))
        if (error := fail(questions, kwargs)) is not None:
            raise error
        return generate(lm, images, questions, *args, **kwargs)

    monkeypatch.setattr(engine_mod, "generate", gen)
    return sizes


def _one_batch(eng: BatchingEngine, questions: list[str], on_token=None) -> list:
    """Submit `questions` (about images 10, 11, ...) so that they form one batch."""
    params = SamplingParams(max_new_tokens=3)
    with ExitStack() as stack:
        arrivals = [stack.enter_context(eng.arriving()) for _ in questions]
        return [
            eng.submit(_img(10 + i), q, params, on_token if i == 0 else None, arrival=a)
            for i, (q, a) in enumerate(zip(questions, arrivals, strict=True))
        ]


def _alone(lm, i: int, question: str) -> str:
    return generate(lm, [_img(10 + i)], [question], SamplingParams(max_new_tokens=3))[0].text


def test_a_request_that_breaks_the_model_fails_alone(tiny_lm, monkeypatch):
    """A failed batch runs again in halves: the others in it are answered as alone."""
    questions = ["Organ?", "Plane?", "POISON", "Fracture?"]
    sizes = _failing_model(
        monkeypatch, lambda qs, _: ValueError("a broken row") if "POISON" in qs else None
    )
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000)
    eng.start(tiny_lm)
    try:
        reqs = _one_batch(eng, questions)
        with pytest.raises(ValueError, match="a broken row"):
            reqs[2].future.result(timeout=60)
        for i in (0, 1, 3):
            assert reqs[i].future.result(timeout=60).text == _alone(tiny_lm, i, questions[i])
        assert sizes == [4, 2, 2, 1, 1]  # the whole, its halves, the bad half's halves
    finally:
        eng.shutdown()


def test_a_batch_too_large_for_memory_is_answered_in_smaller_ones(tiny_lm, monkeypatch, caplog):
    """Out of memory at 4 rows: answered as two batches of 2, and later batches take 2."""
    sizes = _failing_model(
        monkeypatch,
        lambda qs, _: torch.OutOfMemoryError("CUDA out of memory") if len(qs) > 2 else None,
    )
    questions = ["Organ?", "Plane?", "Modality?", "Fracture?"]
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000)
    eng.start(tiny_lm)
    try:
        for _ in range(2):
            reqs = _one_batch(eng, questions)
            got = [r.future.result(timeout=60).text for r in reqs]
            assert got == [_alone(tiny_lm, i, q) for i, q in enumerate(questions)]
        assert sizes == [4, 2, 2, 2, 2]  # the second round never tried 4
        assert "batches now take at most 2" in caplog.text
    finally:
        eng.shutdown()


def test_a_request_that_streamed_tokens_is_not_run_again(tiny_lm, monkeypatch):
    """A streaming client has shown its first tokens: a second run could not go on with them,
    so it gets the error; the others in the batch run again and are answered."""
    calls: list[int] = []

    def fail_after_a_token(qs, kwargs):
        calls.append(len(qs))
        if len(calls) == 1:
            kwargs["on_token"](0, "partial")
            return RuntimeError("CUDA error: an illegal memory access was encountered")
        return None

    sizes = _failing_model(monkeypatch, fail_after_a_token)
    seen: list[str] = []
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000)
    eng.start(tiny_lm)
    try:
        streamed, plain = _one_batch(eng, ["Organ?", "Plane?"], on_token=seen.append)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            streamed.future.result(timeout=60)
        assert plain.future.result(timeout=60).text == _alone(tiny_lm, 1, "Plane?")
        assert seen == ["partial"] and sizes == [2, 1]
    finally:
        eng.shutdown()


def test_a_request_whose_client_went_away_is_not_run_again(tiny_lm, monkeypatch):
    reqs: list = []

    def fail_once(qs, _):
        if len(qs) == 3:
            reqs[1].cancelled.set()  # its client disconnected while the batch ran
            return RuntimeError("CUDA error: an illegal memory access was encountered")
        return None

    sizes = _failing_model(monkeypatch, fail_once)
    eng = BatchingEngine(max_batch_size=8, batch_window_ms=60_000)
    eng.start(tiny_lm)
    try:
        reqs.extend(_one_batch(eng, ["Organ?", "Plane?", "Fracture?"]))
        for i in (0, 2):
            assert reqs[i].future.result(timeout=60).text == _alone(tiny_lm, i, reqs[i].question)
        assert reqs[1].future.cancelled() and sizes == [3, 1, 1]
    finally:
        eng.shutdown()


def test_a_lone_follow_up_reuses_the_prompt_up_to_the_image(tiny_lm):
    """The engine keeps the attention cache of each named image's prompt prefix: a second
    question about the image hits it and answers as without it. By default (on a CPU) only for
    a real tower: the tiny model's few image tokens share only the template's opening, computed
    once for all images; 0 turns caching off."""
    params = SamplingParams(max_new_tokens=4)
    default = BatchingEngine()
    default.start(tiny_lm)
    try:
        answers = [
            default.submit(_img(i), "Which organ?", params, image_key=("sha", i)).future.result(60)
            for i in (5, 6)
        ]
        assert default.prefixes.max_bytes > 0 and not default.image_prefixes
        assert (default.prefixes.hits, default.prefixes.misses) == (1, 1)
        [(name, tokens)] = default.prefixes._items  # the opening, named by no image
        assert name is None and list(tokens) == template_prefix(tiny_lm).tolist()
    finally:
        default.shutdown()
    assert [a.text for a in answers] == [
        generate(tiny_lm, [_img(i)], ["Which organ?"], params)[0].text for i in (5, 6)
    ]
    eng = BatchingEngine(prefix_cache_mb=256)
    eng.start(tiny_lm)
    try:
        for q in ("Which organ?", "Is it normal?"):
            eng.submit(_img(5), q, params, image_key=("sha", 0)).future.result(60)
        follow_up = eng.submit(_img(5), "Any fracture?", params, image_key=("sha", 0))
        answer = follow_up.future.result(60)
        assert (eng.prefixes.hits, eng.prefixes.misses, len(eng.prefixes._items)) == (2, 1, 1)
    finally:
        eng.shutdown()
    assert answer.text == generate(tiny_lm, [_img(5)], ["Any fracture?"], params)[0].text
    off = BatchingEngine(prefix_cache_mb=0)
    off.start(tiny_lm)
    try:
        off.submit(_img(5), "Which organ?", params, image_key=("sha", 0)).future.result(60)
        assert off.prefixes.bytes == 0 and off.prefixes.misses == 0
    finally:
        off.shutdown()


class PrefillRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.prefills: list[str] = []

    def on_prefill(self, outcome):
        self.prefills.append(outcome)


@pytest.fixture
def prefilling(tiny_lm):
    """An engine that keeps prompts by image (so it prefills), and what it reports."""
    rec = PrefillRecorder()
    eng = BatchingEngine(prefix_cache_mb=256, metrics=rec)
    eng.start(tiny_lm)
    yield eng, rec
    eng.shutdown()


@contextmanager
def _before_each_layer(lm, run):
    """`run()` before each layer (tower and LLM) the engine's thread runs; yields the layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def hook(module, args):
        if threading.current_thread().name == "engine":
            run()

    layers = [m for m in lm.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield layers
    finally:
        for handle in handles:
            handle.remove()


def _held(prefixes) -> set:
    """The image names whose prompts an engine's prefix cache holds."""
    return {name for name, _ in prefixes._items}


def _wait(predicate, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_prefilled_image_answers_its_first_question_as_a_follow_up(
    tiny_lm, prefilling, monkeypatch
):
    """`prefill` computes the prompt up to the image while idle: the first question about the
    image then runs neither the processor nor the tower, and answers as without it."""
    eng, rec = prefilling
    params = SamplingParams(max_new_tokens=6)
    assert eng.prefills
    eng.prefill(_img(9), ("sha", 9))
    _wait(lambda: rec.prefills == ["done"])
    tower = tiny_lm.model.model.vision_tower
    calls = []
    real_forward = tower.forward
    monkeypatch.setattr(tower, "forward", lambda *a, **k: calls.append(1) or real_forward(*a))
    answer = eng.submit(_img(9), "Which organ?", params, image_key=("sha", 9)).future.result(60)
    assert calls == [] and (eng.pixels.hits, eng.prefixes.hits) == (1, 1)
    monkeypatch.undo()
    eng.prefill(_img(9), ("sha", 9))  # held already
    _wait(lambda: rec.prefills == ["done", "cached"])
    assert answer.text == generate(tiny_lm, [_img(9)], ["Which organ?"], params)[0].text


def test_prefill_gives_way_to_questions_and_to_a_newer_image(prefilling, monkeypatch):
    """While a batch runs, two images are asked to be prepared and a question arrives: the
    older image is superseded, the newer one skipped because a question waits; the question
    is answered. Idle again, a prefill runs."""
    from tinyllava_med.server import engine as engine_module

    eng, rec = prefilling
    entered, release = threading.Event(), threading.Event()
    real_generate = engine_module.generate

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate", held)
    params = SamplingParams(max_new_tokens=3)
    try:
        first = eng.submit(_img(1), "Which organ?", params, image_key=("sha", 1))
        assert entered.wait(30)
        eng.prefill(_img(2), ("sha", 2))
        eng.prefill(_img(3), ("sha", 3))
        second = eng.submit(_img(4), "Which organ?", params, image_key=("sha", 4))
        release.set()
        first.future.result(60), second.future.result(60)
        _wait(lambda: len(rec.prefills) == 2)
        assert rec.prefills == ["skipped", "skipped"] and rec.batches == [1, 1]
        held_images = _held(eng.prefixes)
        assert held_images == {("sha", 1), ("sha", 4)}  # the questions' own prefixes only
        eng.prefill(_img(3), ("sha", 3))
        _wait(lambda: rec.prefills[-1:] == ["done"])
        assert ("sha", 3) in _held(eng.prefixes)
    finally:
        release.set()


def test_prefill_is_for_models_that_keep_prompts_by_image(tiny_lm):
    """The tiny model's 16-token tower shares only the template's opening by default, and a
    cache of 0 keeps nothing: there is nothing to prepare."""
    for eng in (BatchingEngine(), BatchingEngine(prefix_cache_mb=0)):
        eng.start(tiny_lm)
        try:
            assert not eng.prefills
        finally:
            eng.shutdown()
    assert not BatchingEngine(prefix_cache_mb=256).prefills  # no model yet
    with pytest.raises(EngineNotReady):
        BatchingEngine(prefix_cache_mb=256).prefill(_img(1), ("sha", 1))


def test_a_running_prefill_gives_way_to_a_question_about_another_image(tiny_lm, prefilling):
    """Between layers, a prefill asks whether a question about another image waits: it stops
    for it (on a CPU a real model's prefill takes 10-25 s, which the question must not wait
    for) and stores nothing. A question about the same image lets it finish, and uses it."""
    eng, rec = prefilling
    params = SamplingParams(max_new_tokens=4)
    entered, slowing = threading.Event(), threading.Event()

    def slow():  # while `slowing`, each layer takes 0.1 s
        if slowing.is_set():
            entered.set()
            time.sleep(0.1)

    try:
        with _before_each_layer(tiny_lm, slow) as layers:
            for image, asked, outcome in ((1, 2, "abandoned"), (3, 3, "done")):
                entered.clear()
                slowing.set()
                eng.prefill(_img(image), ("sha", image))
                assert entered.wait(30)  # the prefill is in its first layer
                hits = eng.prefixes.hits
                request = eng.submit(_img(asked), "Which organ?", params, image_key=("sha", asked))
                slowing.clear()
                answer = request.future.result(60)
                alone = generate(tiny_lm, [_img(asked)], ["Which organ?"], params)[0]
                assert answer.text == alone.text
                assert rec.prefills[-1] == outcome
                assert (("sha", image) in _held(eng.prefixes)) == (outcome == "done")
                assert eng.prefixes.hits - hits == (1 if outcome == "done" else 0)
    finally:
        slowing.clear()
    assert not any(layer._forward_pre_hooks for layer in layers)  # the prefill's hooks are gone


def test_asking_again_for_the_image_being_prefilled_lets_it_go_on(tiny_lm, prefilling):
    """The web client asks again when the reader changes the window of the same image: the
    prefill under way continues (not restarted); once it is done, asking again finds it held."""
    eng, rec = prefilling
    entered = threading.Event()

    def slow():
        entered.set()
        time.sleep(0.05)

    with _before_each_layer(tiny_lm, slow):
        eng.prefill(_img(5), ("sha", 5))
        assert entered.wait(30)
        eng.prefill(_img(5), ("sha", 5))  # the same image, while it runs
        _wait(lambda: eng._prefill_live is None)
        assert rec.prefills == ["done"]
        eng.prefill(_img(5), ("sha", 5))
        _wait(lambda: eng._prefill_live is None)
        assert rec.prefills == ["done", "cached"]


def test_readiness_does_not_probe_while_an_image_is_prepared(tiny_lm, prefilling):
    """A probe would stop a prefill (a question with no image key) and, on a CPU, cost as
    much: while one runs, `/readyz` answers from the last evidence, and a finished prefill
    counts as evidence that the model works."""
    eng, rec = prefilling
    entered, release = threading.Event(), threading.Event()

    def held():
        entered.set()
        release.wait(30)

    eng.submit(_img(1), "Which organ?", SamplingParams(max_new_tokens=2)).future.result(60)
    eng.last_done -= 3600  # long idle: the next check would probe
    try:
        with _before_each_layer(tiny_lm, held):
            eng.prefill(_img(2), ("sha", 2))
            assert entered.wait(30)
            assert asyncio.run(eng.model_check(fresh_s=1, stall_s=60, wait_s=0.1)) == "ok"
            assert eng._probe is None
            release.set()
            _wait(lambda: rec.prefills == ["done"])
            assert time.monotonic() - eng.last_done < 30 and not eng.last_failed
    finally:
        release.set()


def test_shutting_down_stops_a_prefill(tiny_lm, prefilling):
    """A server stopping (a deploy, a restart) does not wait for an image being prepared: on a
    CPU that can take 10-25 s, longer than the engine's join."""
    eng, rec = prefilling
    entered = threading.Event()

    def slow():  # each layer takes 0.2 s
        entered.set()
        time.sleep(0.2)

    with _before_each_layer(tiny_lm, slow):
        eng.prefill(_img(3), ("sha", 3))
        assert entered.wait(30)
        eng.shutdown(timeout=30)  # returns once the engine's thread has ended
        assert rec.prefills == ["abandoned"] and not eng.prefixes.bytes
