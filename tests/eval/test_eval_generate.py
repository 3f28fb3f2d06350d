"""`eval generate` on a CPU shares prompt prefixes across questions and answers as without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tinyllava_med.eval.generate as eval_generate
from tinyllava_med.eval.generate import generate_answers, read_questions
from tinyllava_med.model.generate import SamplingParams
from tinyllava_med.training.phantom import generate_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, n=6, seed=11)
    return out


def _answers(path: Path) -> dict[str, str]:
    return {x["question_id"]: x["text"] for x in map(json.loads, path.read_text().splitlines())}


def test_shared_prefixes_change_no_answer(tiny_lm, phantom: Path, tmp_path: Path, monkeypatch):
    """Without a cache, with the template's opening shared (the default on a CPU for a small
    tower) and with each image's prompt shared up to the image (as for a real tower): the same
    answers; sharing by image runs the vision tower once per image, not once per question."""
    rows_seen: list[int] = []
    tower = tiny_lm.model.model.vision_tower
    forward = tower.forward

    def counting(pixel_values, *args, **kwargs):
        rows_seen.append(int(pixel_values.shape[0]))
        return forward(pixel_values, *args, **kwargs)

    monkeypatch.setattr(tower, "forward", counting)
    questions = read_questions(phantom / "test.json")
    images = {q.image for q in questions}
    assert len(images) < len(questions)  # several questions per image: something to share
    params = SamplingParams(max_new_tokens=4)

    def run(name: str, **kwargs) -> dict[str, str]:
        rows_seen.clear()
        out = tmp_path / f"{name}.jsonl"
        counts = generate_answers(
            tiny_lm, phantom / "test.json", phantom / "images", out, params=params,
            batch_size=4, progress=False, **kwargs,
        )  # fmt: skip
        assert counts["answered"] == len(questions)
        return _answers(out)

    plain = run("plain", prefix_cache_mb=0)
    assert sum(rows_seen) == len(questions)
    assert run("opening") == plain  # the default on a CPU
    assert sum(rows_seen) == len(questions)  # the images are still in every row's own words
    monkeypatch.setattr(eval_generate, "image_prefixes_pay", lambda lm: True)
    assert run("by_image") == plain
    assert sum(rows_seen) == len(images)


def test_images_are_read_as_the_server_reads_uploads(tiny_lm, tmp_path: Path) -> None:
    """A 16-bit PNG (a CT export) is stretched, not clipped white, so it gets the answer the
    server gives the same file; a DICOM is read; a broken file fails alone."""
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file

    from tinyllava_med.imaging import load_study_file
    from tinyllava_med.model.generate import generate

    images = tmp_path / "img"
    images.mkdir()
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16 % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(images / "ct16.png")
    ct = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    (images / "ct.dcm").write_bytes(ct)
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    questions = tmp_path / "q.jsonl"
    rows = [("a", "ct16.png"), ("b", "ct.dcm"), ("c", "bad.png")]
    questions.write_text(
        "".join(
            json.dumps({"question_id": q, "image": i, "text": "Organ?"}) + "\n" for q, i in rows
        )
    )
    out = tmp_path / "answers.jsonl"
    params = SamplingParams(max_new_tokens=4)
    counts = generate_answers(tiny_lm, questions, images, out, params=params, progress=False)
    assert (counts["answered"], counts["failed"]) == (2, 1)
    served = [
        load_study_file((images / name).read_bytes()).image for name in ("ct16.png", "ct.dcm")
    ]
    want = [a.text for a in generate(tiny_lm, served, ["Organ?"] * 2, params)]
    got = _answers(out)
    assert [got["a"], got["b"]] == want


def test_a_file_resumes_only_its_own_model_and_decoding(tiny_lm, phantom: Path, tmp_path: Path):
    """Run again into the same file: its answers are kept and the missing ones asked. Another
    model (weights, quantization) or decoding would mix two models' answers in one file scored
    under one name, so it is refused and the file is left as it was."""
    import dataclasses

    out = tmp_path / "answers.jsonl"
    params = SamplingParams(max_new_tokens=4)

    def run(lm=tiny_lm, p=params, limit=None):
        return generate_answers(
            lm, phantom / "test.json", phantom / "images", out, params=p, limit=limit,
            progress=False,
        )  # fmt: skip

    n = len(read_questions(phantom / "test.json"))
    assert run(limit=5)["answered"] == 5
    assert run() == {"answered": n - 5, "failed": 0, "skipped": 5}
    before = out.read_text()
    with pytest.raises(ValueError, match=r"decoding .*max_new_tokens.* 4.* here"):
        run(p=SamplingParams(max_new_tokens=1))
    other = dataclasses.replace(tiny_lm, quantization="4bit", weights="sha256:other")
    with pytest.raises(ValueError, match="model_weights") as refused:
        run(lm=other)
    assert "quantization" in str(refused.value) and str(out) in str(refused.value)
    assert out.read_text() == before
    # the same weights under another label of one scheme (an earlier version wrote `cpu-int8`
    # where this one writes `cpu-int8+tower+lm_head`) are the same model: the file resumes
    lines = [json.loads(x) for x in before.splitlines()]
    for line in lines:
        line["metadata"]["quantization"] += "+tower"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run()["skipped"] == n


def test_llava_med_grayscale_pad(tiny_lm, tmp_path: Path, monkeypatch) -> None:
    """`grayscale_pad="llava-med"` pads a non-square grayscale file (PIL mode L) with LLaVA-Med's
    one gray (114 for CLIP's mean), as its model_vqa.py did; an RGB file, even of gray pixels,
    is as by default. The run records it, and a file of one padding does not resume with the
    other. Checked on the images the model is given (a tiny model's answers may not differ)."""
    import copy
    import dataclasses

    from PIL import Image

    from tinyllava_med.model.processor import VISION_SPECS

    mean = VISION_SPECS["clip"].image_mean
    processor = copy.deepcopy(tiny_lm.processor)  # a CLIP tower's mean (LLaVA-Med's)
    processor.image_processor.image_mean = list(mean)
    lm = dataclasses.replace(tiny_lm, processor=processor)
    assert eval_generate.llava_med_gray(lm) == 114  # LLaVA-Med's process_images, mode L
    images = tmp_path / "img"
    images.mkdir()
    wide = Image.linear_gradient("L").resize((64, 40))
    wide.save(images / "gray.png")
    wide.convert("RGB").save(images / "rgb.png")
    questions = tmp_path / "q.jsonl"
    rows = [("g", "gray.png"), ("c", "rgb.png")]
    questions.write_text(
        "".join(
            json.dumps({"question_id": q, "image": i, "text": "Organ?"}) + "\n" for q, i in rows
        )
    )
    given: list[Image.Image] = []
    generate = eval_generate.generate

    def seen(lm, imgs, *args, **kwargs):
        given.extend(imgs)
        return generate(lm, imgs, *args, **kwargs)

    monkeypatch.setattr(eval_generate, "generate", seen)
    params = SamplingParams(max_new_tokens=4)
    out = tmp_path / "llava-med.jsonl"
    counts = generate_answers(
        lm, questions, images, out, params=params, progress=False, grayscale_pad="llava-med"
    )
    assert counts["answered"] == 2
    padded = Image.new("RGB", (64, 64), (114, 114, 114))
    padded.paste(wide.convert("RGB"), (0, 12))
    assert [g.size for g in given] == [(64, 64), (64, 40)]
    assert given[0].tobytes() == padded.tobytes()
    assert given[1].tobytes() == wide.convert("RGB").tobytes()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["metadata"]["grayscale_pad"] for line in lines} == {114}
    with pytest.raises(ValueError, match="grayscale_pad"):
        generate_answers(lm, questions, images, out, params=params, progress=False)
    given.clear()
    generate_answers(lm, questions, images, tmp_path / "mean.jsonl", params=params, progress=False)
    assert [g.size for g in given] == [(64, 40), (64, 40)]  # by default the processor pads
