"""Training-step speed of the default model's decoder: fp32 against bf16 autocast, same run, same device.

    .venv/bin/python bench/train_step.py                      # rows of 384 (8x8 images) and 896 (16x16)
    .venv/bin/python bench/train_step.py --rows 4 --lengths 896 --steps 10 --kind scene
    python3 bench/train_step.py --device cuda --rows 32 --lengths 896   # a GPU (scripts/device_stage.sh runs it)

Builds the decoder the shipped model's ``config.json`` describes (``--config``; random weights: speed does not
depend on them), and times forward + the trainer's routed cross-entropy
(z-loss included) + backward + AdamW. ``--kind scene`` (the default) packs rows the way training documents
look: a text prompt, then a ``<|boi|> <|h|> <|w|>`` image of ``--grid`` x ``--grid`` codes, each row closed by
``<|eol|>``, so the grid embedding and the image head do real work; ``--kind text``: random text ids only.
The understanding tower is not run. Prints ms per step and tokens per second for each precision, and
bf16's speed-up over fp32 measured in the same process. ``scripts/train_default.sh`` takes
``PRECISION=bf16-mixed`` to train with it (Lightning's ``--trainer.precision``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from anygen.cli_generate import DEFAULT_MODEL_DIR
from anygen.config import AnyGenConfig
from anygen.model import AnyGenModel
from tokenizers_mm.vocab import Vocab


def scene_row(vocab: Vocab, length: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """``(length,)`` ids: documents of 12 text ids and one ``grid`` x ``grid`` image, packed back to back."""
    image = [vocab.boi, vocab.h_token(grid), vocab.w_token(grid)]
    for _ in range(grid):
        codes = torch.randint(vocab.image_offset, vocab.video_offset, (grid,), generator=generator)
        image += codes.tolist() + [vocab.eol]
    ids: list[int] = []
    while len(ids) < length:
        prompt = torch.randint(0, vocab.text_size, (12,), generator=generator).tolist()
        ids += [vocab.bos, *prompt, *image, vocab.eoi, vocab.eos]
    return torch.tensor(ids[:length])


def time_steps(model: AnyGenModel, ids: torch.Tensor, *, bf16: bool, steps: int, warmup: int = 2) -> float:
    """Mean seconds per optimizer step over ``steps`` after ``warmup`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids)
        loss = model.loss(logits[:, :-1].float(), ids[:, 1:])  # trainers.unified's loss, minus its target mask
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:  # CUDA runs asynchronously: wait for the queued kernels before reading the clock
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def add_decoder_args(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--config``, the options every decoder bench here takes."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--config", type=Path, default=DEFAULT_MODEL_DIR / "config.json",
                        help="a model directory's config.json (default: the shipped model's)")


def decoder_config(parser: argparse.ArgumentParser, args: argparse.Namespace, length: int) -> AnyGenConfig:
    """Apply ``--threads``; the decoder ``--config`` describes, its ``max_seq_len`` raised to ``length``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file (a model directory's config.json)")
    model_config = json.loads(args.config.read_text())["model"]
    return AnyGenConfig.from_dict({**model_config, "max_seq_len": max(model_config["max_seq_len"], length)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="rows per batch")
    parser.add_argument("--lengths", type=int, nargs="+", default=[384, 896], help="tokens per row")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per cell")
    parser.add_argument("--kind", choices=("scene", "text"), default="scene",
                        help="scene: text prompts and image spans, as training rows are; text: random text ids")
    parser.add_argument("--grid", type=int, default=16, help="image codes per side in --kind scene rows")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    add_decoder_args(parser)
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err} (accepted: cpu, cuda, cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    cfg = decoder_config(parser, args, max(args.lengths))
    vocab = Vocab(**cfg.vocab_dict())
    if not 1 <= args.grid <= min(vocab.max_height, vocab.max_width):
        parser.error(f"--grid must be in 1..{min(vocab.max_height, vocab.max_width)} (the vocabulary's size "
                     f"tokens), got {args.grid}")
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{torch.get_num_threads()} threads, oneDNN: {torch.backends.mkldnn.is_available()}")
    print(f"decoder: {cfg.num_parameters_estimate() / 1e6:.1f}M parameters, {args.kind} rows, {where}")
    print("| rows x tokens | fp32 ms/step | bf16 ms/step | fp32 tok/s | bf16 tok/s | bf16 speed-up |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        if args.kind == "scene":
            gen = torch.Generator().manual_seed(0)
            ids = torch.stack([scene_row(vocab, length, args.grid, gen) for _ in range(args.rows)])
        else:
            ids = torch.randint(0, vocab.text_size, (args.rows, length))  # no <|und|>, no image spans
        times = {}
        for bf16 in (False, True):
            torch.manual_seed(0)
            times[bf16] = time_steps(AnyGenModel(cfg).to(device), ids.to(device), bf16=bf16, steps=args.steps)
        tokens = args.rows * length
        print(f"| {args.rows} x {length} | {times[False] * 1e3:.0f} | {times[True] * 1e3:.0f} | "
              f"{tokens / times[False]:.0f} | {tokens / times[True]:.0f} | {times[False] / times[True]:.2f}x |")


if __name__ == "__main__":
    main()
