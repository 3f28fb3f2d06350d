"""The bundled demo model: a tiny LLaVA trained from scratch on PhantomVQA on the CPU.

`build_demo_model` generates PhantomVQA, builds a fresh tiny model and tokenizer, trains it with
the ordinary `train` code path (one `downstream` stage, everything trainable), scores it on the
PhantomVQA test split and writes a served-format folder with a model card. `ensure_demo_model`
builds it once, under a file lock, and reuses it afterwards. Synthetic: not for clinical use.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tinyllava_med.model.load import default_data_dir, load_model, variant_dir
from tinyllava_med.model.meta import ServedMeta
from tinyllava_med.model.prompts import V1_SYSTEM
from tinyllava_med.model.registry import get_variant
from tinyllava_med.model.tiny import TinyShape, build_tiny_llava, save_served
from tinyllava_med.training.config import Component, TrainConfig
from tinyllava_med.training.data import read_conversations, turns_of
from tinyllava_med.training.phantom import generate_phantom

log = logging.getLogger(__name__)

DEMO_SHAPE = TinyShape(initializer_range=0.06)
DEMO_SEED = 1234
DEMO_IMAGES = 6000
DEMO_TRAIN = dict(
    learning_rate=1e-3,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=1,
    # On a 2-core machine the 1400 steps take 175-220 s: the schedule follows the steps and a
    # rebuild gives the same weights. The budget is a bound for slower machines, with room to
    # spare here: at 210 s the start of one build in five ran slow enough to hand the schedule
    # to the clock. On a machine that cannot do about 5 steps/s the 300 s budget binds and
    # the schedule follows the clock (`trainer.budget_cosine`); the model card says which.
    max_steps=1400,
    max_time_s=300.0,
    warmup_ratio=0.04,
    weight_decay=0.0,
    turns_per_sample=8,
    logging_steps=50,
    save_steps=100_000,
    model_max_length=512,
    cache_dataset=True,
    pack_turns=True,
)

MODEL_CARD = """# TinyLLaVA-Med demo model (synthetic)

**Not for clinical use.** This model was trained in a few minutes on the CPU on PhantomVQA,
synthetic greyscale phantoms (chest radiographs, head and abdominal CT slices, knee MRI) made
by `tinyllava-med data phantom`. It knows nothing about real patients or real images; it exists
so the server, the web client and the pipeline can be tried with no download.

- Architecture: SigLIP-style vision tower ({vision_layers} layers, hidden {vision_hidden}, patch
  {patch_size} on {image_size} px) + `mlp2x_gelu` projector + LLaMA-style LLM ({text_layers} layers,
  hidden {text_hidden}), byte-level BPE tokenizer trained locally, prompt template `v1`.
- Trained with: `tinyllava-med demo-model` ({seconds:.0f} s of training, {steps} steps,
  {threads} torch threads). {reproducible}
- PhantomVQA test split (seed {seed}): {scores}
"""


REPRODUCIBLE = {
    True: "The schedule followed the steps alone: a rebuild with the same code on the same CPU "
    "type and thread count gives the same weights.",
    False: "This machine was too slow for the steps to finish within the time budget, so the "
    "wall clock shaped the schedule: a rebuild gives different weights (`tinyllava-med "
    "demo-model --no-time-limit` trains all steps, reproducibly).",
}


def demo_texts(entries: list[dict[str, Any]]) -> Iterator[str]:
    """Text the demo tokenizer is trained on: the template's fixed words plus every Q and A."""
    yield V1_SYSTEM + " USER: ASSISTANT:"
    for e in entries:
        for q, a in turns_of(e):
            yield q
            yield " " + a


def build_demo_model(
    out: Path | None = None,
    *,
    force: bool = False,
    work_dir: Path | None = None,
    n_images: int | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Train the demo model into `out` (default: the data dir's `models/demo`)."""
    out = out or variant_dir(get_variant("demo"))
    if out.is_dir() and not force:
        return out
    _check_replaceable(out)
    work = work_dir or out.parent / ".demo-build"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    phantom = work / "phantom"
    generate_phantom(phantom, n=n_images or DEMO_IMAGES, seed=DEMO_SEED)
    train_entries = read_conversations(phantom / "train.json")
    model, processor = build_tiny_llava(demo_texts(train_entries), DEMO_SHAPE, seed=DEMO_SEED)
    init = save_served(
        model,
        processor,
        work / "init",
        ServedMeta(
            template="v1", name="demo", variant="demo", notes="synthetic; not for clinical use"
        ),
    )
    settings: dict[str, Any] = {**DEMO_TRAIN, **(train_overrides or {})}
    cfg = TrainConfig(
        stage="downstream",
        name="demo",
        model=str(init),
        data_path=str(phantom / "train.json"),
        image_folder=str(phantom / "images"),
        output_dir=str(work / "trained"),
        vision_tower=Component(mode="full"),
        projector=Component(mode="full"),
        language_model=Component(mode="full"),
        seed=DEMO_SEED,
        disable_tqdm=not progress,
        **settings,
    )
    t_train = time.monotonic()
    # here, not at the top: `serve` imports this module to find the demo, and the trainer's
    # imports (Trainer, peft, bitsandbytes, datasets) took 1.4 s of every start
    from tinyllava_med.training.trainer import run_stage

    trained = run_stage(cfg)
    train_seconds = time.monotonic() - t_train
    shutil.rmtree(trained / "checkpoints", ignore_errors=True)

    scores = evaluate_demo(trained, phantom, progress=progress)
    meta = ServedMeta.load(trained)
    run = ((meta.training if meta else None) or {}).get("run") or {}
    if run.get("stopped_by_time_limit"):  # every path that builds it says so: demo-model,
        # and `ask` or `serve` building it on first use
        log.warning(
            "the demo model trained %s of %s steps: this machine was too slow (or busy) for "
            "all of them within the %s s budget, so it is undertrained (PhantomVQA closed "
            "accuracy %.1f%%) and a rebuild will differ; `tinyllava-med demo-model "
            "--no-time-limit` trains every step",
            run.get("steps"),
            run.get("max_steps"),
            settings.get("max_time_s"),
            100 * scores["summary"]["closed_accuracy"],
        )
    card = MODEL_CARD.format(
        **DEMO_SHAPE.__dict__,
        seconds=train_seconds,
        steps=f"{run.get('steps', '?')} of {run.get('max_steps', '?')}",
        threads=run.get("torch_threads", "?"),
        reproducible=REPRODUCIBLE[bool(run.get("reproducible"))],
        seed=DEMO_SEED,
        scores=json.dumps(scores["summary"]),
    )
    (trained / "README.md").write_text(card)
    (trained / "demo_eval.json").write_text(
        json.dumps(
            {**scores, "train_seconds": train_seconds, "total_seconds": time.monotonic() - t0},
            indent=2,
        )
        + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(trained), str(out))
    shutil.rmtree(work, ignore_errors=True)
    return out


def _check_replaceable(out: Path) -> None:
    """The build replaces `out` at the end: only a demo model built before, or an empty folder,
    may be there (`--out ./data` must not take the database with it)."""
    if not out.exists():
        return
    meta = ServedMeta.load(out) if out.is_dir() else None
    if out.is_dir() and (not any(out.iterdir()) or (meta is not None and meta.variant == "demo")):
        return
    raise ValueError(
        f"{out} exists and is not a demo model folder; the build replaces its folder, so it "
        "writes only to a new or empty folder or over an earlier demo model"
    )


def evaluate_demo(
    model_dir: Path, phantom: Path, *, progress: bool = False, limit: int | None = None
) -> dict[str, Any]:
    """Closed accuracy and open recall (LLaVA-Med definitions) on a PhantomVQA test split."""
    from tinyllava_med.eval.generate import generate_answers
    from tinyllava_med.eval.metrics import score_files

    lm = load_model(str(model_dir), quant="none", device="cpu")
    answers = model_dir / "phantom_test_answers.jsonl"
    answers.unlink(missing_ok=True)
    generate_answers(
        lm,
        phantom / "test.json",
        phantom / "images",
        answers,
        batch_size=64,
        limit=limit,
        progress=progress,
    )
    report = score_files(phantom / "test.json", answers).to_dict()
    answers.unlink(missing_ok=True)
    by_type = report["by_answer_type"]
    report["summary"] = {
        "closed_accuracy": by_type["CLOSED"]["accuracy"],
        "closed_strict_accuracy": by_type["CLOSED"]["strict_accuracy"],
        "open_recall": by_type["OPEN"]["recall"],
        "open_exact_match": by_type["OPEN"]["exact_match"],
    }
    return report


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_demo_model(data_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The demo model's folder, trained first if it does not exist yet (once, under a lock)."""
    out = variant_dir(get_variant("demo"), data_dir or default_data_dir())
    if out.is_dir():
        return out
    with _lock(out.parent / ".demo.lock"):
        if not out.is_dir():
            log.warning("building the demo model on first use (a few minutes on the CPU)")
            build_demo_model(out, progress=progress)
    return out
