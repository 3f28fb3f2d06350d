"""`eval judge`: score answers with LLaVA-Med's GPT-4 judge protocol on any OpenAI-compatible
`/v1/chat/completions` endpoint.

Owns the HTTP client (rate limit, bounded retries with backoff on 429 / 5xx / timeouts /
malformed replies), the on-disk judgement cache and `run_judge`, which pairs questions, answers
and references BY QUESTION ID (the original zips the files by position). The prompt, the score
parsing and the summary are in `judge_protocol.py`.

    tinyllava-med eval judge --questions llava_med_eval_qa50_qa.jsonl --answers ours.jsonl \\
        --endpoint https://api.openai.com/v1 --model gpt-4-0314 --out judge/ours.jsonl
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tinyllava_med.eval.judge_protocol import (
    MalformedJudgement,
    build_messages,
    parse_scores,
    summarize,
)
from tinyllava_med.eval.metrics import index_predictions, load_predictions
from tinyllava_med.eval.report import write_json

__all__ = [
    "JudgeClient",
    "JudgeError",
    "JudgeFailed",
    "cache_key",
    "chat_completions_url",
    "judge_markdown",
    "run_judge",
]

log = logging.getLogger(__name__)

TEMPERATURE = 0.0  # as the original (`llm.GPT.temperature`)
_FATAL_STATUS = (401, 403, 404)


class JudgeError(RuntimeError):
    """The endpoint refuses every request (bad key, wrong URL or model): stop the run."""


class JudgeFailed(RuntimeError):
    """One question could not be judged (retries exhausted, or the request was rejected)."""


def chat_completions_url(endpoint: str) -> str:
    """`https://host/v1`, `https://host` or the full `.../chat/completions` URL."""
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + "/chat/completions" if url.endswith("/v1") else url + "/v1/chat/completions"


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
    """SHA-256 of (model, messages): the same question to the same judge is asked once."""
    blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeClient:
    """Sequential judge calls: at most `max_rps` requests a second (None: no limit), up to
    `max_retries` retries per question with exponential backoff (`Retry-After` honoured)."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        max_rps: float | None = 1.0,
        max_retries: int = 5,
        timeout_s: float = 120.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ):
        if max_rps is not None and max_rps <= 0:
            raise ValueError(f"max_rps must be positive or None, got {max_rps}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url, self.model = chat_completions_url(endpoint), model
        self.max_rps, self.max_retries = max_rps, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)
        self._next_request_at = 0.0
        self.requests = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _throttle(self) -> None:
        now = time.monotonic()
        if now < self._next_request_at:
            time.sleep(self._next_request_at - now)
        if self.max_rps is not None:
            self._next_request_at = max(now, self._next_request_at) + 1.0 / self.max_rps

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)

    def judge(self, messages: list[dict[str, str]]) -> tuple[str, tuple[float, float]]:
        """The judge's reply (stripped) and its two scores."""
        payload = {"model": self.model, "messages": messages, "temperature": TEMPERATURE}
        last_error, delay = "no attempt", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(delay)
            self._throttle()
            self.requests += 1
            delay = self._delay(attempt, None)
            try:
                resp = self._http.post(self.url, json=payload)
            except httpx.TransportError as e:  # timeouts, refused or dropped connections
                last_error = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code in _FATAL_STATUS:
                raise JudgeError(f"{self.url} answered {resp.status_code}: {resp.text[:200]}")
            if resp.status_code == 429 or resp.status_code >= 500:
                last_error = f"HTTP {resp.status_code}"
                delay = self._delay(attempt, resp.headers.get("retry-after"))
                continue
            if resp.status_code >= 400:
                raise JudgeFailed(f"HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                content = str(resp.json()["choices"][0]["message"]["content"]).strip()
                return content, parse_scores(content)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                kind = (
                    "malformed judgement"
                    if isinstance(e, MalformedJudgement)
                    else "malformed response"
                )
                last_error = f"{kind}: {e}"
        raise JudgeFailed(
            f"gave up after {self.max_retries + 1} attempts; last error: {last_error}"
        )


class JudgeCache:
    """One small JSON file per judgement under `root`, named by `cache_key`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / f"{key}.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            parse_scores(record["content"])
            return record
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: ask again

    def put(self, key: str, record: dict[str, Any]) -> None:
        write_json(self.root / f"{key}.json", record)


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows, bad = load_predictions(path)
    if bad:
        raise ValueError(f"{path}: unreadable JSON on line(s) {bad[:10]}")
    return rows


def run_judge(
    questions_path: str | Path,
    answers_path: str | Path,
    reference_path: str | Path | None = None,
    *,
    endpoint: str,
    model: str,
    out_path: str | Path,
    cache_dir: str | Path,
    summary_path: str | Path | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    max_rps: float | None = 1.0,
    max_retries: int = 5,
    timeout_s: float = 120.0,
    backoff_s: float = 1.0,
) -> dict[str, Any]:
    """Judge every qa50 question that has an answer and a reference; write one jsonl row per
    judged question to `out_path` and the summary to `summary_path` (default: `out_path` with
    `.summary.json`); return the summary. The reference is `reference_path`'s `text` (answers
    format), else the question's `gpt4_answer`. A question the judge could not score is listed
    under `failed` and left out of the means; a rerun asks only for what is not cached."""
    questions = _read_jsonl(questions_path)
    answers, duplicates = index_predictions(_read_jsonl(answers_path))
    references = index_predictions(_read_jsonl(reference_path))[0] if reference_path else {}
    q_ids = [str(q.get("question_id")) for q in questions]
    known = set(q_ids)
    summary: dict[str, Any] = {
        "model": model,
        "endpoint": chat_completions_url(endpoint),
        "n_questions": len(questions),
        "missing": [q for q in q_ids if q not in answers],
        "extra": [a for a in answers if a not in known],
        "no_reference": [],
        "failed": [],
        "answer_failed": [],
        "duplicates": duplicates,
        "requests": 0,
        "cache_hits": 0,
    }
    cache = JudgeCache(cache_dir)
    rows: list[dict[str, Any]] = []
    with JudgeClient(
        endpoint,
        model,
        api_key=os.environ.get(api_key_env),
        max_rps=max_rps,
        max_retries=max_retries,
        timeout_s=timeout_s,
        backoff_s=backoff_s,
    ) as client:
        for qid, question in zip(q_ids, questions, strict=True):
            answer = answers.get(qid)
            if answer is None:
                continue
            ref = (
                references.get(qid, {}).get("text")
                if reference_path
                else question.get("gpt4_answer")
            )
            if ref is None:
                summary["no_reference"].append(qid)
                continue
            if isinstance(answer.get("metadata"), Mapping) and answer["metadata"].get("failed"):
                summary["answer_failed"].append(qid)  # judged as written (usually empty)
            text = str(answer.get("text") or "")
            rows.append(_judge_one(client, cache, qid, question, str(ref), text, summary))
        summary["requests"] = client.requests
    _write_jsonl(out_path, rows)
    summary["n_judged"] = sum(r["scores"] is not None for r in rows)
    summary["scores"] = summarize(rows)
    write_json(summary_path or Path(out_path).with_suffix(".summary.json"), summary)
    return summary


def _judge_one(
    client: JudgeClient,
    cache: JudgeCache,
    qid: str,
    question: Mapping[str, Any],
    ref: str,
    answer: str,
    summary: dict[str, Any],
) -> dict[str, Any]:
    messages = build_messages(question, ref, answer)
    key = cache_key(client.model, messages)
    row = {**question, "question": question.get("text"), "ans1": ref, "ans2": answer}
    record = cache.get(key)
    if record is not None:
        summary["cache_hits"] += 1
        return {**row, "gpt_eval": record["content"], "scores": record["scores"], "error": None}
    try:
        content, scores = client.judge(messages)
    except JudgeFailed as e:
        log.warning("question %s not judged: %s", qid, e)
        summary["failed"].append(qid)
        return {**row, "gpt_eval": None, "scores": None, "error": str(e)}
    cache.put(key, {"model": client.model, "content": content, "scores": list(scores)})
    return {**row, "gpt_eval": content, "scores": list(scores), "error": None}


def _write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    os.replace(tmp, path)


def judge_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table (reference = Assistant 1, ours = Assistant 2)."""
    lines = [
        f"# Judge scores ({summary['model']})",
        "",
        f"Judged {summary.get('n_judged', 0)} of {summary['n_questions']} questions.",
    ]
    for name in ("missing", "extra", "no_reference", "failed", "answer_failed"):
        if summary.get(name):
            lines.append(f"- **{name}** ({len(summary[name])}): {', '.join(summary[name][:20])}")
    lines += [
        "",
        "| group | n | reference | ours | relative % |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    scores = summary["scores"]
    groups = [
        *scores["by_type"].items(),
        *scores["by_domain"].items(),
        ("overall", scores["overall"]),
    ]
    for name, s in groups:
        if s:
            lines.append(
                f"| {name} | {s['data_size']} | {s['reference_score']:.2f} | {s['pred_score']:.2f} "
                f"| {s['pred_relative_score']:.2f} |"
            )
    return "\n".join(lines) + "\n"
