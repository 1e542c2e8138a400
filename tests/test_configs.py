"""Every YAML in ``configs/`` parses against the CLI (as litgpt checks its config hub).

``anygen fit --config X --print_config`` resolves every ``class_path`` and checks every argument name
and type against the classes' signatures without building anything, so a renamed argument or a typo
in a config fails here, not at the start of a long run. On top, the module arguments that are only
checked at construction (parameter groups, tokenizer shapes) are validated without building models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from trainers.cli import run_cli
from trainers.image_tokenizer import image_tokenizer_config
from trainers.unified import resolve_groups
from trainers.video_tokenizer import video_tokenizer_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
EXPECTED = {"tokenizers/image.yaml", "tokenizers/video.yaml", "unified/tiny.yaml", "unified/stage1_adaptors.yaml",
            "unified/stage2_pretrain.yaml", "unified/stage3_sft.yaml", "default/image_tokenizer.yaml",
            "default/video_tokenizer.yaml", "default/unified.yaml"}


def _name(path: Path) -> str:
    return path.relative_to(path.parents[1]).as_posix()


def test_the_expected_configs_exist():
    assert EXPECTED <= {_name(p) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_parses_with_the_cli(path, capsys):
    raw = yaml.safe_load(path.read_text())
    data_class = raw.get("data", {}).get("class_path", "")
    module = data_class.rpartition(".")[0]
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in this checkout")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", ["--config", str(path), "--trainer.max_steps", "3", "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trainer"]["max_steps"] == 3  # command-line overrides win
    assert resolved["model"]["class_path"] == raw["model"]["class_path"]

    args = resolved["model"]["init_args"]
    kind = raw["model"]["class_path"].rpartition(".")[2]
    if kind == "UnifiedModule":
        resolve_groups(args["train"])
    elif kind == "ImageTokenizerModule":
        image_tokenizer_config(args["tokenizer"])
    elif kind == "VideoTokenizerModule":
        video_tokenizer_config(args["tokenizer"])
    else:
        pytest.fail(f"unexpected model class {raw['model']['class_path']}")


def test_a_misspelled_argument_fails_to_parse(capsys):
    path = next(p for p in CONFIGS if _name(p) == "unified/tiny.yaml")
    if importlib.util.find_spec("trainers.data") is None:
        pytest.skip("trainers.data is not in this checkout")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", ["--config", str(path), "--model.init_args.warmup_step", "3", "--print_config"])
    assert exit_info.value.code != 0
    assert "warmup_step" in capsys.readouterr().err
