"""Speculative Jacobi decoding: lossless acceptance, greedy identity with the plain loop, the target distribution.

The distribution test draws 2000 images at once (a batch of identical prompts) from a tiny model whose
image head is scaled up so that its distributions are far from uniform, and compares the first two codes'
marginals with the exact ones computed from full forwards (chi-square, fixed seed: deterministic).
"""

import pytest
import torch
from scipy.stats import chi2

from anygen.generation.generator import GenerationSettings, Generator
from anygen.generation.sampling import SamplingConfig
from anygen.generation.speculative import generate_speculative, span_template, verify
from anygen.testing import random_engine

GREEDY_CFG = SamplingConfig(temperature=0.0, guidance_scale=3.0)


@pytest.fixture(scope="module")
def engine():
    return random_engine("tiny", seed=0)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, cells with an expected count below 5 pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("case", ["overlap", "q_equals_p", "disjoint"])
def test_verify_is_lossless_on_a_toy(case):
    """Drafts from q, accepted with min(1, p/q), else drawn from the residual: the result is distributed as p."""
    p = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1, 0.0])
    q = {"overlap": torch.tensor([0.1, 0.1, 0.1, 0.2, 0.2, 0.3]), "q_equals_p": p.clone(),
         "disjoint": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])}[case]
    n = 60000
    g = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    accepted, fallback = verify(p.expand(n, 6), q.expand(n, 6), draft, g)
    out = torch.where(accepted, draft, fallback)
    counts = torch.bincount(out, minlength=6).float()
    assert counts[5] == 0  # an id the target never produces is never kept
    assert _chi2_pvalue(counts[:5], p[:5]) > 1e-3
    if case == "q_equals_p":
        assert accepted.all()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_greedy_speculative_equals_plain(engine, kind, guidance):
    greedy = SamplingConfig(temperature=0.0, guidance_scale=guidance)
    settings = GenerationSettings(max_new_tokens=200, image=greedy, video=greedy, start_with=kind, max_images=1,
                                  image_size=(4, 5), video_size=(2, 2, 3))
    generator = Generator(engine.model, engine.tokenizer, fast=False)
    prompts = [engine.encode_prompt("a red circle"), engine.encode_prompt("draw a cat on a mat")]
    plain = [r.ids.tolist() for r in generator.generate(prompts, settings)]
    for window in (1, 3, 16):
        done, stats = generate_speculative(generator, prompts, settings, window=window)
        assert [r.ids.tolist() for r in done] == plain
        assert [r.reason for r in done] == ["max_images"] * 2
        assert stats.span_len == len(plain[0]) and stats.plain_forwards == stats.span_len - 1
        if window == 1:
            assert stats.forwards == stats.plain_forwards
        else:
            assert stats.forwards < stats.plain_forwards  # forced ids (sizes, row ends) come for free
    (image,) = [s for s in done[0].segments]
    assert image.codes.shape == ((4, 5) if kind == "image" else (2, 2, 3))


def test_imported_layout_greedy_speculative_equals_plain(tmp_path):
    pytest.importorskip("transformers")
    from anygen import AnyGen
    from anygen.convert.tiny import save_tiny_janus

    engine = AnyGen.from_pretrained(save_tiny_janus(tmp_path / "janus"))
    settings = GenerationSettings(max_new_tokens=40, image=GREEDY_CFG, start_with="image", max_images=1)
    prompts = [engine.encode_prompt("draw a red circle")]
    plain = engine.generator.generate(prompts, settings)
    done, stats = generate_speculative(engine.generator, prompts, settings, window=8)
    assert done[0].ids.tolist() == plain[0].ids.tolist()
    assert stats.forwards <= stats.plain_forwards  # O(1) random weights: greedy drafts rarely survive


def test_speculative_samples_the_target_distribution():
    engine = random_engine("tiny", seed=3)
    model, v = engine.model, engine.tokenizer.vocab
    with torch.no_grad():
        model.head["image"].weight.mul_(25)  # far from uniform, so a wrong acceptance rule shows
    cfg = SamplingConfig(temperature=1.0, guidance_scale=2.0)
    settings = GenerationSettings(max_new_tokens=20, image=cfg, start_with="image", image_size=(1, 3), max_images=1,
                                  seed=0)
    generator = Generator(model, engine.tokenizer)
    prompt = engine.encode_prompt("a red circle")
    n = 2000
    done, stats = generate_speculative(generator, [prompt] * n, settings, window=4)
    codes = torch.stack([r.segments[0].codes.flatten() for r in done])  # (n, 3)
    assert stats.accepted > 0 and stats.accepted < stats.drafted  # both branches of the rule were taken

    # the exact target: guided, tempered image distributions from full forwards (no cache)
    head = [v.boi, v.h_token(1), v.w_token(3)]
    cond = torch.cat([prompt.ids, torch.tensor(head)])
    uncond = torch.tensor([v.bos, v.null, *head])

    def guided(prefixes: torch.Tensor) -> torch.Tensor:  # prefixes (N, k) of codes -> (N, K) probabilities
        rows = []
        for ctx in (cond, uncond):
            ids = torch.cat([ctx.expand(len(prefixes), -1), prefixes + v.image_offset], 1)
            rows.append(model(ids)[:, -1, v.image_offset:v.video_offset])
        c, u = rows
        return torch.softmax(u + cfg.guidance_scale * (c - u), -1)

    with torch.no_grad():
        p1 = guided(torch.zeros(1, 0, dtype=torch.long))[0]
        k = v.image_codebook_size
        p2 = (p1[:, None] * guided(torch.arange(k)[:, None])).sum(0)  # marginal of the second code
    assert float(p1.max()) > 0.1  # a peaked target
    for position, target in ((0, p1), (1, p2)):
        counts = torch.bincount(codes[:, position], minlength=k).float()
        assert _chi2_pvalue(counts, target) > 1e-3, f"code {position}"


def test_span_template_and_errors(engine):
    generator = Generator(engine.model, engine.tokenizer)
    v = engine.tokenizer.vocab
    template, kind = span_template(generator, GenerationSettings(start_with="image", image_size=(2, 1)))
    assert kind == "image"
    assert template == [v.boi, v.h_token(2), v.w_token(1), -1, v.eol, -1, v.eol, v.eoi]
    prompts = [engine.encode_prompt("a")]
    with pytest.raises(ValueError, match="start_with"):
        generate_speculative(generator, prompts, GenerationSettings(image_size=(2, 2)))
    with pytest.raises(ValueError, match="image_size"):
        generate_speculative(generator, prompts, GenerationSettings(start_with="image"))
    with pytest.raises(ValueError, match="top_k"):
        generate_speculative(generator, prompts, GenerationSettings(start_with="image", image_size=(2, 2),
                                                                     image=SamplingConfig(top_k=5)))
    with pytest.raises(ValueError, match="window"):
        generate_speculative(generator, prompts, GenerationSettings(start_with="image", image_size=(2, 2)), window=0)


def test_public_api_speculative_is_opt_in_and_lossless(engine):
    """``AnyGen.generate(speculative=W)``: greedy ids equal the default path's for a batch; the trained grid is
    the default size; requests it cannot serve are refused with what to pass instead."""
    greedy = {"temperature": 0.0, "guidance_scale": 3.0}
    prompts = ["a red circle", "draw a cat on a mat"]
    plain = engine.generate(prompts, max_new_tokens=80, start_with="image", max_images=1, image=greedy)
    fast = engine.generate(prompts, max_new_tokens=80, start_with="image", max_images=1, image=greedy, speculative=4)
    assert [o.ids.tolist() for o in fast] == [o.ids.tolist() for o in plain]
    assert [o.finish_reason for o in fast] == ["max_images"] * 2
    assert fast[0].images and fast[0].images[0].size == plain[0].images[0].size
    assert tuple(fast[0].segments[0].codes.shape) == engine.tokenizer.image_grid
    assert engine.model.cache_valid is None  # released, as after every call
    one = engine.generate("a red circle", max_new_tokens=80, start_with="image", image=greedy, speculative=4)
    assert one.ids.tolist() == plain[0].ids.tolist()  # an unbatched prompt gives one output
    with pytest.raises(ValueError, match="start_with"):
        engine.generate("a", speculative=4)
    with pytest.raises(ValueError, match="max_images must be 0 or 1"):
        engine.generate("a", start_with="image", max_images=2, speculative=4)
    with pytest.raises(ValueError, match="speculative must be an int"):
        engine.generate("a", start_with="image", speculative=-2)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate("a", start_with="image", image={"top_k": 5}, speculative=4)


def test_cli_generate_speculative(tmp_path, capsys):
    import PIL.Image

    from anygen.cli_generate import main

    assert main(["a red circle", "--random-tiny", "--start-with", "image", "--speculative", "8", "--seed", "0",
                 "--out", str(tmp_path)]) == 0
    assert PIL.Image.open(tmp_path / "0000" / "image_0.png").size[0] > 0
    assert main(["a red circle", "--random-tiny", "--speculative", "8", "--out", str(tmp_path)]) == 2
    assert "start_with" in capsys.readouterr().err
