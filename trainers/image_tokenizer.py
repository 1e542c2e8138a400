"""Training the image VQ tokenizer: ``ImageTokenizerModule`` (and ``VQModuleBase``, shared with video).

The objective is VQGAN's (Esser et al. 2021), with each term switchable from the config::

    loss = mean_w(l1_weight * |x - x̂| + l2_weight * (x - x̂)^2 + chroma_weight * (c(x) - c(x̂))^2
                  + edge_weight * (|∂x - ∂x̂|))
         + quantizer_weight * aux + lpips_weight * LPIPS(x, x̂)
         + gan_weight * λ_adaptive * hinge_g(D(x̂))     (after gan_start_step)

Notable:

- ``mean_w`` weighs each pixel by ``1 + foreground_weight * |x - median(x)|`` (the RGB distance to the
  image's median colour, normalised so the weights average 1). On a flat background the median is the
  background, so the few pixels of a small shape count as much as the rest; without it, a run sits for
  hundreds of steps on the plateau of decoding the background alone (measured: 0 of 16 training scenes
  read back after 300 steps, 2-3 of 16 with the weight). On a natural photo the weights are nearly flat.
- ``c(x) = x - mean_rgb(x)`` is a pixel's deviation from grey, its chroma. Flat-colour scenes on a dark
  background (the shapes data) are mostly background; a short run with the plain pixel losses decodes
  grey blobs of the right brightness, which no detector reads as a colour. ``chroma_weight`` makes the
  hue of the few foreground pixels count (0, the default, is plain VQGAN).
- ``∂`` is the difference between neighbouring pixels along each spatial axis (``edge_weight``). The pixel
  losses are content with a soft edge: a 16 px square and a circle blurred at the corners differ in a few
  pixels, and a shape detector that reads fill ratios cannot tell them apart. The gradient-difference loss
  (Mathieu et al. 2016) penalises the soft edge itself. Measured on the shapes data it raised SSIM
  (0.83 -> 0.87) but not the detector's shape reading (docs/default_model.md).
- ``init_from`` starts the tokenizer from an exported ``.safetensors`` one: the quantizer's levels may differ
  (FSQ has no parameters of its own), and the latent may gain channels (FSQ ``[8, 5, 5, 5]`` ->
  ``[4, 4, 4, 4, 4, 4]``): the tensors around it grow, the old channels keep their weights and the new ones
  their fresh initialisation. Everything else must match.
- ``trainable: decoder`` (image module) trains ``post_quant_conv`` and the decoder only: the encoder and the
  quantizer are frozen and run without gradients, so every image keeps exactly its codes. A tokenizer tuned
  this way decodes the token shards, and whatever a unified model trained on them generates, better, with
  nothing downstream to retrain. (The default tokenizer's codes carry an object's shape, a small MLP reads
  it back from the 3x3 codes around an object 83 % of the time, while its decoder draws every shape as
  the same rounded blob: the decoder is what to sharpen; 1300 steps with the edge term and a PatchGAN did
  not yet, docs/default_model.md.)
- Without a GAN (``gan_weight: 0``) training uses Lightning's automatic optimization: gradient
  clipping (``--trainer.gradient_clip_val``), accumulation and every strategy work as usual.
- With a GAN the module switches to manual optimization with two optimizers (autoencoder, then
  PatchGAN discriminator). ``global_step`` counts autoencoder steps only, so ``max_steps``,
  ``gan_start_step`` and checkpoint intervals mean the same with and without a GAN. Under DDP use
  ``--trainer.strategy ddp_find_unused_parameters_true`` (the discriminator idles before
  ``gan_start_step`` and the autoencoder idles in the discriminator step); clip with ``grad_clip``.
- LPIPS is used only from a local weights file (``lpips_path``); without one, ``lpips_weight > 0``
  fails at construction with a message saying what to provide. Its frozen VGG weights are left out
  of the Lightning checkpoints.
- Logged: ``train/loss``, ``train/l1``, ``train/mse``, ``train/psnr`` (dB, images in ``[-1, 1]``),
  ``train/quantizer``, ``train/codebook_usage`` (fraction of codes in the batch), and with a GAN
  ``train/g_loss``, ``train/d_loss``, ``train/d_weight``; ``val/mse``, ``val/psnr`` and
  ``val/codebook_usage`` (codes seen over the whole validation set).
- ``ModelCheckpoint`` files carry ``anygen_module`` and ``tokenizer_config`` as plain values, so
  ``anygen export`` reads them with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric

from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.io import load_state
from trainers.losses import LPIPS, PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from trainers.schedule import lr_factor

_LPIPS_PREFIX = "lpips."


class CodebookUsage(Metric):
    """Fraction of the codebook used by every code seen since the last reset (summed over DDP ranks)."""

    full_state_update = False

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().long(), minlength=self.codebook_size)

    def compute(self) -> Tensor:
        return (self.counts > 0).float().mean()


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB of images in ``[-1, 1]`` (peak-to-peak range 2) from their mean squared error."""
    return 10.0 * torch.log10(4.0 / mse.clamp(min=1e-10))


def codebook_usage(codes: Tensor, codebook_size: int) -> Tensor:
    """Fraction of the ``codebook_size`` codes that occur in ``codes``."""
    return torch.tensor(torch.unique(codes).numel() / codebook_size)


def pixels_of(batch: Any) -> Tensor:
    """The pixel tensor of a batch: ``batch["pixels"]``, a bare tensor, or the first item of a tuple."""
    if isinstance(batch, dict):
        if "pixels" not in batch:
            raise ValueError(f"tokenizer batches need a 'pixels' entry, got keys {sorted(batch)}")
        return batch["pixels"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise TypeError(f"a tokenizer batch is a dict with 'pixels', a tensor or a tuple; got {type(batch).__name__}")


class VQModuleBase(LightningModule):
    """Losses, optimizers and logging shared by the image and video tokenizer modules.

    Subclasses set ``self.tokenizer`` (an ``ImageTokenizer`` or ``VideoTokenizer``: ``forward(x) ->
    (recon, codes, aux_loss)``, ``decoder.conv_out``, ``codebook_size``), then call ``_build_losses``,
    and may override ``_prepare`` (turn a batch into the tokenizer's input) and ``_log_kind``.
    """

    module_kind = "tokenizer"
    tokenizer: nn.Module

    def _build_losses(self, *, lr: float, betas: tuple[float, float], weight_decay: float, l1_weight: float,
                      l2_weight: float, quantizer_weight: float, gan_weight: float, gan_start_step: int,
                      chroma_weight: float, foreground_weight: float,
                      disc_channels: int, disc_layers: int, disc_lr: float | None, max_adaptive_weight: float,
                      lpips_weight: float, lpips_path: str | None, grad_clip: float | None,
                      warmup_steps: int = 0, min_lr_ratio: float = 1.0, edge_weight: float = 0.0,
                      init_from: str | None = None) -> None:
        for name, value in (("lr", lr), ("l1_weight", l1_weight), ("l2_weight", l2_weight),
                            ("edge_weight", edge_weight),
                            ("chroma_weight", chroma_weight), ("foreground_weight", foreground_weight),
                            ("quantizer_weight", quantizer_weight), ("gan_weight", gan_weight),
                            ("lpips_weight", lpips_weight), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{name} must be a finite number >= 0, got {value!r}")
        if l1_weight == l2_weight == lpips_weight == 0:
            raise ValueError(f"{type(self).__name__}: l1_weight, l2_weight and lpips_weight are all 0; "
                             "nothing would train the reconstruction")
        if not isinstance(warmup_steps, int) or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"{type(self).__name__}: warmup_steps must be an int >= 0 and min_lr_ratio in [0, 1], "
                             f"got {warmup_steps!r}, {min_lr_ratio!r}")
        if gan_start_step < 0:
            raise ValueError(f"{type(self).__name__}.gan_start_step must be >= 0, got {gan_start_step}")
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, float(min_lr_ratio)
        self.l1_weight, self.l2_weight, self.quantizer_weight = l1_weight, l2_weight, quantizer_weight
        self.chroma_weight, self.foreground_weight, self.edge_weight = chroma_weight, foreground_weight, edge_weight
        self.gan_weight, self.gan_start_step = gan_weight, gan_start_step
        self.disc_lr = float(disc_lr) if disc_lr is not None else self.lr
        self.max_adaptive_weight = max_adaptive_weight
        self.lpips_weight = lpips_weight
        self.grad_clip = grad_clip
        self.discriminator = PatchDiscriminator(disc_channels, disc_layers) if gan_weight > 0 else None
        self.lpips = LPIPS.from_file(lpips_path) if lpips_weight > 0 else None
        self.automatic_optimization = self.discriminator is None
        self.val_usage = CodebookUsage(self.tokenizer.codebook_size)
        if init_from is not None:
            self._warm_start(init_from)

    def _warm_start(self, path: str) -> None:
        kind = type(self.tokenizer).__name__
        config, state = load_state(path, kind=self.module_kind)  # FileNotFoundError / ValueError name the file
        expected = self.tokenizer.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        widened = [k for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
        grow = (len(config.get("fsq_levels", [])), len(self.tokenizer.config.fsq_levels))  # FSQ channels, old -> new

        def fits(old: torch.Size, new: torch.Size) -> bool:  # only the FSQ channel dimensions may grow
            same_rank = len(old) == len(new) and grow[0] < grow[1]
            return same_rank and all(a == b or (a, b) == grow for a, b in zip(old, new))

        bad = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in widened
               if not fits(state[k].shape, expected[k].shape)]
        if missing or unexpected or bad:
            raise ValueError(f"init_from {path} does not fit this {kind} (the quantizer's levels may differ and the "
                             f"latent may gain channels): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"shapes {bad[:5]}")
        for key in widened:  # more latent channels: the old ones keep their weights, the new ones their fresh init
            grown = expected[key].clone()
            grown[tuple(slice(0, n) for n in state[key].shape)] = state[key]
            state[key] = grown
        self.tokenizer.load_state_dict(state)
        if widened:
            rank_zero_info(f"init_from {path}: widened {len(widened)} tensors to the new latent ({widened[:4]} ...)")

    # -- hooks subclasses may override ---------------------------------------------------------------
    def _prepare(self, pixels: Tensor) -> Tensor:
        return pixels

    def _reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(recon, codes, aux_loss)`` of a training step; the image module may keep its encoder out of it."""
        return self.tokenizer(x)

    def _log_kind(self, x: Tensor) -> str | None:
        """An extra suffix for per-kind metrics (the video module logs images and clips apart)."""
        return None

    # -- losses ----------------------------------------------------------------------------------------
    def reconstruction_losses(self, x: Tensor) -> dict[str, Tensor]:
        """Run the tokenizer on ``x`` and return every loss term (no GAN term), plus ``recon`` and ``codes``."""
        recon, codes, aux = self._reconstruct(x)
        err = recon.float() - x.float()
        l1, mse = err.abs().mean(), err.square().mean()  # logged unweighted: PSNR stays PSNR
        per_pixel = self.l1_weight * err.abs() + self.l2_weight * err.square()
        out = {"l1": l1, "mse": mse, "quantizer": aux.float()}
        if self.chroma_weight:
            chroma = (err - err.mean(dim=1, keepdim=True)).square()  # c(x̂) - c(x) = err - mean_rgb(err)
            out["chroma"] = chroma.mean()
            per_pixel = per_pixel + self.chroma_weight * chroma
        if self.edge_weight:
            edge = torch.zeros_like(err)
            for axis in range(2, err.ndim)[-2:]:  # height and width (a clip's time axis is left alone)
                diff = err.diff(dim=axis).abs()  # |∂x̂ - ∂x| = |∂(x̂ - x)|
                edge = edge + F.pad(diff, [0, 0] * (err.ndim - 1 - axis) + [0, 1])
            out["edge"] = edge.mean()
            per_pixel = per_pixel + self.edge_weight * edge
        if self.foreground_weight:
            flat = x.float().flatten(2)  # (B, 3, N) or (B, 3, T·H·W)
            median = flat.median(dim=2).values.view(*x.shape[:2], *([1] * (x.ndim - 2)))
            w = 1 + self.foreground_weight * (x.float() - median).norm(dim=1, keepdim=True)
            rec = (w * per_pixel).mean() / w.mean()
        else:
            rec = per_pixel.mean()
        if self.lpips is not None:
            out["lpips"] = self.lpips(recon.float(), x.float())
            rec = rec + self.lpips_weight * out["lpips"]
        out["rec"] = rec
        out["loss"] = rec + self.quantizer_weight * out["quantizer"]
        out["recon"], out["codes"] = recon, codes
        return out

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.gan_start_step

    def _log_train(self, x: Tensor, terms: dict[str, Tensor]) -> None:
        names = ("loss", "l1", "mse", "chroma", "edge", "quantizer", "lpips", "g_loss", "d_loss", "d_weight")
        metrics = {f"train/{k}": terms[k].detach() for k in names if k in terms}
        metrics["train/codebook_usage"] = codebook_usage(terms["codes"], self.tokenizer.codebook_size)
        kind = self._log_kind(x)
        if kind is not None:
            metrics[f"train/mse_{kind}"] = terms["mse"].detach()
        self.log_dict(metrics, batch_size=x.shape[0])
        self.log("train/psnr", psnr(terms["mse"].detach()), prog_bar=True, batch_size=x.shape[0])

    # -- steps -----------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x = self._prepare(pixels_of(batch))
        if self.automatic_optimization:
            terms = self.reconstruction_losses(x)
            self._log_train(x, terms)
            return terms["loss"]
        return self._gan_step(x)

    def _gan_step(self, x: Tensor) -> None:
        opt_g, opt_d = self.optimizers()
        assert self.discriminator is not None
        gan_on = self._gan_active()

        # autoencoder step; the discriminator's parameters are frozen while it judges the reconstruction
        self.toggle_optimizer(opt_g)
        terms = self.reconstruction_losses(x)
        loss = terms["loss"]
        if gan_on:
            g_loss = hinge_g_loss(self.discriminator(terms["recon"]))
            d_weight = self.gan_weight * adaptive_weight(terms["rec"], g_loss, self.tokenizer.decoder.conv_out.weight,
                                                         self.max_adaptive_weight)
            loss = loss + d_weight * g_loss
            terms.update(g_loss=g_loss, d_weight=d_weight)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        self.lr_schedulers().step()  # manual optimization: Lightning leaves the schedule to us
        self.untoggle_optimizer(opt_g)

        if gan_on:  # discriminator step on the detached reconstruction
            self.toggle_optimizer(opt_d)
            d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(terms["recon"].detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if self.grad_clip:
                self.clip_gradients(opt_d, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
            # Lightning counts every optimizer.step() in global_step (manual optimization); only the
            # autoencoder's step is a training step, so this one skips the counter and max_steps,
            # gan_start_step and checkpoint intervals mean the same with and without a GAN.
            opt_d._on_before_step = lambda: self.trainer.profiler.start("optimizer_step")
            opt_d._on_after_step = lambda: self.trainer.profiler.stop("optimizer_step")
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            terms["d_loss"] = d_loss
        self._log_train(x, terms)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> None:
        x = self._prepare(pixels_of(batch))
        recon, codes, _ = self.tokenizer(x)
        mse = F.mse_loss(recon.float().clamp(-1, 1), x.float())
        self.val_usage.update(codes)
        n = x.shape[0]
        self.log_dict({f"{stage}/mse": mse, f"{stage}/psnr": psnr(mse)}, batch_size=n, sync_dist=True,
                      prog_bar=stage == "val")
        self.log(f"{stage}/codebook_usage", self.val_usage, batch_size=n)

    # -- optimizers ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.tokenizer.parameters() if p.requires_grad]
        opt_g = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        # the autoencoder's schedule follows the trainer's global step, not the scheduler's own counter: a run
        # resumed from a checkpoint saved without a scheduler (or with other max_steps) lands where it should
        schedule = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda _: self.lr_factor())
        if self.discriminator is None:
            return {"optimizer": opt_g, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=self.disc_lr, betas=self.betas,
                                  weight_decay=self.weight_decay)
        return [opt_g, opt_d], [schedule]

    def on_train_start(self) -> None:
        # after a resume the optimizer holds the rate it was saved with, which another max_steps (or no
        # schedule at all) set: start from the rate of this step under this run's schedule
        schedule = self.lr_schedulers()
        for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base * self.lr_factor()  # set, not step(): no step-before-optimizer warning

    def lr_factor(self) -> float:
        """The autoencoder's learning-rate multiplier at the current step (warm-up, then cosine to ``min_lr_ratio``)."""
        total = self._trainer.max_steps if self._trainer is not None and self._trainer.max_steps > 0 else None
        return lr_factor(self.global_step, self.warmup_steps, total, self.min_lr_ratio)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        value = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        self.clip_gradients(optimizer, gradient_clip_val=value or None, gradient_clip_algorithm=gradient_clip_algorithm)

    # -- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain values only: anygen export reads checkpoints with torch.load(weights_only=True)
        checkpoint["anygen_module"] = self.module_kind
        checkpoint["tokenizer_config"] = self.tokenizer.config.to_dict()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(_LPIPS_PREFIX)]:  # frozen, loaded from lpips_path
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lpips is not None and "state_dict" in checkpoint:
            checkpoint["state_dict"].update({_LPIPS_PREFIX + k: v for k, v in self.lpips.state_dict().items()})


class ImageTokenizerModule(VQModuleBase):
    """Lightning module that trains an ``ImageTokenizer`` on batches ``{"pixels": (B, 3, H, W) in [-1, 1]}``.

    Args:
        tokenizer: ``ImageTokenizerConfig`` fields; None is the shipped default preset. A ``preset``
            key (``"tiny"`` or ``"default"``) starts from that preset and the other keys override it.
        lr: AdamW learning rate of the autoencoder (the peak, when a schedule is set).
        warmup_steps: linear warm-up steps of the autoencoder's learning rate.
        min_lr_ratio: cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``; 1.0 (the default) keeps
            the learning rate constant after the warm-up.
        betas: AdamW betas (VQGAN's ``(0.5, 0.9)``), used by both optimizers.
        weight_decay: AdamW weight decay.
        l1_weight: weight of the mean absolute error.
        l2_weight: weight of the mean squared error.
        chroma_weight: weight of the mean squared error of the chroma (each pixel minus its RGB mean); 0 disables.
        foreground_weight: per-pixel loss weight ``1 + foreground_weight * |x - median(x)|``; 0 weighs all alike.
        edge_weight: weight of the L1 error of the horizontal and vertical pixel differences; 0 disables.
        quantizer_weight: weight of the quantizer's auxiliary loss (VQ commitment; 0 for FSQ anyway).
        gan_weight: weight of the adversarial term (times the adaptive weight); 0 disables the GAN.
        gan_start_step: training step from which the discriminator and adversarial term are on.
        disc_channels: width of the PatchGAN's first layer.
        disc_layers: strided PatchGAN layers (inputs must be at least ``2 ** (disc_layers + 2)`` pixels).
        disc_lr: discriminator learning rate; None uses ``lr``.
        max_adaptive_weight: clamp of VQGAN's adaptive weight.
        lpips_weight: weight of the LPIPS perceptual loss; 0 disables it.
        lpips_path: local LPIPS safetensors file (see ``trainers.losses.LPIPS``); needed when ``lpips_weight > 0``.
        grad_clip: gradient-norm clip for the GAN's manual optimization (and the fallback when
            ``trainer.gradient_clip_val`` is unset); None disables.
        init_from: an exported ``image_tokenizer.safetensors`` to start from (the FSQ levels may differ and the
            latent may gain channels); None starts from a fresh initialisation.
        trainable: ``"all"``, or ``"decoder"``: only ``post_quant_conv`` and the decoder train, the codes of every
            image stay what they were (tune an exported tokenizer's decoder without retokenizing anything).
    """

    module_kind = "image_tokenizer"

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
        trainable: str = "all",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if trainable not in ("all", "decoder"):
            raise ValueError(f"ImageTokenizerModule.trainable must be 'all' or 'decoder', got {trainable!r}")
        self.trainable = trainable
        self.tokenizer = ImageTokenizer(image_tokenizer_config(tokenizer))
        self._build_losses(lr=lr, betas=betas, weight_decay=weight_decay, l1_weight=l1_weight, l2_weight=l2_weight,
                           chroma_weight=chroma_weight, foreground_weight=foreground_weight,
                           quantizer_weight=quantizer_weight, gan_weight=gan_weight,
                           gan_start_step=gan_start_step,
                           disc_channels=disc_channels, disc_layers=disc_layers, disc_lr=disc_lr,
                           max_adaptive_weight=max_adaptive_weight, lpips_weight=lpips_weight,
                           lpips_path=lpips_path, grad_clip=grad_clip, warmup_steps=warmup_steps,
                           min_lr_ratio=min_lr_ratio, edge_weight=edge_weight, init_from=init_from)
        if trainable == "decoder":
            for part in (self.tokenizer.encoder, self.tokenizer.quant_conv, self.tokenizer.quantizer):
                part.requires_grad_(False)

    def _reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.trainable == "all":
            return self.tokenizer(x)
        with torch.no_grad():  # the frozen half: no graph, and a VQ codebook is not moved
            quant, codes, aux = self.tokenizer._quantize(self.tokenizer._check_images(x), update_codebook=False)
        return self.tokenizer._decode_latent(quant), codes, aux

    def _prepare(self, pixels: Tensor) -> Tensor:
        if pixels.ndim == 5 and pixels.shape[2] == 1:  # a one-frame clip is an image
            pixels = pixels[:, :, 0]
        return pixels


def image_tokenizer_config(fields: dict[str, Any] | None) -> ImageTokenizerConfig:
    """``ImageTokenizerConfig`` from config fields; ``{"preset": "tiny", ...}`` starts from a preset."""
    fields = dict(fields or {})
    preset = fields.pop("preset", "default")
    presets = {"tiny": ImageTokenizerConfig.tiny, "default": ImageTokenizerConfig.default}
    if preset not in presets:
        raise ValueError(f"unknown ImageTokenizerConfig preset {preset!r}; accepted: {sorted(presets)}")
    unknown = sorted(set(fields) - set(ImageTokenizerConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown ImageTokenizerConfig fields {unknown}; accepted: "
                         f"{sorted(ImageTokenizerConfig.__dataclass_fields__)} and 'preset'")
    return presets[preset](**fields)
