"""``anygen fit | validate | test``: Lightning's ``LightningCLI`` over the anygen modules and data modules.

Model and data classes are chosen in the YAML by ``class_path`` (``subclass_mode_model`` /
``subclass_mode_data``), so one entry point trains the image tokenizer, the video tokenizer and the
unified model::

    anygen fit --config configs/unified/tiny.yaml
    anygen fit --config configs/unified/tiny.yaml --trainer.max_steps 100 --model.init_args.lr 1e-3
    anygen fit --config configs/unified/tiny.yaml --print_config          # the resolved config, then exit
    anygen fit --config configs/unified/tiny.yaml --ckpt_path last         # resume (or a .ckpt path)
    anygen fit --config configs/tokenizers/image.yaml --trainer.strategy ddp --trainer.devices 2

LightningCLI's ``SaveConfigCallback`` writes the resolved ``config.yaml`` into the run's log
directory (overwriting an earlier one, so a resumed run can be relaunched with the same command).
Nothing here is home-made distributed code: ``--trainer.strategy ddp | fsdp`` and
``--trainer.precision bf16-mixed`` are Lightning's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes bf16 natively (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``), from
    ``/proc/cpuinfo`` (or the given text); None where that cannot be told (no such file)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = {f for line in cpuinfo.splitlines() if line.split(":")[0].strip().lower() in ("flags", "features")
             for f in line.split(":", 1)[-1].split()}
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_cpu_warning(precision: object, accelerator: object, cuda: bool, native: bool | None) -> str | None:
    """The warning for a bf16 run that will land on a CPU without native bf16 (emulated: session 14 measured
    ``bench/train_step.py`` 18x slower than fp32 on such an AMD EPYC), else None."""
    if not str(precision).startswith("bf16") or native is not False:
        return None
    if cuda and str(accelerator) in ("auto", "gpu", "cuda"):
        return None
    return (f"--trainer.precision {precision} on a CPU without native bf16 (no avx512_bf16 / amx_bf16 in "
            "/proc/cpuinfo): torch emulates it (18x slower than 32-true on session 14's AMD EPYC; "
            "bench/train_step.py times this machine); use --trainer.precision 32-true "
            "(scripts/train_default.sh: leave PRECISION unset)")


class AnyGenCLI(LightningCLI):
    """``LightningCLI`` with anygen's defaults: weights-only checkpoint loading, TF32 matmuls on GPUs, and a warning
    when bf16 would run emulated on a CPU."""

    def before_instantiate_classes(self) -> None:
        # --ckpt_path is read with torch.load(weights_only=True): tensors and plain values, never arbitrary pickles
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
        trainer = config.get("trainer") or {}
        warning = bf16_cpu_warning(trainer.get("precision"), trainer.get("accelerator", "auto"),
                                   torch.cuda.is_available(), cpu_has_native_bf16())
        if warning:
            logging.getLogger("anygen.fit").warning(warning)


def run_cli(subcommand: str, argv: Sequence[str] | None = None, **kwargs) -> AnyGenCLI:
    """Run ``LightningCLI`` for ``subcommand`` (``fit``, ``validate``, ``test``, ``predict``) with ``argv``.

    ``kwargs`` go to ``LightningCLI`` (tests pass ``trainer_defaults``).
    """
    return AnyGenCLI(
        LightningModule,
        LightningDataModule,
        args=[subcommand, *(argv or [])],
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={subcommand: {"prog": f"anygen {subcommand}"}},
        **kwargs,
    )


def show_anygen_logs() -> None:
    """Print the ``anygen.*`` loggers' INFO lines (the data mixture, skipped documents) on stderr, beside
    Lightning's own; once, and not when the application already configured the ``anygen`` logger."""
    logger = logging.getLogger("anygen")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def fit(argv: Sequence[str] | None = None) -> int:
    """``anygen fit``: train (``--ckpt_path`` resumes)."""
    show_anygen_logs()
    run_cli("fit", argv)
    return 0


def validate(argv: Sequence[str] | None = None) -> int:
    """``anygen validate``: one pass over the validation set."""
    show_anygen_logs()
    run_cli("validate", argv)
    return 0


def test(argv: Sequence[str] | None = None) -> int:
    """``anygen test``: one pass over the test set."""
    show_anygen_logs()
    run_cli("test", argv)
    return 0


test.__test__ = False  # type: ignore[attr-defined]  # pytest: this is the CLI's `test` command, not a test
