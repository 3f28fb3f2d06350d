"""The server on a GPU: one real question, then what `/metrics` says about GPU memory.

    TINYLLAVA_MED_DATA_DIR=.gpu/data python bench/gpu_serve_check.py --out $OUT/metrics_cuda.txt

Starts `tinyllava-med serve` with the demo model the way `bench/serve_load.py` does (device
auto, so CUDA when torch sees a GPU), uploads CT_small, asks one question, scrapes `/metrics`
and checks that the NVML and torch-allocator series are there with plausible values. These
series are absent on a machine without a GPU, so the test suite cannot check them. Writes the
answer, `/readyz` and the GPU and model lines of the scrape to `--out`. Exit status 1 if a
series is missing or implausible.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import httpx
from pydicom.data import get_testdata_file
from serve_load import Server

GPU_SERIES = (
    "tinyllava_med_gpu_memory_used_bytes",
    "tinyllava_med_gpu_memory_total_bytes",
    "tinyllava_med_torch_cuda_allocated_bytes",
    "tinyllava_med_torch_cuda_reserved_bytes",
    "tinyllava_med_torch_cuda_peak_allocated_bytes",
)


def values(scrape: str, name: str) -> list[float]:
    return [float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", scrape, re.M)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    demo = Path(os.environ.get("TINYLLAVA_MED_DATA_DIR", "./data")) / "models" / "demo"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        os.symlink(demo.resolve(), Path(tmp) / "models" / "demo")
        server = Server("demo", 16, Path(tmp))
        try:
            h = {"Authorization": f"Bearer {server.key}"}
            files = [("files", ("ct.dcm", ct, "application/dicom"))]
            study = httpx.post(f"{server.url}/v1/studies", headers=h, files=files, timeout=60)
            answer = httpx.post(
                f"{server.url}/v1/studies/{study.json()['id']}/questions",
                headers=h,
                json={"question": "What modality is this?"},
                timeout=120,
            ).json()
            ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
            scrape = httpx.get(f"{server.url}/metrics", timeout=10).text
        except Exception:
            print(server.log_path.read_text()[-4000:], file=sys.stderr)  # its folder goes next
            raise
        finally:
            server.stop()
    lines = [ln for ln in scrape.splitlines() if re.match(r"tinyllava_med_(gpu|torch|model)", ln)]
    found = {name: values(scrape, name) for name in GPU_SERIES}
    problems = [name for name, v in found.items() if not v or min(v) <= 0]
    used, total = found[GPU_SERIES[0]], found[GPU_SERIES[1]]
    if used and total and not all(0 < u <= t for u, t in zip(used, total, strict=True)):
        problems.append("NVML used > total")
    report = {
        "answer": {k: answer.get(k) for k in ("answer", "finish_reason", "model")},
        "readyz": ready,
        "problems": problems,
    }
    text = json.dumps(report, indent=2) + "\n\n" + "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
