"""``anygen eval``: judge a checkpoint on held-out prompts with rules, not with another model.

::

    anygen eval [--checkpoint DIR] [--out DIR] [--num N] [--seed S] [--categories t2i_single,video]

What this package owns:

* ``detect``: the deterministic detector of shape, colour and position (colour thresholds in RGB,
  connected components, fill ratio, centroid on the 3×3 grid) and the motion-direction tracker;
* ``digits``: the SVM digit classifier fitted on scikit-learn's digits training split, with its own
  held-out accuracy;
* ``metrics``: tokenizer PSNR / SSIM (torchmetrics) on held-out shapes, bundled photos and a real clip;
* ``harness``: the categories (text→image single and pair, captions, video, digits, editing, story,
  tokenizer), prompts from the held-out attribute combinations, the table and the JSON.

Without ``--checkpoint`` the default model (``anygen/assets/default``) is evaluated, as by
``anygen generate``; ``--random-tiny`` evaluates the tiny random engine (plumbing only, scores ~0).
Writes ``OUT/eval.json`` (every score, every sample) and ``OUT/images/`` (the generated images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = Path("outputs/eval")


def build_parser() -> argparse.ArgumentParser:
    from anygen.eval.harness import CANVASES, CATEGORIES, INPAINTS, REGIONS, RERANKERS

    p = argparse.ArgumentParser(prog="anygen eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: the default model)")
    p.add_argument("--random-tiny", action="store_true", help="evaluate the tiny random engine (plumbing only)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--num", type=int, default=50, help="prompts per category (default 50)")
    p.add_argument("--seed", type=int, default=0, help="prompt and sampling seed (default 0)")
    p.add_argument("--categories", default=",".join(CATEGORIES),
                   help=f"comma-separated subset of {','.join(CATEGORIES)} (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="held-out fraction the shapes data was written with (default 0.1)")
    p.add_argument("--data-seed", type=int, default=0, help="seed the shapes data was written with (default 0)")
    p.add_argument("--temperature", type=float, default=None,
                   help="image sampling temperature (default: the checkpoint's; the library's 0.5)")
    p.add_argument("--video-temperature", type=float, default=None,
                   help="video sampling temperature (default: the checkpoint's; the library's 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="image / video top-k (default 0: off)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="image CFG scale (default: the checkpoint's; the library's 3)")
    p.add_argument("--image-guidance-scale", type=float, default=None,
                   help="image guidance of prompts that hold an image (edits, the story's second picture): the "
                        "source's weight against the empty context, InstructPix2Pix's (default: the checkpoint's)")
    p.add_argument("--guidance-start", type=float, default=None,
                   help="the fraction of each image's codes drawn before guidance turns on (its top rows; default: "
                        "the checkpoint's, the library's 0: every code guided)")
    p.add_argument("--video-guidance-scale", type=float, default=None,
                   help="video CFG scale (default: the checkpoint's; the library's 1: guidance hurts held-out motions)")
    p.add_argument("--best-of", type=int, default=1,
                   help="self-reranking: text→image prompts (t2i_single, t2i_pair, digits) draw N images each and "
                        "keep the one the model's understanding path scores best; captions draw N (the greedy one and "
                        "N-1 sampled) and keep the one under which the generation path finds the image most likely; "
                        "video draws N clips and keeps the one whose reading most favours its prompt over the same "
                        "motion in the other three directions (negatives); inpainted edits (--inpaint) draw N and keep "
                        "the one read back best as the planned edited scene (default 1: no reranking)")
    p.add_argument("--rerank", choices=RERANKERS, default=RERANKERS[0],
                   help="with --best-of: how text → image prompts and inpainted edits read each drawn image back: "
                        "'understanding' (the default), the prompt's likelihood after the image read by the "
                        "understanding encoder; 'likelihood', the generation path's log-probability of the image's VQ "
                        "codes after the prompt (generate(rerank=...)); captions and clips keep their one reader")
    p.add_argument("--video-negative", choices=("none", "opposite"), default="none",
                   help="the video row's negative prompt: 'opposite' guides each clip away from the same object moving "
                        "the opposite way (\"... moves down\" for \"... moves up\"); needs --video-guidance-scale, "
                        "e.g. 2 (default none: guidance, if any, against the empty context)")
    p.add_argument("--regions", choices=REGIONS, default="none",
                   help="text → image rows (t2i_single, t2i_pair) and the story's pictures with regional "
                        "prompting: 'layout' draws each object's own caption over its grid cell (the layout a planner "
                        "would give; generate(regions=...)) (default none: the prompt alone); with --inpaint, an "
                        "edit's redrawn cell gets the edited object's caption")
    p.add_argument("--inpaint", choices=INPAINTS, default="none",
                   help="masked editing (generate(inpaint=...)): edits redraw only the edited object's cell and copy "
                        "the rest, the story's second picture only the added object's cell; the edit's cell is the "
                        "source scene's ('layout', the box a user would draw) or the model's own answer to \"where is "
                        "<the object>?\" ('asked') (default none: the whole picture drawn)")
    p.add_argument("--canvas", choices=CANVASES, default="none",
                   help="with --regions layout: 'blank' composes the text → image rows and the story's first picture "
                        "onto an empty scene, each object drawn alone, its cell grown by a quarter cell "
                        "(generate(canvas=...)); with --inpaint as well, an edit's object and the story's added one "
                        "are drawn alone onto an empty scene and put into their cell (default none: the regions drawn "
                        "in one pass)")
    p.add_argument("--no-images", action="store_true", help="do not write the generated images")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anygen eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"anygen eval: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from anygen.cli_generate import load_engine
    from anygen.eval.harness import EvalContext, eval_sampling, format_table, run_eval

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.best_of < 1:
        raise ValueError(f"--best-of must be >= 1 (1: no reranking), got {args.best_of}")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    started = time.perf_counter()
    engine = load_engine(args.checkpoint, args.random_tiny, args.device)
    images_dir = args.out / "images"

    def keep(category: str, index: int, name: str, image) -> None:
        folder = images_dir / category
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}_{name}.png")

    ctx = EvalContext(engine, num=args.num, seed=args.seed, batch_size=args.batch_size, holdout=args.holdout,
                      data_seed=args.data_seed,
                      sampling=eval_sampling(args.temperature, args.top_k, args.guidance_scale,
                                             args.video_guidance_scale, args.video_temperature,
                                             engine.sampling_defaults, args.image_guidance_scale,
                                             args.guidance_start),
                      keep_images=None if args.no_images else keep, best_of=args.best_of,
                      video_negative=args.video_negative, regions=args.regions, inpaint=args.inpaint,
                      canvas=args.canvas, rerank=args.rerank)

    if args.video_negative != "none" and "video" in categories and ctx.sampling["video"]["guidance_scale"] == 1.0:
        raise ValueError("--video-negative steers video guidance, which is off (scale 1): add --video-guidance-scale, "
                         "e.g. 2")

    def progress(result) -> None:
        print(f"  {result.name}: {result.metric} = {result.score:.4f} ({result.num} prompts, {result.seconds:.1f} s)",
              file=sys.stderr, flush=True)

    results = run_eval(ctx, categories, progress)
    table = format_table(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(args.checkpoint) if args.checkpoint else ("random-tiny" if args.random_tiny else "default"),
        "num": args.num, "seed": args.seed, "holdout": args.holdout, "data_seed": args.data_seed,
        "best_of": args.best_of, "video_negative": args.video_negative, "regions": args.regions,
        "inpaint": args.inpaint, "canvas": args.canvas, "rerank": args.rerank, "sampling": ctx.sampling,
        "image_tokens": ctx.image_tokens,
        "video_tokens": ctx.video_tokens,
        "seconds": round(time.perf_counter() - started, 2),
        "categories": {name: r.to_dict() for name, r in results.items()},
        "table": table,
    }
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'eval.json'}")
    return 0


__all__ = ["main"]
