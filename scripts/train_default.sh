#!/usr/bin/env bash
# Train the shipped default model from nothing, with the project's own CLI and configs/default/*.yaml:
#
#   data (shapes + digits) -> image tokenizer, leg 1 (1000 codes) -> video tokenizer
#   -> build-tokenizer + tokenize (coarse) -> unified model, leg 1
#   -> image tokenizer, leg 2 (4096 codes + edge loss, from leg 1) -> build-tokenizer + tokenize
#   -> unified model, leg 2 (from leg 1, image rows mapped to the new codes) -> export -> eval
#   -> copy into anygen/assets/default/
#
#   bash scripts/train_default.sh                  # the recipe as configured (CPU: a few hours; GPU: minutes)
#   TOY=1 bash scripts/train_default.sh            # a few steps per stage: proves the pipeline end to end
#   IMAGE_STEPS=600 VIDEO_STEPS=400 UNIFIED_STEPS=800 nice -n 19 bash scripts/train_default.sh   # a budget
#
# Each stage is skipped when its output exists ($RUNS/export/coarse/image_tokenizer.safetensors,
# $RUNS/export/*.safetensors, $DATA/tokenizer_coarse, $DATA/shards_coarse, $RUNS/model_coarse, $DATA/tokenizer,
# $DATA/shards, $RUNS/model), so a rerun carries on where it stopped; delete an output to redo its stage. Logs:
# $RUNS/logs/<stage>.log (tail -f them for progress); loss curves: runs/default/<stage>/lightning_logs/
# version_*/metrics.csv. The Lightning checkpoints always go to runs/default/<stage>/checkpoints, as the
# YAMLs say. Environment knobs (defaults in brackets):
#   DATA [data/default]  RUNS [runs/default]  NUM_SHAPES [20000]  VOCAB [512]  WORKERS [1]  EVAL_NUM [50]
#   IMAGE_STEPS / VIDEO_STEPS / UNIFIED_STEPS / IMAGE_REFINE_STEPS / UNIFIED_REFINE_STEPS [the YAMLs' max_steps]
#   IMAGE_MINUTES / VIDEO_MINUTES / UNIFIED_MINUTES / IMAGE_REFINE_MINUTES / UNIFIED_REFINE_MINUTES [none]:
#     wall-clock caps per stage (Lightning max_time)
#   SHIP [0]: 1 copies the exported model and its eval.json into anygen/assets/default/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ANYGEN="$PY -m anygen.cli"
DATA=${DATA:-data/default}
RUNS=${RUNS:-runs/default}
NUM_SHAPES=${NUM_SHAPES:-20000}
VOCAB=${VOCAB:-512}
WORKERS=${WORKERS:-1}
EVAL_NUM=${EVAL_NUM:-50}
if [[ "${TOY:-0}" == 1 ]]; then
  NUM_SHAPES=${TOY_SHAPES:-60}; IMAGE_STEPS=${IMAGE_STEPS:-4}; VIDEO_STEPS=${VIDEO_STEPS:-3}
  UNIFIED_STEPS=${UNIFIED_STEPS:-4}; IMAGE_REFINE_STEPS=${IMAGE_REFINE_STEPS:-3}
  UNIFIED_REFINE_STEPS=${UNIFIED_REFINE_STEPS:-4}; EVAL_NUM=${EVAL_NUM_TOY:-2}; LIMIT="--limit 200"
fi
steps() { [[ -n "${1:-}" ]] && echo "--trainer.max_steps $1" || true; }
# a wall-clock cap per stage (minutes), Lightning's --trainer.max_time: training stops, the last checkpoint counts
limit() { [[ -n "${1:-}" ]] && printf -- "--trainer.max_time 00:%02d:%02d:00" $(($1 / 60)) $(($1 % 60)) || true; }
mkdir -p "$RUNS/logs" "$RUNS/export"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUNS/logs/recipe.log"; }

# 1. data: the configs read $DATA/documents.jsonl (shapes + digits, paths relative to $DATA)
if [[ ! -f "$DATA/documents.jsonl" ]]; then
  log "data: shapes ($NUM_SHAPES documents) + digits -> $DATA"
  [[ -f "$DATA/shapes/meta.json" ]] || $ANYGEN data shapes --out "$DATA/shapes" --num "$NUM_SHAPES" --seed 0 \
      --image-size 64 --frames 9 --holdout 0.1 --workers "$WORKERS" --overwrite > "$RUNS/logs/data.log" 2>&1
  [[ -f "$DATA/digits/meta.json" ]] || $ANYGEN data digits --out "$DATA/digits" --seed 0 --image-size 64 \
      --overwrite >> "$RUNS/logs/data.log" 2>&1
  # one JSONL for the trainers and the tokenizer: every line of both sets, files re-rooted at $DATA, interleaved
  $PY - "$DATA" <<'EOF'
import json, random, sys
from pathlib import Path
root = Path(sys.argv[1])
lines = []
for name in ("shapes", "digits"):
    for line in (root / name / "documents.jsonl").read_text().splitlines():
        doc = json.loads(line)
        doc["segments"] = [{k: (f"{name}/{v}" if k != "text" else v) for k, v in s.items()} for s in doc["segments"]]
        lines.append(json.dumps(doc))
random.Random(0).shuffle(lines)
(root / "documents.jsonl").write_text("\n".join(lines) + "\n")
print(f"{len(lines)} documents -> {root / 'documents.jsonl'}")
EOF
fi
CFG_DATA="--data.init_args.documents $DATA/documents.jsonl"

# 2. image tokenizer, leg 1 (8x at 64 px: 8x8 tokens, 1000 codes) and 3. video tokenizer (9 frames of 32 px: 3x4x4)
mkdir -p "$RUNS/export/coarse"
if [[ ! -f "$RUNS/export/coarse/image_tokenizer.safetensors" ]]; then
  log "image tokenizer, leg 1: anygen fit --config configs/default/image_tokenizer.yaml $(steps "${IMAGE_STEPS:-}")"
  $ANYGEN fit --config configs/default/image_tokenizer.yaml $CFG_DATA $(steps "${IMAGE_STEPS:-}") \
      $(limit "${IMAGE_MINUTES:-}") > "$RUNS/logs/image_tokenizer.log" 2>&1
  $ANYGEN export runs/default/image_tokenizer/checkpoints/last.ckpt --out "$RUNS/export/coarse/"
fi
if [[ ! -f "$RUNS/export/video_tokenizer.safetensors" ]]; then
  log "video tokenizer: anygen fit --config configs/default/video_tokenizer.yaml $(steps "${VIDEO_STEPS:-}")"
  $ANYGEN fit --config configs/default/video_tokenizer.yaml $CFG_DATA $(steps "${VIDEO_STEPS:-}") \
      $(limit "${VIDEO_MINUTES:-}") > "$RUNS/logs/video_tokenizer.log" 2>&1
  $ANYGEN export runs/default/video_tokenizer/checkpoints/last.ckpt --out "$RUNS/export/"
fi

# the tokenizer directory (BPE on the documents' text + the two VQ tokenizers, 16 <|und|> per 64 px image) and
# its token shards: tokenize IMAGE_VQ TOKENIZER_DIR SHARDS_DIR
tokenize() {
  if [[ ! -f "$2/tokenizer_config.json" ]]; then
    log "build-tokenizer -> $2"
    $ANYGEN build-tokenizer --documents "$DATA/documents.jsonl" --vocab-size "$VOCAB" --image-tokenizer "$1" \
        --video-tokenizer "$RUNS/export/video_tokenizer.safetensors" --image-size 64 --video-size 32 \
        --und-tokens 16 --und-image-size 64 --max-height 32 --max-width 32 --max-frames 8 --out "$2"
  fi
  if [[ ! -f "$3/index.json" ]]; then
    log "tokenize -> $3"
    $ANYGEN tokenize --documents "$DATA/documents.jsonl" --tokenizer "$2" --out "$3" --workers "$WORKERS" \
        --video-frames 9 --max-length 384 ${LIMIT:-} --overwrite --quiet > "$RUNS/logs/tokenize_$(basename "$3").log" 2>&1
  fi
}

# a leg of the unified model, exported at its lowest validation CE: unified STAGE CONFIG TOKENIZER_DIR SHARDS OUT
# STEPS MINUTES [extra flags]. A run too short to validate (TOY=1) has only its last step.
unified() {
  local stage=$1 config=$2 tok=$3 shards=$4 out=$5 n=$6 minutes=$7
  shift 7
  if [[ ! -f "$out/model.safetensors" ]]; then
    log "unified ($stage): anygen fit --config $config $(steps "$n")"
    rm -f "runs/default/$stage/checkpoints/best.ckpt"  # a best step of an earlier run is not this run's
    $ANYGEN fit --config "$config" --model.init_args.tokenizer_dir "$tok" --data.init_args.shards "$shards" \
        "$@" $(steps "$n") $(limit "$minutes") > "$RUNS/logs/$stage.log" 2>&1
    local best="runs/default/$stage/checkpoints/best.ckpt"
    [[ -f "$best" ]] || best="runs/default/$stage/checkpoints/last.ckpt"
    $ANYGEN export "$best" --out "$out"
  fi
}

# 4. tokens of the coarse tokenizer and 5. the unified model's first leg on them
[[ -f "$RUNS/model_coarse/model.safetensors" ]] || \
    tokenize "$RUNS/export/coarse/image_tokenizer.safetensors" "$DATA/tokenizer_coarse" "$DATA/shards_coarse"
unified unified configs/default/unified.yaml "$DATA/tokenizer_coarse" "$DATA/shards_coarse" "$RUNS/model_coarse" \
    "${UNIFIED_STEPS:-}" "${UNIFIED_MINUTES:-}"

# 6. image tokenizer, leg 2: 4096 codes and the edge term, from leg 1's weights
if [[ ! -f "$RUNS/export/image_tokenizer.safetensors" ]]; then
  log "image tokenizer, leg 2: anygen fit --config configs/default/image_tokenizer_refine.yaml"
  $ANYGEN fit --config configs/default/image_tokenizer_refine.yaml $CFG_DATA \
      --model.init_args.init_from "$RUNS/export/coarse/image_tokenizer.safetensors" \
      $(steps "${IMAGE_REFINE_STEPS:-}") $(limit "${IMAGE_REFINE_MINUTES:-}") > "$RUNS/logs/image_tokenizer_refine.log" 2>&1
  $ANYGEN export runs/default/image_tokenizer_refine/checkpoints/last.ckpt --out "$RUNS/export/"
fi

# 7. tokens of the refined tokenizer and 8. the unified model's second leg, from the first
tokenize "$RUNS/export/image_tokenizer.safetensors" "$DATA/tokenizer" "$DATA/shards"
unified unified_refine configs/default/unified_refine.yaml "$DATA/tokenizer" "$DATA/shards" "$RUNS/model" \
    "${UNIFIED_REFINE_STEPS:-}" "${UNIFIED_REFINE_MINUTES:-}" --model.init_args.init_from "$RUNS/model_coarse" \
    --model.init_args.init_image_codes "$RUNS/export/coarse/image_tokenizer.safetensors"

# 9. evaluation on held-out prompts, 10. ship
log "eval -> $RUNS/eval"
$ANYGEN eval --checkpoint "$RUNS/model" --out "$RUNS/eval" --num "$EVAL_NUM" | tee "$RUNS/logs/eval.log"
if [[ "${SHIP:-0}" == 1 ]]; then
  rm -rf anygen/assets/default && mkdir -p anygen/assets/default
  cp "$RUNS/model"/{config.json,model.safetensors,tokenizer_config.json,text_tokenizer.json} anygen/assets/default/
  cp "$RUNS/model"/{image_tokenizer.safetensors,video_tokenizer.safetensors} anygen/assets/default/
  cp "$RUNS/eval/eval.json" anygen/assets/default/eval.json
  log "shipped: $(du -sh anygen/assets/default | cut -f1) in anygen/assets/default"
fi
log "done"
