"""The Gradio demo at `/demo`, driven by `gradio_client` against the real app (tiny model, SQLite)
under uvicorn on 127.0.0.1 in a thread: the answer equals the REST API's for the same file and
question, a bad key gets a message and no answer, a broken file gets the imaging error's
message, every question is audited as `demo.ask`, and without `gradio=True` there is no `/demo`.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_web_client as web
from api_helpers import live_server
from gradio_client import Client, handle_file
from PIL import Image
from pydicom.data import get_testdata_file

from tinyllava_med.imaging import ImagingError, load_study_file
from tinyllava_med.server.app import create_app
from tinyllava_med.server.auth import ANONYMOUS
from tinyllava_med.server.db import crud
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.gradio_demo import model_label
from tinyllava_med.server.settings import Settings

CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
QUESTION = "Which organ is shown?"
MAX_NEW_TOKENS = 12
BAD_KEY = "tlm_deadbeef_" + "x" * 43


@dataclass
class Live:
    app: Any
    base: str
    pacs_key: str
    client: Client

    def ask(self, path: Path, *, key: str | None = None, question: str = QUESTION) -> Any:
        """One demo question: `(preview, answer, status)` and every streamed update."""
        job = self.client.submit(
            self.pacs_key if key is None else key,
            handle_file(str(path)),
            question,
            model_label(self.app.state.engine.lm.info),
            MAX_NEW_TOKENS,
            0.0,
            1.0,
            api_name="/ask",
        )
        final = job.result(timeout=60)
        return final, job.outputs()

    def rest_answer(self, path: Path) -> str:
        r = httpx.post(
            f"{self.base}/v1/ask",
            headers={"Authorization": f"Bearer {self.pacs_key}"},
            files={"file": (path.name, path.read_bytes())},
            data={"question": QUESTION, "max_new_tokens": str(MAX_NEW_TOKENS)},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        return str(r.json()["report"]["answer"])

    def demo_audit(self) -> list[Any]:
        with self.app.state.session_factory() as s:
            return crud.list_audit_events(s, action="demo.ask")


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_lm) -> Iterator[Live]:
    """`serve --gradio` with the tiny model; the lifespan (and so Gradio's queue) runs in
    uvicorn's loop, which is why this is not `make_api`'s TestClient (its lifespan runs in
    the TestClient's own loop)."""
    tmp = tmp_path_factory.mktemp("gradio-demo")
    url = f"sqlite:///{tmp}/demo.db"
    upgrade(url)
    settings = Settings(
        data_dir=tmp / "data",
        database_url=url,
        model="tiny",
        batch_window_ms=5,
        gradio=True,
        prefix_cache_mb=64,  # off by default for so small a tower
    )
    app = create_app(settings, model=tiny_lm)
    with live_server(app, ready_path=None, name="gradio-demo-server") as base:
        r = httpx.post(
            f"{base}/v1/apikeys",
            json={"role": "pacs", "name": "demo test"},
            headers={"Authorization": f"Bearer {app.state.first_admin_key}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        client = Client(
            f"{base}/demo/",
            verbose=False,
            download_files=str(tmp / "downloads"),
            headers={"Authorization": f"Bearer {key}"},  # for the upload route
        )
        yield Live(app, base, key, client)


def _png(tmp: Path) -> Path:
    path = tmp / "gradient.png"
    img = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_demo_answers_like_the_rest_api_and_audits(live, tmp_path):
    png = _png(tmp_path)
    for path in (CT_SMALL, png):
        (preview, answer, status), updates = live.ask(path)
        assert answer == live.rest_answer(path), f"demo and REST differ for {path.name}"
        assert answer, "the tiny model answers something"
        assert "Not stored" in status and str(MAX_NEW_TOKENS) in status
        seen = load_study_file(path.read_bytes()).image  # what the model saw, shown back
        assert Image.open(preview).size == Image.open(updates[0][0]).size == seen.size
        # the demo's own preview file is gone once Gradio has cached it
        assert not list(Path(tempfile.gettempdir()).glob("tinyllava-med-demo-*"))
        streamed = [u[1] for u in updates if u[1] and u[2] == "Generating..."]
        assert len(streamed) >= 2, "the answer streams in token by token"
        assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:], strict=False))

    rows = [e for e in live.demo_audit() if e.outcome == "ok"]
    assert [r.detail["file_kind"] for r in rows] == ["png", "dicom"]  # newest first
    pacs_key_prefix = live.pacs_key[4:12]
    for r in rows:
        assert r.action == "demo.ask" and r.resource_type == "demo" and r.status_code == 200
        assert r.actor != ANONYMOUS and r.actor not in live.pacs_key  # the key's id, not the key
        assert r.detail["model"] == live.app.state.engine.lm.info["model"]
        assert r.detail["completion_tokens"] > 0
        flat = str(r.detail)
        assert QUESTION not in flat and CT_SMALL.name not in flat and pacs_key_prefix not in flat
    # The REST calls stored reports; the demo stored none.
    with live.app.state.session_factory() as s:
        assert len(crud.list_reports(s)) == 2
    # The server's request metrics see the demo as one route, not Gradio's internal ones.
    metrics = httpx.get(f"{live.base}/metrics", timeout=30).text
    assert 'route="/demo"' in metrics and "gradio_api" not in metrics
    # the same file again (a follow-up): its pixel values and prompt prefix are reused
    prefixes = live.app.state.engine.prefixes
    hits = prefixes.hits
    (_, again, _), _ = live.ask(png)
    assert again == answer and prefixes.hits == hits + 1


def test_a_chosen_file_is_prepared_before_the_question(live, tmp_path):
    """Choosing a file (Gradio's upload event, `/prepare`) has the model compute its prompt up
    to the image while idle: the first question about it reuses that, and answers as the REST
    API does. Without a key nothing is prepared."""
    path = tmp_path / "other.png"
    Image.linear_gradient("L").rotate(90).resize((40, 56)).convert("RGB").save(path)
    label = model_label(live.app.state.engine.lm.info)
    prefixes = live.app.state.engine.prefixes
    misses = prefixes.misses
    live.client.predict("", handle_file(str(path)), label, api_name="/prepare")
    assert prefixes.misses == misses  # no key: nothing done, nothing audited
    live.client.predict(live.pacs_key, handle_file(str(path)), label, api_name="/prepare")
    deadline = time.monotonic() + 30
    while prefixes.misses == misses:  # the engine prepares it in its own thread
        assert time.monotonic() < deadline, "the chosen file was not prepared"
        time.sleep(0.05)
    hits = prefixes.hits
    (_, answer, _), _ = live.ask(path)
    assert (prefixes.misses, prefixes.hits) == (misses + 1, hits + 1)
    assert answer == live.rest_answer(path)
    with live.app.state.session_factory() as s:
        [event] = crud.list_audit_events(s, action="demo.prepare")
    assert (event.outcome, event.status_code, event.detail) == ("ok", 202, {"file_kind": "png"})
    assert event.actor != ANONYMOUS


@pytest.mark.parametrize(("key", "reason"), [(BAD_KEY, "Invalid"), ("", "Missing")])
def test_demo_needs_a_valid_key(live, key, reason):
    page = httpx.get(f"{live.base}/demo/", timeout=30)  # asks for a key: framed by no site
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    before = len(live.demo_audit())
    (preview, answer, status), _ = live.ask(CT_SMALL, key=key)
    assert preview is None and answer == ""
    assert status.startswith(f"{reason} API key") and "question.ask" in status
    events = live.demo_audit()
    assert len(events) == before + 1
    denied = events[0]
    assert (denied.actor, denied.outcome, denied.status_code) == (ANONYMOUS, "denied", 401)


def test_demo_shows_the_imaging_error(live, tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" + b"\x00\x17garbage" * 20)
    with pytest.raises(ImagingError) as raised:
        load_study_file(broken.read_bytes())
    (preview, answer, status), _ = live.ask(broken)
    assert preview is None and answer == ""
    assert status == raised.value.message
    assert "Traceback" not in status
    event = live.demo_audit()[0]
    assert (event.outcome, event.detail["code"]) == ("invalid", raised.value.code)


def test_no_demo_unless_asked(sqlite_api, tmp_path):
    """`sqlite_api` is conftest's `make_api(...)` with the default settings (`gradio=False`)."""
    assert sqlite_api.get("/demo/").status_code == 404
    assert sqlite_api.get("/demo").status_code == 404
    # ... and the server does not even import Gradio then.
    code = (
        "import sys; from tinyllava_med.server.app import create_app; "
        "create_app(); assert 'gradio' not in sys.modules, 'gradio was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr


def test_serve_flag_and_environment(monkeypatch):
    from tinyllava_med.cli import _server_settings, build_parser

    parse = build_parser().parse_args
    assert _server_settings(parse(["serve", "--gradio"])).gradio is True
    assert _server_settings(parse(["serve"])).gradio is False
    monkeypatch.setenv("TINYLLAVA_MED_GRADIO", "true")  # no flag: the environment decides
    assert _server_settings(parse(["serve"])).gradio is True


def test_uploads_need_a_key_and_are_budgeted_per_address(live):
    """Gradio's upload route takes files as they are chosen, before any question: anyone could
    fill the data volume through it, 130 MB/s, each file kept 30 minutes. It now needs a key
    with `question.ask` (the page's cookie, or a header as for the REST API), refusals audited
    as the REST API's are, and a key's address has a budget per 30 minutes; beyond it, 429.
    Each refusal leaves the file unread."""
    from starlette.routing import Mount

    from tinyllava_med.server.gradio_demo import KEY_COOKIE, UploadBudget

    url = f"{live.base}/demo/gradio_api/upload"

    def upload(size: int, **kwargs: Any) -> httpx.Response:
        return httpx.post(url, files={"files": ("a.dcm", b"x" * size)}, timeout=30, **kwargs)

    def refusals() -> list[Any]:
        with live.app.state.session_factory() as s:
            return crud.list_audit_events(s, action="auth.authenticate")

    before = len(refusals())
    keyless = upload(10)
    assert keyless.status_code == 401
    assert keyless.json()["error"]["code"] == "unauthorized"
    assert "enter an API key" in keyless.json()["error"]["message"]
    assert upload(10, cookies={KEY_COOKIE: BAD_KEY}).status_code == 401
    assert upload(10, headers={"X-API-Key": BAD_KEY}).status_code == 401
    events = refusals()
    assert len(events) == before + 3
    assert {e.detail["reason"] for e in events[:3]} == {"missing API key", "invalid API key"}
    assert upload(10, cookies={KEY_COOKIE: live.pacs_key}).status_code == 200
    assert upload(10, headers={"Authorization": f"Bearer {live.pacs_key}"}).status_code == 200

    # Gradio's other ways in for a file: routes the demo does not use, files in a call's body,
    # a file named by URL (Gradio would download it into its cache before any handler ran)
    api = f"{live.base}/demo/gradio_api"
    for route in ("process_recording", "component_server", "component_server/"):
        r = httpx.post(f"{api}/{route}", files={"files": ("v.mp4", b"x" * 1000)}, timeout=30)
        assert r.status_code == 404, (route, r.status_code)
    r = httpx.post(f"{api}/run/ask", files={"files": ("a.dcm", b"x" * 1000)}, timeout=30)
    assert r.status_code == 415
    # named by URL (Gradio would download it) or by a path outside its upload folder (Gradio
    # would copy it into its cache; mounted, it skips its allowed-paths check): the server's
    # own files, with no key
    outside = Path(tempfile.mkdtemp()) / "gradient.png"
    outside.write_bytes(_png(outside.parent).read_bytes())
    for path in ("https://example.org/a.dcm", str(outside), "/tmp/gradio/../../etc/hostname"):
        named = {"path": path, "meta": {"_type": "gradio.FileData"}}
        call = {"data": [BAD_KEY, named, QUESTION], "fn_index": 0, "session_hash": "x1"}
        for route in ("queue/join", "run/ask", "call/ask"):
            r = httpx.post(f"{api}/{route}", json=call, timeout=30)
            assert r.status_code == 422, (path, route, r.status_code)
            assert "by URL or path" in r.json()["error"]["message"]
    r = httpx.post(f"{api}/queue/join", content=b"{" + b" " * (1 << 20) + b"}", timeout=30)
    assert r.status_code == 413

    [mount] = [r for r in live.app.router.routes if isinstance(r, Mount) and r.path == "/demo"]
    budget = mount.app.uploads
    mount.app.uploads = UploadBudget(1000, 1800)
    try:
        first = upload(300, cookies={KEY_COOKIE: live.pacs_key})
        assert first.status_code == 200, first.text
        refused = upload(900, cookies={KEY_COOKIE: live.pacs_key})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "600"
        assert refused.json()["error"]["code"] == "too_many_uploads"
    finally:
        mount.app.uploads = budget

    clock = [0.0]
    window = UploadBudget(100, 60, clock=lambda: clock[0])
    assert window.take("a", 60) and not window.take("a", 60) and window.take("b", 60)
    clock[0] = 61  # a new window
    assert window.take("a", 100)
    # an IPv6 host has a /64: its addresses share one budget
    assert window.take("2001:db8::1", 60) and not window.take("2001:db8::2", 60)
    # many addresses fill the table: a new one takes the place of one whose window ended,
    # else it waits; none starts over
    window.MAX_ADDRESSES = 3
    assert window.take("c", 1)  # b's window (from 0) ended
    assert not window.take("d", 1) and not window.take("a", 1)  # full; a's budget spent
    clock[0] = 200  # their windows ended
    assert window.take("d", 1)


browser, page = web.browser, web.page  # Chromium fixtures: one for the module, a tab per test


def test_the_page_uploads_with_the_typed_key_and_answers_in_a_browser(live, page, tmp_path):
    """Real Chromium on the Gradio page: a file chosen before any key is refused (401, the
    upload route's key check), and after the key is typed, choosing it uploads (the page keeps
    the key in its cookie) and asking answers as the REST API does; after a reload the key is
    forgotten."""
    from playwright.sync_api import expect

    png = tmp_path / "page.png"
    Image.linear_gradient("L").resize((40, 30)).convert("RGB").save(png)
    uploads: list[int] = []
    page.on(
        "response",
        lambda r: uploads.append(r.status) if r.url.split("?")[0].endswith("/upload") else None,
    )
    page.goto(f"{live.base}/demo/")
    chooser = page.locator("input[type=file]")
    chooser.set_input_files(str(png))

    def upload_status(n: int) -> int:
        """The status of the page's `n`th upload, once it is sent."""
        deadline = time.monotonic() + 20
        while len(uploads) < n:
            assert time.monotonic() < deadline, f"the page sent no upload {n}"
            page.wait_for_timeout(100)
        return uploads[n - 1]

    assert upload_status(1) == 401
    page.reload()
    page.get_by_label("API key").fill(live.pacs_key)
    page.get_by_label("Question").fill(QUESTION)
    page.locator("input[type=file]").set_input_files(str(png))
    assert upload_status(2) == 200
    page.get_by_role("button", name="Ask").click()
    expect(page.get_by_label("Status")).to_have_value(re.compile("tokens in"), timeout=30_000)
    r = httpx.post(  # the same file and question with the page's default parameters
        f"{live.base}/v1/ask",
        headers={"Authorization": f"Bearer {live.pacs_key}"},
        files={"file": (png.name, png.read_bytes())},
        data={"question": QUESTION},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    assert page.get_by_label("Answer").input_value() == r.json()["report"]["answer"]
    # a reloaded page has an empty key box, and forgets the key: a shared workstation's next
    # user does not upload with it
    page.reload()
    page.locator("input[type=file]").set_input_files(str(png))
    assert upload_status(3) == 401
