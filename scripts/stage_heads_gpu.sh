#!/usr/bin/env bash
# Stage the heads13 GPU training run into CHECKOUT/.device/heads13 (an ignored folder of the
# checkout that the device machine receives), for two back-to-back device calls.
#
#   bash scripts/stage_heads_gpu.sh CHECKOUT
#
# Needs .assets/heads/ here (gguf.part00, gguf.part01: the Q4_1 GGUF split at 50 MiB;
# prompts.jsonl.xz: configs/train_smollm2_v3.json's prompts; questions.json) and .whl/ (the
# gguf wheel, which the device image lacks). Copies a code overlay of this branch (medusa_jax,
# configs, scripts; without the bundled model.safetensors, which the checkout has) and those
# files, then prints the two device commands. Each call carries under 55 MiB besides the
# checkout's own tree.
set -euo pipefail
CHECKOUT=${1:?usage: stage_heads_gpu.sh CHECKOUT}
HERE=$(cd "$(dirname "$0")/.." && pwd)
DEST=$CHECKOUT/.device/heads13
rm -rf "$DEST"
mkdir -p "$DEST/repo" "$DEST/whl"
git -C "$HERE" archive HEAD medusa_jax configs scripts | tar -x -C "$DEST/repo"
rm "$DEST/repo/medusa_jax/bundled/heads/smollm2-135m-instruct/model.safetensors"
cp "$HERE"/.assets/heads/{gguf.part00,gguf.part01,prompts.jsonl.xz,questions.json} "$DEST/"
cp "$HERE"/.whl/gguf-*.whl "$DEST/whl/"
git -C "$CHECKOUT" check-ignore -q .device/heads13 || echo "warning: .device/ is not ignored in $CHECKOUT"
du -sh "$DEST"/* | sed 's/^/  /'
cat <<'CMDS'
call 1 (carry [".device/heads13/gguf.part00"], timeout_s 60):
  mkdir -p /root/assets && cp .device/heads13/gguf.part00 /root/assets/ && ls -la /root/assets
call 2, within 30 s (carry [".device/heads13/repo", ".device/heads13/gguf.part01",
  ".device/heads13/prompts.jsonl.xz", ".device/heads13/questions.json", ".device/heads13/whl"],
  timeout_s 330):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/heads13/whl/*.whl && export PYTHONPATH=/tmp/site || exit 1; B=$PWD/medusa_jax/bundled/heads/smollm2-135m-instruct; S=$PWD/.device/heads13; cd $S/repo && GENERATE_BUDGET=100 BASELINE_HEADS=$B TIME_BUDGET=200 EVAL_TIMEOUT=100 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache bash scripts/train_heads_gpu.sh /root/assets/gguf.part00,$S/gguf.part01 $S/prompts.jsonl.xz $S/questions.json $OUT
then, here: python scripts/install_bundled_heads.py FILES_AT   (installs only if better)
CMDS
