"""The per-row state machine of the sequence grammar, as tensor operations on the device.

Each row of a batch is in one phase (writing text, reading an image's size, drawing image rows, …).
``Grammar.constraints`` says, per row, which class of ids may be sampled next (a row of the mask
table) or which id is forced (size tokens the caller requested, ``<|eol|>``, ``<|eoi|>``,
``<|eof|>``, ``<|eov|>``); ``Grammar.advance`` moves every row on by the id it emitted. Both are
branch-free ``torch.where`` updates, so the state machine runs inside the captured decode step
with no host synchronisation, and rows advance independently (one row writes text while another
draws).

Imported checkpoints write images in their own layout (``tokenizers_mm.layout.ImageLayout``): no
size tokens (the size is the requested one), a header forced id by id (``IMG_HEAD``, Emu3's
``"H*W<|image token|>"``), no ``<|eol|>`` (a row ends after ``width`` codes), an ``<|eof|>`` before
``<|eoi|>``. The layout is static, so it picks Python branches, never tensor-dependent ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from tokenizers_mm.layout import ImageLayout
from tokenizers_mm.vocab import Vocab

# phases
TEXT, IMG_H, IMG_W, IMG_BODY, VID_T, VID_H, VID_W, VID_BODY, DONE, IMG_HEAD = range(10)
# mask classes (rows of Grammar.masks)
M_TEXT, M_H, M_W, M_T, M_IMAGE, M_VIDEO, M_ANY = range(7)
# modality of the sampling settings a phase uses
S_TEXT, S_IMAGE, S_VIDEO = range(3)
# which logits the next step needs (Grammar.next_head): none (the id is forced), one body's head, or all
NEED_NONE, NEED_IMAGE, NEED_VIDEO, NEED_ALL = range(4)

NO_FORCE = -1


@dataclass
class GrammarState:
    """Per-row state, every field a ``(B,)`` long tensor on the device."""

    phase: torch.Tensor
    height: torch.Tensor  # size of the open span, in tokens
    width: torch.Tensor
    frames: torch.Tensor
    row: torch.Tensor  # position inside the open span
    col: torch.Tensor
    frame: torch.Tensor
    media_done: torch.Tensor  # images + videos finished
    req_h: torch.Tensor  # requested image size in tokens (0: the model chooses)
    req_w: torch.Tensor
    req_t: torch.Tensor  # requested video size in tokens (0: the model chooses)
    req_vh: torch.Tensor
    req_vw: torch.Tensor
    max_media: torch.Tensor  # stop after this many images + videos (0: no limit)

    @classmethod
    def start(cls, phase: torch.Tensor, *, req_h: torch.Tensor, req_w: torch.Tensor, req_t: torch.Tensor,
              max_media: torch.Tensor, req_vh: torch.Tensor | None = None, req_vw: torch.Tensor | None = None
              ) -> GrammarState:
        """Rows starting in ``phase``; video sizes default to the image request when not given."""
        zeros = torch.zeros_like(phase)
        req_vh = req_h if req_vh is None else req_vh
        req_vw = req_w if req_vw is None else req_vw
        return cls(phase, zeros, zeros, zeros, zeros, zeros, zeros, zeros, req_h, req_w, req_t, req_vh, req_vw,
                   max_media)

    def clone(self) -> GrammarState:
        return GrammarState(**{f.name: getattr(self, f.name).clone() for f in fields(self)})


class Grammar:
    """Mask table and transitions for one ``Vocab``.

    Args:
        vocab: the id layout.
        allow_image / allow_video: whether text may open an image / a video span (a model without
            that tokenizer never may).
        max_height / max_width / max_frames: the largest size the model may choose, in tokens.
        layout: how image spans are written; None: anygen's own grammar. A layout without size tokens
            takes every image's size from ``req_h`` / ``req_w`` and its header from ``set_image_header``.
    """

    def __init__(self, vocab: Vocab, *, allow_image: bool = True, allow_video: bool = True,
                 max_height: int | None = None, max_width: int | None = None, max_frames: int | None = None,
                 device: torch.device | str = "cpu", layout: ImageLayout | None = None) -> None:
        self.vocab = v = vocab
        self.layout = ImageLayout() if layout is None else layout
        self.header = torch.zeros(1, dtype=torch.long, device=device)  # ids forced in IMG_HEAD, by position
        self.header_len = 0
        max_height = min(max_height or v.max_height, v.max_height)
        max_width = min(max_width or v.max_width, v.max_width)
        max_frames = min(max_frames or v.max_frames, v.max_frames)
        masks = torch.zeros(7, v.size, dtype=torch.bool)
        masks[M_TEXT, : v.special_offset] = True
        masks[M_TEXT, v.eos] = True
        masks[M_TEXT, v.boi] = allow_image
        masks[M_TEXT, v.bov] = allow_video
        masks[M_H, v.h_offset: v.h_offset + max_height] = True
        masks[M_W, v.w_offset: v.w_offset + max_width] = True
        masks[M_T, v.t_offset: v.t_offset + max_frames] = True
        masks[M_IMAGE, v.image_offset: v.video_offset] = True
        masks[M_VIDEO, v.video_offset: v.size] = True
        masks[M_ANY] = True
        self.masks = masks.to(device)
        # which sampling settings each phase uses
        self.phase_setting = torch.tensor(
            [S_TEXT, S_TEXT, S_TEXT, S_IMAGE, S_TEXT, S_TEXT, S_TEXT, S_VIDEO, S_TEXT, S_TEXT], device=device)

    def to(self, device: torch.device | str) -> Grammar:
        self.masks = self.masks.to(device)
        self.phase_setting = self.phase_setting.to(device)
        self.header = self.header.to(device)
        return self

    def set_image_header(self, ids: list[int]) -> None:
        """Ids forced after ``<|boi|>`` in a layout with a header (the same size for every row of a call)."""
        self.header_len = len(ids)
        self.header = torch.tensor(ids or [0], dtype=torch.long, device=self.masks.device)

    def constraints(self, s: GrammarState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_class, forced)`` for every row: the mask row to sample under, or the id it must emit."""
        v = self.vocab
        p = s.phase
        forced = torch.full_like(p, NO_FORCE)
        mclass = torch.full_like(p, M_ANY)
        mclass = torch.where(p == TEXT, M_TEXT, mclass)
        # size tokens: forced when requested, else sampled among the allowed sizes
        mclass = torch.where(p == IMG_H, M_H, mclass)
        mclass = torch.where(p == VID_H, M_H, mclass)
        mclass = torch.where((p == IMG_W) | (p == VID_W), M_W, mclass)
        mclass = torch.where(p == VID_T, M_T, mclass)
        forced = torch.where((p == IMG_H) & (s.req_h > 0), v.h_offset + s.req_h - 1, forced)
        forced = torch.where((p == IMG_W) & (s.req_w > 0), v.w_offset + s.req_w - 1, forced)
        forced = torch.where((p == VID_T) & (s.req_t > 0), v.t_offset + s.req_t - 1, forced)
        forced = torch.where((p == VID_H) & (s.req_vh > 0), v.h_offset + s.req_vh - 1, forced)
        forced = torch.where((p == VID_W) & (s.req_vw > 0), v.w_offset + s.req_vw - 1, forced)
        # image body: codes, <|eol|> at the end of each row, <|eoi|> after the last row
        img = p == IMG_BODY
        mclass = torch.where(img, M_IMAGE, mclass)
        forced = torch.where(img & (s.col == s.width), v.eol, forced)
        if self.layout.frame_end:  # <|eof|> then <|eoi|>: col counts the end tokens already written
            forced = torch.where(img & (s.row == s.height), torch.where(s.col == 0, v.eof, v.eoi), forced)
        else:
            forced = torch.where(img & (s.row == s.height), v.eoi, forced)
        if self.header_len:
            head = p == IMG_HEAD
            forced = torch.where(head, self.header[s.col.clamp(max=self.header_len - 1)], forced)
        # video body: the same per frame, <|eof|> after each frame's rows, <|eov|> after the last frame
        vid = p == VID_BODY
        mclass = torch.where(vid, M_VIDEO, mclass)
        forced = torch.where(vid & (s.col == s.width), v.eol, forced)
        forced = torch.where(vid & (s.row == s.height), v.eof, forced)
        forced = torch.where(vid & (s.frame == s.frames), v.eov, forced)
        forced = torch.where(p == DONE, v.pad, forced)
        return mclass, forced

    def advance(self, s: GrammarState, tok: torch.Tensor) -> GrammarState:
        """Move every row on by the id it emitted (``tok``: ``(B,)``). Returns a new state."""
        v = self.vocab
        p = s.phase
        n = replace(s)  # shallow: every field below is rebound to a new tensor, never written in place
        text = p == TEXT
        if self.layout.size_tokens:
            n.phase = torch.where(text & (tok == v.boi), IMG_H, n.phase)
        else:  # the size is the requested one; the header (if any) is forced next
            opens = text & (tok == v.boi)
            n.phase = torch.where(opens, IMG_HEAD if self.header_len else IMG_BODY, n.phase)
            n.height = torch.where(opens, s.req_h, n.height)
            n.width = torch.where(opens, s.req_w, n.width)
            n.row = torch.where(opens, 0, n.row)
            n.col = torch.where(opens, 0, n.col)
        n.phase = torch.where(text & (tok == v.bov), VID_T, n.phase)
        n.phase = torch.where(text & (tok == v.eos), DONE, n.phase)
        # size tokens
        n.height = torch.where((p == IMG_H) | (p == VID_H), tok - v.h_offset + 1, n.height)
        n.width = torch.where((p == IMG_W) | (p == VID_W), tok - v.w_offset + 1, n.width)
        n.frames = torch.where(p == VID_T, tok - v.t_offset + 1, n.frames)
        n.phase = torch.where(p == IMG_H, IMG_W, n.phase)
        n.phase = torch.where(p == VID_T, VID_H, n.phase)
        n.phase = torch.where(p == VID_H, VID_W, n.phase)
        opened = (p == IMG_W) | (p == VID_W)
        n.phase = torch.where(p == IMG_W, IMG_BODY, n.phase)
        n.phase = torch.where(p == VID_W, VID_BODY, n.phase)
        n.row = torch.where(opened, 0, n.row)
        n.col = torch.where(opened, 0, n.col)
        n.frame = torch.where(opened, 0, n.frame)
        if self.header_len:
            head = p == IMG_HEAD
            head_done = head & (s.col + 1 >= self.header_len)
            n.col = torch.where(head, s.col + 1, n.col)
            n.phase = torch.where(head_done, IMG_BODY, n.phase)
            n.col = torch.where(head_done, 0, n.col)
        # bodies
        body = (p == IMG_BODY) | (p == VID_BODY)
        end_row = body & (s.col == s.width)  # this token was <|eol|>
        end_frame = (p == VID_BODY) & (s.row == s.height)  # <|eof|>
        img_end = (p == IMG_BODY) & (s.row == s.height)
        img_eof = torch.zeros_like(img_end)
        if self.layout.frame_end:  # Emu3: <|eof|> (col 0) then <|eoi|> (col 1) close the image
            img_eof = img_end & (s.col == 0)
            img_end = img_end & (s.col == 1)
        end_span = img_end | ((p == VID_BODY) & (s.frame == s.frames))
        code = body & ~end_row & ~end_frame & ~end_span & ~img_eof
        n.col = torch.where(code | img_eof, s.col + 1, n.col)
        if not self.layout.row_end:  # no <|eol|>: the row ends with its last code
            row_full = code & (p == IMG_BODY) & (s.col + 1 == s.width)
            end_row = end_row | row_full
        n.col = torch.where(end_row, 0, n.col)
        n.row = torch.where(end_row, s.row + 1, n.row)
        n.row = torch.where(end_frame & ~end_span, 0, n.row)
        n.frame = torch.where(end_frame & ~end_span, s.frame + 1, n.frame)
        n.media_done = torch.where(end_span, s.media_done + 1, s.media_done)
        finished = end_span & (s.max_media > 0) & (n.media_done >= s.max_media)
        n.phase = torch.where(end_span, TEXT, n.phase)
        n.phase = torch.where(finished, DONE, n.phase)
        return n

    def next_head(self, s: GrammarState, forced: torch.Tensor) -> torch.Tensor:
        """What each row's next logits must cover, given ``forced = constraints(s)[1]``: ``(B,)`` long.

        ``NEED_NONE`` when the id is forced, ``NEED_IMAGE`` / ``NEED_VIDEO`` for a code sampled in an image /
        video body (only that head's logits are read), ``NEED_ALL`` otherwise (text, sampled sizes).
        """
        need = torch.where(s.phase == IMG_BODY, NEED_IMAGE, NEED_ALL)
        need = torch.where(s.phase == VID_BODY, NEED_VIDEO, need)
        return torch.where(forced >= 0, NEED_NONE, need)

    def in_media(self, s: GrammarState) -> torch.Tensor:
        """Rows inside an image / video span (size tokens and headers included): ``(B,)`` bool."""
        return (s.phase != TEXT) & (s.phase != DONE)

    def in_body(self, s: GrammarState) -> torch.Tensor:
        """Rows drawing codes (where guidance applies): ``(B,)`` bool."""
        return (s.phase == IMG_BODY) | (s.phase == VID_BODY)

    def body_progress(self, s: GrammarState) -> torch.Tensor:
        """``(B,)`` float: the fraction of the open image's or clip's codes already drawn, in raster order (0 outside
        a body); what ``SamplingConfig.guidance_start`` is compared with."""
        per_frame = s.height * s.width
        done = s.frame * per_frame + s.row * s.width + s.col.clamp(max=s.width - 1)
        total = per_frame * torch.where(s.phase == VID_BODY, s.frames, torch.ones_like(s.frames))
        return torch.where(self.in_body(s), done.float() / total.clamp(min=1).float(), 0.0)

    def in_regions(self, s: GrammarState, boxes: torch.Tensor) -> torch.Tensor:
        """``(N, B)`` bool: whether the image code each row draws next has its centre inside each of its ``N``
        boxes (``boxes`` ``(N, B, 4)``: ``x0, y0, x1, y1`` as fractions of the image, the top left at 0, each box
        half-open); False outside an image body (a clip's codes are never inside). What ``Generator.stream``'s
        regions are routed by."""
        h, w = s.height.clamp(min=1).float(), s.width.clamp(min=1).float()
        y = (s.row.float() + 0.5) / h
        x = (s.col.clamp(max=s.width - 1).float() + 0.5) / w  # col = width before a forced <|eol|>
        inside = (x >= boxes[..., 0]) & (x < boxes[..., 2]) & (y >= boxes[..., 1]) & (y < boxes[..., 3])
        return inside & (s.phase == IMG_BODY)
