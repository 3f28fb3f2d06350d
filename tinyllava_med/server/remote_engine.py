"""An engine that forwards inference to a remote OpenAI-compatible server (vLLM, SGLang,
`transformers serve`, or another instance of this server), so the hospital-facing API, database,
auth and audit stay in this gateway while the model runs on a GPU cluster.

It is a `BatchingEngine` with the same queue bound, futures, token callbacks, cancellation and
metrics; instead of batching locally it sends each request as a streamed chat completion (the
remote batches), with the rendered image as a PNG data URI in the first user message and earlier
turns as user/assistant messages. `settings.engine = "remote"` selects it.

Provenance: the model id is the remote's (`remote_model`, or the first of its `/v1/models`);
when the remote is this server, its model card carries variant, quantization and version, which
every stored report records; otherwise quantization is recorded as `remote`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from PIL import Image

from tinyllava_med import __version__
from tinyllava_med.model.generate import Answer
from tinyllava_med.server.engine import BatchingEngine, EngineFailed, EngineMetrics, _Request
from tinyllava_med.server.settings import without_password

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteModel:
    url: str
    model_id: str
    card: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        ours = self.card.get("tinyllava_med") or {}
        return {
            "model": self.model_id,
            "variant": ours.get("variant") or self.model_id,
            "quantization": ours.get("quantization") or "remote",
            "model_version": ours.get("model_version"),
            "model_weights": ours.get("model_weights"),
            # the gateway's own version (its card showed none): its reports record it too;
            # another instance of this server as the remote says its own
            "server_version": __version__,
            "remote_server_version": ours.get("server_version"),
            "engine": "remote",
            "remote_url": without_password(self.url),  # /readyz shows it to anyone
        }


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(
    image: Image.Image, question: str, history: tuple[tuple[str, str], ...]
) -> list[dict[str, Any]]:
    picture = {"type": "image_url", "image_url": {"url": png_data_uri(image)}}
    turns = [*history, (question, None)]
    messages: list[dict[str, Any]] = []
    for i, (q, a) in enumerate(turns):
        parts: list[dict[str, Any]] = [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": [*parts, picture] if i == 0 else parts})
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    return messages


class RemoteEngine(BatchingEngine):
    def __init__(
        self,
        *,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        max_concurrency: int = 8,
        max_queue: int = 64,
        timeout_s: float = 120.0,
        metrics: EngineMetrics | None = None,
    ) -> None:
        super().__init__(max_queue=max_queue, metrics=metrics)
        self.url = url.rstrip("/")
        self.model_id = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10)
        )
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="remote")

    # --- lifecycle -------------------------------------------------------------------------

    def connect(self) -> RemoteModel:
        """Ask the remote which models it serves and pick ours; raises while it is down."""
        r = self._http.get("/models")
        r.raise_for_status()
        cards = r.json().get("data") or []
        if self.model_id is None:
            if not cards:
                raise EngineFailed(f"{self.url} serves no models")
            card = cards[0]
        else:
            card = next((c for c in cards if c.get("id") == self.model_id), {"id": self.model_id})
        remote = RemoteModel(self.url, str(card["id"]), card)
        self.lm = remote
        return remote

    def _model_changed(self) -> None:
        """The remote now answers with another model, quantization or weights than the card
        reports are recorded under (it restarted with others): read its card again, so the
        next question is recorded as what answers it, and fail this one rather than record it
        under the old card (the route took the card before asking)."""
        try:
            self.connect()
        except Exception as e:  # the next question finds out again
            log.warning(
                "remote engine %s: could not read its models again: %s",
                without_password(self.url),
                type(e).__name__,
            )
        log.warning(
            "remote engine %s now serves another model; its card was read again",
            without_password(self.url),
        )
        raise EngineFailed(
            "the remote engine now serves another model, quantization or weights than this "
            "question was to be recorded under: ask again"
        )

    def connect_until_ready(self, stop: threading.Event, retry_s: float = 5.0) -> RemoteModel:
        while True:
            try:
                return self.connect()
            except Exception as e:
                log.warning("remote engine %s not reachable yet: %s", without_password(self.url), e)
                if stop.wait(retry_s):
                    raise EngineFailed("stopped before the remote engine answered") from e

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()
        self.lm = None

    def _enqueue(self, req: _Request) -> None:
        self._pool.submit(self._call, req)

    # --- one request ---------------------------------------------------------------------

    def _call(self, req: _Request) -> None:
        try:
            if req.cancelled.is_set():
                req.future.cancel()
                return
            answer = self._complete(req)
            if req.cancelled.is_set():
                req.future.cancel()
                if self.metrics:
                    self.metrics.on_cancel(1)
            elif not req.future.done():
                req.future.set_result(answer)
        except Exception as e:
            if not req.future.done():
                req.future.set_exception(
                    e if isinstance(e, EngineFailed) else EngineFailed(f"remote engine: {e}")
                )
        finally:
            self._finish([req])

    def _complete(self, req: _Request) -> Answer:
        assert isinstance(self.lm, RemoteModel)
        assert isinstance(req.image, Image.Image)  # `prepare` keeps images for a remote model
        body: dict[str, Any] = {
            "model": self.lm.model_id,
            "messages": chat_messages(req.image, req.question, req.history),
            "max_tokens": req.params.max_new_tokens,
            "temperature": req.params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if req.params.temperature > 0:
            body["top_p"] = req.params.top_p
        # the model the reports are recorded under: another instance of this server says in
        # each chunk which one answers (OpenAI's system_fingerprint)
        recorded = (self.lm.card.get("tinyllava_med") or {}).get("system_fingerprint")
        start = time.perf_counter()
        text: list[str] = []
        finish: Literal["stop", "length", "cancelled"] | None = None
        usage: dict[str, int] = {}
        with self._http.stream("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise EngineFailed(_remote_error(r))
            for line in r.iter_lines():
                if req.cancelled.is_set():
                    return Answer("".join(text), 0, len(text), 0.0, "cancelled")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finish = finish or "stop"  # a server that names no reason but ends well
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EngineFailed(f"remote engine: {chunk['error'].get('message')}")
                answering = chunk.get("system_fingerprint")
                if recorded and answering and answering != recorded:
                    self._model_changed()
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta and not text:
                        delta = delta.lstrip()  # the stored answer starts with no space
                    if delta:
                        if not req.first_token:
                            req.first_token = True
                            if self.metrics:
                                self.metrics.on_first_token(time.perf_counter() - req.submitted)
                        text.append(delta)
                        if req.on_token is not None:
                            req.on_token(delta)
                    reason = choice.get("finish_reason")
                    if reason in ("stop", "length"):
                        finish = reason
                    elif reason is not None:  # content_filter, tool_calls, ...: not an answer
                        raise EngineFailed(f"remote engine ended its answer with {reason!r}")
        if finish is None:  # the stream ended without saying how the answer did: a remote
            # that crashed behind a proxy, a proxy's read timeout. Cut short: not an answer
            raise EngineFailed("remote engine: the answer's stream ended before it finished")
        seconds = time.perf_counter() - start
        new_tokens = int(usage.get("completion_tokens") or len(text))
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        if self.metrics:
            self.metrics.on_batch(1, seconds, new_tokens, prompt_tokens)
        return Answer(
            text="".join(text).strip(),
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            latency_ms=seconds * 1000,
            finish_reason=finish,
        )


def _remote_error(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        message = r.text[:200]
    return f"remote engine answered {r.status_code}: {message}"
