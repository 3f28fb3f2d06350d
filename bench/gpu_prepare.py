"""Prepare what `bench/gpu_check.sh` needs on the lent GPU machine, here, before any device time.

    python bench/gpu_prepare.py            # then: run `DATA=.gpu bash bench/gpu_check.sh`
                                           # with carry [".gpu", ".whl"]

Writes two folders that git ignores:
- `.gpu/demo`: the trained demo model (`make serve` trains it into `data/models/demo`);
  `.gpu/ph`: the PhantomVQA set of the accuracy tables (500 images, seed 98765, `all.json` =
  train + test); `.gpu/site`: bitsandbytes, unpacked with only its CUDA 13 and CPU libraries.
- `.whl`: cp312 manylinux wheels of every other distribution that the server, the quantizer,
  `eval compare` and the benchmarks import and the GPU image lacks (`GPU_IMAGE` below, as
  `device/KINDS.md` listed it), at the versions installed here; plus `transformers` and
  `huggingface_hub`, which the image has at older versions than this project needs.

It finds the distributions by importing those modules here and mapping them to what is
installed, so a new dependency is carried without editing a list. It stops if the two folders
exceed the 64 MiB a device call may carry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 1024 * 1024

# what the server, the quantizer, the benchmarks and gpu_check.sh import on the GPU machine
MODULES = [
    "tinyllava_med.cli",
    "tinyllava_med.server.app",
    "tinyllava_med.server.db.migrate",
    "tinyllava_med.quantize.table",
    "tinyllava_med.quantize.export",
    "tinyllava_med.quantize.runtime",
    "tinyllava_med.eval.compare",
    "uvicorn",
    "httptools",
    "uvloop",
    "aiohttp",
]
# the GPU image's Python distributions (device/KINDS.md, read 2026-11-17), normalized names
GPU_IMAGE = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    certifi charset-normalizer click cloudpickle contourpy cycler filelock fonttools frozenlist
    fsspec h11 hf-xet httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver markdown
    markdown-it-py markupsafe matplotlib mdurl mpmath multidict networkx numpy nvidia-ml-py
    packaging pandas peft pillow pip pluggy prometheus-client propcache protobuf psutil pygments
    pyparsing python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece
    setuptools six sympy tokenizers torch tqdm transformers triton typing-extensions urllib3
    uvloop wheel yarl""".split()  # noqa: SIM905 (a list as KINDS.md gives it)
)
# on the image, but older than this project needs (transformers 5.17; pyproject: >=5.20)
TOO_OLD_THERE = {"transformers", "huggingface-hub"}
NOT_NEEDED = {"tinyllava-med", "bitsandbytes"}  # ours; bitsandbytes goes to .gpu/site
# the image's Python 3.12.3 is Ubuntu 24.04's: glibc 2.39 (pip matches each tag exactly)
PLATFORMS = [
    *(f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

KEPT_LIBS = ("libbitsandbytes_cuda13", "libbitsandbytes_cpu")

PROBE = """
import importlib, json, sys, importlib.metadata as md
for m in sys.argv[1:]:
    importlib.import_module(m)
from tinyllava_med.server.app import create_app  # noqa: F401
tops = md.packages_distributions()
dists = {d for name in list(sys.modules) for d in tops.get(name.split(".")[0], [])}
print(json.dumps({d: md.version(d) for d in dists}))
"""


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def imported_distributions() -> dict[str, str]:
    """name -> version of every installed distribution that MODULES import (a fresh process)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *MODULES], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def download(spec: str, dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest)]
        + [spec],
        check=True,
    )


def unpack_bitsandbytes(version: str, site: Path, tmp: Path) -> None:
    """The bitsandbytes wheel into `site`, keeping only its CUDA 13 and CPU libraries (not
    ROCm's or XPU's)."""
    download(f"bitsandbytes=={version}", tmp)
    (wheel,) = tmp.glob("bitsandbytes-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            lib = Path(name).name
            if lib.startswith("libbitsandbytes_") and not lib.startswith(KEPT_LIBS):
                continue
            z.extract(name, site)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / ".gpu"))
    ap.add_argument("--wheels", default=str(ROOT / ".whl"))
    ap.add_argument("--demo", default=str(ROOT / "data" / "models" / "demo"))
    args = ap.parse_args()
    data, wheels, demo = Path(args.data), Path(args.wheels), Path(args.demo)
    if not (demo / "config.json").is_file():
        sys.exit(f"no demo model at {demo}: `make serve` (or `tinyllava-med demo-model`) trains it")
    for folder in (data, wheels):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    shutil.copytree(demo, data / "demo")  # gpu_check.sh copies it for `serve` there
    cli = [sys.executable, "-m", "tinyllava_med.cli"]
    subprocess.run(
        [*cli, "data", "phantom", "--out", str(data / "ph"), "--n", "500", "--seed", "98765"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    ph = data / "ph"
    merged = [
        e for split in ("train", "test") for e in json.loads((ph / f"{split}.json").read_text())
    ]
    (ph / "all.json").write_text(json.dumps(merged))

    found = imported_distributions()
    carried = {
        name: version
        for name, version in found.items()
        if normalize(name) not in NOT_NEEDED
        and (normalize(name) not in GPU_IMAGE or normalize(name) in TOO_OLD_THERE)
    }
    for name, version in sorted(carried.items()):
        download(f"{name}=={version}", wheels)
    unpack_bitsandbytes(found.get("bitsandbytes", "0.50.2"), data / "site", data / "bnb-wheel")
    shutil.rmtree(data / "bnb-wheel")

    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in tracked if f)
    data_size, wheels_size = size(data), size(wheels)
    total = data_size + wheels_size + tree
    print(f"{len(carried)} wheels in {wheels}: {', '.join(sorted(carried))}")
    print(
        f"{data} {data_size / 2**20:.1f} MiB + {wheels} {wheels_size / 2**20:.1f} MiB + the "
        f"working tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB (a device call carries 64)"
    )
    return 0 if total <= CARRY_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
