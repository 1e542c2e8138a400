"""MultimodalTokenizer: the grammar of DESIGN.md, identity of ids → segments → ids, malformed spans."""

import PIL.Image
import pytest
import torch

from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.segments import Image, Text, Understand, Video
from tokenizers_mm.text import TextTokenizer
from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig
from tokenizers_mm.vocab import Modality

UND_TOKENS = 4


@pytest.fixture(scope="module")
def mm() -> MultimodalTokenizer:
    torch.manual_seed(0)
    text = TextTokenizer.train(["a red circle", "a blue square moves right"] * 10, vocab_size=280)
    image = ImageTokenizer(ImageTokenizerConfig.tiny()).eval()
    video = VideoTokenizer(VideoTokenizerConfig.tiny()).eval()
    return MultimodalTokenizer(text, image, video, image_size=32, video_size=16, und_tokens=UND_TOKENS,
                               und_image_size=16, max_height=8, max_width=8, max_frames=4)


def _image(h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1


def _clip(t=5, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, t, h, w, generator=g) * 2 - 1


def test_span_lengths_follow_the_grammar(mm):
    v = mm.vocab
    ds_i, ds_v = mm.image.downsample, mm.video.downsample
    seq = mm.encode(["look:", Image(_image(32, 32)), Video(_clip(5, 16, 16)), Understand(_image(20, 30)), "end"])
    ids = seq.ids.tolist()
    h, w = 32 // ds_i, 32 // ds_i
    t, vh, vw = 2, 16 // ds_v, 16 // ds_v
    assert ids[0] == v.bos and ids[-1] == v.eos
    boi = ids.index(v.boi)
    assert ids[boi + 1:boi + 3] == [v.h_token(h), v.w_token(w)]
    eoi = ids.index(v.eoi)
    assert eoi - boi + 1 == 3 + h * (w + 1) + 1
    bov, eov = ids.index(v.bov), ids.index(v.eov)
    assert ids[bov + 1:bov + 4] == [v.t_token(t), v.h_token(vh), v.w_token(vw)]
    assert eov - bov + 1 == 4 + t * (vh * (vw + 1) + 1) + 1
    assert ids.count(v.eof) == t and ids.count(v.und) == UND_TOKENS
    assert ids.count(v.eol) == h + t * vh
    # modality tags line up with the ids
    tags = seq.modality.tolist()
    assert sum(tag == Modality.IMAGE for tag in tags) == h * w
    assert sum(tag == Modality.VIDEO for tag in tags) == t * vh * vw
    assert sum(tag == Modality.UND for tag in tags) == UND_TOKENS
    assert seq.und_pixels.shape == (1, 3, 16, 16)


def test_ids_to_segments_to_ids_is_identity(mm):
    doc = ["a red circle", Image(_image(32, 64)), "then", Video(_clip(9, 16, 32)), Image(_image(16, 16, seed=3)), "x"]
    ids = mm.encode(doc).ids
    segments = mm.decode(ids, pixels=False)
    assert [type(s) for s in segments] == [Text, Image, Text, Video, Image, Text]
    again = mm.encode(segments).ids
    assert torch.equal(ids, again)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 5), (7, 3), (8, 8)])
def test_code_grids_survive_any_shape(mm, h, w):
    codes = torch.randint(0, mm.vocab.image_codebook_size, (h, w))
    (seg,) = mm.decode(mm.image_span(codes), pixels=False)
    assert torch.equal(seg.codes, codes) and not seg.partial
    vcodes = torch.randint(0, mm.vocab.video_codebook_size, (3, h, w))
    (vseg,) = mm.decode(mm.video_span(vcodes), pixels=False)
    assert torch.equal(vseg.codes, vcodes)


def test_decode_to_pixels(mm):
    ids = mm.encode([Image(_image(32, 48), size=(32, 48)), Video(_clip(5, 16, 16))]).ids
    img, vid = mm.decode(ids)
    assert isinstance(img.image, PIL.Image.Image) and img.image.size == (48, 32)
    assert vid.frames.shape == (3, 5, 16, 16)
    assert vid.frames.min() >= -1 and vid.frames.max() <= 1


def test_malformed_spans_raise(mm):
    v = mm.vocab
    span = mm.image_span(torch.zeros(2, 3, dtype=torch.long)).tolist()  # boi h w c c c eol c c c eol eoi
    short_row = span[:5] + span[6:]
    with pytest.raises(ValueError, match="expected <\\|eol\\|> after 3 codes|expected a image code"):
        mm.decode(short_row, pixels=False)
    wrong_modality = span.copy()
    wrong_modality[4] = v.video_offset
    with pytest.raises(ValueError, match="position 4: expected a image code"):
        mm.decode(wrong_modality, pixels=False)
    no_end = span[:-1] + [0]
    with pytest.raises(ValueError, match="expected <\\|eoi\\|>"):
        mm.decode(no_end, pixels=False)
    with pytest.raises(ValueError, match="cut off after 1 of 2 rows"):
        mm.decode(span[:8], pixels=False)
    with pytest.raises(ValueError, match="outside an image or video span"):
        mm.decode([5, v.eol, 6], pixels=False)
    bad_size = span.copy()
    bad_size[1] = v.w_token(2)
    with pytest.raises(ValueError, match="image span at position 0"):
        mm.decode(bad_size, pixels=False)
    with pytest.raises(ValueError, match="unknown token id"):
        mm.decode([v.size], pixels=False)


def test_partial_span_keeps_complete_rows_only(mm):
    codes = torch.randint(0, mm.vocab.image_codebook_size, (3, 4))
    span = mm.image_span(codes).tolist()
    cut = span[: 3 + 5 + 2]  # header, one full row + <|eol|>, two codes of the next row
    (seg,) = mm.decode(cut, pixels=False, allow_partial=True)
    assert seg.partial and torch.equal(seg.codes, codes[:1])
    vcodes = torch.randint(0, mm.vocab.video_codebook_size, (2, 2, 2))
    vspan = mm.video_span(vcodes).tolist()
    (vseg,) = mm.decode(vspan[:-3], pixels=False, allow_partial=True)
    assert vseg.partial and torch.equal(vseg.codes, vcodes[:1])


def test_bad_documents(mm):
    with pytest.raises(TypeError, match="accepted: str, Text, PIL.Image, Image, Video, Understand"):
        mm.encode(["ok", 3.5])
    with pytest.raises(ValueError, match="image codes must lie in"):
        mm.encode([Image(codes=torch.full((2, 2), mm.vocab.image_codebook_size))])
    with pytest.raises(ValueError, match="Video.frames must be a float tensor"):
        mm.encode([Video(frames=torch.zeros(3, 16, 16))])
    no_und = MultimodalTokenizer(mm.text, mm.image, mm.video)
    with pytest.raises(ValueError, match="no understanding encoder"):
        no_und.encode([Understand(_image())])


def test_encode_batch_gives_encode_ids_document_by_document(mm, monkeypatch):
    pil = PIL.Image.fromarray((torch.rand(20, 28, 3) * 255).to(torch.uint8).numpy())
    docs = [
        ["a red circle", Image(_image(seed=1)), "make it blue", Image(_image(seed=2))],
        [Video(_clip(seed=3)), "a blue square moves right"],
        "just text",
        Image(_image(16, 24, seed=4)),  # brought to the tokenizer's 32x32 like the others
        [pil, Image(codes=torch.zeros(2, 2, dtype=torch.long)), Understand(_image(seed=5))],
        [Video(_clip(seed=6)), Image(_image(seed=7), size=(16, 16))],  # another pixel size: a batch of its own
    ]
    calls = {"image": [], "video": []}
    for kind in calls:
        tok = getattr(mm, kind)
        monkeypatch.setattr(tok, "encode", lambda x, _e=tok.encode, _k=kind: calls[_k].append(len(x)) or _e(x))
    given = [list(d) if isinstance(d, list) else d for d in docs]
    batched = mm.encode_batch(docs, max_batch=2)
    # the caller's documents are left as they were: no codes written into their segments
    assert all(a is b for d, g in zip(docs, given) if isinstance(d, list) for a, b in zip(d, g))
    assert isinstance(docs[4][0], PIL.Image.Image) and docs[0][1].codes is None and docs[1][0].codes is None
    # one call per pixel size and batch: four 32x32 images (max_batch 2), one 16x16; both clips at once
    assert sorted(calls["image"]) == [1, 2, 2] and calls["video"] == [2]
    assert len(batched) == len(docs)
    for doc, seq in zip(docs, batched):
        one = mm.encode(doc)
        assert torch.equal(seq.ids, one.ids) and torch.equal(seq.modality, one.modality)
        assert (seq.und_pixels is None) == (one.und_pixels is None)


def test_encode_batch_names_the_segment_it_refuses(mm):
    with pytest.raises(ValueError, match=r"document #1, segment #1 \(image\): .*\[-1, 1\]"):
        mm.encode_batch([[Image(_image())], ["text", Image(_image() * 3)]])
    # clips reach the VQ tokenizer unchecked: it refuses the batch, and the clip at fault is named
    with pytest.raises(ValueError, match=r"document #2, segment #0 \(video\)"):
        mm.encode_batch([[Video(_clip(seed=1))], "text", [Video(_clip(seed=2) * 3)]])
    with pytest.raises(ValueError, match=r"document #0, segment #1 \(video\): Video.frames must be"):
        mm.encode_batch([["a", Video(torch.zeros(3, 16, 16))]])
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        mm.encode_batch(["a"], max_batch=0)
    with pytest.raises(TypeError, match="accepted: str, Text"):
        mm.encode_batch([["ok", 3.5]])


def test_save_load(mm, tmp_path):
    mm.save(tmp_path)
    again = MultimodalTokenizer.load(tmp_path)
    doc = ["hi", Image(_image(32, 32)), Video(_clip(5, 16, 16))]
    assert torch.equal(mm.encode(doc).ids, again.encode(doc).ids)
    assert again.vocab == mm.vocab
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json"):
        MultimodalTokenizer.load(tmp_path)


def test_video_frames_give_the_trained_clip_grid_and_survive_save_load(mm, tmp_path):
    assert mm.video_frames is None and mm.video_grid is None  # unknown: a clip needs a size
    mm.save(tmp_path / "plain")
    assert "video_frames" not in (tmp_path / "plain" / "tokenizer_config.json").read_text()  # old files unchanged
    timed = MultimodalTokenizer(mm.text, mm.image, mm.video, image_size=32, video_size=16, max_height=8, max_width=8,
                                max_frames=4, video_frames=5)
    down = mm.video.downsample
    assert timed.video_grid == (mm.video.num_latent_frames(5), 16 // down, 16 // down)
    timed.save(tmp_path / "timed")
    again = MultimodalTokenizer.load(tmp_path / "timed")
    assert again.video_frames == 5 and again.video_grid == timed.video_grid
    with pytest.raises(ValueError, match="video_frames=4 is not a clip length .* accepts T = 1 \\+"):
        MultimodalTokenizer(mm.text, mm.image, mm.video, video_size=16, video_frames=4)
    with pytest.raises(ValueError, match="more than the size tokens can describe \\(max_frames=1\\)"):
        MultimodalTokenizer(mm.text, mm.image, mm.video, video_size=16, max_frames=1, video_frames=5)
    with pytest.raises(ValueError, match="needs a video tokenizer"):
        MultimodalTokenizer(mm.text, mm.image, None, video_frames=5)
