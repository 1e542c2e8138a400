"""``AnyGen``: the Python API users touch — load a checkpoint directory, generate, stream, save.

What it owns: the checkpoint directory layout and turning user prompts (strings, segment lists,
batches) into ``TokenSequence`` batches for the ``Generator``, and its events back into
``GenerationOutput`` objects.

Checkpoint directory (safetensors only; nothing here ever unpickles)::

    config.json                   {"format": "anygen", "model": AnyGenConfig, "vocab": Vocab}
    model.safetensors             the decoder (and understanding encoder) weights
    tokenizer_config.json         MultimodalTokenizer settings (vocab, default sizes, und tokens)
    text_tokenizer.json           byte-level BPE
    image_tokenizer.safetensors   image VQ weights + config in the metadata
    video_tokenizer.safetensors   video VQ weights + config in the metadata
    generation_config.json        optional: the sampling this checkpoint is generated with by default
                                  ({"text" | "image" | "video": SamplingConfig fields}; ``SamplingDefaults``)

Imported checkpoints: ``from_pretrained`` also accepts a Janus / Emu3 / Chameleon directory in
Hugging Face layout and converts it in memory (``anygen.convert``); a directory written by
``anygen convert`` carries ``imported_from.json`` (the reference <-> anygen id map, ``AnyGen.id_map``).

Prompts: a ``str`` or a list of segments is one prompt; a list of prompts (a list whose items are
all ``str`` or all lists) is a batch, and ``generate`` then returns a list of outputs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import PIL.Image
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from anygen.config import AnyGenConfig
from anygen.generation.events import Event, RowDone
from anygen.generation.generator import GenerationSettings, Generator, RegionPrompt, SamplingDefaults, check_box
from anygen.generation.sampling import SamplingConfig
from anygen.model import AnyGenModel, routed_cross_entropy
from tokenizers_mm.multimodal import TOKENIZER_CONFIG, MultimodalTokenizer, TokenSequence
from tokenizers_mm.segments import Image, Segment, Text, Understand, Video
from tokenizers_mm.vocab import Vocab

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # save_pretrained(dtype=)
# how generate(best_of=N) reads a drawn image back (``rerank``): the understanding path's likelihood of the prompt
# after the image, or the generation path's likelihood of the image's codes after the prompt
RERANKERS: tuple[str, ...] = ("understanding", "likelihood")
GENERATION_CONFIG_FILE = "generation_config.json"
FORMAT = "anygen"

Prompt = str | Segment | PIL.Image.Image | Sequence[Any]


def holed(codes: torch.Tensor, boxes: Sequence[tuple[float, float, float, float]], name: str) -> torch.Tensor:
    """``codes`` ``(h, w)`` with ``-1`` at every code whose centre lies in one of ``boxes`` (fractions of the image,
    checked): the grid ``Generator.stream(inpaint=...)`` copies from, drawing the ``-1`` cells (the rule
    ``Grammar.in_regions`` routes regions by). A ``ValueError`` starting with ``name`` when the boxes hold no code."""
    h, w = codes.shape
    y = (torch.arange(h, dtype=torch.float32)[:, None] + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32)[None, :] + 0.5) / w
    hole = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        hole |= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if not bool(hole.any()):
        raise ValueError(f"{name} hold no code's centre of the {h}x{w}-code image; make them larger")
    return torch.where(hole, -1, codes.cpu())


@dataclass
class GenerationOutput:
    """What one prompt produced.

    Attributes:
        segments: the generated ``Text`` / ``Image`` / ``Video`` segments, in order.
        ids: the generated ids (prompt excluded).
        finish_reason: ``"eos"``, ``"max_new_tokens"`` or ``"max_images"``.
    """

    segments: list[Segment] = field(default_factory=list)
    ids: torch.Tensor | None = None
    finish_reason: str = ""

    @property
    def text(self) -> str:
        """All generated text, joined."""
        return "".join(s.text for s in self.segments if isinstance(s, Text))

    @property
    def images(self) -> list[PIL.Image.Image]:
        """Generated images as PIL (partial images included, with their complete rows)."""
        return [s.image for s in self.segments if isinstance(s, Image) and s.image is not None]

    @property
    def videos(self) -> list[Video]:
        return [s for s in self.segments if isinstance(s, Video) and s.frames is not None]


class AnyGen:
    """A model and its tokenizer, ready to generate.

    Args:
        model: the decoder.
        tokenizer: the ``MultimodalTokenizer`` it was trained with (same ``Vocab``).
        fast: the fast decode loop (default); False runs the plain reference loop (same greedy tokens).
        compile: ``torch.compile`` the fast decode step; None (default) compiles on CUDA only
            (``Generator``, ``docs/speed.md``).
        sampling_defaults: the sampling a call that sets none gets, per modality; None: the library's
            (``DEFAULT_TEXT`` / ``DEFAULT_IMAGE`` / ``DEFAULT_VIDEO``). ``from_pretrained`` reads a checkpoint's
            ``generation_config.json`` into it and ``save_pretrained`` writes it.
    """

    def __init__(self, model: AnyGenModel, tokenizer: MultimodalTokenizer, *, fast: bool = True,
                 compile: bool | None = None, sampling_defaults: SamplingDefaults | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampling_defaults = sampling_defaults or SamplingDefaults()
        self.decoding = {"fast": fast, "compile": compile}
        self.generator = Generator(model, tokenizer, **self.decoding)
        self._lock = threading.Lock()
        self.id_map = None  # anygen.convert.common.IdMap of an imported checkpoint: reference <-> anygen ids

    @property
    def config(self) -> AnyGenConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AnyGen:
        """Move the model (and the VQ tokenizers) to ``device`` / ``dtype``."""
        self.model.to(device=device, dtype=dtype)
        for tok in (self.tokenizer.image, self.tokenizer.video):
            if tok is not None:
                tok.to(device=device)
        self.generator = Generator(self.model, self.tokenizer, **self.decoding)
        return self

    def configure_decoding(self, *, fast: bool = True, compile: bool | None = None) -> AnyGen:
        """Choose the decode loop (see the class arguments); rebuilds the generator."""
        self.decoding = {"fast": fast, "compile": compile}
        self.generator = Generator(self.model, self.tokenizer, **self.decoding)
        return self

    # -- checkpoint directory ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write the checkpoint directory (see the module docstring).

        ``dtype`` (``torch.bfloat16`` / ``torch.float16`` / ``torch.float32``) stores the model's floating
        tensors (decoder and understanding encoder) in it: bf16 halves ``model.safetensors``.
        ``from_pretrained`` casts them back to the model's own dtype (fp32 unless told otherwise).

        Raises:
            ValueError: ``dtype`` is not one of those three.
        """
        if dtype is not None and dtype not in SAVE_DTYPES.values():
            raise ValueError(f"save_pretrained stores float32, bfloat16 or float16 weights, got dtype={dtype!r}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model": self.config.to_dict(), "vocab": self.tokenizer.vocab.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        if self.config.tie_embeddings:  # safetensors stores each tensor once; tied heads are re-tied on load
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        self.tokenizer.save(directory)
        (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(self.sampling_defaults.to_dict(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, fast: bool = True, compile: bool | None = None) -> AnyGen:
        """Load a checkpoint directory written by ``save_pretrained`` (or ``anygen export`` / ``anygen convert``).

        ``fast`` / ``compile`` choose the decode loop (see ``AnyGen``).

        A Janus / Emu3 / Chameleon directory in Hugging Face layout (``config.json`` naming
        ``JanusForConditionalGeneration`` …, safetensors shards, tokenizer files) is converted in memory.

        Raises:
            FileNotFoundError: the directory or one of its files is missing (the message lists them).
            ValueError: a file is malformed, the files do not belong together, or a Hugging Face
                directory holds an architecture anygen does not import (the message lists those it does).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
        if _is_hf_directory(directory):
            from anygen import convert

            engine = convert.load(directory, dtype=dtype).configure_decoding(fast=fast, compile=compile)
            return engine.to(device) if device is not None else engine
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_CONFIG, "text_tokenizer.json")
                   if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint directory {directory} lacks {', '.join(missing)}; an anygen "
                                    f"checkpoint has {CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_CONFIG}, "
                                    f"text_tokenizer.json and the image / video tokenizer .safetensors")
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
            raise ValueError(f"{directory / CONFIG_FILE} is not an anygen config (expected "
                             f'{{"format": "anygen", "model": ...}})')
        config = AnyGenConfig.from_dict(meta["model"])
        tokenizer = MultimodalTokenizer.load(directory)
        if Vocab(**config.vocab_dict()) != tokenizer.vocab:
            raise ValueError(f"mismatched checkpoint: config.json describes vocabulary {config.vocab_dict()} but the "
                             f"tokenizer files give {tokenizer.vocab.to_dict()}")
        model = AnyGenModel(config)
        _load_weights(model, directory / WEIGHTS_FILE)
        engine = cls(model, tokenizer, fast=fast, compile=compile, sampling_defaults=read_sampling_defaults(directory))
        if (directory / "imported_from.json").is_file():
            from anygen.convert import read_id_map

            engine.id_map = read_id_map(directory)
        if device is not None or dtype is not None:
            engine.to(device, dtype)
        return engine

    # -- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt | TokenSequence) -> TokenSequence:
        """Tokenize one prompt (``<|bos|>`` first, no ``<|eos|>``: generation continues it).

        A ``TokenSequence`` passes through unchanged: callers that keep a conversation as tokens (the
        demo) continue it without re-encoding earlier images.
        """
        if isinstance(prompt, TokenSequence):
            return prompt
        return self.tokenizer.encode(prompt, bos=True, eos=False)

    @staticmethod
    def _split_batch(prompt: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
        """``(prompts, batched)``: a list is a batch when each item is a whole prompt (``str``, a segment list or a
        ``TokenSequence``; kinds may mix, as in ``["a red circle", [image, "make it blue"]]``), else one prompt's
        segments (``[image, "make it blue"]``: an image is never a whole prompt inside a list)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(p, (str, list, tuple, TokenSequence)) for p in prompt):
            return list(prompt), True
        return [prompt], False

    def _settings(self, max_new_tokens: int, text, image, video, image_size, video_size, start_with, max_images,
                  seed, preview_every) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=max_new_tokens,
            text=SamplingConfig.coerce(text, "text", self.sampling_defaults.text),
            image=SamplingConfig.coerce(image, "image", self.sampling_defaults.image),
            video=SamplingConfig.coerce(video, "video", self.sampling_defaults.video),
            image_size=tuple(image_size) if image_size is not None else self._default_image_size(start_with),
            video_size=tuple(video_size) if video_size is not None else self._default_video_size(start_with),
            start_with=start_with,
            max_images=max_images,
            seed=seed,
            preview_every=preview_every,
        )

    def _default_image_size(self, start_with: Any) -> tuple[int, int] | None:
        """A forced image start without a size draws at the tokenizer's trained size; otherwise the model chooses
        (the size check of a model-chosen size assumes the largest grid, which a short context may not hold)."""
        starts = start_with if isinstance(start_with, (list, tuple)) else [start_with]
        if "image" in starts and self.tokenizer.layout.is_native:
            return self.tokenizer.image_grid
        return None

    def _default_video_size(self, start_with: Any) -> tuple[int, int, int] | None:
        """A forced video start without a size draws at the tokenizer's trained clip size (``video_grid``) where it
        is known; otherwise the model chooses."""
        starts = start_with if isinstance(start_with, (list, tuple)) else [start_with]
        return self.tokenizer.video_grid if "video" in starts else None

    def stream(self, prompt: Prompt | Sequence[Prompt], *, max_new_tokens: int = 512,
               text: SamplingConfig | dict | None = None, image: SamplingConfig | dict | None = None,
               video: SamplingConfig | dict | None = None, image_size: tuple[int, int] | None = None,
               video_size: tuple[int, int, int] | None = None, start_with: Literal["image", "video"] | None = None,
               max_images: int = 0, seed: int | None = None, preview_every: int = 0,
               negative_prompt: str | Sequence[str] | None = None,
               regions: Sequence[Any] | None = None, inpaint: Sequence[Any] | None = None) -> Iterator[Event]:
        """Like ``generate``, but yields events (text deltas, image rows, frames, row ends) as they happen."""
        prompts, batched = self._split_batch(prompt)
        settings = self._settings(max_new_tokens, text, image, video, image_size, video_size, start_with,
                                  max_images, seed, preview_every)
        encoded = [self.encode_prompt(p) for p in prompts]
        negatives = self._negative_prompts(negative_prompt, len(prompts))
        routed = self._regions(regions, len(prompts), batched)
        grids = self._inpaint(inpaint, encoded, batched)
        # one KV cache per engine: a second caller waits here instead of overwriting the first one's cache
        with self._lock:
            try:
                yield from self.generator.stream(encoded, settings, negatives, routed, grids)
            finally:
                self.model.release_cache()

    def generate(self, prompt: Prompt | Sequence[Prompt], *, max_new_tokens: int = 512,
                 text: SamplingConfig | dict | None = None, image: SamplingConfig | dict | None = None,
                 video: SamplingConfig | dict | None = None, image_size: tuple[int, int] | None = None,
                 video_size: tuple[int, int, int] | None = None, start_with: Literal["image", "video"] | None = None,
                 max_images: int = 0, seed: int | None = None, speculative: int = 0, best_of: int = 1,
                 negatives: Sequence[str] | Sequence[Sequence[str]] | None = None,
                 negative_prompt: str | Sequence[str] | None = None,
                 regions: Sequence[Any] | None = None,
                 inpaint: Sequence[Any] | None = None,
                 canvas: Any = None, rerank: str = "understanding") -> GenerationOutput | list[GenerationOutput]:
        """Generate interleaved text, images and video.

        Args:
            prompt: a ``str``; a list of segments (``str``, ``PIL.Image`` / ``Image`` as VQ context,
                ``Understand(image)`` for the understanding encoder, ``Video``); or a batch (a list of
                such prompts).
            max_new_tokens: most ids generated per prompt.
            text / image / video: sampling per modality, a ``SamplingConfig`` or a dict of its fields
                (``temperature``, ``top_k``, ``top_p``, ``guidance_scale``, ``image_guidance_scale``: InstructPix2Pix's
                weight of the prompt's own images against the empty context); what is left out comes from
                ``sampling_defaults`` (the checkpoint's ``generation_config.json``, else the library's).
            image_size: ``(h, w)`` in tokens for generated images; None lets the model choose, except that
                ``start_with="image"`` then draws at the size the tokenizer was built for (``tokenizer.image_grid``).
            video_size: ``(t, h, w)`` in tokens for generated videos; None lets the model choose, except that
                ``start_with="video"`` then draws at the tokenizer's trained clip size where it records one
                (``tokenizer.video_grid``).
            start_with: ``"image"`` or ``"video"`` forces the output to open with one (text→image).
            max_images: stop after this many images + videos (0: no limit).
            seed: makes sampling reproducible.
            speculative: opt-in speculative Jacobi decoding with this many ids per forward pass (0: off, the
                default). The same output distribution in fewer forward passes (``docs/speed.md``). It draws
                exactly one image or video: it needs ``start_with``, ``max_images`` 0 or 1, a known size
                (``image_size`` / the trained grid, ``video_size``) and the modality's ``top_k=0``, ``top_p=1``.
            best_of: self-reranking, each path of the model judging the other's output; 1 (the default): off.
                text→image (``start_with="image"``, ``max_images`` 0 or 1, text prompts best read like a caption):
                draw this many images per prompt and keep the one under which the understanding path finds the
                prompt most likely (``score`` of the prompt after ``Understand(image)``; needs an understanding
                encoder), as DALL-E reranked with CLIP, or the one ``rerank`` names. image→text (no
                ``start_with``, exactly one image in each prompt): draw this many replies and keep the one under
                which the generation path finds the image most likely (``score_image``: the reply read as a
                caption); with greedy text the greedy reply is one of them and the rest are sampled at temperature
                1. text→video
                (``start_with="video"``, ``max_images`` 0 or 1) needs ``negatives``: draw this many clips and keep
                the one whose reading (``score`` of the prompt after the clip's VQ codes) most favours the prompt
                over its negatives. Costs ``best_of`` generations per prompt.
            negatives: with ``best_of`` for text→image or text→video, what each output must not be, as texts read
                like the prompt (``"a red circle moves up"`` against ``"… moves down"``, ``"… to the left"``); a
                candidate is then ranked by how much its reading prefers the prompt to them (the prompt's score
                minus the log-sum-exp over the prompt and each negative), not by the prompt's score alone. One
                prompt: a list of str (or one str); a batch: one list of str per prompt. Required for text→video,
                where the reading alone ranks clips no better than one draw (``docs/default_model.md``).
            rerank: how ``best_of`` reads a drawn image back (text→image, and each region with ``canvas``):
                ``"understanding"`` (the default), the prompt's likelihood after ``Understand(image)``;
                ``"likelihood"``, the generation path's own log-probability of the image's VQ codes after the prompt
                (``score_image``; needs no understanding encoder). On the shipped model ``"likelihood"`` keeps a
                right one-object image more often (``docs/default_model.md``). Clips and replies have one reader
                each, so anything but the default needs ``best_of`` > 1 and ``start_with="image"``.
            negative_prompt: what to steer away from while drawing: the text each prompt's classifier-free guidance
                twin reads instead of the empty context, so guided logits ``u + s·(c − u)`` push from it towards the
                prompt (diffusion pipelines' ``negative_prompt``). A str (for every prompt) or one str (None:
                none) per prompt.
                It acts only where guidance does: set the medium's ``guidance_scale`` (clips draw unguided by
                default; the shipped model draws the asked direction of motion for 88.8 % of held-out prompts with
                the opposite motion as negative prompt at ``video={"guidance_scale": 2}``, 74.6 % without).
            regions: regional prompting, what to draw where in generated images: ``(text, box)`` pairs, the box
                ``(x0, y0, x1, y1)`` in fractions of the image's width and height (the top left is ``(0, 0)``).
                Each image code whose centre lies in a box is drawn from the model reading that text (and the
                image so far) instead of the prompt, guided against the same twins; the prompt draws the rest.
                Later boxes win where they overlap. One prompt: a list of pairs; a batch: one list (or None) per
                prompt. Costs one more row per region. Clips are not routed. The shipped model draws both objects
                of a held-out two-object prompt for 22.5 % of 360 prompts plainly and 52.5 % with each object's
                own caption over its cell (``anygen eval --regions layout``, ``docs/default_model.md``).
            inpaint: redraw only part of the prompt's image (its last VQ image, ``PIL.Image`` / ``Image``): a box
                ``(x0, y0, x1, y1)`` in fractions of the image, or a list of boxes. The first generated image is drawn
                at that image's size in codes, and every code whose centre lies outside all the boxes is copied from
                it, so the model draws only inside them, reading the copied codes around them (masked editing: for
                ``[picture, "make the circle yellow"]``, a box around the circle). A batch: one entry (a box, a list
                of boxes, or None) per prompt. Refused with ``speculative``, and with ``best_of`` unless composed
                (``canvas``). The shipped model draws
                41.1 % of 360 held-out edits exactly with the edited object's cell as the box (19.2 % drawn whole),
                77.5 % with that object's new caption over it as a region too (``anygen eval --inpaint layout
                [--regions layout]``, ``docs/default_model.md``).
            canvas: compose ``regions`` onto a picture (``PIL.Image`` / ``Image``; for a batch one per prompt or
                None, or one for all): with ``start_with="image"``, each region is drawn alone onto the canvas (its
                box drawn from the region's text, every other code copied from the canvas, as ``inpaint`` copies),
                so no object reads another's drawing; the drawings are laid onto the canvas in order (a later
                region wins a code two of them change), and a last pass copies that picture and goes on past it
                (``max_images``, what follows the image); the prompt draws nothing of it. The image is drawn at the
                canvas's size in codes. Costs two generations, whatever the number of regions: the regions of a
                call drawn as one batch, then the copy (its codes fed in runs). With ``inpaint`` as well, the composed
                picture goes into the prompt's picture inside the inpaint boxes only, the rest copied from it (an
                edit's object drawn alone onto an empty scene, then put in place; the canvas must be the picture's
                size). Refused with ``speculative``; with ``best_of`` each region is drawn that many times and keeps
                the drawing under which the understanding path finds the region's text most likely. The shipped
                model draws both objects of a held-out two-object prompt for 81.7 % of 720 prompts composed onto an
                empty scene with each object's caption over its cell grown by a quarter cell, against 52.6 % with
                the same regions drawn in one pass (``anygen eval --regions layout --canvas blank``,
                ``docs/default_model.md``).

        Returns:
            One ``GenerationOutput``, or a list of them for a batch.
        """
        prompts, batched = self._split_batch(prompt)
        if rerank not in RERANKERS:
            raise ValueError(f"rerank must be one of {RERANKERS} (how best_of reads a drawn image back), got "
                             f"{rerank!r}")
        if rerank != RERANKERS[0] and best_of == 1:
            raise ValueError(f"rerank={rerank!r} chooses how best_of reads the images it draws: pass best_of > 1 "
                             "with it")
        if rerank != RERANKERS[0] and start_with != "image":
            raise ValueError(f"rerank={rerank!r} reads drawn images: pass start_with='image' with it (got "
                             f"start_with={start_with!r}; clips and replies have one reader each)")
        negative_prompt = self._negative_prompts(negative_prompt, len(prompts))
        routed = self._regions(regions, len(prompts), batched)
        if routed is not None and speculative:
            raise ValueError("regions and speculative decoding do not combine (a drafted code would be verified "
                             "against one row's logits): pass speculative=0 with regions")
        if inpaint is not None and not batched:
            inpaint = [inpaint]  # stream reads the prompts below as a batch
        canvases = self._canvases(canvas, prompts, batched, routed)
        if inpaint is not None and (speculative or (best_of != 1 and canvases is None)):
            raise ValueError("inpaint redraws part of the prompt's own image, one draw per prompt: it combines with "
                             "neither speculative decoding nor best_of (best_of only with canvas=..., where it "
                             f"reranks each region) (got speculative={speculative!r}, best_of={best_of!r})")
        if canvases is not None:
            if start_with != "image":
                raise ValueError(f"canvas composes the image a call starts with: pass start_with='image' (got "
                                 f"{start_with!r})")
            size = tuple(next(c for c in canvases if c is not None).codes.shape)
            if image_size is not None and tuple(image_size) != size:
                raise ValueError(f"the canvas is {size[0]}x{size[1]} codes but image_size is {tuple(image_size)}: the "
                                 "image is drawn at the canvas's size, so leave image_size unset or equal")
            grids = self._inpaint(inpaint, prompts, True)
            for i, (c, g) in enumerate(zip(canvases, grids or [])):
                if c is not None and g is not None and tuple(g.shape) != size:
                    raise ValueError(f"prompt #{i}: its picture is {g.shape[0]}x{g.shape[1]} codes and the canvas "
                                     f"{size[0]}x{size[1]}: with inpaint the composed picture goes into the "
                                     "picture's boxes, so give a canvas of its size")
            n = self._region_best_of(best_of, canvases, negatives, rerank)
            return self._compose(prompts, canvases, routed, dict(
                max_new_tokens=max_new_tokens, text=text, image=image, video=video, image_size=size,
                video_size=video_size, start_with=start_with, max_images=max_images, seed=seed,
                negative_prompt=negative_prompt), batched, n, grids, rerank)
        if best_of != 1:
            outputs = self._best_of(prompts, best_of, dict(
                max_new_tokens=max_new_tokens, text=text, image=image, video=video, image_size=image_size,
                video_size=video_size, start_with=start_with, max_images=max_images, seed=seed,
                speculative=speculative, negative_prompt=negative_prompt, regions=routed),
                self._negatives(negatives, prompts, batched), rerank)
            return outputs if batched else outputs[0]
        if negatives is not None:
            raise ValueError("negatives rank the candidates that best_of draws: pass best_of > 1 with them (to steer "
                             "the drawing itself away from a text, pass negative_prompt)")
        if speculative:
            settings = self._settings(max_new_tokens, text, image, video, image_size, video_size, start_with,
                                      1, seed, 0)  # max_images 1: the one span it draws
            outputs = self._speculative(prompts, speculative, settings, max_images, negative_prompt)
            return outputs if batched else outputs[0]
        done = [e for e in self.stream(prompts, max_new_tokens=max_new_tokens, text=text, image=image, video=video,
                                       image_size=image_size, video_size=video_size, start_with=start_with,
                                       max_images=max_images, seed=seed, negative_prompt=negative_prompt,
                                       regions=routed, inpaint=inpaint)
                if isinstance(e, RowDone)]
        outputs = [GenerationOutput(e.segments, e.ids, e.reason) for e in sorted(done, key=lambda e: e.row)]
        return outputs if batched else outputs[0]

    def _speculative(self, prompts: list[Prompt], window: Any, settings: GenerationSettings,
                     max_images: int, negative_prompt: list[str] | None = None) -> list[GenerationOutput]:
        from anygen.generation.speculative import generate_speculative

        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"speculative must be an int >= 1 (ids per forward pass; 0 turns it off), got {window!r}")
        if settings.start_with not in ("image", "video"):
            raise ValueError("speculative decoding draws one image or video: pass start_with='image' or 'video', "
                             f"got {settings.start_with!r}")
        if max_images not in (0, 1):
            raise ValueError(f"speculative decoding draws exactly one image or video; max_images must be 0 or 1, "
                             f"got {max_images!r}")
        encoded = [self.encode_prompt(p) for p in prompts]
        with self._lock:
            try:
                done, _ = generate_speculative(self.generator, encoded, settings, window=window,
                                               negatives=self._negative_prompts(negative_prompt, len(prompts)))
            finally:
                self.model.release_cache()
        return [GenerationOutput(e.segments, e.ids, e.reason) for e in sorted(done, key=lambda e: e.row)]

    # -- scoring ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, context: Prompt | Sequence[Prompt], continuation: str | Sequence[str], *, eos: bool = True,
              batch_size: int = 16) -> list[float]:
        """Log-probability (nats) of each text ``continuation`` right after its ``context``, teacher-forced.

        Args:
            context: one prompt or a batch (as ``generate`` takes them: text, images, ``Understand(image)``, …).
            continuation: one text per context (a single ``str`` is used for every context).
            eos: count ``<|eos|>`` after the continuation too, so a text that should go on scores lower.
            batch_size: contexts per forward pass.

        Returns:
            One float per context: the sum of the continuation's token log-probabilities, each normalised over
            the text slice of the vocabulary as training and generation see it (``routed_cross_entropy``).

        Raises:
            ValueError: the counts differ, a continuation is empty, or a sequence does not fit the context.
        """
        contexts, _ = self._split_batch(context)
        texts = [continuation] * len(contexts) if isinstance(continuation, str) else list(continuation)
        if len(texts) != len(contexts):
            raise ValueError(f"score needs one continuation per context, got {len(texts)} for {len(contexts)}")
        v, limit = self.tokenizer.vocab, self.config.max_seq_len
        rows = []
        for n, (ctx, text) in enumerate(zip(contexts, texts)):
            head = self.encode_prompt(ctx)
            tail = self.tokenizer.text.encode(text) + ([v.eos] if eos else [])
            if not tail:
                raise ValueError(f"continuation #{n} is empty: there is nothing to score")
            if len(head) + len(tail) > limit:
                raise ValueError(f"context #{n} and its continuation take {len(head) + len(tail)} tokens; the "
                                 f"model's context is {limit}")
            rows.append((head, torch.tensor(tail, dtype=torch.long)))
        scores: list[float] = []
        for lo in range(0, len(rows), batch_size):
            scores += self._score_rows(rows[lo:lo + batch_size])
        return scores

    @torch.no_grad()
    def score_image(self, context: Prompt | Sequence[Prompt], image: Any, *, batch_size: int = 16) -> list[float]:
        """Log-probability (nats) of an image's VQ codes right after each context, teacher-forced.

        The generation path's reading of how well a context (usually a caption, as in a text→image document)
        describes an image: the sum over the image's codes of ``log p(code)``, normalised over the image codebook as
        training and generation see it. The span's fixed ids (``<|boi|>``, the size tokens, row ends, ``<|eoi|>``)
        are left out: the grammar writes them, and ``<|boi|>`` would measure whether an image follows at all, not
        which one.

        Args:
            context: one prompt or a batch (as ``generate`` takes them).
            image: the image every context is scored against, or one per context: a ``PIL.Image``, an ``Image``
                segment, or ``Understand(image)`` (its pixels are written as VQ codes here, centre-cropped to the
                tokenizer's image size as any VQ image is; the understanding encoder pads instead, which only
                differs for a picture that is not square).
            batch_size: contexts per forward pass.

        Returns:
            One float per context.

        Raises:
            ValueError: the counts differ, an image is not one of the accepted types, ``batch_size`` < 1, the model
                has no image tokenizer, or a sequence does not fit the context.
        """
        contexts, _ = self._split_batch(context)
        single = not isinstance(image, (list, tuple))
        images = [image] * len(contexts) if single else list(image)
        if len(images) != len(contexts):
            raise ValueError(f"score_image needs one image per context (or one for all), got {len(images)} for "
                             f"{len(contexts)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if self.tokenizer.image is None:
            raise ValueError("score_image writes the image as VQ codes, and this model has no image tokenizer")
        spans: dict[int, torch.Tensor] = {}  # the image's span, encoded once per distinct image object
        rows = []
        io, vo, limit = self.tokenizer.vocab.image_offset, self.tokenizer.vocab.video_offset, self.config.max_seq_len
        for n, (ctx, img) in enumerate(zip(contexts, images)):
            if id(img) not in spans:
                seg = Image(img.image) if isinstance(img, Understand) else img
                if not isinstance(seg, (Image, PIL.Image.Image)):
                    raise ValueError(f"image #{n} is a {type(img).__name__}; accepted: PIL.Image, Image, Understand")
                spans[id(img)] = torch.tensor(self.tokenizer.encode_segment(seg), dtype=torch.long)
            head, span = self.encode_prompt(ctx), spans[id(img)]
            if len(head) + len(span) > limit:
                raise ValueError(f"context #{n} and the image take {len(head) + len(span)} tokens; the model's "
                                 f"context is {limit}")
            rows.append((head, span, (span >= io) & (span < vo)))
        scores: list[float] = []
        for lo in range(0, len(rows), batch_size):
            scores += self._score_rows([(h, s) for h, s, _ in rows[lo:lo + batch_size]],
                                       counted=[c for _, _, c in rows[lo:lo + batch_size]], head_mode="routed")
        return scores

    def score_replies(self, replies: Sequence[str], picture: Any) -> list[float]:
        """``score_image`` of each reply read as the caption of ``picture``, which is VQ-encoded once; a reply
        without text, or too long to precede the picture in the context, gets ``-inf`` instead of an error (what
        ``generate(best_of=N)`` and the demo rerank image → text replies by)."""
        if self.tokenizer.image is None:
            raise ValueError("score_replies writes the picture as VQ codes, and this model has no image tokenizer")
        seg = Image(picture.image) if isinstance(picture, Understand) else picture
        if not isinstance(seg, (Image, PIL.Image.Image)):
            raise ValueError(f"picture is a {type(picture).__name__}; accepted: PIL.Image, Image, Understand")
        coded = Image(codes=self.tokenizer.image_codes(seg if isinstance(seg, Image) else Image(seg)))
        room = self.config.max_seq_len - len(self.tokenizer.image_span(coded.codes)) - 1  # <|bos|> + the span
        fits = [k for k, t in enumerate(replies) if t and len(self.tokenizer.text.encode(t)) <= room]
        scores = [float("-inf")] * len(replies)
        for k, value in zip(fits, self.score_image([replies[k] for k in fits], coded) if fits else []):
            scores[k] = value
        return scores

    def _score_rows(self, rows: list[tuple[TokenSequence, torch.Tensor]],
                    counted: list[torch.Tensor] | None = None, head_mode: str | None = None) -> list[float]:
        """One right-padded forward over ``(context, continuation ids)`` rows; ``counted``: per row, which
        continuation ids count (default: all); ``head_mode`` overrides the config's normalisation."""
        v, device = self.tokenizer.vocab, self.device
        seqs = [torch.cat([head.ids, tail]) for head, tail in rows]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), v.pad, dtype=torch.long)
        targets = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for r, ((head, tail), seq) in enumerate(zip(rows, seqs)):
            ids[r, :len(seq)], mask[r, :len(seq)] = seq, True
            targets[r, len(head) - 1:len(seq) - 1] = tail  # position t predicts id t + 1
            if counted is not None:  # only these continuation ids count (score_image: the codes)
                targets[r, len(head) - 1:len(seq) - 1][~counted[r]] = -100
        pixels = [head.und_pixels for head, _ in rows if head.und_pixels is not None]
        und = torch.cat(pixels).to(device) if pixels else None  # <|und|> runs are filled in row-major order
        logits = self.model(ids.to(device), attention_mask=mask.to(device), und_pixels=und)
        nll = routed_cross_entropy(logits, targets.to(device), v, targets.to(device) >= 0,
                                   head_mode=head_mode or self.config.head_mode, reduction="none")
        return (-nll.sum(-1)).tolist()

    def _negative_prompts(self, negative_prompt: Any, n: int) -> list[TokenSequence | None] | None:
        """``negative_prompt`` as one encoded prompt per row (None: none given; a None entry: that row's twin reads
        the empty context); already-encoded passes through."""
        if negative_prompt is None:
            return None
        texts = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(texts, (list, tuple)) or len(texts) != n:
            raise ValueError(f"negative_prompt must be a str or one str per prompt ({n}), got {negative_prompt!r:.200}")
        out = []
        for i, text in enumerate(texts):
            if text is None or isinstance(text, TokenSequence):
                out.append(text)
            elif isinstance(text, str) and text.strip():
                out.append(self.encode_prompt(text))
            else:
                raise ValueError(f"negative_prompt #{i} must be a non-empty str (or None: none for that prompt), got "
                                 f"{text!r:.200}")
        return out

    def _regions(self, regions: Any, n: int, batched: bool) -> list[list[RegionPrompt]] | None:
        """``regions`` as one list of ``(encoded prompt, box)`` per prompt (None: none given); already-encoded
        lists pass through."""
        if regions is None:
            return None
        rows = regions if batched else [regions]
        if not isinstance(rows, (list, tuple)) or len(rows) != n:
            raise ValueError(f"regions: for a batch, one list of (text, box) pairs (or None) per prompt ({n}), got "
                             f"{regions!r:.200}")
        out = []
        for i, row in enumerate(rows):
            pairs = []
            if row is not None and not isinstance(row, (list, tuple)):
                raise ValueError(f"regions of prompt #{i} must be a list of (text, box) pairs, got {row!r:.200}")
            for j, pair in enumerate(row or []):
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                    raise ValueError(f"region {j} of prompt #{i} must be a (text, box) pair, got {pair!r:.200}")
                text, box = pair
                if isinstance(text, str) and text.strip():
                    text = self.encode_prompt(text)
                elif not isinstance(text, TokenSequence):
                    raise ValueError(f"region {j} of prompt #{i}: the text must be a non-empty str, got {text!r:.200}")
                pairs.append((text, check_box(box, f"region {j} of prompt #{i}")))
            out.append(pairs)
        return out

    def _inpaint(self, inpaint: Any, prompts: list[TokenSequence], batched: bool) -> list[torch.Tensor | None] | None:
        """``inpaint`` as one grid of codes per prompt (``inpaint_grid``; None: none given)."""
        if inpaint is None:
            return None
        rows = inpaint if batched else [inpaint]
        if not isinstance(rows, (list, tuple)) or len(rows) != len(prompts):
            raise ValueError(f"inpaint: for a batch, one box, list of boxes or None per prompt ({len(prompts)}), got "
                             f"{inpaint!r:.200}")
        return [None if row is None else self.inpaint_grid(prompt, row, f"inpaint of prompt #{i}")
                for i, (row, prompt) in enumerate(zip(rows, prompts))]

    def _canvases(self, canvas: Any, prompts: list[Prompt], batched: bool,
                  routed: list[list[RegionPrompt]] | None) -> list[Image | None] | None:
        """``canvas`` as one ``Image`` holding its VQ codes (or None) per prompt (None: none given); every prompt
        with a canvas must have regions to draw onto it, and all canvases must share one size in codes."""
        if canvas is None:
            return None
        one = not isinstance(canvas, (list, tuple))
        if batched and not one and len(canvas) != len(prompts):
            raise ValueError(f"canvas: for a batch, one picture (for every prompt) or one picture or None per prompt "
                             f"({len(prompts)}), got {len(canvas)}")
        if not batched and not one:
            raise ValueError(f"canvas must be one picture (a PIL.Image or Image), got {type(canvas).__name__}")
        rows = [canvas] * len(prompts) if one else list(canvas)
        out: list[Image | None] = []
        sizes = set()
        for i, picture in enumerate(rows):
            if picture is None:
                out.append(None)
                continue
            if not isinstance(picture, (PIL.Image.Image, Image)):
                raise ValueError(f"canvas of prompt #{i} must be a PIL.Image or Image (the picture the regions are "
                                 f"drawn onto), got {type(picture).__name__}")
            if routed is None or not routed[i]:
                raise ValueError(f"canvas of prompt #{i}: the regions are what is drawn onto a canvas, and this prompt "
                                 "has none: pass regions=[(text, box), ...] with it")
            codes = picture.codes if isinstance(picture, Image) and picture.codes is not None else \
                self.last_codes([picture], f"canvas of prompt #{i}")
            sizes.add(tuple(codes.shape))
            out.append(Image(codes=codes.cpu()))
        if not sizes:
            return None
        if len(sizes) > 1:
            raise ValueError(f"the canvases of one call must share a size in codes, got {sorted(sizes)}: draw them "
                             "in separate calls")
        return out

    def _region_best_of(self, n: Any, canvases: list[Image | None], negatives: Any, rerank: str = "understanding"
                        ) -> int:
        """``best_of`` for a composed call (1: off): each region's drawings reranked (``_compose``), which every
        prompt needs a canvas for, read by the understanding encoder (or the generation path: ``rerank``)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"best_of must be an int >= 1 (candidates drawn per prompt; 1: off), got {n!r}")
        if n == 1 and negatives is not None:
            raise ValueError("negatives rank the candidates that best_of draws: pass best_of > 1 with them")
        if n == 1:
            return n
        if any(c is None for c in canvases):
            raise ValueError("best_of with canvas reranks each region's drawings, and some prompts of this batch "
                             "have no canvas: give every prompt one, or draw those in another call")
        if negatives is not None:
            raise ValueError("best_of with canvas reads each region back as its own text; negatives are not used "
                             "there: leave them out")
        if rerank == "understanding" and (self.tokenizer.und_tokens <= 0 or self.model.und is None):
            raise ValueError("best_of reads each drawn region with the understanding encoder, and this model has none "
                             "(rerank='likelihood' reads them with the generation path instead)")
        return n

    def _compose(self, prompts: list[Prompt], canvases: list[Image | None], routed: list[list[RegionPrompt]],
                 kwargs: dict[str, Any], batched: bool, best_of: int = 1,
                 grids: list[torch.Tensor | None] | None = None, rerank: str = "understanding"
                 ) -> GenerationOutput | list[GenerationOutput]:
        """``generate(canvas=...)`` in two passes: ``compose_codes`` draws every region alone onto its canvas and
        lays the drawings on (a prompt with an inpaint grid takes them inside its boxes only, its own picture
        elsewhere); the last pass, under the call's settings, copies that picture whole and goes on past it, and
        prompts without a canvas draw there alone, as without one (inpainting their grid, if any)."""
        encoded = [self.encode_prompt(p) for p in prompts]
        negatives = kwargs.pop("negative_prompt")
        settings = self._settings(preview_every=0, **kwargs)
        picture = self.compose_codes(encoded, [c.codes if c is not None else None for c in canvases], routed,
                                     settings, negatives, best_of, grids, rerank)
        grids = grids or [None] * len(prompts)  # rows without a canvas inpaint their own grid, if any
        picture = [g if c is None else p for c, p, g in zip(canvases, picture, grids)]
        done = self._run_rows(encoded, settings, negatives, [r if c is None else [] for c, r in zip(canvases, routed)],
                              picture)
        outputs = [GenerationOutput(e.segments, e.ids, e.reason) for e in done]
        return outputs if batched else outputs[0]

    def compose_codes(self, prompts: Sequence[TokenSequence], canvases: Sequence[torch.Tensor | None],
                      regions: Sequence[Sequence[RegionPrompt]], settings: GenerationSettings,
                      negatives: Sequence[TokenSequence | None] | None = None, best_of: int = 1,
                      grids: Sequence[torch.Tensor | None] | None = None, rerank: str = "understanding"
                      ) -> list[torch.Tensor | None]:
        """The pictures ``generate(canvas=...)`` copies in its last pass (the demo streams that pass itself): for
        each prompt with a canvas (VQ codes ``(h, w)``; None: no canvas, None back), every region drawn alone onto
        it, all in one batch: the region's box drawn (its text routed to it), every other code copied, so no
        region reads another's drawing; then the drawings laid onto the canvas in order (a region's codes that
        differ from the canvas inside its box; a later region wins a code two of them change). The draws take
        ``settings`` (``start_with="image"``) as one image each, at the seed after its own. With ``best_of`` > 1
        each region is drawn that many times and keeps the drawing under which the understanding path finds the
        region's text most likely, or (``rerank="likelihood"``) whose codes the generation path finds most likely
        after that text (ties keep the earlier). With ``grids`` (one inpaint grid or None per prompt, the
        prompt's own picture with ``-1`` in its boxes, ``inpaint_grid``), a composed picture goes into its grid's
        picture inside the holes only. Arguments are as ``generate`` checks them.

        Raises:
            RuntimeError: a draw ended before its image was complete (``max_new_tokens`` too small).
        """
        if rerank not in RERANKERS:
            raise ValueError(f"rerank must be one of {RERANKERS}, got {rerank!r}")
        jobs = [(i, j) for i, c in enumerate(canvases) if c is not None for j in range(len(regions[i]))]
        picture = [None if c is None else c.cpu() for c in canvases]
        if not jobs:
            return picture
        holes = {(i, j): holed(canvases[i], [regions[i][j][1]], f"region {j} of prompt #{i}: its box")
                 for i, j in jobs}
        n = best_of  # each region drawn n times in a row
        done = self._run_rows(
            [prompts[i] for i, _ in jobs for _ in range(n)],
            replace(settings, max_images=1, preview_every=0, seed=None if settings.seed is None else settings.seed + 1),
            None if negatives is None else [negatives[i] for i, _ in jobs for _ in range(n)],
            [[regions[i][j]] for i, j in jobs for _ in range(n)], [holes[job] for job in jobs for _ in range(n)])
        if n > 1:  # each region's n drawings read back as its text
            drawn = [next((s for s in e.segments if isinstance(s, Image)), None) for e in done]
            kept = []
            for r, (i, j) in enumerate(jobs):
                scores = self.score_candidates(drawn[r * n:(r + 1) * n], self._plain_text(regions[i][j][0]),
                                               rerank=rerank)
                kept.append(done[r * n + max(range(n), key=lambda c: scores[c])])
            done = kept
        for (i, j), e in zip(jobs, done):
            image = next((s for s in e.segments if isinstance(s, Image)), None)
            if image is None or image.codes is None or image.partial:
                raise RuntimeError(f"composing prompt #{i}: region {j} ended ({e.reason}) before its image was "
                                   "complete; raise max_new_tokens")
            codes = image.codes.cpu()
            changed = (holes[i, j] < 0) & (codes != canvases[i].cpu())  # what this region drew, not the canvas
            picture[i] = torch.where(changed, codes, picture[i])
        for i, grid in enumerate(grids or []):
            if grid is not None and picture[i] is not None:
                picture[i] = torch.where(grid.cpu() < 0, picture[i], grid.cpu())
        return picture

    def _run_rows(self, rows: list[TokenSequence], settings: GenerationSettings, negatives: list | None,
                  regions: list[list[RegionPrompt]], grids: list[torch.Tensor | None]) -> list[RowDone]:
        """``rows`` through the generator in one batch: their ``RowDone`` events in row order."""
        with self._lock:
            try:
                done = [e for e in self.generator.stream(rows, settings, negatives, regions, grids)
                        if isinstance(e, RowDone)]
            finally:
                self.model.release_cache()
        return sorted(done, key=lambda e: e.row)

    def _plain_text(self, text: TokenSequence) -> str:
        """An encoded region text back as the str it was (its text segments joined)."""
        return "".join(seg.text for seg in self.tokenizer.decode(text.ids, pixels=False) if isinstance(seg, Text))

    def inpaint_grid(self, prompt: Prompt | TokenSequence, boxes: Any, name: str = "inpaint") -> torch.Tensor:
        """What ``generate(inpaint=boxes)`` copies for ``prompt``: its last VQ image's codes ``(h, w)``, ``-1`` where a
        code's centre lies in one of ``boxes`` (a box ``(x0, y0, x1, y1)`` in fractions of the image, or a list of
        them); the grid ``Generator.stream(inpaint=...)`` takes.

        Raises:
            ValueError: a malformed box, a prompt without a VQ image, or boxes that hold no code (named ``name``).
        """
        is_box = isinstance(boxes, (list, tuple)) and len(boxes) > 0 and not isinstance(boxes[0], (list, tuple))
        boxes = [boxes] if is_box else boxes
        if not isinstance(boxes, (list, tuple)) or not boxes:
            raise ValueError(f"{name} must be a box (x0, y0, x1, y1) or a non-empty list of boxes, got "
                             f"{boxes!r:.200}")
        boxes = [check_box(box, f"{name}, box {j}") for j, box in enumerate(boxes)]
        codes = self.last_codes(prompt, f"{name} redraws part of the prompt's image, and the prompt")
        return holed(codes, boxes, f"{name}: the boxes {boxes}")

    def last_codes(self, prompt: Prompt | TokenSequence, what: str = "the prompt") -> torch.Tensor:
        """The VQ codes ``(h, w)`` of ``prompt``'s last image written as codes; a ``ValueError`` that starts with
        ``what`` when it holds none."""
        ids = prompt.ids if isinstance(prompt, TokenSequence) else self.encode_prompt(prompt).ids
        images = [seg for seg in self.tokenizer.decode(ids, pixels=False) if isinstance(seg, Image)]
        if not images or images[-1].codes is None:
            raise ValueError(f"{what} holds none written as VQ codes: put a PIL.Image (or Image) in the prompt; an "
                             "Understand(image) is read by the understanding encoder and cannot be copied")
        return images[-1].codes

    @staticmethod
    def _negatives(negatives: Any, prompts: list[Prompt], batched: bool) -> list[list[str]] | None:
        """``generate``'s ``negatives`` as one list of distinct texts per prompt (None: none given)."""
        if negatives is None:
            return None
        if not batched:
            negatives = [negatives]
        elif not isinstance(negatives, (list, tuple)) or len(negatives) != len(prompts) or not all(
                isinstance(n, (list, tuple)) for n in negatives):  # a flat list of str: for which prompt?
            raise ValueError(f"negatives for a batch of {len(prompts)} prompts must be one list of str per prompt, "
                             f"got {negatives!r:.200}")
        rows = []
        for i, (prompt, row) in enumerate(zip(prompts, negatives)):
            row = [row] if isinstance(row, str) else row
            if not isinstance(row, (list, tuple)) or (not row and not batched):  # in a batch, []: none for it
                raise ValueError(f"negatives of prompt #{i} must be a non-empty list of str, got {row!r:.200}")
            for j, text in enumerate(row):
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"negative #{j} of prompt #{i} must be a non-empty str, got {text!r:.200}")
                if isinstance(prompt, str) and text.strip() == prompt.strip():
                    raise ValueError(f"negative #{j} of prompt #{i} is the prompt itself ({text!r:.200}); a "
                                     "negative is what the output must not be")
            rows.append(list(dict.fromkeys(row)))
        return rows

    def _best_of(self, prompts: list[Prompt], n: Any, kwargs: dict[str, Any],
                 negatives: list[list[str]] | None = None, rerank: str = "understanding") -> list[GenerationOutput]:
        """``generate(best_of=n)``: n candidates a prompt, each path of the model reranking the other's output.

        text → image (``start_with="image"``): the image under which the understanding path finds the prompt most
        likely (``score`` after ``Understand(image)``), or with ``rerank="likelihood"`` the image whose VQ codes the
        generation path finds most likely after the prompt (``score_image``). text → video (``start_with="video"``):
        the clip whose reading (``score`` after the clip's VQ codes) most favours the prompt over its negatives.
        image → text (no ``start_with``): the reply under which the generation path finds the prompt's image most
        likely (``score_image``). With ``negatives`` a text → image / video candidate's score is the contrast
        ``s(prompt) - logsumexp(s(prompt), s(negative), ...)`` instead of ``s(prompt)``. Ties keep the earlier
        candidate; a prompt whose candidates drew no image / clip keeps its first.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"best_of must be an int >= 1 (candidates drawn per prompt; 1: off), got {n!r}")
        if kwargs["start_with"] is None:
            if negatives is not None or kwargs["negative_prompt"] is not None or kwargs["regions"] is not None:
                raise ValueError("best_of without start_with reranks image→text replies, by the picture alone; "
                                 "negatives, negative_prompt and regions go with best_of on text→image or "
                                 "text→video: pass start_with='image' or 'video'")
            return self._best_reply(prompts, n, kwargs)
        kind = kwargs["start_with"]
        if kind not in ("image", "video") or kwargs["max_images"] not in (0, 1):
            raise ValueError("best_of reranks text→image or text→video: pass start_with='image' or 'video' and "
                             "max_images 0 or 1 (or no start_with, with one image in each prompt, to rerank "
                             f"image→text replies), got start_with={kind!r}, max_images={kwargs['max_images']!r}")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"best_of scores each {kind} by the likelihood of its prompt's text: every prompt must "
                             "be a str")
        if kind == "image" and rerank == "understanding" and (self.tokenizer.und_tokens <= 0 or self.model.und is None):
            raise ValueError("best_of reads each image with the understanding encoder, and this model has none "
                             "(rerank='likelihood' reads them with the generation path instead)")
        if kind == "video":
            if self.tokenizer.video is None:
                raise ValueError("best_of with start_with='video' draws clips, and this model has no video tokenizer")
            if negatives is None or not all(negatives):
                raise ValueError("best_of for text→video needs negatives=[...] for every prompt, texts the clip must "
                                 "not match (for "
                                 "\"a red circle moves up\": the other directions): the model's reading of a clip "
                                 "ranks clips no better than one draw on its own, and contrasted with negatives it "
                                 "keeps the right one (docs/default_model.md)")
        def repeat(rows: list | None) -> list | None:  # one entry per prompt, drawn n times
            return None if rows is None else [x for x in rows for _ in range(n)]

        outputs = self.generate([p for p in prompts for _ in range(n)], **{
            **kwargs, "max_images": 1, "negative_prompt": repeat(kwargs["negative_prompt"]),
            "regions": repeat(kwargs["regions"])})
        best = []
        for i, prompt in enumerate(prompts):
            row = outputs[i * n:(i + 1) * n]
            drawn = [next((s for s in out.segments if isinstance(s, Image) and s.image is not None), None)
                     if kind == "image" else (out.videos or [None])[0] for out in row]  # an Image keeps its codes
            scores = self.score_candidates(drawn, prompt, negatives[i] if negatives is not None else None, rerank)
            best.append(row[max(range(n), key=lambda k: scores[k])])  # ties (and all -inf) keep the earlier one
        return best

    def score_candidates(self, candidates: Sequence[Any], prompt: str, negatives: Sequence[str] | None = None,
                         rerank: str = "understanding") -> list[float]:
        """How well each drawn image or clip reads back as ``prompt``: what ``generate(best_of=N)`` keeps the best
        of, and the demo's best of N.

        An image (``PIL.Image`` or ``Image``) is read by the understanding encoder (``score`` of the prompt after
        ``Understand(image)``), or with ``rerank="likelihood"`` by the generation path (``score_image``: the
        log-probability of the image's VQ codes after the text; an ``Image`` with codes is scored as drawn, a
        ``PIL.Image`` is tokenized first; a partial ``Image``, cut off before its end, scores ``-inf``); a clip
        (``Video``) by the decoder as its VQ codes (``score`` after the clip), whatever ``rerank`` says. With
        ``negatives`` (texts the candidate must not be) the score is the contrast ``s(prompt) -
        logsumexp(s(prompt), s(negative), ...)``, else ``s(prompt)``. A ``None`` candidate (nothing drawn) scores
        ``-inf``.

        Raises:
            ValueError: a candidate is not an image, a clip or None, an image needs an understanding encoder the
                model lacks, ``rerank`` is not one of ``RERANKERS``, or a negative is not a non-empty str.
        """
        if rerank not in RERANKERS:
            raise ValueError(f"rerank must be one of {RERANKERS}, got {rerank!r}")
        others = [negatives] if isinstance(negatives, str) else list(negatives or [])
        texts = [prompt, *dict.fromkeys(others)]  # a negative given twice counts once
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"the prompt and each negative must be a non-empty str, got {texts!r:.200}")
        if any(t.strip() == prompt.strip() for t in texts[1:]):
            raise ValueError(f"a negative is the prompt itself ({prompt!r:.200}); a negative is what the candidate "
                             "must not be")
        reads: dict[int, list] = {}  # candidate -> the context its texts are scored after
        pictures: dict[int, Any] = {}  # candidate -> the image scored after its texts (rerank "likelihood")
        for k, drawn in enumerate(candidates):
            if drawn is None:
                continue
            if isinstance(drawn, Video):
                reads[k] = [Video(codes=drawn.codes) if drawn.codes is not None else drawn]
            elif isinstance(drawn, (PIL.Image.Image, Image)) and rerank == "likelihood":
                if not (isinstance(drawn, Image) and drawn.partial):  # a cut-off image's fewer codes would score higher
                    pictures[k] = drawn
            elif isinstance(drawn, (PIL.Image.Image, Image)):
                if self.tokenizer.und_tokens <= 0 or self.model.und is None:
                    raise ValueError("an image is read back with the understanding encoder, and this model has none")
                reads[k] = [Understand(drawn.image if isinstance(drawn, Image) else drawn)]
            else:
                raise ValueError(f"candidate #{k} is a {type(drawn).__name__}; accepted: PIL.Image, Image, Video, "
                                 "None")
        scores = [float("-inf")] * len(candidates)
        flat = self.score([reads[k] for k in reads for _ in texts], [t for _ in reads for t in texts]) if reads else []
        if pictures:
            flat += self.score_image([t for _ in pictures for t in texts],
                                     [pictures[k] for k in pictures for _ in texts])
        for j, k in enumerate([*reads, *pictures]):  # flat: the reads' rows, then the pictures', in this order
            row = torch.tensor(flat[j * len(texts):(j + 1) * len(texts)])
            scores[k] = float(row[0] - torch.logsumexp(row, 0)) if len(texts) > 1 else float(row[0])
        return scores

    def _best_reply(self, prompts: list[Prompt], n: int, kwargs: dict[str, Any]) -> list[GenerationOutput]:
        """image → text with self-reranking: n replies a prompt, keeping the best ``score_image(reply, image)``.

        The candidates are drawn with the ``text`` sampling; where that is greedy (temperature 0), the greedy reply
        is the first candidate and the other n - 1 are sampled at temperature 1, so a reranked reply only replaces
        the greedy one when the generation path prefers it. Ties keep the earlier candidate. A reply is scored by its
        text alone (``out.text``, as a caption before the picture); one without text, or too long to precede the
        picture in the context, never wins unless none can be scored (then the first candidate is kept).
        """
        if any(isinstance(p, TokenSequence) for p in prompts):
            raise ValueError("best_of without start_with reranks image→text and needs each prompt's picture: pass "
                             "prompts as segments (a list holding the image), not as a TokenSequence")
        prompts = [list(p) if isinstance(p, (list, tuple)) else [p] for p in prompts]  # a bare image is one prompt
        pictures = []
        for k, segments in enumerate(prompts):
            found = [s for s in segments if isinstance(s, (PIL.Image.Image, Image, Understand))]
            if len(found) != 1:
                raise ValueError(f"best_of without start_with reranks image→text: each reply is scored by how likely "
                                 f"the generation path finds the prompt's image after it, so every prompt must hold "
                                 f"exactly one image (PIL.Image, Image or Understand); prompt #{k} holds {len(found)}. "
                                 "For text→image pass start_with='image'")
            pictures.append(found[0])
        if self.tokenizer.image is None:
            raise ValueError("best_of scores replies by the prompt's image as VQ codes, and this model has no image "
                             "tokenizer")
        text = SamplingConfig.coerce(kwargs["text"], "text", self.sampling_defaults.text)
        if text.temperature == 0:
            first = self.generate(prompts, **kwargs)
            others = self.generate([p for p in prompts for _ in range(n - 1)],
                                   **{**kwargs, "text": replace(text, temperature=1.0)}) if n > 1 else []
            candidates = [[first[i], *others[i * (n - 1):(i + 1) * (n - 1)]] for i in range(len(prompts))]
        else:
            drawn = self.generate([p for p in prompts for _ in range(n)], **kwargs)
            candidates = [drawn[i * n:(i + 1) * n] for i in range(len(prompts))]
        kept = []
        for picture, row in zip(pictures, candidates):
            texts = list(dict.fromkeys(out.text for out in row))  # a reply drawn twice is scored once
            scored = dict(zip(texts, self.score_replies(texts, picture)))
            kept.append(max(row, key=lambda out: scored[out.text]))  # ties (and all -inf) keep the earlier one
        return kept


def read_sampling_defaults(directory: Path) -> SamplingDefaults:
    """A checkpoint's ``generation_config.json`` (``SamplingDefaults``), or the library's when it has none.

    Raises:
        ValueError: the file is not valid JSON, or names an unknown modality / field or a value out of range.
    """
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return SamplingDefaults()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return SamplingDefaults.from_dict(data, str(path))


def _is_hf_directory(directory: Path) -> bool:
    """A ``config.json`` that is a Hugging Face model config (it names a model type), not anygen's."""
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False  # the anygen path reports missing / malformed files
    return isinstance(meta, dict) and meta.get("format") != FORMAT and ("model_type" in meta or "architectures" in meta)


def _load_weights(model: AnyGenModel, path: Path) -> None:
    """Load ``model.safetensors`` strictly, naming any missing / unexpected / mis-shaped tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise ValueError(f"{path} does not match config.json: " + ", ".join(parts))
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


__all__ = ["AnyGen", "GenerationOutput", "Understand", "Image", "Video", "Text", "SamplingConfig"]
