"""Helpers the server tests share: test files, uploads, the error-shape check, the app over a
TestClient with one key per role (`make_api`), a live server."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path

import httpx
import pydicom
import uvicorn
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
MR_SMALL = Path(get_testdata_file("MR_small.dcm", download=False))


def png_bytes(size=(48, 40), color=80) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, format="PNG")
    return buf.getvalue()


def ct_with(**attributes) -> bytes:
    """CT_small with some attributes changed (an accession number, a date, a UID), as Part 10."""
    ds = pydicom.dcmread(CT_SMALL)
    for name, value in attributes.items():
        setattr(ds, name, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def upload(api, *files, role="pacs"):
    return api.post(
        "/v1/studies",
        headers=api.h(role),
        files=[("files", (name, data, ctype)) for name, data, ctype in files],
    )


def ct_of_new_study() -> bytes:
    """CT_small as the one image of a study never seen before (new Study, Series and SOP
    Instance UIDs): an upload files DICOM by Study Instance UID, so CT_small itself goes to the
    study that holds it already."""
    return ct_with(
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
        SOPInstanceUID=generate_uid(),
    )


def upload_ct(api, *, new_study: bool = False):
    """Upload CT_small (`new_study`: as a study of its own); the study. 201: its image is new."""
    data = ct_of_new_study() if new_study else CT_SMALL.read_bytes()
    r = upload(api, ("ct.dcm", data, "application/dicom"))
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "detail"} <= set(body["error"])
    if code:
        assert body["error"]["code"] == code, body


_issued_ports: set[int] = set()


def post_ct(base: str, headers: dict[str, str]) -> str:
    """Upload pydicom's CT_small.dcm to a live server at `base`; its study id."""
    r = httpx.post(
        f"{base}/v1/studies",
        headers=headers,
        timeout=30,
        files=[("files", ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom"))],
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def free_port() -> int:
    """A loopback port nothing listens on, never one handed out before in this run: a port is
    closed again until its user binds it, so the kernel may offer it twice (a test asking for
    its DIMSE port and then the server's got the same one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port


@contextmanager
def live_server(
    app, ready_path: str | None = "/readyz", timeout_s: float = 60, name: str = "live-server"
) -> Iterator[str]:
    """Run `app` on real uvicorn on a loopback port; yields its base URL once `ready_path`
    answers 200 (None: once uvicorn listens), and stops the server afterwards."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", ws="none")
    )
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if ready_path is None:
            return bool(server.started)
        try:
            return httpx.get(base + ready_path, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout_s, what=f"{base}{ready_path or ''} to answer")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def running_process(
    cmd, log_path: Path, health_url: str, *, what: str, timeout_s=60, env=None, verify=True
):
    """Start `cmd` (output to `log_path`), wait until `health_url` answers 200 (`verify`: as
    httpx's, a CA file for HTTPS), yield the process, and stop it afterwards. Dying early fails
    with the end of its log."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(health_url, timeout=2, verify=verify).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for(up, timeout_s=timeout_s, what=what)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def multipart_related(*parts: bytes, part_type: str = "application/dicom", boundary="b0undary"):
    """A STOW-RS body and its Content-Type."""
    body = (
        b"".join(
            b"--"
            + boundary.encode()
            + b"\r\nContent-Type: "
            + part_type.encode()
            + b"\r\n\r\n"
            + p
            + b"\r\n"
            for p in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def wait_for(predicate, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Api:
    """A TestClient over the real app (tiny model, real database) with one key per role."""

    def __init__(self, client, keys: dict[str, str]) -> None:
        self.client = client
        self.keys = keys
        self.app = client.app

    def h(self, role: str = "radiologist") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def __getattr__(self, name: str):
        return getattr(self.client, name)


def make_api(tmp_path, database_url: str, lm, **overrides) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.db import migrate
    from tinyllava_med.server.settings import Settings

    migrate.upgrade(database_url)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        model="tiny",
        batch_window_ms=5,
        **{"prefix_cache_mb": 64, **overrides},  # the tiny model's tower is too small for the
        # cache to be on by default: on, so every API test goes through it
    )
    app = create_app(settings, model=lm)
    with TestClient(app, raise_server_exceptions=False) as client:
        admin = app.state.first_admin_key
        assert admin, "an empty database must get a first admin key"
        keys = {"admin": admin}
        for role in ("pacs", "radiologist"):
            r = client.post(
                "/v1/apikeys",
                json={"role": role, "name": f"test {role}"},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert r.status_code == 201, r.text
            keys[role] = r.json()["key"]
        yield Api(client, keys)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key in `folder`, made by openssl (as an admin
    would); it is its own CA."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def make_old(session, when, study_ids=None, *, store) -> None:
    """Studies (all, or `study_ids`) as if they and their images had arrived at `when`, for
    image retention (which counts from each image's `stored_at`, and leaves a study whose files
    were touched lately: a question about it): their files' times too."""
    from sqlalchemy import select, update

    from tinyllava_med.server.db.models import Image, Study

    studies, images = update(Study), update(Image)
    files = select(Image.sha256)
    if study_ids is not None:
        studies = studies.where(Study.id.in_(study_ids))
        images = images.where(Image.study_id.in_(study_ids))
        files = files.where(Image.study_id.in_(study_ids))
    session.execute(studies.values(created_at=when))
    session.execute(images.values(created_at=when, stored_at=when))
    stamp = when.replace(tzinfo=when.tzinfo or timezone.utc).timestamp()
    for sha in session.scalars(files):
        if store.exists(sha):
            os.utime(store.path(sha), (stamp, stamp))
