"""Fixtures of the client tests: the CLI in a subprocess, and a fake HTTP server whose answers a test scripts
(for what the real server cannot be made to do on demand: 429, 5xx, failed jobs, mid-stream errors, exports).
The tests against a real server are in test_live.py, around one module-scoped server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# tests/conftest.py puts tests/ on sys.path, where this folder would shadow the real `client` package as a
# namespace package when pytest runs without the repository on sys.path (a bare `pytest` with the editable
# install): put the repository first.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_cli(*args: str, stdin: str | None = None, timeout: float = 120, env: dict | None = None):
    """``python -m client.cli ARGS`` in a subprocess: (returncode, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "client.cli", *args], input=stdin, capture_output=True, text=True,
                       encoding="utf-8", timeout=timeout, env=full_env, cwd=REPO)
    return p.returncode, p.stdout, p.stderr


class FakeServer:
    """A loopback HTTP server answering from ``routes``: ``(method, path) -> answer``, where an answer is
    ``(status, body, headers)`` (a dict body is sent as JSON) or a list of them, served one per request (the
    last one repeats). ``requests`` records ``(method, path, headers (lower-case names), body)``."""

    def __init__(self):
        self.routes: dict[tuple[str, str], object] = {}
        self.requests: list[tuple[str, str, dict, bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                answer = fake.routes.get((self.command, self.path))
                if answer is None:
                    answer = (404, {"error": {"message": f"no route {self.path}", "type": "not_found_error",
                                              "param": None}}, {})
                if isinstance(answer, list):
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                status, payload, headers = answer
                if isinstance(payload, (dict, list)):
                    payload, kind = json.dumps(payload).encode(), "application/json"
                else:
                    kind = "application/octet-stream"
                headers = {"content-type": kind, **headers}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cli():
    """``cli(*args, stdin=None, env=None) -> (returncode, stdout, stderr)`` of ``python -m client.cli``."""
    return run_cli


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()
