"""Lightning callbacks: ``SampleLogger`` shows what a model makes while it trains; ``HeldoutEval`` scores it;
``LastStepCheckpoint`` keeps the step training ended on.

- For ``UnifiedModule``: every ``every_n_steps`` steps it builds an ``anygen.api.AnyGen`` over the
  module's own model and tokenizer and generates, from a few fixed prompts, one image each (text to
  image), a text continuation each, and one video when ``video_size`` is set. Seeded, so successive
  samples differ only because the weights did.
- For the tokenizer modules: it keeps the first ``num_reconstructions`` images / clips of the first
  training batch of each shape it meets (the video module trains on images and clips: it keeps one
  of each) and shows them next to their reconstructions (video: one row of frames per clip), and
  logs their PSNR and the fraction of the codebook they use as ``samples/psnr`` and
  ``samples/codebook_usage`` (suffixed ``_t1`` / ``_t5``… per frame count for the video module).

Where it goes: PNG (and ``samples.txt``) files under ``<log_dir>/samples/step_NNNNNNN/`` always, and the
logger too when it takes images (TensorBoard's ``add_image``, or any logger with ``log_image`` such
as W&B). CSV logs cannot hold images, so there the files are the record.

``HeldoutEval`` (``UnifiedModule`` only) runs categories of ``anygen eval`` (held-out attribute combinations,
rule-judged) at the end of every validation and logs ``heldout/<category>`` and their mean ``heldout/score``,
so a ``ModelCheckpoint`` can keep the step that generalises best, not the one with the lowest validation CE:
on the shapes data the two disagree (a run whose val CE fell 0.62 -> 0.61 drew held-out motions 41 -> 21 %).

``LastStepCheckpoint`` is Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the final step even when that
step is not a multiple of ``every_n_train_steps``: Lightning's own saves at train end only when no last checkpoint
was written yet, so a 450-step run checkpointing every 100 steps ended with step 400 as ``last.ckpt``, and a
``--trainer.max_time`` stop loses up to ``every_n_train_steps - 1`` steps. The configs use it for their step
checkpoints.

Sampling runs on global rank 0 only, outside the training graph, in eval mode, and restores train
mode afterwards. It is skipped under FSDP, where no rank holds the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid, save_image

from trainers.image_tokenizer import VQModuleBase, codebook_usage, pixels_of, psnr
from trainers.unified import UnifiedModule

DEFAULT_PROMPTS = ("a red circle", "a blue square on the left", "a green triangle")


class LastStepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends on a step it has not saved."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)


class SampleLogger(Callback):
    """Log sample generations (unified module) or reconstructions (tokenizer modules) during training.

    Args:
        every_n_steps: sample when ``global_step`` is a multiple of this (and once when training ends).
        prompts: text prompts for the unified module.
        image_size: ``(h, w)`` in tokens of the generated images; None: the tokenizer's ``image_grid`` (the size
            its images were trained at, so a config need not repeat the image tokenizer's downsampling).
        video_size: ``(t, h, w)`` in tokens of one generated video; None generates no video.
        text_tokens: new tokens of each text continuation; 0 skips text.
        guidance_scale: classifier-free guidance for images / video; None keeps the engine's default.
        num_reconstructions: images or clips shown by the tokenizer modules.
        seed: sampling seed.
    """

    def __init__(self, every_n_steps: int = 500, prompts: list[str] | None = None,
                 image_size: tuple[int, int] | None = (4, 4), video_size: tuple[int, int, int] | None = None,
                 text_tokens: int = 24, guidance_scale: float | None = None, num_reconstructions: int = 4,
                 seed: int = 0) -> None:
        if every_n_steps < 1:
            raise ValueError(f"SampleLogger.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
        self.image_size = tuple(image_size) if image_size is not None else None
        self.video_size = tuple(video_size) if video_size is not None else None
        self.text_tokens = text_tokens
        self.guidance_scale = guidance_scale
        self.num_reconstructions = num_reconstructions
        self.seed = seed
        self._fixed: dict[str, Tensor] = {}  # "" for images, "_t{T}" for clips of T frames
        self._last_step = -1
        self.written: list[Path] = []  # every file written, newest last

    # -- hooks ---------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if isinstance(pl_module, VQModuleBase) and len(self._fixed) < 2:
            x = pl_module._prepare(pixels_of(batch))
            key = f"_t{x.shape[2]}" if x.ndim == 5 else ""
            self._fixed.setdefault(key, x[: self.num_reconstructions].detach().cpu())
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    # -- sampling ------------------------------------------------------------------------------------
    def sample(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sample now and write / log the results (rank 0 only)."""
        self._last_step = trainer.global_step
        if "fsdp" in type(trainer.strategy).__name__.lower():
            rank_zero_warn("SampleLogger: skipped under FSDP (no rank holds the whole model)")
            return
        if not trainer.is_global_zero:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:07d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(pl_module, UnifiedModule):
            self._sample_unified(trainer, pl_module, out_dir)
        elif isinstance(pl_module, VQModuleBase):
            self._sample_tokenizer(trainer, pl_module, out_dir)

    def _sample_unified(self, trainer: Trainer, module: UnifiedModule, out_dir: Path) -> None:
        model = module.model
        was_training = model.training
        engine = module.engine()  # sets eval mode
        guided = {} if self.guidance_scale is None else {"guidance_scale": self.guidance_scale}
        try:
            h, w = self.image_size or engine.tokenizer.image_grid
            outs = engine.generate(self.prompts, start_with="image", image_size=(h, w), max_images=1,
                                   max_new_tokens=h * (w + 1) + 4, image=guided or None, seed=self.seed)
            for i, out in enumerate(outs):
                for j, image in enumerate(out.images):
                    path = out_dir / f"prompt{i}_image{j}.png"
                    image.save(path)
                    self._record(trainer, f"samples/prompt{i}", path)
            lines = []
            if self.text_tokens > 0:
                texts = engine.generate(self.prompts, max_new_tokens=self.text_tokens, seed=self.seed)
                lines = [json.dumps({"prompt": p, "text": o.text}, ensure_ascii=False)
                         for p, o in zip(self.prompts, texts)]
            if self.video_size is not None and module.tokenizer.video is not None:
                t, h, w = self.video_size
                video = engine.generate(self.prompts[0], start_with="video", video_size=(t, h, w), max_images=1,
                                        max_new_tokens=t * (h * (w + 1) + 1) + 6, video=guided or None,
                                        seed=self.seed)
                for j, clip in enumerate(video.videos):
                    path = out_dir / f"video{j}.png"
                    save_image(make_grid(_unit(clip.frames.transpose(0, 1)), nrow=clip.frames.shape[1]), path)
                    self._record(trainer, f"samples/video{j}", path)
            if lines:
                path = out_dir / "samples.txt"
                path.write_text("\n".join(lines) + "\n")
                self.written.append(path)
        finally:
            for block in model.blocks:  # drop the generator's KV cache: training never uses it
                block.attn.kv_cache = None
            model.cache_valid, model.cache_slot_ids = None, None
            model.train(was_training)

    def _sample_tokenizer(self, trainer: Trainer, module: VQModuleBase, out_dir: Path) -> None:
        tokenizer = module.tokenizer
        was_training = tokenizer.training
        tokenizer.eval()
        metrics = {}
        try:
            for key, fixed in sorted(self._fixed.items()):
                with torch.no_grad():
                    x = fixed.to(module.device)
                    recon, codes, _ = tokenizer(x)
                    recon = recon.float().clamp(-1, 1)
                if x.ndim == 5:  # (B, 3, T, H, W): per clip, a row of original frames over a row of reconstructions
                    rows = [torch.cat([x[i].transpose(0, 1), recon[i].transpose(0, 1)]) for i in range(x.shape[0])]
                    grid = make_grid(_unit(torch.cat(rows).cpu()), nrow=x.shape[2])
                else:  # originals on top, reconstructions below
                    grid = make_grid(_unit(torch.cat([x, recon]).cpu()), nrow=x.shape[0])
                path = out_dir / f"reconstructions{key}.png"
                save_image(grid, path)
                self._record(trainer, f"samples/reconstructions{key}", path, grid)
                metrics[f"samples/psnr{key}"] = float(psnr((recon - x.float()).square().mean()))
                metrics[f"samples/codebook_usage{key}"] = float(codebook_usage(codes, tokenizer.codebook_size))
        finally:
            tokenizer.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _record(self, trainer: Trainer, tag: str, path: Path, image: Tensor | None = None) -> None:
        """Remember ``path`` and hand the image to every logger that takes images."""
        self.written.append(path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                if image is None:
                    from PIL import Image as PILImage
                    from torchvision.transforms.functional import pil_to_tensor

                    image = pil_to_tensor(PILImage.open(path).convert("RGB")).float() / 255
                experiment.add_image(tag, image, global_step=trainer.global_step)
            elif hasattr(logger, "log_image"):  # W&B and friends
                logger.log_image(key=tag, images=[str(path)], step=trainer.global_step)


def _unit(x: Tensor) -> Tensor:
    """``[-1, 1]`` pixels to ``[0, 1]`` for image files."""
    return (x.float().clamp(-1, 1) + 1) / 2


class HeldoutEval(Callback):
    """Score the unified model on held-out prompts after every validation (``anygen eval``'s categories).

    Logs ``heldout/<category>`` (each category's headline score) and ``heldout/score`` (their mean) into the
    validation metrics, where ``ModelCheckpoint(monitor="heldout/score", mode="max")`` sees them. Use a
    ``seed`` other than the one reported by ``anygen eval``: the same held-out combinations, other scenes.

    Args:
        num: prompts per category.
        categories: ``anygen.eval.harness.CATEGORIES`` to run (the image / video / caption ones).
        seed: prompt and sampling seed.
        holdout / data_seed: the data set's held-out fraction and seed (``anygen data shapes``).
        batch_size: prompts per ``generate`` call.
    """

    def __init__(self, num: int = 32, categories: list[str] | None = None, seed: int = 1, holdout: float = 0.1,
                 data_seed: int = 0, batch_size: int = 16) -> None:
        from anygen.eval.harness import EVALUATORS

        self.categories = list(categories) if categories else ["t2i_single", "caption", "video"]
        unknown = [c for c in self.categories if c not in EVALUATORS or c == "tokenizer"]
        if unknown:
            raise ValueError(f"HeldoutEval: unknown or unscored categories {unknown}; accepted: "
                             f"{sorted(set(EVALUATORS) - {'tokenizer'})}")
        if num < 1:
            raise ValueError(f"HeldoutEval.num must be >= 1, got {num}")
        self.num, self.seed, self.holdout, self.data_seed, self.batch_size = num, seed, holdout, data_seed, batch_size
        self.history: list[dict[str, float]] = []  # one entry per scored validation, newest last

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(pl_module, UnifiedModule):
            return
        from anygen.eval.harness import EvalContext, eval_sampling, run_eval

        model = pl_module.model
        was_training = model.training
        try:
            ctx = EvalContext(pl_module.engine(), num=self.num, seed=self.seed, batch_size=self.batch_size,
                              holdout=self.holdout, data_seed=self.data_seed, sampling=eval_sampling())
            results = run_eval(ctx, self.categories)
        finally:
            model.release_cache()  # training never uses the generator's KV cache
            model.train(was_training)
        scores = {f"heldout/{name}": float(r.score) for name, r in results.items()}
        scores["heldout/score"] = sum(scores.values()) / len(scores)
        self.history.append({"step": trainer.global_step, **scores})
        # under DDP every rank runs the same seeded prompts on the same weights, so every rank logs the same
        # numbers and a ModelCheckpoint monitoring them works on each
        pl_module.log_dict(scores, batch_size=1)
