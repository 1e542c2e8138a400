"""``MultimodalTokenizer``: documents of text, images and video to one token stream and back.

It owns the ``Vocab`` and the sequence grammar of DESIGN.md::

    image      <|boi|> <|h:H|> <|w:W|> ( c c … c <|eol|> ) × H <|eoi|>
    video      <|bov|> <|t:T|> <|h:H|> <|w:W|> ( ( c … c <|eol|> ) × H <|eof|> ) × T <|eov|>
    understood <|boi|> <|und|> × N <|eoi|>
    document   <|bos|> segment … segment <|eos|>

H, W and T count tokens (latent rows, columns, frames), not pixels. Imported checkpoints write
their images in their own layout (``tokenizers_mm.layout.ImageLayout``: Janus and Chameleon have no
size tokens and no row ends, Emu3 writes its size as text and ends the image with ``<|eof|>``);
the tokenizer encodes and decodes whichever layout it holds, and saves it with its settings.

Decoding policy for malformed spans (``decode``): a span whose structure is wrong (a row of the
wrong length, a code of the other modality, a missing end token, a size token out of place) raises
``ValueError`` naming the position and what was expected. The one documented repair is
``allow_partial=True``: a span cut off by the end of the ids (generation stopped mid-image) is kept
with its complete rows / frames only and flagged ``partial=True``; nothing is ever padded with
invented codes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import PIL.Image
import torch

from tokenizers_mm.layout import ImageLayout
from tokenizers_mm.segments import Image, Segment, Text, Understand, Video
from tokenizers_mm.text import TextTokenizer
from tokenizers_mm.vocab import Modality, Vocab

TOKENIZER_CONFIG = "tokenizer_config.json"
TEXT_FILE = "text_tokenizer.json"
IMAGE_FILE = "image_tokenizer.safetensors"
VIDEO_FILE = "video_tokenizer.safetensors"
_ONE_SEGMENT = (str, Text, Image, Video, Understand, PIL.Image.Image)  # a document of one segment, not a list


@dataclass
class TokenSequence:
    """One tokenized document.

    Attributes:
        ids: ``LongTensor[T]`` in the joint id space.
        modality: ``LongTensor[T]`` of ``Modality`` values, one per position.
        und_pixels: ``FloatTensor[N, 3, S, S]`` in ``[-1, 1]``, the images behind the ``<|und|>``
            runs in order, or ``None`` when the document has none.
    """

    ids: torch.Tensor
    modality: torch.Tensor
    und_pixels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class _Settings:
    """What the tokenizer needs besides its sub-tokenizers; saved as ``tokenizer_config.json``."""

    vocab: dict
    image_size: tuple[int, int] = (256, 256)  # default pixel size an image is tokenized at
    video_size: tuple[int, int] = (128, 128)
    und_tokens: int = 0  # <|und|> positions per understood image (0: no understanding encoder)
    und_image_size: int = 0
    extra: dict = field(default_factory=dict)


class MultimodalTokenizer:
    """Text BPE + image VQ + video VQ behind one ``Vocab``.

    Args:
        text: the BPE tokenizer.
        image: the image VQ tokenizer (``encode``/``decode``/``codebook_size``/``downsample``), or None.
        video: the video VQ tokenizer, or None.
        image_size: pixel size ``(H, W)`` images are tokenized at unless a segment says otherwise.
        video_size: pixel size of video frames.
        und_tokens: ``<|und|>`` positions per understood image (the understanding encoder's output
            length); 0 when the model has no understanding encoder.
        und_image_size: pixel edge of images given to the understanding encoder.
        max_height / max_width / max_frames: largest spans the size tokens can describe.
        layout: how image spans are written; None: anygen's own grammar.
        video_frames: pixel frames of the clips the model trained on (``1 + 4k``), the length a generated clip
            gets unless asked (``video_grid``); None: unknown, so generating a clip needs a ``video_size``.
    """

    def __init__(
        self,
        text: TextTokenizer,
        image=None,
        video=None,
        *,
        image_size: int | tuple[int, int] = 256,
        video_size: int | tuple[int, int] = 128,
        und_tokens: int = 0,
        und_image_size: int = 0,
        max_height: int = 64,
        max_width: int = 64,
        max_frames: int = 32,
        layout: ImageLayout | None = None,
        video_frames: int | None = None,
    ) -> None:
        self.text = text
        self.layout = ImageLayout() if layout is None else layout
        self.image = image
        self.video = video
        self.image_size = _pair(image_size, "image_size")
        self.video_size = _pair(video_size, "video_size")
        self.und_tokens = und_tokens
        self.und_image_size = und_image_size
        if video_frames is not None:
            if video is None:
                raise ValueError(f"video_frames={video_frames!r} needs a video tokenizer, and none is given")
            try:
                latent = video.num_latent_frames(video_frames)
            except ValueError as err:  # the lengths the causal tokenizer accepts, named
                raise ValueError(f"video_frames={video_frames!r} is not a clip length the video tokenizer takes: "
                                 f"{err}") from err
            if latent > max_frames:
                raise ValueError(f"video_frames={video_frames} makes {latent} latent frames, more than the size "
                                 f"tokens can describe (max_frames={max_frames})")
        self.video_frames = video_frames
        self.vocab = Vocab(
            text_size=text.vocab_size,
            image_codebook_size=image.codebook_size if image is not None else 1,
            video_codebook_size=video.codebook_size if video is not None else 1,
            max_height=max_height,
            max_width=max_width,
            max_frames=max_frames,
        )

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """``(h, w)`` in tokens of an image at ``image_size`` (the size the model trained on); None without images."""
        if self.image is None:
            return None
        return (self.image_size[0] // self.image.downsample, self.image_size[1] // self.image.downsample)

    @property
    def video_grid(self) -> tuple[int, int, int] | None:
        """``(t, h, w)`` in tokens of a clip of ``video_frames`` frames at ``video_size`` (what the model trained
        on); None without a video tokenizer or a known clip length."""
        if self.video is None or self.video_frames is None:
            return None
        down = self.video.downsample
        return (self.video.num_latent_frames(self.video_frames), self.video_size[0] // down,
                self.video_size[1] // down)

    # -- encode ------------------------------------------------------------------------------------
    def encode(self, document: str | Segment | Sequence, *, bos: bool = True, eos: bool = True) -> TokenSequence:
        """Tokenize one document: a ``str``, one segment, or a list of segments.

        Accepted segments: ``str`` / ``Text``; ``PIL.Image`` / ``Image`` (written with VQ codes);
        ``Video``; ``Understand(image)`` (``<|und|>`` placeholders, pixels kept in ``und_pixels``).
        """
        if isinstance(document, _ONE_SEGMENT):
            document = [document]
        if not isinstance(document, Sequence):
            raise TypeError(f"a document is a str, a segment or a list of them, got {type(document).__name__}")
        ids: list[int] = [self.vocab.bos] if bos else []
        und: list[torch.Tensor] = []
        for i, seg in enumerate(document):
            ids.extend(self.encode_segment(seg, und, index=i))
        if eos:
            ids.append(self.vocab.eos)
        ids_t = torch.tensor(ids, dtype=torch.long)
        return TokenSequence(ids_t, self.vocab.modality(ids_t), torch.stack(und) if und else None)

    def encode_batch(self, documents: Sequence, *, bos: bool = True, eos: bool = True,
                     max_batch: int = 32) -> list[TokenSequence]:
        """``encode`` of many documents, their images and clips VQ-encoded together.

        Images of one pixel size (clips of one shape) go through the VQ tokenizer in batches of up to
        ``max_batch`` instead of one call per segment, which pays on the CPU (``bench/tokenize_speed.py``).
        The ids are ``encode``'s document by document: the tests and the benchmark check it (a batched
        convolution may round differently from a single one, which could flip a code at a near tie; none
        has been seen). Every document's pixels are held at once: pass a bounded number (``anygen
        tokenize`` passes 16). A segment refused raises ``ValueError`` (``TypeError`` for one of the wrong type)
        naming its document and segment; what is not a document raises ``encode``'s ``TypeError``.
        """
        return [self.encode(doc, bos=bos, eos=eos) for doc in self.with_codes(documents, max_batch=max_batch)]

    def with_codes(self, documents: Sequence, *, max_batch: int = 32) -> list[list]:
        """The documents as new segment lists, every pixel ``Image`` / ``Video`` replaced by a copy holding its
        VQ codes (computed in batches, see ``encode_batch``); other segments, and those with codes, as they
        were. The caller's lists and segments are not changed; what is not a document is left for ``encode``
        to refuse."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        docs = [[d] if isinstance(d, _ONE_SEGMENT) else list(d) if isinstance(d, Sequence) else d for d in documents]
        pending: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}  # (kind, shape) -> (doc, segment, pixels)
        for i, doc in enumerate(docs):
            if not isinstance(doc, list):
                continue  # encode raises its TypeError
            for j, seg in enumerate(doc):
                if isinstance(seg, PIL.Image.Image):
                    seg = doc[j] = Image(seg)
                kind = "image" if isinstance(seg, Image) else "video" if isinstance(seg, Video) else None
                if kind is None or seg.codes is not None:
                    continue
                try:
                    x = self._image_pixels(seg) if kind == "image" else self._video_pixels(seg)
                except (ValueError, TypeError) as err:
                    raise _named(err, f"document #{i}, segment #{j} ({kind})") from err
                pending.setdefault((kind, tuple(x.shape)), []).append((i, j, x))
        for (kind, _), items in pending.items():
            tok = getattr(self, kind)
            for start in range(0, len(items), max_batch):
                chunk = items[start:start + max_batch]
                try:
                    codes = _vq_encode(tok, [x for _, _, x in chunk])
                except (ValueError, TypeError):  # one call each, so the error names the segment it is about
                    codes = [_one_code(tok, x, f"document #{i}, segment #{j} ({kind})") for i, j, x in chunk]
                for (i, j, _), c in zip(chunk, codes):
                    docs[i][j] = replace(docs[i][j], codes=c)
        return docs

    def encode_segment(self, seg, und_out: list[torch.Tensor] | None = None, *, index: int = 0) -> list[int]:
        """Ids of one segment. Understood pixels are appended to ``und_out``."""
        if isinstance(seg, str):
            return self.text.encode(seg)
        if isinstance(seg, Text):
            return self.text.encode(seg.text)
        if isinstance(seg, PIL.Image.Image):
            seg = Image(seg)
        if isinstance(seg, Image):
            return self.image_span(self.image_codes(seg)).tolist()
        if isinstance(seg, Video):
            return self.video_span(self.video_codes(seg)).tolist()
        if isinstance(seg, Understand):
            if self.und_tokens <= 0:
                raise ValueError("this tokenizer has no understanding encoder (und_tokens=0); "
                                 "pass the image as Image(...) to give it as VQ tokens instead")
            from tokenizers_mm.preprocess import preprocess_image

            pixels = preprocess_image(seg.image, self.und_image_size, mode="pad")
            if und_out is not None:
                und_out.append(pixels)
            return [self.vocab.boi] + [self.vocab.und] * self.und_tokens + [self.vocab.eoi]
        raise TypeError(
            f"segment #{index} is a {type(seg).__name__}; accepted: str, Text, PIL.Image, Image, Video, Understand"
        )

    def image_codes(self, seg: Image) -> torch.Tensor:
        """VQ codes ``(h, w)`` of an image segment (its own codes if it has them)."""
        if seg.codes is not None:
            return self._check_codes(seg.codes, 2, self.vocab.image_codebook_size, "image")
        return _vq_encode(self.image, [self._image_pixels(seg)])[0]

    def video_codes(self, seg: Video) -> torch.Tensor:
        """VQ codes ``(t, h, w)`` of a video segment."""
        if seg.codes is not None:
            return self._check_codes(seg.codes, 3, self.vocab.video_codebook_size, "video")
        return _vq_encode(self.video, [self._video_pixels(seg)])[0]

    def _image_pixels(self, seg: Image) -> torch.Tensor:
        """``(3, H, W)`` pixels an image segment is VQ-encoded from: its size, or the tokenizer's, cropped."""
        tok = self._need("image")
        from tokenizers_mm.preprocess import preprocess_image

        return preprocess_image(seg.image, seg.size or self.image_size, factor=tok.downsample, mode="crop")

    def _video_pixels(self, seg: Video) -> torch.Tensor:
        """``(3, T, H, W)`` frames a video segment is VQ-encoded from."""
        self._need("video")
        if not isinstance(seg.frames, torch.Tensor) or seg.frames.dim() != 4:
            raise ValueError("Video.frames must be a float tensor (3, T, H, W) in [-1, 1]; "
                             "use tokenizers_mm.video_io.load_video to read a file")
        return seg.frames

    def image_span(self, codes: torch.Tensor) -> torch.Tensor:
        """``<|boi|> <|h:H|> <|w:W|> (codes <|eol|>)×H <|eoi|>`` for codes ``(H, W)``, or the layout's equivalent."""
        v, lay = self.vocab, self.layout
        h, w = codes.shape
        rows = codes + v.image_offset
        if lay.row_end:
            rows = torch.cat([rows, torch.full((h, 1), v.eol)], dim=1)
        head = torch.tensor([v.boi, *self.image_header(h, w)], dtype=torch.long)
        tail = torch.tensor([v.eof, v.eoi] if lay.frame_end else [v.eoi])
        return torch.cat([head, rows.flatten(), tail])

    def image_header(self, h: int, w: int) -> list[int]:
        """Ids between ``<|boi|>`` and the first code: the size tokens, the layout's header, or nothing."""
        if self.layout.size_tokens:
            return [self.vocab.h_token(h), self.vocab.w_token(w)]
        header = self.layout.header_text(h, w)
        return [] if header is None else self.text.encode(header)

    def image_span_len(self, h: int, w: int) -> int:
        """Ids of a whole ``h`` x ``w`` image span, ``<|boi|>`` to ``<|eoi|>``."""
        lay = self.layout
        return 1 + len(self.image_header(h, w)) + h * (w + int(lay.row_end)) + int(lay.frame_end) + 1

    def video_span(self, codes: torch.Tensor) -> torch.Tensor:
        """``<|bov|> <|t:T|> <|h:H|> <|w:W|> ((codes <|eol|>)×H <|eof|>)×T <|eov|>`` for codes ``(T, H, W)``."""
        v = self.vocab
        t, h, w = codes.shape
        rows = torch.cat([codes + v.video_offset, torch.full((t, h, 1), v.eol)], dim=2).reshape(t, -1)
        frames = torch.cat([rows, torch.full((t, 1), v.eof)], dim=1).flatten()
        head = torch.tensor([v.bov, v.t_token(t), v.h_token(h), v.w_token(w)])
        return torch.cat([head, frames, torch.tensor([v.eov])])

    # -- decode ------------------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor | Iterable[int], *, pixels: bool = True, allow_partial: bool = False,
               image_size: tuple[int, int] | None = None) -> list[Segment]:
        """Turn ids back into segments.

        Args:
            ids: a 1-D id sequence (``<|bos|>``, ``<|eos|>`` and ``<|pad|>`` are dropped).
            pixels: decode VQ codes to pixels (needs the image / video tokenizer); ``False`` keeps
                codes only.
            allow_partial: keep a span cut off by the end of ``ids`` with its complete rows
                (``partial=True``) instead of raising.
            image_size: ``(h, w)`` of image spans in a layout whose ids do not say it (no size tokens,
                no header); default: inferred from the number of codes (``default_size``, else square).
        """
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        self.vocab.check_ids(ids)
        seq = ids.tolist()
        v = self.vocab
        out: list[Segment] = []
        text: list[int] = []
        i = 0

        def flush() -> None:
            if text:
                out.append(Text(self.text.decode(text)))
                text.clear()

        while i < len(seq):
            tok = seq[i]
            if tok < v.special_offset:
                text.append(tok)
                i += 1
            elif tok in (v.bos, v.eos, v.pad, v.null):
                i += 1
            elif tok == v.boi and i + 1 < len(seq) and seq[i + 1] == v.und:
                flush()
                j = i + 1
                while j < len(seq) and seq[j] == v.und:
                    j += 1
                if j >= len(seq) and not allow_partial:
                    raise ValueError(f"understood-image span at position {i} has no <|eoi|>")
                if j < len(seq) and seq[j] != v.eoi:
                    raise ValueError(f"position {j}: expected <|eoi|> after <|und|> run, got {v.name_of(seq[j])}")
                out.append(Understand(None))
                i = j + 1
            elif tok == v.boi:
                flush()
                if self.layout.is_native:
                    seg, i = self._parse_image(seq, i, pixels, allow_partial)
                else:
                    seg, i = self._parse_layout_image(seq, i, pixels, allow_partial, image_size)
                out.append(seg)
            elif tok == v.bov:
                flush()
                seg, i = self._parse_video(seq, i, pixels, allow_partial)
                out.append(seg)
            else:
                raise ValueError(f"position {i}: {v.name_of(tok)} outside an image or video span")
        flush()
        return out

    def _parse_grid(self, seq: list[int], i: int, h: int, w: int, offset: int, k: int, start: int,
                    what: str, allow_partial: bool) -> tuple[list[list[int]], int, bool]:
        """Read up to ``h`` rows of ``w`` codes + ``<|eol|>``; returns (rows, next index, cut_off)."""
        v = self.vocab
        rows: list[list[int]] = []
        for _ in range(h):
            row = seq[i:i + w]
            if i + w >= len(seq):  # the row or its <|eol|> is missing: the ids ended
                if allow_partial:
                    return rows, len(seq), True
                raise ValueError(f"{what} span at position {start} is cut off after {len(rows)} of {h} rows")
            for j, c in enumerate(row):
                if not offset <= c < offset + k:
                    raise ValueError(f"position {i + j}: expected a {what} code in a row of {what} span at "
                                     f"{start}, got {v.name_of(c)} (row length must be {w})")
            if seq[i + w] != v.eol:
                raise ValueError(f"position {i + w}: expected <|eol|> after {w} codes in {what} span at {start}, "
                                 f"got {v.name_of(seq[i + w])}")
            rows.append([c - offset for c in row])
            i += w + 1
        return rows, i, False

    def _expect(self, seq: list[int], i: int, token: int, start: int, what: str, allow_partial: bool) -> bool:
        """Check ``seq[i] == token``; return False when the ids ended and partial spans are allowed."""
        if i >= len(seq):
            if allow_partial:
                return False
            raise ValueError(f"{what} span at position {start} has no {self.vocab.name_of(token)}")
        if seq[i] != token:
            raise ValueError(f"position {i}: expected {self.vocab.name_of(token)} in {what} span at {start}, "
                             f"got {self.vocab.name_of(seq[i])}")
        return True

    def _sizes(self, seq: list[int], start: int, kinds: str, what: str, allow_partial: bool) -> list[int] | None:
        """The span's size tokens after its opening token; None if the ids end inside them (partial)."""
        i = start + 1
        if i + len(kinds) > len(seq):
            if allow_partial:
                return None
            raise ValueError(f"{what} span at position {start} is cut off inside its size tokens")
        try:
            return [self.vocab.size_value(seq[i + n], kind) for n, kind in enumerate(kinds)]
        except ValueError as err:
            raise ValueError(f"{what} span at position {start}: {err}") from None

    def _parse_image(self, seq: list[int], start: int, pixels: bool, allow_partial: bool) -> tuple[Image, int]:
        v = self.vocab
        sizes = self._sizes(seq, start, "hw", "image", allow_partial)
        if sizes is None:
            return Image(partial=True), len(seq)
        h, w = sizes
        rows, i, cut = self._parse_grid(seq, start + 3, h, w, v.image_offset, v.image_codebook_size, start,
                                        "image", allow_partial)
        if not cut:
            cut = not self._expect(seq, i, v.eoi, start, "image", allow_partial)
            i += 1
        codes = torch.tensor(rows, dtype=torch.long).reshape(len(rows), w)
        seg = Image(codes=codes, partial=cut)
        if pixels and len(rows) > 0:
            tok = self._need("image")
            with torch.no_grad():
                seg.image = _to_pil(tok.decode(codes[None].to(_device(tok)))[0].cpu())
        return seg, i

    def _parse_layout_image(self, seq: list[int], start: int, pixels: bool, allow_partial: bool,
                            image_size: tuple[int, int] | None) -> tuple[Image, int]:
        """An image span in a non-native layout (see ``ImageLayout``): header, rows, optional ends."""
        v, lay = self.vocab, self.layout
        i = start + 1
        if lay.size_tokens:
            sizes = self._sizes(seq, start, "hw", "image", allow_partial)
            if sizes is None:
                return Image(partial=True), len(seq)
            (h, w), i = sizes, start + 3
        elif lay.header is not None:
            found = self._parse_header(seq, i, start, allow_partial)
            if found is None:
                return Image(partial=True), len(seq)
            (h, w), i = found
        else:
            h, w = image_size or self._infer_size(seq, i, start)
        rows: list[list[int]] = []
        cut = False
        for _ in range(h):
            row = seq[i:i + w]
            if len(row) < w or (lay.row_end and i + w >= len(seq)):
                if allow_partial:  # the ids ended inside this row: keep the complete rows
                    cut, i = True, len(seq)
                    break
                raise ValueError(f"image span at position {start} is cut off after {len(rows)} of {h} rows")
            for j, c in enumerate(row):
                if not v.image_offset <= c < v.video_offset:
                    raise ValueError(f"position {i + j}: expected an image code in row {len(rows)} of the image span "
                                     f"at {start}, got {v.name_of(c)} (rows are {w} codes)")
            i += w
            if lay.row_end:
                if seq[i] != v.eol:
                    raise ValueError(f"position {i}: expected <|eol|> after {w} codes in image span at {start}, "
                                     f"got {v.name_of(seq[i])}")
                i += 1
            rows.append([c - v.image_offset for c in row])
        for end in ([v.eof] if lay.frame_end else []) + [v.eoi]:
            if cut:
                break
            cut = not self._expect(seq, i, end, start, "image", allow_partial)
            i += 1
        codes = torch.tensor(rows, dtype=torch.long).reshape(len(rows), w)
        seg = Image(codes=codes, partial=cut)
        tok = self._need("image") if pixels else None
        if tok is not None and len(rows) > 0 and getattr(tok, "can_decode", True):  # Chameleon's VQ cannot
            with torch.no_grad():
                seg.image = _to_pil(tok.decode(codes[None].to(_device(tok)))[0].cpu())
        return seg, min(i, len(seq))

    def _parse_header(self, seq: list[int], i: int, start: int, allow_partial: bool
                      ) -> tuple[tuple[int, int], int] | None:
        """Read a layout header (e.g. Emu3's ``"H*W<|image token|>"``); returns ((h, w), index after it)."""
        probe = self.image_header(1, 1)
        last = probe[-1] if probe else None  # the header's closing id (the same for every size)
        end = i
        while end < len(seq) and seq[end] != last and seq[end] < self.vocab.special_offset and end - i < 64:
            end += 1
        if end >= len(seq):
            if allow_partial:
                return None
            raise ValueError(f"image span at position {start} is cut off inside its header")
        if seq[end] != last:
            raise ValueError(f"position {end}: expected the header {self.layout.header!r} of the image span at "
                             f"{start}, got {self.vocab.name_of(seq[end])}")
        text = self.text.decode(seq[i:end + 1])
        pattern = re.escape(self.layout.header).replace(r"\{h\}", r"(\d+)").replace(r"\{w\}", r"(\d+)")
        match = re.fullmatch(pattern, text)
        if match is None:
            raise ValueError(f"image span at position {start}: header {text!r} does not match the layout's "
                             f"{self.layout.header!r}")
        h, w = int(match.group(1)), int(match.group(2))
        if seq[i:end + 1] != self.image_header(h, w):
            raise ValueError(f"image span at position {start}: header ids {seq[i:end + 1]} are not the encoding of "
                             f"{text!r}")
        return (h, w), end + 1

    def _infer_size(self, seq: list[int], i: int, start: int) -> tuple[int, int]:
        """Size of a span whose ids do not state it: counted codes -> default size, else a square."""
        v, lay = self.vocab, self.layout
        default = lay.default_size
        assert default is not None  # ImageLayout requires it without size tokens
        n = 0
        while i + n < len(seq) and v.image_offset <= seq[i + n] < v.video_offset:
            n += 1
        if i + n >= len(seq):  # cut off: only the default width can group the rows
            return default
        if n == default[0] * default[1]:
            return default
        side = int(round(n ** 0.5))
        if side * side == n and n > 0:
            return side, side
        raise ValueError(f"image span at position {start} holds {n} codes: neither the default "
                         f"{default[0]}x{default[1]} nor a square; pass image_size")

    def _parse_video(self, seq: list[int], start: int, pixels: bool, allow_partial: bool) -> tuple[Video, int]:
        v = self.vocab
        sizes = self._sizes(seq, start, "thw", "video", allow_partial)
        if sizes is None:
            return Video(partial=True), len(seq)
        t, h, w = sizes
        i = start + 4
        frames: list[list[list[int]]] = []
        cut = False
        for _ in range(t):
            rows, i, cut = self._parse_grid(seq, i, h, w, v.video_offset, v.video_codebook_size, start, "video",
                                            allow_partial)
            if cut or not self._expect(seq, i, v.eof, start, "video", allow_partial):
                cut = True
                break
            frames.append(rows)
            i += 1
        if not cut:
            cut = not self._expect(seq, i, v.eov, start, "video", allow_partial)
            i += 1
        codes = torch.tensor(frames, dtype=torch.long).reshape(len(frames), h, w)
        seg = Video(codes=codes, partial=cut)
        if pixels and len(frames) > 0:
            tok = self._need("video")
            with torch.no_grad():
                seg.frames = tok.decode(codes[None].to(_device(tok)))[0].cpu()
        return seg, i

    # -- helpers -----------------------------------------------------------------------------------
    def dump(self, ids: torch.Tensor | Iterable[int]) -> str:
        """Readable dump: text decoded in runs (JSON-quoted), every other id by name, one image row a line."""
        v = self.vocab
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().tolist()
        lines: list[list[str]] = [[]]
        text: list[int] = []
        for tok in ids + [-1]:
            if 0 <= tok < v.special_offset:
                text.append(tok)
                continue
            if text:
                lines[-1].append(json.dumps(self.text.decode(text), ensure_ascii=False))
                text.clear()
            if tok < 0:
                break
            if tok in (v.boi, v.bov) and lines[-1]:
                lines.append([])
            lines[-1].append(v.name_of(tok))
            if tok in (v.eol, v.eof, v.eoi, v.eov) or v.w_offset <= tok < v.t_offset:  # a row ends, or a header
                lines.append([])
        return "\n".join(" ".join(line) for line in lines if line)

    def _need(self, kind: str):
        tok = getattr(self, kind)
        if tok is None:
            raise ValueError(f"this MultimodalTokenizer has no {kind} tokenizer")
        return tok

    @staticmethod
    def _check_codes(codes: torch.Tensor, dims: int, k: int, what: str) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dim() != dims or codes.dtype != torch.long:
            shape = "(h, w)" if dims == 2 else "(t, h, w)"
            raise ValueError(f"{what} codes must be a LongTensor {shape}, got {getattr(codes, 'shape', codes)!r}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise ValueError(f"{what} codes must lie in [0, {k}), got values {int(codes.min())}..{int(codes.max())}")
        return codes

    # -- save / load -------------------------------------------------------------------------------
    def settings(self) -> dict:
        data = {
            "vocab": self.vocab.to_dict(),
            "image_size": list(self.image_size),
            "video_size": list(self.video_size),
            "und_tokens": self.und_tokens,
            "und_image_size": self.und_image_size,
        }
        if self.layout != ImageLayout():  # written only when it differs, so old files stay byte-identical
            data["layout"] = self.layout.to_dict()
        if self.video_frames is not None:  # likewise
            data["video_frames"] = self.video_frames
        return data

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer_config.json``, ``text_tokenizer.json`` and the VQ tokenizers' safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(self.settings(), indent=2))
        self.text.save(directory / TEXT_FILE)
        if self.image is not None:
            self.image.save(directory / IMAGE_FILE)
        if self.video is not None:
            self.video.save(directory / VIDEO_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MultimodalTokenizer:
        """Load what ``save`` wrote; a missing file or a vocabulary that does not match raises."""
        from tokenizers_mm.hf_adapters import load_image_tokenizer, load_text_tokenizer
        from tokenizers_mm.video import VideoTokenizer

        directory = Path(directory)
        cfg_path = directory / TOKENIZER_CONFIG
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_CONFIG} in {directory}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
        text = load_text_tokenizer(directory / TEXT_FILE)
        image = load_image_tokenizer(directory / IMAGE_FILE) if (directory / IMAGE_FILE).exists() else None
        video = VideoTokenizer.load(directory / VIDEO_FILE) if (directory / VIDEO_FILE).exists() else None
        vocab = Vocab.from_dict(cfg["vocab"])
        tok = cls(text, image, video, image_size=tuple(cfg["image_size"]), video_size=tuple(cfg["video_size"]),
                  und_tokens=cfg.get("und_tokens", 0), und_image_size=cfg.get("und_image_size", 0),
                  max_height=vocab.max_height, max_width=vocab.max_width, max_frames=vocab.max_frames,
                  layout=ImageLayout.from_dict(cfg.get("layout")), video_frames=cfg.get("video_frames"))
        if tok.vocab != vocab:
            raise ValueError(f"{cfg_path} describes vocabulary {vocab.to_dict()} but the tokenizer files give "
                             f"{tok.vocab.to_dict()}: the files do not belong together")
        return tok


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"{name} must be an int or (height, width), got {size!r}")


def _vq_encode(tok, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Codes of same-shaped images ``(3, H, W)`` or clips ``(3, T, H, W)``, in one ``tok.encode`` call."""
    with torch.no_grad():
        return list(tok.encode(torch.stack(pixels).to(_device(tok))).cpu())


def _one_code(tok, pixels: torch.Tensor, where: str) -> torch.Tensor:
    try:
        return _vq_encode(tok, [pixels])[0]
    except (ValueError, TypeError) as err:
        raise _named(err, where) from err


def _named(err: Exception, where: str) -> Exception:
    """``err``'s kind (``TypeError`` or ``ValueError``) with its message prefixed by where it happened."""
    return (TypeError if isinstance(err, TypeError) else ValueError)(f"{where}: {err}")


def _device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _to_pil(x: torch.Tensor) -> PIL.Image.Image:
    from tokenizers_mm.preprocess import tensor_to_pil

    return tensor_to_pil(x)


__all__ = ["MultimodalTokenizer", "TokenSequence", "Modality"]
