"""The ``anygen`` command line: one entry point, one subcommand per job.

Subcommands import their work lazily so ``anygen --help`` is instant. Each subcommand lives in the
module that owns the work (``anygen.quickstart`` …); this file only parses and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _quickstart(argv: Sequence[str]) -> int:
    from anygen.quickstart import main

    return main(argv)


def _generate(argv: Sequence[str]) -> int:
    from anygen.cli_generate import main

    return main(argv)


COMMANDS = {
    "quickstart": (_quickstart, "tokenize a real bundled image and clip; write reconstructions and a token dump"),
    "generate": (_generate, "generate text, images and video from prompts; write .txt / .png / .mp4"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="anygen", description="Unified any-to-any generation engine.")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in
                                                                          sorted(COMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(sorted(COMMANDS))}")
    return COMMANDS[argv[0]][0](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
