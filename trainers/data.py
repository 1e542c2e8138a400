"""Lightning DataModules: pixels for the VQ tokenizers, packed token rows for the transformer.

This module owns:

* ``ImageDataModule``: every image of a documents JSONL (images, understood images, optionally
  frames of clips) at one size → ``{"pixels": (B, 3, H, W)}`` in ``[-1, 1]``.
* ``VideoDataModule``: the clips of a documents JSONL, plus its images as one-frame clips for joint
  image / video training; every batch is all clips or all images → ``{"pixels": (B, 3, T, H, W)}``.
* ``TokenDataModule``: the shards of ``anygen tokenize`` → rows of ``seq_len`` tokens packed with
  whole documents (greedy first-fit, a document is never split), prompt dropout for
  classifier-free guidance, per-group mixture weights, and an exact mid-epoch resume.
* ``pack_documents``: the first-fit packer.

How batches are made: each DataLoader has ``batch_size=None`` and a sampler that yields whole batch
plans (lists of indices, or rows of documents); the dataset turns one plan into one collated batch,
so DataLoader workers parallelise over batches. The plan of an epoch is a pure function of
``(seed, epoch)``; Lightning calls ``sampler.set_epoch`` each epoch. Under DDP run with
``Trainer(use_distributed_sampler=False)``: the samplers give each rank its own share of batches.

Resuming (``TokenDataModule``): Lightning stores ``datamodule.state_dict()`` in every checkpoint —
the epoch and the number of batches the loop has processed in it — and ``load_state_dict`` makes
the next train loader skip exactly those batches, so a resumed run sees the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from anygen.data.documents import DocumentError, load_clip, read_documents
from anygen.data.shards import TokenShards
from tokenizers_mm.vocab import Vocab

log = logging.getLogger("anygen.data")
IGNORE_INDEX = -100  # targets without a next token: padding and the last position of each document

# -- shared machinery ------------------------------------------------------------------------------


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train, val)`` index arrays over ``range(n)``; val gets at least one item when it can."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_weights(weights: Any) -> dict[str, float] | None:
    if weights is None:
        return None
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights must be a non-empty mapping of group pattern to weight, got {weights!r}")
    out: dict[str, float] = {}
    for pattern, weight in weights.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"weights: a key must be a group name or pattern such as 'shapes/caption', "
                             f"got {pattern!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weights[{pattern!r}] must be a finite number >= 0, got {weight!r}")
        out[pattern] = float(weight)
    return out


def _distribution(trainer: Any) -> tuple[int, int]:
    """``(rank, world_size)`` of a Lightning trainer; refuses Lightning's own sampler injection."""
    if trainer is None:
        return 0, 1
    world = int(getattr(trainer, "world_size", 1))
    if world > 1 and getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
        raise ValueError("the anygen DataModules shard batches by rank themselves: run distributed training with "
                         "Trainer(use_distributed_sampler=False) (--trainer.use_distributed_sampler false)")
    return int(getattr(trainer, "global_rank", 0)), world


class _PlanSampler(Sampler):
    """Yields one epoch's batch plans; ``plan(epoch)`` is implemented by subclasses.

    Lightning calls ``set_epoch`` before each epoch. ``start`` batches of the next iteration are
    skipped (a resumed epoch); ``position`` counts the batches handed out in the current epoch.
    """

    def __init__(self, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> None:
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch = 0
        self.start = 0
        self.position = 0
        self._cache: tuple[int, list] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a pending resume belongs to the epoch it was saved in
        self.epoch = epoch

    def plan(self, epoch: int) -> list:
        raise NotImplementedError

    def batches(self, epoch: int) -> list:
        """This rank's batch plans of ``epoch`` (every rank gets the same count)."""
        if self._cache is None or self._cache[0] != epoch:
            batches = self.plan(epoch)
            per_rank = len(batches) // self.world_size
            self._cache = (epoch, batches[self.rank::self.world_size][:per_rank])
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator:
        batches = self.batches(self.epoch)
        start, self.start = min(self.start, len(batches)), 0
        self.position = start
        for batch in batches[start:]:
            self.position += 1
            yield batch


def _chunks(items: Sequence, size: int, drop_last: bool) -> list[list]:
    out = [list(items[i:i + size]) for i in range(0, len(items), size)]
    if drop_last and out and len(out[-1]) < size:
        out.pop()
    return out


def _loader(dataset: Dataset, sampler: Sampler, num_workers: int) -> DataLoader:
    # batch_size=None: the sampler yields whole batch plans and the dataset collates them
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=False)


class _ResumableLoader(DataLoader):
    """A train DataLoader that Lightning recognises as resumable (``state_dict`` / ``load_state_dict``).

    Both delegate to the DataModule, whose state Lightning also saves: the loop restores the loader
    before iterating it, so either path puts the sampler at the saved position.
    """

    def __init__(self, datamodule: TokenDataModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule

    def state_dict(self) -> dict[str, int]:
        return self._datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._datamodule.load_state_dict(state_dict)


# -- images and video ------------------------------------------------------------------------------


def _collect_files(documents: str | Path, kinds: Sequence[str], strict: bool) -> dict[str, list[Path]]:
    """Unique existing files of each segment kind in a documents JSONL, in order of appearance.

    Invalid lines and missing files raise with ``strict``, else they are skipped with one warning.
    """
    path = Path(documents)
    if not path.is_file():
        raise FileNotFoundError(f"no documents file at {path} (expected a JSONL written by `anygen data` or by hand)")
    problems: list[DocumentError] = []
    found: dict[str, dict[Path, None]] = {k: {} for k in kinds}
    for doc in read_documents(path, on_error=None if strict else problems.append):
        for i, spec in enumerate(doc.segments):
            if spec.kind not in found:
                continue
            file = doc.resolve(spec)
            if not file.is_file():
                err = doc.error(f"segment #{i} ({spec.kind}): missing file {file}", "missing-file")
                if strict:
                    raise err
                problems.append(err)
                continue
            found[spec.kind][file] = None
    if problems:
        log.warning("%s: skipped %d invalid document(s) / missing file(s), e.g. %s", path, len(problems), problems[0])
    return {k: list(v) for k, v in found.items()}


class _LoadImage:
    """Reads an image item ``(path, None)`` or a clip frame ``(path, k)`` as ``(3, S, S)`` (picklable)."""

    def __init__(self, size: int, video_frames: int) -> None:
        self.size, self.video_frames = size, video_frames

    def __call__(self, item: tuple[Path, int | None]) -> torch.Tensor:
        from tokenizers_mm.preprocess import preprocess_image

        path, frame = item
        if frame is None:
            return preprocess_image(path, self.size)
        clip, _ = load_clip(path)
        t = round(frame * (clip.shape[1] - 1) / max(1, self.video_frames - 1))  # evenly spaced frames
        return preprocess_image(clip[:, t], self.size)


class _LoadClip:
    """Reads ``("video", path)`` as ``(3, T, S, S)`` and ``("image", path)`` as ``(3, 1, S, S)`` (picklable)."""

    def __init__(self, frames: int, size: int, fps: float | None) -> None:
        self.frames, self.size, self.fps = frames, size, fps

    def __call__(self, item: tuple[str, Path]) -> torch.Tensor:
        from tokenizers_mm.preprocess import preprocess_image

        kind, path = item
        if kind == "image":
            return preprocess_image(path, self.size)[:, None]  # (3, 1, H, W)
        clip, _ = load_clip(path, frames=self.frames, size=(self.size, self.size), fps=self.fps)
        return clip


class _FileBatches(Dataset):
    """Loads one batch plan (a list of item indices) into ``{"pixels": ...}``.

    ``load(item) -> tensor`` reads one item. An unreadable item raises with ``strict``; otherwise it
    is replaced by the next readable item of the same list (logged once per file), so a batch keeps
    its shape and never holds a made-up sample.
    """

    def __init__(self, items: Sequence[Any], load: Any, strict: bool, flip: bool = False) -> None:
        self.items, self.load, self.strict, self.flip = list(items), load, strict, flip
        self._bad: set[int] = set()

    def _get(self, i: int) -> torch.Tensor:
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            if j in self._bad:
                continue
            try:
                return self.load(self.items[j])
            except (FileNotFoundError, ValueError, OSError) as err:
                if self.strict:
                    raise ValueError(f"cannot load {self.items[j]}: {err}") from err
                self._bad.add(j)
                log.warning("skipping unreadable %s: %s", self.items[j], err)
        raise ValueError("no readable item left in this data set")

    def __getitem__(self, plan: Sequence[int]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([self._get(int(i)) for i in plan])
        if self.flip:
            # a deterministic coin per batch plan, so workers and reruns agree
            coins = np.random.default_rng([int(i) for i in plan[:8]]).random(len(plan)) < 0.5
            pixels[torch.from_numpy(coins)] = pixels[torch.from_numpy(coins)].flip(-1)
        return {"pixels": pixels}

    def __len__(self) -> int:
        return len(self.items)


class _ShuffledBatches(_PlanSampler):
    """Batches of ``batch_size`` indices from ``indices``, reshuffled every epoch when ``shuffle``."""

    def __init__(self, indices: Sequence[int], batch_size: int, *, drop_last: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.indices, self.batch_size, self.drop_last = np.asarray(indices), batch_size, drop_last

    def plan(self, epoch: int) -> list[list[int]]:
        order = _epoch_rng(self.seed, epoch, 1).permutation(self.indices) if self.shuffle else self.indices
        return _chunks(order.tolist(), self.batch_size, self.drop_last)


class ImageDataModule(LightningDataModule):
    """Images of a documents JSONL for training an image tokenizer.

    Args:
        documents: a documents JSONL (see ``anygen.data.documents``).
        image_size: side the images are brought to (``preprocess_image``: resize and center crop).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of the (unique) images kept for validation.
        seed: the split and the per-epoch shuffles follow from it.
        strict: raise on an invalid line, a missing or unreadable file instead of skipping it.
        video_frames: also take this many evenly spaced frames of every clip (0: none).
        include_understand: also use the ``understand`` images.
        flip: random horizontal flips in training (off: left / right carry meaning in captions).

    Batches: ``{"pixels": FloatTensor[B, 3, H, W]}`` in ``[-1, 1]``.
    """

    def __init__(self, documents: str, image_size: int = 64, batch_size: int = 16, num_workers: int = 0,
                 val_fraction: float = 0.05, seed: int = 0, strict: bool = False, video_frames: int = 0,
                 include_understand: bool = True, flip: bool = False) -> None:
        super().__init__()
        for name in ("image_size", "batch_size"):
            _check_positive(name, locals()[name])
        self.documents, self.image_size, self.batch_size = documents, image_size, batch_size
        self.num_workers, self.val_fraction, self.seed, self.strict = num_workers, val_fraction, seed, strict
        self.video_frames, self.include_understand, self.flip = video_frames, include_understand, flip
        self.items: list[tuple[Path, int | None]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.items:
            return
        files = _collect_files(self.documents, ("image", "understand", "video"), self.strict)
        images = list(dict.fromkeys(files["image"] + (files["understand"] if self.include_understand else [])))
        items: list[tuple[Path, int | None]] = [(f, None) for f in images]
        if self.video_frames > 0:
            items += [(f, t) for f in files["video"] for t in range(self.video_frames)]
        if not items:
            raise ValueError(f"{self.documents} has no image{' or clip' if self.video_frames else ''} files to "
                             "train on")
        self.items = items
        self.train_idx, self.val_idx = _split(len(items), self.val_fraction, self.seed)

    def _make(self, split: str) -> DataLoader:
        self.setup()
        train = split == "train"
        indices = self.train_idx if train else self.val_idx
        rank, world = _distribution(getattr(self, "trainer", None))
        sampler = _ShuffledBatches(indices, self.batch_size, drop_last=train and len(indices) >= self.batch_size,
                                   seed=self.seed, shuffle=train, rank=rank, world_size=world)
        load = _LoadImage(self.image_size, self.video_frames)
        return _loader(_FileBatches(self.items, load, self.strict, flip=train and self.flip), sampler, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._make("train")

    def val_dataloader(self) -> DataLoader:
        return self._make("val")


class _VideoBatches(_PlanSampler):
    """Homogeneous batches: clips (indices below ``n_clips``) or images (the rest), mixed so that about
    ``image_fraction`` of the batches are images."""

    def __init__(self, clips: Sequence[int], images: Sequence[int], batch_size: int, image_fraction: float, *,
                 drop_last: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.clips, self.images = np.asarray(clips, dtype=np.int64), np.asarray(images, dtype=np.int64)
        self.batch_size, self.image_fraction, self.drop_last = batch_size, image_fraction, drop_last

    def plan(self, epoch: int) -> list[list[int]]:
        rng = _epoch_rng(self.seed, epoch, 2)
        clips = rng.permutation(self.clips) if self.shuffle else self.clips
        clip_batches = _chunks(clips.tolist(), self.batch_size, self.drop_last and len(clips) >= self.batch_size)
        image_batches: list[list[int]] = []
        if len(self.images) and self.image_fraction > 0:
            if not clip_batches or self.image_fraction >= 1:
                n = math.ceil(len(self.images) / self.batch_size)
            else:
                n = max(1, round(len(clip_batches) * self.image_fraction / (1 - self.image_fraction)))
            reps = math.ceil(n * self.batch_size / len(self.images))
            pool = np.concatenate([rng.permutation(self.images) if self.shuffle else self.images
                                   for _ in range(reps)])
            image_batches = _chunks(pool[:n * self.batch_size].tolist(), self.batch_size, False)
        batches = clip_batches + image_batches
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


class VideoDataModule(LightningDataModule):
    """Clips (and images as one-frame clips) of a documents JSONL for training a video tokenizer.

    Args:
        documents: a documents JSONL.
        frames: frames per clip, ``1 + 4k``; shorter clips are bad data (never padded).
        size: frame side; clips and images are resized and center-cropped to ``size × size``.
        image_fraction: share of batches made of images (``T = 1``); 0 trains on clips only.
        batch_size: clips (or images) per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of clips and of images kept for validation.
        seed: the split and the per-epoch order follow from it.
        strict: raise on an invalid line, a missing or unreadable file instead of skipping it.
        fps: resample clips to this frame rate first (``None``: the file's).

    Batches: ``{"pixels": FloatTensor[B, 3, T, H, W]}`` with ``T = frames`` or ``T = 1``.
    """

    def __init__(self, documents: str, frames: int = 9, size: int = 64, image_fraction: float = 0.25,
                 batch_size: int = 4, num_workers: int = 0, val_fraction: float = 0.05, seed: int = 0,
                 strict: bool = False, fps: float | None = None) -> None:
        super().__init__()
        _check_positive("batch_size", batch_size)
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
            raise ValueError(f"frames must be 1 + 4k (1, 5, 9, 17, ...), got {frames!r}")
        if not isinstance(size, int) or size < 8 or size % 8:
            raise ValueError(f"size must be a positive multiple of 8, got {size!r}")
        if not 0 <= image_fraction <= 1:
            raise ValueError(f"image_fraction must lie in [0, 1], got {image_fraction!r}")
        self.documents, self.frames, self.size, self.image_fraction = documents, frames, size, image_fraction
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        self.seed, self.strict, self.fps = seed, strict, fps
        self.items: list[tuple[str, Path]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.items:
            return
        files = _collect_files(self.documents, ("video", "image", "understand"), self.strict)
        clips = files["video"]
        images = list(dict.fromkeys(files["image"] + files["understand"])) if self.image_fraction > 0 else []
        if not clips and not images:
            raise ValueError(f"{self.documents} has no clips{' or images' if self.image_fraction > 0 else ''} "
                             "to train on")
        if not clips:
            log.warning("%s has no clips: the video tokenizer will see images (T=1) only", self.documents)
        self.items = [("video", f) for f in clips] + [("image", f) for f in images]
        self.n_clips = len(clips)
        c_train, c_val = _split(len(clips), self.val_fraction, self.seed)
        i_train, i_val = _split(len(images), self.val_fraction, self.seed + 1)
        self._splits = {"train": (c_train, i_train + self.n_clips), "val": (c_val, i_val + self.n_clips)}

    def _make(self, split: str) -> DataLoader:
        self.setup()
        clips, images = self._splits[split]
        train = split == "train"
        rank, world = _distribution(getattr(self, "trainer", None))
        sampler = _VideoBatches(clips, images, self.batch_size, self.image_fraction, drop_last=train, seed=self.seed,
                                shuffle=train, rank=rank, world_size=world)
        load = _LoadClip(self.frames, self.size, self.fps)
        return _loader(_FileBatches(self.items, load, self.strict), sampler, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._make("train")

    def val_dataloader(self) -> DataLoader:
        return self._make("val")


# -- tokens ----------------------------------------------------------------------------------------


def pack_documents(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: each item goes to the first row (in opening order) with room for it.

    Args:
        lengths: item sizes, each ``<= capacity``.
        capacity: row size.

    Returns:
        Rows as lists of positions into ``lengths``, in the order rows were opened; within a row,
        positions keep their order in ``lengths``.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max(lengths) > capacity:
        raise ValueError(f"an item of length {max(lengths)} does not fit rows of {capacity}")
    # a max segment tree over the room left in n rows (unopened rows have full room, and sit to the
    # right of every opened row, so "leftmost row with room" is exactly first-fit): O(n log n)
    size = 1 << max(1, (n - 1).bit_length())
    tree = np.zeros(2 * size, dtype=np.int64)
    tree[size:size + n] = capacity
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    tree_l = tree.tolist()  # python ints: faster than numpy scalars in this loop
    rows: list[list[int]] = []
    for pos, length in enumerate(lengths):
        i = 1
        while i < size:
            i = 2 * i if tree_l[2 * i] >= length else 2 * i + 1
        row = i - size
        if row == len(rows):
            rows.append([])
        rows[row].append(pos)
        tree_l[i] -= length
        i //= 2
        while i:
            tree_l[i] = max(tree_l[2 * i], tree_l[2 * i + 1])
            i //= 2
    return rows


class _Mixture:
    """Which documents an epoch holds under per-group weights, and their packed rows.

    Args:
        docs: the training documents; ``groups``: each one's group code; ``weights``: the weight of
            each group code; ``lengths``: tokens of every document in the shards.

    A document of group weight ``w`` appears ``floor(w)`` times per epoch, and a seeded share of its
    group once more, so that group ``g`` contributes ``round(n_g * w_g)`` copies every epoch (weight 0
    leaves it out). The epoch's copies are shuffled and packed first-fit.
    """

    def __init__(self, docs: np.ndarray, groups: np.ndarray, weights: np.ndarray, lengths: np.ndarray,
                 seq_len: int) -> None:
        self.docs, self.groups, self.weights, self.lengths, self.seq_len = docs, groups, weights, lengths, seq_len

    def copies(self, rng: np.random.Generator) -> np.ndarray:
        """Copies of each of ``docs`` in one epoch."""
        whole = np.floor(self.weights).astype(np.int64)
        copies = whole[self.groups]
        for g, weight in enumerate(self.weights):
            members = np.flatnonzero(self.groups == g)
            extra = int(round(len(members) * weight)) - len(members) * int(whole[g])
            if extra > 0:
                copies[rng.choice(members, size=extra, replace=False)] += 1
        return copies

    def rows(self, rng: np.random.Generator) -> list[list[int]]:
        """One epoch's rows of documents (a document may sit in several rows)."""
        docs = rng.permutation(np.repeat(self.docs, self.copies(rng)))
        return [[int(docs[p]) for p in row] for row in pack_documents(self.lengths[docs], self.seq_len)]


class _PackedBatches(_PlanSampler):
    """Batch plans of packed rows: each row a tuple of ``(document, drop_prompt)``.

    Rows are packed once (first-fit over a seeded document order); every epoch reshuffles the rows
    and draws the prompt dropout afresh. Attention never crosses documents, so which documents
    share a row does not change what the model sees; only batch composition and dropout vary.
    With a ``mixture``, each epoch draws its weighted copies and packs them afresh instead (its
    number of batches may then differ by one or two from epoch to epoch).
    """

    def __init__(self, rows: list[list[int]], batch_size: int, droppable: np.ndarray, prompt_dropout: float, *,
                 drop_last: bool, mixture: _Mixture | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.rows, self.batch_size, self.drop_last = rows, batch_size, drop_last
        self.droppable, self.prompt_dropout, self.mixture = droppable, prompt_dropout, mixture

    def plan(self, epoch: int) -> list[tuple]:
        if self.mixture is not None:
            return self._mixed_plan(epoch)
        order = _epoch_rng(self.seed, epoch, 3).permutation(len(self.rows)) if self.shuffle else range(len(self.rows))
        if self.prompt_dropout > 0:
            drop = (_epoch_rng(self.seed, epoch, 4).random(len(self.droppable)) < self.prompt_dropout) & self.droppable
        else:
            drop = np.zeros(len(self.droppable), dtype=bool)
        rows = [tuple((doc, bool(drop[doc])) for doc in self.rows[r]) for r in order]
        return [tuple(batch) for batch in _chunks(rows, self.batch_size, self.drop_last)]

    def _mixed_plan(self, epoch: int) -> list[tuple]:
        packed = self.mixture.rows(_epoch_rng(self.seed, epoch, 5))
        order = _epoch_rng(self.seed, epoch, 3).permutation(len(packed))
        # dropout per copy: two copies of a document in one epoch draw it independently
        draws = iter(_epoch_rng(self.seed, epoch, 4).random(sum(map(len, packed))).tolist())
        rows = [tuple((doc, bool(self.droppable[doc]) and next(draws) < self.prompt_dropout) for doc in packed[r])
                for r in order]
        return [tuple(batch) for batch in _chunks(rows, self.batch_size, self.drop_last)]


class _PackedRows(Dataset):
    """Builds the batch of one plan from the shards (see ``TokenDataModule`` for the keys)."""

    def __init__(self, shards: TokenShards, seq_len: int, prefix: np.ndarray, pad: int, null: int) -> None:
        self.shards, self.seq_len, self.prefix, self.pad, self.null = shards, seq_len, prefix, pad, null

    def __len__(self) -> int:
        return len(self.shards)

    def document(self, doc: int, drop: bool) -> np.ndarray:
        """The ids of a document, its prompt replaced by ``<|null|>`` when ``drop``."""
        ids = self.shards.ids(doc).astype(np.int64)
        if drop:
            ids = np.concatenate([ids[:1], [self.null], ids[1 + int(self.prefix[doc]):]])
        return ids

    def __getitem__(self, plan: Sequence[Sequence[tuple[int, bool]]]) -> dict[str, torch.Tensor | None]:
        b, length = len(plan), self.seq_len
        ids = np.full((b, length), self.pad, dtype=np.int64)
        targets = np.full((b, length), IGNORE_INDEX, dtype=np.int64)
        document_ids = np.zeros((b, length), dtype=np.int64)
        mask = np.zeros((b, length), dtype=bool)
        und: list[np.ndarray] = []
        for r, row in enumerate(plan):
            pos = 0
            for j, (doc, drop) in enumerate(row):
                x = self.document(doc, drop)
                n = len(x)
                ids[r, pos:pos + n] = x
                targets[r, pos:pos + n - 1] = x[1:]  # the last position of a document predicts nothing
                document_ids[r, pos:pos + n] = j
                mask[r, pos:pos + n] = True
                pixels = self.shards.und_pixels(doc)
                if pixels is not None:
                    und.append(pixels)
                pos += n
            document_ids[r, pos:] = len(row)  # padding is a document of its own
        return {
            "ids": torch.from_numpy(ids),
            "targets": torch.from_numpy(targets),
            "document_ids": torch.from_numpy(document_ids),
            "attention_mask": torch.from_numpy(mask),
            "und_pixels": torch.from_numpy(np.concatenate(und)).float() if und else None,
        }


class TokenDataModule(LightningDataModule):
    """Packed token rows from ``anygen tokenize`` shards, for next-token training.

    Args:
        shards: the shards directory.
        seq_len: tokens per row. Whole documents are packed into rows (greedy first-fit over a
            seeded order); a longer document is skipped (counted, logged), never split.
        batch_size: rows per batch.
        prompt_dropout: per document and epoch, the chance that everything between ``<|bos|>`` and
            the first ``<|boi|>`` / ``<|bov|>`` becomes one ``<|null|>`` (the unconditional branch
            of classifier-free guidance). Documents whose first span is an understood image, or that
            have no text before their first span, are left alone.
        num_workers: DataLoader worker processes.
        val_fraction: share of documents kept for validation (packed in order, no dropout).
        seed: split, packing, row order per epoch and dropout follow from it.
        null_id: id of ``<|null|>``; ``None`` reads it from the vocabulary in ``index.json``.
        tokenizer: a tokenizer directory whose ``tokenizer_config.json`` gives the vocabulary
            instead of ``index.json``.
        weights: mixture weights, ``{pattern: weight}``: each training document whose group
            (``Document.group``, recorded by ``anygen tokenize``: ``shapes/t2i``, ``digits/caption``,
            ...) matches a pattern (``fnmatch``: ``"*/caption"``, ``"digits/*"``) appears ``weight``
            times per epoch on average (0 leaves it out); unmatched groups keep weight 1. Each
            pattern must match a group and no group two patterns. Every epoch then draws and packs
            its copies afresh. Validation stays unweighted. ``None``: every document once.

    Batches (``L = seq_len``): ``ids`` Long[B, L]; ``targets`` Long[B, L], the next id, -100 on
    padding and on each document's last position; ``document_ids`` Long[B, L], the document's index
    within its row (padding gets its own); ``attention_mask`` Bool[B, L], False on padding;
    ``und_pixels`` Float[N, 3, S, S] in row-major order of the ``<|und|>`` runs, or None.
    """

    def __init__(self, shards: str, seq_len: int = 512, batch_size: int = 8, prompt_dropout: float = 0.1,
                 num_workers: int = 0, val_fraction: float = 0.05, seed: int = 0, null_id: int | None = None,
                 tokenizer: str | None = None, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        if not 0 <= prompt_dropout <= 1:
            raise ValueError(f"prompt_dropout must lie in [0, 1], got {prompt_dropout!r}")
        self.shards_dir, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.prompt_dropout, self.num_workers, self.val_fraction = prompt_dropout, num_workers, val_fraction
        self.seed, self.null_id, self.tokenizer = seed, null_id, tokenizer
        self.weights = _check_weights(weights)
        self.mixture: _Mixture | None = None
        self.shards: TokenShards | None = None
        self._train_sampler: _PackedBatches | None = None
        self._resume: dict[str, int] | None = None

    # -- setup ---------------------------------------------------------------------------------------
    def _vocab(self, shards: TokenShards) -> Vocab:
        if self.tokenizer is not None:
            import json

            from tokenizers_mm.multimodal import TOKENIZER_CONFIG

            path = Path(self.tokenizer) / TOKENIZER_CONFIG
            if not path.is_file():
                raise FileNotFoundError(f"no {TOKENIZER_CONFIG} in {self.tokenizer}")
            return Vocab.from_dict(json.loads(path.read_text())["vocab"])
        if "vocab" not in shards.index:
            raise ValueError(f"{self.shards_dir}/index.json has no vocabulary; pass tokenizer=... or null_id=...")
        return Vocab.from_dict(shards.index["vocab"])

    def setup(self, stage: str | None = None) -> None:
        if self.shards is not None:
            return
        shards = TokenShards(self.shards_dir)
        if len(shards) == 0:
            raise ValueError(f"{self.shards_dir} holds no documents (index.json: {shards.index.get('skipped', {})})")
        vocab = self._vocab(shards)
        self.vocab = vocab
        self.null = vocab.null if self.null_id is None else int(self.null_id)
        self.prefix, self.droppable = self._prompts(shards, vocab)

        fits = shards.lengths <= self.seq_len
        if not fits.all():
            log.warning("%s: skipped %d of %d documents longer than seq_len=%d (never split); longest has %d tokens",
                        self.shards_dir, int((~fits).sum()), len(shards), self.seq_len, int(shards.lengths.max()))
        usable = np.flatnonzero(fits)
        if len(usable) == 0:
            raise ValueError(f"every document in {self.shards_dir} is longer than seq_len={self.seq_len}")
        train, val = _split(len(usable), self.val_fraction, self.seed)
        self.train_docs, self.val_docs = usable[train], usable[val]
        order = np.random.default_rng([self.seed, 0xFAC7]).permutation(self.train_docs)
        self.train_rows = [[int(order[p]) for p in row] for row in pack_documents(shards.lengths[order], self.seq_len)]
        self.val_rows = [[int(self.val_docs[p]) for p in row]
                         for row in pack_documents(shards.lengths[self.val_docs], self.seq_len)]
        if self.weights is not None:
            self.mixture = self._mixture(shards)
        self.shards = shards

    def _mixture(self, shards: TokenShards) -> _Mixture:
        """The weighted training mixture; logs each group's share of tokens before and after."""
        if shards.groups is None:
            raise ValueError(f"{self.shards_dir}/index.json records no document groups (written by an older "
                             "anygen tokenize): run `anygen tokenize` again to use weights")
        names = sorted(set(shards.groups))
        for pattern in self.weights:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"weights: {pattern!r} matches no document group; these shards have {names}")
        weight_of: dict[str, float] = {}
        for name in names:
            hits = [p for p in self.weights if fnmatch.fnmatchcase(name, p)]
            if len(hits) > 1:
                raise ValueError(f"weights: group {name!r} matches {hits}; give each group one weight")
            weight_of[name] = self.weights[hits[0]] if hits else 1.0
        code = {name: i for i, name in enumerate(names)}
        groups = np.array([code[shards.groups[d]] for d in self.train_docs], dtype=np.int64)
        weights = np.array([weight_of[name] for name in names], dtype=np.float64)
        if not (weights[groups] > 0).any():
            raise ValueError(f"weights {self.weights} leave no training document")
        before = np.bincount(groups, weights=shards.lengths[self.train_docs], minlength=len(names))
        after = before * weights
        log.info("mixture of %s (share of training tokens, unweighted -> weighted): %s", self.shards_dir,
                 ", ".join(f"{n} x{weights[i]:g} {before[i] / before.sum():.1%} -> {after[i] / after.sum():.1%}"
                           for i, n in enumerate(names)))
        return _Mixture(self.train_docs, groups, weights, shards.lengths, self.seq_len)

    def _prompts(self, shards: TokenShards, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
        """Per document: tokens between ``<|bos|>`` and its first image / video span, and whether
        prompt dropout applies (a text prompt before a generated span)."""
        prefix = np.zeros(len(shards), dtype=np.int64)
        droppable = np.zeros(len(shards), dtype=bool)
        for i in range(len(shards)):
            ids = shards.ids(i)
            spans = np.flatnonzero((ids == vocab.boi) | (ids == vocab.bov))
            if len(ids) == 0 or ids[0] != vocab.bos or len(spans) == 0 or spans[0] < 2:
                continue
            first = int(spans[0])
            if ids[first] == vocab.boi and first + 1 < len(ids) and ids[first + 1] == vocab.und:
                continue  # an understood image: the text before it is a question, not a prompt
            prefix[i], droppable[i] = first - 1, True
        return prefix, droppable

    # -- loaders -------------------------------------------------------------------------------------
    def _dataset(self) -> _PackedRows:
        return _PackedRows(self.shards, self.seq_len, self.prefix, self.vocab.pad, self.null)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = _distribution(getattr(self, "trainer", None))
        sampler = _PackedBatches(self.train_rows, self.batch_size, self.droppable, self.prompt_dropout,
                                 drop_last=len(self.train_rows) >= self.batch_size * world, seed=self.seed,
                                 shuffle=True, rank=rank, world_size=world, mixture=self.mixture)
        if self._resume is not None:
            sampler.epoch, sampler.start = self._resume["epoch"], self._resume["batches"]
            self._resume = None
        self._train_sampler = sampler
        return _ResumableLoader(self, self._dataset(), sampler=sampler, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = _distribution(getattr(self, "trainer", None))
        sampler = _PackedBatches(self.val_rows, self.batch_size, self.droppable, 0.0, drop_last=False,
                                 seed=self.seed, shuffle=False, rank=rank, world_size=world)
        return _loader(self._dataset(), sampler, self.num_workers)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where the train loader stands (saved in Lightning checkpoints).

        With a fitting trainer attached, ``batches`` is the trainer's count of processed batches in
        the epoch (exact with any ``num_workers``, whose prefetching runs ahead of training);
        without one, the batches the loader has handed out.
        """
        sampler = self._train_sampler
        if sampler is None:
            return dict(self._resume) if self._resume else {}
        epoch, batches = sampler.epoch, sampler.position
        epoch_length = len(sampler.batches(epoch))
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(getattr(trainer, "state", None), "fn", None) == "fit":
            batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            epoch_length = min(epoch_length, trainer.num_training_batches)  # limit_train_batches ends epochs early
        if batches >= epoch_length:
            epoch, batches = epoch + 1, 0
        return {"epoch": int(epoch), "batches": int(batches), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next train loader start at ``state_dict``'s epoch, after its processed batches."""
        if not state_dict:
            return
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("resuming TokenDataModule with seed %s from a checkpoint made with seed %s: the order differs",
                        self.seed, state_dict["seed"])
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if self._train_sampler is not None:  # Lightning restores the loader it already made
            self._train_sampler.epoch, self._train_sampler.start = epoch, batches
        else:  # the checkpoint is restored before train_dataloader() is called
            self._resume = {"epoch": epoch, "batches": batches}


__all__ = ["IGNORE_INDEX", "ImageDataModule", "TokenDataModule", "VideoDataModule", "pack_documents"]
