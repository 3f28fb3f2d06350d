"""Load benchmark: dynamic batching vs one request at a time, same model, same run.

    python bench/serve_load.py                       # demo model, 1/4/16 clients, 3 rounds
    python bench/serve_load.py --model PATH --requests 64 --max-new-tokens 16

Starts `tinyllava-med serve` twice on loopback with a fresh data dir each: once with the
batching engine (max batch 16) and once as the baseline (max batch 1: the reference work's
model-worker style), then at 1, 4 and 16 concurrent clients sends questions and measures
requests/s and p50/p95 latency. Prints a table with the ratios and writes
`bench/results/serve_load.{md,json}`.

The questions are about the slices of a series: for each level a study of distinct slices is
uploaded (pydicom's CT_small.dcm, one pixel changed per slice, so every file is new to the
server), and each slice is asked `--questions-per-image` questions (default 1: every question
decodes, renders and processes a new image, the server's caches never help).

`--warm-connections`: each client first asks one question that is not measured, and timing
starts when all have their answer: every client then has an open connection, as a PACS or a
viewer keeps one. Without it the clients connect as the level starts, and at 16 clients their
first 16 questions (one batch) wait for 16 connections and 16 first requests at once: 105 ms
against 71-78 ms for the later ones in one traced run. With 240 questions that batch alone is
the level's p95. The warm-up questions are about slices of their own, also new to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import pydicom
from machine import accelerator, cpu_name  # bench/, this script's folder
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model: str, max_batch: int, data_dir: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TINYLLAVA_MED_DATA_DIR": str(data_dir),
            "TINYLLAVA_MED_MAX_BATCH_SIZE": str(max_batch),
            "TINYLLAVA_MED_MAX_QUEUE": "256",
            "TINYLLAVA_MED_MAX_FILES_PER_UPLOAD": "4096",
        }
        # the server's log goes to a file: a pipe nobody reads fills up and blocks the server
        self.log_path = data_dir / "server.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        cmd = [
            sys.executable,
            "-m",
            "tinyllava_med.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(self.port),
        ]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log)
        self.key = ""
        key_file = data_dir / "first-admin-key"  # where serve writes it without a terminal
        deadline = time.time() + 120
        while time.time() < deadline and not self.key:
            time.sleep(0.2)
            self._check_alive()
            if key_file.exists():
                self.key = key_file.read_text().strip()
        if not self.key:
            self.stop()
            raise RuntimeError("the server wrote no first admin key")
        self.url = f"http://127.0.0.1:{self.port}"
        while time.time() < deadline:
            self._check_alive()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("the server did not become ready")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.stop()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{tail}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        finally:
            self.log.close()


def batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    got = dict.fromkeys(("sum", "count"), 0.0)
    for ln in text.splitlines():
        for k in got:
            if ln.startswith(f"tinyllava_med_batch_size_{k} "):
                got[k] = float(ln.split()[1])
    return got["sum"], got["count"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (this machine's other tenants do not inflate it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ct_slices(n: int) -> list[bytes]:
    """`n` distinct DICOM files of one series: CT_small with one pixel changed in each."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    base = ds.pixel_array
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        pixels = base.copy()
        pixels.flat[i % pixels.size] += 1 + i // pixels.size
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.PixelData = pixels.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf)
        out.append(buf.getvalue())
    return out


def upload(url: str, key: str, files: list[bytes]) -> str:
    r = httpx.post(
        f"{url}/v1/studies",
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
        files=[("files", (f"{i}.dcm", f, "application/dicom")) for i, f in enumerate(files)],
    )
    r.raise_for_status()
    return str(r.json()["id"])


async def load(
    url: str,
    key: str,
    study: str,
    clients: int,
    requests: int,
    max_new_tokens: int,
    questions_per_image: int = 1,
    warm_connections: bool = False,
) -> dict[str, float]:
    """`requests` measured questions; with `warm_connections`, `clients` more come first (their
    slices are the study's last ones: it must hold `requests + clients` questions' worth)."""
    headers = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    todo = list(range(requests))
    warm = list(range(requests, requests + clients)) if warm_connections else []
    all_warm = asyncio.Barrier(clients)
    timing: dict[str, float] = {}

    async def ask(c: aiohttp.ClientSession, i: int) -> float:
        t = time.perf_counter()
        async with c.post(
            f"{url}/v1/studies/{study}/questions",
            headers=headers,
            json={
                "question": f"Question {i}: describe the findings.",
                "max_new_tokens": max_new_tokens,
                "image_index": i // questions_per_image,
            },
        ) as r:
            await r.read()
            r.raise_for_status()
        return time.perf_counter() - t

    async def client(c: aiohttp.ClientSession) -> None:
        if warm:
            await ask(c, warm.pop())
        await all_warm.wait()
        timing.setdefault("start", time.perf_counter())
        timing.setdefault("cpu", time.process_time())
        while todo:
            latencies.append(await ask(c, todo.pop()))

    # aiohttp, not httpx: the clients share the server's 2 cores, and httpx spent 2 ms of CPU per
    # request here (0.4 of a core at 190 requests/s), which only the batched server paid for
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - timing["start"]
        cpu = time.process_time() - timing["cpu"]
    q = statistics.quantiles(latencies, n=20)
    return {
        "clients": clients,
        "requests": requests,
        "rps": requests / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
        "max_s": max(latencies),
        "client_cpu_ms_per_request": cpu * 1000 / requests,
    }


def run(
    model: str,
    requests: int,
    max_new_tokens: int,
    levels: list[int],
    first: str,
    questions_per_image: int,
    warm_connections: bool = False,
) -> dict:
    extra = dict.fromkeys(levels, 0)
    if warm_connections:
        extra = {c: c for c in levels}
    n_images = {c: -(-(max(requests, c * 2) + extra[c]) // questions_per_image) for c in levels}
    slices = ct_slices(1 + sum(n_images.values()))  # the same files for both modes
    out: dict[str, list[dict[str, float]]] = {}
    modes = [("batched", 16), ("baseline", 1)]
    if first == "baseline":
        modes.reverse()
    for name, max_batch in modes:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            demo = Path(os.environ.get("TINYLLAVA_MED_DATA_DIR", "./data")) / "models" / "demo"
            if model == "demo" and demo.is_dir():
                (data / "models").mkdir()
                os.symlink(demo.resolve(), data / "models" / "demo")
            server = Server(model, max_batch, data)
            try:
                warm = upload(server.url, server.key, slices[:1])
                asyncio.run(load(server.url, server.key, warm, 2, 4, max_new_tokens, 4))
                out[name] = []
                used = 1
                for c in levels:
                    n = max(requests, c * 2)
                    study = upload(server.url, server.key, slices[used : used + n_images[c]])
                    used += n_images[c]
                    b0, cpu0 = batch_totals(server.url), cpu_seconds(server.proc.pid)
                    r = asyncio.run(
                        load(
                            server.url,
                            server.key,
                            study,
                            c,
                            n,
                            max_new_tokens,
                            questions_per_image,
                            warm_connections,
                        )
                    )
                    b1, cpu1 = batch_totals(server.url), cpu_seconds(server.proc.pid)
                    r["mean_batch"] = (b1[0] - b0[0]) / max(b1[1] - b0[1], 1.0)
                    # the server's CPU and batches include the unmeasured warm-up questions
                    r["server_cpu_ms_per_request"] = (cpu1 - cpu0) * 1000 / (n + extra[c])
                    out[name].append(r)
            finally:
                server.stop()
    return out


def median_of(rounds: list[dict]) -> dict:
    """Per mode and level, the round with the median requests/s."""
    out: dict[str, list[dict[str, float]]] = {}
    for mode in ("batched", "baseline"):
        out[mode] = []
        for i in range(len(rounds[0][mode])):
            runs = sorted((r[mode][i] for r in rounds), key=lambda x: x["rps"])
            out[mode].append(runs[len(runs) // 2])
    return out


def table(res: dict, levels: list[int]) -> str:
    single = res["baseline"][0]["p50_s"]
    lines = [
        "| clients | baseline req/s | batched req/s | ratio | baseline p95 s | batched p95 s "
        "| batched p95 / single-request p50 | batched mean batch "
        "| server CPU ms / request (baseline, batched) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(levels):
        b, d = res["baseline"][i], res["batched"][i]
        lines.append(
            f"| {c} | {b['rps']:.2f} | {d['rps']:.2f} | {d['rps'] / b['rps']:.2f}x | "
            f"{b['p95_s']:.3f} | {d['p95_s']:.3f} | {d['p95_s'] / single:.2f} | "
            f"{d['mean_batch']:.1f} | {b['server_cpu_ms_per_request']:.1f}, "
            f"{d['server_cpu_ms_per_request']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument(
        "--questions-per-image",
        type=int,
        default=1,
        help="questions asked about each slice (1: every question is about a new image)",
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="whole runs, alternating which mode goes first"
    )
    ap.add_argument(
        "--warm-connections",
        action="store_true",
        help="each client asks one unmeasured question first (an open connection, as kept)",
    )
    ap.add_argument("--out", default=str(RESULTS / "serve_load"), help="writes OUT.md, OUT.json")
    args = ap.parse_args()
    rounds = [
        run(
            args.model,
            args.requests,
            args.max_new_tokens,
            args.levels,
            "batched" if i % 2 == 0 else "baseline",
            args.questions_per_image,
            args.warm_connections,
        )
        for i in range(args.rounds)
    ]
    res = median_of(rounds)
    per_round = "\n".join(
        f"- round {i + 1}: "
        + ", ".join(
            f"{c} clients {r['batched'][j]['rps'] / r['baseline'][j]['rps']:.2f}x"
            for j, c in enumerate(args.levels)
        )
        for i, r in enumerate(rounds)
    )
    md = (
        f"Median of {args.rounds} rounds (requests/s and latencies of the round with the median "
        f"requests/s, per mode and level):\n\n{table(res, args.levels)}\n\n"
        f"Ratio batched / baseline in each round (this machine's other tenants move single runs "
        f"by +-15%):\n\n{per_round}"
    )
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = cpu_name()
    header = (
        f"# Serving load: dynamic batching vs one request at a time\n\n"
        f"Command: `python bench/serve_load.py --model {args.model} --requests "
        f"{args.requests} --max-new-tokens {args.max_new_tokens} --rounds {args.rounds} "
        f"--questions-per-image {args.questions_per_image}"
        f"{' --warm-connections' if args.warm_connections else ''}`\n\n"
        f"Machine: {cpu}, {os.cpu_count()} cores, {accelerator()}. Same model, same run; "
        f"baseline = max batch 1.\n\n"
    )
    out.with_suffix(".md").write_text(header + md + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"median": res, "rounds": rounds}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
