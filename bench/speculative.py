"""Speculative Jacobi decoding on a trained model: forward passes saved, acceptance, wall time, quality kept.

    .venv/bin/python bench/speculative.py [--checkpoint DIR] [--prompts 16] [--windows 4 8 16] [--threads 2]

``bench/decode.py`` measures speculative decoding on random weights, where drafts are rarely accepted. This
harness asks the question that matters: on a *trained* checkpoint (default: the shipped default model),
how many forward passes does ``generate_speculative`` save per image, and what does that buy in wall time
against the plain sampling loop, in the same process, on the same prompts and seeds? It also checks that the
output is still right: every image goes through the classical detector (``anygen.eval.detect``) and the
share of images whose largest object matches the prompt's colour / shape / cell is reported per engine.
The two engines sample from the same distribution (the lossless rule), so those shares should agree up to
sampling noise; a gap means a bug.

Prompts are held-out single-object scenes (``anygen.eval.harness``'s split), the eval's sampling settings
(temperature 1, guidance 3, no top-k). Prints a markdown table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from anygen.api import AnyGen, GenerationOutput
from anygen.cli_generate import default_checkpoint
from anygen.data.shapes import SceneObject, holdout_combinations
from anygen.eval.detect import detect_objects
from anygen.generation.generator import GenerationSettings
from anygen.generation.sampling import SamplingConfig
from anygen.generation.speculative import generate_speculative

TEMPERATURE, GUIDANCE = 1.0, 3.0


def held_out_prompts(n: int, seed: int) -> list[SceneObject]:
    """``n`` single objects whose (colour, shape, cell) no training document drew (the eval's split)."""
    held, _ = holdout_combinations(0.1, 0)
    keys = sorted(held)
    random.Random(seed).shuffle(keys)
    return [SceneObject(shape=s, color=c, position=p) for c, s, p in (keys * (n // max(1, len(keys)) + 1))[:n]]


def right(image, obj: SceneObject) -> bool:
    dets = detect_objects(image)
    return bool(dets) and max(dets, key=lambda d: d.area).key == obj.key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="an AnyGen directory (default: the shipped model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = args.checkpoint or default_checkpoint()
    engine = AnyGen.from_pretrained(directory, device="cpu")
    grid = tuple(engine.tokenizer.image_grid)
    objects = held_out_prompts(args.prompts, args.seed)
    prompts = [engine.encode_prompt(obj.describe()) for obj in objects]
    visual = SamplingConfig(TEMPERATURE, 0, 1.0, GUIDANCE)

    def settings(seed: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=grid[0] * (grid[1] + 1) + 8, start_with="image", max_images=1,
                                  image_size=grid, seed=seed, image=visual)

    def plain(i: int):
        out = engine.generate(prompts[i], start_with="image", max_images=1, image_size=grid,
                              max_new_tokens=grid[0] * (grid[1] + 1) + 8, seed=args.seed + i,
                              image={"temperature": TEMPERATURE, "guidance_scale": GUIDANCE})
        return out.images[0], None

    def speculative(window: int):
        def run(i: int):
            (row,), stats = generate_speculative(engine.generator, [prompts[i]], settings(args.seed + i), window=window)
            return GenerationOutput(row.segments, row.ids, row.reason).images[0], stats
        return run

    engines = [("plain (fast loop, eager)", plain)] + [(f"speculative, window {w}", speculative(w))
                                                       for w in args.windows]
    plain(0)  # warm-up: first-call allocations out of the timing
    rows, report = [], {"checkpoint": str(directory), "grid": grid, "prompts": args.prompts,
                        "torch": torch.__version__, "threads": args.threads, "engines": {}}
    for name, fn in engines:
        times, forwards, plain_forwards, drafted, accepted, good = [], [], 0, 0, 0, 0
        for i, obj in enumerate(objects):
            t0 = time.perf_counter()
            image, stats = fn(i)
            times.append(time.perf_counter() - t0)
            good += right(image, obj)
            if stats is not None:
                forwards.append(stats.forwards)
                plain_forwards, drafted, accepted = stats.plain_forwards, drafted + stats.drafted, \
                    accepted + stats.accepted
        entry = {"s_per_image": statistics.median(times), "right": good / len(objects)}
        if forwards:
            entry.update(forwards=statistics.mean(forwards), plain_forwards=plain_forwards,
                         acceptance=accepted / max(1, drafted))
        report["engines"][name] = entry
        rows.append((name, entry))
    base = report["engines"][engines[0][0]]["s_per_image"]
    print(f"{directory}: {args.prompts} held-out prompts, {grid[0]}x{grid[1]} image tokens, temperature "
          f"{TEMPERATURE}, guidance {GUIDANCE}; torch {torch.__version__}, {args.threads} threads")
    print("| engine | forward passes / image | saved | drafts accepted | s / image | vs plain | detector: right |")
    print("|---|---|---|---|---|---|---|")
    for name, e in rows:
        fw = f"{e['forwards']:.1f} of {e['plain_forwards']}" if "forwards" in e else "—"
        saved = f"{1 - e['forwards'] / e['plain_forwards']:.0%}" if "forwards" in e else "—"
        acc = f"{e['acceptance']:.0%}" if "acceptance" in e else "—"
        print(f"| {name} | {fw} | {saved} | {acc} | {e['s_per_image']:.3f} | {base / e['s_per_image']:.2f}x "
              f"| {e['right']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
