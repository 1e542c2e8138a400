"""The evaluation harness: the detector, caption parsing, motion direction, the digit classifier, ``anygen eval``."""

import json
import random

import numpy as np
import PIL.Image
import pytest
import torch

from anygen.data.shapes import (
    BACKGROUND,
    SceneObject,
    caption,
    parse_caption,
    render_motion,
    render_scene,
    sample_motion,
    sample_scene,
)
from anygen.eval.detect import detect_objects, motion_direction
from anygen.generation.generator import DEFAULT_IMAGE, DEFAULT_VIDEO


@pytest.mark.parametrize("size", [64, 96])
def test_detector_recovers_rendered_scenes(size):
    wrong = []
    for i in range(150):
        objects = sample_scene(random.Random(f"test-detect:{i}"))
        found = sorted(d.key for d in detect_objects(render_scene(objects, size)))
        if found != sorted(o.key for o in objects):
            wrong.append((sorted(o.key for o in objects), found))
    assert wrong == []


def test_detector_finds_nothing_on_a_blank_image():
    assert detect_objects(render_scene([], 64)) == []
    assert detect_objects(PIL.Image.new("RGB", (64, 64), BACKGROUND)) == []


def test_detector_rejects_the_wrong_scene():
    shown = [SceneObject("circle", "red", "top left")]
    asked = [SceneObject("square", "blue", "bottom right")]
    found = sorted(d.key for d in detect_objects(render_scene(shown, 64)))
    assert found == [("red", "circle", "top left")]
    assert found != sorted(o.key for o in asked)


def test_detector_ignores_noise():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3)).astype(np.uint8)
    assert detect_objects(PIL.Image.fromarray(noise)) == []


def test_caption_parsing_round_trip():
    for i in range(100):
        objects = sample_scene(random.Random(f"test-caption:{i}"))
        assert sorted(o.key for o in parse_caption(caption(objects))) == sorted(o.key for o in objects)
    assert parse_caption("a cat sitting on a mat") == []


def test_motion_direction_on_generated_clips():
    for i in range(40):
        motion = sample_motion(random.Random(f"test-motion:{i}"))
        assert motion_direction(render_motion(motion, 9, 64)) == motion.direction


def test_motion_direction_of_a_still_clip_is_none():
    frame = render_scene([SceneObject("circle", "red", "center")], 64)
    assert motion_direction([frame] * 9) is None
    assert motion_direction([render_scene([], 64)] * 9) is None


class _FakeVQ(torch.nn.Module):
    """A "tokenizer" whose codes are the pixels: perfect (identity) or blind (decodes the background)."""

    downsample = 8

    def __init__(self, blind: bool) -> None:
        super().__init__()
        self.blind, self.anchor = blind, torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return x

    def decode(self, codes):
        return torch.full_like(codes, BACKGROUND[0] / 127.5 - 1) if self.blind else codes


@pytest.mark.parametrize("blind", [False, True])
def test_tokenizer_metrics_judge_reconstructions_with_the_detector(blind):
    """A perfect round trip reads back every scene and direction; a blind one reads back none."""
    from types import SimpleNamespace

    from anygen.eval.metrics import reconstruction_metrics

    vq = _FakeVQ(blind)
    tok = SimpleNamespace(image=vq, video=vq, image_size=(64, 64), video_size=(64, 64))
    objects = [("red", "circle", "top left"), ("blue", "square", "center")]
    motions = [("green", "triangle", "right"), ("red", "circle", "up")]
    out = reconstruction_metrics(tok, objects, motions, num=4)
    expected = 0.0 if blind else 1.0
    assert out["image_shapes_detect"] == expected and out["video_shapes_direction"] == expected


def test_digit_classifier_heldout_accuracy():
    from anygen.data.digits import load_digit_images, render_digit, split_digits
    from anygen.eval.digits import digit_classifier

    classifier = digit_classifier()
    assert classifier.heldout_accuracy >= 0.90
    images, labels = load_digit_images()
    _, heldout = split_digits(labels)
    picks = heldout[:20]
    predicted = classifier.predict([render_digit(images[i], 64) for i in picks])
    assert np.mean(np.array(predicted) == labels[picks]) >= 0.9


def test_anygen_eval_runs_end_to_end_on_the_random_engine(tmp_path, capsys):
    from anygen.eval import main

    out = tmp_path / "eval"
    assert main(["--random-tiny", "--num", "2", "--out", str(out), "--categories",
                 "t2i_single,t2i_pair,caption,video,digits,edit,story,tokenizer"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["categories"]) == {"t2i_single", "t2i_pair", "caption", "video", "digits", "edit", "story",
                                         "tokenizer"}
    for name, result in report["categories"].items():
        assert result["num"] == 2, name
    assert report["categories"]["t2i_single"]["target"] == 0.95
    assert "image_shapes_psnr" in report["categories"]["tokenizer"]["details"]
    assert "t2i_single" in capsys.readouterr().out
    assert any((out / "images").rglob("*.png"))
    # guidance and temperature per modality: the engine's defaults unless the flags say otherwise
    for kind, default in (("image", DEFAULT_IMAGE), ("video", DEFAULT_VIDEO)):
        assert report["sampling"][kind]["guidance_scale"] == default.guidance_scale
        assert report["sampling"][kind]["temperature"] == default.temperature
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--categories", "video", "--guidance-scale", "2",
                 "--video-guidance-scale", "4", "--temperature", "0.9", "--video-temperature", "0.3"]) == 0
    sampling = json.loads((out / "eval.json").read_text())["sampling"]
    assert sampling["image"]["guidance_scale"] == 2.0 and sampling["video"]["guidance_scale"] == 4.0
    assert sampling["image"]["temperature"] == 0.9 and sampling["video"]["temperature"] == 0.3


def test_anygen_eval_refuses_unknown_categories(tmp_path, capsys):
    from anygen.eval import main

    assert main(["--random-tiny", "--num", "1", "--out", str(tmp_path), "--categories", "poetry"]) == 2
    assert "poetry" in capsys.readouterr().err


def test_best_of_reranks_text_to_image_and_captions_not_edits(tmp_path, monkeypatch):
    from anygen.eval import main
    from anygen.eval.harness import EvalContext
    from anygen.testing import random_engine
    from tokenizers_mm.segments import Image, Understand

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append((prompts, kw.get("best_of", 1)))
                        or real(prompts, **kw))
    ctx = EvalContext(engine, num=2, best_of=3)
    images = ctx.generate_images([["a red circle"], ["a handwritten 7"]])
    assert calls[0] == (["a red circle", "a handwritten 7"], 3) and all(im is not None for im in images)
    calls.clear()
    ctx.generate_images([[Image(PIL.Image.new("RGB", (32, 32))), "make the circle yellow"]])  # an edit: as it is
    assert len(calls) == 1 and calls[0][1] == 1

    calls.clear()
    from anygen.eval.harness import eval_caption

    result = eval_caption(ctx)  # captions rerank too: the generation path reads each reply against the picture
    assert calls[0][1] == 3 and result.details["best_of"] == 3  # later calls: the candidates it draws
    assert all(len(p) == 1 and isinstance(p[0], Understand) for p in calls[0][0])

    out = tmp_path / "eval"
    assert main(["--random-tiny", "--num", "2", "--out", str(out), "--categories", "t2i_single", "--best-of", "2"]) == 0
    assert json.loads((out / "eval.json").read_text())["best_of"] == 2
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--best-of", "0"]) == 2


def test_rerank_likelihood_reaches_generate_and_the_report(tmp_path, monkeypatch, capsys):
    from anygen.eval import main
    from anygen.eval.harness import EvalContext
    from anygen.testing import random_engine

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append(kw.get("rerank")) or real(prompts, **kw))
    EvalContext(engine, num=2, best_of=2, rerank="likelihood").generate_images([["a red circle"]])
    EvalContext(engine, num=2, best_of=2).generate_images([["a red circle"]])
    assert calls[0::2] == ["likelihood", "understanding"]  # between them, best_of's own call drawing the candidates
    with pytest.raises(ValueError, match="rerank must be one of"):
        EvalContext(engine, rerank="pixels")
    out = tmp_path / "eval"
    assert main(["--random-tiny", "--num", "2", "--out", str(out), "--categories", "t2i_single", "--best-of", "2",
                 "--rerank", "likelihood"]) == 0
    assert json.loads((out / "eval.json").read_text())["rerank"] == "likelihood"
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--rerank", "likelihood"]) == 2
    assert "rerank 'likelihood' chooses how best_of reads its candidates back: set best_of > 1 (--best-of N)" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="set best_of > 1"):
        EvalContext(engine, rerank="likelihood")


def test_best_of_reranks_clips_against_the_same_motion_in_its_other_directions(monkeypatch):
    from anygen.data.shapes import parse_motion
    from anygen.eval.harness import EvalContext, eval_video
    from anygen.testing import random_engine

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append((prompts, kw)) or real(prompts, **kw))
    result = eval_video(EvalContext(engine, num=3, best_of=2))
    prompts, kw = calls[0]
    assert kw["best_of"] == 2 and kw["start_with"] == "video" and len(prompts) == len(kw["negatives"]) == 3
    for prompt, negatives in zip(prompts, kw["negatives"]):
        color, shape, direction = parse_motion(prompt)
        read = [parse_motion(n) for n in negatives]
        assert {(c, s) for c, s, _ in read} == {(color, shape)}  # the same object, in every other direction
        assert sorted(d for *_, d in read + [(color, shape, direction)]) == ["down", "left", "right", "up"]
    assert result.details["best_of"] == 2 and result.details["negatives"] == "the prompt's other directions"
    assert result.num == 3 and [s["direction"] for s in result.samples] == [parse_motion(p)[2] for p in prompts]
    calls.clear()
    plain = eval_video(EvalContext(engine, num=3))  # no reranking: one draw a prompt, no negatives
    assert all(kw.get("best_of", 1) == 1 and "negatives" not in kw for _, kw in calls)
    assert plain.details["best_of"] == 1 and "negatives" not in plain.details


def test_video_negative_guides_each_clip_away_from_the_opposite_motion(tmp_path, monkeypatch):
    from anygen.data.shapes import parse_motion
    from anygen.eval import main
    from anygen.eval.harness import EvalContext, eval_video
    from anygen.testing import random_engine

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append((prompts, kw)) or real(prompts, **kw))
    guided = {"video": {"temperature": 0.7, "guidance_scale": 2.0}}
    result = eval_video(EvalContext(engine, num=3, video_negative="opposite", sampling=guided))
    (prompts, kw), = calls
    opposite = {"up": "down", "down": "up", "left": "right", "right": "left"}
    for prompt, negative in zip(prompts, kw["negative_prompt"]):
        color, shape, direction = parse_motion(prompt)
        assert parse_motion(negative) == (color, shape, opposite[direction])
    assert result.details["negative_prompt"] == "the opposite motion" and "best_of" not in kw
    with pytest.raises(ValueError, match="video_negative must be one of"):
        EvalContext(engine, num=1, video_negative="sideways")
    out = tmp_path / "eval"
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--categories", "t2i_single,video",
                 "--video-negative", "opposite"]) == 2  # video guidance off: said before any category runs
    assert not (out / "eval.json").exists()
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--categories", "video",
                 "--video-negative", "opposite", "--video-guidance-scale", "2"]) == 0
    assert json.loads((out / "eval.json").read_text())["video_negative"] == "opposite"


def test_t2i_scenes_ask_for_held_out_objects_and_refuse_other_categories():
    from anygen.eval.harness import EvalContext, t2i_scenes
    from anygen.testing import random_engine

    ctx = EvalContext(random_engine("tiny"), num=6, seed=3)
    singles, pairs = t2i_scenes(ctx, "t2i_single"), t2i_scenes(ctx, "t2i_pair")
    assert [len(s) for s in singles] == [1] * 6 and [len(s) for s in pairs] == [2] * 6
    assert all(s[0].key in ctx.objects for s in singles + pairs)  # the first object is a held-out triple
    assert all(p[0].position != p[1].position for p in pairs)
    assert [caption(s) for s in t2i_scenes(ctx, "t2i_pair")] == [caption(s) for s in pairs]  # seeded: the same again
    with pytest.raises(ValueError, match="t2i_single, t2i_pair"):
        t2i_scenes(ctx, "caption")


def test_edit_cases_recolour_one_object_of_a_held_out_scene_and_judge_edit_reads_each_part():
    from anygen.eval.harness import EvalContext, edit_cases, judge_edit
    from anygen.testing import random_engine

    ctx = EvalContext(random_engine("tiny"), num=6, seed=3)
    cases = edit_cases(ctx)
    assert [c.instruction for c in edit_cases(ctx)] == [c.instruction for c in cases]  # seeded: the same again
    for case in cases:
        assert case.before[0].key in ctx.objects  # the first object is a held-out triple
        differ = [k for k, (a, b) in enumerate(zip(case.before, case.after)) if a != b]
        assert differ == [case.target]
        old, new = case.before[case.target], case.after[case.target]
        assert new.color != old.color and (new.shape, new.position) == (old.shape, old.position)
        assert case.instruction.startswith("make ") and case.instruction.endswith(new.color)
    case = next(c for c in cases if len(c.before) > 1)  # one with an object to keep
    size = ctx.image_px[0]
    right = judge_edit(case, render_scene(case.after, size))
    assert right["correct"] and right["changed"] and right["rest_unchanged"]
    unedited = judge_edit(case, render_scene(case.before, size))
    assert not unedited["correct"] and not unedited["changed"] and unedited["rest_unchanged"]
    lost = judge_edit(case, render_scene([case.after[case.target]], size))  # the edit alone, the rest dropped
    assert not lost["correct"] and lost["changed"] and not lost["rest_unchanged"]
    assert judge_edit(case, None)["correct"] is False
