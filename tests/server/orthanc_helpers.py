"""A real Orthanc (Debian's, with its DICOMweb plugin) on loopback, for the PACS tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from api_helpers import running_process

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
    pytest.fail(
        "Orthanc with its DICOMweb plugin is needed (apt-get install orthanc orthanc-dicomweb; "
        ".ci/run does)",
        pytrace=False,
    )


def start_orthanc(
    tmp: Path,
    http_port: int,
    our_stow: str = "http://127.0.0.1:9/unused/",
    pacs_key: str = "",
    dicom_port: int | None = None,
    **extra,
):
    """Orthanc on loopback (a context manager) with our STOW-RS as its DICOMweb peer
    `tinyllava` (authenticating with `pacs_key`); with `dicom_port`, its DIMSE server listens
    there as AE title TLMPACS. `extra`: more of Orthanc's configuration."""
    config = {
        "Name": "TLM-TEST-PACS",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "index"),
        "HttpPort": http_port,
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": dicom_port or 4242,
        "DicomAet": "TLMPACS",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {
                "tinyllava": {
                    "Url": our_stow,
                    "HttpHeaders": {"Authorization": f"Bearer {pacs_key}"},
                }
            },
        },
        **extra,
    }
    tmp.mkdir(parents=True)
    path = tmp / "orthanc.json"
    path.write_text(json.dumps(config))
    return running_process(
        [ORTHANC, str(path)],
        tmp / "orthanc.log",
        f"http://127.0.0.1:{http_port}/system",
        what="Orthanc to start",
    )
