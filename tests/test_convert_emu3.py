"""Emu3 import: a tiny random ``Emu3ForConditionalGeneration`` converted to anygen gives transformers' numbers.

Logits (fp32) of text and text+image prompts match to 1e-4; greedy image generation under the
constrained decoding of transformers' Emu3 docs (``prefix_allowed_tokens_fn``) and greedy text
generation are token-identical; the VQ adapter encodes and decodes as ``Emu3VQVAE`` does.
"""

from __future__ import annotations

import pytest
import torch

from anygen import AnyGen
from anygen.convert import main
from anygen.convert.tiny import save_tiny_emu3
from anygen.generation.grammar import M_TEXT
from anygen.generation.sampling import SamplingConfig
from tokenizers_mm.segments import Image

transformers = pytest.importorskip("transformers")
TOL = 1e-4
PROMPT = "draw a red circle on a blue square"


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def pair(request, tmp_path_factory):
    src = save_tiny_emu3(tmp_path_factory.mktemp(f"emu3{request.param}") / "src", n_kv_head=request.param)
    ref = transformers.Emu3ForConditionalGeneration.from_pretrained(src).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    return src, ref, tok, AnyGen.from_pretrained(src)


def _ref_ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([[tok.bos_token_id] + tok(text).input_ids])


def test_text_logits_match(pair):
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    ids = _ref_ids(tok, PROMPT)
    assert engine.encode_prompt(PROMPT).ids.tolist() == to_any[ids][0].tolist()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        ours = engine.model(to_any[ids])
    assert expected.abs().max() > 1
    assert (ours[..., to_any] - expected).abs().max() <= TOL


def test_text_and_image_logits_match(pair):
    """An image in the prompt: transformers VQ-encodes pixel_values; anygen's adapter writes Emu3's layout."""
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    h = w = 8
    span = f"<|image start|>{h}*{w}<|image token|>" + "<image>" * (h * (w + 1)) + "<|extra_201|><|image end|>"
    ids = _ref_ids(tok, span + "what is in the picture?")
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[16, 16]])).logits
    seq = engine.tokenizer.encode([Image(pixels[0], size=(16, 16)), "what is in the picture?"], eos=False)
    assert seq.ids.shape[0] == ids.shape[1]
    with torch.no_grad():
        ours = engine.model(seq.ids[None])
    assert (ours[..., to_any] - expected).abs().max() <= TOL
    image, question = engine.tokenizer.decode(seq.ids, pixels=False)  # Emu3's span parses back
    assert image.codes.shape == (8, 8) and question.text == "what is in the picture?"


def test_greedy_image_generation_is_token_identical(pair):
    """transformers' Emu3 docs: the prompt carries the image header, prefix_allowed_tokens_fn draws rows."""
    _, ref, tok, engine = pair
    height, width = 3, 4
    ids = _ref_ids(tok, PROMPT + f"<|image start|>{height}*{width}<|image token|>")
    visual = ref.vocabulary_mapping.image_tokens
    eol, eof = tok.convert_tokens_to_ids("<|extra_200|>"), tok.convert_tokens_to_ids("<|extra_201|>")
    eoi, wrapper = tok.convert_tokens_to_ids("<|image end|>"), tok.convert_tokens_to_ids("<|image token|>")

    def prefix_allowed_tokens_fn(batch_id, input_ids):
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (width + 1) == 0:
            return (eol,)
        if offset == (width + 1) * height + 1:
            return (eof,)
        if offset == (width + 1) * height + 2:
            return (eoi,)
        if offset == (width + 1) * height + 3:
            return (tok.eos_token_id,)
        if offset > (width + 1) * height + 3:
            return (tok.pad_token_id,)
        return visual

    expected = ref.generate(ids, max_new_tokens=(width + 1) * height + 2, do_sample=False,
                            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn)[0, ids.shape[1]:]
    out = engine.generate(PROMPT, start_with="image", image_size=(height, width), max_images=1, max_new_tokens=64,
                          image={"temperature": 0, "guidance_scale": 1.0})
    to_any, v = engine.id_map.to_anygen(), engine.model.vocab
    header = engine.tokenizer.image_header(height, width)
    assert header == to_any[_ref_ids(tok, f"{height}*{width}<|image token|>")[0, 1:]].tolist()
    assert out.ids.tolist() == [v.boi, *header, *to_any[expected].tolist()]
    (image,) = out.segments
    assert image.codes.shape == (height, width) and len(set(image.codes.flatten().tolist())) > 1
    codes = ref.vocabulary_mapping.convert_bpe2img(expected[:-2].view(height, width + 1))
    assert torch.equal(image.codes, codes.long())
    pixels = ref.model.vqmodel.decode(codes[None]).clamp(-1, 1)
    assert (engine.tokenizer.image.decode(image.codes[None]) - pixels).abs().max() <= 1e-4


def test_greedy_text_generation_is_token_identical(pair):
    _, ref, tok, engine = pair
    to_any = engine.id_map.to_anygen()
    ids = _ref_ids(tok, PROMPT)
    # anygen's text state never writes bare image codes or structure tokens; neither may the reference here
    suppress = [r for name, r in engine.id_map.roles.items() if name != "eos"] + ref.vocabulary_mapping.image_tokens
    expected = ref.generate(ids, do_sample=False, max_new_tokens=12, suppress_tokens=suppress)[0, ids.shape[1]:]
    grammar = engine.generator.grammar
    grammar.masks[M_TEXT, engine.model.vocab.boi] = False
    try:
        out = engine.generate(PROMPT, text={"temperature": 0}, max_new_tokens=12)
    finally:
        grammar.masks[M_TEXT, engine.model.vocab.boi] = True
    assert out.ids.tolist() == to_any[expected].tolist()


def test_convert_cli_and_vq_adapter(pair, tmp_path):
    src, ref, _, engine = pair
    assert main(["--from", "emu3", str(src), "--out", str(tmp_path / "out")]) == 0
    again = AnyGen.from_pretrained(tmp_path / "out")
    ids = engine.encode_prompt(PROMPT).ids[None]
    assert torch.equal(again.model(ids), engine.model(ids))
    # Emu3-Gen's published image sampling (top-k 2048, CFG 3), in memory and in generation_config.json
    assert engine.sampling_defaults.image == SamplingConfig(temperature=1.0, top_k=2048, guidance_scale=3.0)
    assert again.sampling_defaults == engine.sampling_defaults
    pixels = torch.rand(2, 3, 16, 8) * 2 - 1
    with torch.no_grad():
        expected = torch.stack(list(ref.model.vqmodel.encode(pixels, torch.tensor([[16, 8]] * 2)).image_tokens))
    codes = again.tokenizer.image.encode(pixels)
    assert codes.shape == (2, 8, 4) and torch.equal(codes, expected)
