"""Built-in data sets: seeded shapes and digits, captions that parse back, held-out combinations, the CLI."""

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from anygen.data import shapes
from anygen.data.cli import main as data_main
from anygen.data.digits import generate_digits, load_digit_images, parse_digit_caption, split_digits
from anygen.data.documents import read_documents
from anygen.data.shapes import (
    COLORS,
    DIRECTIONS,
    POSITIONS,
    SceneObject,
    caption,
    generate_shapes,
    motion_caption,
    parse_caption,
    parse_motion,
    render_motion,
    render_scene,
    sample_motion,
    sample_scene,
)

SMALL = dict(image_size=32, frames=5, fps=8.0)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, num=160, seed=3, holdout=0.2, num_heldout=40, **SMALL)
    return out


def test_same_seed_same_files_whatever_the_workers(tmp_path):
    a = generate_shapes(tmp_path / "a", num=24, seed=7, **SMALL)
    generate_shapes(tmp_path / "b", num=24, seed=7, workers=2, **SMALL)
    generate_shapes(tmp_path / "c", num=24, seed=8, **SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a/documents.jsonl").read_text() != (tmp_path / "c/documents.jsonl").read_text()
    files = _digest(tmp_path / "a")
    assert any(f.endswith(".mp4") for f in files) and any(f.endswith(".png") for f in files)
    assert sum(a["kinds"]["train"].values()) == 24 and set(a["kinds"]["train"]) == set(shapes.KINDS)


def test_every_file_exists_and_has_the_requested_size(shapes_dir):
    from tokenizers_mm.video_io import load_video

    docs = list(read_documents(shapes_dir / "documents.jsonl"))
    assert len(docs) == 160
    clips = 0
    for doc in docs:
        for path in doc.files():
            assert path.is_file()
            if path.suffix == ".png":
                assert PIL.Image.open(path).size == (32, 32)
            elif clips < 3:
                frames, fps = load_video(path)
                assert frames.shape == (3, 5, 32, 32) and fps == 8.0
                clips += 1
    assert clips == 3


def test_apng_clips_hold_the_rendered_frames_and_the_same_documents(tmp_path):
    """--clip-format apng (no PyAV needed): same documents but the suffix, clips exactly as rendered."""
    import torch

    from tokenizers_mm.preprocess import to_tensor
    from tokenizers_mm.video_io import load_video

    generate_shapes(tmp_path / "mp4", num=12, seed=5, kinds="video,video_caption", **SMALL)
    meta = generate_shapes(tmp_path / "apng", num=12, seed=5, kinds="video,video_caption", clip_format="apng",
                           **SMALL)
    assert meta["clip_format"] == "apng"
    mp4_lines = (tmp_path / "mp4/documents.jsonl").read_text()
    assert (tmp_path / "apng/documents.jsonl").read_text() == mp4_lines.replace(".mp4", ".apng")
    docs = list(read_documents(tmp_path / "apng/documents.jsonl"))
    clips = [(doc, path) for doc in docs for path in doc.files() if path.suffix == ".apng"]
    assert len(clips) >= 12
    for doc, path in clips[:4]:
        motion = shapes.Motion.from_dict(doc.meta["motion"])
        rendered = torch.stack([to_tensor(f) for f in render_motion(motion, 5, 32)], dim=1)
        frames, fps = load_video(path)
        assert fps == 8.0 and torch.equal(frames, rendered)
        lossy, _ = load_video(tmp_path / "mp4" / path.relative_to(tmp_path / "apng").with_suffix(".mp4"))
        assert (lossy - rendered).abs().mean() < 0.02  # the same clip, through H.264


@pytest.mark.parametrize("seed", range(5))
def test_caption_parses_back_to_the_scene(seed):
    rng = random.Random(seed)
    for _ in range(50):
        objects = sample_scene(rng)
        text = caption(objects)
        assert sorted(o.key for o in parse_caption(text)) == sorted(o.key for o in objects)
        motion = sample_motion(rng)
        assert parse_motion(motion_caption(motion)) == motion.key


def test_caption_is_canonical_and_parser_is_lenient():
    objs = [SceneObject("square", "blue", "bottom right"), SceneObject("circle", "orange", "top left")]
    assert caption(objs) == "an orange circle at the top left and a blue square at the bottom right"
    assert caption(objs[::-1]) == caption(objs)
    assert [o.key for o in parse_caption("I see A Red triangle in the center.")] == [("red", "triangle", "center")]
    assert parse_caption("a picture of nothing") == []
    assert parse_motion("the green square moves up") == ("green", "square", "up")
    assert parse_motion("nothing moves") is None
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        SceneObject("circle", "pink", "top")


@pytest.mark.parametrize("position", POSITIONS)
def test_render_puts_the_shape_in_its_cell(position):
    obj = SceneObject("square", "red", position)
    image = np.asarray(render_scene([obj], 48))
    x, y = obj.center
    assert tuple(image[int(y * 48), int(x * 48)]) == COLORS["red"]
    for other in POSITIONS:
        if other != position:
            ox, oy = SceneObject("square", "red", other).center
            assert tuple(image[int(oy * 48), int(ox * 48)]) == shapes.BACKGROUND


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_motion_moves_in_its_direction(direction):
    motion = sample_motion(random.Random(0), key=("green", "circle", direction))
    frames = [np.asarray(f).astype(int) for f in render_motion(motion, 5, 48)]
    green = np.array(COLORS["green"])

    def centroid(frame):
        ys, xs = np.nonzero(np.abs(frame - green).sum(-1) < 30)
        return xs.mean(), ys.mean()

    (x0, y0), (x1, y1) = centroid(frames[0]), centroid(frames[-1])
    dx, dy = DIRECTIONS[direction]
    assert np.sign(round(x1 - x0)) == dx and np.sign(round(y1 - y0)) == dy


def _ground_truth_texts(doc: dict) -> None:
    """Every caption-like text of a generated document agrees with its ground truth."""
    meta, texts = doc["meta"], [s["text"] for s in doc["segments"] if "text" in s]
    kind = meta["kind"]
    if kind in ("t2i", "caption"):
        assert texts == [meta["caption"]]
        assert sorted(o.key for o in parse_caption(texts[0])) == sorted(
            (o["color"], o["shape"], o["position"]) for o in meta["objects"])
    elif kind == "vqa":
        assert texts == [meta["question"], meta["answer"]]
    elif kind in ("video", "video_caption"):
        m = meta["motion"]
        assert parse_motion(texts[0]) == (m["color"], m["shape"], m["direction"])
    elif kind == "edit":
        assert texts == [meta["instruction"]]
        assert meta["caption"] == caption(shapes.scene_from_meta(meta["after"]))
    elif kind == "story":
        assert texts[-2:] == [shapes.ASK_CAPTION, meta["caption"]]
        final = meta["steps"][-1]["objects"]
        assert sorted(o.key for o in parse_caption(texts[-1])) == sorted(
            (o["color"], o["shape"], o["position"]) for o in final)
        drawn = parse_caption(texts[0])
        assert [o.key for o in drawn] == [(o["color"], o["shape"], o["position"])
                                          for o in meta["steps"][0]["objects"]]


def test_documents_carry_ground_truth_that_matches_their_texts(shapes_dir):
    docs = _lines(shapes_dir / "documents.jsonl") + _lines(shapes_dir / "heldout.jsonl")
    assert {d["meta"]["kind"] for d in docs} == set(shapes.KINDS)
    for doc in docs:
        _ground_truth_texts(doc)


def _combos(doc: dict) -> tuple[set, set]:
    meta = doc["meta"]
    objects = [o for key in ("objects", "before", "after") for o in meta.get(key, [])]
    objects += [o for step in meta.get("steps", []) for o in step["objects"]]
    found = {(o["color"], o["shape"], o["position"]) for o in objects}
    for seg in doc["segments"]:  # what the texts say, too
        if "text" in seg:
            found |= {o.key for o in parse_caption(seg["text"])}
    motions = {(m["color"], m["shape"], m["direction"]) for m in [meta.get("motion")] if m}
    return found, motions


def test_heldout_combinations_never_appear_in_training(shapes_dir):
    meta = json.loads((shapes_dir / "meta.json").read_text())
    held_objects = {tuple(k) for k in meta["holdout"]["objects"]}
    held_motions = {tuple(k) for k in meta["holdout"]["motions"]}
    assert len(held_objects) == round(0.2 * len(COLORS) * 3 * 9) and len(held_motions) == round(0.2 * 96)
    for doc in _lines(shapes_dir / "documents.jsonl"):
        objects, motions = _combos(doc)
        assert not objects & held_objects and not motions & held_motions, doc["id"]
    heldout = _lines(shapes_dir / "heldout.jsonl")
    assert len(heldout) == 40
    for doc in heldout:
        objects, motions = _combos(doc)
        assert objects & held_objects or motions & held_motions, doc["id"]
    # a different seed holds out different combinations
    assert shapes.holdout_combinations(0.2, 4)[0] != frozenset(held_objects)


@pytest.mark.parametrize("kwargs, match", [
    (dict(frames=8), "1 \\+ 4k"),
    (dict(holdout=0.7), "holdout"),
    (dict(kinds="t2i,poems"), "unknown document kind 'poems'"),
    (dict(kinds="t2i:0"), "positive weight"),
    (dict(image_size=4), "image_size"),
    (dict(clip_format="gif"), "clip_format must be one of mp4, apng, got 'gif'"),
])
def test_generator_refuses_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_shapes(tmp_path / "x", num=2, **kwargs)


def test_generator_refuses_a_non_empty_directory(tmp_path):
    generate_shapes(tmp_path, num=2, kinds="t2i", **SMALL)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_shapes(tmp_path, num=2, kinds="t2i", **SMALL)
    generate_shapes(tmp_path, num=3, kinds="t2i", overwrite=True, **SMALL)
    assert len(_lines(tmp_path / "documents.jsonl")) == 3


def test_digits_split_is_disjoint_stratified_and_recorded(tmp_path):
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    train, heldout = split_digits(labels, 0.2, seed=1)
    assert split_digits(labels, 0.2, seed=1) == (train, heldout)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(labels)
    for c in range(10):
        n_c = int((labels == c).sum())
        assert sum(int(labels[i]) == c for i in heldout) == round(0.2 * n_c)

    meta = generate_digits(tmp_path, num=30, seed=1, image_size=16, holdout=0.2)
    assert meta["split"] == {"train": train, "heldout": heldout}
    docs = _lines(tmp_path / "documents.jsonl")
    assert len(docs) == 30 and {d["meta"]["kind"] for d in docs} == {"t2i", "caption"}
    for doc in docs:
        assert doc["meta"]["index"] in set(train)
        text = next(s["text"] for s in doc["segments"] if "text" in s)
        assert parse_digit_caption(text) == doc["meta"]["digit"] == int(labels[doc["meta"]["index"]])
        image = next(v for s in doc["segments"] for k, v in s.items() if k != "text")
        assert PIL.Image.open(tmp_path / image).size == (16, 16)
    held = _lines(tmp_path / "heldout.jsonl")
    assert {d["meta"]["index"] for d in held} == set(heldout) and len(held) == 2 * len(heldout)


def test_digits_repeat_with_augmented_copies(tmp_path):
    n_train = len(split_digits(load_digit_images()[1], 0.9, seed=0)[0])
    generate_digits(tmp_path, num=n_train + 3, seed=0, image_size=8, holdout=0.9, kinds="t2i")
    docs = _lines(tmp_path / "documents.jsonl")
    assert [d["meta"]["augmented"] for d in docs].count(True) == 3
    files = [d["segments"][1]["image"] for d in docs]
    assert len(set(files)) == n_train + 3


def test_cli_writes_and_checks_a_data_set(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert data_main(["shapes", "--out", str(out), "--num", "6", "--image-size", "32", "--frames", "5",
                      "--kinds", "t2i,video", "--holdout", "0.1"]) == 0
    assert data_main(["check", str(out / "documents.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["documents"] == 6 and report["invalid"] == 0
    assert data_main(["shapes", "--out", str(out), "--num", "6"]) == 2  # not empty, no --overwrite
    (out / "documents.jsonl").write_text('{"segments": [{"image": "nope.png"}]}\n{"segments": 3}\n')
    assert data_main(["check", str(out / "documents.jsonl")]) == 1
    assert data_main(["digits", "--out", str(tmp_path / "digits"), "--num", "4", "--image-size", "16"]) == 0
