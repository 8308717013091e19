"""The ``jumplora`` command. ``serve`` hands over to the server package in a fresh interpreter image
(``python -m server``), so that the client never imports the server or torch."""
from __future__ import annotations

import os
import sys

USAGE = """usage: jumplora <command> [options]

commands:
  serve     start the server (jumplora serve --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        os.execv(sys.executable, [sys.executable, "-m", "server", "serve", *rest])
    print(f"jumplora: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
