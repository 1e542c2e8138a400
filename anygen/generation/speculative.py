"""Speculative Jacobi decoding (SJD) of an image / video span: several ids per forward pass, the same distribution.

Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative
Jacobi Decoding" (what Lumina-mGPT 2.0 ships). No draft model: the drafts of one iteration are the
model's own samples at the later positions of the previous one (made with a stale context), refined
as the context settles, as in Jacobi iteration. Opt-in (``generate_speculative``); the ``Generator``
loops never use it.

One iteration, per row: feed the last accepted id and the drafts of the next ``window - 1`` positions
in one chunk (``AnyGenModel.prefill`` at the cache slot after the accepted prefix, overwriting what
earlier drafts left there), read the target distribution ``p`` (guided, tempered) at each position,
and verify left to right with the lossless rule of speculative sampling (Leviathan et al. 2023, Chen et
al. 2023): accept draft ``x`` drawn from ``q`` with probability ``min(1, p(x) / q(x))``; at the first
rejection, draw from the normalised residual ``max(0, p - q)`` and stop. Every accepted id is then an
exact sample of the target given the ids before it. The positions after a rejection get new drafts
drawn from this iteration's ``p`` there (its ``q`` next time); positions never drafted start uniform.

Scope: one span that the grammar fully determines once its size is known, i.e. ``start_with`` an image
(or video) of a requested size (or the imported layout's default), ``max_images=1``, sampling without
top-k / top-p. Forced ids inside the span (``<|eol|>``, ``<|eoi|>``, headers) are accepted as drafted.
Rows of a batch advance at their own pace; each chunk starts at the slowest row, and rows ahead re-feed
ids they already accepted (correct, some work wasted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anygen.generation.events import RowDone
from anygen.generation.generator import GenerationSettings, Generator, guide
from anygen.generation.grammar import DONE, M_IMAGE, M_VIDEO, TEXT, GrammarState
from tokenizers_mm.multimodal import TokenSequence


@dataclass
class SpeculativeStats:
    """What one ``generate_speculative`` call did.

    Attributes:
        span_len: ids in the span (``<|boi|>`` … ``<|eoi|>``), per row.
        forwards: chunk forward passes (iterations).
        plain_forwards: decode steps the one-id-per-step loops need for the same span (``span_len - 1``:
            the first id comes from the prefill).
        drafted: drafts verified (sampled positions only), all rows.
        accepted: drafts accepted, all rows.
    """

    span_len: int
    forwards: int
    plain_forwards: int
    drafted: int
    accepted: int

    @property
    def forwards_saved(self) -> float:
        """Share of the decode forward passes saved: ``1 - forwards / plain_forwards``."""
        return 1 - self.forwards / max(1, self.plain_forwards)


def span_template(generator: Generator, settings: GenerationSettings) -> tuple[list[int], str]:
    """The span the grammar writes for ``settings.start_with``: each position's forced id, or -1 where a code is
    sampled; and the span's modality (``"image"`` / ``"video"``).

    Raises:
        ValueError: the span is not fully determined (no ``start_with``, or a size the model would choose).
    """
    v, grammar = generator.vocab, generator.grammar
    starts = set(generator._starts(settings, 1) if not isinstance(settings.start_with, list) else settings.start_with)
    if len(starts) != 1 or None in starts:
        raise ValueError("speculative decoding needs start_with='image' or 'video' (the same for every prompt), "
                         f"got {settings.start_with!r}")
    kind = starts.pop()
    size = generator._image_size(settings) if kind == "image" else settings.video_size
    if size is None:
        raise ValueError(f"speculative decoding needs the {kind}'s size: pass {kind}_size")
    t = lambda x: torch.tensor([x], device=grammar.masks.device)  # noqa: E731
    ih, iw = size if kind == "image" else (0, 0)
    vt, vh, vw = size if kind == "video" else (0, 0, 0)
    if generator.layout.header is not None:
        grammar.set_image_header(generator.tokenizer.image_header(ih, iw))
    state = GrammarState.start(t(TEXT), req_h=t(ih), req_w=t(iw), req_t=t(vt), req_vh=t(vh), req_vw=t(vw),
                               max_media=t(1))
    sampled = M_IMAGE if kind == "image" else M_VIDEO
    offset = v.image_offset if kind == "image" else v.video_offset
    template = [v.boi if kind == "image" else v.bov]
    state = grammar.advance(state, t(template[0]))
    while int(state.phase) not in (TEXT, DONE):
        mclass, forced = grammar.constraints(state)
        if int(forced) >= 0:
            template.append(int(forced))
        elif int(mclass) == sampled:
            template.append(-1)
        else:
            raise ValueError(f"speculative decoding needs every size of the {kind} requested ({kind}_size)")
        state = grammar.advance(state, t(template[-1] if template[-1] >= 0 else offset))
    return template, kind


def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The lossless acceptance rule, for a batch of positions.

    Args:
        p: ``(N, K)`` target probabilities.
        q: ``(N, K)`` the probabilities each draft was drawn from.
        draft: ``(N,)`` the drafted indices.
        generator: the source of randomness.

    Returns:
        ``accepted (N,)`` bool (probability ``min(1, p[x] / q[x])``) and ``fallback (N,)``: a draw from the
        normalised residual ``max(0, p - q)``, which replaces the draft where it is rejected.
    """
    u = torch.rand(draft.shape, device=p.device, generator=generator)
    px, qx = p.gather(-1, draft[:, None])[:, 0], q.gather(-1, draft[:, None])[:, 0]
    accepted = u * qx < px  # u < p/q without dividing by a zero q
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)  # p == q: never rejected anyway
    return accepted, _draw(residual, generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs (…, K)``: the exponential race (zero-probability ids never win)."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


@torch.no_grad()
def generate_speculative(generator: Generator, prompts: list[TokenSequence], settings: GenerationSettings, *,
                         window: int = 16, negatives: list[TokenSequence] | None = None
                         ) -> tuple[list[RowDone], SpeculativeStats]:
    """One image (or video) per prompt by speculative Jacobi decoding; same output distribution as ``generate``.

    Args:
        generator: the engine's ``Generator`` (its model, tokenizer and grammar).
        prompts: tokenized prompts.
        settings: as for ``Generator.generate``; ``start_with`` and the size must fix the span (see the
            module docstring), ``max_images`` is taken as 1, and the modality's ``top_k`` / ``top_p`` must be off.
        window: ids per row and forward pass (1 is plain decoding, one forward per id).
        negatives: one negative prompt per prompt for the guidance twins, as ``Generator.stream`` takes them.

    Returns:
        One ``RowDone`` per prompt (reason ``"max_images"``) and the ``SpeculativeStats``.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    template, kind = span_template(generator, settings)
    cfg = settings.image if kind == "image" else settings.video
    if cfg.top_k or cfg.top_p < 1.0:
        raise ValueError(f"speculative decoding samples the full distribution: set the {kind} top_k=0 and top_p=1.0")
    v, model, dev = generator.vocab, generator.model, generator.device
    offset = v.image_offset if kind == "image" else v.video_offset
    k = v.image_codebook_size if kind == "image" else v.video_codebook_size
    budget = generator._check(prompts, settings, negatives)  # validates the request; the span fits
    run = generator._start(prompts, settings, budget, negatives)
    b, guided, width = run.b, run.guided and cfg.guided, run.width
    rows = model.cache_valid.shape[0]
    gen = run.generator
    n_pos = len(template)
    forced = torch.tensor(template, device=dev)  # (T,) forced id or -1
    is_forced = forced >= 0
    codes_before = torch.cumsum(~is_forced, 0) - (~is_forced).long()  # (T,) codes of the span before each position
    unguided = codes_before.float() / max(1, int((~is_forced).sum())) < cfg.guidance_start  # guidance_start's codes
    # the draft of every position and the distribution it was drawn from (uniform until a forward redraws it)
    draft = torch.where(is_forced, forced, offset + torch.randint(k, (b, n_pos), device=dev, generator=gen))  # (B, T)
    q = torch.full((b, n_pos, k), 1.0 / k, device=dev)
    out = draft.clone()  # accepted ids; valid below each row's cursor
    cursor = torch.ones(b, dtype=torch.long, device=dev)  # <|boi|> / <|bov|> is forced and accepted
    forwards = drafted = accepted_total = 0
    while True:
        start = int(cursor.min())
        if start >= n_pos:
            break
        w = min(window, n_pos - start)  # chunk: template positions start-1 .. start+w-2, predicting start .. start+w-1
        idx = torch.arange(start - 1, start - 1 + w, device=dev)  # (W,)
        fed = torch.where(idx[None] < cursor[:, None], out[:, idx], draft[:, idx])  # (B, W)
        feed = fed.repeat(rows // b, 1)  # the guidance twins (one or two groups) read the same ids
        # every span id is valid for a twin too, so each row's position grows with the slot
        positions = run.positions[:, None] + (start - 1) + torch.arange(w, device=dev)[None]  # (R, W)
        logits = model.prefill(feed, positions=positions, start=width + start - 1, head=kind, all_positions=True,
                               twins=b if rows > b else 0)
        forwards += 1
        cond = logits[:b].float()
        if guided:
            cond = torch.where(unguided[idx + 1][None, :, None], cond,
                               guide(logits.float(), b, cfg.guidance_scale, cfg.source_scale))
        if cfg.temperature == 0:
            p = torch.nn.functional.one_hot(cond.argmax(-1), k).float()
        else:
            p = torch.softmax(cond / cfg.temperature, dim=-1)  # (B, W, K)
        pos = idx + 1  # the template position each logit predicts
        codes = draft[:, pos] - offset  # (B, W); meaningless where forced
        ok, fallback = verify(p.reshape(-1, k), q[:, pos].reshape(-1, k), codes.clamp(0, k - 1).reshape(-1), gen)
        ok, fallback = ok.view(b, w), fallback.view(b, w) + offset
        todo = pos[None] >= cursor[:, None]  # (B, W) positions not accepted yet
        sampled = todo & ~is_forced[pos][None]
        ok = ok | is_forced[pos][None] | ~todo
        # a row keeps its drafts up to the first rejection, which takes the residual draw
        first_bad = torch.where(ok, w, torch.arange(w, device=dev)[None]).min(-1).values  # (B,)
        j = torch.arange(w, device=dev)[None]
        take_draft = j < first_bad[:, None]
        take_fallback = j == first_bad[:, None]
        new = torch.where(take_draft, draft[:, pos], fallback)
        out[:, pos] = torch.where(todo & (take_draft | take_fallback), new, out[:, pos])
        drafted += int((sampled & (j <= first_bad[:, None])).sum())
        accepted_total += int((sampled & take_draft).sum())
        cursor = torch.maximum(cursor, start + (first_bad + 1).clamp(max=w))  # drafts kept, then the residual draw
        # Jacobi update: after the first rejection, this iteration's p (stale context) drafts the later positions
        stale = j > first_bad[:, None]
        redraft = offset + _draw(p, gen)  # (B, W)
        draft[:, pos] = torch.where(stale & ~is_forced[pos][None], redraft, draft[:, pos])
        q[:, pos] = torch.where(stale[..., None], p, q[:, pos])
    stats = SpeculativeStats(span_len=n_pos, forwards=forwards, plain_forwards=n_pos - 1, drafted=drafted,
                             accepted=accepted_total)
    done = []
    for row, tracker in enumerate(run.trackers):
        ids = out[row].tolist()
        for i, tok in enumerate(ids):
            for event in tracker.feed(tok, done=i == n_pos - 1):
                if isinstance(event, RowDone):
                    done.append(event)
    return done, stats
