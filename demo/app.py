"""The interleaved-generation gradio demo: ``build_demo(engine) -> gr.Blocks`` and ``anygen demo``.

What it owns: the chat around one ``AnyGen`` engine — a ``gr.Chatbot`` that shows text, images and video
inline, a ``gr.MultimodalTextbox`` that takes text with image / video uploads, sampling controls per
modality, examples of each capability — and each session's conversation, kept as token ids.

Notable:

- The conversation is kept as tokens. A session's ``gr.State`` holds a ``Conversation``: the ids of every
  earlier turn (the user's prompt and the model's reply, ``<|eos|>`` stripped) and the pixels behind its
  ``<|und|>`` runs. A new turn is tokenized on its own and appended, so an earlier image is never
  VQ-encoded again, and the whole context goes to ``engine.generator.stream`` as one ``TokenSequence``.
  When the context would leave too little room for the reply, whole turns are dropped, oldest first, and
  the chat says so.
- Uploaded images are read by the understanding encoder (``Understand``, to ask about them) or given as
  VQ context (``Image``, to edit them), as the user picks; uploaded video is VQ context.
- Best of N (``best_of``), each path of the model judging the other's output as ``generate(best_of=N)`` does:
  N candidates are drawn as one batch and the first one previewed. A text → image reply keeps the image whose
  prompt the understanding path finds most likely (``AnyGen.score_candidates``), or with "best of N reads images
  by" the generation path's likelihood, the one whose codes it finds most likely after the message (``rerank``);
  a text → video reply, given
  negatives (texts it must not be, one per line), keeps the clip whose reading most favours the message over them
  (with negatives an image is ranked by the same contrast); an image → text reply (one uploaded
  picture, text sampled at a temperature above 0) keeps the reply under which the generation path finds the
  picture most likely (``AnyGen.score_image``) and shows it in place of the first. The chat says which.
- Negative prompt: classifier-free guidance reads it instead of the empty context (``negative_prompt``), so a
  guided image or clip is steered away from it; with guidance off it is refused in the chat, saying so.
- Regions (``generate(regions=...)``): one ``x0,y0,x1,y1: text`` a line; each box of every image in the reply is
  drawn from that text (every candidate's, with best of N).
- Inpainting (``generate(inpaint=...)``): one ``x0,y0,x1,y1`` box a line; the reply's first image is drawn at the
  size of the last picture in the context given as VQ codes (an upload in "edited" mode, or an earlier reply's
  image) and copies it outside the boxes, so only they are redrawn.
- Composition (``generate(canvas=...)``): with regions, "compose onto" the last VQ picture in the context or an
  empty picture (the shapes scenes' plain background) draws each region alone onto it first
  (``AnyGen.compose_codes``, the chat saying so; best of N reranks each region's drawings there), and the reply
  then copies the composed picture as its first image, streamed as any image is; with inpaint boxes as well, only
  inside them (the rest from the last picture), so an edit's object can be drawn alone and put in place.
- Planning (``anygen.plan``): "plan the regions (and an edit's box) from the prompt" reads a scene prompt ("a red
  circle at the top left and a blue square at the bottom right") into one region per object over its grown cell,
  composed onto an empty picture, and starts the reply with an image; with one attached picture and a recolouring
  ("make the circle yellow") it finds the object's cell (``plan_edits``: the model reads the picture) and sets it as
  the inpaint box under the edited object's caption, composed onto an empty picture (the object drawn alone, then
  put into its cell). The controls it fills stay editable before the prompt is sent.
- Streaming: text shows as it arrives; an image shows at once as a grey canvas that fills in every
  ``preview_every`` rows (``ImageRows.preview``); a video shows its frame count, then the mp4.
- One engine, one generation at a time: the model holds a single KV cache, so the chat event runs with
  ``concurrency_limit=1`` and several users are served in turn by gradio's queue; the cheap events use
  the queue's ``default_concurrency_limit``. The KV cache is released after every reply and when Stop
  cancels one.
- Bad input never breaks the app: an unsupported file type, an upload over the size limit, a corrupt
  image or video, or a prompt the engine refuses (``ValueError``) becomes a message in the chat.
- Importing this module builds nothing and launches nothing.
"""

from __future__ import annotations

import argparse
import html
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import gradio as gr
import PIL.Image
import PIL.ImageDraw
import torch

from anygen.api import RERANKERS, AnyGen
from anygen.data.shapes import BACKGROUND, parse_recolor
from anygen.generation.events import (
    ImageDone,
    ImageRows,
    ImageStarted,
    RowDone,
    TextDelta,
    VideoDone,
    VideoFrameDone,
    VideoStarted,
)
from anygen.generation.generator import (
    DEFAULT_IMAGE,
    DEFAULT_TEXT,
    DEFAULT_VIDEO,
    GenerationSettings,
    parse_box,
    parse_region,
)
from anygen.generation.sampling import SamplingConfig
from anygen.plan import plan_edits, plan_regions
from tokenizers_mm.multimodal import TokenSequence
from tokenizers_mm.preprocess import load_image
from tokenizers_mm.segments import Image, Segment, Text, Understand, Video
from tokenizers_mm.video_io import load_video, write_video
from tokenizers_mm.vocab import Vocab

logger = logging.getLogger("anygen.demo")  # one name whether imported or run as a script

RANDOM_NOTICE = "untrained tiny random model — outputs are noise; pass --checkpoint DIR"
DEFAULT_MAX_UPLOAD_MB = 20.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".apng")
ASPECTS: dict[str, float | None] = {"auto": None, "1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "16:9": 16 / 9,
                                    "9:16": 9 / 16}
TEXT_REFRESH_S = 0.05  # at most this often a text delta alone re-sends the chat to the browser
CANVAS_GREY = (128, 128, 128)
# candidates one reply may draw (one batch: N times the work of one reply); captions meet their target at 32
MAX_BEST_OF = 32
CSS = """
.anygen-notice { padding: 0.6em 1em; border-radius: 8px; background: #fff3cd; color: #664d03;
                 border: 1px solid #ffe69c; font-weight: 600; }
#chat img { min-width: 192px; image-rendering: pixelated; }
#chat video { min-width: 192px; image-rendering: pixelated; }
"""


def _first_media(done: RowDone) -> Image | Video | None:
    """A candidate reply's first drawn image (its pixels and codes) or clip (with codes), what best of N ranks it
    by."""
    for seg in done.segments:
        if isinstance(seg, Image) and seg.image is not None:
            return seg
        if isinstance(seg, Video) and seg.codes is not None:
            return seg
    return None


# -- per-request options and per-session state -----------------------------------------------------------
@dataclass
class ChatOptions:
    """Everything the controls set for one reply (field names are the chat endpoint's parameter names).

    ``image_side`` is the longer side of a generated image in tokens and ``aspect`` its width : height
    (``"auto"`` lets the model pick the size); ``video_frames`` / ``video_side`` give a generated video's
    latent frames and square side in tokens; ``seed=-1`` samples freshly each time; ``best_of`` > 1 draws that
    many candidates for a text → image reply, a text → video one (with ``negatives``), or an image → text one, and
    keeps the one the model reads back best; ``negatives`` holds texts, one per line, that a reranked text → image
    or text → video reply must not be; ``negative_prompt`` is the text guidance steers away from (empty: none);
    ``regions`` holds ``x0,y0,x1,y1: text`` lines, what to draw in which box of a generated image (empty: none);
    ``inpaint`` holds ``x0,y0,x1,y1`` lines, the boxes of the context's last VQ picture to redraw (empty: all of it);
    ``canvas`` composes the regions onto a picture instead of drawing them in the reply's one pass: ``"last"`` the
    context's last VQ picture, ``"empty"`` a picture of the shapes scenes' plain background (``"none"``: off);
    ``rerank`` is how best of N reads a drawn image back (``generate``'s ``rerank``): ``"understanding"``, the
    message's likelihood after the image read by the understanding encoder, or ``"likelihood"``, the generation
    path's log-probability of the image's codes after the message.
    """

    upload_mode: Literal["understand", "edit"] = "understand"
    start_with: Literal["auto", "image", "video"] = "auto"
    image_side: int = 16
    aspect: str = "1:1"
    video_frames: int = 2
    video_side: int = 4
    max_new_tokens: int = 512
    seed: int = -1
    text_temperature: float = DEFAULT_TEXT.temperature
    text_top_k: int = DEFAULT_TEXT.top_k
    text_top_p: float = DEFAULT_TEXT.top_p
    image_temperature: float = DEFAULT_IMAGE.temperature
    image_top_k: int = DEFAULT_IMAGE.top_k
    image_guidance: float = DEFAULT_IMAGE.guidance_scale
    image_source_guidance: float = DEFAULT_IMAGE.image_guidance_scale or 0.0  # image_guidance_scale; 0: off
    image_guidance_start: float = DEFAULT_IMAGE.guidance_start
    video_temperature: float = DEFAULT_VIDEO.temperature
    video_top_k: int = DEFAULT_VIDEO.top_k
    video_guidance: float = DEFAULT_VIDEO.guidance_scale
    preview_every: int = 4
    max_images: int = 0
    best_of: int = 1
    negatives: str = ""
    negative_prompt: str = ""
    regions: str = ""
    inpaint: str = ""
    canvas: Literal["none", "last", "empty"] = "none"
    rerank: Literal["understanding", "likelihood"] = "understanding"

    @classmethod
    def for_engine(cls, engine: AnyGen) -> ChatOptions:
        """Defaults that fit the engine's vocabulary and context, sampled as its checkpoint asks
        (``engine.sampling_defaults``: its ``generation_config.json``, else the library's)."""
        v, ctx = engine.tokenizer.vocab, engine.config.max_seq_len
        side = min(16, v.max_height, v.max_width)
        d = engine.sampling_defaults
        grid = engine.tokenizer.video_grid  # the trained clip, where the tokenizer records it
        frames, clip_side = (min(2, v.max_frames), min(4, v.max_height, v.max_width)) if grid is None else (
            grid[0], min(grid[1:]))
        return cls(image_side=side, video_frames=frames, video_side=clip_side,
                   max_new_tokens=min(512, ctx), preview_every=max(1, side // 4),
                   text_temperature=d.text.temperature, text_top_k=d.text.top_k, text_top_p=d.text.top_p,
                   image_temperature=d.image.temperature, image_top_k=d.image.top_k,
                   image_guidance=d.image.guidance_scale, image_source_guidance=d.image.image_guidance_scale or 0.0,
                   image_guidance_start=d.image.guidance_start,
                   video_temperature=d.video.temperature,
                   video_top_k=d.video.top_k, video_guidance=d.video.guidance_scale)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> ChatOptions:
        """Build from control values (gradio sends numbers as floats; ints are rounded back)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown chat options {unknown}; accepted: {sorted(known)}")
        out = {}
        for name, value in values.items():
            if value is None:
                continue
            default = known[name].default
            if isinstance(default, int) and isinstance(value, (int, float)):
                value = int(round(value))
            elif isinstance(default, float) and isinstance(value, (int, float)):
                value = float(value)
            out[name] = value
        return cls(**out)

    def negative_texts(self) -> list[str]:
        """``negatives`` as a list: one text per non-empty line."""
        if not isinstance(self.negatives, str):
            raise ValueError(f"negatives must be text, one per line, got {type(self.negatives).__name__}")
        return [line.strip() for line in self.negatives.splitlines() if line.strip()]

    def negative_prompt_text(self) -> str:
        """``negative_prompt`` stripped (empty: none)."""
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative prompt must be text, got {type(self.negative_prompt).__name__}")
        return self.negative_prompt.strip()

    def region_list(self) -> list[tuple[str, tuple[float, float, float, float]]]:
        """``regions`` as ``(text, box)`` pairs: one ``x0,y0,x1,y1: text`` per non-empty line."""
        if not isinstance(self.regions, str):
            raise ValueError(f"regions must be text, one x0,y0,x1,y1: text a line, got {type(self.regions).__name__}")
        out = []
        for n, line in enumerate(self.regions.splitlines(), 1):
            if line.strip():
                try:
                    out.append(parse_region(line))
                except ValueError as err:
                    raise ValueError(f"regions, line {n}: {err}") from err
        return out

    def inpaint_boxes(self) -> list[tuple[float, float, float, float]]:
        """``inpaint`` as boxes: one ``x0,y0,x1,y1`` per non-empty line."""
        if not isinstance(self.inpaint, str):
            raise ValueError(f"inpaint must be text, one x0,y0,x1,y1 a line, got {type(self.inpaint).__name__}")
        out = []
        for n, line in enumerate(self.inpaint.splitlines(), 1):
            if line.strip():
                out.append(parse_box(line, f"inpaint, line {n}"))
        return out

    def image_size(self, max_h: int, max_w: int) -> tuple[int, int] | None:
        if self.aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {list(ASPECTS)}, got {self.aspect!r}")
        ratio = ASPECTS[self.aspect]
        if ratio is None:
            return None
        side = max(1, self.image_side)
        h, w = (max(1, round(side / ratio)), side) if ratio >= 1 else (side, max(1, round(side * ratio)))
        return min(h, max_h), min(w, max_w)

    def settings(self, engine: AnyGen) -> GenerationSettings:
        """The ``GenerationSettings`` of one reply (``ValueError`` names a bad value)."""
        v = engine.tokenizer.vocab
        if self.start_with not in ("auto", "image", "video"):
            raise ValueError(f"start_with must be 'auto', 'image' or 'video', got {self.start_with!r}")
        side = min(self.video_side, v.max_height, v.max_width)
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            text=SamplingConfig(self.text_temperature, self.text_top_k, self.text_top_p),
            image=SamplingConfig(self.image_temperature, self.image_top_k, 1.0, self.image_guidance,
                                 self.image_source_guidance or None, self.image_guidance_start),
            video=SamplingConfig(self.video_temperature, self.video_top_k, 1.0, self.video_guidance),
            image_size=self.image_size(v.max_height, v.max_width),
            video_size=(min(self.video_frames, v.max_frames), side, side),
            start_with=None if self.start_with == "auto" else self.start_with,
            max_images=max(0, self.max_images),
            seed=None if self.seed < 0 else self.seed,
            preview_every=max(0, self.preview_every),
        )


@dataclass
class Turn:
    """One exchange, as the model saw it: ``ids`` are the prompt then the reply (no ``<|bos|>`` / ``<|eos|>``)."""

    ids: torch.Tensor  # (T,) long
    und_pixels: list[torch.Tensor] = field(default_factory=list)  # (3, S, S) per <|und|> run, in order


@dataclass
class Conversation:
    """One session's chat: what the chatbot shows and the turns the model reads."""

    messages: list[dict] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    folder: Path | None = None  # where this session's images and videos are written

    def context(self, new: Turn, vocab: Vocab) -> TokenSequence:
        """``<|bos|>`` + every kept turn + ``new``, as one prompt."""
        ids = torch.cat([torch.tensor([vocab.bos]), *(t.ids for t in self.turns), new.ids])
        und = [p for t in [*self.turns, new] for p in t.und_pixels]
        return TokenSequence(ids, vocab.modality(ids), torch.stack(und) if und else None)

    def forget(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# -- the chat logic (no gradio in here, so tests can drive it directly) ------------------------------------
class ChatRunner:
    """Answers chat messages with one engine.

    Args:
        engine: the model and tokenizer.
        workdir: folder for generated files (served by gradio; anything under the temp dir is allowed).
        max_upload_mb: uploads larger than this are refused with a message.
    """

    def __init__(self, engine: AnyGen, workdir: Path, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:
        if max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be > 0, got {max_upload_mb}")
        self.engine = engine
        self.workdir = workdir
        self.max_upload_mb = max_upload_mb
        self._owner: object | None = None  # the reply that set up the KV cache last
        self.last_timings: dict[str, float] = {}

    # -- uploads ------------------------------------------------------------------------------------------
    def load_upload(self, path: str | Path, mode: Literal["understand", "edit"]) -> Segment:
        """An uploaded file as a prompt segment; ``ValueError`` says what was wrong and what is accepted."""
        path = Path(path)
        name, suffix = path.name, path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
            raise ValueError(f"{name}: unsupported file type {repr(suffix) if suffix else '(no extension)'}; "
                             f"accepted images: "
                             f"{', '.join(IMAGE_SUFFIXES)}; videos: {', '.join(VIDEO_SUFFIXES)}")
        size_mb = path.stat().st_size / 2**20
        if size_mb > self.max_upload_mb:
            raise ValueError(f"{name} is {size_mb:.2f} MB, over the {self.max_upload_mb:g} MB upload limit")
        tok = self.engine.tokenizer
        try:
            if suffix in IMAGE_SUFFIXES:
                image = load_image(path)
                if mode == "understand" and tok.und_tokens > 0:
                    return Understand(image)
                return Image(image)
            if tok.video is None:
                raise ValueError("this model has no video tokenizer, so it cannot read video")
            frames, fps = load_video(path, size=tok.video_size)
            most = tok.video.num_frames(tok.vocab.max_frames)  # the longest clip the size tokens can describe
            return Video(frames[:, :most].contiguous(), fps=fps)
        except ValueError as err:  # the readers name the server-side path; the user knows the file by its name
            raise ValueError(f"{name}: {str(err).replace(str(path), name)}") from None
        except Exception as err:  # e.g. PIL's DecompressionBombError, a decoder crash: still the file's fault
            raise ValueError(f"{name} could not be read ({type(err).__name__}: {str(err).replace(str(path), name)})"
                             ) from None

    # -- planning -----------------------------------------------------------------------------------------
    def plan(self, message: dict | str | None) -> tuple[Any, ...]:
        """The "plan" button: ``(regions, inpaint, canvas, start_with, upload_mode)`` for the controls. A text
        message is laid out (``plan_controls``); a recolouring with one attached picture ("make the circle
        yellow") gets the cell the model finds (``plan_edits``: the instruction's place, else its reading of the
        picture) as the inpaint box, under the edited object's caption drawn alone onto an empty picture, the
        picture given as VQ codes.

        Raises:
            gr.Error: what cannot be planned, and why.
        """
        text, files = _split_message(message)
        if not files:
            regions, canvas, start = plan_controls(message)
            return regions, "", canvas, start, gr.skip()
        if len(files) != 1:
            raise gr.Error(f"cannot plan an edit of {len(files)} attachments: attach the one picture to edit")
        try:
            picture = self.load_upload(files[0], "edit")
            if not isinstance(picture, Image):
                raise ValueError(f"{Path(files[0]).name} is not a picture: an edit plan redraws part of one")
            (plan,) = plan_edits(self.engine, [picture.image], [text], seed=0)
        except ValueError as err:
            raise gr.Error(f"cannot plan the edit: {err}") from err
        if not plan.found:
            raise gr.Error(f"the model did not find what {text!r} edits in the picture (read from "
                           f"{plan.read_from!r:.160}); give the inpaint box yourself")
        (caption, box), = plan.regions
        gr.Info(f"redrawing the {plan.cell} cell (read from {plan.read_from!r:.160})")
        return f"{_box_text(box)}: {caption}", _box_text(plan.box), "empty", "image", "edit"  # drawn alone, put in

    # -- one reply ----------------------------------------------------------------------------------------
    def respond(self, message: dict | str | None, options: ChatOptions, conv: Conversation) -> Iterator[list[dict]]:
        """Add the user's message to ``conv`` and stream the reply; yields the chat to show, each time new.

        ``conv`` is updated in place: its messages as the reply is written, its turns when the reply ends.
        """
        text, files = _split_message(message)
        if not text and not files:
            yield conv.messages
            return
        if conv.folder is None:
            conv.folder = Path(tempfile.mkdtemp(prefix="session-", dir=self.workdir))
        tok = self.engine.tokenizer
        segments: list[Segment] = []
        errors: list[str] = []
        for path in files:
            try:
                segments.append(self.load_upload(path, options.upload_mode))
                conv.messages.append(_user({"path": str(path), "alt_text": Path(path).name}))
            except (ValueError, OSError) as err:
                conv.messages.append(_user(f"📎 {Path(path).name}"))
                errors.append(str(err))
        if text:
            conv.messages.append(_user(text))
        if errors:
            conv.messages.append(_note("⚠️ " + "\n\n⚠️ ".join(errors) + "\n\nNothing was generated: fix the "
                                       "upload and send again."))
            yield conv.messages
            return
        if options.upload_mode == "understand" and tok.und_tokens == 0 and any(type(s) is Image for s in segments):
            conv.messages.append(_note("ℹ️ this model has no understanding encoder: uploaded images are given "
                                       "as VQ context instead."))
        if text:
            segments.append(("\n" if conv.turns else "") + text)
        yield conv.messages

        try:
            settings = options.settings(self.engine)
            seq = tok.encode(segments, bos=False, eos=False)
            negatives = options.negative_texts()
            steer = options.negative_prompt_text()
            regions = [(self.engine.encode_prompt(t), box) for t, box in options.region_list()]
            holes = options.inpaint_boxes()
            candidates = self._candidates(options.best_of, settings, text, negatives, options.rerank)
            composing = options.canvas != "none"
            candidates = 1 if composing else candidates  # best of N then reranks each region (_compose)
            picture = self._rerank_picture(settings, segments) if options.best_of > 1 and candidates == 1 else None
            candidates = options.best_of if picture is not None else candidates
        except (ValueError, TypeError) as err:
            conv.messages.append(_note(f"⚠️ {err}"))
            yield conv.messages
            return
        if options.best_of > 1 and candidates == 1 and not composing:
            conv.messages.append(_note(f"ℹ️ best of {options.best_of} reranks text → image replies (start the reply "
                                       "with an image, with text in the message; read by the likelihood, or by "
                                       "the understanding path of a model that has one), text → video replies "
                                       "(start with a video, with text in the message and negatives) and image → "
                                       "text replies (one uploaded picture, start: auto, text temperature above "
                                       "0): this reply draws once."))
        if composing and options.best_of > 1 and not self._reads_images(options.rerank):
            conv.messages.append(_note(f"ℹ️ best of {options.best_of} reranks each composed region through the "
                                       "understanding encoder, which this model lacks: each region is drawn once "
                                       "(read images by the generation path's likelihood instead)."))
        if composing and negatives:
            conv.messages.append(_note("ℹ️ negatives are not used when composing: each region is read back as its "
                                       "own text."))
        if candidates > 1 and picture is None:
            settings = replace(settings, max_images=1)  # each candidate is one image, as generate(best_of=N)
        new = Turn(seq.ids, list(seq.und_pixels) if seq.und_pixels is not None else [])
        dropped = self._make_room(conv, new, settings)
        if dropped:
            conv.messages.append(_note(f"ℹ️ dropped the {dropped} oldest turn(s) from the model's context to make "
                                       f"room for this reply."))
        context, grid = conv.context(new, tok.vocab), None
        if composing:
            try:  # with inpaint boxes, the composed picture goes into the last picture's boxes only
                source = self.engine.inpaint_grid(context, holes) if holes else None
                canvas = self._canvas(context, options, settings, regions, None if source is None else source.shape)
                conv.messages.append(_note(f"ℹ️ composing {len(regions)} region(s) onto "
                                           f"{'the last picture' if options.canvas == 'last' else 'an empty picture'}"
                                           ", each drawn alone; the reply then copies the composed picture"
                                           f"{' inside the inpaint boxes' if holes else ''}."))
                yield conv.messages
                grid = self._compose(context, canvas, options.best_of, settings, regions, steer, source,
                                     options.rerank)
            except (ValueError, RuntimeError) as err:
                conv.messages.append(_note(f"⚠️ {err}"))
                yield conv.messages
                return
            settings = replace(settings, image_size=tuple(grid.shape))
            regions, holes = [], []  # the draw is done: the reply copies it
        if holes:
            try:  # the last VQ picture the model reads: drawn at its size, copied outside the boxes
                grid = self.engine.inpaint_grid(context, holes)
                settings = replace(settings, image_size=tuple(grid.shape))
            except ValueError as err:
                conv.messages.append(_note(f"⚠️ {err}"))
                yield conv.messages
                return
        yield from self._stream(conv, context, new, settings, candidates, text, picture,
                                negatives, self.engine.encode_prompt(steer) if steer else None, regions, grid,
                                options.rerank)

    def _canvas(self, context: TokenSequence, options: ChatOptions, settings: GenerationSettings, regions: list,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """The VQ codes ``(h, w)`` a composed reply's regions are drawn onto (``options.canvas``: the context's
        last VQ picture, or an empty picture at ``size`` in codes, else the reply's image size); a ``ValueError``
        for a reply that cannot compose."""
        tok = self.engine.tokenizer
        if options.canvas not in ("last", "empty"):
            raise ValueError(f"compose onto must be 'none', 'last' or 'empty', got {options.canvas!r}")
        if not regions:
            raise ValueError("compose onto draws the regions onto a picture, and there are none: give regions "
                             "(x0,y0,x1,y1: text a line), or set compose onto to none")
        if settings.start_with != "image":
            raise ValueError("compose onto draws the reply's first image: set start to image")
        if options.canvas == "last":
            return self.engine.last_codes(context, "compose onto the last picture: the chat")
        size = size or settings.image_size or tok.image_grid
        if tok.image is None or size is None:
            raise ValueError("compose onto an empty picture needs the reply's image size in codes and an image "
                             "tokenizer: pick an aspect other than auto, or compose onto the last picture")
        (h, w), down = size, tok.image.downsample
        empty = PIL.Image.new("RGB", (w * down, h * down), BACKGROUND)
        return tok.image_codes(Image(empty, size=(h * down, w * down)))

    def _compose(self, context: TokenSequence, canvas: torch.Tensor, best_of: int, settings: GenerationSettings,
                 regions: list, steer: str, source: torch.Tensor | None = None, rerank: str = "understanding"
                 ) -> torch.Tensor:
        """The picture a composed reply copies (``AnyGen.compose_codes``): each region drawn alone onto ``canvas``,
        best of N reranking each region's drawings (``rerank``) where the model can read them back; with ``source``
        (the last picture's inpaint grid) put into its boxes only."""
        steered = [self.engine.encode_prompt(steer)] if steer else None
        (codes,) = self.engine.compose_codes([context], [canvas], [regions], replace(
            settings, image_size=tuple(canvas.shape)), steered, best_of if self._reads_images(rerank) else 1,
            None if source is None else [source], rerank)
        return codes

    def _candidates(self, best_of: Any, settings: GenerationSettings, text: str, negatives: list[str],
                    rerank: Any = "understanding") -> int:
        """How many candidates this reply draws: ``best_of`` where it can rerank (a text → image reply, read back
        by the understanding encoder of a model that has one or by the generation path's likelihood; a text →
        video reply with negatives), else 1; ``ValueError`` for a value out of range."""
        if not isinstance(best_of, int) or isinstance(best_of, bool) or not 1 <= best_of <= MAX_BEST_OF:
            raise ValueError(f"best of must be an int from 1 (off) to {MAX_BEST_OF}, got {best_of!r}")
        if rerank not in RERANKERS:
            raise ValueError(f"best of N reads images by one of {RERANKERS}, got {rerank!r}")
        tok = self.engine.tokenizer
        reranks = bool(text) and (
            (settings.start_with == "image" and self._reads_images(rerank))
            or (settings.start_with == "video" and bool(negatives) and tok.video is not None))
        return best_of if reranks else 1

    def _reads_images(self, rerank: str) -> bool:
        """Whether best of N can read drawn images back by ``rerank``: by likelihood always, by the understanding
        path where the model has an understanding encoder."""
        tok = self.engine.tokenizer
        return rerank == "likelihood" or (self.engine.model.und is not None and tok.und_tokens > 0)

    def _rerank_picture(self, settings: GenerationSettings, segments: list[Segment]) -> Image | Understand | None:
        """The picture an image → text reply is reranked by (``_pick``), or None where it cannot be: the reply must
        be free to start with text, the new message must hold exactly one picture, the model must have an image
        tokenizer (the picture is scored as VQ codes) and the text must be sampled (greedy candidates are one reply)."""
        pictures = [s for s in segments if isinstance(s, (Image, Understand))]
        if settings.start_with is not None or len(pictures) != 1 or self.engine.tokenizer.image is None \
                or settings.text.temperature <= 0:
            return None
        return pictures[0]

    def _pick(self, dones: dict[int, RowDone], text: str, picture: Image | Understand | None = None,
              negatives: list[str] | None = None, rerank: str = "understanding") -> int:
        """The candidate whose first image or video reads back best as ``text`` (``score_candidates``: an image
        through the understanding path or, ``rerank="likelihood"``, as its codes' likelihood under the generation
        path, a clip as its codes; with ``negatives``, against them); with a ``picture``
        (image → text), the one whose reply text makes the picture most likely under the generation path
        (``score_image``; a reply without text, or too long to precede the picture, is never kept over one that
        can be scored)."""
        if picture is not None:
            rows = sorted(dones)
            scores = self.engine.score_replies(
                ["".join(s.text for s in dones[r].segments if isinstance(s, Text)) for r in rows], picture)
            return rows[max(range(len(rows)), key=lambda i: scores[i])]  # all -inf: the first
        rows = sorted(dones)
        scores = self.engine.score_candidates([_first_media(dones[r]) for r in rows], text, negatives or None,
                                              rerank)
        return rows[max(range(len(rows)), key=lambda i: scores[i])]  # nothing drawn (all -inf): the first

    def _make_room(self, conv: Conversation, new: Turn, settings: GenerationSettings) -> int:
        """Drop the oldest turns until the prompt leaves room for the reply; returns how many were dropped."""
        gen = self.engine.generator
        v, ctx = gen.vocab, self.engine.config.max_seq_len
        reserve = min(settings.max_new_tokens, ctx // 2)
        if settings.start_with == "image":
            reserve = max(reserve, gen.image_span_len(*(settings.image_size or (v.max_height, v.max_width))))
        elif settings.start_with == "video":
            reserve = max(reserve, gen.video_span_len(*(settings.video_size or (v.max_frames, v.max_height,
                                                                                v.max_width))))
        dropped = 0
        while conv.turns and 1 + sum(len(t.ids) for t in conv.turns) + len(new.ids) + reserve > ctx:
            conv.turns.pop(0)
            dropped += 1
        return dropped

    def _stream(self, conv: Conversation, prompt: TokenSequence, new: Turn, settings: GenerationSettings,
                candidates: int = 1, text: str = "", picture: Image | Understand | None = None,
                negatives: list[str] | None = None, steer: TokenSequence | None = None,
                regions: list | None = None, inpaint: torch.Tensor | None = None, rerank: str = "understanding"
                ) -> Iterator[list[dict]]:
        """Stream one reply; with ``candidates`` > 1 the rows are candidates, row 0 is shown as it is drawn and
        the one ``_pick`` keeps (reading images by ``rerank``) replaces it at the end (its image for text → image;
        the whole reply for image → text, reranked by ``picture``)."""
        reply: list[dict] = []
        text_item: dict | None = None  # the reply's open run of text
        media_item: dict | None = None  # the reply's open image / video
        first_image: dict | None = None  # the reply's first image item (best of N shows the kept one there)
        first_video: dict | None = None  # likewise for a video
        canvas: PIL.Image.Image | None = None
        done: RowDone | None = None
        dones: dict[int, RowDone] = {}
        failed = False
        owner = self._owner = object()
        start = last = time.perf_counter()
        timings = self.last_timings = {}
        rows: dict[str, list] = {}  # what the stream's extra rows read, per candidate: each given only when set
        if steer is not None:
            rows["negatives"] = [steer] * candidates  # the guidance twins' negative prompt
        if regions:
            rows["regions"] = [regions] * candidates
        if inpaint is not None:
            rows["inpaint"] = [inpaint] * candidates
        stream = self.engine.generator.stream([prompt] * candidates, settings, **rows)
        try:
            for event in stream:
                now = time.perf_counter()
                if isinstance(event, RowDone):
                    dones[event.row] = event
                    continue
                if event.row != 0:  # best of N: only the first candidate is previewed
                    continue
                if isinstance(event, TextDelta):
                    timings.setdefault("first_text_s", now - start)
                    if text_item is None:
                        text_item = _bot("")
                        reply.append(text_item)
                    text_item["content"] += event.text
                    if now - last < TEXT_REFRESH_S:
                        continue
                elif isinstance(event, ImageStarted):
                    text_item = None
                    h, w = event.pixel_size
                    canvas = PIL.Image.new("RGB", (w, h), CANVAS_GREY)
                    what = f"{candidates} candidates" if candidates > 1 else "image"
                    media_item = _bot(self._save_image(conv, canvas, f"drawing a {event.height}×{event.width}-token "
                                                                     f"{what}"))
                    first_image = first_image or media_item
                    reply.append(media_item)
                elif isinstance(event, ImageRows):
                    timings.setdefault("first_rows_s", now - start)
                    if event.preview is None or media_item is None or canvas is None:
                        continue
                    canvas.paste(event.preview.convert("RGB"), (0, 0))
                    media_item["content"] = self._save_image(conv, canvas, f"{event.rows_done}/{event.height} rows")
                elif isinstance(event, ImageDone):
                    if media_item is not None and event.image.image is not None:
                        media_item["content"] = self._save_image(conv, event.image.image, "generated image")
                    media_item = canvas = None
                elif isinstance(event, VideoStarted):
                    text_item = None
                    media_item = _bot(f"🎞️ generating a {event.frames}×{event.height}×{event.width}-token video: "
                                      f"frame 0/{event.frames}")
                    first_video = first_video or media_item
                    reply.append(media_item)
                elif isinstance(event, VideoFrameDone):
                    timings.setdefault("first_frame_s", now - start)
                    if media_item is not None:
                        media_item["content"] = (media_item["content"].rsplit(": frame", 1)[0]
                                                 + f": frame {event.frame + 1}/{event.frames}")
                elif isinstance(event, VideoDone):
                    if media_item is not None:
                        media_item["content"] = self._save_video(conv, event.video)
                    media_item = None
                last = now
                yield conv.messages + reply
            if len(dones) == candidates:
                kept = self._pick(dones, text, picture, negatives, rerank) if candidates > 1 else 0
                done = dones[kept]
                if candidates > 1 and picture is not None:
                    if kept != 0:  # the shown reply is candidate 1's: show the kept one's in its place
                        reply = [item for seg in done.segments if (item := self._segment_item(conv, seg))]
                        media_item = None
                    reply.append(_note(f"ℹ️ best of {candidates}: kept reply {kept + 1}, the one under which the "
                                       "model's generation path finds the picture most likely."))
                elif candidates > 1 and settings.start_with == "video":
                    clip = next((s for s in done.segments if isinstance(s, Video)), None)
                    if first_video is not None and clip is not None and kept != 0:  # 0: already shown
                        first_video["content"] = self._save_video(conv, clip)
                    reply.append(_note(f"ℹ️ best of {candidates}: kept clip {kept + 1}, the one the model reads as "
                                       "the message most, against the negatives."))
                elif candidates > 1:
                    image = next((s.image for s in done.segments if isinstance(s, Image)), None)
                    if first_image is not None and image is not None:
                        first_image["content"] = self._save_image(conv, image, f"best of {candidates}")
                    against = ", against the negatives" if negatives else ""
                    reader = ("whose codes the model's generation path finds most likely after the prompt"
                              if rerank == "likelihood" else
                              "whose prompt the model's understanding path finds most likely")
                    reply.append(_note(f"ℹ️ best of {candidates}: kept candidate {kept + 1}, the one {reader}"
                                       f"{against}."))
        except (ValueError, TypeError) as err:  # refused before any work (too long, bad size, ...)
            failed = True
            reply.append(_note(f"⚠️ {err}"))
        except Exception as err:  # the app keeps working whatever one reply does
            failed = True
            logger.exception("generation failed")
            reply.append(_note(f"⚠️ generation failed ({type(err).__name__}: {err})"))
        finally:
            stream.close()
            if self._owner is owner:  # a later reply may already own the cache (after Stop): leave it alone
                _release_kv_cache(self.engine.model)
                self._owner = None
            timings["total_s"] = time.perf_counter() - start
            if done is None and not failed:
                # cancelled (Stop, new chat, closed tab): keep what was shown, but the model never saw it
                conv.messages.extend(reply)
                conv.messages.append(_note("⏹️ stopped — this reply is not kept in the model's context."))
                reply = []
        if done is None:
            conv.messages.extend(reply)
            yield conv.messages
            return
        if media_item is not None:  # cut off by max_new_tokens: show the complete rows / frames
            partial = [s for s in done.segments if isinstance(s, (Image, Video))][-1:]
            media_item["content"] = self._partial(conv, partial[0] if partial else None)
        if not reply:
            reply.append(_note("ℹ️ the model ended its reply without writing anything."))
        if done.reason == "max_new_tokens":
            reply.append(_note("ℹ️ reached max new tokens."))
        conv.turns.append(Turn(torch.cat([new.ids, self._reply_ids(done.ids)]), new.und_pixels))
        conv.messages.extend(reply)
        logger.info("reply: %s", {k: round(v, 3) for k, v in timings.items()})
        yield conv.messages

    def _segment_item(self, conv: Conversation, segment: Segment) -> dict | None:
        """One finished segment of a reply as a chat item (text, a saved image, a saved video); None for one with
        nothing to show (an image cut off before its pixels)."""
        if isinstance(segment, Image) and segment.image is not None:
            return _bot(self._save_image(conv, segment.image, "generated image"))
        if isinstance(segment, Video):
            return _bot(self._save_video(conv, segment))
        return _bot(segment.text) if isinstance(segment, Text) and segment.text else None

    def _reply_ids(self, ids: torch.Tensor | None) -> torch.Tensor:
        """The reply's ids as later turns read them: no ``<|eos|>`` / ``<|pad|>``, no span left open."""
        v = self.engine.tokenizer.vocab
        out = [] if ids is None else ids.tolist()
        while out and out[-1] in (v.eos, v.pad):
            out.pop()
        last_open = max((i for i, t in enumerate(out) if t in (v.boi, v.bov)), default=None)
        if last_open is not None and not any(t in (v.eoi, v.eov) for t in out[last_open:]):
            out = out[:last_open]  # cut off inside an image / video: the context cannot hold half a span
        return torch.tensor(out, dtype=torch.long)

    # -- files --------------------------------------------------------------------------------------------
    def _save_image(self, conv: Conversation, image: PIL.Image.Image, alt: str) -> dict:
        assert conv.folder is not None
        path = conv.folder / f"{uuid.uuid4().hex}.png"  # a fresh name each time, so the browser reloads it
        image.convert("RGB").save(path)
        return {"path": str(path), "alt_text": alt}

    def _save_video(self, conv: Conversation, video: Video) -> dict | str:
        assert conv.folder is not None
        if video.frames is None:
            return "🎞️ (the video has no complete frame)"
        path = write_video(conv.folder / f"{uuid.uuid4().hex}.mp4", video.frames, video.fps)
        return {"path": str(path), "alt_text": "generated video"}

    def _partial(self, conv: Conversation, seg: Image | Video | None) -> dict | str:
        if isinstance(seg, Image) and seg.image is not None:
            return self._save_image(conv, seg.image, "partial image (max new tokens reached)")
        if isinstance(seg, Video) and seg.frames is not None:
            return self._save_video(conv, seg)
        return "(cut off by max new tokens before its first row)"


def _release_kv_cache(model) -> None:
    """Drop the model's KV cache buffers (the next reply sets up a fresh one anyway)."""
    model.release_cache()


def _split_message(message: dict | str | None) -> tuple[str, list[str]]:
    if message is None:
        return "", []
    if isinstance(message, str):
        return message.strip(), []
    files = [f["path"] if isinstance(f, dict) else str(f) for f in message.get("files") or []]
    return (message.get("text") or "").strip(), files


def _box_text(box: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in box)


def plan_controls(message: dict | str | None) -> tuple[str, str, str]:
    """The "plan" button for a text message: its scene read by ``anygen.plan`` into the regions box (one
    ``x0,y0,x1,y1: text`` line per object, its cell grown by ``PLAN_MARGIN``), "compose the regions onto" an empty
    picture, and the reply started with an image; returns ``(regions, canvas, start_with)`` (``ChatRunner.plan``
    clears the inpaint box too: a text → image plan redraws no part of an earlier picture).

    Raises:
        gr.Error: the message is not a scene the planner reads (its reason, saying what it reads).
    """
    text, _ = _split_message(message)
    try:
        regions = plan_regions(text)
    except ValueError as err:
        hint = " (to plan an edit, attach the picture it edits)" if parse_recolor(text) is not None else ""
        raise gr.Error(f"cannot plan a layout: {err}{hint}") from err
    return "\n".join(f"{_box_text(box)}: {caption}" for caption, box in regions), "empty", "image"


def _user(content: str | dict) -> dict:
    return {"role": "user", "content": content}


def _bot(content: str | dict) -> dict:
    return {"role": "assistant", "content": content}


def _note(text: str) -> dict:
    """A message from the app itself (errors, notices), not from the model."""
    return {"role": "assistant", "content": text}


def _example_files(folder: Path) -> dict[str, str]:
    """Small pictures for the examples, drawn at build time (the corpus the tiny engine knows)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = PIL.Image.new("RGB", (64, 64), "white")
    draw = PIL.ImageDraw.Draw(shapes)
    draw.ellipse((4, 4, 28, 28), fill="red")
    draw.rectangle((38, 38, 60, 60), fill="blue")
    circle = PIL.Image.new("RGB", (64, 64), "white")
    PIL.ImageDraw.Draw(circle).ellipse((12, 12, 52, 52), fill="red")
    paths = {"shapes": folder / "shapes.png", "circle": folder / "circle.png"}
    shapes.save(paths["shapes"])
    circle.save(paths["circle"])
    return {k: str(p) for k, p in paths.items()}


# -- the UI ---------------------------------------------------------------------------------------------------
def build_demo(engine: AnyGen, *, notice: str | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               workdir: str | Path | None = None) -> gr.Blocks:
    """Build the chat demo around ``engine`` (nothing is launched).

    Args:
        engine: the model and tokenizer to chat with.
        notice: a warning shown above the chat (e.g. ``RANDOM_NOTICE`` for the untrained tiny model).
        max_upload_mb: uploads over this size are refused with a message in the chat.
        workdir: where generated images / videos and the examples' pictures are written (default: a new
            temporary folder; gradio serves files from the temp dir and the working directory only).

    Returns:
        The ``gr.Blocks``; launch it with ``demo.queue(default_concurrency_limit=...).launch(...)``. Its API:
        ``/chat`` (a message ``{"text", "files"}`` and the ``ChatOptions`` fields by name; streams the chat)
        and ``/new_chat``.
    """
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="anygen-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runner = ChatRunner(engine, workdir, max_upload_mb=max_upload_mb)
    defaults = ChatOptions.for_engine(engine)
    v, ctx = engine.tokenizer.vocab, engine.config.max_seq_len
    max_side = min(v.max_height, v.max_width)
    examples = _example_files(workdir / "examples")
    has_und = engine.tokenizer.und_tokens > 0

    def chat(message: dict | None, conversation: Conversation, **options: Any) -> Iterator[tuple]:
        """Send ``message`` (text and files) with the given options; streams the whole chat."""
        try:
            opts = ChatOptions.from_values(options)
        except (ValueError, TypeError) as err:
            conversation.messages.append(_note(f"⚠️ {err}"))
            yield conversation.messages, gr.skip(), conversation
            return
        first = True
        for shown in runner.respond(message, opts, conversation):
            # the textbox is cleared once; later updates skip it, so typing the next prompt is not overwritten
            yield shown, (None if first else gr.skip()), conversation
            first = False

    def new_chat(conversation: Conversation) -> tuple:
        """Start over: forget this session's turns and files."""
        conversation.forget()
        return [], None, Conversation()

    with gr.Blocks(title="anygen", fill_height=True, delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.HTML(f"<style>{CSS}</style><h2 style='margin:0'>anygen — text, images and video in one stream</h2>")
        if notice:
            gr.HTML(f"<div class='anygen-notice' id='notice'>⚠️ {html.escape(notice)}</div>")
        conversation = gr.State(Conversation(), delete_callback=Conversation.forget)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="chat", elem_id="chat", height=620, buttons=["copy"],
                                     placeholder="Ask for text, an image, a video, or an illustrated story; attach "
                                                 "an image to ask about it or edit it.")
                textbox = gr.MultimodalTextbox(
                    placeholder="Type a prompt; attach images (.png .jpg .webp .bmp) or video (.mp4 .webm .gif …)",
                    file_count="multiple", sources=["upload"], show_label=False, elem_id="prompt", stop_btn=True,
                    autofocus=True)
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
                    clear = gr.Button("New chat", elem_id="new-chat", size="sm")
            with gr.Column(scale=1, min_width=280):
                controls: dict[str, gr.components.Component] = {}
                controls["start_with"] = gr.Radio(
                    # labels are not bare "image" / "video": gradio's i18n would read those as translation keys
                    [("whatever the model writes", "auto"), ("an image", "image"), ("a video", "video")],
                    value=defaults.start_with,
                    label="start the reply with", elem_id="start-with")
                controls["upload_mode"] = gr.Radio(
                    [("read (understanding)", "understand"), ("edited (VQ context)", "edit")],
                    value=defaults.upload_mode if has_und else "edit", label="uploaded images are",
                    elem_id="upload-mode",
                    info=None if has_und else "this model has no understanding encoder")
                controls["max_new_tokens"] = gr.Slider(1, ctx, value=defaults.max_new_tokens, step=1,
                                                       label="max new tokens")
                controls["seed"] = gr.Number(defaults.seed, precision=0, label="seed (-1: random)", elem_id="seed")
                controls["best_of"] = gr.Slider(
                    1, MAX_BEST_OF, value=defaults.best_of, step=1, label="best of N", elem_id="best-of",
                    info="draw N, keep the one the model reads back best: text → image (read as below), text → "
                         "video (with negatives), image → text (sampled text)")
                controls["rerank"] = gr.Radio(
                    [("understanding path", "understanding"), ("generation path's likelihood", "likelihood")],
                    value=defaults.rerank if has_und else "likelihood", label="best of N reads images by",
                    elem_id="rerank", interactive=has_und,
                    info="likelihood: how likely the model finds the image's codes after the message (keeps a right "
                         "one-object picture more often on the default model)" if has_und else
                         "this model has no understanding encoder")
                controls["negatives"] = gr.Textbox(
                    defaults.negatives, lines=2, label="negatives, one per line (best of N)", elem_id="negatives",
                    placeholder="a red circle moves down\na red circle moves to the left",
                    info="what a reranked reply must not be; a text → video reply needs them")
                controls["negative_prompt"] = gr.Textbox(
                    defaults.negative_prompt, lines=1, label="negative prompt (guidance steers away from it)",
                    elem_id="negative-prompt", placeholder="a red circle moves down",
                    info="needs the medium's guidance scale above 1 (for clips, 2)")
                with gr.Accordion("image", open=True):
                    controls["image_side"] = gr.Slider(1, max_side, value=defaults.image_side, step=1,
                                                       label="size (tokens, longer side)", elem_id="image-side")
                    controls["aspect"] = gr.Dropdown(list(ASPECTS), value=defaults.aspect, label="aspect (w:h)",
                                                     info="auto: the model picks the size")
                    controls["preview_every"] = gr.Slider(0, max_side, value=defaults.preview_every, step=1,
                                                          label="refresh the preview every N rows (0: at the end)")
                    controls["image_temperature"] = gr.Slider(0, 2, value=defaults.image_temperature, step=0.05,
                                                              label="temperature")
                    controls["image_top_k"] = gr.Slider(0, v.image_codebook_size, value=defaults.image_top_k,
                                                        step=1, label="top-k (0: off)")
                    controls["image_guidance"] = gr.Slider(1, 10, value=defaults.image_guidance, step=0.1,
                                                           label="guidance scale (1: off)")
                    controls["image_source_guidance"] = gr.Slider(
                        0, 10, value=defaults.image_source_guidance, step=0.1,
                        label="image guidance of a source picture (edits; 0: off)",
                        info="InstructPix2Pix's: the weight of the pictures in the prompt against the empty context")
                    controls["image_guidance_start"] = gr.Slider(
                        0, 0.9, value=defaults.image_guidance_start, step=0.05,
                        label="guidance starts after this fraction of the image (0: from the first code)")
                    controls["regions"] = gr.Textbox(
                        defaults.regions, lines=2, label="regions, one per line: x0,y0,x1,y1: text",
                        elem_id="regions", placeholder="0,0,0.33,0.33: a red circle at the top left",
                        info="each box (fractions of the image, the top left 0,0) is drawn from its text")
                    plan = gr.Button("plan the regions (and an edit's box) from the prompt", elem_id="plan",
                                     size="sm")
                    controls["inpaint"] = gr.Textbox(
                        defaults.inpaint, lines=1, label="inpaint: redraw only these boxes, one per line: x0,y0,x1,y1",
                        elem_id="inpaint", placeholder="0,0,0.5,0.5",
                        info="of the last picture given as VQ codes (an edited upload, an earlier reply); the rest "
                             "is copied")
                    controls["canvas"] = gr.Radio(
                        [("no: the regions in the reply's one pass", "none"), ("the last picture", "last"),
                         ("an empty picture", "empty")], value=defaults.canvas, label="compose the regions onto",
                        elem_id="canvas",
                        info="each region drawn alone onto it, then laid on in order (best of N per region)")
                with gr.Accordion("text", open=False):
                    controls["text_temperature"] = gr.Slider(0, 2, value=defaults.text_temperature, step=0.05,
                                                             label="temperature")
                    controls["text_top_k"] = gr.Slider(0, v.text_size, value=defaults.text_top_k, step=1,
                                                       label="top-k (0: off)")
                    controls["text_top_p"] = gr.Slider(0.05, 1, value=defaults.text_top_p, step=0.05,
                                                       label="top-p")
                with gr.Accordion("video", open=False):
                    controls["video_frames"] = gr.Slider(1, v.max_frames, value=defaults.video_frames, step=1,
                                                         label="latent frames")
                    controls["video_side"] = gr.Slider(1, max_side, value=defaults.video_side, step=1,
                                                       label="size (tokens per side)")
                    controls["video_temperature"] = gr.Slider(0, 2, value=defaults.video_temperature, step=0.05,
                                                              label="temperature")
                    controls["video_top_k"] = gr.Slider(0, v.video_codebook_size, value=defaults.video_top_k,
                                                        step=1, label="top-k (0: off)")
                    controls["video_guidance"] = gr.Slider(1, 10, value=defaults.video_guidance, step=0.1,
                                                           label="guidance scale (1: off)")
                controls["max_images"] = gr.Number(defaults.max_images, precision=0, minimum=0,
                                                   label="stop after N images + videos (0: no limit)",
                                                   elem_id="max-images")
        plain = [1, "", "", defaults.video_guidance, "", "", "none"]  # best of N, negatives, negative prompt,
        # video guidance, regions, inpaint, compose onto
        gr.Examples(
            label="examples (each shows one capability)",
            examples=[
                [{"text": "a red circle at the top left and a blue square at the bottom right", "files": []},
                 "image", "understand", 0, *plain],
                [{"text": "what is in the picture?", "files": [examples["shapes"]]}, "auto", "understand", 0, *plain],
                [{"text": "a green triangle moves to the right", "files": []}, "video", "understand", 0, *plain],
                [{"text": "a green triangle moves to the right", "files": []}, "video", "understand", 0, 4,
                 "a green triangle moves to the left\na green triangle moves up\na green triangle moves down",
                 "a green triangle moves to the left", 2.0, "", "", "none"],
                [{"text": "a red circle at the top left and a blue square at the bottom right", "files": []},
                 "image", "understand", 0, 1, "", "", defaults.video_guidance,
                 "0,0,0.33,0.33: a red circle at the top left\n0.67,0.67,1,1: a blue square at the bottom right", "",
                 "none"],
                [{"text": "a red circle at the top left and a blue square at the bottom right", "files": []},
                 "image", "understand", 0, 1, "", "", defaults.video_guidance,
                 "0,0,0.42,0.42: a red circle at the top left\n0.58,0.58,1,1: a blue square at the bottom right", "",
                 "empty"],
                [{"text": "make the circle yellow", "files": [examples["circle"]]}, "image", "edit", 0, *plain],
                [{"text": "make the circle yellow", "files": [examples["shapes"]]}, "image", "edit", 1, 1, "", "",
                 defaults.video_guidance, "", "0,0,0.5,0.5", "none"],
                [{"text": "draw a red square, then add a blue circle below it: a short illustrated story",
                  "files": []}, "auto", "understand", 2, *plain],
            ],
            example_labels=["text → image", "image → text", "text → video",
                            "text → video, steered from the opposite motion, best of 4",
                            "text → image with regions", "text → image, regions composed onto an empty picture",
                            "editing", "editing one part (inpaint)",
                            "illustrated story"],
            inputs=[textbox, controls["start_with"], controls["upload_mode"], controls["max_images"],
                    controls["best_of"], controls["negatives"], controls["negative_prompt"],
                    controls["video_guidance"], controls["regions"], controls["inpaint"], controls["canvas"]],
        )

        plan.click(runner.plan, inputs=[textbox],
                   outputs=[controls["regions"], controls["inpaint"], controls["canvas"], controls["start_with"],
                            controls["upload_mode"]],
                   api_name="plan", concurrency_limit=1, concurrency_id="engine")  # an edit's plan reads the picture
        send = textbox.submit(
            chat, inputs=[textbox, conversation], inputs_kwargs=controls, outputs=[chatbot, textbox, conversation],
            api_name="chat", concurrency_limit=1, concurrency_id="engine",  # one model, one KV cache
            show_progress="minimal", show_progress_on=[chatbot])
        stop.click(None, cancels=[send], api_visibility="private")
        textbox.stop(None, cancels=[send], api_visibility="private")
        clear.click(new_chat, inputs=[conversation], outputs=[chatbot, textbox, conversation], api_name="new_chat",
                    cancels=[send])
        chatbot.clear(new_chat, inputs=[conversation], outputs=[chatbot, textbox, conversation],
                      api_visibility="private", cancels=[send])
    demo.runner = runner  # for tests and benchmarks: timings of the last reply, the engine
    return demo


# -- anygen demo -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anygen demo", description="The interleaved-generation chat demo (gradio).")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (save_pretrained / anygen export)")
    p.add_argument("--random-tiny", action="store_true",
                   help="use the untrained tiny random engine (also the default when no --checkpoint is given)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help="uploads over this size are refused with a message in the chat")
    p.add_argument("--concurrency", type=int, default=4,
                   help="queue's default_concurrency_limit (generation itself runs one at a time per engine)")
    p.add_argument("--queue-size", type=int, default=64, help="most requests waiting in the queue")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy CPU box, 1 avoids threads spinning against gradio's)")
    p.add_argument("--share", action="store_true", help="ask gradio for a public share link")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from anygen.cli_generate import default_checkpoint, load_engine

    try:
        threads_ok = args.threads is None or args.threads >= 1
        if args.max_upload_mb <= 0 or args.concurrency < 1 or args.queue_size < 1 or not threads_ok:
            raise ValueError("--max-upload-mb, --concurrency, --queue-size and --threads must be positive")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        random_tiny = args.random_tiny or (args.checkpoint is None and default_checkpoint() is None)
        notice = RANDOM_NOTICE if random_tiny else None
        engine = load_engine(args.checkpoint, random_tiny=random_tiny, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"anygen demo: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # per-reply timings; the libraries stay at WARNING
    demo = build_demo(engine, notice=notice, max_upload_mb=args.max_upload_mb)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    # a hard cap at the server, well above the chat's own limit, so one request cannot fill the disk
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=f"{max(1, int(4 * args.max_upload_mb))}mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
