"""Byte-level BPE: lossless on any Unicode, save / load, clear errors."""

import pytest

from tokenizers_mm.text import TextTokenizer

CORPUS = ["a red circle at the top left", "a blue square at the bottom right", "make the circle yellow"] * 20

SAMPLES = [
    "a red circle at the top left",
    "你好，世界。今天天气很好！",
    "emoji: 🌍🚀👩‍👩‍👧‍👦 and flags 🇫🇷",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}  # comment\n",
    "   leading, inner    and trailing runs   \n\n\n\t\t",
    "combining: e\u0301 vs é, zero width\u200bjoiner, NUL\x00 and DEL\x7f",
    "",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_training_learns_merges(tok):
    # a frequent training phrase must compress below one id per byte
    text = "a red circle at the top left"
    assert 256 < tok.vocab_size <= 300
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_special_looking_text_stays_text(tok):
    # "<|boi|>" typed by a user is bytes, never a special token (specials live outside the BPE ids)
    assert tok.decode(tok.encode("<|boi|>")) == "<|boi|>"
    assert len(tok.encode("<|boi|>")) > 1


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    again = TextTokenizer.load(path)
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        TextTokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(TypeError, match="training text #1 is a int"):
        TextTokenizer.train(["ok", 3], vocab_size=260)
    with pytest.raises(FileNotFoundError, match="no text tokenizer"):
        TextTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        TextTokenizer.load(bad)
    with pytest.raises(ValueError, match="outside this tokenizer's ids"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")
