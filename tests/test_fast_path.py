"""The fast decode path equals the plain reference path on the tiny engine.

Greedy tokens are identical for text, image and video, with and without guidance, in mixed batches and in
an imported layout; the logits a fast step computes (one head, attention over a bucket of the cache) match
the plain step's to 1e-5. The compiled step is traced whole (``fullgraph``) with the ``eager`` backend, so
a graph break is caught on the CPU; its inductor / CUDA-graph modes run in ``bench/decode.py``.
"""

import pytest
import torch

from anygen.generation.events import ImageDone, ImageRows, ImageStarted, RowDone, TextDelta, VideoFrameDone
from anygen.generation.generator import CompiledStep, GenerationSettings, Generator
from anygen.generation.grammar import NEED_ALL, NEED_IMAGE, NEED_NONE, NEED_VIDEO, TEXT, GrammarState
from anygen.generation.sampling import SamplingConfig, sample, sample_unfiltered
from anygen.testing import random_engine

ATOL = 1e-5
GREEDY = SamplingConfig(temperature=0.0, guidance_scale=1.0)
GREEDY_CFG = SamplingConfig(temperature=0.0, guidance_scale=3.0)


@pytest.fixture(scope="module")
def engine():
    return random_engine("tiny", seed=0)


def _settings(**kw) -> GenerationSettings:
    base = dict(max_new_tokens=48, text=SamplingConfig(temperature=0.0), image_size=(3, 4), video_size=(2, 2, 3))
    return GenerationSettings(**{**base, **kw})


def _ids(engine, prompts, settings, **generator_kwargs) -> list[list[int]]:
    generator = Generator(engine.model, engine.tokenizer, **generator_kwargs)
    seqs = [engine.encode_prompt(p) for p in prompts]
    return [r.ids.tolist() for r in generator.generate(seqs, settings)]


@pytest.mark.parametrize("sampling", [GREEDY, GREEDY_CFG], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("start_with", [None, "image", "video", ["image", "video", None]],
                         ids=["text", "image", "video", "mixed"])
def test_fast_greedy_tokens_equal_plain(engine, sampling, start_with):
    prompts = ["a red circle", "draw a cat on a mat please", "move"]
    settings = _settings(image=sampling, video=sampling, start_with=start_with, max_images=2)
    plain = _ids(engine, prompts, settings, fast=False)
    fast = _ids(engine, prompts, settings)
    assert fast == plain
    v = engine.tokenizer.vocab
    if start_with is not None:  # the spans really were drawn (not all forced)
        assert any(v.image_offset <= t for row in fast for t in row)


@pytest.mark.parametrize("kv_bucket", [1, 7, 1024])
def test_any_kv_bucket_gives_the_same_tokens(engine, kv_bucket):
    settings = _settings(image=GREEDY_CFG, start_with="image", max_images=1)
    assert _ids(engine, ["a blue square"], settings, kv_bucket=kv_bucket) == \
        _ids(engine, ["a blue square"], settings, fast=False)


def test_fast_events_equal_plain(engine):
    """The stream (rows, previews, frames) is the same event for event."""
    settings = _settings(image=GREEDY_CFG, video=GREEDY_CFG, start_with=["image", "video"], max_images=1,
                         preview_every=1)
    seqs = [engine.encode_prompt(p) for p in ["a red circle", "move"]]

    def kinds(fast: bool) -> list[tuple]:
        events = Generator(engine.model, engine.tokenizer, fast=fast).stream(seqs, settings)
        keep = (TextDelta, ImageStarted, ImageRows, ImageDone, VideoFrameDone, RowDone)
        return [(type(e).__name__, e.row) for e in events if isinstance(e, keep)]

    assert kinds(True) == kinds(False)


def test_fast_sampling_is_seeded_and_grammatical(engine):
    settings = _settings(image=SamplingConfig(temperature=1.0, guidance_scale=3.0), start_with="image", max_images=1,
                         seed=7)
    first, again = _ids(engine, ["draw"], settings), _ids(engine, ["draw"], settings)
    assert first == again
    v = engine.tokenizer.vocab
    (ids,) = first
    assert ids[:3] == [v.boi, v.h_token(3), v.w_token(4)] and ids[-1] == v.eoi
    body = ids[3:-1]
    assert all(body[i] == v.eol for i in range(4, len(body), 5))
    assert len({t for i, t in enumerate(body) if i % 5 != 4}) > 1


def test_sampled_text_equals_plain(engine):
    """Text steps draw the plain sampler's noise from the same seed: sampled text is identical."""
    settings = _settings(text=SamplingConfig(temperature=1.0, top_p=0.9), max_new_tokens=30, seed=5)
    prompts = ["a red circle", "draw"]
    assert _ids(engine, prompts, settings) == _ids(engine, prompts, settings, fast=False)


def test_filtered_image_sampling_takes_the_sorting_sampler(engine):
    """top-k in a body: the fast loop's per-modality branch through ``sample`` still yields codes of the top k."""
    settings = _settings(image=SamplingConfig(temperature=1.0, top_k=1, guidance_scale=3.0), start_with="image",
                         max_images=1, seed=0)
    assert _ids(engine, ["a"], settings) == _ids(engine, ["a"], _settings(image=GREEDY_CFG, start_with="image",
                                                                           max_images=1))


def test_imported_layout_fast_equals_plain(tmp_path):
    """A Janus layout (no size tokens, no row ends, masked guidance twin) through the converter."""
    pytest.importorskip("transformers")
    from anygen import AnyGen
    from anygen.convert.tiny import save_tiny_janus

    engine = AnyGen.from_pretrained(save_tiny_janus(tmp_path / "janus"))
    settings = GenerationSettings(max_new_tokens=40, image=GREEDY_CFG, start_with="image", max_images=1)
    assert _ids(engine, ["draw a red circle"], settings) == _ids(engine, ["draw a red circle"], settings, fast=False)


@pytest.mark.parametrize("head_mode", ["routed", "shared"])
def test_fast_step_logits_match_plain(head_mode):
    """decode_step with a bucketed kv length and one head gives the plain step's logits, sliced."""
    engine = random_engine("tiny", seed=1, head_mode=head_mode)
    model, v = engine.model, engine.tokenizer.vocab
    torch.manual_seed(0)
    ids = torch.randint(0, v.text_size, (2, 12))
    model.setup_cache(2, 40)
    model.prefill(ids)
    plain = [model.decode_step(torch.tensor([v.image_offset + i, v.video_offset + i]), slot=12 + i,
                               positions=torch.tensor([12 + i, 12 + i])) for i in range(6)]
    model.prefill(ids)
    slices = {"text": slice(0, v.image_offset), "image": slice(v.image_offset, v.video_offset),
              "video": slice(v.video_offset, v.size), "all": slice(None)}
    for i, head in enumerate(["image", "video", "text", "all", "image", None]):
        fast = model.decode_step(torch.tensor([v.image_offset + i, v.video_offset + i]), slot=torch.tensor(12 + i),
                                 positions=torch.tensor([12 + i, 12 + i]), kv_len=16 if i < 4 else 24, head=head)
        if head is None:
            assert fast is None
        else:
            torch.testing.assert_close(fast, plain[i][:, slices[head]], atol=ATOL, rtol=0)


def test_next_head_reads_the_grammar(engine):
    grammar = Generator(engine.model, engine.tokenizer).grammar
    v = engine.tokenizer.vocab
    t = lambda *x: torch.tensor(x)  # noqa: E731
    state = GrammarState.start(t(TEXT, TEXT, TEXT, TEXT), req_h=t(0, 2, 0, 2), req_w=t(0, 1, 0, 1),
                               req_t=t(0, 0, 1, 0), req_vh=t(0, 0, 1, 0), req_vw=t(0, 0, 1, 0),
                               max_media=t(0, 0, 0, 0))
    state = grammar.advance(state, t(5, v.boi, v.bov, v.boi))  # text, image (2x1), video (1x1x1), image
    for tok in ([5, v.h_token(2), v.t_token(1), v.h_token(2)], [5, v.w_token(1), v.h_token(1), v.w_token(1)]):
        state = grammar.advance(state, torch.tensor(tok))
    _, forced = grammar.constraints(state)
    assert grammar.next_head(state, forced).tolist() == [NEED_ALL, NEED_IMAGE, NEED_NONE, NEED_IMAGE]
    state = grammar.advance(state, t(5, v.image_offset, v.w_token(1), v.image_offset))
    _, forced = grammar.constraints(state)
    assert grammar.next_head(state, forced).tolist() == [NEED_ALL, NEED_NONE, NEED_VIDEO, NEED_NONE]


def test_sample_unfiltered_has_the_distribution_of_sample():
    """Same law as ``sample`` with no top-k / top-p: a chi-square test on a 6-way toy distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, float("-inf")]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    fast = sample_unfiltered(logits, 0.7, g)
    ref = sample(logits, torch.full((20000,), 0.7), torch.zeros(20000, dtype=torch.long), torch.ones(20000), g)
    probs = torch.softmax(logits[0] / 0.7, -1)
    for draws in (fast, ref):
        counts = torch.bincount(draws, minlength=6).float()
        assert counts[5] == 0  # a masked id never wins
        expected = probs[:5] * len(draws)
        assert float(((counts[:5] - expected) ** 2 / expected).sum()) < 20.5  # chi-square, 4 dof, p = 4e-4
    assert torch.equal(sample_unfiltered(logits[:3], 0.0), logits[:3].argmax(-1))


def test_compiled_step_traces_whole(engine):
    """The whole fast step (decode, guidance, sampling, grammar) is one graph: fullgraph with the eager backend."""
    generator = Generator(engine.model, engine.tokenizer)
    compiled = CompiledStep(generator._step, backend="eager")
    generator._compiled = compiled
    settings = _settings(image=SamplingConfig(temperature=1.0, guidance_scale=3.0), start_with="image",
                         max_images=1, seed=3)
    seqs = [engine.encode_prompt("a red circle")]
    torch._dynamo.reset()
    out = generator.generate(seqs, settings)
    eager = Generator(engine.model, engine.tokenizer).generate(seqs, settings)
    assert out[0].ids.tolist() == eager[0].ids.tolist()  # the same seed draws the same noise outside the graph
    compiled.release()
    torch._dynamo.reset()


def test_engine_chooses_its_decode_loop(engine, tmp_path):
    """``AnyGen.from_pretrained(fast=False)`` runs the plain loop, and its greedy output equals the fast one's."""
    from anygen.api import AnyGen

    engine.save_pretrained(tmp_path / "ckpt")
    plain = AnyGen.from_pretrained(tmp_path / "ckpt", fast=False)
    fast = AnyGen.from_pretrained(tmp_path / "ckpt")
    assert (plain.generator.fast, fast.generator.fast) == (False, True)
    assert fast.generator._compiled is None  # the CPU compiles only when asked
    kw = dict(max_new_tokens=24, text={"temperature": 0.0}, image={"temperature": 0.0}, start_with="image",
              image_size=(2, 3), seed=0)
    assert plain.generate("a red circle", **kw).ids.tolist() == fast.generate("a red circle", **kw).ids.tolist()
    assert fast.to("cpu").generator.fast and not plain.to("cpu").generator.fast  # to() keeps the choice
    assert not fast.configure_decoding(fast=False).generator.fast


@pytest.fixture(scope="module", params=[{"image_grid_embed": True}, {"image_grid_embed": True, "rope_grid": 2},
                                        {"rope_grid": 2}], ids=["embed", "embed+rope", "rope"])
def grid_engine(request):
    """The tiny engine that tracks each image code's cell: row / column embeddings (``image_grid_embed``, far from
    zero), 2D rotary pairs (``rope_grid``), or both."""
    engine = random_engine("tiny", seed=0, **request.param)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for table in (engine.model.grid_embed or {}).values():
            table.weight.copy_(torch.randn(table.weight.shape, generator=g))
    return engine


def test_image_grid_embed_generation_follows_the_full_forward(grid_engine):
    """Every greedy image code the plain and the fast loop draw is the argmax of a full forward over the
    sequence, so the cached row / column state is the one the training forward computes."""
    model, v = grid_engine.model, grid_engine.tokenizer.vocab
    settings = _settings(image=GREEDY, start_with="image", max_images=1, max_new_tokens=40)
    prompt = grid_engine.encode_prompt("a red circle")
    for fast in (False, True):
        (result,) = Generator(model, grid_engine.tokenizer, fast=fast).generate([prompt], settings)
        ids = torch.cat([prompt.ids, result.ids])[None]
        with torch.no_grad():
            full = model(ids)[0, :, v.image_offset:v.video_offset]
        n = len(prompt.ids)
        codes = [j for j in range(n, ids.shape[1]) if v.image_offset <= ids[0, j] < v.video_offset]
        assert len(codes) == 12  # the 3x4 image
        assert [int(full[j - 1].argmax()) + v.image_offset for j in codes] == [int(ids[0, j]) for j in codes]


@pytest.mark.parametrize("sampling", [GREEDY, GREEDY_CFG], ids=["no-guidance", "guidance"])
def test_image_grid_embed_fast_and_speculative_equal_plain(grid_engine, sampling):
    from anygen.generation.speculative import generate_speculative

    settings = _settings(image=sampling, video=sampling, start_with=["image", None], max_images=2)
    prompts = ["a red circle", "draw a cat on a mat please"]
    plain = _ids(grid_engine, prompts, settings, fast=False)
    assert _ids(grid_engine, prompts, settings) == plain
    one = _settings(image=sampling, start_with="image", max_images=1, max_new_tokens=40)
    generator = Generator(grid_engine.model, grid_engine.tokenizer, fast=False)
    seqs = [grid_engine.encode_prompt(p) for p in prompts]
    reference = [r.ids.tolist() for r in generator.generate(seqs, one)]
    done, _ = generate_speculative(generator, seqs, one, window=4)
    assert [r.ids.tolist() for r in done] == reference


def test_image_grid_embed_refuses_a_layout_without_row_ends(grid_engine):
    import copy

    from tokenizers_mm.layout import ImageLayout

    tokenizer = copy.copy(grid_engine.tokenizer)
    tokenizer.layout = ImageLayout(size_tokens=False, row_end=False, default_size=(2, 2), guidance="masked")
    with pytest.raises(ValueError, match="image_grid_embed.*row_end=False"):
        Generator(grid_engine.model, tokenizer)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_a_call_that_can_only_draw_a_clip_runs_no_image_guidance_twins(engine, fast):
    """Text→video (every row opens with a clip, max_images 1) at image guidance 3 and clip guidance 1: no twin rows
    (the cache holds one row per prompt) and the very ids of a call with no guidance at all; a call that may
    draw an image still runs them."""
    prompts = ["move", "a red circle"]
    sampled = SamplingConfig(temperature=1.0)
    clip_only = _settings(image=SamplingConfig(temperature=1.0, guidance_scale=3.0), video=sampled,
                          start_with="video", max_images=1, seed=3)
    generator = Generator(engine.model, engine.tokenizer, fast=fast)
    seqs = [engine.encode_prompt(p) for p in prompts]
    ids = [r.ids.tolist() for r in generator.generate(seqs, clip_only)]
    assert engine.model.cache_valid.shape[0] == len(prompts)
    unguided = _settings(image=sampled, video=sampled, start_with="video", max_images=1, seed=3)
    assert ids == _ids(engine, prompts, unguided, fast=fast)
    v = engine.tokenizer.vocab
    assert all(row[0] == v.bov for row in ids)
    for may_draw_an_image in ({"max_images": 2}, {"start_with": ["video", None]}):
        generator.generate(seqs, _settings(**{**clip_only.__dict__, **may_draw_an_image}))
        assert engine.model.cache_valid.shape[0] == 2 * len(prompts)


def test_copy_hints_generate_alike_in_both_loops_and_a_large_bonus_copies_the_earlier_image():
    """``image_copy_hint`` / ``image_copy_logit`` through the generator: the fast loop (with guidance twins, which
    see no earlier image) equals the plain one, and a copy bonus far above every logit redraws the prompt's image
    code for code, which it can only do if the cached path finds the hints where the forward pass does."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    from tokenizers_mm.segments import Image

    engine = random_engine("tiny", seed=0, image_copy_hint=True, image_copy_logit=True)
    with torch.no_grad():
        engine.model.copy_hint.weight.normal_(0, 0.5)
        engine.model.copy_gate.weight.normal_(0, 0.5)
    picture = PILImage.new("RGB", (32, 32), (20, 20, 200))
    ImageDraw.Draw(picture).ellipse((4, 6, 20, 22), fill=(220, 30, 30))
    prompts = [[Image(picture), "make the circle green"]]
    grid = engine.tokenizer.image_grid
    settings = _settings(image=GREEDY_CFG, start_with="image", max_images=1, image_size=grid,
                         max_new_tokens=grid[0] * (grid[1] + 1) + 6)
    assert _ids(engine, prompts, settings) == _ids(engine, prompts, settings, fast=False)
    with torch.no_grad():
        engine.model.copy_gate.weight.zero_()
        engine.model.copy_gate.bias.fill_(1e3)
    v = engine.tokenizer.vocab
    source = [t for t in engine.encode_prompt(prompts[0]).ids.tolist() if v.image_offset <= t < v.video_offset]
    # guidance leaves the bonus out: at scale 0 the logits are the twin's, which sees no earlier image, and still
    # copy, because the twin is given its row's bonus (multiplied by the scale, a bonus of 0 would draw no copy)
    blind = _settings(image=SamplingConfig(temperature=0.0, guidance_scale=0.0), start_with="image", max_images=1,
                      image_size=grid, max_new_tokens=grid[0] * (grid[1] + 1) + 6)
    for fast in (True, False):
        for setting in (settings, blind):
            (drawn,) = _ids(engine, prompts, setting, fast=fast)
            assert [t for t in drawn if v.image_offset <= t < v.video_offset] == source
