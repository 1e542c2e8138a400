"""AnyGenConfig: JSON round trip, presets, validation naming the field, torch-free import, parameter estimate."""

import subprocess
import sys
from pathlib import Path

import pytest

from anygen.config import NUM_SPECIALS, AnyGenConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", AnyGenConfig.preset_names())
def test_presets_build_and_round_trip(name, tmp_path):
    cfg = AnyGenConfig.preset(name)
    assert AnyGenConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "config.json")
    assert AnyGenConfig.from_json(tmp_path / "config.json") == cfg
    assert cfg.num_parameters_estimate() > cfg.num_parameters_estimate(include_und=False) > 0


def test_preset_names_and_shapes():
    assert set(AnyGenConfig.preset_names()) == {"tiny", "small", "janus-pro-1b", "janus-pro-7b"}
    tiny = AnyGenConfig.preset("tiny")
    assert (tiny.n_layer, tiny.d_model, tiny.n_head, tiny.n_kv_head, tiny.head_dim) == (2, 64, 4, 2, 16)
    assert tiny.und_tokens == 16
    small = AnyGenConfig.preset("small")
    assert (small.n_layer, small.d_model, small.n_head, small.image_codebook_size) == (4, 256, 8, 4096)
    assert small.max_height >= 16 and small.max_width >= 16  # 16x16 image tokens fit
    j1 = AnyGenConfig.preset("janus-pro-1b")
    assert (j1.n_layer, j1.d_model, j1.n_head, j1.n_kv_head, j1.intermediate_size) == (24, 2048, 16, 16, 5504)
    assert (j1.text_size, j1.image_codebook_size, j1.qk_norm, j1.und_tokens) == (102400, 16384, "none", 576)
    j7 = AnyGenConfig.preset("janus-pro-7b")
    assert (j7.n_layer, j7.d_model, j7.n_head, j7.intermediate_size) == (30, 4096, 32, 11008)
    # LLaMA-style decoders of ~1.2B / ~6.1B in the blocks plus the (larger, multimodal) vocabulary tables
    assert 1.5e9 < j1.num_parameters_estimate(include_und=False) < 2.2e9
    assert 6.5e9 < j7.num_parameters_estimate(include_und=False) < 8.0e9


def test_preset_overrides_and_isolation():
    cfg = AnyGenConfig.preset("tiny", n_layer=1, qk_norm="layernorm")
    assert cfg.n_layer == 1 and cfg.qk_norm == "layernorm"
    cfg.und_encoder["hidden_size"] = 999  # must not leak into the preset table
    assert AnyGenConfig.preset("tiny").und_encoder["hidden_size"] == 32


def test_unknown_preset_and_unknown_key():
    with pytest.raises(ValueError, match="accepted: .*tiny"):
        AnyGenConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layers.*accepted: .*n_layer"):
        AnyGenConfig.from_dict({"n_layers": 2})
    with pytest.raises(FileNotFoundError):
        AnyGenConfig.from_json("/nonexistent/config.json")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_kv_head", 3),  # 4 heads not divisible by 3
        ("n_head", 3),  # d_model 64 not divisible by 3
        ("qk_norm", "l2"),
        ("head_mode", "moe"),
        ("n_layer", 0),
        ("text_size", -1),
        ("max_seq_len", 1.5),
        ("rope_theta", 0),
        ("norm_eps", "x"),
        ("z_loss_weight", -1.0),
        ("post_norm", "yes"),
        ("tie_embeddings", 1),
        ("und_image_size", 36),  # not a multiple of patch 8
        ("und_encoder", [1, 2]),
        ("und_encoder_path", 3),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AnyGenConfig.preset("tiny", **{field: value})


def test_und_consistency():
    with pytest.raises(ValueError, match="und_encoder_path"):
        AnyGenConfig.preset("tiny", und_encoder=None, und_encoder_path="/some/dir")
    with pytest.raises(ValueError, match="image_size"):
        AnyGenConfig.preset("tiny", und_image_size=64)  # und_encoder says 32
    off = AnyGenConfig.preset("tiny", und_encoder=None)
    assert off.und_tokens == 0
    assert off.num_parameters_estimate() == off.num_parameters_estimate(include_und=False)


def test_vocab_layout_matches_vocab():
    from tokenizers_mm.vocab import SPECIALS, Vocab

    assert NUM_SPECIALS == len(SPECIALS)
    for name in AnyGenConfig.preset_names():
        cfg = AnyGenConfig.preset(name)
        assert Vocab(**cfg.vocab_dict()).size == cfg.vocab_size


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": True}, {"head_mode": "shared"}, {"qk_norm": "layernorm", "n_kv_head": 4},
     {"qk_norm": "none"}, {"und_encoder": None},
     {"und_encoder": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "patch_size": 8, "vision_use_head": True}}],
)
def test_parameter_estimate_is_exact(overrides):
    from anygen.model import AnyGenModel

    cfg = AnyGenConfig.preset("tiny", **overrides)
    assert AnyGenModel(cfg).num_parameters() == cfg.num_parameters_estimate()


def test_config_import_is_torch_free():
    code = "import anygen.config, sys; assert 'torch' not in sys.modules, 'anygen.config imported torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
