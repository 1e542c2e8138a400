"""Packed training rows: attention per document against the dense block-diagonal mask, same run, same device.

    .venv/bin/python bench/attention.py                           # 4 rows x 896 tokens, ~290-token documents
    .venv/bin/python bench/attention.py --doc-lengths 128 290 600 --steps 3

Training packs several documents into each row and passes ``document_ids`` so that no token attends
across a document boundary. ``AnyGenModel`` used to build one dense ``(B, 1, T, T)`` mask for that,
which makes SDPA compute every query-key pair of the row (and lose its causal fast path); it now calls
a causal SDPA kernel per document span (``anygen.model.document_segments``). This prints, for each
document length, the milliseconds of one attention layer's forward + backward and of a whole decoder
training step (forward, routed cross-entropy, backward, AdamW; the shipped model's ``config.json``,
random weights) both ways, and the per-document speed-up over the dense mask measured in the same
process. The understanding tower is not run.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
import torch.nn.functional as F
from train_step import add_decoder_args, decoder_config  # bench/, the script's own directory

import anygen.model as model_module
from anygen.config import AnyGenConfig
from tokenizers_mm.vocab import Vocab


def packed_rows(vocab: Vocab, rows: int, length: int, doc_length: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text ids ``(rows, length)`` and ``document_ids`` cutting each row every ``doc_length`` tokens."""
    ids = torch.randint(0, vocab.text_size, (rows, length), generator=generator)
    document_ids = (torch.arange(length) // doc_length).expand(rows, length).contiguous()
    return ids, document_ids


def timed(fn, steps: int, warmup: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def attention_seconds(cfg: AnyGenConfig, document_ids: torch.Tensor, *, dense: bool, steps: int) -> float:
    """One attention layer's SDPA, forward + backward, over ``(B, H, T, head_dim)`` random q / k / v."""
    b, t = document_ids.shape
    head_dim = cfg.d_model // cfg.n_head
    q, k, v = (torch.randn(b, cfg.n_head, t, head_dim, requires_grad=True) for _ in range(3))
    segments = model_module.document_segments(document_ids)
    idx = torch.arange(t)
    mask = (idx[None, :] <= idx[:, None]) & (document_ids[:, None, :, None] == document_ids[:, None, None, :])

    def step() -> None:
        if dense:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = model_module.segment_attention(q, k, v, segments)
        y.sum().backward()

    return timed(step, steps)


def train_step_seconds(cfg: AnyGenConfig, ids: torch.Tensor, document_ids: torch.Tensor, *, dense: bool,
                       steps: int) -> float:
    """A decoder training step on packed rows; ``dense`` forces the ``(T, T)`` mask the model used before."""
    torch.manual_seed(0)
    model = model_module.AnyGenModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        logits = model(ids, document_ids=document_ids)
        model.loss(logits[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if not dense:
        return timed(step, steps)
    with mock.patch.object(model_module, "document_segments", lambda *args: None):
        return timed(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="rows per batch")
    parser.add_argument("--length", type=int, default=896, help="tokens per row (the 16x16 stage's rows)")
    parser.add_argument("--doc-lengths", type=int, nargs="+", default=[290],
                        help="tokens per packed document (~290: a text prompt and a 16x16 image)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell")
    add_decoder_args(parser)
    args = parser.parse_args()
    bad = [n for n in args.doc_lengths if not 1 <= n <= args.length]
    if bad:
        parser.error(f"--doc-lengths must be in 1..--length ({args.length}), got {bad}")
    cfg = decoder_config(parser, args, args.length)
    vocab = Vocab(**cfg.vocab_dict())
    print(f"decoder: {cfg.num_parameters_estimate() / 1e6:.1f}M parameters, {args.rows} x {args.length} tokens, "
          f"{torch.get_num_threads()} threads")
    print("| document tokens | docs / row | attention dense ms | per-document ms | speed-up "
          "| train step dense ms | per-document ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for doc_length in args.doc_lengths:
        ids, document_ids = packed_rows(vocab, args.rows, args.length, doc_length, torch.Generator().manual_seed(0))
        att = {d: attention_seconds(cfg, document_ids, dense=d, steps=args.steps) for d in (True, False)}
        step = {d: train_step_seconds(cfg, ids, document_ids, dense=d, steps=args.steps) for d in (True, False)}
        print(f"| {doc_length} | {args.length / doc_length:.1f} | {att[True] * 1e3:.0f} | {att[False] * 1e3:.0f} | "
              f"{att[True] / att[False]:.2f}x | {step[True] * 1e3:.0f} | {step[False] * 1e3:.0f} | "
              f"{step[True] / step[False]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
