"""Helpers the server tests share: test files, uploads, the error-shape check, a live server."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from PIL import Image
from pydicom.data import get_testdata_file

CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))
MR_SMALL = Path(get_testdata_file("MR_small.dcm", download=False))


def png_bytes(size=(48, 40), color=80) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, format="PNG")
    return buf.getvalue()


def upload(api, *files, role="pacs"):
    return api.post(
        "/v1/studies",
        headers=api.h(role),
        files=[("files", (name, data, ctype)) for name, data, ctype in files],
    )


def upload_ct(api):
    r = upload(api, ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom"))
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "detail"} <= set(body["error"])
    if code:
        assert body["error"]["code"] == code, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
def running_process(cmd, log_path: Path, health_url: str, *, what: str, timeout_s=60, env=None):
    """Start `cmd` (output to `log_path`), wait until `health_url` answers 200, yield the
    process, and stop it afterwards. Dying early fails with the end of its log."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(health_url, timeout=2).status_code == 200
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
