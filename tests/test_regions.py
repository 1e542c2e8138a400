"""Regional prompting (``generate(regions=...)``): an image code inside a box is drawn from a row reading that
box's text, guided against the prompt's own twins."""

import json

import pytest
import torch

from anygen.data.shapes import POSITIONS, SceneObject, caption, cell_box, layout_regions, render_scene
from anygen.eval.detect import detect_objects
from anygen.generation.generator import GenerationSettings, Generator
from anygen.generation.grammar import IMG_BODY, TEXT, Grammar, GrammarState
from anygen.generation.sampling import SamplingConfig
from anygen.testing import random_engine
from tokenizers_mm.segments import Image

SIZE = (4, 4)  # 16 codes, raster order: the top half is the first 8


@pytest.fixture(scope="module")
def engine():
    return random_engine("tiny", seed=0)


def _codes(out) -> list[int]:
    return next(s.codes for s in out.segments if isinstance(s, Image)).flatten().tolist()


def _draw(engine, prompt, sampling, **kw) -> list[int]:
    return _codes(engine.generate(prompt, start_with="image", image_size=SIZE, max_images=1, seed=3,
                                  image=sampling, **kw))


SAMPLINGS = [{"temperature": 0.0, "guidance_scale": 4.0}, {"temperature": 1.0, "guidance_scale": 3.0},
             {"temperature": 0.0, "guidance_scale": 1.0}]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy-guided", "sampled-guided", "greedy-unguided"])
def test_a_box_over_the_whole_image_draws_what_its_text_alone_draws(engine, sampling):
    """Every code routed to the region row, whose context is its text and the image so far: the same codes as the
    region's text drawn as the prompt, with the same seed (the twins read the same empty context)."""
    alone = _draw(engine, "a red circle", sampling)
    routed = _draw(engine, "a blue square", sampling, regions=[("a red circle", (0, 0, 1, 1))])
    assert routed == alone
    assert _draw(engine, "a blue square", sampling) != alone  # the test needs the two prompts to draw apart


def test_the_codes_in_the_top_half_follow_the_region_and_the_rest_the_prompt(engine):
    greedy = {"temperature": 0.0, "guidance_scale": 4.0}
    region, prompt = _draw(engine, "a red circle", greedy), _draw(engine, "a blue square", greedy)
    top = _draw(engine, "a blue square", greedy, regions=[("a red circle", (0, 0, 1, 0.5))])
    assert top[:8] == region[:8]  # every code before the box ends read the region row, on the same prefix
    assert top != region and top != prompt
    # a box no code centre falls in (the first code's centre is at 1/8, 1/8) routes nothing
    assert _draw(engine, "a blue square", greedy, regions=[("a red circle", (0, 0, 0.1, 0.1))]) == prompt


def test_later_boxes_win_where_boxes_overlap(engine):
    greedy = {"temperature": 0.0, "guidance_scale": 4.0}
    both = [("a green triangle", (0, 0, 1, 1)), ("a red circle", (0, 0, 1, 1))]
    assert _draw(engine, "a blue square", greedy, regions=both) == _draw(engine, "a red circle", greedy)


def test_both_loops_agree_on_a_mixed_batch_and_a_row_without_regions_is_untouched(engine):
    prompts = [engine.encode_prompt(p) for p in ([Image(render_scene([])), "make it red"], "a blue square",
                                                 "a red circle at the top")]
    regions = [[], [(engine.encode_prompt("a red circle"), (0, 0, 0.5, 0.5)),
                    (engine.encode_prompt("a green triangle"), (0.5, 0.5, 1, 1))],
               [(engine.encode_prompt("a white square"), (0.25, 0, 0.75, 1))]]
    settings = GenerationSettings(max_new_tokens=40, start_with="image", image_size=SIZE, max_images=1, seed=1,
                                  image=SamplingConfig(temperature=0.0, guidance_scale=5.0, image_guidance_scale=1.5,
                                                       guidance_start=0.25))
    fast = [r.ids.tolist() for r in Generator(engine.model, engine.tokenizer).generate(prompts, settings, None,
                                                                                        regions)]
    plain = [r.ids.tolist() for r in Generator(engine.model, engine.tokenizer, fast=False).generate(
        prompts, settings, None, regions)]
    assert fast == plain
    alone = Generator(engine.model, engine.tokenizer).generate(prompts[:1], settings)[0].ids.tolist()
    assert fast[0] == alone  # the edit has no region: its row is drawn as without the others
    unrouted = [r.ids.tolist() for r in Generator(engine.model, engine.tokenizer).generate(prompts, settings)]
    assert fast[1] != unrouted[1] and fast[2] != unrouted[2]


def test_in_regions_reads_the_code_drawn_next_and_only_inside_an_image_body(engine):
    t = lambda *x: torch.tensor(x)  # noqa: E731
    state = GrammarState.start(t(IMG_BODY, IMG_BODY, TEXT), req_h=t(0, 0, 0), req_w=t(0, 0, 0), req_t=t(0, 0, 0),
                               max_media=t(0, 0, 0))
    state.height, state.width = t(4, 4, 4), t(4, 4, 4)
    state.row, state.col = t(1, 3, 1), t(2, 4, 2)  # row 1 col 2; row 3 before its <|eol|> (col = width); text
    boxes = torch.tensor([[[0.5, 0.25, 0.75, 0.5]] * 3, [[0.75, 0.75, 1.0, 1.0]] * 3])  # (2 regions, 3 rows, 4)
    inside = Grammar(engine.tokenizer.vocab).in_regions(state, boxes)
    assert inside.tolist() == [[True, False, False], [False, True, False]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(regions=[("a red circle", (0.5, 0, 0.5, 1))]), "0 <= x0 < x1 <= 1"),
    (dict(regions=[("a red circle", (0, 0, 1, 1.5))]), "0 <= y0 < y1 <= 1"),
    (dict(regions=[("a red circle", (0, 0, 1))]), "a box is"),
    (dict(regions=[("a red circle", (0, 0, True, 1))]), "a box is"),
    (dict(regions=[("  ", (0, 0, 1, 1))]), "the text must be a non-empty str"),
    (dict(regions=[("a red circle",)]), "must be a \\(text, box\\) pair"),
    (dict(regions="a red circle"), "must be a list of \\(text, box\\) pairs"),
    (dict(regions=[("a red circle", (0, 0, 1, 1))], speculative=2), "regions and speculative decoding"),
    (dict(regions=[("a red circle", (0, 0, 1, 1))], start_with="video"), "this call draws none"),
])
def test_bad_regions_are_refused_by_name(engine, kwargs, match):
    kw = {"start_with": "image", "image_size": SIZE, "max_images": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.generate("a blue square", **kw)


def test_a_batch_takes_one_list_of_regions_per_prompt(engine):
    greedy = {"temperature": 0.0, "guidance_scale": 4.0}
    kw = dict(start_with="image", image_size=SIZE, max_images=1, seed=3, image=greedy)
    with pytest.raises(ValueError, match="one list of \\(text, box\\) pairs \\(or None\\) per prompt \\(2\\)"):
        engine.generate(["a blue square", "a red circle"], regions=[[("a red circle", (0, 0, 1, 1))]], **kw)
    out = engine.generate(["a blue square", "a red circle"], regions=[[("a red circle", (0, 0, 1, 1))], None], **kw)
    assert _codes(out[0]) == _codes(out[1]) == _draw(engine, "a red circle", greedy)


def test_best_of_draws_every_candidate_with_the_prompts_regions(engine, monkeypatch):
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append(kw.get("regions")) or real(prompts,
                                                                                                          **kw))
    engine.generate(["a blue square", "a red circle"], start_with="image", image_size=SIZE, max_images=1,
                    best_of=2, regions=[[("a red circle", (0, 0, 1, 1))], None])
    drawn = calls[-1]  # the inner call: each prompt's regions, once per candidate
    assert [len(r) for r in drawn] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="negatives, negative_prompt and regions go with best_of"):
        real([Image(render_scene([])), "what is this"], best_of=2, regions=[("a red circle", (0, 0, 1, 1))])


def test_cell_box_holds_every_rendered_object_of_its_cell():
    assert cell_box("top left") == (0.0, 0.0, 1 / 3, 1 / 3) and cell_box("bottom right")[2:] == (1.0, 1.0)
    for position in POSITIONS:
        for shape in ("circle", "square", "triangle"):
            (found,) = detect_objects(render_scene([SceneObject(shape=shape, color="red", position=position)]))
            x0, y0, x1, y1 = cell_box(position)
            assert x0 <= found.center[0] < x1 and y0 <= found.center[1] < y1
    with pytest.raises(ValueError, match="position"):
        cell_box("middle")
    scene = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom")]
    assert layout_regions(scene) == [(caption(scene[:1]), cell_box("top left")),
                                     (caption(scene[1:]), cell_box("bottom"))]


def test_eval_regions_layout_draws_each_scene_with_its_objects_over_their_cells(tmp_path, monkeypatch):
    from anygen.data.shapes import parse_caption
    from anygen.eval import main
    from anygen.eval.harness import EvalContext, eval_edit, eval_story, eval_t2i_pair

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append((prompts, kw)) or real(prompts, **kw))
    result = eval_t2i_pair(EvalContext(engine, num=3, regions="layout"))
    (prompts, kw), = calls
    for prompt, regions in zip(prompts, kw["regions"]):
        objects = parse_caption(prompt[0])
        assert sorted((caption([o]), cell_box(o.position)) for o in objects) == sorted(regions)
    assert result.details["regions"] == "each object's caption over its cell"
    calls.clear()
    story = eval_story(EvalContext(engine, num=2, regions="layout"))
    (first, kw1), (second, kw2) = calls  # the first pictures, then the second ones
    for i, sample in enumerate(story.samples):
        (drawn,) = parse_caption(sample["steps"][0])
        (added,) = parse_caption(sample["steps"][1])
        assert kw1["regions"][i] == [(caption([drawn]), cell_box(drawn.position))]
        assert kw2["regions"][i] == [(caption([drawn]), cell_box(drawn.position)),
                                     (caption([added]), cell_box(added.position))]
    assert story.details["regions"] == "each picture's objects' captions over their cells"
    calls.clear()
    edits = eval_edit(EvalContext(engine, num=2, regions="layout"))  # an edit names no layout: drawn as ever
    assert "regions" not in edits.details and all("regions" not in kw for _, kw in calls)
    with pytest.raises(ValueError, match="regions must be one of"):
        EvalContext(engine, num=1, regions="everywhere")
    out = tmp_path / "eval"
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--categories", "t2i_single",
                 "--regions", "layout"]) == 0
    assert json.loads((out / "eval.json").read_text())["regions"] == "layout"


def test_cli_generate_takes_regions_from_the_flag_or_the_prompts_file(tmp_path, capsys, monkeypatch):
    import numpy as np
    import PIL.Image as PILImage

    from anygen.api import AnyGen
    from anygen.cli_generate import main

    calls, real = [], AnyGen.generate
    monkeypatch.setattr(AnyGen, "generate", lambda self, prompts, **kw: calls.append(kw["regions"]) or real(
        self, prompts, **kw))
    base = ["--random-tiny", "--start-with", "image", "--image-size", "4x4", "--seed", "0",
            "--image-temperature", "0"]
    assert main(["a blue square", *base, "--region", "0,0,1,1:a red circle", "--out", str(tmp_path / "a")]) == 0
    assert calls[-1] == [[("a red circle", (0.0, 0.0, 1.0, 1.0))]]
    assert main(["a red circle", *base, "--out", str(tmp_path / "b")]) == 0
    read = lambda d: np.asarray(PILImage.open(tmp_path / d / "0000" / "image_0.png"))  # noqa: E731
    assert np.array_equal(read("a"), read("b"))  # the whole picture drawn by the region's text
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": "a blue square", "regions": [["a green triangle", [0, 0, 0.5, 1]]]})
                     + "\n" + json.dumps("a white circle") + "\n")
    assert main(["--prompts", str(lines), *base, "--region", "0.5,0,1,1:a red circle", "--out",
                 str(tmp_path / "c")]) == 0
    assert calls[-1] == [[("a green triangle", [0, 0, 0.5, 1])], [("a red circle", (0.5, 0.0, 1.0, 1.0))]]
    capsys.readouterr()
    for bad, said in (("0,0,1:a red circle", "a region is X0,Y0,X1,Y1:TEXT"), ("0,0,1,1:", "a region is"),
                      ("0,0,2,1:a red circle", "0 <= x0 < x1 <= 1")):
        with pytest.raises(SystemExit):
            main(["a blue square", *base, "--region", bad])
        assert said in capsys.readouterr().err
    lines.write_text(json.dumps({"prompt": "a blue square", "regions": ["a red circle"]}) + "\n")
    assert main(["--prompts", str(lines), *base, "--out", str(tmp_path / "e")]) == 2
    assert '"regions" must be a list of [text, [x0, y0, x1, y1]] pairs' in capsys.readouterr().err
