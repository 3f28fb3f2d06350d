"""The judge against a scripted OpenAI-compatible server on loopback: 429 / 500 / timeouts /
malformed replies, retries, the summary numbers, and a rerun served from the cache."""

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinyllava_med.eval.judge import JudgeClient, JudgeError, judge_markdown, run_judge
from tinyllava_med.eval.judge_protocol import MalformedJudgement, parse_scores


class FakeJudge:
    """Replies per question id (`[Question]\\nquestion <id>?`): a list of actions consumed one per
    request, the last one repeated. Actions: an int status, ("sleep", s), ("text", reply),
    "not-json", "no-choices"."""

    def __init__(self) -> None:
        self.script: dict[str, list] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def action(self, body: dict) -> object:
        match = re.search(r"\[Question\]\nquestion (\w+)\?", body["messages"][1]["content"])
        qid = match.group(1) if match else "?"
        with self.lock:
            steps = self.script.get(qid, [("text", "5 5\nfine")])
            return steps.pop(0) if len(steps) > 1 else steps[0]


@pytest.fixture
def fake() -> Iterator[tuple[FakeJudge, str]]:
    judge = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with judge.lock:
                judge.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), **body}
                )
            act = judge.action(body) if body["model"] != "revoked" else 401
            if isinstance(act, tuple) and act[0] == "sleep":
                time.sleep(act[1])
                act = ("text", "1 1\nlate")
            if isinstance(act, int):
                self._send(act, b'{"error": {"message": "try later"}}', {"Retry-After": "0"})
            elif act == "not-json":
                self._send(200, b"<html>gateway</html>")
            elif act == "no-choices":
                self._send(200, b'{"object": "chat.completion"}')
            else:
                msg = {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": act[1]}}]
                }
                self._send(200, json.dumps(msg).encode())

        def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
            try:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client timed out and went away

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield judge, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _question(qid: str, qtype: str, *domains: str) -> dict:
    return {
        "question_id": qid,
        "image": f"{qid}.jpg",
        "text": f"question {qid}?\n<image>",
        "gpt4_answer": f"reference {qid}",
        "fig_caption": "A chest radiograph.",
        "fig_label": "Fig. 1",
        "in_text_mention": [{"tokens": "as shown in Fig. 1", "entities": []}],
        "domain": {d: d in domains for d in ("chest_xray", "mri", "ct_scan", "histology", "gross")},
        "type": qtype,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    questions = [
        _question("A", "conversation", "chest_xray"),
        _question("B", "conversation", "mri"),
        _question("C", "detailed_description", "histology", "gross"),
        _question("D", "conversation", "ct_scan"),
        _question("E", "conversation", "mri"),
        _question("F", "detailed_description", "chest_xray"),
    ]
    answers = [
        {"question_id": q, "text": f"ours {q}", "metadata": {}} for q in "FDCBA"
    ]  # E skipped
    answers.append({"question_id": "Z", "text": "extra", "metadata": {}})
    return {
        "questions": _write_jsonl(tmp_path / "qa50.jsonl", questions),
        "answers": _write_jsonl(tmp_path / "answers.jsonl", answers),
        "cache": tmp_path / "cache",
    }


def _run(endpoint: str, files: dict[str, Path], out: Path, **kw) -> dict:
    kw = {"max_rps": None, "max_retries": 2, "timeout_s": 0.3, "backoff_s": 0.001, **kw}
    return run_judge(
        files["questions"],
        files["answers"],
        endpoint=endpoint,
        model="judge-1",
        out_path=out,
        cache_dir=files["cache"],
        **kw,
    )


def test_judge_retries_summarises_and_reruns_from_cache(
    fake: tuple[FakeJudge, str],
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    judge, endpoint = fake
    judge.script = {
        "A": [429, ("text", "8 6\nAssistant 1 is more detailed.")],
        "B": [500, ("text", "Score: 8/10"), ("text", "7 7\nEqual.")],
        "C": ["not-json", "no-choices", ("text", " 9 3\nReasons.")],
        "D": [("text", "8, 6\nthe comma makes it malformed")],
        "F": [("sleep", 1.0), ("text", "5 10\nAssistant 2 is better.")],  # read timeout
    }
    monkeypatch.setenv("TLM_TEST_JUDGE_KEY", "sk-test")
    summary = _run(endpoint, files, tmp_path / "run1.jsonl", api_key_env="TLM_TEST_JUDGE_KEY")

    assert len(judge.requests) == 2 + 3 + 3 + 3 + 2  # A, B, C, D (1 + 2 retries), F
    first = judge.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["model"] == "judge-1" and first["temperature"] == 0.0
    assert first["messages"][0]["content"].startswith("'You are a helpful and precise assistant")
    user = first["messages"][1]["content"]
    assert "[Assistant 1]\nreference A\n\n[End of Assistant 1]" in user
    assert "[Assistant 2]\nours A\n\n[End of Assistant 2]" in user
    assert "Figure Caption:\nFig. 1: A chest radiograph." in user
    assert "Figure Context:\n\t- [{'tokens': 'as shown in Fig. 1', 'entities': []}]" in user

    assert summary["missing"] == ["E"] and summary["extra"] == ["Z"] and summary["failed"] == ["D"]
    assert summary["n_judged"] == 4 and summary["requests"] == 13 and summary["cache_hits"] == 0
    scores = summary["scores"]
    assert scores["overall"] == {
        "reference_score": 7.25,
        "pred_score": 6.5,
        "pred_relative_score": pytest.approx((6 / 8 + 1 + 3 / 9 + 10 / 5) / 4 * 100),
        "data_size": 4,
    }
    assert scores["by_type"]["conversation"]["pred_relative_score"] == pytest.approx(87.5)
    assert scores["by_type"]["detailed_description"]["pred_relative_score"] == pytest.approx(
        700 / 6
    )
    assert scores["by_domain"]["histology"]["data_size"] == 1  # histology + gross -> histology
    assert "gross" not in scores["by_domain"] and "ct_scan" not in scores["by_domain"]
    assert scores["by_domain"]["chest_xray"]["pred_relative_score"] == pytest.approx(137.5)

    rows = {
        r["question_id"]: r
        for r in map(json.loads, (tmp_path / "run1.jsonl").read_text().splitlines())
    }
    assert rows["C"]["gpt_eval"] == "9 3\nReasons." and rows["C"]["scores"] == [9.0, 3.0]
    assert rows["D"]["scores"] is None and "malformed judgement" in rows["D"]["error"]
    saved = json.loads((tmp_path / "run1.summary.json").read_text())
    assert saved["scores"] == json.loads(json.dumps(summary["scores"]))
    assert "| overall | 4 | 7.25 | 6.50 |" in judge_markdown(summary)

    # Rerun: only D (not cached) is asked again, and now succeeds.
    judge.script["D"] = [("text", "6 3\nok")]
    n = len(judge.requests)
    second = _run(endpoint, files, tmp_path / "run2.jsonl")
    assert len(judge.requests) == n + 1 and second["cache_hits"] == 4 and second["failed"] == []
    # Third run: everything cached, the server sees nothing.
    n = len(judge.requests)
    third = _run(endpoint, files, tmp_path / "run3.jsonl")
    assert len(judge.requests) == n and third["requests"] == 0 and third["cache_hits"] == 5
    assert third["scores"] == second["scores"]
    assert (tmp_path / "run3.jsonl").read_text() == (tmp_path / "run2.jsonl").read_text()


def test_reference_file_pairs_by_id(
    fake: tuple[FakeJudge, str], files: dict[str, Path], tmp_path: Path
) -> None:
    judge, endpoint = fake
    refs = [{"question_id": q, "text": f"gpt-4 says {q}"} for q in "ABCF"]  # no D
    summary = _run(
        endpoint,
        files,
        tmp_path / "r.jsonl",
        reference_path=_write_jsonl(tmp_path / "refs.jsonl", refs),
    )
    assert summary["no_reference"] == ["D"] and summary["n_judged"] == 4
    contents = [r["messages"][1]["content"] for r in judge.requests]
    assert any(
        "[Assistant 1]\ngpt-4 says A\n" in c and "[Assistant 2]\nours A\n" in c for c in contents
    )


def test_revoked_key_stops_the_run(
    fake: tuple[FakeJudge, str], files: dict[str, Path], tmp_path: Path
) -> None:
    _, endpoint = fake
    with pytest.raises(JudgeError, match="401"):
        run_judge(
            files["questions"], files["answers"], endpoint=endpoint, model="revoked",
            out_path=tmp_path / "x.jsonl", cache_dir=files["cache"], max_rps=None,
        )  # fmt: skip


def test_rate_limit_spaces_requests(fake: tuple[FakeJudge, str]) -> None:
    _, endpoint = fake
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "[Question]\nquestion X?"},
    ]
    with JudgeClient(endpoint, "judge-1", max_rps=40, max_retries=0) as client:
        start = time.monotonic()
        for _ in range(5):
            assert client.judge(messages)[1] == (5.0, 5.0)
        assert time.monotonic() - start >= 4 / 40


@pytest.mark.parametrize("reply", ["8", "8 6 7", "8  6", "8, 6", "eight six", "0 5", "nan 5", ""])
def test_parse_scores_rejects_what_the_original_could_not_parse(reply: str) -> None:
    with pytest.raises(MalformedJudgement):
        parse_scores(reply)


def test_parse_scores_reads_the_first_line() -> None:
    assert parse_scores("\n 8 6.5\nAssistant 1 ...") == (8.0, 6.5)
