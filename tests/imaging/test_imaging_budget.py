"""The process's decoding memory budget: a large decode waits while others hold it, gives up
after its wait with `decode_busy`, never waits for itself, and small decodes never wait."""

from __future__ import annotations

import threading
import time

import pytest

from tinyllava_med.imaging import ImagingError
from tinyllava_med.imaging.budget import SMALL_BYTES, DecodeBudget

MiB = 1024 * 1024


def test_a_large_decode_waits_for_the_budget_and_gives_up_after_its_wait():
    budget = DecodeBudget(1000 * MiB, wait_s=5.0)
    held, release, order = threading.Event(), threading.Event(), []

    def first() -> None:
        with budget.reserve(600 * MiB):
            held.set()
            release.wait(10)
            order.append("first done")

    def second() -> None:
        with budget.reserve(600 * MiB):  # 1200 MB together: waits for the first
            order.append("second ran")

    a = threading.Thread(target=first)
    a.start()
    assert held.wait(5)
    b = threading.Thread(target=second)
    b.start()
    time.sleep(0.3)
    assert order == [] and budget.used == 600 * MiB
    with budget.reserve(SMALL_BYTES - 1):  # a CT slice does not wait
        pass
    with budget.reserve(300 * MiB):  # fits beside it
        assert budget.used == 900 * MiB
    release.set()
    a.join(5)
    b.join(5)
    assert order == ["first done", "second ran"] and budget.used == 0

    budget.resize(1000 * MiB, wait_s=0.2)
    with budget.reserve(5000 * MiB):  # larger than the whole budget: alone, not refused
        assert budget.used == 1000 * MiB
        errors: list[ImagingError] = []

        def third() -> None:
            try:
                with budget.reserve(100 * MiB):
                    pass
            except ImagingError as e:
                errors.append(e)

        t = threading.Thread(target=third)
        t.start()
        t.join(5)
        assert [e.code for e in errors] == ["decode_busy"]
        assert "retry" in errors[0].message
        with budget.reserve(100 * MiB):  # this thread holds it: it adds, it cannot wait
            assert budget.used == 1100 * MiB
    assert budget.used == 0


def test_an_error_inside_gives_the_budget_back():
    budget = DecodeBudget(100 * MiB, wait_s=0.1)
    with pytest.raises(ValueError), budget.reserve(100 * MiB):
        raise ValueError("the codec failed")
    assert budget.used == 0
    with budget.reserve(100 * MiB):
        pass


def test_a_nested_reservation_waits_for_other_threads_only():
    """A deflated file holds its inflated data set, then asks for its frame: it waits for what
    other threads hold (eight such uploads each added 1.5 GB past a 2 GB budget), never for
    itself."""
    budget = DecodeBudget(1000 * MiB, wait_s=5.0)
    other_holds, other_release, done = threading.Event(), threading.Event(), []

    def other() -> None:
        with budget.reserve(500 * MiB):
            other_holds.set()
            other_release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert other_holds.wait(5)
    with budget.reserve(300 * MiB):  # this thread's inflated data set: fits beside the other

        def release_soon() -> None:
            time.sleep(0.3)
            done.append("released")
            other_release.set()

        threading.Thread(target=release_soon).start()
        with budget.reserve(400 * MiB):  # its frame: 1200 MB with the other's, so it waits
            assert done == ["released"]
            assert budget.used == 700 * MiB
    t.join(5)
    assert budget.used == 0


def test_decodes_past_the_waiting_limit_are_refused_at_once():
    from tinyllava_med.imaging.budget import MAX_WAITING

    budget = DecodeBudget(100 * MiB, wait_s=2.0)
    outcomes: list[str] = []

    def waiter() -> None:
        try:
            with budget.reserve(100 * MiB):
                outcomes.append("ran")
        except ImagingError as e:
            outcomes.append(e.code)

    with budget.reserve(100 * MiB):
        waiters = [threading.Thread(target=waiter) for _ in range(MAX_WAITING)]
        for w in waiters:
            w.start()
        deadline = time.monotonic() + 5
        while budget.waiting < MAX_WAITING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        one_more = threading.Thread(target=waiter)  # refused without waiting
        one_more.start()
        one_more.join(5)
        assert outcomes == ["decode_busy"] and time.monotonic() - started < 0.5
    for w in waiters:
        w.join(10)
    assert outcomes == ["decode_busy"] + ["ran"] * MAX_WAITING
