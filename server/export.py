"""Merged export: the base model with one task's route (the deltas of the tasks it was trained on and its own) or
the ``@stack`` sum added into its weights, saved
as an ordinary transformers checkpoint (loadable with ``AutoModelForCausalLM.from_pretrained``, servable by
vLLM or TGI).

    python -m server.export --store DIR [--model PATH] [--cache-dir DIR] [--tasks a,b] NAME OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def export_merged(store_root: Path, name: str, out_dir: Path, *, model: Path | None = None,
                  cache_dir: Path | None = None, tasks: list[str] | None = None) -> Path:
    """Write the merged checkpoint for ``name`` (a task, ``@stack`` or ``@base``) to ``out_dir`` (which must
    not exist or be empty), atomically. For ``@stack``, ``tasks`` fixes the tasks summed (default: every
    adapter of the store that verifies against this base)."""
    import torch

    from adapters_store import AdapterStore, StoreError

    from .config import Settings
    from .model import load_base

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    base = load_base(model, cache_dir or Settings().cache_dir, "cpu", "float32")
    store = AdapterStore(store_root)
    shapes = {n: tuple(m.weight.shape) for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    if name == "@base":
        route = []
    elif name == "@stack":
        route = []
        for task in tasks if tasks is not None else store.names():
            try:
                route.append(store.get(task, fingerprint=base.fingerprint, layer_shapes=shapes))
            except StoreError as e:
                if tasks is not None:
                    raise
                log.warning("leaving out of @stack: %s", e)
    else:  # a task is served with its route: the tasks it was trained on, then itself
        route = store.lineage(name, fingerprint=base.fingerprint, layer_shapes=shapes)
    merged = []
    with torch.no_grad():
        for stored in route:
            task = stored.name
            for layer, delta in stored.deltas.items():
                weight = base.model.get_submodule(layer).weight
                weight += delta.to_dense().to(weight.dtype)
            merged.append({"task": task, "sha256": stored.manifest["tensors_sha256"]})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        base.model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        (tmp / "jumplora-export.json").write_text(json.dumps(
            {"name": name, "merged": merged, "base_fingerprint": base.fingerprint, "base": str(base.path)},
            indent=1))
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="adapter store folder")
    ap.add_argument("--model", help="base model folder (default: the converted SmolLM2)")
    ap.add_argument("--cache-dir", help="cache folder of the default model")
    ap.add_argument("--tasks", help="for @stack: the comma-separated tasks to sum (default: all in the store)")
    ap.add_argument("name", help="a task name, @stack or @base")
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_merged(Path(args.store), args.name, Path(args.out_dir),
                            model=Path(args.model) if args.model else None,
                            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                            tasks=[t for t in args.tasks.split(",") if t] if args.tasks is not None else None)
    except Exception as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
