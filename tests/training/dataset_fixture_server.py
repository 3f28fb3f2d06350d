"""A loopback HTTP file server for the download tests: Range requests, scripted failures.

Serves `files` (URL path -> bytes) on 127.0.0.1 at a free port from a thread. Scripted faults:
`break_once` paths send their headers and half the body, then drop the connection, the first
time only; `fail_with[path]` is a list of status codes answered (and consumed) before the file;
`honor_range = False` makes it answer every request with the whole file (200).
Every request is logged as (path, Range header or None).
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class FixtureServer:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.break_once: set[str] = set()
        self.fail_with: dict[str, list[int]] = {}
        self.honor_range = True
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def requests_for(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]

    def __enter__(self) -> FixtureServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                range_header = self.headers.get("Range")
                with server._lock:
                    server.requests.append((path, range_header))
                    failures = server.fail_with.get(path)
                    status = failures.pop(0) if failures else None
                    broken = path in server.break_once
                    server.break_once.discard(path)
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files.get(path)
                if body is None:
                    self.send_error(404, "no such file")
                    return
                start, code = 0, 200
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
                m = m if server.honor_range else None
                if m:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    end = int(m.group(2)) + 1 if m.group(2) else len(body)
                    body, code = body[start:end], 206
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if code == 206:
                    total = len(server.files[path])
                    self.send_header(
                        "Content-Range", f"bytes {start}-{start + len(body) - 1}/{total}"
                    )
                self.end_headers()
                if broken:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler
