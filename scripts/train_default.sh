#!/usr/bin/env bash
# Train the shipped default model from nothing, with the project's own CLI and configs/default/*.yaml:
#
#   data (shapes + digits) -> image tokenizer -> video tokenizer -> build-tokenizer (BPE + the two VQ)
#   -> tokenize -> unified model -> export -> eval -> copy into anygen/assets/default/
#
#   bash scripts/train_default.sh                  # the recipe as configured (CPU: a few hours; GPU: minutes)
#   TOY=1 bash scripts/train_default.sh            # a few steps per stage: proves the pipeline end to end
#   IMAGE_STEPS=600 VIDEO_STEPS=400 UNIFIED_STEPS=800 nice -n 19 bash scripts/train_default.sh   # a budget
#   bash scripts/train_default.sh && GRID=16 PRECISION=bf16-mixed DATA=data/grid16 RUNS=runs/grid16 \
#       bash scripts/train_default.sh                # a 16x16 model (image tokens per side), from that 8x8 model
#   ... && GRID=16 CONTINUE=1 INIT_FROM=runs/grid16/model NUM_SHAPES=60000 PRECISION=bf16-mixed DATA=data/grid16x \
#       RUNS=runs/grid16x bash scripts/train_default.sh   # one more stage of it on 3x the documents
#
# Each stage is skipped when its output exists ($RUNS/export/*.safetensors, $DATA/tokenizer, $DATA/shards,
# $RUNS/model), so a rerun carries on where it stopped; delete an output to redo its stage. Logs:
# $RUNS/logs/<stage>.log (tail -f them for progress); loss curves: runs/default/<stage>/lightning_logs/
# version_*/metrics.csv. The Lightning checkpoints always go to runs/default/<stage>/checkpoints, as the
# YAMLs say (<stage>: image_tokenizer or image_tokenizer_4x, video_tokenizer, unified or unified_16x16
# and unified_16x16_mix).
# Environment knobs (defaults in brackets):
#   DATA [data/default]  RUNS [runs/default]  NUM_SHAPES [20000]  VOCAB [512]  WORKERS [1]  EVAL_NUM [50]
#   NUM_DIGITS [2876: each of the 1438 training images once per kind]: digits training documents; more are
#     augmented copies (a small random affine), distinct token sequences where a mixture weight repeats the same ones
#   IMAGE_STEPS / VIDEO_STEPS / UNIFIED_STEPS / MIX_STEPS [the YAMLs' max_steps]
#   IMAGE_MINUTES / VIDEO_MINUTES / UNIFIED_MINUTES / MIX_MINUTES [none]: wall-clock caps per stage (max_time)
#   FIT_ARGS [none]: more `anygen fit` arguments for every unified stage (the tokenizers' fits excluded), e.g.
#     "--data.init_args.seed 1": another split and shuffle of the same documents, so a further CONTINUE=1 stage from
#     a model this recipe made does not replay the batches its own stage drew
#   PRECISION [the YAMLs': 32-true]: Lightning's --trainer.precision for every fit, e.g. bf16-mixed (GPUs; CPUs with
#     AMX or AVX512-BF16 run it ~1.5x faster too; a CPU without them emulates it, ~18x slower, and anygen fit warns:
#     bench/train_step.py)
#   SHIP [0]: 1 copies the exported model and its eval.json into anygen/assets/default/
#   GRID [8]: image tokens per side of a 64 px image. 8: configs/default/image_tokenizer.yaml, unified.yaml; 16
#     trains the 4x image tokenizer (image_tokenizer_4x.yaml: shapes survive its round trip) and a model with rows
#     of 896 tokens, warm-started from the 8x8 model INIT_FROM (unified_16x16_warm.yaml; docs/default_model.md)
#   CONTINUE [0]: 1 (with GRID=16) trains one more stage from INIT_FROM, a 16x16 model this script made
#     (runs/grid16/model), every tensor and both tokenizers kept: unified_16x16_more.yaml, usually on more
#     documents (NUM_SHAPES=60000: the first 20000 are the same, and so are the held-out combinations)
#   ROPE_GRID [0]: 1 (with CONTINUE=1) trains unified_16x16_grid.yaml in place of unified_16x16_more.yaml: the same
#     stage with 2D rotary pairs for image codes (AnyGenConfig.rope_grid; docs/default_model.md)
#   DIGITS_TAIL [0]: 1 (with CONTINUE=1) then trains a short digits-heavy tail from $RUNS/model
#     (unified_16x16_digits.yaml, TAIL_STEPS [its max_steps], TAIL_WEIGHTS [its weights]) into $RUNS/model_tail,
#     which eval and SHIP then use:
#     how session 13's shipped model was made (docs/default_model.md)
#   CLIP_FORMAT [mp4]: how `anygen data shapes` stores clips; apng needs no PyAV (scripts/device_stage.sh)
#   DATA_ONLY [0]: 1 stops after the data, the tokenizer directory and the shards (scripts/device_stage.sh times
#     the fit with what is left of its budget)
#   EVAL_ARGS [none]: more `anygen eval` arguments, e.g. "--no-images --categories t2i_single,caption"
#   PY [.venv/bin/python]: the Python that runs anygen (python3 where anygen's needs are on PYTHONPATH)
#   INIT_FROM [runs/default/model]: GRID=16's 8x8 model (its BPE table, video tokenizer and weights but the
#     image rows are kept; GRID=8 of this script makes it there); none: from scratch in two stages instead
#     (unified_16x16.yaml, then unified_16x16_mix.yaml with mixture weights), ~2x the steps. GRID=8 refuses it
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
case "${GRID:-8}" in
  8) IMAGE_STAGE=image_tokenizer; UNIFIED_STAGE=unified; MIX_STAGE=; MAX_LENGTH=384 ;;
  16) IMAGE_STAGE=image_tokenizer_4x; UNIFIED_STAGE=unified_16x16_warm; MIX_STAGE=; MAX_LENGTH=896 ;;
  *) echo "GRID must be 8 or 16, got '${GRID}'" >&2; exit 2 ;;
esac
WARM=
if [[ "${CONTINUE:-0}" == 1 && ( "${GRID:-8}" != 16 || "${INIT_FROM:-}" == none || -z "${INIT_FROM:-}" ) ]]; then
  echo "CONTINUE=1 trains one more stage of a 16x16 model: it needs GRID=16 and INIT_FROM=<that model's directory>" \
       "(runs/grid16/model), got GRID=${GRID:-8} INIT_FROM=${INIT_FROM:-<unset>}" >&2
  exit 2
fi
if [[ "${ROPE_GRID:-0}" == 1 && "${CONTINUE:-0}" != 1 ]]; then
  echo "ROPE_GRID=1 is a CONTINUE=1 stage (GRID=16 CONTINUE=1 INIT_FROM=<16x16 model>), got CONTINUE=${CONTINUE:-0}" >&2
  exit 2
fi
if [[ "${DIGITS_TAIL:-0}" == 1 && "${CONTINUE:-0}" != 1 ]]; then
  echo "DIGITS_TAIL=1 follows a CONTINUE=1 stage (GRID=16 CONTINUE=1 INIT_FROM=<16x16 model>), got CONTINUE=${CONTINUE:-0}" >&2
  exit 2
fi
if [[ "${GRID:-8}" == 8 && -n "${INIT_FROM:-}" ]]; then
  echo "INIT_FROM=$INIT_FROM applies to GRID=16 only (the 8x8 model trains from nothing); unset it or add GRID=16" >&2
  exit 2
fi
if [[ "${GRID:-8}" == 16 ]]; then
  INIT_FROM=${INIT_FROM:-runs/default/model}
  if [[ "$INIT_FROM" == none ]]; then
    UNIFIED_STAGE=unified_16x16; MIX_STAGE=unified_16x16_mix
  elif [[ -f "$INIT_FROM/model.safetensors" && -f "$INIT_FROM/video_tokenizer.safetensors" \
          && -f "$INIT_FROM/text_tokenizer.json" ]]; then
    WARM=$INIT_FROM
    if [[ "${CONTINUE:-0}" == 1 ]]; then  # INIT_FROM is a 16x16 model of this recipe: one more stage, all kept
      UNIFIED_STAGE=unified_16x16_more
      if [[ "${ROPE_GRID:-0}" == 1 ]]; then UNIFIED_STAGE=unified_16x16_grid; fi
      [[ -f "$INIT_FROM/image_tokenizer.safetensors" ]] || { echo "CONTINUE=1: INIT_FROM=$INIT_FROM has no" \
          "image_tokenizer.safetensors (a 16x16 model of this recipe has: runs/grid16/model)" >&2; exit 2; }
    fi
  else
    echo "INIT_FROM=$INIT_FROM is not a model directory (model.safetensors, video_tokenizer.safetensors," \
         "text_tokenizer.json); give one (anygen export writes them) or INIT_FROM=none" >&2; exit 2
  fi
fi
if [[ "${TOY:-0}" == 1 ]]; then
  NUM_SHAPES=${TOY_SHAPES:-60}; IMAGE_STEPS=${IMAGE_STEPS:-4}; VIDEO_STEPS=${VIDEO_STEPS:-3}
  UNIFIED_STEPS=${UNIFIED_STEPS:-4}; MIX_STEPS=${MIX_STEPS:-3}; EVAL_NUM=${EVAL_NUM_TOY:-2}; LIMIT="--limit 200"
  # 200 documents need not hold every group the stage-2 weights name (a name matching none is refused)
  MIX_WEIGHTS='{"*": 1.5}'; TAIL_WEIGHTS='{"*": 1.5}'
fi
steps() { [[ -n "${1:-}" ]] && echo "--trainer.max_steps $1" || true; }
# a wall-clock cap per stage (minutes), Lightning's --trainer.max_time: training stops, the last checkpoint counts
precision() { [[ -n "${PRECISION:-}" ]] && echo "--trainer.precision $PRECISION" || true; }
limit() { [[ -n "${1:-}" ]] && printf -- "--trainer.max_time 00:%02d:%02d:00" $(($1 / 60)) $(($1 % 60)) || true; }
mkdir -p "$RUNS/logs" "$RUNS/export"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUNS/logs/recipe.log"; }

# 1. data: the configs read $DATA/documents.jsonl (shapes + digits, paths relative to $DATA)
if [[ ! -f "$DATA/documents.jsonl" ]]; then
  log "data: shapes ($NUM_SHAPES documents) + digits -> $DATA"
  [[ -f "$DATA/shapes/meta.json" ]] || $ANYGEN data shapes --out "$DATA/shapes" --num "$NUM_SHAPES" --seed 0 \
      --image-size 64 --frames 9 --holdout 0.1 --workers "$WORKERS" --clip-format "${CLIP_FORMAT:-mp4}" --overwrite \
      > "$RUNS/logs/data.log" 2>&1
  [[ -f "$DATA/digits/meta.json" ]] || $ANYGEN data digits --out "$DATA/digits" --seed 0 --image-size 64 \
      ${NUM_DIGITS:+--num "$NUM_DIGITS"} --overwrite >> "$RUNS/logs/data.log" 2>&1
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

# 2. image tokenizer (8x at 64 px: 8x8 tokens; GRID=16: 4x, 16x16) and 3. video tokenizer (9 frames of 32 px:
# 3x4x4 tokens)
# the tokenizers a warm start keeps are copied from it, never trained: its rows mean their codes (the video one;
# with CONTINUE=1 the image one too)
KEPT=${WARM:+video}; [[ "${CONTINUE:-0}" == 1 ]] && KEPT="image video"
for kind in $KEPT; do
  if [[ ! -f "$RUNS/export/${kind}_tokenizer.safetensors" ]]; then
    log "$kind tokenizer: $WARM's (the warm start's $kind codes mean what they meant to it)"
    cp "$WARM/${kind}_tokenizer.safetensors" "$RUNS/export/"
  fi
  if ! cmp -s "$WARM/${kind}_tokenizer.safetensors" "$RUNS/export/${kind}_tokenizer.safetensors"; then
    echo "$RUNS/export/${kind}_tokenizer.safetensors is not $WARM's $kind tokenizer: the warm start's $kind rows" \
         "would mean other codes; delete it (the recipe then copies $WARM's) or use INIT_FROM=none" >&2; exit 2
  fi
done
if [[ ! -f "$RUNS/export/image_tokenizer.safetensors" ]]; then
  log "image tokenizer: anygen fit --config configs/default/$IMAGE_STAGE.yaml $(steps "${IMAGE_STEPS:-}")"
  $ANYGEN fit --config configs/default/$IMAGE_STAGE.yaml $CFG_DATA $(steps "${IMAGE_STEPS:-}") $(precision) \
      $(limit "${IMAGE_MINUTES:-}") > "$RUNS/logs/image_tokenizer.log" 2>&1
  $ANYGEN export runs/default/$IMAGE_STAGE/checkpoints/last.ckpt --out "$RUNS/export/"
fi
if [[ ! -f "$RUNS/export/video_tokenizer.safetensors" ]]; then
  log "video tokenizer: anygen fit --config configs/default/video_tokenizer.yaml $(steps "${VIDEO_STEPS:-}")"
  $ANYGEN fit --config configs/default/video_tokenizer.yaml $CFG_DATA $(steps "${VIDEO_STEPS:-}") $(precision) \
      $(limit "${VIDEO_MINUTES:-}") > "$RUNS/logs/video_tokenizer.log" 2>&1
  $ANYGEN export runs/default/video_tokenizer/checkpoints/last.ckpt --out "$RUNS/export/"
fi

# 4. the tokenizer directory: BPE on the documents' text + the two VQ tokenizers, 16 <|und|> per 64 px image
if [[ ! -f "$DATA/tokenizer/tokenizer_config.json" ]]; then
  log "build-tokenizer -> $DATA/tokenizer"
  $ANYGEN build-tokenizer --documents "$DATA/documents.jsonl" --vocab-size "$VOCAB" ${WARM:+--text-tokenizer "$WARM"} \
      --image-tokenizer "$RUNS/export/image_tokenizer.safetensors" \
      --video-tokenizer "$RUNS/export/video_tokenizer.safetensors" --image-size 64 --video-size 32 \
      --und-tokens 16 --und-image-size 64 --max-height 32 --max-width 32 --max-frames 8 --video-frames 9 --out "$DATA/tokenizer"
fi

# 5. token shards
if [[ ! -f "$DATA/shards/index.json" ]]; then
  log "tokenize -> $DATA/shards"
  $ANYGEN tokenize --documents "$DATA/documents.jsonl" --tokenizer "$DATA/tokenizer" --out "$DATA/shards" \
      --workers "$WORKERS" --video-frames 9 --max-length $MAX_LENGTH ${LIMIT:-} --overwrite --quiet > "$RUNS/logs/tokenize.log" 2>&1
fi

if [[ "${DATA_ONLY:-0}" == 1 ]]; then log "data only: $DATA/shards"; exit 0; fi

# 6. the unified model (GRID=16 with INIT_FROM=none: two stages, the second with mixture weights), 7. export
# kept(STAGE): the step with the lowest validation CE, not the last one (a long run on few documents
# overfits); a run too short to validate (TOY=1) has only its last step
kept() { [[ -f "runs/default/$1/checkpoints/best.ckpt" ]] && echo "runs/default/$1/checkpoints/best.ckpt" \
  || echo "runs/default/$1/checkpoints/last.ckpt"; }
# stale(STAGE), before each stage: a best or last step of an earlier run is not this run's (with last.ckpt left,
# Lightning writes last-v1.ckpt, and kept() of a run too short to validate would export the earlier run's model)
stale() { rm -f runs/default/$1/checkpoints/best.ckpt runs/default/$1/checkpoints/last.ckpt \
  runs/default/$1/checkpoints/last-v*.ckpt; }
if [[ ! -f "$RUNS/model/model.safetensors" ]]; then
  log "unified: anygen fit --config configs/default/$UNIFIED_STAGE.yaml $(steps "${UNIFIED_STEPS:-}")"
  stale $UNIFIED_STAGE
  $ANYGEN fit --config configs/default/$UNIFIED_STAGE.yaml --model.init_args.tokenizer_dir "$DATA/tokenizer" \
      ${WARM:+--model.init_args.init_from "$WARM"} ${WARM:+${MIX_WEIGHTS:+--data.init_args.weights "$MIX_WEIGHTS"}} \
      --data.init_args.shards "$DATA/shards" $(steps "${UNIFIED_STEPS:-}") $(precision) \
      $(limit "${UNIFIED_MINUTES:-}") ${FIT_ARGS:-} > "$RUNS/logs/unified.log" 2>&1
  BEST=$(kept $UNIFIED_STAGE)
  if [[ -n "$MIX_STAGE" ]]; then
    log "unified stage 2: anygen fit --config configs/default/$MIX_STAGE.yaml from $BEST $(steps "${MIX_STEPS:-}")"
    stale $MIX_STAGE
    $ANYGEN fit --config configs/default/$MIX_STAGE.yaml --model.init_args.tokenizer_dir "$DATA/tokenizer" \
        --model.init_args.init_from "$BEST" --data.init_args.shards "$DATA/shards" \
        ${MIX_WEIGHTS:+--data.init_args.weights "$MIX_WEIGHTS"} $(steps "${MIX_STEPS:-}") $(precision) \
        $(limit "${MIX_MINUTES:-}") ${FIT_ARGS:-} > "$RUNS/logs/unified_mix.log" 2>&1
    BEST=$(kept $MIX_STAGE)
  fi
  $ANYGEN export "$BEST" --out "$RUNS/model"
fi

MODEL=$RUNS/model
# 7b. DIGITS_TAIL=1: a short digits-heavy stage from that model (a second stage on more shapes costs digits as it
# starts; this brings them back), everything kept
if [[ "${DIGITS_TAIL:-0}" == 1 ]]; then
  MODEL=$RUNS/model_tail
  if [[ ! -f "$MODEL/model.safetensors" ]]; then
    log "digits tail: anygen fit --config configs/default/unified_16x16_digits.yaml from $RUNS/model $(steps "${TAIL_STEPS:-}")"
    stale unified_16x16_digits
    $ANYGEN fit --config configs/default/unified_16x16_digits.yaml --model.init_args.tokenizer_dir "$DATA/tokenizer" \
        --model.init_args.init_from "$RUNS/model" --data.init_args.shards "$DATA/shards" $(steps "${TAIL_STEPS:-}") \
        ${TAIL_WEIGHTS:+--data.init_args.weights "$TAIL_WEIGHTS"} $(precision) ${FIT_ARGS:-} > "$RUNS/logs/digits_tail.log" 2>&1
    $ANYGEN export "$(kept unified_16x16_digits)" --out "$MODEL"
  fi
fi

# 8. evaluation on held-out prompts, 9. ship
log "eval -> $RUNS/eval"
$ANYGEN eval --checkpoint "$MODEL" --out "$RUNS/eval" --num "$EVAL_NUM" ${EVAL_ARGS:-} | tee "$RUNS/logs/eval.log"
if [[ "${SHIP:-0}" == 1 ]]; then
  rm -rf anygen/assets/default && mkdir -p anygen/assets/default
  cp "$MODEL"/{config.json,model.safetensors,tokenizer_config.json,text_tokenizer.json,generation_config.json} \
      anygen/assets/default/
  cp "$MODEL"/{image_tokenizer.safetensors,video_tokenizer.safetensors} anygen/assets/default/
  cp "$RUNS/eval/eval.json" anygen/assets/default/eval.json
  log "shipped: $(du -sh anygen/assets/default | cut -f1) in anygen/assets/default"
fi
log "done"
