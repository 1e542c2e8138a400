"""``ImageLayout``: how an image span is written in the token stream, as data.

anygen's own grammar (DESIGN.md) writes the size as tokens and ends every row::

    anygen     <|boi|> <|h:H|> <|w:W|> ( c … c <|eol|> ) × H <|eoi|>

Imported checkpoints (``anygen.convert``) were trained on their own layouts, and a model only
reproduces its reference when it is fed exactly what it was trained on. Their ids are mapped onto
anygen's roles (``<|boi|>`` is Janus's ``<begin_of_image>``, Emu3's ``<|image start|>``, …), and
the span structure is described here instead of being hard-coded::

    Janus      <|boi|> c × (H·W) <|eoi|>                                    fixed size, no row ends
    Chameleon  <|boi|> c × (H·W) <|eoi|>
    Emu3       <|boi|> "H*W<|image token|>" ( c … c <|eol|> ) × H <|eof|> <|eoi|>

What this module owns: the dataclass, its validation and its JSON round trip. The grammar
(``anygen.generation.grammar``) and ``MultimodalTokenizer`` read it; the default instance is
anygen's own layout, so code that never mentions a layout behaves as before.

Without size tokens the ids do not say how large an image is: the size comes from the request
(``image_size``) or ``default_size``, and decoding infers it from the number of codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

_GUIDANCE = ("null", "masked")


@dataclass(frozen=True)
class ImageLayout:
    """How image spans (and the unconditional prompt of guidance) are written.

    Args:
        size_tokens: ``<|h:H|> <|w:W|>`` follow ``<|boi|>`` (anygen). False: the size is not written
            as size tokens, and the model never chooses it.
        header: text written right after ``<|boi|>``, formatted with ``h`` and ``w`` and encoded by
            the text tokenizer (Emu3: ``"{h}*{w}<|image token|>"``). Only without size tokens.
        row_end: ``<|eol|>`` after each row of codes.
        frame_end: ``<|eof|>`` after the last row, before ``<|eoi|>`` (Emu3).
        default_size: ``(h, w)`` in tokens when the request names no size; needed without size tokens.
        guidance: the unconditional twin of classifier-free guidance. ``"null"``: ``<|bos|> <|null|>``
            (anygen). ``"masked"``: the prompt with every id but ``<|bos|>`` / ``<|boi|>`` replaced by
            ``<|null|>``, the same length as the prompt (Janus's reference).
    """

    size_tokens: bool = True
    header: str | None = None
    row_end: bool = True
    frame_end: bool = False
    default_size: tuple[int, int] | None = None
    guidance: Literal["null", "masked"] = "null"

    def __post_init__(self) -> None:
        for name in ("size_tokens", "row_end", "frame_end"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ImageLayout.{name} must be a bool, got {getattr(self, name)!r}")
        if self.header is not None:
            if not isinstance(self.header, str) or "{h}" not in self.header or "{w}" not in self.header:
                raise ValueError(f"ImageLayout.header must be a str holding '{{h}}' and '{{w}}', got {self.header!r}")
            if self.size_tokens:
                raise ValueError("ImageLayout.header replaces the size tokens: set size_tokens=False with it")
        if self.default_size is not None:
            size = tuple(self.default_size)
            if len(size) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size):
                raise ValueError(f"ImageLayout.default_size must be (h, w) positive ints, got {self.default_size!r}")
            object.__setattr__(self, "default_size", size)  # JSON hands back a list
        if not self.size_tokens and self.default_size is None:
            raise ValueError("ImageLayout without size tokens needs default_size: the ids do not say the size")
        if self.guidance not in _GUIDANCE:
            raise ValueError(f"ImageLayout.guidance must be one of {_GUIDANCE}, got {self.guidance!r}")

    @property
    def is_native(self) -> bool:
        """anygen's own layout (size tokens, row ends, no header, no frame end)."""
        return self.size_tokens and self.row_end and not self.frame_end

    def header_text(self, h: int, w: int) -> str | None:
        """The header for an ``h`` x ``w`` image, or None when the layout has none."""
        return None if self.header is None else self.header.format(h=h, w=w)

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["default_size"] is not None:
            data["default_size"] = list(data["default_size"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ImageLayout:
        if data is None:
            return cls()
        accepted = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - accepted)
        if unknown:
            raise ValueError(f"unknown ImageLayout fields {unknown}; accepted: {sorted(accepted)}")
        return cls(**data)


__all__ = ["ImageLayout"]
