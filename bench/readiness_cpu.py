"""`/readyz` with a slow model: how long each call takes and what it says, then after an answer.

    python bench/real_shape_model.py /tmp/tl15 --dtype float32     # TinyLLaVA-1.5B shape
    python bench/readiness_cpu.py --model /tmp/tl15

Starts `tinyllava-med serve` on the model (a fresh data dir, loopback), polls `/readyz` every
2 s until it says ready, printing each call's answer time; then uploads pydicom's CT_small.dcm,
asks one 4-token question, calls `/readyz` twice more and prints the batch count (how many
generates ran: probes included) and `tinyllava_med_model_ready`. The compose health check gives
`/readyz` 8 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pydicom.data import get_testdata_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8011)
    args = ap.parse_args(argv)
    data = Path(tempfile.mkdtemp())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINYLLAVA_MED_DATA_DIR": str(data)}
    cmd = [sys.executable, "-m", "tinyllava_med.cli", "serve", "--model", args.model]
    with open(data / "server.log", "w") as log:
        server = subprocess.Popen([*cmd, "--port", str(args.port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{args.port}"
    t0 = time.time()

    def readyz(label: str) -> int:
        t = time.perf_counter()
        r = httpx.get(f"{url}/readyz", timeout=60)
        took = time.perf_counter() - t
        model = r.json()["checks"]["model"]
        print(f"+{time.time() - t0:5.1f} s {label}: {r.status_code} {model:12s} in {took:.2f} s")
        return r.status_code

    try:
        while time.time() - t0 < 600:
            try:
                if readyz("readyz") == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(2)
        key = (data / "first-admin-key").read_text().strip()  # serve without a terminal
        h = {"Authorization": f"Bearer {key}"}
        ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
        files = [("files", ("ct.dcm", ct, "application/dicom"))]
        study = httpx.post(f"{url}/v1/studies", headers=h, files=files, timeout=60).json()["id"]
        t = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/studies/{study}/questions",
            headers=h,
            json={"question": "What is shown?", "max_new_tokens": 4},
            timeout=600,
        )
        print(f"question: {r.status_code} in {time.perf_counter() - t:.1f} s")
        for _ in range(2):
            readyz("readyz after the answer")
        metrics = httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
        want = ("tinyllava_med_batch_size_count", "tinyllava_med_model_ready")
        print(*(ln for ln in metrics if ln.startswith(want)), sep="\n")
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
