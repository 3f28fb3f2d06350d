"""VQA-RAD, SLAKE and PathVQA public releases -> LLaVA conversation files (LLaVA-Med's layout).

`tinyllava-med data convert --dataset slake ./Slake1.0 ./data/slake` calls
`convert_dataset("slake", "./Slake1.0", "./data/slake")`.

Written, as LLaVA-Med prepares its downstream sets (`train.json`, `test.json`, `images/`)::

    DST/train.json   flat list, one entry per question
    DST/test.json    the release's test split
    DST/val.json     the release's validation split, when it has one (SLAKE, PathVQA); LLaVA-Med
                     fine-tunes on train only, so it is kept apart
    DST/images/      every referenced image once, under a unique flat name ("image" is relative)

One entry (the eval files' fields: `id`, `image`, `conversations`, `answer_type`; then the
release's own metadata)::

    {"id": 17, "image": "synpic54610.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nIs there a fracture?"},
                       {"from": "gpt", "value": "no"}],
     "answer_type": "CLOSED", "question_type": "PRES", "image_organ": "HEAD", ...}

Answers are normalised as the originals are scored: `str(answer).strip().lower()`. Ids are the
release's question ids (a repeated id gets a `_<n>` suffix and is counted). A question whose image
is missing is skipped and counted, not fatal.

Release layouts read (SRC may be the folder itself or its parent):

- VQA-RAD (https://osf.io/89kps/): `VQA_RAD Dataset Public.json` (list of `qid`, `image_name`,
  `image_organ`, `answer`, `answer_type` OPEN/CLOSED, `question_type`, `question`,
  `phrase_type` in freeform/para/test_freeform/test_para, ...) and `VQA_RAD Image Folder/`.
  Test = `phrase_type` starting with "test" (451 questions; 1,797 train), as LLaVA-Med.
- SLAKE (https://www.med-vqa.com/slake/): `Slake1.0/{train,validate,test}.json` (`img_id`,
  `img_name` such as `xmlab102/source.jpg`, `question`, `answer`, `q_lang` en/zh, `location`,
  `modality`, `answer_type` OPEN/CLOSED, `base_type`, `content_type`, `triple`, `qid`) and
  `Slake1.0/imgs/`. English only by default (`lang="en"`); images are named `xmlab102.jpg`.
- PathVQA (Google Drive link in github.com/UCSD-AI4H/PathVQA data/README.md): `qas/{train,val,
  test}_vqa.pkl` (list of dicts `img_id` like "train_0422", `sent` (question), `label`
  ({answer: score}), `answer_type` "yes/no"/"other", `question_id`) or the per-split
  `qas/<split>/<split>_qa.pkl` (`image`, `question`, `answer`), and `images/<split>/<id>.jpg`,
  found under SRC, `SRC/split` or `SRC/pvqa`. CLOSED = yes/no answers.

PathVQA ships pickles, and unpickling can run code. They are read with `load_plain_pickle`, an
Unpickler that resolves no global except the plain builtin containers and scalars (dict, list,
tuple, set, frozenset, str, int, float, bool): anything else (a class, a function, numpy) is
refused with an error naming it, so a crafted file cannot execute anything.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import pickle
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

DatasetName = Literal["vqa-rad", "slake", "pathvqa"]
DATASET_CHOICES: tuple[DatasetName, ...] = ("vqa-rad", "slake", "pathvqa")
AnswerType = Literal["OPEN", "CLOSED"]
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetLayoutError(ValueError):
    """SRC is not laid out as the public release (says what was looked for, and where)."""


# --- safe pickle ------------------------------------------------------------------------------

_PLAIN_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool"}
)


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain data (dict, list, str, int, float, "
            "...) is accepted from a dataset pickle"
        )


def load_plain_pickle(path: str | Path) -> Any:
    """Unpickle a file that may only hold builtin containers and scalars (see module doc)."""
    with open(path, "rb") as f:
        try:
            return _PlainUnpickler(f, encoding="utf-8").load()
        except pickle.UnpicklingError as e:
            raise DatasetLayoutError(f"{path}: {e}") from e


# --- records and output -----------------------------------------------------------------------


@dataclass
class _Item:
    id: Any
    split: str
    image: Path  # source file
    name: str  # wanted flat name under DST/images
    question: str
    answer: str
    answer_type: AnswerType
    extra: dict[str, Any]


@dataclass
class ConvertSummary:
    """Counts of one conversion, per split; `skipped` counts questions left out, by reason."""

    dataset: str
    out_dir: Path
    questions: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    answer_types: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    renamed_ids: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "out_dir": str(self.out_dir),
            "questions": self.questions,
            "images": self.images,
            "answer_types": self.answer_types,
            "skipped": self.skipped,
            "renamed_ids": self.renamed_ids,
        }


def normalize_answer(value: Any) -> str:
    """An answer as LLaVA-Med scores it: text, stripped, lowercase."""
    return str(value).strip().lower()


def _answer_type(raw: Any, answer: str) -> AnswerType:
    t = str(raw or "").strip().upper()
    if t == "OPEN":
        return "OPEN"
    if t == "CLOSED":
        return "CLOSED"
    return "CLOSED" if answer in ("yes", "no") else "OPEN"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _flat_name(relative: str) -> str:
    """A flat, safe file name for an image path of a release."""
    parts = [p for p in re.split(r"[\\/]+", relative) if p not in ("", ".", "..")]
    if not parts:
        return "image"
    if len(parts) >= 2 and Path(parts[-1]).stem == "source":  # SLAKE: xmlab102/source.jpg
        parts = [parts[-2] + Path(parts[-1]).suffix]
    return _UNSAFE.sub("_", "_".join(parts)).lstrip("._-") or "image"


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_json(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    body = ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries)
    tmp.write_text(f"[\n{body}\n]\n" if entries else "[]\n", encoding="utf-8")
    os.replace(tmp, path)


def _write(dataset: str, items: list[_Item], dst: Path, link: bool) -> ConvertSummary:
    summary = ConvertSummary(dataset=dataset, out_dir=dst)
    skipped: Counter[str] = Counter()
    exists: dict[Path, bool] = {}
    names: dict[Path, str] = {}  # source image -> flat name
    owners: dict[str, Path] = {}  # flat name -> source image
    used_ids: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    split_images: dict[str, set[str]] = {s: set() for s in SPLITS}
    missing: list[str] = []

    for item in items:
        if item.image not in exists:
            exists[item.image] = item.image.is_file()
        if not exists[item.image]:
            skipped["missing_image"] += 1
            if len(missing) < 5:
                missing.append(str(item.image))
            continue
        name = names.get(item.image)
        if name is None:
            name, stem, suffix, k = item.name, Path(item.name).stem, Path(item.name).suffix, 1
            while name in owners:
                name, k = f"{stem}-{k}{suffix}", k + 1
            names[item.image], owners[name] = name, item.image
        qid = item.id
        if str(qid) in used_ids:
            k = 1
            while f"{qid}_{k}" in used_ids:
                k += 1
            qid = f"{qid}_{k}"
            summary.renamed_ids += 1
        used_ids.add(str(qid))
        splits[item.split].append(
            {
                "id": qid,
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{item.question}"},
                    {"from": "gpt", "value": item.answer},
                ],
                "answer_type": item.answer_type,
                **{k: v for k, v in item.extra.items() if v is not None},
            }
        )
        split_images[item.split].add(name)

    if missing:
        logger.warning(
            "%s: %d questions skipped, their image is missing (e.g. %s)",
            dataset,
            skipped["missing_image"],
            ", ".join(missing),
        )
    written = sum(len(v) for v in splits.values())
    if written == 0:
        raise DatasetLayoutError(
            f"{dataset}: no question could be converted ({dict(skipped)} skipped); "
            "is SRC the release folder?"
        )

    image_dir = dst / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for src, name in names.items():
        _place(src, image_dir / name, link)
    for split in SPLITS:
        if split == "val" and not splits[split]:
            continue
        _write_json(dst / f"{split}.json", splits[split])
        summary.questions[split] = len(splits[split])
        summary.images[split] = len(split_images[split])
        summary.answer_types[split] = dict(
            sorted(Counter(e["answer_type"] for e in splits[split]).items())
        )
    summary.skipped = dict(sorted(skipped.items()))
    return summary


def _item(
    *,
    qid: Any,
    split: str,
    image: Path,
    name: str,
    question: Any,
    answer: Any,
    answer_type: Any,
    extra: dict[str, Any],
) -> _Item:
    ans = normalize_answer(answer)
    return _Item(
        id=qid,
        split=split,
        image=image,
        name=_flat_name(name),
        question=str(question).strip(),
        answer=ans,
        answer_type=_answer_type(answer_type, ans),
        extra=extra,
    )


def _load_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetLayoutError(f"{path}: expected a JSON list of objects")
    return data


def _missing_field(path: Path, index: int, record: dict[str, Any], keys: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{path}: record {index} lacks one of {keys}; it has {sorted(record)[:12]}"
    )


# --- VQA-RAD ----------------------------------------------------------------------------------


def _candidates(root: Path) -> list[Path]:
    children = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [root, *children]


def _vqa_rad_paths(src: Path) -> tuple[Path, Path]:
    if src.is_file():
        roots = [src.parent]
        ann: Path | None = src
    else:
        roots, ann = _candidates(src), None
    for root in roots:
        if ann is None:
            found = sorted(root.glob("VQA_RAD*Dataset*Public.json"))
            if not found:
                continue
            ann = found[0]
        folders = [p for p in sorted(ann.parent.glob("VQA_RAD*Image*Folder")) if p.is_dir()]
        if folders:
            return ann, folders[0]
        raise DatasetLayoutError(f"VQA-RAD: no 'VQA_RAD Image Folder' next to {ann}")
    raise DatasetLayoutError(
        f"VQA-RAD: no 'VQA_RAD Dataset Public.json' in {src} or its subfolders (OSF release)"
    )


def convert_vqa_rad(src: str | Path, dst: str | Path, *, link: bool = False) -> ConvertSummary:
    """VQA-RAD OSF release -> DST (test = `phrase_type` test_freeform / test_para)."""
    ann, image_dir = _vqa_rad_paths(Path(src))
    items = []
    for i, r in enumerate(_load_json_list(ann)):
        if not all(k in r for k in ("qid", "image_name", "question", "answer")):
            raise _missing_field(ann, i, r, "qid, image_name, question, answer")
        phrase = str(r.get("phrase_type") or "")
        items.append(
            _item(
                qid=r["qid"],
                split="test" if phrase.strip().lower().startswith("test") else "train",
                image=image_dir / str(r["image_name"]).strip(),
                name=str(r["image_name"]).strip(),
                question=r["question"],
                answer=r["answer"],
                answer_type=r.get("answer_type"),
                extra={
                    "question_type": r.get("question_type"),
                    "image_organ": r.get("image_organ"),
                    "phrase_type": r.get("phrase_type"),
                },
            )
        )
    return _write("vqa-rad", items, Path(dst), link)


# --- SLAKE ------------------------------------------------------------------------------------

_SLAKE_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}


def _slake_root(src: Path) -> Path:
    for root in [src, src / "Slake1.0", *_candidates(src)]:
        if (root / "imgs").is_dir() and any((root / f).is_file() for f in _SLAKE_FILES.values()):
            return root
    raise DatasetLayoutError(
        f"SLAKE: no folder with imgs/ and train.json/validate.json/test.json at {src} "
        "(expected Slake1.0/)"
    )


def convert_slake(
    src: str | Path, dst: str | Path, *, lang: str | None = "en", link: bool = False
) -> ConvertSummary:
    """SLAKE 1.0 release -> DST; `lang` keeps one `q_lang` ("en", "zh"), None keeps all."""
    root = _slake_root(Path(src))
    items: list[_Item] = []
    skipped_lang = 0
    for split, file_name in _SLAKE_FILES.items():
        path = root / file_name
        if not path.is_file():
            logger.warning("SLAKE: %s not found, split %s left empty", path, split)
            continue
        for i, r in enumerate(_load_json_list(path)):
            if not all(k in r for k in ("img_name", "question", "answer")):
                raise _missing_field(path, i, r, "img_name, question, answer")
            if lang is not None and str(r.get("q_lang", "")).strip().lower() != lang:
                skipped_lang += 1
                continue
            img_name = str(r["img_name"]).strip()
            items.append(
                _item(
                    qid=r.get("qid", f"slake-{split}-{i}"),
                    split=split,
                    image=root / "imgs" / img_name,
                    name=img_name,
                    question=r["question"],
                    answer=r["answer"],
                    answer_type=r.get("answer_type"),
                    extra={
                        "q_lang": r.get("q_lang"),
                        "modality": r.get("modality"),
                        "location": r.get("location"),
                        "content_type": r.get("content_type"),
                        "base_type": r.get("base_type"),
                        "img_id": r.get("img_id"),
                    },
                )
            )
    summary = _write("slake", items, Path(dst), link)
    if skipped_lang:
        summary.skipped["other_language"] = skipped_lang
    return summary


# --- PathVQA ----------------------------------------------------------------------------------


def _pathvqa_root(src: Path) -> Path:
    for root in [src, src / "split", src / "pvqa", *_candidates(src)]:
        if (root / "qas").is_dir() and (root / "images").is_dir():
            return root
    raise DatasetLayoutError(
        f"PathVQA: no folder with qas/ and images/ at {src}, {src}/split or {src}/pvqa"
    )


def _pathvqa_image(images: Path, split: str, image_id: str) -> Path:
    for folder in (images / split, images):
        for suffix in ("", *IMAGE_SUFFIXES):
            candidate = folder / f"{image_id}{suffix}"
            if candidate.is_file() and candidate.suffix.lower() in IMAGE_SUFFIXES:
                return candidate
    return images / split / f"{image_id}.jpg"  # missing: counted by _write


def _pathvqa_answer(record: dict[str, Any]) -> Any:
    label = record.get("label")
    if isinstance(label, dict) and label:
        return max(label, key=lambda k: label[k])  # the top-scored answer (one in practice)
    return record.get("answer")


def convert_pathvqa(src: str | Path, dst: str | Path, *, link: bool = False) -> ConvertSummary:
    """PathVQA release (`qas/*_vqa.pkl` + `images/<split>/`) -> DST; CLOSED = yes/no answers."""
    root = _pathvqa_root(Path(src))
    items: list[_Item] = []
    for split in SPLITS:
        path = root / "qas" / f"{split}_vqa.pkl"
        if not path.is_file():
            path = root / "qas" / split / f"{split}_qa.pkl"
        if not path.is_file():
            logger.warning("PathVQA: no %s_vqa.pkl in %s, split %s left empty", split, root, split)
            continue
        records = load_plain_pickle(path)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DatasetLayoutError(f"{path}: expected a pickled list of dicts")
        for i, r in enumerate(records):
            image_id = r.get("img_id", r.get("image"))
            question = r.get("sent", r.get("question"))
            answer = _pathvqa_answer(r)
            if image_id is None or question is None or answer is None:
                raise _missing_field(path, i, r, "img_id/image, sent/question, label/answer")
            image_id = str(image_id).strip()
            image = _pathvqa_image(root / "images", split, image_id)
            ans = normalize_answer(answer)
            items.append(
                _item(
                    qid=r.get("question_id", f"pathvqa-{split}-{i}"),
                    split=split,
                    image=image,
                    name=image.name,
                    question=question,
                    answer=ans,
                    answer_type="CLOSED" if ans in ("yes", "no") else "OPEN",
                    extra={"source_answer_type": r.get("answer_type")},
                )
            )
    return _write("pathvqa", items, Path(dst), link)


def convert_dataset(
    dataset: DatasetName,
    src: str | Path,
    dst: str | Path,
    *,
    link: bool = False,
    lang: str | None = "en",
) -> ConvertSummary:
    """Convert one release (`dataset` in DATASET_CHOICES) from SRC into DST."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{dataset}: source not found: {src}")
    if dataset == "vqa-rad":
        return convert_vqa_rad(src, dst, link=link)
    if dataset == "slake":
        return convert_slake(src, dst, lang=lang, link=link)
    if dataset == "pathvqa":
        return convert_pathvqa(src, dst, link=link)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_CHOICES)}")
