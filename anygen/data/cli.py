"""``anygen data``: write the built-in data sets, or check a documents JSONL.

::

    anygen data shapes --out data/shapes --num 10000 --seed 0 --image-size 64 --kinds t2i,caption,video,edit,story \\
        --holdout 0.1 --workers 2
    anygen data digits --out data/digits --image-size 64 --holdout 0.2
    anygen data check data/shapes/documents.jsonl

Each generator writes PNG / MP4 files, ``documents.jsonl`` (training), ``heldout.jsonl`` (for the
evaluation) and ``meta.json`` (counts, attribute vocabulary, held-out combinations or split).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("anygen.data")


def _parser() -> argparse.ArgumentParser:
    from anygen.data import shapes

    parser = argparse.ArgumentParser(prog="anygen data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{shapes,digits,check}")

    p = sub.add_parser("shapes", help="procedural scenes of coloured shapes: t2i, captions, VQA, clips, edits, "
                                      "stories")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--num", type=int, default=1000, help="training documents (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="PNG side in pixels (default 64)")
    p.add_argument("--video-size", type=int, default=None, help="clip side in pixels (default: --image-size)")
    p.add_argument("--frames", type=int, default=9, help="frames per clip, 1 + 4k (default 9)")
    p.add_argument("--fps", type=float, default=8.0, help="clip frame rate (default 8)")
    p.add_argument("--clip-format", choices=shapes.CLIP_FORMATS, default="mp4",
                   help="mp4 (H.264, needs PyAV; default) or apng (lossless animated PNG through Pillow: for a "
                        "machine without PyAV / FFmpeg)")
    p.add_argument("--kinds", default=None,
                   help=f"comma-separated kinds with optional weights, e.g. t2i:4,caption:2 (accepted: "
                        f"{', '.join(shapes.KINDS)}; default "
                        f"{','.join(f'{k}:{w:g}' for k, w in shapes.DEFAULT_KINDS.items())})")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of attribute combinations withheld from training (default 0.1)")
    p.add_argument("--num-heldout", type=int, default=None, help="held-out documents (default: num * holdout)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")

    p = sub.add_parser("digits", help="scikit-learn's real handwritten digits: t2i and captioning")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--num", type=int, default=None,
                   help="training documents (default: every training image once per kind)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="PNG side in pixels (default 64)")
    p.add_argument("--kinds", default=None, help="t2i, caption or both, optional weights (default t2i,caption)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of each class held out (default 0.2)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="repeat training images as they are instead of drawing augmented copies")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")

    p = sub.add_parser("check", help="validate a documents JSONL and check that its files exist")
    p.add_argument("documents", type=Path, help="the .jsonl file")
    p.add_argument("--max-errors", type=int, default=20, help="errors to print (default 20)")
    return parser


def _check(path: Path, max_errors: int) -> int:
    from anygen.data.documents import DocumentError, check_files, read_documents

    errors: list[DocumentError] = []
    docs = 0
    kinds: dict[str, int] = {}
    for doc in read_documents(path, on_error=errors.append):
        try:
            check_files(doc)
        except DocumentError as err:
            errors.append(err)
            continue
        docs += 1
        for spec in doc.segments:
            kinds[spec.kind] = kinds.get(spec.kind, 0) + 1
    for err in errors[:max_errors]:
        print(err, file=sys.stderr)
    if len(errors) > max_errors:
        print(f"... and {len(errors) - max_errors} more", file=sys.stderr)
    print(json.dumps({"documents": docs, "invalid": len(errors), "segments": kinds}))
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anygen data``; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "check":
        return _check(args.documents, args.max_errors)
    start = time.perf_counter()
    try:
        if args.command == "shapes":
            from anygen.data.shapes import generate_shapes

            meta = generate_shapes(args.out, num=args.num, seed=args.seed, image_size=args.image_size,
                                   video_size=args.video_size, frames=args.frames, fps=args.fps,
                                   clip_format=args.clip_format, kinds=args.kinds,
                                   holdout=args.holdout, num_heldout=args.num_heldout, workers=args.workers,
                                   overwrite=args.overwrite, progress=True)
        else:
            from anygen.data.digits import generate_digits

            meta = generate_digits(args.out, num=args.num, seed=args.seed, image_size=args.image_size,
                                   kinds=args.kinds, holdout=args.holdout, augment=args.augment,
                                   overwrite=args.overwrite, progress=True)
    except (ValueError, FileExistsError) as err:
        print(f"anygen data {args.command}: error: {err}", file=sys.stderr)
        return 2
    log.info("wrote %d training and %d held-out documents to %s in %.1f s (kinds: %s)", meta["num"]["train"],
             meta["num"]["heldout"], args.out, time.perf_counter() - start, json.dumps(meta["kinds"]["train"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
