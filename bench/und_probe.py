"""How much of a scene the understanding encoder keeps: a per-cell shape probe on its features.

    .venv/bin/python bench/und_probe.py                                  # the default model, table on stdout
    .venv/bin/python bench/und_probe.py --checkpoint runs/x/model --json bench/und_probe.json

Captions are read through the understanding path (``Understand(image)`` → SigLIP tower → aligner → the
decoder), so a caption can only name what the encoder's features still carry. This measures that apart from
the decoder: render shapes scenes (``anygen.data.shapes``), run them through a checkpoint's understanding
encoder (tower + aligner, frozen), and fit a small probe (an MLP on the flattened ``<|und|>`` features) that
tells, for each of the 3×3 cells, which shape is there (or none). Training scenes avoid the held-out
``(colour, shape, cell)`` triples of ``holdout_combinations(0.1, 0)``, as the training documents do; the
probe is then scored on new scenes of seen triples and on scenes whose first object is a held-out triple.

The baseline, measured in the same run on the same scenes: the same probe on an untrained tower and aligner of
the same config (random weights). A trained encoder that keeps less than a random one has learned to drop
what the captions need. The table gives shape accuracy over occupied cells, seen and held-out, and each
encoder's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anygen.api import AnyGen  # noqa: E402
from anygen.cli_generate import default_checkpoint  # noqa: E402
from anygen.data.shapes import POSITIONS, SHAPES, holdout_combinations, render_scene, sample_scene  # noqa: E402
from anygen.understanding import UnderstandingEncoder  # noqa: E402


def scenes(n: int, seed: int, held_out: bool, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rendered scenes as ``(n, 3, size, size)`` pixels in [-1, 1] and ``(n, 9)`` labels per cell (0: empty,
    1 + the shape's index); ``held_out``: the first object is a held-out triple, else no object is one."""
    held = sorted(holdout_combinations(0.1, 0)[0])
    rng = random.Random(f"und_probe:{seed}")
    pixels, labels = [], []
    while len(pixels) < n:
        scene = sample_scene(rng, first=rng.choice(held)) if held_out else sample_scene(rng)
        if not held_out and any(o.key in held for o in scene):
            continue
        image = np.asarray(render_scene(scene, size), dtype=np.float32) / 127.5 - 1
        label = [0] * len(POSITIONS)
        for obj in scene:
            label[POSITIONS.index(obj.position)] = 1 + SHAPES.index(obj.shape)
        pixels.append(torch.from_numpy(image).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(pixels), torch.tensor(labels)


@torch.no_grad()
def features(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    return torch.cat([encoder(pixels[i:i + 500]).float() for i in range(0, len(pixels), 500)]).flatten(1)


def probe(train: tuple[torch.Tensor, torch.Tensor], tests: dict[str, tuple[torch.Tensor, torch.Tensor]],
          steps: int, seed: int) -> dict[str, float]:
    """Fit an MLP from features to the 9 cells' labels; shape accuracy over occupied cells of each test set."""
    torch.manual_seed(seed)
    x, y = train
    cells = y.shape[1]
    head = nn.Sequential(nn.Linear(x.shape[1], 256), nn.GELU(), nn.Linear(256, cells * (1 + len(SHAPES))))
    opt = torch.optim.AdamW(head.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(head(x[idx]).view(-1, 1 + len(SHAPES)), y[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {}
    with torch.no_grad():
        for name, (tx, ty) in tests.items():
            pred = head(tx).view(len(tx), cells, -1).argmax(-1)
            occupied = ty > 0
            out[name] = ((pred == ty) & occupied).sum().item() / occupied.sum().item()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the default model)")
    p.add_argument("--train", type=int, default=6000, help="probe training scenes")
    p.add_argument("--test", type=int, default=500, help="scenes per test set")
    p.add_argument("--steps", type=int, default=1800, help="probe steps (batch 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        if default_checkpoint() is None:
            print("no default model in anygen/assets/default: pass --checkpoint DIR", file=sys.stderr)
            return 1
        args.checkpoint = str(default_checkpoint())
    engine = AnyGen.from_pretrained(args.checkpoint, device="cpu")
    trained = engine.model.und
    if trained is None:
        print(f"{args.checkpoint} has no understanding encoder: nothing to probe", file=sys.stderr)
        return 1
    size = trained.image_size
    started = time.perf_counter()
    train = scenes(args.train, args.seed, False, size)
    tests = {"seen": scenes(args.test, args.seed + 1, False, size),
             "held_out": scenes(args.test, args.seed + 2, True, size)}
    torch.manual_seed(args.seed)
    random_encoder = UnderstandingEncoder(engine.model.config).float()
    rows = {}
    for name, encoder in (("random (baseline)", random_encoder), ("trained", trained.float())):
        f = lambda px: features(encoder, px)  # noqa: E731
        rows[name] = probe((f(train[0]), train[1]), {k: (f(px), y) for k, (px, y) in tests.items()},
                           args.steps, args.seed)
    base = rows["random (baseline)"]
    print(f"understanding encoder of {args.checkpoint}: {size} px, {trained.num_tokens} tokens; probe on "
          f"{args.train} scenes, {args.steps} steps ({time.perf_counter() - started:.0f} s)\n")
    print("| encoder | shape, seen triples | shape, held-out triples | vs baseline (seen / held-out) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['seen']:.1f} % | {100 * r['held_out']:.1f} % | "
              f"{r['seen'] / base['seen']:.2f}× / {r['held_out'] / base['held_out']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, "args": {k: str(v) for k, v in
                                                                                 vars(args).items()},
                                         "shape_accuracy": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
