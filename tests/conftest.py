"""Shared fixtures: a real tiny LLaVA (random weights, served format) built once per session.

Nothing is downloaded: the tokenizer is trained here and the model is built from configs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXTS = [
    "Is there a nodule in the left lung? yes no left right chest head abdomen knee",
    "What is the modality? x-ray ct mri. Which organ is shown? Is there a fracture?",
    "Describe the findings. effusion hemorrhage mass normal none 0 1 2",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served-format tiny LLaVA folder (SigLIP-style tower, LLaMA-style LLM, template v1)."""
    from tinyllava_med.model.meta import ServedMeta
    from tinyllava_med.model.prompts import V1_SYSTEM
    from tinyllava_med.model.tiny import TinyShape, build_tiny_llava, save_served

    shape = TinyShape(
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        text_hidden=64,
        intermediate=128,
        vocab_size=400,
    )
    model, processor = build_tiny_llava([V1_SYSTEM, *TINY_TEXTS], shape, seed=0)
    out = tmp_path_factory.mktemp("tiny-model")
    return save_served(model, processor, out, ServedMeta(template="v1", name="tiny-test"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path):
    from tinyllava_med.model.load import load_model

    return load_model(str(tiny_model_dir), quant="none", device="cpu")
