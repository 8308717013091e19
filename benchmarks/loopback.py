"""A real server process on loopback (``python -m server serve``), for tests and benchmarks."""
from __future__ import annotations

from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real server process on loopback (``python -m server serve``), stopped by ``stop()``."""

    def __init__(self, model_dir: Path | None, store: Path, cache_dir: Path, extra_args=(), env=None,
                 log_path: Path | None = None):
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--store", str(store),
                "--cache-dir", str(cache_dir), "--device", "cpu", *extra_args]
        if model_dir is not None:
            args += ["--model", str(model_dir)]
        self.log_path = log_path or store.parent / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=Path(__file__).resolve().parents[1])

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
