"""CPU generation throughput of anygen at the ``tiny`` and ``small`` shapes, and KV-cache bytes vs. the formula.

    .venv/bin/python bench/generate.py [--threads 2] [--tokens 256] [--repeats 3]

Random weights. One image of ``--image-size`` tokens after a short prompt, with and without
classifier-free guidance, through the whole ``Generator`` (grammar, sampling, events). Median of
``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anygen.testing import random_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=16, help="image side in tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    side = args.image_size
    span = 3 + side * (side + 1) + 1
    print(f"torch {torch.__version__}, {args.threads} threads; one {side}x{side}-token image ({span} tokens)")
    print("| preset | params | guidance | s / image | tokens / s | ms / step | KV bytes | formula |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in ("tiny", "small"):
        engine = random_engine(preset, max_height=max(side, 16), max_width=max(side, 16))
        cfg = engine.config
        params = engine.model.num_parameters()
        for scale in (1.0, 3.0):
            def run() -> None:
                engine.generate("a red circle at the top left", max_new_tokens=span, start_with="image",
                                image_size=(side, side), image={"guidance_scale": scale}, seed=0)

            run()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            rows, length = (2 if scale != 1.0 else 1), len(engine.encode_prompt("a red circle at the top left")) + span
            engine.model.setup_cache(rows, length)  # the size generate() used (it frees its cache when done)
            formula = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * length * rows * 4
            print(f"| {preset} | {params:,} | {scale} | {t:.2f} | {span / t:.0f} | {1000 * t / span:.2f} | "
                  f"{engine.model.cache_bytes():,} | {formula:,} |")
            engine.model.release_cache()


if __name__ == "__main__":
    main()
