#!/usr/bin/env bash
# The one command to run on a GPU machine (torch 2.11+cu130, Triton 3.6, Python 3.12, no network):
#   1. build the extension for this GPU's arch (pip install --no-build-isolation --no-deps -e .)
#   2. run the CUDA tests (pytest tests -m cuda)
#   3. run the benchmarks (fastbig bench --device cuda --op all)
#   4. copy logs, results (JSON, CSV) and plots to the output folder ($OUT when set)
#
# usage: bash bench/gpu_run.sh [--out DIR] [--quick] [--op OPS] [--dtype DTYPES]
#                              [--skip-build] [--skip-tests] [--skip-bench] [--cpu] [--dry-run]
#   --out DIR     where results go (default: $OUT, else bench/results/gpu-run-<date>)
#   --quick       fastbig bench --quick (fewer cases, fewer samples)
#   --op/--dtype  passed to fastbig bench
#   --cpu         no GPU: build C++ only, run the CPU suite of tests/test_bench.py, bench --device cpu
#   --dry-run     print every step (with the arch it would build for) and run none
# Exit code: 0 when every step passed; else the first failing step's code (later steps still run).
set -uo pipefail

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-}
QUICK=""; OPS="all"; DTYPES=""; DRY=0; CPU=0
SKIP_BUILD=0; SKIP_TESTS=0; SKIP_BENCH=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "gpu_run: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out)        need_arg "$@"; OUT_DIR=$2; shift 2 ;;
    --out=*)      OUT_DIR=${1#--out=}; shift ;;
    --op)         need_arg "$@"; OPS=$2; shift 2 ;;
    --dtype)      need_arg "$@"; DTYPES=$2; shift 2 ;;
    --quick)      QUICK="--quick"; shift ;;
    --cpu)        CPU=1; shift ;;
    --dry-run)    DRY=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --skip-bench) SKIP_BENCH=1; shift ;;
    -h|--help)    usage; exit 0 ;;
    *)            usage >&2; die "unknown argument: $1" ;;
  esac
done

case ",$OPS," in
  *,attention,*|*,lstm,*|*,conv_bn_relu,*|*,models,*|*,all,*) ;;
  *) die "--op: expected attention|lstm|conv_bn_relu|models|all (comma list), got '$OPS'" ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || die "cannot cd to $ROOT"
[ -f setup.py ] || die "$ROOT has no setup.py: run this from the fastbig checkout"
command -v "$PY" >/dev/null 2>&1 || die "python not found: $PY (set PYTHON=...)"

STAMP=$(date -u +%Y-%m-%d)
[ -n "$OUT_DIR" ] || OUT_DIR="$ROOT/bench/results/gpu-run-$STAMP"
RESULTS="$OUT_DIR/results"

DEVICE=cuda
if [ "$CPU" = 1 ]; then
  DEVICE=cpu; ARCH=""
else
  # The local GPU's arch, e.g. 9.0 on an H100/H200 (no GPU: stop here, unless only printing).
  # nvidia-smi answers fastest; torch is asked only where a GPU device node exists.
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  case "$ARCH" in [0-9]*.[0-9]*) ;; *) ARCH="" ;; esac
  if [ -z "$ARCH" ] && ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    ARCH=$("$PY" -c 'import torch
if not torch.cuda.is_available(): raise SystemExit(1)
print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  fi
  if [ -z "$ARCH" ]; then
    if [ "$DRY" = 1 ]; then ARCH="<arch of the local GPU>";
    else die "no CUDA GPU visible to torch: use --cpu, or --dry-run to see the steps"; fi
  fi
fi

BENCH_ARGS=(--device "$DEVICE" --op "$OPS" --out "$RESULTS")
[ -n "$QUICK" ] && BENCH_ARGS+=("$QUICK")
[ -n "$DTYPES" ] && BENCH_ARGS+=(--dtype "$DTYPES")

build() {  # build ARCH_OR_EMPTY: pip editable install, falling back to an in-place build_ext
  if [ -n "$1" ]; then export TORCH_CUDA_ARCH_LIST="$1"; else export FASTBIG_CPU_ONLY=1; fi
  export PIP_NO_INDEX=1 MAX_JOBS="${MAX_JOBS:-16}"
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . && return 0
  echo "gpu_run: pip install -e . failed; trying setup.py build_ext --inplace" >&2
  "$PY" setup.py -q build_ext --inplace
}

RC=0
step() {  # step NAME LOGFILE CMD...: run (or print) one step, keep its log and exit code
  local name=$1 log=$2; shift 2
  echo "== gpu_run: $name: $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  mkdir -p "$OUT_DIR"
  "$@" > >(tee "$OUT_DIR/$log") 2>&1
  local rc=$?
  echo "== gpu_run: $name: exit $rc"
  echo "$name: exit $rc" >> "$OUT_DIR/steps.txt"
  if [ "$rc" -ne 0 ] && [ "$RC" -eq 0 ]; then RC=$rc; fi
  return 0
}

echo "== gpu_run: root=$ROOT device=$DEVICE arch=${ARCH:-none} out=$OUT_DIR python=$PY"
if [ "$DRY" = 0 ]; then
  mkdir -p "$RESULTS" || die "cannot create $RESULTS"
  : > "$OUT_DIR/steps.txt"
  { "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    nvidia-smi 2>&1 | head -15; git rev-parse HEAD 2>&1; } > "$OUT_DIR/env.txt" 2>&1
fi

if [ "$SKIP_BUILD" = 0 ]; then
  # No network: --no-index, and the build uses the torch/setuptools already installed.
  if [ "$CPU" = 1 ]; then
    step "build (C++ only)" build.log build ""
  else
    step "build (TORCH_CUDA_ARCH_LIST=$ARCH)" build.log build "$ARCH"
  fi
  step build-info build_info.log "$PY" -m fastbig.bench.buildcheck "$DEVICE"
fi

if [ "$SKIP_TESTS" = 0 ]; then
  if [ "$CPU" = 1 ]; then
    step tests tests.log "$PY" -m pytest tests/test_bench.py -q -p no:cacheprovider
  else
    step tests tests.log "$PY" -m pytest tests -m cuda -q -p no:cacheprovider
  fi
fi

if [ "$SKIP_BENCH" = 0 ]; then
  step bench bench.log "$PY" -m fastbig.bench "${BENCH_ARGS[@]}"
  # keep a copy beside the others in the checkout, for committing
  if [ "$DRY" = 0 ] && [ "$(cd "$RESULTS" 2>/dev/null && pwd)" != "$ROOT/bench/results" ]; then
    cp "$RESULTS"/*.json "$RESULTS"/*.csv "$RESULTS"/*.png "$ROOT/bench/results/" 2>/dev/null || true
  fi
fi

if [ "$DRY" = 0 ]; then
  echo "== gpu_run: results in $OUT_DIR:"
  ls -la "$OUT_DIR" "$RESULTS" 2>/dev/null
  cat "$OUT_DIR/steps.txt"
fi
echo "== gpu_run: done, exit $RC"
exit "$RC"
