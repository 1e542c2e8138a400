"""The decoupled understanding encoder (Janus): SigLIP vision tower + MLP aligner into the decoder's width.

What this module owns: turning understood images ``[N, 3, S, S]`` in ``[-1, 1]`` into the
``[N, und_tokens, d_model]`` features that ``AnyGenModel`` writes over the ``<|und|>`` positions.

Notable:

- The tower is ``transformers.SiglipVisionModel``: random init from ``SiglipVisionConfig(**und_encoder)``
  for tests and training from scratch, or ``from_pretrained(und_encoder_path)`` from a local directory
  (never a download). SigLIP normalises with mean 0.5 / std 0.5, so pixels in ``[-1, 1]`` are
  already its input space and no processor is needed.
- Frozen unless ``und_trainable``: no gradients, and it stays in eval mode even under ``model.train()``
  (Janus keeps the SigLIP tower fixed and trains the aligner).
- The aligner is Janus's ``mlp_gelu`` of depth 2: Linear(h, d) -> GELU -> Linear(d, d); it always trains.
- Generation never goes through this encoder: generated images are VQ tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from anygen.config import AnyGenConfig


class UnderstandingEncoder(nn.Module):
    """SigLIP tower + 2-layer GELU aligner: ``forward(pixels [N,3,S,S]) -> [N, und_tokens, d_model]``."""

    def __init__(self, config: AnyGenConfig) -> None:
        super().__init__()
        kwargs = config.und_encoder_kwargs()  # raises if the config has no encoder
        accepted = set(SiglipVisionConfig().to_dict())
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(f"AnyGenConfig.und_encoder has unknown SiglipVisionConfig keys {unknown}; "
                             f"accepted: {sorted(accepted)}")
        if config.und_encoder_path is None:
            self.tower = SiglipVisionModel(SiglipVisionConfig(**kwargs))
        else:
            path = Path(config.und_encoder_path)
            if not path.is_dir():
                raise FileNotFoundError(f"AnyGenConfig.und_encoder_path {str(path)!r} is not a directory; expected a "
                                        "local SiglipVisionModel checkpoint (config.json + model.safetensors)")
            self.tower = SiglipVisionModel.from_pretrained(path, local_files_only=True)
            loaded = self.tower.config
            for key in ("image_size", "patch_size"):
                if getattr(loaded, key) != kwargs.get(key, getattr(loaded, key)):
                    raise ValueError(f"the SigLIP checkpoint at {path} has {key}={getattr(loaded, key)} but "
                                     f"AnyGenConfig.und_encoder / und_image_size say {kwargs[key]}")
        vision = self.tower.config
        self.image_size: int = vision.image_size
        self.num_tokens: int = (vision.image_size // vision.patch_size) ** 2
        self.aligner = nn.Sequential(
            nn.Linear(vision.hidden_size, config.d_model),
            nn.GELU(),
            nn.Linear(config.d_model, config.d_model),
        )
        self.trainable = config.und_trainable
        if not self.trainable:
            self.tower.requires_grad_(False)
            self.tower.eval()

    def train(self, mode: bool = True) -> UnderstandingEncoder:
        super().train(mode)
        if not self.trainable:
            self.tower.eval()  # a frozen tower keeps eval behaviour (dropout off) under model.train()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode understood images.

        Args:
            pixels: ``(N, 3, S, S)`` floats in ``[-1, 1]``, ``S = und_image_size``.

        Returns:
            ``(N, und_tokens, d_model)`` features in the aligner's dtype, patches in row-major order.
        """
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s or pixels.shape[3] != s:
            raise ValueError(f"und_pixels must have shape (N, 3, {s}, {s}), got {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise TypeError(f"und_pixels must be floats in [-1, 1], got dtype {pixels.dtype}")
        tower_dtype = next(self.tower.parameters()).dtype
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            feats = self.tower(pixel_values=pixels.to(tower_dtype)).last_hidden_state  # (N, P, h)
        aligner_dtype = self.aligner[0].weight.dtype
        return self.aligner(feats.to(aligner_dtype))  # (N, P, d_model)
