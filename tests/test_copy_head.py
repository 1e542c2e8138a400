"""The copy-attention prior (trainers/copy_head.py): after init_copy_head, head 0 of a 2D-rotary block looks from
an image code to the code one column to the right in the same cell row of the earlier image."""

import pytest
import torch

from anygen.config import AnyGenConfig
from anygen.model import AnyGenModel, apply_rope, image_grid_coords
from trainers.copy_head import copy_head_direction, init_copy_head


def _model(**overrides) -> AnyGenModel:
    torch.manual_seed(0)
    options = {"rope_grid": 2, "rope_grid_layers": [1], "qk_norm": "rms", **overrides}
    return AnyGenModel(AnyGenConfig.preset("tiny", **options)).eval()


def _two_images(model: AnyGenModel, rows: int = 4, cols: int = 5, seed: int = 0) -> torch.Tensor:
    """Text, an image of random codes, text, another image of random codes: (T,)."""
    v = model.vocab
    g = torch.Generator().manual_seed(seed)

    def image() -> list[int]:
        codes = (torch.randint(0, v.image_codebook_size, (rows, cols), generator=g) + v.image_offset).tolist()
        return [v.boi, v.h_token(rows), v.w_token(cols), *[c for row in codes for c in (*row, v.eol)], v.eoi]

    return torch.tensor([v.bos, 11, 12, *image(), 13, 14, 15, *image(), v.eos])


@torch.no_grad()
def _mass_on_next_cell(model: AnyGenModel, ids: torch.Tensor, block: int, head: int) -> float:
    """Mean attention of ``head`` from the second image's codes at (r, c) onto the first image's (r, c + 1)."""
    captured = {}
    hook = model.blocks[block].attn.register_forward_hook(lambda m, args, out: captured.update(args=args))
    with torch.no_grad():
        model(ids[None])
    hook.remove()
    x, cos, sin = captured["args"][:3]
    a = model.blocks[block].attn
    t = ids.numel()
    q = a.q_norm(a.q_proj(x).view(1, t, a.n_head, a.head_dim).transpose(1, 2))
    k = a.k_norm(a.k_proj(x).view(1, t, a.n_kv_head, a.head_dim).transpose(1, 2))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin).repeat_interleave(a.n_head // a.n_kv_head, 1)
    scores = (q @ k.transpose(-1, -2))[0, head] / a.head_dim ** 0.5
    att = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    coords = image_grid_coords(ids[None], model.vocab)[0][0]
    v = model.vocab
    codes = ((ids >= v.image_offset) & (ids < v.video_offset)).nonzero().flatten().tolist()
    first, second = codes[:len(codes) // 2], codes[len(codes) // 2:]
    cell = {tuple(coords[p].tolist()): p for p in first}
    masses = [float(att[p, cell[(r, c + 1)]]) for p in second for r, c in [coords[p].tolist()] if (r, c + 1) in cell]
    return sum(masses) / len(masses)


def test_init_copy_head_points_the_head_at_the_next_cell_of_the_earlier_image():
    model = _model()
    ids = _two_images(model)
    before = _mass_on_next_cell(model, ids, 1, 0)
    u = copy_head_direction(model, [_two_images(model, seed=s) for s in (1, 2)], 1)
    torch.testing.assert_close(u.norm(), torch.tensor(1.0))
    init_copy_head(model, 1, u, head=0, scale=4.0)
    after = _mass_on_next_cell(model, ids, 1, 0)
    assert before < 0.2 and after > 0.6, (before, after)
    assert _mass_on_next_cell(model, ids, 1, 1) < 0.2  # the other heads are left as they were
    # column_offset 0 aims at the same cell instead
    init_copy_head(model, 1, u, head=0, scale=4.0, column_offset=0)
    assert _mass_on_next_cell(model, ids, 1, 0) < 0.3


def test_copy_head_is_refused_where_it_cannot_work():
    u = torch.ones(AnyGenConfig.preset("tiny").d_model)
    with pytest.raises(ValueError, match=r"block 0 has no 2D rotary pairs: set model.rope_grid > 0 and include 0"):
        init_copy_head(_model(), 0, u)
    with pytest.raises(ValueError, match=r"not one of the model's blocks 0..1"):
        init_copy_head(_model(), 5, u)
    with pytest.raises(ValueError, match="qk_norm='rms'"):
        init_copy_head(_model(qk_norm="layernorm"), 1, u)
    with pytest.raises(ValueError, match="head 9 is not one of the block's heads"):
        init_copy_head(_model(), 1, u, head=9)
    with pytest.raises(ValueError, match=r"direction must be a finite nonzero \(64,\) vector"):
        init_copy_head(_model(), 1, torch.zeros(64))
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        init_copy_head(_model(), 1, u, scale=0.0)
    model = _model()
    with pytest.raises(ValueError, match="none of the documents holds an image code"):
        copy_head_direction(model, [torch.tensor([model.vocab.bos, 11, 12])], 1)
    with pytest.raises(ValueError, match="without <\\|und\\|> positions"):
        copy_head_direction(model.train(), [torch.tensor([model.vocab.bos, model.vocab.special("und")])], 1)
    assert model.training  # the model's mode is given back, also after a refusal
