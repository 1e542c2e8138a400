"""The documents JSONL format and ``anygen tokenize``: validation, loading, shards, bad data, both formats."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from anygen.data.documents import (
    ClipLengthError,
    DocumentError,
    load_clip,
    load_document,
    parse_document,
    read_documents,
)
from anygen.data.shapes import SceneObject, generate_shapes, render_motion, render_scene, write_clip
from anygen.data.shards import TokenShards, read_shard
from anygen.data.tokenize import main as tokenize_main
from anygen.data.tokenize import tokenize_documents
from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.segments import Image, Text, Understand, Video
from tokenizers_mm.text import TextTokenizer
from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig

MAX_LENGTH = 300
BAD = {  # id -> expected skip category
    "bad-missing": "missing-file",
    "bad-corrupt": "unreadable-file",
    "bad-short-clip": "clip-length",
    "bad-too-long": "too-long",
}


# -- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a document is a JSON object"),
    ('{"id": "x"}', 'missing "segments"'),
    ('{"segments": []}', "non-empty list"),
    ('{"segments": [{"audio": "a.wav"}]}', "unknown kind 'audio'"),
    ('{"segments": [{"text": "a", "image": "b.png"}]}', "exactly one key"),
    ('{"segments": [{"image": 3}]}', "non-empty relative path"),
    ('{"segments": [{"text": "a"}], "meta": 1}', '"meta" must be an object'),
    ('{"id": [1], "segments": [{"text": "a"}]}', '"id" must be a string'),
])
def test_invalid_lines_name_file_line_and_problem(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"segments": [{"text": "fine"}]}\n\n' + line + "\n")
    with pytest.raises(DocumentError, match=message) as info:
        list(read_documents(path))
    assert f"{path}:3" in str(info.value) and info.value.category == "invalid-document"
    errors: list[DocumentError] = []
    docs = list(read_documents(path, on_error=errors.append))
    assert [d.line for d in docs] == [1] and [e.source for e in errors] == [f"{path}:3"]


def test_documents_resolve_paths_and_round_trip(tmp_path):
    doc = parse_document({"segments": [{"text": "hi"}, {"image": "a/b.png"}], "meta": {"k": 1}, "url": "ignored"},
                         path=tmp_path / "d.jsonl", line=4)
    assert doc.id == "d:4" and doc.files() == [tmp_path / "a/b.png"] and doc.meta == {"k": 1}
    assert parse_document(doc.to_json(), path=doc.path, line=4) == doc
    with pytest.raises(FileNotFoundError, match="no documents file"):
        list(read_documents(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("doc_id, meta, group", [
    ("digits-train-000007", {"kind": "caption"}, "digits/caption"),
    ("shapes-train-000001", {}, "shapes/document"),
    ("plain", {"kind": "t2i"}, "documents/t2i"),
    ("shapes-train-000002", {"kind": "t2i", "group": "mine"}, "mine"),
])
def test_document_group_comes_from_id_and_kind(doc_id, meta, group):
    assert parse_document({"id": doc_id, "segments": [{"text": "hi"}], "meta": meta}).group == group


def test_load_document_brings_pixels_to_the_tokenizer_sizes(tmp_path):
    render_scene([SceneObject("circle", "red", "center")], 48).save(tmp_path / "a.png")
    write_clip(tmp_path / "c.mp4", render_motion(_motion(), 9, 24), 8.0)
    doc = parse_document({"segments": [{"text": "x"}, {"image": "a.png"}, {"understand": "a.png"},
                                       {"video": "c.mp4"}]}, path=tmp_path / "d.jsonl", line=1)
    text, image, und, video = load_document(doc, image_size=32, video_size=(16, 16), video_frames=5)
    assert text == Text("x") and isinstance(und, Understand) and und.image.size == (48, 48)
    assert isinstance(image, Image) and image.image.shape == (3, 32, 32)
    assert isinstance(video, Video) and video.frames.shape == (3, 5, 16, 16) and video.fps == 8.0
    # understand_as_image: VQ tokens for a model without an understanding encoder
    assert isinstance(load_document(doc, image_size=32, understand_as_image=True)[2], Image)
    with pytest.raises(ClipLengthError, match="too short"):
        load_clip(tmp_path / "c.mp4", frames=13)
    with pytest.raises(DocumentError, match="segment #3 \\(video 'c.mp4'\\).*too short") as info:
        load_document(doc, image_size=32, video_frames=13)
    assert info.value.category == "clip-length"


def _motion():
    from anygen.data.shapes import Motion

    return Motion("circle", "blue", "right", (0.2, 0.5), (0.8, 0.5))


# -- tokenize --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    corpus = ["a red circle at the top left and a blue square moves to the right", "make the circle yellow"] * 8
    mm = MultimodalTokenizer(TextTokenizer.train(corpus, vocab_size=290), ImageTokenizer(ImageTokenizerConfig.tiny()),
                             VideoTokenizer(VideoTokenizerConfig.tiny()), image_size=32, video_size=16, und_tokens=4,
                             und_image_size=16, max_height=8, max_width=8, max_frames=8)
    return mm.save(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """12 good shapes documents of every kind, then one bad document of each kind."""
    root = tmp_path_factory.mktemp("docs")
    generate_shapes(root, num=12, seed=0, image_size=32, video_size=16, frames=5, holdout=0)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    write_clip(root / "short.mp4", render_motion(_motion(), 3, 16), 8.0)
    bad = [
        {"id": "bad-missing", "segments": [{"text": "a red circle"}, {"image": "nope.png"}]},
        {"id": "bad-corrupt", "segments": [{"text": "a red circle"}, {"image": "corrupt.png"}]},
        {"id": "bad-short-clip", "segments": [{"text": "a blue circle moves to the right"}, {"video": "short.mp4"}]},
        {"id": "bad-too-long", "segments": [{"text": "a red circle " * 200}]},
    ]
    with open(root / "documents.jsonl", "a") as f:
        f.write("{this line is broken\n")
        for doc in bad:
            f.write(json.dumps(doc) + "\n")
    return root / "documents.jsonl"


def _same_shards(a: TokenShards, b: TokenShards) -> None:
    assert a.doc_ids == b.doc_ids
    for i in range(len(a)):
        assert np.array_equal(a.ids(i), b.ids(i))
        ua, ub = a.und_pixels(i), b.und_pixels(i)
        assert (ua is None) == (ub is None) and (ua is None or np.array_equal(ua, ub))


@pytest.fixture(scope="module")
def shards(tokenizer_dir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    tokenize_documents(corpus, tokenizer_dir, out, shard_size=5, max_length=MAX_LENGTH, video_frames=5,
                       progress=False)
    return out


def test_tokenize_skips_and_counts_bad_data(shards, corpus):
    index = json.loads((shards / "index.json").read_text())
    assert index["docs"] == 12 and [s["docs"] for s in index["shards"]] == [5, 5, 2]
    skipped = index["skipped"]
    assert skipped["count"] == 5
    assert skipped["by_category"] == {"invalid-document": 1, **{c: 1 for c in BAD.values()}}
    by_id = {d["id"]: d for d in skipped["documents"]}
    for doc_id, category in BAD.items():
        assert by_id[doc_id]["category"] == category
    assert "nope.png" in by_id["bad-missing"]["reason"] and "fewer than 5 frames" in by_id["bad-short-clip"]["reason"]
    assert f"> --max-length {MAX_LENGTH}" in by_id["bad-too-long"]["reason"]
    assert any(d["source"] == f"{corpus}:13" for d in skipped["documents"])  # the broken JSON line
    counts = index["modality_tokens"]
    assert sum(counts.values()) == index["tokens"] and counts["image"] and counts["video"] and counts["und"]
    assert (shards / "tokenizer_config.json").is_file()


def test_shards_hold_exactly_what_the_tokenizer_encodes(shards, corpus, tokenizer_dir):
    tok = MultimodalTokenizer.load(tokenizer_dir)
    data = TokenShards(shards)
    docs = {d.id: d for d in read_documents(corpus, on_error=lambda err: None)}
    assert len(data) == 12 and data.doc_ids == [f"shapes-train-{i:06d}" for i in range(12)]
    for i in range(len(data)):
        segments = load_document(docs[data.doc_ids[i]], image_size=32, video_size=(16, 16), video_frames=5,
                                 image_factor=8)
        seq = tok.encode(segments)
        assert np.array_equal(data.ids(i), seq.ids.numpy()) and data.ids(i).dtype == np.int32
        if seq.und_pixels is None:
            assert data.und_pixels(i) is None
        else:
            assert data.und_pixels(i).dtype == np.float16
            assert np.allclose(data.und_pixels(i), seq.und_pixels.numpy(), atol=1e-3)
    # each document's mixture group, from its id and meta.kind, for TokenDataModule(weights=...)
    assert data.groups == [f"shapes/{docs[d].meta['kind']}" for d in data.doc_ids]
    assert len(set(data.groups)) >= 5
    t2i = next(i for i in range(len(data)) if docs[data.doc_ids[i]].meta["kind"] == "t2i")
    text, image = tok.decode(data.ids(t2i), pixels=False)
    assert text.text == docs[data.doc_ids[t2i]].meta["caption"] and image.codes.shape == (4, 4)


def test_workers_write_the_same_shards(shards, corpus, tokenizer_dir, tmp_path):
    tokenize_documents(corpus, tokenizer_dir, tmp_path, workers=2, shard_size=5, max_length=MAX_LENGTH,
                       video_frames=5, progress=False)
    _same_shards(TokenShards(shards), TokenShards(tmp_path))
    assert TokenShards(shards).groups == TokenShards(tmp_path).groups
    assert json.loads((tmp_path / "index.json").read_text())["skipped"]["count"] == 5


def test_batch_size_does_not_change_the_shards(shards, corpus, tokenizer_dir, tmp_path):
    index = tokenize_documents(corpus, tokenizer_dir, tmp_path, batch_size=3, shard_size=5, max_length=MAX_LENGTH,
                               video_frames=5, progress=False)
    _same_shards(TokenShards(shards), TokenShards(tmp_path))
    assert index["settings"]["batch_size"] == 3 and index["skipped"]["count"] == 5
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        tokenize_documents(corpus, tokenizer_dir, tmp_path / "zero", batch_size=0, progress=False)


@pytest.mark.parametrize("bad_id", [None, *BAD])
def test_strict_stops_at_the_first_bad_document(corpus, tokenizer_dir, tmp_path, bad_id):
    lines = corpus.read_text().splitlines()
    good = lines[:12]
    docs = tmp_path / "docs.jsonl"
    if bad_id is None:  # the broken JSON line
        chosen, message = "{this line is broken", "not valid JSON"
    else:
        chosen = next(line for line in lines if f'"{bad_id}"' in line)
        message = {"bad-missing": "missing file", "bad-corrupt": "not a readable image",
                   "bad-short-clip": "too short", "bad-too-long": "--max-length"}[bad_id]
    docs.write_text("\n".join(good[:3] + [chosen] + good[3:]) + "\n")
    for name in ("corrupt.png", "short.mp4", "images", "videos"):
        (tmp_path / name).symlink_to(corpus.parent / name)
    out = tmp_path / "out"
    with pytest.raises(DocumentError, match=message) as info:
        tokenize_documents(docs, tokenizer_dir, out, shard_size=2, max_length=MAX_LENGTH, video_frames=5,
                           strict=True, progress=False)
    assert f"{docs}:4" in str(info.value)
    if bad_id is not None:
        assert bad_id in str(info.value)
    assert not (out / "index.json").exists() and not list(out.glob("shard-*"))  # nothing half-written is left
    assert tokenize_main(["--documents", str(docs), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--strict",
                          "--video-frames", "5", "--max-length", str(MAX_LENGTH), "--quiet"]) == 1


def test_webdataset_round_trip(shards, corpus, tokenizer_dir, tmp_path):
    assert tokenize_main(["--documents", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path),
                          "--format", "webdataset", "--shard-size", "5", "--max-length", str(MAX_LENGTH),
                          "--video-frames", "5", "--quiet"]) == 0
    tars = sorted(tmp_path.glob("shard-*.tar"))
    assert len(tars) == 3
    _same_shards(TokenShards(shards), TokenShards(tmp_path))
    assert TokenShards(shards).groups == TokenShards(tmp_path).groups
    # plain tar + .npy: readable without this project
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.ids.npy", "000000000.json"]
        first = np.load(io.BytesIO(tar.extractfile(names[0]).read()), allow_pickle=False)
    assert np.array_equal(first, TokenShards(shards).ids(0))
    assert [d.id for d in read_shard(tars[0])] == TokenShards(shards).doc_ids[:5]
    # the same run again refuses to overwrite without --overwrite
    with pytest.raises(FileExistsError, match="overwrite"):
        tokenize_documents(corpus, tokenizer_dir, tmp_path, progress=False)


def test_webdataset_library_reads_the_shards(shards, tmp_path, corpus, tokenizer_dir):
    wds = pytest.importorskip("webdataset")
    tokenize_documents(corpus, tokenizer_dir, tmp_path, format="webdataset", shard_size=20, max_length=MAX_LENGTH,
                       video_frames=5, progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "shard-00000.tar"), shardshuffle=False).decode())
    reference = TokenShards(shards)
    assert [s["json"]["id"] for s in samples] == reference.doc_ids
    for i, sample in enumerate(samples):
        assert np.array_equal(sample["ids.npy"], reference.ids(i))
        assert ("und.npy" in sample) == (reference.und_pixels(i) is not None)


def test_tokenize_refuses_missing_inputs(tmp_path, tokenizer_dir, corpus):
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        tokenize_documents(corpus, tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no documents file"):
        tokenize_documents(tmp_path / "nope.jsonl", tokenizer_dir, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenShards(tmp_path)


def test_a_tokenizer_without_understanding_skips_or_converts(tmp_path, corpus):
    torch.manual_seed(0)
    mm = MultimodalTokenizer(TextTokenizer.train(["a red circle"] * 4, vocab_size=270),
                             ImageTokenizer(ImageTokenizerConfig.tiny()), VideoTokenizer(VideoTokenizerConfig.tiny()),
                             image_size=32, video_size=16, max_height=8, max_width=8, max_frames=8)
    tok_dir = mm.save(tmp_path / "tok")
    index = tokenize_documents(corpus, tok_dir, tmp_path / "a", max_length=MAX_LENGTH, progress=False, limit=12)
    n_und = sum('"understand"' in line for line in corpus.read_text().splitlines()[:12])
    assert index["skipped"]["by_category"] == {"encode-error": n_und, "invalid-document": 1}
    assert "understanding encoder" in index["skipped"]["documents"][-1]["reason"]
    # refused documents share their batch with good ones, which are written as encode writes them alone
    written, docs = TokenShards(tmp_path / "a"), {d.id: d for d in read_documents(corpus, on_error=lambda e: None)}
    assert len(written) == 12 - n_und
    for i in range(len(written)):
        segments = load_document(docs[written.doc_ids[i]], image_size=32, video_size=(16, 16), image_factor=8)
        assert np.array_equal(written.ids(i), mm.encode(segments).ids.numpy())
    index = tokenize_documents(corpus, tok_dir, tmp_path / "b", max_length=MAX_LENGTH, understand_as_image=True,
                               progress=False, limit=12)
    assert index["docs"] == 12 and index["modality_tokens"]["und"] == 0
