"""Which weights answered: the digest a loaded model records with every report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tinyllava_med.model import meta
from tinyllava_med.model.load import load_model
from tinyllava_med.model.meta import DIGEST_CACHE, hash_files, weights_digest


def test_the_digest_covers_the_weight_files_and_is_kept_until_they_change(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / DIGEST_CACHE).unlink(missing_ok=True)
    weights = sorted(folder.glob("*.safetensors"))
    assert weights
    digest = weights_digest(folder)
    assert digest == hash_files(weights) and digest.startswith("sha256:")
    assert json.loads((folder / DIGEST_CACHE).read_text())["digest"] == digest

    # unchanged files: the kept digest, not a second pass over gigabytes
    def no_hashing(paths: list[Path]) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr(meta, "hash_files", no_hashing)
    assert weights_digest(folder) == digest
    monkeypatch.undo()

    # other weights under the same name: another digest, and the model records it
    data = bytearray(weights[0].read_bytes())
    data[-1] ^= 0x01  # a bit of the last tensor
    weights[0].write_bytes(bytes(data))
    changed = weights_digest(folder)
    assert changed != digest and changed == hash_files(weights)
    assert load_model(str(folder), device="cpu").info["model_weights"] == changed

    # a kept digest that does not look like one is not trusted
    (folder / DIGEST_CACHE).write_text(json.dumps({"files": {}, "digest": "x"}))
    assert weights_digest(folder) == changed
    (folder / DIGEST_CACHE).write_text("not json")
    assert weights_digest(folder) == changed


def test_a_folder_without_weights_has_no_digest(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert weights_digest(tmp_path) is None
