"""client/ is a thin HTTP client: it must import neither torch nor anything of the server or benchmarks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import sys
import client, client.api, client.cli, client.errors
from client import Client, AsyncClient
client.cli.build_parser()
heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "server", "benchmarks", "transformers", "numpy")]
assert not heavy, heavy
print("clean")
"""


def test_client_imports_neither_torch_nor_the_server():
    p = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0 and p.stdout.strip() == "clean", p.stderr
