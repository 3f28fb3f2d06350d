"""Fixtures for the quantization tests: a tiny LLaVA trained until its answers depend on the image.

The shared `tiny_model_dir` has random weights: its logits are near-uniform, so "4-bit logits
are close to fp32" would say little. `peaked_model_dir` trains that model for a few seconds to
answer one question differently for four images; its greedy answers are then confident (the
tests check that too), and a broken image path or projector changes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from quant_helpers import CASES, one_thread, teacher_forced_batch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def peaked_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tinyllava_med.model.meta import ServedMeta
    from tinyllava_med.model.tiny import save_served

    processor = AutoProcessor.from_pretrained(tiny_model_dir, backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = teacher_forced_batch(processor, [a for _, a in CASES])
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    with one_thread():
        for _ in range(120):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert loss.item() < 0.05, f"the tiny model did not learn the cases (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("peaked-model")
    return save_served(model, processor, out, ServedMeta(template="v1", name="tiny-peaked"))
