"""The anygen decoder: one transformer over the interleaved text / image / video token stream.

What this module owns, top to bottom:

- building blocks: ``RMSNorm``, rotary embeddings at explicit per-row positions, ``HeadNorm``
  (Chameleon's per-head QK-norm), grouped-query ``Attention`` through ``scaled_dot_product_attention``,
  the SwiGLU ``MLP``, a pre-norm or post-norm ("swin-norm") ``Block``, and the static ``KVCache``;
- ``AnyGenModel``: routed embeddings and heads (one table and one head per modality, combined by id
  range), the ``<|und|>`` positions filled by the understanding encoder, a full causal ``forward``
  for training and reference, and ``prefill`` / ``decode_step`` over a preallocated KV cache;
- the image-path variants imported Janus checkpoints need (``image_embed_dim`` / ``image_head_dim``):
  codes embedded by a narrow table + GELU MLP, scored by a GELU MLP head;
- the losses: ``routed_cross_entropy`` (each target scored by a softmax over its own modality's
  slice of the vocabulary) and ``z_loss``.

Notable:

- Logits always cover the whole vocabulary in id order (``[text+specials+sizes | image | video]``),
  so every id has a logit; the generator masks per state and training normalises per slice.
- ``decode_step`` does no host synchronisation and no Python branching on tensor values: the slot
  to write is a 0-dim tensor, k/v are written with ``index_copy_`` and attention runs over the whole
  preallocated length with a ``valid & (slot_index <= slot)`` mask, so CUDA graphs and
  ``torch.compile`` can capture it whole (gpt-fast's recipe). The generator's fast loop narrows it with
  two host numbers: ``kv_len`` (attend over the filled slots, bucketed) and ``head`` (compute one
  modality's logits, or none), see ``head_logits``.
- Rows of a batch may have different prompt lengths: callers left-pad, pass ``attention_mask``
  (False = padding) and per-row positions (the count of real tokens before each one).
- Id checks (``Vocab.check_ids``) and the ``<|und|>`` count check sync with the host, so they run in
  ``forward`` / ``prefill`` only, never in ``decode_step``.
- Packed training rows (``document_ids``) attend per document: one causal SDPA call over each document's
  span (``document_segments``, ``segment_attention``) instead of a dense ``(T, T)`` block-diagonal mask,
  1.8x faster attention at three documents a row on the CPU (``bench/attention.py`` measures it).
- Image codes can know their cell: ``image_grid_coords`` reads each code's ``(row, col)`` off the ``<|boi|>`` /
  ``<|eol|>`` around it (the cache keeps its state per slot, so decode and chunked prefill continue it), for
  learned row / column embeddings (``image_grid_embed``) and 2D rotary pairs (``rope_grid``, in every block or in
  the blocks ``rope_grid_layers`` names).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anygen.config import AnyGenConfig
from anygen.understanding import UnderstandingEncoder
from tokenizers_mm.vocab import Vocab

Head = Literal["all", "text", "image", "video"]  # a slice of the logits (AnyGenModel.head_logits)

# -- building blocks ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 so bf16 activations do not lose the scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class HeadNorm(nn.Module):
    """QK-norm: normalise each head's q (or k) over ``head_dim``, then a per-head affine.

    Chameleon stabilises mixed-modal training this way (its ``q_norm`` weights are ``(n_heads, head_dim)``,
    which this layout keeps so its checkpoints import as they are).
    """

    def __init__(self, n_heads: int, head_dim: int, kind: Literal["rms", "layernorm"], eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim)) if kind == "layernorm" else None

    def forward(self, x: Tensor) -> Tensor:  # x: (B, H, T, hd)
        shape = (x.shape[-1],)
        if self.kind == "rms":
            y = F.rms_norm(x.float(), shape, eps=self.eps)
        else:
            y = F.layer_norm(x.float(), shape, eps=self.eps)
        y = y.type_as(x) * self.weight[:, None, :]  # (H, 1, hd): one affine per head, shared over T
        return y if self.bias is None else y + self.bias[:, None, :]


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """The ``head_dim / 2`` rotary frequencies, highest first: ``theta ** (-2i / head_dim)``."""
    return theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, grid: Tensor | None = None,
                 grid_pairs: int = 0) -> tuple[Tensor, Tensor]:
    """Rotary tables at explicit positions: ``positions (B, T)`` -> cos, sin ``(B, 1, T, head_dim)``.

    Computed per call from the positions (no table buffer): a left-padded row simply starts at 0,
    and ``model.to(bfloat16)`` cannot round the frequencies.

    ``grid (B, T, 2)``: the ``(row, col)`` of each image code, ``-1`` elsewhere (``image_grid_coords``). With
    ``grid_pairs`` g > 0 an image code's first g rotary pairs (the highest frequencies) turn by its column and the
    next g by its row, at the first g pairs' frequencies, instead of by its position (``AnyGenConfig.rope_grid``).
    """
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    if grid_pairs and grid is not None:
        g = grid_pairs
        planar = torch.cat([grid[..., 1:].float() * inv_freq[:g], grid[..., :1].float() * inv_freq[:g]], dim=-1)
        is_code = grid[..., :1] >= 0  # (B, T, 1)
        freqs = torch.cat([torch.where(is_code, planar, freqs[..., :2 * g]), freqs[..., 2 * g:]], dim=-1)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd), broadcast over heads
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (B, H, T, hd)`` in the "rotate half" layout of LLaMA / Hugging Face checkpoints."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


Segments = list[list[tuple[int, int]]]  # per row, the (start, end) spans of its packed documents


def document_segments(document_ids: Tensor, attention_mask: Tensor | None = None) -> Segments | None:
    """Per row of ``document_ids (B, T)``, the ``(start, end)`` span of each document holding real tokens.

    A document is a run of equal ids. Spans of padding only (``attention_mask`` False) are left out,
    so their positions attend to nothing. None when the dense mask is needed instead: an id that
    comes back after another (a document split in two), or padding mixed into a document's span.
    """
    ids = document_ids.cpu()
    real = None if attention_mask is None else attention_mask.cpu()
    segments: Segments = []
    for r in range(ids.shape[0]):
        row = ids[r]
        change = torch.nonzero(row[1:] != row[:-1]).flatten().add(1).tolist()
        bounds = [0, *change, row.numel()]
        spans = list(zip(bounds[:-1], bounds[1:]))
        if len({int(row[s]) for s, _ in spans}) != len(spans):
            return None
        if real is not None:
            kept = []
            for s, e in spans:
                flags = real[r, s:e]
                if bool(flags.all()):
                    kept.append((s, e))
                elif bool(flags.any()):
                    return None
            spans = kept
        segments.append(spans)
    return segments


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments, *, enable_gqa: bool = False) -> Tensor:
    """Causal attention of ``q (B, H, T, hd)`` within each ``(start, end)`` span of ``segments`` only.

    One causal SDPA call per packed document: the block-diagonal work alone (about a third of a dense
    ``(T, T)`` mask's at three documents a row, and the causal kernel skips its upper half). Positions
    in no span get zeros.
    """
    y = torch.zeros_like(q)
    for r, spans in enumerate(segments):
        for start, end in spans:
            y[r:r + 1, :, start:end] = F.scaled_dot_product_attention(
                q[r:r + 1, :, start:end], k[r:r + 1, :, start:end], v[r:r + 1, :, start:end],
                is_causal=True, enable_gqa=enable_gqa)
    return y


def image_grid_coords(ids: Tensor, vocab: Vocab, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row and column of every image code in ``ids (B, T)``, from the ``<|boi|>`` / ``<|eol|>`` around it.

    ``state (B, 2)``: the ``(row, col)`` the next code would take before ``ids`` begins (a chunk that continues
    a cached sequence mid-image); None: zeros. Branch-free cumulative sums, so ``decode_step`` can call it on
    one token.

    Returns:
        ``coords (B, T, 2)``: ``(row, col)`` of each position's code, ``-1`` where the id is not an image code, and
        ``after (B, T, 2)``: the state after each position, i.e. where a code following it would go.
    """
    b, t = ids.shape
    is_code = (ids >= vocab.image_offset) & (ids < vocab.video_offset)
    is_boi, is_eol = ids == vocab.boi, ids == vocab.eol
    start = torch.zeros(b, 2, dtype=torch.long, device=ids.device) if state is None else state.long()
    if t == 1:  # decode_step: the same rule without the scans (a shape, not a value, picks this branch)
        row = torch.where(is_boi, 0, start[:, :1] + is_eol.long())
        count = torch.where(is_boi | is_eol, 0, start[:, 1:] + is_code.long())
        coords = torch.stack([row, count - is_code.long()], dim=-1)
        return torch.where(is_code[..., None], coords, -1), torch.stack([row, count], dim=-1)
    idx = torch.arange(t, device=ids.device).expand(b, t)
    eols = is_eol.long().cumsum(-1)  # (B, T), inclusive
    codes = is_code.long().cumsum(-1)
    last_boi = torch.cummax(torch.where(is_boi, idx, -1), dim=-1).values  # a new image: row 0
    last_reset = torch.cummax(torch.where(is_boi | is_eol, idx, -1), dim=-1).values  # a new row: column 0
    row = torch.where(last_boi >= 0, eols - eols.gather(-1, last_boi.clamp(min=0)), start[:, :1] + eols)
    count = torch.where(last_reset >= 0, codes - codes.gather(-1, last_reset.clamp(min=0)), start[:, 1:] + codes)
    after = torch.stack([row, count], dim=-1)  # (B, T, 2)
    coords = torch.stack([row, count - is_code.long()], dim=-1)
    return torch.where(is_code[..., None], coords, -1), after


def image_copy_hints(ids: Tensor, vocab: Vocab, document_ids: Tensor | None = None, *, valid: Tensor | None = None,
                     queries: Tensor | None = None) -> Tensor:
    """For each position inside an image, the earlier image's code at the cell the position predicts next.

    A position from an image's ``<|boi|>`` up to its ``<|eoi|>`` gets the code (``0 .. K-1``) that the image before
    it (in the same document, with ``document_ids``) holds at the row and column the next code takes
    (``image_grid_coords``' state after the position); ``-1`` where there is none: outside images, in a row's last
    column (an ``<|eol|>`` comes next), in a first image, past the earlier image's size. Found by matching every
    position against every code (no host sync, no data-dependent shapes), so ``decode_step`` can call it.

    Args:
        ids: ``(B, S)`` every token so far (a KV cache's slots).
        document_ids: ``(B, S)`` packed documents; an earlier image in another document is not used.
        valid: ``(B, S)`` bool, the slots that may be read (the cache's valid slots up to the query); None: all.
        queries: ``(B, T)`` long, the slots to give hints for; None: every slot.

    Returns:
        ``(B, T)`` long (``(B, S)`` without ``queries``).
    """
    b, s = ids.shape
    v, h, w = vocab, vocab.max_height, vocab.max_width
    idx = torch.arange(s, device=ids.device).expand(b, s)
    is_boi = ids == v.boi
    image = is_boi.long().cumsum(-1)  # (B, S) 1 in the first image's span, 2 in the second, ...
    last_boi = torch.cummax(torch.where(is_boi, idx, -1), dim=-1).values
    last_eoi = torch.cummax(torch.where(ids == v.eoi, idx, -1), dim=-1).values
    coords, after = image_grid_coords(ids, v)
    key = coords[..., 0] >= 0  # the image codes
    if valid is not None:
        key = key & valid
    q_image, q_after, q_inside = image, after, last_boi > last_eoi  # <|boi|> .. the token before <|eoi|>
    q_doc = document_ids
    if queries is not None:
        q_image, q_inside = image.gather(1, queries), q_inside.gather(1, queries)
        q_after = after.gather(1, queries[..., None].expand(*queries.shape, 2))
        q_doc = None if document_ids is None else document_ids.gather(1, queries)
    match = key[:, None, :] & (image[:, None, :] == (q_image - 1)[..., None]) \
        & (coords[:, None, :, 0] == q_after[..., None, 0]) & (coords[:, None, :, 1] == q_after[..., None, 1])
    if document_ids is not None:
        match = match & (document_ids[:, None, :] == q_doc[..., None])  # (B, T, S)
    code = (ids - v.image_offset)[:, None, :]
    hint = torch.where(match, code, torch.zeros_like(code)).sum(-1)
    ok = q_inside & match.any(-1) & (q_after[..., 0] < h) & (q_after[..., 1] < w)
    return torch.where(ok, hint, -1)


class KVCache(nn.Module):
    """Static key/value store of one attention layer, written by slot.

    Buffers (not saved in the state dict):
        k: ``(B, n_kv_head, L, head_dim)``
        v: ``(B, n_kv_head, L, head_dim)``

    ``L`` is the preallocated length. Slots that were never written stay zero: they are masked
    out, but masked weights multiply them, and zeros (unlike ``torch.empty`` garbage) cannot be NaN.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_seq_len: int, head_dim: int, *,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v (B, n_kv_head, T, hd)`` at ``slots (T,)``; return the whole (B, n_kv_head, L, hd) buffers."""
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    """Grouped-query self-attention with optional per-head QK-norm and a static KV cache."""

    def __init__(self, config: AnyGenConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.d_model
        # separate projections, named as in Hugging Face LLaMA-family checkpoints, so importers map 1:1
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        if config.qk_norm == "none":
            self.q_norm: HeadNorm | None = None
            self.k_norm: HeadNorm | None = None
        else:
            eps = config.norm_eps if config.qk_norm_eps is None else config.qk_norm_eps
            self.q_norm = HeadNorm(self.n_head, self.head_dim, config.qk_norm, eps)
            self.k_norm = HeadNorm(self.n_kv_head, self.head_dim, config.qk_norm, eps)
        self.kv_cache: KVCache | None = None  # set by AnyGenModel.setup_cache

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, *, is_causal: bool = False,
                cache_slots: Tensor | None = None, kv_len: int | None = None,
                segments: Segments | None = None) -> Tensor:
        """Attend ``x (B, T, D)``.

        Without ``cache_slots`` the keys are this call's own ``T`` tokens. With them, this call's k/v
        are written into the cache at ``cache_slots (T,)`` and the queries attend over the cache
        (its first ``kv_len`` slots, or all ``L`` when ``kv_len`` is None). ``mask`` is bool, True = attend,
        broadcastable to ``(B, 1, T, S)``. ``segments`` (packed training rows, see ``document_segments``)
        replaces ``mask``: each ``(start, end)`` span of row ``r`` attends causally within itself only,
        positions in no span get zeros.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # before RoPE, as in Chameleon
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_slots is not None:
            if self.kv_cache is None:
                raise RuntimeError("KV cache not set up: call AnyGenModel.setup_cache first")
            k, v = self.kv_cache.update(cache_slots, k, v)  # (B, Hkv, L, hd)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, Hkv, S, hd)
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.n_kv_head != self.n_head
        if segments is not None:
            y = segment_attention(q, k, v, segments, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=gqa)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020), LLaMA naming."""

    def __init__(self, config: AnyGenConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer: pre-norm (LLaMA) or post-norm inside the residual branch (Chameleon's swin-norm).

    Swin-norm bounds the magnitude each branch adds to the residual stream, which Chameleon-34B
    needed to keep mixed-modal training from diverging.
    """

    def __init__(self, config: AnyGenConfig) -> None:
        super().__init__()
        self.post_norm = config.post_norm
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, *, is_causal: bool = False,
                cache_slots: Tensor | None = None, kv_len: int | None = None,
                segments: Segments | None = None) -> Tensor:
        kw = {"is_causal": is_causal, "cache_slots": cache_slots, "kv_len": kv_len, "segments": segments}
        if self.post_norm:
            x = x + self.attn_norm(self.attn(x, cos, sin, mask, **kw))
            return x + self.mlp_norm(self.mlp(x))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, **kw)
        return x + self.mlp(self.mlp_norm(x))


# -- the model ---------------------------------------------------------------------------------------


class AnyGenModel(nn.Module):
    """Decoder over the joint vocabulary, with routed (or shared) embeddings and heads.

    Args:
        config: shapes, vocabulary layout and understanding encoder.

    Attributes:
        vocab: the ``Vocab`` built from ``config.vocab_dict()``.
        embed: ``{"text", "image", "video"}`` tables (routed) or ``{"shared"}``.
        head: output projections keyed like ``embed``.
        und: the ``UnderstandingEncoder``, or None when ``config.und_encoder`` is None.
    """

    def __init__(self, config: AnyGenConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab = Vocab(**config.vocab_dict())
        v, d = self.vocab, config.d_model
        if config.head_mode == "routed":
            # text table covers every id before the image codes: BPE, specials and size tokens
            sizes = {"text": v.text_head_size, "image": v.image_codebook_size, "video": v.video_codebook_size}
        else:
            sizes = {"shared": v.size}
        self.embed = nn.ModuleDict({name: nn.Embedding(n, d) for name, n in sizes.items()})
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = nn.ModuleDict({name: nn.Linear(d, n, bias=False) for name, n in sizes.items()})
        k, e, p = v.image_codebook_size, config.image_embed_dim, config.image_head_dim
        if e:  # Janus: a narrow code table, lifted to d_model by its generation aligner
            self.embed["image"] = nn.Sequential(nn.Embedding(k, e), nn.Linear(e, d), nn.GELU(), nn.Linear(d, d))
        if p:  # Janus: the generation head is a GELU MLP, not one projection
            self.head["image"] = nn.Sequential(nn.Linear(d, p), nn.GELU(), nn.Linear(p, k))
        self.und = UnderstandingEncoder(config) if config.und_encoder is not None else None
        # image_grid_embed: a code's row and column, added to its embedding (zero at init: see _init_weights)
        self.grid_embed = nn.ModuleDict({"row": nn.Embedding(v.max_height, d), "col": nn.Embedding(v.max_width, d)}) \
            if config.image_grid_embed else None
        # image_copy_hint (experimental): the earlier image's code at the next cell, through the image table and this
        # projection (zero at init: a model warm-started without it begins exactly as it was)
        self.copy_hint = nn.Linear(d, d, bias=False) if config.image_copy_hint else None
        # image_copy_logit (experimental): the hint code's logit bonus from the final hidden state (zero at init)
        self.copy_gate = nn.Linear(d, 1) if config.image_copy_logit else None
        # image_grid_embed, rope_grid and the copy hints all read image_grid_coords
        self.tracks_grid = config.image_grid_embed or config.rope_grid > 0 or config.image_copy_hint \
            or config.image_copy_logit
        self._init_weights()
        if config.tie_embeddings:
            for name in sizes:
                self.head[name].weight = self.embed[name].weight
        # static cache state, allocated by setup_cache
        self.register_buffer("cache_valid", None, persistent=False)  # (B, L) bool: slot holds a real token
        self.register_buffer("cache_slot_ids", None, persistent=False)  # (L,) arange, kept to avoid a per-step alloc
        # image_grid_embed / rope_grid: (B, L, 2) the image_grid_coords state after the token in each slot (a
        # rewritten slot, e.g. a rejected speculative draft, rewrites its state too)
        self.register_buffer("cache_grid", None, persistent=False)
        # image_copy_hint / image_copy_logit: (B, L) the id in each slot, so the hints can be found again
        self.register_buffer("cache_ids", None, persistent=False)

    def _init_weights(self) -> None:
        # the SigLIP tower keeps transformers' own init (or its pretrained weights)
        modules = [self.embed, self.blocks, self.head] + ([self.und.aligner] if self.und is not None else [])
        for root in modules:
            for module in root.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        nn.init.zeros_(module.bias)
        if self.grid_embed is not None:  # zero: a model warm-started without them begins exactly as it was
            for table in self.grid_embed.values():
                nn.init.zeros_(table.weight)
        if self.copy_hint is not None:
            nn.init.zeros_(self.copy_hint.weight)
        if self.copy_gate is not None:
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.zeros_(self.copy_gate.bias)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Parameter count (tied weights once); ``trainable_only`` skips a frozen SigLIP tower."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- embeddings and heads ------------------------------------------------------------------------
    def embed_ids(self, ids: Tensor) -> Tensor:
        """Token embeddings ``(B, T) -> (B, T, D)``; ``<|und|>`` positions keep their text embedding here.

        Routed: each table is looked up with clamped indices and the results are picked by id range
        with ``torch.where``, so no boolean indexing (a host sync) is needed.
        """
        if self.config.head_mode == "shared":
            return self.embed["shared"](ids)
        v = self.vocab
        is_image = ((ids >= v.image_offset) & (ids < v.video_offset))[..., None]  # (B, T, 1)
        is_video = (ids >= v.video_offset)[..., None]
        text = self.embed["text"](ids.clamp(0, v.image_offset - 1))  # (B, T, D)
        image = self.embed["image"]((ids - v.image_offset).clamp(0, v.image_codebook_size - 1))
        video = self.embed["video"]((ids - v.video_offset).clamp(0, v.video_codebook_size - 1))
        return torch.where(is_image, image, torch.where(is_video, video, text))

    def logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states ``(..., D)`` -> logits over the whole vocabulary ``(..., V)``, in id order."""
        if self.config.head_mode == "shared":
            return self.head["shared"](hidden)
        return torch.cat([self.head["text"](hidden), self.head["image"](hidden), self.head["video"](hidden)], dim=-1)

    def head_logits(self, hidden: Tensor, head: Head) -> Tensor:
        """Logits of one slice of the vocabulary: ``"all"`` is ``logits``; ``"text"`` covers ids
        ``[0, image_offset)``, ``"image"`` the ``K_image`` codes, ``"video"`` the video codes, each in id order.

        Only that head's weights are read: the fast decode path scores an image body with the image
        head alone (Janus-Pro: 16384 of ~118k outputs). In ``shared`` mode the slice's rows of the one head are used.
        """
        if head == "all":
            return self.logits(hidden)
        if self.config.head_mode == "routed":
            return self.head[head](hidden)
        v = self.vocab
        lo, hi = {"text": (0, v.image_offset), "image": (v.image_offset, v.video_offset),
                  "video": (v.video_offset, v.size)}[head]
        return F.linear(hidden, self.head["shared"].weight[lo:hi])  # a row slice: a view, no copy

    def _embed_with_und(self, ids: Tensor, und_pixels: Tensor | None) -> Tensor:
        """Embeddings with the ``<|und|>`` positions (row-major over the batch) replaced by encoder features."""
        x = self.embed_ids(ids)  # (B, T, D)
        und_mask = ids == self.vocab.und  # (B, T)
        count = int(und_mask.sum())  # host sync: acceptable in forward / prefill, never in decode_step
        if self.und is None:
            if count or und_pixels is not None:
                raise ValueError(f"this model has no understanding encoder (AnyGenConfig.und_encoder is None), but "
                                 f"got {count} <|und|> positions and und_pixels={und_pixels is not None}")
            return x
        n_images = 0 if und_pixels is None else und_pixels.shape[0]
        expected = n_images * self.und.num_tokens
        if count != expected:
            raise ValueError(f"the ids hold {count} <|und|> positions but und_pixels gives {n_images} images x "
                             f"{self.und.num_tokens} tokens = {expected}")
        if count == 0:
            return x
        feats = self.und(und_pixels).to(x.dtype)  # (N, und_tokens, D)
        return x.masked_scatter(und_mask[..., None], feats)  # fills masked rows in row-major order

    def _add_grid(self, x: Tensor, ids: Tensor, state: Tensor | None = None
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``x`` plus the row and column embeddings at the image codes of ``ids`` (``image_grid_embed``), the codes'
        ``(row, col)`` and the states after each position (``image_grid_coords``); ``(x, None, None)`` for a model
        that tracks no grid."""
        if not self.tracks_grid:
            return x, None, None
        v = self.vocab
        coords, after = image_grid_coords(ids, v, state)
        if self.grid_embed is not None:
            grid = self.grid_embed["row"](coords[..., 0].clamp(0, v.max_height - 1)) \
                + self.grid_embed["col"](coords[..., 1].clamp(0, v.max_width - 1))
            x = x + grid.to(x.dtype) * (coords[..., :1] >= 0)  # nothing added where the id is no image code
        return x, coords, after

    def _rope(self, positions: Tensor, coords: Tensor | None) -> list[tuple[Tensor, Tensor]]:
        """The ``(cos, sin)`` tables of each block: 2D pairs (``rope_grid``) in the blocks ``rope_grid_layers``
        names (every block when it is None), 1D rotary in the others; each distinct table is computed once."""
        c = self.config
        grid = rope_cos_sin(positions, c.head_dim, c.rope_theta, coords, c.rope_grid)
        if not c.rope_grid or c.rope_grid_layers is None:
            return [grid] * c.n_layer
        plain = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        return [grid if i in c.rope_grid_layers else plain for i in range(c.n_layer)]

    def _check_inputs(self, ids: Tensor, positions: Tensor | None, attention_mask: Tensor | None,
                      document_ids: Tensor | None = None) -> None:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an integer tensor of shape (B, T), got {ids.dtype} {tuple(ids.shape)}")
        self.vocab.check_ids(ids)
        if positions is not None and positions.shape != ids.shape:
            raise ValueError(f"positions must have the shape of ids {tuple(ids.shape)}, got {tuple(positions.shape)}")
        if attention_mask is not None and (attention_mask.shape != ids.shape or attention_mask.dtype != torch.bool):
            raise ValueError(f"attention_mask must be a bool tensor of shape {tuple(ids.shape)} (False = padding), "
                             f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        if document_ids is not None and document_ids.shape != ids.shape:
            raise ValueError(f"document_ids must have the shape of ids {tuple(ids.shape)}, "
                             f"got {tuple(document_ids.shape)}")

    @staticmethod
    def default_positions(ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """RoPE positions ``(B, T)`` for ``ids``: the count of real tokens before each position (padding gets 0)."""
        if attention_mask is None:
            return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # -- full forward (training, reference) ------------------------------------------------------------
    def hidden(self, ids: Tensor, *, positions: Tensor | None = None, attention_mask: Tensor | None = None,
               und_pixels: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        """Final-norm hidden states ``(B, T, D)`` of a full causal pass (no cache); see ``forward``."""
        self._check_inputs(ids, positions, attention_mask, document_ids)  # before the hints read the ids
        return self._hidden(ids, positions, attention_mask, und_pixels, document_ids,
                            self._copy_hints(ids, document_ids))

    def _hidden(self, ids: Tensor, positions: Tensor | None, attention_mask: Tensor | None,
                und_pixels: Tensor | None, document_ids: Tensor | None, hint: Tensor | None) -> Tensor:
        t = ids.shape[1]
        if positions is None:
            positions = self.default_positions(ids, attention_mask)
            if document_ids is not None:  # packed documents: each one counts its positions from 0
                idx = torch.arange(t, device=ids.device).expand(ids.shape)
                starts = torch.ones_like(document_ids, dtype=torch.bool)
                starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
                first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
                positions = idx - first
        x, coords, _ = self._add_grid(self._embed_with_und(ids, und_pixels), ids)  # (B, T, D)
        x = self._add_copy_hint(x, hint)
        ropes = self._rope(positions, coords)
        segments = None if document_ids is None else document_segments(document_ids, attention_mask)
        mask: Tensor | None = None
        if segments is not None:
            is_causal = False  # each document its own causal kernel (Attention)
        elif attention_mask is None and document_ids is None:
            is_causal = True  # lets SDPA pick its fused causal kernels
        else:
            idx = torch.arange(t, device=ids.device)
            causal = idx[None, :] <= idx[:, None]  # (T, T)
            keys = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask
            # a padding query attends to itself only, so no row of the softmax is empty (NaN)
            mask = causal & (keys[:, None, None, :] | (idx[None, :] == idx[:, None]))  # (B, 1, T, T)
            if document_ids is not None:  # packed documents never attend across their boundary
                mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
            is_causal = False
        for block, (cos, sin) in zip(self.blocks, ropes):
            x = block(x, cos, sin, mask, is_causal=is_causal, segments=segments)
        return self.norm(x)

    def forward(self, ids: Tensor, *, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                und_pixels: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        """Full causal forward, no cache.

        Args:
            ids: ``(B, T)`` token ids in ``[0, vocab.size)``.
            positions: ``(B, T)`` RoPE positions; default: count of real tokens before each position
                (restarting at 0 for each packed document when ``document_ids`` is given).
            attention_mask: ``(B, T)`` bool, False marks padding keys; default: no padding.
            und_pixels: ``(N, 3, S, S)`` in ``[-1, 1]``, one image per ``und_tokens`` ``<|und|>`` positions.
            document_ids: ``(B, T)`` int, the document each position belongs to in a packed row;
                attention never crosses a document boundary. Default: one document per row.

        Returns:
            Logits ``(B, T, V)`` over the whole vocabulary.
        """
        self._check_inputs(ids, positions, attention_mask, document_ids)  # before the hints read the ids
        hint = self._copy_hints(ids, document_ids)  # found once for the input and the output
        hidden = self._hidden(ids, positions, attention_mask, und_pixels, document_ids, hint)
        return self._add_copy_bonus(self.logits(hidden), hidden, hint, "all")

    # -- image_copy_hint / image_copy_logit (experimental) ------------------------------------------------
    def _copy_hints(self, ids: Tensor, document_ids: Tensor | None = None) -> Tensor | None:
        if self.copy_hint is None and self.copy_gate is None:
            return None
        return image_copy_hints(ids, self.vocab, document_ids)

    def _add_copy_hint(self, x: Tensor, hint: Tensor | None) -> Tensor:
        """``x`` plus the hint code's embedding through ``copy_hint`` where there is a hint (``image_copy_hint``)."""
        if self.copy_hint is None or hint is None:
            return x
        return x + self.copy_hint(self.embed["image"](hint.clamp(min=0))).to(x.dtype) * (hint >= 0)[..., None]

    def _add_copy_bonus(self, logits: Tensor, hidden: Tensor, hint: Tensor | None, head: Head,
                        twins: int = 0) -> Tensor:
        """``logits`` (of ``head``) with the gate's bonus on the hint code where there is one (``image_copy_logit``).

        ``twins``: rows ``twins .. 2·twins`` (and each later group of ``twins`` rows:
        image guidance's second twins, region rows) are the
        guidance twins of rows ``0 .. twins`` and get their row's bonus
        on their row's hint code (``decode_step``)."""
        if self.copy_gate is None or hint is None or head in ("text", "video"):
            return logits
        offset = 0 if head == "image" else self.vocab.image_offset
        bonus = self.copy_gate(hidden)[..., 0] * (hint >= 0)
        if twins:  # every twin group (one, or two with image guidance) gets its rows' bonus
            groups = logits.shape[0] // twins
            bonus, hint = bonus[:twins].repeat(groups, *[1] * (bonus.dim() - 1)), \
                hint[:twins].repeat(groups, *[1] * (hint.dim() - 1))
        return logits.scatter_add(-1, (offset + hint.clamp(min=0))[..., None], bonus[..., None].to(logits.dtype))

    # -- losses ----------------------------------------------------------------------------------------
    def loss(self, logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None, *,
             reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
        """``routed_cross_entropy`` with this model's head mode and ``z_loss_weight``."""
        return routed_cross_entropy(logits, targets, self.vocab, loss_mask, head_mode=self.config.head_mode,
                                    z_loss_weight=self.config.z_loss_weight, reduction=reduction)

    # -- static KV cache ---------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_seq_len: int, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Preallocate a ``KVCache`` per layer and the ``(B, L)`` slot-valid mask; replaces any previous cache."""
        if max_seq_len > self.config.max_seq_len or max_seq_len < 1:
            raise ValueError(f"setup_cache max_seq_len must be in 1..{self.config.max_seq_len} "
                             f"(AnyGenConfig.max_seq_len), got {max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"setup_cache batch_size must be >= 1, got {batch_size}")
        weight = self.norm.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_kv_head, max_seq_len, self.config.head_dim,
                                          device=device, dtype=dtype)
        self.cache_valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.cache_slot_ids = torch.arange(max_seq_len, device=device)
        self.cache_grid = torch.zeros(batch_size, max_seq_len, 2, dtype=torch.long, device=device) \
            if self.tracks_grid else None
        self.cache_ids = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=device) \
            if self.copy_hint is not None or self.copy_gate is not None else None

    def reset_cache(self) -> None:
        """Forget every cached token (zeroes k/v and the valid mask) without reallocating."""
        self._require_cache()
        for block in self.blocks:
            assert block.attn.kv_cache is not None
            block.attn.kv_cache.k.zero_()
            block.attn.kv_cache.v.zero_()
        self.cache_valid.zero_()
        if self.cache_grid is not None:
            self.cache_grid.zero_()
        if self.cache_ids is not None:
            self.cache_ids.zero_()

    def release_cache(self) -> None:
        """Free the KV cache (its memory goes back to the allocator); ``setup_cache`` makes a new one."""
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cache_valid = None
        self.cache_slot_ids = None
        self.cache_grid = None
        self.cache_ids = None

    def cache_bytes(self) -> int:
        """Bytes held by the k/v buffers: 2 * layers * kv_heads * head_dim * L * B * element size."""
        caches = [block.attn.kv_cache for block in self.blocks if block.attn.kv_cache is not None]
        return sum(c.k.nbytes + c.v.nbytes for c in caches)

    def _require_cache(self) -> tuple[int, int]:
        if self.cache_valid is None:
            raise RuntimeError("KV cache not set up: call AnyGenModel.setup_cache(batch_size, max_seq_len) first")
        return self.cache_valid.shape[0], self.cache_valid.shape[1]

    @torch.no_grad()
    def prefill(self, ids: Tensor, *, positions: Tensor | None = None, attention_mask: Tensor | None = None,
                und_pixels: Tensor | None = None, start: int = 0, head: Head = "all",
                all_positions: bool = False, twins: int = 0) -> Tensor:
        """Run a prompt through the model, writing its k/v into cache slots ``start .. start+T-1``.

        Args:
            ids: ``(B, T)``, left-padded when rows differ in length; B must equal the cache's batch size.
            positions: ``(B, T)`` RoPE positions; default: count of real tokens before each position
                (including those already cached before ``start``).
            attention_mask: ``(B, T)`` bool, False for padding; default: no padding.
            und_pixels: ``(N, 3, S, S)`` for the ``<|und|>`` positions of ``ids``.
            start: first slot to write. 0 starts a new sequence (earlier slots are forgotten); a later
                start appends a chunk after what the cache already holds (or overwrites slots from ``start``
                on, as speculative decoding does with rejected drafts).
            head: which logits to return (``head_logits``).
            all_positions: return the logits of every position, not only the last one.
            twins: rows ``twins .. 2·twins`` (and each later group of ``twins`` rows:
                image guidance's second twins, region rows) are the
                classifier-free guidance twins of rows ``0 .. twins`` (as in
                ``decode_step``); 0: none.

        Returns:
            Logits ``(B, V)`` of the last position (``(B, K)`` for a one-modality head); ``(B, T, ·)`` with
            ``all_positions``.
        """
        cache_b, cache_len = self._require_cache()
        self._check_inputs(ids, positions, attention_mask)
        b, t = ids.shape
        if b != cache_b:
            raise ValueError(f"prefill batch size {b} differs from the cache's {cache_b}; call setup_cache again")
        _check_twins(twins, b)
        if start < 0 or start + t > cache_len:
            raise ValueError(f"prefill of {t} tokens at slot {start} does not fit the cache of {cache_len} slots")
        if attention_mask is None:
            attention_mask = torch.ones_like(ids, dtype=torch.bool)
        if start == 0:
            self.cache_valid.zero_()
        if positions is None:
            before = self.cache_valid[:, :start].sum(-1, keepdim=True)  # (B, 1) real tokens already cached
            positions = self.default_positions(ids, attention_mask) + before
        self.cache_valid[:, start:start + t] = attention_mask
        x = self._embed_with_und(ids, und_pixels)  # (B, T, D)
        coords = None
        if self.cache_grid is not None:  # a chunk after cached slots continues the state of the slot before it
            x, coords, after = self._add_grid(x, ids, self.cache_grid[:, start - 1] if start else None)
            self.cache_grid[:, start:start + t] = after
        hint = None
        if self.cache_ids is not None:  # the copy hints, found again over every slot so far
            self.cache_ids[:, start:start + t] = ids
            queries = self.cache_slot_ids[start:start + t].expand(b, t)
            hint = image_copy_hints(self.cache_ids[:, :start + t], self.vocab, valid=self.cache_valid[:, :start + t],
                                    queries=queries)
            x = self._add_copy_hint(x, hint)
        ropes = self._rope(positions, coords)
        kv_len = start + t
        q_slots = self.cache_slot_ids[start:kv_len]  # (T,)
        k_slots = self.cache_slot_ids[:kv_len]  # (S,)
        causal = k_slots[None, :] <= q_slots[:, None]  # (T, S)
        # as in hidden(): a padding query also sees itself so its softmax row is never empty
        mask = causal & (self.cache_valid[:, None, None, :kv_len] | (k_slots[None, :] == q_slots[:, None]))
        for block, (cos, sin) in zip(self.blocks, ropes):
            x = block(x, cos, sin, mask, cache_slots=q_slots, kv_len=kv_len)
        hidden = self.norm(x if all_positions else x[:, -1])
        if hint is not None and not all_positions:
            hint = hint[:, -1]
        return self._add_copy_bonus(self.head_logits(hidden, head), hidden, hint, head, twins)  # (B, V) / (B, T, V)

    @torch.no_grad()
    def decode_step(self, ids: Tensor, *, slot: Tensor | int, positions: Tensor, kv_len: int | None = None,
                    head: Head | None = "all", twins: int = 0) -> Tensor | None:
        """One token per row through the cache; capturable (no host sync, no value-dependent branches).

        Args:
            ids: ``(B,)`` the tokens to feed (never ``<|und|>``; ids are not checked here).
            slot: 0-dim long tensor, the cache slot to write (the same for every row).
            positions: ``(B,)`` RoPE position of each row's token.
            kv_len: attend over the first ``kv_len`` slots only (they must include ``slot``); None: the whole
                preallocated length. A caller that buckets it keeps shapes static per bucket.
            head: which logits to return (``head_logits``); None returns nothing (the step only writes
                the cache: every row's next id is forced).
            twins: rows ``twins .. 2·twins`` (and each later group of ``twins`` rows:
                image guidance's second twins, region rows) are the
                classifier-free guidance twins of rows ``0 .. twins`` (the
                generator's layout); 0: none. With ``image_copy_logit`` each twin gets its row's copy bonus on its
                row's hint code, so guidance ``u + s·(c − u)`` leaves the bonus out and adds it once: the bonus
                points at the earlier image's code, it is not what the condition adds (a twin sees no earlier
                image, and without this the bonus would be multiplied by ``s``). Nothing else changes.

        Returns:
            Logits ``(B, V)`` for the next token (``(B, K)`` for a one-modality head), or None.
        """
        self._require_cache()
        _check_twins(twins, ids.shape[0])
        if not isinstance(slot, Tensor):  # a Python int is accepted for convenience; capture needs a tensor
            slot = torch.tensor(slot, device=self.cache_valid.device)
        slot = slot.reshape(1)  # (1,) index for index_copy_ / index_fill_
        self.cache_valid.index_fill_(1, slot, True)
        n = self.cache_valid.shape[1] if kv_len is None else kv_len
        mask = (self.cache_valid[:, :n] & (self.cache_slot_ids[:n] <= slot))[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed_ids(ids[:, None])  # (B, 1, D)
        coords = None
        if self.cache_grid is not None:  # the state of the slot before (slot 0 has none: zeros), branch-free
            before = self.cache_grid.index_select(1, (slot - 1).clamp(min=0))[:, 0]  # (B, 2)
            x, coords, after = self._add_grid(x, ids[:, None], torch.where(slot > 0, before, torch.zeros_like(before)))
            self.cache_grid.index_copy_(1, slot, after)
        hint = None
        if self.cache_ids is not None:  # the copy hint, found again over the slots this step reads
            self.cache_ids.index_copy_(1, slot, ids[:, None])
            hint = image_copy_hints(self.cache_ids[:, :n], self.vocab, valid=mask[:, 0, 0],
                                    queries=slot.expand(ids.shape[0])[:, None])  # (B, 1)
            x = self._add_copy_hint(x, hint)
        ropes = self._rope(positions[:, None], coords)
        for block, (cos, sin) in zip(self.blocks, ropes):
            x = block(x, cos, sin, mask, cache_slots=slot, kv_len=kv_len)
        if head is None:
            return None
        hidden = self.norm(x[:, 0])
        return self._add_copy_bonus(self.head_logits(hidden, head), hidden, None if hint is None else hint[:, 0],
                                    head, twins)  # (B, V) or (B, K)


def _check_twins(twins: int, rows: int) -> None:
    if not isinstance(twins, int) or twins < 0 or (twins and (rows < 2 * twins or rows % twins)):
        raise ValueError(f"twins must be 0 or divide the batch into two groups or more (rows twins .. 2*twins, and "
                         f"each later group of twins rows, are the guidance twins or region rows of rows 0 .. "
                         f"twins), got twins={twins!r} for {rows} rows")


# -- losses ------------------------------------------------------------------------------------------


def _reduce(loss: Tensor, loss_mask: Tensor | None, reduction: Literal["mean", "sum", "none"]) -> Tensor:
    if loss_mask is not None:
        loss = torch.where(loss_mask, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        count = loss.numel() if loss_mask is None else loss_mask.sum().clamp(min=1)  # no host sync
        return loss.sum() / count
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def z_loss(logits: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean of ``logsumexp(logits)^2`` over (unmasked) positions: keeps the softmax normaliser near 1 (PaLM)."""
    return _reduce(torch.logsumexp(logits.float(), dim=-1).square(), loss_mask, "mean")


def routed_cross_entropy(logits: Tensor, targets: Tensor, vocab: Vocab, loss_mask: Tensor | None = None, *,
                         head_mode: Literal["routed", "shared"] = "routed", z_loss_weight: float = 0.0,
                         reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """Cross-entropy where each target is scored by a softmax over its own modality's slice.

    A text / special / size target normalises over ``[0, image_offset)``, an image code over the image
    codes, a video code over the video codes: the routed heads never compete with each other, which is
    what the generator sees too (it masks logits to the current state's slice). ``head_mode="shared"``
    normalises over the whole vocabulary instead.

    Args:
        logits: ``(..., V)`` over the whole vocabulary in id order.
        targets: ``(...)`` ids; positions excluded by ``loss_mask`` may hold anything (e.g. -100).
        vocab: the id layout.
        loss_mask: ``(...)`` bool, True = counts; default: every position counts.
        head_mode: "routed" (per-slice softmax) or "shared" (one softmax).
        z_loss_weight: adds ``weight * log(Z)^2`` per target, Z being the normaliser its CE used.
        reduction: "mean" over counted positions, "sum", or "none" (per position, masked ones 0).
    """
    logits = logits.float()  # logsumexp over large slices in bf16 loses precision
    safe = targets.clamp(0, vocab.size - 1)
    target_logit = logits.gather(-1, safe[..., None]).squeeze(-1)  # (...)
    if head_mode == "shared":
        lse = torch.logsumexp(logits, dim=-1)
    else:
        io, vo = vocab.image_offset, vocab.video_offset
        lse_text = torch.logsumexp(logits[..., :io], dim=-1)
        lse_image = torch.logsumexp(logits[..., io:vo], dim=-1)
        lse_video = torch.logsumexp(logits[..., vo:], dim=-1)
        lse = torch.where(safe >= vo, lse_video, torch.where(safe >= io, lse_image, lse_text))
    loss = lse - target_logit
    if z_loss_weight:
        loss = loss + z_loss_weight * lse.square()
    return _reduce(loss, loss_mask, reduction)
