"""Several converted VQA sets as one training set: the TinyLLaVA-Med-F downstream stage trains
once on VQA-RAD, SLAKE and PathVQA together (its `3vqa/train_all.json`, 18 epochs).

`tinyllava-med data merge ./data/llava_med/3vqa ./data/llava_med/{vqa-rad,slake,pathvqa}` writes

    DST/train.json     every source's `train.json` entries, in the order given; each id becomes
                       `<source>-<id>` (the sources number their questions alike) and each image
                       `<source>/<image>`
    DST/images/<source> -> the source's `images/` folder (a symbolic link: nothing is copied)
    DST/merge.json     where each part came from: its folder, entries, and its train.json's sha256

The sources stay as `data convert` wrote them, with their own `test.json` for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tinyllava_med.training.datasets.convert import DatasetLayoutError, _write_json


def merge_datasets(
    dst: str | Path, sources: list[str | Path], split: str = "train"
) -> dict[str, Any]:
    """Merge the `split` files of converted datasets (`convert_dataset`'s layout) into `dst`."""
    dst = Path(dst)
    folders = [Path(s).resolve() for s in sources]
    names = [f.name for f in folders]
    if len(folders) < 2:
        raise ValueError("data merge needs two or more converted datasets")
    if len(set(names)) != len(names):
        raise ValueError(f"the sources' folder names must differ (their ids are prefixed): {names}")
    entries: list[dict[str, Any]] = []
    parts = []
    for folder, name in zip(folders, names, strict=True):
        path = folder / f"{split}.json"
        if not path.is_file() or not (folder / "images").is_dir():
            raise DatasetLayoutError(
                f"{folder} is not a converted dataset (no {split}.json and images/ there): "
                "`tinyllava-med data convert` writes them"
            )
        raw = path.read_bytes()
        rows = json.loads(raw)
        if not isinstance(rows, list):
            raise DatasetLayoutError(f"{path}: expected a JSON list of conversations")
        for row in rows:
            entry = dict(row)
            entry["id"] = f"{name}-{row.get('id')}"
            if "image" in row:
                entry["image"] = f"{name}/{row['image']}"
            entries.append(entry)
        parts.append(
            {
                "source": str(folder),
                "entries": len(rows),
                f"{split}_sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for folder, name in zip(folders, names, strict=True):
        link = dst / "images" / name
        if link.is_symlink() or link.exists():
            if link.resolve() != (folder / "images").resolve():
                raise ValueError(f"{link} exists and is not a link to {folder / 'images'}")
        else:
            os.symlink(folder / "images", link, target_is_directory=True)
    _write_json(dst / f"{split}.json", entries)
    summary = {"out": str(dst), "split": split, "entries": len(entries), "parts": parts}
    (dst / "merge.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
