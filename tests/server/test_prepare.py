"""`POST /v1/studies/{id}/images/{n}/prepare`: the image's prompt computed ahead of its questions.

The real tiny model and the real CT file; the app's engine keeps prompts by image (conftest's
`prefix_cache_mb`), as it does by default on a CPU for a real vision tower.
"""

from __future__ import annotations

import re

from api_helpers import assert_error, make_api, upload_ct, wait_for
from sqlalchemy import select

from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.server.db.models import AuditEvent
from tinyllava_med.server.serving import render


def prefills(api, outcome: str) -> float:
    text = api.get("/metrics").text
    m = re.search(rf'^tinyllava_med_image_prefills_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_the_first_question_about_a_prepared_image_skips_the_tower(api, tiny_lm, monkeypatch):
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/images/0"
    r = api.post(f"{url}/prepare", headers=api.h("pacs"))
    assert r.status_code == 202 and r.json() == {"status": "queued"}
    wait_for(lambda: prefills(api, "done") == 1, 30, "the prefill")
    prefixes = api.app.state.engine.prefixes
    assert (prefixes.misses, prefixes.hits) == (1, 0) and prefixes.bytes > 0

    tower = tiny_lm.model.model.vision_tower
    calls = []
    real_forward = tower.forward
    monkeypatch.setattr(tower, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    r = api.post(
        f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": "Organ?"}
    )
    assert r.status_code == 201, r.text
    assert calls == [] and (prefixes.misses, prefixes.hits) == (1, 1)
    monkeypatch.undo()
    # and answers as without it
    image = render(api.app.state.store, study["images"][0]["sha256"], api.app.state.settings)
    alone = generate(tiny_lm, [image], ["Organ?"], SamplingParams(max_new_tokens=128))[0]
    assert r.json()["answer"] == alone.text

    # asked again: nothing to compute
    assert api.post(f"{url}/prepare", headers=api.h("radiologist")).status_code == 202
    wait_for(lambda: prefills(api, "cached") == 1, 30, "the second prefill")
    assert prefixes.misses == 1

    with api.app.state.session_factory() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "image.prepare")).all()
        assert [(e.resource_id, e.outcome, e.status_code, e.detail) for e in events] == [
            (study["id"], "ok", 202, {"image": 0, "frame": None, "status": "queued"})
        ] * 2


def test_prepare_refuses_what_it_cannot_prepare(sqlite_api):
    api = sqlite_api
    study = upload_ct(api)
    url = f"/v1/studies/{study['id']}/images"
    assert_error(api.post(f"{url}/0/prepare"), 401)
    assert_error(api.post("/v1/studies/nope/images/0/prepare", headers=api.h()), 404)
    assert_error(api.post(f"{url}/3/prepare", headers=api.h()), 404, "image_not_found")
    assert_error(api.post(f"{url}/0/prepare?frame=-1", headers=api.h()), 422)
    assert_error(api.post(f"{url}/0/prepare?frame=1", headers=api.h()), 422, "bad_frame")
    assert_error(api.post(f"{url}/x/prepare", headers=api.h()), 422)
    with api.app.state.session_factory() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "not_found")).all()
        assert {(r.action, r.resource_id) for r in rows} == {
            ("image.prepare", None),  # "nope" is not an id of this server: not kept
            ("image.prepare", study["id"]),
        }
    assert prefills(api, "done") == 0


def test_a_model_that_shares_no_prompts_by_image_needs_no_preparing(tmp_path, sqlite_url, tiny_lm):
    """Without a prefix cache (a GPU's default) there is nothing to keep: 200, not queued."""
    for api in make_api(tmp_path, sqlite_url, tiny_lm, prefix_cache_mb=0):
        study = upload_ct(api)
        r = api.post(f"/v1/studies/{study['id']}/images/0/prepare", headers=api.h())
        assert r.status_code == 200 and r.json() == {"status": "not_needed"}
        # a frame the image does not have is refused as a question about it would be
        r = api.post(f"/v1/studies/{study['id']}/images/0/prepare?frame=1", headers=api.h())
        assert_error(r, 422, "bad_frame")
        assert api.app.state.engine.prefixes.misses == 0
