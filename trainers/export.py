"""``anygen export``: a Lightning checkpoint in, a file or directory anygen loads without Lightning out.

- ``UnifiedModule`` checkpoint -> an ``AnyGen.save_pretrained`` directory (``config.json``,
  ``model.safetensors`` and the tokenizer files), which ``AnyGen.from_pretrained`` and
  ``anygen generate --checkpoint DIR`` load. The tokenizer is read from the directory the run was
  trained with, or from ``--tokenizer-dir`` when it has moved.
- ``ImageTokenizerModule`` / ``VideoTokenizerModule`` checkpoint -> the tokenizer's ``.safetensors``
  (``ImageTokenizer.save`` / ``VideoTokenizer.save``). ``--out`` may name the file, or a directory that
  receives ``image_tokenizer.safetensors`` / ``video_tokenizer.safetensors`` (the names a
  ``MultimodalTokenizer`` directory uses).

Checkpoints are read with ``torch.load(weights_only=True)`` only: tensors and plain values, never
arbitrary pickled objects. The modules store what export needs as plain values when they save.

Usage::

    anygen export runs/unified/checkpoints/last.ckpt --out checkpoints/anygen-tiny
    anygen export runs/unified/checkpoints/last.ckpt --out checkpoints/anygen-tiny --dtype bf16   # half the size
    anygen export runs/image_tokenizer/checkpoints/last.ckpt --out tokenizer_dir/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

KINDS = ("unified", "image_tokenizer", "video_tokenizer")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a Lightning checkpoint of an anygen module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError for foreign or unsafe content
        raise ValueError(f"{path} could not be read as a weights-only Lightning checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if ckpt.get("anygen_module") not in KINDS:
        raise ValueError(f"{path} was not written by an anygen training module (anygen_module="
                         f"{ckpt.get('anygen_module')!r}; expected one of {KINDS})")
    return ckpt


def export_checkpoint(ckpt_path: str | Path, out: str | Path, *, tokenizer_dir: str | Path | None = None,
                      dtype: str | None = None) -> Path:
    """Export ``ckpt_path`` to ``out`` (see the module docstring); returns the written path.

    ``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"``; unified checkpoints only) is the dtype ``model.safetensors``
    stores the weights in; ``None`` keeps the checkpoint's (fp32 for every recipe here).
    """
    from anygen.api import SAVE_DTYPES

    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    ckpt = read_checkpoint(ckpt_path)
    kind = ckpt["anygen_module"]
    if kind == "unified":
        return _export_unified(ckpt, Path(out), tokenizer_dir, None if dtype is None else SAVE_DTYPES[dtype])
    if tokenizer_dir is not None:
        raise ValueError("--tokenizer-dir applies to unified checkpoints only; this is a tokenizer checkpoint")
    if dtype is not None:
        raise ValueError("--dtype applies to unified checkpoints only; tokenizer weights are stored as trained")
    return _export_tokenizer(ckpt, kind, Path(out))


def _submodule_state(ckpt: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def _export_unified(ckpt: dict[str, Any], out: Path, tokenizer_dir: str | Path | None,
                    dtype: torch.dtype | None) -> Path:
    from anygen.api import AnyGen
    from anygen.config import AnyGenConfig
    from anygen.model import AnyGenModel
    from tokenizers_mm.multimodal import MultimodalTokenizer
    from tokenizers_mm.vocab import Vocab
    from trainers.unified import load_model_state

    directory = Path(tokenizer_dir or ckpt.get("tokenizer_dir") or "")
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} of this checkpoint does not exist; "
                                "pass --tokenizer-dir DIR (the MultimodalTokenizer directory the model trained with)")
    tokenizer = MultimodalTokenizer.load(directory)
    # every weight comes from the checkpoint, so the exported config must not point at a local SigLIP directory
    config = AnyGenConfig.from_dict({**ckpt["anygen_config"], "und_encoder_path": None})
    if Vocab(**config.vocab_dict()) != tokenizer.vocab:
        raise ValueError(f"the checkpoint's vocabulary {config.vocab_dict()} differs from the tokenizer's at "
                         f"{directory} {tokenizer.vocab.to_dict()}: pass the tokenizer directory it trained with")
    model = AnyGenModel(config)
    load_model_state(model, _submodule_state(ckpt, "model."), "the checkpoint")
    return AnyGen(model, tokenizer).save_pretrained(out, dtype=dtype)


def _export_tokenizer(ckpt: dict[str, Any], kind: str, out: Path) -> Path:
    from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
    from tokenizers_mm.multimodal import IMAGE_FILE, VIDEO_FILE
    from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig

    if kind == "image_tokenizer":
        tokenizer = ImageTokenizer(ImageTokenizerConfig.from_dict(ckpt["tokenizer_config"]))
        name = IMAGE_FILE
    else:
        tokenizer = VideoTokenizer(VideoTokenizerConfig.from_dict(ckpt["tokenizer_config"]))
        name = VIDEO_FILE
    try:
        tokenizer.load_state_dict(_submodule_state(ckpt, "tokenizer."), strict=True)
    except RuntimeError as err:
        raise ValueError(f"the checkpoint's tokenizer weights do not fit its stored config: {err}") from err
    path = out if out.suffix == ".safetensors" else out / name
    return tokenizer.save(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anygen export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="Lightning .ckpt of a UnifiedModule / tokenizer module")
    p.add_argument("--out", type=Path, required=True,
                   help="save_pretrained directory (unified), or .safetensors file / directory (tokenizers)")
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="MultimodalTokenizer directory (unified only; default: the one the run trained with)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype model.safetensors stores (unified only; default: the checkpoint's, fp32). bf16 "
                        "halves the file; loading casts back to fp32")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, tokenizer_dir=args.tokenizer_dir, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"anygen export: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
