"""The remote engine: a gateway (its own database, keys and audit) whose answers come from a
second, real instance of this server over its OpenAI-compatible API."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import httpx
from api_helpers import (
    CT_SMALL,
    assert_error,
    free_port,
    live_server,
    make_api,
    running_process,
    upload_ct,
    wait_for,
)
from PIL import Image
from sqlalchemy import select

from tinyllava_med import __version__
from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.server.app import create_app
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.db.models import AuditEvent, Report
from tinyllava_med.server.routes import openai as openai_routes
from tinyllava_med.server.settings import Settings

QUESTION = "Which organ is shown?"


def sse_events(text: str) -> list[tuple[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], lines["data"]))
    return out


def ready_gateways(tmp_path: Path, tiny_lm, remote_url: str, **settings):
    """This server with `engine=remote` pointed at `remote_url`, each yielded once ready."""
    for api in make_api(
        tmp_path / "gw",
        f"sqlite:///{tmp_path}/gw.db",
        tiny_lm,
        engine="remote",
        remote_url=remote_url,
        **settings,
    ):
        wait_for(lambda api=api: api.get("/readyz").status_code == 200, what="the gateway")
        yield api


def test_gateway_forwards_to_a_second_server(tmp_path, tiny_lm, monkeypatch):
    backend_db = f"sqlite:///{tmp_path}/backend.db"
    upgrade(backend_db)
    backend = create_app(
        Settings(data_dir=tmp_path / "backend", database_url=backend_db), model=tiny_lm
    )
    with live_server(backend) as base:
        admin = {"Authorization": f"Bearer {backend.state.first_admin_key}"}
        key = httpx.post(
            f"{base}/v1/apikeys", json={"role": "pacs", "name": "gateway"}, headers=admin
        ).json()["key"]
        bh = {"Authorization": f"Bearer {key}"}
        direct = httpx.post(
            f"{base}/v1/ask",
            headers=bh,
            files={"file": ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")},
            data={"question": QUESTION, "max_new_tokens": "10"},
        ).json()["report"]

        for api in ready_gateways(tmp_path, tiny_lm, f"{base}/v1", remote_api_key=key):
            assert api.get("/readyz").json()["model"]["device"] == "remote"
            card = api.get("/v1/models", headers=api.h()).json()["data"][0]
            assert card["id"] == direct["model"]
            assert card["tinyllava_med"]["server_version"] == __version__  # was null
            ready = api.get("/readyz").json()["model"]
            assert ready["remote_server_version"] == __version__  # the backend's, said

            study = upload_ct(api)
            r = api.post(
                f"/v1/studies/{study['id']}/questions",
                headers=api.h(),
                json={"question": QUESTION, "max_new_tokens": 10},
            )
            assert r.status_code == 201, r.text
            report = r.json()
            # the backend's model answered (same image, same greedy answer) and is recorded
            assert report["answer"] == direct["answer"]
            assert (report["model"], report["quantization"], report["model_version"]) == (
                direct["model"],
                direct["quantization"],
                direct["model_version"],
            )
            assert report["model_weights"] == direct["model_weights"] is not None
            assert report["tokens"]["completion"] == direct["tokens"]["completion"]

            r = api.post(
                f"/v1/studies/{study['id']}/questions?stream=true",
                headers=api.h(),
                json={"question": QUESTION, "max_new_tokens": 10},
            )
            events = sse_events(r.text)
            tokens = "".join(json.loads(d)["text"] for e, d in events if e == "token")
            assert events[-1][0] == "report" and tokens == direct["answer"]

            # the gateway stored the reports; the backend only audited completions
            with backend.state.session_factory() as s:
                chats = s.scalars(
                    select(AuditEvent).where(AuditEvent.action == "chat.completion")
                ).all()
                assert len(chats) >= 2 and len(s.scalars(select(Report)).all()) == 1
            with api.app.state.session_factory() as s:
                assert len(s.scalars(select(Report)).all()) == 2

            # the backend is restarted with another quantization: the next answer is not
            # recorded under the old card (502, nothing stored: it was, with the old
            # quantization); the one after is recorded as what answers it
            with monkeypatch.context() as m:
                m.setattr(
                    openai_routes,
                    "served_model",
                    lambda engine: {**engine.lm.info, "quantization": "cpu-int8"},
                )
                ask = {"question": QUESTION, "max_new_tokens": 10}
                path = f"/v1/studies/{study['id']}/questions"
                r = api.post(path, headers=api.h(), json=ask)
                assert_error(r, 502, "engine_failed")
                assert "now serves another model" in r.json()["error"]["message"]
                r = api.post(path, headers=api.h(), json=ask)
                assert r.status_code == 201, r.text
                assert r.json()["quantization"] == "cpu-int8"
                assert api.get("/readyz").json()["model"]["quantization"] == "cpu-int8"
            with api.app.state.session_factory() as s:
                assert len(s.scalars(select(Report)).all()) == 3

        # the backend goes away: a clear 502, nothing stored
    for api in make_api(
        tmp_path / "gateway2",
        f"sqlite:///{tmp_path}/gateway2.db",
        tiny_lm,
        engine="remote",
        remote_url=f"{base}/v1",
    ):
        assert api.get("/readyz").status_code == 503  # never reached the remote
        r = api.post(
            "/v1/studies", headers=api.h("pacs"), files={"files": ("ct.dcm", CT_SMALL.read_bytes())}
        )
        study_id = r.json()["id"]
        assert_error(
            api.post(f"/v1/studies/{study_id}/questions", headers=api.h(), json={"question": "q"}),
            503,
            "model_not_ready",
        )


def test_a_remote_that_fails_mid_service_gives_502(tmp_path, tiny_lm):
    backend_db = f"sqlite:///{tmp_path}/backend.db"
    upgrade(backend_db)
    backend = create_app(
        Settings(data_dir=tmp_path / "backend", database_url=backend_db, auth_disabled=True),
        model=tiny_lm,
    )
    with live_server(backend) as base:
        for api in ready_gateways(tmp_path, tiny_lm, f"{base}/v1"):
            study = upload_ct(api)
            # a question longer than the backend accepts: its 4xx comes back as a 502
            backend.state.settings.max_question_chars = 5
            r = api.post(
                f"/v1/studies/{study['id']}/questions",
                headers=api.h(),
                json={"question": "What is the modality?"},
            )
            assert_error(r, 502, "engine_failed")
            assert r.json()["error"]["message"].startswith("remote engine answered 422")
            with api.app.state.session_factory() as s:
                assert s.scalars(select(Report)).all() == []


def test_an_answer_the_remote_did_not_finish_is_not_stored(tmp_path, tiny_lm):
    """A remote whose stream ends without a finish reason or [DONE] (it crashed behind a
    proxy, a proxy's read timeout), or that ends an answer for another reason than stop or
    length (content_filter): 502, nothing stored. Before, the half sentence was stored as a
    complete answer (finish_reason "stop")."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    remote = FastAPI()
    ending = {"reason": "stop"}  # the gateway's readiness probe is answered

    @remote.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @remote.post("/v1/chat/completions")
    def chat() -> StreamingResponse:
        def events():
            for text in ("No fracture.", " There is a 3"):
                chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if ending["reason"]:
                last = {"choices": [{"index": 0, "delta": {}, "finish_reason": ending["reason"]}]}
                yield f"data: {json.dumps(last)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    with live_server(remote, ready_path="/v1/models") as base:
        for api in ready_gateways(tmp_path, tiny_lm, f"{base}/v1"):
            study = upload_ct(api)
            for reason, says in ((None, "ended before it finished"), ("content_filter", "")):
                ending["reason"] = reason
                r = api.post(
                    f"/v1/studies/{study['id']}/questions",
                    headers=api.h(),
                    json={"question": QUESTION},
                )
                assert_error(r, 502, "engine_failed")
                assert says in r.json()["error"]["message"]
            ending["reason"] = "stop"  # the same stream, finished: stored
            r = api.post(
                f"/v1/studies/{study['id']}/questions", headers=api.h(), json={"question": QUESTION}
            )
            assert r.status_code == 201 and r.json()["answer"] == "No fracture. There is a 3"
            with api.app.state.session_factory() as s:
                assert len(s.scalars(select(Report)).all()) == 1


def test_gateway_forwards_to_transformers_serve(tmp_path, tiny_model_dir, tiny_lm):
    """A third-party OpenAI-compatible server: Hugging Face's `transformers serve`, pinned to the
    tiny served-format checkpoint (it applies the checkpoint's own chat template). Its answer
    equals this server's local answer for the same image and question."""
    exe = Path(sys.executable).with_name("transformers")
    port = free_port()
    cmd = [str(exe), "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port)]
    with running_process(
        [*cmd, "--device", "cpu"],
        tmp_path / "tfserve.log",
        f"http://127.0.0.1:{port}/health",
        what="transformers serve",
        timeout_s=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ):
        image = Image.new("L", (48, 40), 90)
        local = generate(tiny_lm, [image], [QUESTION], SamplingParams(max_new_tokens=8))[0]
        for api in ready_gateways(tmp_path, tiny_lm, f"http://127.0.0.1:{port}/v1"):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            r = api.post(
                "/v1/ask",
                headers=api.h(),
                files={"file": ("x.png", buf.getvalue())},
                data={"question": QUESTION, "max_new_tokens": "8"},
            )
            assert r.status_code == 201, r.text
            report = r.json()["report"]
            assert report["model"] == str(tiny_model_dir) and report["quantization"] == "remote"
            assert report["answer"] == local.text
            assert report["tokens"]["completion"] == local.new_tokens


def test_the_remote_url_is_shown_without_its_password():
    """`/readyz` (no key needed) and the log show the remote's URL: not a password in it."""
    from tinyllava_med.server.remote_engine import RemoteModel

    remote = RemoteModel("http://gw:s3cret@10.0.0.7:8000/v1", "tiny", {})
    assert remote.info["remote_url"] == "http://gw:***@10.0.0.7:8000/v1"
    assert "s3cret" not in str(remote.info)
