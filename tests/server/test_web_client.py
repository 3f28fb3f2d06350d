"""The radiologist web client, driven in real headless Chromium (Playwright, sync API).

The real app (tiny model, SQLite) runs under uvicorn on 127.0.0.1 in a thread; Chromium is
Debian's `/usr/bin/chromium` (`.ci/run` installs it; `playwright install` is never used). Each
view is saved as a screenshot to the test's tmp folder; with `TINYLLAVA_MED_DOCS_SCREENSHOTS=1`
also to `docs/screenshots/web-*.png` (the README shows them), so a plain run changes no file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from api_helpers import (
    MR_SMALL,
    ct_of_new_study,
    ct_with,
    free_port,
    live_server,
    make_old,
    wait_for,
)
from PIL import Image as PILImage
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from tinyllava_med.server.app import create_app
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.db.models import AuditEvent
from tinyllava_med.server.settings import Settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
T = 20_000  # ms: generous on 2 shared cores; the happy path takes well under a second per step


class LiveServer:
    def __init__(self, app: Any, base: str) -> None:
        self.app = app
        self.base = base
        self.key = app.state.first_admin_key

    def get(self, path: str) -> httpx.Response:
        return httpx.get(
            self.base + path, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )


@contextmanager
def _serve(tmp: Path, lm: Any, **overrides: Any) -> Iterator[LiveServer]:
    url = f"sqlite:///{tmp}/web.db"
    upgrade(url)
    settings = Settings(
        data_dir=tmp / "data",
        database_url=url,
        model="tiny" if lm is not None else "no-such-model",  # None: loading fails
        **{"batch_window_ms": 5, "default_max_new_tokens": 24, **overrides},
    )
    app = create_app(settings, model=lm)
    # ready_path None: with lm None the model never loads, and that page is under test too
    with live_server(app, ready_path=None, name="web-client-server") as base:
        yield LiveServer(app, base)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, tiny_lm) -> Iterator[LiveServer]:
    """The tiny model under the demo model's name, as `tinyllava-med serve` runs by default.
    For the README's screenshots, the real demo model (built by `make demo-model`), so they show
    its answers rather than the random tiny model's."""
    lm = dataclasses.replace(tiny_lm, name="demo", variant="demo")
    if os.environ.get("TINYLLAVA_MED_DOCS_SCREENSHOTS"):
        from tinyllava_med.model.load import load_model

        lm = load_model("demo", device="cpu")
    with _serve(tmp_path_factory.mktemp("web-demo"), lm) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    """One Chromium (fresh profile) for the module; each test opens its own tab."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: the web client tests need it (they do not "
            "skip). `.ci/run` installs it: apt-get install -y chromium"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]' (.ci/run does)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 820},
            device_scale_factor=1,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A new tab (its own sessionStorage: signed out) that records script errors."""
    tab = browser.new_page()
    tab.set_default_timeout(T)
    problems: list[str] = []
    tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    tab.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    tab.problems = problems  # type: ignore[attr-defined]
    yield tab
    tab.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _shot(page: Any, shots: Path, name: str, *, full_page: bool = False) -> None:
    """The view as a PNG in the tmp folder, and a palette copy (< 200 KB) for the README."""
    from PIL import Image

    path = shots / f"web-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    if not os.environ.get("TINYLLAVA_MED_DOCS_SCREENSHOTS"):
        return
    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    rgb = Image.open(path).convert("RGB")
    for colours in (256, 160, 96):  # a noisy image needs fewer colours to stay small
        rgb.quantize(colours, dither=Image.Dither.NONE).save(DOCS_SHOTS / path.name, optimize=True)
        size = (DOCS_SHOTS / path.name).stat().st_size
        if size < 200_000:
            break
    assert size < 200_000, f"{path.name} is {size} bytes; README screenshots stay under 200 KB"


def _sign_in(page: Any, server: LiveServer, key: str | None = None) -> None:
    from playwright.sync_api import expect

    page.goto(server.base + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill(key or server.key)
    page.get_by_role("button", name="Sign in", exact=True).click()


def _colleagues_key(server: LiveServer) -> str:
    """A radiologist key of another reader, Dr B."""
    r = httpx.post(
        f"{server.base}/v1/apikeys",
        headers={"Authorization": f"Bearer {server.key}"},
        json={"role": "radiologist", "name": "Dr B"},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def _errors_from_4xx_are_expected(problems: list[str]) -> list[str]:
    # Chromium logs every failed fetch ("Failed to load resource: ... 415"): those are the
    # errors the test provokes on purpose. Anything else (CSP violations, exceptions) is not.
    return [p for p in problems if "Failed to load resource" not in p]


def test_radiologist_reads_asks_edits_and_signs(page, demo_server, shots):
    from playwright.sync_api import expect

    server = demo_server
    page.goto(server.base + "/")
    expect(page.locator("#demo-warning")).to_be_visible()
    expect(page.locator("#demo-warning")).to_contain_text("not for clinical use")
    _shot(page, shots, "signin")

    # Sign in: the key is kept in sessionStorage only.
    _sign_in(page, server)
    expect(page.get_by_role("heading", name="Worklist")).to_be_focused()
    assert page.evaluate("sessionStorage.getItem('tinyllava_med.api_key')") == server.key
    assert page.evaluate("localStorage.length") == 0

    # Upload CT_small.dcm: it appears in the worklist with no report yet.
    page.get_by_label("Upload a study").set_input_files(str(CT_SMALL))
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator("#upload-status")).to_contain_text("Uploaded: CT")
    rows = page.locator("#worklist-body tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".badge")).to_have_text("None")
    # the same file again is the study held (DICOM is filed by its study's UID), not a second
    page.get_by_label("Upload a study").set_input_files(str(CT_SMALL))
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator("#upload-status")).to_contain_text("Already on the server: CT")
    expect(rows).to_have_count(1)
    page.get_by_label("Modality").select_option("MR")
    expect(rows).to_have_count(0)
    expect(page.locator("#worklist-empty")).to_be_visible()
    page.get_by_label("Modality").select_option("CT")
    expect(rows).to_have_count(1)
    _shot(page, shots, "worklist")

    # Open the study: the image is a blob: URL fetched with the key.
    rows.first.get_by_role("link").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("CT")
    image = page.locator("#study-image")
    expect(image).to_have_attribute("src", _starts_with("blob:"))
    expect(page.locator("#window-field")).to_be_visible()
    expect(page.locator("#frame-field")).to_be_hidden()  # one frame
    before = image.get_attribute("src")
    page.locator("label[for='window-lung']").click()
    expect(page.get_by_role("radio", name="Lung")).to_be_checked()
    expect(image).to_have_attribute("data-window", "lung")
    expect(image).to_have_attribute("alt", _contains("lung window"))
    assert image.get_attribute("src") != before
    assert image.evaluate("img => img.naturalWidth") > 0

    # Ask: the answer streams into its box, is announced whole, and the stored report shows up.
    page.evaluate(
        """() => {
            const out = document.getElementById('answer-stream');
            window.__seen = [];
            new MutationObserver(() => window.__seen.push([out.dataset.state,
                out.textContent.length])).observe(out, {childList: true, subtree: true,
                characterData: true});
        }"""
    )
    page.get_by_label("Question about the shown image").fill("Is there a nodule in the left lung?")
    page.get_by_role("button", name="Ask", exact=True).click()
    history = page.locator("#history .history-item")
    expect(history).to_have_count(1)
    expect(page.locator("#ask-status")).to_have_text("Answer stored as a draft report.")
    seen = page.evaluate("window.__seen")
    assert any(state == "streaming" and n > 0 for state, n in seen), seen
    streamed = page.locator("#answer-stream").inner_text()
    assert streamed.strip(), "the tiny model's answer is empty"
    expect(page.locator("#answer-announce")).to_have_text(f"Answer: {streamed.strip()}")
    expect(history.first.locator(".badge")).to_have_text("Draft")
    report_id = history.first.get_attribute("data-report-id")
    stored = server.get(f"/v1/reports/{report_id}").json()
    assert stored["answer"].strip() == streamed.strip()
    # the image was announced to the model once: a new window is the same image to it
    assert _prepared(server) == [{"image": 0, "frame": None}]
    assert stored["model"] == "demo"
    expect(page.locator("#model-answer")).to_have_text(stored["answer"])
    _shot(page, shots, "study", full_page=True)

    # Keyboard: the window presets are one radio group (arrow keys move the choice).
    page.get_by_role("radio", name="Lung").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("radio", name="Bone")).to_be_checked()
    expect(image).to_have_attribute("data-window", "bone")
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(c => !(c.labels && c.labels.length) && !c.getAttribute('aria-label')
                    && !c.textContent.trim())
            .map(c => c.id || c.outerHTML)"""
    )
    assert unlabeled == [], unlabeled

    # Edit and save the draft: the model's answer stays beside the edited text. Pasted from a
    # word processor, its line break is a vertical tab and a stray control character came
    # along: the field sends (and then shows) a line break and drops the other, which the
    # server would refuse.
    edited = "No nodule seen.\nLungs clear. (edited by the radiologist)"
    pasted = "No nodule seen.\vLungs clear.\x07 (edited by the radiologist)"
    page.get_by_label("Report text (draft)").fill(pasted)
    expect(page.locator("#report-status")).to_have_text("Unsaved changes")
    page.get_by_role("button", name="Save draft").click()
    expect(page.locator("#report-status")).to_have_text("Draft saved.")
    expect(page.get_by_label("Report text (draft)")).to_have_value(edited)
    saved = server.get(f"/v1/reports/{report_id}").json()
    assert (saved["text"], saved["status"], saved["answer"]) == (edited, "draft", stored["answer"])

    # Sign, with a confirmation dialog; Cancel first, then confirm.
    page.get_by_role("button", name="Sign report…").click()
    dialog = page.get_by_role("dialog", name="Sign this report?")
    expect(dialog).to_be_visible()
    _shot(page, shots, "sign-dialog")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    assert server.get(f"/v1/reports/{report_id}").json()["status"] == "draft"
    page.get_by_role("button", name="Sign report…").click()
    dialog.get_by_role("button", name="Sign report", exact=True).click()
    expect(page.locator("#report-final")).to_be_visible()
    expect(page.locator("#report-final-text")).to_have_text(edited)
    expect(page.locator("#report-signed-by")).to_contain_text("by first admin")  # key's name
    expect(page.locator("#report-edit")).to_be_hidden()
    signed = server.get(f"/v1/reports/{report_id}").json()
    assert signed["status"] == "final" and signed["signed_by"] and signed["signed_at"]

    # Reload: still signed in (sessionStorage), the report is shown signed and read-only.
    page.reload()
    expect(page.locator("#report-badge")).to_have_text("Final")
    expect(page.locator("#report-final-text")).to_have_text(edited)
    assert signed["signed_by_name"] == "first admin"
    expect(page.locator("#report-signed-by")).to_contain_text(signed["signed_by_name"])
    expect(page.locator("#model-answer")).to_have_text(stored["answer"])
    expect(page.get_by_label("Report text (draft)")).to_be_hidden()
    expect(page.locator("#history .history-item .badge")).to_have_text(["Final"])
    _shot(page, shots, "report-signed", full_page=True)

    # Back in the worklist the study reads "Signed"; signing out forgets the key.
    page.get_by_role("link", name="← Worklist").click()
    expect(page.locator("#worklist-body tr .badge")).to_have_text(["Signed"])
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('tinyllava_med.api_key')") is None
    assert page.problems == [], page.problems  # no script errors, no CSP violations


def _as_study_of_mr_small(path: Any) -> bytes:
    """The file, filed under MR_small's study and patient (an upload is one study's files)."""
    import pydicom

    ds, mr = pydicom.dcmread(path), pydicom.dcmread(MR_SMALL)
    for name in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate"):
        setattr(ds, name, mr.get(name, ""))
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _ct_with_report(server: LiveServer, **ask: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """CT_small, as a new study, uploaded and asked about through the API (admin key; `ask`:
    more of the question's fields): (study, report)."""
    auth = {"Authorization": f"Bearer {server.key}"}
    study = httpx.post(
        server.base + "/v1/studies",
        headers=auth,
        files=[("files", ("ct.dcm", ct_of_new_study()))],
        timeout=30,
    ).json()
    return study, _ask(server, study["id"], **{"question": "Any fracture?", **ask})


def _ask(server: LiveServer, study_id: str, **body: Any) -> dict[str, Any]:
    """A question about a study, through the API (admin key): the stored report."""
    return httpx.post(
        f"{server.base}/v1/studies/{study_id}/questions",
        headers={"Authorization": f"Bearer {server.key}"},
        json=body,
        timeout=60,
    ).json()


def test_radiologist_amends_a_signed_report_with_a_reason(page, tmp_path, tiny_lm, shots):
    """A signed report is read-only but can be amended: the dialog asks for the corrected text
    and a reason (it does not close without one), and the report then reads "Amended"."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        auth = {"Authorization": f"Bearer {server.key}"}
        study, report = _ct_with_report(server)
        path = f"/v1/reports/{report['id']}"
        signed = httpx.patch(
            server.base + path, headers=auth, json={"text": "No fracture.", "status": "final"}
        )
        assert signed.status_code == 200, signed.text

        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        page.locator("#history button.history-item").first.click()
        expect(page.locator("#report-badge")).to_have_text("Final")
        expect(page.locator("#report-versions")).to_be_hidden()  # signed once: nothing earlier
        page.get_by_role("button", name="Amend report…").click()
        dialog = page.get_by_role("dialog", name="Amend this signed report")
        expect(dialog).to_be_visible()
        expect(dialog.get_by_label("Corrected report text")).to_have_value("No fracture.")
        dialog.get_by_label("Corrected report text").fill("Hairline fracture of the 5th rib.")
        dialog.get_by_role("button", name="Sign amendment").click()
        expect(dialog).to_be_visible()  # no reason: the form does not submit
        assert server.get(path).json()["status"] == "final"
        # blanks are no reason either: the dialog stays open with what was typed (the server,
        # which would refuse them with 422, is not asked)
        dialog.get_by_label("Reason for the amendment").fill("   ")
        dialog.get_by_role("button", name="Sign amendment").click()
        expect(dialog).to_be_visible()
        expect(dialog.get_by_label("Corrected report text")).to_have_value(
            "Hairline fracture of the 5th rib."
        )
        assert server.get(path).json()["status"] == "final"
        dialog.get_by_label("Reason for the amendment").fill("missed on first read")
        _shot(page, shots, "amend-dialog")
        dialog.get_by_role("button", name="Sign amendment").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#report-badge")).to_have_text("Amended")
        expect(page.locator("#report-final-text")).to_have_text("Hairline fracture of the 5th rib.")
        expect(page.locator("#report-signed-by")).to_contain_text("Amended and signed")
        expect(page.locator("#history .history-item .badge")).to_have_text(["Amended"])
        # the signed text it replaced, and why, under "Earlier signed versions"
        versions = page.locator("#report-versions")
        expect(versions.locator("summary")).to_have_text("Earlier signed versions (1)")
        versions.locator("summary").click()
        expect(versions.locator("li")).to_have_count(1)
        expect(versions.locator("li")).to_contain_text("reason: missed on first read")
        expect(versions.locator("li .version-text")).to_have_text("No fracture.")
        _shot(page, shots, "report-amended", full_page=True)
        amended = server.get(path).json()
        assert (amended["status"], amended["text"]) == (
            "amended",
            "Hairline fracture of the 5th rib.",
        )
        reasons = [e["reason"] for e in server.get(f"{path}/history").json()["data"]]
        assert reasons == [None, "missed on first read"]

        # printed: the browser's dialog opens on a sheet with the signed report alone
        page.evaluate(  # a function here is called by evaluate: it installs the stand-in
            "() => { window.print = () => { window.printed = (window.printed || 0) + 1; }; }"
        )
        page.get_by_role("button", name="Print report").click()
        assert page.evaluate("window.printed") == 1
        sheet = page.locator("#print-sheet")
        expect(sheet).to_be_hidden()  # on screen
        page.emulate_media(media="print")
        expect(sheet).to_be_visible()
        expect(page.locator("#main")).to_be_hidden()
        expect(sheet.locator("#print-text")).to_have_text("Hairline fracture of the 5th rib.")
        expect(sheet).to_contain_text("Report (amended)")
        expect(sheet).to_contain_text("Amended and signed by first admin")
        expect(sheet.locator("#print-fields")).to_contain_text("reason: missed on first read")
        expect(sheet).to_contain_text("Any fracture?")
        expect(sheet).to_contain_text("CT study")
        expect(sheet).to_contain_text(study["StudyInstanceUID"])  # no patient name: the UID
        expect(sheet).to_contain_text(f"weights {report['model_weights'][:23]})")  # which model
        _shot(page, shots, "report-print")
        page.emulate_media(media="screen")
        # the sheet belongs to the report shown: the worklist prints as itself, not this report
        page.locator("#back-to-worklist").click()
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page.locator("#worklist-body tr .badge")).to_have_text(["Signed"])  # amended too
        page.emulate_media(media="print")
        expect(sheet).to_be_hidden()
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.emulate_media(media="screen")
        # printed before the report's history has come: the sheet waits for it, and says why
        # the text was amended (it printed without it)
        held: list[Any] = []
        page.route("**/history", lambda route: held.append(route))
        page.goto(f"{server.base}/#/study/{study['id']}")
        page.locator("#history button.history-item").first.click()
        page.get_by_role("button", name="Print report").click()
        deadline = time.monotonic() + 20
        while len(held) < 2:  # the report view's read, and the printout's
            assert time.monotonic() < deadline, "the history was not read before printing"
            page.wait_for_timeout(50)
        assert page.evaluate("window.printed") == 1  # not yet
        for route in held:
            route.continue_()
        page.unroute("**/history")
        while page.evaluate("window.printed") != 2:  # (the page's CSP allows no eval)
            assert time.monotonic() < deadline, "not printed once the history came"
            page.wait_for_timeout(50)
        expect(sheet.locator("#print-fields")).to_contain_text("reason: missed on first read")
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_a_cancelled_amendment_is_kept_until_the_reader_discards_it(page, tmp_path, tiny_lm):
    """Escape or Cancel in the amendment dialog signs nothing but keeps what was typed: Amend
    opens with it again, and leaving the study asks first (declined: it stays; accepted: it
    is gone, and Amend starts again from the signed text)."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, report = _ct_with_report(server)
        path = f"/v1/reports/{report['id']}"
        signed = httpx.patch(
            server.base + path,
            headers={"Authorization": f"Bearer {server.key}"},
            json={"text": "No fracture.", "status": "final"},
        )
        assert signed.status_code == 200, signed.text
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        page.locator("#history button.history-item").first.click()
        dialog = page.get_by_role("dialog", name="Amend this signed report")
        text, reason = (
            dialog.get_by_label("Corrected report text"),
            dialog.get_by_label("Reason for the amendment"),
        )
        page.get_by_role("button", name="Amend report…").click()
        text.fill("Hairline fracture of the 5th rib.")
        reason.fill("missed on first read")
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        expect(page.locator("#amend-status")).to_have_text(
            "Amendment not signed: Amend opens with your text"
        )
        page.get_by_role("button", name="Amend report…").click()
        expect(text).to_have_value("Hairline fracture of the 5th rib.")
        expect(reason).to_have_value("missed on first read")
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        assert server.get(path).json()["status"] == "final"  # nothing was signed
        # leaving asks; declined, the study stays open with the amendment kept
        asked: list[str] = []

        def decline(d: Any) -> None:
            asked.append(d.message)
            d.dismiss()

        page.once("dialog", decline)
        page.locator("#back-to-worklist").click()
        expect(page).to_have_url(re.compile(re.escape(f"#/study/{study['id']}") + "$"))
        assert asked == ["Discard the unsaved changes to this report?"]
        page.get_by_role("button", name="Amend report…").click()
        expect(text).to_have_value("Hairline fracture of the 5th rib.")
        dialog.get_by_role("button", name="Cancel").click()
        # accepted: gone
        page.once("dialog", lambda d: d.accept())
        page.locator("#back-to-worklist").click()
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        page.locator("#history button.history-item").first.click()
        page.get_by_role("button", name="Amend report…").click()
        expect(text).to_have_value("No fracture.")
        expect(reason).to_have_value("")
        dialog.get_by_role("button", name="Cancel").click()
        expect(page.locator("#amend-status")).to_have_text("")  # nothing changed: nothing kept
        page.once("dialog", lambda d: pytest.fail(f"asked {d.message!r} with nothing typed"))
        page.locator("#back-to-worklist").click()
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        assert server.get(path).json()["text"] == "No fracture."
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_a_report_changed_by_someone_else_is_not_signed_unseen(page, tmp_path, tiny_lm):
    """Dr A has a draft open (an answer cut at its token limit, which the page says); Dr B
    saves another text. A's Sign is refused (412, shown with what to do), the list shows B's
    version and A's editor keeps what A typed; A's second Sign signs the editor's text, which A
    has now seen."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, report = _ct_with_report(server, max_new_tokens=1)
        assert report["finish_reason"] == "length"
        path = f"/v1/reports/{report['id']}"
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        page.locator("#history button.history-item").first.click()
        # the model's answer was cut at its token limit: the reader is told before signing
        expect(page.locator("#answer-cut")).to_have_text(
            "The model stopped at its length limit (1 token): this answer may be incomplete."
        )
        page.get_by_label("Report text (draft)").fill("A: lungs clear.")
        # leaving with unsaved text asks first; "Cancel" stays, with the text as typed
        page.once("dialog", lambda d: d.dismiss())
        page.locator("#back-to-worklist").click()
        expect(page.get_by_label("Report text (draft)")).to_have_value("A: lungs clear.")
        # the hash changes, then the page puts it back once the dialog is answered: wait for it
        expect(page).to_have_url(re.compile(re.escape(f"#/study/{study['id']}") + "$"))
        b = httpx.patch(
            server.base + path,
            headers={"Authorization": f"Bearer {server.key}"},
            json={"text": "B: no acute finding."},
        )
        assert b.status_code == 200, b.text
        page.get_by_role("button", name="Sign report…").click()
        dialog = page.get_by_role("dialog", name="Sign this report?")
        dialog.get_by_role("button", name="Sign report", exact=True).click()
        alert = page.locator("#alerts")
        expect(alert.locator(".error-code")).to_have_text("report_changed")
        expect(alert).to_contain_text("Someone else changed this report")
        expect(page.locator("#report-status")).to_have_text("Unsaved changes")
        now = server.get(path).json()
        assert (now["status"], now["text"]) == ("draft", "B: no acute finding.")
        expect(page.locator("#history .history-answer")).to_have_text(["B: no acute finding."])
        expect(page.get_by_label("Report text (draft)")).to_have_value("A: lungs clear.")
        page.get_by_role("button", name="Sign report…").click()
        dialog.get_by_role("button", name="Sign report", exact=True).click()
        expect(page.locator("#report-final-text")).to_have_text("A: lungs clear.")
        signed = server.get(path).json()
        assert (signed["status"], signed["text"]) == ("final", "A: lungs clear.")


def test_an_answer_arriving_while_signing_does_not_change_what_is_signed(page, tmp_path, tiny_lm):
    """Dr A asks a second question and, while the model works, opens the first draft's Sign
    dialog, which names that draft's question. The answer arrives behind the dialog: the first
    draft stays open and is the one signed; the new one stays a draft. (The question is sent
    after the dialog opens, by the form's own submit, so the answer surely arrives behind it.)"""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, report = _ct_with_report(server)
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        page.locator("#history button.history-item").first.click()
        page.get_by_label("Question about the shown image").fill("Second question?")
        page.get_by_role("button", name="Sign report…").click()
        dialog = page.get_by_role("dialog", name="Sign this report?")
        expect(dialog).to_contain_text("Question: Any fracture?")
        page.evaluate("document.getElementById('ask-form').requestSubmit()")
        expect(page.locator("#history button.history-item")).to_have_count(2)  # it arrived
        expect(page.locator("#ask-status")).to_contain_text("stays open")
        dialog.get_by_role("button", name="Sign report", exact=True).click()
        expect(page.locator("#report-final")).to_be_visible()
        expect(page.locator("#report-question")).to_have_text("Any fracture?")
        listed = server.get(f"/v1/reports?study_id={study['id']}").json()["data"]
        status = {r["question"]: r["status"] for r in listed}
        assert status == {"Any fracture?": "final", "Second question?": "draft"}, status
        assert _errors_from_4xx_are_expected(page.problems) == []


def test_after_a_sign_out_only_the_same_key_comes_back_to_the_study(page, tmp_path, tiny_lm):
    """Signing out of a study leaves its address: the next reader at this screen signs in to
    the worklist (they landed in the study, the address kept), while the reader who signed out
    comes back to it with the same key."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, _ = _ct_with_report(server)
        in_study = re.compile(re.escape(f"#/study/{study['id']}") + "$")
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        expect(page.locator("#history button.history-item")).to_have_count(1)
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        expect(page).not_to_have_url(in_study)
        _sign_in(page, server)
        expect(page).to_have_url(in_study)
        expect(page.locator("#history button.history-item")).to_have_count(1)
        page.get_by_role("button", name="Sign out").click()
        other = _colleagues_key(server)
        expect(page).not_to_have_url(in_study)
        # the next reader types their key into this screen as it was left
        page.get_by_label("API key").fill(other)
        page.get_by_role("button", name="Sign in", exact=True).click()
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page).not_to_have_url(in_study)
        page.get_by_role("button", name="Sign out").click()
        _sign_in(page, server)  # the return was the next sign-in's only
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()


def test_unsaved_text_survives_a_sign_out_and_a_colleagues_signature(page, tmp_path, tiny_lm):
    """Text typed into a draft comes back after the reader signs out and in again (the button
    asks first). When a colleague signs that draft meanwhile, the reader's Sign is refused
    (412), the page shows the colleague's signed report, and the Amend dialog offers the text
    the reader had typed."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, report = _ct_with_report(server)
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        editor = page.get_by_label("Report text (draft)")
        editor.fill("A: small left effusion.")
        page.once("dialog", lambda d: d.accept())  # "Sign out? Your unsaved report text ..."
        page.get_by_role("button", name="Sign out").click()
        # the study's link is followed while the key is still being checked: the page it opens
        # keeps what it restored when the check ends (the sign-in opened it again, and the
        # text was lost)
        held: list[Any] = []
        page.route("**/v1/studies?limit=1", lambda route: held.append(route))
        _sign_in(page, server)
        deadline = time.monotonic() + 20
        while not held:
            assert time.monotonic() < deadline, "the sign-in sent no key check"
            page.wait_for_timeout(50)
        page.goto(f"{server.base}/#/study/{study['id']}")
        expect(editor).to_have_value("A: small left effusion.")
        expect(page.locator("#report-status")).to_contain_text("restored")
        held[0].continue_()
        page.unroute("**/v1/studies?limit=1")
        expect(page.locator("#signin-status")).to_have_text("")
        page.wait_for_timeout(500)  # the sign-in's end has run: nothing opened again
        expect(editor).to_have_value("A: small left effusion.")
        expect(page.locator("#report-status")).to_contain_text("restored")
        # another reader signing in at this workstation does not get it
        editor.fill("A: typed before the next reader.")
        page.once("dialog", lambda d: d.accept())
        page.get_by_role("button", name="Sign out").click()
        other = _colleagues_key(server)
        _sign_in(page, server, other)
        page.goto(f"{server.base}/#/study/{study['id']}")
        expect(editor).to_have_value(report["text"])
        page.get_by_role("button", name="Sign out").click()
        _sign_in(page, server)
        page.goto(f"{server.base}/#/study/{study['id']}")
        expect(editor).to_have_value(report["text"])  # dropped, not kept for later
        editor.fill("A: small left effusion.")

        b = httpx.patch(
            f"{server.base}/v1/reports/{report['id']}",
            headers={"Authorization": f"Bearer {server.key}"},
            json={"text": "B: no effusion.", "status": "final"},
        )
        assert b.status_code == 200, b.text
        page.get_by_role("button", name="Sign report…").click()
        page.get_by_role("dialog", name="Sign this report?").get_by_role(
            "button", name="Sign report", exact=True
        ).click()
        expect(page.locator("#alerts .error-code")).to_have_text("report_changed")
        expect(page.locator("#report-badge")).to_have_text("Final")
        expect(page.locator("#report-final-text")).to_have_text("B: no effusion.")
        page.get_by_role("button", name="Amend report…").click()
        expect(page.get_by_label("Corrected report text")).to_have_value("A: small left effusion.")
        signed = server.get(f"/v1/reports/{report['id']}").json()
        assert (signed["status"], signed["text"]) == ("final", "B: no effusion.")


def test_each_role_is_offered_its_actions_and_an_admin_deletes_a_study(
    page, tmp_path, tiny_lm, shots
):
    """The page reads the key's permissions: a PACS key sees reports read-only and no delete
    button. An admin deletes a study sent by mistake after a confirmation; a study with a signed
    report stays, and the page says why."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        auth = {"Authorization": f"Bearer {server.key}"}

        def study_with_report(sign: bool) -> dict[str, Any]:
            study, report = _ct_with_report(server)
            if sign:
                r = httpx.patch(
                    f"{server.base}/v1/reports/{report['id']}",
                    headers=auth,
                    json={"status": "final"},
                )
                assert r.status_code == 200, r.text
            return study

        mistaken, signed = study_with_report(False), study_with_report(True)
        pacs = httpx.post(
            server.base + "/v1/apikeys", headers=auth, json={"role": "pacs"}, timeout=30
        ).json()

        _sign_in(page, server, key=pacs["key"])
        expect(page.locator("#key-label")).to_contain_text("pacs")
        page.goto(f"{server.base}/#/study/{mistaken['id']}")
        expect(page.get_by_role("heading", level=1)).to_contain_text("CT")
        page.locator("#history button.history-item").first.click()
        expect(page.locator("#report-badge")).to_have_text("Draft")
        expect(page.get_by_role("button", name="Delete study…")).to_be_hidden()
        expect(page.get_by_role("button", name="Sign report…")).to_be_hidden()
        expect(page.get_by_role("button", name="Save draft")).to_be_hidden()
        expect(page.get_by_label("Report text (draft)")).not_to_be_editable()
        expect(page.locator("#report-role-note")).to_contain_text("a radiologist edits and signs")
        page.get_by_role("button", name="Sign out").click()

        _sign_in(page, server)
        expect(page.locator("#key-label")).to_contain_text("admin")
        rows = page.locator("#worklist-body tr")
        expect(rows.locator(".badge")).to_have_text(["Signed", "Draft"])  # newest first
        # the worklist filters on what awaits a signature
        page.get_by_label("Report status").select_option(label="Awaiting signature")
        expect(rows).to_have_count(1)
        expect(rows.locator(".badge")).to_have_text(["Draft"])
        expect(page.locator("#worklist-count")).to_have_text("1 study · awaiting signature")
        page.get_by_label("Report status").select_option(label="All reports signed")
        expect(rows.locator(".badge")).to_have_text(["Signed"])
        expect(page.locator("#worklist-count")).to_have_text("1 study · all reports signed")
        page.reload()  # the filter stays for this tab (it was back to All)
        expect(page.get_by_label("Report status")).to_have_value("signed")
        expect(page.locator("#worklist-count")).to_have_text("1 study · all reports signed")
        page.get_by_role("button", name="Sign out").click()  # the next reader: the whole list
        _sign_in(page, server)
        expect(page.get_by_label("Report status")).to_have_value("")
        expect(rows).to_have_count(2)
        page.get_by_label("Report status").select_option(label="All")
        expect(rows).to_have_count(2)
        alert = page.locator("#alerts")
        # a signed study stays: the server's 409, with its reason
        page.goto(f"{server.base}/#/study/{signed['id']}")
        expect(page.get_by_role("heading", level=1)).to_contain_text("CT")
        page.get_by_role("button", name="Delete study…").click()
        dialog = page.get_by_role("dialog", name="Delete this study?")
        expect(dialog).to_be_visible()
        dialog.get_by_role("button", name="Delete study").click()
        expect(alert.locator(".error-code")).to_have_text("study_has_signed_reports")
        assert server.get(f"/v1/studies/{signed['id']}").status_code == 200

        # cancelled: nothing happens; confirmed: gone, back on the worklist
        page.goto(f"{server.base}/#/study/{mistaken['id']}")
        expect(page.get_by_role("heading", level=1)).to_contain_text("CT")
        page.get_by_role("button", name="Delete study…").click()
        _shot(page, shots, "delete-dialog")
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        assert server.get(f"/v1/studies/{mistaken['id']}").status_code == 200
        page.get_by_role("button", name="Delete study…").click()
        dialog.get_by_role("button", name="Delete study").click()
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page.locator("#upload-status")).to_have_text("CT study deleted.")
        expect(page.locator("#worklist-body tr")).to_have_count(1)
        assert server.get(f"/v1/studies/{mistaken['id']}").status_code == 404
        with server.app.state.session_factory() as s:
            deletions = s.scalars(select(AuditEvent).where(AuditEvent.action == "study.delete"))
            assert [(e.resource_id, e.outcome) for e in deletions] == [
                (signed["id"], "invalid"),
                (mistaken["id"], "ok"),
            ]
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_the_worklist_shows_arrivals_and_new_drafts_without_a_click(page, tmp_path, tiny_lm):
    """Studies pushed by the PACS and their automatic drafts appear on an open worklist within
    a refresh round (the page's clock is driven), but never redraw the table under a reader
    who is in it."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        page.clock.install()
        _sign_in(page, server)
        expect(page.locator("#worklist-empty")).to_be_visible()
        rows = page.locator("#worklist-body tr")
        _, report = _ct_with_report(server)  # arrives in the background
        page.clock.run_for(21_000)
        expect(rows).to_have_count(1)
        expect(rows.locator(".badge")).to_have_text(["Draft"])
        r = httpx.patch(
            f"{server.base}/v1/reports/{report['id']}",
            headers={"Authorization": f"Bearer {server.key}"},
            json={"status": "final"},
        )
        assert r.status_code == 200, r.text
        page.clock.run_for(21_000)
        expect(rows.locator(".badge")).to_have_text(["Signed"])

        rows.first.locator("a").focus()  # the reader is in the table: no redraw under them
        _ct_with_report(server)
        page.clock.run_for(21_000)
        page.wait_for_timeout(500)  # a real moment for a redraw that must not come
        expect(rows).to_have_count(1)
        page.get_by_role("button", name="Refresh").focus()
        page.clock.run_for(21_000)
        expect(rows).to_have_count(2)
        expect(page.locator("#worklist-count")).to_have_text("2 studies")
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_the_open_study_shows_a_colleagues_signature_without_a_click(page, tmp_path, tiny_lm):
    """A draft open in the study view (nothing typed) turns Final within a refresh round once
    a colleague signs it; while the reader has typed into a draft, that draft is not redrawn
    under them, and their Save is refused (412) rather than overwrite the colleague's text."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, first = _ct_with_report(server)
        page.clock.install()
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        expect(page.locator("#report-badge")).to_have_text("Draft")
        auth = {"Authorization": f"Bearer {server.key}"}
        path = f"{server.base}/v1/reports/{first['id']}"
        r = httpx.patch(path, headers=auth, json={"text": "B: clear.", "status": "final"})
        assert r.status_code == 200, r.text
        page.clock.run_for(21_000)
        expect(page.locator("#report-badge")).to_have_text("Final")
        expect(page.locator("#report-final-text")).to_have_text("B: clear.")

        second = _ask(server, study["id"], question="Effusion?")
        page.clock.run_for(21_000)
        expect(page.locator("#history button.history-item")).to_have_count(2)
        page.locator("#history button.history-item").first.click()
        editor = page.get_by_label("Report text (draft)")
        editor.fill("A: small effusion.")
        r = httpx.patch(
            f"{server.base}/v1/reports/{second['id']}", headers=auth, json={"text": "B: none."}
        )
        assert r.status_code == 200, r.text
        page.clock.run_for(21_000)
        page.wait_for_timeout(300)  # a real moment for a redraw that must not come
        expect(editor).to_have_value("A: small effusion.")
        # the page still holds the version A typed over: saving is refused, not B overwritten
        page.get_by_role("button", name="Save draft").click()
        expect(page.locator("#alerts .error-code")).to_have_text("report_changed")
        expect(page.locator("#history .history-answer").first).to_have_text("B: none.")
        expect(editor).to_have_value("A: small effusion.")
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_reader_finds_a_study_by_accession_number_and_date(page, tmp_path, tiny_lm):
    """The accession number the RIS gives finds its study (Enter); clearing the field lists all
    again; study dates bound the list; a refresh round keeps the filters; an empty result says
    that nothing matches rather than that there are no studies."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        for accession, day in (
            ("ACC001", "20261101"),
            ("ACC002", "20261115"),
            ("ACC003", "20261130"),
        ):
            r = httpx.post(
                server.base + "/v1/studies",
                headers={"Authorization": f"Bearer {server.key}"},
                files=[
                    (
                        "files",
                        (
                            "ct.dcm",
                            ct_with(
                                AccessionNumber=accession,
                                StudyDate=day,
                                StudyInstanceUID=generate_uid(),
                                SOPInstanceUID=generate_uid(),
                            ),
                        ),
                    )
                ],
                timeout=30,
            )
            assert r.status_code == 201, r.text
        page.clock.install()
        _sign_in(page, server)
        rows = page.locator("#worklist-body tr")
        expect(rows).to_have_count(3)
        accession = page.get_by_label("Accession number")
        accession.fill("ACC002")
        accession.press("Enter")
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("ACC002")
        expect(page.locator("#worklist-count")).to_have_text("1 study with accession number ACC002")
        accession.fill("ACC404")
        page.get_by_role("button", name="Find").click()
        expect(page.locator("#worklist-empty")).to_have_text("No study matches these filters.")
        expect(rows).to_have_count(0)
        accession.fill("")
        expect(rows).to_have_count(3)
        page.get_by_label("Study date from").fill("2026-11-10")
        expect(rows).to_have_count(2)
        page.get_by_label("Study date to").fill("2026-11-20")
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("ACC002")
        expect(page.locator("#worklist-count")).to_have_text(
            "1 study, study date 2026-11-10 to 2026-11-20"
        )
        httpx.post(  # a fourth study, outside the dates, arrives: the refresh keeps the filters
            server.base + "/v1/studies",
            headers={"Authorization": f"Bearer {server.key}"},
            files=[("files", ("ct.dcm", ct_with(AccessionNumber="ACC004", StudyDate="20261201")))],
            timeout=30,
        ).raise_for_status()
        page.clock.run_for(21_000)
        page.wait_for_timeout(500)
        expect(rows).to_have_count(1)
        # an end before the start: said at the field, and the list of the dates before goes
        # (it stayed, under the API's wording)
        page.get_by_label("Study date to").fill("2026-11-01")
        expect(page.locator("#alerts")).to_contain_text("the end date is before the start date")
        expect(page.get_by_label("Study date to")).to_have_attribute("aria-invalid", "true")
        expect(rows).to_have_count(0)
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_reader_imports_a_patients_cd(page, tmp_path, tiny_lm):
    """The reader picks the CD's drive (here pydicom's DICOMDIR test tree: six studies of three
    patients among 91 files); it goes up in batches, each study lands in the worklist, and the
    page says what was skipped; an image naming one of those studies with another patient is
    refused, and said so. Picking the CD again copies nothing."""
    from playwright.sync_api import expect

    cd = CT_SMALL.parent / "dicomdirtests"
    with _serve(tmp_path, tiny_lm) as server:
        _sign_in(page, server)
        page.get_by_label("Import a CD or folder").set_input_files(cd)
        page.get_by_role("button", name="Import", exact=True).click()
        status = page.locator("#upload-status")
        expect(status).to_contain_text(
            "Imported 6 studies: 31 new images; 60 files skipped (not DICOM images).", timeout=T
        )
        expect(status.locator("a")).to_have_count(6)
        expect(page.locator("#worklist-body tr")).to_have_count(6)
        # a stick whose image names one of those studies but another patient: refused, said
        ds = pydicom.dcmread(cd / "77654033" / "CR1" / "6154")
        ds.PatientID, ds.SOPInstanceUID = "OTHER-PATIENT", "1.2.3.4.5.6.7"
        (tmp_path / "stick").mkdir()
        ds.save_as(tmp_path / "stick" / "IM1")
        page.get_by_label("Import a CD or folder").set_input_files(tmp_path / "stick")
        page.get_by_role("button", name="Import", exact=True).click()
        expect(status).to_contain_text(
            "Imported 0 studies: 0 new images; 1 refused: their UIDs conflict with images on "
            "the server (another patient's study, or the same image in another study).",
            timeout=T,
        )
        page.get_by_label("Import a CD or folder").set_input_files(cd)
        page.get_by_role("button", name="Import", exact=True).click()
        expect(status).to_contain_text(
            "Imported 6 studies: 0 new images, 31 already here", timeout=T
        )
        expect(page.locator("#worklist-body tr")).to_have_count(6)
        status.locator("a").first.click()
        expect(page.locator("#view-study")).to_be_visible()
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_reader_retrieves_a_study_from_the_pacs(page, tmp_path, tiny_lm, shots):
    """An accession number the PACS (a real Orthanc) knows: the study is fetched, listed and
    opened; one it does not know is an error with its code. A server with no PACS shows no
    form (`/v1/apikeys/me` lists no "retrieve" feature)."""
    import io

    import pydicom
    from orthanc_helpers import start_orthanc
    from playwright.sync_api import expect

    port = free_port()
    pacs = f"http://127.0.0.1:{port}"
    with (
        start_orthanc(tmp_path / "orthanc", port),
        _serve(tmp_path, tiny_lm, dicomweb_pull_url=f"{pacs}/dicom-web", job_poll_s=0.05) as server,
    ):
        ds = pydicom.dcmread(CT_SMALL)
        ds.AccessionNumber = "ACC-7"
        buf = io.BytesIO()
        ds.save_as(buf)
        assert httpx.post(f"{pacs}/instances", content=buf.getvalue(), timeout=10).is_success

        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        alert = page.locator("#alerts")
        field = page.get_by_label("Retrieve from PACS")
        field.fill("NO-SUCH")
        page.get_by_role("button", name="Retrieve", exact=True).click()
        expect(alert.locator(".error-code")).to_have_text("not_in_pacs")
        field.fill("ACC-7")
        page.get_by_role("button", name="Retrieve", exact=True).click()
        status = page.locator("#upload-status")
        expect(status).to_have_text("Retrieved: 1 new image. Open the study", timeout=T)
        _shot(page, shots, "retrieved")
        expect(page.locator("#worklist-body tr")).to_have_count(1)
        status.get_by_role("link", name="Open the study").click()
        expect(page.get_by_role("heading", level=1)).to_contain_text("CT")
        expect(page.locator("#study-image")).to_be_visible(timeout=T)

        # past the image retention the pixels go; the viewer says so and brings them back
        from datetime import timedelta

        from tinyllava_med.server.db.models import utcnow
        from tinyllava_med.server.retention import release_due

        app = server.app
        with app.state.session_factory.begin() as s:
            make_old(s, utcnow() - timedelta(days=400), store=app.state.store)
        released = release_due(
            app.state.session_factory,
            app.state.store,
            app.state.settings.model_copy(update={"image_retention_days": 365.0}),
        )
        assert released["images"] == 1
        page.reload()
        placeholder = page.locator("#viewer-placeholder")
        expect(placeholder).to_contain_text("past this server's image retention", timeout=T)
        expect(page.locator("#study-image")).to_be_hidden()
        placeholder.get_by_role("button", name="Retrieve it from the PACS").click()
        expect(page.locator("#study-image")).to_be_visible(timeout=T)
        expect(placeholder).to_be_hidden()
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems

    (tmp_path / "no-pacs").mkdir()
    with _serve(tmp_path / "no-pacs", tiny_lm) as server:  # nothing to retrieve from: no form
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page.locator("#upload-form")).to_be_visible()
        expect(page.locator("#retrieve-form")).to_be_hidden()


def test_errors_are_shown_with_message_and_code(page, demo_server, shots):
    from playwright.sync_api import expect

    server = demo_server
    page.goto(server.base + "/")
    alert = page.locator("#alerts")
    expect(alert).to_have_attribute("role", "alert")

    # A wrong key: the sign-in form says so and stays.
    _sign_in(page, server, key="tlm_00000000_" + "x" * 43)
    expect(alert).to_contain_text("not valid")
    expect(alert.locator(".error-code")).to_have_text("unauthorized")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    # A radiologist's key (made by the admin) signs in.
    made = httpx.post(
        server.base + "/v1/apikeys",
        headers={"Authorization": f"Bearer {server.key}"},
        json={"role": "radiologist", "name": "web test radiologist"},
        timeout=30,
    ).json()
    page.get_by_label("API key").fill(made["key"])
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    expect(alert).to_be_empty()

    # A bad upload (random bytes): message and code, nothing added.
    count = server.get("/v1/studies").json()["count"]
    page.get_by_label("Upload a study").set_input_files(
        files=[{"name": "noise.dcm", "mimeType": "application/dicom", "buffer": os.urandom(4096)}]
    )
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(alert).to_contain_text("Upload failed")
    code = alert.locator(".error-code").inner_text()
    assert code in {"not_dicom", "unsupported_format"}, code
    expect(alert).to_contain_text("Only DICOM Part 10, PNG and JPEG files are accepted.")
    assert server.get("/v1/studies").json()["count"] == count
    _shot(page, shots, "upload-error")
    page.get_by_role("button", name="Dismiss the error message").focus()
    page.keyboard.press("Enter")
    expect(alert).to_be_empty()
    # the keyboard is not dropped to the top of the page: the Upload button was disabled while
    # it ran, so it lost focus then; the view's heading takes it
    expect(page.get_by_role("heading", name="Worklist")).to_be_focused()

    # An image of too many pixels (a 78 kB PNG of 40000 x 40000): said to be the image, not
    # the upload's size ("send fewer or smaller files" was no help)
    bomb = io.BytesIO()
    PILImage.new("1", (40000, 40000)).save(bomb, format="PNG")
    page.get_by_label("Upload a study").set_input_files(
        files=[{"name": "big.png", "mimeType": "image/png", "buffer": bomb.getvalue()}]
    )
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(alert).to_contain_text("The image is larger (in pixels, frames or decoded size)")
    expect(alert).not_to_contain_text("Send fewer or smaller files")

    # The key is revoked mid-session: the next call is a 401, back to sign-in with the reason.
    revoked = httpx.delete(
        f"{server.base}/v1/apikeys/{made['id']}",
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=30,
    )
    assert revoked.status_code == 204
    page.get_by_role("button", name="Refresh").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(alert).to_contain_text("Sign in again")
    expect(alert).to_contain_text("revoked API key: it was revoked at")  # not the header syntax
    expect(alert.locator(".error-code")).to_have_text("unauthorized")
    assert page.evaluate("sessionStorage.getItem('tinyllava_med.api_key')") is None
    assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def test_a_server_that_goes_away_is_said_so(page, tmp_path, tiny_lm):
    """The server stops answering mid-session (a restart, the network; here every request is
    cut): the model badge says so within half a minute (it stayed "Model ready"), and a
    question that fails keeps its own error (the failed reload of the reports replaced it at
    once). When the server answers again, so does the badge."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, _ = _ct_with_report(server)
        page.clock.install()
        _sign_in(page, server)
        badge = page.locator("#model-state")
        expect(badge).to_have_text(_starts_with("Model ready"))
        page.goto(f"{server.base}/#/study/{study['id']}")
        expect(page.locator("#study-image")).to_have_attribute("src", _starts_with("blob:"))
        page.route("**/v1/**", lambda route: route.abort())
        page.route("**/readyz", lambda route: route.abort())
        page.get_by_label("Question about the shown image").fill("Any fracture?")
        page.get_by_role("button", name="Ask", exact=True).click()
        alert = page.locator("#alerts")
        expect(alert).to_contain_text("Asking the model")
        page.wait_for_timeout(300)  # the reload of the reports has failed by now
        expect(alert).to_contain_text("Asking the model")
        expect(alert).not_to_contain_text("Loading the reports")
        page.clock.run_for(31_000)
        expect(badge).to_have_text("Server unreachable")
        page.unroute_all()
        page.clock.run_for(6_000)
        expect(badge).to_have_text(_starts_with("Model ready"))


def test_security_headers_and_static_files(demo_server):
    r = httpx.get(demo_server.base + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        s = httpx.get(f"{demo_server.base}/static/{name}", timeout=30)
        assert s.status_code == 200 and s.headers["content-type"].startswith(kind)
        assert s.headers["content-security-policy"] == csp
    for bad in ("index.html", "..%2Fapp.py", "nope.js"):
        e = httpx.get(f"{demo_server.base}/static/{bad}", timeout=30)
        assert e.status_code == 404 and e.json()["error"]["code"] == "not_found"
    html = r.text
    assert "<script>" not in html and " style=" not in html and "://" not in html.split("<body")[0]
    # Swagger UI asks for a key: no other site may frame it; answers stay out of caches
    docs = httpx.get(f"{demo_server.base}/docs", timeout=30)
    assert docs.status_code == 200 and docs.headers["x-frame-options"] == "DENY"
    assert docs.headers["content-security-policy"] == "frame-ancestors 'none'"
    for path in ("/v1/studies", "/healthz", "/openapi.json"):
        assert httpx.get(demo_server.base + path, timeout=30).headers["cache-control"] == "no-store"
    assert r.headers["cache-control"] == "no-cache"  # the client's own files: revalidated


def test_images_and_frames_of_a_multi_image_study(page, tmp_path, tiny_lm, shots):
    """A study of two MR files (one of 10 frames): image and frame selectors, no CT windows;
    a model that is not `demo` gets no demo warning."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        files = [
            ("files", (name, _as_study_of_mr_small(get_testdata_file(name, download=False))))
            for name in ("MR_small.dcm", "emri_small.dcm")
        ]
        study = httpx.post(
            server.base + "/v1/studies",
            headers={"Authorization": f"Bearer {server.key}"},
            files=files,
            timeout=30,
        ).json()
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page.locator("#model-line")).to_contain_text("tiny-test")
        expect(page.locator("#demo-warning")).to_be_hidden()
        page.goto(f"{server.base}/#/study/{study['id']}")
        image = page.locator("#study-image")
        expect(image).to_have_attribute("src", _starts_with("blob:"))
        expect(page.locator("#window-field")).to_be_hidden()  # MR: no CT presets
        expect(page.locator("#frame-field")).to_be_hidden()  # image 1 has one frame
        select = page.get_by_role("combobox", name="Image")
        expect(select.locator("option")).to_have_count(2)
        assert "10 frames" in select.locator("option").nth(1).inner_text()
        select.select_option(index=1)
        expect(page.locator("#frame-field")).to_be_visible()
        expect(page.locator("#frame-value")).to_have_text("1 / 10")
        page.get_by_label("Frame").focus()
        page.keyboard.press("End")
        expect(page.locator("#frame-value")).to_have_text("10 / 10")
        expect(image).to_have_attribute("data-frame", "9")
        expect(image).to_have_attribute("alt", _contains("frame 10 of 10"))
        _shot(page, shots, "multiframe")
        # the images (and frames) the reader stopped at were announced to the model as about
        # to be asked about (frame 1 of image 2 may be passed over before it is shown)
        wanted = [{"image": 0, "frame": None}, {"image": 1, "frame": 9}]
        wait_for(lambda: all(w in _prepared(server) for w in wanted), 20, "the prepares")

        # a report about frame 5 of image 2, asked elsewhere: opening the study shows the
        # report beside that frame (before, beside image 1: read, or signed, as its report),
        # and so does choosing it in the history after looking elsewhere
        asked = httpx.post(
            f"{server.base}/v1/studies/{study['id']}/questions",
            headers={"Authorization": f"Bearer {server.key}"},
            json={"question": "Any lesion?", "image_index": 1, "frame": 4, "max_new_tokens": 2},
            timeout=60,
        )
        assert asked.status_code == 201, asked.text
        select.select_option(index=0)
        page.reload()
        for _ in range(2):
            expect(page.locator("#report-question")).to_have_text("Any lesion?")
            expect(select).to_have_value("1")
            expect(page.locator("#frame-value")).to_have_text("5 / 10")
            expect(image).to_have_attribute("data-frame", "4")
            expect(image).to_have_attribute("alt", _contains("image 2 of 2, frame 5 of 10"))
            select.select_option(index=0)
            expect(page.locator("#frame-field")).to_be_hidden()
            page.locator("#history button.history-item").first.click()
        expect(page.locator("#report-provenance")).to_contain_text("image 2 · frame 5")
        weights = asked.json()["model_weights"]  # which weights answered: the digest's start
        expect(page.locator("#report-provenance")).to_contain_text(f"weights {weights[:19]}…")
        assert page.problems == [], page.problems


def test_the_reader_zooms_and_pans_the_image(page, tmp_path, tiny_lm):
    """Buttons, the wheel (about the pointer), drag and keys zoom and move the image; it never
    leaves the stage uncovered; a window change keeps the view, another image is fitted again."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, _ = _ct_with_report(server)
        httpx.post(
            f"{server.base}/v1/studies",
            headers={"Authorization": f"Bearer {server.key}"},
            files=[("files", ("mr.dcm", Path(get_testdata_file("MR_small.dcm")).read_bytes()))],
            timeout=30,
        )
        _sign_in(page, server)
        page.goto(f"{server.base}/#/study/{study['id']}")
        image = page.locator("#study-image")
        expect(image).to_have_attribute("src", _starts_with("blob:"))
        stage = page.locator("#viewer-stage")
        fit = image.bounding_box()
        box = stage.bounding_box()
        zoom = page.locator("#zoom-value")
        expect(zoom).to_have_text("100%")
        expect(page.get_by_role("button", name="Zoom out")).to_be_disabled()

        page.get_by_role("button", name="Zoom in").click()
        page.get_by_role("button", name="Zoom in").click()
        expect(zoom).to_have_text("156%")
        wide = image.bounding_box()
        assert abs(wide["width"] / fit["width"] - 1.5625) < 0.01
        # about the centre: the image's centre stays at the stage's
        assert abs(wide["x"] + wide["width"] / 2 - (box["x"] + box["width"] / 2)) < 1

        # drag far to the right: it stops where its left edge meets the stage's
        page.mouse.move(box["x"] + 100, box["y"] + 100)
        page.mouse.down()
        page.mouse.move(box["x"] + 2000, box["y"] + 100, steps=5)
        page.mouse.up()
        moved = image.bounding_box()
        assert abs(moved["x"] - box["x"]) < 1, (moved, box)
        # the keys move it back, and 0 fits it
        stage.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
        assert image.bounding_box()["x"] < moved["x"] - 100
        page.keyboard.press("0")
        expect(zoom).to_have_text("100%")  # fitted
        assert image.bounding_box() == fit

        # the wheel zooms about the pointer: the point under it stays under it
        px, py = box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.25
        page.mouse.move(px, py)
        page.mouse.wheel(0, -100)
        expect(zoom).to_have_text("125%")
        after = image.bounding_box()
        u = (px - after["x"]) / after["width"]
        assert abs(u - (px - fit["x"]) / fit["width"]) < 0.01

        # a window change keeps the view; another study's image is fitted
        page.get_by_text("Lung", exact=True).click()
        expect(image).to_have_attribute("data-window", "lung")
        expect(zoom).to_have_text("125%")
        page.goto(f"{server.base}/#/")
        page.locator("#worklist-body tr").first.get_by_role("link").click()
        expect(page.get_by_role("heading", level=1)).to_contain_text("MR")
        expect(zoom).to_have_text("100%")
        assert page.problems == [], page.problems


def _prepared(server: LiveServer) -> list[dict[str, Any]]:
    """The images (and frames) the client asked the model to prepare, from the audit log."""
    with server.app.state.session_factory() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "image.prepare"))
        return [{k: e.detail[k] for k in ("image", "frame")} for e in events if e.detail]


def test_model_unavailable_says_retry(page, tmp_path):
    """No model (it failed to load): asking is a 503 and the page says to retry."""
    from playwright.sync_api import expect

    with _serve(tmp_path, None) as server:
        study = httpx.post(
            server.base + "/v1/studies",
            headers={"Authorization": f"Bearer {server.key}"},
            files=[("files", ("ct.dcm", CT_SMALL.read_bytes()))],
            timeout=30,
        ).json()
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page.locator("#model-state")).to_have_text("Model failed to load")
        page.goto(f"{server.base}/#/study/{study['id']}")
        page.get_by_label("Question about the shown image").fill("Any fracture?")
        page.get_by_role("button", name="Ask", exact=True).click()
        alert = page.locator("#alerts")
        expect(alert.locator(".error-code")).to_have_text("model_not_ready")
        expect(alert).to_contain_text("retry later")
        expect(alert).to_contain_text("Retry in 5 s.")
        expect(page.locator("#history-empty")).to_be_visible()


def _starts_with(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix))


def _contains(part: str) -> re.Pattern[str]:
    return re.compile(re.escape(part))


def test_api_docs_render_without_internet(page, demo_server):
    """/docs (Swagger UI) and /redoc come from this server: a hospital network that cannot reach
    a CDN still gets its OpenAPI documentation. Every request to another origin is refused and
    recorded; the pages must render the API's operations all the same."""
    from playwright.sync_api import expect

    elsewhere: list[str] = []

    def only_this_server(route: Any) -> None:
        if route.request.url.startswith(demo_server.base + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.goto(demo_server.base + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("TinyLLaVA-Med server")
    ask = page.locator(".opblock-post", has_text="/v1/studies/{study_id}/questions").first
    expect(ask).to_be_visible()
    ask.locator(".opblock-summary").click()  # an operation opens: the script is running
    expect(ask.locator(".parameters-container, .opblock-body").first).to_be_visible()
    page.goto(demo_server.base + "/redoc")
    expect(page.get_by_text("/v1/studies/{study_id}/questions").first).to_be_attached()
    expect(page.get_by_text("API docs by Redocly")).to_be_attached()  # the side menu's end
    assert elsewhere == [], elsewhere
    # ReDoc's menu asks cdn.redoc.ly for its logo: the page's CSP refuses it before any request
    logo = [p for p in page.problems if "cdn.redoc.ly" in p and "Content Security Policy" in p]
    assert [p for p in page.problems if p not in logo] == [], page.problems
    r = httpx.get(demo_server.base + "/redoc", timeout=30)
    assert "img-src 'self' data: blob:" in r.headers["content-security-policy"]


def _png(shade: int) -> bytes:
    out = io.BytesIO()
    PILImage.new("L", (40, 40), shade).save(out, format="PNG")
    return out.getvalue()


def test_what_is_signed_is_what_is_seen_and_a_sign_out_reaches_every_tab(page, tmp_path, tiny_lm):
    """A radiologist's audit found: a draft about image 1 could be signed with image 2 in the
    viewer, the dialog naming the question only; Sign out in one tab left another tab of the
    same browser working under the key (a shared reading-room PC); Enter on Ask lost the
    keyboard focus; any 502 was said to be the PACS's; and Sign out threw when the key's
    details could not be read as the page loaded."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        auth = {"Authorization": f"Bearer {server.key}"}
        study = httpx.post(
            server.base + "/v1/studies",
            headers=auth,
            files=[("files", ("a.png", _png(40))), ("files", ("b.png", _png(200)))],
            timeout=30,
        ).json()
        assert len(study["images"]) == 2
        _ask(server, study["id"], question="Any mass?", image_index=0)
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        page.goto(f"{server.base}/#/study/{study['id']}")
        select = page.get_by_role("combobox", name="Image")
        expect(select).to_have_value("0")
        select.select_option(index=1)  # the reader looks at the other image
        page.get_by_label("Report text (draft)").fill("No mass.")
        page.get_by_role("button", name="Sign report…").click()
        dialog = page.get_by_role("dialog", name="Sign this report?")
        expect(dialog).to_contain_text("Any mass? (about image 1)")
        expect(select).to_have_value("0")  # the viewer shows the report's own image again
        dialog.get_by_role("button", name="Cancel").click()

        # Enter on Ask: the keyboard goes on to Stop while the model answers
        held: list[Any] = []
        page.route("**/questions?stream=true", lambda route: held.append(route))
        page.get_by_label("Question").fill("Which organ?")
        page.get_by_role("button", name="Ask", exact=True).focus()
        page.keyboard.press("Enter")
        expect(page.get_by_role("button", name="Stop")).to_be_focused()
        while not held:
            page.wait_for_timeout(20)
        held[0].fulfill(
            status=502,
            content_type="application/json",
            body='{"error": {"code": "engine_failed", "message": "the model failed", "detail": null}}',
        )
        expect(page.locator("#alerts")).to_contain_text("The model failed on this question")
        expect(page.locator("#alerts")).not_to_contain_text("PACS")
        page.unroute("**/questions?stream=true")

        # a second tab of the same browser, signed in too; Sign out in the first signs it out
        second = page.context.new_page()
        _sign_in(second, server)
        expect(second.get_by_role("heading", name="Worklist")).to_be_visible()
        page.once("dialog", lambda d: d.accept())  # the unsaved text
        page.get_by_role("button", name="Sign out").click()
        expect(second.get_by_role("heading", name="Sign in")).to_be_visible()
        expect(second.locator("#alerts")).to_contain_text("signed out in another tab")

        # the key's details unreadable as the page loads (a server restarting): Sign out works
        _sign_in(second, server)
        expect(second.get_by_role("heading", name="Worklist")).to_be_visible()
        second.route("**/v1/apikeys/me", lambda route: route.abort())
        second.goto(f"{server.base}/#/study/{study['id']}")
        second.reload()
        second.get_by_label("Report text (draft)").fill("Typed, then signed out.")
        second.once("dialog", lambda d: d.accept())
        errors: list[str] = []
        second.on("pageerror", lambda e: errors.append(str(e)))
        second.get_by_role("button", name="Sign out").click()
        expect(second.get_by_role("heading", name="Sign in")).to_be_visible()
        assert errors == []
        second.close()
    assert _errors_from_4xx_are_expected(page.problems) == []
