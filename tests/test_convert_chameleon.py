"""Chameleon / Anole import: a tiny random ``ChameleonForConditionalGeneration`` converted to anygen.

Per-head LayerNorm QK-norm, swin-norm and GQA variants; logits (fp32) of text and text+image prompts
match transformers' to 1e-4; greedy text generation is token-identical to its ``generate``; greedy
image generation equals a greedy loop over transformers' own logits restricted to image codes (its
``forward`` masks image codes out, so ``generate`` cannot draw); the tokenizer is sentencepiece-style.
"""

from __future__ import annotations

import pytest
import torch

from anygen import AnyGen
from anygen.convert.tiny import save_tiny_chameleon
from anygen.generation.generator import SamplingDefaults
from anygen.generation.grammar import M_TEXT
from tokenizers_mm.hf_adapters import HFTextTokenizer
from tokenizers_mm.segments import Image

transformers = pytest.importorskip("transformers")
TOL = 1e-4
PROMPT = "draw a red circle on a blue square, then the quick fox"


@pytest.fixture(scope="module", params=[(2, False), (4, True)], ids=["gqa", "mha-swin"])
def pair(request, tmp_path_factory):
    kv, swin = request.param
    src = save_tiny_chameleon(tmp_path_factory.mktemp("chameleon") / "src", n_kv_head=kv, swin_norm=swin)
    ref = transformers.ChameleonForConditionalGeneration.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    return src, ref, tok, AnyGen.from_pretrained(src)


def _ref_ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids])


def _not_image(ref) -> torch.Tensor:
    keep = torch.ones(ref.config.vocab_size, dtype=torch.bool)
    keep[ref.model.vocabulary_mapping.image_tokens] = False  # transformers sets these logits to -3.4e38
    return keep


def test_text_logits_match(pair):
    _, ref, tok, engine = pair
    assert isinstance(engine.tokenizer.text, HFTextTokenizer)  # a sentencepiece-style tokenizer.json
    assert engine.model.config.qk_norm == "layernorm" and engine.model.config.post_norm == ref.config.swin_norm
    to_any = engine.id_map.to_anygen()
    ids = _ref_ids(tok, PROMPT)
    assert engine.encode_prompt(PROMPT).ids.tolist() == to_any[ids][0].tolist()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        full = ref.lm_head(ref.model(input_ids=ids).last_hidden_state)  # image codes' logits too
        ours = engine.model(to_any[ids])
    keep = _not_image(ref)
    assert expected[..., keep].abs().max() > 1
    assert (ours[..., to_any] - expected)[..., keep].abs().max() <= TOL
    assert (ours[..., to_any] - full).abs().max() <= TOL


def test_text_and_image_logits_match(pair):
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    ids = _ref_ids(tok, "<racm3:break>" + "<image>" * 64 + "<eoss>" + "what is this?")
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
    seq = engine.tokenizer.encode([Image(pixels[0], size=(16, 16)), "what is this?"], eos=False)
    with torch.no_grad():
        ours = engine.model(seq.ids[None])
    assert seq.ids.shape[0] == ids.shape[1]
    assert (ours[..., to_any] - expected)[..., _not_image(ref)].abs().max() <= TOL


def test_greedy_text_generation_is_token_identical(pair):
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    ids = _ref_ids(tok, PROMPT)
    suppress = [r for name, r in engine.id_map.roles.items() if name != "eos"]
    expected = ref.generate(ids, do_sample=False, max_new_tokens=12, suppress_tokens=suppress)[0, ids.shape[1]:]
    grammar = engine.generator.grammar
    grammar.masks[M_TEXT, engine.model.vocab.boi] = False
    try:
        out = engine.generate(PROMPT, text={"temperature": 0}, max_new_tokens=12)
    finally:
        grammar.masks[M_TEXT, engine.model.vocab.boi] = True
    assert out.ids.tolist() == to_any[expected].tolist()


def test_greedy_image_generation_matches_reference_logits(pair):
    _, ref, tok, engine = pair
    image_tokens = torch.tensor(ref.model.vocabulary_mapping.image_tokens)
    ids = _ref_ids(tok, PROMPT + "<racm3:break>")
    cache = None
    with torch.no_grad():
        step = ids
        drawn = []
        for _ in range(64):
            out = ref.model(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = ref.lm_head(out.last_hidden_state[:, -1])[0, image_tokens]
            nxt = image_tokens[logits.argmax()]
            drawn.append(int(nxt))
            step = nxt.view(1, 1)
    out = engine.generate(PROMPT, start_with="image", image={"temperature": 0, "guidance_scale": 1.0}, max_images=1,
                          max_new_tokens=80)
    to_any, v = engine.id_map.to_anygen(), engine.model.vocab
    assert out.ids.tolist() == [v.boi, *to_any[torch.tensor(drawn)].tolist(), v.eoi]
    (image,) = out.segments
    assert image.codes.shape == (8, 8) and image.image is None  # codes only: transformers has no Chameleon decoder
    bpe2img = ref.model.vocabulary_mapping.bpe2img
    assert image.codes.flatten().tolist() == [bpe2img[t] for t in drawn]
    with pytest.raises(ValueError, match="no decoder"):
        engine.tokenizer.image.decode(image.codes[None])


def test_vq_adapter_encodes_like_transformers(pair):
    _, ref, _, engine = pair
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = ref.model.vqmodel.encode(pixels).image_tokens.view(2, 8, 8)
    assert torch.equal(engine.tokenizer.image.encode(pixels), expected)


def test_no_published_sampling_means_the_library_defaults(pair):
    assert pair[3].sampling_defaults == SamplingDefaults()  # Chameleon / Anole publish no image settings
