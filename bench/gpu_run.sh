#!/usr/bin/env bash
# The one command to run on a GPU machine (H200: torch 2.11+cu130, Triton 3.6, Python 3.12, no
# network), within a time budget, results packed into at most 8 files in $OUT:
#   1. build: use prebuilt/_C*.so when prebuilt/STAMP matches this machine (tools/build_prebuilt.sh
#      makes it), else build in place for this GPU's arch only (MAX_JOBS=16)
#   2. tests on the GPU, each result printed as it finishes (-v): the cuda-marked tests, then
#      tests/test_attention.py; pytest-xdist (-n) when installed, a per-test time limit
#      (pytest-timeout, else bench/gpu_pytest_alarm.py), `timeout` around each group
#   3. bench (bfloat16): attention (fastbig vs SDPA flash and cuDNN; D 64/128, S 1k-16k, causal
#      and not, fwd and fwd+bwd), LSTM vs cuDNN, conv-bn-relu vs cuDNN eager and torch.compile;
#      the harness's --budget stops starting cases when the time left is spent
#   4. pack: summary.txt env.txt build.log tests.log bench.log bench-results.tar.gz
#
# usage: bash bench/gpu_run.sh [--out DIR] [--budget SECONDS] [--quick] [--op OPS] [--dtype DTYPES]
#                              [--prebuilt DIR] [--jobs N] [--test-timeout SECONDS]
#                              [--skip-build] [--skip-tests] [--skip-bench] [--cpu] [--dry-run]
#   --out DIR       where results go (default: $OUT, else bench/results/gpu-run-<date>)
#   --budget S      seconds for the whole run, packing included (default 500: fits a 9-minute slot)
#   --quick         fastbig bench --quick (fewer cases, fewer samples)
#   --op/--dtype    ops to benchmark (default attention,lstm,conv_bn_relu) and dtypes (bfloat16)
#   --prebuilt DIR  folder with a prebuilt _C*.so and its STAMP (default prebuilt/)
#   --jobs N        pytest-xdist workers when xdist is installed (default 8)
#   --test-timeout  seconds one test may run (default 120)
#   --cpu           no GPU: the same steps on the CPU with tiny cases (C++-only build; a few tests,
#                   FASTBIG_GPU_RUN_TESTS overrides which; bench --smoke): to check this script
#   --dry-run       print every step (with the arch and build decision) and run none
# Exit code: 0 when every step passed; else the first failing step's code (later steps still run;
# a step cut by the budget counts as failed: 124).
set -uo pipefail

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-}
QUICK=""; OPS="attention,lstm,conv_bn_relu"; DTYPES=""; DRY=0; CPU=0
SKIP_BUILD=0; SKIP_TESTS=0; SKIP_BENCH=0
BUDGET=500; PREBUILT=prebuilt; JOBS=8; TEST_TIMEOUT=120
PACK_RESERVE=15; BENCH_MIN=200  # seconds kept for the bench after the tests

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "gpu_run: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die "$1 needs a value"; }
need_int() { case "$2" in ''|*[!0-9]*) die "$1: expected a whole number of seconds/workers, got '$2'" ;; esac; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out)          need_arg "$@"; OUT_DIR=$2; shift 2 ;;
    --out=*)        OUT_DIR=${1#--out=}; shift ;;
    --op)           need_arg "$@"; OPS=$2; shift 2 ;;
    --dtype)        need_arg "$@"; DTYPES=$2; shift 2 ;;
    --budget)       need_arg "$@"; need_int "$1" "$2"; BUDGET=$2; shift 2 ;;
    --prebuilt)     need_arg "$@"; PREBUILT=$2; shift 2 ;;
    --jobs)         need_arg "$@"; need_int "$1" "$2"; JOBS=$2; shift 2 ;;
    --test-timeout) need_arg "$@"; need_int "$1" "$2"; TEST_TIMEOUT=$2; shift 2 ;;
    --quick)        QUICK="--quick"; shift ;;
    --cpu)          CPU=1; shift ;;
    --dry-run)      DRY=1; shift ;;
    --skip-build)   SKIP_BUILD=1; shift ;;
    --skip-tests)   SKIP_TESTS=1; shift ;;
    --skip-bench)   SKIP_BENCH=1; shift ;;
    -h|--help)      usage; exit 0 ;;
    *)              usage >&2; die "unknown argument: $1" ;;
  esac
done

for o in ${OPS//,/ }; do
  case "$o" in attention|lstm|conv_bn_relu|models|all) ;;
    *) die "--op: expected attention|lstm|conv_bn_relu|models|all (comma list), got '$OPS'" ;;
  esac
done
case ",$OPS," in *,all,*) OPS="attention,lstm,conv_bn_relu,models" ;; esac
if [ -z "$DTYPES" ]; then if [ "$CPU" = 1 ]; then DTYPES=float32; else DTYPES=bfloat16; fi; fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || die "cannot cd to $ROOT"
[ -f setup.py ] || die "$ROOT has no setup.py: run this from the fastbig checkout"
command -v "$PY" >/dev/null 2>&1 || die "python not found: $PY (set PYTHON=...)"
case "$PREBUILT" in /*) ;; *) PREBUILT="$ROOT/$PREBUILT" ;; esac
export PY ROOT PREBUILT

STAMP_DATE=$(date -u +%Y-%m-%d)
[ -n "$OUT_DIR" ] || OUT_DIR="$ROOT/bench/results/gpu-run-$STAMP_DATE"

DEVICE=cuda
if [ "$CPU" = 1 ]; then
  DEVICE=cpu; ARCH=""
else
  # The local GPU's arch, e.g. 9.0 on an H100/H200 (no GPU: stop here, unless only printing).
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  case "$ARCH" in [0-9]*.[0-9]*) ;; *) ARCH="" ;; esac
  if [ -z "$ARCH" ] && ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    ARCH=$("$PY" -c 'import torch
if not torch.cuda.is_available(): raise SystemExit(1)
print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  fi
  if [ -z "$ARCH" ]; then
    if [ "$DRY" = 1 ]; then ARCH="9.0";
    else die "no CUDA GPU visible to torch: use --cpu, or --dry-run to see the steps"; fi
  fi
fi

left() { echo $(( BUDGET - SECONDS )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

RC=0
WORK=""
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX") || die "cannot create a work folder"
  trap 'rm -rf "$WORK"' EXIT
  : > "$WORK/steps.txt"
fi

# step NAME LOG LIMIT CMD...: run (or print) one step under `timeout LIMIT`, log appended to
# $OUT_DIR/LOG; records its exit code and seconds. LIMIT <= 0: not run (no time left: 124).
step() {
  local name=$1 log=$2 limit=$3; shift 3
  echo "== gpu_run: $name [limit ${limit}s, ${SECONDS}s elapsed]: $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS rc
  if [ "$limit" -le 0 ]; then
    rc=124; echo "== gpu_run: $name: not run, no time left in the budget" | tee -a "$OUT_DIR/$log"
  else
    echo "== $name: $*" >> "$OUT_DIR/$log"
    if declare -F "$1" >/dev/null; then  # a function of this script: `timeout` needs a program
      export -f "$1"; set -- bash -c '"$0" "$@"' "$@"
    fi
    timeout -k 10 "$limit" "$@" > >(tee -a "$OUT_DIR/$log") 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "== gpu_run: $name: stopped by its time limit (${limit}s)" | tee -a "$OUT_DIR/$log"
  fi
  echo "== gpu_run: $name: exit $rc ($(( SECONDS - t0 ))s)"
  printf '%-34s exit %3d  %4ds\n' "$name" "$rc" "$(( SECONDS - t0 ))" >> "$WORK/steps.txt"
  if [ "$rc" -ne 0 ] && [ "$RC" -eq 0 ]; then RC=$rc; fi
  return 0
}

echo "== gpu_run: root=$ROOT device=$DEVICE arch=${ARCH:-none} out=$OUT_DIR python=$PY budget=${BUDGET}s"
if [ "$DRY" = 0 ]; then
  { echo "date $(date -u +%FT%TZ)  budget ${BUDGET}s  args: device=$DEVICE arch=${ARCH:-none} ops=$OPS dtypes=$DTYPES $QUICK"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    for m in xdist pytest_timeout ninja; do "$PY" -c "import $m" 2>/dev/null && echo "$m: yes" || echo "$m: no"; done
    echo "cpus $(nproc)"; nvidia-smi 2>&1 | head -15; git rev-parse HEAD 2>&1; git status --short 2>&1 | head -20
  } > "$OUT_DIR/env.txt" 2>&1
fi

# ---- 1. build ---------------------------------------------------------------------------------
build() {  # build ARCH_OR_EMPTY: in place, for this arch only
  if [ -n "$1" ]; then export TORCH_CUDA_ARCH_LIST="$1"; else export FASTBIG_CPU_ONLY=1; fi
  export MAX_JOBS="${MAX_JOBS:-16}"
  "$PY" setup.py -q build_ext --inplace
}
use_prebuilt() {  # copy the prebuilt .so into fastbig/ (the stamp was checked)
  rm -f "$ROOT"/fastbig/_C.cpython-*.so && cp -v "$PREBUILT"/_C*.so "$ROOT/fastbig/"
}
prebuilt_ok() {  # 0 when $PREBUILT has a .so whose STAMP is this machine's
  ls "$PREBUILT"/_C*.so >/dev/null 2>&1 && [ -f "$PREBUILT/STAMP" ] || { echo "no prebuilt _C in $PREBUILT"; return 1; }
  local want have
  want=$("$PY" tools/prebuilt_stamp.py --archs "${ARCH:-cpu}" 2>/dev/null)
  have=$(cat "$PREBUILT/STAMP")
  if [ "$want" = "$have" ]; then echo "prebuilt _C matches: $have"; return 0; fi
  echo "prebuilt _C is stale or foreign: its STAMP '$have', this machine '$want'"; return 1
}

if [ "$SKIP_BUILD" = 0 ]; then
  if [ "$CPU" = 1 ]; then
    step "build (C++ only)" build.log "$(min 600 $(( $(left) - PACK_RESERVE )))" build ""
  else
    why=$(prebuilt_ok); ok=$?
    echo "== gpu_run: $why"
    [ "$DRY" = 0 ] && echo "$why" >> "$OUT_DIR/build.log"
    if [ "$ok" = 0 ]; then
      step "build (prebuilt)" build.log 60 use_prebuilt
      if [ "$DRY" = 0 ] && ! "$PY" -m fastbig.bench.buildcheck cuda >> "$OUT_DIR/build.log" 2>&1; then
        echo "== gpu_run: the prebuilt _C does not load here (build.log): building instead" | tee -a "$OUT_DIR/build.log"
        ok=1
      fi
    fi
    if [ "$ok" != 0 ]; then
      step "build (TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=${MAX_JOBS:-16})" build.log \
        "$(min 300 $(( $(left) - 150 )))" build "$ARCH"
    fi
  fi
  step build-info build.log 60 "$PY" -m fastbig.bench.buildcheck "$DEVICE"
fi

# ---- 2. tests ---------------------------------------------------------------------------------
PYTEST_ARGS=(-v -rfE -p no:cacheprovider --durations=15)
XDIST=0; "$PY" -c "import xdist" 2>/dev/null && XDIST=1
if [ "$XDIST" = 1 ] && [ "$JOBS" -gt 1 ]; then PYTEST_ARGS+=(-n "$JOBS"); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  PYTEST_ARGS+=(--timeout "$TEST_TIMEOUT")
else
  export PYTHONPATH="$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
  PYTEST_ARGS+=(-p gpu_pytest_alarm --alarm-timeout "$TEST_TIMEOUT")
fi

if [ "$SKIP_TESTS" = 0 ]; then
  if [ "$CPU" = 1 ]; then
    # shellcheck disable=SC2206
    SEL=(${FASTBIG_GPU_RUN_TESTS:-tests/test_bench.py -k "tolerances or flop_counts"})
    step tests tests.log "$(( $(left) - PACK_RESERVE - 30 ))" "$PY" -m pytest "${SEL[@]}" "${PYTEST_ARGS[@]}"
  else
    # what is left after the tests: BENCH_MIN s of bench at least (unless it is skipped), and packing
    rest=$(( $(left) - PACK_RESERVE - (SKIP_BENCH == 1 ? 0 : BENCH_MIN) ))
    step "tests (cuda-marked)" tests.log "$(min 150 $(( rest * 2 / 5 )))" \
      "$PY" -m pytest tests -m cuda --ignore=tests/test_attention.py "${PYTEST_ARGS[@]}"
    rest=$(( $(left) - PACK_RESERVE - (SKIP_BENCH == 1 ? 0 : BENCH_MIN) ))
    step "tests (test_attention.py)" tests.log "$(min 240 "$rest")" \
      "$PY" -m pytest tests/test_attention.py "${PYTEST_ARGS[@]}"
  fi
fi

# ---- 3. bench ---------------------------------------------------------------------------------
# Each pass has its own results folder (the harness names its files by device and date) and a
# share of the time left; the harness's --budget stops starting cases, `timeout` is the backstop.
bench_pass() {  # bench_pass NAME SHARE_PERCENT ARGS...
  local name=$1 share=$2; shift 2
  local t=$(( ($(left) - PACK_RESERVE) * share / 100 ))
  [ "$DRY" = 1 ] && t=${t#-}
  step "bench $name" bench.log "$t" "$PY" -m fastbig.bench --device "$DEVICE" --dtype "$DTYPES" \
    --no-plot --budget "$(( t > 20 ? t - 20 : 1 ))" --out "${WORK:-\$WORK}/results/$name" $QUICK "$@"
}
has_op() { case ",$OPS," in *,$1,*) return 0 ;; esac; return 1; }

if [ "$SKIP_BENCH" = 0 ]; then
  if [ "$CPU" = 1 ]; then
    for o in ${OPS//,/ }; do bench_pass "$o" 50 --op "$o" --smoke; done
  else
    # priority first: S 1k/4k/16k of attention, LSTM, conv-bn-relu; then the other lengths
    has_op attention && bench_pass attention 40 --op attention --case S1024 --case S4096 --case S16384 \
      --impl =fastbig --impl "=sdpa[flash]" --impl "=sdpa[cudnn]"
    has_op lstm && bench_pass lstm 35 --op lstm --case H256 --case H1024 --impl =fastbig --impl =torch.nn
    has_op conv_bn_relu && bench_pass conv_bn_relu 50 --op conv_bn_relu \
      --impl =fastbig --impl =torch.nn --impl "=compile(torch.nn)" --impl =eager --impl "=compile(eager)"
    has_op attention && bench_pass attention-more 100 --op attention --case S512 --case S2048 --case S8192 \
      --impl =fastbig --impl "=sdpa[flash]" --impl "=sdpa[cudnn]"
    has_op models && bench_pass models 100 --op models
  fi
fi

# ---- 4. pack: at most 8 files in $OUT_DIR --------------------------------------------------------
if [ "$DRY" = 0 ]; then
  if [ -d "$WORK/results" ]; then
    tar -C "$WORK" -czf "$OUT_DIR/bench-results.tar.gz" results 2>/dev/null
  fi
  {
    echo "gpu_run summary ($(date -u +%FT%TZ)): device=$DEVICE arch=${ARCH:-none} ${SECONDS}s of a ${BUDGET}s budget, exit $RC"
    echo; echo "steps:"; cat "$WORK/steps.txt"
    if [ -f "$OUT_DIR/tests.log" ]; then
      echo; echo "tests (pytest result lines):"
      grep -E "^(=+ .*(passed|failed|error|skipped|no tests ran).* =+|FAILED |ERROR )" "$OUT_DIR/tests.log" | head -60
      grep -c " PASSED" "$OUT_DIR/tests.log" | sed 's/^/PASSED lines: /'
    fi
    if [ -f "$OUT_DIR/bench.log" ]; then
      echo; echo "bench (harness verdicts):"
      grep -E "WRONG|ERROR|not run: --budget|elapsed [0-9]+ s|fastbig implementations that" "$OUT_DIR/bench.log" | head -80
    fi
    echo; echo "files:"; (cd "$OUT_DIR" && ls -la)
  } > "$OUT_DIR/summary.txt" 2>&1
  n=$(find "$OUT_DIR" -mindepth 1 -maxdepth 1 | wc -l)
  if [ "$n" -gt 8 ]; then  # never more than 8 things come back: the rest in one archive
    extra=$(cd "$OUT_DIR" && ls -1 | grep -vxE "summary.txt|env.txt|build.log|tests.log|bench.log|bench-results.tar.gz|extra.tar.gz")
    # shellcheck disable=SC2086
    (cd "$OUT_DIR" && tar -czf extra.tar.gz $extra && rm -rf $extra)
  fi
  cat "$OUT_DIR/summary.txt"
fi
echo "== gpu_run: done in ${SECONDS}s, exit $RC"
exit "$RC"
