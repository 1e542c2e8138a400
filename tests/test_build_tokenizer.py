"""``anygen build-tokenizer``: BPE on the documents' text + two VQ tokenizers → a loadable tokenizer directory."""

import json

import pytest

from tokenizers_mm.build import build_tokenizer, document_texts, main
from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig

DOCS = [
    {"segments": [{"text": "a red circle at the top left"}, {"image": "images/0.png"}]},
    {"segments": [{"understand": "images/1.png"}, {"text": "a blue square in the center"}]},
    {"segments": [{"text": "a green triangle moves to the right"}, {"video": "videos/0.mp4"}]},
    {"segments": [{"text": "a handwritten 7"}, {"image": "images/2.png"}]},
]


@pytest.fixture
def inputs(tmp_path):
    docs = tmp_path / "documents.jsonl"
    docs.write_text("\n".join(json.dumps(d) for d in DOCS * 5) + "\n")
    image = ImageTokenizer(ImageTokenizerConfig.tiny()).save(tmp_path / "image.safetensors")
    video = VideoTokenizer(VideoTokenizerConfig.tiny()).save(tmp_path / "video.safetensors")
    return docs, image, video


def test_document_texts(inputs):
    docs, _, _ = inputs
    texts = list(document_texts([docs]))
    assert texts[:2] == ["a red circle at the top left", "a blue square in the center"]
    assert len(texts) == 20


def test_build_tokenizer_directory_loads_with_matching_vocab(inputs, tmp_path, capsys):
    docs, image, video = inputs
    out = tmp_path / "tokenizer"
    assert main(["--documents", str(docs), "--image-tokenizer", str(image), "--video-tokenizer", str(video),
                 "--vocab-size", "300", "--image-size", "32", "--video-size", "16", "--und-tokens", "16",
                 "--und-image-size", "32", "--max-height", "16", "--max-width", "16", "--max-frames", "8",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} >= {"tokenizer_config.json", "text_tokenizer.json",
                                               "image_tokenizer.safetensors", "video_tokenizer.safetensors"}
    tok = MultimodalTokenizer.load(out)
    assert tok.vocab.to_dict() == printed["vocab"]
    assert tok.vocab.image_codebook_size == ImageTokenizer.load(image).codebook_size
    assert tok.vocab.video_codebook_size == VideoTokenizer.load(video).codebook_size
    assert tok.vocab.text_size == tok.text.vocab_size <= 300
    assert tok.und_tokens == 16 and tok.image_size == (32, 32) and tok.vocab.max_height == 16
    assert tok.video_frames is None  # not given: not recorded
    text = "a red circle at the top left"
    assert tok.text.decode(tok.text.encode(text)) == text
    assert len(tok.text.encode(text)) < len(text.encode())  # merges learned from the documents


def test_build_tokenizer_errors(inputs, tmp_path, capsys):
    docs, image, video = inputs
    with pytest.raises(FileNotFoundError, match="video tokenizer"):
        build_tokenizer([docs], tmp_path / "t", image_tokenizer=image, video_tokenizer=tmp_path / "missing")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"segments": [{"image": "a.png"}]}) + "\n")
    with pytest.raises(ValueError, match="no text segments"):
        build_tokenizer([empty], tmp_path / "t", image_tokenizer=image, video_tokenizer=None)
    assert main(["--documents", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "t")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["--documents", str(docs), "--video-tokenizer", str(video), "--video-frames", "8",
                 "--out", str(tmp_path / "t")]) == 1  # not a length the causal video tokenizer takes
    assert "video_frames=8 is not a clip length the video tokenizer takes" in capsys.readouterr().err


def test_build_tokenizer_records_the_trained_clip_length(inputs, tmp_path, capsys):
    docs, image, video = inputs
    assert main(["--documents", str(docs), "--video-tokenizer", str(video), "--video-size", "16", "--video-frames",
                 "5", "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 0
    tok = MultimodalTokenizer.load(tmp_path / "t")
    assert tok.video_frames == 5 and tok.video_grid == (tok.video.num_latent_frames(5), 16 // tok.video.downsample,
                                                        16 // tok.video.downsample)


def test_build_tokenizer_reuses_a_trained_bpe_table(inputs, tmp_path, capsys):
    """--text-tokenizer keeps an earlier directory's BPE table (its ids), so a model trained with it can be
    warm-started on the new directory; the documents are then not needed."""
    docs, image, video = inputs
    first = build_tokenizer([docs], tmp_path / "first", image_tokenizer=image, video_tokenizer=video, vocab_size=300)
    other_docs = tmp_path / "other.jsonl"
    other_docs.write_text(json.dumps({"segments": [{"text": "zebra zebra quokka quokka"}]}) + "\n")
    for source in (tmp_path / "first", tmp_path / "first" / "text_tokenizer.json"):
        out = tmp_path / f"reused_{source.name}"
        assert main(["--text-tokenizer", str(source), "--documents", str(other_docs), "--image-tokenizer",
                     str(image), "--out", str(out)]) == 0
        reused = MultimodalTokenizer.load(out)
        assert (out / "text_tokenizer.json").read_text() == (tmp_path / "first" / "text_tokenizer.json").read_text()
        text = "a red circle at the top left"
        assert reused.text.encode(text) == first.text.encode(text)
        assert reused.vocab.text_size == first.vocab.text_size and reused.video is None
    capsys.readouterr()
    # without documents the BPE has to come from somewhere
    with pytest.raises(ValueError, match="--text-tokenizer"):
        build_tokenizer([], tmp_path / "t", image_tokenizer=image, video_tokenizer=None)
    assert main(["--text-tokenizer", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "t")]) == 1
    assert "nothing.json" in capsys.readouterr().err
