"""The cpu-int8 output check: the tower and `lm_head` go int8 only where this model's answers hold.

The peaked tiny model answers confidently and by image, so a changed answer means a broken path.
Its "outlier" twin computes exactly the same in fp32 but feeds `lm_head` one huge activation
channel (as real LLMs and ViTs carry massive activations): dynamic int8 quantizes a layer's
input with one scale per tensor, so the other channels round to zero there. The check must
refuse that `lm_head`, which the unchecked recipe (`--skip model.multi_modal_projector`) ruins.
The same outliers inside the tiny tower barely move its answers' logits (cosine 0.9989: its
answers come through the patch embedding), so the refusal is shown on `lm_head`; the tower and
`lm_head` go through the same loop of `quantize.check.quantize_checked`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_helpers import CASES, QUESTION, answer_logits, answers, case_images, cosine
from safetensors import safe_open

from tinyllava_med.model.load import load_model
from tinyllava_med.quantize.check import CHECK_FILE, MIN_COSINE, Prompt, phantom_prompts
from tinyllava_med.quantize.cpu_int8 import CPU_INT8_FILE, quantize_cpu_int8
from tinyllava_med.quantize.export import quantize_checkpoint

TOWER = "model.vision_tower."


def _prompts() -> list[Prompt]:
    return [Prompt(image, QUESTION) for image in case_images()]


def _int8_modules(folder: Path) -> list[str]:
    with safe_open(str(folder / CPU_INT8_FILE), framework="pt") as f:
        return json.loads(f.metadata()["quantized_modules"])


@pytest.fixture(scope="module")
def fp32(peaked_model_dir: Path):
    lm = load_model(str(peaked_model_dir), device="cpu")
    return answer_logits(lm), answers(lm)


@pytest.fixture(scope="module")
def outlier_model_dir(peaked_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The peaked model with channel 0 of the LLM's final norm scaled up 1000x and `lm_head`'s
    weights on that channel scaled down as much: the same function, one massive activation."""
    from tinyllava_med.model.tiny import save_served

    lm = load_model(str(peaked_model_dir), device="cpu")
    with torch.no_grad():
        lm.model.model.language_model.norm.weight[0] *= 1000.0
        lm.model.lm_head.weight[:, 0] /= 1000.0
    out = tmp_path_factory.mktemp("outlier-model")
    return save_served(lm.model, lm.processor, out, lm.meta)


def test_tower_and_lm_head_go_int8_when_the_answers_hold(
    fp32, peaked_model_dir: Path, tmp_path: Path
) -> None:
    ref_logits, ref_answers = fp32
    dst = quantize_checkpoint(
        peaked_model_dir, tmp_path / "c8", method="cpu-int8", check_prompts=_prompts()
    )
    int8 = _int8_modules(dst)
    assert any(n.startswith(TOWER) for n in int8) and "lm_head" in int8
    assert "model.multi_modal_projector.linear_1" not in int8  # not a candidate: stays fp32
    report = json.loads((dst / CHECK_FILE).read_text())
    assert report["int8_extra"] == ["model.vision_tower", "lm_head"]
    assert [s["accepted"] for s in report["scores"]] == [None, True, True]
    assert all(s["kept"] == len(CASES) and s["min_cosine"] >= MIN_COSINE for s in report["scores"])
    lm = load_model(str(dst), device="cpu")
    assert "kept in higher precision: model.multi_modal_projector;" in lm.meta.notes
    assert cosine(answer_logits(lm), ref_logits) >= 0.99
    # what was saved is the recipe the check chose, computed exactly (trials left no trace)
    same_recipe = load_model(str(peaked_model_dir), device="cpu")
    quantize_cpu_int8(same_recipe.model, ["model.multi_modal_projector"])
    assert torch.equal(answer_logits(lm), answer_logits(same_recipe))
    assert answers(lm) == ref_answers


def test_outlier_twin_is_the_same_model_in_fp32(fp32, outlier_model_dir: Path) -> None:
    ref_logits, ref_answers = fp32
    lm = load_model(str(outlier_model_dir), device="cpu")
    assert cosine(answer_logits(lm), ref_logits) > 0.9999
    assert answers(lm) == ref_answers


def test_a_module_that_int8_breaks_stays_fp32(
    fp32, outlier_model_dir: Path, tmp_path: Path
) -> None:
    _, ref_answers = fp32
    unchecked = quantize_checkpoint(
        outlier_model_dir,
        tmp_path / "unchecked",
        method="cpu-int8",
        skip_modules=["model.multi_modal_projector"],
    )
    assert answers(load_model(str(unchecked), device="cpu")) != ref_answers  # the hazard is real
    assert not (unchecked / CHECK_FILE).exists()  # an explicit skip list is not checked

    dst = quantize_checkpoint(
        outlier_model_dir, tmp_path / "checked", method="cpu-int8", check_prompts=_prompts()
    )
    int8 = _int8_modules(dst)
    assert any(n.startswith(TOWER) for n in int8) and "lm_head" not in int8
    report = json.loads((dst / CHECK_FILE).read_text())
    tower, head = report["scores"][1:]
    assert tower["int8_extra"] == ["model.vision_tower"] and tower["accepted"] is True
    assert head["int8_extra"] == ["model.vision_tower", "lm_head"] and head["accepted"] is False
    assert head["kept"] < len(CASES) and head["min_cosine"] < MIN_COSINE
    assert report["int8_extra"] == ["model.vision_tower"]
    lm = load_model(str(dst), device="cpu")
    assert "kept in higher precision: model.multi_modal_projector, lm_head;" in lm.meta.notes
    assert answers(lm) == ref_answers


def test_phantom_prompts_are_fixed_and_varied() -> None:
    first, again = phantom_prompts(8), phantom_prompts(8)
    assert [p.question for p in first] == [p.question for p in again]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again, strict=True))
    assert len({p.question for p in first}) >= 6
    assert len({p.image.tobytes() for p in first}) == 8


def test_quantize_command_reports_the_check(peaked_model_dir: Path, tmp_path: Path, capsys) -> None:
    from tinyllava_med.quantize.commands import quantize_command

    questions = tmp_path / "q.jsonl"
    (tmp_path / "img").mkdir()
    lines = []
    for i, image in enumerate(case_images()):
        image.save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"question_id": i, "image": f"{i}.png", "text": QUESTION}))
    questions.write_text("\n".join(lines) + "\n")
    code = quantize_command(
        str(peaked_model_dir),
        str(tmp_path / "c8"),
        method="cpu-int8",
        check_questions=str(questions),
        check_images=str(tmp_path / "img"),
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"output check on {len(CASES)} q.jsonl prompts" in out
    assert "int8 beyond the default: model.vision_tower, lm_head" in out
    bad = quantize_command(
        str(peaked_model_dir), str(tmp_path / "x"), method="cpu-int8", check_images="img"
    )
    assert bad == 2 and "go together" in capsys.readouterr().err
    bad = quantize_command(
        str(peaked_model_dir), str(tmp_path / "y"), method="cpu-int8", check_prompts=0
    )
    assert bad == 2 and "at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
