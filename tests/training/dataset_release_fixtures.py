"""Tiny copies of the VQA-RAD, SLAKE and PathVQA public releases, in their exact layouts.

Field names, value styles and folder names follow the releases (see
`tinyllava_med/training/datasets/convert.py`); the contents are made up and a few quirks of the
real files are included on purpose: numeric answers, stray spaces in `answer_type`, Chinese
questions in SLAKE, a question whose image is missing.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from PIL import Image


def _jpeg(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), shade).save(path, format="JPEG")
    return path


def make_vqa_rad(root: Path) -> Path:
    """OSF layout: `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/` (5 questions)."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "VQA_RAD Image Folder"
    _jpeg(images / "synpic54610.jpg", 40)
    _jpeg(images / "synpic29265.jpg", 90)

    def record(qid, phrase, image, question, answer, atype, qtype, organ="HEAD"):
        return {
            "qid": qid,
            "phrase_type": phrase,
            "qid_linked_id": f"link-{qid}",
            "image_case_url": "https://medpix.nlm.nih.gov/case?id=x",
            "image_name": image,
            "image_organ": organ,
            "evaluation": "not evaluated",
            "question": question,
            "question_rephrase": "NULL",
            "question_relation": "NULL",
            "question_frame": "NULL",
            "question_type": qtype,
            "answer": answer,
            "answer_type": atype,
        }

    data = [
        record(0, "freeform", "synpic54610.jpg", "Are regions of the brain infarcted?", "Yes",
               "CLOSED", "PRES"),
        record(1, "para", "synpic54610.jpg", "Is there an infarct in the brain? ", "yes",
               "CLOSED", "PRES"),
        record(2, "test_freeform", "synpic29265.jpg", "How many lesions are seen?", 2,
               "OPEN", "COUNT", "CHEST"),
        record(3, "test_para", "synpic29265.jpg", "Where is the lesion located?",
               " Left Lower Lobe ", "OPEN ", "POS", "CHEST"),
        record(4, "freeform", "synpic00000.jpg", "Is this an MRI?", "no", "CLOSED", "MODALITY"),
    ]  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(data, indent=4))
    return root


def make_slake(root: Path) -> Path:
    """`Slake1.0/{train,validate,test}.json` + `Slake1.0/imgs/xmlabN/source.jpg` under `root`."""
    slake = root / "Slake1.0"
    for n, shade in [(1, 30), (2, 60), (102, 120)]:
        _jpeg(slake / "imgs" / f"xmlab{n}" / "source.jpg", shade)
        Image.new("L", (8, 8), 0).save(slake / "imgs" / f"xmlab{n}" / "mask.png")
        (slake / "imgs" / f"xmlab{n}" / "detection.json").write_text("[]")

    def record(qid, img_id, question, answer, lang, atype, content="Organ"):
        return {
            "img_id": img_id,
            "img_name": f"xmlab{img_id}/source.jpg",
            "question": question,
            "answer": answer,
            "q_lang": lang,
            "location": "Abdomen",
            "modality": "MRI",
            "answer_type": atype,
            "base_type": "vqa",
            "content_type": content,
            "triple": ["vhead", "_", "_"],
            "qid": qid,
        }

    splits = {
        "train.json": [
            record(0, 1, "What modality is used to take this image?", "MRI", "en", "OPEN",
                   "Modality"),
            record(1, 1, "这张图片的成像方式是什么?", "核磁共振", "zh", "OPEN", "Modality"),
            record(2, 1, "Does the picture contain liver?", "Yes", "en", "CLOSED"),
        ],
        "validate.json": [
            record(3, 2, "Which organ is abnormal?", "Liver", "en", "OPEN", "Abnormality"),
        ],
        "test.json": [
            record(11934, 102, "Is the lung healthy?", "No", "en", "CLOSED", "Abnormality"),
            record(11935, 102, "肺部健康吗?", "否", "zh", "CLOSED", "Abnormality"),
        ],
    }  # fmt: skip
    for name, records in splits.items():
        (slake / name).write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return root


def make_pathvqa(root: Path) -> Path:
    """`split/qas/{train,val,test}_vqa.pkl` + `split/images/{train,val,test}/*.jpg` under `root`."""
    split = root / "split"
    for name, shade in [("train/train_0001", 10), ("val/val_0001", 20), ("test/test_0001", 30)]:
        _jpeg(split / "images" / f"{name}.jpg", shade)

    def record(qid, img, sent, answer, atype):
        return {"answer_type": atype, "img_id": img, "label": {answer: 1}, "question_id": qid,
                "sent": sent}  # fmt: skip

    qas = {
        "train": [
            record(100001000, "train_0001", "Does this image show necrosis?", "yes", "yes/no"),
            record(100001001, "train_0001", "What is present?", "Granulomas", "other"),
            record(100001002, "train_0404", "Is this a kidney?", "no", "yes/no"),  # no image
        ],
        "val": [record(200001000, "val_0001", "How are the cells arranged?", "in sheets", "other")],
        "test": [record(300001000, "test_0001", "Is there fibrosis?", "yes", "yes/no")],
    }
    (split / "qas").mkdir(parents=True, exist_ok=True)
    for name, records in qas.items():
        (split / "qas" / f"{name}_vqa.pkl").write_bytes(pickle.dumps(records, protocol=4))
    return root
