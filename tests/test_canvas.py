"""Composition onto a canvas (``generate(canvas=...)``): each region drawn alone onto the canvas, copying it outside
the region's box, the drawings laid on in order and copied by a last pass; and ``anygen eval --canvas blank``,
``anygen generate --canvas``."""

import json

import pytest
import torch

from anygen.api import holed
from anygen.data.shapes import SceneObject, caption, cell_box, layout_regions, render_scene
from anygen.generation.generator import GenerationSettings, Generator
from anygen.generation.sampling import SamplingConfig
from anygen.testing import random_engine
from tokenizers_mm.segments import Image, Understand

GREEDY = {"temperature": 0.0, "guidance_scale": 3.0}
TOP, BOTTOM = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)  # interleaved in raster order


@pytest.fixture(scope="module")
def engine():
    return random_engine("tiny", seed=0)


@pytest.fixture(scope="module")
def canvas(engine):
    """An empty scene and its codes as the tiny tokenizer writes them."""
    picture = render_scene([])
    return picture, engine.tokenizer.image_codes(Image(picture))


def _codes(out) -> torch.Tensor:
    return next(s.codes for s in out.segments if isinstance(s, Image))


def _pass(engine, prompt, region: tuple, grid: torch.Tensor, image: dict = GREEDY) -> torch.Tensor:
    """One inpainting pass through the generator: ``region`` drawn where ``grid`` is -1, the rest copied."""
    settings = GenerationSettings(max_new_tokens=64, start_with="image", image_size=tuple(grid.shape), max_images=1,
                                  image=SamplingConfig(**image))
    text, box = region
    done = Generator(engine.model, engine.tokenizer).generate([engine.encode_prompt(prompt)], settings, None,
                                                              [[(engine.encode_prompt(text), box)]], [grid])
    return next(s.codes for s in done[0].segments if isinstance(s, Image))


def _laid(source: torch.Tensor, drawn: list[tuple[tuple, torch.Tensor]]) -> torch.Tensor:
    """``source`` with each ``(box, codes)`` laid on in order: the codes inside the box that differ from it."""
    out = source.clone()
    for box, codes in drawn:
        changed = (holed(source, [box], "box") == -1) & (codes != source)
        out = torch.where(changed, codes, out)
    return out


@pytest.mark.parametrize("boxes", [(LEFT, RIGHT), (TOP, LEFT)], ids=["apart", "overlapping"])
def test_each_region_is_drawn_alone_onto_the_canvas_then_laid_on_in_order(engine, canvas, boxes):
    picture, source = canvas
    regions = [("a red circle", boxes[0]), ("a blue square", boxes[1])]
    out = engine.generate("two things", start_with="image", max_images=1, image=GREEDY, regions=regions,
                          canvas=picture)
    first = _pass(engine, "two things", regions[0], holed(source, [boxes[0]], "first"))
    second = _pass(engine, "two things", regions[1], holed(source, [boxes[1]], "second"))
    assert torch.equal(_codes(out), _laid(source, [(boxes[0], first), (boxes[1], second)]))
    inside = holed(source, [boxes[1]], "second") == -1
    assert not torch.equal(first[~inside], source[~inside])  # the first drawing shows outside the second box ...
    # ... and the second region, drawn alone, did not read it: drawn onto the first it comes out otherwise
    after = _pass(engine, "two things", regions[1], holed(first, [boxes[1]], "second"))
    assert not torch.equal(after[inside], second[inside])
    if boxes[0] == TOP:  # where both boxes hold a code each drawing changed, the later region's stands
        both = (holed(source, [boxes[0]], "first") == -1) & inside & (first != source) & (second != source)
        assert bool(both.any()) and torch.equal(_codes(out)[both], second[both])
    # one pass with both regions is another drawing: there each half reads the other region's codes row by row
    together = engine.generate("two things", start_with="image", max_images=1, image=GREEDY, regions=regions)
    assert not torch.equal(_codes(together), _codes(out))


def test_a_later_region_wins_only_the_codes_it_changed(engine, monkeypatch):
    """Laying on, with drawings made up: where the later region leaves the canvas as it was, the earlier region's
    change stands; where both change a code, the later one's; outside every box, the canvas."""
    from anygen.generation.events import RowDone

    source = torch.zeros(4, 4, dtype=torch.long)
    first, second = torch.full((4, 4), 1), torch.zeros(4, 4, dtype=torch.long)
    second[0, 0] = 2  # the later region changes one code of the overlap and leaves the rest of it as the canvas
    drawn = [first, second]
    monkeypatch.setattr(engine, "_run_rows", lambda rows, *args: [
        RowDone(k, "max_images", [Image(codes=drawn[k])]) for k in range(len(rows))])
    top, left = (0.0, 0.0, 1.0, 0.5), (0.0, 0.0, 0.5, 1.0)  # overlapping in the top-left quarter
    regions = [[(engine.encode_prompt("a"), top), (engine.encode_prompt("b"), left)]]
    (out,) = engine.compose_codes([engine.encode_prompt("two")], [source], regions, GenerationSettings(
        start_with="image", image_size=(4, 4)))
    expected = torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(out, expected)
    # with an inpaint grid, the composed picture only inside its holes (the top-right code), the grid elsewhere
    grid = torch.full((4, 4), 3)
    grid[0, 3] = -1
    (put,) = engine.compose_codes([engine.encode_prompt("two")], [source], regions, GenerationSettings(
        start_with="image", image_size=(4, 4)), grids=[grid])
    assert int(put[0, 3]) == 1 and bool((put.flatten()[:3] == 3).all()) and bool((put[1:] == 3).all())
    assert engine.compose_codes([engine.encode_prompt("x")], [None], [[]], GenerationSettings()) == [None]


def test_with_inpaint_the_composed_picture_goes_into_the_prompts_picture_inside_the_boxes_only(engine, canvas):
    """An edit's object drawn alone onto an empty scene, then put into its box of the prompt's picture."""
    picture, source = canvas
    scene = render_scene([SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right")])
    codes = engine.tokenizer.image_codes(Image(scene))
    prompt, region, guided = [scene, "make the circle yellow"], ("a yellow circle", LEFT), {**GREEDY,
                                                                                          "image_guidance_scale": 1.5}
    corner = (0.0, 0.0, 0.5, 0.5)  # the inpaint box, inside the region's: the drawing goes there only
    out = engine.generate(prompt, start_with="image", max_images=1, image=guided, regions=[region], canvas=picture,
                          inpaint=corner)
    drawn = _pass(engine, prompt, region, holed(source, [LEFT], "left"), guided)  # alone, onto the empty scene
    box = holed(source, [corner], "corner") == -1
    assert torch.equal(_codes(out), torch.where(box, _laid(source, [(LEFT, drawn)]), codes))
    assert not torch.equal(_codes(out)[box], codes[box])  # the box holds the drawing, not the prompt's picture
    rest = (holed(source, [LEFT], "left") == -1) & ~box  # drawn in the region, outside the inpaint box
    assert not torch.equal(drawn[rest], codes[rest])  # ... which the test needs to differ from the picture
    with pytest.raises(ValueError, match="give a canvas of its size"):
        engine.generate(prompt, start_with="image", regions=[region], inpaint=LEFT,
                        canvas=Image(codes=torch.zeros(2, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="holds none written as VQ codes"):
        engine.generate("a yellow circle", start_with="image", regions=[region], canvas=picture, inpaint=LEFT)


def test_codes_outside_every_box_are_the_canvas(engine, canvas):
    picture, source = canvas
    box = (0.0, 0.0, 0.5, 0.5)
    out = engine.generate("a red circle", start_with="image", max_images=1, seed=4,
                          image={"temperature": 1.0, "guidance_scale": 3.0}, regions=[("a red circle", box)],
                          canvas=Image(picture))
    outside = holed(source, [box], "box") != -1
    assert torch.equal(_codes(out)[outside], source[outside])
    assert not torch.equal(_codes(out)[~outside], source[~outside])


def test_a_batch_mixes_composed_rows_with_plain_ones(engine, canvas):
    """A row composes (greedily) as it would alone, whatever the other rows' regions; a row without a canvas draws
    plainly."""
    picture, source = canvas
    prompts = ["two things", "one thing", "a green triangle"]
    regions = [[("a red circle", TOP), ("a blue square", BOTTOM)], [("a white square", BOTTOM)], None]
    out = engine.generate(prompts, start_with="image", max_images=1, image=GREEDY, regions=regions,
                          canvas=[picture, picture, None])
    alone = engine.generate(prompts[1], start_with="image", max_images=1, image=GREEDY, regions=regions[1],
                            canvas=picture)
    plain = engine.generate(prompts[2], start_with="image", max_images=1, image=GREEDY)
    assert torch.equal(_codes(out[1]), _codes(alone)) and torch.equal(_codes(out[2]), _codes(plain))
    bottom = holed(source, [BOTTOM], "bottom") == -1
    assert torch.equal(_codes(out[1])[~bottom], source[~bottom])


def test_the_last_pass_continues_past_the_image(engine, canvas):
    picture, source = canvas
    out = engine.generate("a red circle", start_with="image", max_images=0, max_new_tokens=60, seed=1,
                          image=GREEDY, regions=[("a red circle", TOP)], canvas=picture)
    h, w = source.shape
    assert out.finish_reason in ("eos", "max_new_tokens") and len(out.ids) > h * (w + 1) + 2  # the image, then more


def _record_passes(engine, monkeypatch) -> list:
    """Each pass through the generator from now on, as its ``RowDone`` events in row order (one list a pass)."""
    from anygen.generation.events import RowDone

    passes, real = [], engine.generator.stream

    def stream(prompts, settings, *args):
        done = [e for e in real(prompts, settings, *args) if isinstance(e, RowDone)]
        passes.append(sorted(done, key=lambda e: e.row))
        yield from done

    monkeypatch.setattr(engine.generator, "stream", stream)
    return passes


def test_best_of_reranks_each_regions_drawings_by_its_own_text(engine, canvas, monkeypatch):
    """Each region is drawn 3 times and keeps the drawing the (patched) reader scores highest: here the second, so
    the composed picture holds each region's second drawing in its box."""
    picture, source = canvas
    passes, reads = _record_passes(engine, monkeypatch), []

    def score(contexts, texts):
        reads.append((contexts, texts))
        return [1.0 if k % 3 == 1 else 0.0 for k in range(len(texts))]

    monkeypatch.setattr(engine, "score", score)
    regions = [("a red circle", LEFT), ("a blue square", RIGHT)]
    out = engine.generate(["two things", "two more"], start_with="image", max_images=1, best_of=3, seed=2,
                          image={"temperature": 1.0, "guidance_scale": 3.0}, regions=[regions, regions],
                          canvas=picture)
    # the draw: two prompts, two regions each, three drawings each, in one batch; then the copy, a row a prompt
    assert [len(p) for p in passes] == [12, 2]
    assert [texts for _, texts in reads] == [["a red circle"] * 3, ["a blue square"] * 3] * 2
    assert all(isinstance(c[0], Understand) for contexts, _ in reads for c in contexts)
    drawn = [_codes(e) for e in passes[0]]
    assert len({tuple(c.flatten().tolist()) for c in drawn[:3]}) > 1  # the drawings differ
    for row in range(2):
        kept = [drawn[row * 6 + 1], drawn[row * 6 + 4]]
        assert torch.equal(_codes(out[row]), _laid(source, [(LEFT, kept[0]), (RIGHT, kept[1])]))
        assert torch.equal(_codes(passes[1][row]), _codes(out[row]))
    with pytest.raises(ValueError, match="some prompts of this batch have no canvas"):
        engine.generate(["a", "b"], start_with="image", best_of=2, regions=[regions, regions], canvas=[picture, None])


def test_best_of_with_rerank_likelihood_keeps_the_drawing_whose_codes_its_text_makes_most_likely(engine, canvas,
                                                                                                    monkeypatch):
    """rerank="likelihood": each region's 3 drawings are scored by ``score_image`` of the drawn codes after the
    region's text (patched: the third wins), and the understanding path is not asked."""
    picture, source = canvas
    passes, reads = _record_passes(engine, monkeypatch), []

    def score_image(texts, images):
        reads.append((texts, images))
        return [1.0 if k % 3 == 2 else 0.0 for k in range(len(texts))]

    monkeypatch.setattr(engine, "score_image", score_image)
    monkeypatch.setattr(engine, "score", lambda *a, **k: pytest.fail("the understanding path was asked"))
    regions = [("a red circle", LEFT), ("a blue square", RIGHT)]
    out = engine.generate("two things", start_with="image", max_images=1, best_of=3, seed=2, rerank="likelihood",
                          image={"temperature": 1.0, "guidance_scale": 3.0}, regions=regions, canvas=picture)
    assert [texts for texts, _ in reads] == [["a red circle"] * 3, ["a blue square"] * 3]
    drawn = [_codes(e) for e in passes[0]]
    assert all(torch.equal(im.codes, drawn[r * 3 + k]) for r, (_, ims) in enumerate(reads) for k, im in enumerate(ims))
    assert torch.equal(_codes(out), _laid(source, [(LEFT, drawn[2]), (RIGHT, drawn[5])]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(regions=None), "this prompt has none: pass regions"),
    (dict(regions=[]), "this prompt has none: pass regions"),
    (dict(canvas="blank.png"), "must be a PIL.Image or Image .* got str"),
    (dict(canvas=torch.zeros(3, 8, 8)), "must be a PIL.Image or Image .* got Tensor"),
    (dict(start_with=None), "pass start_with='image'"),
    (dict(image_size=(2, 3)), "leave image_size unset or equal"),
    (dict(speculative=2), "regions and speculative decoding do not combine"),
    (dict(negatives=["a blue square"]), "negatives rank the candidates that best_of draws"),
    (dict(negatives=["a blue square"], best_of=2), "negatives are not used there"),
])
def test_bad_canvas_calls_are_refused_by_name(engine, canvas, kwargs, match):
    picture, _ = canvas
    call = {"start_with": "image", "max_images": 1, "regions": [("a red circle", TOP)], "canvas": picture, **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.generate("a red circle", **call)


def test_a_batch_takes_one_canvas_per_prompt_of_one_size(engine, canvas):
    picture, _ = canvas
    regions = [[("a red circle", TOP)], [("a blue square", TOP)]]
    with pytest.raises(ValueError, match="one picture or None per prompt \\(2\\), got 3"):
        engine.generate(["a", "b"], start_with="image", regions=regions, canvas=[picture] * 3)
    with pytest.raises(ValueError, match="canvas of prompt #1 must be a PIL.Image or Image"):
        engine.generate(["a", "b"], start_with="image", regions=regions, canvas=[picture, 7])
    small = Image(codes=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must share a size in codes"):
        engine.generate(["a", "b"], start_with="image", regions=regions, canvas=[picture, small])
    with pytest.raises(ValueError, match="hold no code's centre"):
        engine.generate("a", start_with="image", regions=[("a red circle", (0, 0, 0.01, 0.01))], canvas=picture)


def test_layout_regions_grow_each_cell_within_the_picture():
    objects = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "center")]
    (t0, b0), (t1, b1) = layout_regions(objects, margin=0.1)
    assert (t0, t1) == (caption(objects[:1]), caption(objects[1:]))
    assert b0 == pytest.approx((0.0, 0.0, 1 / 3 + 0.1, 1 / 3 + 0.1))  # clipped at the picture's edge
    assert b1 == pytest.approx((1 / 3 - 0.1, 1 / 3 - 0.1, 2 / 3 + 0.1, 2 / 3 + 0.1))
    assert [b for _, b in layout_regions(objects)] == [cell_box("top left"), cell_box("center")]
    with pytest.raises(ValueError, match="margin is a fraction"):
        layout_regions(objects, margin=0.5)


def test_eval_canvas_composes_the_layout_onto_an_empty_scene(tmp_path, monkeypatch):
    from anygen.data.shapes import POSITIONS
    from anygen.eval import main
    from anygen.eval.harness import EvalContext, eval_story, eval_t2i_pair, t2i_scenes
    from anygen.plan import PLAN_MARGIN

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append(kw) or real(prompts, **kw))
    ctx = EvalContext(engine, num=2, regions="layout", canvas="blank")
    result = eval_t2i_pair(ctx)
    (kw,) = calls
    empty = render_scene([], ctx.image_px[0])
    assert all(list(c.getdata()) == list(empty.getdata()) for c in kw["canvas"])
    # the planner's layout of each prompt: the caption's reading order, each cell grown by PLAN_MARGIN
    assert kw["regions"] == [layout_regions(sorted(s, key=lambda o: POSITIONS.index(o.position)), PLAN_MARGIN)
                             for s in t2i_scenes(ctx, "t2i_pair")]
    assert "canvas" in result.details
    calls.clear()
    eval_story(ctx)
    assert "canvas" in calls[0] and "canvas" not in calls[1]  # the second picture continues the first
    with pytest.raises(ValueError, match="needs regions 'layout'"):
        EvalContext(engine, num=1, canvas="blank")
    with pytest.raises(ValueError, match="canvas must be one of"):
        EvalContext(engine, num=1, regions="layout", canvas="white")
    out = tmp_path / "eval"
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--categories", "t2i_single", "--regions",
                 "layout", "--canvas", "blank", "--no-images"]) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["canvas"] == "blank" and "canvas" in saved["categories"]["t2i_single"]["details"]


def test_cli_generate_composes_onto_the_canvas_file(tmp_path, capsys, monkeypatch):
    from anygen.api import AnyGen
    from anygen.cli_generate import main

    calls, real = [], AnyGen.generate
    monkeypatch.setattr(AnyGen, "generate", lambda self, prompts, **kw: calls.append(kw["canvas"]) or real(
        self, prompts, **kw))
    blank = tmp_path / "blank.png"
    render_scene([]).save(blank)
    base = ["--random-tiny", "--start-with", "image", "--max-images", "1", "--seed", "0", "--image-temperature", "0"]
    assert main(["two things", *base, "--region", "0,0,1,0.5:a red circle", "--canvas", str(blank), "--out",
                 str(tmp_path / "a")]) == 0
    assert len(calls[-1]) == 1 and calls[-1][0].size == render_scene([]).size
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": "a", "regions": [["a red circle", [0, 0, 1, 0.5]]], "canvas": str(blank)})
                     + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert main(["--prompts", str(lines), *base, "--out", str(tmp_path / "b")]) == 0
    assert calls[-1][0] is not None and calls[-1][1] is None
    capsys.readouterr()
    assert main(["two things", *base, "--region", "0,0,1,0.5:a red circle", "--canvas", str(tmp_path / "nope.png"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["two things", *base, "--canvas", str(blank), "--out", str(tmp_path / "d")]) == 2
    assert "pass regions" in capsys.readouterr().err
    lines.write_text(json.dumps({"prompt": "a", "canvas": 3}) + "\n")
    assert main(["--prompts", str(lines), *base, "--out", str(tmp_path / "e")]) == 2
    assert '"canvas" must be a path' in capsys.readouterr().err
