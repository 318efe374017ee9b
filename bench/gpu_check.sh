#!/usr/bin/env bash
# One-shot check of the GPU path on one CUDA GPU (written for an H100/H200; 6-8 minutes expected there).
# Prints one summary table; every step's details go to OUT_DIR (JSON per check, a log per step).
set -u

usage() {
    cat <<'EOF'
usage: bench/gpu_check.sh OUT_DIR [--cpu] [--only STEP,...]

Settles the GPU path in one run, from the repository root, with the machine's own python (torch with CUDA):
  install  pip-installs what the machine lacks (deepspeed, pytest, hypothesis, flash-attn-4 if its wheel is
           there) from the folder bench/wheels, or $GPU_CHECK_WHEELS, offline (--no-index). Prepare it on a
           machine with network:  pip download deepspeed==0.19.8 pytest hypothesis -d bench/wheels
           (add flash-attn-4 and its dependencies for Hopper). DeepSpeed builds its ops (FusedAdam) at run time
           with nvcc, so nothing is prebuilt.
  tests    make test-gpu: the CUDA-only tests (flash, FlexAttention, torch varlen kernels; fp16/bf16)
  parity   sdpa / flex / flash against the fp32 eager reference in fp16 and bf16: outputs and q/k/v
           gradients, head dims 64/80/128, causal, left padding, packed rows, a decoding step
  loss     the chunked cross-entropy in fp16 and bf16 against fp32 at StableLM-7B scale
  layers   2 StableLM-7B-shaped layers, 4 x 4096 packed, gradient checkpointing, bf16: tokens/s, MFU, peak
           allocated/reserved memory per backend, and the projected 8-rank ZeRO-2 peak of the full model
  decode   ms/token with padded and unpadded prompts per backend
  train    train.py for 4 steps (fp16, ZeRO-2, FusedAdam, deterministic) on a random 2-layer 7B-shaped
           checkpoint with saves, then a resume from step 2 against it, and the export loaded back
Every step has a time limit (a step past it is a FAIL row and the script goes on): install 150 s, tests 120,
parity 120, loss 45, layers 120, decode 45, train 180 + 120 s; expected total 6-8 minutes, at most 15. On a
short lease run it in two calls: --only install,tests,parity,loss,layers,decode, then --only train.
--cpu runs parity, loss, layers, decode and train on tiny fp32 shapes on the CPU (what the test suite runs),
skipping install and tests. --only runs the named steps. Exit status: 1 if any step failed.
EOF
}

OUT="" CPU="" ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
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
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}"
FAILED=0
SCALE=1
[ -n "$CPU" ] && SCALE=3  # the CPU run shares a busy machine; the limits are sized for the GPU lease

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

# record NAME STATUS SECONDS SUMMARY: a shell step as a row of the table
record() { "${CHECK[@]}" record "$OUT" "$1" --status "$2" --seconds "$3" --summary "$4" >/dev/null; }

# step NAME SECONDS COMMAND...: one measurement with a time limit (the whole run must fit a short lease), its
# output in OUT/NAME.log; a step that crashed or ran out of time is a FAIL row, and the script goes on
step() {
    local name="$1" limit=$(($2 * SCALE)); shift 2
    wanted "$name" || return 0
    echo "== $name" >&2
    rm -f "$OUT/$name.json"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || FAILED=1
    [ -f "$OUT/$name.json" ] || record "$name" FAIL $((SECONDS - start)) "crashed or passed its ${limit}s limit ($name.log)"
    tail -n 1 "$OUT/$name.log" >&2
}

{
    date -u; uname -a
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|deepspeed|flash|transformers|triton|nvidia-cutlass)' || true
} >"$OUT/environment.txt" 2>&1

if [ -z "$CPU" ] && wanted install; then
    start=$SECONDS
    missing=()
    for module in deepspeed pytest hypothesis; do
        "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$module")
    done
    if ! "$PYTHON" -c "import flash_attn" 2>/dev/null && ls "$WHEELS"/flash_attn_4* >/dev/null 2>&1; then
        missing+=(flash-attn-4)
    fi
    if [ ${#missing[@]} -eq 0 ]; then
        record install PASS $((SECONDS - start)) "nothing missing"
    elif timeout 150 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation "${missing[@]}" \
            >"$OUT/install.log" 2>&1; then
        record install PASS $((SECONDS - start)) "installed ${missing[*]} from $WHEELS"
    else
        FAILED=1
        record install FAIL $((SECONDS - start)) "pip could not install ${missing[*]} from $WHEELS (install.log)"
    fi
fi

if [ -z "$CPU" ] && wanted tests; then
    start=$SECONDS
    if timeout 120 make test-gpu GPU_PYTHON="$PYTHON" >"$OUT/tests.log" 2>&1; then status=PASS; else status=FAIL; FAILED=1; fi
    record tests $status $((SECONDS - start)) "$(grep -E 'passed|failed|error' "$OUT/tests.log" | tail -n 1)"
fi

step parity 120 "${CHECK[@]}" parity "$OUT" $CPU
step loss 45 "${CHECK[@]}" loss "$OUT" $CPU
step layers 120 "${CHECK[@]}" layers "$OUT" $CPU
step decode 45 "${CHECK[@]}" decode "$OUT" $CPU

if wanted train; then
    start=$SECONDS
    echo "== train" >&2
    if [ -n "$CPU" ]; then
        model=(--configs defaults tiny sample-mix --max_length 64 --eval_size 4)
        launch=("$PYTHON")
        port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
        export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-$port}"
    else
        "${CHECK[@]}" checkpoint "$OUT/random-7b-2layers" >"$OUT/train.log" 2>&1
        backend=sdpa
        "$PYTHON" -c "from gptneox.attention import check_backend as c; import torch; c('flash', 'cuda', torch.float16)" \
            2>/dev/null && backend=flash
        model=(--configs defaults stablelm-7b sample-mix --model_name "$OUT/random-7b-2layers" --attention_backend "$backend"
               --max_length 1024 --eval_size 8)
        launch=(deepspeed --num_gpus 1)
    fi
    common=("${model[@]}" --max_steps 4 --save_steps 2 --eval_steps 100 --gradient_accumulation_steps 2
            --per_device_train_batch_size 2 --deterministic true --logging_steps 1)
    rm -rf "$OUT/train-straight" "$OUT/train-resumed"
    if timeout $((180 * SCALE)) "${launch[@]}" train.py "${common[@]}" --output_dir "$OUT/train-straight" >>"$OUT/train.log" 2>&1 \
        && mkdir -p "$OUT/train-resumed" && cp -r "$OUT/train-straight/checkpoints" "$OUT/train-resumed/" \
        && "${CHECK[@]}" truncate "$OUT/train-resumed/checkpoints" >>"$OUT/train.log" 2>&1 \
        && timeout $((120 * SCALE)) "${launch[@]}" train.py "${common[@]}" --output_dir "$OUT/train-resumed" --resume >>"$OUT/train.log" 2>&1; then
        "${CHECK[@]}" resume "$OUT" "$OUT/train-straight" "$OUT/train-resumed" $CPU >>"$OUT/train.log" 2>&1 || FAILED=1
        tail -n 1 "$OUT/train.log" >&2
    else
        FAILED=1
        record resume FAIL $((SECONDS - start)) "train.py failed ($(grep -m1 -E 'Error|error' "$OUT/train.log" | cut -c1-150))"
    fi
fi

echo
"${CHECK[@]}" summary "$OUT" | tee "$OUT/summary.md"
exit $FAILED
