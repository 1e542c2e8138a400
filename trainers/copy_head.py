"""A copy-attention prior for a grown 2D-rotary block: one head set to read the same cell of earlier images.

What this module owns: ``copy_head_direction`` and ``init_copy_head``, which ``UnifiedModule(copy_head=...)``
applies after loading ``init_from`` (and growing it, ``grow_depth``).

Why: editing and illustrated stories redraw an earlier image with one change, so most of the new image's codes are
the earlier image's codes at the same cells. A block with 2D rotary pairs (``AnyGenConfig.rope_grid_layers``) can
attend there whatever lies between the two images, but a block grown onto a trained model starts from a copy of
its neighbour's attention, which looks elsewhere, and the gradient towards a pattern that holds ~1/500 of the
attention is too weak to find it: a 1200-step stage training such a block alone left it attending where it started
(session 27, ``docs/default_model.md``). So one head is given the pattern and training only has to learn what to
do with what it reads.

How: the head's query and key read one direction ``u`` of the block's normed input, the mean over image codes
(``copy_head_direction``; 96 % of the shipped model's image codes lie on its positive side), into the 2D rotary
pairs only (the column pairs, then the row pairs); every other dimension of the head is zero. After the per-head
RMS QK-norm the query and key are then one fixed vector each, whatever the token (up to the sign of ``u · x``), and
their dot product depends on the rotary angles alone: the key is unturned, the query turned ``column_offset``
columns ahead in the column pairs, so the logit peaks at the earlier image's code one column to the right of the
query's own (the code the query's position predicts next) and falls off with distance in cells. ``scale`` (the
head's QK-norm weight) sets how sharply: at 3 the peak logit is ~51 and a cell off is ~4 lower (×67). Non-image
tokens keep 1D rotary angles in those pairs, which match a query's only by chance. On the shipped model, a 9th
block set this way puts 82 % of head 0's attention from an edit's target codes on the source image's cell (r, c+1).

With grouped-query attention the key rows belong to a key / value head shared by ``n_head / n_kv_head`` query heads;
their attention changes too (in a grown block its output projection starts at zero, so the model does not).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from anygen.model import AnyGenModel, rope_inv_freq


def _grid_pairs(model: AnyGenModel, block: int) -> int:
    c = model.config
    if not 0 <= block < c.n_layer:
        raise ValueError(f"copy_head block {block} is not one of the model's blocks 0..{c.n_layer - 1}")
    if not c.rope_grid or (c.rope_grid_layers is not None and block not in c.rope_grid_layers):
        raise ValueError(f"copy_head block {block} has no 2D rotary pairs: set model.rope_grid > 0 and include "
                         f"{block} in model.rope_grid_layers (now rope_grid={c.rope_grid}, "
                         f"rope_grid_layers={c.rope_grid_layers})")
    if c.qk_norm != "rms":
        raise ValueError(f"copy_head needs model.qk_norm='rms' (the query and key become fixed vectors after the "
                         f"norm), got {c.qk_norm!r}")
    return c.rope_grid


@torch.no_grad()
def copy_head_direction(model: AnyGenModel, documents: list[Tensor], block: int) -> Tensor:
    """The unit mean of ``block``'s attention input (after its norm) over the image codes of ``documents`` (1D id
    tensors; their understood images, if any, are left out: a document with ``<|und|>`` is refused).

    Raises:
        ValueError: no image code in ``documents``, or a document with ``<|und|>`` positions.
    """
    v = model.vocab
    seen: list[Tensor] = []
    hook = model.blocks[block].attn.register_forward_hook(lambda module, args, out: seen.append(args[0][0]))
    total: Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        for ids in documents:
            if bool((ids == v.special("und")).any()):
                raise ValueError("copy_head_direction: pass documents without <|und|> positions")
            is_code = (ids >= v.image_offset) & (ids < v.video_offset)
            if not bool(is_code.any()):
                continue
            seen.clear()
            model(ids[None].long())
            x = seen[0][is_code].float().sum(0)  # the direction of the mean: a sum will do
            total = x if total is None else total + x
    finally:
        hook.remove()
        model.train(was_training)
    if total is None:
        raise ValueError("copy_head_direction: none of the documents holds an image code")
    return total / total.norm()


@torch.no_grad()
def init_copy_head(model: AnyGenModel, block: int, direction: Tensor, *, head: int = 0, scale: float = 3.0,
                   column_offset: int = 1) -> None:
    """Set query head ``head`` of ``block`` (and its key head) to attend from an image code to the code
    ``column_offset`` columns to the right in the same row of earlier images (module docstring).

    Raises:
        ValueError: ``block`` has no 2D rotary pairs, the model has no RMS QK-norm, ``head`` is out of range,
            ``direction`` is not a ``(d_model,)`` vector, or ``scale`` is not a number > 0.
    """
    g = _grid_pairs(model, block)
    c = model.config
    if not 0 <= head < c.n_head:
        raise ValueError(f"copy_head head {head} is not one of the block's heads 0..{c.n_head - 1}")
    if direction.shape != (c.d_model,) or not bool(torch.isfinite(direction).all()) or float(direction.norm()) == 0:
        raise ValueError(f"copy_head direction must be a finite nonzero ({c.d_model},) vector, "
                         f"got {tuple(direction.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"copy_head scale must be a finite number > 0, got {scale!r}")
    attn = model.blocks[block].attn
    hd, half = c.head_dim, c.head_dim // 2
    kv_head = head // (c.n_head // c.n_kv_head)
    inv_freq = rope_inv_freq(hd, c.rope_theta)
    q, k = torch.zeros(hd), torch.zeros(hd)
    for i in range(g):  # rotate-half layout: pair i is dims (i, i + half); column pairs 0..g-1, row pairs g..2g-1
        angle = column_offset * float(inv_freq[i])
        q[i], q[i + half] = math.cos(angle), math.sin(angle)
        k[i] = 1.0
        q[g + i] = k[g + i] = 1.0
    u = (direction / direction.norm()).to(attn.q_proj.weight)
    attn.q_proj.weight[head * hd:(head + 1) * hd] = q.to(u)[:, None] * u[None]
    attn.k_proj.weight[kv_head * hd:(kv_head + 1) * hd] = k.to(u)[:, None] * u[None]
    attn.q_norm.weight[head] = scale
    attn.k_norm.weight[kv_head] = scale
