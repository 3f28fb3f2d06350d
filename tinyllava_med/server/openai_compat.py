"""The OpenAI chat-completions wire format, without HTTP: request schema, turning messages into
(image, question, history) for a LLaVA model, and the response / stream-chunk bodies.

A LLaVA conversation is about one image: exactly one `image_url` part must appear (in any user
message); earlier user/assistant pairs become the history, the last user message the question.
System messages are accepted and not used: the served model keeps the system prompt it was
trained with. Images come as data URIs (`data:image/png;base64,...`, DICOM as
`data:application/dicom;base64,...`); http(s) URLs only when `allow_remote_image_urls` is set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tinyllava_med.server.errors import APIError
from tinyllava_med.server.settings import TURN_CHARS

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]+)*?),(?P<data>.*)$", re.S
)


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")


def refuse_unsupported(body: ChatRequest) -> None:
    """400 `unsupported_parameter` for what a client asks that this server would otherwise
    ignore, so nobody relies on it unaware (vLLM refuses what it does not support too): stop
    sequences, tools and function calls, a JSON or schema response format, log probabilities.
    Empty or default values (`stop: null`, `tool_choice: "none"`) are fine."""
    extra = body.model_extra or {}
    asked = []
    for name in ("stop", "tools", "functions", "function_call", "logprobs", "top_logprobs"):
        if extra.get(name) not in (None, False, [], "", "none"):
            asked.append(name)
    if extra.get("tool_choice") not in (None, "none", "auto"):
        asked.append("tool_choice")
    response_format = extra.get("response_format")
    if response_format not in (None, {"type": "text"}):
        asked.append("response_format")
    if asked:
        asked = sorted(asked)
        raise APIError(
            400,
            "unsupported_parameter",
            f"this server does not support {', '.join(asked)}: the model answers "
            "in plain text, without stop sequences, tools or log probabilities",
            {"parameters": asked},
        )


@dataclass
class Conversation:
    image_url: str
    question: str
    history: list[tuple[str, str]] = field(default_factory=list)


def _texts_and_images(message: ChatMessage) -> tuple[str, list[str]]:
    if message.content is None:
        return "", []
    if isinstance(message.content, str):
        return message.content, []
    texts = [p.text or "" for p in message.content if p.type == "text"]
    images = [p.image_url.url for p in message.content if p.type == "image_url" and p.image_url]
    return "\n".join(t for t in texts if t), images


def conversation_of(messages: list[ChatMessage], max_chars: int) -> Conversation:
    """The image, the question and the earlier turns; 400 for what a LLaVA model cannot take,
    422 for a conversation over `max_chars` (`Settings.max_conversation_chars`)."""
    images: list[str] = []
    turns: list[list[str]] = []  # [user text, assistant text]
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        text, imgs = _texts_and_images(m)
        images += imgs
        if m.role == "user":
            if turns and len(turns[-1]) == 1:  # consecutive user messages: one turn
                turns[-1][0] = f"{turns[-1][0]}\n{text}".strip()
            else:
                turns.append([text])
        else:
            if not turns or len(turns[-1]) != 1:
                raise APIError(400, "bad_messages", "an assistant message must follow a user one")
            turns[-1].append(text)
    if not turns or len(turns[-1]) != 1:
        raise APIError(400, "bad_messages", "the last message must be the user's question")
    if not images:
        raise APIError(400, "image_required", "send one image as an image_url part (a data: URI)")
    if len(images) > 1:
        raise APIError(
            400, "too_many_images", f"the model answers about one image; got {len(images)}"
        )
    size = sum(len(text) + TURN_CHARS for turn in turns for text in turn)
    if size > max_chars:  # every turn goes into the prompt, which the engine does not cut
        raise APIError(
            422,
            "conversation_too_long",
            f"the conversation's {len(turns)} turns count {size} characters (each message "
            f"{TURN_CHARS} more for its role markers); the limit is {max_chars}: send fewer "
            "earlier turns",
        )
    question = turns[-1][0].strip()
    if not question:
        raise APIError(400, "empty_question", "the last user message has no text")
    return Conversation(images[0], question, [(u, a) for u, a in turns[:-1]])


def decode_data_uri(url: str) -> bytes:
    m = _DATA_URI.match(url)
    if m is None or ";base64" not in (m.group("params") or ""):
        raise APIError(400, "bad_image_url", "expected a base64 data URI: data:<type>;base64,...")
    try:
        # line breaks as MIME encoders write them (base64.encodebytes: 76 columns) are not data
        return base64.b64decode(re.sub(r"\s+", "", m.group("data")), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, "bad_image_url", "the data URI is not valid base64") from e


# --- responses ---------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


PROVENANCE = ("model", "variant", "quantization", "model_version", "model_weights")


def fingerprint(info: dict[str, Any]) -> str:
    """OpenAI's `system_fingerprint` for the model answering: it changes with the model, its
    variant, quantization, version or weights. A gateway in front of this server compares it
    with the card it records reports under (`remote_engine`)."""
    served = json.dumps({k: info.get(k) for k in PROVENANCE}, sort_keys=True, default=str)
    return "tlm_" + hashlib.sha256(served.encode()).hexdigest()[:16]


def completion_body(
    cid: str,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    new_tokens: int,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": system_fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, new_tokens),
    }


def chunk_body(
    cid: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": system_fingerprint,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        body["choices"] = []
        body["usage"] = usage_
    return body


def model_card(info: dict[str, Any]) -> dict[str, Any]:
    """One `/v1/models` entry; `tinyllava_med` carries the provenance a gateway records."""
    return {
        "id": str(info.get("model")),
        "object": "model",
        "created": 0,
        "owned_by": "tinyllava-med",
        "tinyllava_med": {
            **{
                k: info.get(k)
                for k in ("variant", "quantization", "model_version", "model_weights")
                + ("server_version",)
            },
            "system_fingerprint": fingerprint(info),
        },
    }
