"""``anygen tokenize``: interleaved documents (JSONL) → token shards, in parallel worker processes.

::

    anygen tokenize --documents data/shapes/documents.jsonl --tokenizer TOKENIZER_DIR --out data/shapes-tokens \\
        --workers 2 --shard-size 1000 --max-length 2048 [--batch-size 16] [--strict] [--format safetensors|webdataset]

This module owns the run: validate every line first (in this process), then load and encode the
documents in ``--workers`` processes (forkserver where the platform has it, else spawn; never a
plain fork; each loads the ``MultimodalTokenizer`` from its directory once), ``--batch-size``
documents a task, whose images and clips are VQ-encoded together (``MultimodalTokenizer.with_codes``),
and write the results in input order through ``shards.ShardWriter``, so the output is the same
whatever the number of workers. ``index.json`` is written last.

Bad data never crashes a run and never becomes a silent wrong sample: an invalid line, a missing
file, an unreadable image or clip, a clip shorter than ``--video-frames``, a document the tokenizer
refuses, or one longer than ``--max-length`` tokens is skipped, counted by category, logged, and
listed in ``index.json`` (``skipped``). With ``--strict`` the first one stops the run with an error
naming the document and the problem (and the shards written so far are removed).

``index.json`` also records each written document's mixture group (``Document.group``, e.g.
``shapes/caption``), which ``TokenDataModule(weights=...)`` samples by.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anygen.data.documents import Document, DocumentError, load_document, read_documents
from anygen.data.shards import FORMATS, INDEX_FILE, ShardWriter, TokenizedDocument

log = logging.getLogger("anygen.data")
MODALITY_NAMES = ("text", "image", "video", "und")  # tokenizers_mm.vocab.Modality order
_LOGGED_SKIPS = 20  # skipped documents logged one by one; the rest only in the summary and index.json


@dataclass(frozen=True)
class TokenizeOptions:
    """What a worker needs to turn a document into ids (picklable, sent once per worker)."""

    tokenizer: str
    video_frames: int | None = None
    video_fps: float | None = None
    understand_as_image: bool = False
    max_length: int | None = None
    batch_size: int = 16  # documents loaded and VQ-encoded together (MultimodalTokenizer.with_codes)


@dataclass
class _Result:
    doc_id: str
    source: str
    group: str = "documents/document"
    ids: np.ndarray | None = None
    und: np.ndarray | None = None
    modality_tokens: list[int] = field(default_factory=list)
    error: DocumentError | None = None


_WORKER: dict[str, Any] = {}


def _init_worker(options: TokenizeOptions) -> None:
    """Load the tokenizer once per process."""
    import torch

    from tokenizers_mm.multimodal import MultimodalTokenizer

    # one thread a process: documents are small and parallelism comes from the workers; several
    # threads per tiny op cost far more than they gain (4-40x slower measured on 2 shared cores)
    torch.set_num_threads(1)
    _WORKER["tokenizer"] = MultimodalTokenizer.load(options.tokenizer)
    _WORKER["options"] = options


def _tokenize_batch(docs: list[Document]) -> list[_Result]:
    """Load a batch of documents' files and encode them, their images and clips VQ-encoded together
    (``MultimodalTokenizer.with_codes``); every failure comes back as its document's ``_Result.error``."""
    tok, opts = _WORKER["tokenizer"], _WORKER["options"]
    results = [_Result(doc.id, doc.source, doc.group) for doc in docs]
    loaded: list[tuple[int, list]] = []
    for k, doc in enumerate(docs):
        try:
            loaded.append((k, load_document(doc, image_size=tok.image_size, video_size=tok.video_size,
                                            video_frames=opts.video_frames, video_fps=opts.video_fps,
                                            image_factor=tok.image.downsample if tok.image is not None else 1,
                                            understand_as_image=opts.understand_as_image)))
        except DocumentError as err:
            results[k].error = err
    try:
        coded = tok.with_codes([segments for _, segments in loaded])
    except (ValueError, TypeError):  # pixels the VQ tokenizer refuses: each document on its own, to tell which
        coded = [segments for _, segments in loaded]
    for (k, _), segments in zip(loaded, coded):
        try:
            seq = tok.encode(segments)
        except (ValueError, TypeError) as err:  # size tokens, no und encoder, ...
            results[k].error = docs[k].error(f"the tokenizer refused it: {err}", "encode-error")
        else:
            _fill(results[k], docs[k], seq, opts)
    return results


def _fill(result: _Result, doc: Document, seq, opts: TokenizeOptions) -> None:
    """``result``'s ids, understood pixels and token counts from ``seq``, or its error when too long."""
    import torch

    if opts.max_length is not None and len(seq) > opts.max_length:
        result.error = doc.error(f"{len(seq)} tokens > --max-length {opts.max_length}", "too-long")
        return
    result.ids = seq.ids.numpy().astype(np.int32)
    if seq.und_pixels is not None:
        result.und = seq.und_pixels.to(torch.float16).numpy()
    result.modality_tokens = np.bincount(seq.modality.numpy(), minlength=len(MODALITY_NAMES)).tolist()


def _results(docs: list[Document], options: TokenizeOptions, workers: int) -> Iterator[list[_Result]]:
    """Results in input order, a batch of ``options.batch_size`` documents at a time, from ``workers``
    processes (``<= 1``: this process). The batches do not depend on ``workers``, so neither do the ids."""
    batches = [docs[i:i + options.batch_size] for i in range(0, len(docs), options.batch_size)]
    if workers <= 1:
        import torch

        threads = torch.get_num_threads()
        _init_worker(options)
        try:
            yield from map(_tokenize_batch, batches)
        finally:
            _WORKER.clear()
            torch.set_num_threads(threads)
        return
    with _context().Pool(workers, initializer=_init_worker, initargs=(options,)) as pool:
        yield from pool.imap(_tokenize_batch, batches)


def _context() -> multiprocessing.context.BaseContext:
    """Never plain fork (the parent's torch threads and state do not survive it). Where it exists,
    a forkserver that imports the tokenizer stack once and forks workers from that clean process:
    each spawned worker would import torch and diffusers itself (~7 s of CPU each); else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tokenizers_mm.multimodal", "tokenizers_mm.image", "tokenizers_mm.video",
                                "tokenizers_mm.preprocess", "tokenizers_mm.video_io", "anygen.data.tokenize"])
    return ctx


def _prepare_out(out: Path, overwrite: bool) -> None:
    old = [p for p in out.glob("shard-*") if p.is_file()] + [p for p in (out / INDEX_FILE,) if p.exists()]
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds shards; pass overwrite=True (--overwrite) to replace them")
    for path in old:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def tokenize_documents(
    documents: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    shard_size: int = 1000,
    max_length: int | None = None,
    strict: bool = False,
    format: str = "safetensors",
    video_frames: int | None = None,
    video_fps: float | None = None,
    understand_as_image: bool = False,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Tokenize a documents JSONL into shards.

    Args:
        documents: the ``.jsonl`` file (format in ``anygen.data.documents``).
        tokenizer: a ``MultimodalTokenizer.save`` directory.
        out: the shards directory (created).
        workers: worker processes; ``<= 1`` works in this process.
        shard_size: documents per shard.
        max_length: skip documents with more tokens (``None``: no limit).
        strict: stop at the first bad document with a ``DocumentError`` instead of skipping it.
        format: ``"safetensors"`` or ``"webdataset"`` (see ``anygen.data.shards``).
        video_frames: frames per clip, ``1 + 4k``; shorter clips are bad data. ``None`` keeps each
            clip's length (trimmed to ``1 + 4k``).
        video_fps: resample clips to this rate first; ``None`` keeps the file's.
        understand_as_image: write ``understand`` images as VQ tokens (a model without an
            understanding encoder).
        limit: tokenize only the first ``limit`` valid documents.
        overwrite: replace shards already in ``out``.
        progress: show a tqdm bar.
        batch_size: documents a worker loads and VQ-encodes together (their images and clips in one
            tokenizer call per size); the ids do not depend on it.

    Returns:
        The content of ``index.json``.

    Raises:
        FileNotFoundError: no documents file or tokenizer directory.
        DocumentError: with ``strict``, the first bad document.
    """
    from tqdm import tqdm

    from tokenizers_mm.multimodal import TOKENIZER_CONFIG

    documents, tokenizer, out = Path(documents), Path(tokenizer), Path(out)
    if format not in FORMATS:
        raise ValueError(f"unknown shard format {format!r}; accepted: {', '.join(FORMATS)}")
    if not (tokenizer / TOKENIZER_CONFIG).is_file():
        raise FileNotFoundError(f"no {TOKENIZER_CONFIG} in {tokenizer}: pass a MultimodalTokenizer.save directory")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 document, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    start = time.perf_counter()

    skipped: list[DocumentError] = []
    docs = list(read_documents(documents, on_error=None if strict else skipped.append))
    if limit is not None:
        docs = docs[:limit]
    _prepare_out(out, overwrite)
    shutil.copyfile(tokenizer / TOKENIZER_CONFIG, out / TOKENIZER_CONFIG)
    vocab = json.loads((tokenizer / TOKENIZER_CONFIG).read_text())["vocab"]

    options = TokenizeOptions(str(tokenizer.resolve()), video_frames, video_fps, understand_as_image, max_length,
                              batch_size)
    writer = ShardWriter(out, format=format, shard_size=shard_size)
    modality = [0] * len(MODALITY_NAMES)
    und_size = 0
    group_names: dict[str, int] = {}  # group -> code, in order of first appearance
    group_codes: list[int] = []  # per written document
    for err in skipped:
        _log_skip(err, len(skipped))
    try:
        bar = tqdm(total=len(docs), desc="tokenize", unit="doc", disable=not progress)
        for result in (r for batch in _results(docs, options, workers) for r in batch):
            bar.update()
            if result.error is not None:
                if strict:
                    raise result.error
                skipped.append(result.error)
                _log_skip(result.error, len(skipped))
                bar.set_postfix(skipped=len(skipped), refresh=False)
                continue
            writer.add(TokenizedDocument(result.doc_id, result.ids, result.und))
            group_codes.append(group_names.setdefault(result.group, len(group_names)))
            modality = [a + b for a, b in zip(modality, result.modality_tokens)]
            if result.und is not None:
                und_size = int(result.und.shape[-1])
        bar.close()
        shards = writer.close()
    except BaseException:
        writer.remove()
        raise

    elapsed = time.perf_counter() - start
    by_category: dict[str, int] = {}
    for err in skipped:
        by_category[err.category] = by_category.get(err.category, 0) + 1
    index = {
        "format": format,
        "version": 1,
        "documents": str(documents.resolve()),
        "tokenizer": str(tokenizer.resolve()),
        "vocab": vocab,
        "docs": sum(s["docs"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "modality_tokens": dict(zip(MODALITY_NAMES, modality)),
        "und_images": sum(s["und_images"] for s in shards),
        "und_size": und_size,
        # each written document's mixture group (Document.group), for TokenDataModule(weights=...)
        "groups": {"names": list(group_names), "of_document": group_codes},
        "shards": shards,
        "skipped": {
            "count": len(skipped),
            "by_category": by_category,
            "documents": [{"id": e.doc_id, "source": e.source, "category": e.category, "reason": e.reason}
                          for e in skipped],
        },
        "settings": {"max_length": max_length, "video_frames": video_frames, "video_fps": video_fps,
                     "understand_as_image": understand_as_image, "shard_size": shard_size, "workers": workers,
                     "batch_size": batch_size},
        "seconds": round(elapsed, 2),
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    rate = len(docs) / elapsed if elapsed > 0 else float("inf")
    log.info("tokenized %d documents (%d tokens) into %d %s shard(s) in %s in %.1f s (%.1f docs/s)", index["docs"],
             index["tokens"], len(shards), format, out, elapsed, rate)
    if skipped:
        log.warning("skipped %d document(s): %s (listed in %s)", len(skipped),
                    ", ".join(f"{n} {c}" for c, n in sorted(by_category.items())), out / INDEX_FILE)
    return index


def _log_skip(err: DocumentError, n: int) -> None:
    if n <= _LOGGED_SKIPS:
        log.warning("skipped %s [%s]", err, err.category)
    elif n == _LOGGED_SKIPS + 1:
        log.warning("more documents skipped; the summary and index.json list them all")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anygen tokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", required=True, type=Path, help="documents JSONL")
    parser.add_argument("--tokenizer", required=True, type=Path, help="MultimodalTokenizer directory")
    parser.add_argument("--out", required=True, type=Path, help="shards directory")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1: this process)")
    parser.add_argument("--shard-size", type=int, default=1000, help="documents per shard (default 1000)")
    parser.add_argument("--max-length", type=int, default=None, help="skip documents longer than this (tokens)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad document instead of skipping")
    parser.add_argument("--format", choices=FORMATS, default="safetensors", help="shard format (default safetensors)")
    parser.add_argument("--video-frames", type=int, default=None,
                        help="frames per clip, 1 + 4k; shorter clips are skipped (default: each clip's own)")
    parser.add_argument("--video-fps", type=float, default=None, help="resample clips to this frame rate first")
    parser.add_argument("--understand-as-image", action="store_true",
                        help="write understand images as VQ tokens (model without an understanding encoder)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N valid documents")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="documents a worker task VQ-encodes together (default 16; the ids do not depend "
                        "on it; fewer documents than workers x batch size leave workers idle)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anygen tokenize``; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tokenize_documents(args.documents, args.tokenizer, args.out, workers=args.workers,
                           shard_size=args.shard_size, max_length=args.max_length, strict=args.strict,
                           format=args.format, video_frames=args.video_frames, video_fps=args.video_fps,
                           understand_as_image=args.understand_as_image, limit=args.limit,
                           overwrite=args.overwrite, progress=not args.quiet, batch_size=args.batch_size)
    except (DocumentError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"anygen tokenize: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
