"""AnyGenModel: cached decode equals a full forward, left padding, routed losses, <|und|> filling, cache size."""

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

from anygen.config import AnyGenConfig
from anygen.model import AnyGenModel, document_segments, routed_cross_entropy, z_loss
from anygen.understanding import UnderstandingEncoder
from tokenizers_mm.vocab import Modality, Vocab

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second intra-op thread only adds OpenMP hand-off cost, badly so on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(seed: int = 0, **overrides) -> AnyGenModel:
    torch.manual_seed(seed)
    return AnyGenModel(AnyGenConfig.preset("tiny", **overrides)).eval()


def mixed_sequence(v: Vocab, und_tokens: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """A document with text, an understood image, a 2x3 generated image and a 1-frame 2x2 video.

    Returns the ids ``(T,)`` and the length of a prefix that contains every ``<|und|>`` position.
    """
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(0, v.text_size, (n,), generator=g).tolist()

    def codes(offset: int, k: int, n: int) -> list[int]:
        return (offset + torch.randint(0, k, (n,), generator=g)).tolist()

    prefix = [v.bos, *text(3), v.boi, *[v.und] * und_tokens, v.eoi, *text(2)]
    image = [v.boi, v.h_token(2), v.w_token(3)]
    for _ in range(2):
        image += [*codes(v.image_offset, v.image_codebook_size, 3), v.eol]
    video = [v.bov, v.t_token(1), v.h_token(2), v.w_token(2)]
    for _ in range(2):
        video += [*codes(v.video_offset, v.video_codebook_size, 2), v.eol]
    tail = [*image, v.eoi, *text(2), *video, v.eof, v.eov, v.eos]
    return torch.tensor(prefix + tail), len(prefix)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("qk_norm", ["none", "rms", "layernorm"])
@pytest.mark.parametrize("post_norm", [False, True])
@pytest.mark.parametrize("head_mode", ["routed", "shared"])
@pytest.mark.parametrize("n_kv_head", [2, 4], ids=["gqa", "mha"])
def test_cached_decode_equals_forward(qk_norm, post_norm, head_mode, n_kv_head):
    model = build(qk_norm=qk_norm, post_norm=post_norm, head_mode=head_mode, n_kv_head=n_kv_head)
    v = model.vocab
    ids, p = mixed_sequence(v, model.config.und_tokens)
    tags = v.modality(ids)
    assert {Modality.TEXT, Modality.IMAGE, Modality.VIDEO, Modality.UND} <= set(tags.tolist())
    assert not (tags[p:] == Modality.UND).any()
    ids, und = ids[None], pixels(1)
    full = model(ids, und_pixels=und)  # (1, T, V)
    assert full.shape == (1, ids.shape[1], v.size)

    model.setup_cache(1, 64)
    real = torch.ones(1, p, dtype=torch.bool)
    logits = model.prefill(ids[:, :p], positions=torch.arange(p)[None], attention_mask=real, und_pixels=und)
    torch.testing.assert_close(logits, full[:, p - 1], atol=ATOL, rtol=0)
    for i in range(p, ids.shape[1]):
        logits = model.decode_step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)


def test_left_padded_row_matches_row_alone():
    model = build()
    v, n_und = model.vocab, model.config.und_tokens
    long_ids, _ = mixed_sequence(v, n_und, seed=1)
    short_ids, _ = mixed_sequence(v, n_und, seed=2)
    long_ids, short_ids = long_ids[:40], short_ids[:30]
    pad = len(long_ids) - len(short_ids)
    batch = torch.stack([long_ids, torch.cat([torch.full((pad,), v.pad), short_ids])])  # (2, 40), row 1 left-padded
    mask = batch != v.pad
    positions = AnyGenModel.default_positions(batch, mask)
    assert positions[1, pad].item() == 0 and positions[1, -1].item() == len(short_ids) - 1
    und = pixels(2, seed=3)  # row-major: row 0's image, then row 1's

    # full forward: padding changes nothing for the real positions
    full_batch = model(batch, attention_mask=mask, und_pixels=und)
    full_alone = model(short_ids[None], und_pixels=und[1:])
    torch.testing.assert_close(full_batch[1, pad:], full_alone[0], atol=ATOL, rtol=0)

    # prefill, then decode the same continuation in both settings
    model.setup_cache(2, 64)
    batch_logits = model.prefill(batch, positions=positions, attention_mask=mask, und_pixels=und)
    alone = build()
    alone.setup_cache(1, 64)
    alone_logits = alone.prefill(short_ids[None], und_pixels=und[1:])
    torch.testing.assert_close(batch_logits[1], alone_logits[0], atol=ATOL, rtol=0)
    continuation = [v.boi, v.h_token(1), v.w_token(2), v.image_offset + 7, v.image_offset + 9, v.eol, v.eoi, 17]
    for step, token in enumerate(continuation):
        slot = len(long_ids) + step
        batch_logits = model.decode_step(torch.tensor([token, token]), slot=torch.tensor(slot),
                                         positions=torch.tensor([slot, len(short_ids) + step]))
        alone_logits = alone.decode_step(torch.tensor([token]), slot=torch.tensor(len(short_ids) + step),
                                         positions=torch.tensor([len(short_ids) + step]))
        torch.testing.assert_close(batch_logits[1], alone_logits[0], atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_prefill():
    model = build()
    ids, p = mixed_sequence(model.vocab, model.config.und_tokens)
    ids = ids[None]
    full = model(ids, und_pixels=pixels(1))
    model.setup_cache(1, 64)
    model.prefill(ids[:, :p], und_pixels=pixels(1))
    logits = model.prefill(ids[:, p:], start=p)  # positions default to p.. (tokens already cached)
    torch.testing.assert_close(logits, full[:, -1], atol=ATOL, rtol=0)
    # a new prefill at slot 0 forgets the previous sequence
    logits = model.prefill(ids[:, :p], und_pixels=pixels(1))
    torch.testing.assert_close(logits, full[:, p - 1], atol=ATOL, rtol=0)


def test_decode_step_captures_as_one_graph():
    """No host sync / value-dependent branch: Dynamo traces the step with fullgraph=True."""
    model = build()
    ids, p = mixed_sequence(model.vocab, model.config.und_tokens)
    ids = ids[None]
    full = model(ids, und_pixels=pixels(1))
    model.setup_cache(1, 64)
    model.prefill(ids[:, :p], und_pixels=pixels(1))
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True)
    for i in range(p, p + 4):
        logits = step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)


def test_routed_cross_entropy_uses_each_modality_slice():
    v = Vocab(**AnyGenConfig.preset("tiny").vocab_dict())
    torch.manual_seed(0)
    logits = torch.randn(2, 3, v.size) * 3
    targets = torch.tensor([[5, v.image_offset + 10, v.video_offset + 3], [v.eol, v.image_offset, -100]])
    loss_mask = torch.tensor([[True, True, True], [True, True, False]])
    per_pos = routed_cross_entropy(logits, targets, v, loss_mask, reduction="none")
    slices = {0: (0, v.image_offset), 1: (v.image_offset, v.video_offset), 2: (v.video_offset, v.size)}
    expected = torch.zeros(2, 3)
    for b, t in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        target = int(targets[b, t])
        lo, hi = next(s for s in slices.values() if s[0] <= target < s[1])
        expected[b, t] = -torch.log_softmax(logits[b, t, lo:hi], dim=-1)[target - lo]
    torch.testing.assert_close(per_pos, expected)
    assert per_pos[1, 2] == 0  # masked (and an ignore id) contributes nothing
    mean = routed_cross_entropy(logits, targets, v, loss_mask)
    torch.testing.assert_close(mean, expected.sum() / 5)
    # the image target differs from a full-vocabulary CE: the routing matters
    full_ce = F.cross_entropy(logits[0, 1], targets[0, 1])
    assert not torch.isclose(full_ce, expected[0, 1])
    # shared mode is plain CE over the whole vocabulary
    shared = routed_cross_entropy(logits[0], targets[0], v, head_mode="shared")
    torch.testing.assert_close(shared, F.cross_entropy(logits[0], targets[0]))
    # z-loss: weight * logsumexp(slice)^2 per target; z_loss() over the full logits
    zw = routed_cross_entropy(logits, targets, v, loss_mask, z_loss_weight=0.1, reduction="none")
    lse_image = torch.logsumexp(logits[0, 1, v.image_offset:v.video_offset], dim=-1)
    torch.testing.assert_close(zw[0, 1], expected[0, 1] + 0.1 * lse_image**2)
    torch.testing.assert_close(z_loss(logits[0]), torch.logsumexp(logits[0], -1).square().mean())


def test_model_loss_trains():
    model = build(z_loss_weight=1e-4).train()
    ids, _ = mixed_sequence(model.vocab, model.config.und_tokens)
    ids = ids[None]
    loss = model.loss(model(ids[:, :-1], und_pixels=pixels(1)), ids[:, 1:], ids[:, 1:] != model.vocab.und)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.embed["image"].weight.grad is not None and model.und.aligner[0].weight.grad is not None
    # the SigLIP tower is frozen by default and stays in eval mode under model.train()
    assert all(p.grad is None and not p.requires_grad for p in model.und.tower.parameters())
    assert not model.und.tower.training


def test_und_count_mismatch_and_bad_inputs():
    model = build()
    v = model.vocab
    ids, p = mixed_sequence(v, model.config.und_tokens)
    ids = ids[None]
    with pytest.raises(ValueError, match="16 <\\|und\\|> positions.*2 images x 16 tokens = 32"):
        model(ids, und_pixels=pixels(2))
    with pytest.raises(ValueError, match="16 <\\|und\\|> positions.*0 images"):
        model(ids)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(ids, und_pixels=torch.zeros(1, 3, 16, 16))
    bad = ids.clone()
    bad[0, 2] = v.size
    with pytest.raises(ValueError, match=f"unknown token id {v.size}"):
        model(bad, und_pixels=pixels(1))
    model.setup_cache(1, 64)
    with pytest.raises(ValueError, match="unknown token id"):
        model.prefill(bad, und_pixels=pixels(1))
    with pytest.raises(ValueError, match="does not fit"):
        model.prefill(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, ids.shape[1]), und_pixels=pixels(1))
    no_und = build(und_encoder=None)
    with pytest.raises(ValueError, match="no understanding encoder"):
        no_und(ids)
    with pytest.raises(RuntimeError, match="setup_cache"):
        no_und.prefill(ids[:, :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes(dtype):
    model = build()
    c = model.config
    model.setup_cache(3, 40, dtype=dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    assert model.cache_bytes() == 2 * c.n_layer * c.n_kv_head * c.head_dim * 40 * 3 * elem
    assert model.cache_valid.shape == (3, 40)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, c.max_seq_len + 1)


def test_tied_embeddings_share_storage():
    model = build(tie_embeddings=True)
    for name in ("text", "image", "video"):
        assert model.head[name].weight is model.embed[name].weight
    assert model.num_parameters() == model.config.num_parameters_estimate()


def test_understanding_encoder_from_local_dir(tmp_path):
    cfg = AnyGenConfig.preset("tiny")
    tower = SiglipVisionModel(SiglipVisionConfig(**cfg.und_encoder_kwargs()))
    tower.save_pretrained(tmp_path / "siglip")
    enc = UnderstandingEncoder(AnyGenConfig.preset("tiny", und_encoder_path=str(tmp_path / "siglip")))
    for (name, a), b in zip(tower.state_dict().items(), enc.tower.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert enc(pixels(2)).shape == (2, 16, cfg.d_model)
    with pytest.raises(FileNotFoundError, match="und_encoder_path"):
        UnderstandingEncoder(AnyGenConfig.preset("tiny", und_encoder_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="unknown SiglipVisionConfig keys"):
        UnderstandingEncoder(AnyGenConfig.preset("tiny", und_encoder={**cfg.und_encoder, "hiden_size": 8}))


def test_trainable_understanding_encoder_gets_gradients():
    model = build(und_trainable=True).train()
    assert model.und.tower.training
    model.und(pixels(1)).sum().backward()
    assert all(p.grad is not None for p in model.und.tower.parameters() if p.requires_grad)
    assert model.num_parameters(trainable_only=True) == model.num_parameters()


def test_packed_documents_equal_documents_alone():
    """Two documents packed in one row with document_ids give the logits each gives alone."""
    torch.manual_seed(0)
    model = AnyGenModel(AnyGenConfig.preset("tiny", und_encoder=None)).eval()
    a = torch.randint(0, 200, (1, 7))
    b = torch.randint(0, 200, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        together = model(packed, document_ids=doc)
        torch.testing.assert_close(together[:, :7], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[:, 7:], model(b), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(packed)[:, 7:], model(b), atol=1e-3)
    with pytest.raises(ValueError, match="document_ids must have the shape of ids"):
        model(packed, document_ids=doc[:, :3])


def test_document_segments_spans_and_fallbacks():
    """Runs of equal ids become spans; padding-only runs are dropped; a split or half-padded document falls back."""
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    assert document_segments(doc) == [[(0, 3), (3, 5), (5, 6)], [(0, 2), (2, 6)]]
    real = torch.tensor([[True] * 5 + [False], [True] * 6])
    assert document_segments(doc, real) == [[(0, 3), (3, 5)], [(0, 2), (2, 6)]]
    assert document_segments(torch.tensor([[0, 0, 1, 0]])) is None  # document 0 comes back: dense mask
    half = torch.tensor([[True, True, True, True, False, True]])
    assert document_segments(doc[:1], half) is None  # padding inside document 1's span: dense mask


def test_per_document_attention_equals_the_dense_mask(monkeypatch):
    """Packed rows with padding (as training's): per-document attention gives the dense mask's logits and gradients."""
    torch.manual_seed(0)
    model = AnyGenModel(AnyGenConfig.preset("tiny", und_encoder=None, n_kv_head=2)).train()
    ids = torch.randint(0, 200, (2, 16))
    doc = torch.tensor([[0] * 5 + [1] * 8 + [2] * 3, [0] * 9 + [1] * 4 + [2] * 3])
    real = torch.ones_like(ids, dtype=torch.bool)
    real[0, 13:] = False  # row 0 ends in padding, a document of its own (as trainers.data packs it)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(ids, document_ids=doc, attention_mask=real)
        logits[real].logsumexp(-1).sum().backward()
        return logits[real].detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    per_document, grads = run()
    monkeypatch.setattr("anygen.model.document_segments", lambda *args: None)  # force the dense (T, T) mask
    dense, dense_grads = run()
    torch.testing.assert_close(per_document, dense, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(dense_grads) > 0
    for g, h in zip(grads, dense_grads):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


# -- image_grid_embed: row and column embeddings of image codes ---------------------------------------------------


def grid_reference(ids: list[int], v: Vocab) -> list[tuple[int, int] | None]:
    """(row, col) of every image code by walking the sequence: <|boi|> opens an image, <|eol|> ends a row."""
    out, row, col = [], 0, 0
    for token in ids:
        if token == v.boi:
            row, col = 0, 0
        elif token == v.eol:
            row, col = row + 1, 0
        elif v.image_offset <= token < v.video_offset:
            out.append((row, col))
            col += 1
            continue
        out.append(None)
    return out


def two_images(v: Vocab) -> torch.Tensor:
    """Text, a 2x3 image, a clip (its own <|eol|> rows), a 3x2 image, text: (1, T)."""
    code = v.image_offset + 5
    ids = [v.bos, 11, 12, v.boi, v.h_token(2), v.w_token(3), *([code] * 3 + [v.eol]) * 2, v.eoi, 13,
           v.bov, v.t_token(1), v.h_token(2), v.w_token(2), *([v.video_offset + 1] * 2 + [v.eol]) * 2, v.eof, v.eov,
           v.boi, v.h_token(3), v.w_token(2), *([code + 1] * 2 + [v.eol]) * 3, v.eoi, 14, v.eos]
    return torch.tensor([ids])


def test_image_grid_coords_match_a_walk_and_continue_across_chunks():
    from anygen.model import image_grid_coords

    v = build(image_grid_embed=True).vocab
    ids = two_images(v)
    coords, after = image_grid_coords(ids, v)
    expected = grid_reference(ids[0].tolist(), v)
    got = [tuple(c) if c[0] >= 0 else None for c in coords[0].tolist()]
    assert got == expected  # -1 wherever the id is not an image code
    assert [e for e in expected if e][:6] == [(r, c) for r in range(2) for c in range(3)]
    assert [e for e in expected if e][-2:] == [(2, 0), (2, 1)]  # the second image's last row
    for k in range(1, ids.shape[1]):  # a chunk after k cached tokens continues the state of token k - 1
        tail, _ = image_grid_coords(ids[:, k:], v, after[:, k - 1])
        mask = torch.tensor([e is not None for e in expected[k:]])
        assert torch.equal(tail[0][mask], coords[0, k:][mask]), k
    state = None  # one id at a time, as decode_step feeds them (the scan-free branch): the same coords and states
    for k in range(ids.shape[1]):
        one, state = image_grid_coords(ids[:, k:k + 1], v, state)
        assert torch.equal(one[:, 0], coords[:, k]) and torch.equal(state[:, 0], after[:, k]), k
        state = state[:, 0]


def _random_grid(model: AnyGenModel, seed: int = 0) -> AnyGenModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in model.grid_embed.values():
            table.weight.copy_(torch.randn(table.weight.shape, generator=g) * 0.5)
    return model


def test_image_grid_embed_decode_equals_forward_and_changes_only_image_codes():
    model = _random_grid(build(image_grid_embed=True))
    v = model.vocab
    ids = two_images(v)
    full = model(ids)
    model.setup_cache(1, 64)
    p = 8  # inside the first image's first row
    torch.testing.assert_close(model.prefill(ids[:, :p]), full[:, p - 1], atol=ATOL, rtol=0)
    for i in range(p, ids.shape[1]):
        logits = model.decode_step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)
    # a chunked prefill that starts mid-image, and a rewrite of slots (speculative drafts) from there
    logits = model.prefill(ids[:, 11:], start=11)  # the second row's second code: state (1, 1)
    torch.testing.assert_close(logits, full[:, -1], atol=ATOL, rtol=0)
    logits = model.prefill(ids[:, 7:], start=7, all_positions=True)
    torch.testing.assert_close(logits, full[:, 7:], atol=ATOL, rtol=0)

    # zero tables (the init) give the model without them; the random ones change what follows the first code
    plain = build(image_grid_embed=False)
    zero = build(image_grid_embed=True)
    assert all(not t.weight.any() for t in zero.grid_embed.values())
    missing = zero.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["grid_embed.col.weight", "grid_embed.row.weight"]
    torch.testing.assert_close(zero(ids), plain(ids), atol=ATOL, rtol=0)
    zero.grid_embed.load_state_dict(model.grid_embed.state_dict())
    first_code = int((ids[0] == v.image_offset + 5).nonzero()[0])
    differs = (zero(ids) - plain(ids)).abs().amax(-1)[0] > 1e-4
    assert not differs[:first_code].any() and differs[first_code:].all()


def test_image_grid_embed_decode_step_captures_as_one_graph():
    model = _random_grid(build(image_grid_embed=True))
    ids = two_images(model.vocab)
    full = model(ids)
    model.setup_cache(1, 64)
    model.prefill(ids[:, :7])
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True)
    for i in range(7, 12):
        logits = step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)


def test_image_grid_embed_config_is_checked_and_counted():
    with pytest.raises(ValueError, match="image_grid_embed must be a bool"):
        AnyGenConfig.preset("tiny", image_grid_embed=1)
    config = AnyGenConfig.preset("tiny", image_grid_embed=True)
    assert config.num_parameters_estimate() == AnyGenModel(config).num_parameters()
    assert config.num_parameters_estimate() - AnyGenConfig.preset("tiny").num_parameters_estimate() \
        == (config.max_height + config.max_width) * config.d_model


# -- image_copy_hint (experimental): the earlier image's code at the next cell ---------------------------------


def test_image_copy_hints_give_the_earlier_images_code_at_the_next_cell():
    from anygen.model import image_copy_hints

    v = build().vocab
    c = [v.image_offset + k for k in range(10)]
    ids = torch.tensor([[v.bos, v.boi, c[1], c[2], v.eol, c[3], c[4], v.eol, v.eoi, 7,
                         v.boi, c[5], c[6], v.eol, c[7], c[8], v.eol, v.eoi, 8,
                         v.boi, c[9], v.eol, v.eoi]])
    got = image_copy_hints(ids, v)[0].tolist()
    none = -1
    expected = [none] * 10  # the first image and the text after it: no earlier image
    # the second image: <|boi|> predicts cell (0, 0), each code the next cell, an <|eol|> the next row's first
    expected += [1, 2, none, 3, 4, none, none, none, none]  # a row's last code and the last <|eol|>: no cell
    # the third image copies from the second, not the first; the hints follow the earlier image's cells (a 1 x 1
    # image's code and <|eol|> get the 2 x 2 one's (0, 1) and (1, 0): the forced <|eol|> / <|eoi|> come next anyway)
    expected += [5, 6, 7, none]
    assert got == expected
    # a document boundary before the second image: it has no earlier image in its document; the third does
    docs = torch.tensor([[0] * 10 + [1] * (ids.shape[1] - 10)])
    split = image_copy_hints(ids, v, docs)[0].tolist()
    assert split[:19] == [none] * 19 and split[19:] == expected[19:]
    # queries and a key mask, as the KV cache asks: the same hints slot by slot; a masked-out image gives none
    for q in range(ids.shape[1]):
        one = image_copy_hints(ids[:, :q + 1], v, queries=torch.tensor([[q]]))
        assert one.tolist() == [[expected[q]]], q
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, 10:19] = False  # the second image masked out (a guidance twin's reset): the third finds nothing
    assert image_copy_hints(ids, v, valid=valid)[0, 19:].tolist() == [none] * 4


def test_image_copy_hint_starts_as_the_plain_model_and_then_reads_the_earlier_image():
    plain = build(image_grid_embed=True)
    model = build(image_grid_embed=True, image_copy_hint=True)
    assert not model.copy_hint.weight.any()  # zero at init
    assert model.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["copy_hint.weight"]
    v = model.vocab
    ids = two_images(v)
    same = torch.cat([ids[:, :16], ids[:, 3:15], ids[:, -2:]], dim=1)  # a 2x3 image, text, the same image again
    torch.testing.assert_close(model(same), plain(same), atol=ATOL, rtol=0)
    with torch.no_grad():
        model.copy_hint.weight.normal_(0, 0.5)
    other = same.clone()
    other[0, 7] = v.image_offset + 9  # the first image's cell (0, 1)
    second = 16  # the second image's <|boi|>; its first code (slot 19) predicts cell (0, 1)
    with torch.no_grad():
        delta = (model(other) - model(same)).abs().amax(-1)[0]
        saved = model.copy_hint.weight.clone()
        model.copy_hint.weight.zero_()
        through_attention = (model(other) - model(same)).abs().amax(-1)[0]
        model.copy_hint.weight.copy_(saved)
    assert delta[second + 3] > through_attention[second + 3] + 1e-4  # the hint adds its own path there
    assert not delta[:7].any()  # causal: nothing before the change moves
    loss = model(same).logsumexp(-1).mean()
    loss.backward()
    assert model.copy_hint.weight.grad.abs().sum() > 0


def test_image_copy_logit_adds_its_gate_to_the_hint_code_only():
    from anygen.model import image_copy_hints

    plain = build(image_grid_embed=True)
    model = build(image_grid_embed=True, image_copy_logit=True)
    assert sorted(model.load_state_dict(plain.state_dict(), strict=False).missing_keys) == \
        ["copy_gate.bias", "copy_gate.weight"]
    v = model.vocab
    ids = two_images(v)
    same = torch.cat([ids[:, :16], ids[:, 3:15], ids[:, -2:]], dim=1)  # a 2x3 image, text, the same image again
    torch.testing.assert_close(model(same), plain(same), atol=ATOL, rtol=0)  # zero at init
    with torch.no_grad():
        model.copy_gate.bias.fill_(2.5)
    hint = image_copy_hints(same, v)[0]
    delta = (model(same) - plain(same))[0]  # (T, V)
    expected = torch.zeros_like(delta)
    rows = (hint >= 0).nonzero().flatten()
    expected[rows, v.image_offset + hint[rows]] = 2.5
    assert len(rows) > 0
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=0)
    model(same).logsumexp(-1).mean().backward()
    assert model.copy_gate.weight.grad.abs().sum() > 0 and model.copy_gate.bias.grad.abs() > 0


def test_guidance_twins_get_their_rows_copy_bonus_so_guidance_leaves_it_out():
    """``twins=b``: rows b.. (guidance twins, which see no earlier image) get their row's bonus on their row's hint
    code and nothing else changes, so ``u + s·(c − u)`` counts the bonus once, not ``s`` times."""
    from anygen.model import image_copy_hints

    model = build(image_grid_embed=True, image_copy_logit=True)
    with torch.no_grad():
        model.copy_gate.bias.fill_(2.5)
    v = model.vocab
    ids = two_images(v)
    same = torch.cat([ids[:, :16], ids[:, 3:15], ids[:, -2:]], dim=1)  # an image, text, the same image again
    twin = torch.cat([torch.full((1, 14), v.pad), torch.tensor([[v.bos, v.null]]), ids[:, 3:15], ids[:, -2:]], 1)
    rows = torch.cat([same, twin])  # (2, 30): the second image in the same slots
    mask = rows != v.pad
    hint = image_copy_hints(same, v)[0]
    assert (hint >= 0).sum() > 0 and (image_copy_hints(twin, v) < 0).all()
    expected = torch.zeros(rows.shape[1], v.size)
    at = (hint >= 0).nonzero().flatten()
    expected[at, v.image_offset + hint[at]] = 2.5
    model.setup_cache(2, 40)
    plain = model.prefill(rows, attention_mask=mask, all_positions=True)
    paired = model.prefill(rows, attention_mask=mask, all_positions=True, twins=1)
    torch.testing.assert_close(paired[0], plain[0], atol=0, rtol=0)
    torch.testing.assert_close(paired[1] - plain[1], expected, atol=1e-5, rtol=0)
    model.setup_cache(3, 40)  # image guidance: a second twin group gets the row's bonus too
    rows3, mask3 = torch.cat([rows, twin]), torch.cat([mask, twin != v.pad])
    grouped = model.prefill(rows3, attention_mask=mask3, all_positions=True, twins=1)
    torch.testing.assert_close(grouped[0], plain[0], atol=ATOL, rtol=0)
    for twin_row in (1, 2):
        torch.testing.assert_close(grouped[twin_row] - plain[1], expected, atol=1e-4, rtol=0)
    model.setup_cache(2, 40)
    steps = {}
    for twins in (0, 1):  # one token at a time through the cache: the same
        model.prefill(rows[:, :20], attention_mask=mask[:, :20])
        positions = mask[:, :20].sum(-1)
        steps[twins] = model.decode_step(rows[:, 20], slot=20, positions=positions, twins=twins, head="image")
    image = slice(v.image_offset, v.video_offset)
    torch.testing.assert_close(steps[0], plain[:, 20, image], atol=ATOL, rtol=0)
    bonus = torch.stack([torch.zeros_like(expected[20]), expected[20]])[:, image]
    torch.testing.assert_close(steps[1] - steps[0], bonus, atol=1e-5, rtol=0)
    for bad in (2, -1, 3):
        with pytest.raises(ValueError, match="twins must be 0 or divide the batch into two groups or more"):
            model.decode_step(rows[:, 20], slot=20, positions=positions, twins=bad)


@pytest.mark.parametrize("extra", [{"image_copy_hint": True}, {"image_copy_logit": True},
                                   {"image_copy_hint": True, "image_copy_logit": True}])
def test_image_copy_hints_decode_equals_forward(extra):
    """The KV-cached path finds the same hints: prefill, chunks from mid-image, one token at a time, each head."""
    model = build(image_grid_embed=True, **extra)
    with torch.no_grad():
        for p in [model.copy_hint.weight] if model.copy_hint is not None else []:
            p.normal_(0, 0.5)
        if model.copy_gate is not None:
            model.copy_gate.weight.normal_(0, 0.5)
            model.copy_gate.bias.fill_(1.0)
    v = model.vocab
    ids = two_images(v)
    ids = torch.cat([ids[:, :16], ids[:, 3:15], ids[:, 3:15], ids[:, -2:]], dim=1)  # an image, text, it twice more
    full = model(ids)
    model.setup_cache(1, 64)
    p = 20  # inside the second image
    torch.testing.assert_close(model.prefill(ids[:, :p]), full[:, p - 1], atol=ATOL, rtol=0)
    for i in range(p, ids.shape[1]):
        logits = model.decode_step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)
    image = model.decode_step(ids[:, -3], slot=torch.tensor(ids.shape[1] - 3),
                              positions=torch.tensor([ids.shape[1] - 3]), head="image")
    torch.testing.assert_close(image, full[:, -3, v.image_offset:v.video_offset], atol=ATOL, rtol=0)
    logits = model.prefill(ids[:, 22:], start=22, all_positions=True)  # a chunk from mid-image (drafts rewritten)
    torch.testing.assert_close(logits, full[:, 22:], atol=ATOL, rtol=0)
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True)  # no host sync, no branch on values
    model.prefill(ids[:, :30])
    for i in range(30, 34):
        logits = step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)


def test_image_copy_hint_config_is_checked_and_counted():
    with pytest.raises(ValueError, match="image_copy_hint must be a bool"):
        AnyGenConfig.preset("tiny", image_copy_hint=1)
    with pytest.raises(ValueError, match="image_copy_hint / image_copy_logit look the hint codes up"):
        AnyGenConfig.preset("tiny", image_copy_hint=True, head_mode="shared")
    with pytest.raises(ValueError, match="image_copy_logit must be a bool"):
        AnyGenConfig.preset("tiny", image_copy_logit="yes")
    for extra in ({"image_copy_hint": True}, {"image_copy_logit": True}):
        config = AnyGenConfig.preset("tiny", **extra)
        assert config.num_parameters_estimate() == AnyGenModel(config).num_parameters()


# -- rope_grid: 2D rotary pairs for image codes ------------------------------------------------------------------


def test_rope_grid_turns_codes_by_row_and_column_and_leaves_the_rest_1d():
    from anygen.model import image_grid_coords, rope_cos_sin

    v, hd, theta, g = build().vocab, 16, 10000.0, 2
    ids = two_images(v)
    positions = torch.arange(ids.shape[1])[None]
    coords, _ = image_grid_coords(ids, v)
    cos, sin = rope_cos_sin(positions, hd, theta, coords, g)
    cells = grid_reference(ids[0].tolist(), v)
    for p, cell in enumerate(cells):  # the angle of each rotary pair, by hand
        angles = []
        for i in range(hd // 2):
            freq = theta ** (-2 * i / hd)
            if cell is not None and i < g:
                angles.append(cell[1] * freq)  # column
            elif cell is not None and i < 2 * g:
                angles.append(cell[0] * theta ** (-2 * (i - g) / hd))  # row, at the first pairs' frequencies
            else:
                angles.append(p * freq)
        expected = torch.tensor(angles + angles)
        torch.testing.assert_close(cos[0, 0, p], expected.cos(), atol=1e-5, rtol=0)
        torch.testing.assert_close(sin[0, 0, p], expected.sin(), atol=1e-5, rtol=0)
    plain = rope_cos_sin(positions, hd, theta)
    assert torch.equal(rope_cos_sin(positions, hd, theta, coords, 0)[0], plain[0])  # 0 pairs: 1D RoPE


def test_rope_grid_same_cell_of_two_images_meets_at_angle_zero():
    """A code attends to the same cell of an earlier image as if it were beside it, in the grid pairs: their
    rotations there are equal wherever the images lie, so the q.k of those pairs depends on content alone."""
    from anygen.model import apply_rope, image_grid_coords, rope_cos_sin

    v = build().vocab
    ids = two_images(v)
    coords, _ = image_grid_coords(ids, v)
    cells = grid_reference(ids[0].tolist(), v)
    first = cells.index((1, 1))  # (1, 1) of the first image (2x3) and of the second one (3x2)
    second = len(cells) - 1 - cells[::-1].index((1, 1))
    assert second - first > 10
    cos, sin = rope_cos_sin(torch.arange(ids.shape[1])[None], 16, 10000.0, coords, 2)
    x = torch.randn(1, 1, 1, 16).expand(1, 1, ids.shape[1], 16)
    rotated = apply_rope(x, cos, sin)[0, 0]  # (T, hd)
    grid_dims = [*range(4), *range(8, 12)]  # the first 4 pairs, in the rotate-half layout
    torch.testing.assert_close(rotated[first, grid_dims], rotated[second, grid_dims])
    assert not torch.allclose(rotated[first], rotated[second])  # the 1D pairs still see the distance


@pytest.mark.parametrize("grid_embed", [False, True])
def test_rope_grid_decode_equals_forward_and_text_is_untouched(grid_embed):
    model = build(rope_grid=2, image_grid_embed=grid_embed)
    if grid_embed:
        _random_grid(model)
    ids = two_images(model.vocab)
    full = model(ids)
    model.setup_cache(1, 64)
    p = 8
    torch.testing.assert_close(model.prefill(ids[:, :p]), full[:, p - 1], atol=ATOL, rtol=0)
    for i in range(p, ids.shape[1]):
        logits = model.decode_step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)
    logits = model.prefill(ids[:, 7:], start=7, all_positions=True)  # a rewrite from mid-image (speculative)
    torch.testing.assert_close(logits, full[:, 7:], atol=ATOL, rtol=0)
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True)
    model.prefill(ids[:, :7])
    for i in range(7, 12):
        torch.testing.assert_close(step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i])), full[:, i],
                                   atol=ATOL, rtol=0)
    # the same weights without grid pairs: equal up to the first image code, different from it on
    plain = build(rope_grid=0, image_grid_embed=grid_embed)
    plain.load_state_dict(model.state_dict())
    first_code = int(((ids[0] >= model.vocab.image_offset) & (ids[0] < model.vocab.video_offset)).nonzero()[0])
    differs = (plain(ids) - full).abs().amax(-1)[0] > 1e-4
    assert not differs[:first_code].any() and differs[first_code:].any()


def test_rope_grid_layers_turn_codes_by_cell_in_the_named_blocks_only():
    """rope_grid_layers=[1]: block 0 reads 1D positions, block 1 the grid pairs. With block 1 an identity (its
    residual writers zeroed) the model is the plain one; with it live, it differs from the plain and from the
    every-block model. Cached decoding still equals the full forward."""
    from trainers.unified import RESIDUAL_WRITERS

    ids = two_images(build().vocab)
    layered = build(rope_grid=2, rope_grid_layers=[1])
    plain, every = build(rope_grid=0), build(rope_grid=2)
    for other in (plain, every):
        other.load_state_dict(layered.state_dict())
    full = layered(ids)
    assert (full - plain(ids)).abs().amax() > 1e-4 and (full - every(ids)).abs().amax() > 1e-4
    layered.setup_cache(1, 64)
    layered.prefill(ids[:, :8])
    for i in range(8, ids.shape[1]):
        logits = layered.decode_step(ids[:, i], slot=torch.tensor(i), positions=torch.tensor([i]))
        torch.testing.assert_close(logits, full[:, i], atol=ATOL, rtol=0)
    layered.release_cache()
    with torch.no_grad():
        for name, p in layered.blocks[1].named_parameters():
            if name.startswith(RESIDUAL_WRITERS):
                p.zero_()
    plain.load_state_dict(layered.state_dict())
    torch.testing.assert_close(layered(ids), plain(ids), atol=ATOL, rtol=0)


def test_rope_grid_layers_config_is_checked():
    for bad in ([], [2], [-1], [0, 0], [True], "1"):
        with pytest.raises(ValueError, match=r"rope_grid_layers must be None \(every block\) or a non-empty list of "
                                             r"distinct block indices in 0\.\.1"):
            AnyGenConfig.preset("tiny", rope_grid=2, rope_grid_layers=bad)
    with pytest.raises(ValueError, match=r"rope_grid_layers \[1\] names blocks .* but rope_grid is 0"):
        AnyGenConfig.preset("tiny", rope_grid_layers=[1])
    config = AnyGenConfig.preset("tiny", rope_grid=2, rope_grid_layers=[1, 0])
    assert config.rope_grid_layers == [0, 1]
    assert AnyGenConfig.from_dict(config.to_dict()) == config


def test_rope_grid_config_is_checked():
    with pytest.raises(ValueError, match=r"rope_grid \(5\) takes 2 \* rope_grid of the head.s 8 rotary pairs: it "
                                         r"must be <= 4"):
        AnyGenConfig.preset("tiny", rope_grid=5)
    with pytest.raises(ValueError, match="rope_grid must be an int >= 0"):
        AnyGenConfig.preset("tiny", rope_grid=-1)
    config = AnyGenConfig.preset("tiny", rope_grid=2)
    assert AnyGenConfig.from_dict(config.to_dict()) == config
    assert config.num_parameters_estimate() == AnyGenConfig.preset("tiny").num_parameters_estimate()
