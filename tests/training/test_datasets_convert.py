"""VQA-RAD / SLAKE / PathVQA release layouts -> LLaVA conversation files (train/test/images)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from dataset_release_fixtures import make_pathvqa, make_slake, make_vqa_rad

from tinyllava_med.training.datasets import (
    DatasetLayoutError,
    convert_dataset,
    load_plain_pickle,
)


def read(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, list)
    return data


def qa(entry: dict[str, Any]) -> tuple[str, str]:
    human, gpt = entry["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n")
    return human["value"][len("<image>\n") :], gpt["value"]


def check_images(dst: Path, *entry_lists: list[dict[str, Any]]) -> None:
    for entries in entry_lists:
        for e in entries:
            assert (dst / "images" / e["image"]).is_file(), e["image"]
            assert "/" not in e["image"]


def test_vqa_rad(tmp_path):
    src = make_vqa_rad(tmp_path / "VQA_RAD")
    dst = tmp_path / "out"
    summary = convert_dataset("vqa-rad", tmp_path, dst)  # parent folder: found below it

    train, test = read(dst / "train.json"), read(dst / "test.json")
    assert not (dst / "val.json").exists()
    assert [e["id"] for e in train] == [0, 1] and [e["id"] for e in test] == [2, 3]
    first = train[0]
    assert list(first)[:4] == ["id", "image", "conversations", "answer_type"]
    assert first["image"] == "synpic54610.jpg"
    assert qa(first) == ("Are regions of the brain infarcted?", "yes")
    assert first["answer_type"] == "CLOSED"
    assert (first["question_type"], first["image_organ"], first["phrase_type"]) == (
        "PRES",
        "HEAD",
        "freeform",
    )
    assert qa(train[1])[0] == "Is there an infarct in the brain?"
    assert qa(test[0]) == ("How many lesions are seen?", "2")
    assert (qa(test[1])[1], test[1]["answer_type"]) == ("left lower lobe", "OPEN")
    check_images(dst, train, test)
    assert (dst / "images" / "synpic29265.jpg").read_bytes() == (
        src / "VQA_RAD Image Folder" / "synpic29265.jpg"
    ).read_bytes()
    assert summary.questions == {"train": 2, "test": 2}
    assert summary.images == {"train": 1, "test": 1}
    assert summary.answer_types == {"train": {"CLOSED": 2}, "test": {"OPEN": 2}}
    assert summary.skipped == {"missing_image": 1}

    # again, into the same folder, hard-linking: same result, nothing breaks
    again = convert_dataset("vqa-rad", src, dst, link=True)
    assert again.to_dict()["questions"] == summary.questions
    assert read(dst / "test.json") == test


def test_slake_english_by_default(tmp_path):
    make_slake(tmp_path)
    dst = tmp_path / "slake"
    summary = convert_dataset("slake", tmp_path / "Slake1.0", dst)

    train, val, test = (read(dst / f"{s}.json") for s in ("train", "val", "test"))
    assert [e["id"] for e in train] == [0, 2]
    assert [e["id"] for e in val] == [3] and [e["id"] for e in test] == [11934]
    assert qa(train[0]) == ("What modality is used to take this image?", "mri")
    assert train[0]["image"] == "xmlab1.jpg" and test[0]["image"] == "xmlab102.jpg"
    assert (train[1]["answer_type"], qa(train[1])[1]) == ("CLOSED", "yes")
    assert qa(test[0])[1] == "no"
    meta = {k: train[0][k] for k in ("q_lang", "modality", "location", "content_type", "img_id")}
    assert meta == {
        "q_lang": "en",
        "modality": "MRI",
        "location": "Abdomen",
        "content_type": "Modality",
        "img_id": 1,
    }
    check_images(dst, train, val, test)
    assert sorted(p.name for p in (dst / "images").iterdir()) == [
        "xmlab1.jpg",
        "xmlab102.jpg",
        "xmlab2.jpg",
    ]
    assert summary.questions == {"train": 2, "val": 1, "test": 1}
    assert summary.skipped == {"other_language": 2}

    everything = convert_dataset("slake", tmp_path, tmp_path / "all", lang=None)
    assert everything.questions == {"train": 3, "val": 1, "test": 2}
    zh = read(tmp_path / "all" / "train.json")[1]
    assert qa(zh) == ("这张图片的成像方式是什么?", "核磁共振")


def test_pathvqa(tmp_path):
    make_pathvqa(tmp_path / "pvqa_release")
    dst = tmp_path / "pathvqa"
    summary = convert_dataset("pathvqa", tmp_path / "pvqa_release", dst)

    train, val, test = (read(dst / f"{s}.json") for s in ("train", "val", "test"))
    assert [e["id"] for e in train] == [100001000, 100001001]
    assert qa(train[0]) == ("Does this image show necrosis?", "yes")
    assert (train[0]["answer_type"], train[0]["source_answer_type"]) == ("CLOSED", "yes/no")
    assert (qa(train[1])[1], train[1]["answer_type"]) == ("granulomas", "OPEN")
    assert train[0]["image"] == "train_0001.jpg"
    assert (val[0]["image"], qa(val[0])[1]) == ("val_0001.jpg", "in sheets")
    assert (test[0]["image"], test[0]["answer_type"]) == ("test_0001.jpg", "CLOSED")
    check_images(dst, train, val, test)
    assert summary.skipped == {"missing_image": 1}
    assert summary.answer_types["train"] == {"CLOSED": 1, "OPEN": 1}


def test_pathvqa_pickle_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    make_pathvqa(tmp_path)
    bad = tmp_path / "split" / "qas" / "test_vqa.pkl"
    bad.write_bytes(pickle.dumps([{"sent": Payload()}]))
    with pytest.raises(DatasetLayoutError, match=r"refusing to load builtins\.print"):
        convert_dataset("pathvqa", tmp_path, tmp_path / "out")

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([{"a": (1, 2.5), "b": {"x", "y"}, "c": frozenset({True})}], 2))
    assert load_plain_pickle(plain) == [{"a": (1, 2.5), "b": {"x", "y"}, "c": frozenset({True})}]


def test_ids_stay_unique_and_scorable(tmp_path):
    """A repeated question id is renamed, and the files load in the project's scorer."""
    from tinyllava_med.eval.metrics import score

    src = make_vqa_rad(tmp_path / "rad")
    ann = src / "VQA_RAD Dataset Public.json"
    data = json.loads(ann.read_text())
    data[3]["qid"] = 2  # the real file is not guaranteed free of repeats
    ann.write_text(json.dumps(data))
    summary = convert_dataset("vqa-rad", src, tmp_path / "out")
    test = read(tmp_path / "out" / "test.json")
    assert [e["id"] for e in test] == [2, "2_1"] and summary.renamed_ids == 1
    preds = [{"question_id": e["id"], "text": qa(e)[1]} for e in test]
    report = score(test, preds)
    assert report.to_dict()["missing"] == []


def test_layout_errors_say_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="VQA_RAD Dataset Public.json"):
        convert_dataset("vqa-rad", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(DatasetLayoutError, match="Slake1.0"):
        convert_dataset("slake", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(DatasetLayoutError, match="qas/ and images/"):
        convert_dataset("pathvqa", tmp_path / "empty", tmp_path / "o")
    with pytest.raises(FileNotFoundError):
        convert_dataset("slake", tmp_path / "nope", tmp_path / "o")
    with pytest.raises(ValueError, match="unknown dataset"):
        convert_dataset("mimic", tmp_path / "empty", tmp_path / "o")  # type: ignore[arg-type]

    rad = make_vqa_rad(tmp_path / "rad")
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(DatasetLayoutError, match="record 0 lacks"):
        convert_dataset("vqa-rad", rad, tmp_path / "o")


def test_the_data_convert_command(tmp_path, capsys):
    """`tinyllava-med data convert` as the README writes it: options first, then SRC DST."""
    from tinyllava_med.cli import main

    src = make_vqa_rad(tmp_path / "VQA_RAD")
    dst = tmp_path / "out"
    assert main(["data", "convert", "--dataset", "vqa-rad", str(src), str(dst)]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == {"train": 2, "test": 2}
    assert len(read(dst / "test.json")) == 2
    assert main(["data", "convert", str(tmp_path / "none"), str(dst), "--dataset", "slake"]) == 2
    assert "error:" in capsys.readouterr().err


def test_data_merge_makes_the_downstream_set_of_the_three(tmp_path, capsys):
    """TinyLLaVA-Med-F's downstream stage trains on VQA-RAD, SLAKE and PathVQA together; `data
    convert` writes one folder each, and nothing put them together. `data merge` does: ids
    prefixed by their set (both number from 0), images reached through links to each set's."""
    from PIL import Image

    from tinyllava_med.cli import main
    from tinyllava_med.training.data import read_conversations

    root = tmp_path / "llava_med"
    convert_dataset("vqa-rad", make_vqa_rad(tmp_path / "VQA_RAD"), root / "vqa-rad")
    convert_dataset("slake", make_slake(tmp_path / "Slake1.0"), root / "slake")
    parts = [read(root / name / "train.json") for name in ("vqa-rad", "slake")]
    out = root / "3vqa"
    assert main(["data", "merge", str(out), str(root / "vqa-rad"), str(root / "slake")]) == 0
    summary = json.loads(capsys.readouterr().out)
    merged = read_conversations(out / "train.json")
    assert summary["entries"] == len(merged) == sum(len(p) for p in parts)
    assert [e["id"] for e in merged] == [f"vqa-rad-{e['id']}" for e in parts[0]] + [
        f"slake-{e['id']}" for e in parts[1]
    ]
    assert [qa(e) for e in merged] == [qa(e) for p in parts for e in p]
    for entry in merged:  # every image opens from the merged set's image folder
        Image.open(out / "images" / entry["image"]).verify()
    assert [p["entries"] for p in json.loads((out / "merge.json").read_text())["parts"]] == [
        len(p) for p in parts
    ]
    # run again: the same set; a folder that is no converted set is refused
    assert main(["data", "merge", str(out), str(root / "vqa-rad"), str(root / "slake")]) == 0
    capsys.readouterr()
    assert read_conversations(out / "train.json") == merged
    assert main(["data", "merge", str(out), str(root / "vqa-rad"), str(tmp_path)]) == 2
    assert "not a converted dataset" in capsys.readouterr().err
