#!/usr/bin/env bash
# The decode benchmarks of docs/perf_decode.md on one GPU, in two stages that fit two
# consecutive device calls (the model's GGUF travels in two parts):
#
#   bash scripts/gpu_final.sh bench   # random weights, SmolLM2 shape: step times, kernels,
#                                     # tree-verify cost, copy bandwidth -> $OUT/bench_decode.json
#   bash scripts/gpu_final.sh e2e     # real SmolLM2 + bundled heads through Engine.generate on
#                                     # MT-bench first turns -> $OUT/bench_e2e.json
#   bash scripts/gpu_final.sh serve   # after e2e, same machine: scripts/bench_serving.py
#                                     # (Poisson arrivals, plain vs tree) -> $OUT/bench_serving.json
#   bash scripts/gpu_final.sh rows    # the row kernels' tiles: the projections at 16 and 64
#                                     # rows, each kernel's tile in the batch-1 step and a
#                                     # 16-node tree step (bench_row_blocks.py), then steps with
#                                     # Llama(row_kernel_rows=64) and without -> $OUT/rows/
#
# e2e expects /root/assets/gguf.part00 (copied there by an earlier call), .assets/train2/
# (gguf.part01, questions.json) and the gguf wheel in .whl/. Each stage ends within its
# time budget (BENCH_BUDGET / E2E_BUDGET seconds after which no new configuration starts);
# BENCH_EXTRA / E2E_EXTRA append options to bench_decode.py (a later option wins), e.g.
# E2E_EXTRA="--batches 1 --new-tokens 4" for a quick CPU check; E2E_F32= (empty) skips the
# f32 run at batch 1.
set -uo pipefail
STAGE=${1:?usage: gpu_final.sh bench|e2e|serve|rows}
OUT=${OUT:-/tmp/gpu_final_out}
ASSETS=${ASSETS:-/root/assets}
BENCH_BUDGET=${BENCH_BUDGET:-110}
E2E_BUDGET=${E2E_BUDGET:-190}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/root/jax_cache}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/$STAGE.log"

case "$STAGE" in
  bench)
    # Step times at B = 1, 64, 16 (plain; the row-budget tree with K = 16 steps per call and
    # the large copies in that loop's HLO), then the XLA-flag variants (new processes).
    python3 scripts/bench_decode.py --out "$OUT" --batches 1 64 16 --steps 100 \
      --compare-attention 1 64 --tree-batches 1 16 64 --only-plain --no-engine \
      --no-hf --flags-before "${FLAGS_BEFORE:-400}" --time-budget "$BENCH_BUDGET" \
      ${BENCH_EXTRA:-} 2>&1 | tee -a "$OUT/$STAGE.log"
    # The attention-score method that won (in-graph, summed over the compared batch sizes)
    # is what the e2e stage runs.
    mkdir -p "$ASSETS"
    python3 - "$OUT/bench_decode.json" > "$ASSETS/attention.txt" <<'PY' || echo grouped > "$ASSETS/attention.txt"
import json, sys
res = json.load(open(sys.argv[1]))
# The fastest attention method in-graph, plain and tree steps summed over the compared
# batch sizes; another method must beat the one the rows were timed with by 3 %.
main = res["attention"]
rows = [r for r in res["rows"] if any(k.endswith("_plain_step_in_graph_ms") and k != "plain_step_in_graph_ms" for k in r)]
def total(method):
  pre = "" if method == main else method + "_"
  keys = [pre + "plain_step_in_graph_ms", pre + "tree_step_in_graph_ms"]
  if not rows or any(k not in r for r in rows for k in keys[:1]):
    return float("inf")
  return sum(r[k] for r in rows for k in keys if k in r)
times = {m: total(m) for m in ("grouped", "flat", "pallas")}
best = min(times, key=times.get)
print(best if times[best] < 0.97 * times[main] else main)
PY
    echo "attention scores for e2e: $(cat "$ASSETS/attention.txt")" | tee -a "$OUT/$STAGE.log"
    ;;
  e2e)
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site || exit 1
    fi
    GGUF=$ASSETS/smollm2.gguf
    cat "$ASSETS/gguf.part00" .assets/train2/gguf.part01 > "$GGUF" || exit 1
    echo "$GGUF_SHA256  $GGUF" | sha256sum -c - || exit 1
    MODEL=$ASSETS/smollm2-135m-instruct
    rm -rf "$MODEL"  # a second e2e call on the same warm machine converts again
    python3 - "$GGUF" "$MODEL" <<'PY' 2>&1 | tee -a "$OUT/$STAGE.log" || exit 1
import sys, time
from medusa_jax.models.chat import ChatTemplate
from medusa_jax.models.gguf import convert_gguf, open_gguf
from medusa_jax.models.tokenizer import Tokenizer
t = time.time()
gguf, out = sys.argv[1], sys.argv[2]
reader = open_gguf(gguf)
convert_gguf(gguf, out, dtype="float32", reader=reader)
Tokenizer.from_gguf(gguf, reader=reader).save(f"{out}/tokenizer.json")
ChatTemplate.from_gguf(gguf, reader=reader).save(out)
print(f"converted in {time.time() - t:.1f} s")
PY
    ATTENTION=$(cat "$ASSETS/attention.txt" 2>/dev/null || echo grouped)
    python3 scripts/bench_decode.py --real-model "$MODEL" --questions .assets/train2/questions.json \
      --out "$OUT" --attention "$ATTENTION" --batches 1 64 16 4 --new-tokens 256 --cache-len 1024 ${E2E_F32---e2e-f32} \
      --time-budget "$E2E_BUDGET" ${E2E_EXTRA:-} 2>&1 | tee -a "$OUT/$STAGE.log"
    ;;
  serve)
    # The serving benchmark over the model the e2e stage converted (same warm machine).
    MODEL=$ASSETS/smollm2-135m-instruct
    python3 scripts/bench_serving.py --base "$MODEL" --questions .assets/train2/question.jsonl \
      --rates ${SERVE_RATES:-8,32,inf} --num-requests ${SERVE_REQUESTS:-64} --max-tokens 128 \
      --modes ${SERVE_MODES:-none,tree} --slots 16 --dtype bfloat16 --max-cache-len 1024 \
      --compile-cache "$JAX_COMPILATION_CACHE_DIR" --out "$OUT/bench_serving.json" \
      ${SERVE_EXTRA:-} 2>&1 | tee -a "$OUT/$STAGE.log"
    ;;
  rows)
    # Tensor-core tiles for 16 and 64 rows (BK,BN,WARPS,STAGES,BM), then the plain and tree
    # steps with the row kernels taking calls of up to 64 tokens, and without.
    python3 scripts/bench_gemv_layout.py --out "$OUT/rows" --batches 16 64 --variants nk row_nk \
      --row-nk-blocks ${ROWS_BLOCKS:-64,16,4,2,16 128,16,4,2,16 256,16,4,2,16 512,16,8,2,16 \
      128,32,4,2,16 256,32,4,2,16 256,16,8,3,16 128,32,4,2,64 256,16,4,2,64 64,64,4,2,64} \
      2>&1 | tee -a "$OUT/$STAGE.log"
    # One kernel's tile at a time in the whole step: the batch-1 step, then a 16-node tree.
    python3 scripts/bench_row_blocks.py --out "$OUT/rows/blocks-b1" --time-budget 150 \
      2>&1 | tee -a "$OUT/$STAGE.log"
    python3 scripts/bench_row_blocks.py --out "$OUT/rows/blocks-t16" --nodes 16 \
      --time-budget 120 2>&1 | tee -a "$OUT/$STAGE.log"
    for ROWS in 64 1; do
      python3 scripts/bench_decode.py --out "$OUT/rows/r$ROWS" --kernel-layout out_in \
        --row-kernels --row-kernel-rows $ROWS --batches 1 16 64 --steps 100 \
        --tree-batches 1 16 --only-plain --no-engine --no-hf --no-flags --attention pallas \
        --steps-per-call 16 --time-budget "${BENCH_BUDGET}" --kernel-trace 1 ${BENCH_EXTRA:-} \
        2>&1 | tee -a "$OUT/$STAGE.log"
    done
    ;;
  *) echo "unknown stage $STAGE (expected bench, e2e, serve or rows)"; exit 2 ;;
esac
