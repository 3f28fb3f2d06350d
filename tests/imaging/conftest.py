"""Fixtures for the imaging tests: real DICOM files shipped with pydicom (and pydicom-data).

Test files come from the installed packages only, never from the network:
`get_testdata_file(name, download=False)` and the pydicom-data folder found through pydicom's
external-source entry point (`shipped_dicom` parametrizes a test over all of them). Builders
turn a shipped dataset into bytes after a change.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT, DataTypes, external_data_sources
from pydicom.dataset import Dataset


def shipped_dicom_files() -> list[tuple[str, Path]]:
    """(id, path) of every .dcm in pydicom's data folder and in its installed external sources
    (pydicom-data). pydicom's `get_testdata_files` is not used: it downloads what is missing."""
    files = [
        (f"pydicom/{path.relative_to(DATA_ROOT).as_posix()}", path)
        for path in sorted(Path(DATA_ROOT).glob("**/*.dcm"))
    ]
    for name, source in sorted(external_data_sources().items()):
        paths = sorted(Path(p) for p in source.get_paths("**/*.dcm", DataTypes.DATASET))
        files += [(f"{name}/{path.name}", path) for path in paths]
    return files


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `shipped_dicom` runs once per shipped .dcm file."""
    if "shipped_dicom" in metafunc.fixturenames:
        files = shipped_dicom_files()
        metafunc.parametrize("shipped_dicom", [p for _, p in files], ids=[i for i, _ in files])


def testdata_path(name: str) -> Path:
    """A file shipped with pydicom or pydicom-data; skip the test when it is not installed."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data missing?)")
    return Path(path)


def to_bytes(ds: Dataset) -> bytes:
    """Encode `ds` as DICOM Part 10 bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def shipped_dicom_list() -> list[tuple[str, Path]]:
    return shipped_dicom_files()


@pytest.fixture
def testdata() -> Callable[[str], Path]:
    return testdata_path


@pytest.fixture
def ct_small_bytes() -> bytes:
    return testdata_path("CT_small.dcm").read_bytes()


@pytest.fixture
def ct_small() -> Dataset:
    return pydicom.dcmread(testdata_path("CT_small.dcm"))


@pytest.fixture
def dicom_bytes() -> Callable[[Dataset], bytes]:
    return to_bytes
