"""What inpainting costs: an edit drawn whole, inpainted one id a step, and inpainted with copied runs gathered.

    .venv/bin/python bench/inpaint.py [--checkpoint DIR] [--threads 2] [--num 16] [--repeats 3]

The eval's held-out edits (``anygen eval --categories edit``, seed 0) with the edited object's cell as the box
(``--inpaint layout``), at the engine's default sampling (guidance 3, image guidance 1.5: three rows a prompt),
one at a time (``--batch 1``, what the demo and ``anygen generate`` do) and as one batch of ``--num``. Three ways:

- whole: no inpaint, every code drawn (the baseline);
- stepped: ``generate(inpaint=box)`` with ``Generator(gather_forced=False)``, one forward pass per id;
- gathered: the default, a run of copied ids fed in one ``prefill``.

Median seconds of ``--repeats`` after a warm-up, and each as a ratio of whole in the same run; the shipped default
model by default.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from anygen.api import AnyGen
from anygen.cli_generate import default_checkpoint
from anygen.data.shapes import cell_box
from anygen.eval.harness import EvalContext, edit_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num", type=int, default=16, help="edits timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = args.checkpoint or default_checkpoint()
    if directory is None:
        raise SystemExit("no --checkpoint given and no default model ships with this install")
    engine = AnyGen.from_pretrained(directory)
    ctx = EvalContext(engine, num=args.num, seed=0)
    cases = edit_cases(ctx)
    prompts = [case.prompt(ctx.image_px[0]) for case in cases]
    boxes = [cell_box(case.before[case.target].position) for case in cases]
    h, w = ctx.image_tokens
    kw = dict(start_with="image", max_images=1, max_new_tokens=h * (w + 1) + 8, seed=0)

    def run(batch: int, inpaint: bool) -> None:
        for lo in range(0, len(prompts), batch):
            engine.generate(prompts[lo:lo + batch], inpaint=boxes[lo:lo + batch] if inpaint else None,
                            image_size=None if inpaint else (h, w), **kw)

    ways = {"whole": (True, False), "stepped": (False, True), "gathered": (True, True)}
    print(f"torch {torch.__version__}, {args.threads} threads; {args.num} edits of {h}x{w} codes, a cell redrawn "
          f"({directory})")
    print("| batch | way | s / edit | speed-up over whole |")
    print("|---|---|---|---|")
    for batch in (1, args.num):
        base = None
        for name, (gather, inpaint) in ways.items():
            engine.generator.gather_forced = gather
            run(batch, inpaint)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(batch, inpaint)
                times.append(time.perf_counter() - start)
            t = statistics.median(times) / args.num
            base = base or t
            print(f"| {batch} | {name} | {t:.3f} | {base / t:.2f} |", flush=True)
    engine.generator.gather_forced = True


if __name__ == "__main__":
    main()
