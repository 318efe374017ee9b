#!/usr/bin/env bash
# The offline carry of bench/gpu_check.sh: every Python package the GPU check needs that a CUDA image with torch
# may lack, as wheels, with no torch and no CUDA libraries in them (the image has those). Run on a machine that
# reaches PyPI, from the repository root; the check installs them with --no-index --no-deps.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: bench/prepare_gpu_wheels.sh [DIR] [--size-only]

Fills DIR (default bench/wheels) with:
  - deepspeed 0.19.8 built here as a pure-Python wheel (pip wheel --no-deps; PyPI has only its source, whose
    setup would add nvidia-ml-py and build against whatever torch it finds; no op is prebuilt: FusedAdam is
    compiled on the GPU machine by the check);
  - its pure-Python needs and the test runner's (hjson, py-cpuinfo, pydantic, annotated-types,
    typing-inspection, typing-extensions, einops, nvidia-ml-py, pytest, pluggy, iniconfig, packaging,
    sortedcontainers, attrs, exceptiongroup, tomli);
  - the compiled ones (pydantic-core, msgpack, psutil; hypothesis, which dropped 3.10, from 3.11) for
    CPython 3.10 to 3.13, as the image's Python is not known before its first run.
Versions are this project's pins (constraints.txt and the test environment). Prints each file and the total,
and fails if the total passes 48 MiB (the device tool carries 64 MiB in all). --size-only checks DIR as it is.
USAGE
}

DIR="" SIZE_ONLY=""
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --size-only) SIZE_ONLY=1 ;;
        -*) echo "prepare_gpu_wheels.sh: error: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) DIR="$arg" ;;
    esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${DIR:-$REPO/bench/wheels}"
LIMIT_MIB="${GPU_WHEELS_LIMIT_MIB:-48}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"  # its torch builds the deepspeed wheel

PURE=(deepspeed==0.19.8 hjson==3.1.0 py-cpuinfo==9.0.0 pydantic==2.14.4 annotated-types==0.8.0
      typing-inspection==0.4.5 typing-extensions==4.16.0 einops==0.8.2 nvidia-ml-py==13.615.71 pytest==9.2.0
      pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 sortedcontainers==2.4.0 attrs==26.1.0
      exceptiongroup==1.3.1 tomli==2.5.0)
BINARY=(pydantic-core==2.50.5 msgpack==1.2.4 psutil==7.2.2)
HYPOTHESIS=hypothesis==6.170.17  # compiled, for CPython 3.11+ only (it dropped 3.10)
PYTHONS=(3.10 3.11 3.12 3.13)

if [ -z "$SIZE_ONLY" ]; then
    mkdir -p "$DIR"
    # deepspeed's setup.py imports torch, so it builds without isolation, against the environment's torch
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "${PURE[0]}"
    # pure-Python wheels only: a CPython-specific one of this machine would not fit the image
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation py --abi none --platform any \
        --python-version 3.10 -d "$DIR" "${PURE[@]:1}"
    for version in "${PYTHONS[@]}"; do
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$DIR" "${BINARY[@]}" $([ "$version" != 3.10 ] && echo "$HYPOTHESIS")
    done
fi

[ -d "$DIR" ] || { echo "prepare_gpu_wheels.sh: error: $DIR does not exist" >&2; exit 2; }
shopt -s nullglob
wheels=("$DIR"/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "prepare_gpu_wheels.sh: error: no wheel in $DIR" >&2; exit 2; }
for wheel in "${wheels[@]}"; do
    case "$wheel" in *torch-*|*nvidia_c*|*nvidia_n*) echo "prepare_gpu_wheels.sh: error: $wheel is a torch/CUDA wheel; the image has those" >&2; exit 1 ;; esac
done
total=$(du -cb "${wheels[@]}" | tail -n 1 | cut -f1)
ls -1s --block-size=K "${wheels[@]}" | sed "s#$DIR/##"
mib=$(( (total + 1048575) / 1048576 ))
echo "${#wheels[@]} wheels, $total bytes (${mib} MiB) in $DIR; limit ${LIMIT_MIB} MiB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "prepare_gpu_wheels.sh: error: the carry is over ${LIMIT_MIB} MiB" >&2
    exit 1
fi
