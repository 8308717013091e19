"""Kill a writer at random instants: the store must only ever show complete, verified adapters."""

from __future__ import annotations

import os
import random
import runpy
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from adapters_store import AdapterStore

HELPER = Path(__file__).with_name("_crash_writer.py")
REPO = Path(__file__).resolve().parents[2]
ROUNDS = 30


def _ask(proc: subprocess.Popen, line: str, timeout: float = 30.0) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return _answer(proc, timeout)


def _answer(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"writer helper did not answer within {timeout} s"
    answer = proc.stdout.readline().strip()
    assert answer, "writer helper exited"
    return answer


def test_killed_writers_leave_only_complete_adapters(tmp_path):
    expected_deltas = runpy.run_path(str(HELPER))["expected_deltas"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    rng = random.Random(20240601)
    left_behind = stored = 0  # rounds whose kill landed mid-write; adapters seen complete
    child = None
    # The writer runs beside this process; on a 2-core machine torch's thread pool would then
    # spin against it and make every small tensor op here tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _answer(proc, 120) == "ready"
        for r in range(ROUNDS):
            root = tmp_path / f"round{r}"
            store = AdapterStore(root)
            child = int(_ask(proc, f"fork {root}"))
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(child, signal.SIGKILL)
            status = int(_ask(proc, f"reap {child}"))
            child = None
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "writer died on its own"

            names = store.names()
            assert names == [f"t{k}" for k in range(len(names))]  # written in order, no gaps, no temp folders
            assert not store.path(f"t{len(names)}").exists()  # the interrupted adapter is not half-visible
            for name in names:
                adapter = store.get(name, fingerprint="crash-test")  # every check verify() runs
                assert adapter.name == name
                for layer, want in expected_deltas(name).items():
                    got = adapter.deltas[layer]
                    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
            if names:  # the adapter written last, closest to the kill, once more through verify()
                assert store.verify(names[-1], fingerprint="crash-test")["task"] == names[-1]
            temps = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
            assert len(temps) <= 1
            assert store.cleanup_temp() == len(temps)
            assert sorted(p.name for p in root.iterdir()) == sorted(names)
            left_behind += bool(temps)
            stored += len(names)
            shutil.rmtree(root)  # keep disk use flat; rounds are independent
    finally:
        torch.set_num_threads(threads)
        if child is not None:
            os.kill(child, signal.SIGKILL)
        proc.stdin.close()
        proc.wait(timeout=30)
    print(f"{ROUNDS} rounds, {stored} adapters verified, {left_behind} kills landed mid-write")
    assert stored > ROUNDS  # the writer did get adapters out
    assert left_behind > 0  # and some kills really did interrupt a write
