"""Losses for training the VQ tokenizers: PatchGAN discriminator, hinge loss, VQGAN adaptive weight, LPIPS.

What this module owns:

- ``PatchDiscriminator``: the N-layer PatchGAN of pix2pix, in the layout taming-transformers' VQGAN
  uses (4x4 convolutions, LeakyReLU 0.2, BatchNorm, DCGAN init). It scores overlapping patches, so
  it sees texture and edges, which a pixel loss blurs. Video is scored frame by frame.
- ``hinge_d_loss`` / ``hinge_g_loss``: the hinge GAN objective (Lim & Ye 2017), as in VQGAN.
- ``adaptive_weight``: VQGAN's balance between the reconstruction and adversarial terms, the ratio of
  their gradient norms at the decoder's last layer (Esser et al. 2021, eq. 7).
- ``LPIPS``: the VGG16 perceptual distance of Zhang et al. 2018, built from torchvision's VGG16
  architecture with ``weights=None`` and filled from a *local* safetensors file. Nothing is ever
  downloaded: when the file is missing, ``LPIPS.from_file`` raises a ``ValueError`` saying so.
  ``convert_lpips_weights`` turns the two files people usually have (torchvision's ``vgg16-*.pth``
  and the ``lpips`` package's ``vgg.pth``) into that file, reading them with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

# -- PatchGAN --------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN: ``(B, 3, H, W)`` images or ``(B, 3, T, H, W)`` clips -> patch logits.

    Args:
        channels: width of the first convolution (taming's ``ndf``); later layers double it, capped at 8x.
        n_layers: strided convolutions; each halves the resolution. The input must be at least
            ``2 ** (n_layers + 2)`` pixels on a side (16 for ``n_layers=2``, 32 for 3).
        in_channels: image channels.
    """

    def __init__(self, channels: int = 64, n_layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator.n_layers must be >= 1, got {n_layers}")
        if channels < 1:
            raise ValueError(f"PatchDiscriminator.channels must be >= 1, got {channels}")
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution (pix2pix)
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    @property
    def min_size(self) -> int:
        """Smallest input side that still leaves one patch logit."""
        return 2 ** (self.n_layers + 2)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits ``(B', 1, h, w)``; a clip is scored per frame (``B' = B * T``)."""
        if x.ndim == 5:  # (B, C, T, H, W) -> (B*T, C, H, W)
            x = x.transpose(1, 2).flatten(0, 1)
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"PatchDiscriminator with n_layers={self.n_layers} needs inputs of at least "
                             f"{self.min_size}x{self.min_size} pixels, got {tuple(x.shape[-2:])}; lower disc_layers")
        return self.net(x)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: ``mean(relu(1 - real)) / 2 + mean(relu(1 + fake)) / 2``."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge objective: ``-mean(fake)``."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive GAN weight: ``|grad rec_loss| / (|grad g_loss| + 1e-4)`` at ``last_layer``, detached.

    Both gradients are taken with ``torch.autograd.grad`` (nothing is accumulated into ``.grad``), so
    the weight can be computed inside a training step before the real backward pass.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# -- LPIPS -------------------------------------------------------------------------------------------

_VGG_SLICES = (4, 9, 16, 23, 30)  # ends of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
_VGG_WIDTHS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """Learned perceptual distance (LPIPS v0.1, VGG16) between images in ``[-1, 1]``; frozen, eval mode.

    Build it with ``LPIPS.from_file(path)``; a bare ``LPIPS()`` has random weights (tests only).
    State dict keys: ``features.*`` (torchvision ``vgg16().features``) and ``lins.{0..4}.weight``.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # torchvision's vgg16(weights=None).features, built without the 100M-parameter classifier
        self.features = make_layers(cfgs["D"])[: _VGG_SLICES[-1]]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _VGG_WIDTHS)
        # the ImageNet statistics of LPIPS' ScalingLayer, for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: a loss network, never trained here

    @classmethod
    def from_file(cls, path: str | Path | None) -> LPIPS:
        """Load the weights from a local ``.safetensors`` file (see ``convert_lpips_weights``).

        Raises:
            ValueError: no file at ``path`` (nothing is downloaded), or the file does not hold LPIPS weights.
        """
        if path is None or not Path(path).is_file():
            raise ValueError(
                f"LPIPS weights not found at {path}: lpips_weight > 0 needs a local safetensors file with "
                "torchvision VGG16 `features.*` and LPIPS `lins.{0..4}.weight` (nothing is downloaded). Make one "
                "with trainers.losses.convert_lpips_weights(vgg16_pth, lpips_vgg_pth, out), or set lpips_weight: 0"
            )
        model = cls()
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not hold LPIPS (VGG16) weights: {err}") from err
        return model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean LPIPS distance between ``x`` and ``y`` ``(B, 3, H, W)`` (clips ``(B, 3, T, H, W)`` per frame)."""
        if x.ndim == 5:
            x, y = x.transpose(1, 2).flatten(0, 1), y.transpose(1, 2).flatten(0, 1)
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = h.new_zeros(())
        start = 0
        for end, lin in zip(_VGG_SLICES, self.lins):
            h = self.features[start:end](h)
            start = end
            fx, fy = _unit_normalize(h).chunk(2)
            total = total + lin((fx - fy).square()).mean()
        return total


def _unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


def convert_lpips_weights(vgg16_path: str | Path, lpips_path: str | Path, out: str | Path) -> Path:
    """Write the safetensors file ``LPIPS.from_file`` reads, from two local PyTorch state-dict files.

    Args:
        vgg16_path: torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``).
        lpips_path: the ``lpips`` package's linear layers (``lpips/weights/v0.1/vgg.pth``).
        out: the ``.safetensors`` file to write.

    Both are read with ``torch.load(..., weights_only=True)``: plain tensors only, nothing unpickled.
    """
    vgg = torch.load(vgg16_path, map_location="cpu", weights_only=True)
    lins = torch.load(lpips_path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) < _VGG_SLICES[-1]}
    for i in range(len(_VGG_WIDTHS)):
        state[f"lins.{i}.weight"] = lins[f"lin{i}.model.1.weight"]
    LPIPS().load_state_dict(state, strict=True)  # fail here, not at training time
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
