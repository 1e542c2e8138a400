"""A tiny random engine: every part real (BPE, VQ tokenizers, decoder, understanding encoder), weights random.

Used by the tests, by the demo when no trained model is at hand (with a visible notice), and by
benchmarks at the ``small`` shape. Building one takes well under a second on a CPU.
"""

from __future__ import annotations

import torch

from anygen.api import AnyGen
from anygen.config import AnyGenConfig
from anygen.model import AnyGenModel
from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.text import TextTokenizer
from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig

CORPUS = [
    "a red circle at the top left and a blue square at the bottom right",
    "a green triangle moves to the right",
    "make the circle yellow",
    "draw a red square, then add a blue circle below it",
    "a handwritten 7",
    "what is in the picture? a yellow circle.",
]


def random_engine(preset: str = "tiny", *, seed: int = 0, text_vocab: int = 300, **overrides) -> AnyGen:
    """Build an ``AnyGen`` with random weights whose vocabulary matches its tokenizers.

    Args:
        preset: ``AnyGenConfig`` preset for the decoder (``"tiny"`` or ``"small"``).
        seed: seeds every random init, so two calls give the same engine.
        text_vocab: BPE vocabulary size (at least 256).
        overrides: ``AnyGenConfig`` fields to change (e.g. ``head_mode="shared"``).
    """
    torch.manual_seed(seed)
    text = TextTokenizer.train(CORPUS * 4, vocab_size=text_vocab)
    image = ImageTokenizer(ImageTokenizerConfig.tiny()).eval()
    video = VideoTokenizer(VideoTokenizerConfig.tiny()).eval()
    base = AnyGenConfig.preset(preset, **overrides)
    size = 8 * base.max_height  # pixel size whose token grid the size tokens can describe
    tokenizer = MultimodalTokenizer(
        text, image, video,
        image_size=min(32, size), video_size=min(16, size),
        und_tokens=base.und_tokens if base.und_encoder is not None else 0,
        und_image_size=base.und_image_size if base.und_encoder is not None else 0,
        max_height=base.max_height, max_width=base.max_width, max_frames=base.max_frames,
    )
    config = AnyGenConfig.from_dict({**base.to_dict(), **tokenizer.vocab.to_dict()})
    return AnyGen(AnyGenModel(config), tokenizer)
