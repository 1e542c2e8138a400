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
            "default/video_tokenizer.yaml", "default/unified.yaml", "default/image_tokenizer_4x.yaml",
            "default/unified_16x16.yaml", "default/unified_16x16_mix.yaml",
            "default/unified_16x16_warm.yaml", "default/unified_16x16_more.yaml",
            "default/unified_16x16_digits.yaml", "default/unified_16x16_grid.yaml"}


def _name(path: Path) -> str:
    return path.relative_to(path.parents[1]).as_posix()


def test_the_expected_configs_exist():
    assert EXPECTED <= {_name(p) for p in CONFIGS}



@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_step_checkpoints_keep_the_step_training_ended_on(path):
    """A config's ``save_last`` checkpoint is ``LastStepCheckpoint``: Lightning's ``ModelCheckpoint`` leaves the last
    multiple of ``every_n_train_steps`` as ``last.ckpt`` (test_trainers pins the difference)."""
    callbacks = yaml.safe_load(path.read_text()).get("trainer", {}).get("callbacks", [])
    last = [c["class_path"] for c in callbacks if c.get("init_args", {}).get("save_last")]
    assert last and set(last) == {"trainers.callbacks.LastStepCheckpoint"}, last

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


# -- scripts/train_default.sh and the configs it names -------------------------------------------------------------
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh"


def _recording_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], Path]:
    """An environment whose ``PY`` is a stand-in interpreter writing each call's arguments to the returned file
    (so the recipe runs every stage in seconds, training nothing), with ``RUNS`` and ``DATA`` under tmp_path."""
    import os

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"), **extra}
    return env, calls


def _recipe(env: dict[str, str]):
    """Run the recipe script under ``env``; the finished ``subprocess.CompletedProcess``. It runs as a copy in
    ``<RUNS>/../repo/scripts``: the script works from its repository's root, and its Lightning paths there
    (``runs/default/<stage>/checkpoints``, whose ``best.ckpt`` it deletes before a stage) would be the user's."""
    import shutil
    import subprocess

    scripts = Path(env["RUNS"]).parent / "repo" / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    script = shutil.copy(SCRIPT, scripts / SCRIPT.name)
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def _calls(calls: Path, command: str) -> list[str]:
    """The recorded calls of one anygen subcommand (``fit``, ``eval``, ``data digits``)."""
    return [line for line in calls.read_text().splitlines() if f" {command} " in f" {line} "]


def _stages(grid: str) -> dict[str, str]:
    """``{"IMAGE_STAGE": ..., "UNIFIED_STAGE": ..., "MAX_LENGTH": ...}`` of the script's ``GRID`` case; grid
    ``16-none`` is GRID=16 with ``INIT_FROM=none`` (from scratch, two stages)."""
    import re

    lines = SCRIPT.read_text().splitlines()
    stages = dict(re.findall(r"(\w+)=(\w+)", next(s for s in lines if s.strip().startswith(f"{grid[:2]})"))))
    if grid == "16-none":
        after = lines[next(i for i, s in enumerate(lines) if '"$INIT_FROM" == none' in s) + 1]
        stages.update(re.findall(r"(\w+)=(\w+)", after))
    return stages


@pytest.mark.parametrize("grid", ["8", "16", "16-none"])
def test_the_recipe_script_names_configs_whose_checkpoints_it_exports(grid):
    """The script exports ``runs/default/<stage>/checkpoints/*.ckpt``: each YAML it trains must write there, and
    its rows must hold the longest document the script lets ``anygen tokenize`` keep."""
    stages = _stages(grid)
    assert ("MIX_STAGE" in stages) == (grid == "16-none")  # only from scratch does 16x16 take two stages
    if grid == "16":  # warm-started from the shipped 8x8 model, its image rows afresh
        warm = SCRIPT.parents[1] / "configs" / "default" / f"{stages['UNIFIED_STAGE']}.yaml"
        raw = yaml.safe_load(warm.read_text())
        args = raw["model"]["init_args"]
        assert args["init_from"] == "runs/default/model"  # what GRID=8 of the script exports (the shipped one: 16x16)
        assert set(args["reinit"]) == {"embed.image", "head.image", "grid_embed"}
        assert raw["data"]["init_args"]["weights"]
        assert raw["model"]["init_args"]["model"]["image_grid_embed"] is True  # its tables are in reinit: new
    for key in [k for k in ("IMAGE_STAGE", "UNIFIED_STAGE", "MIX_STAGE") if k in stages]:
        raw = yaml.safe_load((SCRIPT.parents[1] / "configs" / "default" / f"{stages[key]}.yaml").read_text())
        dirs = {c["init_args"]["dirpath"] for c in raw["trainer"]["callbacks"] if "dirpath" in c.get("init_args", {})}
        assert dirs == {f"runs/default/{stages[key]}/checkpoints"}, (grid, key, dirs)
        if key == "MIX_STAGE":  # stage 2 starts where the script finds stage 1's kept step
            stage1 = f"runs/default/{stages['UNIFIED_STAGE']}/checkpoints/best.ckpt"
            assert raw["model"]["init_args"]["init_from"] == stage1
            assert raw["data"]["init_args"]["weights"]
        if key != "IMAGE_STAGE":
            seq_len = raw["data"]["init_args"]["seq_len"]
            assert seq_len >= int(stages["MAX_LENGTH"]) and raw["model"]["init_args"]["model"]["max_seq_len"] >= seq_len


def test_the_recipe_script_refuses_an_unknown_grid(tmp_path):
    import os

    env = {**os.environ, "GRID": "12", "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data")}
    done = _recipe(env)
    assert done.returncode == 2 and "GRID must be 8 or 16, got '12'" in done.stderr
    done = _recipe({**env, "GRID": "8", "INIT_FROM": "x"})
    assert done.returncode == 2 and "INIT_FROM=x applies to GRID=16 only" in done.stderr  # never ignored silently
    env = {**env, "GRID": "16", "INIT_FROM": str(tmp_path / "no_model")}
    done = _recipe(env)
    assert done.returncode == 2 and "is not a model directory" in done.stderr and "INIT_FROM=none" in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    # a video tokenizer already exported that is not the warm start's: its video rows would mean other codes
    export = tmp_path / "runs" / "export"
    export.mkdir(parents=True)
    (export / "image_tokenizer.safetensors").write_bytes(b"")
    (export / "video_tokenizer.safetensors").write_bytes(b"another one")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "documents.jsonl").write_text("{}\n")
    shipped = str(SCRIPT.parents[1] / "anygen" / "assets" / "default")
    env = {**env, "INIT_FROM": shipped}
    done = _recipe(env)
    assert done.returncode == 2 and f"is not {shipped}'s video tokenizer" in done.stderr


def test_the_recipe_script_passes_precision_to_every_fit(tmp_path):
    """``PRECISION=bf16-mixed`` reaches each ``anygen fit`` of the recipe (a stand-in interpreter records the calls)."""
    env, calls = _recording_env(tmp_path, PRECISION="bf16-mixed")
    done = _recipe(env)
    assert done.returncode == 0, done.stderr
    fits = _calls(calls, "fit")
    assert len(fits) == 3  # image tokenizer, video tokenizer, unified model (GRID=8)
    assert all("--trainer.precision bf16-mixed" in line for line in fits), fits
    env.pop("PRECISION")
    calls.unlink()
    assert _recipe(env).returncode == 0
    assert not any("precision" in line for line in calls.read_text().splitlines())  # the YAMLs' own otherwise


def test_the_recipe_passes_num_digits_to_the_digits_data_only(tmp_path):
    """``NUM_DIGITS=N`` asks ``anygen data digits`` for N documents (augmented copies); unset, its own default."""
    env, calls = _recording_env(tmp_path, NUM_DIGITS="28760")
    assert _recipe(env).returncode == 0
    data = _calls(calls, "data")
    digits = _calls(calls, "data digits")
    assert len(digits) == 1 and "--num 28760" in digits[0], data
    assert all("28760" not in line for line in data if line not in digits)  # not the shapes' --num
    env.pop("NUM_DIGITS")
    calls.unlink()
    assert _recipe(env).returncode == 0
    digits = _calls(calls, "data digits")
    assert len(digits) == 1 and "--num" not in digits[0], digits


def _model_dir(tmp_path: Path, *names: str) -> Path:
    """A stand-in model directory holding ``names`` (each file's bytes: its own name)."""
    model = tmp_path / "grid16_model"
    model.mkdir()
    for name in names:
        (model / name).write_bytes(name.encode())
    return model


def test_the_recipe_continues_a_16x16_model_with_every_tensor_and_both_tokenizers_kept(tmp_path):
    """``GRID=16 CONTINUE=1 INIT_FROM=<16x16 model>``: its image and video tokenizers are copied (not trained), one
    fit of ``unified_16x16_more.yaml`` from it, nothing reinitialised; refused without GRID=16 or such a model."""
    more = yaml.safe_load((SCRIPT.parents[1] / "configs" / "default" / "unified_16x16_more.yaml").read_text())
    args = more["model"]["init_args"]
    assert "reinit" not in args and args["init_from"] == "runs/grid16/model"
    assert args["model"]["image_grid_embed"] is True and more["data"]["init_args"]["weights"]
    dirs = {c["init_args"]["dirpath"] for c in more["trainer"]["callbacks"] if "dirpath" in c.get("init_args", {})}
    assert dirs == {"runs/default/unified_16x16_more/checkpoints"}

    model = _model_dir(tmp_path, "model.safetensors", "video_tokenizer.safetensors", "text_tokenizer.json")
    env, calls = _recording_env(tmp_path, GRID="16", CONTINUE="1", INIT_FROM=str(model))
    for bad, needle in (({"GRID": "8"}, "needs GRID=16"), ({"INIT_FROM": "none"}, "needs GRID=16"),
                        ({}, "has no image_tokenizer.safetensors")):
        done = _recipe({**env, **bad})
        assert done.returncode == 2 and needle in done.stderr, (bad, done.stderr)
    (model / "image_tokenizer.safetensors").write_bytes(b"the 4x one")
    export = tmp_path / "runs" / "export"
    export.mkdir(parents=True)
    (export / "image_tokenizer.safetensors").write_bytes(b"another image tokenizer")  # its codes are not the model's
    done = _recipe(env)
    assert done.returncode == 2 and f"is not {model}'s image tokenizer" in done.stderr, done.stderr
    (export / "image_tokenizer.safetensors").unlink()
    # a best or last step left by an earlier run is not this run's: deleted, in the recipe's own tree (_recipe's
    # copy), so the export takes this run's last.ckpt (an earlier last.ckpt left makes Lightning write last-v1.ckpt);
    # the repository's runs/default is never the one touched by the tests
    checkpoints = tmp_path / "repo" / "runs" / "default" / "unified_16x16_more" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = [checkpoints / name for name in ("best.ckpt", "last.ckpt", "last-v1.ckpt")]
    kept = checkpoints / "epoch=0-step=100.ckpt"  # not one kept() reads: left alone
    for path in [*stale, kept]:
        path.write_bytes(b"an earlier run's")
    done = _recipe(env)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in stale if p.exists()] == [] and kept.exists()
    assert "runs/default/unified_16x16_more/checkpoints/last.ckpt" in " ".join(_calls(calls, "export"))
    assert (export / "image_tokenizer.safetensors").read_bytes() == b"the 4x one"
    assert (export / "video_tokenizer.safetensors").read_bytes() == b"video_tokenizer.safetensors"
    fits = _calls(calls, "fit")
    assert len(fits) == 1 and "configs/default/unified_16x16_more.yaml" in fits[0], fits
    assert f"--model.init_args.init_from {model}" in fits[0]


def _continue_stage(tmp_path: Path, refusal: str, **knobs: str) -> tuple[Path, dict, Path]:
    """The recipe with ``knobs`` on a stand-in 16x16 model: refused (``refusal``) without ``CONTINUE=1``, then run
    with it. Returns the model directory, the environment (``CONTINUE=1`` included) and the recorded calls."""
    model = _model_dir(tmp_path, "model.safetensors", "video_tokenizer.safetensors", "text_tokenizer.json",
                       "image_tokenizer.safetensors")
    env, calls = _recording_env(tmp_path, GRID="16", INIT_FROM=str(model), **knobs)
    done = _recipe(env)
    assert done.returncode == 2 and refusal in done.stderr, done.stderr
    env = {**env, "CONTINUE": "1"}
    done = _recipe(env)
    assert done.returncode == 0, done.stderr
    return model, env, calls


def test_the_recipe_rope_grid_stage_is_the_continue_stage_with_2d_rotary_pairs(tmp_path):
    """``ROPE_GRID=1`` (with ``CONTINUE=1``): the one fit is ``unified_16x16_grid.yaml``, which is
    ``unified_16x16_more.yaml`` but for ``rope_grid`` and its run directory; refused without ``CONTINUE=1``."""
    folder = SCRIPT.parents[1] / "configs" / "default"
    grid = yaml.safe_load((folder / "unified_16x16_grid.yaml").read_text())
    more = yaml.safe_load((folder / "unified_16x16_more.yaml").read_text())
    assert grid["model"]["init_args"]["model"].pop("rope_grid") == 2
    assert grid["model"] == more["model"] and grid["data"] == more["data"]
    assert yaml.safe_dump(grid["trainer"]).replace("unified_16x16_grid", "unified_16x16_more") \
        == yaml.safe_dump(more["trainer"])

    model, _, calls = _continue_stage(tmp_path, "ROPE_GRID=1 is a CONTINUE=1 stage", ROPE_GRID="1")
    fits = _calls(calls, "fit")
    assert len(fits) == 1 and "configs/default/unified_16x16_grid.yaml" in fits[0], fits
    assert f"--model.init_args.init_from {model}" in fits[0]


def test_the_recipe_runs_the_digits_tail_after_a_continue_stage_and_evaluates_it(tmp_path):
    """``DIGITS_TAIL=1`` (with ``CONTINUE=1``): a second fit, ``unified_16x16_digits.yaml`` from ``$RUNS/model``
    on the same shards, exported to ``$RUNS/model_tail``, which eval then reads; refused without ``CONTINUE=1``."""
    tail = yaml.safe_load((SCRIPT.parents[1] / "configs" / "default" / "unified_16x16_digits.yaml").read_text())
    args = tail["model"]["init_args"]
    assert "reinit" not in args and args["init_from"] == "runs/grid16d/model"
    assert tail["data"]["init_args"]["weights"]["digits/t2i"] > 1  # digits-heavy: the point of the stage
    dirs = {c["init_args"]["dirpath"] for c in tail["trainer"]["callbacks"] if "dirpath" in c.get("init_args", {})}
    assert dirs == {"runs/default/unified_16x16_digits/checkpoints"}

    _, env, calls = _continue_stage(tmp_path, "DIGITS_TAIL=1 follows a CONTINUE=1 stage", DIGITS_TAIL="1",
                                    TAIL_STEPS="7")
    runs, data = tmp_path / "runs", tmp_path / "data"
    fits = _calls(calls, "fit")
    assert len(fits) == 2 and "unified_16x16_more.yaml" in fits[0], fits
    assert "configs/default/unified_16x16_digits.yaml" in fits[1] and "--trainer.max_steps 7" in fits[1]
    assert f"--model.init_args.init_from {runs}/model " in fits[1] + " "
    assert f"--data.init_args.shards {data}/shards" in fits[1]
    assert "--data.init_args.weights" not in fits[1]  # the YAML's own digits-heavy weights
    evals = _calls(calls, "eval")
    assert len(evals) == 1 and f"--checkpoint {runs}/model_tail " in evals[0], evals
    calls.unlink()
    done = _recipe({**env, "CONTINUE": "1", "TAIL_WEIGHTS": '{"*": 1.5}'})
    assert done.returncode == 0, done.stderr
    fits = _calls(calls, "fit")
    assert "unified_16x16_digits.yaml" in fits[-1] and '--data.init_args.weights {"*": 1.5}' in fits[-1], fits


def test_fit_args_reach_the_unified_fits_and_not_the_tokenizers(tmp_path):
    """``FIT_ARGS`` (e.g. another data seed for a further stage) is appended to every unified fit: the GRID=8
    model's, a CONTINUE=1 stage's and its digits tail's, and to neither tokenizer's fit."""
    env, calls = _recording_env(tmp_path, FIT_ARGS="--data.init_args.seed 1")
    assert _recipe(env).returncode == 0
    fits = _calls(calls, "fit")
    assert len(fits) == 3 and "configs/default/unified.yaml" in fits[2], fits
    assert fits[2].endswith("--data.init_args.seed 1")
    assert not any("--data.init_args.seed" in line for line in fits[:2])  # image and video tokenizers

    model = _model_dir(tmp_path, "model.safetensors", "video_tokenizer.safetensors", "text_tokenizer.json",
                       "image_tokenizer.safetensors")
    (tmp_path / "continue").mkdir()
    env, calls = _recording_env(tmp_path / "continue", GRID="16", CONTINUE="1", DIGITS_TAIL="1", INIT_FROM=str(model),
                                FIT_ARGS="--data.init_args.seed 1")
    assert _recipe(env).returncode == 0
    fits = _calls(calls, "fit")
    assert len(fits) == 2 and all(line.endswith("--data.init_args.seed 1") for line in fits), fits


def test_the_recipe_data_only_clip_format_and_eval_args(tmp_path):
    """``CLIP_FORMAT`` reaches ``anygen data shapes`` (mp4 unless set), ``DATA_ONLY=1`` stops before any fit and
    ``EVAL_ARGS`` reaches the evaluation."""
    env, calls = _recording_env(tmp_path, CLIP_FORMAT="apng", DATA_ONLY="1")
    done = _recipe(env)
    assert done.returncode == 0, done.stderr
    shapes = _calls(calls, "shapes")
    assert len(shapes) == 1 and "--clip-format apng" in shapes[0], shapes
    fits = _calls(calls, "fit")  # GRID=8 trains its tokenizers to build the tokenizer directory, then stops
    assert _calls(calls, "tokenize") and len(fits) == 2 and not any("unified" in f for f in fits), fits
    assert not _calls(calls, "eval")
    calls.unlink()
    env = {k: v for k, v in env.items() if k not in ("CLIP_FORMAT", "DATA_ONLY")}
    done = _recipe({**env, "EVAL_ARGS": "--no-images --seed 3"})
    assert done.returncode == 0, done.stderr
    assert "--clip-format mp4" in _calls(calls, "shapes")[0]
    evals = _calls(calls, "eval")
    assert len(evals) == 1 and evals[0].endswith("--no-images --seed 3"), evals


def _device_stage(tmp_path: Path, **knobs: str):
    """Run ``scripts/device_stage.sh run`` (a copy, beside a copy of the recipe) with a stand-in interpreter that
    records its calls and writes the files by which the recipe skips a finished stage and what ``anygen export``
    and ``anygen eval`` would; ``(process, calls, out)``."""
    import os
    import shutil
    import subprocess

    model = _model_dir(tmp_path, "model.safetensors", "video_tokenizer.safetensors", "text_tokenizer.json",
                       "image_tokenizer.safetensors")
    scripts = tmp_path / "repo" / "scripts"
    scripts.mkdir(parents=True)
    shutil.copy(SCRIPT, scripts / SCRIPT.name)
    shutil.copy(SCRIPT.parent / "device_stage.sh", scripts / "device_stage.sh")
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
args=("$@")
for i in "${{!args[@]}}"; do
  if [[ "${{args[$i]}}" == --out ]]; then dir="${{args[$((i + 1))]}}"; fi
done
if [[ "${{1:-}}" == *train_step.py ]]; then  # bench/train_step.py's table: 100 ms a bf16 step of 48 x 896
  echo "| 48 x 896 | 200 | 100 | 215040 | 430080 | 2.00x |"
elif [[ "${{1:-}}" == - && -n "${{2:-}}" ]]; then  # the recipe's merge of the two data sets
  mkdir -p "$2" && echo '{{}}' > "$2/documents.jsonl"
elif [[ " $* " == *" build-tokenizer "* ]]; then
  mkdir -p "$dir" && echo '{{}}' > "$dir/tokenizer_config.json"
elif [[ " $* " == *" tokenize "* ]]; then
  mkdir -p "$dir" && echo '{{}}' > "$dir/index.json"
elif [[ " $* " == *" export "* ]]; then
  mkdir -p "$dir" && head -c 40000 /dev/urandom > "$dir/model.safetensors" && echo '{{}}' > "$dir/config.json"
elif [[ " $* " == *" eval "* ]]; then
  mkdir -p "$dir" && echo '{{}}' > "$dir/eval.json"
fi
""")
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "OUT": str(out), "INIT_FROM": str(model), **knobs}
    done = subprocess.run(["bash", str(scripts / "device_stage.sh"), "run"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    return done, calls, out


def test_the_device_stage_makes_apng_data_then_fits_for_what_is_left_of_its_budget(tmp_path):
    done, calls, out = _device_stage(tmp_path, BUDGET_S="390", EXPORT_S="100", BATCH="48")
    assert done.returncode == 0, done.stderr
    shapes, fits = _calls(calls, "shapes"), _calls(calls, "fit")
    assert len(shapes) == 1 and "--clip-format apng" in shapes[0], shapes  # once: the fit's call skips the data
    assert len(_calls(calls, "tokenize")) == 1 and len(_calls(calls, "build-tokenizer")) == 1
    assert len(fits) == 1 and "unified_16x16_more.yaml" in fits[0], fits
    assert "--trainer.max_time 00:00:04:00" in fits[0]  # (390 - 100 - the seconds so far) // 60
    bench = _calls(calls, "--device cuda")
    assert len(bench) == 1 and "--rows 48 --lengths 896" in bench[0], bench
    # the steps 4 minutes hold at 1.5x the measured 100 ms, validated four times
    assert "--trainer.max_steps 1600 " in fits[0] and "--trainer.val_check_interval 400 " in fits[0], fits[0]
    assert "--data.init_args.batch_size 48" in fits[0] and "--trainer.precision bf16-mixed" in fits[0]
    assert f"--model.init_args.init_from {tmp_path / 'grid16_model'}" in fits[0]
    exported = tmp_path / "repo" / "runs" / "device" / "model" / "model.safetensors"
    parts = sorted(out.glob("model.safetensors.part-*"))
    assert parts and b"".join(p.read_bytes() for p in parts) == exported.read_bytes()
    returned = {p.name for p in out.iterdir()}
    assert {"config.json", "eval.json", "eval_reranked.json", "logs.tar.gz"} <= returned
    assert len(returned) <= 8  # what the device tool brings back
    evals = _calls(calls, "eval")
    assert len(evals) == 2 and all("--no-images" in line for line in evals)  # the device has no PyAV to write mp4s
    assert "--categories caption --best-of 16" in evals[1], evals


def test_the_device_stage_refuses_a_budget_with_no_minute_for_the_fit(tmp_path):
    done, calls, out = _device_stage(tmp_path, BUDGET_S="150", EXPORT_S="100")
    assert done.returncode == 3 and "no minute left for the fit (BUDGET_S=150)" in done.stdout + done.stderr
    assert _calls(calls, "tokenize") and not _calls(calls, "fit")


def test_the_device_stage_validates_a_short_fit_at_least_every_step(tmp_path):
    done, calls, _ = _device_stage(tmp_path, BUDGET_S="390", EXPORT_S="100", STEPS="3")
    assert done.returncode == 0, done.stderr
    fits = _calls(calls, "fit")
    assert "--trainer.max_steps 3 " in fits[0] and "--trainer.val_check_interval 1 " in fits[0], fits  # not 3 // 4
