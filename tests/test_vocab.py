"""The joint id space: disjoint ranges that cover it, size tokens, modality tags."""

import pytest
import torch

from tokenizers_mm.vocab import SPECIALS, Modality, Vocab


@pytest.mark.parametrize("sizes", [(300, 64, 64, 16, 16, 8), (102400, 16384, 32768, 64, 64, 32), (256, 1, 1, 1, 1, 1)])
def test_ranges_disjoint_and_cover(sizes):
    v = Vocab(*sizes)
    ranges = [
        (0, v.special_offset),
        (v.special_offset, v.h_offset),
        (v.h_offset, v.w_offset),
        (v.w_offset, v.t_offset),
        (v.t_offset, v.image_offset),
        (v.image_offset, v.video_offset),
        (v.video_offset, v.size),
    ]
    # contiguous, non-empty, in order: together they cover [0, size) exactly once
    assert ranges[0][0] == 0 and ranges[-1][1] == v.size
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end == start
    assert all(end > start for start, end in ranges)
    assert v.h_offset - v.special_offset == len(SPECIALS)
    assert v.video_offset - v.image_offset == v.image_codebook_size
    assert v.size - v.video_offset == v.video_codebook_size


def test_every_id_has_one_name():
    v = Vocab(300, 64, 64, 16, 16, 8)
    names = [v.name_of(i) for i in range(v.size)]
    assert len(set(names[v.special_offset:])) == v.size - v.special_offset
    assert names[v.boi] == "<|boi|>" and names[v.image_offset] == "img:0" and names[v.size - 1] == "vid:63"


def test_size_tokens_round_trip():
    v = Vocab(300, 64, 64, 16, 12, 8)
    for k in range(1, 17):
        assert v.size_value(v.h_token(k), "h") == k
    for k in range(1, 13):
        assert v.size_value(v.w_token(k), "w") == k
    for k in range(1, 9):
        assert v.size_value(v.t_token(k), "t") == k
    with pytest.raises(ValueError, match="accepted: 1..12"):
        v.w_token(13)
    with pytest.raises(ValueError, match="is not a <\\|h:k\\|> size token"):
        v.size_value(v.w_token(1), "h")


def test_modality_tags():
    v = Vocab(300, 64, 64, 16, 16, 8)
    ids = torch.tensor([0, v.boi, v.image_offset, v.video_offset - 1, v.video_offset, v.size - 1, v.und, v.eol])
    expected = [Modality.TEXT, Modality.TEXT, Modality.IMAGE, Modality.IMAGE, Modality.VIDEO, Modality.VIDEO,
                Modality.UND, Modality.TEXT]
    assert v.modality(ids).tolist() == [int(m) for m in expected]


def test_round_trip_and_errors():
    v = Vocab(300, 64, 64, 16, 16, 8)
    assert Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match="unknown Vocab fields"):
        Vocab.from_dict({**v.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="Vocab.image_codebook_size must be a positive int"):
        Vocab(300, 0, 64)
    with pytest.raises(ValueError, match="unknown special token"):
        v.special("<|nope|>")
    with pytest.raises(ValueError, match=f"unknown token id {v.size}"):
        v.check_ids(torch.tensor([1, v.size]))
    with pytest.raises(ValueError, match="unknown token id -1"):
        v.check_ids(torch.tensor([-1]))
