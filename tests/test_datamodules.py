"""DataModules: first-fit packing, targets and document ids, seeded order, mid-epoch resume, prompt dropout, pixels."""

import json
import logging
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from anygen.data.documents import DocumentError
from anygen.data.shapes import generate_shapes
from anygen.data.shards import ShardWriter, TokenizedDocument, TokenShards
from tokenizers_mm.vocab import Vocab
from trainers.data import IGNORE_INDEX, ImageDataModule, TokenDataModule, VideoDataModule, pack_documents

VOCAB = Vocab(text_size=50, image_codebook_size=16, video_codebook_size=8, max_height=4, max_width=4, max_frames=4)


def _document(rng: random.Random, kind: str, n: int) -> TokenizedDocument:
    """A small well-formed document; its first two text tokens and the und pixels name it (``n``)."""
    v = VOCAB
    text = [n // 50, n % 50] + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
    image = [v.boi, v.h_token(2), v.w_token(2)] + [v.image_offset + rng.randrange(16), v.image_offset, v.eol] * 2
    image += [v.eoi]
    und = None
    if kind == "t2i":
        ids = [v.bos] + text + image + [v.eos]
    elif kind == "caption":  # an understood image first: never a prompt to drop
        ids = [v.bos, v.boi, v.und, v.und, v.eoi] + text + [v.eos]
        und = np.full((1, 3, 4, 4), n, dtype=np.float16)
    elif kind == "video":
        ids = [v.bos] + text + [v.bov, v.t_token(1), v.h_token(1), v.w_token(1), v.video_offset, v.eol, v.eof,
                                v.eov, v.eos]
    else:
        ids = [v.bos] + text + [v.eos]
    return TokenizedDocument(f"doc-{n}", np.array(ids, dtype=np.int32), und)


def _shards(root: Path, kinds: list[str], seed: int = 0, shard_size: int = 64, extra: list | None = None,
            groups: bool = False) -> Path:
    rng = random.Random(seed)
    docs = [_document(rng, kind, n) for n, kind in enumerate(kinds)] + (extra or [])
    writer = ShardWriter(root, shard_size=shard_size)
    for doc in docs:
        writer.add(doc)
    index = {"format": "safetensors", "vocab": VOCAB.to_dict(), "docs": len(docs), "shards": writer.close()}
    if groups:  # as anygen tokenize records them: the kind is the group
        names = sorted(set(kinds))
        index["groups"] = {"names": names, "of_document": [names.index(k) for k in kinds]}
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[tuple, int]]:
    kinds = [random.Random(i).choice(["t2i", "caption", "video", "text"]) for i in range(160)]
    root = _shards(tmp_path_factory.mktemp("mixed"), kinds)
    rng = random.Random(0)
    originals = {tuple(_document(rng, kind, n).ids.tolist()): n for n, kind in enumerate(kinds)}
    return root, originals


def _rows(batch: dict) -> list[list[np.ndarray]]:
    """The documents of each row, cut at document_ids (padding excluded)."""
    out = []
    for r in range(batch["ids"].shape[0]):
        ids, doc, mask = batch["ids"][r].numpy(), batch["document_ids"][r].numpy(), batch["attention_mask"][r].numpy()
        out.append([ids[(doc == j) & mask] for j in range(int(doc[mask].max()) + 1 if mask.any() else 0)])
    return out


def test_pack_documents_is_greedy_first_fit():
    rng = random.Random(0)
    lengths = [rng.randrange(1, 40) for _ in range(300)]
    rows = pack_documents(lengths, 48)
    expected: list[list[int]] = []  # first fit, the slow way
    room: list[int] = []
    for i, n in enumerate(lengths):
        r = next((r for r, left in enumerate(room) if left >= n), None)
        if r is None:
            expected.append([])
            room.append(48)
            r = len(room) - 1
        expected[r].append(i)
        room[r] -= n
    assert rows == expected
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert pack_documents([], 8) == [] and pack_documents([8], 8) == [[0]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_documents([9], 8)


def test_rows_hold_whole_documents_with_their_targets(mixed, caplog):
    root, originals = mixed
    long = TokenizedDocument("long", np.array([VOCAB.bos] + [1] * 40 + [VOCAB.eos], dtype=np.int32))
    root = _shards(root.parent / "with-long", [random.Random(i).choice(["t2i", "caption", "video", "text"])
                                               for i in range(160)], extra=[long])
    dm = TokenDataModule(str(root), seq_len=32, batch_size=4, prompt_dropout=0.0, val_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="anygen.data"):
        dm.setup("fit")
    assert "skipped 1 of 161 documents longer than seq_len=32" in caplog.text
    seen: list[int] = []
    fill = []
    for batch in dm.train_dataloader():
        ids, targets, doc_ids, mask = batch["ids"], batch["targets"], batch["document_ids"], batch["attention_mask"]
        assert ids.shape == targets.shape == doc_ids.shape == mask.shape == (4, 32)
        assert ids.dtype == targets.dtype == doc_ids.dtype == torch.long and mask.dtype == torch.bool
        und_expected = []
        for r, row in enumerate(_rows(batch)):
            n_docs = len(row)
            assert (doc_ids[r][~mask[r]] == n_docs).all()  # padding: a document of its own
            assert (ids[r][~mask[r]] == VOCAB.pad).all() and (targets[r][~mask[r]] == IGNORE_INDEX).all()
            pos = 0
            for doc in row:
                n = originals[tuple(doc.tolist())]  # a whole, unchanged document
                seen.append(n)
                assert targets[r, pos:pos + len(doc) - 1].tolist() == doc[1:].tolist()
                assert targets[r, pos + len(doc) - 1] == IGNORE_INDEX  # its last position predicts nothing
                if VOCAB.und in doc:
                    und_expected.append(n)
                pos += len(doc)
            fill.append(pos / 32)
        und = batch["und_pixels"]
        if und_expected:
            assert und.dtype == torch.float32 and und.shape == (len(und_expected), 3, 4, 4)
            assert und[:, 0, 0, 0].tolist() == und_expected  # row-major order of the <|und|> runs
        else:
            assert und is None
    assert len(seen) == len(set(seen))  # nothing twice in an epoch
    assert set(seen) <= set(dm.train_docs.tolist()) and len(seen) >= len(dm.train_docs) - 4 * 6
    assert np.mean(fill) > 0.85
    val = [n for batch in dm.val_dataloader() for row in _rows(batch) for n in
           (originals[tuple(d.tolist())] for d in row)]
    assert sorted(val) == sorted(dm.val_docs.tolist()) and not set(val) & set(seen)


def _epoch(dm: TokenDataModule, epoch: int) -> list[list[int]]:
    return [b["ids"].sum(1).tolist() for b in _loader_at(dm, epoch)]


def test_order_is_seeded_and_changes_every_epoch(mixed):
    root, _ = mixed
    a, b, c = (TokenDataModule(str(root), seq_len=32, batch_size=4, seed=s) for s in (0, 0, 1))
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) == _epoch(b, 1) != _epoch(a, 0)
    assert _epoch(c, 0) != _epoch(a, 0)
    assert [x["ids"].tolist() for x in a.val_dataloader()] == [x["ids"].tolist() for x in b.val_dataloader()]


@pytest.mark.parametrize("stop", [1, 5, 13])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(mixed, stop):
    root, _ = mixed
    full = _epoch(TokenDataModule(str(root), seq_len=32, batch_size=4, seed=3), 2)
    first = TokenDataModule(str(root), seq_len=32, batch_size=4, seed=3)
    loader = first.train_dataloader()
    loader.sampler.set_epoch(2)
    it = iter(loader)
    got = [next(it)["ids"].sum(1).tolist() for _ in range(stop)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches"] == stop
    second = TokenDataModule(str(root), seq_len=32, batch_size=4, seed=3)
    second.load_state_dict(state)
    rest = [b["ids"].sum(1).tolist() for b in second.train_dataloader()]
    assert got + rest == full
    assert second.state_dict() == {"epoch": 3, "batches": 0, "seed": 3}  # a finished epoch: the next one


class _Recorder(pl.LightningModule):
    """Records what it trains on; one parameter so the optimizer has something to step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["ids"].sum(1).tolist())
        return (self.w * batch["attention_mask"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, max_steps: int, tmp: Path, ckpt: str | None = None, every: int | None = None,
         num_workers: int = 0) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=tmp, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=bool(every), enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    model = _Recorder()
    dm = TokenDataModule(str(root), seq_len=32, batch_size=4, seed=5, num_workers=num_workers)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's notes on the minimal module below
@pytest.mark.parametrize("where, num_workers", [("first epoch", 0), ("epoch end", 0), ("second epoch", 0),
                                                ("second epoch", 2)])
def test_lightning_checkpoint_resumes_mid_epoch(mixed, tmp_path, where, num_workers):
    root, _ = mixed
    per_epoch = len(TokenDataModule(str(root), seq_len=32, batch_size=4).train_dataloader())
    stop = {"first epoch": 3, "epoch end": per_epoch, "second epoch": per_epoch + 3}[where]
    total = 2 * per_epoch + 2  # finish in the third epoch
    reference = _fit(root, total, tmp_path / "a")
    first = _fit(root, stop, tmp_path / "b", every=stop, num_workers=num_workers)
    ckpt = next((tmp_path / "b").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["TokenDataModule"]
    assert (state["epoch"], state["batches"]) == divmod(stop, per_epoch)
    # workers prefetch ahead of training: the resumed run must still start at the right batch
    rest = _fit(root, total, tmp_path / "c", ckpt=str(ckpt), num_workers=num_workers)
    assert first + rest == reference


def test_prompt_dropout_replaces_the_prompt_with_null(tmp_path):
    kinds = ["t2i"] * 300 + ["caption"] * 60 + ["video"] * 40
    root = _shards(tmp_path, kinds)
    rng = random.Random(0)
    originals = [_document(rng, kind, n).ids for n, kind in enumerate(kinds)]
    tails = {tuple(ids[np.flatnonzero((ids == VOCAB.boi) | (ids == VOCAB.bov))[0]:].tolist()) for ids in originals}
    dm = TokenDataModule(str(root), seq_len=64, batch_size=8, prompt_dropout=0.3, val_fraction=0.0, seed=2)

    def dropped_in(loader) -> tuple[list[tuple], int]:
        dropped, prompted = [], 0
        for batch in loader:
            for row in _rows(batch):
                for doc in row:
                    if doc[1] == VOCAB.null:  # <|bos|> <|null|> then the first span, unchanged
                        assert doc[2] in (VOCAB.boi, VOCAB.bov) and tuple(doc[2:].tolist()) in tails
                        dropped.append(tuple(doc.tolist()))
                    elif doc[1] != VOCAB.boi:  # a text prompt that was kept
                        prompted += 1
                    else:  # an understood image first: never dropped
                        assert doc[2] == VOCAB.und
        return dropped, prompted

    first, kept = dropped_in(dm.train_dataloader())
    rate = len(first) / (len(first) + kept)
    assert 0.22 < rate < 0.38, rate
    sampler = dm.train_dataloader().sampler
    chosen = [{doc for batch in sampler.plan(e) for row in batch for doc, drop in row if drop} for e in (0, 1)]
    assert len(chosen[0]) == len(first) and chosen[0] != chosen[1]  # drawn afresh every epoch
    none = TokenDataModule(str(root), seq_len=64, batch_size=8, prompt_dropout=0.0)
    assert not any((b["ids"] == VOCAB.null).any() for b in none.train_dataloader())


def _loader_at(dm: TokenDataModule, epoch: int):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return loader


def test_null_id_can_be_given(mixed):
    root, _ = mixed
    dm = TokenDataModule(str(root), seq_len=32, batch_size=4, prompt_dropout=1.0, null_id=7)
    ids = torch.cat([b["ids"] for b in dm.train_dataloader()])
    assert (ids == 7).any() and not (ids == VOCAB.null).any()


def test_ranks_get_disjoint_equal_shares(mixed):
    root, originals = mixed

    def rank(r: int, use_distributed_sampler: bool = False) -> tuple[int, set[int]]:
        dm = TokenDataModule(str(root), seq_len=32, batch_size=2, prompt_dropout=0.0)
        connector = SimpleNamespace(use_distributed_sampler=use_distributed_sampler)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=r, _accelerator_connector=connector)
        loader = dm.train_dataloader()
        return len(loader), {originals[tuple(d.tolist())] for b in loader for row in _rows(b) for d in row}

    (n0, docs0), (n1, docs1) = rank(0), rank(1)
    assert n0 == n1 > 0 and docs0 and docs1 and not docs0 & docs1
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        rank(0, use_distributed_sampler=True)


# -- mixture weights -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> tuple[Path, list[str]]:
    kinds = [random.Random(i).choice(["t2i", "caption", "video", "text"]) for i in range(160)]
    return _shards(tmp_path_factory.mktemp("grouped"), kinds, groups=True), kinds


def _copies(dm: TokenDataModule, epoch: int) -> Counter:
    """How often each document comes in one epoch's batch plans."""
    loader = _loader_at(dm, epoch)
    return Counter(doc for batch in loader.sampler.batches(epoch) for row in batch for doc, _ in row)


def test_weights_set_how_often_each_group_comes(grouped):
    root, kinds = grouped
    dm = TokenDataModule(str(root), seq_len=32, batch_size=1, prompt_dropout=0.0,
                         weights={"t2i": 3, "caption": 0, "vid*": 0.5})
    dm.setup()
    train = [int(d) for d in dm.train_docs]
    per_kind = lambda kind: [d for d in train if kinds[d] == kind]  # noqa: E731
    for epoch in (0, 1):
        copies = _copies(dm, epoch)
        assert all(copies[d] == 3 for d in per_kind("t2i"))
        assert not any(copies[d] for d in per_kind("caption"))
        assert all(copies[d] == 1 for d in per_kind("text"))  # no pattern: weight 1
        videos = [copies[d] for d in per_kind("video")]
        assert set(videos) <= {0, 1} and sum(videos) == round(0.5 * len(videos))
        assert set(copies) <= set(train)  # never a validation document
    assert _copies(dm, 0) != _copies(dm, 1)  # which half of the clips comes changes with the epoch
    for batch in _loader_at(dm, 0):  # the copies are packed: whole documents, rows of seq_len
        assert batch["ids"].shape == (1, 32) and batch["attention_mask"].any()
    # the unweighted validation rows do not change
    plain = TokenDataModule(str(root), seq_len=32, batch_size=1, prompt_dropout=0.0)
    assert [b["ids"].tolist() for b in dm.val_dataloader()] == [b["ids"].tolist() for b in plain.val_dataloader()]


def test_weighted_order_is_seeded_and_resumes_mid_epoch(grouped):
    root, _ = grouped
    make = lambda seed=3: TokenDataModule(str(root), seq_len=32, batch_size=4, seed=seed,  # noqa: E731
                                          weights={"caption": 2.5, "text": 0})
    full = _epoch(make(), 2)
    assert full == _epoch(make(), 2) != _epoch(make(4), 2)
    first = make()
    loader = _loader_at(first, 2)
    it = iter(loader)
    got = [next(it)["ids"].sum(1).tolist() for _ in range(5)]
    second = make()
    second.load_state_dict(first.state_dict())
    assert got + [b["ids"].sum(1).tolist() for b in second.train_dataloader()] == full


@pytest.mark.parametrize("weights, message", [
    ({"image": 2}, "'image' matches no document group; these shards have"),
    ({"T2I": 2}, "'T2I' matches no document group"),  # case matters, on every platform
    ({"t*": 2, "*2i": 3}, "group 't2i' matches"),
    ({"t2i": -1}, "must be a finite number >= 0"),
    ({"t2i": "lots"}, "must be a finite number >= 0"),
    ({}, "non-empty mapping"),
    ({"*": 0}, "leave no training document"),
])
def test_bad_weights_are_refused(grouped, weights, message):
    root, _ = grouped
    with pytest.raises(ValueError, match=message):
        TokenDataModule(str(root), seq_len=32, weights=weights).setup()


def test_shards_with_a_malformed_group_record_are_refused(grouped, tmp_path):
    import shutil

    root, kinds = grouped
    copy = Path(shutil.copytree(root, tmp_path / "shards"))
    index = json.loads((copy / "index.json").read_text())
    index["groups"]["of_document"] = index["groups"]["of_document"][:-1]  # one document short
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"'groups' gives {len(kinds) - 1} document groups .* for {len(kinds)}"):
        TokenShards(copy)


def test_weights_need_shards_that_record_groups(mixed):
    root, _ = mixed
    with pytest.raises(ValueError, match="records no document groups.*anygen tokenize"):
        TokenDataModule(str(root), seq_len=32, weights={"t2i": 2}).setup()


def test_token_datamodule_refuses_missing_or_empty_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards directory"):
        TokenDataModule(str(tmp_path / "nope")).setup("fit")
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "index.json").write_text(json.dumps({"format": "safetensors", "vocab": VOCAB.to_dict(), "docs": 0,
                                                     "shards": []}))
    with pytest.raises(ValueError, match="holds no documents"):
        TokenDataModule(str(tmp_path)).setup("fit")


# -- pixels ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixels")
    generate_shapes(root, num=24, seed=1, image_size=32, frames=5, holdout=0)
    return root / "documents.jsonl"


def test_image_datamodule_batches(documents):
    dm = ImageDataModule(str(documents), image_size=16, batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    batches = list(train)
    assert batches and all(b["pixels"].shape == (4, 3, 16, 16) for b in batches)  # full batches only
    assert all(b["pixels"].min() >= -1 and b["pixels"].max() <= 1 for b in batches)
    assert sum(len(b["pixels"]) for b in val) == len(dm.val_idx) > 0
    frames = ImageDataModule(str(documents), image_size=16, batch_size=2, video_frames=2)
    frames.setup()
    assert sum(f is not None for _, f in frames.items) == 2 * sum(1 for p, f in frames.items if f == 0)
    assert next(iter(frames.train_dataloader()))["pixels"].shape == (2, 3, 16, 16)


def test_video_datamodule_batches_are_homogeneous_in_time(documents):
    dm = VideoDataModule(str(documents), frames=5, size=16, image_fraction=0.5, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    shapes = [tuple(b["pixels"].shape) for b in dm.train_dataloader()]
    assert set(shapes) == {(2, 3, 5, 16, 16), (2, 3, 1, 16, 16)}
    n_images = shapes.count((2, 3, 1, 16, 16))
    assert abs(n_images - shapes.count((2, 3, 5, 16, 16))) <= 1
    clips_only = VideoDataModule(str(documents), frames=5, size=16, image_fraction=0.0, batch_size=2)
    assert {b["pixels"].shape[2] for b in clips_only.train_dataloader()} == {5}
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        VideoDataModule(str(documents), frames=4)


def test_pixel_datamodules_handle_missing_and_bad_files(documents, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="no documents file"):
        ImageDataModule(str(tmp_path / "nope.jsonl")).setup("fit")
    lines = documents.read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad = tmp_path / "docs.jsonl"
    root = documents.parent
    fixed = [json.dumps({"segments": [{k: (v if k == "text" else str(root / v)) for k, v in s.items()}
                                      for s in json.loads(line)["segments"]]}) for line in lines]
    bad.write_text("\n".join(fixed + ['{"segments": [{"image": "missing.png"}]}',
                                      '{"segments": [{"image": "broken.png"}]}']) + "\n")
    with pytest.raises(DocumentError, match="missing file"):
        ImageDataModule(str(bad), strict=True).setup("fit")
    with caplog.at_level(logging.WARNING, logger="anygen.data"):
        dm = ImageDataModule(str(bad), image_size=16, batch_size=64, val_fraction=0.0)
        dm.setup("fit")
        pixels = next(iter(dm.train_dataloader()))["pixels"]
    assert "missing.png" in caplog.text and "skipping unreadable" in caplog.text
    assert pixels.shape[0] == len(dm.items)  # the broken image replaced by a readable one, never garbage
    strict = ImageDataModule(str(bad), image_size=16, batch_size=64, val_fraction=0.0, strict=False)
    strict.setup()
    strict.strict = True
    with pytest.raises(ValueError, match="broken.png"):
        next(iter(strict.train_dataloader()))
