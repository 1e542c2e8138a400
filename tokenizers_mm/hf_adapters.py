"""Hugging Face pieces of imported checkpoints behind anygen's tokenizer contracts.

What this module owns:

- ``HFTextTokenizer``: a reference model's own ``tokenizer.json`` (byte-level BPE or
  sentencepiece-style, whatever ``tokenizers`` reads) behind ``TextTokenizer``'s interface
  (``encode``, ``decode``, ``vocab_size``, ``save`` / ``load``). Ids are renumbered: anygen's text
  range holds the reference ids that are neither a special role (``<|boi|>``, ``<|eos|>``, …, which
  live in anygen's specials) nor an image code, in their reference order (see ``anygen.convert``).
- ``HFImageTokenizer``: ``JanusVQVAE``, ``Emu3VQVAE`` or ``ChameleonVQVAE`` from ``transformers``
  in the ``ImageTokenizer`` contract: ``encode(x [B,3,H,W] in [-1,1]) -> Long[B,h,w]``,
  ``decode(codes) -> [B,3,H,W]`` in ``[-1, 1]``, ``codebook_size``, ``downsample``, ``save`` / ``load``
  to one ``.safetensors`` file (weights + config in its metadata; nothing is unpickled).
- ``load_text_tokenizer`` / ``load_image_tokenizer``: open whichever kind a checkpoint holds.

Notable:

- Pixels: anygen hands images in ``[-1, 1]``; each reference normalises its own way
  (``preprocessor_config.json``: rescale factor, mean, std). The adapter keeps that as a per-channel
  affine map and applies it on the way in, and its inverse on the way out.
- ``ChameleonVQVAE`` in ``transformers`` has an encoder only: Chameleon / Anole codes are read from
  images, but ``decode`` raises until a decoder ships with the weights (see docs/imported_models.md).
- Janus's quantiser L2-normalises codebook entries before its decoder (LlamaGen's VQ-16); the
  adapter decodes any ``h x w`` grid, not only the ``num_patches`` square ``JanusVQVAE.decode`` takes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import nn

from tokenizers_mm.io import load_state, save_module

TEXT_FORMAT = "anygen-hf-text"
VQ_KIND = "hf_vq"
FAMILIES = ("janus", "emu3", "chameleon")


# -- text ------------------------------------------------------------------------------------------


class HFTextTokenizer:
    """A reference tokenizer with anygen's text ids.

    Args:
        tokenizer: the reference's ``tokenizers.Tokenizer`` (from its ``tokenizer.json``).
        text_ids: the reference id behind each anygen text id, ascending (``text_ids[i]`` is anygen id ``i``).
    """

    def __init__(self, tokenizer: Tokenizer, text_ids: Sequence[int]) -> None:
        self._tok = tokenizer
        self.text_ids = torch.as_tensor(list(text_ids), dtype=torch.long)
        if self.text_ids.numel() == 0 or bool((self.text_ids[1:] <= self.text_ids[:-1]).any()):
            raise ValueError("HFTextTokenizer.text_ids must be a non-empty ascending list of reference ids")
        n_ref = max(int(self.text_ids[-1]) + 1, tokenizer.get_vocab_size(with_added_tokens=True))
        self._to_anygen = torch.full((n_ref,), -1, dtype=torch.long)
        self._to_anygen[self.text_ids] = torch.arange(self.text_ids.numel())

    @property
    def vocab_size(self) -> int:
        return int(self.text_ids.numel())

    def encode(self, text: str) -> list[int]:
        """Anygen text ids of ``text``; the reference's special-token strings are split out as it would.

        Raises:
            ValueError: ``text`` holds a token anygen writes outside text (e.g. ``<begin_of_image>``,
                the end of sequence): write those as segments, not as text.
        """
        if not isinstance(text, str):
            raise TypeError(f"HFTextTokenizer.encode takes a str, got {type(text).__name__}")
        ref = self._tok.encode(text, add_special_tokens=False).ids
        ids = self._to_anygen[torch.as_tensor(ref, dtype=torch.long)] if ref else torch.empty(0, dtype=torch.long)
        if bool((ids < 0).any()):
            bad = ref[int((ids < 0).nonzero()[0])]
            raise ValueError(f"the text holds {self._tok.id_to_token(bad)!r} (reference id {bad}), a token anygen "
                             "writes as structure, not text: give images as segments and leave <bos>/<eos> out")
        return ids.tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text id {bad[0]} is outside this tokenizer's ids 0..{self.vocab_size - 1}")
        return self._tok.decode(self.text_ids[ids].tolist() if ids else [], skip_special_tokens=False)

    def reference_ids(self, ids: Iterable[int]) -> list[int]:
        """The reference ids of anygen text ids."""
        return self.text_ids[torch.as_tensor(list(ids), dtype=torch.long)].tolist()

    # -- save / load -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One JSON file: the reference ``tokenizer.json`` and the id ranges anygen's text ids stand for."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": TEXT_FORMAT, "text_ids": _ranges(self.text_ids.tolist()),
                "tokenizer": json.loads(self._tok.to_str())}
        path.write_text(json.dumps(data, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HFTextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no text tokenizer at {path}")
        try:
            data = json.loads(path.read_text())
            tok = Tokenizer.from_str(json.dumps(data["tokenizer"]))
            text_ids = [i for start, end in data["text_ids"] for i in range(start, end)]
        except Exception as err:  # malformed JSON, missing keys, or tokenizers' bare Exception
            raise ValueError(f"{path} is not a valid {TEXT_FORMAT} file: {err}") from err
        if data.get("format") != TEXT_FORMAT:
            raise ValueError(f"{path} is not a {TEXT_FORMAT} file")
        return cls(tok, text_ids)


def _ranges(ids: list[int]) -> list[list[int]]:
    """Ascending ids as ``[start, end)`` runs (a 100k vocabulary with a few holes is a few runs)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return runs


def load_text_tokenizer(path: str | Path):
    """Open a checkpoint's ``text_tokenizer.json``: anygen's byte-level BPE or an ``HFTextTokenizer``."""
    from tokenizers_mm.text import TextTokenizer

    path = Path(path)
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(64)
        if f'"format": "{TEXT_FORMAT}"'.encode() in head:
            return HFTextTokenizer.load(path)
    return TextTokenizer.load(path)


# -- images ----------------------------------------------------------------------------------------


def _vq_classes(family: str) -> tuple[type, type]:
    """``(model class, config class)`` of a family's VQ model in ``transformers``."""
    import transformers

    names = {"janus": ("JanusVQVAE", "JanusVQVAEConfig"), "emu3": ("Emu3VQVAE", "Emu3VQVAEConfig"),
             "chameleon": ("ChameleonVQVAE", "ChameleonVQVAEConfig")}
    if family not in names:
        raise ValueError(f"unknown VQ family {family!r}; supported: {', '.join(FAMILIES)}")
    model, config = names[family]
    return getattr(transformers, model), getattr(transformers, config)


class HFImageTokenizer(nn.Module):
    """A reference VQ model in the ``ImageTokenizer`` contract.

    Args:
        family: ``"janus"``, ``"emu3"`` or ``"chameleon"``.
        vq: the ``transformers`` VQ model of that family.
        pixel_scale / pixel_shift: per-channel affine from anygen's ``[-1, 1]`` to the reference's
            input space (``ref = x * scale + shift``); identity by default.
    """

    def __init__(self, family: str, vq: nn.Module, *, pixel_scale: Sequence[float] = (1.0, 1.0, 1.0),
                 pixel_shift: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        model_cls, _ = _vq_classes(family)
        if not isinstance(vq, model_cls):
            raise TypeError(f"a {family} image tokenizer wraps a {model_cls.__name__}, got {type(vq).__name__}")
        self.family = family
        self.vq = vq.eval()
        self.register_buffer("pixel_scale", torch.tensor(list(pixel_scale), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_shift", torch.tensor(list(pixel_shift), dtype=torch.float32).view(1, 3, 1, 1))

    @classmethod
    def from_config(cls, family: str, config: dict[str, Any], **kwargs: Any) -> HFImageTokenizer:
        """A randomly initialised (or to-be-loaded) adapter from the VQ config dict."""
        model_cls, config_cls = _vq_classes(family)
        config = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
        return cls(family, model_cls(config_cls(**config)), **kwargs)

    @property
    def codebook_size(self) -> int:
        cfg = self.vq.config
        return int(cfg.codebook_size if self.family == "emu3" else cfg.num_embeddings)

    @property
    def can_decode(self) -> bool:
        """Whether ``decode`` can turn codes into pixels (not with transformers' ``ChameleonVQVAE``)."""
        return self.family != "chameleon"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vq.config.channel_multiplier) - 1)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.vq.parameters()).dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` -> codes ``(B, H/f, W/f)``, f = ``downsample``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {h}x{w}")
        ref = (x.float() * self.pixel_scale + self.pixel_shift).to(self._dtype)
        if self.family == "emu3":
            sizes = torch.tensor([[h, w]] * b)
            return torch.stack(list(self.vq.encode(ref, sizes).image_tokens)).long()
        return self.vq.encode(ref).image_tokens.view(b, h // f, w // f).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> images ``(B, 3, h*f, w*f)`` in ``[-1, 1]``."""
        if codes.ndim != 3 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be an integer tensor (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got {int(codes.min())}..{int(codes.max())}")
        codes = codes.long()
        if self.family == "janus":
            quant = F.normalize(self.vq.quantize.embedding(codes), p=2, dim=-1)  # (B, h, w, e)
            y = self.vq.decoder(self.vq.post_quant_conv(quant.permute(0, 3, 1, 2).to(self._dtype)))
        elif self.family == "emu3":
            y = self.vq.decode(codes)
        else:
            raise ValueError("transformers' ChameleonVQVAE has no decoder: Chameleon / Anole codes cannot be turned "
                             "into pixels with it (generation works; keep the codes, see docs/imported_models.md)")
        x = (y.float() - self.pixel_shift) / self.pixel_scale
        return x.clamp(-1.0, 1.0)

    # -- save / load -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        config = {"family": self.family, "vq_config": self.vq.config.to_dict(),
                  "pixel_scale": self.pixel_scale.flatten().tolist(),
                  "pixel_shift": self.pixel_shift.flatten().tolist()}
        return save_module(self.vq, config, path, kind=VQ_KIND)

    @classmethod
    def load(cls, path: str | Path) -> HFImageTokenizer:
        config, state = load_state(path, kind=VQ_KIND)
        try:
            tok = cls.from_config(config["family"], config["vq_config"], pixel_scale=config["pixel_scale"],
                                  pixel_shift=config["pixel_shift"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} holds an invalid {VQ_KIND} config: {err}") from err
        missing, unexpected = tok.vq.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"the weights in {path} do not fit its {config['family']} VQ config: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
        return tok.eval()


def load_image_tokenizer(path: str | Path):
    """Open a checkpoint's ``image_tokenizer.safetensors``: anygen's ``ImageTokenizer`` or an ``HFImageTokenizer``."""
    from tokenizers_mm.image import ImageTokenizer

    try:
        with safe_open(str(path), framework="pt") as f:
            kind = (f.metadata() or {}).get("kind")
    except (SafetensorError, OSError):
        kind = None  # ImageTokenizer.load reports the problem
    if kind == VQ_KIND:
        return HFImageTokenizer.load(path)
    return ImageTokenizer.load(path)


__all__ = ["HFTextTokenizer", "HFImageTokenizer", "load_text_tokenizer", "load_image_tokenizer"]
