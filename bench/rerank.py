"""Text → image best-of-N: how much the model's own reranker leaves on the table.

    .venv/bin/python bench/rerank.py                                           # the default model, two objects
    .venv/bin/python bench/rerank.py --category t2i_single --num 40 --candidates 16 --json bench/rerank.json

``generate(best_of=N)`` draws N images a text → image prompt and keeps the one under which the understanding
path finds the prompt most likely. Whether that can help is two questions: does the model draw a right image
among its N at all (the ceiling), and does its reranker find it. This measures both on ``anygen eval``'s held-out
prompts (``t2i_pair``: a held-out object and a second one; ``t2i_single``: one held-out object), every candidate
judged by the eval's detector (``detect_objects``: the scene exactly right), for every k up to N (the first k
candidates of each prompt):

- ``one draw``: the mean over candidates, the baseline (what ``generate`` without ``best_of`` scores);
- ``oracle``: some candidate of the k is right (pass@k), the most any reranker could reach;
- ``understanding``: the candidate with the highest ``AnyGen.score([Understand(image)], prompt)``, what
  ``generate(best_of=k)`` keeps;
- ``likelihood``: the highest ``score_image(prompt, image)``, the generation path's own log-probability of the
  image's codes;
- ``pmi``: the highest ``score_image(prompt, image) - score_image(<|bos|><|null|>, image)``, the likelihood
  against the unconditional context classifier-free guidance draws with (the implicit classifier);
- ``contrast`` (with ``--negatives``): the highest understanding score of the prompt against its negatives, every
  caption one attribute of one object away (``scene_negatives``): ``s(prompt) - logsumexp(s(prompt), s(negative),
  ...)``, what ``generate(best_of=k, negatives=...)`` keeps.

Every figure is a fraction of prompts; the ratio column is the understanding reranker against one draw, measured
on the same candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anygen.api import AnyGen  # noqa: E402
from anygen.cli_generate import default_checkpoint  # noqa: E402
from anygen.data.shapes import COLORS, POSITIONS, SHAPES, caption  # noqa: E402
from anygen.eval.harness import EvalContext, eval_sampling, judge_scene, t2i_scenes  # noqa: E402
from tokenizers_mm.multimodal import TokenSequence  # noqa: E402
from tokenizers_mm.segments import Understand  # noqa: E402
from tokenizers_mm.vocab import Modality  # noqa: E402

CATEGORIES = ("t2i_pair", "t2i_single")
RERANKERS: dict[str, Callable[[dict[str, Any]], float]] = {
    "understanding": lambda c: c["und"],
    "likelihood": lambda c: c["gen"],
    "pmi": lambda c: c["gen"] - c["unc"],
    "contrast": lambda c: c["con"],  # only with --negatives
}


def scene_negatives(scene: Sequence[Any]) -> list[str]:
    """The captions of every scene one attribute of one object away from ``scene`` (another colour, shape or free
    cell), each once: the confusions a text → image draw makes, as ``generate(negatives=...)`` takes them."""
    taken = {o.position for o in scene}
    out = []
    for i, obj in enumerate(scene):
        changes = ([replace(obj, color=c) for c in COLORS if c != obj.color]
                   + [replace(obj, shape=s) for s in SHAPES if s != obj.shape]
                   + [replace(obj, position=p) for p in POSITIONS if p not in taken])
        out += [caption([*scene[:i], other, *scene[i + 1:]]) for other in changes]
    return [text for text in dict.fromkeys(out) if text != caption(scene)]


def summarize(rows: Sequence[Sequence[dict[str, Any]]], ks: Sequence[int]) -> list[dict[str, float]]:
    """One line per k: the fraction of prompts right with one draw (the mean over the first k candidates), with an
    oracle, and with each reranker of ``RERANKERS`` choosing among the first k (ties keep the earlier candidate).

    Each row is one prompt's candidates, each a dict with ``correct`` and the scores ``und`` / ``gen`` / ``unc``
    (a candidate that drew no image is left out of its row); a prompt with no candidate counts as wrong.
    """
    if not rows:
        raise ValueError("summarize needs at least one prompt's candidates")
    names = [n for n in RERANKERS if n != "contrast" or any("con" in c for row in rows for c in row)]
    lines = []
    for k in ks:
        heads = [list(row[:k]) for row in rows]
        line = {"k": k,
                "one_draw": sum(sum(c["correct"] for c in h) / len(h) if h else 0.0 for h in heads) / len(heads),
                "oracle": sum(any(c["correct"] for c in h) for h in heads) / len(heads)}
        for name in names:
            key = RERANKERS[name]
            line[name] = sum(bool(h) and max(h, key=key)["correct"] for h in heads) / len(heads)
        lines.append(line)
    return lines


@torch.no_grad()
def draw_and_score(engine: AnyGen, ctx: EvalContext, scenes: list[list[Any]], candidates: int,
                   progress: bool = True, negatives: bool = False) -> list[list[dict[str, Any]]]:
    """``candidates`` images a scene's caption (eval sampling, a seed per prompt), each judged and scored; with
    ``negatives`` also contrasted with the scene's ``scene_negatives``."""
    h, w = ctx.image_tokens
    v = engine.tokenizer.vocab
    unconditional = TokenSequence(ids=torch.tensor([v.bos, v.null]),
                                  modality=torch.tensor([Modality.TEXT, Modality.TEXT]))
    rows, started = [], time.perf_counter()
    for i, scene in enumerate(scenes):
        prompt = caption(scene)
        outputs = engine.generate([prompt] * candidates, seed=ctx.seed * 100_000 + i, start_with="image",
                                  image_size=(h, w), max_images=1, max_new_tokens=h * (w + 1) + 8, **ctx.sampling)
        images = [o.images[0] for o in outputs if o.images]
        und = engine.score([[Understand(im)] for im in images], [prompt] * len(images)) if images else []
        gen = engine.score_image([prompt] * len(images), images) if images else []
        unc = engine.score_image([unconditional] * len(images), images) if images else []
        rows.append([{"correct": judge_scene(scene, im)["correct"], "und": a, "gen": b, "unc": c}
                     for im, a, b, c in zip(images, und, gen, unc)])
        if negatives and images:  # the ranking generate(best_of, negatives=...) keeps
            for cand, value in zip(rows[-1], engine.score_candidates(images, prompt, scene_negatives(scene))):
                cand["con"] = value
        if progress:
            right = sum(c["correct"] for c in rows[-1])
            print(f"  prompt {i + 1}/{len(scenes)}: {right}/{candidates} right, {time.perf_counter() - started:.0f} s "
                  f"({prompt!r})", file=sys.stderr, flush=True)
    return rows


def table(lines: list[dict[str, float]]) -> str:
    cols = ["one_draw", "oracle", *[n for n in RERANKERS if n in lines[0]]]
    out = ["| k | " + " | ".join(c.replace("_", " ") for c in cols) + " | understanding / one draw |",
           "|---|" + "---|" * (len(cols) + 1)]
    for line in lines:
        ratio = f"{line['understanding'] / line['one_draw']:.2f}x" if line["one_draw"] else "–"
        out.append(f"| {line['k']} | " + " | ".join(f"{100 * line[c]:.1f} %" for c in cols) + f" | {ratio} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a model directory (default: the shipped model)")
    parser.add_argument("--category", default="t2i_pair", choices=CATEGORIES)
    parser.add_argument("--num", type=int, default=40, help="held-out prompts (anygen eval's, in its order)")
    parser.add_argument("--candidates", type=int, default=16, help="images drawn a prompt (N)")
    parser.add_argument("--seed", type=int, default=0, help="anygen eval's prompt seed")
    parser.add_argument("--negatives", action="store_true",
                        help="add the contrast reranker: the prompt against every caption one attribute away "
                             "(slower: each candidate is read once per negative)")
    parser.add_argument("--json", default=None, help="also write the table and every candidate's scores here")
    args = parser.parse_args(argv)
    if args.num < 1 or args.candidates < 1:
        parser.error(f"--num and --candidates must be >= 1, got {args.num} and {args.candidates}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if checkpoint is None:
        parser.error("no --checkpoint given and no default model is installed (anygen/assets/default)")
    engine = AnyGen.from_pretrained(checkpoint)
    if engine.tokenizer.image is None or engine.tokenizer.und_tokens <= 0 or engine.model.und is None:
        parser.error(f"{checkpoint} needs an image tokenizer and an understanding encoder (the reranker reads "
                     "each image through it)")
    ctx = EvalContext(engine, num=args.num, seed=args.seed, sampling=eval_sampling(defaults=engine.sampling_defaults))
    rows = draw_and_score(engine, ctx, t2i_scenes(ctx, args.category), args.candidates, negatives=args.negatives)
    ks = sorted({2 ** p for p in range(args.candidates.bit_length())} | {args.candidates})  # 1, 2, 4, …, N
    lines = summarize(rows, ks)
    print(f"{args.category}, {args.num} held-out prompts (seed {args.seed}), {args.candidates} candidates each, "
          f"{checkpoint}")
    print(table(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"category": args.category, "num": args.num, "seed": args.seed,
                                               "candidates": args.candidates, "checkpoint": str(checkpoint),
                                               "table": lines, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
