"""The image VQ tokenizer: pixels ``(B, 3, H, W)`` in ``[-1, 1]`` to integer codes ``(B, h, w)`` and back.

This module owns ``ImageTokenizerConfig`` (a torch-free dataclass with ``tiny`` / ``default``
presets) and ``ImageTokenizer``, a VQ autoencoder assembled from parts that already exist:

* encoder / decoder: ``diffusers.models.autoencoders.vae.Encoder`` / ``Decoder``, laid out like
  diffusers' ``VQModel`` (1x1 ``quant_conv`` / ``post_quant_conv`` around the quantizer). With
  ``decoder_norm="spatial"`` the decoder is MoVQ's (https://arxiv.org/abs/2209.09002): every norm
  is modulated by the quantized latent, which is passed as the decoder's conditioning.
* quantizer: ``vector_quantize_pytorch.FSQ`` (https://arxiv.org/abs/2309.15505, no codebook to
  collapse, no auxiliary loss) or ``VectorQuantize`` with a cosine-similarity EMA codebook and
  dead-code expiry.

Contract (DESIGN.md, "Tokenizers"): ``encode(x) -> LongTensor[B, h, w]`` with ``h = H / downsample``,
``decode(codes) -> [B, 3, H, W]`` clamped to ``[-1, 1]``, ``forward(x) -> (recon, codes, aux_loss)``
for training, ``codebook_size``, ``downsample``, and ``save`` / ``load`` to one ``.safetensors`` file.
User input is checked up front so mistakes read as ``ValueError`` / ``TypeError``, never as a
shape error deep inside a convolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from tokenizers_mm.io import load_state, save_module

_KIND = "image_tokenizer"
_RANGE_TOLERANCE = 1e-3  # inputs may overshoot [-1, 1] by this much (bicubic resampling, float noise)
_SPATIAL_NORM_GROUPS = 32  # diffusers' SpatialNorm hard-codes GroupNorm(32, C)


def _num_stages(downsample: int) -> int:
    """Encoder / decoder blocks for a downsampling factor: every block but the last halves the resolution."""
    return int(math.log2(downsample)) + 1


@dataclass
class ImageTokenizerConfig:
    """Shape of an ``ImageTokenizer``. Torch-free; round-trips through ``to_dict`` / ``from_dict``.

    Args:
        downsample: pixels per token along each side: 4, 8 or 16.
        base_channels: width of the first (full-resolution) encoder block and last decoder block.
        channel_mult: width multiplier of each block, ``log2(downsample) + 1`` entries; ``None``
            derives ``[1, 1, 2, 4, 8]`` (16), ``[1, 2, 4, 8]`` (8) or ``[1, 2, 4]`` (4).
        layers_per_block: resnets per encoder block (the decoder uses one more, as diffusers does).
        norm_num_groups: GroupNorm groups; must divide every block width.
        mid_block_attention: self-attention in the lowest-resolution middle block of both halves.
        decoder_norm: ``"group"`` (plain GroupNorm) or ``"spatial"`` (MoVQ norm conditioned on the
            quantized latent; diffusers fixes its groups at 32, so every width must be a multiple of 32).
        quantizer: ``"fsq"`` (finite scalar quantization) or ``"vq"`` (learned codebook).
        fsq_levels: quantization levels per latent channel (each >= 3); the codebook has ``prod(levels)`` codes.
        vq_codebook_size: number of codes of the ``"vq"`` codebook.
        vq_dim: dimension of the ``"vq"`` codes (a low dimension helps codebook usage, ViT-VQGAN).
        vq_use_cosine_sim: l2-normalised codes and inputs, nearest by cosine similarity.
        vq_threshold_ema_dead_code: codes whose EMA cluster size falls below this are re-seeded from
            the batch (``0`` disables dead-code expiry).
        vq_kmeans_init: initialise the codebook with k-means on the first batch the quantizer sees.
        vq_commitment_weight: weight of the commitment loss returned as ``aux_loss``.
        vq_decay: EMA decay of the codebook updates.
        image_size: the default edge, in pixels, callers resize images to before encoding.
    """

    # architecture
    downsample: int = 16
    base_channels: int = 16
    channel_mult: list[int] | None = None
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block_attention: bool = True
    decoder_norm: Literal["group", "spatial"] = "group"
    # quantizer
    quantizer: Literal["fsq", "vq"] = "fsq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    vq_codebook_size: int = 1024
    vq_dim: int = 8
    vq_use_cosine_sim: bool = True
    vq_threshold_ema_dead_code: int = 2
    vq_kmeans_init: bool = False
    vq_commitment_weight: float = 0.25
    vq_decay: float = 0.99
    # data
    image_size: int = 256

    def __post_init__(self) -> None:
        if type(self.downsample) is not int or self.downsample not in (4, 8, 16):
            raise ValueError(f"ImageTokenizerConfig.downsample must be 4, 8 or 16, got {self.downsample!r}")
        for name in ("base_channels", "layers_per_block", "norm_num_groups", "vq_codebook_size", "vq_dim"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("vq_threshold_ema_dead_code", self.vq_threshold_ema_dead_code, minimum=0)
        _check_int("image_size", self.image_size, minimum=1)
        for name in ("mid_block_attention", "vq_use_cosine_sim", "vq_kmeans_init"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ImageTokenizerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.decoder_norm not in ("group", "spatial"):
            raise ValueError(
                f"ImageTokenizerConfig.decoder_norm must be 'group' or 'spatial', got {self.decoder_norm!r}"
            )
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"ImageTokenizerConfig.quantizer must be 'fsq' or 'vq', got {self.quantizer!r}")

        stages = _num_stages(self.downsample)
        if self.channel_mult is None:
            self.channel_mult = {4: [1, 2, 4], 8: [1, 2, 4, 8], 16: [1, 1, 2, 4, 8]}[self.downsample]
        self.channel_mult = _int_list("channel_mult", self.channel_mult, minimum=1)
        if len(self.channel_mult) != stages:
            raise ValueError(
                f"ImageTokenizerConfig.channel_mult needs {stages} entries for downsample {self.downsample} "
                f"(one block per halving plus the lowest-resolution one), got {self.channel_mult}"
            )
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(
                    f"ImageTokenizerConfig.norm_num_groups={self.norm_num_groups} must divide every block width, "
                    f"got widths {self.block_out_channels}"
                )
            if self.decoder_norm == "spatial" and width % _SPATIAL_NORM_GROUPS:
                raise ValueError(
                    f"ImageTokenizerConfig.decoder_norm='spatial' needs every block width to be a multiple of "
                    f"{_SPATIAL_NORM_GROUPS} (diffusers' SpatialNorm), got widths {self.block_out_channels}"
                )

        self.fsq_levels = _int_list("fsq_levels", self.fsq_levels, minimum=3)
        if not self.fsq_levels:
            raise ValueError("ImageTokenizerConfig.fsq_levels must not be empty")
        if math.prod(self.fsq_levels) >= 2**31:
            raise ValueError(f"ImageTokenizerConfig.fsq_levels {self.fsq_levels} give over 2**31 codes")
        for name in ("vq_commitment_weight", "vq_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ImageTokenizerConfig.{name} must be a non-negative number, got {value!r}")
        if not self.vq_decay < 1:
            raise ValueError(f"ImageTokenizerConfig.vq_decay must be in [0, 1), got {self.vq_decay!r}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"ImageTokenizerConfig.image_size={self.image_size} must be a multiple of downsample={self.downsample}"
            )

    # -- derived -----------------------------------------------------------------------------------
    @property
    def block_out_channels(self) -> list[int]:
        """Width of each encoder block (the decoder mirrors them)."""
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def latent_channels(self) -> int:
        """Channels of the quantized latent: ``len(fsq_levels)`` or ``vq_dim``."""
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.vq_dim

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.vq_codebook_size

    # -- presets -----------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides: Any) -> ImageTokenizerConfig:
        """A ~0.1M-parameter model for tests: width 16 everywhere, one resnet per block, 125 FSQ codes.

        ``overrides`` replace any field. Changing ``downsample`` keeps width 16 at every stage;
        ``decoder_norm="spatial"`` raises the width to 32 (~0.4M parameters), the least diffusers'
        SpatialNorm accepts.
        """
        stages = _num_stages(overrides.get("downsample", 8))
        spatial = overrides.get("decoder_norm") == "spatial"
        preset: dict[str, Any] = dict(
            downsample=8,
            base_channels=32 if spatial else 16,
            channel_mult=[1] * stages,
            layers_per_block=1,
            norm_num_groups=8,
            mid_block_attention=True,
            decoder_norm="group",
            quantizer="fsq",
            fsq_levels=[5, 5, 5],
            vq_codebook_size=64,
            vq_dim=4,
            image_size=32,
        )
        return cls(**{**preset, **overrides})

    @classmethod
    def default(cls, **overrides: Any) -> ImageTokenizerConfig:
        """The shipped tokenizer: 2.7M parameters (11 MB in fp32), 16x downsampling, 1000 FSQ codes.

        Why these numbers: the whole any-to-any model ships under 50 MB and trains on a CPU, so the
        tokenizer must stay a few MB and cheap at 256x256.

        * Downsample 16: 256 tokens per 256x256 image; downsample 8 would give 1024, four times
          the sequence the transformer has to generate.
        * Widths ``16, 16, 32, 64, 128`` from 256x256 down to 16x16: the full-resolution stages
          dominate the FLOPs (1.6 GFLOP to encode, 4.3 to decode a 256x256 image), while the
          parameters sit in the cheap 16x16 stage where the content is decided.
        * Group-norm decoder: the MoVQ ``"spatial"`` decoder needs widths that are multiples of 32
          (diffusers' SpatialNorm), which at the same layout costs ~3x the decode FLOPs.
        * FSQ ``[8, 5, 5, 5]`` (1000 codes, the FSQ paper's levels for ~2^10): no codebook to
          collapse and no auxiliary loss.
        """
        return cls(**overrides)

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (derived ``channel_mult`` included)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageTokenizerConfig:
        """Build a config from ``to_dict`` output; unknown keys raise a ``ValueError`` listing the accepted ones."""
        if not isinstance(data, dict):
            raise TypeError(f"ImageTokenizerConfig.from_dict expects a dict, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown ImageTokenizerConfig fields {unknown}; accepted: {known}")
        return cls(**data)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"ImageTokenizerConfig.{name} must be an int >= {minimum}, got {value!r}")


def _int_list(name: str, value: Any, minimum: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
    ):
        raise ValueError(f"ImageTokenizerConfig.{name} must be a list of ints >= {minimum}, got {value!r}")
    return list(value)


class ImageTokenizer(nn.Module):
    """VQ autoencoder between images ``(B, 3, H, W)`` in ``[-1, 1]`` and codes ``(B, H/f, W/f)``, f = downsample.

    Args:
        config: the architecture; ``None`` uses ``ImageTokenizerConfig.default()``.
    """

    def __init__(self, config: ImageTokenizerConfig | None = None) -> None:
        super().__init__()
        config = ImageTokenizerConfig.default() if config is None else config
        if not isinstance(config, ImageTokenizerConfig):
            raise TypeError(f"ImageTokenizer expects an ImageTokenizerConfig, got {type(config).__name__}")
        self.config = config
        widths = tuple(config.block_out_channels)
        latent = config.latent_channels
        self.encoder = Encoder(
            in_channels=3,
            out_channels=latent,
            down_block_types=("DownEncoderBlock2D",) * len(widths),
            block_out_channels=widths,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            double_z=False,
            mid_block_add_attention=config.mid_block_attention,
        )
        self.quant_conv = nn.Conv2d(latent, latent, 1)
        if config.quantizer == "fsq":
            self.quantizer = FSQ(levels=config.fsq_levels, dim=latent)
        else:
            self.quantizer = VectorQuantize(
                dim=latent,
                codebook_size=config.vq_codebook_size,
                accept_image_fmap=True,
                use_cosine_sim=config.vq_use_cosine_sim,
                threshold_ema_dead_code=config.vq_threshold_ema_dead_code,
                kmeans_init=config.vq_kmeans_init,
                commitment_weight=config.vq_commitment_weight,
                decay=config.vq_decay,
            )
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(
            in_channels=latent,
            out_channels=3,
            up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=widths,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            norm_type=config.decoder_norm,
            mid_block_add_attention=config.mid_block_attention,
        )

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes; codes are ints in ``[0, codebook_size)``."""
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return self.config.downsample

    # -- public API --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images to codes.

        Args:
            x: float tensor ``(B, 3, H, W)`` in ``[-1, 1]``, ``H`` and ``W`` multiples of ``downsample``.

        Returns:
            ``LongTensor`` ``(B, H / downsample, W / downsample)`` with values in ``[0, codebook_size)``.
        """
        _, codes, _ = self._quantize(self._check_images(x), update_codebook=False)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes to images.

        Args:
            codes: integer tensor ``(B, h, w)`` with values in ``[0, codebook_size)``.

        Returns:
            Float tensor ``(B, 3, h * downsample, w * downsample)`` clamped to ``[-1, 1]``.
        """
        codes = self._check_codes(codes)
        if isinstance(self.quantizer, FSQ):
            quant = self.quantizer.indices_to_codes(codes)  # (B, C, h, w)
        else:
            quant = self.quantizer.get_output_from_indices(codes)  # (B, C, h, w)
        return self._decode_latent(quant.to(self._dtype)).clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: reconstruct ``x`` through the quantizer.

        Args:
            x: float tensor ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(recon, codes, aux_loss)``: the reconstruction ``(B, 3, H, W)`` (not clamped, so the
            loss keeps its gradient at the range ends), the codes ``(B, h, w)``, and the
            quantizer's loss as a 0-dim tensor (VQ commitment loss; zero for FSQ).
        """
        quant, codes, aux_loss = self._quantize(self._check_images(x), update_codebook=True)
        return self._decode_latent(quant), codes, aux_loss

    def code_vectors(self) -> torch.Tensor:
        """The quantized latent of every code, ``(codebook_size, latent_channels)``, in code order.

        FSQ: the code's grid point, each channel in ``[-1, 1]``. Two FSQ tokenizers can be compared code by
        code this way, on the channels they share (a refined codebook's codes and their nearest coarse ones,
        ``trainers.unified.nearest_code_map``).

        Raises:
            ValueError: a ``"vq"`` tokenizer (its codes live on a learned, unnormalised codebook).
        """
        if not isinstance(self.quantizer, FSQ):
            raise ValueError("code_vectors needs an FSQ tokenizer (ImageTokenizerConfig.quantizer='fsq')")
        codes = torch.arange(self.codebook_size, device=self.quant_conv.weight.device)
        with torch.no_grad():
            return self.quantizer.indices_to_codes(codes).float()  # (K, C)

    def codebook_usage(self, codes: torch.Tensor) -> float:
        """Fraction of the codebook that appears in ``codes`` (any shape of valid codes)."""
        if not isinstance(codes, torch.Tensor) or not _is_int(codes):
            raise TypeError("codebook_usage expects an integer tensor of codes")
        if codes.numel() == 0:
            return 0.0
        self._check_code_range(codes)
        return torch.unique(codes).numel() / self.codebook_size

    def save(self, path: str | Path) -> Path:
        """Write weights and config to one ``.safetensors`` file; returns its path."""
        return save_module(self, self.config.to_dict(), path, kind=_KIND)

    @classmethod
    def load(cls, path: str | Path) -> ImageTokenizer:
        """Read a tokenizer written by ``save``, in eval mode on the CPU.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not an image tokenizer, its config is invalid, or its weights do
                not fit the config.
        """
        config_dict, state = load_state(path, kind=_KIND)
        try:
            config = ImageTokenizerConfig.from_dict(config_dict)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} holds an invalid ImageTokenizerConfig: {err}") from err
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        resized = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or resized:
            problems = [
                f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", resized))
                if items
            ]
            raise ValueError(f"the weights in {path} do not match the config stored with them: {'; '.join(problems)}")
        model.load_state_dict(state)
        return model.eval()

    # -- internals ---------------------------------------------------------------------------------
    @property
    def _dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _quantize(self, x: torch.Tensor, update_codebook: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.quant_conv(self.encoder(x))  # (B, C, h, w)
        if isinstance(self.quantizer, FSQ):
            quant, codes = self.quantizer(z)
            aux_loss = z.new_zeros(())
        else:
            # encode() must not move the EMA codebook, even when the module is in training mode
            quant, codes, aux_loss = self.quantizer(z, freeze_codebook=not update_codebook)
        return quant, codes.long(), aux_loss  # (B, C, h, w), (B, h, w), ()

    def _decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        # MoVQ: the spatial norms are conditioned on the quantized latent, exactly as diffusers' VQModel does
        condition = quant if self.config.decoder_norm == "spatial" else None
        return self.decoder(self.post_quant_conv(quant), condition)  # (B, 3, H, W)

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a float tensor (B, 3, H, W) in [-1, 1], got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D tensor (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 (RGB) channels in dim 1 of (B, 3, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a float tensor in [-1, 1], got dtype {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"expected a non-empty batch of images, got shape {tuple(x.shape)}")
        for side, name in ((x.shape[2], "height"), (x.shape[3], "width")):
            if side % self.downsample:
                raise ValueError(
                    f"image {name} {side} is not a multiple of downsample {self.downsample} "
                    f"(got shape {tuple(x.shape)}); resize with preprocess_image(..., factor={self.downsample})"
                )
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or inf values; expected floats in [-1, 1]")
        low, high = float(x.min()), float(x.max())
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"image values must be in [-1, 1], found min {low:.4g} max {high:.4g} "
                "(map uint8 pixels with x / 127.5 - 1, or use preprocess_image)"
            )
        return x.to(device=self.quant_conv.weight.device, dtype=self._dtype)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"expected an integer tensor of codes (B, h, w), got {type(codes).__name__}")
        if not _is_int(codes):
            raise TypeError(f"expected integer codes (torch.long), got dtype {codes.dtype}")
        if codes.ndim != 3 or codes.numel() == 0:
            raise ValueError(f"expected a non-empty 3-D tensor of codes (B, h, w), got shape {tuple(codes.shape)}")
        self._check_code_range(codes)
        return codes.long().to(self.quant_conv.weight.device)

    def _check_code_range(self, codes: torch.Tensor) -> None:
        low, high = int(codes.min()), int(codes.max())
        bad = low if low < 0 else high if high >= self.codebook_size else None
        if bad is not None:
            raise ValueError(f"code {bad} is outside the codebook range [0, {self.codebook_size})")


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
