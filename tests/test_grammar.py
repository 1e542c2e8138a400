"""The device-side grammar state machine: whatever the logits, every span it lets through is grammatical."""

import types

import pytest
import torch

from anygen.generation.grammar import DONE, TEXT, Grammar, GrammarState
from anygen.generation.sampling import sample
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.segments import Image, Text, Video
from tokenizers_mm.text import TextTokenizer


@pytest.fixture(scope="module")
def mm():
    text = TextTokenizer.train(["abc abd"] * 5, vocab_size=260)
    fake = types.SimpleNamespace(codebook_size=16, downsample=8)
    return MultimodalTokenizer(text, fake, fake, max_height=4, max_width=5, max_frames=3)


def _run(mm, req, steps=250, seed=0, boost_media=3.0):
    """Drive the grammar with random logits (biased towards opening spans) and return each row's ids."""
    v = mm.vocab
    grammar = Grammar(v)
    b = len(req)
    tensor = lambda i: torch.tensor([r[i] for r in req])  # noqa: E731
    state = GrammarState.start(torch.full((b,), TEXT), req_h=tensor(0), req_w=tensor(1), req_t=tensor(2),
                               max_media=torch.zeros(b, dtype=torch.long))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(b, v.size, generator=g)
        logits[:, [v.boi, v.bov]] += boost_media
        logits[:, v.eos] -= 6.0
        mclass, forced = grammar.constraints(state)
        logits = logits.masked_fill(~grammar.masks[mclass], float("-inf"))
        ones = torch.ones(b)
        tok = sample(logits, ones, torch.zeros(b, dtype=torch.long), ones, g)
        tok = torch.where(forced >= 0, forced, tok)
        out.append(tok)
        state = grammar.advance(state, tok)
    return torch.stack(out, dim=1), state


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_logits_give_grammatical_spans(mm, seed):
    req = [(0, 0, 0), (2, 3, 2), (4, 5, 1), (1, 1, 3)]
    ids, _ = _run(mm, req, seed=seed)
    for row, (rh, rw, rt) in enumerate(req):
        segs = mm.decode(ids[row], pixels=False, allow_partial=True)
        media = [s for s in segs if isinstance(s, (Image, Video))]
        assert media, "the biased logits should have opened at least one span"
        for s in media:
            if s.partial:
                assert s is segs[-1], "only the span at the very end may be cut off"
                continue
            if isinstance(s, Image):
                assert s.codes.dim() == 2
                if rh:
                    assert tuple(s.codes.shape) == (rh, rw)
            else:
                if rh:
                    assert tuple(s.codes.shape) == (rt, rh, rw)
        for s in segs:
            assert isinstance(s, (Text, Image, Video))


def test_image_span_has_exactly_h_times_w_plus_one_entries(mm):
    v = mm.vocab
    ids, _ = _run(mm, [(3, 4, 1)], steps=200, seed=5)
    seq = ids[0].tolist()
    start = seq.index(v.boi)
    end = seq.index(v.eoi, start)
    assert seq[start + 1:start + 3] == [v.h_token(3), v.w_token(4)]
    body = seq[start + 3:end]
    assert len(body) == 3 * (4 + 1)
    assert [body[i] for i in range(4, 15, 5)] == [v.eol] * 3
    assert all(v.image_offset <= c < v.video_offset for i, c in enumerate(body) if i % 5 != 4)


def test_max_media_stops_the_row(mm):
    v = mm.vocab
    grammar = Grammar(v)
    one = torch.ones(1, dtype=torch.long)
    state = GrammarState.start(torch.full((1,), TEXT), req_h=one, req_w=one, req_t=one, max_media=one)
    for tok in [v.boi, v.h_token(1), v.w_token(1), v.image_offset, v.eol]:
        state = grammar.advance(state, torch.tensor([tok]))
    _, forced = grammar.constraints(state)
    assert forced.item() == v.eoi
    state = grammar.advance(state, forced)
    assert state.phase.item() == DONE
    _, forced = grammar.constraints(state)
    assert forced.item() == v.pad


def test_eos_ends_the_row_and_text_mask_excludes_structure(mm):
    v = mm.vocab
    grammar = Grammar(v, allow_video=False)
    mask = grammar.masks[0]
    for name in ("eol", "eoi", "eof", "eov", "pad", "null", "und", "bos", "bov"):
        assert not mask[v.special(name)], name
    assert mask[v.boi] and mask[v.eos] and not mask[v.image_offset]
    zero = torch.zeros(1, dtype=torch.long)
    state = GrammarState.start(torch.full((1,), TEXT), req_h=zero, req_w=zero, req_t=zero, max_media=zero)
    state = grammar.advance(state, torch.tensor([v.eos]))
    assert state.phase.item() == DONE
