"""The one id space shared by text, images and video.

``Vocab`` owns the layout of DESIGN.md's "One vocabulary" table: text BPE ids first, then the
special tokens, then size tokens ``<|h:k|> <|w:k|> <|t:k|>``, then image codes, then video codes.
Everything else (the tokenizers, the model's routed embeddings and heads, the generator's state
machine) asks the ``Vocab`` where a range starts instead of hard-coding an id. It is saved with
every checkpoint as plain JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import IntEnum

import torch

SPECIALS: tuple[str, ...] = (
    "<|bos|>",  # begin of document
    "<|eos|>",  # end of document
    "<|pad|>",  # padding, never a target
    "<|boi|>",  # begin of image
    "<|eoi|>",  # end of image
    "<|eol|>",  # end of a row of image / video codes (Fuyu's image-newline)
    "<|bov|>",  # begin of video
    "<|eov|>",  # end of video
    "<|eof|>",  # end of a video frame (latent frame)
    "<|null|>",  # the unconditional prompt of classifier-free guidance
    "<|und|>",  # a position filled by the understanding encoder
)


_FIELDS = ("text_size", "image_codebook_size", "video_codebook_size", "max_height", "max_width", "max_frames")


class Modality(IntEnum):
    """Per-position tag of a token sequence."""

    TEXT = 0  # BPE text, specials and size tokens: the text head predicts them
    IMAGE = 1  # image VQ codes: the image head
    VIDEO = 2  # video VQ codes: the video head
    UND = 3  # <|und|> placeholders filled by the understanding encoder


@dataclass
class Vocab:
    """Layout of the joint id space.

    Args:
        text_size: number of BPE ids; they occupy ``[0, text_size)``.
        image_codebook_size: number of image VQ codes (``K_image``).
        video_codebook_size: number of video VQ codes (``K_video``).
        max_height: largest image / video height in tokens that has a ``<|h:k|>`` token.
        max_width: largest width in tokens that has a ``<|w:k|>`` token.
        max_frames: largest number of latent video frames that has a ``<|t:k|>`` token.
    """

    text_size: int
    image_codebook_size: int
    video_codebook_size: int
    max_height: int = 64
    max_width: int = 64
    max_frames: int = 32
    # derived in __post_init__, not part of the saved layout
    special_offset: int = field(init=False, repr=False)
    h_offset: int = field(init=False, repr=False)
    w_offset: int = field(init=False, repr=False)
    t_offset: int = field(init=False, repr=False)
    image_offset: int = field(init=False, repr=False)
    video_offset: int = field(init=False, repr=False)
    size: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Vocab.{name} must be a positive int, got {value!r}")
        self.special_offset = self.text_size
        self.h_offset = self.special_offset + len(SPECIALS)
        self.w_offset = self.h_offset + self.max_height
        self.t_offset = self.w_offset + self.max_width
        self.image_offset = self.t_offset + self.max_frames
        self.video_offset = self.image_offset + self.image_codebook_size
        self.size = self.video_offset + self.video_codebook_size

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        data = asdict(self)
        return {k: data[k] for k in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown Vocab fields {sorted(unknown)}; accepted: {list(_FIELDS)}")
        return cls(**data)

    # -- specials ----------------------------------------------------------------------------------
    def special(self, name: str) -> int:
        """Id of a special token, by its full name (``"<|boi|>"``) or short name (``"boi"``)."""
        full = name if name.startswith("<|") else f"<|{name}|>"
        try:
            return self.special_offset + SPECIALS.index(full)
        except ValueError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIALS)}") from None

    bos = property(lambda self: self.special("bos"))
    eos = property(lambda self: self.special("eos"))
    pad = property(lambda self: self.special("pad"))
    boi = property(lambda self: self.special("boi"))
    eoi = property(lambda self: self.special("eoi"))
    eol = property(lambda self: self.special("eol"))
    bov = property(lambda self: self.special("bov"))
    eov = property(lambda self: self.special("eov"))
    eof = property(lambda self: self.special("eof"))
    null = property(lambda self: self.special("null"))
    und = property(lambda self: self.special("und"))

    # -- size tokens -------------------------------------------------------------------------------
    def h_token(self, k: int) -> int:
        if not 1 <= k <= self.max_height:
            raise ValueError(f"height {k} tokens has no size token; accepted: 1..{self.max_height}")
        return self.h_offset + k - 1

    def w_token(self, k: int) -> int:
        if not 1 <= k <= self.max_width:
            raise ValueError(f"width {k} tokens has no size token; accepted: 1..{self.max_width}")
        return self.w_offset + k - 1

    def t_token(self, k: int) -> int:
        if not 1 <= k <= self.max_frames:
            raise ValueError(f"{k} latent frames has no size token; accepted: 1..{self.max_frames}")
        return self.t_offset + k - 1

    def size_value(self, token: int, kind: str) -> int:
        """Inverse of ``h_token`` / ``w_token`` / ``t_token``: the ``k`` a size token stands for."""
        offset, count = {"h": (self.h_offset, self.max_height), "w": (self.w_offset, self.max_width),
                         "t": (self.t_offset, self.max_frames)}[kind]
        if not offset <= token < offset + count:
            raise ValueError(f"id {token} is not a <|{kind}:k|> size token (ids {offset}..{offset + count - 1})")
        return token - offset + 1

    # -- ranges ------------------------------------------------------------------------------------
    @property
    def text_head_size(self) -> int:
        """Outputs of the text head: BPE ids, specials and size tokens (everything before image codes)."""
        return self.image_offset

    def name_of(self, token: int) -> str:
        """Human-readable name of one id, for error messages and token dumps."""
        if not 0 <= token < self.size:
            return f"<invalid id {token}>"
        if token < self.special_offset:
            return f"text:{token}"
        if token < self.h_offset:
            return SPECIALS[token - self.special_offset]
        if token < self.w_offset:
            return f"<|h:{token - self.h_offset + 1}|>"
        if token < self.t_offset:
            return f"<|w:{token - self.w_offset + 1}|>"
        if token < self.image_offset:
            return f"<|t:{token - self.t_offset + 1}|>"
        if token < self.video_offset:
            return f"img:{token - self.image_offset}"
        return f"vid:{token - self.video_offset}"

    def modality(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality tag of every id (``Modality`` values), same shape as ``ids``."""
        tags = torch.full_like(ids, int(Modality.TEXT))
        tags[(ids >= self.image_offset) & (ids < self.video_offset)] = int(Modality.IMAGE)
        tags[(ids >= self.video_offset) & (ids < self.size)] = int(Modality.VIDEO)
        tags[ids == self.und] = int(Modality.UND)
        return tags

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the first id outside ``[0, size)``."""
        bad = (ids < 0) | (ids >= self.size)
        if bool(bad.any()):
            first = int(ids[bad].flatten()[0])
            raise ValueError(f"unknown token id {first}: this vocabulary has ids 0..{self.size - 1}")
