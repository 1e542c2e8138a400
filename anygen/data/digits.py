"""The ``digits`` data set: real handwritten digits (scikit-learn's bundled copy of UCI's 8×8 digits).

This module owns:

* ``load_digit_images``: the 1797 grey 8×8 digits and their labels, read from the scikit-learn
  package (shipped with it, never downloaded);
* ``split_digits``: the deterministic, per-class stratified train / held-out split of a seed; an
  evaluation's digit classifier is fitted and scored on the held-out images only, which no training
  document ever shows;
* ``render_digit``: one digit as white ink on black, upscaled (bicubic) to any size, RGB, with an
  optional small random affine for augmented copies;
* ``digit_caption`` / ``parse_digit_caption``: ``"a handwritten 7"`` and back;
* ``generate_digits``, behind ``anygen data digits``: PNG files, ``documents.jsonl`` (training
  split), ``heldout.jsonl`` (every held-out image once per kind) and ``meta.json`` with the split.

Document kinds: ``t2i`` ``[caption, image]`` and ``caption`` ``[understand(image), caption]``. The
ground truth is under each line's ``"meta"`` (``digit``, ``index`` into ``load_digits``, ``split``,
``augmented``).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from anygen.data.documents import prepare_dataset_dir
from anygen.data.shapes import allocate, parse_kinds

KINDS: tuple[str, ...] = ("t2i", "caption")
DEFAULT_KINDS: dict[str, float] = {"t2i": 1, "caption": 1}
SOURCE = "sklearn.datasets.load_digits: UCI ML hand-written digits, 1797 grey 8x8 images, values 0..16"
_CAPTION_RE = re.compile(r"\bhandwritten\s+(\d)\b")


@functools.cache
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The digits and their labels: ``(images uint8 (1797, 8, 8) in 0..255, labels int64 (1797,))``, read-only."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn comes with the data extra
        raise ImportError("scikit-learn is needed for the digits data set: pip install -e '.[data]'") from err
    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = data.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # cached: shared by every caller
    return images, labels


def split_digits(labels: np.ndarray, holdout: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stratified split: ``round(holdout * n_c)`` images of every class ``c`` are held out.

    Args:
        labels: the class of every image.
        holdout: fraction held out, in ``[0, 0.9]``.
        seed: the split is a function of it (and of ``labels``) only.

    Returns:
        ``(train, heldout)`` sorted lists of image indices; disjoint, together all images.
    """
    if not 0 <= holdout <= 0.9:
        raise ValueError(f"holdout must lie in [0, 0.9], got {holdout!r}")
    rng = random.Random(f"digits:{seed}:split")
    heldout: list[int] = []
    for c in sorted(set(int(v) for v in labels)):
        members = [i for i, v in enumerate(labels) if int(v) == c]
        rng.shuffle(members)
        heldout += members[:round(holdout * len(members))]
    held = set(heldout)
    return [i for i in range(len(labels)) if i not in held], sorted(heldout)


def render_digit(pixels: np.ndarray, size: int = 64, *, rng: random.Random | None = None) -> PIL.Image.Image:
    """One 8×8 digit (uint8) as an RGB ``size × size`` image, white ink on black.

    Args:
        pixels: ``(8, 8)`` uint8 grey values.
        size: output side in pixels.
        rng: when given, a small random affine (±10° rotation, 0.9–1.1 scale, ±6 % shift), for
            augmented copies of a training image.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    grey = PIL.Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L")
    if rng is None:
        return grey.resize((size, size), PIL.Image.BICUBIC).convert("RGB")
    side = max(8, round(size * rng.uniform(0.9, 1.1)))
    big = grey.resize((side, side), PIL.Image.BICUBIC).rotate(rng.uniform(-10, 10), PIL.Image.BICUBIC, fillcolor=0)
    canvas = PIL.Image.new("L", (size, size), 0)
    shift = 0.06 * size
    canvas.paste(big, (round((size - side) / 2 + rng.uniform(-shift, shift)),
                       round((size - side) / 2 + rng.uniform(-shift, shift))))
    return canvas.convert("RGB")


def digit_caption(digit: int) -> str:
    """``"a handwritten 7"``."""
    return f"a handwritten {int(digit)}"


def parse_digit_caption(text: str) -> int | None:
    """The digit a caption names (``"a handwritten 7"`` → 7), or ``None``."""
    m = _CAPTION_RE.search(str(text).lower())
    return int(m.group(1)) if m else None


def generate_digits(
    out: str | Path,
    *,
    num: int | None = None,
    seed: int = 0,
    image_size: int = 64,
    kinds: str | Sequence[str] | dict[str, float] | None = None,
    holdout: float = 0.2,
    augment: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the digits data set to ``out``.

    Args:
        out: output directory (created; must be empty unless ``overwrite``).
        num: training documents; ``None`` uses every training image once per kind. Past that,
            images repeat (augmented copies when ``augment``).
        seed: the split, the document order and the augmentations follow from it.
        image_size: side of the PNG images.
        kinds: ``"t2i"``, ``"caption"`` or both, with optional weights (``"t2i:2,caption"``).
        holdout: fraction of every class held out of training (``heldout.jsonl``).
        augment: draw repeated training images with a small random affine instead of copying them.
        overwrite: replace a data set already in ``out``.
        progress: show a tqdm bar.

    Returns:
        The content of ``meta.json``, the split included.
    """
    from tqdm import tqdm

    out = Path(out)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    weights = parse_kinds(kinds, KINDS, DEFAULT_KINDS)
    images, labels = load_digit_images()
    train, heldout = split_digits(labels, holdout, seed)
    if num is None:
        num = len(train) * len(weights)
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        raise ValueError(f"num must be a non-negative int, got {num!r}")
    prepare_dataset_dir(out, overwrite, ("images", "documents.jsonl", "heldout.jsonl", "meta.json"))

    rng = random.Random(f"digits:{seed}:documents")
    written: set[str] = set()

    def image_file(split: str, index: int, copy: int) -> str:
        rel = f"images/{split}/{index:04d}.png" if copy == 0 else f"images/{split}/{index:04d}_{copy}.png"
        if rel not in written:
            aug = random.Random(f"digits:{seed}:{index}:{copy}") if copy and augment else None
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            render_digit(images[index], image_size, rng=aug).save(path, format="PNG")
            written.add(rel)
        return rel

    def document(split: str, n: int, kind: str, index: int, copy: int) -> str:
        digit = int(labels[index])
        text, image = digit_caption(digit), image_file(split, index, copy)
        segments = [{"text": text}, {"image": image}] if kind == "t2i" else [{"understand": image}, {"text": text}]
        meta = {"kind": kind, "split": split, "digit": digit, "index": index,
                "augmented": bool(copy and augment), "caption": text}
        return json.dumps({"id": f"digits-{split}-{n:06d}", "segments": segments, "meta": meta})

    # training: each kind walks a seeded order of the training images, cycling with new copies
    order = list(train)
    rng.shuffle(order)
    plan = allocate(num, weights, rng)
    used = {k: 0 for k in weights}
    counts = {"train": {k: plan.count(k) for k in weights}, "heldout": {k: len(heldout) for k in weights}}
    with open(out / "documents.jsonl", "w", encoding="utf-8") as f:
        for n, kind in enumerate(tqdm(plan, desc="digits train", unit="doc", disable=not progress)):
            copy, pos = divmod(used[kind], len(order)) if order else (0, 0)
            used[kind] += 1
            f.write(document("train", n, kind, order[pos], copy if augment else 0) + "\n")
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        n = 0
        for index in heldout:
            for kind in weights:
                f.write(document("heldout", n, kind, index, 0) + "\n")
                n += 1

    meta = {
        "generator": "digits",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "source": SOURCE,
        "files": {"train": "documents.jsonl", "heldout": "heldout.jsonl"},
        "num": {"train": num, "heldout": len(heldout) * len(weights)},
        "kinds": counts,
        "weights": weights,
        "augment": augment,
        "holdout": holdout,
        "vocabulary": {"digits": list(range(10)), "caption": digit_caption(7)},
        "split": {"train": train, "heldout": heldout},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


__all__ = ["DEFAULT_KINDS", "KINDS", "digit_caption", "generate_digits", "load_digit_images", "parse_digit_caption",
           "render_digit", "split_digits"]
