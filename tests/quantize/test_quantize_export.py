"""`quantize_checkpoint`: folders that `load_model` loads with no flags, smaller, close to fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_helpers import CASES, answer_logits, answers, case_images, cosine
from safetensors import safe_open

from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.model.load import load_model
from tinyllava_med.model.meta import ServedMeta
from tinyllava_med.quantize.cpu_int8 import CPU_INT8_FILE, quantize_cpu_int8
from tinyllava_med.quantize.export import quantize_checkpoint
from tinyllava_med.quantize.skip import DEFAULT_SKIP_MODULES

STORED = {"nf4": "4bit", "int8": "8bit", "cpu-int8": "cpu-int8"}
WEIGHTS = {"nf4": "model.safetensors", "int8": "model.safetensors", "cpu-int8": CPU_INT8_FILE}


@pytest.fixture(scope="module")
def fp32_peaked(peaked_model_dir: Path):
    lm = load_model(str(peaked_model_dir), device="cpu")
    return lm, answer_logits(lm), answers(lm)


@pytest.mark.parametrize("method", ["nf4", "int8", "cpu-int8"])
def test_round_trip_on_tiny_model(tiny_model_dir: Path, tmp_path: Path, method: str) -> None:
    dst = quantize_checkpoint(tiny_model_dir, tmp_path / method, method=method)
    lm = load_model(str(dst), device="cpu")  # no flags: the folder says how it is stored
    assert lm.quantization == STORED[method] == ServedMeta.load(dst).quantization
    assert lm.template == "v1"
    # what every answer records: the scheme, and what it quantized that the default recipe keeps
    # in 16/32 bits (cpu-int8's output check put the tower and lm_head in int8 here; the label
    # was `cpu-int8` as for `--quant cpu-int8`, which keeps them in fp32)
    label = {"cpu-int8": "cpu-int8+tower+lm_head"}.get(method, STORED[method])
    assert lm.info["quantization"] == label
    if method == "cpu-int8":
        assert load_model(str(tiny_model_dir), quant="cpu-int8").info["quantization"] == "cpu-int8"
        kept = quantize_checkpoint(
            tiny_model_dir, tmp_path / "kept", method=method, skip_modules=["lm_head"]
        )
        assert load_model(str(kept)).info["quantization"] == "cpu-int8+tower+projector"
    if method == "nf4":  # FQ4 with the tower in nf4 too (the -93.5% recipe)
        tower = quantize_checkpoint(
            tiny_model_dir,
            tmp_path / "tower",
            method=method,
            skip_modules=["model.multi_modal_projector", "lm_head"],
        )
        assert load_model(str(tower), device="cpu").info["quantization"] == "4bit+tower"
    out = generate(lm, case_images()[:2], ["Is there a fracture?"] * 2, SamplingParams(6))
    assert all(a.new_tokens > 0 for a in out)
    fp32_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert (dst / WEIGHTS[method]).stat().st_size < 0.8 * fp32_bytes
    assert (dst / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_peaked_model_is_a_meaningful_reference(fp32_peaked, tiny_model_dir: Path) -> None:
    lm, logits, said = fp32_peaked
    assert said == [a.strip() for _, a in CASES]  # the answer depends on the image
    assert logits.softmax(-1).max(-1).values.min() > 0.9  # confident at every answer token
    untrained = answer_logits(load_model(str(tiny_model_dir), device="cpu"))
    assert cosine(logits, untrained) < 0.5  # the similarity tests below can fail


@pytest.mark.parametrize(
    ("method", "min_cosine"), [("nf4", 0.97), ("int8", 0.99), ("cpu-int8", 0.99)]
)
def test_quantized_logits_and_answers_match_fp32(
    fp32_peaked, peaked_model_dir: Path, tmp_path: Path, method: str, min_cosine: float
) -> None:
    _, ref_logits, ref_answers = fp32_peaked
    lm = load_model(str(quantize_checkpoint(peaked_model_dir, tmp_path / "q", method=method)))
    assert cosine(answer_logits(lm), ref_logits) >= min_cosine
    assert answers(lm) == ref_answers


def test_cpu_int8_saved_equals_in_memory(peaked_model_dir: Path, tmp_path: Path) -> None:
    in_memory = load_model(str(peaked_model_dir), device="cpu")
    quantize_cpu_int8(in_memory.model)
    dst = quantize_checkpoint(
        peaked_model_dir, tmp_path / "c8", method="cpu-int8", skip_modules=DEFAULT_SKIP_MODULES
    )
    loaded = load_model(str(dst), device="cpu")
    assert torch.equal(answer_logits(loaded), answer_logits(in_memory))


def test_cpu_int8_stores_int8_weights_and_no_fp32_copies(
    peaked_model_dir: Path, tmp_path: Path
) -> None:
    dst = quantize_checkpoint(
        peaked_model_dir, tmp_path / "c8", method="cpu-int8", skip_modules=DEFAULT_SKIP_MODULES
    )
    with safe_open(str(dst / CPU_INT8_FILE), framework="pt") as f:
        quantized = json.loads(f.metadata()["quantized_modules"])
        keys = set(f.keys())
        assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
        for name in quantized:
            assert f.get_tensor(f"{name}.qweight").dtype == torch.int8
            assert f"{name}.weight" not in keys
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # skipped: kept as is
    assert not (dst / "model.safetensors").exists()  # from_pretrained cannot misread it


def test_tower_in_nf4_stays_close_and_computes_in_bf16_on_cpu(
    fp32_peaked, peaked_model_dir: Path, tmp_path: Path
) -> None:
    """The FQ4+tower recipe of the GPU memory table: tower quantized too, answers unchanged."""
    import bitsandbytes as bnb

    from tinyllava_med.quantize.device_rows import TOWER_SKIP

    _, ref_logits, ref_answers = fp32_peaked
    dst = quantize_checkpoint(
        peaked_model_dir, tmp_path / "t", method="nf4", skip_modules=TOWER_SKIP
    )
    lm = load_model(str(dst), device="cpu")
    four_bit = {n: m for n, m in lm.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any(n.startswith("model.vision_tower.") for n in four_bit)
    assert not any(n.startswith(("lm_head", "model.multi_modal_projector")) for n in four_bit)
    # stored with fp16 compute; on the CPU it computes in bf16, as when quantized while loading
    assert {m.compute_dtype for m in four_bit.values()} == {torch.bfloat16}
    assert cosine(answer_logits(lm), ref_logits) >= 0.97
    assert answers(lm) == ref_answers


def test_tower_in_int8_beside_an_nf4_language_model(
    fp32_peaked, peaked_model_dir: Path, tmp_path: Path
) -> None:
    """`--int8 model.vision_tower`: stored in fp16 (one bitsandbytes scheme per checkpoint),
    LLM.int8 once loaded with no flags, the language model in nf4, answers unchanged."""
    import bitsandbytes as bnb

    _, ref_logits, ref_answers = fp32_peaked
    dst = quantize_checkpoint(
        peaked_model_dir, tmp_path / "t8", method="nf4", int8_modules=["model.vision_tower"]
    )
    meta = ServedMeta.load(dst)
    assert meta.quantization == "4bit" and meta.int8_modules == ["model.vision_tower"]
    assert "LLM.int8 when loaded: model.vision_tower" in meta.notes
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        names = f.keys()  # noqa: SIM118 (safe_open is not iterable)
        tower = [k for k in names if "vision_tower." in k and "_proj.weight" in k]
        assert tower and {f.get_tensor(k).dtype for k in tower} == {torch.float16}
    lm = load_model(str(dst), device="cpu")
    assert lm.info["quantization"] == "4bit+int8"  # what every report of it records
    kinds = {n: type(m) for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    tower_linears = {n: k for n, k in kinds.items() if n.startswith("model.vision_tower.")}
    int8 = [n for n, k in tower_linears.items() if k is bnb.nn.Linear8bitLt]
    assert len(int8) >= 8 and all(  # all but the pooling head's attention (used as weights)
        k is bnb.nn.Linear8bitLt for n, k in tower_linears.items() if "head.attention" not in n
    )
    assert lm.model.get_submodule(int8[0]).weight.dtype == torch.int8
    llm = [k for n, k in kinds.items() if n.startswith("model.language_model.")]
    assert llm and set(llm) == {bnb.nn.Linear4bit}
    assert kinds["lm_head"] is torch.nn.Linear
    assert cosine(answer_logits(lm), ref_logits) >= 0.97
    assert answers(lm) == ref_answers


def test_int8_modules_are_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    tower = ["model.vision_tower"]
    with pytest.raises(ValueError, match="for --method nf4"):
        quantize_checkpoint(tiny_model_dir, tmp_path / "a", method="int8", int8_modules=tower)
    # the same modules, or some of them under a longer path: kept in fp16 or int8, not both
    for int8 in (tower, ["model.vision_tower.encoder"]):
        with pytest.raises(ValueError, match="given int8 too"):
            quantize_checkpoint(
                tiny_model_dir,
                tmp_path / "b",
                method="nf4",
                skip_modules=[*DEFAULT_SKIP_MODULES],
                int8_modules=int8,
            )
    with pytest.raises(ValueError, match="match no module"):
        quantize_checkpoint(
            tiny_model_dir, tmp_path / "c", method="nf4", int8_modules=["vision_tower"]
        )
    assert not any((tmp_path / d).exists() for d in "abc")


def test_int8_inside_a_kept_module_is_named_as_its_exception(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The default list keeps the whole tower; `--int8 model.vision_tower.encoder` takes the
    encoder from it, and the note says so instead of naming the encoder in both lists."""
    import bitsandbytes as bnb

    encoder = "model.vision_tower.encoder"
    dst = quantize_checkpoint(tiny_model_dir, tmp_path / "e8", method="nf4", int8_modules=[encoder])
    notes = ServedMeta.load(dst).notes
    assert (
        f"kept in higher precision: model.vision_tower except {encoder}, "
        f"model.multi_modal_projector, lm_head; LLM.int8 when loaded: {encoder})"
    ) in notes
    lm = load_model(str(dst), device="cpu")
    tower = {
        n: type(m)
        for n, m in lm.model.named_modules()
        if n.startswith("model.vision_tower.") and isinstance(m, torch.nn.Linear)
    }
    assert {k for n, k in tower.items() if n.startswith(f"{encoder}.")} == {bnb.nn.Linear8bitLt}
    outside = {k for n, k in tower.items() if not n.startswith(f"{encoder}.")}
    assert outside and bnb.nn.Linear8bitLt not in outside  # the rest of the tower stays 16-bit


def test_skip_modules_are_a_parameter(peaked_model_dir: Path, tmp_path: Path) -> None:
    dst = quantize_checkpoint(
        peaked_model_dir, tmp_path / "c8", method="cpu-int8", skip_modules=["lm_head"]
    )
    with safe_open(str(dst / CPU_INT8_FILE), framework="pt") as f:
        quantized = json.loads(f.metadata()["quantized_modules"])
    assert "model.multi_modal_projector.linear_1" in quantized
    assert any(n.startswith("model.vision_tower.") for n in quantized)
    assert "lm_head" not in quantized


def test_bare_module_names_are_refused(peaked_model_dir: Path, tmp_path: Path) -> None:
    # transformers 5 paths: "multi_modal_projector" alone would silently match nothing
    with pytest.raises(ValueError, match="match no module"):
        quantize_checkpoint(
            peaked_model_dir, tmp_path / "x", method="nf4", skip_modules=["multi_modal_projector"]
        )


def test_quantized_folders_are_not_quantized_again(tiny_model_dir: Path, tmp_path: Path) -> None:
    dst = quantize_checkpoint(tiny_model_dir, tmp_path / "q8", method="int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "again", method="nf4")
    with pytest.raises(ValueError, match="already quantized"):
        load_model(str(dst), quant="4bit", device="cpu")


def test_quantize_command(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from tinyllava_med.quantize.commands import quantize_command

    assert quantize_command(str(tiny_model_dir), str(tmp_path / "q"), method="cpu-int8") == 0
    assert "written to" in capsys.readouterr().out
    bad = quantize_command(
        str(tiny_model_dir), str(tmp_path / "x"), method="nf4", skip_modules=["projector"]
    )
    assert bad == 2 and "match no module" in capsys.readouterr().err
    from tinyllava_med.cli import main

    dst = tmp_path / "t8"
    argv = ["quantize", str(tiny_model_dir), str(dst), "--method", "nf4", "--int8"]
    assert main([*argv, "model.vision_tower"]) == 0
    assert ServedMeta.load(dst).int8_modules == ["model.vision_tower"]


def test_a_quantized_copy_does_not_carry_the_sources_scores(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The demo model's folder holds its own scores (`demo_eval.json`) and a card with them: a
    quantized copy keeps neither as its own. The card stays, headed by what the copy is."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "demo_eval.json").write_text('{"summary": {"closed_accuracy": 0.99}}')
    (src / "README.md").write_text("# Demo\n\nclosed accuracy 99.7\n")
    dst = tmp_path / "q"
    dst.mkdir()
    (dst / "demo_eval.json").write_text("{}")  # left by an earlier build into this folder
    quantize_checkpoint(src, dst, method="int8")
    assert not (dst / "demo_eval.json").exists()
    card = (dst / "README.md").read_text()
    assert card.startswith("# Quantized copy") and "quantized by tinyllava-med (int8;" in card
    assert "unquantized model's" in card and card.endswith("# Demo\n\nclosed accuracy 99.7\n")
