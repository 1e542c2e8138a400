"""Image best-of-N: how much the model's own reranker leaves on the table.

    .venv/bin/python bench/rerank.py                                           # the default model, two objects
    .venv/bin/python bench/rerank.py --category t2i_single --num 40 --candidates 16 --json bench/rerank.json
    .venv/bin/python bench/rerank.py --category edit --candidates 8            # edits: oracle and consensus only

``generate(best_of=N)`` draws N images a text → image prompt and keeps the one under which the understanding
path finds the prompt most likely. Whether that can help is two questions: does the model draw a right image
among its N at all (the ceiling), and does its reranker find it. This measures both on ``anygen eval``'s held-out
prompts (``t2i_pair``: a held-out object and a second one; ``t2i_single``: one held-out object; ``edit``: a
held-out scene with one object to recolour, drawn with the eval's image guidance), every candidate judged by the
eval's detector (``detect_objects``: the scene exactly right), for every k up to N (the first k candidates of each
prompt):

- ``one draw``: the mean over candidates, the baseline (what ``generate`` without ``best_of`` scores);
- ``oracle``: some candidate of the k is right (pass@k), the most any reranker could reach;
- ``understanding``: the candidate with the highest ``AnyGen.score([Understand(image)], prompt)``, what
  ``generate(best_of=k)`` keeps;
- ``likelihood``: the highest ``score_image(prompt, image)``, the generation path's own log-probability of the
  image's codes as drawn, what ``generate(best_of=k, rerank="likelihood")`` keeps;
- ``pmi``: the highest ``score_image(prompt, image) - score_image(<|bos|><|null|>, image)``, the likelihood
  against the unconditional context classifier-free guidance draws with (the implicit classifier);
- ``contrast`` (with ``--negatives``): the highest understanding score of the prompt against its negatives, every
  caption one attribute of one object away (``scene_negatives``): ``s(prompt) - logsumexp(s(prompt), s(negative),
  ...)``, what ``generate(best_of=k, negatives=...)`` keeps;
- ``shape contrast`` (with ``--shape-negatives``): the highest ``score_image(prompt, image) - logsumexp`` over the
  prompt and every caption with one object's shape swapped (the generation path as a classifier of the shapes it
  could have drawn), what ``generate(best_of=k, rerank="likelihood", negatives=...)`` keeps with those negatives;
- ``shape-checked likelihood`` (with ``--shape-negatives``): the highest ``score_image(prompt, image)`` among the
  candidates whose codes the prompt explains better than any shape-swapped caption (all of them when none does):
  typicality, after the classifier;
- ``consensus``: minimum-Bayes-risk selection, the candidate whose pixels agree most with the other k − 1 (the
  sum of ``-mean |a − b|`` over RGB in [0, 1]): the mode of the draws, with no reader at all;
- ``nearest source`` (edits only): the candidate whose pixels are closest to the picture it edits (the least
  change).

An edit's prompt holds no text that names its scene, so the text-reading rerankers (understanding, likelihood,
pmi, contrast) apply to the text → image categories only. Every figure is a fraction of prompts; the ratio column
is the first reranker of the table against one draw, measured on the same candidates.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anygen.api import AnyGen  # noqa: E402
from anygen.cli_generate import default_checkpoint  # noqa: E402
from anygen.data.shapes import COLORS, POSITIONS, SHAPES, caption  # noqa: E402
from anygen.eval.harness import (  # noqa: E402
    EvalContext,
    edit_cases,
    eval_sampling,
    judge_edit,
    judge_scene,
    t2i_scenes,
)
from tokenizers_mm.multimodal import TokenSequence  # noqa: E402
from tokenizers_mm.segments import Image, Understand  # noqa: E402
from tokenizers_mm.vocab import Modality  # noqa: E402

CATEGORIES = ("t2i_pair", "t2i_single", "edit")
Pick = Callable[[Sequence[dict[str, Any]]], int]


def best(score: Callable[[dict[str, Any]], float]) -> Pick:
    """The reranker keeping the candidate of highest ``score`` (ties keep the earlier)."""
    return lambda head: max(range(len(head)), key=lambda i: score(head[i]))


def consensus_pick(head: Sequence[dict[str, Any]]) -> int:
    """The candidate whose summed agreement with the others of ``head`` is largest (ties keep the earlier): each
    candidate's ``sim`` lists its agreement with every candidate of its row, in order, and ``head`` starts the row."""
    return max(range(len(head)), key=lambda i: sum(head[i]["sim"][j] for j in range(len(head)) if j != i))


def checked_pick(head: Sequence[dict[str, Any]]) -> int:
    """The highest ``gen`` among the candidates of ``head`` whose ``gen`` beats each of their ``gneg`` (the
    prompt's shapes read as more likely than any swapped one); the highest ``gen`` overall when none does."""
    kept = [i for i, c in enumerate(head) if all(c["gen"] > g for g in c["gneg"])] or list(range(len(head)))
    return max(kept, key=lambda i: head[i]["gen"])


# name -> (the candidate key it reads: its column appears when some candidate carries it, the index it keeps)
RERANKERS: dict[str, tuple[str, Pick]] = {
    "understanding": ("und", best(lambda c: c["und"])),
    "likelihood": ("gen", best(lambda c: c["gen"])),
    "pmi": ("unc", best(lambda c: c["gen"] - c["unc"])),
    "contrast": ("con", best(lambda c: c["con"])),  # only with --negatives
    "shape contrast": ("gneg", best(lambda c: c["gen"] - float(torch.tensor([c["gen"], *c["gneg"]]).logsumexp(0)))),
    "shape-checked likelihood": ("gneg", checked_pick),
    "consensus": ("sim", consensus_pick),
    "nearest source": ("src", best(lambda c: c["src"])),  # edits
}


def shape_negatives(scene: Sequence[Any]) -> list[str]:
    """The captions of ``scene`` with one object's shape swapped for each other shape: the confusion (a square
    drawn round) the model's one-object misses are nearly all of."""
    return [caption([*scene[:i], replace(obj, shape=s), *scene[i + 1:]])
            for i, obj in enumerate(scene) for s in SHAPES if s != obj.shape]


def pixel_agreement(images: Sequence[Any]) -> torch.Tensor:
    """``(n, n)``: ``-mean |a − b|`` between every two of ``images`` (PIL, one size), RGB scaled to [0, 1]."""
    px = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).flatten()
                      for im in images])
    return -torch.cdist(px, px, p=1) / px.shape[1]


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

    Each row is one prompt's candidates, each a dict with ``correct`` and the scores a reranker reads (``und`` /
    ``gen`` / ``unc`` / ``con`` / ``src``, and ``sim``: its agreement with every candidate of the row, in order;
    a candidate that drew no image is left out of its row); a prompt with no candidate counts as wrong. A
    reranker's column appears when some candidate carries its key.
    """
    if not rows:
        raise ValueError("summarize needs at least one prompt's candidates")
    names = [n for n, (need, _) in RERANKERS.items() if any(need in c for row in rows for c in row)]
    lines = []
    for k in ks:
        heads = [list(row[:k]) for row in rows]
        line = {"k": k,
                "one_draw": sum(sum(c["correct"] for c in h) / len(h) if h else 0.0 for h in heads) / len(heads),
                "oracle": sum(any(c["correct"] for c in h) for h in heads) / len(heads)}
        for name in names:
            pick = RERANKERS[name][1]
            line[name] = sum(bool(h) and h[pick(h)]["correct"] for h in heads) / len(heads)
        lines.append(line)
    return lines


@torch.no_grad()
def draw_and_score(engine: AnyGen, ctx: EvalContext, category: str, candidates: int, progress: bool = True,
                   negatives: bool = False, shapes: bool = False) -> list[list[dict[str, Any]]]:
    """``candidates`` images for each of ``category``'s held-out prompts (eval sampling, a seed per prompt), each
    judged and scored; with ``negatives`` (text → image) also contrasted with the scene's ``scene_negatives``, with
    ``shapes`` also scored by the drawing path after each of its ``shape_negatives``."""
    h, w = ctx.image_tokens
    v = engine.tokenizer.vocab
    unconditional = TokenSequence(ids=torch.tensor([v.bos, v.null]),
                                  modality=torch.tensor([Modality.TEXT, Modality.TEXT]))
    edits = category == "edit"
    cases = edit_cases(ctx) if edits else t2i_scenes(ctx, category)
    rows, started = [], time.perf_counter()
    for i, case in enumerate(cases):
        if edits:
            prompt, label = case.prompt(ctx.image_px[0]), case.instruction
            source = prompt[0].image
        else:
            prompt = label = caption(case)
        outputs = engine.generate([prompt] * candidates, seed=ctx.seed * 100_000 + i, start_with="image",
                                  image_size=(h, w), max_images=1, max_new_tokens=h * (w + 1) + 8, **ctx.sampling)
        drawn = [next(s for s in o.segments if isinstance(s, Image) and s.image is not None)
                 for o in outputs if o.images]
        images = [seg.image for seg in drawn]
        if edits:
            near = pixel_agreement([source, *images])[0, 1:].tolist() if images else []
            row = [{"correct": judge_edit(case, im)["correct"], "src": s} for im, s in zip(images, near)]
        else:
            und = engine.score([[Understand(im)] for im in images], [prompt] * len(images)) if images else []
            gen = engine.score_image([prompt] * len(drawn), drawn) if drawn else []  # the codes as drawn, as
            unc = engine.score_image([unconditional] * len(drawn), drawn) if drawn else []  # rerank="likelihood"
            row = [{"correct": judge_scene(case, im)["correct"], "und": a, "gen": b, "unc": c}
                   for im, a, b, c in zip(images, und, gen, unc)]
            if shapes and drawn:
                swapped = shape_negatives(case)
                flat = engine.score_image([t for _ in drawn for t in swapped], [d for d in drawn for _ in swapped])
                for j, cand in enumerate(row):
                    cand["gneg"] = flat[j * len(swapped):(j + 1) * len(swapped)]
            if negatives and images:  # the ranking generate(best_of, negatives=...) keeps
                for cand, value in zip(row, engine.score_candidates(images, prompt, scene_negatives(case))):
                    cand["con"] = value
        if images:
            for cand, sims in zip(row, pixel_agreement(images).tolist()):
                cand["sim"] = sims
        rows.append(row)
        if progress:
            right = sum(c["correct"] for c in row)
            print(f"  prompt {i + 1}/{len(cases)}: {right}/{candidates} right, {time.perf_counter() - started:.0f} s "
                  f"({label!r})", file=sys.stderr, flush=True)
    return rows


def table(lines: list[dict[str, float]]) -> str:
    rerankers = [n for n in RERANKERS if n in lines[0]]
    cols = ["one_draw", "oracle", *rerankers]
    first = rerankers[0] if rerankers else "oracle"
    out = ["| k | " + " | ".join(c.replace("_", " ") for c in cols) + f" | {first} / one draw |",
           "|---|" + "---|" * (len(cols) + 1)]
    for line in lines:
        ratio = f"{line[first] / line['one_draw']:.2f}x" if line["one_draw"] else "–"
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
                             "(slower: each candidate is read once per negative; text → image categories only)")
    parser.add_argument("--shape-negatives", action="store_true",
                        help="add the shape contrast and shape-checked likelihood rerankers: each candidate's codes "
                             "also scored by the drawing path after every caption with one shape swapped")
    parser.add_argument("--json", default=None, help="also write the table and every candidate's scores here")
    args = parser.parse_args(argv)
    if args.num < 1 or args.candidates < 1:
        parser.error(f"--num and --candidates must be >= 1, got {args.num} and {args.candidates}")
    if (args.negatives or args.shape_negatives) and args.category == "edit":
        parser.error("--negatives and --shape-negatives contrast a caption with its neighbours; an edit's prompt has "
                     "no caption of its scene (use them with t2i_pair or t2i_single)")
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if checkpoint is None:
        parser.error("no --checkpoint given and no default model is installed (anygen/assets/default)")
    engine = AnyGen.from_pretrained(checkpoint)
    if engine.tokenizer.image is None:
        parser.error(f"{checkpoint} has no image tokenizer: it draws no images to rerank")
    if args.category != "edit" and (engine.tokenizer.und_tokens <= 0 or engine.model.und is None):
        parser.error(f"{checkpoint} needs an understanding encoder for {args.category} (the understanding reranker "
                     "reads each image through it); --category edit does without")
    ctx = EvalContext(engine, num=args.num, seed=args.seed, sampling=eval_sampling(defaults=engine.sampling_defaults))
    rows = draw_and_score(engine, ctx, args.category, args.candidates, negatives=args.negatives,
                          shapes=args.shape_negatives)
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
