"""Byte-level BPE text tokenizer over Hugging Face ``tokenizers``.

Lossless on any Unicode string: text is split into UTF-8 bytes, each byte has its own id (the 256
byte symbols are always in the vocabulary), and merges only join bytes, so ``decode(encode(s)) == s``
for Chinese, emoji, code and whitespace runs alike. No normaliser, no added prefix space.

Special tokens are *not* part of this tokenizer: they live in ``Vocab`` after the BPE ids, so text
that happens to contain ``"<|boi|>"`` is tokenized as plain bytes and can never open an image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MIN_VOCAB_SIZE = 256  # one id per byte


class TextTokenizer:
    """Byte-level BPE. Ids occupy ``[0, vocab_size)``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> TextTokenizer:
        """Learn BPE merges from an iterator of strings.

        Args:
            texts: training text, any iterable of ``str``.
            vocab_size: total ids, at least 256 (the byte alphabet); merges fill the rest when the
                data has enough repeated pairs, so the final size may be smaller.
            min_frequency: a pair must occur this often to be merged.
        """
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (one id per byte), got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_checked(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a ``tokenizer.json`` written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no text tokenizer at {path} (expected a tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from err
        if not isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel):
            raise ValueError(f"{path} is not a byte-level BPE tokenizer; anygen text needs byte-level BPE")
        return cls(tok)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path

    # -- use ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"TextTokenizer.encode takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text id {bad[0]} is outside this tokenizer's ids 0..{self.vocab_size - 1}")
        return self._tok.decode(ids, skip_special_tokens=False)


def _checked(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"training text #{i} is a {type(text).__name__}, expected str")
        yield text
