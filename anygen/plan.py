"""Planning: a prompt turned into what to draw where, before anything is drawn.

What it owns: the planner step of LLM-grounded diffusion and RPG (a layout of boxes, each under the text of what
goes there, handed to the image model), for the world the default model was trained on: scenes of coloured
shapes in a 3×3 grid, captioned as ``anygen data shapes`` writes them ("a red circle at the top left and a blue
square at the bottom right").

- ``plan_objects`` / ``plan_regions`` / ``plan_layout``: a scene prompt read into each object's caption over its
  cell grown by ``PLAN_MARGIN``, and (``Layout``) an empty scene to compose them onto: what ``AnyGen.generate``
  composes (``regions=`` and ``canvas=``), each object drawn alone. The shipped model draws both objects of a
  held-out two-object prompt for 22.5 % of 360 prompts from the text alone and 80.8 % of 720 planned so (``anygen
  eval --regions layout --canvas blank``, ``docs/default_model.md``).
- ``plan_edits`` / ``EditPlan`` / ``empty_like``: the same step for an edit ("make the circle yellow" given a
  picture): the cell to redraw, from the instruction where it names one, else from the model's own reading of the
  picture (its reranked caption, else its answer to "where is the circle?"), redrawn under the edited object's
  caption (``generate(inpaint=..., regions=..., canvas=...)``).

``anygen generate --plan``, the demo's "plan the regions (and an edit's box) from the prompt" button, the quick
start's text → image picture and ``anygen eval`` (``--regions layout`` on the text → image rows, ``--inpaint
asked``) use it. A model trained on other pictures needs another planner (an LLM writing the boxes); the regions,
boxes and canvas it hands ``generate`` are the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image

from anygen.data.shapes import (
    BACKGROUND,
    POSITIONS,
    SceneObject,
    caption,
    cell_box,
    layout_regions,
    parse_caption,
    parse_recolor,
    parse_where,
    render_scene,
    split_caption,
)
from tokenizers_mm.segments import Understand

# how far each planned box reaches past its cell, as a fraction of the picture (a quarter of a cell): drawn alone
# onto an empty scene an object is cut off, or left out, where it would reach past its cell (seed 1, 120 pairs:
# 59.2 % exact with the cells as they are, 64.2 % grown by this)
PLAN_MARGIN = 1 / 12
# captions drawn (and reranked) to find an edit's object: on 240 held-out edits (seeds 0-1) the caption then the
# "where is" answer found the right cell for 90.0 % at 8 and 92.1 % at 16, the answer alone 71.3 %
ASK_BEST_OF = 8
# what may stand between the object phrases of a plannable prompt
_JOINERS = re.compile(r"(?:\s|,|;|\.|\band\b)*")
EXAMPLE = "a red circle at the top left and a blue square at the bottom right"


@dataclass(frozen=True)
class Layout:
    """A planned picture: ``objects`` as read from the prompt, ``regions`` (each object's caption over its grown
    cell, ``generate(regions=...)``) and ``canvas`` (the empty scene they are composed onto,
    ``generate(canvas=...)``)."""

    objects: tuple[SceneObject, ...]
    regions: list[tuple[str, tuple[float, float, float, float]]]
    canvas: PIL.Image.Image

    def kwargs(self) -> dict[str, Any]:
        """``generate``'s arguments for this layout: ``engine.generate(prompt, start_with="image",
        **layout.kwargs())``."""
        return {"regions": self.regions, "canvas": self.canvas}


def plan_objects(prompt: str) -> list[SceneObject]:
    """The objects a scene prompt names, in its order: every ``"<colour> <shape> <where>"`` phrase, with nothing
    else in the prompt but ``and``, commas and full stops between them.

    Raises:
        ValueError: ``prompt`` is not a str, names no object, holds other text (what is left is quoted), or puts
            two objects in one cell.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"a layout is planned from a text prompt, got {type(prompt).__name__}")
    objects, rest = split_caption(prompt)
    accepted = (f"objects as '<colour> <shape> <where>' joined by 'and' or commas, e.g. {EXAMPLE!r} (a place is "
                f"one of {', '.join(POSITIONS)}, said as 'at the top left', 'on the right', 'in the center', ...)")
    if not objects:
        raise ValueError(f"no object to plan in {prompt!r:.200}: the planner reads {accepted}")
    left = [piece.strip() for piece in rest if not _JOINERS.fullmatch(piece)]
    if left:
        raise ValueError(f"the planner cannot place {left[0]!r:.100} in {prompt!r:.200}: it reads {accepted}, and "
                         "nothing else (draw such a prompt without a plan, or give regions yourself)")
    cells = [o.position for o in objects]
    if len(set(cells)) != len(cells):
        twice = next(c for c in cells if cells.count(c) > 1)
        raise ValueError(f"{prompt!r:.200} puts two objects at the {twice}: a planned cell holds one object")
    return objects


def plan_regions(prompt: str, margin: float = PLAN_MARGIN) -> list[tuple[str, tuple[float, float, float, float]]]:
    """A scene prompt's regions (``plan_objects``): each object's caption over its cell grown by ``margin`` (a
    fraction of the picture), in the prompt's order.

    Raises:
        ValueError: the prompt cannot be planned (``plan_objects``), or ``margin`` is not a number in [0, 0.5).
    """
    return _regions(plan_objects(prompt), margin)


def _regions(objects: Sequence[SceneObject], margin: Any) -> list[tuple[str, tuple[float, float, float, float]]]:
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise ValueError(f"margin is a fraction of the picture from 0 to 0.5, got {margin!r}")
    return layout_regions(objects, margin)


def plan_layout(prompt: str, size: int, margin: float = PLAN_MARGIN) -> Layout:
    """The layout of a scene prompt: its regions (``plan_regions``) and an empty ``size``×``size`` scene to
    compose them onto.

    Raises:
        ValueError: the prompt cannot be planned (``plan_objects``), ``size`` is not a positive int, or ``margin``
            is not a number in [0, 0.5).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size is the canvas's side in pixels, a positive int, got {size!r}")
    objects = plan_objects(prompt)
    return Layout(tuple(objects), _regions(objects, margin), render_scene([], size))


@dataclass(frozen=True)
class EditPlan:
    """A planned recolouring: the ``cell`` to redraw (``box``, ``generate(inpaint=...)``; None when no cell was
    found, ``found`` False) under the edited object's caption (``regions``), what the cell was read from
    (``read_from``: ``"instruction"``, ``"layout"`` (given by the caller), ``"caption: <the model's caption>"`` or
    ``"where is ...? <its answer>"``), and ``scene``, the edited picture as the plan knows it (the caption's objects,
    the edited one in its new colour; only the edited object when the caption was not read), what a drawn edit can
    be read back against (``score_candidates``)."""

    cell: str | None
    box: tuple[float, float, float, float] | None
    regions: list[tuple[str, tuple[float, float, float, float]]]
    read_from: str
    scene: list[SceneObject]

    @property
    def found(self) -> bool:
        """Whether a cell was found: what ``kwargs`` needs."""
        return self.cell is not None

    def kwargs(self, canvas: PIL.Image.Image | None = None) -> dict[str, Any]:
        """``generate``'s arguments for this edit: ``engine.generate([picture, instruction], start_with="image",
        **plan.kwargs(empty_like(picture)))``. With ``canvas`` (an empty picture of the edited one's size) the
        edited object is drawn alone onto it, then put into its cell (``generate(canvas=..., inpaint=...)``; the
        shipped model's edits planned so: 73.9 % of 720 held-out edits; 74.4 % of 360 against 70.6 % drawn
        in place, ``docs/default_model.md``); without, the cell is redrawn in place, reading the picture around it.

        Raises:
            ValueError: no cell was found (what the model read is quoted): give the box yourself.
        """
        if not self.found:
            raise ValueError(f"no cell was found for this edit (read from {self.read_from!r:.200}): give the box "
                             "yourself (inpaint=...)")
        return {"inpaint": self.box, "regions": self.regions, **({} if canvas is None else {"canvas": canvas})}


def empty_like(picture: PIL.Image.Image) -> PIL.Image.Image:
    """An empty scene (the shapes world's plain background) of ``picture``'s size: the canvas an edit's object is
    drawn alone onto (``EditPlan.kwargs``)."""
    if not isinstance(picture, PIL.Image.Image):
        raise ValueError(f"empty_like takes the picture being edited (a PIL.Image), got {type(picture).__name__}")
    return PIL.Image.new("RGB", picture.size, BACKGROUND)


def parse_edit(instruction: str) -> tuple[str, str | None, str | None, str]:
    """A recolouring the planner reads, as ``shapes.parse_recolor`` gives it: ``(shape, colour named or None, place
    named or None, new colour)``.

    Raises:
        ValueError: ``instruction`` is not worded "make the [<colour>] <shape> [<where>] <new colour>".
    """
    parsed = parse_recolor(instruction) if isinstance(instruction, str) else None
    if parsed is None:
        raise ValueError(f"the planner reads recolourings worded 'make the [<colour>] <shape> [<where>] <new "
                         f"colour>' (e.g. 'make the circle yellow'), got {instruction!r:.200}")
    return parsed


def edit_plan(instruction: str, cell: str | None, read_from: str | None,
              objects: Sequence[SceneObject] = ()) -> EditPlan:
    """The plan of recolouring ``instruction`` at ``cell`` (None: not found) in a picture of ``objects`` (as
    known; the cell's own object is replaced by the edited one).

    Raises:
        ValueError: ``instruction`` is not a recolouring (``parse_edit``).
    """
    shape, _, _, color = parse_edit(instruction)
    if cell is None:
        return EditPlan(None, None, [], read_from or "", [])
    edited = SceneObject(shape, color, cell)
    scene = [o for o in objects if o.position != cell] + [edited]
    return EditPlan(cell, cell_box(cell), [(caption([edited]), cell_box(cell))], read_from or "", scene)


Generate = Callable[..., list]


def plan_edits(engine: Any, pictures: Sequence[PIL.Image.Image], instructions: Sequence[str], *,
               seed: int | None = None, generate: Generate | None = None) -> list[EditPlan]:
    """Plan each recolouring ``instructions[i]`` of ``pictures[i]`` with nothing else given: the cell the
    instruction names ("make the circle at the top left blue"), else that of the first object of its shape (and
    colour, where named) in the model's own caption of the picture (``best_of`` ``ASK_BEST_OF``, reranked by the
    generation path), else the cell its understanding path answers to ``"where is the <colour> <shape>?"``.

    ``generate`` (default: ``engine.generate`` at ``seed``) draws the captions and answers, one list of outputs per
    batch of prompts (``anygen eval`` passes its own, batched and seeded as the rest of its run). An edit whose
    answer names no place gets a plan with ``found`` False, its ``read_from`` saying what the model answered.

    Raises:
        ValueError: ``pictures`` / ``instructions`` are not lists of as many PIL images and str, an instruction is
            not a recolouring (``parse_edit``), or the model has no understanding encoder to read the pictures with.
    """
    if isinstance(instructions, str) or isinstance(pictures, PIL.Image.Image):
        raise ValueError("plan_edits takes lists: pictures=[picture, ...], instructions=[text, ...] (one each per "
                         "edit)")
    if len(pictures) != len(instructions):
        raise ValueError(f"plan_edits needs one instruction per picture, got {len(instructions)} for "
                         f"{len(pictures)}")
    for n, (picture, text) in enumerate(zip(pictures, instructions)):
        if not isinstance(picture, PIL.Image.Image):
            raise ValueError(f"edit #{n}: the picture must be a PIL.Image, got {type(picture).__name__}")
        try:
            parse_edit(text)
        except ValueError as err:
            raise ValueError(f"edit #{n}: {err}") from err
    if generate is None:
        generate = lambda prompts, **kw: engine.generate(prompts, seed=seed, **kw)  # noqa: E731
    plans: list[EditPlan | None] = [None] * len(instructions)
    asks = []
    for i, text in enumerate(instructions):
        named = parse_edit(text)[2]
        if named is not None:
            plans[i] = edit_plan(text, named, "instruction")
        else:
            asks.append(i)
    if asks and (engine.tokenizer.und_tokens <= 0 or engine.model.und is None):
        raise ValueError("planning an edit that names no place reads the picture with the understanding encoder, "
                         "and this model has none: name the place in the instruction ('make the circle at the top "
                         "left yellow') or give the box yourself (inpaint=...)")
    read = {i: Understand(pictures[i]) for i in asks}
    captions = generate([[read[i]] for i in asks], max_new_tokens=48, best_of=ASK_BEST_OF) if asks else []
    questions = []
    for i, out in zip(asks, captions):
        shape, color, _, _ = parse_edit(instructions[i])
        seen = parse_caption(out.text)
        named = [o for o in seen if o.shape == shape and color in (None, o.color)]
        if named:
            plans[i] = edit_plan(instructions[i], named[0].position, f"caption: {out.text.strip()}", seen)
        else:
            questions.append((i, f"where is the {color + ' ' if color else ''}{shape}?"))
    if questions:
        answers = generate([[read[i], q] for i, q in questions], max_new_tokens=16, max_images=0)
        for (i, q), out in zip(questions, answers):
            plans[i] = edit_plan(instructions[i], parse_where(out.text), f"{q} {out.text.strip()}")
    done = [plan for plan in plans if plan is not None]
    assert len(done) == len(plans), "every edit is planned above: from its instruction, caption or answer"
    return done
