"""``anygen generate``: prompts in, text / PNG / MP4 files out.

One prompt from the command line, or many from a JSONL file (``--prompts``: one JSON object a line,
``{"prompt": str, "images": [paths], "understand": [paths], "inpaint": [[x0, y0, x1, y1]], "canvas": path}``, or a
bare JSON string) run in batches with a progress bar. Each prompt gets a folder ``OUT/NNNN/`` with ``text.txt``,
``image_K.png`` and ``video_K.mp4``; every written path is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from anygen.api import RERANKERS
from anygen.generation.generator import MODALITIES
from anygen.generation.sampling import SamplingConfig

DEFAULT_CHECKPOINT_HINT = "pass --checkpoint DIR (a directory written by save_pretrained / anygen export)"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"  # the shipped default model


def default_checkpoint() -> Path | None:
    """The shipped default model's directory, or ``None`` when this install holds no trained weights."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "model.safetensors").is_file() else None


def _size(text: str, n: int, name: str) -> tuple[int, ...]:
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
        shape = "HxW" if n == 2 else "TxHxW"
        raise argparse.ArgumentTypeError(f"{name} must be {shape} in tokens, e.g. {'16x16' if n == 2 else '2x8x8'}; "
                                         f"got {text!r}")
    return tuple(int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anygen generate", description="Generate interleaved text, images and video.")
    p.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts FILE.jsonl); may be left out when "
                   "--understand / --image give a picture (a caption: the picture alone, as captions were trained)")
    p.add_argument("--prompts", type=Path, help="JSONL file of prompts, run in batches")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory")
    p.add_argument("--random-tiny", action="store_true", help="use a tiny random engine (for trying the plumbing)")
    p.add_argument("--image", action="append", default=[], type=Path, metavar="PATH",
                   help="image given as VQ context, before the prompt text (editing); repeatable")
    p.add_argument("--understand", action="append", default=[], type=Path, metavar="PATH",
                   help="image read by the understanding encoder (captioning, questions); repeatable")
    p.add_argument("--out", type=Path, default=Path("outputs/generate"), help="output directory")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-images", type=int, default=0, help="stop after this many images + videos (0: no limit)")
    p.add_argument("--start-with", choices=("image", "video"), help="force the output to open with an image / video")
    p.add_argument("--image-size", type=lambda t: _size(t, 2, "--image-size"),
                   help="HxW in tokens (default: the tokenizer's image size, the one the model trained on)")
    p.add_argument("--video-size", type=lambda t: _size(t, 3, "--video-size"),
                   help="TxHxW in tokens (default with --start-with video: the clip size the model trained on, where "
                        "its tokenizer records one)")
    p.add_argument("--speculative", type=int, default=0, metavar="WINDOW",
                   help="opt-in speculative Jacobi decoding of the --start-with span, WINDOW ids per forward pass "
                        "(same distribution, fewer passes; top-k and top-p stay off; default 0: off)")
    p.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="self-reranking. text→image (--start-with image, text prompts): draw N images per prompt and "
                        "keep the one the model's understanding path scores best (or, --rerank likelihood, its "
                        "drawing path); image→text (no --start-with, one "
                        "--understand or --image picture): draw N replies and keep the one under which the generation "
                        "path finds the picture most likely; text→video (--start-with video) needs --negative "
                        "(default 1: off)")
    p.add_argument("--rerank", choices=RERANKERS, default=RERANKERS[0],
                   help="with --best-of for text→image: how each drawn image is read back: 'understanding' (the "
                        "default), the prompt's likelihood after the image read by the understanding encoder; "
                        "'likelihood', the generation path's log-probability of the image's VQ codes after the prompt "
                        "(on the default model it keeps a right one-object picture more often)")
    p.add_argument("--negative", action="append", default=[], metavar="TEXT",
                   help="with --best-of for text→image / text→video: what the output must not be, read like the "
                        "prompt (\"a red circle moves down\" for \"a red circle moves up\"); candidates are ranked "
                        "by how much more their reading favours the prompt than these; repeatable, applies to every "
                        "prompt without its own (a --prompts line's \"negatives\")")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="steer the drawing away from TEXT: classifier-free guidance reads it instead of the empty "
                        "context (needs guidance on, e.g. --video-guidance-scale 2; the default model draws the asked "
                        "motion far more often against the opposite one: \"a red circle moves down\" for \"... moves "
                        "up\"); applies to every prompt without its own (a --prompts line's \"negative_prompt\")")
    p.add_argument("--region", action="append", default=[], type=_region, metavar="X0,Y0,X1,Y1:TEXT",
                   help="regional prompting: draw TEXT in the box (fractions of the image, the top left 0,0), e.g. "
                        "--region \"0,0,0.33,0.33:a red circle at the top left\"; the prompt draws the rest; "
                        "repeatable (later boxes win where they overlap), applies to every prompt without its own (a "
                        "--prompts line's \"regions\": [[TEXT, [X0, Y0, X1, Y1]], ...])")
    p.add_argument("--inpaint", action="append", default=[], type=_box, metavar="X0,Y0,X1,Y1",
                   help="redraw only this box of the --image picture (fractions of it, the top left 0,0) and copy "
                        "the rest, e.g. --image scene.png --inpaint 0,0,0.33,0.33 \"make the circle yellow\" "
                        "--start-with image; repeatable (every box redrawn), applies to every prompt without its own "
                        "(a --prompts line's \"inpaint\": [[X0, Y0, X1, Y1], ...])")
    p.add_argument("--canvas", type=Path, default=None, metavar="PATH",
                   help="compose the --region boxes onto this picture: each region drawn alone onto it from its "
                        "text, everything outside its box copied, then the drawings laid on it, e.g. a plain "
                        "background with --region \"0,0,0.4,0.4:a red circle at the top left\" --region ...; needs "
                        "--start-with image; applies to every prompt without its own (a --prompts line's "
                        "\"canvas\": path)")
    p.add_argument("--plan", action="store_true",
                   help="plan each prompt's layout before drawing it (anygen.plan): a scene prompt such as \"a red "
                        "circle at the top left and a blue square at the bottom right\" becomes each object's caption "
                        "over its cell, each drawn alone onto an empty scene (the default model draws both objects "
                        "of held-out pairs 80.8 %% of the time so, 22.5 %% from the text alone; one object gains "
                        "nothing so, 92.2 against 93.9 %%); with one --image, a "
                        "recolouring (\"make the circle yellow\") redraws only the object's cell, found by the model "
                        "reading the picture, the object drawn alone under its new caption and put in place; "
                        "implies --start-with image; takes no --understand, --region, --inpaint or --canvas")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per batch with --prompts")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    for m in MODALITIES:
        for f in fields(SamplingConfig):
            kind = float if f.default is None else type(f.default)  # image_guidance_scale: None is off
            p.add_argument(f"--{m}-{f.name.replace('_', '-')}", type=kind, default=None,
                           dest=f"{m}_{f.name}",
                           help=f"{m} sampling: {f.name} (default: the checkpoint's generation_config.json)")
    return p


def _region(text: str) -> tuple[str, tuple[float, ...]]:
    """``--region "X0,Y0,X1,Y1:TEXT"`` as ``(TEXT, box)``."""
    from anygen.generation.generator import parse_region

    try:
        return parse_region(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _box(text: str) -> tuple[float, ...]:
    """``--inpaint "X0,Y0,X1,Y1"`` as a box."""
    from anygen.generation.generator import parse_box

    try:
        return parse_box(text, "--inpaint")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _sampling(args: argparse.Namespace, modality: str) -> dict:
    return {f.name: getattr(args, f"{modality}_{f.name}") for f in fields(SamplingConfig)
            if getattr(args, f"{modality}_{f.name}") is not None}


def _load_prompts(args: argparse.Namespace) -> list[dict]:
    if args.prompts is None:
        if not args.prompt and not (args.image or args.understand):
            raise ValueError("give a prompt (text, --image / --understand pictures, or both), or --prompts FILE.jsonl")
        return [{"prompt": args.prompt, "images": [str(p) for p in args.image],
                 "understand": [str(p) for p in args.understand], "negatives": args.negative,
                 "negative_prompt": args.negative_prompt, "regions": args.region, "inpaint": args.inpaint,
                 "canvas": args.canvas}]
    if not args.prompts.is_file():
        raise FileNotFoundError(f"--prompts file {args.prompts} does not exist")
    items = []
    for n, line in enumerate(args.prompts.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{args.prompts}:{n} is not valid JSON: {err}") from err
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt", ""), str):
            raise ValueError(f'{args.prompts}:{n}: expected a string or {{"prompt": str, "images": [...], '
                             f'"understand": [...], "negatives": [...], "negative_prompt": str, "regions": [...], '
                             f'"inpaint": [...], "canvas": str}}')
        unknown = set(item) - {"prompt", "images", "understand", "negatives", "negative_prompt", "regions", "inpaint",
                               "canvas"}
        if unknown:
            raise ValueError(f"{args.prompts}:{n}: unknown keys {sorted(unknown)}; accepted: prompt, images, "
                             f"understand, negatives, negative_prompt, regions, inpaint, canvas")
        if not isinstance(item.get("canvas", ""), str):
            raise ValueError(f'{args.prompts}:{n}: "canvas" must be a path (str), got {item["canvas"]!r:.100}')
        inpaint = item.get("inpaint", [])
        if not isinstance(inpaint, list) or not all(isinstance(b, list) and len(b) == 4 for b in inpaint):
            raise ValueError(f'{args.prompts}:{n}: "inpaint" must be a list of [x0, y0, x1, y1] boxes, got '
                             f'{inpaint!r:.100}')
        regions = item.get("regions", [])
        if not isinstance(regions, list) or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in regions):
            raise ValueError(f'{args.prompts}:{n}: "regions" must be a list of [text, [x0, y0, x1, y1]] pairs, got '
                             f'{regions!r:.100}')
        if not isinstance(item.get("negative_prompt", ""), str):
            raise ValueError(f'{args.prompts}:{n}: "negative_prompt" must be a str, got '
                             f'{item["negative_prompt"]!r:.100}')
        negatives = item.get("negatives", [])
        if not isinstance(negatives, list) or not all(isinstance(t, str) for t in negatives):
            raise ValueError(f'{args.prompts}:{n}: "negatives" must be a list of str, got {negatives!r:.100}')
        items.append({**item, "negatives": item.get("negatives") or args.negative,
                      "negative_prompt": item.get("negative_prompt") or args.negative_prompt,
                      "regions": [(text, box) for text, box in regions] or args.region,
                      "inpaint": [tuple(box) for box in inpaint] or args.inpaint,
                      "canvas": item.get("canvas") or args.canvas})
    if not items:
        raise ValueError(f"{args.prompts} holds no prompts")
    return items


def _check_plannable(args: argparse.Namespace, items: list[dict]) -> None:
    """``--plan``'s prompts: text → image scenes the planner reads, or recolourings of one ``--image`` picture,
    nothing else given to place them."""
    from anygen.plan import parse_edit, plan_objects

    if args.start_with == "video":
        raise ValueError("--plan lays out a picture: it draws with --start-with image, not video")
    for n, item in enumerate(items):
        edit = len(item.get("images") or []) == 1
        given = [name for name in ("understand", "regions", "inpaint") if item.get(name)]
        given += ["canvas"] if item.get("canvas") is not None else []
        given += ["images"] if len(item.get("images") or []) > 1 else []
        if given:
            raise ValueError(f"prompt #{n}: --plan places what is drawn itself, from the prompt's text (and one "
                             f"--image to edit); it takes no {', '.join(given)} (leave --plan out to give them "
                             "yourself)")
        if not item.get("prompt"):
            raise ValueError(f"prompt #{n}: --plan reads the layout from the prompt's text, and it has none")
        try:
            parse_edit(item["prompt"]) if edit else plan_objects(item["prompt"])
        except ValueError as err:
            raise ValueError(f"prompt #{n}: {err}" + (" (--plan with --image plans a recolouring)" if edit else "")
                             ) from err


def _plan(engine, args: argparse.Namespace, items: list[dict], documents: list[list], canvases: list
          ) -> tuple[list, list, list]:
    """``--plan``: each prompt's ``(regions, inpaint boxes, canvas)``: a scene's layout composed onto an empty
    picture (``plan_layout``), an edit's object drawn alone under its new caption onto an empty picture and put into
    its cell (``plan_edits``, the model reading the picture where the instruction names no place)."""
    from anygen.plan import empty_like, plan_edits, plan_layout

    if engine.tokenizer.image is None:
        raise ValueError("--plan plans pictures, and this model has no image tokenizer")
    regions, inpaint = [item["regions"] for item in items], [item["inpaint"] for item in items]
    edits = [i for i, item in enumerate(items) if item.get("images")]
    for i, item in enumerate(items):
        if i not in edits:
            layout = plan_layout(item["prompt"], engine.tokenizer.image_size[0])
            regions[i], canvases[i] = layout.regions, layout.canvas
    if edits:
        plans = plan_edits(engine, [documents[i][0].image for i in edits], [items[i]["prompt"] for i in edits],
                           seed=args.seed)
        for i, plan in zip(edits, plans):
            if not plan.found:
                print(f"[{i}] --plan: the model did not find what {items[i]['prompt']!r} edits in the picture (read "
                      f"from {plan.read_from!r:.120}); the whole picture is drawn (give --inpaint X0,Y0,X1,Y1 to "
                      "place it)", file=sys.stderr)
            else:
                print(f"[{i}] --plan: redrawing the {plan.cell} cell as {plan.regions[0][0]!r} (read from "
                      f"{plan.read_from!r:.120})", file=sys.stderr)
                regions[i], inpaint[i] = plan.regions, [plan.box]
                canvases[i] = empty_like(documents[i][0].image)  # drawn alone, then put into its cell
    return regions, inpaint, canvases


def _document(item: dict) -> list:
    from tokenizers_mm.preprocess import load_image
    from tokenizers_mm.segments import Image, Understand

    doc: list = [Understand(load_image(p)) for p in item.get("understand", [])]
    doc += [Image(load_image(p)) for p in item.get("images", [])]
    if item.get("prompt"):
        doc.append(item["prompt"])
    return doc


def _canvases(items: list[dict]) -> list:
    """Each prompt's ``canvas`` picture (None: none), every file decoded once."""
    from tokenizers_mm.preprocess import load_image

    pictures: dict[str, object] = {}
    for path in {str(item["canvas"]) for item in items if item["canvas"] is not None}:
        pictures[path] = load_image(path)
    return [None if item["canvas"] is None else pictures[str(item["canvas"])] for item in items]


def load_engine(checkpoint: Path | None, random_tiny: bool, device: str | None = None):
    """The engine the CLI and the demo use: a checkpoint, the tiny random engine, the shipped default model
    (``anygen/assets/default``) when neither is asked for, or a clear error when none ships."""
    import torch

    from anygen.api import AnyGen

    if checkpoint is not None:
        engine = AnyGen.from_pretrained(checkpoint)
    elif random_tiny:
        from anygen.testing import random_engine

        engine = random_engine("tiny")
    elif default_checkpoint() is not None:
        engine = AnyGen.from_pretrained(default_checkpoint())
    else:
        raise FileNotFoundError(f"no checkpoint given and no default model ships with this version; "
                                f"{DEFAULT_CHECKPOINT_HINT}, or --random-tiny to try the plumbing")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return engine.to(device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        items = _load_prompts(args)
        if args.plan:
            _check_plannable(args, items)
        documents = [_document(item) for item in items]  # decode every image before any work
        canvases = _canvases(items)
        engine = load_engine(args.checkpoint, args.random_tiny, args.device)
        regions, inpaint = [item["regions"] for item in items], [item["inpaint"] for item in items]
        if args.plan:
            regions, inpaint, canvases = _plan(engine, args, items, documents, canvases)
            args.start_with = "image"
        return _run(engine, args, documents, [item["negatives"] for item in items],
                    [item["negative_prompt"] for item in items], regions, inpaint, canvases)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"anygen generate: error: {err}", file=sys.stderr)
        return 2


def _run(engine, args: argparse.Namespace, documents: list[list], negatives: list[list[str]],
         negative_prompts: list[str | None], regions: list[list], inpaint: list[list], canvases: list) -> int:
    from tqdm import tqdm

    from tokenizers_mm.video_io import write_video

    # the trained size, not the largest the grammar allows (which may not fit the context)
    image_size = args.image_size or engine.tokenizer.image_grid
    kwargs = dict(max_new_tokens=args.max_new_tokens, text=_sampling(args, "text") or None,
                  image=_sampling(args, "image") or None, video=_sampling(args, "video") or None,
                  image_size=image_size, video_size=args.video_size, start_with=args.start_with,
                  max_images=args.max_images, seed=args.seed, speculative=args.speculative, best_of=args.best_of,
                  rerank=args.rerank)
    size = max(1, args.batch_size)
    starts = range(0, len(documents), size)
    index = 0
    for lo in tqdm(starts, desc="generating", unit="batch", disable=len(starts) == 1):
        batch = documents[lo:lo + size]
        # best_of scores each image by its prompt's text, so text-only prompts go as str
        prompts = [d[0] if args.best_of != 1 and len(d) == 1 and isinstance(d[0], str) else list(d) for d in batch]
        given, steer, where = negatives[lo:lo + size], negative_prompts[lo:lo + size], regions[lo:lo + size]
        holes = [boxes or None for boxes in inpaint[lo:lo + size]]
        canvas = canvases[lo:lo + size]
        outputs = engine.generate(prompts, **kwargs, negatives=given if any(given) else None,
                                  negative_prompt=steer if any(steer) else None,
                                  regions=where if any(where) else None,
                                  inpaint=holes if any(holes) else None,
                                  canvas=canvas if any(c is not None for c in canvas) else None)
        for out in outputs:
            folder = args.out / f"{index:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            written = []
            (folder / "text.txt").write_text(out.text)
            written.append(folder / "text.txt")
            for k, img in enumerate(out.images):
                img.save(folder / f"image_{k}.png")
                written.append(folder / f"image_{k}.png")
            for k, vid in enumerate(out.videos):
                written.append(write_video(folder / f"video_{k}.mp4", vid.frames, vid.fps))
            print(f"[{index}] {out.finish_reason}: {out.text[:80]!r}")
            for path in written:
                print(f"  wrote {path}")
            index += 1
    return 0
