"""`/v1/chat/completions` and `/v1/models`, driven by the official `openai` client."""

from __future__ import annotations

import base64

import openai
import pytest
from api_helpers import CT_SMALL, make_api, png_bytes
from sqlalchemy import select

from tinyllava_med.server.db.models import AuditEvent, Report

QUESTION = "What is the modality?"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


CT_URI = data_uri(CT_SMALL.read_bytes(), "application/dicom")


def user(text: str, image: str | None = None) -> dict:
    parts: list[dict] = [{"type": "text", "text": text}]
    if image:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": parts}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture
def client(api):
    return openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=api.keys["pacs"],
        http_client=api.client,
        max_retries=0,
    )


def test_models_and_a_completion_equal_to_the_rest_answer(api, client):
    models = client.models.list().data
    assert len(models) == 1
    model = models[0].id
    card = models[0].model_extra["tinyllava_med"]
    assert card["quantization"] == "none" and card["server_version"]

    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "ignored"}, user(QUESTION, CT_URI)],
        max_tokens=12,
    )
    assert out.object == "chat.completion" and out.model == model
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    rest = api.post(
        "/v1/ask",
        headers=api.h(),
        files={"file": ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom")},
        data={"question": QUESTION, "max_new_tokens": "12"},
    ).json()["report"]
    assert choice.message.content == rest["answer"]  # greedy: the same answer as REST
    assert out.usage.completion_tokens == rest["tokens"]["completion"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    # streamed: the same text in pieces, then the finish reason and the usage
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[user(QUESTION, CT_URI)],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content and len([c for c in chunks if c.choices]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens

    # the image, sent again with each turn, was processed once and its prompt prefix reused
    pixels, prefixes = api.app.state.engine.pixels, api.app.state.engine.prefixes
    # misses: the CT via chat, then via /v1/ask (another key); hits: the streamed chat
    assert (pixels.misses, pixels.hits, prefixes.misses, prefixes.hits) == (2, 1, 2, 1)

    # a follow-up question: earlier turns are part of the prompt
    follow = client.chat.completions.create(
        model=model,
        messages=[
            user(QUESTION, data_uri(png_bytes(), "image/png")),
            {"role": "assistant", "content": "ct"},
            user("Which organ is shown?"),
        ],
        max_tokens=4,
    )
    alone = client.chat.completions.create(
        model=model,
        messages=[user("Which organ is shown?", data_uri(png_bytes(), "image/png"))],
        max_tokens=4,
    )
    assert follow.usage.prompt_tokens > alone.usage.prompt_tokens
    # an earlier turn sent back with the image token in it (it was a 500: two images)
    echoed = client.chat.completions.create(
        model=model,
        messages=[
            user(QUESTION, data_uri(png_bytes(), "image/png")),
            assistant("<image>"),
            user("<image> again?"),
        ],
        max_tokens=4,
    )
    assert echoed.choices[0].finish_reason in ("stop", "length")

    with api.app.state.session_factory() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "chat.completion")).all()
        assert len(events) == 5 and all(e.outcome == "ok" for e in events)
        assert len(s.scalars(select(Report)).all()) == 1  # only the REST ask stored a report


@pytest.mark.parametrize(
    "messages, error, code",
    [
        ([user(QUESTION)], openai.BadRequestError, "image_required"),
        (
            [user(QUESTION, CT_URI), user("again", CT_URI)],
            openai.BadRequestError,
            "too_many_images",
        ),
        (
            [user(QUESTION, "http://example.org/x.png")],
            openai.BadRequestError,
            "remote_image_refused",
        ),
        ([user(QUESTION, "data:image/png;base64,@@@")], openai.BadRequestError, "bad_image_url"),
        (
            [user(QUESTION, data_uri(b"DICM broken", "application/dicom"))],
            openai.APIStatusError,
            None,
        ),
        ([{"role": "assistant", "content": "hi"}], openai.BadRequestError, "bad_messages"),
        ([user("", CT_URI)], openai.BadRequestError, "empty_question"),
        (  # earlier turns go into the prompt whole: 3 x 2 x 1500 characters is over 6000
            [m for _ in range(3) for m in (user("x" * 1500), assistant("y" * 1500))]
            + [user(QUESTION, CT_URI)],
            openai.UnprocessableEntityError,
            "conversation_too_long",
        ),
        (  # as are empty turns, each with its role markers
            [m for _ in range(200) for m in (user("a"), assistant(""))] + [user(QUESTION, CT_URI)],
            openai.UnprocessableEntityError,
            "conversation_too_long",
        ),
    ],
)
def test_bad_requests_are_4xx_in_the_error_shape(client, messages, error, code):
    model = client.models.list().data[0].id
    with pytest.raises(error) as e:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert 400 <= e.value.status_code < 500
    body = e.value.response.json()["error"]
    assert body["message"] and (code is None or body["code"] == code)


def test_what_would_be_ignored_is_refused_and_wrapped_base64_is_read(client):
    """Stop sequences, tools, a JSON response format and log probabilities were accepted and
    ignored (200, plain text): now 400 unsupported_parameter, naming them; their empty or
    default values go through. base64 wrapped at 76 columns (MIME encoders) is read (it was
    400 bad_image_url)."""
    model = client.models.list().data[0].id
    ask = {"model": model, "messages": [user(QUESTION, CT_URI)], "max_tokens": 2}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for extra, named in (
        ({"stop": ["right"]}, ["stop"]),
        ({"tools": [tool], "tool_choice": "required"}, ["tool_choice", "tools"]),
        ({"response_format": {"type": "json_object"}}, ["response_format"]),
        ({"logprobs": True}, ["logprobs"]),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**ask, **extra)
        body = e.value.response.json()["error"]
        assert body["code"] == "unsupported_parameter", body
        assert body["detail"]["parameters"] == named
    fine = client.chat.completions.create(
        **ask, stop=None, tool_choice="none", response_format={"type": "text"}, logprobs=False
    )
    assert fine.choices[0].message.content is not None
    wrapped = "data:application/dicom;base64," + base64.encodebytes(CT_SMALL.read_bytes()).decode()
    assert "\n" in wrapped
    got = client.chat.completions.create(
        model=model, messages=[user(QUESTION, wrapped)], max_tokens=2
    )
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.system_fingerprint and got.system_fingerprint.startswith("tlm_")


def test_unknown_model_limits_and_keys(api, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[user(QUESTION, CT_URI)])
    model = client.models.list().data[0].id
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(
            model=model, messages=[user(QUESTION, CT_URI)], max_tokens=10**6
        )
    anonymous = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key="nope",
        http_client=api.client,
        max_retries=0,
    )
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_remote_image_urls_only_from_the_hosts_named(tmp_path, sqlite_url, tiny_lm):
    """With allow_remote_image_urls the server fetches a chat image_url itself, from inside the
    hospital network: only from `remote_image_hosts` (here an image server on this machine's
    loopback), never from another address a caller names (the same server under another name
    stands in for any internal host). On without a host list is a settings error."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tinyllava_med.server.settings import Settings

    with pytest.raises(ValueError, match="allow_remote_image_urls needs remote_image_hosts"):
        Settings(data_dir=tmp_path, allow_remote_image_urls=True)
    fetched: list[str] = []
    image = png_bytes()

    class Images(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        overrides = {"allow_remote_image_urls": True, "remote_image_hosts": [f"127.0.0.1:{port}"]}
        for api in make_api(tmp_path, sqlite_url, tiny_lm, **overrides):
            client = openai.OpenAI(
                base_url="http://testserver/v1",
                api_key=api.keys["pacs"],
                http_client=api.client,
                max_retries=0,
            )
            model = client.models.list().data[0].id
            url = f"http://127.0.0.1:{port}/wado/slice.png"
            out = client.chat.completions.create(
                model=model, messages=[user(QUESTION, url)], max_tokens=3
            )
            assert out.choices[0].message.content is not None and fetched == ["/wado/slice.png"]
            for elsewhere in (f"http://localhost:{port}/x.png", f"http://127.0.0.1:{port + 1}/x"):
                with pytest.raises(openai.BadRequestError) as refused:
                    client.chat.completions.create(
                        model=model, messages=[user(QUESTION, elsewhere)], max_tokens=3
                    )
                assert refused.value.body["code"] == "remote_image_refused"
            assert fetched == ["/wado/slice.png"]  # nothing else was asked for
    finally:
        httpd.shutdown()
