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


def _twin(peaked_model_dir: Path, out: Path, change) -> Path:
    """The peaked model changed by `change(model)`, saved as a served checkpoint."""
    from tinyllava_med.model.tiny import save_served

    lm = load_model(str(peaked_model_dir), device="cpu")
    with torch.no_grad():
        change(lm.model)
    return save_served(lm.model, lm.processor, out, lm.meta)


def test_a_default_recipe_that_drifts_is_reported_with_a_warning(
    peaked_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """Massive activations inside the LLM (whose linears the default recipe quantizes): the
    check says the default itself drifted, and the command warns."""
    from tinyllava_med.quantize.commands import quantize_command

    def outlier_in_llm(model) -> None:
        for layer in model.model.language_model.layers:
            layer.post_attention_layernorm.weight[0] *= 1000.0
            layer.mlp.gate_proj.weight[:, 0] /= 1000.0
            layer.mlp.up_proj.weight[:, 0] /= 1000.0

    src = _twin(peaked_model_dir, tmp_path / "llm-outlier", outlier_in_llm)
    assert quantize_command(str(src), str(tmp_path / "c8"), method="cpu-int8") == 0
    report = json.loads((tmp_path / "c8" / CHECK_FILE).read_text())
    assert report["default_ok"] is False and report["scores"][0]["min_cosine"] < MIN_COSINE
    assert "warning: the default cpu-int8 recipe itself changed answers" in capsys.readouterr().err
    assert quantize_command(str(peaked_model_dir), str(tmp_path / "ok"), method="cpu-int8") == 0
    assert "warning" not in capsys.readouterr().err


def test_a_tied_lm_head_stays_tied_and_fp32(peaked_model_dir: Path, tmp_path: Path) -> None:
    """int8 beside the fp32 embedding it shares would add memory: a tied head is not tried,
    and the saved model still stores the matrix once."""

    def tie(model) -> None:
        model.lm_head.weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
        model.config.get_text_config().tie_word_embeddings = True

    src = _twin(peaked_model_dir, tmp_path / "tied", tie)
    dst = quantize_checkpoint(src, tmp_path / "c8", method="cpu-int8", check_prompts=_prompts())
    report = json.loads((dst / CHECK_FILE).read_text())
    assert [s["int8_extra"] for s in report["scores"]] == [[], ["model.vision_tower"]]
    lm = load_model(str(dst), device="cpu")
    embed = lm.model.get_input_embeddings().weight
    assert lm.model.lm_head.weight.data_ptr() == embed.data_ptr()  # one matrix, as stored
    assert "lm_head" not in _int8_modules(dst)


def test_a_refused_module_gets_its_own_linears_back(outlier_model_dir: Path) -> None:
    """A refusal puts back the very fp32 objects it replaced (no copy: memory, ties, hooks)."""
    from tinyllava_med.quantize.check import quantize_checked
    from tinyllava_med.quantize.skip import DEFAULT_SKIP_MODULES

    lm = load_model(str(outlier_model_dir), device="cpu")
    head = lm.model.lm_head
    skip, report = quantize_checked(lm, DEFAULT_SKIP_MODULES, _prompts(), "cases")
    assert report.int8_extra == ["model.vision_tower"] and "lm_head" in skip
    assert lm.model.lm_head is head and type(head) is torch.nn.Linear
    assert not hasattr(head, "qconfig")


def test_a_second_quantization_into_the_same_folder_leaves_no_stale_check(
    peaked_model_dir: Path, tmp_path: Path, capsys
) -> None:
    from tinyllava_med.quantize.commands import quantize_command

    dst = tmp_path / "q"
    assert quantize_command(str(peaked_model_dir), str(dst), method="cpu-int8") == 0
    assert (dst / CHECK_FILE).is_file()
    capsys.readouterr()
    assert quantize_command(str(peaked_model_dir), str(dst), method="nf4") == 0
    assert not (dst / CHECK_FILE).exists() and not (dst / CPU_INT8_FILE).exists()
    assert "int8 beyond" not in capsys.readouterr().out
    assert load_model(str(dst), device="cpu").quantization == "4bit"


def test_site_images_are_read_as_the_server_reads_them(tmp_path: Path) -> None:
    """DICOM and 16-bit PNG (how CT and radiographs are exported) work; the 16-bit image is
    stretched as the server stretches it, not clipped white by a plain PIL conversion."""
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file

    from tinyllava_med.quantize.check import file_prompts

    (tmp_path / "img").mkdir()
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "img" / "ct16.png")
    ct = Path(get_testdata_file("CT_small.dcm", download=False))
    (tmp_path / "img" / "ct.dcm").write_bytes(ct.read_bytes())
    questions = tmp_path / "q.json"
    entries = [
        {"question_id": "a", "image": "ct16.png", "text": "Which organ?"},
        {"question_id": "b", "image": "ct.dcm", "text": "Any nodule?"},
    ]
    questions.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    prompts = file_prompts(questions, tmp_path / "img", 8)
    assert [p.question for p in prompts] == ["Which organ?", "Any nodule?"]
    grey = np.asarray(prompts[0].image.convert("L"), dtype=float)
    assert 60 < grey.mean() < 200 and (grey == 255).mean() < 0.1, grey.mean()


def test_bad_check_inputs_are_clear_errors(peaked_model_dir: Path, tmp_path: Path, capsys) -> None:
    from tinyllava_med.quantize.commands import quantize_command

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image at all")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question_id": 1, "image": "bad.png", "text": "Q?"}) + "\n")
    no_image = tmp_path / "no-image.jsonl"
    no_image.write_text(json.dumps({"question_id": 1, "text": "Q?"}) + "\n")
    img = str(tmp_path / "img")
    cases = [
        (dict(check_questions=str(broken), check_images=img), "bad.png: unsupported_format"),
        (dict(check_questions=str(no_image), check_images=img), "not a question file"),
        (
            dict(check_questions=str(broken), check_images=img, skip_modules=["lm_head"]),
            "runs only for --method cpu-int8 with the default skip list",
        ),
    ]
    for i, (kwargs, message) in enumerate(cases):
        dst = tmp_path / f"x{i}"
        code = quantize_command(str(peaked_model_dir), str(dst), method="cpu-int8", **kwargs)
        assert code == 2 and message in capsys.readouterr().err, kwargs
        assert not dst.exists()  # nothing half-written


def test_each_half_of_the_rule_refuses_on_its_own() -> None:
    from tinyllava_med.quantize.check import Score, accepts

    before = Score([], [True, True, False], 0.999)
    assert accepts(Score(["m"], [True, True, False], 0.995), before)
    assert not accepts(Score(["m"], [True, True, False], 0.98), before)  # drifted, same answers
    assert not accepts(Score(["m"], [True, False, True], 0.999), before)  # an answer lost
    assert accepts(Score(["m"], [True, True, False], MIN_COSINE), before)


def test_prompts_of_different_lengths_line_up(peaked_model_dir: Path) -> None:
    """Left padding, positions and the kept logits: the fp32 model scored on its own answers to
    phantoms whose prompts differ in length keeps every answer at cosine 1."""
    from tinyllava_med.quantize.check import CHUNK, Reference

    lm = load_model(str(peaked_model_dir), device="cpu")
    prompts = phantom_prompts(CHUNK + 3)  # two passes, the second one partial
    reference = Reference(lm, prompts)
    assert len({len(p) for p in reference.prompt_ids}) > 1  # really padded
    assert len({len(a) for a in reference.answers}) > 1 or len(reference.answers[0]) > 1
    score = reference.score(lm.model, [])
    assert score.kept == len(prompts) and score.min_cosine > 0.9999
