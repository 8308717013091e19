"""Writer processes for test_crash.py, forked from one parent so torch is imported only once.

Run as a script, it prints "ready", then answers each line on stdin:
  "fork <root>"  fork a child that puts t0, t1, ... into <root> until killed; print its pid
  "reap <pid>"   wait for that child; print its raw wait status
The test SIGKILLs the children. A child that fails exits with status 3 after printing the error.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

from adapters_store import AdapterStore, SparseDelta

SHAPE = (1024, 1024)  # (out, in)
NNZ = 250_000  # ~3 MB of tensors per adapter
LAYER = "model.layers.0.self_attn.q_proj"


def expected_deltas(name: str) -> dict[str, SparseDelta]:
    """The content of adapter `t<k>`: a function of its name alone."""
    k = int(name[1:])
    indices = torch.arange(NNZ, dtype=torch.int64) * 4 + k % 4  # (NNZ,), max < 1024*1024
    values = torch.arange(NNZ, dtype=torch.float32) * 1e-3 + k + 1  # (NNZ,)
    return {LAYER: SparseDelta(SHAPE, indices, values)}


def meta(name: str) -> dict:
    return {"base_fingerprint": "crash-test", "method": "jumplora", "regularizer": "incremental",
            "order": int(name[1:])}


def write_until_killed(root: str) -> None:
    torch.set_num_threads(1)
    store = AdapterStore(root)
    for k in range(10**9):
        name = f"t{k}"
        if not store.exists(name):
            store.put(name, expected_deltas(name), meta(name))


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        command, arg = line.split()
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    write_until_killed(arg)
                except BaseException:
                    traceback.print_exc()
                os._exit(3)
            print(pid, flush=True)
        elif command == "reap":
            print(os.waitpid(int(arg), 0)[1], flush=True)


if __name__ == "__main__":
    main()
