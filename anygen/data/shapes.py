"""The ``shapes`` data set: procedural scenes of coloured shapes, with their ground truth and captions.

This module owns:

* the attribute vocabulary: ``SHAPES``, ``COLORS`` (name → RGB), the 3×3 grid ``POSITIONS`` and the
  motion ``DIRECTIONS``;
* the pure functions an evaluation harness reuses: ``sample_scene`` / ``render_scene`` /
  ``caption`` / ``parse_caption`` for still scenes, ``sample_motion`` / ``render_motion`` /
  ``motion_caption`` / ``parse_motion`` for clips of one moving shape;
* ``generate_shapes``, behind ``anygen data shapes``: PNG / MP4 files, ``documents.jsonl``,
  ``heldout.jsonl`` and ``meta.json`` in one directory.

Document kinds (each line of the JSONL keeps its ground truth under ``"meta"``):

================  =================================================================================
``t2i``           ``[caption, image]``
``caption``       ``[understand(image), caption]`` (image → text through the understanding encoder)
``vqa``           ``[understand(image), question, answer]`` (colour / shape / where / how many)
``video``         ``[motion caption, clip]``
``video_caption`` ``[clip, motion caption]``
``edit``          ``[image, instruction, edited image]`` (recolour, move, add or remove a shape)
``story``         ``["draw …", image, "then add …", image, ("then make …", image,)
                  "then say what is in the picture", caption]``
================  =================================================================================

Captions are canonical: objects in reading order (top left first), one fixed phrase per grid cell
(``"at the top left"``, ``"on the left"``, ``"in the center"`` …), so ``parse_caption`` inverts
``caption`` exactly and a model's caption can be scored against the ground truth.

Held-out combinations: a seeded fraction of the (colour, shape, position) triples and of the
(colour, shape, direction) motions is withheld. No training document mentions or shows one, in any
of its images, clips or texts; every document of ``heldout.jsonl`` contains at least one. The
held-out sets are listed in ``meta.json``.

Determinism: document ``i`` of a split is drawn from its own RNG seeded with ``(seed, split, i)``,
so the files are byte-identical for a seed whatever ``workers`` is.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw

from anygen.data.documents import prepare_dataset_dir

# -- the attribute vocabulary ----------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 70),
    "blue": (50, 95, 235),
    "yellow": (245, 215, 40),
    "purple": (150, 70, 205),
    "orange": (245, 135, 30),
    "cyan": (40, 205, 215),
    "white": (240, 240, 240),
}
# row-major 3×3 grid: index = 3 * row + column
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND: tuple[int, int, int] = (24, 24, 28)  # a plain dark background every colour stands out on

CLIP_FORMATS: tuple[str, ...] = ("mp4", "apng")  # how clips are stored: write_clip
KINDS: tuple[str, ...] = ("t2i", "caption", "vqa", "video", "video_caption", "edit", "story")
DEFAULT_KINDS: dict[str, float] = {
    "t2i": 4, "caption": 2, "vqa": 1, "video": 2, "video_caption": 1, "edit": 1, "story": 1,
}

# "<article> <colour> <shape> <phrase>" — the phrase says where, one per grid cell
_AT: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
_MOVES: dict[str, str] = {"left": "moves to the left", "right": "moves to the right", "up": "moves up",
                          "down": "moves down"}
_NUMBERS = ("zero", "one", "two", "three")
_RADIUS = 0.125  # object radius as a fraction of the image side, at scale 1
_JITTER = 0.08  # largest centre offset, as a fraction of a grid cell (objects stay inside their cell)
_SCALES = (0.85, 1.1)
ASK_CAPTION = "then say what is in the picture"

ObjectKey = tuple[str, str, str]  # (colour, shape, position)
MotionKey = tuple[str, str, str]  # (colour, shape, direction)


def _check(value: str, accepted: Iterable[str], name: str) -> str:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
    return value


def article(word: str) -> str:
    """``"an"`` before a vowel (``"an orange circle"``), else ``"a"``."""
    return "an" if word[:1] in "aeiou" else "a"


# -- scene objects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape in a still scene.

    Args:
        shape: one of ``SHAPES``.
        color: one of ``COLORS``.
        position: the grid cell, one of ``POSITIONS``.
        dx / dy: offset of the centre from the cell centre, in cells (``|d| <= 0.08`` keeps the
            shape inside its cell).
        scale: size relative to the standard radius (0.125 of the image side).
    """

    shape: str
    color: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "color")
        _check(self.position, POSITIONS, "position")

    @property
    def key(self) -> ObjectKey:
        """What a caption says about the object: ``(color, shape, position)``."""
        return (self.color, self.shape, self.position)

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` as fractions of the image side."""
        row, col = divmod(POSITIONS.index(self.position), 3)
        return ((col + 0.5 + self.dx) / 3, (row + 0.5 + self.dy) / 3)

    def describe(self) -> str:
        """``"a red circle at the top left"``."""
        return f"{article(self.color)} {self.color} {self.shape} {_AT[self.position]}"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "position": self.position,
                "dx": round(self.dx, 4), "dy": round(self.dy, 4), "scale": round(self.scale, 4)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        return cls(**data)


@dataclass(frozen=True)
class Motion:
    """One shape moving in a straight line across a clip.

    Args:
        shape / color: as for ``SceneObject``.
        direction: one of ``DIRECTIONS``.
        start / end: centre ``(x, y)`` in the first and the last frame, as fractions of the side.
        scale: size relative to the standard radius.
    """

    shape: str
    color: str
    direction: str
    start: tuple[float, float]
    end: tuple[float, float]
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLORS, "color")
        _check(self.direction, DIRECTIONS, "direction")

    @property
    def key(self) -> MotionKey:
        return (self.color, self.shape, self.direction)

    def center(self, t: float) -> tuple[float, float]:
        """Centre at time ``t`` in ``[0, 1]`` (linear motion)."""
        return (self.start[0] + t * (self.end[0] - self.start[0]), self.start[1] + t * (self.end[1] - self.start[1]))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "direction": self.direction,
                "start": [round(v, 4) for v in self.start], "end": [round(v, 4) for v in self.end],
                "start_position": cell_of(*self.start), "end_position": cell_of(*self.end),
                "scale": round(self.scale, 4)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Motion:
        return cls(shape=data["shape"], color=data["color"], direction=data["direction"],
                   start=tuple(data["start"]), end=tuple(data["end"]), scale=data.get("scale", 1.0))


def cell_of(x: float, y: float) -> str:
    """Grid cell (one of ``POSITIONS``) that contains the point ``(x, y)`` in ``[0, 1]²``."""
    col = min(2, max(0, int(x * 3)))
    row = min(2, max(0, int(y * 3)))
    return POSITIONS[3 * row + col]


# -- sampling --------------------------------------------------------------------------------------


def sample_object(rng: random.Random, *, exclude_positions: Iterable[str] = (), key: ObjectKey | None = None
                  ) -> SceneObject:
    """A random object in a free cell (or with the given ``(color, shape, position)``), jittered."""
    if key is None:
        free = [p for p in POSITIONS if p not in set(exclude_positions)]
        if not free:
            raise ValueError("no free grid cell left for another object")
        key = (rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(free))
    color, shape, position = key
    return SceneObject(shape=shape, color=color, position=position, dx=rng.uniform(-_JITTER, _JITTER),
                       dy=rng.uniform(-_JITTER, _JITTER), scale=rng.uniform(*_SCALES))


def sample_scene(rng: random.Random, num_objects: int | None = None, *, first: ObjectKey | None = None
                 ) -> list[SceneObject]:
    """One or two objects in distinct cells.

    Args:
        rng: the random source (``random.Random``).
        num_objects: 1 or 2; ``None`` picks one of them with equal chance.
        first: force the first object's ``(color, shape, position)``.
    """
    n = num_objects if num_objects is not None else rng.choice((1, 2))
    if n not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {n!r}")
    objects = [sample_object(rng, key=first)]
    while len(objects) < n:
        objects.append(sample_object(rng, exclude_positions=[o.position for o in objects]))
    return objects


def sample_motion(rng: random.Random, *, key: MotionKey | None = None) -> Motion:
    """One shape crossing two thirds of the frame left, right, up or down, on a random row / column."""
    if key is None:
        key = (rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)))
    color, shape, direction = key
    ux, uy = DIRECTIONS[direction]
    lane = (rng.randrange(3) + 0.5 + rng.uniform(-_JITTER, _JITTER)) / 3  # the row (or column) it moves along
    a = (0.5 + rng.uniform(-_JITTER, _JITTER)) / 3  # start, one sixth from the edge it leaves
    b = (2.5 + rng.uniform(-_JITTER, _JITTER)) / 3
    along = (a, b) if ux + uy > 0 else (b, a)
    if ux:
        start, end = (along[0], lane), (along[1], lane)
    else:
        start, end = (lane, along[0]), (lane, along[1])
    return Motion(shape=shape, color=color, direction=direction, start=start, end=end, scale=rng.uniform(*_SCALES))


# -- rendering -------------------------------------------------------------------------------------


def _draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, color: tuple[int, int, int], cx: float, cy: float,
                r: float) -> None:
    if shape == "circle":
        r *= 0.95
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        h = r * 0.85  # about the circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=color)
    else:  # an upward equilateral triangle, a bit larger (it covers less of its circle), its box centred
        big = r * 1.2
        top, base, half = cy - 0.75 * big, cy + 0.75 * big, big * math.sqrt(3) / 2
        draw.polygon([(cx, top), (cx - half, base), (cx + half, base)], fill=color)


def _canvas(size: int, supersample: int, background: tuple[int, int, int]
            ) -> tuple[PIL.Image.Image, PIL.ImageDraw.ImageDraw]:
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    image = PIL.Image.new("RGB", (size * supersample, size * supersample), background)
    return image, PIL.ImageDraw.Draw(image)


def _finish(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    # drawn large and reduced with a box filter: anti-aliased edges, byte-identical on every machine
    return image if image.width == size else image.reduce(image.width // size)


def render_scene(objects: Sequence[SceneObject], size: int = 64, *, background: tuple[int, int, int] = BACKGROUND,
                 supersample: int = 4) -> PIL.Image.Image:
    """Draw the objects on a plain background.

    Args:
        objects: the scene (later objects are drawn on top).
        size: the image side in pixels.
        background: RGB of the background.
        supersample: draw at ``size * supersample`` and reduce, for smooth edges.

    Returns:
        An RGB ``PIL.Image`` of ``size × size``.
    """
    image, draw = _canvas(size, supersample, background)
    side = size * supersample
    for obj in objects:
        cx, cy = obj.center
        _draw_shape(draw, obj.shape, COLORS[obj.color], cx * side, cy * side, _RADIUS * obj.scale * side)
    return _finish(image, size)


def render_motion(motion: Motion, frames: int = 9, size: int = 64, *, background: tuple[int, int, int] = BACKGROUND,
                  supersample: int = 4) -> list[PIL.Image.Image]:
    """The clip of ``motion``: ``frames`` RGB images, the first at ``start`` and the last at ``end``."""
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    out = []
    for t in range(frames):
        image, draw = _canvas(size, supersample, background)
        side = size * supersample
        cx, cy = motion.center(t / max(1, frames - 1))
        _draw_shape(draw, motion.shape, COLORS[motion.color], cx * side, cy * side, _RADIUS * motion.scale * side)
        out.append(_finish(image, size))
    return out


# -- captions --------------------------------------------------------------------------------------


def caption(objects: Sequence[SceneObject]) -> str:
    """Canonical caption: ``"a red circle at the top left and a blue square at the bottom right"``.

    Objects are described in reading order (by grid cell), so a scene has exactly one caption.
    """
    if not objects:
        return "an empty picture"
    ordered = sorted(objects, key=lambda o: (POSITIONS.index(o.position), o.color, o.shape))
    return " and ".join(o.describe() for o in ordered)


_COLOR_RE = "|".join(sorted(COLORS, key=len, reverse=True))
_SHAPE_RE = "|".join(SHAPES)
_PHRASES = {phrase: position for position, phrase in _AT.items()}
_PHRASE_RE = "|".join(re.escape(p) for p in sorted(_PHRASES, key=len, reverse=True))
_OBJECT_RE = re.compile(rf"\b(?:an?\s+)?({_COLOR_RE})\s+({_SHAPE_RE})s?\s+({_PHRASE_RE})\b")
_MOTION_RE = re.compile(rf"\b(?:an?\s+)?({_COLOR_RE})\s+({_SHAPE_RE})\s+moves\s+(?:to\s+the\s+)?(left|right|up|down)\b")


def cell_box(position: str) -> tuple[float, float, float, float]:
    """The grid cell ``position`` names, as ``(x0, y0, x1, y1)`` fractions of the picture (a region's box for
    ``AnyGen.generate(regions=...)``)."""
    row, col = divmod(POSITIONS.index(_check(position, POSITIONS, "position")), 3)
    return col / 3, row / 3, (col + 1) / 3, (row + 1) / 3


def layout_regions(objects: Sequence[SceneObject], margin: float = 0.0
                   ) -> list[tuple[str, tuple[float, float, float, float]]]:
    """A scene as regional prompts: each object's own caption over its cell (``anygen eval --regions layout``), the
    layout a planner would hand the model for ``caption(objects)``; ``margin`` grows each box by that fraction of
    the picture on every side (clipped to it): a drawn object may reach past its cell's edge."""
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin is a fraction of the picture from 0 to 0.5, got {margin!r}")
    def grown(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        return max(0.0, x0 - margin), max(0.0, y0 - margin), min(1.0, x1 + margin), min(1.0, y1 + margin)
    return [(caption([o]), grown(cell_box(o.position))) for o in objects]


def parse_caption(text: str) -> list[SceneObject]:
    """Objects named in a caption, in the order they appear (inverse of ``caption``).

    Every ``"<colour> <shape> <where>"`` phrase is read (``"a red circle at the top left"``); the
    rest of the text is ignored. Text with no such phrase gives ``[]``, so a malformed caption from a
    model scores as wrong instead of raising.
    """
    return split_caption(text)[0]


def split_caption(text: str) -> tuple[list[SceneObject], list[str]]:
    """``parse_caption``'s objects and the text around them: ``len(objects) + 1`` pieces of the lower-cased,
    whitespace-collapsed ``text``, the one before the first object phrase, those between, and the one after."""
    normal = " ".join(str(text).lower().split())
    objects, pieces, end = [], [], 0
    for m in _OBJECT_RE.finditer(normal):
        pieces.append(normal[end:m.start()])
        objects.append(SceneObject(shape=m.group(2), color=m.group(1), position=_PHRASES[m.group(3)]))
        end = m.end()
    return objects, [*pieces, normal[end:]]


def motion_caption(motion: Motion) -> str:
    """``"a green triangle moves to the right"``."""
    return f"{article(motion.color)} {motion.color} {motion.shape} {_MOVES[motion.direction]}"


def parse_motion(text: str) -> MotionKey | None:
    """``(color, shape, direction)`` of the first motion phrase in ``text``, or ``None``."""
    m = _MOTION_RE.search(" ".join(str(text).lower().split()))
    return (m.group(1), m.group(2), m.group(3)) if m else None


_RECOLOR_RE = re.compile(rf"^make\s+the\s+(?:({_COLOR_RE})\s+)?({_SHAPE_RE})(?:\s+({_PHRASE_RE}))?\s+({_COLOR_RE})$")
_WHERE_RE = re.compile(rf"\b({_PHRASE_RE})\b")


def parse_recolor(instruction: str) -> tuple[str, str | None, str | None, str] | None:
    """``(shape, colour named or None, position named or None, new colour)`` of a recolouring instruction as
    ``refer`` and the edit documents word it (``"make the red circle yellow"``, ``"make the circle at the top left
    blue"``), or ``None`` when ``instruction`` is not one."""
    m = _RECOLOR_RE.match(" ".join(str(instruction).lower().split()))
    if m is None:
        return None
    return m.group(2), m.group(1), _PHRASES[m.group(3)] if m.group(3) else None, m.group(4)


def parse_where(text: str) -> str | None:
    """The grid cell the first place phrase of ``text`` names (``"at the bottom left"`` → ``"bottom left"``; the
    answers of ``"where is …?"``), or ``None``."""
    m = _WHERE_RE.search(" ".join(str(text).lower().split()))
    return _PHRASES[m.group(1)] if m else None


def refer(obj: SceneObject, objects: Sequence[SceneObject], *, use_color: bool = True,
          use_position: bool = True) -> str | None:
    """The shortest phrase that picks ``obj`` out of ``objects`` (``"the circle"``, ``"the red circle"``,
    ``"the circle at the top left"``), or ``None`` when the allowed attributes cannot."""
    others = [o for o in objects if o is not obj]
    if all(o.shape != obj.shape for o in others):
        return f"the {obj.shape}"
    if use_color and all((o.color, o.shape) != (obj.color, obj.shape) for o in others):
        return f"the {obj.color} {obj.shape}"
    if use_position:
        return f"the {obj.shape} {_AT[obj.position]}"
    return None


# -- documents -------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What a document builder needs besides its RNG."""

    image_size: int
    video_size: int
    frames: int
    fps: float
    out: Path
    stem: str  # path stem of this document's files, relative to out: "images/train/000/000123"
    clip_format: str = "mp4"  # one of CLIP_FORMATS
    first_object: ObjectKey | None = None  # force a held-out object into the document
    first_motion: MotionKey | None = None
    assets: list[tuple[str, Any]] = field(default_factory=list)  # (relative path, scene or motion) to write

    def image(self, objects: Sequence[SceneObject], n: int) -> str:
        rel = f"{self.stem}_{n}.png"
        self.assets.append((rel, list(objects)))
        return rel

    def clip(self, motion: Motion) -> str:
        rel = f"{self.stem.replace('images/', 'videos/', 1)}.{self.clip_format}"
        self.assets.append((rel, motion))
        return rel

    def write(self) -> None:
        """Render and save the files of the accepted draw."""
        for rel, what in self.assets:
            path = self.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(what, Motion):
                write_clip(path, render_motion(what, self.frames, self.video_size), self.fps)
            else:
                render_scene(what, self.image_size).save(path, format="PNG")


def write_clip(path: Path, frames: Sequence[PIL.Image.Image], fps: float, *, crf: int = 12) -> Path:
    """Write PIL frames as the suffix of ``path`` says (``CLIP_FORMATS``), byte-identical for identical frames.

    ``.mp4``: H.264 through ``write_video`` at ``crf`` (needs PyAV). ``.apng``: lossless animated PNG through
    ``write_apng`` (Pillow only).
    """
    import torch

    from tokenizers_mm.preprocess import to_tensor
    from tokenizers_mm.video_io import write_apng, write_video

    clip = torch.stack([to_tensor(frame) for frame in frames], dim=1)  # (3, T, H, W)
    if path.suffix == ".apng":
        return write_apng(path, clip, fps)
    return write_video(path, clip, fps, crf=crf)


def _edit(rng: random.Random, objects: list[SceneObject], *, ops: Sequence[str] = ("recolor", "move", "add", "remove")
          ) -> tuple[str, list[SceneObject], dict[str, Any]]:
    """One edit of a scene: ``(instruction, edited objects, what was done)``."""
    allowed = [op for op in ops if not (op == "add" and len(objects) >= 2 or op == "remove" and len(objects) < 2)]
    op = rng.choice(allowed)
    taken = [o.position for o in objects]
    if op == "add":
        new = sample_object(rng, exclude_positions=taken)
        return f"add {new.describe()}", objects + [new], {"op": "add", "object": new.to_dict()}
    target = rng.randrange(len(objects))
    obj = objects[target]
    ref = refer(obj, objects)
    if op == "remove":
        return f"remove {ref}", objects[:target] + objects[target + 1:], {"op": "remove", "target": target}
    if op == "recolor":
        color = rng.choice([c for c in COLORS if c != obj.color])
        new = SceneObject(obj.shape, color, obj.position, obj.dx, obj.dy, obj.scale)
        done = {"op": "recolor", "target": target, "color": color}
        instruction = f"make {ref} {color}"
    else:
        position = rng.choice([p for p in POSITIONS if p not in taken])
        new = SceneObject(obj.shape, obj.color, position, obj.dx, obj.dy, obj.scale)
        done = {"op": "move", "target": target, "position": position}
        instruction = f"move {ref} to the {position}"
    return instruction, objects[:target] + [new] + objects[target + 1:], done


def _question(rng: random.Random, objects: list[SceneObject]) -> tuple[str, str, str]:
    """A question about the scene and its one-word / one-phrase answer: ``(type, question, answer)``."""
    obj = rng.choice(objects)
    kinds = ["color", "shape", "count"]
    where = refer(obj, objects, use_position=False)
    if where is not None:
        kinds.append("where")
    kind = rng.choice(kinds)
    if kind == "color":
        return kind, f"what color is {refer(obj, objects, use_color=False)}?", obj.color
    if kind == "shape":
        return kind, f"what shape is {_AT[obj.position]}?", obj.shape
    if kind == "where":
        return kind, f"where is {where}?", _AT[obj.position]
    return kind, "how many shapes are there?", _NUMBERS[len(objects)]


def _scene_keys(*scenes: Sequence[SceneObject]) -> set[ObjectKey]:
    return {o.key for scene in scenes for o in scene}


def _build(kind: str, rng: random.Random, ctx: _Context) -> tuple[list[dict], dict, set[ObjectKey], set[MotionKey]]:
    """Segments, ground truth and the combinations used by one document of ``kind``."""
    if kind in ("video", "video_caption"):
        motion = sample_motion(rng, key=ctx.first_motion)
        text, clip = motion_caption(motion), ctx.clip(motion)
        segments = [{"text": text}, {"video": clip}] if kind == "video" else [{"video": clip}, {"text": text}]
        meta = {"motion": motion.to_dict(), "caption": text, "frames": ctx.frames, "fps": ctx.fps}
        return segments, meta, set(), {motion.key}
    if kind in ("t2i", "caption", "vqa"):
        objects = sample_scene(rng, first=ctx.first_object)
        image, text = ctx.image(objects, 0), caption(objects)
        meta: dict[str, Any] = {"objects": [o.to_dict() for o in objects], "caption": text}
        if kind == "t2i":
            segments = [{"text": text}, {"image": image}]
        elif kind == "caption":
            segments = [{"understand": image}, {"text": text}]
        else:
            qtype, question, answer = _question(rng, objects)
            segments = [{"understand": image}, {"text": question}, {"text": answer}]
            meta.update(question_type=qtype, question=question, answer=answer)
        return segments, meta, _scene_keys(objects), set()
    if kind == "edit":
        before = sample_scene(rng, first=ctx.first_object)
        instruction, after, done = _edit(rng, before)
        segments = [{"image": ctx.image(before, 0)}, {"text": instruction}, {"image": ctx.image(after, 1)}]
        meta = {"before": [o.to_dict() for o in before], "after": [o.to_dict() for o in after],
                "instruction": instruction, "edit": done, "caption": caption(after)}
        return segments, meta, _scene_keys(before, after), set()
    if kind == "story":
        first = sample_object(rng, key=ctx.first_object)
        scenes = [[first]]
        steps = [f"draw {first.describe()}"]
        second = sample_object(rng, exclude_positions=[first.position])
        scenes.append([first, second])
        steps.append(f"then add {second.describe()}")
        if rng.random() < 0.5:
            instruction, edited, _ = _edit(rng, scenes[-1], ops=("recolor", "move"))
            scenes.append(edited)
            steps.append(f"then {instruction}")
        segments = []
        for n, (step, scene) in enumerate(zip(steps, scenes)):
            segments += [{"text": step}, {"image": ctx.image(scene, n)}]
        answer = caption(scenes[-1])
        segments += [{"text": ASK_CAPTION}, {"text": answer}]
        meta = {"steps": [{"instruction": s, "objects": [o.to_dict() for o in sc]} for s, sc in zip(steps, scenes)],
                "caption": answer}
        return segments, meta, _scene_keys(*scenes), set()
    raise ValueError(f"unknown document kind {kind!r}; accepted: {', '.join(KINDS)}")


@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    kind: str
    seed: int
    image_size: int
    video_size: int
    frames: int
    fps: float
    out: str
    heldout_objects: frozenset
    heldout_motions: frozenset
    clip_format: str = "mp4"


def _make_document(job: _Job) -> str:
    """Render one document's files and return its JSONL line (runs in worker processes)."""
    rng = random.Random(f"shapes:{job.seed}:{job.split}:{job.index}")
    stem = f"images/{job.split}/{job.index // 1000:03d}/{job.index:06d}"
    ctx = _Context(job.image_size, job.video_size, job.frames, job.fps, Path(job.out), stem, job.clip_format)
    heldout = job.split == "heldout"
    for _ in range(1000):
        if heldout:  # force one held-out combination of the kind's type into the document
            if job.kind in ("video", "video_caption"):
                ctx.first_motion = rng.choice(sorted(job.heldout_motions))
            else:
                ctx.first_object = rng.choice(sorted(job.heldout_objects))
        ctx.assets.clear()
        segments, meta, objects, motions = _build(job.kind, rng, ctx)
        touches = bool(objects & job.heldout_objects or motions & job.heldout_motions)
        if touches == heldout:
            break
    else:  # pragma: no cover - needs a held-out fraction near 1, which generate_shapes refuses
        raise RuntimeError(f"could not draw a {job.split} {job.kind!r} document in 1000 tries")
    ctx.write()
    doc = {"id": f"shapes-{job.split}-{job.index:06d}", "segments": segments,
           "meta": {"kind": job.kind, "split": job.split, **meta}}
    return json.dumps(doc, ensure_ascii=False)


def parse_kinds(spec: str | Sequence[str] | dict[str, float] | None, accepted: Sequence[str] = KINDS,
                default: dict[str, float] | None = None) -> dict[str, float]:
    """``"t2i,caption:2"`` → ``{"t2i": 1.0, "caption": 2.0}``: document kinds and their weights."""
    if spec is None:
        return dict(default if default is not None else DEFAULT_KINDS)
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        items = []
        for part in (p.strip() for p in parts):
            if not part:
                continue
            name, _, weight = part.partition(":")
            try:
                items.append((name.strip(), float(weight) if weight else 1.0))
            except ValueError:
                raise ValueError(f"kind weight in {part!r} is not a number; write KIND or KIND:WEIGHT") from None
    kinds: dict[str, float] = {}
    for name, weight in items:
        _check(name, accepted, "document kind")
        if not weight > 0:
            raise ValueError(f"kind {name!r} needs a positive weight, got {weight}")
        kinds[name] = float(weight)
    if not kinds:
        raise ValueError(f"no document kinds given; accepted: {', '.join(accepted)}")
    return kinds


def allocate(num: int, weights: dict[str, float], rng: random.Random) -> list[str]:
    """``num`` kinds in proportion to ``weights`` (largest remainder), in a seeded random order."""
    total = sum(weights.values())
    exact = {k: num * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], list(weights).index(k)))[:num - sum(counts.values())]:
        counts[k] += 1
    order = [k for k in weights for _ in range(counts[k])]
    rng.shuffle(order)
    return order


def holdout_combinations(fraction: float, seed: int) -> tuple[frozenset[ObjectKey], frozenset[MotionKey]]:
    """The held-out ``(color, shape, position)`` triples and ``(color, shape, direction)`` motions of a seed."""
    if not 0 <= fraction <= 0.5:
        raise ValueError(f"holdout must lie in [0, 0.5] (a fraction of attribute combinations), got {fraction!r}")
    rng = random.Random(f"shapes:{seed}:holdout")
    objects = [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    motions = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    pick = (lambda pool: frozenset(rng.sample(pool, max(1, round(fraction * len(pool)))))) if fraction > 0 else (
        lambda pool: frozenset())
    return pick(objects), pick(motions)


def _run_jobs(jobs: list, fn: Callable[[Any], str], workers: int, progress: bool, desc: str) -> Iterable[str]:
    """``fn`` over ``jobs`` in order, in ``workers`` spawned processes (1: in this process)."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="doc", disable=not progress)
    try:
        if workers <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
            return
        # spawn: safe with torch and threads in the parent, the same on every platform
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for line in pool.imap(fn, jobs, chunksize=16):
                yield line
                bar.update()
    finally:
        bar.close()


def _check_frames(frames: int) -> None:
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 1 + 4k (1, 5, 9, 17, ...) for the causal video tokenizer, got {frames!r}")


def generate_shapes(
    out: str | Path,
    *,
    num: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    video_size: int | None = None,
    frames: int = 9,
    fps: float = 8.0,
    clip_format: str = "mp4",
    kinds: str | Sequence[str] | dict[str, float] | None = None,
    holdout: float = 0.1,
    num_heldout: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the shapes data set to ``out``.

    Args:
        out: output directory (created; must be empty unless ``overwrite``).
        num: training documents, written to ``documents.jsonl``.
        seed: everything (kinds, scenes, the held-out combinations) follows from it.
        image_size: side of the PNG images.
        video_size: side of the clips; ``None`` uses ``image_size``.
        frames: frames per clip, ``1 + 4k``.
        fps: frame rate stored in the clips.
        clip_format: ``"mp4"`` (H.264 at crf 12, through PyAV) or ``"apng"`` (lossless animated PNG through
            Pillow: for machines without PyAV / FFmpeg; about the size of the mp4s for these flat scenes).
        kinds: document kinds with optional weights, ``"t2i,caption:2"``; ``None`` uses ``DEFAULT_KINDS``.
        holdout: fraction of attribute combinations withheld from training, in ``[0, 0.5]``.
        num_heldout: documents of ``heldout.jsonl``; ``None`` uses ``round(num * holdout)``.
        workers: processes that render files (1: this process).
        overwrite: replace a data set already in ``out``.
        progress: show a tqdm bar.

    Returns:
        The content of ``meta.json``: counts per split and kind, the attribute vocabulary and the
        held-out combinations.
    """
    out = Path(out)
    for name, value, low in (("num", num, 0), ("image_size", image_size, 8), ("workers", workers, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    video_size = image_size if video_size is None else video_size
    if not isinstance(video_size, int) or video_size < 8 or video_size % 2:
        raise ValueError(f"video_size must be an even int >= 8 (H.264 needs even sides), got {video_size!r}")
    _check_frames(frames)
    if clip_format not in CLIP_FORMATS:
        raise ValueError(f"clip_format must be one of {', '.join(CLIP_FORMATS)}, got {clip_format!r}")
    if not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    weights = parse_kinds(kinds)
    heldout_objects, heldout_motions = holdout_combinations(holdout, seed)
    if num_heldout is None:
        num_heldout = max(1, round(num * holdout)) if holdout > 0 and num > 0 else 0
    if num_heldout and not holdout:
        raise ValueError("num_heldout > 0 needs holdout > 0: there are no held-out combinations to draw from")
    prepare_dataset_dir(out, overwrite, ("images", "videos", "documents.jsonl", "heldout.jsonl", "meta.json"))

    rng = random.Random(f"shapes:{seed}:kinds")
    counts: dict[str, dict[str, int]] = {}
    jobs: list[_Job] = []
    for split, n in (("train", num), ("heldout", num_heldout)):
        order = allocate(n, weights, rng)
        counts[split] = {k: order.count(k) for k in weights}
        jobs += [_Job(split, i, kind, seed, image_size, video_size, frames, float(fps), str(out),
                      heldout_objects, heldout_motions, clip_format) for i, kind in enumerate(order)]
    with open(out / "documents.jsonl", "w", encoding="utf-8") as train, \
            open(out / "heldout.jsonl", "w", encoding="utf-8") as held:
        for job, line in zip(jobs, _run_jobs(jobs, _make_document, workers, progress, "shapes")):
            (train if job.split == "train" else held).write(line + "\n")

    meta = {
        "generator": "shapes",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "video_size": video_size,
        "frames": frames,
        "fps": float(fps),
        "clip_format": clip_format,
        "files": {"train": "documents.jsonl", "heldout": "heldout.jsonl"},
        "num": {"train": num, "heldout": num_heldout},
        "kinds": counts,
        "weights": weights,
        "vocabulary": {
            "shapes": list(SHAPES),
            "colors": {k: list(v) for k, v in COLORS.items()},
            "positions": list(POSITIONS),
            "position_phrases": dict(_AT),
            "directions": list(DIRECTIONS),
            "background": list(BACKGROUND),
        },
        "holdout": {
            "fraction": holdout,
            "objects": [list(k) for k in sorted(heldout_objects)],
            "motions": [list(k) for k in sorted(heldout_motions)],
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def scene_from_meta(objects: Iterable[dict[str, Any]]) -> list[SceneObject]:
    """``SceneObject``s back from a document's ``meta["objects"]`` (or ``before`` / ``after``)."""
    return [SceneObject.from_dict(o) for o in objects]


__all__ = [
    "BACKGROUND", "CLIP_FORMATS", "COLORS", "DEFAULT_KINDS", "DIRECTIONS", "KINDS", "POSITIONS", "SHAPES",
    "Motion", "SceneObject", "allocate", "caption", "cell_box", "cell_of", "generate_shapes", "holdout_combinations",
    "layout_regions",
    "motion_caption", "parse_caption", "parse_kinds", "parse_motion", "parse_recolor", "parse_where", "refer",
    "render_motion", "render_scene", "split_caption",
    "sample_motion", "sample_object", "sample_scene", "scene_from_meta", "write_clip",
]
