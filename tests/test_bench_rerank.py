"""``bench/rerank.py``'s table arithmetic: one draw, the oracle and each reranker over the first k candidates."""

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "rerank.py"
_SPEC = importlib.util.spec_from_file_location("bench_rerank", _PATH)
rerank = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rerank)


def cand(correct: bool, und: float, gen: float, unc: float) -> dict:
    return {"correct": correct, "und": und, "gen": gen, "unc": unc}


def test_summarize_counts_each_reranker_choice():
    rows = [
        [cand(False, 1, 5, 0), cand(True, 2, 1, -10)],  # understanding and pmi pick the right one, likelihood not
        [cand(True, 0, 0, 0), cand(False, 3, -1, -5)],  # only likelihood keeps the right one
        [],  # no image drawn: wrong for every column
        [cand(False, 0, 0, 0), cand(True, -1, -1, -3)],  # only pmi finds it
    ]
    first, both = rerank.summarize(rows, [1, 2])
    assert first == {"k": 1, "one_draw": 0.25, "oracle": 0.25, "understanding": 0.25, "likelihood": 0.25, "pmi": 0.25}
    assert both == {"k": 2, "one_draw": 0.375, "oracle": 0.75, "understanding": 0.25, "likelihood": 0.25, "pmi": 0.5}


def test_summarize_ties_keep_the_earlier_candidate():
    rows = [[cand(False, 0, 0, 0), cand(True, 0, 0, 0)]]
    (line,) = rerank.summarize(rows, [2])
    assert line["oracle"] == 1.0 and line["understanding"] == line["likelihood"] == line["pmi"] == 0.0


def test_summarize_refuses_no_prompts():
    with pytest.raises(ValueError, match="at least one prompt"):
        rerank.summarize([], [1])


def test_table_has_a_line_per_k_and_no_ratio_without_a_baseline():
    text = rerank.table(rerank.summarize([[cand(False, 0, 0, 0), cand(True, 1, 0, 0)]], [1, 2]))
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].endswith("| – |") and lines[3].endswith("| 2.00x |")


def test_summarize_adds_the_contrast_column_only_when_candidates_carry_it():
    rows = [[{**cand(True, 2, 0, 0), "con": -3.0}, {**cand(False, 1, 0, 0), "con": -0.1}]]  # contrast picks wrong
    (line,) = rerank.summarize(rows, [2])
    assert line["understanding"] == 1.0 and line["contrast"] == 0.0
    assert "contrast" not in rerank.summarize([[cand(True, 0, 0, 0)]], [1])[0]
    assert "| contrast |" in rerank.table([line]) and "contrast" not in rerank.table(rerank.summarize([[cand(
        True, 0, 0, 0)]], [1]))


def test_scene_negatives_are_every_caption_one_attribute_away():
    from anygen.data.shapes import COLORS, POSITIONS, SHAPES, SceneObject, caption, parse_caption

    one = [SceneObject("circle", "red", "top left")]
    negatives = rerank.scene_negatives(one)
    assert len(negatives) == len(set(negatives)) == (len(COLORS) - 1) + (len(SHAPES) - 1) + (len(POSITIONS) - 1)
    assert caption(one) not in negatives
    for text in negatives:
        (found,) = parse_caption(text)
        assert sum(a != b for a, b in zip(found.key, one[0].key)) == 1, text  # exactly one attribute differs
    pair = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom")]
    truth = {o.key for o in pair}
    negatives = rerank.scene_negatives(pair)
    assert len(negatives) == len(set(negatives)) == 2 * ((len(COLORS) - 1) + (len(SHAPES) - 1) + (len(POSITIONS) - 2))
    for text in negatives:
        keys = {o.key for o in parse_caption(text)}
        assert len(keys) == 2 and len({k[2] for k in keys}) == 2, text  # never two objects in one cell
        assert len(keys & truth) == 1, text  # one object kept, the other changed


def test_consensus_keeps_the_candidate_the_others_agree_with_and_ties_keep_the_earlier():
    sims = [[0, -0.9, -0.9, -0.9],  # an outlier
            [-0.9, 0, -0.1, -0.2],  # agrees most with the others
            [-0.9, -0.1, 0, -0.3],
            [-0.9, -0.2, -0.3, 0]]
    head = [{"sim": s} for s in sims]
    assert rerank.consensus_pick(head) == 1
    assert rerank.consensus_pick(head[:1]) == 0
    assert rerank.consensus_pick([{"sim": [0, -0.5]}, {"sim": [-0.5, 0]}]) == 0  # a tie
    # over the first k only: candidate 0's disagreement with the fourth counts at k = 4, not at k = 3
    four = [{"sim": [0, -0.1, -0.1, -0.9]}, {"sim": [-0.1, 0, -0.3, -0.1]}, {"sim": [-0.1, -0.3, 0, -0.1]},
            {"sim": [-0.9, -0.1, -0.1, 0]}]
    assert rerank.consensus_pick(four[:3]) == 0 and rerank.consensus_pick(four) == 1


def test_edit_rows_get_the_consensus_and_nearest_source_columns_only():
    def edit(correct, sim, src):
        return {"correct": correct, "sim": sim, "src": src}

    rows = [[edit(False, [0, -0.8, -0.8], -0.01), edit(True, [-0.8, 0, -0.1], -0.2),
             edit(True, [-0.8, -0.1, 0], -0.3)]]
    (line,) = rerank.summarize(rows, [3])
    assert set(line) == {"k", "one_draw", "oracle", "consensus", "nearest source"}
    assert line["consensus"] == 1.0 and line["nearest source"] == 0.0  # the closest to the source changed nothing
    header = rerank.table([line]).splitlines()[0]
    assert "understanding" not in header and header.endswith("| consensus / one draw |")


def test_pixel_agreement_is_minus_the_mean_absolute_difference():
    import numpy as np
    import PIL.Image

    black, white = PIL.Image.new("RGB", (4, 4)), PIL.Image.new("RGB", (4, 4), (255, 255, 255))
    half = np.zeros((4, 4, 3), dtype=np.uint8)
    half[:, :2] = 255
    sim = rerank.pixel_agreement([black, white, PIL.Image.fromarray(half)])
    assert sim.shape == (3, 3) and torch.allclose(sim.diagonal(), torch.zeros(3))
    assert sim[0, 1].item() == pytest.approx(-1.0) and sim[0, 2].item() == pytest.approx(-0.5)
    assert torch.allclose(sim, sim.T)


def test_shape_rerankers_read_the_swapped_captions():
    # the first: likeliest, but a swapped shape explains it better; the second: the prompt's shape wins its
    # contrast by the most; the third: likely and its shape checked
    rows = [[{**cand(False, 0, -10, 0), "gneg": [-9.0, -30.0]},
             {**cand(False, 0, -40, 0), "gneg": [-80.0, -90.0]},
             {**cand(True, 0, -20, 0), "gneg": [-25.0, -26.0]}]]
    (line,) = rerank.summarize(rows, [3])
    assert line["likelihood"] == 0.0 and line["shape contrast"] == 0.0 and line["shape-checked likelihood"] == 1.0
    unchecked = [[{**cand(False, 0, -10, 0), "gneg": [-9.0]}, {**cand(True, 0, -20, 0), "gneg": [-5.0]}]]
    assert rerank.summarize(unchecked, [2])[0]["shape-checked likelihood"] == 0.0  # none checked: the likeliest


def test_shape_negatives_swap_one_shape_at_a_time():
    from anygen.data.shapes import SceneObject

    pair = [SceneObject("circle", "red", "top left"), SceneObject("square", "blue", "bottom right")]
    assert rerank.shape_negatives(pair) == [
        "a red square at the top left and a blue square at the bottom right",
        "a red triangle at the top left and a blue square at the bottom right",
        "a red circle at the top left and a blue circle at the bottom right",
        "a red circle at the top left and a blue triangle at the bottom right"]
