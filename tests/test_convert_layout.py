"""``ImageLayout``: imported models' image spans through the tokenizer, the grammar and the generator.

A tiny anygen engine is given each imported layout (its vocabulary does not change), so these tests
need no reference model: Janus / Chameleon spans (no size tokens, no row ends), Emu3 spans (a text
header with the size, row ends, a frame end), partial spans, and Janus's masked guidance twin.
"""

from __future__ import annotations

import pytest
import torch

from anygen import AnyGen
from anygen.generation.events import ImageDone, ImageRows, ImageStarted
from anygen.testing import random_engine
from tokenizers_mm.layout import ImageLayout
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.segments import Image

JANUS = ImageLayout(size_tokens=False, row_end=False, default_size=(2, 2), guidance="masked")
EMU3 = ImageLayout(size_tokens=False, header="{h}*{w}:", row_end=True, frame_end=True, default_size=(2, 2))


@pytest.fixture(scope="module")
def base():
    return random_engine("tiny", seed=0)


def _with_layout(engine: AnyGen, layout: ImageLayout) -> AnyGen:
    t = engine.tokenizer
    tok = MultimodalTokenizer(t.text, t.image, t.video, image_size=t.image_size, video_size=t.video_size,
                              und_tokens=t.und_tokens, und_image_size=t.und_image_size, max_height=t.vocab.max_height,
                              max_width=t.vocab.max_width, max_frames=t.vocab.max_frames, layout=layout)
    return AnyGen(engine.model, tok)


def test_layout_validation_and_round_trip():
    assert ImageLayout().is_native and ImageLayout.from_dict(None) == ImageLayout()
    for layout in (JANUS, EMU3):
        assert ImageLayout.from_dict(layout.to_dict()) == layout and not layout.is_native
    with pytest.raises(ValueError, match="default_size"):
        ImageLayout(size_tokens=False)
    with pytest.raises(ValueError, match="size_tokens=False"):
        ImageLayout(header="{h}*{w}")
    with pytest.raises(ValueError, match="'{h}' and '{w}'"):
        ImageLayout(size_tokens=False, header="size", default_size=(1, 1))
    with pytest.raises(ValueError, match="guidance"):
        ImageLayout(guidance="none")


@pytest.mark.parametrize("layout", [JANUS, EMU3], ids=["janus", "emu3"])
def test_spans_encode_decode_and_save(base, layout, tmp_path):
    engine = _with_layout(base, layout)
    tok, v = engine.tokenizer, engine.tokenizer.vocab
    codes = torch.arange(6).view(2, 3)
    span = tok.image_span(codes).tolist()
    header = tok.image_header(2, 3)
    rows = [[c + v.image_offset for c in row] + ([v.eol] if layout.row_end else []) for row in codes.tolist()]
    tail = [v.eof, v.eoi] if layout.frame_end else [v.eoi]
    assert span == [v.boi, *header, *rows[0], *rows[1], *tail]
    assert len(span) == tok.image_span_len(2, 3)
    (seg,) = tok.decode(span, pixels=False, image_size=(2, 3))
    assert torch.equal(seg.codes, codes) and not seg.partial
    (cut,) = tok.decode(span[:-3], pixels=False, allow_partial=True, image_size=(2, 3))
    assert cut.partial and cut.codes.shape[0] == 1
    with pytest.raises(ValueError, match="cut off"):
        tok.decode(span[:-3], pixels=False, image_size=(2, 3))
    tok.save(tmp_path)
    assert MultimodalTokenizer.load(tmp_path).layout == layout


def test_headerless_spans_infer_their_size(base):
    tok = _with_layout(base, JANUS).tokenizer
    v = tok.vocab
    square = [v.boi, *[v.image_offset + 1] * 9, v.eoi]  # 9 codes: not the 2x2 default, so 3x3
    (seg,) = tok.decode(square, pixels=False)
    assert seg.codes.shape == (3, 3)
    with pytest.raises(ValueError, match="pass image_size"):
        tok.decode([v.boi, *[v.image_offset] * 6, v.eoi], pixels=False)


def test_native_layout_is_not_written(base, tmp_path):
    base.tokenizer.save(tmp_path)
    assert "layout" not in (tmp_path / "tokenizer_config.json").read_text()


@pytest.mark.parametrize("layout", [JANUS, EMU3], ids=["janus", "emu3"])
def test_generation_writes_the_layout(base, layout):
    engine = _with_layout(base, layout)
    tok, v = engine.tokenizer, engine.tokenizer.vocab
    events = list(engine.stream("a red circle", start_with="image", image_size=(2, 3), max_images=1,
                                max_new_tokens=40, seed=0, image={"guidance_scale": 2.0}))
    started = [e for e in events if isinstance(e, ImageStarted)]
    assert [(e.height, e.width) for e in started] == [(2, 3)]
    assert [e.rows_done for e in events if isinstance(e, ImageRows)] == [1, 2]
    (done,) = [e for e in events if isinstance(e, ImageDone)]
    ids = events[-1].ids.tolist()
    assert ids[: 1 + len(tok.image_header(2, 3))] == [v.boi, *tok.image_header(2, 3)]
    assert len(ids) == tok.image_span_len(2, 3)
    assert done.image.codes.shape == (2, 3) and done.image.image is not None
    assert ids == tok.image_span(done.image.codes).tolist()


def test_default_size_and_masked_twin(base):
    engine = _with_layout(base, JANUS)
    out = engine.generate(["a red circle", "x"], start_with="image", max_images=1, max_new_tokens=20, seed=1,
                          image={"guidance_scale": 3.0})
    assert [o.segments[0].codes.shape for o in out] == [(2, 2), (2, 2)]  # the layout's default size
    # the masked twin (the prompt, blanked) and the null twin give different guided images
    null = _with_layout(base, ImageLayout(size_tokens=False, row_end=False, default_size=(2, 2)))
    a = engine.generate("a red circle", start_with="image", image={"temperature": 0, "guidance_scale": 50.0},
                        max_images=1, max_new_tokens=20)
    b = null.generate("a red circle", start_with="image", image={"temperature": 0, "guidance_scale": 50.0},
                      max_images=1, max_new_tokens=20)
    assert isinstance(a.segments[0], Image) and isinstance(b.segments[0], Image)
    assert not torch.equal(a.ids, b.ids)
