"""The interleaved document format: JSONL, one document a line (OBELICS / MMC4-like).

This module owns the format, its validation, and turning a document into the segments
``MultimodalTokenizer.encode`` reads::

    {"id": "doc-1",                          # optional; default "<file stem>:<line>"
     "segments": [{"text": "a red circle"},
                  {"image": "images/0001.png"},        # written with VQ tokens
                  {"video": "videos/0001.mp4"},
                  {"understand": "images/0002.png"}],  # read by the understanding encoder
     "meta": {...}}                          # optional ground truth, kept as is

Paths are relative to the JSONL's directory (absolute paths are kept). Other top-level keys are
ignored, so OBELICS-style extra fields do no harm. A line that breaks the format raises
``DocumentError`` naming ``file:line`` and the problem; so does a document whose files cannot be
loaded (``load_document``).

Loading policy (``load_document``): images go through ``preprocess_image`` at the tokenizer's
image size (center crop); clips through ``load_clip``, which reads the whole clip at the video size
and keeps its first ``video_frames`` frames, refusing a clip that is shorter (never padded with
repeated frames); understood images are loaded as RGB and left to the tokenizer's understanding
preprocessing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch and the segment types load on first use: the generators' workers never need them
    import torch

    from tokenizers_mm.segments import Segment

SegmentKind = Literal["text", "image", "video", "understand"]
SEGMENT_KINDS: tuple[str, ...] = ("text", "image", "video", "understand")
FILE_KINDS: tuple[str, ...] = ("image", "video", "understand")


class DocumentError(ValueError):
    """A document that breaks the format or cannot be loaded.

    Attributes:
        source: ``"file:line"`` of the document.
        doc_id: the document's id, when known.
        reason: what is wrong, without the location.
        category: a short tag for summaries: ``"invalid-document"``, ``"missing-file"``,
            ``"unreadable-file"``, ``"clip-length"`` (or a caller's own, e.g. ``"too-long"``).
    """

    def __init__(self, source: str, reason: str, doc_id: str | None = None, category: str = "invalid-document"
                 ) -> None:
        self.source, self.reason, self.doc_id, self.category = source, reason, doc_id, category
        where = f"{source} (document {doc_id!r})" if doc_id else source
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep every field across process boundaries (worker pools)
        return (type(self), (self.source, self.reason, self.doc_id, self.category))


class ClipLengthError(ValueError):
    """A clip with fewer frames than asked for (clips are never padded with repeated frames)."""


@dataclass(frozen=True)
class SegmentSpec:
    """One segment as written in the JSONL: its kind and its text or (unresolved) path."""

    kind: str
    value: str


@dataclass
class Document:
    """One validated line of a documents JSONL.

    Attributes:
        id: the document's id.
        segments: its segments, in order.
        meta: the optional ``"meta"`` object (ground truth of generated data), else ``{}``.
        path: the JSONL file; relative segment paths resolve against its directory.
        line: 1-based line number in ``path``.
    """

    id: str
    segments: list[SegmentSpec]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path = Path(".")
    line: int = 0

    @property
    def source(self) -> str:
        """``"file:line"``, for messages."""
        return f"{self.path}:{self.line}"

    def resolve(self, spec: SegmentSpec) -> Path:
        """Absolute path of a file segment."""
        return self.path.parent / spec.value

    def files(self) -> list[Path]:
        """Paths of every image, clip and understood image, in order."""
        return [self.resolve(s) for s in self.segments if s.kind in FILE_KINDS]

    def to_json(self) -> dict[str, Any]:
        """The JSONL object of this document (paths as written)."""
        out: dict[str, Any] = {"id": self.id, "segments": [{s.kind: s.value} for s in self.segments]}
        if self.meta:
            out["meta"] = self.meta
        return out

    @property
    def group(self) -> str:
        """The mixture group ``TokenDataModule(weights=...)`` weighs this document by.

        ``meta["group"]`` when it is a string; else ``"<source>/<kind>"``: the id up to its first
        ``-`` (``"shapes"`` for ``shapes-train-000123``; ``"documents"`` for an id without one) and
        ``meta["kind"]`` (``"document"`` without one). ``anygen data shapes`` / ``digits`` give
        ``shapes/t2i``, ``shapes/caption``, ..., ``digits/t2i``, ``digits/caption``.
        """
        group = self.meta.get("group")
        if isinstance(group, str) and group:
            return group
        source = self.id.split("-", 1)[0] if "-" in self.id else "documents"
        kind = self.meta.get("kind")
        return f"{source}/{kind if isinstance(kind, str) and kind else 'document'}"

    def error(self, reason: str, category: str = "invalid-document") -> DocumentError:
        """A ``DocumentError`` located at this document."""
        return DocumentError(self.source, reason, self.id, category)


def parse_document(obj: Any, *, path: str | Path = "<memory>", line: int = 0) -> Document:
    """Validate one decoded JSON value as a document.

    Raises:
        DocumentError: naming ``path:line`` and what is wrong.
    """
    path = Path(path)
    source = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise DocumentError(source, f"a document is a JSON object with a \"segments\" list, got {type(obj).__name__}")
    doc_id = obj.get("id", f"{path.stem}:{line}")
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        raise DocumentError(source, f"\"id\" must be a string, got {doc_id!r}")
    doc_id = str(doc_id)
    segments = obj.get("segments")
    if segments is None:
        raise DocumentError(source, f"missing \"segments\" (keys present: {sorted(obj)})", doc_id)
    if not isinstance(segments, list) or not segments:
        raise DocumentError(source, "\"segments\" must be a non-empty list of {\"text\"|\"image\"|\"video\"|"
                                    "\"understand\": string} objects", doc_id)
    specs: list[SegmentSpec] = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or len(seg) != 1:
            raise DocumentError(source, f"segment #{i} must be an object with exactly one key of "
                                        f"{', '.join(SEGMENT_KINDS)}; got {json.dumps(seg)[:80]}", doc_id)
        (kind, value), = seg.items()
        if kind not in SEGMENT_KINDS:
            raise DocumentError(source, f"segment #{i} has unknown kind {kind!r}; accepted: "
                                        f"{', '.join(SEGMENT_KINDS)}", doc_id)
        if not isinstance(value, str) or (kind in FILE_KINDS and not value.strip()):
            what = "a string" if kind == "text" else "a non-empty relative path"
            raise DocumentError(source, f"segment #{i} ({kind}) must be {what}, got {value!r}", doc_id)
        specs.append(SegmentSpec(kind, value))
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise DocumentError(source, f"\"meta\" must be an object, got {type(meta).__name__}", doc_id)
    return Document(id=doc_id, segments=specs, meta=meta, path=path, line=line)


def read_documents(path: str | Path, *, on_error: Callable[[DocumentError], None] | None = None
                   ) -> Iterator[Document]:
    """Read and validate a documents JSONL, lazily. Blank lines are skipped.

    Args:
        path: the ``.jsonl`` file.
        on_error: called with the ``DocumentError`` of each invalid line, which is then skipped;
            ``None`` raises it instead.

    Raises:
        FileNotFoundError: no file at ``path``.
        DocumentError: a line is not valid JSON or not a valid document (when ``on_error`` is None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no documents file at {path} (expected a JSONL file, one document a line)")
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DocumentError(f"{path}:{number}", f"not valid JSON ({err.msg} at column {err.colno})"
                                        ) from None
                yield parse_document(obj, path=path, line=number)
            except DocumentError as err:
                if on_error is None:
                    raise
                on_error(err)


def write_documents(path: str | Path, documents: Iterable[Document | dict[str, Any]]) -> int:
    """Write documents (``Document`` or plain JSONL objects) one a line; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc.to_json() if isinstance(doc, Document) else doc, ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_texts(path: str | Path) -> Iterator[str]:
    """Every text segment of a documents JSONL (e.g. to train the BPE on the corpus)."""
    for doc in read_documents(path):
        for spec in doc.segments:
            if spec.kind == "text":
                yield spec.value


def check_files(doc: Document) -> None:
    """Raise ``DocumentError`` for the first file segment whose file does not exist (no decoding)."""
    for i, spec in enumerate(doc.segments):
        if spec.kind in FILE_KINDS and not doc.resolve(spec).is_file():
            raise doc.error(f"segment #{i} ({spec.kind}): missing file {doc.resolve(spec)}", "missing-file")


# -- loading ---------------------------------------------------------------------------------------


def load_clip(path: str | Path, *, frames: int | None = None, size: int | tuple[int, int] | None = None,
              fps: float | None = None) -> tuple[torch.Tensor, float]:
    """Read a clip for tokenizing.

    Args:
        path: the video file.
        frames: frames to keep, ``1 + 4k``; the clip must have at least that many (its first
            ``frames`` are kept). ``None`` keeps the clip's own length, trimmed to ``1 + 4k``.
        size: frame size ``(h, w)`` (multiples of 8) or a shorter side, as ``load_video``.
        fps: resample to this rate first; ``None`` keeps the file's rate.

    Returns:
        ``(frames float [3, T, H, W] in [-1, 1], fps)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ClipLengthError: the clip is shorter than ``frames``.
        ValueError: the file is not a readable video.
    """
    from tokenizers_mm.video_io import TEMPORAL_DOWNSAMPLE, load_video

    if frames is not None and (not isinstance(frames, int) or frames < 1 or (frames - 1) % TEMPORAL_DOWNSAMPLE):
        raise ValueError(f"frames must be 1 + {TEMPORAL_DOWNSAMPLE}k (1, 5, 9, 17, ...), got {frames!r}")
    clip, rate = load_video(path, size=size, fps=fps, frame_policy="trim")
    # trimming keeps the largest 1 + 4k <= T frames, so a clip with >= `frames` frames keeps >= `frames`
    if frames is not None:
        if clip.shape[1] < frames:
            raise ClipLengthError(f"clip {path} is too short: it has fewer than {frames} frames "
                             f"({clip.shape[1]} after trimming to 1 + 4k); clips are never padded")
        clip = clip[:, :frames]
    return clip, rate


def load_document(
    doc: Document,
    *,
    image_size: int | tuple[int, int],
    video_size: int | tuple[int, int] | None = None,
    video_frames: int | None = None,
    video_fps: float | None = None,
    image_factor: int = 1,
    understand_as_image: bool = False,
) -> list[Segment]:
    """Load a document's pixels into the segments ``MultimodalTokenizer.encode`` reads.

    Args:
        doc: a validated document.
        image_size: pixel size images are brought to (``tokenizer.image_size``).
        video_size: frame size of clips (``tokenizer.video_size``); ``None`` keeps the file's.
        video_frames: frames per clip (see ``load_clip``); ``None`` keeps each clip's length.
        video_fps: resample clips to this rate; ``None`` keeps the file's.
        image_factor: the image tokenizer's downsampling; ``image_size`` must be a multiple of it.
        understand_as_image: turn ``understand`` segments into VQ ``Image`` segments (for a model
            without an understanding encoder).

    Returns:
        ``Text`` / ``Image`` (float tensor ``(3, H, W)``) / ``Video`` / ``Understand`` (RGB PIL) segments.

    Raises:
        DocumentError: a file is missing or unreadable, or a clip is too short; the message names
            the document, the segment and the file.
    """
    from tokenizers_mm.preprocess import load_image, preprocess_image
    from tokenizers_mm.segments import Image, Text, Understand, Video

    out: list[Segment] = []
    for i, spec in enumerate(doc.segments):
        if spec.kind == "text":
            out.append(Text(spec.value))
            continue
        path = doc.resolve(spec)
        try:
            if not path.is_file():
                raise FileNotFoundError(f"missing file {path}")
            if spec.kind == "image" or (spec.kind == "understand" and understand_as_image):
                out.append(Image(preprocess_image(path, image_size, factor=image_factor)))
            elif spec.kind == "understand":
                out.append(Understand(load_image(path)))
            else:
                frames, rate = load_clip(path, frames=video_frames, size=video_size, fps=video_fps)
                out.append(Video(frames=frames, fps=rate))
        except (FileNotFoundError, ValueError, OSError) as err:
            category = ("missing-file" if isinstance(err, FileNotFoundError) else
                        "clip-length" if isinstance(err, ClipLengthError) else "unreadable-file")
            raise doc.error(f"segment #{i} ({spec.kind} {spec.value!r}): {err}", category) from err
    return out


def prepare_dataset_dir(out: Path, overwrite: bool, names: Sequence[str]) -> None:
    """Create ``out`` for a generated data set: refuse a non-empty one unless ``overwrite``, in which
    case only ``names`` (the generator's own files and folders) are removed first."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace its data set")
        for name in names:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


__all__ = [
    "FILE_KINDS", "SEGMENT_KINDS", "ClipLengthError", "Document", "DocumentError", "SegmentSpec", "check_files",
    "iter_texts", "load_clip", "load_document", "parse_document", "prepare_dataset_dir",
    "read_documents", "write_documents",
]
