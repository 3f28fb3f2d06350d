"""Where the LLaVA-Med data files live: names, paths, sizes and sha256, and the download groups.

Facts and where they come from (github.com/microsoft/LLaVA-Med):

- The file list, the layout (`alignment/`, `instruct/`, `eval/`, top-level image-URL list) and the
  sizes in MiB/KiB are the "Data Download" tables of README.md.
- Byte sizes and sha256 are the Git LFS pointers of `data/**` at commit d406e3f ("Adds data to
  data directory", 2025-04-01); an LFS oid is the sha256 of the file's bytes (checked here for
  `llava_med_eval_qa50_qa.jsonl`, which was plain text before that commit). Every byte size
  matches the README's MiB/KiB figure.
- Since d406e3f the README links the files in the repository's `data/` folder (Git LFS), so the
  default base URL is that folder at that commit. Before, README and `download_data.sh` linked
  `https://hanoverprod.z21.web.core.windows.net/med_llava/` with the same relative paths
  (`LEGACY_BASE_URL`); issue #121 (2025-06) reports that host answering "website not configured".
- `llava_med_image_urls.jsonl` lines look like (issue #58)
  `{"pmc_tar_url": "https://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/3f/46/PMC7236913.tar.gz",
  "image_file_path": "PMC7236913/nihms-1587931-f0001.jpg", "pair_id": "32432162_F1"}`; the
  original `llava/data/download_images.py` (tag v1.0.0) extracts `image_file_path` from the PMC
  archive and saves it as `images/<pair_id>.jpg`, the name the json files use in `"image"`.
- The eval images (`multimodal_chat_eval/llava_med_test_image_urls.jsonl`) were only ever on the
  old host, so they are not listed.

The base URL can be changed with `base_url=` or the `TINYLLAVA_MED_DATA_BASE_URL` environment
variable (a mirror, or a local server in the tests); the relative paths stay the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

What = Literal[
    "alignment",
    "instruct-60k",
    "instruct-60k-inline",
    "instruct-10k",
    "fig-captions",
    "eval",
    "image-urls",
]
WHAT_CHOICES: tuple[What, ...] = (
    "alignment",
    "instruct-60k",
    "instruct-60k-inline",
    "instruct-10k",
    "fig-captions",
    "eval",
    "image-urls",
)

LLAVA_MED_COMMIT = "d406e3fc7c3d1e4c797a7676de18cbfd070b6d2c"
DEFAULT_BASE_URL = f"https://github.com/microsoft/LLaVA-Med/raw/{LLAVA_MED_COMMIT}/data/"
LEGACY_BASE_URL = "https://hanoverprod.z21.web.core.windows.net/med_llava/"
BASE_URL_ENV = "TINYLLAVA_MED_DATA_BASE_URL"


@dataclass(frozen=True)
class DataFile:
    """One downloadable file: `path` is relative to the base URL and to the output folder."""

    path: str
    size: int | None  # bytes; None when unknown
    sha256: str | None  # lowercase hex; None when unknown
    readme_size: str  # as the README prints it, for the record

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


_FILES = (
    DataFile(
        "alignment/llava_med_alignment_500k.json",
        358112840,
        "007456f3d6c2091466b3fb6cd0573f61a63fd0c937e568f44113d5a1f23e8b93",
        "341.52 MiB",
    ),
    DataFile(
        "instruct/llava_med_instruct_10k.json",
        20176754,
        "84f75c2b83404fe7dd1631212b4ad73228a0dad77bb819ab29c511a535a279c8",
        "19.24 MiB",
    ),
    DataFile(
        "instruct/llava_med_instruct_60k.json",
        88758916,
        "cf84c82fb58e391d6cf198e2657b6fc8584a180509b8813c3604ce46f6275c19",
        "84.65 MiB",
    ),
    DataFile(
        "instruct/llava_med_instruct_60k_inline_mention.json",
        87669379,
        "b3649f4193a51215aee4519b44d8436a4200e182d6a78a3cb78672d97bea948a",
        "83.61 MiB",
    ),
    DataFile(
        "instruct/llava_med_instruct_fig_captions.json",
        169224662,
        "1d58b7befd2687695cbba04e4f51fd648899b25f4f567815eb49538faf6f07fb",
        "161.39 MiB",
    ),
    DataFile(
        "eval/llava_med_eval_qa50_qa.jsonl",
        262328,
        "48c6b680a962dbf8caf63e3ded2bef7770dccf9c2602f32e5f05f4b907266f25",
        "256.18 KiB",
    ),
    DataFile(
        "eval/llava_med_eval_qa50_fig_captions.json",
        53066,
        "64a4de84f8959a049ab9de68572318c6a299194b24368084159ef1f4a259aa66",
        "51.82 KiB",
    ),
    DataFile(
        "eval/llava_med_qa50_instruct_caption_in_text_cleaned-60k-3epoch.json",
        103392,
        "442b2ea3bda35ddcd57475f350ee6b2e938da02835792232925b01fde0a288ef",
        "100.97 KiB",
    ),
    DataFile(
        "llava_med_image_urls.jsonl",
        128785989,
        "2604441ec3d1f6324d21846cfd44f92eab29454beed1da42a98d943b41731e44",
        "122.82 MiB",
    ),
)

# file name -> file
FILES: dict[str, DataFile] = {f.name: f for f in _FILES}

IMAGE_URLS_FILE = "llava_med_image_urls.jsonl"

# `data download --what W` -> the file names it fetches
GROUPS: dict[What, tuple[str, ...]] = {
    "alignment": ("llava_med_alignment_500k.json",),
    "instruct-60k": ("llava_med_instruct_60k.json",),
    "instruct-60k-inline": ("llava_med_instruct_60k_inline_mention.json",),
    "instruct-10k": ("llava_med_instruct_10k.json",),
    "fig-captions": ("llava_med_instruct_fig_captions.json",),
    "eval": (
        "llava_med_eval_qa50_qa.jsonl",
        "llava_med_eval_qa50_fig_captions.json",
        "llava_med_qa50_instruct_caption_in_text_cleaned-60k-3epoch.json",
    ),
    "image-urls": (IMAGE_URLS_FILE,),
}


def resolve_base_url(base_url: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """`base_url`, else `$TINYLLAVA_MED_DATA_BASE_URL`, else `DEFAULT_BASE_URL`; ends with '/'."""
    env = os.environ if environ is None else environ
    url = base_url or env.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/") else url + "/"


def url_of(file: DataFile, base_url: str) -> str:
    """Full URL of `file` under `base_url` (as returned by `resolve_base_url`)."""
    return base_url.rstrip("/") + "/" + file.path


def files_for(what: What, catalog: Mapping[str, DataFile] | None = None) -> list[DataFile]:
    """The files of one download group."""
    if what not in GROUPS:
        raise ValueError(f"unknown data group {what!r}; expected one of {', '.join(WHAT_CHOICES)}")
    table = FILES if catalog is None else catalog
    return [table[name] for name in GROUPS[what]]
