"""Causal 3D VQ video tokenizer: ``VideoTokenizerConfig`` and ``VideoTokenizer``.

A clip of ``T = 1 + 4k`` frames becomes ``t = 1 + k`` latent frames of ``h × w = H/8 × W/8`` FSQ codes:
the first frame is encoded alone, every later group of 4 frames becomes one latent frame. An image is
the ``T = 1`` case, so an image and the first latent frame of any video that starts with it get the
same tokens, bit for bit.

What is reused and why:

- Encoder / decoder blocks are diffusers' ``WanEncoder3d`` / ``WanDecoder3d`` (the Wan 2.1 VAE) at a
  small width. Their convolutions are causal (they pad the past only), their norm is a per-position
  RMS norm (no statistics across time), their attention is per frame, and they run chunk by chunk with
  a feature cache: first frame alone, then chunks of 4 frames. We drive that chunk loop ourselves and
  quantize each chunk's latent frame as soon as it comes out, so every latent frame is computed by
  tensors of the same shapes from the same past. That makes ``encode_image(x) == encode(video)[:, 0]``
  and "changing frames ``1+4j`` onwards leaves latent frames ``0..j`` unchanged" hold exactly, not just
  up to float noise. The decoder runs the same way, one latent frame at a time, so decoding is causal too.
  diffusers' ``AutoencoderVidTok`` was the other candidate; it runs the whole sequence in one pass (so
  equality would rest on convolution kernels giving bitwise-equal outputs for different lengths) and its
  FSQ path fixes the levels to ``[8] * z_channels``.
- The quantizer is ``vector_quantize_pytorch.FSQ``; its ``project_in`` / ``project_out`` linears (the
  1x1x1 convolutions between ``latent_channels`` and ``len(fsq_levels)``) are its own. FSQ has no
  codebook to learn, so the auxiliary loss of ``forward`` is always zero; it is returned to keep the
  ``(recon, codes, aux_loss)`` contract shared with the image tokenizer.

Not owned here: reading and writing video files and fitting a clip to ``1 + 4k`` frames live in
``tokenizers_mm.video_io``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanDecoder3d, WanEncoder3d
from torch import nn
from vector_quantize_pytorch import FSQ

from tokenizers_mm.io import load_state, save_module

KIND = "video_tokenizer"
_RANGE_TOLERANCE = 1e-3  # inputs from uint8 / 127.5 - 1 may land a rounding error outside [-1, 1]


@dataclass
class VideoTokenizerConfig:
    """Hyper-parameters of a ``VideoTokenizer``; torch-free and JSON round-trippable.

    Args:
        fsq_levels: levels per FSQ dimension; the codebook size is their product.
        latent_channels: encoder output channels, projected to ``len(fsq_levels)`` by the FSQ.
        spatial_downsample: ``H / h``; a power of two equal to ``2 ** (len(width_mult) - 1)``.
        temporal_downsample: frames per latent frame after the first; a power of two, at most
            ``spatial_downsample`` (temporal downsampling happens at the deepest spatial levels).
        base_width: channels of the first encoder level (Wan's ``dim``).
        width_mult: channel multiplier per level (Wan's ``dim_mult``); one level per 2× spatial step plus one.
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
        fps: frame rate the tokenizer is trained and used at; pass it to ``video_io.load_video(fps=...)``.
    """

    # quantizer
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    latent_channels: int = 16
    # geometry
    spatial_downsample: int = 8
    temporal_downsample: int = 4
    # widths
    base_width: int = 16
    width_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 1
    # data
    fps: float = 8.0

    def __post_init__(self) -> None:
        for name in ("latent_channels", "spatial_downsample", "temporal_downsample", "num_res_blocks"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("base_width", self.base_width, minimum=2)  # the Wan decoder halves widths
        for name in ("fsq_levels", "width_mult"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"VideoTokenizerConfig.{name} must be a non-empty list of ints, got {value!r}")
            setattr(self, name, list(value))
        for level in self.fsq_levels:
            # FSQ needs preserve_symmetry for 2 levels; 3+ keeps the quantizer in its standard mode.
            if not isinstance(level, int) or isinstance(level, bool) or level < 3:
                raise ValueError(f"VideoTokenizerConfig.fsq_levels must hold ints >= 3, got {self.fsq_levels!r}")
        if math.prod(self.fsq_levels) >= 2**31:  # FSQ computes indices in int32
            raise ValueError(f"VideoTokenizerConfig.fsq_levels: codebook size {math.prod(self.fsq_levels)} >= 2**31")
        for mult in self.width_mult:
            if not isinstance(mult, int) or isinstance(mult, bool) or mult < 1:
                raise ValueError(f"VideoTokenizerConfig.width_mult must hold positive ints, got {self.width_mult!r}")
        if not _is_power_of_two(self.spatial_downsample) or self.spatial_downsample < 2:
            raise ValueError(
                f"VideoTokenizerConfig.spatial_downsample must be a power of two >= 2, got {self.spatial_downsample}"
            )
        levels = int(math.log2(self.spatial_downsample)) + 1
        if len(self.width_mult) != levels:
            raise ValueError(
                f"VideoTokenizerConfig.width_mult must have log2(spatial_downsample) + 1 = {levels} entries "
                f"(one per resolution), got {len(self.width_mult)}"
            )
        if not _is_power_of_two(self.temporal_downsample) or self.temporal_downsample > self.spatial_downsample:
            raise ValueError(
                "VideoTokenizerConfig.temporal_downsample must be a power of two <= spatial_downsample "
                f"({self.spatial_downsample}), got {self.temporal_downsample}"
            )
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps < math.inf:
            raise ValueError(f"VideoTokenizerConfig.fps must be a positive number, got {self.fps!r}")
        self.fps = float(self.fps)

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes, ``prod(fsq_levels)``."""
        return math.prod(self.fsq_levels)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoTokenizerConfig:
        """Build a config from ``to_dict`` output; unknown keys are an error, missing keys take defaults.

        Raises:
            ValueError: ``data`` has keys that are not fields, or a field is invalid.
        """
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(accepted))
        if unknown:
            raise ValueError(f"unknown VideoTokenizerConfig keys {unknown}; accepted keys: {accepted}")
        return cls(**data)

    @classmethod
    def tiny(cls, **overrides: Any) -> VideoTokenizerConfig:
        """About 50k parameters and a 125-code codebook: for tests on 5-frame 16×16 clips.

        Args:
            **overrides: fields to change, e.g. ``fps=4``.
        """
        tiny = {"fsq_levels": [5, 5, 5], "latent_channels": 4, "base_width": 4, "width_mult": [1, 2, 2, 2]}
        return cls.from_dict({**tiny, **overrides})

    @classmethod
    def default(cls, **overrides: Any) -> VideoTokenizerConfig:
        """The shipped default: about 2.5M parameters, 1000 codes; ``**overrides`` change fields.

        The project must train end to end without a GPU, and Wan's blocks are full 3×3×3 convolutions, so
        the width is kept small: 16-32-64-64 channels, one residual block per level. On 2 CPU threads that
        encodes a 17×128×128 clip in about 1 s and decodes it in about 2.5 s; width 24 already has 5.7M
        parameters and decodes several times slower. ``[8, 5, 5, 5]`` are the FSQ paper's levels for a
        ~1k codebook, which keeps the video range of the joint vocabulary small.
        """
        return cls.from_dict(overrides)


class VideoTokenizer(nn.Module):
    """Causal 3D FSQ autoencoder: ``[B, 3, 1+4k, H, W]`` in ``[-1, 1]`` ↔ ``LongTensor[B, 1+k, H/8, W/8]``.

    Args:
        config: hyper-parameters; ``VideoTokenizerConfig.default()`` when omitted.
    """

    def __init__(self, config: VideoTokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VideoTokenizerConfig.default()
        cfg = self.config
        num_down = len(cfg.width_mult) - 1
        num_temporal = int(math.log2(cfg.temporal_downsample))
        # Temporal steps at the deepest levels, like Wan's [False, True, True]: cheaper, and level 0 sees every frame.
        temporal_flags = [False] * (num_down - num_temporal) + [True] * num_temporal
        self.encoder = WanEncoder3d(
            in_channels=3,
            dim=cfg.base_width,
            z_dim=cfg.latent_channels,
            dim_mult=cfg.width_mult,
            num_res_blocks=cfg.num_res_blocks,
            attn_scales=[],
            temperal_downsample=temporal_flags,
        )
        self.quantizer = FSQ(levels=cfg.fsq_levels, dim=cfg.latent_channels)
        self.decoder = WanDecoder3d(
            dim=cfg.base_width,
            z_dim=cfg.latent_channels,
            dim_mult=cfg.width_mult,
            num_res_blocks=cfg.num_res_blocks,
            attn_scales=[],
            temperal_upsample=temporal_flags[::-1],
            out_channels=3,
        )
        # One feature-cache slot per causal conv is an upper bound on what Wan's chunked forward uses.
        self._encoder_slots = sum(isinstance(m, WanCausalConv3d) for m in self.encoder.modules())
        self._decoder_slots = sum(isinstance(m, WanCausalConv3d) for m in self.decoder.modules())

    # ------------------------------------------------------------------ properties

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes; codes lie in ``[0, codebook_size)``."""
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor: ``h = H / downsample``."""
        return self.config.spatial_downsample

    @property
    def temporal_downsample(self) -> int:
        """Frames per latent frame after the first: ``T = 1 + temporal_downsample * (t - 1)``."""
        return self.config.temporal_downsample

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames ``t`` for a clip of ``num_frames`` frames (must be ``1 + temporal_downsample * k``)."""
        self._check_num_frames(num_frames)
        return 1 + (num_frames - 1) // self.temporal_downsample

    def num_frames(self, num_latent_frames: int) -> int:
        """Frames ``T`` that ``decode`` returns for ``num_latent_frames`` latent frames."""
        if isinstance(num_latent_frames, bool) or not isinstance(num_latent_frames, int) or num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be a positive int, got {num_latent_frames!r}")
        return 1 + self.temporal_downsample * (num_latent_frames - 1)

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tokenize a batch of clips.

        Args:
            x: float ``[B, 3, T, H, W]`` in ``[-1, 1]`` with ``T = 1 + 4k`` and ``H``, ``W`` multiples of 8.

        Returns:
            ``LongTensor[B, t, h, w]`` with ``t = 1 + k``, ``h = H / 8``, ``w = W / 8``.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: wrong rank, channels, frame count, size, or values outside ``[-1, 1]``.
        """
        _, codes = self._encode_latents(self._check_pixels(x, ndim=5))
        return codes

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Tokenize a batch of images as one-frame clips: ``[B, 3, H, W] -> LongTensor[B, h, w]``.

        The result equals ``encode(video)[:, 0]`` for any video whose first frame is ``x``.
        """
        x = self._check_pixels(x, ndim=4)
        return self.encode(x.unsqueeze(2))[:, 0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruct clips from codes.

        Args:
            codes: integer ``[B, t, h, w]`` in ``[0, codebook_size)``.

        Returns:
            float ``[B, 3, T, H, W]`` clamped to ``[-1, 1]``, ``T = 1 + 4(t - 1)``, ``H = 8h``, ``W = 8w``.

        Raises:
            TypeError: ``codes`` is not an integer tensor.
            ValueError: wrong rank or codes out of range.
        """
        codes = self._check_codes(codes, ndim=4)
        latents = self.quantizer.indices_to_codes(codes)  # (B, C, t, h, w)
        return self._decode_latents(latents).clamp(-1.0, 1.0)

    def decode_image(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruct images from ``[B, h, w]`` codes: the ``t = 1`` case of ``decode``, ``-> [B, 3, H, W]``."""
        codes = self._check_codes(codes, ndim=3)
        return self.decode(codes.unsqueeze(1))[:, :, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass with straight-through quantization.

        Args:
            x: float ``[B, 3, T, H, W]`` in ``[-1, 1]``, same constraints as ``encode``.

        Returns:
            ``(recon, codes, aux_loss)``: ``recon`` ``[B, 3, T, H, W]`` not clamped (so a reconstruction loss
            keeps its gradient at the range ends), ``codes`` ``LongTensor[B, t, h, w]``, ``aux_loss`` a zero
            scalar (FSQ has no commitment or codebook loss).
        """
        quantized, codes = self._encode_latents(self._check_pixels(x, ndim=5))
        recon = self._decode_latents(quantized)
        return recon, codes, quantized.new_zeros(())

    def save(self, path: str | Path) -> Path:
        """Write weights and config to one ``.safetensors`` file; returns its path."""
        return save_module(self, self.config.to_dict(), path, kind=KIND)

    @classmethod
    def load(cls, path: str | Path) -> VideoTokenizer:
        """Rebuild a tokenizer written by ``save``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a video-tokenizer file, or its weights do not match its config.
        """
        config, state = load_state(path, kind=KIND)
        model = cls(VideoTokenizerConfig.from_dict(config))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"weights in {path} do not match the VideoTokenizerConfig stored with them: {err}"
            ) from err
        return model

    # ------------------------------------------------------------------ chunked causal passes

    def _encode_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode chunk by chunk (first frame, then groups of ``temporal_downsample``) and quantize each.

        Returns:
            ``(quantized [B, C, t, h, w], codes LongTensor[B, t, h, w])``.
        """
        step = self.temporal_downsample
        cache: list[Any] = [None] * self._encoder_slots
        quantized, codes = [], []
        for start in range(0, x.shape[2], step):
            chunk = x[:, :, :1] if start == 0 else x[:, :, start - step + 1 : start + 1]
            # A fresh feat_idx per chunk: Wan walks the cache slots in the same order on every call.
            latent = self.encoder(chunk, feat_cache=cache, feat_idx=[0])  # (B, C, 1, h, w)
            q, idx = self.quantizer(latent)  # (B, C, 1, h, w), (B, 1, h, w)
            quantized.append(q)
            codes.append(idx)
        return torch.cat(quantized, dim=2), torch.cat(codes, dim=1).long()

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode ``[B, C, t, h, w]`` one latent frame at a time (Wan's causal decode); returns unclamped frames."""
        latents = latents.to(self._dtype)
        cache: list[Any] = [None] * self._decoder_slots
        frames = [
            self.decoder(latents[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
            for i in range(latents.shape[2])
        ]
        return torch.cat(frames, dim=2)  # (B, 3, 1 + step * (t - 1), H, W)

    # ------------------------------------------------------------------ input checks

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_num_frames(self, num_frames: int) -> None:
        step = self.temporal_downsample
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"number of frames must be a positive int, got {num_frames!r}")
        if (num_frames - 1) % step:
            below = 1 + step * ((num_frames - 1) // step)
            raise ValueError(
                f"got T={num_frames} frames; the tokenizer accepts T = 1 + {step}k frames "
                f"(nearest: {below} or {below + step}); use tokenizers_mm.video_io.fit_frame_count to trim or pad"
            )

    def _check_pixels(self, x: torch.Tensor, ndim: int) -> torch.Tensor:
        layout = "[B, 3, T, H, W]" if ndim == 5 else "[B, 3, H, W]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a float tensor {layout} in [-1, 1], got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a float tensor in [-1, 1], got dtype {x.dtype} (convert with x / 127.5 - 1)")
        if x.ndim != ndim:
            hint = " (use encode_image for [B, 3, H, W] images)" if ndim == 5 and x.ndim == 4 else ""
            raise ValueError(f"expected a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 (RGB) channels at dim 1 of {layout}, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch, got shape {tuple(x.shape)}")
        if ndim == 5:
            self._check_num_frames(x.shape[2])
        height, width = x.shape[-2:]
        f = self.downsample
        if height == 0 or width == 0 or height % f or width % f:
            raise ValueError(
                f"height and width must be positive multiples of {f}, got {height}x{width} "
                f"(resize or crop, e.g. with tokenizers_mm.video_io.load_video(size=...))"
            )
        if not torch.isfinite(x).all():
            raise ValueError("input holds NaN or inf values")
        low, high = x.min().item(), x.max().item()
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"pixel values must lie in [-1, 1], got range [{low:.3g}, {high:.3g}]")
        return x.to(device=self._device, dtype=self._dtype)

    def _check_codes(self, codes: torch.Tensor, ndim: int) -> torch.Tensor:
        layout = "[B, t, h, w]" if ndim == 4 else "[B, h, w]"
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"expected an integer tensor {layout} of codes, got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor (e.g. torch.long), got dtype {codes.dtype}")
        if codes.ndim != ndim or codes.numel() == 0:
            hint = " (use decode_image for [B, h, w] codes)" if ndim == 4 and codes.ndim == 3 else ""
            raise ValueError(f"expected non-empty codes of shape {layout}, got shape {tuple(codes.shape)}{hint}")
        low, high = codes.min().item(), codes.max().item()
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range [{low}, {high}]")
        return codes.to(device=self._device, dtype=torch.long)


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"VideoTokenizerConfig.{name} must be an int >= {minimum}, got {value!r}")


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
