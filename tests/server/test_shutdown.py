"""A stopping server (`serve` on SIGTERM or Ctrl-C, through `http_server`): the answer in flight
is finished and stored, no new connection is taken, `/readyz` turns 503 and no more jobs are
claimed while it drains; the drain lasts `shutdown_grace_s` (by default `request_timeout_s` + 10)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from api_helpers import free_port, post_ct, wait_for
from sqlalchemy import create_engine, func, select

from tinyllava_med.model.generate import generate
from tinyllava_med.server.app import create_app, http_server
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.db.models import Report
from tinyllava_med.server.settings import Settings


def test_drain_length_follows_the_request_timeout():
    assert Settings().drain_s == 130.0
    assert Settings(request_timeout_s=600).drain_s == 610.0
    assert Settings(request_timeout_s=600, shutdown_grace_s=45).drain_s == 45.0


def test_a_stopping_server_finishes_the_answer_in_flight(
    tmp_path, sqlite_url, tiny_lm, monkeypatch
):
    import tinyllava_med.server.engine as engine_mod

    upgrade(sqlite_url)
    settings = Settings(
        data_dir=tmp_path / "d", database_url=sqlite_url, port=free_port(), request_timeout_s=30
    )
    app = create_app(settings, model=tiny_lm)
    server = http_server(app, settings, log_level="error")
    assert server.config.timeout_graceful_shutdown == 40  # not uvicorn's 10 s
    thread = threading.Thread(target=server.run, name="serve", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    h = {"Authorization": f"Bearer {wait_for(lambda: _ready_key(app, base))}"}
    study = post_ct(base, h)

    answering = threading.Event()

    def slow(*args, **kwargs):  # a real model on a CPU: seconds per answer
        answering.set()
        time.sleep(3)
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "generate", slow)
    answer: list[httpx.Response] = []
    asking = threading.Thread(
        target=lambda: answer.append(
            httpx.post(
                f"{base}/v1/studies/{study}/questions",
                headers=h,
                json={"question": "Is there a fracture?", "max_new_tokens": 4},
                timeout=60,
            )
        )
    )
    asking.start()
    assert answering.wait(30)

    server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
    assert app.state.shutting_down  # /readyz says 503 from now on
    runner = app.state.job_runner
    wait_for(lambda: not any(t.is_alive() for t in runner._threads), 5, what="jobs to stop")
    time.sleep(0.5)  # uvicorn closes its socket at its next tick (0.1 s)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=5)
    assert asking.is_alive()  # still answering

    asking.join(60)
    thread.join(60)
    assert not thread.is_alive()
    assert answer[0].status_code == 201, answer[0].text
    assert answer[0].json()["answer"]
    with create_engine(sqlite_url).connect() as db:
        assert db.scalar(select(func.count()).select_from(Report)) == 1


def _ready_key(app, base: str) -> str | None:
    try:
        ready = httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return None
    return app.state.first_admin_key if ready else None


def test_an_open_demo_page_does_not_hold_the_stop(tmp_path, sqlite_url, tiny_lm):
    """A browser on `/demo` holds Gradio's heartbeat stream open for as long as the page is
    open; the drain ends it rather than waiting out the whole `shutdown_grace_s`."""
    upgrade(sqlite_url)
    settings = Settings(
        data_dir=tmp_path / "d", database_url=sqlite_url, port=free_port(), gradio=True
    )
    app = create_app(settings, model=tiny_lm)
    server = http_server(app, settings, log_level="error")
    thread = threading.Thread(target=server.run, name="serve", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    wait_for(lambda: _ready_key(app, base))
    beats: list[str] = []

    def page() -> None:
        url = f"{base}/demo/gradio_api/heartbeat/page1"
        with httpx.stream("GET", url, timeout=300) as r:
            for line in r.iter_lines():
                beats.append(line)

    browser = threading.Thread(target=page, daemon=True)
    browser.start()
    wait_for(lambda: "data: ALIVE" in beats, 30, what="the page's heartbeat")
    stopped = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    thread.join(settings.drain_s)
    assert not thread.is_alive()
    assert time.monotonic() - stopped < 20, "the drain waited for the demo page"
