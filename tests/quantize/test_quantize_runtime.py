"""Quantizing while loading an unquantized folder (as the paper did), and the 4-bit stride fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from quant_helpers import QUESTION, answer_logits, answers, case_images, cosine

from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.model.load import load_model
from tinyllava_med.model.prefixes import cache_bytes
from tinyllava_med.quantize.export import quantize_checkpoint
from tinyllava_med.server.lru import ByteLRU

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def reference(peaked_model_dir: Path):
    lm = load_model(str(peaked_model_dir), device="cpu")
    return answer_logits(lm), answers(lm)


def _hooked(model) -> tuple[int, int]:
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return len(layers), sum(bool(getattr(m, "_tlm_contig", False)) for m in layers)


@pytest.mark.parametrize("quant", ["4bit", "8bit", "cpu-int8"])
def test_load_time_quantization(peaked_model_dir: Path, reference, quant: str) -> None:
    lm = load_model(str(peaked_model_dir), quant=quant, device="cpu")
    assert lm.quantization == quant
    assert cosine(answer_logits(lm), reference[0]) >= 0.97
    assert answers(lm) == reference[1]
    if quant == "4bit":
        n, hooked = _hooked(lm.model)
        assert n > 0 and hooked == n
        assert type(lm.model.model.multi_modal_projector.linear_1) is torch.nn.Linear  # skipped


@pytest.mark.parametrize("quant", ["4bit", "8bit", "cpu-int8"])
def test_quantized_models_answer_follow_ups_from_the_prefix_cache(
    peaked_model_dir: Path, reference, quant: str
) -> None:
    """What the CPU server does for a lone follow-up question: the cached prompt up to the
    image (stored by the first question, reused by the second) gives the same answers."""
    lm = load_model(str(peaked_model_dir), quant=quant, device="cpu")
    store = ByteLRU(1 << 28, cache_bytes)
    params = SamplingParams(max_new_tokens=8)
    for i, image in enumerate(case_images()):
        for _ in range(2):
            got = generate(lm, [image], [QUESTION], params, prefixes=store, image_keys=[i])
            assert got[0].text == reference[1][i]
    assert (store.misses, store.hits) == (len(reference[1]), len(reference[1]))


def test_stored_4bit_models_get_the_stride_fix(peaked_model_dir: Path, tmp_path: Path) -> None:
    lm = load_model(str(quantize_checkpoint(peaked_model_dir, tmp_path / "q4", method="nf4")))
    n, hooked = _hooked(lm.model)
    assert n > 0 and hooked == n


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _ignore_strides(module, args):
    """What bitsandbytes' AVX-512-bf16 4-bit kernel did: read the input's memory as if it were
    contiguous. (The projector's first linear gets a transposed, non-contiguous input.)"""
    x = args[0]
    return (x.as_strided(x.shape, _contiguous_strides(x.shape), x.storage_offset()), *args[1:])


def _projector_4bit(peaked_model_dir: Path, tmp_path: Path):
    dst = quantize_checkpoint(
        peaked_model_dir, tmp_path / "p4", method="nf4", skip_modules=["lm_head"]
    )
    lm = load_model(str(dst))
    linear_1 = lm.model.model.multi_modal_projector.linear_1
    assert isinstance(linear_1, bnb.nn.Linear4bit)
    return lm, linear_1


def test_stride_fix_keeps_a_quantized_projector_correct(
    peaked_model_dir: Path, tmp_path: Path, reference
) -> None:
    lm, linear_1 = _projector_4bit(peaked_model_dir, tmp_path)
    linear_1.register_forward_pre_hook(_ignore_strides)  # runs after the fix: sees contiguous
    assert cosine(answer_logits(lm), reference[0]) >= 0.97
    assert answers(lm) == reference[1]


def test_stride_bug_without_the_fix_degrades_answers(
    peaked_model_dir: Path, tmp_path: Path, reference
) -> None:
    lm, linear_1 = _projector_4bit(peaked_model_dir, tmp_path)
    linear_1.register_forward_pre_hook(_ignore_strides, prepend=True)  # before the fix
    assert cosine(answer_logits(lm), reference[0]) < 0.9
    assert answers(lm) != reference[1]


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(),
    reason="bitsandbytes' stride-ignoring 4-bit kernel only runs on CPUs with AVX-512-bf16",
)
def test_real_kernel_reads_a_transposed_input_wrong_and_the_fix_mends_it() -> None:
    """bitsandbytes' AVX-512-bf16 4-bit kernel on a 2-D input whose rows are not contiguous
    (the projector's first linear gets such a transposed input): wrong without the fix, right
    with it. A layer of a shape the kernel repacks (the tiny models' 32-wide ones it cannot)."""
    from tinyllava_med.quantize.runtime import make_4bit_inputs_contiguous

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu").eval()
    x = torch.randn(128, 12).T  # (12, 128), column-major
    with torch.no_grad():
        right = layer(x.contiguous())
        assert layer.weight.quant_state.packing_format_for_cpu  # the AVX-512-bf16 kernel ran
        assert (layer(x) - right).abs().max() > 1.0  # the bug, in the real kernel
        holder = torch.nn.Sequential(layer)
        assert make_4bit_inputs_contiguous(holder) == 1
        assert torch.equal(holder(x), right)
