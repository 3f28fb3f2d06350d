"""`tinyllava_med.json`: what a served-format checkpoint folder says about itself.

Every folder that `convert`, `train`, `quantize` or `demo-model` writes carries this file next to
the transformers files. The loader reads the prompt template and provenance from it, so a
stored answer can always say which model, variant, quantization and version produced it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tinyllava_med import __version__

META_FILE = "tinyllava_med.json"


class ServedMeta(BaseModel):
    template: str = "v1"
    name: str | None = None  # human name, e.g. "demo" or "tinyllava-med-f"
    variant: str | None = None  # registry name when this folder is a registry variant
    quantization: str = "none"  # none | 8bit | 4bit | cpu-int8 (as stored on disk)
    # modules of a 4-bit folder stored in 16 bits and given LLM.int8 when loaded (the vision tower)
    int8_modules: list[str] = Field(default_factory=list)
    source_format: str = "served"  # llava_mistral | llava | tiny_llava | tinyllava | served
    source_hash: str | None = None  # sha256 over the source checkpoint's files
    vision_weights: str | None = None  # "checkpoint" or "tower": where the vision tower came from
    training: dict[str, Any] | None = None  # config + data hashes when trained here
    clinical_use: bool = False
    notes: str | None = None
    version: str = Field(default=__version__)  # tinyllava-med version that wrote the folder

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / META_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ServedMeta | None:
        path = Path(folder) / META_FILE
        if not path.is_file():
            return None
        return cls.model_validate(json.loads(path.read_text()))


def hash_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of `paths` (sorted), for provenance records."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin")
DIGEST_CACHE = ".tinyllava_med_weights.json"


def weights_digest(folder: str | Path) -> str | None:
    """`hash_files` over the weight files of a checkpoint folder (`*.safetensors`, `*.bin`):
    which weights answered, recorded with every report. Hashing a 7B checkpoint takes seconds,
    so the digest is kept in `DIGEST_CACHE` beside them and reused while every weight file has
    the same name, size and modification time (a folder that cannot be written is hashed on
    each load). None when the folder holds no weight file."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    cache = folder / DIGEST_CACHE
    try:
        kept = json.loads(cache.read_text())
        if kept.get("files") == stats and str(kept.get("digest", "")).startswith("sha256:"):
            return str(kept["digest"])
    except (OSError, ValueError, AttributeError):
        pass
    digest = hash_files(files)
    with contextlib.suppress(OSError):  # a read-only models volume: hash again next time
        cache.write_text(json.dumps({"files": stats, "digest": digest}) + "\n")
    return digest


def publish_modes(folder: Path) -> None:
    """Give every file of a written checkpoint folder the mode the umask allows: safetensors
    writes 0600 whatever the umask, and a server running as another user could not read the
    weights."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
