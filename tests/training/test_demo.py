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
