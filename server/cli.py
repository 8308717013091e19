"""``python -m server serve [options]``: start the server. Every setting is an option (``--max-batch-size``
for ``max_batch_size``); options override ``JUMPLORA_*`` environment variables."""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from .config import Settings

    parser = argparse.ArgumentParser(
        prog="jumplora serve", description="Start the jumplora inference server. Each option overrides the "
        "environment variable JUMPLORA_<OPTION> (upper case, '_' for '-').")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = (field.description or name.replace("_", " ")) + f" (default: {default})"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar=name.upper(), help=help_text)
    return parser


def serve(argv: list[str]) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .config import Settings
    from .listener import uvicorn_options

    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"jumplora serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), **uvicorn_options(settings))
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
