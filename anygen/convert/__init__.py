"""Import published Janus / Emu3 / Chameleon checkpoints (Hugging Face layout) into anygen.

``anygen convert --from janus|emu3|chameleon SRC_DIR --out DIR`` writes an anygen checkpoint
directory (``AnyGen.save_pretrained``); ``AnyGen.from_pretrained(SRC_DIR)`` converts in memory.
One module per family (``janus``, ``emu3``, ``chameleon``) maps the tensors; ``common`` holds what
they share.

The vocabulary: an id permutation. anygen's ``Vocab`` is ``[text | specials | sizes | image | video]``;
the reference's ids are renumbered into that layout and every embedding / head row moves with its id:

- each anygen role (``<|bos|> <|eos|> <|pad|> <|boi|> <|eoi|> <|eol|> <|eof|> <|und|>``) that the
  reference has *is* that reference token: its row moves to the special's slot and it leaves the
  text range, so it exists once (text sampling can never emit a second copy of ``<|eos|>``);
- a role without its own token copies another's rows (``<|null|>`` is the pad row); roles the
  reference never uses (size tokens, ``<|bov|>`` …, the one-code video table) get zero rows;
- image codes that live inside the reference vocabulary (Emu3's ``<|visual token k|>``, Chameleon's
  ``IMGIMG…``) move to ``image_offset + k``; Janus's codes already have their own table and head;
- every other reference id keeps its relative order in the text range; the text tokenizer is the
  reference's own ``tokenizer.json`` behind ``HFTextTokenizer``, which renumbers the same way.

The span structure each reference was trained on is kept as data (``tokenizers_mm.layout.ImageLayout``),
so the grammar writes exactly the reference's ids: Janus and Chameleon images have no size tokens
and no row ends; Emu3's carry its ``"H*W<|image token|>"`` header, row ends and a frame end. The
permutation is saved as ``imported_from.json`` next to the checkpoint (``IdMap.from_dict``), so
reference ids can be translated (``to_anygen``) when comparing with the reference.

Sampling: an importer records its reference's published image settings (``Imported.sampling``): Janus-Pro
temperature 1 with guidance 5, Emu3-Gen top-k 2048 with guidance 3; Chameleon / Anole publish none, so the
library's apply. ``save_pretrained`` writes them to ``generation_config.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from anygen.convert.common import SUPPORTED, SUPPORTED_TEXT, HFCheckpoint, IdMap, Imported, Log, Timer, build_engine

FAMILIES = tuple(SUPPORTED)
IMPORTED_FILE = "imported_from.json"
_ARCHITECTURES = {arch: name for name, arch in SUPPORTED.items()}


def detect_format(directory: str | Path) -> str:
    """``"anygen"``, ``"janus"``, ``"emu3"`` or ``"chameleon"``: what a checkpoint directory holds.

    Raises:
        FileNotFoundError: no such directory, or it has no ``config.json``.
        ValueError: the config names another architecture (the message lists the supported ones).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: it is neither an anygen checkpoint nor a Hugging "
                                f"Face model directory (supported: {SUPPORTED_TEXT})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a model config")
    if meta.get("format") == "anygen":
        return "anygen"
    archs = [a for a in meta.get("architectures") or [] if isinstance(a, str)]
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = meta.get("model_type")
    if model_type in SUPPORTED and not archs:
        return model_type
    what = ", ".join(archs) or (f"model_type {model_type!r}" if model_type else "no architecture")
    raise ValueError(f"{directory} holds an unsupported architecture ({what}); supported: {SUPPORTED_TEXT}, "
                     f"or an anygen checkpoint")


def import_checkpoint(directory: str | Path, family: str | None = None, *, log: Log | None = None) -> Imported:
    """Read a Hugging Face directory into anygen's config, tensors and tokenizer (nothing is built yet)."""
    timer = Timer(log)
    found = detect_format(directory)
    if found == "anygen":
        raise ValueError(f"{directory} is already an anygen checkpoint: load it with AnyGen.from_pretrained")
    if family is not None and family != found:
        raise ValueError(f"--from {family} was asked for, but {directory} holds a {SUPPORTED[found]} ({found})")
    ckpt = HFCheckpoint(directory)
    timer(f"{found}: {len(ckpt.weight_map)} tensors in {len(set(ckpt.weight_map.values()))} shard(s)")
    from importlib import import_module

    return import_module(f"anygen.convert.{found}").load(ckpt, timer)


def load(directory: str | Path, family: str | None = None, *, dtype: torch.dtype | None = None,
         log: Log | None = None):
    """Convert in memory: an ``AnyGen`` engine for a Janus / Emu3 / Chameleon directory.

    Args:
        directory: the Hugging Face model directory (``config.json``, safetensors, tokenizer files).
        family: ``"janus"``, ``"emu3"`` or ``"chameleon"`` to insist on one; None detects it.
        dtype: cast the decoder weights (e.g. ``torch.float32``); None keeps the stored dtype.
        log: called with progress lines (e.g. ``print``).
    """
    imported = import_checkpoint(directory, family, log=log)
    engine = build_engine(imported.config, imported.state, imported.tokenizer, imported.sources, dtype=dtype,
                          sampling_defaults=imported.sampling)
    engine.id_map = imported.id_map  # reference <-> anygen ids, for comparisons with the reference
    return engine


def convert(src: str | Path, out: str | Path, family: str | None = None, *, dtype: torch.dtype | None = None,
            log: Log | None = print) -> Path:
    """Convert ``src`` (Hugging Face layout) into an anygen checkpoint directory ``out``; returns ``out``."""
    timer = Timer(log)
    imported = import_checkpoint(src, family, log=log)
    engine = build_engine(imported.config, imported.state, imported.tokenizer, imported.sources, dtype=dtype,
                          sampling_defaults=imported.sampling)
    del imported.state
    n = engine.model.num_parameters()
    timer(f"built the anygen model: {n / 1e6:.1f}M parameters, {next(engine.model.parameters()).dtype}")
    out = engine.save_pretrained(out)
    info = {"source": str(Path(src).resolve()), "family": detect_format(src), "id_map": imported.id_map.to_dict()}
    (out / IMPORTED_FILE).write_text(json.dumps(info))
    timer(f"wrote {out}")
    return out


def read_id_map(directory: str | Path) -> IdMap:
    """The reference <-> anygen id map of a converted checkpoint (``imported_from.json``)."""
    path = Path(directory) / IMPORTED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {IMPORTED_FILE}: it was not converted by anygen convert")
    return IdMap.from_dict(json.loads(path.read_text())["id_map"])


_DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anygen convert", description=(
        "Import a Janus / Janus-Pro, Emu3 or Chameleon / Anole checkpoint (a Hugging Face directory with "
        "config.json, *.safetensors and tokenizer files) into an anygen checkpoint directory."))
    parser.add_argument("--from", dest="family", choices=FAMILIES, required=True, help="the source family")
    parser.add_argument("src", help="the Hugging Face model directory")
    parser.add_argument("--out", required=True, help="the anygen checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="keep",
                        help="weights dtype of the output (default: as stored)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, args.family, dtype=_DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as err:
        print(f"anygen convert: {err}", file=sys.stderr)
        return 2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak memory (max RSS): {peak:.0f} MiB")
    return 0


__all__ = ["FAMILIES", "convert", "detect_format", "load", "main", "read_id_map"]
