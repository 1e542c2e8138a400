"""The README's pictures: one example per capability of the default model, written to docs/images/.

    .venv/bin/python scripts/readme_pictures.py [--checkpoint DIR] [--out docs/images] [--seed 0]

Each capability is one ``AnyGen.generate`` call (or two turns for the story), the way a user would
write it; the PNGs are upscaled with nearest-neighbour so 64 px outputs stay readable on a page, and
``examples.json`` records every prompt, the text that came out and the files. The prompts use the
training data's phrasing (``anygen.data.shapes``: a 3×3 grid of named cells, "moves to the right",
"make the … yellow"); the colour/shape/cell combinations are whatever the prompt says, seen in
training or not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import PIL.Image

from anygen.api import AnyGen, Understand
from anygen.cli_generate import default_checkpoint
from anygen.data.shapes import SceneObject, cell_box, layout_regions, render_scene
from anygen.data.shapes import caption as shapes_caption
from anygen.eval.detect import detect_objects
from anygen.plan import PLAN_MARGIN
from tokenizers_mm.segments import Image


def _big(image: PIL.Image.Image, side: int = 192) -> PIL.Image.Image:
    return image.resize((side, side), PIL.Image.NEAREST)


def _strip(images: list[PIL.Image.Image], side: int = 192, gap: int = 8) -> PIL.Image.Image:
    out = PIL.Image.new("RGB", (len(images) * side + (len(images) - 1) * gap, side), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(_big(im, side), (i * (side + gap), 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="model directory (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    checkpoint = args.checkpoint or default_checkpoint()
    if checkpoint is None:
        raise SystemExit("no default model ships (anygen/assets/default); pass --checkpoint DIR")
    engine = AnyGen.from_pretrained(checkpoint)
    tok = engine.tokenizer
    grid = tok.image_grid
    clip_grid = tok.video_grid  # the clip length and size the model was trained on
    args.out.mkdir(parents=True, exist_ok=True)
    seed, log = args.seed, {}

    def image(prompt, **sampling) -> PIL.Image.Image:
        out = engine.generate(prompt, start_with="image", image_size=grid, max_images=1, seed=seed,
                              image=sampling or None)
        return out.images[0]

    # text → image
    t2i = "a red circle at the top left and a blue square at the bottom right"
    _big(image(t2i)).save(args.out / "text_to_image.png")
    log["text_to_image"] = {"prompt": t2i, "file": "text_to_image.png"}
    # the same prompt with regions: each object's own caption over its cell (the plain draw beside it), then the
    # regions each drawn alone onto an empty scene, each cell grown by a quarter cell (anygen eval --canvas)
    pair = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right")]
    assert shapes_caption(pair) == t2i
    regions = layout_regions(pair)
    plain = image(t2i)
    routed = engine.generate(t2i, start_with="image", image_size=grid, max_images=1, seed=seed,
                             regions=regions).images[0]
    grown = layout_regions(pair, PLAN_MARGIN)
    composed = engine.generate(t2i, start_with="image", image_size=grid, max_images=1, seed=seed, regions=grown,
                               canvas=render_scene([], tok.image_size[0])).images[0]
    _strip([plain, routed, composed]).save(args.out / "regions.png")
    log["regions"] = {"prompt": t2i, "regions": regions, "file": "regions.png", "canvas_regions": grown,
                      "detected_plain": [d.key for d in detect_objects(plain)],
                      "detected_regions": [d.key for d in detect_objects(routed)],
                      "detected_composed": [d.key for d in detect_objects(composed)]}
    # image → text, through the understanding encoder
    scene = render_scene([SceneObject("triangle", "green", "top right"), SceneObject("circle", "yellow", "bottom")],
                         tok.image_size[0])
    caption = engine.generate([Understand(scene)], max_new_tokens=48, text={"temperature": 0.0}, seed=seed).text
    _big(scene).save(args.out / "image_to_text.png")
    reranked = engine.generate([Understand(scene)], max_new_tokens=48, text={"temperature": 0.0}, seed=seed,
                               best_of=16).text  # 16 replies, the generation path keeps one
    log["image_to_text"] = {"prompt": "[Understand(image)]", "file": "image_to_text.png", "text": caption,
                            "text_best_of_16": reranked}
    # text → video: first, middle and last frame
    # steered as the quick start's clip is: guidance away from the opposite motion (docs/default_model.md, session 36)
    t2v, away = "a green triangle moves to the right", "a green triangle moves to the left"
    clip = engine.generate(t2v, start_with="video", video_size=clip_grid, max_images=1, seed=seed,
                           negative_prompt=away, video={"guidance_scale": 2.0}).videos[0]
    frames = clip.to_pil_frames()
    _strip([frames[0], frames[len(frames) // 2], frames[-1]]).save(args.out / "text_to_video.png")
    log["text_to_video"] = {"prompt": t2v, "negative_prompt": away, "video_guidance_scale": 2.0,
                            "file": "text_to_video.png", "frames": len(frames)}
    # editing: the image goes in as VQ context, the instruction after it
    before = render_scene([SceneObject("circle", "red", "center")], tok.image_size[0])
    edit = "make the circle yellow"
    # the README's edit example: guidance from a tenth of the image on (docs/default_model.md, session 38)
    _strip([before, image([Image(before), edit], guidance_start=0.1)]).save(args.out / "edit.png")
    log["edit"] = {"prompt": f"[image, {edit!r}]", "guidance_start": 0.1, "file": "edit.png"}
    # inpainting: the same edit of a two-object scene drawn whole, then with only the circle's cell redrawn
    scene = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right")]
    before = render_scene(scene, tok.image_size[0])
    whole = image([Image(before), edit])
    box = cell_box("top left")
    # the box redrawn under the edited object's caption too (anygen eval --inpaint layout --regions layout)
    regions = [("a yellow circle at the top left", box)]
    inpainted = engine.generate([Image(before), edit], start_with="image", max_images=1, seed=seed,
                                inpaint=box, regions=regions).images[0]
    _strip([before, whole, inpainted]).save(args.out / "inpaint.png")
    log["inpaint"] = {"prompt": f"[image, {edit!r}]", "inpaint": box, "regions": regions, "file": "inpaint.png",
                      "detected_whole": [d.key for d in detect_objects(whole)],
                      "detected_inpainted": [d.key for d in detect_objects(inpainted)]}
    # an illustrated story: draw, add, then say what is in the picture
    steps = ["draw a red square at the top", "then add a blue circle at the bottom"]
    first = image(steps[0])
    second = image([steps[0], Image(first), steps[1]])
    said = engine.generate([steps[0], Image(first), steps[1], Image(second), "then say what is in the picture"],
                           max_new_tokens=48, text={"temperature": 0.0}, seed=seed).text
    _strip([first, second]).save(args.out / "story.png")
    log["story"] = {"prompt": steps + ["then say what is in the picture"], "file": "story.png", "text": said}
    # digits
    digits = [image(f"a handwritten {d}") for d in (0, 3, 7)]
    _strip(digits).save(args.out / "digits.png")
    log["digits"] = {"prompt": ["a handwritten 0", "a handwritten 3", "a handwritten 7"], "file": "digits.png"}
    (args.out / "examples.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
