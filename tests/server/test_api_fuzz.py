"""Every operation of the served OpenAPI schema, fuzzed by schemathesis against a live server
(tiny model, real database: SQLite and PostgreSQL): no request answers a server error, and
every refusal under `/v1` comes in the project's error shape (a streamed answer, whose 200 goes
out first, must not end in an internal error event either).

Path parameters name a study and a report that exist (an uploaded CT_small and a question about
it) so that bodies and query strings reach the routes' own logic instead of a 404; the rest is
generated from the schema, valid and invalid, deterministically (`derandomize`). A report's text
edited to nothing (the FHIR export answered 500) and a temperature of 1e-300 (sampling failed
on infinite logits) are what this found. Deleting is left out: the study and report must stay for the other operations.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from api_helpers import live_server, multipart_related, post_ct
from hypothesis import HealthCheck, Phase, given, settings

from tinyllava_med.server.app import create_app
from tinyllava_med.server.db.migrate import upgrade
from tinyllava_med.server.settings import Settings

EXAMPLES = 40

# (method, path template, error code) of the 5xx answers that are the API's contract: this
# server has no PACS to retrieve from, and says so
SERVICE_ANSWERS = {("POST", "/v1/studies/retrieve", "pacs_not_configured")}

# answered in another protocol's error shape, by design
OTHER_SHAPES = ("/v1/chat/completions", "/v1/models", "/dicomweb/", "/metrics")


STOW = 'multipart/related; type="application/dicom"'


@schemathesis.serializer(STOW)
def _stow_body(ctx: Any, value: Any) -> bytes:
    """A STOW-RS request of one part holding the generated value as its DICOM file (the schema
    says nothing of the parts, so schemathesis cannot make them itself)."""
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    body, content_type = multipart_related(data, boundary="fuzz-boundary")
    ctx.case.headers = {**(ctx.case.headers or {}), "Content-Type": content_type}
    return body


@pytest.fixture
def server(tmp_path, database_url, tiny_lm) -> Iterator[tuple[str, str]]:
    upgrade(database_url)
    app = create_app(
        Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            model="tiny",
            batch_window_ms=5,
            default_max_new_tokens=8,
        ),
        model=tiny_lm,
    )
    with live_server(app, name="fuzz-server") as base:
        yield base, app.state.first_admin_key


def _problem(case: Any, response: Any) -> str | None:
    """What is wrong with `response`, if anything."""
    status, path = response.status_code, case.operation.path
    code, shaped = None, False
    content_type = response.headers.get("content-type") or [""]  # a list per header name
    if "json" in content_type[0]:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = body["error"].get("code")
            shaped = set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}
    if status >= 500 and (case.method.upper(), path, code) not in SERVICE_ANSWERS:
        return f"{status} {code}"
    if "text/event-stream" in content_type[0] and '"internal_error"' in response.text:
        return "a streamed answer ended in an internal error"  # its 200 went out first
    ours = path.startswith("/v1") and not path.startswith(OTHER_SHAPES)
    if status >= 400 and ours and not shaped:
        return f"{status} not in the error shape: {response.text[:200]}"
    return None


def test_no_generated_request_answers_a_server_error(server):
    base, admin = server
    headers = {"Authorization": f"Bearer {admin}"}
    study_id = post_ct(base, headers)
    r = httpx.post(
        f"{base}/v1/studies/{study_id}/questions",
        headers=headers,
        json={"question": "What is shown?"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    ids = {"study_id": study_id, "report_id": r.json()["id"]}

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    problems: list[str] = []
    statuses: Counter[int] = Counter()
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "DELETE":
            continue
        tested += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            for name, value in ids.items():
                if case.path_parameters and name in case.path_parameters:
                    case.path_parameters[name] = value
            response = case.call(base_url=base, headers=headers, timeout=60)
            statuses[response.status_code] += 1
            if (problem := _problem(case, response)) is not None:
                problems.append(f"{case.method} {case.operation.path}: {problem}")

        run()
    # the schema was read, and the fuzzing got past validation into the routes
    assert tested >= 25 and sum(statuses.values()) >= tested * EXAMPLES // 2, (tested, statuses)
    assert statuses[200] + statuses[201] >= 50 and statuses[422] >= 50, statuses
    print(sorted(statuses.items()))
    assert not problems, sorted(set(problems))


def test_the_documented_text_pattern_is_what_the_api_accepts():
    """Report text, reasons, key names and questions document their refusal of control
    characters as a JSON Schema pattern; it accepts exactly what the validator accepts."""
    import re

    from pydantic import ValidationError

    from tinyllava_med.server.schemas import QuestionCreate, ReportUpdate

    schema = ReportUpdate.model_json_schema()["properties"]["text"]["anyOf"][0]
    question = QuestionCreate.model_json_schema()["properties"]["question"]
    assert question["pattern"] == schema["pattern"]
    pattern = re.compile(schema["pattern"])  # \\uXXXX reads the same in Python's re
    for code in [*range(0x20), 0x7F, 0x80, 0x85, 0xA0, 0x2028]:
        text = f"left{chr(code)}right"
        try:
            ReportUpdate(text=text)
            accepted = True
        except ValidationError:
            accepted = False
        assert bool(pattern.fullmatch(text)) == accepted, hex(code)
    assert {"\t", "\n", "\r"} == {chr(c) for c in range(0x20) if pattern.fullmatch(chr(c))}
