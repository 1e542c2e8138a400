"""Bad input to ``anygen convert`` / ``AnyGen.from_pretrained``: clear errors that name what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from anygen import AnyGen
from anygen.convert import FAMILIES, convert, detect_format, main
from anygen.convert.tiny import save_tiny_janus

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def janus_src(tmp_path_factory):
    return save_tiny_janus(tmp_path_factory.mktemp("janus") / "src")


def _copy(src, tmp_path, name="copy"):
    return shutil.copytree(src, tmp_path / name)


def test_detect_format(janus_src, tmp_path):
    assert detect_format(janus_src) == "janus"
    engine = AnyGen.from_pretrained(janus_src)
    engine.save_pretrained(tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "anygen"
    assert set(FAMILIES) == {"janus", "emu3", "chameleon"}


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="JanusForConditionalGeneration"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        detect_format(tmp_path / "missing")
    assert main(["--from", "janus", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                                "model_type": "llama"}))
    for call in (lambda: AnyGen.from_pretrained(tmp_path / "llama"), lambda: detect_format(tmp_path / "llama")):
        with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM.*"
                                             "JanusForConditionalGeneration.*Emu3ForConditionalGeneration.*"
                                             "ChameleonForConditionalGeneration"):
            call()
    assert main(["--from", "emu3", str(tmp_path / "llama"), "--out", str(tmp_path / "out")]) == 2
    assert "supported" in capsys.readouterr().err


def test_wrong_family_flag(janus_src, tmp_path):
    with pytest.raises(ValueError, match="--from emu3 was asked for.*JanusForConditionalGeneration"):
        convert(janus_src, tmp_path / "out", "emu3", log=None)


def test_missing_shard_is_named(janus_src, tmp_path):
    src = _copy(janus_src, tmp_path)
    state = load_file(src / "model.safetensors")
    names = sorted(state)
    (src / "model.safetensors").unlink()
    save_file({k: state[k] for k in names[: len(names) // 2]}, src / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[: len(names) // 2]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in names[len(names) // 2:]})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        AnyGen.from_pretrained(src)
    save_file({k: state[k] for k in names[len(names) // 2:]}, src / "model-00002-of-00002.safetensors")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(AnyGen.from_pretrained(src).model(ids), AnyGen.from_pretrained(janus_src).model(ids))


def test_no_safetensors(janus_src, tmp_path):
    src = _copy(janus_src, tmp_path)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors.*pickled weights are never loaded"):
        AnyGen.from_pretrained(src)


def test_missing_tensor_and_tokenizer(janus_src, tmp_path):
    src = _copy(janus_src, tmp_path)
    state = load_file(src / "model.safetensors")
    del state["model.generation_head.vision_head.weight"]
    save_file(state, src / "model.safetensors")
    with pytest.raises(ValueError, match="lacks the tensor 'model.generation_head.vision_head.weight'"):
        AnyGen.from_pretrained(src)
    src = _copy(janus_src, tmp_path, "notok")
    (src / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        AnyGen.from_pretrained(src)


def test_shape_mismatch_names_tensor_and_shapes(janus_src, tmp_path):
    src = _copy(janus_src, tmp_path)
    state = load_file(src / "model.safetensors")
    name = "model.language_model.layers.1.self_attn.o_proj.weight"
    state[name] = torch.zeros(32, 16)
    save_file(state, src / "model.safetensors")
    with pytest.raises(ValueError, match=f"shape mismatch: {name} has shape \\(32, 16\\).*needs \\(32, 32\\)"):
        AnyGen.from_pretrained(src)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention / MLP biases"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "RoPE type 'llama3'"),
    ({"hidden_act": "gelu"}, "SwiGLU"),
])
def test_unsupported_decoder_variants(janus_src, tmp_path, change, message):
    src = _copy(janus_src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["text_config"].update(change)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"unsupported Janus \\(LLaMA\\) decoder: .*{message}"):
        AnyGen.from_pretrained(src)
