"""The demo-model path end to end, shortened: PhantomVQA -> tiny model -> train -> score -> card."""

from __future__ import annotations

import json

from tinyllava_med.model.load import load_model
from tinyllava_med.model.meta import ServedMeta
from tinyllava_med.training import demo


def test_build_and_ensure_demo_model(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_IMAGES", 40)
    monkeypatch.setitem(demo.DEMO_TRAIN, "max_steps", 4)
    monkeypatch.setitem(demo.DEMO_TRAIN, "max_time_s", 60.0)
    out = demo.ensure_demo_model(tmp_path, progress=False)
    assert out == tmp_path / "models" / "demo"
    card = (out / "README.md").read_text()
    assert "Not for clinical use" in card and "tinyllava-med demo-model" in card
    assert "4 of 4 steps" in card and demo.REPRODUCIBLE[True] in card
    run = ServedMeta.load(out).training["run"]
    assert run["steps"] == 4 and run["reproducible"] and not run["stopped_by_time_limit"]
    scores = json.loads((out / "demo_eval.json").read_text())
    assert set(scores["summary"]) >= {"closed_accuracy", "open_recall"}
    assert scores["n_scored"] == scores["n_gt"] > 0 and not scores["missing"]
    assert not (out.parent / ".demo-build").exists()
    # the registry name resolves to it, and a second call reuses it
    lm = load_model("demo", data_dir=tmp_path, device="cpu")
    assert lm.variant == "demo" and lm.template == "v1" and lm.meta.clinical_use is False
    mtime = (out / "config.json").stat().st_mtime
    assert demo.ensure_demo_model(tmp_path, progress=False) == out
    assert (out / "config.json").stat().st_mtime == mtime

    # built again (the same code, data, seed and threads): the same weights, bit for bit
    again = demo.build_demo_model(tmp_path / "again", force=True, progress=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_demo_model_replaces_only_a_demo_model(tmp_path, monkeypatch, capsys):
    """`demo-model --out` over a folder that is not a demo model (`./data`, a folder of work) is
    refused before any training, and nothing in it is touched; over an earlier demo model or an
    empty folder it builds, with files the umask allows others to read (safetensors alone
    would write 0600: a server running as another user could not load the weights). The
    console says how many steps ran and the scores."""
    import os

    import pytest

    from tinyllava_med.cli import main

    monkeypatch.setattr(demo, "DEMO_IMAGES", 40)
    monkeypatch.setitem(demo.DEMO_TRAIN, "max_steps", 2)
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "tinyllava_med.db").write_text("x")
    with pytest.raises(ValueError, match="not a demo model folder"):
        demo.build_demo_model(victim, force=True, progress=False)
    assert main(["demo-model", "--out", str(victim)]) == 2
    assert "not a demo model folder" in capsys.readouterr().err
    assert (victim / "tinyllava_med.db").read_text() == "x" and (victim / "keep").is_dir()
    assert not (tmp_path / ".demo-build").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    old = os.umask(0o022)
    try:
        assert main(["demo-model", "--out", str(empty)]) == 0
        assert main(["demo-model", "--out", str(empty)]) == 0  # over its own build
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    assert f"demo model written to {empty}: 2 of 2 training steps" in out
    assert "closed accuracy" in out and "open recall" in out
    assert (empty / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_build_the_time_budget_cuts_short_is_a_warning(tmp_path, monkeypatch, caplog):
    """On a slow or busy machine the budget stops training early: the model is undertrained,
    and whoever built it (`demo-model`, or `ask` / `serve` on first use) is told so."""
    import logging

    monkeypatch.setattr(demo, "DEMO_IMAGES", 40)
    monkeypatch.setitem(demo.DEMO_TRAIN, "max_steps", 500)
    monkeypatch.setitem(demo.DEMO_TRAIN, "max_time_s", 0.5)
    caplog.set_level(logging.WARNING, logger="tinyllava_med.training.demo")
    out = demo.build_demo_model(tmp_path / "demo", force=True, progress=False)
    run = ServedMeta.load(out).training["run"]
    assert run["stopped_by_time_limit"] and run["steps"] < 500
    assert f"the demo model trained {run['steps']} of 500 steps" in caplog.text
    assert "--no-time-limit" in caplog.text


def test_finding_the_demo_does_not_import_the_trainer(tmp_path) -> None:
    """`serve` imports this module on every start to find the demo model; the trainer's imports
    (Trainer, peft, bitsandbytes, datasets) took 1.4 s of each start for a folder check."""
    import subprocess
    import sys

    code = (
        "import sys; from tinyllava_med.training.demo import ensure_demo_model; "
        "heavy = [m for m in ('tinyllava_med.training.trainer', 'peft', 'datasets') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
