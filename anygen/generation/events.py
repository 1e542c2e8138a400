"""Streaming events: what ``Generator.stream`` / ``AnyGen.stream`` yield while a batch is generated.

Every event names its ``row`` (the prompt's index in the batch). Consumers (the CLI, the demo)
switch on the type; none of them needs to look at token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch

from tokenizers_mm.segments import Image, Segment, Video


@dataclass
class TextDelta:
    """New text for a row (whole characters only: a split UTF-8 sequence waits for its end)."""

    row: int
    text: str


@dataclass
class ImageStarted:
    """A row opened an image of ``height`` × ``width`` tokens (``pixel_size`` is ``(H, W)`` in pixels)."""

    row: int
    height: int
    width: int
    pixel_size: tuple[int, int]


@dataclass
class ImageRows:
    """Rows of the open image so far; ``preview`` is the decoded top part when previews were asked for."""

    row: int
    rows_done: int
    height: int
    preview: PIL.Image.Image | None = None


@dataclass
class ImageDone:
    row: int
    image: Image


@dataclass
class VideoStarted:
    row: int
    frames: int
    height: int
    width: int


@dataclass
class VideoFrameDone:
    """A latent frame of the open video is complete (``frame`` counts from 0).

    ``preview`` holds the pixel frames decoded so far, ``(3, T', H, W)`` in ``[-1, 1]``, when previews
    were asked for (the video tokenizer is causal, so a prefix of codes decodes to a prefix of frames).
    """

    row: int
    frame: int
    frames: int
    preview: torch.Tensor | None = None


@dataclass
class VideoDone:
    row: int
    video: Video


@dataclass
class RowDone:
    """A row finished (``reason``: ``"eos"``, ``"max_new_tokens"`` or ``"max_images"``)."""

    row: int
    reason: str
    segments: list[Segment] = field(default_factory=list)
    ids: torch.Tensor | None = None


Event = TextDelta | ImageStarted | ImageRows | ImageDone | VideoStarted | VideoFrameDone | VideoDone | RowDone
