"""`tinyllava-med serve` as a real process (the tiny model): `TINYLLAVA_MED_LOG_FORMAT=json` logs
one JSON object per line, its own records and uvicorn's access lines alike, with named fields;
`--tls-certfile/--tls-keyfile` serve HTTPS; access lines in either format drop query strings."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time

import httpx
import pytest
from api_helpers import free_port, running_process, self_signed
from pydantic import ValidationError

from tinyllava_med.server.settings import Settings


def test_serve_logs_json_lines(tmp_path, tiny_model_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TINYLLAVA_MED_DATA_DIR": str(tmp_path / "data"),
        "TINYLLAVA_MED_LOG_FORMAT": "json",
        "TINYLLAVA_MED_ACCESS_LOG": "true",
    }
    cmd = [sys.executable, "-m", "tinyllava_med.cli", "serve", "--model", str(tiny_model_dir)]
    leftover = tmp_path / "data" / "tmp" / "from-a-crash.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"DICM")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    in_store = tmp_path / "data" / "images" / "ab" / ".tmp-from-a-crash"  # a put cut short
    in_store.parent.mkdir(parents=True)
    in_store.write_bytes(b"DICM")
    os.utime(in_store, (time.time() - 7200, time.time() - 7200))
    orphan = hashlib.sha256(b"a file whose upload never committed").hexdigest()
    (tmp_path / "data" / "images" / orphan[:2]).mkdir()
    (tmp_path / "data" / "images" / orphan[:2] / orphan).write_bytes(b"x")
    with running_process(
        [*cmd, "--port", str(port)], log, f"{base}/readyz", what="serve", timeout_s=120, env=env
    ):
        # its temporary files go under the data directory, emptied at start (test_dimse.py)
        assert not leftover.exists() and leftover.parent.stat().st_mode & 0o777 == 0o700
        assert not in_store.exists()  # and so does what a crash left in the image store
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/v1/studies").status_code == 401
        assert httpx.get(f"{base}/v1/studies?accession_number=ACC9").status_code == 401
        stow = httpx.post(f"{base}/dicomweb/studies/1.2.826.0.1.3680043.99.7", content=b"x")
        assert stow.status_code == 401
        # a RIS that puts an accession number where a report's id goes
        assert httpx.get(f"{base}/v1/reports/ACC-4711-DOE").status_code == 401
    assert (
        "ACC9" not in log.read_text() and "ACC-4711" not in log.read_text()
    )  # access lines name the path, not the query
    assert "3680043.99.7" not in log.read_text()  # nor a STOW path's Study Instance UID
    lines = log.read_text().splitlines()
    # every line is a JSON object, also those said for the operator: where it serves, and
    # where the first key is (they were plain text among the JSON). stderr is not a terminal
    # here (a container's, a service's), so the key is in a file the owner alone reads, and
    # nowhere in what a log collector keeps
    assert all(ln.startswith("{") for ln in lines), [ln for ln in lines if ln[:1] != "{"]
    records = [json.loads(ln) for ln in lines]
    said = [r["message"] for r in records if r["logger"] == "tinyllava_med"]
    key_file = tmp_path / "data" / "first-admin-key"
    assert said[0].startswith("serving on") and str(key_file) in said[1], said
    assert len(said) == 2, said
    assert key_file.stat().st_mode & 0o777 == 0o600
    first = key_file.read_text().strip()
    assert first.startswith("tlm_") and first not in log.read_text()
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records), records
    assert all(r["time"].endswith("Z") for r in records)
    assert not any("color_message" in r for r in records)  # uvicorn's ANSI-coloured copy
    first_key = [r for r in records if r["logger"] == "tinyllava_med.server.auth"]
    assert first_key and first_key[0]["level"] == "WARNING"
    assert "tlm_" not in json.dumps(first_key)  # the key itself is printed once, never logged
    access = {(r["method"], r["path"], r["status"]) for r in records if "method" in r}
    assert ("GET", "/healthz", 200) in access and ("GET", "/v1/studies", 401) in access
    assert len([r for r in records if r.get("path") == "/v1/studies"]) == 2
    assert ("POST", "/dicomweb/studies/{study_uid}", 401) in access
    assert ("GET", "/v1/reports/{report_id}", 401) in access
    assert any(r["logger"] == "uvicorn.error" and "startup" in r["message"] for r in records)
    swept = [r["message"] for r in records if r["logger"] == "tinyllava_med.server.jobs"]
    assert swept == ["1 stored file(s) no image names (left by a crash): sweep queued"]


def test_serve_https(tmp_path, tiny_model_dir):
    """`serve --tls-certfile --tls-keyfile`: HTTPS only, announced as such; clear HTTP fails."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TINYLLAVA_MED_DATA_DIR": str(tmp_path / "data"),
        "TINYLLAVA_MED_ACCESS_LOG": "true",  # text access lines, which keep no query string
    }
    cmd = [sys.executable, "-m", "tinyllava_med.cli", "serve", "--model", str(tiny_model_dir)]
    cmd += ["--port", str(port), "--tls-certfile", str(cert), "--tls-keyfile", str(key)]
    with running_process(
        cmd,
        log,
        f"{base}/readyz",
        what="serve over HTTPS",
        timeout_s=120,
        env=env,
        verify=str(cert),
    ):
        key_line = (tmp_path / "data" / "first-admin-key").read_text().strip()
        r = httpx.get(
            f"{base}/v1/apikeys/me",
            headers={"Authorization": f"Bearer {key_line}"},
            verify=str(cert),
        )
        assert r.status_code == 200 and r.json()["role"] == "admin"
        r = httpx.get(
            f"{base}/v1/studies?accession_number=ACC9&limit=5",
            headers={"Authorization": f"Bearer {key_line}"},
            verify=str(cert),
        )
        assert r.status_code == 200 and r.json()["count"] == 0
        with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
            httpx.get(f"{base}/healthz")
        with pytest.raises(httpx.HTTPError):  # no clear-text HTTP on the port
            httpx.get(f"http://127.0.0.1:{port}/healthz")
    assert log.read_text().startswith(f"serving on {base} ")
    assert "Loading weights" not in log.read_text()  # no progress bars in a service's log
    access = [ln for ln in log.read_text().splitlines() if '"GET /v1/studies HTTP/1.1" 200' in ln]
    assert len(access) == 1 and "ACC9" not in log.read_text()


def test_tls_settings(tmp_path):
    cert, key = self_signed(tmp_path)
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_certfile=cert)
    with pytest.raises(ValidationError, match="not found"):
        Settings(tls_certfile=cert, tls_keyfile=tmp_path / "missing.pem")
    s = Settings(tls_certfile=cert, tls_keyfile=key, port=8443)
    assert s.base_url == "https://127.0.0.1:8443"
    assert Settings().base_url == "http://127.0.0.1:8000"


def test_the_first_admin_key_is_printed_only_to_a_terminal(tmp_path, monkeypatch):
    """On a terminal (`make serve`) the key is shown once and no file is written; elsewhere
    (test above) it goes to DATA_DIR/first-admin-key."""
    import io

    from tinyllava_med.server import app as app_mod

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown = Terminal()
    monkeypatch.setattr(app_mod.sys, "stderr", shown)
    app_mod._hand_over("tlm_abcd1234_secret", tmp_path)
    assert shown.getvalue().splitlines()[-1] == "tlm_abcd1234_secret"
    assert not (tmp_path / app_mod.FIRST_KEY_FILE).exists()


def test_a_port_in_use_is_said_before_anything_loads(tmp_path, tiny_model_dir):
    """A second `serve` on a port taken (another server): a clear message and exit status 1
    before the model loads or the database is made; before, it loaded the model, made the
    first admin key, then failed to bind."""
    import socket
    import subprocess

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    data = tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINYLLAVA_MED_DATA_DIR": str(data)}
    cmd = [sys.executable, "-m", "tinyllava_med.cli", "serve", "--model", str(tiny_model_dir)]
    with taken:
        done = subprocess.run(
            [*cmd, "--port", str(port)], env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1 port {port}: is in use" in done.stderr
    assert "Traceback" not in done.stderr and "serving on" not in done.stderr
    assert not data.exists()  # no database, no key: nothing started

    # the same for the DIMSE port (before, a traceback from inside the app's start)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    dimse_port = taken.getsockname()[1]
    env["TINYLLAVA_MED_DIMSE_PEERS"] = '["*"]'
    with taken:
        done = subprocess.run(
            [*cmd, "--port", str(free_port()), "--dimse-port", str(dimse_port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert f"port {dimse_port}: is in use" in done.stderr and "--dimse-port" in done.stderr
    assert "Traceback" not in done.stderr and not data.exists()


def test_serve_does_not_migrate_under_another_server_and_says_why_it_cannot_start(
    tmp_path, tiny_model_dir, monkeypatch
):
    """SQLite: a new version's `serve` migrated the schema under an older server still running
    on the same data directory, which went on writing by its own rules. It now refuses while
    another process holds the directory. A full disk, a read-only directory or a write lock held
    by another program is said in one line too (before: a traceback, "disk I/O error")."""
    import fcntl
    import shutil
    import sqlite3
    import subprocess

    from tinyllava_med.cli import _start_problem
    from tinyllava_med.server.db import migrate
    from tinyllava_med.server.settings import Settings
    from tinyllava_med.server.storage import IN_USE_LOCK

    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data}/tinyllava_med.db"
    migrate.upgrade(url, "0011")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINYLLAVA_MED_DATA_DIR": str(data)}
    cmd = [sys.executable, "-m", "tinyllava_med.cli", "serve", "--model", str(tiny_model_dir)]
    held = os.open(data / IN_USE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_SH)  # as an older server holds it
    try:
        done = subprocess.run(
            [*cmd, "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        os.close(held)
    assert done.returncode == 1, done.stderr
    assert "the database is at revision 0011 and this version migrates it to" in done.stderr
    assert "Traceback" not in done.stderr and "serving on" not in done.stderr
    assert migrate.current_revision(url) == "0011"  # untouched

    settings = Settings(data_dir=data, database_url=url)
    assert _start_problem(settings) is None  # alone now: serve migrates it as it starts
    with sqlite3.connect(data / "tinyllava_med.db") as conn:  # as a newer version leaves it
        conn.execute("UPDATE alembic_version SET version_num = '0999'")
    assert "a newer version of the server migrated it" in str(_start_problem(settings))
    with sqlite3.connect(data / "tinyllava_med.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0011'")
    # A transaction left open elsewhere holds the write lock: the migration would have waited
    # out the busy timeout and ended in a traceback (and with no migration, every write would).
    holder = sqlite3.connect(data / "tinyllava_med.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert "held the SQLite database's write lock" in str(_start_problem(settings))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _start_problem(settings) is None
    # a busy writer (another server filing one upload after another, 20 ms each with a
    # moment between) is not taken for one
    stop = threading.Event()

    def busy() -> None:
        with sqlite3.connect(data / "tinyllava_med.db", isolation_level=None) as conn:
            while not stop.is_set():
                conn.execute("BEGIN IMMEDIATE")
                time.sleep(0.02)
                conn.execute("ROLLBACK")
                time.sleep(0.002)

    writer = threading.Thread(target=busy)
    writer.start()
    try:
        assert _start_problem(settings) is None
    finally:
        stop.set()
        writer.join()
    usage = shutil.disk_usage(data)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    assert (
        _start_problem(settings)
        == f"the disk of {data} is full (4 KiB free): free some space first"
    )
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert "cannot write the data directory" in str(_start_problem(settings))
