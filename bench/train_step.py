"""Training-step speed of the default model's decoder: fp32 against bf16 autocast, same run, same device.

    .venv/bin/python bench/train_step.py                      # rows of 384 (8x8 images) and 896 (16x16)
    .venv/bin/python bench/train_step.py --rows 4 --lengths 896 --steps 10

Builds the ``small`` preset with QK-norm at the shipped model's vocabulary (random weights: speed does not
depend on them), and times forward + cross-entropy + backward + AdamW on random text ids
(the understanding tower is not run). Prints ms per step and tokens per second for each precision, and
bf16's speed-up over fp32 measured in the same process. ``scripts/train_default.sh`` takes
``PRECISION=bf16-mixed`` to train with it (Lightning's ``--trainer.precision``).
"""

from __future__ import annotations

import argparse
import time

import torch

from anygen.config import AnyGenConfig
from anygen.model import AnyGenModel


def time_steps(model: AnyGenModel, ids: torch.Tensor, *, bf16: bool, steps: int, warmup: int = 2) -> float:
    """Mean seconds per optimizer step over ``steps`` after ``warmup`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="rows per batch")
    parser.add_argument("--lengths", type=int, nargs="+", default=[384, 896], help="tokens per row")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AnyGenConfig.preset("small", text_size=512, image_codebook_size=1000, video_codebook_size=1000,
                              qk_norm="rms", max_seq_len=max(1024, max(args.lengths)))
    torch.manual_seed(0)
    print(f"decoder: {cfg.num_parameters_estimate() / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads, oneDNN: {torch.backends.mkldnn.is_available()}")
    print("| rows x tokens | fp32 ms/step | bf16 ms/step | fp32 tok/s | bf16 tok/s | bf16 speed-up |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        ids = torch.randint(0, 250, (args.rows, length))  # byte-level text ids: no <|und|>, no image spans
        times = {}
        for bf16 in (False, True):
            torch.manual_seed(0)
            times[bf16] = time_steps(AnyGenModel(cfg), ids, bf16=bf16, steps=args.steps)
        tokens = args.rows * length
        print(f"| {args.rows} x {length} | {times[False] * 1e3:.0f} | {times[True] * 1e3:.0f} | "
              f"{tokens / times[False]:.0f} | {tokens / times[True]:.0f} | {times[False] / times[True]:.2f}x |")


if __name__ == "__main__":
    main()
