"""A streaming client that goes away: its request is cancelled in the engine, nothing stored."""

from __future__ import annotations

import time

import httpx
from api_helpers import live_server, post_ct

from tinyllava_med.server.app import create_app
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.settings import Settings


def test_disconnect_cancels_generation(tmp_path, sqlite_url, tiny_lm):
    upgrade(sqlite_url)
    app = create_app(Settings(data_dir=tmp_path / "d", database_url=sqlite_url), model=tiny_lm)
    with live_server(app) as base:
        h = {"Authorization": f"Bearer {app.state.first_admin_key}"}
        study = post_ct(base, h)
        tokens_before = _metric(base, "tinyllava_med_generation_tokens_total")
        with httpx.stream(
            "POST",
            f"{base}/v1/studies/{study}/questions?stream=true",
            headers=h,
            json={"question": "Describe everything.", "max_new_tokens": 400},
            timeout=30,
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break  # one token seen: now hang up
        for _ in range(200):
            if app.state.engine.queue_depth == 0:
                break
            time.sleep(0.05)
        assert app.state.engine.queue_depth == 0
        assert _metric(base, "tinyllava_med_cancelled_requests_total") == 1
        assert _metric(base, "tinyllava_med_generation_tokens_total") == tokens_before
        reports = httpx.get(f"{base}/v1/reports", headers=h, timeout=30).json()
        assert reports["count"] == 0


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
