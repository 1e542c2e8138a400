"""anygen: text, images and video as one token stream, read and written by one decoder transformer.

``from anygen import AnyGen`` is the entry point. Names are imported lazily so that light modules
(``anygen.config``, the CLI's ``--help``) never pull in torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "AnyGen": "anygen.api",
    "GenerationOutput": "anygen.api",
    "AnyGenConfig": "anygen.config",
    "AnyGenModel": "anygen.model",
    "SamplingConfig": "anygen.generation.sampling",
    "Text": "tokenizers_mm.segments",
    "Image": "tokenizers_mm.segments",
    "Video": "tokenizers_mm.segments",
    "Understand": "tokenizers_mm.segments",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anygen' has no attribute {name!r}")
