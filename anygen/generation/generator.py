"""``Generator``: batched, streaming, interleaved generation over a static KV cache.

What it owns: turning a batch of tokenized prompts into new tokens and events. One step is

    logits (R, V) → guidance (image / video bodies only) → grammar mask or forced id → sample → advance

and every part of it is a tensor operation on the device (``Grammar``, ``sample``), so the only
host synchronisation per step is reading the new ids for streaming, outside the step itself.

Notable:

- Rows advance independently: one row can write text while another draws; a row that reaches
  ``<|eos|>`` or ``max_images`` is finished and fed ``<|pad|>`` until the batch ends.
- Classifier-free guidance is batched: each row has an unconditional twin row whose context is
  ``<|bos|><|null|>`` plus the image / video span currently open. The twin is fed the same ids as
  its row, but its cache slots count as valid only inside a span; when a new span opens, the
  twin's valid-slot mask goes back to its two prompt slots. Guided logits ``u + s·(c − u)`` are used
  only inside image / video bodies; elsewhere the conditional logits are used as they are. A model's copy
  bonus (``image_copy_logit``) is given to each twin as its row has it (``decode_step(twins=…)``), so guidance
  leaves it out and it counts once.
- Limits are checked before any work: a prompt that does not fit the context, or a requested image /
  video that cannot fit in what is left, raises ``ValueError``.
- Two loops give the same greedy tokens. The plain one (``Generator(fast=False)``) is the reference:
  every head, attention over the whole preallocated cache. The fast one (the default) reads, in its one
  sync, which logits each row needs next (``Grammar.next_head``) and computes only those (just the
  image head inside an image body, none when every row's next id is forced), attends over the filled
  part of the cache in ``kv_bucket`` buckets, samples a body without sorting, and runs everything
  between two syncs as one ``FastStep`` call that ``torch.compile`` can capture whole (``CompiledStep``:
  CUDA graphs on a GPU by default, inductor with frozen weights on the CPU on request). See
  ``docs/speed.md`` for what each part buys.
- Imported checkpoints (``tokenizer.layout`` not anygen's own) write images their reference's way:
  the size is the requested one (or the layout's default), a header is forced after ``<|boi|>``, and
  with ``guidance="masked"`` the unconditional twin is the prompt with every id but ``<|bos|>`` /
  ``<|boi|>`` replaced by ``<|null|>`` (Janus), instead of ``<|bos|><|null|>``.
- Negative prompts: ``stream(prompts, settings, negatives=[...])`` gives each row's twin that context instead
  (``u`` is then the negative prompt's logits, so ``u + s·(c − u)`` steers away from it, as diffusion pipelines'
  ``negative_prompt`` does); it only acts where guidance does.
- Image guidance (``SamplingConfig.image_guidance_scale``, InstructPix2Pix's): a second twin per row reads only
  the prompt's VQ images and clips (``_source_twin``), and bodies are drawn from
  ``u + s_I·(c_m − u) + s·(c − c_m)``. Rows ``b..2b`` are the first twins, ``2b..3b`` the second; a row whose
  prompt has no image or clip gets its first twin's context again, so it is guided plainly. It runs only when some
  prompt holds an image or clip and some drawable medium sets it.
- Regional prompting: ``stream(prompts, settings, regions=[[(prompt, box), ...], ...])`` adds, after the twins,
  one group of ``b`` rows per region, each reading its region's prompt and then (like a twin) only the span being
  drawn. A prompt's image code whose centre lies in a box takes that region row's logits as its conditional before
  guidance (``route_regions``), so each part of the picture is drawn by the prompt that describes it, against the
  same twins, while every row is fed the same codes (GLIGEN's boxes and diffusion's regional prompting, in token
  space). ``docs/default_model.md`` measures it on two-object scenes.
- Inpainting: ``stream(prompts, settings, inpaint=[codes, ...])`` gives a row an ``(h, w)`` grid of image codes,
  ``-1`` where it draws: its first image is that size and every code at a place the grid fills is forced
  (``copy_codes``, after the grammar's own forcing), so the model draws only the holes, reading the copied codes
  before and around them as it reads any context. A step in which every row's next code is copied computes no head.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from anygen.generation.events import (
    Event,
    ImageDone,
    ImageRows,
    ImageStarted,
    RowDone,
    TextDelta,
    VideoDone,
    VideoFrameDone,
    VideoStarted,
)
from anygen.generation.grammar import (
    DONE,
    IMG_BODY,
    NEED_ALL,
    NEED_IMAGE,
    NEED_NONE,
    NEED_VIDEO,
    TEXT,
    Grammar,
    GrammarState,
)
from anygen.generation.sampling import SamplingConfig, sample, sample_unfiltered
from anygen.model import AnyGenModel, Head
from tokenizers_mm.multimodal import MultimodalTokenizer, TokenSequence
from tokenizers_mm.segments import Image, Segment, Text, Video

MODALITIES: tuple[str, ...] = ("text", "image", "video")  # each has its own SamplingConfig
DEFAULT_TEXT = SamplingConfig(temperature=0.8, top_k=0, top_p=0.95)
# images at temperature 0.5 (session 14, anygen eval, the shipped model, seeds 0-2, guidance 3): one object 79.2 % and
# digits 93.3 % against 65.3 / 88.3 % at 1 (0.7: 77.2 / 92.5; 0.3: 76.4 / 91.7); guidance 2 draws single objects
# better still (86.4 % at 0.5) but digits worse (87.5 %), guidance 5 both worse (46.2 / 88.8 % at 0.7)
# image guidance 1.5 for prompts that hold an image (session 37, anygen eval's edits, 120 a seed, seeds 0-2): 20.0 /
# 17.5 / 20.0 % against 6.7 / 5.0 / 9.2 % with plain guidance 3 (2: 20.8 / 18.3 / 19.2; 1: 13.3 % at seed 0); prompts
# without one (text → image, digits) draw exactly as before
DEFAULT_IMAGE = SamplingConfig(temperature=0.5, top_k=0, top_p=1.0, guidance_scale=3.0, image_guidance_scale=1.5)
# no guidance for clips: on held-out motions CFG 3 drew the asked direction half as often as none (session 10,
# anygen eval's video category, seeds 0-2: 16x16 model 25-30 % against 55-65 %, 8x8 model 50 against 62.5 %),
# while images need it (t2i 65 % at 3, 47 % at 1). Temperature 0.7 (session 11, same prompts, seeds 0-2): 62.5 / 70 /
# 72.5 % against 55 / 57.5 / 65 % at 1 and 65 / 57.5 / 65 % at 0.5
DEFAULT_VIDEO = SamplingConfig(temperature=0.7, top_k=0, top_p=1.0, guidance_scale=1.0)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1: fractions of the image's width and height, top left 0
RegionPrompt = tuple[TokenSequence, Box]  # a region's encoded prompt and its box


def check_box(box: object, name: str = "box") -> Box:
    """``box`` as four floats ``x0, y0, x1, y1`` with ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``, or a
    ``ValueError`` naming ``name``."""
    ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in box)
    if ok:
        x0, y0, x1, y1 = (float(x) for x in box)
        ok = 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    if not ok:
        raise ValueError(f"{name}: a box is (x0, y0, x1, y1), fractions of the image's width and height with "
                         f"0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (the top left is 0, 0), got {box!r:.200}")
    return x0, y0, x1, y1


def parse_box(spec: str, name: str = "box") -> Box:
    """``"X0,Y0,X1,Y1"`` (the command line's ``--inpaint``, a line of the demo's inpaint field) as a box, or a
    ``ValueError`` naming ``name`` and saying what is accepted."""
    try:
        numbers = tuple(float(x) for x in str(spec).split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 4:
        raise ValueError(f"{name}: a box is X0,Y0,X1,Y1, four fractions of the image (the top left 0,0), got "
                         f"{spec!r:.200}")
    return check_box(numbers, name)


def parse_region(spec: str) -> tuple[str, Box]:
    """``"X0,Y0,X1,Y1:TEXT"`` (the command line's ``--region``, a line of the demo's regions) as ``(TEXT, box)``,
    or a ``ValueError`` saying what is accepted."""
    box, sep, text = str(spec).partition(":")
    try:
        numbers = tuple(float(x) for x in box.split(","))
    except ValueError:
        numbers = ()
    if not sep or len(numbers) != 4 or not text.strip():
        raise ValueError(f"a region is X0,Y0,X1,Y1:TEXT (four fractions of the image, the top left 0,0, then the "
                         f"text), got {spec!r:.200}")
    return text.strip(), check_box(numbers, f"region {spec!r:.100}")


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling a checkpoint is generated with when a call sets none: one ``SamplingConfig`` per modality.

    The library's own (``DEFAULT_TEXT`` / ``DEFAULT_IMAGE`` / ``DEFAULT_VIDEO``, tuned on the shipped default
    model) apply unless a checkpoint carries others (``generation_config.json``, written by ``save_pretrained``;
    importers record their reference's published settings), in the spirit of Hugging Face's ``GenerationConfig``.
    """

    text: SamplingConfig = field(default_factory=lambda: DEFAULT_TEXT)
    image: SamplingConfig = field(default_factory=lambda: DEFAULT_IMAGE)
    video: SamplingConfig = field(default_factory=lambda: DEFAULT_VIDEO)

    def to_dict(self) -> dict[str, dict]:
        return {m: asdict(getattr(self, m)) for m in MODALITIES}

    @classmethod
    def from_dict(cls, data: object, source: str = "generation config") -> SamplingDefaults:
        """Read ``{"text": {...}, "image": {...}, "video": {...}}``; a modality or field left out keeps the
        library default.

        Raises:
            ValueError: not an object, an unknown modality or field, or a value out of range (named, with
                ``source``).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a JSON object with keys among {list(MODALITIES)}, "
                             f"got {type(data).__name__}")
        unknown = sorted(set(data) - set(MODALITIES))
        if unknown:
            raise ValueError(f"{source}: unknown modality {unknown}; accepted: {list(MODALITIES)}")
        base = cls()
        try:
            return cls(**{m: SamplingConfig.coerce(data.get(m), m, getattr(base, m)) for m in MODALITIES})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err
_HEADS: dict[int, Head | None] = {NEED_NONE: None, NEED_IMAGE: "image", NEED_VIDEO: "video", NEED_ALL: "all"}


@dataclass
class GenerationSettings:
    """Everything a generation call may set besides the prompts.

    Args:
        max_new_tokens: most ids generated per row (structure tokens included).
        text / image / video: sampling per modality.
        image_size: ``(h, w)`` in tokens for every generated image; None lets the model choose.
        video_size: ``(t, h, w)`` in tokens (latent frames, rows, columns); None lets the model choose.
        start_with: force the first generated segment to be an image or a video (text→image); a list
            gives one choice per prompt.
        max_images: stop a row after this many images + videos (0: no limit).
        seed: seeds the sampler; the same seed and inputs give the same output.
        preview_every: with streaming, decode the open image every this many rows (0: no previews).
    """

    max_new_tokens: int = 512
    text: SamplingConfig = field(default_factory=lambda: DEFAULT_TEXT)
    image: SamplingConfig = field(default_factory=lambda: DEFAULT_IMAGE)
    video: SamplingConfig = field(default_factory=lambda: DEFAULT_VIDEO)
    image_size: tuple[int, int] | None = None
    video_size: tuple[int, int, int] | None = None
    start_with: Literal["image", "video"] | None | list[Literal["image", "video"] | None] = None
    max_images: int = 0
    seed: int | None = None
    preview_every: int = 0


class Generator:
    """Generates from a model and its tokenizer.

    Args:
        model: the decoder (its KV cache is set up per call).
        tokenizer: the ``MultimodalTokenizer`` whose ``Vocab`` the model was built with.
        fast: the fast decode loop (default); False runs the plain reference loop, which computes every
            head and attends over the whole preallocated cache each step. Greedy tokens are identical.
        compile: run the fast loop's decode step through ``torch.compile``; None (default) compiles on
            CUDA only (``mode="reduce-overhead"``: one CUDA graph per step shape). On the CPU it is
            opt-in: it pays off after a cold start of tens of seconds, and it freezes the weights
            (changing them recompiles). See ``docs/speed.md``.
        kv_bucket: the fast loop attends over the filled slots rounded up to a multiple of this.
        gather_forced: the fast loop, uncompiled, feeds a run of forced ids (an inpainted image's copied codes) in
            one ``prefill`` instead of one step each; False: one step each (``bench/inpaint.py``'s baseline).
    """

    def __init__(self, model: AnyGenModel, tokenizer: MultimodalTokenizer, *, fast: bool = True,
                 compile: bool | None = None, kv_bucket: int = 64, gather_forced: bool = True) -> None:
        if model.vocab != tokenizer.vocab:
            raise ValueError(f"model vocabulary {model.vocab.to_dict()} differs from the tokenizer's "
                             f"{tokenizer.vocab.to_dict()}")
        if not isinstance(kv_bucket, int) or kv_bucket < 1:
            raise ValueError(f"kv_bucket must be a positive int, got {kv_bucket!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab
        self.device = model.norm.weight.device
        self.layout = tokenizer.layout
        if model.tracks_grid and not self.layout.row_end:
            raise ValueError("the model reads image rows and columns (AnyGenConfig.image_grid_embed / rope_grid) from "
                             "the <|eol|> that end its rows, but this tokenizer's image layout writes none "
                             "(row_end=False); use anygen's own layout or a model with image_grid_embed=False and "
                             "rope_grid=0")
        self.grammar = Grammar(self.vocab, allow_image=tokenizer.image is not None,
                               allow_video=tokenizer.video is not None, device=self.device, layout=self.layout)
        self.fast = fast
        self.kv_bucket = kv_bucket
        self.gather_forced = gather_forced
        compile = self.device.type == "cuda" if compile is None else compile
        self._step = FastStep(model, self.grammar)
        self._compiled = CompiledStep(self._step) if fast and compile else None

    # -- checks ----------------------------------------------------------------------------------------
    def image_span_len(self, h: int, w: int) -> int:
        return self.tokenizer.image_span_len(h, w)

    def _image_size(self, s: GenerationSettings) -> tuple[int, int] | None:
        """The requested image size; in a layout without size tokens, the layout's default when none is."""
        if s.image_size is not None:
            return _ints(s.image_size, 2, "image_size")
        return None if self.layout.size_tokens else self.layout.default_size

    def video_span_len(self, t: int, h: int, w: int) -> int:
        return 4 + t * (h * (w + 1) + 1) + 1

    def _check(self, prompts: list[TokenSequence], s: GenerationSettings,
               negatives: list[TokenSequence | None] | None = None,
               regions: list[list[RegionPrompt]] | None = None,
               inpaint: list[torch.Tensor | None] | None = None) -> int:
        """Validate the request before any work; returns the number of new tokens to budget for."""
        v, ctx = self.vocab, self.model.config.max_seq_len
        if not prompts:
            raise ValueError("no prompts given")
        if not isinstance(s.max_new_tokens, int) or s.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {s.max_new_tokens!r}")
        starts = self._starts(s, len(prompts))
        if "image" in starts and self.tokenizer.image is None:
            raise ValueError("start_with='image' needs an image tokenizer; this model has none")
        if "video" in starts and self.tokenizer.video is None:
            raise ValueError("start_with='video' needs a video tokenizer; this model has none")
        if s.image_size is not None:
            h, w = _ints(s.image_size, 2, "image_size")
            if not (1 <= h <= v.max_height and 1 <= w <= v.max_width):
                raise ValueError(f"image_size {h}x{w} tokens cannot be produced: this tokenizer writes "
                                 f"1..{v.max_height} rows and 1..{v.max_width} columns")
        if s.video_size is not None:
            t, h, w = _ints(s.video_size, 3, "video_size")
            if not (1 <= t <= v.max_frames and 1 <= h <= v.max_height and 1 <= w <= v.max_width):
                raise ValueError(f"video_size {t}x{h}x{w} tokens cannot be produced: accepted 1..{v.max_frames} "
                                 f"latent frames, 1..{v.max_height} rows, 1..{v.max_width} columns")
        if negatives is not None:
            if len(negatives) != len(prompts):
                raise ValueError(f"negatives: one negative prompt per prompt, got {len(negatives)} for "
                                 f"{len(prompts)}")
            if any(n is not None and n.und_pixels is not None for n in negatives):
                raise ValueError("a negative prompt is read by the guidance twin as text and VQ spans; an image for "
                                 "the understanding encoder (Understand) cannot be one")
            for i, n in enumerate(negatives):
                if n is not None and len(n) >= ctx:
                    raise ValueError(f"negative prompt #{i} is {len(n)} tokens but the model's context is {ctx} "
                                     f"(AnyGenConfig.max_seq_len): shorten the negative prompt")
            if not any(getattr(s, m).guidance_scale != 1.0 for m in self._drawable(s, len(prompts))):
                raise ValueError("a negative prompt steers classifier-free guidance, which is off (guidance_scale 1) "
                                 f"for every medium this call may draw ({', '.join(self._drawable(s, len(prompts)))})"
                                 ": set that medium's guidance_scale, e.g. video={'guidance_scale': 2}")
        if regions is not None:
            self._check_regions(regions, len(prompts), s)
        if inpaint is not None:
            self._check_inpaint(inpaint, len(prompts), s)
        region_prompts = [r for row in regions or [] for r, _ in row]
        longest = max(len(p) for p in [*prompts, *(n for n in negatives or [] if n is not None), *region_prompts])
        if longest >= ctx:
            raise ValueError(f"the prompt is {longest} tokens but the model's context is {ctx} "
                             f"(AnyGenConfig.max_seq_len): shorten the prompt")
        budget = min(s.max_new_tokens, ctx - longest)
        for what in set(starts) - {None}:
            if what == "image":  # an inpainted row draws at its grid's size
                sizes = [tuple(g.shape) if g is not None else self._image_size(s) or (v.max_height, v.max_width)
                         for g, start in zip(inpaint or [None] * len(prompts), starts) if start == "image"]
                need = max(self.image_span_len(h, w) for h, w in sizes)
            else:
                t, h, w = s.video_size or (v.max_frames, v.max_height, v.max_width)
                need = self.video_span_len(t, h, w)
            if need <= budget:
                continue
            raise ValueError(f"the requested {what} needs {need} tokens but only {budget} fit "
                             f"(prompt{' or negative or region prompt' if negatives or regions else ''} {longest} "
                             f"tokens, context {ctx}, "
                             f"max_new_tokens {s.max_new_tokens}); ask for a smaller size or a shorter prompt")
        return budget

    def _check_regions(self, regions: list[list[RegionPrompt]], b: int, s: GenerationSettings) -> None:
        ctx = self.model.config.max_seq_len
        if not isinstance(regions, (list, tuple)) or len(regions) != b:
            raise ValueError(f"regions: one list of (prompt, box) per prompt, got {regions!r:.200} for {b} prompts")
        if any(regions) and "image" not in self._drawable(s, b):
            raise ValueError("regions route the codes of generated images, and this call draws none (start_with="
                             f"{s.start_with!r}, max_images {s.max_images}, "
                             f"{'no image tokenizer' if self.tokenizer.image is None else 'clips only'})")
        for i, row in enumerate(regions):
            for j, region in enumerate(row):
                if not (isinstance(region, tuple) and len(region) == 2 and isinstance(region[0], TokenSequence)):
                    raise ValueError(f"region {j} of prompt #{i} must be a (TokenSequence, box) pair, got "
                                     f"{region!r:.200}")
                prompt, box = region
                check_box(box, f"region {j} of prompt #{i}")
                if prompt.und_pixels is not None:
                    raise ValueError(f"region {j} of prompt #{i}: a region prompt is read as text and VQ spans; an "
                                     "image for the understanding encoder (Understand) cannot be one")
                if len(prompt) >= ctx:
                    raise ValueError(f"region {j} of prompt #{i} is {len(prompt)} tokens but the model's context is "
                                     f"{ctx} (AnyGenConfig.max_seq_len): shorten it")

    def _check_inpaint(self, inpaint: list[torch.Tensor | None], b: int, s: GenerationSettings) -> None:
        v = self.vocab
        if not isinstance(inpaint, (list, tuple)) or len(inpaint) != b:
            raise ValueError(f"inpaint: one grid of codes (or None) per prompt, got {inpaint!r:.200} for {b} prompts")
        if any(g is not None for g in inpaint) and "image" not in self._drawable(s, b):
            raise ValueError("inpaint copies codes into a generated image, and this call draws none (start_with="
                             f"{s.start_with!r}, max_images {s.max_images})")
        size = self._image_size(s)
        for i, grid in enumerate(inpaint):
            if grid is None:
                continue
            if not (isinstance(grid, torch.Tensor) and grid.dim() == 2 and not grid.is_floating_point()
                    and not grid.is_complex()):
                raise ValueError(f"inpaint grid of prompt #{i} must be a 2-D integer tensor of image codes (-1 where "
                                 f"the model draws), got {grid!r:.200}")
            h, w = grid.shape
            if not (1 <= h <= v.max_height and 1 <= w <= v.max_width):
                raise ValueError(f"inpaint grid of prompt #{i} is {h}x{w} codes; this tokenizer writes "
                                 f"1..{v.max_height} rows and 1..{v.max_width} columns")
            if size is not None and (h, w) != tuple(size):
                raise ValueError(f"inpaint grid of prompt #{i} is {h}x{w} codes but the call draws {size[0]}x{size[1]}"
                                 " (image_size): the image is drawn at its grid's size, so leave image_size unset or "
                                 "equal")
            if bool(((grid < -1) | (grid >= v.image_codebook_size)).any()):
                raise ValueError(f"inpaint grid of prompt #{i} holds values outside -1..{v.image_codebook_size - 1} "
                                 f"(image codes, -1 where the model draws)")

    @staticmethod
    def _starts(s: GenerationSettings, b: int) -> list[str | None]:
        starts = list(s.start_with) if isinstance(s.start_with, (list, tuple)) else [s.start_with] * b
        if len(starts) != b or any(x not in (None, "image", "video") for x in starts):
            raise ValueError(f"start_with must be None, 'image', 'video', or a list of those with one entry per "
                             f"prompt ({b}), got {s.start_with!r}")
        return starts

    def _drawable(self, s: GenerationSettings, b: int) -> tuple[str, ...]:
        """The media a call can draw: those the tokenizer has, narrowed to one when every row opens with it and
        may draw nothing after it (``max_images=1``). Guidance twins are only run for these (text→video at the
        default settings runs none: clips are sampled without guidance, images with it)."""
        kinds = tuple(m for m, ok in (("image", self.tokenizer.image is not None),
                                      ("video", self.tokenizer.video is not None)) if ok)
        starts = set(self._starts(s, b))
        if s.max_images == 1 and len(starts) == 1 and None not in starts:
            kinds = tuple(m for m in kinds if m in starts)
        return kinds

    def _empty_twin(self, prompt: TokenSequence) -> torch.Tensor:
        """The unconditional twin's context: ``<|bos|><|null|>``, or (``guidance="masked"``, Janus) the prompt with
        every id but ``<|bos|>`` / ``<|boi|>`` replaced by ``<|null|>``."""
        v = self.vocab
        if self.layout.guidance == "masked":
            return torch.where((prompt.ids == v.bos) | (prompt.ids == v.boi), prompt.ids, v.null)
        return torch.tensor([v.bos, v.null])

    def _source_twin(self, prompt: TokenSequence) -> torch.Tensor | None:
        """Image guidance's second twin context: ``<|bos|>`` and the prompt's closed VQ image and clip spans
        (``<|boi|> … <|eoi|>``, ``<|bov|> … <|eov|>``) in order, its text left out; None when it has none. Images for
        the understanding encoder (``<|und|>`` runs) are not VQ spans and are left out too."""
        v = self.vocab
        ids = prompt.ids.tolist()
        kept, start, close = [v.bos], None, None
        for i, x in enumerate(ids):
            if start is None and x in (v.boi, v.bov):
                start, close = i, v.eoi if x == v.boi else v.eov
            elif start is not None and x == close:
                if v.und not in ids[start:i + 1]:  # <|boi|> <|und|>… <|eoi|> is an understood image, not VQ codes
                    kept += ids[start:i + 1]
                start = None
        return torch.tensor(kept) if len(kept) > 1 else None

    # -- the loop ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, prompts: list[TokenSequence], settings: GenerationSettings | None = None,
               negatives: list[TokenSequence | None] | None = None,
               regions: list[list[RegionPrompt]] | None = None,
               inpaint: list[torch.Tensor | None] | None = None) -> Iterator[Event]:
        """Generate for a batch of prompts, yielding events as ids arrive; ends with one ``RowDone`` per row.
        ``negatives``: one prompt per row that its guidance twin reads instead of ``<|bos|><|null|>`` (None for a
        row: that one). ``regions``: one list of ``(prompt, box)`` per row (an empty list: none for that row); an
        image code whose centre lies in a box is drawn from the logits of a row reading that box's prompt (and the
        span drawn so far) instead of the row's own, guided against the same twins: regional prompting. Later boxes
        win where boxes overlap; clips are not routed. ``inpaint``: one ``(h, w)`` long tensor of image codes per row
        (or None), ``-1`` where the row draws: the row's first image is ``h × w`` and copies every code the grid
        gives."""
        s = settings or GenerationSettings()
        budget = self._check(prompts, s, negatives, regions, inpaint)
        run = self._start(prompts, s, budget, negatives, regions, inpaint)
        yield from (self._fast_steps if self.fast else self._plain_steps)(run, s, budget)
        for tracker in run.trackers:
            if not tracker.finished:
                yield from tracker.finish("max_new_tokens")

    def generate(self, prompts: list[TokenSequence], settings: GenerationSettings | None = None,
                 negatives: list[TokenSequence | None] | None = None,
                 regions: list[list[RegionPrompt]] | None = None,
                 inpaint: list[torch.Tensor | None] | None = None) -> list[RowDone]:
        """Run ``stream`` to the end; one ``RowDone`` (segments and new ids) per prompt, in order."""
        done = [e for e in self.stream(prompts, settings, negatives, regions, inpaint) if isinstance(e, RowDone)]
        return sorted(done, key=lambda e: e.row)

    def _start(self, prompts: list[TokenSequence], s: GenerationSettings, budget: int,
               negatives: list[TokenSequence | None] | None = None,
               regions: list[list[RegionPrompt]] | None = None,
               inpaint: list[torch.Tensor | None] | None = None) -> _Run:
        """Left-pad the prompts (their guidance twins and region rows), prefill the cache, build the sampler's
        tensors."""
        v, dev, model = self.vocab, self.device, self.model
        b = len(prompts)
        drawable = [getattr(s, m) for m in self._drawable(s, b)]
        sources = [self._source_twin(p) for p in prompts] if any(
            c.source_scale != c.guidance_scale for c in drawable) else []
        sourced = any(x is not None for x in sources)  # image guidance acts: a second twin group
        guided = sourced or any(c.guidance_scale != 1.0 for c in drawable)
        rows = [p.ids for p in prompts]
        if guided:  # each twin reads its row's negative prompt, else the empty context
            given = negatives if negatives is not None else [None] * b
            first = [n.ids if n is not None else self._empty_twin(p) for p, n in zip(prompts, given)]
            rows += first
            if sourced:  # a row without a source reads its first twin's context again: plain guidance
                rows += [x if x is not None else f for x, f in zip(sources, first)]
        twins = (1 + sourced) if guided else 0
        # region groups after the twins, b rows each (a row with fewer regions reads the empty context there, its
        # box empty): like a twin, a region row reads its prompt and then only the spans being drawn
        groups = max((len(row) for row in regions or []), default=0)
        boxes = torch.zeros((groups, b, 4))
        for j in range(groups):
            for i, p in enumerate(prompts):
                if j < len(regions[i]):
                    rows.append(regions[i][j][0].ids)
                    boxes[j, i] = torch.tensor([float(x) for x in regions[i][j][1]])
                else:
                    rows.append(self._empty_twin(p))
        r = len(rows)
        width = max(len(x) for x in rows)
        ids = torch.full((r, width), v.pad, dtype=torch.long)
        mask = torch.zeros((r, width), dtype=torch.bool)
        for i, x in enumerate(rows):  # left padding: every row's next token goes to the same slot
            ids[i, width - len(x):] = x
            mask[i, width - len(x):] = True
        und = [p.und_pixels for p in prompts if p.und_pixels is not None]
        und_pixels = torch.cat(und).to(dev) if und else None
        ids, mask = ids.to(dev), mask.to(dev)

        if self._compiled is not None:
            self._compiled.setup_cache(r, width + budget)
        else:
            model.setup_cache(r, width + budget, device=dev)
        logits = model.prefill(ids, attention_mask=mask, und_pixels=und_pixels, twins=b if r > b else 0)  # (R, V)
        positions = mask.sum(-1)  # (R,) next RoPE position of each row

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        ih, iw = self._image_size(s) or (0, 0)
        if self.layout.header is not None:
            self.grammar.set_image_header(self.tokenizer.image_header(ih, iw))
        vt, vh, vw = s.video_size or (0, 0, 0)
        grids = list(inpaint or [None] * b)  # a row's inpaint grid sets its image's size
        req_h = [ih if g is None else g.shape[0] for g in grids]
        req_w = [iw if g is None else g.shape[1] for g in grids]
        sizes = [g.shape for g in grids if g is not None]
        keep = torch.full((b, max((h for h, _ in sizes), default=0), max((w for _, w in sizes), default=0)), -1,
                          dtype=torch.long)
        for i, g in enumerate(grids):
            if g is not None:
                keep[i, :g.shape[0], :g.shape[1]] = g.long().cpu()
        state = GrammarState.start(tensor([TEXT] * b), req_h=tensor(req_h), req_w=tensor(req_w),
                                   req_t=tensor([vt] * b), req_vh=tensor([vh] * b), req_vw=tensor([vw] * b),
                                   max_media=tensor([s.max_images] * b))
        cfgs = (s.text, s.image, s.video)  # indexed by grammar.S_TEXT / S_IMAGE / S_VIDEO
        generator = torch.Generator(device=dev)
        generator.manual_seed(s.seed if s.seed is not None else torch.seed())
        tensors = StepTensors(
            prompt_valid=model.cache_valid.clone(), twin_prompt_len=positions[b:].clone(),
            temperature=torch.tensor([c.temperature for c in cfgs], device=dev),
            top_k=tensor([c.top_k for c in cfgs]),
            top_p=torch.tensor([c.top_p for c in cfgs], device=dev),
            scale=torch.tensor([c.guidance_scale for c in cfgs], device=dev),
            source_scale=torch.tensor([c.source_scale for c in cfgs], device=dev),
            guidance_start=torch.tensor([float(c.guidance_start) for c in cfgs], device=dev),
            boxes=boxes.to(dev),
            keep=keep.to(dev),
        )
        return _Run(
            b=b, twins=twins, regions=groups, width=width, logits=logits, positions=positions, state=state,
            first=tensor([{"image": v.boi, "video": v.bov}.get(x or "", -1) for x in self._starts(s, b)]),
            tensors=tensors, generator=generator,
            trackers=[_RowTracker(row, self.tokenizer, s.preview_every, (ih, iw)) for row in range(b)],
        )

    def _plain_steps(self, run: _Run, s: GenerationSettings, budget: int) -> Iterator[Event]:
        """The reference loop: full logits and the whole preallocated cache every step."""
        v, model, b, t = self.vocab, self.model, run.b, run.tensors
        state, logits, positions = run.state, run.logits, run.positions
        slot = torch.tensor(run.width, device=self.device)
        for step in range(budget):
            mclass, forced = self.grammar.constraints(state)
            forced = copy_codes(self.grammar, state, forced, t.keep)
            if step == 0:
                forced = torch.where(run.first >= 0, run.first, forced)
            tok = select_all(self.grammar, logits, state, mclass, forced, t, b, run.guided, generator=run.generator)
            opens = (state.phase == TEXT) & ((tok == v.boi) | (tok == v.bov))
            twin_valid = self.grammar.in_media(state) | opens
            state = self.grammar.advance(state, tok)

            host = torch.stack([tok, (state.phase == DONE).long()]).tolist()  # the one sync per step
            for row, tracker in enumerate(run.trackers):
                if not tracker.finished:
                    yield from tracker.feed(host[0][row], done=bool(host[1][row]))
            if all(tr.finished for tr in run.trackers) or step == budget - 1:
                break

            feed = tok
            k = run.twins + run.regions  # groups of b rows after the prompts'
            if k:
                # a twin (or region row) forgets its previous span when a new one opens, and keeps only span tokens
                reset = torch.cat([torch.zeros_like(opens), opens.repeat(k)])[:, None]
                model.cache_valid.copy_(torch.where(reset, t.prompt_valid, model.cache_valid))
                positions[b:] = torch.where(opens.repeat(k), t.twin_prompt_len, positions[b:])
                feed = tok.repeat(1 + k)
            logits = model.decode_step(feed, slot=slot, positions=positions, twins=b if k else 0)
            if k:
                model.cache_valid[b:].index_copy_(1, slot.reshape(1), twin_valid.repeat(k)[:, None])
                positions[b:] += twin_valid.long().repeat(k)
            positions[:b] += 1
            slot += 1

    def _fast_steps(self, run: _Run, s: GenerationSettings, budget: int) -> Iterator[Event]:
        """The fast loop: the same tokens as ``_plain_steps`` (greedy), less work per step.

        - The one sync per step also reads what each row's next logits must cover (``Grammar.next_head``),
          so the next step computes only the image (or video) head when every row draws codes, and no
          head at all when every row's next id is forced (``<|eol|>``, ``<|eoi|>``, a requested size).
        - Attention reads the filled part of the cache only, in buckets of ``kv_bucket`` slots.
        - Inside a body the modality's settings are host numbers: guidance is one fused expression and,
          without top-k / top-p, sampling needs no sort (``sample_unfiltered``).
        - Everything between two syncs is one ``FastStep`` call, which ``compile`` captures whole; its
          random draws come in as a tensor (``torch.compile`` cannot trace a ``torch.Generator``).
        - Inpainting, uncompiled: while every row's next id is forced (copied codes, ``<|eol|>``), the ids are only
          gathered, and the run is fed in one ``prefill`` when some row next needs logits (``_feed_run``): a box
          of a ninth of the picture costs a few dozen forward passes instead of one per code.
        """
        v, b, t = self.vocab, run.b, run.tensors
        step_fn = self._compiled if self._compiled is not None else self._step
        cache_len = self.model.cache_valid.shape[1]
        state, positions = run.state, run.positions
        slot = torch.tensor(run.width, device=self.device)
        mclass, forced = self.grammar.constraints(state)
        forced = copy_codes(self.grammar, state, forced, t.keep)
        forced = torch.where(run.first >= 0, run.first, forced)
        # the prefill's logits cover the whole vocabulary: the first choice is made as in the plain loop
        tok = select_all(self.grammar, run.logits, state, mclass, forced, t, b, run.guided, generator=run.generator)
        opens, in_media, state, mclass, forced, host = self._step.advance(state, tok, t.keep)
        gather = self.gather_forced and t.keep.shape[1] > 0 and self._compiled is None  # forced runs fed at once
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # gathered (id, opens, in_media)
        for step in range(budget):
            toks, done, needs = host.tolist()  # the one sync per step
            opened = False
            for row, tracker in enumerate(run.trackers):
                if not tracker.finished:
                    opened |= toks[row] in (v.boi, v.bov)
                    yield from tracker.feed(toks[row], done=bool(done[row]))
            if step == budget - 1 or all(tr.finished for tr in run.trackers):
                break
            wanted = set(needs) - {NEED_NONE}  # the heads this step must compute
            if gather and not wanted:  # every row's next id is forced: gather it, run the model later
                pending.append((tok, opens, in_media))
                tok = forced
                opens, in_media, state, mclass, forced, host = self._step.advance(state, tok, t.keep)
                continue
            head = "all" if len(wanted) > 1 else _HEADS[wanted.pop() if wanted else NEED_NONE]
            cfg = {"image": s.image, "video": s.video}.get(head or "")
            noise = None
            if head == "all":  # the same draws as the plain loop's sampler
                noise = torch.empty(b, v.size, device=self.device).exponential_(generator=run.generator)
            elif cfg is not None and cfg.temperature > 0:
                n = v.image_codebook_size if head == "image" else v.video_codebook_size
                noise = torch.empty(b, n, device=self.device).exponential_(generator=run.generator)
            if pending:
                pending.append((tok, opens, in_media))
                positions, slot, logits = self._feed_run(run, pending, positions, slot, head)
                pending = []
                tok = self._step.choose(logits, state, mclass, forced, noise, t, head=head, cfg=cfg, b=b,
                                        guided=run.guided)
                opens, in_media, state, mclass, forced, host = self._step.advance(state, tok, t.keep)
                continue
            kv_len = min(cache_len, -(-(run.width + step + 1) // self.kv_bucket) * self.kv_bucket)
            tok, positions, slot, opens, in_media, state, mclass, forced, host = step_fn(
                tok, opens, in_media, state, mclass, forced, positions, slot, noise, t, kv_len=kv_len, head=head,
                cfg=cfg, b=b, guided=run.guided, opened=opened or self._compiled is not None)  # one graph for both

    def _feed_run(self, run: _Run, pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  positions: torch.Tensor, slot: torch.Tensor, head: Head) -> tuple:
        """Feed gathered ids (each with ``opens`` / ``in_media`` as ``FastStep.advance`` gave them) in one
        ``prefill`` at ``slot``, with the twins' bookkeeping ``FastStep`` does one id at a time: a twin forgets its
        span when one opens (only the first id can open one: a forced id never does) and counts only span ids.
        Returns ``(positions, slot, logits)``, the logits of ``head`` after the last id."""
        model, b, t = self.model, run.b, run.tensors
        ids = torch.stack([p[0] for p in pending], dim=1)  # (B, N)
        n = ids.shape[1]
        steps = torch.arange(n, device=ids.device)[None]
        k = run.twins + run.regions
        if not k:
            logits = model.prefill(ids, positions=positions[:, None] + steps, start=int(slot), head=head)
            return positions + n, slot + n, logits
        opens, in_media = pending[0][1], torch.stack([p[2] for p in pending], dim=1)  # (B,), (B, N)
        reset = torch.cat([torch.zeros_like(opens), opens.repeat(k)])[:, None]
        model.cache_valid.copy_(torch.where(reset, t.prompt_valid, model.cache_valid))
        positions = torch.cat([positions[:b], torch.where(opens.repeat(k), t.twin_prompt_len, positions[b:])])
        valid = in_media.clone()
        valid[:, 0] |= opens
        valid = valid.repeat(k, 1)  # (k·B, N) the ids each twin counts
        before = valid.long().cumsum(1) - valid.long()
        chunk = torch.cat([positions[:b, None] + steps, positions[b:, None] + before])
        mask = torch.cat([torch.ones_like(ids, dtype=torch.bool), valid])
        logits = model.prefill(ids.repeat(1 + k, 1), positions=chunk, attention_mask=mask, start=int(slot),
                               head=head, twins=b)
        positions = positions + torch.cat([torch.full_like(positions[:b], n), valid.long().sum(1)])
        return positions, slot + n, logits


@dataclass
class _Run:
    """What ``Generator._start`` set up for one call: the batch, its guidance twins, the sampler, the trackers."""

    b: int  # prompts (rows b.. are their guidance twins, then their region rows, in groups of b)
    twins: int  # twin groups of b rows: 0, 1, or 2 (image guidance: rows 2b..3b read the prompts' media)
    regions: int  # region groups of b rows after the twins (Generator.stream's regions)
    width: int  # prompt slots (left-padded); generated ids go to slots width, width + 1, …
    logits: torch.Tensor  # (R, V) of the prefill
    positions: torch.Tensor  # (R,) next RoPE position of each row
    state: GrammarState
    first: torch.Tensor  # (B,) the id forced at step 0 (start_with), or -1
    tensors: StepTensors
    generator: torch.Generator
    trackers: list[_RowTracker]

    @property
    def guided(self) -> bool:
        return self.twins > 0


@dataclass
class StepTensors:
    """The per-call tensors a step reads (a ``FastStep`` argument, so a compiled step is not specialised on them)."""

    prompt_valid: torch.Tensor  # (R, L) the cache's valid slots after the prefill
    twin_prompt_len: torch.Tensor  # (twins·B,) real tokens in each twin's prompt
    temperature: torch.Tensor  # (3,) per grammar.S_TEXT / S_IMAGE / S_VIDEO
    top_k: torch.Tensor
    top_p: torch.Tensor
    scale: torch.Tensor
    source_scale: torch.Tensor  # image guidance's s_I (SamplingConfig.source_scale)
    guidance_start: torch.Tensor  # the fraction of a span's codes drawn unguided (SamplingConfig.guidance_start)
    boxes: torch.Tensor  # (N, B, 4) each region group's box per prompt, x0 y0 x1 y1 in [0, 1] (all zero: none)
    keep: torch.Tensor  # (B, H, W) image codes each row's first image copies, -1 where it draws ((B, 0, 0): none)


def guide(logits: torch.Tensor, b: int, scale: torch.Tensor | float, source_scale: torch.Tensor | float
          ) -> torch.Tensor:
    """Guided logits of rows ``0..b`` from ``logits`` ``(R, ·)`` holding their twins after them: ``u + s·(c − u)``
    with one twin group (``R = 2b``); ``u + s_I·(c_m − u) + s·(c − c_m)`` with two (``R = 3b``, the second reading
    the prompts' media: image guidance)."""
    cond, unc = logits[:b], logits[b:2 * b]
    if logits.shape[0] == 2 * b:
        return unc + scale * (cond - unc)
    media = logits[2 * b:]
    return unc + source_scale * (media - unc) + scale * (cond - media)


def route_regions(grammar: Grammar, logits: torch.Tensor, state: GrammarState, boxes: torch.Tensor, b: int
                  ) -> torch.Tensor:
    """``logits`` ``(R, ·)`` without their region groups (the last ``N`` groups of ``b`` rows, ``boxes`` ``(N, B,
    4)``), rows ``0..b`` taking a region row's logits where the code they draw next lies in its box (later groups
    win): each prompt's conditional, before guidance against its twins."""
    n = boxes.shape[0]
    if n == 0:
        return logits
    kept = logits.shape[0] - n * b
    cond = logits[:b]
    inside = grammar.in_regions(state, boxes)  # (N, B)
    for j in range(n):
        cond = torch.where(inside[j][:, None], logits[kept + j * b:kept + (j + 1) * b], cond)
    return torch.cat([cond, logits[b:kept]])


def copy_codes(grammar: Grammar, state: GrammarState, forced: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``forced`` with the inpainted codes added: a row drawing a code of its first image at a place its grid ``keep``
    ``(B, H, W)`` fills (``>= 0``) must emit that code; where the grammar already forces an id it stands."""
    if keep.shape[1] == 0:  # no row inpaints (a static shape)
        return forced
    row = state.row.clamp(0, keep.shape[1] - 1)
    col = state.col.clamp(0, keep.shape[2] - 1)
    code = keep[torch.arange(keep.shape[0], device=keep.device), row, col]
    inside = (state.row < state.height) & (state.col < state.width) & (state.row < keep.shape[1]) & (
        state.col < keep.shape[2])
    copy = (state.phase == IMG_BODY) & (state.media_done == 0) & inside & (code >= 0) & (forced < 0)
    return torch.where(copy, code + grammar.vocab.image_offset, forced)


def select_all(grammar: Grammar, logits: torch.Tensor, state: GrammarState, mclass: torch.Tensor,
               forced: torch.Tensor, t: StepTensors, b: int, guided: bool, *,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next ids from logits over the whole vocabulary: regions and guidance in bodies, the state's mask, sampling,
    forcing."""
    logits = route_regions(grammar, logits, state, t.boxes, b)
    setting = grammar.phase_setting[state.phase]  # (B,)
    cond = logits[:b]
    if guided:
        g, gs = t.scale[setting][:, None], t.source_scale[setting][:, None]
        active = grammar.in_body(state) & ((g != 1.0) | (gs != 1.0))[:, 0]
        active = active & (grammar.body_progress(state) >= t.guidance_start[setting])
        cond = torch.where(active[:, None], guide(logits, b, g, gs), cond)
    cond = cond.float().masked_fill(~grammar.masks[mclass], float("-inf"))
    tok = sample(cond, t.temperature[setting], t.top_k[setting], t.top_p[setting], generator, noise=noise)
    return torch.where(forced >= 0, forced, tok)  # (B,)


class FastStep(torch.nn.Module):
    """Everything the fast loop does between two host syncs, as one function of tensors (what ``compile`` captures).

    Feeds the ids chosen last step (with the guidance twins' bookkeeping), computes the logits of one
    head over the filled part of the cache, applies guidance, samples, forces, and advances the
    grammar. Host numbers (the head, the body's ``SamplingConfig``, the batch size) are arguments: a
    compiled step specialises on them (``CompiledStep`` passes the kv length as a dynamic size).
    """

    def __init__(self, model: AnyGenModel, grammar: Grammar) -> None:
        super().__init__()
        self.model = model
        self.grammar = grammar
        self.vocab = grammar.vocab

    def forward(self, tok: torch.Tensor, opens: torch.Tensor, in_media: torch.Tensor, state: GrammarState,
                mclass: torch.Tensor, forced: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                noise: torch.Tensor | None, t: StepTensors, *, kv_len: int, head: Head | None,
                cfg: SamplingConfig | None, b: int, guided: bool, opened: bool = True) -> tuple:
        model = self.model
        feed = tok
        k = positions.shape[0] // b - 1  # twin and region groups (a static shape: a compiled step specialises on it)
        if k:
            if opened:  # a twin forgets its previous span when a new one opens (the host may know none did)
                reset = torch.cat([torch.zeros_like(opens), opens.repeat(k)])[:, None]
                model.cache_valid.copy_(torch.where(reset, t.prompt_valid, model.cache_valid))
                positions = torch.cat([positions[:b], torch.where(opens.repeat(k), t.twin_prompt_len, positions[b:])])
            feed = tok.repeat(1 + k)
        logits = model.decode_step(feed, slot=slot, positions=positions, kv_len=kv_len, head=head,
                                   twins=b if k else 0)
        if k:
            twin_valid = (in_media | opens).repeat(k)
            model.cache_valid[b:].index_copy_(1, slot.reshape(1), twin_valid[:, None])
            positions = positions + torch.cat([torch.ones_like(positions[:b]), twin_valid.long()])
        else:
            positions = positions + 1
        tok = self.choose(logits, state, mclass, forced, noise, t, head=head, cfg=cfg, b=b, guided=guided)
        return (tok, positions, slot + 1, *self.advance(state, tok, t.keep))

    def choose(self, logits: torch.Tensor | None, state: GrammarState, mclass: torch.Tensor, forced: torch.Tensor,
               noise: torch.Tensor | None, t: StepTensors, *, head: Head | None, cfg: SamplingConfig | None, b: int,
               guided: bool) -> torch.Tensor:
        """The next ids from ``logits`` of ``head`` (None: every id is forced): regions, guidance, sampling,
        forcing."""
        if head is None:
            tok = forced
        elif head == "all":
            tok = select_all(self.grammar, logits, state, mclass, forced, t, b, guided, noise=noise)
        else:
            offset = self.vocab.image_offset if head == "image" else self.vocab.video_offset
            logits = route_regions(self.grammar, logits, state, t.boxes, b)
            cond = logits[:b]
            if guided and cfg.guided:
                cond = guide(logits, b, cfg.guidance_scale, cfg.source_scale)
                if cfg.guidance_start > 0:  # the span's first codes from the conditional alone
                    late = self.grammar.body_progress(state) >= cfg.guidance_start
                    cond = torch.where(late[:, None], cond, logits[:b])
            if cfg.temperature == 0 or (cfg.top_k == 0 and cfg.top_p >= 1.0):  # no filter changes an argmax
                code = sample_unfiltered(cond, cfg.temperature, noise=noise)
            else:
                n = cond.shape[0]
                code = sample(cond.float(), cond.new_full((n,), cfg.temperature, dtype=torch.float32),
                              torch.full((n,), cfg.top_k, dtype=torch.long, device=cond.device),
                              cond.new_full((n,), cfg.top_p, dtype=torch.float32), noise=noise)
            tok = torch.where(forced >= 0, forced, code + offset)
        return tok

    def advance(self, state: GrammarState, tok: torch.Tensor, keep: torch.Tensor) -> tuple:
        """The grammar after ``tok``: ``(opens, in_media, state, mclass, forced, host)``.

        ``host`` is ``(3, B)``: the ids, whether each row is done, and which head its next step needs
        (``Grammar.next_head``), stacked so that one ``tolist`` reads them all.
        """
        v, grammar = self.vocab, self.grammar
        in_media = grammar.in_media(state)
        opens = (state.phase == TEXT) & ((tok == v.boi) | (tok == v.bov))
        state = grammar.advance(state, tok)
        mclass, forced = grammar.constraints(state)
        forced = copy_codes(grammar, state, forced, keep)
        host = torch.stack([tok, (state.phase == DONE).long(), grammar.next_head(state, forced)])
        return opens, in_media, state, mclass, forced, host


class CompiledStep:
    """A ``FastStep`` through ``torch.compile``: one graph per head / sampling setting, the kv length dynamic.

    - CUDA: ``mode="reduce-overhead"``, so a whole step (decode, guidance, sampling, grammar) replays
      as one CUDA graph. Written for the GPU benchmark; not exercised by the CPU test suite.
    - CPU: inductor with frozen weights and max-autotune GEMMs: at a batch of 2 rows its C++
      micro-kernels read the weights several times faster than MKL's sgemm (``docs/speed.md``).
      Frozen weights are a snapshot, so a change of any parameter (its storage or version counter)
      throws the compiled graphs away at the next call's ``setup_cache``.

    The KV cache of the last shape is kept between calls (``release`` frees it): graphs are specialised
    on the cache tensors (CUDA graphs on their addresses), so a new cache per call would recompile.
    """

    def __init__(self, step: FastStep, *, backend: str | None = None) -> None:
        self.step = step
        self.backend = backend  # a torch.compile backend instead of the device's default (tests: "eager")
        self.model = step.model
        self.cuda = self.model.norm.weight.device.type == "cuda"
        self._fn = None
        self._weights: tuple = ()
        self._kept: tuple | None = None  # (shape, caches, cache_valid, slot_ids) reused across calls
        self._failed = False  # the first compilation raised: run the eager step (with a warning)

    def _fingerprint(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _build(self) -> None:
        step = _KvLenFromShape(self.step)
        if self.backend is not None:
            self._fn = torch.compile(step, backend=self.backend, fullgraph=True)
        elif self.cuda:
            self._fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        else:  # freezing (set around each call, see __call__) lets inductor pre-pack the weights for its GEMMs
            self._fn = torch.compile(step, mode="max-autotune-no-cudagraphs", fullgraph=True)
        self._weights = self._fingerprint()

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """``model.setup_cache``, except that the cache of an earlier call of the same shape is reused (zeroed)."""
        model = self.model
        if self._fn is None or (not self.cuda and self._weights != self._fingerprint()):
            self._build()
            self._kept = None  # new weights may have a new dtype or device
        shape = (batch_size, max_seq_len)
        if self._kept is not None and self._kept[0] == shape:
            _, caches, model.cache_valid, model.cache_slot_ids = self._kept
            for block, cache in zip(model.blocks, caches):
                block.attn.kv_cache = cache
            model.reset_cache()
            return
        model.setup_cache(batch_size, max_seq_len)
        caches = [block.attn.kv_cache for block in model.blocks]
        if self.cuda:  # CUDA graphs read and write these in place
            for tensor in [model.cache_valid, *(c.k for c in caches), *(c.v for c in caches)]:
                torch._dynamo.mark_static_address(tensor)
        self._kept = (shape, caches, model.cache_valid, model.cache_slot_ids)

    def release(self) -> None:
        """Drop the kept cache and the compiled graphs."""
        self._kept, self._fn = None, None

    def __call__(self, *args, kv_len: int, **kwargs) -> tuple:
        if self._fn is None:
            self._build()
        if self._failed:
            return self.step(*args, kv_len=kv_len, **kwargs)
        kv = torch.empty(kv_len, device=self.model.cache_valid.device)  # kv_len as a dynamic size, see below
        torch._dynamo.maybe_mark_dynamic(kv, 0)
        try:
            if self.cuda:
                torch.compiler.cudagraph_mark_step_begin()
                # the next replay overwrites a graph's outputs: keep copies (gpt-fast clones its tokens too)
                return tuple(_clone(x) for x in self._fn(kv, *args, **kwargs))
            # compilation is lazy (a new head compiles inside this call) and reads freezing from the global
            # inductor config there; inductor freezes in no-grad mode only
            with torch.no_grad(), torch._inductor.config.patch(freezing=True):
                return self._fn(kv, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:  # tracing / compiling (fake tensors: no state touched)
            warnings.warn(f"anygen: compiling the decode step failed ({type(err).__name__}: {err}); "
                          "falling back to the eager fast step", stacklevel=2)
            self._failed = True
            return self.step(*args, kv_len=kv_len, **kwargs)


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, GrammarState):
        return x.clone()
    return x


class _KvLenFromShape(torch.nn.Module):
    """``FastStep`` taking the kv length as a tensor's size: Dynamo specialises an int argument on its first
    value and compiles again at the second, but a size marked dynamic is symbolic from the first compile."""

    def __init__(self, step: FastStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, kv: torch.Tensor, *args, **kwargs) -> tuple:
        return self.step(*args, kv_len=kv.shape[0], **kwargs)


class _RowTracker:
    """Host-side view of one row: turns its ids into events and, at the end, into segments."""

    def __init__(self, row: int, tokenizer: MultimodalTokenizer, preview_every: int,
                 image_size: tuple[int, int] = (0, 0)) -> None:
        self.row, self.tok, self.preview_every = row, tokenizer, preview_every
        self.v = tokenizer.vocab
        self.image_size = image_size  # the requested size: the only one a layout without size tokens writes
        self.ids: list[int] = []
        self.segments: list[Segment] = []
        self.text_ids: list[int] = []
        self.text_sent = ""
        self.span: list[int] | None = None  # ids of the open image / video span
        self.finished = False

    def _flush_text(self) -> None:
        if self.text_ids:
            self.segments.append(Text(self.tok.text.decode(self.text_ids)))
        self.text_ids, self.text_sent = [], ""

    def feed(self, tok: int, *, done: bool) -> Iterator[Event]:
        v = self.v
        self.ids.append(tok)
        if self.span is not None:
            self.span.append(tok)
            yield from self._span_event(tok)
        elif tok < v.special_offset:
            self.text_ids.append(tok)
            text = self.tok.text.decode(self.text_ids)
            if not text.endswith("\ufffd") and len(text) > len(self.text_sent):  # wait for a split UTF-8 char
                yield TextDelta(self.row, text[len(self.text_sent):])
                self.text_sent = text
        elif tok in (v.boi, v.bov):
            self._flush_text()
            self.span = [tok]
            if tok == v.boi and not self.tok.layout.is_native:
                yield from self._layout_image_event(tok)  # a header-less layout starts drawing at once
        if done:
            yield from self.finish("eos" if tok in (v.eos, v.pad) else "max_images")

    def _span_event(self, tok: int) -> Iterator[Event]:
        v, span = self.v, self.span
        assert span is not None
        image = span[0] == v.boi
        if image and not self.tok.layout.is_native:
            yield from self._layout_image_event(tok)
            return
        n = len(span)
        if image and n == 3:
            h, w = v.size_value(span[1], "h"), v.size_value(span[2], "w")
            ds = self.tok.image.downsample
            yield ImageStarted(self.row, h, w, (h * ds, w * ds))
        elif not image and n == 4:
            t, h, w = (v.size_value(span[1], "t"), v.size_value(span[2], "h"), v.size_value(span[3], "w"))
            yield VideoStarted(self.row, t, h, w)
        elif image and tok == v.eol:
            h = v.size_value(span[1], "h")
            rows_done = span.count(v.eol)
            preview = None
            if self.preview_every and (rows_done % self.preview_every == 0 or rows_done == h):
                (seg,) = self.tok.decode(span, allow_partial=True)
                preview = seg.image
            yield ImageRows(self.row, rows_done, h, preview)
        elif not image and tok == v.eof:
            preview = None
            if self.preview_every:
                (seg,) = self.tok.decode(span, allow_partial=True)
                preview = seg.frames
            yield VideoFrameDone(self.row, span.count(v.eof) - 1, v.size_value(span[1], "t"), preview)
        elif tok in (v.eoi, v.eov):
            (seg,) = self.tok.decode(span)
            self.segments.append(seg)
            self.span = None
            yield ImageDone(self.row, seg) if isinstance(seg, Image) else VideoDone(self.row, seg)

    def _layout_image_event(self, tok: int) -> Iterator[Event]:
        """Events of an image in an imported layout: the header is known from the request, rows by counting."""
        v, span, lay = self.v, self.span, self.tok.layout
        assert span is not None
        h, w = self.image_size
        head = 1 + len(self.tok.image_header(h, w))
        n = len(span)
        body = n - head  # ids written after the header
        per_row = w + int(lay.row_end)
        if n == head:
            ds = self.tok.image.downsample
            yield ImageStarted(self.row, h, w, (h * ds, w * ds))
        elif tok == v.eoi:
            (seg,) = self.tok.decode(span, image_size=(h, w))
            self.segments.append(seg)
            self.span = None
            yield ImageDone(self.row, seg)
        elif 0 < body <= h * per_row and body % per_row == 0:
            rows_done = body // per_row
            preview = None
            if self.preview_every and (rows_done % self.preview_every == 0 or rows_done == h):
                (seg,) = self.tok.decode(span, allow_partial=True, image_size=(h, w))
                preview = seg.image
            yield ImageRows(self.row, rows_done, h, preview)

    def finish(self, reason: str) -> Iterator[Event]:
        self._flush_text()
        if self.span is not None:  # cut off by max_new_tokens: keep the complete rows, flagged partial
            size = None if self.tok.layout.is_native else self.image_size
            segs = self.tok.decode(self.span, allow_partial=True, image_size=size)
            self.segments.extend(s for s in segs if isinstance(s, (Image, Video)))
            self.span = None
        self.finished = True
        yield RowDone(self.row, reason, self.segments, torch.tensor(self.ids, dtype=torch.long))


def _ints(values, n: int, name: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) != n or not all(isinstance(x, int) for x in values):
        raise ValueError(f"{name} must be {n} ints (sizes in tokens), got {values!r}")
    return tuple(values)
