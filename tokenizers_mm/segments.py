"""The pieces of an interleaved document: ``Text``, ``Image``, ``Video`` and ``Understand``.

A document is a list of these (a bare ``str`` is read as ``Text``, a ``PIL.Image`` as ``Image``).
``MultimodalTokenizer.encode`` reads them; ``MultimodalTokenizer.decode`` and ``AnyGen.generate``
return them. Pixels are kept as given (PIL or tensor); ``codes`` holds the VQ codes when known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch


@dataclass
class Text:
    """A run of text."""

    text: str


@dataclass
class Image:
    """An image written with VQ tokens (generated, or given as context, e.g. for editing).

    Args:
        image: the pixels: a ``PIL.Image``, or a float tensor ``(3, H, W)`` in ``[-1, 1]``.
        codes: VQ codes ``(h, w)`` when known (decoded output always has them).
        size: the pixel size ``(height, width)`` to tokenize at; ``None`` uses the tokenizer's default.
        partial: cut off before its end (complete rows only).
    """

    image: PIL.Image.Image | torch.Tensor | None = None
    codes: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    partial: bool = False  # cut off before its end (kept rows only); see MultimodalTokenizer.decode


@dataclass
class Video:
    """A video clip.

    Args:
        frames: float tensor ``(3, T, H, W)`` in ``[-1, 1]``.
        codes: VQ codes ``(t, h, w)`` when known.
        fps: frames per second, used when writing files.
        partial: cut off before its end (complete latent frames only).
    """

    frames: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    fps: float = 8.0
    partial: bool = False

    def to_pil_frames(self) -> list[PIL.Image.Image]:
        from tokenizers_mm.preprocess import tensor_to_pil

        if self.frames is None:
            raise ValueError("this Video has no decoded frames")
        return [tensor_to_pil(self.frames[:, t]) for t in range(self.frames.shape[1])]


@dataclass
class Understand:
    """An image read through the understanding encoder (captioning, VQA), never through VQ tokens."""

    image: PIL.Image.Image | torch.Tensor = field(default=None)


Segment = Text | Image | Video | Understand
