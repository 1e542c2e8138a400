"""``bench/rerank.py``'s table arithmetic: one draw, the oracle and each reranker over the first k candidates."""

import importlib.util
from pathlib import Path

import pytest

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
