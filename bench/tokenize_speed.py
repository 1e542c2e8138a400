"""Throughput of ``anygen tokenize`` on shapes documents: documents VQ-encoded together against one at a time.

    .venv/bin/python bench/tokenize_speed.py                          # 240 documents, batch sizes 1 and 16, 1 worker
    .venv/bin/python bench/tokenize_speed.py --num 480 --batch-sizes 1,8,16,32 --workers 2 --repeats 3

Writes ``--num`` documents of every shapes kind the way ``scripts/train_default.sh`` does (64x64 images,
9-frame clips) into a temporary folder, then runs ``tokenize_documents`` with the shipped model's tokenizer
(``anygen/assets/default``) once per ``--batch-sizes`` entry and repeat, in turns, after one untimed warm-up,
so every setting sees the same machine. Prints documents per second (median of ``--repeats``) and each batch
size's speed-up over the first one, measured in the same run; checks that every setting wrote the same ids.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from anygen.cli_generate import DEFAULT_MODEL_DIR
from anygen.data.shapes import generate_shapes
from anygen.data.shards import TokenShards
from anygen.data.tokenize import tokenize_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=240, help="shapes documents (default 240)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated; the first is the baseline")
    parser.add_argument("--workers", type=int, default=1, help="tokenize worker processes (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, default=Path(DEFAULT_MODEL_DIR),
                        help="a MultimodalTokenizer directory (default: the shipped model's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_shapes(root / "docs", num=args.num, seed=0, image_size=64, frames=9, holdout=0.1)
        seconds: dict[int, list[float]] = {b: [] for b in sizes}
        tokenize_documents(root / "docs" / "documents.jsonl", args.tokenizer, root / "warm-up", workers=args.workers,
                           batch_size=sizes[0], video_frames=9, limit=16, progress=False)  # untimed: first calls
        for r in range(args.repeats):
            for b in sizes:
                start = time.perf_counter()
                tokenize_documents(root / "docs" / "documents.jsonl", args.tokenizer, root / f"out{b}",
                                   workers=args.workers, batch_size=b, video_frames=9, overwrite=True,
                                   progress=False)
                seconds[b].append(time.perf_counter() - start)
        base = TokenShards(root / f"out{sizes[0]}")
        for b in sizes[1:]:
            other = TokenShards(root / f"out{b}")
            same = len(other) == len(base) and all(np.array_equal(base.ids(i), other.ids(i))
                                                   for i in range(len(base)))
            if not same:
                raise SystemExit(f"batch size {b} wrote other ids than batch size {sizes[0]}")
        docs = len(base)

    rows = []
    for b in sizes:
        median = statistics.median(seconds[b])
        rows.append({"batch_size": b, "workers": args.workers, "docs": docs, "seconds": median,
                     "docs_per_s": docs / median, "speedup": statistics.median(seconds[sizes[0]]) / median})
    print(f"{docs} shapes documents, {args.workers} worker(s), median of {args.repeats}; same ids at every batch size")
    print("| batch size | s | documents / s | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['seconds']:.1f} | {r['docs_per_s']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
