#!/usr/bin/env bash
# Train the bundled SmolLM2-135M-Instruct Medusa heads on one GPU, then evaluate them.
#
# One command on a machine with the repo, the GGUF and the tokenised prompts:
#   bash scripts/train_heads_gpu.sh GGUF PROMPTS_JSONL QUESTIONS_JSON OUT_DIR
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf (from `medusa-jax fetch`); PROMPTS_JSONL and
# QUESTIONS_JSON: written on any machine by
#   python -m medusa_jax train ... (prompts.jsonl in its workdir) and
#   python scripts/eval_mtbench.py --write-questions questions.json
# Writes OUT_DIR/heads (the adapter), metrics.jsonl, examples.jsonl.gz, eval.json, run.log.
set -euo pipefail
GGUF=$1; PROMPTS=$2; QUESTIONS=$3; OUT_DIR=$4
CONFIG=${CONFIG:-configs/train_smollm2_v2.json}
WORK=${WORK:-/tmp/medusa_train}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-150}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR" "$WORK"
{
  date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  /usr/bin/time -f "train wall %e s" python3 -m medusa_jax train --config "$CONFIG" \
    --workdir "$WORK" --gguf "$GGUF" --prompts "$PROMPTS" --out "$OUT_DIR/heads" --no-progress
  cp "$WORK/metrics.jsonl" "$OUT_DIR/"
  gzip -c "$WORK/examples.jsonl" > "$OUT_DIR/examples.jsonl.gz"
  timeout "$EVAL_TIMEOUT" python3 scripts/eval_mtbench.py --heads "$OUT_DIR/heads" \
    --model-dir "$WORK/model" --questions "$QUESTIONS" --out "$OUT_DIR" --bs1 4 --no-plots \
    > /dev/null || echo "eval stopped (status $?)"
  date -u
} 2>&1 | tee "$OUT_DIR/run.log"
