"""The benchmarks' ``--model`` and ``--cache-dir`` options, and the model folder they name."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="local transformers model folder (default: the converted SmolLM2)")
    ap.add_argument("--cache-dir", help="cache folder for the default model (default: the server's)")


def model_and_cache(args: argparse.Namespace) -> tuple[Path, Path]:
    """The model folder (the default model converted into the cache if --model is unset) and the cache folder."""
    from server.config import Settings
    from server.model import convert_default_model

    cache = Path(args.cache_dir) if args.cache_dir else Settings().cache_dir
    return (Path(args.model) if args.model else convert_default_model(cache)), cache


def cpu_base(args: argparse.Namespace):
    """The model of --model/--cache-dir in fp32 on CPU, with torch at --threads threads where the options have
    it (unset: torch's choice)."""
    import torch

    from server.model import load_base

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    model_dir, cache = model_and_cache(args)
    return load_base(model_dir, cache, "cpu", "float32")
