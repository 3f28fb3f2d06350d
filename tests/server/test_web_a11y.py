"""The web client for keyboard, screen-reader, magnifier and high-contrast users (WCAG 2.1 AA).

Real headless Chromium, as `test_web_client.py` (whose server and browser fixtures these use):
the keyboard focus never drops to the page's body when a control disables or hides itself or a
list is redrawn; errors about a field mark that field; the streamed answer is announced once,
complete; the wheel leaves the browser's zoom and the page's scrolling alone where the image
cannot zoom; forced colours still show the chosen window and the open report; the page reflows
at 320 CSS px (400% zoom); the automatic refresh can be turned off. And axe-core, the
automated WCAG checker, finds nothing in any view or dialog.
"""

from __future__ import annotations

from typing import Any

import httpx
import test_web_client as web
from test_web_client import _ask, _ct_with_report, _errors_from_4xx_are_expected, _serve, _sign_in

browser = web.browser  # the fixtures: one Chromium for this module, a fresh tab per test
page = web.page

FOCUSED = """() => { const a = document.activeElement;
    return a ? (a.id || a.dataset.reportId || a.tagName) : null; }"""


def _patch_report(server: Any, report_id: str, body: dict[str, Any]) -> None:
    """A colleague's change to a report, through the API (admin key)."""
    r = httpx.patch(
        f"{server.base}/v1/reports/{report_id}",
        headers={"Authorization": f"Bearer {server.key}"},
        json=body,
    )
    assert r.status_code == 200, r.text


def _focused(page: Any) -> str | None:
    return page.evaluate(FOCUSED)


def _open_study(page: Any, server: Any, study_id: str) -> None:
    from playwright.sync_api import expect

    _sign_in(page, server)
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    page.goto(f"{server.base}/#/study/{study_id}")
    expect(page.locator("#study-image")).to_have_attribute("data-window", "default")


def test_the_keyboard_focus_stays_where_the_reader_works(page, tmp_path, tiny_lm):
    """Ask, Save draft and Upload disable themselves while they run; the focus comes back to
    the question, the button and the button. The History list is redrawn by the 20 s refresh
    when a colleague edits a report: the focus stays on the same report's entry."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, first = _ct_with_report(server)
        page.clock.install()
        _open_study(page, server, study["id"])

        page.get_by_label("Question about the shown image").fill("Any effusion?")
        page.get_by_role("button", name="Ask", exact=True).focus()
        page.keyboard.press("Enter")
        expect(page.locator("#ask-status")).to_have_text("Answer stored as a draft report.")
        expect(page.locator("#question")).to_be_focused()
        answer = page.locator("#answer-stream").inner_text().strip()
        assert answer
        # announced once, whole: the answer box itself is not a live region
        expect(page.locator("#answer-announce")).to_have_text(f"Answer: {answer}")
        assert page.locator("#answer-stream").get_attribute("aria-live") is None

        page.get_by_label("Report text (draft)").fill("No effusion.")
        page.get_by_role("button", name="Save draft").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#report-status")).to_have_text("Draft saved.")
        expect(page.get_by_role("button", name="Save draft")).to_be_focused()

        entries = page.locator("#history button.history-item")
        expect(entries).to_have_count(2)
        entries.nth(1).focus()
        assert _focused(page) == first["id"]
        _patch_report(server, first["id"], {"text": "Colleague: no fracture."})
        page.clock.run_for(21_000)
        expect(page.locator("#history .history-answer").nth(1)).to_have_text(
            "Colleague: no fracture."
        )  # redrawn ...
        assert _focused(page) == first["id"]  # ... under the same entry
        # the entry's name is its visible text (time, status, question, answer)
        assert entries.nth(1).get_attribute("aria-label") is None

        page.goto(f"{server.base}/#/")
        page.get_by_label("Upload a study").set_input_files(
            files=[{"name": "x.png", "mimeType": "image/png", "buffer": _png()}]
        )
        page.get_by_role("button", name="Upload", exact=True).focus()
        page.keyboard.press("Enter")
        expect(page.locator("#upload-status")).to_contain_text("Uploaded")
        expect(page.get_by_role("button", name="Upload", exact=True)).to_be_focused()
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (48, 48), 90).save(buf, "PNG")
    return buf.getvalue()


def test_an_error_about_a_field_marks_it_and_a_blank_reason_keeps_the_dialog(
    page, tmp_path, tiny_lm
):
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, report = _ct_with_report(server)
        _patch_report(server, report["id"], {"status": "final"})
        _open_study(page, server, study["id"])

        question = page.get_by_label("Question about the shown image")
        page.get_by_role("button", name="Ask", exact=True).click()
        expect(page.locator("#alerts")).to_contain_text("type a question first")
        expect(question).to_be_focused()
        expect(question).to_have_attribute("aria-invalid", "true")
        assert "alerts" in question.get_attribute("aria-describedby").split()
        question.press_sequentially("W")
        assert question.get_attribute("aria-invalid") is None
        assert question.get_attribute("aria-describedby") is None

        page.get_by_role("button", name="Amend report…").click()
        dialog = page.get_by_role("dialog", name="Amend this signed report")
        dialog.get_by_label("Reason for the amendment").fill("   ")
        dialog.get_by_role("button", name="Sign amendment").click()
        expect(dialog).to_be_visible()  # the browser refuses a reason of spaces; nothing sent
        dialog.get_by_label("Reason for the amendment").fill("typo")
        dialog.get_by_label("Corrected report text").fill("  ")
        dialog.get_by_role("button", name="Sign amendment").click()
        expect(dialog).to_be_visible()
        assert server.get(f"/v1/reports/{report['id']}").json()["status"] == "final"
        dialog.get_by_label("Corrected report text").fill("Corrected: no fracture.")
        # a colleague amends first: ours is refused (412), the keyboard is back on Amend, and
        # the dialog offers what was typed again
        _patch_report(
            server,
            report["id"],
            {"text": "Colleague's amendment.", "status": "amended", "reason": "theirs"},
        )
        dialog.get_by_role("button", name="Sign amendment").click()
        expect(page.locator("#alerts .error-code")).to_have_text("report_changed")
        expect(page.get_by_role("button", name="Amend report…")).to_be_focused()
        page.get_by_role("button", name="Amend report…").click()
        expect(dialog.get_by_label("Corrected report text")).to_have_value(
            "Corrected: no fracture."
        )
        expect(dialog.get_by_label("Reason for the amendment")).to_have_value("typo")
        dialog.get_by_role("button", name="Sign amendment").click()
        expect(page.locator("#report-final-text")).to_have_text("Corrected: no fracture.")
        expect(page.locator("#report-badge")).to_have_text("Amended")


def test_the_wheel_leaves_browser_zoom_and_page_scrolling_alone(page, tmp_path, tiny_lm):
    """Ctrl+wheel is the browser's zoom, not the image's; at the smallest zoom a wheel down
    over the image scrolls the page. The stage says what it is and how to use it."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, _ = _ct_with_report(server)
        page.set_viewport_size({"width": 1000, "height": 500})
        _open_study(page, server, study["id"])
        stage = page.locator("#viewer-stage")
        box = stage.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 40)
        zoom = page.locator("#zoom-value")
        page.keyboard.down("Control")
        page.mouse.wheel(0, -100)
        page.keyboard.up("Control")
        page.wait_for_timeout(200)
        expect(zoom).to_have_text("100%")
        page.mouse.wheel(0, 200)
        for _ in range(50):  # (the page's CSP forbids wait_for_function's eval)
            if page.evaluate("window.scrollY") > 0:
                break
            page.wait_for_timeout(50)
        assert page.evaluate("window.scrollY") > 0
        expect(zoom).to_have_text("100%")
        page.mouse.wheel(0, -100)  # zooming in is still the wheel's job over the image
        expect(zoom).to_have_text("125%")
        assert stage.get_attribute("role") == "application"
        expect(stage).to_have_accessible_description(
            "On the image: wheel or + and − zoom, drag or arrow keys move, 0 fits."
        )


def test_forced_colours_show_the_chosen_window_and_the_open_report(page, tmp_path, tiny_lm):
    with _serve(tmp_path, tiny_lm) as server:
        study, report = _ct_with_report(server)
        assert _ask(server, study["id"], question="Effusion?")["status"] == "draft"
        _open_study(page, server, study["id"])
        page.emulate_media(forced_colors="active")
        style = """(e) => { const s = getComputedStyle(e);
            return [s.backgroundColor, s.color, s.outlineStyle].join(' '); }"""
        checked = page.locator("label[for='window-default']").evaluate(style)
        other = page.locator("label[for='window-lung']").evaluate(style)
        assert checked != other, (checked, other)
        entries = page.locator("#history button.history-item")
        current = page.locator("#history button.history-item[aria-current='true']")
        assert entries.count() == 2 and current.count() == 1
        plain = page.locator("#history button.history-item:not([aria-current])")
        assert current.evaluate(style) != plain.evaluate(style)


def test_the_page_reflows_at_400_percent_zoom(page, tmp_path, tiny_lm):
    """320 CSS px wide (1280 px at 400%): no sideways scrolling, Sign out on screen."""
    with _serve(tmp_path, tiny_lm) as server:
        study, _ = _ct_with_report(server)
        page.set_viewport_size({"width": 320, "height": 640})
        _open_study(page, server, study["id"])
        for view in (f"#/study/{study['id']}", "#/"):
            page.goto(f"{server.base}/{view}")
            page.wait_for_timeout(300)
            widths = page.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1], (view, widths)
            page.screenshot(path=str(tmp_path / f"reflow-{len(view)}.png"), full_page=True)
            sign_out = page.get_by_role("button", name="Sign out").bounding_box()
            assert sign_out["x"] + sign_out["width"] <= 320, (view, sign_out)


def test_the_automatic_refresh_can_be_turned_off(page, tmp_path, tiny_lm):
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        page.clock.install()
        _sign_in(page, server)
        rows = page.locator("#worklist-body tr")
        expect(page.locator("#worklist-empty")).to_be_visible()
        auto = page.get_by_label("Update automatically")
        expect(auto).to_be_checked()
        auto.uncheck()
        _ct_with_report(server)
        page.clock.run_for(45_000)
        page.wait_for_timeout(300)  # a real moment for a redraw that must not come
        expect(rows).to_have_count(0)
        page.get_by_role("button", name="Refresh").click()
        expect(rows).to_have_count(1)
        auto.check()
        _ct_with_report(server)
        page.clock.run_for(21_000)
        expect(rows).to_have_count(2)


def _axe_violations(page: Any, view: str) -> list[str]:
    """axe-core's violations of the page as it is now (every rule it runs by default: WCAG 2.x
    A and AA, and its best practices), one line each."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [f"{view}: {v['id']} ({v['impact']}) at {v['nodes'][0]['target']}" for v in found]


def test_axe_finds_no_violation_in_any_view(page, tmp_path, tiny_lm):
    """Sign-in (also with a refused key), the worklist, a study with its draft, an error
    about a field, the sign dialog, the signed report and its amend dialog, and the study at
    320 CSS px."""
    from playwright.sync_api import expect

    with _serve(tmp_path, tiny_lm) as server:
        study, report = _ct_with_report(server)
        found: list[str] = []
        page.goto(server.base + "/")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        found += _axe_violations(page, "sign-in")
        _sign_in(page, server, key="tlm_00000000_" + "x" * 43)
        expect(page.locator("#alerts .error-code")).to_have_text("unauthorized")
        found += _axe_violations(page, "refused key")
        _sign_in(page, server)
        expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
        expect(page.locator("#worklist-body tr")).to_have_count(1)
        found += _axe_violations(page, "worklist")

        page.goto(f"{server.base}/#/study/{study['id']}")
        expect(page.locator("#study-image")).to_have_attribute("data-window", "default")
        expect(page.get_by_label("Report text (draft)")).to_have_value(report["text"])
        found += _axe_violations(page, "study")
        page.get_by_role("button", name="Ask", exact=True).click()
        expect(page.locator("#alerts")).to_contain_text("type a question first")
        found += _axe_violations(page, "field error")
        page.get_by_role("button", name="Sign report…").click()
        dialog = page.get_by_role("dialog", name="Sign this report?")
        expect(dialog).to_be_visible()
        found += _axe_violations(page, "sign dialog")
        dialog.get_by_role("button", name="Sign report", exact=True).click()
        expect(page.locator("#report-badge")).to_have_text("Final")
        found += _axe_violations(page, "signed report")
        page.get_by_role("button", name="Amend report…").click()
        expect(page.get_by_role("dialog", name="Amend this signed report")).to_be_visible()
        found += _axe_violations(page, "amend dialog")
        page.keyboard.press("Escape")

        page.set_viewport_size({"width": 320, "height": 640})
        page.reload()
        expect(page.locator("#study-image")).to_have_attribute("data-window", "default")
        found += _axe_violations(page, "study at 320 px")
        assert found == []
        assert _errors_from_4xx_are_expected(page.problems) == [], page.problems
