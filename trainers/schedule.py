"""Learning-rate schedule shared by every trainer: linear warm-up, then cosine decay.

``lr_factor`` is the multiplier a ``LambdaLR`` applies; the unified module and the VQ tokenizer
modules both build their schedulers from it.
"""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
