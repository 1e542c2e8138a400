"""``anygen build-tokenizer``: a ``MultimodalTokenizer`` directory from documents and two trained VQ tokenizers.

::

    anygen build-tokenizer --documents data/default/documents.jsonl --vocab-size 512 \\
        --image-tokenizer runs/default/image_tokenizer.safetensors \\
        --video-tokenizer runs/default/video_tokenizer.safetensors \\
        --image-size 64 --video-size 64 --und-tokens 16 --und-image-size 64 --out data/default/tokenizer

It trains the byte-level BPE on the text segments of the documents (every ``{"text": ...}`` of every
line of every ``--documents`` file), loads the VQ tokenizers written by ``anygen export``, and saves
the directory ``MultimodalTokenizer.load`` reads: ``tokenizer_config.json``, ``text_tokenizer.json``,
``image_tokenizer.safetensors``, ``video_tokenizer.safetensors``. The size-token ranges
(``--max-height`` / ``--max-width`` / ``--max-frames``) fix the vocabulary the model is built on.

``--text-tokenizer`` reuses a trained BPE table instead (a ``text_tokenizer.json``, or a tokenizer or
checkpoint directory holding one): a model trained with that table can then be warm-started on the new
directory, say with another image tokenizer (``UnifiedModule(init_from=..., reinit=[...])``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers_mm.multimodal import TEXT_FILE, MultimodalTokenizer
from tokenizers_mm.text import TextTokenizer


def document_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every text segment of every line of the documents JSONL files, in order (bad lines raise)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no documents file at {path}")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n} is not valid JSON: {err}") from err
                for seg in doc.get("segments", []) if isinstance(doc, dict) else []:
                    if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                        yield seg["text"]


def build_tokenizer(
    documents: Sequence[str | Path],
    out: str | Path,
    *,
    image_tokenizer: str | Path | None,
    video_tokenizer: str | Path | None,
    vocab_size: int = 512,
    image_size: int = 64,
    video_size: int = 64,
    und_tokens: int = 0,
    und_image_size: int = 0,
    max_height: int = 32,
    max_width: int = 32,
    max_frames: int = 8,
    text_tokenizer: str | Path | None = None,
    video_frames: int | None = None,
) -> MultimodalTokenizer:
    """Train the BPE, attach the VQ tokenizers and save the directory ``out``.

    Args:
        documents: documents JSONL files whose text segments train the BPE.
        out: the tokenizer directory to write.
        image_tokenizer / video_tokenizer: ``.safetensors`` files written by ``anygen export`` (or
            ``ImageTokenizer.save`` / ``VideoTokenizer.save``); ``None`` leaves the modality out.
        vocab_size: BPE ids, at least 256 (fewer when the text has fewer repeated pairs).
        image_size / video_size: pixel sides images and video frames are tokenized at.
        und_tokens / und_image_size: ``<|und|>`` positions per understood image and the pixel side
            given to the understanding encoder (0: no understanding path).
        max_height / max_width / max_frames: largest token grid the size tokens describe.
        text_tokenizer: a ``text_tokenizer.json`` (or a directory holding one) to reuse; ``documents`` are then
            not read and may be empty.
        video_frames: pixel frames of the clips the model will train on, the length a generated clip gets unless
            asked (None: not recorded; generating a clip then needs a size).

    Returns:
        The saved tokenizer.
    """
    from tokenizers_mm.image import ImageTokenizer
    from tokenizers_mm.video import VideoTokenizer

    if text_tokenizer is None:
        if not documents:
            raise ValueError("give at least one documents JSONL (--documents) to train the BPE on, "
                             "or a trained BPE table (--text-tokenizer)")
        texts = list(document_texts(documents))
        if not texts:
            raise ValueError(f"the documents {[str(d) for d in documents]} hold no text segments to train the BPE on")
    for name, path in (("image", image_tokenizer), ("video", video_tokenizer)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"no {name} tokenizer at {path} (expected a .safetensors from anygen export)")
    if text_tokenizer is not None:
        path = Path(text_tokenizer)
        text = TextTokenizer.load(path / TEXT_FILE if path.is_dir() else path)
    else:
        text = TextTokenizer.train(texts, vocab_size=vocab_size)
    image = ImageTokenizer.load(image_tokenizer).eval() if image_tokenizer is not None else None
    video = VideoTokenizer.load(video_tokenizer).eval() if video_tokenizer is not None else None
    tokenizer = MultimodalTokenizer(text, image, video, image_size=image_size, video_size=video_size,
                                    und_tokens=und_tokens, und_image_size=und_image_size, max_height=max_height,
                                    max_width=max_width, max_frames=max_frames, video_frames=video_frames)
    tokenizer.save(out)
    return tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anygen build-tokenizer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=Path, action="append", default=[], metavar="JSONL",
                   help="documents whose text trains the BPE; repeatable (not needed with --text-tokenizer)")
    p.add_argument("--text-tokenizer", type=Path, default=None, metavar="PATH",
                   help="reuse this BPE table (a text_tokenizer.json or a directory holding one) instead of training")
    p.add_argument("--out", type=Path, required=True, help="tokenizer directory to write")
    p.add_argument("--image-tokenizer", type=Path, default=None, help="image VQ .safetensors")
    p.add_argument("--video-tokenizer", type=Path, default=None, help="video VQ .safetensors")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE ids (default 512)")
    p.add_argument("--image-size", type=int, default=64, help="pixel side images are tokenized at (default 64)")
    p.add_argument("--video-size", type=int, default=64, help="pixel side of video frames (default 64)")
    p.add_argument("--und-tokens", type=int, default=0, help="<|und|> positions per understood image (0: none)")
    p.add_argument("--und-image-size", type=int, default=0, help="pixel side for the understanding encoder")
    p.add_argument("--max-height", type=int, default=32, help="largest image / frame height in tokens")
    p.add_argument("--max-width", type=int, default=32, help="largest image / frame width in tokens")
    p.add_argument("--max-frames", type=int, default=8, help="largest video length in latent frames")
    p.add_argument("--video-frames", type=int, default=None,
                   help="pixel frames of the clips the model trains on (1 + 4k, e.g. 9): the length a generated clip "
                        "gets unless asked (default: not recorded, so generating a clip needs --video-size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anygen build-tokenizer``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        tok = build_tokenizer(args.documents, args.out, image_tokenizer=args.image_tokenizer,
                              video_tokenizer=args.video_tokenizer, vocab_size=args.vocab_size,
                              image_size=args.image_size, video_size=args.video_size, und_tokens=args.und_tokens,
                              und_image_size=args.und_image_size, max_height=args.max_height,
                              max_width=args.max_width, max_frames=args.max_frames,
                              text_tokenizer=args.text_tokenizer, video_frames=args.video_frames)
    except (FileNotFoundError, ValueError) as err:
        print(f"anygen build-tokenizer: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "vocab": tok.vocab.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
