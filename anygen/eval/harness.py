"""The evaluation harness: prompts built from held-out attribute combinations, generations judged by rules.

Categories (each a function ``eval_<name>(ctx) -> CategoryResult``):

============  ===============================================================  ==========================
name          what is asked                                                    judged by
============  ===============================================================  ==========================
t2i_single    text → image, one held-out object                                ``detect_objects``
t2i_pair      text → image, a held-out object and a second one (spatial pair)  ``detect_objects``
caption       image (understanding path) → text                                ``parse_caption``
video         text → video, a held-out (colour, shape, direction) motion        ``motion_direction``
digits        ``"a handwritten 7"`` → image                                    ``digit_classifier``
edit          ``[image, "make the circle yellow"]`` → image                    ``detect_objects``
story         ``"draw …"`` → image, ``"then add …"`` → image (two turns)        ``detect_objects``
tokenizer     reconstruction PSNR / SSIM: held-out shapes, bundled photos/clip  ``torchmetrics``
============  ===============================================================  ==========================

Held-out combinations come from ``holdout_combinations(holdout, data_seed)``, the same function
``anygen data shapes`` withholds with, so no prompt's combination was ever seen in training. Every
prompt is drawn from its own seeded RNG: a run is a function of ``(engine, seed, num)``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import PIL.Image
import torch

from anygen.api import RERANKERS
from anygen.data.digits import digit_caption
from anygen.data.shapes import (
    COLORS,
    DIRECTIONS,
    SceneObject,
    caption,
    cell_box,
    holdout_combinations,
    layout_regions,
    motion_caption,
    parse_caption,
    refer,
    render_scene,
    sample_motion,
    sample_object,
    sample_scene,
)
from anygen.eval.detect import detect_objects, motion_direction
from anygen.generation.generator import SamplingDefaults
from anygen.plan import PLAN_MARGIN, EditPlan, edit_plan, plan_edits, plan_objects
from tokenizers_mm.segments import Image, Understand

# the targets (fraction correct, on the category's headline metric)
TARGETS: dict[str, float] = {"t2i_single": 0.95, "t2i_pair": 0.80, "caption": 0.90, "video": 0.85, "digits": 0.90,
                             "edit": 0.80}
VIDEO_NEGATIVES: tuple[str, ...] = ("none", "opposite")  # EvalContext.video_negative
REGIONS: tuple[str, ...] = ("none", "layout")  # EvalContext.regions
INPAINTS: tuple[str, ...] = ("none", "layout", "asked")  # EvalContext.inpaint
CANVASES: tuple[str, ...] = ("none", "blank")  # EvalContext.canvas
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}
CATEGORIES: tuple[str, ...] = ("t2i_single", "t2i_pair", "caption", "video", "digits", "edit", "story", "tokenizer")


def eval_sampling(temperature: float | None = None, top_k: int = 0, guidance_scale: float | None = None,
                  video_guidance_scale: float | None = None, video_temperature: float | None = None,
                  defaults: SamplingDefaults | None = None, image_guidance_scale: float | None = None,
                  guidance_start: float | None = None) -> dict[str, Any]:
    """``generate`` sampling arguments of an evaluation: greedy text; images and video with the same top-k, their
    temperatures and guidance settings defaulting to the engine's own (``defaults``: the checkpoint's
    ``generation_config.json``; None: the library's, ``DEFAULT_IMAGE`` temperature 0.5, guidance 3, image guidance
    1.5, guidance from the first code and ``DEFAULT_VIDEO`` temperature 0.7, guidance 1); ``guidance_start`` is the
    images'."""
    defaults = defaults or SamplingDefaults()

    def pick(value: float | None, default: float) -> float:
        return default if value is None else value

    image = {"temperature": pick(temperature, defaults.image.temperature), "top_k": top_k,
             "guidance_scale": pick(guidance_scale, defaults.image.guidance_scale),
             "image_guidance_scale": pick(image_guidance_scale, defaults.image.image_guidance_scale),
             "guidance_start": pick(guidance_start, defaults.image.guidance_start)}
    video = {"temperature": pick(video_temperature, defaults.video.temperature), "top_k": top_k,
             "guidance_scale": pick(video_guidance_scale, defaults.video.guidance_scale)}
    return {"text": {"temperature": 0.0}, "image": image, "video": video}


@dataclass
class CategoryResult:
    """Scores of one category.

    Attributes:
        name: the category.
        num: prompts evaluated.
        metric: the name of the headline metric (``score``).
        score: the headline metric (fraction correct, or dB for the tokenizer), NaN when not run.
        details: every other metric.
        samples: per prompt: the prompt, the ground truth, what was generated / detected, correct.
        seconds: wall time.
    """

    name: str
    num: int
    metric: str
    score: float
    details: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def target(self) -> float | None:
        return TARGETS.get(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"num": self.num, "metric": self.metric, "score": _clean(self.score), "target": self.target,
                "passed": None if self.target is None or math.isnan(self.score) else self.score >= self.target,
                "details": {k: _clean(v) for k, v in self.details.items()}, "seconds": round(self.seconds, 2),
                "samples": self.samples}


@dataclass
class EvalContext:
    """What every category needs.

    Attributes:
        engine: the ``AnyGen`` engine under test.
        num: prompts per category.
        seed: prompt and sampling seed.
        batch_size: prompts per ``generate`` call.
        holdout / data_seed: the data set's held-out fraction and seed (``anygen data shapes``).
        sampling: ``generate`` sampling keyword arguments (``text=``, ``image=``, ``video=``).
        keep_images: called with ``(category, index, name, PIL.Image)`` for every generated image.
        best_of: self-reranking (``AnyGen.generate(best_of=...)``); 1: one draw, no reranking. Text→image prompts
            (one object, two objects, digits) draw this many images and keep the one the model's understanding path
            scores best; captions draw this many (the greedy one and the rest sampled) and keep the one under which
            the generation path finds the image most likely; video draws this many clips and keeps the one whose
            reading most favours its prompt over the same motion in the other three directions (``negatives``);
            inpainted edits (``inpaint`` on) draw this many and keep the one the understanding path reads back best as
            the planned edited scene (``EditPlan.scene``); edits drawn whole are not reranked.
        rerank: how the text → image prompts and inpainted edits read their drawn images back (``generate``'s
            ``rerank``, ``RERANKERS``): ``"understanding"``, the prompt's likelihood after the image read by the
            understanding encoder; ``"likelihood"``, the generation path's log-probability of the image's VQ codes
            after the prompt. Captions and clips keep their one reader.
        video_negative: ``"opposite"``: each clip's guidance twin reads the same motion in the opposite direction
            (``negative_prompt``; acts only with video guidance on); ``"none"``: the empty context.
        regions: ``"layout"``: text → image prompts (one object, two objects) and the story's two pictures are
            drawn with regional prompting, each object's own caption over its grid cell (``shapes.layout_regions``);
            the text → image rows take the regions the planner reads off the prompt's text (``plan.plan_objects``,
            in the caption's order, since session 44), the story its scene's objects; ``"none"``: the prompt alone. With
            ``inpaint`` on, an edit's redrawn cell gets the edited object's caption (its shape and new colour from
            the instruction, its cell the box's).
        inpaint: masked editing (``generate(inpaint=...)``): an edit redraws only the edited object's cell, copying
            the rest of the picture, and the story's second picture only the added object's cell (the cell its step
            names), copying the first. For an edit the cell is the object's in the source scene (``"layout"``: the
            box a user would draw) or the one the model's understanding path answers to ``"where is <the object>?"``
            (``"asked"``: nothing given but the picture and the instruction; ``plan.plan_edits``); ``"none"``: the
            whole picture drawn.
        canvas: ``"blank"`` (with ``regions`` "layout"): text → image prompts and the story's first picture are
            composed onto an empty scene (``generate(canvas=...)``), each object drawn alone, its box its cell
            grown by ``PLAN_MARGIN``; with ``inpaint`` as well, an edit's object and the story's added one are
            drawn alone onto an empty scene and put into their cell (``generate(canvas=..., inpaint=...)``, the
            cell as it is); ``"none"``: the regions drawn in one pass.
    """

    engine: Any
    num: int = 50
    seed: int = 0
    batch_size: int = 16
    holdout: float = 0.1
    data_seed: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    keep_images: Callable[[str, int, str, PIL.Image.Image], None] | None = None
    best_of: int = 1
    video_negative: str = "none"
    regions: str = "none"
    inpaint: str = "none"
    canvas: str = "none"
    rerank: str = "understanding"

    def __post_init__(self) -> None:
        if self.video_negative not in VIDEO_NEGATIVES:
            raise ValueError(f"video_negative must be one of {VIDEO_NEGATIVES}, got {self.video_negative!r}")
        if self.regions not in REGIONS:
            raise ValueError(f"regions must be one of {REGIONS}, got {self.regions!r}")
        if self.inpaint not in INPAINTS:
            raise ValueError(f"inpaint must be one of {INPAINTS}, got {self.inpaint!r}")
        if self.canvas not in CANVASES:
            raise ValueError(f"canvas must be one of {CANVASES}, got {self.canvas!r}")
        if self.rerank not in RERANKERS:
            raise ValueError(f"rerank must be one of {RERANKERS}, got {self.rerank!r}")
        if self.rerank != RERANKERS[0] and self.best_of == 1:
            raise ValueError(f"rerank {self.rerank!r} chooses how best_of reads its candidates back: set best_of > 1 "
                             "(--best-of N)")
        if self.canvas != "none" and self.regions == "none":
            raise ValueError("canvas composes the layout's regions: it needs regions 'layout'")
        self.objects, self.motions = (sorted(s) for s in holdout_combinations(self.holdout, self.data_seed))
        tok = self.engine.tokenizer
        self.image_px = tok.image_size
        self.video_px = tok.video_size
        self.image_tokens: tuple[int, int] | None = tok.image_grid
        self.video_tokens: tuple[int, int, int] | None = tok.video_grid  # the trained clip, where recorded
        self.frames = tok.video_frames or 9  # else the shapes data's clip length
        if tok.video is not None and self.video_tokens is None:
            down = tok.video.downsample
            self.video_tokens = (tok.video.num_latent_frames(self.frames), self.video_px[0] // down,
                                 self.video_px[1] // down)

    def rng(self, category: str, index: int) -> random.Random:
        return random.Random(f"eval:{self.seed}:{category}:{index}")

    def layout(self, objects: Sequence[SceneObject]) -> list[tuple[str, tuple[float, float, float, float]]]:
        """``objects`` as this run's regions: each object's caption over its cell, grown by ``PLAN_MARGIN`` when
        the regions are composed onto a canvas."""
        return layout_regions(objects, PLAN_MARGIN if self.canvas != "none" else 0.0)

    def generate(self, prompts: list[list | str], regions: list | None = None, inpaint: list | None = None,
                 canvas: list | None = None, **kwargs: Any) -> list:
        """``engine.generate`` over ``prompts`` in batches of ``batch_size`` (``regions``: one list a prompt;
        ``inpaint``: one box or None a prompt; ``canvas``: one picture or None a prompt); one output per prompt."""
        out: list = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [p if isinstance(p, str) else list(p) for p in prompts[start:start + self.batch_size]]
            if regions is not None:
                kwargs["regions"] = regions[start:start + self.batch_size]
            if inpaint is not None:
                kwargs["inpaint"] = inpaint[start:start + self.batch_size]
            if canvas is not None:
                kwargs["canvas"] = canvas[start:start + self.batch_size]
            out += self.engine.generate(batch, seed=self.seed + start, **self.sampling, **kwargs)
        return out

    def generate_images(self, prompts: list[list], regions: list | None = None, inpaint: list | None = None,
                        onto_blank: bool = False) -> list[PIL.Image.Image | None]:
        """One image per prompt, as pixels (``generate_segments``' images)."""
        return [None if seg is None else seg.image for seg in self.generate_segments(prompts, regions, inpaint,
                                                                                     onto_blank)]

    def generate_segments(self, prompts: list[list], regions: list | None = None, inpaint: list | None = None,
                          onto_blank: bool = False) -> list[Image | None]:
        """One image per prompt, as the ``Image`` segment drawn (pixels and codes; the first generated, ``None``
        when none came); text-only prompts are reranked when ``best_of`` > 1; ``regions``: one list of ``(text,
        box)`` a prompt (``generate(regions=...)``); ``inpaint``: one box (or None) a prompt
        (``generate(inpaint=...)``); ``onto_blank``: the regions composed onto an empty scene
        (``generate(canvas=...)``)."""
        h, w = self.image_tokens
        rerank: dict[str, Any] = {}
        if self.best_of > 1 and all(len(p) == 1 and isinstance(p[0], str) for p in prompts):
            prompts, rerank = [p[0] for p in prompts], {"best_of": self.best_of, "rerank": self.rerank}
        if inpaint is not None and not any(box is not None for box in inpaint):
            inpaint = None
        empty = render_scene([], self.image_px[0])  # a canvas for each prompt with regions to compose
        blank = [empty if regions is not None and regions[i] else None for i in range(len(prompts))] \
            if onto_blank else None
        outputs = self.generate(prompts, regions, inpaint, blank, start_with="image", image_size=(h, w), max_images=1,
                                max_new_tokens=h * (w + 1) + 8, **rerank)
        return [next((s for s in o.segments if isinstance(s, Image) and s.image is not None), None) for o in outputs]

    def keep(self, category: str, index: int, name: str, image: PIL.Image.Image | None) -> None:
        if self.keep_images is not None and image is not None:
            self.keep_images(category, index, name, image)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _keys(objects: Sequence[SceneObject]) -> list[tuple[str, str, str]]:
    return sorted(o.key for o in objects)


def _attribute_hits(truth: Sequence[SceneObject], found: Sequence[Any]) -> tuple[int, int, int]:
    """Hits over the true objects: colour (the largest found object in its cell has its colour), shape (its
    shape), position (some found object in its cell has both its colour and its shape)."""
    color = shape = position = 0
    for obj in truth:
        here = [f for f in found if f.position == obj.position]
        if here:
            color += here[0].color == obj.color
            shape += here[0].shape == obj.shape
            position += any(f.color == obj.color and f.shape == obj.shape for f in here)
    return color, shape, position


def judge_scene(truth: Sequence[SceneObject], image: PIL.Image.Image | None) -> dict[str, Any]:
    """The detector's reading of one generated image against its scene: the attribute hits, and ``correct`` when
    the detected objects are exactly the scene's (what the text → image, edit and story categories score)."""
    found = detect_objects(image) if image is not None else []
    color, shape, position = _attribute_hits(truth, found)
    return {"truth": _keys(truth), "detected": sorted(d.key for d in found), "color": color, "shape": shape,
            "position": position, "correct": image is not None and _keys(truth) == sorted(d.key for d in found)}


def _scene_result(name: str, ctx: EvalContext, scenes: list[list[SceneObject]], started: float) -> CategoryResult:
    prompts = [[caption(s)] for s in scenes]
    # the layout read off each prompt by the planner, as anygen generate --plan reads it (the caption's order)
    images = ctx.generate_images(prompts, [ctx.layout(plan_objects(p[0])) for p in prompts]
                                 if ctx.regions == "layout" else None,
                                 onto_blank=ctx.canvas != "none")
    samples = []
    for i, (scene, image) in enumerate(zip(scenes, images)):
        ctx.keep(name, i, "image", image)
        samples.append({"prompt": prompts[i][0], **judge_scene(scene, image)})
    total = sum(len(s) for s in scenes)
    details = {"exact": _mean([s["correct"] for s in samples]),
               "color": sum(s["color"] for s in samples) / max(1, total),
               "shape": sum(s["shape"] for s in samples) / max(1, total),
               "position": sum(s["position"] for s in samples) / max(1, total),
               "no_image": sum(im is None for im in images)}
    if ctx.regions != "none":
        details["regions"] = "each object's caption over its cell"
    if ctx.canvas != "none":
        details["canvas"] = "composed onto an empty scene, each object drawn alone, each cell grown by a quarter cell"
    if name == "t2i_single":
        metric, score = "attributes", _mean([details["color"], details["shape"], details["position"]])
    else:
        metric, score = "exact", details["exact"]
    return CategoryResult(name, len(scenes), metric, score, details, samples, time.perf_counter() - started)


def t2i_scenes(ctx: EvalContext, category: str) -> list[list[SceneObject]]:
    """The scenes a text → image category asks for at ``ctx``'s seed and size: ``t2i_single``, one held-out object
    each; ``t2i_pair``, a held-out object and a second one in another cell (``bench/rerank.py`` draws the same)."""
    if category == "t2i_single":
        return [[sample_object(ctx.rng(category, i), key=ctx.objects[i % len(ctx.objects)])] for i in range(ctx.num)]
    if category == "t2i_pair":
        return [sample_scene(ctx.rng(category, i), 2, first=ctx.objects[i % len(ctx.objects)]) for i in range(ctx.num)]
    raise ValueError(f"unknown text → image category {category!r}; accepted: t2i_single, t2i_pair")


def eval_t2i_single(ctx: EvalContext) -> CategoryResult:
    """One held-out object per prompt; headline: mean of colour, shape and position accuracy."""
    started = time.perf_counter()
    return _scene_result("t2i_single", ctx, t2i_scenes(ctx, "t2i_single"), started)


def eval_t2i_pair(ctx: EvalContext) -> CategoryResult:
    """A held-out object and a second one in another cell; headline: both exactly right (so their relation)."""
    started = time.perf_counter()
    return _scene_result("t2i_pair", ctx, t2i_scenes(ctx, "t2i_pair"), started)


def eval_caption(ctx: EvalContext) -> CategoryResult:
    """Render a held-out scene, read it through the understanding encoder, parse the caption."""
    started = time.perf_counter()
    tok = ctx.engine.tokenizer
    scenes = [sample_scene(ctx.rng("caption", i), first=ctx.objects[i % len(ctx.objects)]) for i in range(ctx.num)]
    images = [render_scene(s, ctx.image_px[0]) for s in scenes]
    wrap = Understand if tok.und_tokens > 0 else Image  # no understanding path: the image as VQ context
    rerank = {"best_of": ctx.best_of} if ctx.best_of > 1 else {}
    outputs = ctx.generate([[wrap(im)] for im in images], max_new_tokens=48, **rerank)
    samples = []
    hits = {"color": 0, "shape": 0, "position": 0}
    for scene, out in zip(scenes, outputs):
        parsed = parse_caption(out.text)
        color, shape, position = _attribute_hits(scene, parsed)
        hits["color"] += color
        hits["shape"] += shape
        hits["position"] += position
        samples.append({"truth": caption(scene), "generated": out.text, "parsed": _keys(parsed),
                        "correct": _keys(parsed) == _keys(scene)})
    total = max(1, sum(len(s) for s in scenes))
    details = {k: v / total for k, v in hits.items()}
    details["exact"] = _mean([s["correct"] for s in samples])
    details["path"] = "understand" if wrap is Understand else "vq"
    details["best_of"] = ctx.best_of
    score = _mean([details["color"], details["shape"], details["position"]])
    return CategoryResult("caption", len(scenes), "attributes", score, details, samples,
                          time.perf_counter() - started)


def eval_video(ctx: EvalContext) -> CategoryResult:
    """Text → video for held-out motions; headline: the detected direction of motion is the prompt's."""
    started = time.perf_counter()
    motions = [sample_motion(ctx.rng("video", i), key=ctx.motions[i % len(ctx.motions)]) for i in range(ctx.num)]
    t, h, w = ctx.video_tokens
    settings = dict(start_with="video", video_size=(t, h, w), max_images=1, max_new_tokens=t * (h * (w + 1) + 1) + 8)
    outputs = []
    for lo in range(0, len(motions), ctx.batch_size):
        batch = motions[lo:lo + ctx.batch_size]
        extra: dict[str, Any] = {}
        if ctx.best_of > 1:  # rerank each prompt's clips against the same motion in its other directions
            extra["best_of"] = ctx.best_of
            extra["negatives"] = [[motion_caption(replace(m, direction=d)) for d in DIRECTIONS if d != m.direction]
                                  for m in batch]
        if ctx.video_negative == "opposite":  # guide each clip away from the opposite motion
            extra["negative_prompt"] = [motion_caption(replace(m, direction=OPPOSITE[m.direction])) for m in batch]
        prompts = [motion_caption(m) for m in batch] if extra else [[motion_caption(m)] for m in batch]
        outputs += ctx.engine.generate(prompts, seed=ctx.seed + lo, **ctx.sampling, **settings, **extra)
    samples = []
    for i, (motion, out) in enumerate(zip(motions, outputs)):
        frames = out.videos[0].to_pil_frames() if out.videos else []
        direction = motion_direction(frames) if frames else None
        first = detect_objects(frames[0]) if frames else []
        ctx.keep("video", i, "first_frame", frames[0] if frames else None)
        ctx.keep("video", i, "last_frame", frames[-1] if frames else None)
        samples.append({"prompt": motion_caption(motion), "direction": motion.direction, "detected": direction,
                        "first_frame": [d.key for d in first[:1]],
                        "color_shape": bool(first) and (first[0].color, first[0].shape) == (motion.color, motion.shape),
                        "correct": direction == motion.direction})
    details = {"color_shape": _mean([s["color_shape"] for s in samples]),
               "no_video": sum(not o.videos for o in outputs), "best_of": ctx.best_of}
    if ctx.best_of > 1:
        details["negatives"] = "the prompt's other directions"
    if ctx.video_negative != "none":
        details["negative_prompt"] = "the opposite motion"
    return CategoryResult("video", len(motions), "direction", _mean([s["correct"] for s in samples]), details,
                          samples, time.perf_counter() - started)


def eval_digits(ctx: EvalContext) -> CategoryResult:
    """``"a handwritten d"`` for d = 0..9 in turn; headline: the classifier reads back d."""
    from anygen.eval.digits import digit_classifier

    started = time.perf_counter()
    classifier = digit_classifier(size=ctx.image_px[0])
    digits = [i % 10 for i in range(ctx.num)]
    images = ctx.generate_images([[digit_caption(d)] for d in digits])
    predicted = classifier.predict([im for im in images if im is not None])
    it = iter(predicted)
    samples = []
    for i, (digit, image) in enumerate(zip(digits, images)):
        ctx.keep("digits", i, "image", image)
        guess = next(it) if image is not None else None
        samples.append({"prompt": digit_caption(digit), "predicted": guess, "correct": guess == digit})
    details = {"classifier_heldout_accuracy": classifier.heldout_accuracy, "classifier_heldout_num":
               classifier.num_heldout, "no_image": sum(im is None for im in images)}
    return CategoryResult("digits", len(digits), "class", _mean([s["correct"] for s in samples]), details, samples,
                          time.perf_counter() - started)


@dataclass(frozen=True)
class EditCase:
    """One held-out edit: ``before`` drawn in the prompt's picture, ``instruction`` recolours ``before[target]``,
    ``after`` is the scene the edited image must show."""

    before: list[SceneObject]
    after: list[SceneObject]
    target: int
    instruction: str

    def prompt(self, size: int) -> list[Any]:
        """``[Image(before rendered at size px), instruction]``, the prompt the edit category draws from."""
        return [Image(render_scene(self.before, size)), self.instruction]


def edit_cases(ctx: EvalContext) -> list[EditCase]:
    """The edits the edit category asks for at ``ctx``'s seed: a scene whose first object is held out, one of its
    objects recoloured (``bench/rerank.py --category edit`` draws the same)."""
    cases = []
    for i in range(ctx.num):
        rng = ctx.rng("edit", i)
        before = sample_scene(rng, first=ctx.objects[i % len(ctx.objects)])
        target = rng.randrange(len(before))
        obj = before[target]
        color = rng.choice([c for c in COLORS if c != obj.color])
        after = list(before)
        after[target] = SceneObject(obj.shape, color, obj.position, obj.dx, obj.dy, obj.scale)
        cases.append(EditCase(before, after, target, f"make {refer(obj, before)} {color}"))
    return cases


def judge_edit(case: EditCase, image: PIL.Image.Image | None) -> dict[str, Any]:
    """``judge_scene`` against the edited scene, plus ``changed`` (the recoloured object is there) and
    ``rest_unchanged`` (every other object is)."""
    judged = judge_scene(case.after, image)
    detected = set(judged["detected"])
    changed = case.after[case.target].key in detected
    rest = all(o.key in detected for k, o in enumerate(case.after) if k != case.target)
    return {"instruction": case.instruction, "before": _keys(case.before), **judged, "changed": changed,
            "rest_unchanged": rest}


def edit_plans(ctx: EvalContext, cases: Sequence[EditCase]) -> list[EditPlan | None]:
    """The plan of each edit for ``ctx.inpaint`` (None, or a plan that found no cell: the whole picture drawn).
    ``"layout"``: the edited object's cell in the source scene (the box a user would draw), the scene known.
    ``"asked"``: the model finds it, given only the picture and the instruction (``plan.plan_edits``, its captions
    and answers drawn by this run)."""
    if ctx.inpaint == "none":
        return [None] * len(cases)
    if ctx.inpaint == "layout":
        return [edit_plan(case.instruction, case.before[case.target].position, "layout", case.before)
                for case in cases]
    return plan_edits(ctx.engine, [render_scene(case.before, ctx.image_px[0]) for case in cases],
                      [case.instruction for case in cases], generate=ctx.generate)


def eval_edit(ctx: EvalContext) -> CategoryResult:
    """Recolour one object of a held-out scene; headline: the edited image is exactly the edited scene."""
    started = time.perf_counter()
    cases = edit_cases(ctx)
    plans = edit_plans(ctx, cases)
    boxes = [plan.box if plan is not None else None for plan in plans]  # a plan that found no cell has None
    regions = None
    if ctx.inpaint != "none" and ctx.regions == "layout":  # the redrawn cell's own caption: the edited object
        regions = [plan.regions if plan is not None else [] for plan in plans]
    prompts = [case.prompt(ctx.image_px[0]) for case in cases]
    n = ctx.best_of if ctx.inpaint != "none" and ctx.best_of > 1 else 1  # inpainted edits are reranked
    drawn = ctx.generate_segments([p for p in prompts for _ in range(n)],
                                None if regions is None else [r for r in regions for _ in range(n)],
                                None if ctx.inpaint == "none" else [x for x in boxes for _ in range(n)],
                                onto_blank=regions is not None and ctx.canvas != "none")
    kept = drawn
    if n > 1:  # keep the draw read back best (ctx.rerank; by likelihood, its codes as drawn) as the edited scene
        kept = []
        for i, plan in enumerate(plans):
            row = drawn[i * n:(i + 1) * n]
            scores = ctx.engine.score_candidates(row, caption(plan.scene), rerank=ctx.rerank) \
                if plan is not None and plan.found else [0.0] * n
            kept.append(row[max(range(n), key=lambda k: scores[k])])
    images = [None if seg is None else seg.image for seg in kept]
    samples = []
    for i, (case, image) in enumerate(zip(cases, images)):
        ctx.keep("edit", i, "edited", image)
        sample = judge_edit(case, image)
        if ctx.inpaint != "none":
            plan = plans[i]
            sample["redrawn_cell"], sample["read_from"] = (None, None) if plan is None else (plan.cell,
                                                                                              plan.read_from)
        samples.append(sample)
    details = {"changed": _mean([s["changed"] for s in samples]),
               "rest_unchanged": _mean([s["rest_unchanged"] for s in samples]),
               "no_image": sum(im is None for im in images)}
    if ctx.inpaint != "none":
        truth = [case.before[case.target].position for case in cases]
        details["inpaint"] = ctx.inpaint
        details["cell_right"] = _mean([plan is not None and plan.cell == t for plan, t in zip(plans, truth)])
        details["best_of"] = n
        if regions is not None and ctx.canvas != "none":
            details["canvas"] = "the edited object drawn alone onto an empty scene, then put into its cell"
    return CategoryResult("edit", len(cases), "exact", _mean([s["correct"] for s in samples]), details, samples,
                          time.perf_counter() - started)


def eval_story(ctx: EvalContext) -> CategoryResult:
    """Two turns: ``"draw <held-out object>"`` → image, then ``"then add <object>"`` → image."""
    started = time.perf_counter()
    firsts, seconds = [], []
    for i in range(ctx.num):
        rng = ctx.rng("story", i)
        first = sample_object(rng, key=ctx.objects[i % len(ctx.objects)])
        firsts.append(first)
        seconds.append(sample_object(rng, exclude_positions=[first.position]))
    steps1 = [f"draw {o.describe()}" for o in firsts]
    layout = ctx.regions == "layout"  # each picture with its objects' captions over their cells
    images1 = ctx.generate_images([[s] for s in steps1], [ctx.layout([o]) for o in firsts] if layout else None,
                                  onto_blank=ctx.canvas != "none")
    steps2 = [f"then add {o.describe()}" for o in seconds]
    prompts2 = [[s1, Image(im if im is not None else render_scene([], ctx.image_px[0])), s2]
                for s1, im, s2 in zip(steps1, images1, steps2)]
    # the second picture continues the first: its regions are the cells as they are; inpainted onto a canvas, the
    # added object is drawn alone onto an empty scene and put into its cell of the first picture
    alone = layout and ctx.inpaint != "none" and ctx.canvas != "none"
    regions2 = [layout_regions([b] if alone else [a, b]) for a, b in zip(firsts, seconds)] if layout else None
    images2 = ctx.generate_images(prompts2, regions2,
                                  [cell_box(o.position) for o in seconds] if ctx.inpaint != "none" else None,
                                  onto_blank=alone)
    samples = []
    for i in range(ctx.num):
        ctx.keep("story", i, "step1", images1[i])
        ctx.keep("story", i, "step2", images2[i])
        j1 = judge_scene([firsts[i]], images1[i])
        j2 = judge_scene([firsts[i], seconds[i]], images2[i])
        samples.append({"steps": [steps1[i], steps2[i]], "step1": j1, "step2": j2,
                        "correct": j1["correct"] and j2["correct"]})
    details = {"step1": _mean([s["step1"]["correct"] for s in samples]),
               "step2": _mean([s["step2"]["correct"] for s in samples])}
    if layout:
        details["regions"] = "each picture's objects' captions over their cells"
    if ctx.inpaint != "none":
        details["inpaint"] = "the second picture redraws the added object's cell only"
    if ctx.canvas != "none":
        details["canvas"] = "the first picture composed onto an empty scene" + (
            "; the added object drawn alone onto one and put into its cell" if alone else "")
    return CategoryResult("story", ctx.num, "both_steps", _mean([s["correct"] for s in samples]), details, samples,
                          time.perf_counter() - started)


def eval_tokenizer(ctx: EvalContext) -> CategoryResult:
    """Reconstruction PSNR / SSIM of the VQ tokenizers: held-out shapes, bundled photos and clip."""
    from anygen.eval.metrics import reconstruction_metrics

    started = time.perf_counter()
    details = reconstruction_metrics(ctx.engine.tokenizer, ctx.objects, ctx.motions, num=min(ctx.num, 32),
                                     seed=ctx.seed, frames=ctx.frames)
    score = details.get("image_shapes_psnr", float("nan"))
    return CategoryResult("tokenizer", min(ctx.num, 32), "image_shapes_psnr", score, details, [],
                          time.perf_counter() - started)


EVALUATORS: dict[str, Callable[[EvalContext], CategoryResult]] = {
    "t2i_single": eval_t2i_single, "t2i_pair": eval_t2i_pair, "caption": eval_caption, "video": eval_video,
    "digits": eval_digits, "edit": eval_edit, "story": eval_story, "tokenizer": eval_tokenizer,
}


def run_eval(ctx: EvalContext, categories: Sequence[str] = CATEGORIES,
             progress: Callable[[CategoryResult], None] | None = None) -> dict[str, CategoryResult]:
    """Run the chosen categories in order; ``progress`` is called after each one."""
    unknown = [c for c in categories if c not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; accepted: {', '.join(CATEGORIES)}")
    results: dict[str, CategoryResult] = {}
    for name in categories:
        needs = {"video": ctx.video_tokens, "tokenizer": True}.get(name, ctx.image_tokens)
        if needs is None:
            skipped = {"skipped": "the tokenizer lacks the modality"}
            results[name] = CategoryResult(name, 0, "n/a", float("nan"), skipped)
        else:
            with torch.inference_mode():
                results[name] = EVALUATORS[name](ctx)
        if progress is not None:
            progress(results[name])
    return results


def format_table(results: dict[str, CategoryResult]) -> str:
    """A plain-text table: category, n, metric, score, target, pass, and the other metrics."""
    rows = [("category", "n", "metric", "score", "target", "pass", "details")]
    for name, r in results.items():
        score = "n/a" if math.isnan(r.score) else (f"{r.score:.2f}" if r.metric.endswith("psnr") else
                                                    f"{100 * r.score:.1f}%")
        target = "" if r.target is None else f">= {100 * r.target:.0f}%"
        passed = "" if r.target is None or math.isnan(r.score) else ("yes" if r.score >= r.target else "no")
        extra = ", ".join(f"{k}={_fmt(v)}" for k, v in r.details.items())
        rows.append((name, str(r.num), r.metric, score, target, passed, extra))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:6], widths)) + "  " + row[6] for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


__all__ = ["CANVASES", "CATEGORIES", "EVALUATORS", "INPAINTS", "TARGETS", "CategoryResult", "EvalContext",
           "eval_sampling", "format_table", "run_eval"]
