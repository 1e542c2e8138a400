"""The ``anygen`` command line: one entry point, one subcommand per job.

Subcommands are imported lazily so ``anygen --help`` is instant. Each one lives in the module that
owns the work; this file only dispatches. A subcommand's ``main(argv) -> int`` parses its own flags.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module

# name: ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("anygen.quickstart:main", "tokenize a real bundled image and clip; write reconstructions"),
    "generate": ("anygen.cli_generate:main", "generate text, images and video from prompts (.txt/.png/.mp4)"),
    "data": ("anygen.data.cli:main", "write built-in data sets (shapes, digits) as interleaved JSONL"),
    "build-tokenizer": ("tokenizers_mm.build:main", "train the BPE, join it with the VQ tokenizers"),
    "tokenize": ("anygen.data.tokenize:main", "turn interleaved JSONL documents into token shards"),
    "fit": ("trainers.cli:fit", "train with the Lightning CLI: anygen fit --config configs/....yaml"),
    "validate": ("trainers.cli:validate", "validate with the Lightning CLI"),
    "test": ("trainers.cli:test", "test with the Lightning CLI"),
    "export": ("trainers.export:main", "turn a Lightning checkpoint into a save_pretrained directory"),
    "convert": ("anygen.convert:main", "import a Janus / Emu3 / Chameleon directory"),
    "eval": ("anygen.eval:main", "evaluate a checkpoint (generation, captions, video, digits, tokenizers)"),
    "demo": ("demo.app:main", "the interleaved-generation gradio demo"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: anygen COMMAND [options]   (anygen COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"anygen: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[name][0].partition(":")
    try:
        entry = getattr(import_module(module), function)
    except ModuleNotFoundError as err:
        if err.name and (err.name == module or module.startswith(err.name + ".")):
            print(f"anygen {name}: not available in this version ({module} is missing)", file=sys.stderr)
            return 2
        raise
    return entry(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
