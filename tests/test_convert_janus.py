"""Janus import: a tiny random ``JanusForConditionalGeneration`` converted to anygen gives transformers' numbers.

Logits (fp32) of text, understood-image and generated-image prompts match to 1e-4; greedy image
generation with guidance and greedy text generation are token-identical to transformers' ``generate``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from anygen import AnyGen
from anygen.convert import main, read_id_map
from anygen.convert.tiny import save_tiny_janus
from anygen.generation.grammar import M_TEXT
from anygen.generation.sampling import SamplingConfig

transformers = pytest.importorskip("transformers")
TOL = 1e-4
PROMPT = "<|User|>: draw a red circle on a blue square\n\n<|Assistant|>:"


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def pair(request, tmp_path_factory):
    """(source dir, transformers model, reference tokenizer, anygen engine converted in memory)."""
    src = save_tiny_janus(tmp_path_factory.mktemp(f"janus{request.param}") / "src", n_kv_head=request.param)
    ref = transformers.JanusForConditionalGeneration.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    return src, ref, tok, AnyGen.from_pretrained(src)


def _ref_ids(tok, text: str, *, boi: bool = False) -> torch.Tensor:
    ids = [tok.bos_token_id] + tok(text).input_ids + ([tok.convert_tokens_to_ids("<begin_of_image>")] if boi else [])
    return torch.tensor([ids])


def test_text_logits_match(pair):
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    ids = _ref_ids(tok, PROMPT)
    assert engine.encode_prompt(PROMPT).ids.tolist() == to_any[ids][0].tolist()  # same tokens, renumbered
    with torch.no_grad():
        out = ref(input_ids=ids)
        gen = ref.model.generation_head(ref.model(input_ids=ids).last_hidden_state)
        ours = engine.model(to_any[ids])
    v = engine.model.vocab
    assert out.logits.abs().max() > 1  # the comparison is not between near-zero numbers
    assert (ours[..., to_any] - out.logits).abs().max() <= TOL
    assert (ours[..., v.image_offset:v.video_offset] - gen).abs().max() <= TOL  # the MLP generation head


def test_understanding_logits_match(pair):
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    n = ref.config.vision_config.num_image_tokens
    placeholder = "<begin_of_image>" + "<image_placeholder>" * n + "<end_of_image>"
    ids = _ref_ids(tok, "<|User|>: " + placeholder + "what is in the picture?")
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
        ours = engine.model(to_any[ids], und_pixels=pixels)
    assert (ours[..., to_any] - expected).abs().max() <= TOL


def test_generated_image_in_context_logits_match(pair):
    """Codes in the prompt go through the generation embedding + aligner, as in Janus's image loop."""
    _, ref, tok, engine = pair
    to_any, v = engine.id_map.to_anygen(), engine.model.vocab
    prefix = _ref_ids(tok, PROMPT, boi=True)
    codes = torch.randint(0, v.image_codebook_size, (1, 16))
    with torch.no_grad():
        embeds = torch.cat([ref.get_input_embeddings()(prefix), ref.prepare_embeddings_for_image_generation(codes)], 1)
        hidden = ref.model.language_model(inputs_embeds=embeds).last_hidden_state
        ours = engine.model(torch.cat([to_any[prefix], codes + v.image_offset], 1))
    assert (ours[..., v.image_offset:v.video_offset] - ref.model.generation_head(hidden)).abs().max() <= TOL
    assert (ours[..., to_any] - ref.lm_head(hidden)).abs().max() <= TOL


def _ref_image_generate(ref, tok, ids: torch.Tensor, mask: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    config = copy.deepcopy(ref.generation_config)  # generation_kwargs does not survive GenerationConfig loading
    config.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    return ref.generate(ids, attention_mask=mask, generation_config=config, generation_mode="image",
                        do_sample=False, guidance_scale=guidance_scale)


def test_greedy_image_generation_is_token_identical(pair):
    _, ref, tok, engine = pair
    ids = _ref_ids(tok, PROMPT, boi=True)
    expected = _ref_image_generate(ref, tok, ids, torch.ones_like(ids), 5.0)
    out = engine.generate(PROMPT, start_with="image", image={"temperature": 0, "guidance_scale": 5.0},
                          max_images=1, max_new_tokens=64)
    (image,) = out.segments
    assert out.finish_reason == "max_images"
    assert image.codes.flatten().tolist() == expected[0].tolist()
    assert len(set(expected[0].tolist())) > 1  # a real sequence, not one repeated code
    v = engine.model.vocab
    assert out.ids.tolist() == [v.boi, *(image.codes.flatten() + v.image_offset).tolist(), v.eoi]  # Janus's layout
    pixels = ref.decode_image_tokens(expected)  # (B, H, W, 3)
    ours = engine.tokenizer.image.decode(image.codes[None])
    assert (ours.permute(0, 2, 3, 1) - pixels.clamp(-1, 1)).abs().max() <= 1e-4
    assert image.image.size == (8, 8)


def test_batched_image_generation_matches_with_padding(pair):
    """Two prompts of different lengths: left padding, and Janus's unconditional twin per row."""
    _, ref, tok, engine = pair
    prompts = [PROMPT, "<|User|>: a cat\n\n<|Assistant|>:"]
    rows = [_ref_ids(tok, p, boi=True)[0] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    expected = _ref_image_generate(ref, tok, ids, mask, 3.0)
    outs = engine.generate(prompts, start_with="image", image={"temperature": 0, "guidance_scale": 3.0},
                           max_images=1, max_new_tokens=64)
    assert [o.segments[0].codes.flatten().tolist() for o in outs] == expected.tolist()


def test_greedy_text_generation_is_token_identical(pair):
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    ids = _ref_ids(tok, PROMPT)
    # anygen's text state samples text ids and <|eos|> only; the reference's other structure tokens are
    # suppressed for it too (and <|boi|> on both sides: it would switch anygen to drawing)
    roles = engine.id_map.roles
    suppress = [ref_id for name, ref_id in roles.items() if name != "eos"]
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                            suppress_tokens=suppress, generation_mode="text")[0, ids.shape[1]:]
    grammar = engine.generator.grammar
    grammar.masks[M_TEXT, engine.model.vocab.boi] = False
    try:
        out = engine.generate(PROMPT, text={"temperature": 0}, max_new_tokens=12)
    finally:
        grammar.masks[M_TEXT, engine.model.vocab.boi] = True
    assert out.ids.tolist() == to_any[expected].tolist()
    assert out.text == tok.decode([t for t in expected.tolist() if t != tok.eos_token_id])


def test_convert_cli_writes_a_checkpoint_that_loads(pair, tmp_path, capsys):
    src, ref, tok, engine = pair
    assert main(["--from", "janus", str(src), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "janus:" in printed and "wrote" in printed and "peak memory" in printed
    again = AnyGen.from_pretrained(tmp_path / "out")
    assert again.id_map.to_dict() == read_id_map(tmp_path / "out").to_dict() == engine.id_map.to_dict()
    # Janus-Pro's published image sampling (temperature 1, CFG 5), in memory and in generation_config.json
    assert engine.sampling_defaults.image == SamplingConfig(temperature=1.0, guidance_scale=5.0)
    assert again.sampling_defaults == engine.sampling_defaults
    ids = engine.encode_prompt(PROMPT).ids[None]
    assert torch.equal(again.model(ids), engine.model(ids))
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.tokenizer.image.encode(pixels),
                           ref.model.vqmodel.encode(pixels).image_tokens.view(2, 4, 4))
    kwargs = dict(start_with="image", image={"temperature": 0}, max_images=1, max_new_tokens=64)
    assert torch.equal(again.generate(PROMPT, **kwargs).ids, engine.generate(PROMPT, **kwargs).ids)
