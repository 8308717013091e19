"""``python -m server serve [options]``: start the server. Options override ``JUMPLORA_*`` variables."""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jumplora serve", description="Start the jumplora inference server.")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; env JUMPLORA_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000; env JUMPLORA_PORT)")
    parser.add_argument("--model", help="local transformers causal-LM folder (default SmolLM2-135M-Instruct)")
    parser.add_argument("--store", help="adapter store folder (env JUMPLORA_STORE)")
    parser.add_argument("--cache-dir", dest="cache_dir", help="cache folder for the converted model")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch threads for serving")
    parser.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    return parser


def serve(argv: list[str]) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .config import Settings

    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"jumplora serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m server serve [options]   (see `python -m server serve --help`)")
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"unknown command {argv[0]!r}; the server module only has `serve`", file=sys.stderr)
        return 2
    return serve(argv[1:])
