"""Inpainting (``generate(inpaint=...)``): the first generated image copies the prompt's image outside the boxes and
the model draws only inside them; and ``anygen eval --inpaint``, which edits (and adds to a story) that way."""

import json

import pytest
import torch

from anygen.data.shapes import (
    SceneObject,
    caption,
    cell_box,
    parse_caption,
    parse_recolor,
    parse_where,
    render_scene,
)
from anygen.generation.generator import GenerationSettings, Generator, copy_codes
from anygen.generation.grammar import IMG_BODY, NO_FORCE, TEXT, Grammar, GrammarState
from anygen.generation.sampling import SamplingConfig
from anygen.testing import random_engine
from tokenizers_mm.segments import Image

GREEDY = {"temperature": 0.0, "guidance_scale": 1.0, "image_guidance_scale": 1.0}


@pytest.fixture(scope="module")
def engine():
    return random_engine("tiny", seed=0)


@pytest.fixture(scope="module")
def picture(engine):
    """A scene and its VQ codes as the tiny tokenizer writes them."""
    scene = render_scene([SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right")])
    return scene, engine.tokenizer.image_codes(Image(scene))


def _codes(out) -> torch.Tensor:
    return next(s.codes for s in out.segments if isinstance(s, Image))


def _edit(engine, picture, sampling=GREEDY, **kw):
    return engine.generate([Image(picture[0]), "make the circle yellow"], start_with="image", max_images=1, seed=3,
                           image=sampling, **kw)


def _holes(shape, box) -> torch.Tensor:
    """Where a code's centre lies in ``box``: the part the model draws."""
    h, w = shape
    y = (torch.arange(h)[:, None] + 0.5) / h
    x = (torch.arange(w)[None, :] + 0.5) / w
    return (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])


@pytest.mark.parametrize("sampling", [GREEDY, {"temperature": 1.0, "guidance_scale": 3.0}],
                         ids=["greedy", "sampled-guided"])
def test_codes_outside_the_box_are_the_prompts_and_inside_are_drawn(engine, picture, sampling):
    _, source = picture
    box = (0.25, 0.0, 0.75, 0.5)
    codes = _codes(_edit(engine, picture, sampling, inpaint=box))
    assert codes.shape == source.shape  # drawn at the prompt image's size
    hole = _holes(source.shape, box)
    assert torch.equal(codes[~hole], source[~hole])
    assert not torch.equal(codes[hole], source[hole])  # the random model does not copy on its own


def test_the_first_drawn_code_is_the_models_choice_after_the_copied_ones(engine, picture):
    """Greedy and unguided, the first code inside the box is the argmax of the model's image logits over the prompt,
    the span's opening and the copied codes before it, read by a plain full forward."""
    _, source = picture
    h, w = source.shape
    box = (0.5, 0.5, 1.0, 1.0)  # the first hole: row h // 2, column w // 2
    out = _edit(engine, picture, inpaint=box)
    v = engine.tokenizer.vocab
    prompt = engine.encode_prompt([Image(picture[0]), "make the circle yellow"])
    rows = [torch.cat([source[r] + v.image_offset, torch.tensor([v.eol])]) for r in range(h // 2)]
    before = torch.cat([prompt.ids, torch.tensor([v.boi, v.h_token(h), v.w_token(w)]), *rows,
                        source[h // 2, :w // 2] + v.image_offset])
    with torch.no_grad():
        logits = engine.model(before[None])[0, -1, v.image_offset:v.video_offset]
    assert int(_codes(out)[h // 2, w // 2]) == int(logits.argmax())


def test_a_box_over_the_whole_image_draws_as_without_inpaint(engine, picture):
    _, source = picture
    whole = _codes(_edit(engine, picture, inpaint=(0, 0, 1, 1)))
    plain = _codes(_edit(engine, picture, image_size=tuple(source.shape)))
    assert torch.equal(whole, plain)


def test_both_loops_agree_and_a_row_without_inpaint_is_untouched(engine, picture):
    prompts = [engine.encode_prompt([Image(picture[0]), "make the circle yellow"]), engine.encode_prompt("a cat"),
               engine.encode_prompt([Image(picture[0]), "make the square red"])]
    _, source = picture
    grid = torch.where(_holes(source.shape, (0, 0, 0.5, 0.5)), -1, source)
    grid2 = torch.where(_holes(source.shape, (0.5, 0.5, 1, 1)), -1, source)
    settings = GenerationSettings(max_new_tokens=300, start_with="image", image_size=tuple(source.shape), max_images=1,
                                  seed=1,
                                  image=SamplingConfig(temperature=0.0, guidance_scale=4.0, image_guidance_scale=1.5))
    fast = Generator(engine.model, engine.tokenizer).generate(prompts, settings, inpaint=[grid, None, grid2])
    plain = Generator(engine.model, engine.tokenizer, fast=False).generate(prompts, settings,
                                                                         inpaint=[grid, None, grid2])
    assert [r.ids.tolist() for r in fast] == [r.ids.tolist() for r in plain]
    alone = Generator(engine.model, engine.tokenizer).generate(prompts[1:2], settings)[0]
    assert fast[1].ids.tolist() == alone.ids.tolist()
    for row, g in ((0, grid), (2, grid2)):
        drawn = _codes(fast[row])
        assert torch.equal(drawn[g >= 0], g[g >= 0])


def test_copy_codes_forces_the_first_image_body_only_and_never_over_the_grammar(engine):
    """Per row: a code of the first image where the grid fills the place is forced; a hole, a second image (one
    medium done), text, and a place the grammar already forces (<|eol|> at col == width) are left alone."""
    t = lambda *x: torch.tensor(x)  # noqa: E731
    v = engine.tokenizer.vocab
    grammar = Grammar(v)
    state = GrammarState.start(t(IMG_BODY, IMG_BODY, IMG_BODY, TEXT, IMG_BODY), req_h=t(0, 0, 0, 0, 0),
                               req_w=t(0, 0, 0, 0, 0), req_t=t(0, 0, 0, 0, 0), max_media=t(0, 0, 0, 0, 0))
    state.height, state.width = t(2, 2, 2, 2, 2), t(2, 2, 2, 2, 2)
    state.row, state.col = t(0, 1, 0, 0, 1), t(1, 0, 1, 0, 2)
    state.media_done = t(0, 0, 1, 0, 0)  # row 2 draws its second image
    keep = torch.tensor([[[5, 6], [7, 8]], [[5, 6], [-1, 8]], [[5, 6], [7, 8]], [[5, 6], [7, 8]], [[5, 6], [7, 8]]])
    _, forced = grammar.constraints(state)
    out = copy_codes(grammar, state, forced, keep)
    assert out.tolist() == [v.image_offset + 6, NO_FORCE, NO_FORCE, NO_FORCE, v.eol]
    assert torch.equal(copy_codes(grammar, state, forced, torch.zeros(5, 0, 0, dtype=torch.long)), forced)


@pytest.mark.parametrize("prompt, kwargs, match", [
    ("make it red", dict(inpaint=(0, 0, 1, 1)), "the prompt holds none written as VQ codes"),
    (None, dict(inpaint=(0.5, 0, 0.5, 1)), "0 <= x0 < x1 <= 1"),
    (None, dict(inpaint=[]), "a box \\(x0, y0, x1, y1\\) or a non-empty list of boxes"),
    (None, dict(inpaint=(0, 0, 0.01, 0.01)), "hold no code's centre"),
    (None, dict(inpaint=(0, 0, 1, 1), image_size=(2, 3)), "leave image_size unset or equal"),
    (None, dict(inpaint=(0, 0, 1, 1), speculative=2), "neither speculative decoding nor best_of"),
    (None, dict(inpaint=(0, 0, 1, 1), best_of=2), "neither speculative decoding nor best_of"),
    (None, dict(inpaint=(0, 0, 1, 1), start_with="video"), "this call draws none"),
])
def test_bad_inpaint_is_refused_by_name(engine, picture, prompt, kwargs, match):
    prompt = prompt or [Image(picture[0]), "make the circle yellow"]
    with pytest.raises(ValueError, match=match):
        engine.generate(prompt, **{"start_with": "image", "max_images": 1, **kwargs})


def test_generator_refuses_a_grid_it_cannot_copy(engine):
    gen = Generator(engine.model, engine.tokenizer)
    settings = GenerationSettings(max_new_tokens=40, start_with="image", max_images=1)
    prompt = [engine.encode_prompt("a cat")]
    for grid, match in ((torch.zeros(4), "2-D integer tensor"), (torch.zeros(2, 2), "2-D integer tensor"),
                        (torch.full((2, 2), 10 ** 6), "outside -1.."), (torch.zeros(99, 2, dtype=torch.long), "rows"),
                        (None, None)):
        if grid is None:
            with pytest.raises(ValueError, match="one grid of codes \\(or None\\) per prompt"):
                gen.generate(prompt, settings, inpaint=[])
            continue
        with pytest.raises(ValueError, match=match):
            gen.generate(prompt, settings, inpaint=[grid])


def test_a_batch_takes_one_entry_per_prompt(engine, picture):
    prompts = [[Image(picture[0]), "make the circle yellow"], "a red circle"]
    with pytest.raises(ValueError, match="one box, list of boxes or None per prompt \\(2\\)"):
        engine.generate(prompts, start_with="image", max_images=1, inpaint=[(0, 0, 1, 1)])
    _, source = picture
    out = engine.generate(prompts, start_with="image", max_images=1, seed=3, image=GREEDY,
                          inpaint=[[(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], None])
    hole = _holes(source.shape, (0, 0, 0.5, 0.5)) | _holes(source.shape, (0.5, 0.5, 1, 1))
    assert torch.equal(_codes(out[0])[~hole], source[~hole])


def test_parse_recolor_and_parse_where_read_the_shapes_grammar():
    assert parse_recolor("make the red circle yellow") == ("circle", "red", None, "yellow")
    assert parse_recolor("Make the  circle at the top left blue") == ("circle", None, "top left", "blue")
    assert parse_recolor("make the square cyan") == ("square", None, None, "cyan")
    assert parse_recolor("move the circle to the top") is None and parse_recolor("make the cat blue") is None
    assert parse_where("at the bottom left") == "bottom left" and parse_where("it is in the center.") == "center"
    assert parse_where("at the top") == "top" and parse_where("nowhere") is None


def test_eval_inpaint_redraws_the_edited_cell_and_the_added_object_cell(tmp_path, monkeypatch):
    from anygen.eval import main
    from anygen.eval.harness import EvalContext, edit_cases, eval_edit, eval_story

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append((prompts, kw)) or real(prompts, **kw))
    ctx = EvalContext(engine, num=3, inpaint="layout", regions="layout")
    result = eval_edit(ctx)
    (_, kw), = calls
    for case, box, regions in zip(edit_cases(ctx), kw["inpaint"], kw["regions"]):
        target = case.after[case.target]
        assert box == cell_box(target.position)
        assert regions == [(caption([target]), box)]  # the new colour over the old object's cell
    assert result.details["inpaint"] == "layout" and result.details["cell_right"] == 1.0
    calls.clear()
    asked = eval_edit(EvalContext(engine, num=3, inpaint="asked"))
    drawn = calls[-1][1]
    assert "regions" not in drawn
    for sample, box in zip(asked.samples, drawn.get("inpaint") or [None] * 3):  # the random model's own reading
        assert sample["read_from"]  # what the model read, even where it named no cell
        assert box == (cell_box(sample["redrawn_cell"]) if sample["redrawn_cell"] else None)
    calls.clear()
    story = eval_story(EvalContext(engine, num=2, inpaint="layout"))
    (_, kw1), (_, kw2) = calls
    assert "inpaint" not in kw1  # the first picture is drawn whole, the second keeps it outside the added cell
    for sample, box in zip(story.samples, kw2["inpaint"]):
        (added,) = parse_caption(sample["steps"][1])
        assert box == cell_box(added.position)
    with pytest.raises(ValueError, match="inpaint must be one of"):
        EvalContext(engine, num=1, inpaint="somewhere")
    out = tmp_path / "eval"
    assert main(["--random-tiny", "--num", "1", "--out", str(out), "--categories", "edit", "--inpaint", "asked"]) == 0
    assert json.loads((out / "eval.json").read_text())["inpaint"] == "asked"



def test_cli_generate_inpaints_the_image_from_the_flag_or_the_prompts_file(tmp_path, capsys, monkeypatch):
    from anygen.api import AnyGen
    from anygen.cli_generate import main

    calls, real = [], AnyGen.generate
    monkeypatch.setattr(AnyGen, "generate", lambda self, prompts, **kw: calls.append(kw["inpaint"]) or real(
        self, prompts, **kw))
    scene = tmp_path / "scene.png"
    render_scene([SceneObject("circle", "red", "top left")]).save(scene)
    base = ["--random-tiny", "--start-with", "image", "--max-images", "1", "--seed", "0", "--image-temperature", "0",
            "--image", str(scene)]
    assert main(["make the circle yellow", *base, "--inpaint", "0,0,0.5,0.5", "--out", str(tmp_path / "a")]) == 0
    assert calls[-1] == [[(0.0, 0.0, 0.5, 0.5)]]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": "make it blue", "images": [str(scene)], "inpaint": [[0, 0, 1, 0.5]]})
                     + "\n" + json.dumps({"prompt": "make it red", "images": [str(scene)]}) + "\n")
    assert main(["--prompts", str(lines), *base[:-2], "--inpaint", "0.5,0.5,1,1", "--out", str(tmp_path / "b")]) == 0
    assert calls[-1] == [[(0, 0, 1, 0.5)], [(0.5, 0.5, 1.0, 1.0)]]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["make it red", *base, "--inpaint", "0,0,1"])
    assert "--inpaint: a box is X0,Y0,X1,Y1" in capsys.readouterr().err
    assert main(["make it red", "--random-tiny", "--start-with", "image", "--inpaint", "0,0,1,1",
                 "--out", str(tmp_path / "c")]) == 2
    assert "the prompt holds none written as VQ codes" in capsys.readouterr().err
    lines.write_text(json.dumps({"prompt": "make it blue", "images": [str(scene)], "inpaint": [0, 0, 1, 1]}) + "\n")
    assert main(["--prompts", str(lines), *base[:-2], "--out", str(tmp_path / "d")]) == 2
    assert '"inpaint" must be a list of [x0, y0, x1, y1] boxes' in capsys.readouterr().err


@pytest.mark.parametrize("regions, temperature", [(False, 1.0), (True, 1.0), (True, 0.0)],
                         ids=["sampled", "sampled-with-a-region", "greedy-with-a-region"])
def test_copied_runs_are_fed_at_once_with_the_ids_of_one_step_each(engine, picture, monkeypatch, regions,
                                                                   temperature):
    """The fast loop gathers forced ids and feeds them in one prefill (twins and region rows included): the same ids
    as feeding them one step each (and, greedy, as the plain loop, whose sampler draws differently), in far fewer
    forward passes."""
    _, source = picture
    prompts = [engine.encode_prompt([Image(picture[0]), "make the circle yellow"])]
    box = (0.5, 0.5, 1.0, 1.0)
    grid = torch.where(_holes(source.shape, box), -1, source)
    settings = GenerationSettings(max_new_tokens=300, start_with="image", max_images=1, seed=2,
                                  image=SamplingConfig(temperature=temperature, guidance_scale=3.0,
                                                       image_guidance_scale=1.5))
    area = [[(engine.encode_prompt("a yellow circle"), box)]] if regions else None
    passes = []
    for name in ("prefill", "decode_step"):
        real = getattr(engine.model, name)
        monkeypatch.setattr(engine.model, name, lambda *a, _real=real, _name=name, **kw: passes.append(_name) or _real(
            *a, **kw))

    def ids(**kw):
        passes.clear()
        out = Generator(engine.model, engine.tokenizer, **kw).generate(prompts, settings, regions=area,
                                                                      inpaint=[grid])[0].ids.tolist()
        keys = engine.model.blocks[-1].attn.kv_cache.k.clone()  # every row's cache, twins' and regions' included
        return out, len(passes), keys, engine.model.cache_valid.clone()

    holes = int((grid == -1).sum())
    gathered, few, keys, valid = ids()
    stepped, many, keys_stepped, valid_stepped = ids(gather_forced=False)
    plain, *_ = ids(fast=False)
    assert gathered == stepped
    fed = valid[0]  # the slots the gathered run fed (a forced tail after the last drawn code is never fed)
    assert int(fed.sum()) > len(prompts[0]) + holes
    assert torch.equal(valid[:, fed], valid_stepped[:, fed])
    assert torch.allclose(keys[:, :, fed], keys_stepped[:, :, fed], atol=1e-5)  # the same positions and context
    assert temperature > 0 or gathered == plain
    assert many >= source.numel() and few <= 2 * holes + 3  # a pass per drawn code (and a row end), not per id


def test_inpainted_edits_are_reranked_against_the_planned_edited_scene(monkeypatch):
    from anygen.eval.harness import EditCase, EvalContext, edit_cases, eval_edit
    from anygen.plan import edit_plan

    before = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right")]
    case = EditCase(before, [SceneObject("circle", "yellow", "top left"), before[1]], 0, "make the circle yellow")
    assert caption(edit_plan(case.instruction, "top left", "layout", before).scene) == caption(case.after)
    seen = [SceneObject("circle", "red", "top left"), SceneObject("triangle", "green", "center")]
    assert caption(edit_plan(case.instruction, "top left", "caption: ...", seen).scene) == \
        "a yellow circle at the top left and a green triangle in the center"  # the model's own reading, recoloured
    asked = edit_plan(case.instruction, "top", "where is the circle? at the top")
    assert asked.scene == [SceneObject("circle", "yellow", "top")]
    assert asked.regions == [("a yellow circle at the top", cell_box("top"))] and asked.box == cell_box("top")
    assert asked.kwargs() == {"inpaint": cell_box("top"), "regions": asked.regions}
    lost = edit_plan(case.instruction, None, "where is the circle? nowhere")
    assert not lost.found and lost.box is None and lost.regions == [] and lost.read_from.endswith("nowhere")
    with pytest.raises(ValueError, match="no cell was found for this edit.*nowhere"):
        lost.kwargs()
    with pytest.raises(ValueError, match="reads recolourings"):
        edit_plan("add a red circle", "top", "layout")

    engine = random_engine("tiny")
    drawn, scored, real = [], [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: drawn.append((prompts, kw)) or real(prompts, **kw))

    def score(candidates, text, rerank="understanding"):  # the third of each prompt's four draws reads back best
        scored.append((list(candidates), text, rerank))
        return [0.0, 1.0, 5.0, 2.0]

    monkeypatch.setattr(engine, "score_candidates", score)
    kept = []
    ctx = EvalContext(engine, num=2, inpaint="layout", best_of=4,
                      keep_images=lambda category, i, name, image: kept.append(image))
    result = eval_edit(ctx)
    (prompts, kw), = drawn
    assert len(prompts) == 8 and kw["inpaint"][:4] == [kw["inpaint"][0]] * 4
    cases = edit_cases(ctx)
    assert [text for _, text, _ in scored] == [caption(c.after) for c in cases]
    assert [k is row[2].image for k, (row, _, _) in zip(kept, scored)] == [True, True]
    assert all(isinstance(c, Image) and c.codes is not None for row, _, _ in scored for c in row)  # scored as drawn
    assert result.details["best_of"] == 4 and {by for *_, by in scored} == {"understanding"}
    scored.clear()
    eval_edit(EvalContext(engine, num=2, inpaint="layout", best_of=4, rerank="likelihood"))
    assert [by for *_, by in scored] == ["likelihood"] * 2  # read back as ctx.rerank says
    drawn.clear()
    plain = eval_edit(EvalContext(engine, num=2, best_of=4))  # drawn whole: not reranked
    assert len(drawn[0][0]) == 2 and "best_of" not in plain.details
