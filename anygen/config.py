"""``AnyGenConfig``: everything needed to build an ``AnyGenModel``, as one flat, torch-free dataclass.

What this module owns:

- the decoder's shape (layers, widths, heads, RoPE, norms, head mode) and its training knobs (z-loss);
- the vocabulary layout as plain ints, exactly ``tokenizers_mm.vocab.Vocab``'s init fields
  (``vocab_dict()`` hands them over), so a checkpoint's ``config.json`` fully describes the id space;
- the decoupled understanding encoder (Janus): SigLIP kwargs or a local directory, its input size;
- the variants imported checkpoints need (``anygen.convert``): Janus's generation embedding + aligner
  and MLP generation head for image codes, a separate epsilon for Chameleon's QK layer norm;
- named presets (``tiny`` for tests, ``small`` for the CPU benchmark, the Janus-Pro shapes);
- an analytic parameter count, so a 7B shape can be sized without building it.

Notable: importing this module never imports torch (not even through ``tokenizers_mm``), so CLIs,
YAML checks and the config round trip stay fast. That is why the number of special tokens is
repeated here (``NUM_SPECIALS``); a test pins it to ``tokenizers_mm.vocab.SPECIALS``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

# len(tokenizers_mm.vocab.SPECIALS); repeated because that module imports torch.
NUM_SPECIALS = 11
# transformers.SiglipVisionConfig's defaults for the keys this module reads, for the same reason.
_SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "vision_use_head": False,  # anygen's default: the pooling head is never used, so it is not built
}

_QK_NORMS = ("none", "rms", "layernorm")
_HEAD_MODES = ("routed", "shared")
_VOCAB_FIELDS = ("text_size", "image_codebook_size", "video_codebook_size", "max_height", "max_width", "max_frames")


@dataclass
class AnyGenConfig:
    """Shape and options of the decoder, its vocabulary and its understanding encoder.

    Build one directly, from a preset (``AnyGenConfig.preset("tiny", n_layer=1)``), or from JSON.
    Every field is validated on construction; a bad value raises ``ValueError`` naming the field.
    """

    # vocabulary layout (tokenizers_mm.vocab.Vocab's init fields)
    text_size: int = 4096
    image_codebook_size: int = 4096
    video_codebook_size: int = 4096
    max_height: int = 32
    max_width: int = 32
    max_frames: int = 8

    # decoder
    n_layer: int = 4
    n_head: int = 8
    n_kv_head: int = 8  # < n_head: grouped-query attention; n_head % n_kv_head == 0
    d_model: int = 256
    intermediate_size: int = 688  # SwiGLU hidden width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: Literal["none", "rms", "layernorm"] = "rms"  # per-head norm of q and k (Chameleon)
    qk_norm_eps: float | None = None  # epsilon of the QK-norm; None: norm_eps (Chameleon fixes 1e-5)
    post_norm: bool = False  # swin-norm: norm the attention / MLP output inside the residual branch
    head_mode: Literal["routed", "shared"] = "routed"  # routed: one table + head per modality
    max_seq_len: int = 2048  # longest sequence the KV cache may be set up for
    tie_embeddings: bool = False
    # Janus's image path (routed mode): codes embed at image_embed_dim, then Linear -> GELU -> Linear to d_model;
    # the image head is Linear(d_model, image_head_dim) -> GELU -> Linear(image_head_dim, K). 0: a plain table / head.
    image_embed_dim: int = 0
    image_head_dim: int = 0
    # learned row and column embeddings added to each image code's input (max_height + max_width rows of d_model,
    # zero at init, so a model without them loads with them and starts out unchanged): 1D RoPE alone makes the
    # model find a code's column by counting back to the last <|eol|>. Needs anygen's own layout (<|eol|> rows)
    image_grid_embed: bool = False
    # 2D RoPE for image codes (LlamaGen's 2D rotary, Qwen2-VL's M-RoPE in spirit): the 2 * rope_grid highest-frequency
    # rotary pairs turn an image code by its column (first rope_grid pairs) and its row (next rope_grid) at those
    # pairs' own frequencies, instead of by its position; every other token, and every other pair, keeps 1D RoPE.
    # A code then meets the code in the same cell of an earlier image at relative angle 0 in those pairs, whatever
    # lies between: editing copies cell by cell. Within a row, neighbours keep their 1D angles. 0: off. Needs
    # anygen's own layout (<|eol|> rows), as image_grid_embed does
    rope_grid: int = 0
    # the blocks whose attention uses rope_grid (indices into the n_layer blocks); None: every block. A block grown
    # onto a trained model (UnifiedModule(grow_depth=True)) can read cells this way while the trained blocks keep
    # the 1D positions they learned
    rope_grid_layers: list[int] | None = None
    # experimental (session 28): InstructPix2Pix's channel-wise source conditioning, for a decoder. Inside an image,
    # each position's input also gets the earlier image's code at the cell the position predicts next (same row
    # and column, the image before it in the same document), through the image table and a zero-initialised
    # d_model x d_model projection: an edit or a story's next picture sees, at every step, the code it would copy.
    # The KV cache keeps each slot's id to find the hints again (cache_ids). Needs routed heads, a plain image table
    image_copy_hint: bool = False
    # experimental (session 28), a pointer (See et al.'s copy mechanism, for cells): the same hint code gets a
    # learned logit bonus gate(h) = w . h + b from the final hidden state (zero at init), so a position can copy it
    # outright. Needs routed heads with a plain image table
    image_copy_logit: bool = False

    # training
    z_loss_weight: float = 0.0  # weight of log(Z)^2 per target token (PaLM, Chameleon); 0 disables

    # understanding encoder (Janus's decoupled SigLIP + MLP aligner); und_encoder=None disables it
    und_encoder: dict[str, Any] | None = None  # transformers.SiglipVisionConfig kwargs
    und_encoder_path: str | None = None  # local directory for SiglipVisionModel.from_pretrained
    und_image_size: int = 384  # side of the square pixels the encoder reads
    und_trainable: bool = False  # False: the SigLIP tower is frozen (the aligner always trains)

    def __post_init__(self) -> None:
        for name in (*_VOCAB_FIELDS, "n_layer", "n_head", "n_kv_head", "d_model", "intermediate_size", "max_seq_len",
                     "und_image_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("image_embed_dim", "image_head_dim", "rope_grid"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AnyGenConfig.{name} must be an int >= 0 (0: off), got {value!r}")
        if (self.image_embed_dim or self.image_head_dim) and (self.head_mode != "routed" or self.tie_embeddings):
            raise ValueError("AnyGenConfig.image_embed_dim / image_head_dim need head_mode='routed' and "
                             f"tie_embeddings=False, got head_mode={self.head_mode!r}, "
                             f"tie_embeddings={self.tie_embeddings}")
        if self.qk_norm_eps is not None:
            if not isinstance(self.qk_norm_eps, (int, float)) or isinstance(self.qk_norm_eps, bool) \
                    or self.qk_norm_eps <= 0:
                raise ValueError(f"AnyGenConfig.qk_norm_eps must be a number > 0 or None, got {self.qk_norm_eps!r}")
            self.qk_norm_eps = float(self.qk_norm_eps)
        for name in ("rope_theta", "norm_eps", "z_loss_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"AnyGenConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))  # JSON may hand back 10000 as an int
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            name = "rope_theta" if self.rope_theta <= 0 else "norm_eps"
            raise ValueError(f"AnyGenConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.z_loss_weight < 0:
            raise ValueError(f"AnyGenConfig.z_loss_weight must be >= 0, got {self.z_loss_weight}")
        for name in ("post_norm", "tie_embeddings", "und_trainable", "image_grid_embed", "image_copy_hint",
                     "image_copy_logit"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AnyGenConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.qk_norm not in _QK_NORMS:
            raise ValueError(f"AnyGenConfig.qk_norm must be one of {_QK_NORMS}, got {self.qk_norm!r}")
        if self.head_mode not in _HEAD_MODES:
            raise ValueError(f"AnyGenConfig.head_mode must be one of {_HEAD_MODES}, got {self.head_mode!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"AnyGenConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"AnyGenConfig.n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"AnyGenConfig.d_model / n_head (head_dim {self.head_dim}) must be even for RoPE")
        if (self.image_copy_hint or self.image_copy_logit) and (self.head_mode != "routed" or self.image_embed_dim):
            raise ValueError("AnyGenConfig.image_copy_hint / image_copy_logit look the hint codes up in the image "
                             f"table: they need head_mode='routed' and image_embed_dim=0, got head_mode="
                             f"{self.head_mode!r}, image_embed_dim={self.image_embed_dim}")
        self._check_rope_grid_layers()
        if 2 * self.rope_grid > self.head_dim // 2:
            raise ValueError(f"AnyGenConfig.rope_grid ({self.rope_grid}) takes 2 * rope_grid of the head's "
                             f"{self.head_dim // 2} rotary pairs: it must be <= {self.head_dim // 4}")
        self._check_und()

    def _check_rope_grid_layers(self) -> None:
        layers = self.rope_grid_layers
        if layers is None:
            return
        if not isinstance(layers, (list, tuple)) or not layers or any(
                not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layer for i in layers) \
                or len(set(layers)) != len(layers):
            raise ValueError(f"AnyGenConfig.rope_grid_layers must be None (every block) or a non-empty list of "
                             f"distinct block indices in 0..{self.n_layer - 1}, got {layers!r}")
        if self.rope_grid == 0:
            raise ValueError(f"AnyGenConfig.rope_grid_layers {list(layers)} names blocks for 2D rotary pairs, but "
                             "rope_grid is 0 (off): set rope_grid > 0 too")
        self.rope_grid_layers = sorted(layers)

    def _check_und(self) -> None:
        if self.und_encoder is None:
            if self.und_encoder_path is not None:
                raise ValueError("AnyGenConfig.und_encoder_path needs und_encoder (the SiglipVisionConfig kwargs that "
                                 "describe the checkpoint), got und_encoder=None")
            return
        if not isinstance(self.und_encoder, dict) or not all(isinstance(k, str) for k in self.und_encoder):
            raise ValueError(f"AnyGenConfig.und_encoder must be a dict of SiglipVisionConfig kwargs or None, "
                             f"got {self.und_encoder!r}")
        if self.und_encoder_path is not None and not isinstance(self.und_encoder_path, str):
            raise ValueError(f"AnyGenConfig.und_encoder_path must be a str or None, got {self.und_encoder_path!r}")
        patch = self.und_encoder.get("patch_size", _SIGLIP_DEFAULTS["patch_size"])
        _check_positive_int("und_encoder['patch_size']", patch)
        if self.und_image_size % patch:
            raise ValueError(f"AnyGenConfig.und_image_size ({self.und_image_size}) must be a multiple of "
                             f"und_encoder['patch_size'] ({patch})")
        if self.und_encoder.get("image_size", self.und_image_size) != self.und_image_size:
            raise ValueError(f"AnyGenConfig.und_encoder['image_size'] ({self.und_encoder['image_size']}) must equal "
                             f"und_image_size ({self.und_image_size})")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def und_tokens(self) -> int:
        """``<|und|>`` positions one image fills: (image_size / patch_size)^2; 0 without an encoder."""
        if self.und_encoder is None:
            return 0
        side = self.und_image_size // self.und_encoder.get("patch_size", _SIGLIP_DEFAULTS["patch_size"])
        return side * side

    @property
    def vocab_size(self) -> int:
        """``Vocab(**self.vocab_dict()).size``, computed without torch."""
        return (self.text_size + NUM_SPECIALS + self.max_height + self.max_width + self.max_frames
                + self.image_codebook_size + self.video_codebook_size)

    def und_encoder_kwargs(self) -> dict[str, Any]:
        """The SiglipVisionConfig kwargs actually used: anygen's defaults, then ``und_encoder``, then the image size."""
        if self.und_encoder is None:
            raise ValueError("AnyGenConfig.und_encoder is None: this config has no understanding encoder")
        return {"vision_use_head": False, **self.und_encoder, "image_size": self.und_image_size}

    def vocab_dict(self) -> dict[str, int]:
        """The vocabulary layout: ``tokenizers_mm.vocab.Vocab(**config.vocab_dict())``."""
        return {name: getattr(self, name) for name in _VOCAB_FIELDS}

    def num_parameters_estimate(self, *, include_und: bool = True) -> int:
        """Parameter count of ``AnyGenModel(self)``, computed analytically (nothing is allocated).

        Exact for the layout ``anygen.model`` builds; the SigLIP count follows ``transformers``'
        ``SiglipVisionModel`` and uses its defaults for keys ``und_encoder`` leaves out.
        """
        d, hd = self.d_model, self.head_dim
        q_width, kv_width = self.n_head * hd, self.n_kv_head * hd
        attn = d * q_width + 2 * d * kv_width + q_width * d
        per_head_affine = {"none": 0, "rms": 1, "layernorm": 2}[self.qk_norm]
        qk = per_head_affine * (q_width + kv_width)  # per-head weights (Chameleon), over all heads
        mlp = 3 * d * self.intermediate_size
        layer = attn + qk + mlp + 2 * d  # two RMSNorm weights
        table = self.vocab_size * d  # routed tables partition the vocabulary, so the total is the same
        total = self.n_layer * layer + d + table + (0 if self.tie_embeddings else table)
        k, e, p = self.image_codebook_size, self.image_embed_dim, self.image_head_dim
        if e:  # Janus's generation embedding + aligner replace the K x d image table
            total += k * e + (e * d + d) + (d * d + d) - k * d
        if p:  # Janus's MLP generation head replaces the d x K image head
            total += (d * p + p) + (p * k + k) - k * d
        if self.image_grid_embed:
            total += (self.max_height + self.max_width) * d
        if self.image_copy_hint:
            total += d * d
        if self.image_copy_logit:
            total += d + 1
        if include_und and self.und_encoder is not None:
            total += self._und_parameters()
        return total

    def _und_parameters(self) -> int:
        s = {**_SIGLIP_DEFAULTS, **self.und_encoder_kwargs()}
        h, i, p, c = s["hidden_size"], s["intermediate_size"], s["patch_size"], s["num_channels"]
        patches = (s["image_size"] // p) ** 2
        embeddings = c * p * p * h + h + patches * h  # patch conv (with bias) + learned positions
        layer = 2 * 2 * h + 4 * (h * h + h) + (h * i + i) + (i * h + h)  # 2 LayerNorms, q/k/v/o, fc1/fc2
        total = embeddings + s["num_hidden_layers"] * layer + 2 * h  # + post_layernorm
        if s["vision_use_head"]:  # attention-pooling head: probe, MultiheadAttention, LayerNorm, MLP
            total += h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
        aligner = (h * self.d_model + self.d_model) + (self.d_model * self.d_model + self.d_model)
        return total + aligner

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnyGenConfig:
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(accepted))
        if unknown:
            raise ValueError(f"unknown AnyGenConfig fields {unknown}; accepted: {accepted}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> AnyGenConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no AnyGenConfig JSON at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    # -- presets -----------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AnyGenConfig:
        """A named shape, with any field overridden: ``AnyGenConfig.preset("tiny", qk_norm="none")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown AnyGenConfig preset {name!r}; accepted: {sorted(PRESETS)}")
        return cls.from_dict({**copy.deepcopy(PRESETS[name]), **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(PRESETS)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"AnyGenConfig.{name} must be a positive int, got {value!r}")


# SigLIP-L/16 at 384 px, the understanding tower of Janus / Janus-Pro (576 tokens per image).
_SIGLIP_LARGE_384: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "patch_size": 16, "image_size": 384,
}

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: every code path at toy width; 16 <|und|> tokens per image (32 px / patch 8)
    "tiny": {
        "text_size": 300, "image_codebook_size": 64, "video_codebook_size": 64,
        "max_height": 16, "max_width": 16, "max_frames": 8,
        "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "intermediate_size": 128, "max_seq_len": 512,
        "und_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "patch_size": 8, "image_size": 32},
        "und_image_size": 32,
    },
    # CPU benchmark (BENCHMARKS.md "On the CPU"): 4 layers, 256 wide, 16x16 image tokens fit. Janus-like
    # (MHA, no QK-norm) so the same weights can be compared against transformers' Janus.
    "small": {
        "text_size": 4096, "image_codebook_size": 4096, "video_codebook_size": 4096,
        "max_height": 32, "max_width": 32, "max_frames": 8,
        "n_layer": 4, "n_head": 8, "n_kv_head": 8, "d_model": 256, "intermediate_size": 688, "max_seq_len": 2048,
        "qk_norm": "none",
        "und_encoder": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "patch_size": 16, "image_size": 64},
        "und_image_size": 64,
    },
    # deepseek-ai/Janus-Pro-1B shapes (LLaMA-style decoder, MHA, no QK-norm, VQ-16 codebook 16384)
    "janus-pro-1b": {
        "text_size": 102400, "image_codebook_size": 16384, "video_codebook_size": 16384,
        "max_height": 64, "max_width": 64, "max_frames": 32,
        "n_layer": 24, "n_head": 16, "n_kv_head": 16, "d_model": 2048, "intermediate_size": 5504,
        "rope_theta": 10000.0, "norm_eps": 1e-6, "qk_norm": "none", "max_seq_len": 16384,
        "und_encoder": dict(_SIGLIP_LARGE_384), "und_image_size": 384,
    },
    # deepseek-ai/Janus-Pro-7B shapes
    "janus-pro-7b": {
        "text_size": 102400, "image_codebook_size": 16384, "video_codebook_size": 16384,
        "max_height": 64, "max_width": 64, "max_frames": 32,
        "n_layer": 30, "n_head": 32, "n_kv_head": 32, "d_model": 4096, "intermediate_size": 11008,
        "rope_theta": 10000.0, "norm_eps": 1e-6, "qk_norm": "none", "max_seq_len": 16384,
        "und_encoder": dict(_SIGLIP_LARGE_384), "und_image_size": 384,
    },
}
