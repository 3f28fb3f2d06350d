"""Demo-model benchmark: train time, PhantomVQA scores, and scores on an unseen seed.

    python bench/demo_model.py                  # trains into a temp dir, ~5 min on 2 cores

Runs `build_demo_model` exactly as `tinyllava-med demo-model` does (budgeted training), then
scores the result on its own PhantomVQA test split and on a test split generated with a seed
the model never saw. Writes `bench/results/demo_model.{md,json}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # bench/, this script's folder

from tinyllava_med.model.meta import ServedMeta
from tinyllava_med.training.demo import DEMO_SEED, build_demo_model, evaluate_demo
from tinyllava_med.training.phantom import generate_phantom

RESULTS = Path(__file__).parent / "results"
UNSEEN_SEED = 98765


def main() -> None:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = build_demo_model(Path(tmp) / "demo", force=True, progress=False)
        total = time.perf_counter() - t0
        own = json.loads((out / "demo_eval.json").read_text())
        run = (ServedMeta.load(out).training or {})["run"]  # type: ignore[union-attr]
        weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        unseen_dir = Path(tmp) / "unseen"
        generate_phantom(unseen_dir, n=1500, seed=UNSEEN_SEED, test_fraction=0.99)
        unseen = evaluate_demo(out, unseen_dir)
    rows = {f"own test split (seed {DEMO_SEED})": own, f"unseen seed {UNSEEN_SEED}": unseen}
    cpu = cpu_name()
    lines = [
        "# Demo model: time and PhantomVQA scores",
        "",
        "Command: `python bench/demo_model.py` (the same code as `tinyllava-med demo-model`)",
        f"Machine: {cpu}, {os.cpu_count()} cores, CPU only, load average before start "
        f"{load_before:.2f}.",
        f"Wall time end to end: {total:.0f} s (training {own['train_seconds']:.0f} s).",
        f"Training run: {run['steps']} of {run['max_steps']} steps, {run['torch_threads']} torch "
        f"threads, schedule set by the clock: {run['schedule_set_by_clock']}, reproducible: "
        f"{run['reproducible']}; weights sha256 `{weights}` (a reproducible build gives this "
        "hash again on the same CPU type and thread count).",
        "",
        "| split | closed accuracy % | closed strict % | open recall % | open strict EM % |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        s = r["summary"]
        lines.append(
            f"| {name} | {100 * s['closed_accuracy']:.1f} | "
            f"{100 * s['closed_strict_accuracy']:.1f} | {100 * s['open_recall']:.1f} | "
            f"{100 * s['open_exact_match']:.1f} |"
        )
    lines += [
        "",
        "Per question type (unseen seed):",
        "",
        "| question type | closed acc. % (n) | open recall % (n) |",
        "|---|---:|---:|",
    ]
    for q, g in sorted(unseen["by_question_type"].items()):
        c, o = g.get("CLOSED", {}), g.get("OPEN", {})
        cs = f"{100 * c['accuracy']:.1f} ({c['n']})" if c.get("n") else "-"
        os_ = f"{100 * o['recall']:.1f} ({o['n']})" if o.get("n") else "-"
        lines.append(f"| {q} | {cs} | {os_} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_model.md").write_text(text)
    (RESULTS / "demo_model.json").write_text(
        json.dumps(
            {
                "total_seconds": total,
                "run": run,
                "weights_sha256": weights,
                "own": own["summary"],
                "unseen": unseen["summary"],
                "unseen_by_question_type": unseen["by_question_type"],
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
