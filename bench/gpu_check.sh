#!/usr/bin/env bash
# One-shot check of the GPU path on one CUDA GPU, sized for a short lease (one H200, ten minutes a command).
# Prints one summary table; every step's details go to OUT_DIR (JSON per check, a log per step); checkpoints,
# models and the extension cache go to a scratch folder outside it.
set -u

usage() {
    cat <<'EOF'
usage: bench/gpu_check.sh OUT_DIR [--cpu] [--only STEP,...]
       bench/gpu_check.sh --budget     # each step's time limit and their sum

Settles the GPU path in one run, from the repository root, with the machine's own python (torch with CUDA).
Every step has a time limit; a step past it is a FAIL row and the script goes on. The limits add up to 8 min:
  install     30 s  pip-installs the wheels of bench/wheels (or $GPU_CHECK_WHEELS) that this python lacks,
                    offline (--no-index --no-deps), saying per package what it found installed. Prepare the
                    folder on a machine with PyPI:  bench/prepare_gpu_wheels.sh  (about 18 MiB: deepspeed built
                    as a pure-Python wheel, its pure-Python needs, pydantic-core/msgpack/psutil for CPython
                    3.10-3.13). Then DeepSpeed's FusedAdam starts building in the background (nvcc and
                    torch.version.cuda logged; DS_SKIP_CUDA_CHECK=1 where they differ; torch's fused AdamW,
                    torch_adam, if the build fails; at most 120 s, within the next steps' limits): the
                    fused_adam row says which.
  tests       90 s  the CUDA-only tests (pytest -m cuda): attention kernels of the training path (packed and
                    padded rows, forward and backward) against the fp32 reference, decoding, flash
  parity      75 s  sdpa / flex / flash against the fp32 eager reference in fp16 and bf16: outputs and q/k/v
                    gradients of real tokens, head dims 64/80/128 (flex: 128), causal, left padding, packed rows,
                    decoding
  loss        25 s  the chunked cross-entropy in fp16 (loss-scaled as DeepSpeed does) and bf16 against fp32
                    at StableLM-7B scale
  layers      60 s  2 StableLM-7B-shaped layers, 4 x 4096 packed, gradient checkpointing, bf16: tokens/s, MFU,
                    peak memory per backend, the projected 8-rank ZeRO-2 peak of the full model
  decode      40 s  ms/token with padded and unpadded prompts per backend
  train       90 s  train.py (fp16, ZeRO-2, packed, deterministic) for 6 steps on a random 2-layer model with
                    StableLM-7B's heads (1.8 GB checkpoints), a gradient overflow injected at steps 4 and 5:
                    the skipped steps, the loss scale halving after the hysteresis, the recovery
  resume      60 s  a resume from the step-3 checkpoint (copied alone) against the straight run, and the export
                    loaded back
flash-attn is optional: without it the flash rows are SKIP (add it with: pip install --pre flash-attn-4
nvidia-cutlass-dsl on Hopper/Blackwell, wheels carried like the others).
--cpu runs parity, loss, layers, decode, train and resume on tiny shapes on the CPU (what the test suite
runs; fp16 training through DeepSpeed's loss scaler too), skipping install and tests. --only runs the named
steps (a first, short run: --only install,tests). $GPU_CHECK_SCRATCH names the scratch folder (default: a new
one under /tmp, removed at the end). Exit status: 1 if any step failed.
EOF
}

# Each step's time limit in seconds on the GPU (three times these on --cpu); --budget prints them and the sum
declare -A LIMIT=([install]=30 [tests]=90 [parity]=75 [loss]=25 [layers]=60 [decode]=40 [train]=90 [resume]=60)
ORDER=(install tests parity loss layers decode train resume)
# FusedAdam's build runs in the background beside tests..decode, whose limits (290 s) hold its own: it adds
# nothing to the sum, and the train step starts its clock once the build is over (54 s on the H200)
FUSED_ADAM_LIMIT=120

OUT="" CPU="" ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --budget) total=0; for name in "${ORDER[@]}"; do echo "$name ${LIMIT[$name]}"; total=$((total + LIMIT[$name])); done
                  echo "total $total"; exit 0 ;;
        --cpu) CPU="--cpu" ;;
        --only) ONLY=",$2,"; shift ;;
        -*) echo "gpu_check.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) if [ -n "$OUT" ]; then echo "gpu_check.sh: error: one OUT_DIR only" >&2; exit 2; fi; OUT="$1" ;;
    esac
    shift
done
if [ -z "$OUT" ]; then echo "gpu_check.sh: error: OUT_DIR is required (see --help)" >&2; exit 2; fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/bench/wheels}"
CHECK=("$PYTHON" bench/gpu_check.py)
if [ -n "${GPU_CHECK_SCRATCH:-}" ]; then
    SCRATCH="$GPU_CHECK_SCRATCH"; mkdir -p "$SCRATCH"
else
    SCRATCH="$(mktemp -d /tmp/gpu_check.XXXXXX)"; trap 'rm -rf "$SCRATCH"' EXIT
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$SCRATCH/torch_extensions}"
# FusedAdam is built for this GPU only, named as DeepSpeed's JIT builder parses it: a suffixed entry such as the
# "9.0a" a CUDA image may set ends its build with "invalid literal for int(): '0a'" (seen on the H200 image)
IMAGE_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-unset}"
if [ -z "$CPU" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null) \
        && export TORCH_CUDA_ARCH_LIST
fi
export PYTHONUNBUFFERED=1
FAILED=0
SCALE=1
[ -n "$CPU" ] && SCALE=3  # the CPU run shares a busy machine; the limits are sized for the GPU lease

left() { local n=$((deadline - SECONDS)); echo $((n > 1 ? n : 1)); }  # seconds to `deadline` (timeout 0 = none)

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

# record NAME STATUS SECONDS SUMMARY: a shell step as a row of the table
record() { "${CHECK[@]}" record "$OUT" "$1" --status "$2" --seconds "$3" --summary "$4" >/dev/null; }

# step NAME COMMAND...: one measurement with a time limit, its output in OUT/NAME.log; a step that
# crashed or ran out of time is a FAIL row, and the script goes on
step() {
    local name="$1" limit=$((LIMIT[$1] * SCALE)); shift
    wanted "$name" || return 0
    echo "== $name (limit ${limit}s)" >&2
    rm -f "$OUT/$name.json"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || FAILED=1
    [ -f "$OUT/$name.json" ] || record "$name" FAIL $((SECONDS - start)) "crashed or passed its ${limit}s limit ($name.log)"
    tail -n 1 "$OUT/$name.log" >&2
}

{
    date -u; uname -a
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    nvcc --version 2>&1 | tail -n 2 || echo "no nvcc"
    echo "TORCH_CUDA_ARCH_LIST: image $IMAGE_ARCH_LIST, this check ${TORCH_CUDA_ARCH_LIST:-unset}"
    "$PYTHON" -c 'import sys, sysconfig, os; print("python", sys.version.split()[0], sys.executable, "headers:",
os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
    "$PYTHON" bench/gpu_check.py environment "$OUT" 2>&1
    "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|deepspeed|flash|transformers|triton|nvidia-cutlass|pydantic|pytest)' || true
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" >&2

OPTIMIZER=fused  # FusedAdam, as on a GPU node; torch if it cannot be built here
[ -n "$CPU" ] && OPTIMIZER="torch (CPU)"
if [ -z "$CPU" ] && wanted install; then
    start=$SECONDS
    echo "== install (limit ${LIMIT[install]}s)" >&2
    if timeout "${LIMIT[install]}" "$PYTHON" bench/install_wheels.py "$WHEELS" >"$OUT/install.log" 2>&1; then
        record install PASS $((SECONDS - start)) "$(grep -c '^found' "$OUT/install.log") found, installed: $(grep '^installed' "$OUT/install.log" | cut -d' ' -f2 | tr '\n' ' ')"
    else
        FAILED=1
        record install FAIL $((SECONDS - start)) "could not install from $WHEELS ($(tail -n 1 "$OUT/install.log" | cut -c1-120))"
    fi
    cat "$OUT/install.log" >&2
fi

# FusedAdam's JIT build runs beside the next steps (it needs nvcc and Python's headers); the train step waits
fused_adam_build() {
    local start=$SECONDS nvcc_version torch_cuda skip=""
    nvcc_version=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | cut -d' ' -f2)
    torch_cuda=$("$PYTHON" -c 'import torch; print(".".join(str(torch.version.cuda).split(".")[:2]))')
    if [ -n "$nvcc_version" ] && [ "$nvcc_version" != "$torch_cuda" ]; then
        export DS_SKIP_CUDA_CHECK=1  # DeepSpeed knows no CUDA 13 minor-mismatch rule and would refuse
        skip=", DS_SKIP_CUDA_CHECK=1"
    fi
    if timeout "$FUSED_ADAM_LIMIT" "$PYTHON" -c 'from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()' \
            >"$OUT/fused_adam.log" 2>&1; then
        record fused_adam PASS $((SECONDS - start)) "built in $((SECONDS - start)) s (nvcc ${nvcc_version:-none}, torch CUDA $torch_cuda$skip)"
        echo fused >"$SCRATCH/optimizer"
    else
        record fused_adam SKIP $((SECONDS - start)) "FusedAdam did not build (nvcc ${nvcc_version:-none}, torch CUDA $torch_cuda$skip; fused_adam.log): training uses torch's fused AdamW (torch_adam)"
        echo torch >"$SCRATCH/optimizer"
    fi
}
BUILD_PID=""
if [ -z "$CPU" ] && wanted train; then
    fused_adam_build &
    BUILD_PID=$!
fi

if [ -z "$CPU" ] && wanted tests; then
    start=$SECONDS
    echo "== tests (limit ${LIMIT[tests]}s)" >&2
    if timeout "${LIMIT[tests]}" "$PYTHON" -m pytest -q -rs -m cuda -p no:cacheprovider tests >"$OUT/tests.log" 2>&1; then
        status=PASS
    else
        status=FAIL; FAILED=1
    fi
    record tests $status $((SECONDS - start)) "$(grep -E 'passed|failed|error' "$OUT/tests.log" | tail -n 1)"
fi

step parity "${CHECK[@]}" parity "$OUT" $CPU
step loss "${CHECK[@]}" loss "$OUT" $CPU
step layers "${CHECK[@]}" layers "$OUT" $CPU
step decode "${CHECK[@]}" decode "$OUT" $CPU

OVERFLOW=4,5
if wanted train; then
    echo "== train (limit $((LIMIT[train] * SCALE))s) and resume (limit $((LIMIT[resume] * SCALE))s)" >&2
    [ -n "$BUILD_PID" ] && wait "$BUILD_PID" && OPTIMIZER=$(cat "$SCRATCH/optimizer" 2>/dev/null || echo fused)
    start=$SECONDS
    deadline=$((SECONDS + LIMIT[train] * SCALE))  # the model's build counts in it
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-$port}"
    if [ -n "$CPU" ]; then
        model=(--configs defaults tiny bench/gpu_check_data.yaml --dtype fp16 --max_length 64 --eval_size 4)
    else
        backend=sdpa
        "$PYTHON" -c "from gptneox.attention import check_backend as c; import torch; c('flash', 'cuda', torch.float16)" \
            2>/dev/null && backend=flash
        model=(--configs defaults stablelm-7b bench/gpu_check_data.yaml --model_name "$SCRATCH/model"
               --attention_backend "$backend" --max_length 1024 --eval_size 8)
        if [ "$OPTIMIZER" = torch ]; then  # the README's advice where FusedAdam cannot be built
            "$PYTHON" -c 'import json, sys; c = json.load(open("ds_config.json")); c["optimizer"]["params"].update(torch_adam=True, fused=True); json.dump(c, open(sys.argv[1], "w"))' "$SCRATCH/ds_config.json"
            model+=(--deepspeed_config "$SCRATCH/ds_config.json")
        fi
    fi
    common=("${model[@]}" --pack true --max_steps 6 --save_steps 3 --eval_steps 100 --gradient_accumulation_steps 2
            --per_device_train_batch_size 2 --deterministic true --logging_steps 1 --overflow_steps "$OVERFLOW" $CPU)
    rm -f "$OUT/train.json" "$OUT/resume.json"
    rm -rf "$SCRATCH/straight" "$SCRATCH/resumed" "$SCRATCH/model"
    if { [ -n "$CPU" ] || timeout "$(left)" "${CHECK[@]}" checkpoint "$SCRATCH/model" >"$OUT/train.log" 2>&1; } \
        && timeout "$(left)" "${CHECK[@]}" train "${common[@]}" --output_dir "$SCRATCH/straight" >>"$OUT/train.log" 2>&1; then
        record train PASS $((SECONDS - start)) "6 steps, optimizer $OPTIMIZER, $(grep -m1 -oE 'attention[^,;]*' "$OUT/train.log" | head -n 1)"
        start=$SECONDS
        if "${CHECK[@]}" copy-checkpoint "$SCRATCH/straight/checkpoints" "$SCRATCH/resumed/checkpoints" >"$OUT/resume.log" 2>&1 \
            && timeout $((LIMIT[resume] * SCALE)) "${CHECK[@]}" train "${common[@]}" --output_dir "$SCRATCH/resumed" --resume >>"$OUT/resume.log" 2>&1; then
            "${CHECK[@]}" resume "$OUT" "$SCRATCH/straight" "$SCRATCH/resumed" --overflow_steps "$OVERFLOW" $CPU >>"$OUT/resume.log" 2>&1 || FAILED=1
            cp "$SCRATCH/straight/metrics.jsonl" "$OUT/train-metrics.jsonl"
        else
            FAILED=1
            record resume FAIL $((SECONDS - start)) "the resumed train.py failed ($(grep -m1 -E 'Error|error' "$OUT/resume.log" | cut -c1-150))"
        fi
        tail -n 1 "$OUT/resume.log" >&2
    else
        FAILED=1
        record train FAIL $((SECONDS - start)) "train.py failed or passed its limit ($(grep -m1 -E 'Error|error' "$OUT/train.log" | cut -c1-150))"
    fi
fi

echo
"${CHECK[@]}" summary "$OUT" | tee "$OUT/summary.md"
exit $FAILED
