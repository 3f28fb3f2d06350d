"""PhantomVQA: files, format, determinism, split, balance, vocabulary and the side convention."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tinyllava_med.training.phantom import (
    ANSWER_VOCAB,
    LATERALISED,
    QUESTION_TYPES,
    PhantomCase,
    PhantomSummary,
    generate_phantom,
    image_rng,
    make_questions,
    render_case,
    sample_case,
)

N = 400
SEED = 7


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomSummary]:
    out = tmp_path_factory.mktemp("phantom")
    return out, generate_phantom(out, N, SEED)


def _load(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "test")}


def _answer(entry: dict[str, Any]) -> str:
    return entry["conversations"][1]["value"]


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _cases(seed: int, n: int) -> list[PhantomCase]:
    return [sample_case(image_rng(seed, i), i) for i in range(n)]


def test_files_written_and_in_llava_vqa_format(phantom: tuple[Path, PhantomSummary]) -> None:
    out, summary = phantom
    data = _load(out)
    ids = set()
    for split, entries in data.items():
        assert entries, split
        for e in entries:
            assert set(e) >= {"id", "image", "conversations", "answer_type", "question_type"}
            assert re.fullmatch(rf"phantom-{SEED}-\d+-\d+", e["id"])
            assert e["answer_type"] in ("CLOSED", "OPEN")
            assert e["question_type"] in QUESTION_TYPES
            assert e["modality"] in ("x-ray", "ct", "mri")
            human, gpt = e["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n")
            assert human["value"].count("<image>") == 1
            assert human["value"].endswith("?")
            assert gpt["value"] == gpt["value"].strip().lower() and gpt["value"]
            ids.add(e["id"])
        assert summary.questions[split] == len(entries)
        assert sum(summary.answer_types[split].values()) == len(entries)
        assert summary.question_types[split] == dict(
            sorted(Counter(e["question_type"] for e in entries).items())
        )
    assert len(ids) == sum(len(e) for e in data.values()), "ids must be unique"
    assert summary.n == N and summary.seed == SEED
    assert summary.images == {"train": N - round(N * 0.2), "test": round(N * 0.2)}


def test_images_exist_are_8bit_greyscale_and_all_referenced(
    phantom: tuple[Path, PhantomSummary],
) -> None:
    out, _ = phantom
    data = _load(out)
    referenced = {e["image"] for entries in data.values() for e in entries}
    on_disk = {p.name for p in (out / "images").iterdir()}
    assert referenced == on_disk
    assert len(on_disk) == N
    for name in sorted(referenced)[:20]:
        with Image.open(out / "images" / name) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)


def test_split_is_by_image(phantom: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom
    data = _load(out)
    train = {e["image"] for e in data["train"]}
    test = {e["image"] for e in data["test"]}
    assert not train & test
    assert len(train) + len(test) == N
    assert len(test) == round(N * 0.2)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    generate_phantom(tmp_path / "a", 40, 3)
    generate_phantom(tmp_path / "b", 40, 3)
    generate_phantom(tmp_path / "c", 40, 4)
    a, b, c = (_digests(tmp_path / d) for d in "abc")
    assert a == b
    assert len(a) == 42  # 40 images + train.json + test.json
    images_a = {v for k, v in a.items() if k.startswith("images")}
    images_c = {v for k, v in c.items() if k.startswith("images")}
    assert not images_a & images_c


def test_every_question_type_present(phantom: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom
    for split, entries in _load(out).items():
        present = {(e["question_type"], e["answer_type"]) for e in entries}
        expected = {(q, a) for q, by_type in ANSWER_VOCAB.items() for a in by_type}
        assert present == expected, split
    assert set(ANSWER_VOCAB) == set(QUESTION_TYPES)


def test_answers_in_vocabulary(phantom: tuple[Path, PhantomSummary]) -> None:
    out, _ = phantom
    data = _load(out)
    for entries in data.values():
        for e in entries:
            assert _answer(e) in ANSWER_VOCAB[e["question_type"]][e["answer_type"]], e
    answers = Counter(_answer(e) for entries in data.values() for e in entries)
    for word in ("x-ray", "ct", "mri", "chest", "head", "abdomen", "knee", "none", "nodule"):
        assert answers[word] > 0, word
    for word in ("effusion", "hemorrhage", "mass", "fracture", "0", "1", "2", "left", "right"):
        assert answers[word] > 0, word


def test_yes_no_and_sides_balanced(phantom: tuple[Path, PhantomSummary]) -> None:
    out, summary = phantom
    entries = [e for split in _load(out).values() for e in split]
    yes_no = [e for e in entries if _answer(e) in ("yes", "no")]
    assert all(e["answer_type"] == "CLOSED" for e in yes_no)
    overall = sum(_answer(e) == "yes" for e in yes_no) / len(yes_no)
    assert 0.46 <= overall <= 0.54, overall
    for qtype in ("modality", "organ", "abnormal", "presence", "side"):
        sel = [e for e in yes_no if e["question_type"] == qtype]
        frac = sum(_answer(e) == "yes" for e in sel) / len(sel)
        assert 0.4 <= frac <= 0.6, (qtype, frac, len(sel))
    sides = [_answer(e) for e in entries if _answer(e) in ("left", "right")]
    assert 0.4 <= sides.count("left") / len(sides) <= 0.6
    normal = [e for e in entries if e["question_type"] == "finding" and _answer(e) == "none"]
    findings = [e for e in entries if e["question_type"] == "finding"]
    assert 0.4 <= len(normal) / len(findings) <= 0.6
    assert summary.yes_no["train"]["yes"] + summary.yes_no["test"]["yes"] == sum(
        _answer(e) == "yes" for e in yes_no
    )


def test_closed_questions_balanced_per_thing_asked(phantom: tuple[Path, PhantomSummary]) -> None:
    """The named modality / organ / finding alone must not give the answer away."""
    out, _ = phantom
    entries = [e for split in _load(out).values() for e in split]
    keywords = {
        "modality": {"ct": ("CT", "computed"), "x-ray": ("x-ray", "radiograph", "plain film")},
        "organ": {"chest": ("chest", "thorax"), "head": ("head", "brain"), "knee": ("knee",)},
        "presence": {"nodule": ("nodule",), "effusion": ("effusion", "fluid")},
    }
    for qtype, asked in keywords.items():
        for thing, words in asked.items():
            sel = [
                _answer(e)
                for e in entries
                if e["question_type"] == qtype
                and e["answer_type"] == "CLOSED"
                and any(w in e["conversations"][0]["value"] for w in words)
            ]
            assert len(sel) >= 20, (qtype, thing)
            assert 0.33 <= sel.count("yes") / len(sel) <= 0.67, (qtype, thing, Counter(sel))


def test_right_sided_chest_finding_is_on_image_left() -> None:
    cases = _cases(11, 300)
    for finding in ("nodule", "effusion"):
        for side in ("right", "left"):
            case = next(
                c
                for c in cases
                if c.kind == "chest_xray" and c.finding == finding and c.side == side
            )
            pixels, mask = render_case(case)
            normal, empty = render_case(dataclasses.replace(case, lesions=()))
            assert mask.any() and not empty.any()
            columns = np.nonzero(mask)[1]
            changed = np.nonzero(pixels != normal)[1]
            if side == "right":  # patient right = image left
                assert columns.max() < 32, (finding, side)
                assert changed.max() < 32, (finding, side)
            else:
                assert columns.min() >= 32, (finding, side)
                assert changed.min() >= 32, (finding, side)


def test_every_lateralised_finding_stays_on_its_side() -> None:
    for case in _cases(12, 400):
        _, mask = render_case(case)
        if case.finding == "none":
            assert not mask.any()
            continue
        assert mask.any(), case
        if case.finding not in LATERALISED:
            assert case.side is None
            continue
        for lesion in case.lesions:
            _, lesion_mask = render_case(dataclasses.replace(case, lesions=(lesion,)))
            columns = np.nonzero(lesion_mask)[1]
            if lesion.side == "right":
                assert columns.max() < 32, case
            else:
                assert columns.min() >= 32, case
        if case.side is not None:
            assert all(lesion.side == case.side for lesion in case.lesions)


def test_answers_match_the_drawn_case() -> None:
    for case in _cases(13, 200):
        rng = np.random.default_rng(0)
        for q in make_questions(case, rng):
            if q.question_type == "side" and q.answer in ("left", "right"):
                assert q.answer == case.side
            if q.question_type == "count":
                assert case.kind == "chest_xray"
                assert q.answer == str(sum(les.kind == "nodule" for les in case.lesions))
            if q.question_type == "finding":
                assert q.answer == case.finding
            if q.question_type == "modality" and q.answer_type == "OPEN":
                assert q.answer == case.modality
            if q.question_type == "organ" and q.answer_type == "OPEN":
                assert q.answer == case.organ
        nodules = [les for les in case.lesions if les.kind == "nodule"]
        if len(nodules) == 2:  # two nodules are centred in different 16 px patches
            centres = set()
            for lesion in nodules:
                _, m = render_case(dataclasses.replace(case, lesions=(lesion,)))
                rows, cols = np.nonzero(m)
                centres.add((int(rows.mean()) // 16, int(cols.mean()) // 16))
            assert len(centres) == 2, case


def test_image_size_and_bad_arguments(tmp_path: Path) -> None:
    summary = generate_phantom(tmp_path, 6, 0, image_size=32, test_fraction=0.5)
    assert summary.images == {"train": 3, "test": 3}
    for p in (tmp_path / "images").iterdir():
        with Image.open(p) as im:
            assert im.size == (32, 32)
    with pytest.raises(ValueError, match="n must be"):
        generate_phantom(tmp_path, 0, 0)
    with pytest.raises(ValueError, match="test_fraction"):
        generate_phantom(tmp_path, 4, 0, test_fraction=1.0)
    with pytest.raises(ValueError, match="seed"):
        generate_phantom(tmp_path, 4, -1)


def test_a_new_set_in_the_same_folder_leaves_no_old_images(tmp_path: Path) -> None:
    """`data phantom --n 6` over an earlier `--n 40` (or another seed): the folder holds the new
    set's images alone, and files that are not phantoms stay."""
    generate_phantom(tmp_path, 40, 3)
    (tmp_path / "images" / "mine.png").write_bytes(b"x")
    generate_phantom(tmp_path, 6, 5)
    names = {p.name for p in (tmp_path / "images").iterdir()}
    assert names == {f"phantom-5-{i:05d}.png" for i in range(6)} | {"mine.png"}
