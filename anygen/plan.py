"""Layout planning: a text → image prompt turned into regions and a canvas before anything is drawn.

What it owns: ``plan_layout``, the planner step of LLM-grounded diffusion and RPG (a layout of boxes, each under
the text of what goes there, handed to the image model), for the world the default model was trained on: scenes
of coloured shapes in a 3×3 grid, captioned as ``anygen data shapes`` writes them ("a red circle at the top left
and a blue square at the bottom right"). The plan is what ``AnyGen.generate`` composes (``regions=`` and
``canvas=``): each object drawn alone under its own caption, over its cell grown by ``PLAN_MARGIN``, onto an
empty scene. The shipped model draws both objects of a held-out two-object prompt for 22.5 % of 360 prompts from
the text alone and 81.7 % of 720 so composed (``anygen eval --regions layout --canvas blank``,
``docs/default_model.md``).

``anygen generate --plan``, the demo's "plan the layout from the prompt" and the quick start's text → image
picture use it. A model trained on other pictures needs another planner (an LLM writing the boxes); the
regions and canvas it hands ``generate`` are the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import PIL.Image

from anygen.data.shapes import POSITIONS, SceneObject, layout_regions, render_scene, split_caption

# how far each planned box reaches past its cell, as a fraction of the picture (a quarter of a cell): drawn alone
# onto an empty scene an object is cut off, or left out, where it would reach past its cell (seed 1, 120 pairs:
# 59.2 % exact with the cells as they are, 64.2 % grown by this)
PLAN_MARGIN = 1 / 12
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


def plan_layout(prompt: str, size: int, margin: float = PLAN_MARGIN) -> Layout:
    """The layout of a scene prompt (``plan_objects``): each object's caption over its cell grown by ``margin``
    (a fraction of the picture), and an empty ``size``×``size`` scene to compose them onto.

    Raises:
        ValueError: the prompt cannot be planned (``plan_objects``), ``size`` is not a positive int, or ``margin``
            is outside [0, 0.5).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size is the canvas's side in pixels, a positive int, got {size!r}")
    objects = plan_objects(prompt)
    return Layout(tuple(objects), layout_regions(objects, margin), render_scene([], size))
