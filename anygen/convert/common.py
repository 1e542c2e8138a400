"""What the three importers share: reading a Hugging Face directory, the id permutation, and the engine build.

- ``HFCheckpoint``: ``config.json``, the safetensors shards (one file or an index with its
  ``weight_map``; a missing shard is named), and the tokenizer / preprocessor files, read lazily
  so a checkpoint is never held twice in memory.
- ``IdMap``: the permutation between the reference's ids and anygen's layout
  ``[text | specials | sizes | image codes | video codes]`` (see ``anygen.convert``), and the
  reordering of embedding / head rows it implies.
- ``decoder_fields`` / ``decoder_state``: the LLaMA-style decoder shared by Janus (LLaMA), Emu3 and
  Chameleon, checked for what anygen's ``Block`` can express (default RoPE, no biases, SiLU, one
  head width).
- ``build_engine``: an ``AnyGenModel`` built on the meta device and filled with the converted tensors
  (``load_state_dict(assign=True)``), so the peak memory is one copy of the weights; every tensor is
  checked against the shape the config implies, and a mismatch names both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from anygen.config import AnyGenConfig
from tokenizers_mm.vocab import SPECIALS, Vocab

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SUPPORTED = {
    "janus": "JanusForConditionalGeneration",
    "emu3": "Emu3ForConditionalGeneration",
    "chameleon": "ChameleonForConditionalGeneration",
}
SUPPORTED_TEXT = ", ".join(f"{arch} (--from {name})" for name, arch in SUPPORTED.items())

Log = Callable[[str], None]


class Timer:
    """Prints ``[  1.2s] message`` lines: the progress of a conversion."""

    def __init__(self, log: Log | None) -> None:
        self.log, self.start = log, time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.log is not None:
            self.log(f"[{time.perf_counter() - self.start:6.1f}s] {message}")


# -- the source directory --------------------------------------------------------------------------


class HFCheckpoint:
    """A Hugging Face model directory as ``transformers`` saves it, read lazily.

    Raises:
        FileNotFoundError: the directory, ``config.json``, the weights or a shard named by the index is missing.
        ValueError: a file is unreadable.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} is not a directory")
        self.config = read_json(self.directory / CONFIG, required=True)
        self.tokenizer_config = read_json(self.directory / "tokenizer_config.json") or {}
        self.preprocessor_config = read_json(self.directory / "preprocessor_config.json") or {}
        self._handles: dict[str, Any] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX
        if index.is_file():
            weight_map = (read_json(index, required=True) or {}).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map")
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.directory} lacks the shard(s) {', '.join(missing)} listed in {INDEX}")
            return weight_map
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.directory.glob("*.bin"))
            extra = f" (found {', '.join(bins)}: pickled weights are never loaded)" if bins else ""
            raise FileNotFoundError(f"{self.directory} holds no *.safetensors weights{extra}")
        weight_map = {}
        for name in files:
            for key in self._open(name).keys():
                weight_map[key] = name
        return weight_map

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.directory / name), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{self.directory / name} is not a readable safetensors file: {err}") from err
        return self._handles[name]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> Tensor:
        """One tensor as stored; a missing one raises ``ValueError`` naming it."""
        if name not in self.weight_map:
            raise ValueError(f"{self.directory} lacks the tensor {name!r} (the weights hold {len(self.weight_map)} "
                             f"tensors, e.g. {sorted(self.weight_map)[:3]})")
        return self._open(self.weight_map[name]).get_tensor(name)

    def prefixed(self, prefix: str) -> dict[str, Tensor]:
        """Every tensor under ``prefix``, with the prefix stripped."""
        return {k[len(prefix):]: self.get(k) for k in sorted(self.weight_map) if k.startswith(prefix)}

    # -- tokenizer files -------------------------------------------------------------------------
    def tokenizer(self):
        from tokenizers import Tokenizer

        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} has no tokenizer.json (the fast tokenizer transformers saves); "
                                    "save the reference's tokenizer there first")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from err

    def token_string(self, key: str, default: str | None = None) -> str | None:
        """A special token's string from ``tokenizer_config.json`` (``bos_token``, ``boi_token``, …)."""
        cfg = self.tokenizer_config
        value = cfg.get(key)
        if value is None and isinstance(cfg.get("extra_special_tokens"), dict):
            value = cfg["extra_special_tokens"].get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else default


def read_json(path: Path, *, required: bool = False) -> dict | None:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} does not exist; a Hugging Face model directory has config.json and "
                                    f"*.safetensors weights (supported: {SUPPORTED_TEXT})")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def token_id(tokenizer, string: str | None, what: str, ref_size: int) -> int:
    """The reference id of a special token string, checked to be a row of the model."""
    tid = None if string is None else tokenizer.token_to_id(string)
    if tid is None:
        raise ValueError(f"the tokenizer has no {what} token {string!r}")
    if not 0 <= tid < ref_size:
        raise ValueError(f"the {what} token {string!r} has id {tid}, outside the model's {ref_size} embedding rows")
    return tid


def pad_id(tokenizer, ckpt: HFCheckpoint, default: str, fallback: int, ref_size: int) -> int:
    """The pad token's id, or ``fallback`` (EOS) when the tokenizer has none (``<|pad|>`` / ``<|null|>`` copy it)."""
    string = ckpt.token_string("pad_token", default)
    tid = None if string is None else tokenizer.token_to_id(string)
    return tid if tid is not None and 0 <= tid < ref_size else fallback


# -- the id permutation ----------------------------------------------------------------------------


@dataclass
class IdMap:
    """Reference ids <-> anygen ids.

    Attributes:
        vocab: anygen's layout for the imported model.
        ref_size: rows of the reference's embedding table.
        text_ids: the reference id behind each anygen text id, ascending.
        roles: anygen special name (``"boi"``) -> the reference id it *is* (its row moves there).
        aliases: anygen special name -> a reference id whose rows it copies (Janus's ``<|null|>`` is its pad).
        image_ids: the reference id of image code ``k`` (Emu3, Chameleon), or None when the codes
            have their own table (Janus).
    """

    vocab: Vocab
    ref_size: int
    text_ids: list[int]
    roles: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    image_ids: list[int] | None = None

    @classmethod
    def build(cls, ref_size: int, roles: dict[str, int], *, aliases: dict[str, int] | None = None,
              image_ids: list[int] | None = None, image_codebook_size: int, max_height: int, max_width: int) -> IdMap:
        known = {name[2:-2] for name in SPECIALS}
        unknown = sorted((set(roles) | set(aliases or {})) - known)
        if unknown:
            raise ValueError(f"unknown anygen roles {unknown}; known: {sorted(known)}")
        owned = set(roles.values())
        if len(owned) != len(roles):
            raise ValueError(f"two anygen roles claim the same reference id: {roles}")
        images = set(image_ids or [])
        if image_ids is not None and (len(images) != len(image_ids) or len(image_ids) != image_codebook_size):
            raise ValueError(f"the reference lists {len(images)} distinct image-code tokens for a codebook of "
                             f"{image_codebook_size}")
        if owned & images:
            raise ValueError(f"reference ids {sorted(owned & images)[:5]} are both special tokens and image codes")
        bad = sorted(i for i in owned | images if not 0 <= i < ref_size)
        if bad:
            raise ValueError(f"reference ids {bad[:5]} are outside the model's {ref_size} embedding rows")
        text_ids = [i for i in range(ref_size) if i not in owned and i not in images]
        vocab = Vocab(text_size=len(text_ids), image_codebook_size=image_codebook_size, video_codebook_size=1,
                      max_height=max_height, max_width=max_width, max_frames=1)
        return cls(vocab, ref_size, text_ids, dict(roles), dict(aliases or {}), image_ids)

    def sources(self) -> Tensor:
        """``(vocab.size,)`` long: the reference row each anygen id takes, -1 for none (a zero row)."""
        v = self.vocab
        src = torch.full((v.size,), -1, dtype=torch.long)
        src[: v.text_size] = torch.tensor(self.text_ids, dtype=torch.long)
        for name, ref in {**self.aliases, **self.roles}.items():
            src[v.special(name)] = ref
        if self.image_ids is not None:
            src[v.image_offset: v.video_offset] = torch.tensor(self.image_ids, dtype=torch.long)
        return src

    def to_anygen(self) -> Tensor:
        """``(ref_size,)`` long: the anygen id of each reference id (-1 where it has none: Janus's codes live apart)."""
        v = self.vocab
        out = torch.full((self.ref_size,), -1, dtype=torch.long)
        out[torch.tensor(self.text_ids, dtype=torch.long)] = torch.arange(v.text_size)
        for name, ref in self.roles.items():
            out[ref] = v.special(name)
        if self.image_ids is not None:
            out[torch.tensor(self.image_ids, dtype=torch.long)] = torch.arange(v.image_offset, v.video_offset)
        return out

    def permute_rows(self, table: Tensor, stop: int | None = None, *, name: str = "a vocabulary table") -> Tensor:
        """Rows of a reference ``(ref_size, D)`` table in anygen order, up to anygen id ``stop``; zeros where none."""
        src = self.sources()[:stop]
        if table.ndim != 2 or table.shape[0] != self.ref_size:
            raise ValueError(f"shape mismatch: {name} has shape {tuple(table.shape)} but the config's vocab_size needs "
                             f"({self.ref_size}, hidden_size)")
        out = table.new_zeros((src.numel(), *table.shape[1:]))
        have = src >= 0
        out[have] = table[src[have]]
        return out

    def to_dict(self) -> dict[str, Any]:
        from tokenizers_mm.hf_adapters import _ranges

        return {"ref_size": self.ref_size, "text_ids": _ranges(self.text_ids), "roles": self.roles,
                "aliases": self.aliases, "image_ids": None if self.image_ids is None else _ranges(self.image_ids),
                "vocab": self.vocab.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdMap:
        def expand(runs: list[list[int]]) -> list[int]:
            return [i for start, end in runs for i in range(start, end)]

        image_ids = None if data["image_ids"] is None else expand(data["image_ids"])  # runs keep code order
        return cls(Vocab.from_dict(data["vocab"]), data["ref_size"], expand(data["text_ids"]), data["roles"],
                   data["aliases"], image_ids)


# -- the LLaMA-style decoder -----------------------------------------------------------------------


def decoder_fields(cfg: dict[str, Any], what: str) -> dict[str, Any]:
    """``AnyGenConfig`` decoder fields of a LLaMA-style text config; what anygen cannot express raises."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    problems = []
    if head_dim * heads != hidden:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention / MLP biases")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (anygen's MLP is SwiGLU)")
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        problems.append(f"RoPE type {rope_type!r} (only the default rotary embedding)")
    if problems:
        raise ValueError(f"unsupported {what} decoder: {'; '.join(problems)}")
    return {
        "n_layer": cfg["num_hidden_layers"], "n_head": heads, "n_kv_head": kv, "d_model": hidden,
        "intermediate_size": cfg["intermediate_size"],
        "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "max_seq_len": int(cfg.get("max_position_embeddings", 4096)),
    }


def decoder_state(ckpt: HFCheckpoint, prefix: str, n_layer: int, *, qk_norm: bool = False
                  ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The decoder blocks and final norm under ``prefix`` in anygen names; returns (state, anygen -> source name)."""
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        names[f"attn.{proj}.weight"] = f"self_attn.{proj}.weight"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        names[f"mlp.{proj}.weight"] = f"mlp.{proj}.weight"
    if qk_norm:
        for norm in ("q_norm", "k_norm"):
            for p in ("weight", "bias"):
                names[f"attn.{norm}.{p}"] = f"self_attn.{norm}.{p}"
    sources = {f"blocks.{i}.{ours}": f"{prefix}layers.{i}.{theirs}" for i in range(n_layer)
               for ours, theirs in names.items()}
    sources["norm.weight"] = f"{prefix}norm.weight"
    return {ours: ckpt.get(theirs) for ours, theirs in sources.items()}, sources


# -- the engine ------------------------------------------------------------------------------------


def build_engine(config: AnyGenConfig, state: dict[str, Tensor], tokenizer, sources: dict[str, str], *,
                 dtype: torch.dtype | None = None, sampling_defaults=None):
    """An ``AnyGen`` holding ``state`` without a second copy: the model is built on the meta device, then filled.

    Raises:
        ValueError: a tensor is missing, unexpected, or of another shape than ``config`` implies (named,
            with its source tensor and both shapes).
    """
    from anygen.api import AnyGen
    from anygen.model import AnyGenModel

    with torch.device("meta"):
        model = AnyGenModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"internal conversion error: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            src = sources.get(name, name)
            raise ValueError(f"shape mismatch: {src} has shape {tuple(tensor.shape)} but the converted config needs "
                             f"{tuple(expected[name].shape)} for {name}")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    _materialize_buffers(model)
    return AnyGen(model, tokenizer, sampling_defaults=sampling_defaults)


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Recreate the non-persistent buffers a meta-device build left empty (SigLIP's ``position_ids``)."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).contiguous()
            else:
                raise RuntimeError(f"cannot materialise buffer {name} of {type(module).__name__}")


def siglip_state(ckpt: HFCheckpoint, prefix: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Janus's vision tower (a SigLIP with another name for the attention output) as ``und.tower.*``."""
    sources = {}
    for key in ckpt.weight_map:
        if key.startswith(prefix):
            rest = key[len(prefix):].replace(".self_attn.projection_layer.", ".self_attn.out_proj.")
            sources[f"und.tower.{rest}"] = key
    return {ours: ckpt.get(theirs) for ours, theirs in sources.items()}, sources


def load_vq(image, ckpt: HFCheckpoint, prefix: str = "model.vqmodel.") -> None:
    """Fill an ``HFImageTokenizer``'s VQ model from ``prefix``; kept in float32 (it is small, and decodes pixels)."""
    state = ckpt.prefixed(prefix)
    try:
        missing, unexpected = image.vq.load_state_dict(state, strict=False)
    except RuntimeError as err:  # torch names the tensor and both shapes
        raise ValueError(f"{ckpt.directory}: {prefix}* does not fit vq_config: {err}") from err
    if missing or unexpected:
        raise ValueError(f"{ckpt.directory}: {prefix}* does not fit vq_config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    image.float()


def pixel_affine(pre: dict[str, Any]) -> dict[str, list[float]]:
    """``HFImageTokenizer`` pixel map from a ``preprocessor_config.json``: ``[-1, 1]`` -> the reference's input."""
    if not pre:
        return {"pixel_scale": [1.0] * 3, "pixel_shift": [0.0] * 3}
    rescale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
    mean = _triple(pre.get("image_mean", 0.5)) if pre.get("do_normalize", True) else [0.0] * 3
    std = _triple(pre.get("image_std", 0.5)) if pre.get("do_normalize", True) else [1.0] * 3
    # pixel p in [0, 255] is (x + 1) * 127.5; the reference feeds (p * rescale - mean) / std
    return {"pixel_scale": [127.5 * rescale / s for s in std],
            "pixel_shift": [(127.5 * rescale - m) / s for m, s in zip(mean, std)]}


def _triple(value: float | list[float]) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(x) for x in value]


@dataclass
class Imported:
    """What a family importer returns: everything ``build_engine`` needs, plus the id map it used."""

    config: AnyGenConfig
    state: dict[str, Tensor]
    sources: dict[str, str]  # anygen tensor name -> the reference tensor it came from (for error messages)
    tokenizer: Any  # MultimodalTokenizer
    id_map: IdMap
    sampling: Any = None  # SamplingDefaults: the reference's published settings; None: the library's
