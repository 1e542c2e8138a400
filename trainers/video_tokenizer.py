"""Training the causal 3D video tokenizer: ``VideoTokenizerModule``.

Images and clips train one model: a batch ``{"pixels": (B, 3, T, H, W)}`` with ``T = 1`` is a batch of
images (the tokenizer encodes the first frame alone, so an image is exactly a one-frame clip), any
``T = 1 + 4k`` is a batch of clips; ``(B, 3, H, W)`` batches are taken as images too. The data module
decides the mix (``VideoDataModule(image_fraction=...)``); this module logs ``train/mse_image`` and
``train/mse_video`` apart so the two can be watched separately.

Losses, GAN (a 2D PatchGAN applied frame by frame), LPIPS (per frame), optimizers and checkpoint
contents are those of ``trainers.image_tokenizer.VQModuleBase``; see that module.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig
from trainers.image_tokenizer import VQModuleBase


class VideoTokenizerModule(VQModuleBase):
    """Lightning module that trains a ``VideoTokenizer`` jointly on images (T=1) and clips (T=1+4k).

    Args:
        tokenizer: ``VideoTokenizerConfig`` fields; None is the shipped default. A ``preset`` key
            (``"tiny"`` or ``"default"``) starts from that preset and the other keys override it.
        Other arguments: as ``trainers.image_tokenizer.ImageTokenizerModule``.
    """

    module_kind = "video_tokenizer"

    def __init__(
        self,
        tokenizer: dict[str, Any] | None = None,
        lr: float = 2e-4,
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        chroma_weight: float = 0.0,
        foreground_weight: float = 0.0,
        edge_weight: float = 0.0,
        quantizer_weight: float = 1.0,
        gan_weight: float = 0.0,
        gan_start_step: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_lr: float | None = None,
        max_adaptive_weight: float = 1e4,
        lpips_weight: float = 0.0,
        lpips_path: str | None = None,
        grad_clip: float | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = VideoTokenizer(video_tokenizer_config(tokenizer))
        self._build_losses(lr=lr, betas=betas, weight_decay=weight_decay, l1_weight=l1_weight, l2_weight=l2_weight,
                           chroma_weight=chroma_weight, foreground_weight=foreground_weight,
                           quantizer_weight=quantizer_weight, gan_weight=gan_weight,
                           gan_start_step=gan_start_step,
                           disc_channels=disc_channels, disc_layers=disc_layers, disc_lr=disc_lr,
                           max_adaptive_weight=max_adaptive_weight, lpips_weight=lpips_weight,
                           lpips_path=lpips_path, grad_clip=grad_clip, warmup_steps=warmup_steps,
                           min_lr_ratio=min_lr_ratio, edge_weight=edge_weight, init_from=init_from)

    def _prepare(self, pixels: Tensor) -> Tensor:
        if pixels.ndim == 4:  # (B, 3, H, W) images are one-frame clips
            pixels = pixels.unsqueeze(2)
        if pixels.ndim != 5:
            raise ValueError(f"video tokenizer batches are (B, 3, T, H, W) or (B, 3, H, W), got {tuple(pixels.shape)}")
        return pixels

    def _log_kind(self, x: Tensor) -> str:
        return "image" if x.shape[2] == 1 else "video"


def video_tokenizer_config(fields: dict[str, Any] | None) -> VideoTokenizerConfig:
    """``VideoTokenizerConfig`` from config fields; ``{"preset": "tiny", ...}`` starts from a preset."""
    fields = dict(fields or {})
    preset = fields.pop("preset", "default")
    presets = {"tiny": VideoTokenizerConfig.tiny, "default": VideoTokenizerConfig.default}
    if preset not in presets:
        raise ValueError(f"unknown VideoTokenizerConfig preset {preset!r}; accepted: {sorted(presets)}")
    return VideoTokenizerConfig.from_dict({**presets[preset]().to_dict(), **fields})
