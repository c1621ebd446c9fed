#!/usr/bin/env bash
# Train the bundled SmolLM2-135M-Instruct Medusa heads on one GPU, then evaluate them.
#
# One command on a machine with the repo, the GGUF and the tokenised prompts:
#   bash scripts/train_heads_gpu.sh GGUF PROMPTS QUESTIONS OUT_DIR
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (from `medusa-jax fetch`), or its parts joined by
# commas (concatenated in order and checked against GGUF_SHA256), for a machine that receives
# the file in pieces; PROMPTS: a prompts.jsonl, or the same compressed (.jsonl.xz); both
# written on any machine by
#   python -m medusa_jax train ... (prompts.jsonl in its workdir) and
#   python scripts/eval_mtbench.py --write-questions questions.json (QUESTIONS)
# Writes OUT_DIR/heads (the adapter), metrics.jsonl, eval.json (MT-bench of the new heads),
# run.log and, when BASELINE_HEADS names an adapter and the run is inside TIME_BUDGET
# seconds, eval_baseline.json (the same evaluation of those heads, e.g. the bundled ones).
#
# Environment: CONFIG (default configs/train_smollm2_v3.json), WORK (/tmp/medusa_train),
# EVAL_MODES (tree), EVAL_TIMEOUT (120 s per evaluation), TIME_BUDGET (230 s: no baseline
# evaluation starts later), GENERATE_BUDGET (seconds after which no new generation batch
# starts: `medusa-jax train --generate-budget`; default none), EXAMPLES=1 also writes examples.jsonl.gz, TRAIN_EXTRA (options
# appended to `medusa-jax train`, e.g. "--steps 20" for a quick check, or "--variant base
# --variant long:steps=5000 --compare DIR": variants on the same rows, each adapter in
# OUT_DIR/heads/NAME, the comparison in OUT_DIR/heads/sweep.json, their metrics in
# OUT_DIR/metrics_NAME.jsonl, no MT-bench evaluation), EVAL_EXTRA (the same
# for `medusa-jax eval`, e.g. "--num-questions 2 --max-new-tokens 8").
set -uo pipefail
GGUF=$1; PROMPTS=$2; QUESTIONS=$3; OUT_DIR=$4
CONFIG=${CONFIG:-configs/train_smollm2_v3.json}
WORK=${WORK:-/tmp/medusa_train}
EVAL_MODES=${EVAL_MODES:-tree}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-120}
TIME_BUDGET=${TIME_BUDGET:-230}
GGUF_SHA256=${GGUF_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT_DIR" "$WORK"

evaluate() {  # evaluate HEADS_DIR OUT_JSON
  local dir="$WORK/eval_$(basename "$2" .json)"
  timeout "$EVAL_TIMEOUT" "$PY" scripts/eval_mtbench.py --heads "$1" --model-dir "$WORK/model" \
    --questions "$QUESTIONS" --out "$dir" --modes "$EVAL_MODES" --no-plots ${EVAL_EXTRA:-} > /dev/null \
    && cp "$dir/eval.json" "$2" || echo "evaluation of $1 stopped (status $?)"
}

{
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  if [[ "$GGUF" == *,* ]]; then  # parts: concatenate, then check
    IFS=, read -ra PARTS <<< "$GGUF"
    GGUF=$WORK/model.gguf
    cat "${PARTS[@]}" > "$GGUF" || exit 1
    echo "$GGUF_SHA256  $GGUF" | sha256sum -c - || exit 1
  fi
  if [[ "$PROMPTS" == *.xz ]]; then
    "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      "$PROMPTS" "$WORK/prompts.jsonl" || exit 1
    PROMPTS=$WORK/prompts.jsonl
  fi
  "$PY" -m medusa_jax train --config "$CONFIG" \
    --workdir "$WORK" --gguf "$GGUF" --prompts "$PROMPTS" --out "$OUT_DIR/heads" --no-progress \
    --no-row-cache ${GENERATE_BUDGET:+--generate-budget "$GENERATE_BUDGET"} ${TRAIN_EXTRA:-} \
    || echo "training stopped (status $?)"
  if [ -f "$WORK/metrics.jsonl" ]; then cp "$WORK/metrics.jsonl" "$OUT_DIR/"; fi
  for m in "$WORK"/variants/*/metrics.jsonl; do  # --variant runs: OUT_DIR/heads/NAME
    [ -f "$m" ] && cp "$m" "$OUT_DIR/metrics_$(basename "$(dirname "$m")").jsonl"
  done
  if [ "${EXAMPLES:-0}" = 1 ]; then gzip -c "$WORK/examples.jsonl" > "$OUT_DIR/examples.jsonl.gz"; fi
  echo "training done at ${SECONDS} s (script start = 0)"
  if [ -f "$OUT_DIR/heads/model.safetensors" ]; then evaluate "$OUT_DIR/heads" "$OUT_DIR/eval.json"; fi
  echo "evaluation done at ${SECONDS} s"
  if [ -n "${BASELINE_HEADS:-}" ] && [ "$SECONDS" -lt "$TIME_BUDGET" ]; then
    evaluate "$BASELINE_HEADS" "$OUT_DIR/eval_baseline.json"
  fi
  date -u
} 2>&1 | tee "$OUT_DIR/run.log"
