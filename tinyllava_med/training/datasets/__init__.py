"""Public training and evaluation data: LLaVA-Med downloads and VQA release conversion.

- `sources`: the LLaVA-Med file table (paths, sizes, sha256, download groups, base URL).
- `download`: resumable, retried, verified downloads; PMC figure extraction (`--images`).
- `convert`: VQA-RAD / SLAKE / PathVQA public releases -> `train.json`, `test.json`, `images/`.
- `merge`: converted sets as one training set (TinyLLaVA-Med-F's downstream data).

    tinyllava-med data download --what instruct-60k-inline --out data/llava_med --images
    tinyllava-med data convert --dataset vqa-rad "./VQA_RAD" ./data/vqa_rad
"""

from tinyllava_med.training.datasets.convert import (
    DATASET_CHOICES,
    ConvertSummary,
    DatasetLayoutError,
    convert_dataset,
    convert_pathvqa,
    convert_slake,
    convert_vqa_rad,
    load_plain_pickle,
)
from tinyllava_med.training.datasets.download import (
    ChecksumMismatchError,
    DownloadError,
    DownloadReport,
    ImagesReport,
    NotFoundError,
    SizeMismatchError,
    download_file,
    download_images,
    download_llava_med,
)
from tinyllava_med.training.datasets.sources import (
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    FILES,
    GROUPS,
    LEGACY_BASE_URL,
    WHAT_CHOICES,
    DataFile,
    resolve_base_url,
)

__all__ = [
    "BASE_URL_ENV",
    "DATASET_CHOICES",
    "DEFAULT_BASE_URL",
    "FILES",
    "GROUPS",
    "LEGACY_BASE_URL",
    "WHAT_CHOICES",
    "ChecksumMismatchError",
    "ConvertSummary",
    "DataFile",
    "DatasetLayoutError",
    "DownloadError",
    "DownloadReport",
    "ImagesReport",
    "NotFoundError",
    "SizeMismatchError",
    "convert_dataset",
    "convert_pathvqa",
    "convert_slake",
    "convert_vqa_rad",
    "download_file",
    "download_images",
    "download_llava_med",
    "load_plain_pickle",
    "resolve_base_url",
]
