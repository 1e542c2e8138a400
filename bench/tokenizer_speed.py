"""CPU throughput of the default tokenizer configs: parameters, encode / decode speed, tokens per item.

    .venv/bin/python bench/tokenizer_speed.py [--threads 2] [--repeats 5] [--json out.json]

Images at 256×256 (batch 8), clips of 17×128×128 (batch 1); median of ``--repeats`` timed runs after
one warm-up. Prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    image = ImageTokenizer(ImageTokenizerConfig.default()).eval()
    x = torch.rand(8, 3, 256, 256) * 2 - 1
    codes = image.encode(x)
    enc = _median_seconds(lambda: image.encode(x), args.repeats)
    dec = _median_seconds(lambda: image.decode(codes), args.repeats)
    rows.append({"tokenizer": "image (default)", "params": sum(p.numel() for p in image.parameters()),
                 "input": "8 x 256x256", "tokens_per_item": int(codes[0].numel()),
                 "encode_per_s": 8 / enc, "decode_per_s": 8 / dec, "unit": "images"})

    video = VideoTokenizer(VideoTokenizerConfig.default()).eval()
    clip = torch.rand(1, 3, 17, 128, 128) * 2 - 1
    vcodes = video.encode(clip)
    enc = _median_seconds(lambda: video.encode(clip), args.repeats)
    dec = _median_seconds(lambda: video.decode(vcodes), args.repeats)
    rows.append({"tokenizer": "video (default)", "params": sum(p.numel() for p in video.parameters()),
                 "input": "1 x 17x128x128", "tokens_per_item": int(vcodes[0].numel()),
                 "encode_per_s": 17 / enc, "decode_per_s": 17 / dec, "unit": "frames"})

    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| tokenizer | params | input | tokens / item | encode / s | decode / s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['params']:,} | {r['input']} | {r['tokens_per_item']} | "
              f"{r['encode_per_s']:.1f} {r['unit']} | {r['decode_per_s']:.1f} {r['unit']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
