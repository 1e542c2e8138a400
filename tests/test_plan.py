"""anygen.plan: a scene prompt read into a layout (regions over grown cells, an empty canvas), and the refusals."""

import PIL.Image
import pytest

from anygen.data.shapes import BACKGROUND, SceneObject, cell_box
from anygen.plan import PLAN_MARGIN, plan_layout, plan_objects


def test_plan_reads_each_object_into_its_grown_cell():
    layout = plan_layout("A red circle at the top left and a blue square at the bottom right.", 32)
    assert layout.objects == (SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right"))
    (t0, b0), (t1, b1) = layout.regions
    assert (t0, t1) == ("a red circle at the top left", "a blue square at the bottom right")
    m = PLAN_MARGIN
    assert b0 == pytest.approx((0.0, 0.0, 1 / 3 + m, 1 / 3 + m))  # clipped at the picture's edges
    assert b1 == pytest.approx((2 / 3 - m, 2 / 3 - m, 1.0, 1.0))
    assert layout.canvas.size == (32, 32)
    assert set(layout.canvas.convert("RGB").getdata()) == {BACKGROUND}  # an empty scene
    assert layout.kwargs() == {"regions": layout.regions, "canvas": layout.canvas}


def test_plan_keeps_the_prompt_order_and_accepts_commas():
    objects = plan_objects("a green triangle in the center, a yellow circle on the left; and an orange square at "
                           "the top")
    assert [(o.shape, o.position) for o in objects] == [("triangle", "center"), ("circle", "left"), ("square", "top")]
    (_, box), = plan_layout("a cyan square at the bottom", 16, margin=0.0).regions
    assert box == pytest.approx(cell_box("bottom"))


@pytest.mark.parametrize("prompt, match", [
    ("a photo of a dog", "no object to plan"),
    ("a red circle at the top left and a dog", "cannot place 'and a dog'"),
    ("draw a red circle at the top left", "cannot place 'draw'"),
    ("a red circle at the top left and a blue square at the top left", "two objects at the top left"),
    ("", "no object to plan"),
])
def test_plan_refuses_what_it_cannot_place(prompt, match):
    with pytest.raises(ValueError, match=match) as err:
        plan_objects(prompt)
    if "two objects" not in match:
        assert "'<colour> <shape> <where>'" in str(err.value)  # says what it reads


def test_plan_checks_its_arguments():
    with pytest.raises(ValueError, match="text prompt"):
        plan_objects(["a red circle at the top left"])
    with pytest.raises(ValueError, match="positive int"):
        plan_layout("a red circle at the top left", 0)
    with pytest.raises(ValueError, match="margin is a fraction"):
        plan_layout("a red circle at the top left", 16, margin=0.6)
    with pytest.raises(ValueError, match="margin is a fraction"):
        plan_layout("a red circle at the top left", 16, margin="x")


def test_cli_generate_plan_composes_the_planned_layout(tmp_path, monkeypatch, capsys):
    from anygen import cli_generate
    from anygen.testing import random_engine

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append(kw) or real(prompts, **kw))
    monkeypatch.setattr(cli_generate, "load_engine", lambda *a, **k: engine)
    prompt = "a red circle at the top left and a blue square at the bottom right"
    assert cli_generate.main([prompt, "--plan", "--max-images", "1", "--seed", "0", "--out", str(tmp_path)]) == 0
    (kw,) = calls
    size = engine.tokenizer.image_size[0]
    assert kw["start_with"] == "image" and kw["regions"] == [plan_layout(prompt, size).regions]
    assert [c.size for c in kw["canvas"]] == [(size, size)]
    assert (tmp_path / "0000" / "image_0.png").is_file()


@pytest.mark.parametrize("extra, match", [
    (["a dog on a mat"], "no object to plan"),
    (["a red circle at the top left", "--region", "0,0,0.5,0.5:a red circle"], "takes no regions"),
    (["a red circle at the top left", "--start-with", "video"], "not video"),
])
def test_cli_generate_plan_refuses_before_loading_a_model(extra, match, monkeypatch, capsys):
    from anygen import cli_generate

    monkeypatch.setattr(cli_generate, "load_engine", lambda *a, **k: pytest.fail("loaded a model for a bad plan"))
    assert cli_generate.main([*extra, "--plan"]) == 2
    assert match in capsys.readouterr().err


def _fake_generate(captions, answers):
    """A ``generate`` for ``plan_edits`` giving these captions, then these answers, recording each call."""
    from types import SimpleNamespace

    calls = []

    def generate(prompts, **kw):
        calls.append((prompts, kw))
        texts = captions if "best_of" in kw else answers
        return [SimpleNamespace(text=texts[i]) for i in range(len(prompts))]

    return generate, calls


def test_plan_edits_finds_the_cell_from_the_instruction_the_caption_or_the_answer():
    from anygen.data.shapes import render_scene
    from anygen.plan import ASK_BEST_OF, plan_edits
    from anygen.testing import random_engine

    engine = random_engine("tiny")
    picture = render_scene([SceneObject("circle", "red", "top left")], 32)
    generate, calls = _fake_generate(
        ["a blue square in the center and a red circle at the top left", "a green triangle on the right", "nothing"],
        ["it is at the bottom", "i do not know"])
    plans = plan_edits(engine, [picture] * 4, ["make the square at the top right green", "make the circle yellow",
                                               "make the blue circle red", "make the square cyan"],
                       generate=generate)
    named, caption_read, answered, lost = plans
    assert (named.cell, named.read_from) == ("top right", "instruction")  # no model call for it
    assert caption_read.cell == "top left" and caption_read.read_from.startswith("caption: a blue square")
    assert caption_read.regions == [("a yellow circle at the top left", cell_box("top left"))]
    canvas = PIL.Image.new("RGB", (32, 32))
    assert caption_read.kwargs(canvas) == {"inpaint": cell_box("top left"), "regions": caption_read.regions,
                                           "canvas": canvas}
    assert [o.key for o in caption_read.scene] == [("blue", "square", "center"), ("yellow", "circle", "top left")]
    assert answered.cell == "bottom" and answered.read_from == "where is the blue circle? it is at the bottom"
    assert not lost.found and lost.read_from == "where is the square? i do not know"  # no place named
    (captions, ckw), (questions, qkw) = calls
    assert len(captions) == 3 and ckw["best_of"] == ASK_BEST_OF and all(len(p) == 1 for p in captions)
    assert [q[1] for q in questions] == ["where is the blue circle?", "where is the square?"]
    assert qkw["max_images"] == 0


def test_plan_edits_refuses_what_it_cannot_plan():
    from anygen.data.shapes import render_scene
    from anygen.plan import plan_edits
    from anygen.testing import random_engine

    engine, picture = random_engine("tiny"), render_scene([], 32)
    with pytest.raises(ValueError, match="edit #0: the planner reads recolourings"):
        plan_edits(engine, [picture], ["add a red circle"])
    with pytest.raises(ValueError, match="one instruction per picture"):
        plan_edits(engine, [picture, picture], ["make the circle red"])
    with pytest.raises(ValueError, match="takes lists"):
        plan_edits(engine, [picture], "make the circle red")
    with pytest.raises(ValueError, match="edit #0: the picture must be a PIL.Image, got str"):
        plan_edits(engine, ["scene.png"], ["make the circle red"])
    engine.model.und = None  # no understanding encoder: only an instruction naming its place can be planned
    assert plan_edits(engine, [picture], ["make the circle at the top red"])[0].cell == "top"
    with pytest.raises(ValueError, match="no understanding encoder|has none"):
        plan_edits(engine, [picture], ["make the circle red"])


def test_cli_generate_plan_redraws_the_cell_of_an_edit(tmp_path, monkeypatch, capsys):
    from anygen import cli_generate
    from anygen.data.shapes import render_scene
    from anygen.testing import random_engine

    engine = random_engine("tiny")
    calls, real = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: calls.append(kw) or real(prompts, **kw))
    monkeypatch.setattr(cli_generate, "load_engine", lambda *a, **k: engine)
    scene = tmp_path / "scene.png"
    render_scene([SceneObject("circle", "red", "top left")], engine.tokenizer.image_size[0]).save(scene)
    assert cli_generate.main(["make the circle at the top left yellow", "--image", str(scene), "--plan",
                              "--max-images", "1", "--seed", "0", "--out", str(tmp_path / "out")]) == 0
    (kw,) = calls  # the place is named: the model is not asked, the edit is drawn once
    assert kw["inpaint"] == [[cell_box("top left")]] and kw["start_with"] == "image"
    side = engine.tokenizer.image_size[0]  # the object drawn alone onto an empty picture of the scene's size
    assert [c.size for c in kw["canvas"]] == [(side, side)] and set(kw["canvas"][0].getdata()) == {BACKGROUND}
    assert kw["regions"] == [[("a yellow circle at the top left", cell_box("top left"))]]
    from anygen.plan import empty_like

    with pytest.raises(ValueError, match="empty_like takes the picture"):
        empty_like(str(scene))
    assert "redrawing the top left cell" in capsys.readouterr().err
    assert cli_generate.main(["draw it", "--image", str(scene), "--plan"]) == 2
    assert "plans a recolouring" in capsys.readouterr().err
