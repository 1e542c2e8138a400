"""Token shards: the files ``anygen tokenize`` writes and ``trainers.data.TokenDataModule`` reads.

A shards directory holds ``index.json`` (written last: a directory without it is incomplete), a copy
of the tokenizer's ``tokenizer_config.json``, and numbered shards in one of two formats:

``safetensors`` (``shard-00000.safetensors``; never pickle)
    ``ids`` int32 ``[total tokens]`` (documents concatenated), ``offsets`` int64 ``[n_docs + 1]``,
    ``und_pixels`` float16 ``[N, 3, S, S]`` (the understood images of all documents, in order;
    ``[0, 3, 0, 0]`` when there are none), ``und_offsets`` int64 ``[n_docs + 1]``; the document ids
    are in the file's metadata (``doc_ids``, a JSON list).

``webdataset`` (``shard-00000.tar``)
    per document, members ``<key>.ids.npy`` (int32), ``<key>.und.npy`` (float16 ``[n, 3, S, S]``,
    only when the document has understood images) and ``<key>.json`` (``{"id": ...}``); ``key`` is
    the document's global index, 9 digits. Plain ``.npy`` (``allow_pickle=False``) in a plain tar:
    the ``webdataset`` library reads it as it is, and so does ``TokenShards`` with ``tarfile``.

``TokenShards`` reads either: every document's ids are loaded at open (int32, small); understood
pixels are read on demand (safetensors slices, tar members by offset), so a DataLoader worker
touches only the images of its batch.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

INDEX_FILE = "index.json"
FORMATS: tuple[str, ...] = ("safetensors", "webdataset")
ShardFormat = Literal["safetensors", "webdataset"]
_EXTENSIONS = {"safetensors": ".safetensors", "webdataset": ".tar"}


@dataclass
class TokenizedDocument:
    """One document as stored in a shard.

    Attributes:
        id: the document's id.
        ids: int32 ``[T]`` token ids.
        und_pixels: float16 ``[n, 3, S, S]`` understood images, or ``None``.
    """

    id: str
    ids: np.ndarray
    und_pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def shard_name(number: int, format: ShardFormat) -> str:
    """``shard-00012.safetensors`` / ``shard-00012.tar``."""
    return f"shard-{number:05d}{_EXTENSIONS[format]}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_safetensors_shard(path: str | Path, docs: Sequence[TokenizedDocument]) -> None:
    """Write documents as one safetensors shard (layout in the module docstring)."""
    from safetensors.numpy import save_file

    lengths = [len(d) for d in docs]
    und = [d.und_pixels for d in docs if d.und_pixels is not None and len(d.und_pixels)]
    und_counts = [0 if d.und_pixels is None else len(d.und_pixels) for d in docs]
    tensors = {
        "ids": np.concatenate([d.ids.astype(np.int32) for d in docs]) if docs else np.zeros(0, np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "und_pixels": (np.concatenate(und).astype(np.float16) if und else np.zeros((0, 3, 0, 0), np.float16)),
        "und_offsets": np.concatenate([[0], np.cumsum(und_counts)]).astype(np.int64),
    }
    save_file(tensors, str(path), metadata={"format": "anygen-tokens", "version": "1",
                                            "doc_ids": json.dumps([d.id for d in docs])})


def write_tar_shard(path: str | Path, docs: Sequence[TokenizedDocument], first_key: int) -> None:
    """Write documents as one webdataset tar; document ``j`` gets key ``first_key + j``."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for j, doc in enumerate(docs):
            key = f"{first_key + j:09d}"
            und = 0 if doc.und_pixels is None else len(doc.und_pixels)
            members = [("json", json.dumps({"id": doc.id, "und_images": und}).encode()),
                       ("ids.npy", _npy_bytes(doc.ids.astype(np.int32)))]
            if und:
                members.append(("und.npy", _npy_bytes(doc.und_pixels.astype(np.float16))))
            for ext, data in sorted(members):  # webdataset groups a sample's members by key
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: identical bytes on every run
                tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Collects tokenized documents and writes a shard every ``shard_size`` documents.

    Files are written under a temporary name and renamed when complete.

    Args:
        directory: the shards directory (created).
        format: ``"safetensors"`` or ``"webdataset"``.
        shard_size: documents per shard.
    """

    def __init__(self, directory: str | Path, *, format: ShardFormat = "safetensors", shard_size: int = 1000) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown shard format {format!r}; accepted: {', '.join(FORMATS)}")
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.format, self.shard_size = format, shard_size
        self.shards: list[dict[str, Any]] = []
        self._buffer: list[TokenizedDocument] = []
        self._written = 0  # documents in finished shards

    def add(self, doc: TokenizedDocument) -> None:
        """Queue one document; writes a shard when ``shard_size`` are queued."""
        self._buffer.append(doc)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued documents as a shard (nothing when none are queued)."""
        if not self._buffer:
            return
        name = shard_name(len(self.shards), self.format)
        tmp = self.directory / f".{name}.tmp"
        if self.format == "safetensors":
            write_safetensors_shard(tmp, self._buffer)
        else:
            write_tar_shard(tmp, self._buffer, self._written)
        os.replace(tmp, self.directory / name)
        self.shards.append({
            "file": name,
            "docs": len(self._buffer),
            "tokens": int(sum(len(d) for d in self._buffer)),
            "und_images": int(sum(0 if d.und_pixels is None else len(d.und_pixels) for d in self._buffer)),
        })
        self._written += len(self._buffer)
        self._buffer = []

    def close(self) -> list[dict[str, Any]]:
        """Write what is left; returns one ``{"file", "docs", "tokens", "und_images"}`` entry per shard."""
        self.flush()
        return self.shards

    def remove(self) -> None:
        """Delete every shard this writer wrote (after a failed run)."""
        for entry in self.shards:
            (self.directory / entry["file"]).unlink(missing_ok=True)
        self.shards, self._buffer = [], []


def read_shard(path: str | Path) -> list[TokenizedDocument]:
    """Every document of one shard file (either format), eagerly."""
    path = Path(path)
    if path.suffix == ".tar":
        return [TokenizedDocument(t.id, t.ids, _read_npy(path, t.und) if t.und else None) for t in _scan_tar(path)]
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        ids, offsets = f.get_tensor("ids"), f.get_tensor("offsets")
        und, und_offsets = f.get_tensor("und_pixels"), f.get_tensor("und_offsets")
        doc_ids = json.loads((f.metadata() or {}).get("doc_ids", "[]"))
    out = []
    for j in range(len(offsets) - 1):
        a, b = int(und_offsets[j]), int(und_offsets[j + 1])
        out.append(TokenizedDocument(doc_ids[j] if j < len(doc_ids) else str(j), ids[offsets[j]:offsets[j + 1]],
                                     und[a:b] if b > a else None))
    return out


@dataclass
class _TarSample:
    id: str
    ids: np.ndarray
    und: tuple[int, int] | None  # (byte offset, size) of the und.npy member
    und_images: int


def _scan_tar(path: Path) -> list[_TarSample]:
    """Documents of a tar shard in key order; ids read, understood pixels only located."""
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                sample = samples.setdefault(key, {})
                sample[ext] = (member.offset_data, member.size) if ext == "und.npy" else tar.extractfile(member).read()
    out = []
    for key in sorted(samples):
        sample = samples[key]
        if "ids.npy" not in sample:
            raise ValueError(f"{path}: sample {key} has no ids.npy member")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        und = sample.get("und.npy")
        if und is not None and "und_images" not in meta:
            meta["und_images"] = len(_read_npy(path, und))
        out.append(_TarSample(str(meta.get("id", key)), np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False),
                              und, int(meta.get("und_images", 0))))
    return out


def _read_npy(path: Path, location: tuple[int, int]) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(location[0])
        return np.load(io.BytesIO(f.read(location[1])), allow_pickle=False)


class TokenShards:
    """Random access to the documents of a shards directory.

    Args:
        directory: what ``anygen tokenize`` wrote (must contain ``index.json``).

    Attributes:
        index: the parsed ``index.json``.
        lengths: int64 ``[n_docs]`` tokens per document.
        und_counts: int64 ``[n_docs]`` understood images per document.
        doc_ids: the documents' ids.
        groups: the documents' mixture groups (``Document.group``), or ``None`` for shards written
            before ``index.json`` recorded them.

    Raises:
        FileNotFoundError: the directory or its ``index.json`` is missing, or a shard it lists.
        ValueError: the index and the shards disagree.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no shards directory at {self.directory} (run `anygen tokenize` first)")
        if not index_path.is_file():
            raise FileNotFoundError(f"no {INDEX_FILE} in {self.directory}: not a shards directory, or `anygen "
                                    "tokenize` did not finish")
        self.index: dict[str, Any] = json.loads(index_path.read_text())
        self.format: str = self.index.get("format", "safetensors")
        self._ids: list[np.ndarray] = []  # per shard: all ids, concatenated
        self._offsets: list[np.ndarray] = []  # per shard: [docs + 1]
        self._und_offsets: list[np.ndarray] = []
        self._und_locations: list[list[tuple[int, int] | None]] = []  # tar only: (offset, size) per document
        self.doc_ids: list[str] = []
        for entry in self.index.get("shards", []):
            path = self.directory / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{index_path} lists {entry['file']}, which is missing")
            self._open(path)
        self._first_doc = np.concatenate([[0], np.cumsum([len(o) - 1 for o in self._offsets])]).astype(np.int64)
        self.lengths = (np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets
                        else np.zeros(0, np.int64)).astype(np.int64)
        self.und_counts = (np.concatenate([np.diff(o) for o in self._und_offsets]) if self._und_offsets
                           else np.zeros(0, np.int64)).astype(np.int64)
        if len(self.lengths) != self.index.get("docs", len(self.lengths)):
            raise ValueError(f"{index_path} says {self.index.get('docs')} documents, "
                             f"the shards hold {len(self.lengths)}")
        self.groups: list[str] | None = None
        recorded = self.index.get("groups")
        if recorded is not None:
            names, codes = recorded.get("names", []), recorded.get("of_document", [])
            if len(codes) != len(self.lengths) or any(not 0 <= c < len(names) for c in codes):
                raise ValueError(f"{index_path}: 'groups' gives {len(codes)} document groups over {len(names)} "
                                 f"names for {len(self.lengths)} documents")
            self.groups = [names[c] for c in codes]
        self._handles: dict[int, Any] = {}

    # -- opening -------------------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        if self.format == "webdataset":
            samples = _scan_tar(path)
            self._ids.append(np.concatenate([t.ids for t in samples]).astype(np.int32) if samples
                             else np.zeros(0, np.int32))
            self._offsets.append(np.concatenate([[0], np.cumsum([len(t.ids) for t in samples])]).astype(np.int64))
            self._und_offsets.append(np.concatenate([[0], np.cumsum([t.und_images for t in samples])]).astype(np.int64))
            self._und_locations.append([t.und for t in samples])
            self.doc_ids += [t.id for t in samples]
            return
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            self._ids.append(f.get_tensor("ids"))
            self._offsets.append(f.get_tensor("offsets").astype(np.int64))
            self._und_offsets.append(f.get_tensor("und_offsets").astype(np.int64))
            n = len(self._offsets[-1]) - 1
            ids = json.loads((f.metadata() or {}).get("doc_ids", "null")) or [f"{path.name}:{j}" for j in range(n)]
        self._und_locations.append([])
        self.doc_ids += ids

    # -- access --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(len(self.lengths))

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range: these shards hold {len(self)}")
        shard = int(np.searchsorted(self._first_doc, i, side="right") - 1)
        return shard, i - int(self._first_doc[shard])

    def ids(self, i: int) -> np.ndarray:
        """int32 ``[T]`` ids of document ``i``."""
        shard, j = self._locate(i)
        offsets = self._offsets[shard]
        return self._ids[shard][offsets[j]:offsets[j + 1]]

    def und_pixels(self, i: int) -> np.ndarray | None:
        """float16 ``[n, 3, S, S]`` understood images of document ``i``, or ``None``."""
        shard, j = self._locate(i)
        a, b = int(self._und_offsets[shard][j]), int(self._und_offsets[shard][j + 1])
        if b == a:
            return None
        path = self.directory / self.index["shards"][shard]["file"]
        if self.format == "webdataset":
            return _read_npy(path, self._und_locations[shard][j])
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[shard] = safe_open(str(path), framework="np")
        return handle.get_slice("und_pixels")[a:b]

    def __getitem__(self, i: int) -> TokenizedDocument:
        return TokenizedDocument(self.doc_ids[i], self.ids(i), self.und_pixels(i))

    def __iter__(self) -> Iterator[TokenizedDocument]:
        return (self[i] for i in range(len(self)))

    # open safetensors handles do not pickle: a DataLoader worker opens its own
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}


__all__ = ["FORMATS", "INDEX_FILE", "ShardWriter", "TokenShards", "TokenizedDocument", "read_shard", "shard_name",
           "write_safetensors_shard", "write_tar_shard"]
