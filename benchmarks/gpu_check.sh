#!/usr/bin/env bash
# One script for a lent GPU machine: the card, the environment, the CUDA tests, the
# CelebA-shaped benchmark (benchmarks/bench_gpu.py) and a kernel profile
# (benchmarks/profile_gpu.py), in at most 8 minutes: one deadline (GPU_CHECK_DEADLINE, 465 s)
# bounds every step, the checks before the tests included, and each step's timeout is cut to
# what is left of it (the H200 run of 2026-12 took 84 s in all).
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # CPU smoke test: tiny benchmark sizes
#
# Writes gpu_check.log, pytest_cuda.xml, bench_gpu.log, bench_gpu.json and profile_gpu.log
# into $OUT when it is set (the device tool collects files from there), else ./gpu_results/.
# Each step has its own timeout (override with the variables below); the script runs every
# step even when one fails and exits non-zero if any did. Nothing is downloaded: the
# machine has no internet.

set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
RESULTS=${OUT:-$REPO/gpu_results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
DEADLINE=${GPU_CHECK_DEADLINE:-465}  # seconds from the start for everything (kill graces too)
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-120}  # (85 until 2026-12-07: the CUDA tests have grown)
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-245}
BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET:-205}  # seconds bench_gpu.py plans for (< its timeout)
PROFILE_TIMEOUT=${GPU_CHECK_PROFILE_TIMEOUT:-55}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mfa, installed or not
export PYTHONUNBUFFERED=1

# within TIMEOUT seconds and the deadline (less a 10 s kill grace); 0 when no time is left
# (the step is then skipped: run for 1 s, each such step's kill grace overran the deadline)
limit() { local left=$((DEADLINE - SECONDS - 10)); [ "$left" -lt 0 ] && left=0
          echo $(( $1 < left ? $1 : left )); }
limit1() { local v; v=$(limit "$1"); echo $(( v < 1 ? 1 : v )); }  # (timeout 0: no limit)
skipped() { echo "!! $1: skipped, no time left before the deadline (${DEADLINE} s)"
            failures+=("$1 (deadline)"); }

failures=()
notes=()  # what passed only in a reduced form (no CUDA device)
step() { echo; echo "== $* ($(date -u +%H:%M:%S), $((SECONDS)) s in)"; }
record() {  # record NAME RC
    if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then
        echo "!! $1: timed out (rc $2)"; failures+=("$1 (timeout)")
    elif [ "$2" -ne 0 ]; then
        echo "!! $1: failed (rc $2)"; failures+=("$1 (rc $2)")
    else
        echo "ok $1"
    fi
}

summary() {
    echo
    echo "== gpu_check finished in ${SECONDS} s; files in $RESULTS:"
    ls -l "$RESULTS" | tail -n +2
    for note in "${notes[@]}"; do echo "NOTE: $note"; done
    if [ "${#failures[@]}" -ne 0 ]; then echo "FAILED: ${failures[*]}"
    elif [ "${#notes[@]}" -ne 0 ]; then echo "ALL STEPS RAN, NOT ON A GPU (see NOTE above)"
    else echo "ALL STEPS OK"; fi
}

# the checkout's commit as the JSON files record it (scripts/_provenance.py: -dirty when
# tracked files differ from it)
commit() { timeout -k 2 20 "$PY" -c "import sys; sys.path.insert(0, 'scripts')
from _provenance import commit; print(commit())" 2>/dev/null || echo '?'; }

main() {
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') commit $(commit)"
    echo "results -> $RESULTS; quick=$QUICK"

    step "card"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout -k 2 15 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm,power.limit,mig.mode.current \
            --format=csv || true
        timeout -k 2 10 nvidia-smi -L || true
    else
        echo "nvidia-smi not found (no NVIDIA driver on this machine)"
    fi

    step "python environment"
    if ! timeout -k 5 "$(limit1 60)" "$PY" -c "import torch" 2>/dev/null; then
        echo "!! $PY cannot import torch: nothing below can run"; failures+=("torch missing")
        summary; return 1
    fi
    timeout -k 5 "$(limit1 60)" "$PY" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
need = {  # import name: why
    "numpy": "mfa.data, tests", "tqdm": "mfa.em progress bars (import mfa fails without it)",
    "yaml": "mfa.config (pyyaml)", "PIL": "mfa.data (pillow)",
    "matplotlib": "mfa.viz", "scipy": "SVHN loading", "torchvision": "declared dependency",
    "pytest": "the CUDA tests", "sklearn": "tests (test_em.py, with CUDA tests, imports it)",
}
missing = []
for name, why in need.items():
    try:
        mod = importlib.import_module(name)
        print(f"  {name:<12} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # ImportError, or a broken install
        missing.append(name)
        print(f"  {name:<12} MISSING ({why}): {type(exc).__name__}: {exc}")
print("missing:", ", ".join(missing) if missing else "nothing")
EOF

    step "mfa from this checkout"
    # PYTHONPATH puts this checkout first (no install: where importing fails, a dependency
    # marked MISSING above is, which pip could not fetch without internet)
    if ! timeout -k 5 "$(limit1 60)" "$PY" -c "import mfa; print('import mfa ok:', mfa.__file__)"
    then
        echo "!! import mfa fails: install the modules marked MISSING above"
        failures+=("import mfa")
        summary; return 1
    fi

    has_cuda=1
    timeout -k 5 "$(limit1 60)" "$PY" -c \
        "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || has_cuda=0

    lim=$(limit "$TEST_TIMEOUT")
    step "CUDA tests (timeout $lim s)"
    mapfile -t cuda_files < <(grep -lE "mark\.cuda|cuda_test_marks" tests/test_*.py)
    echo "files with CUDA tests: ${cuda_files[*]}"
    # -v: one line a test as it ends, so a step killed by its timeout shows where it hung
    # (the JUnit XML is written only at the end); a file that fails to import (a test-only
    # package missing there) stops only its own tests
    if [ "$lim" -eq 0 ]; then
        rc=-1; skipped "CUDA tests"
    else
        timeout -k 10 "$lim" "$PY" -m pytest -v -m cuda -p no:cacheprovider \
            -rs --durations=5 --continue-on-collection-errors \
            --junitxml="$RESULTS/pytest_cuda.xml" "${cuda_files[@]}"
        rc=$?
    fi
    if [ "$rc" -eq -1 ]; then
        :
    elif [ "$has_cuda" = 0 ] && [ "$rc" -eq 0 ]; then
        echo "-- CUDA tests: skipped, no CUDA device (they only collected and skipped)"
        notes+=("no CUDA device: the CUDA tests were skipped, not run")
    else
        record "CUDA tests" "$rc"
    fi

    lim=$(limit "$BENCH_TIMEOUT")
    # the budget it plans for: 40 s under its timeout (as the defaults are), never above it
    budget=$((lim - 40))
    [ "$budget" -gt "$BENCH_BUDGET" ] && budget=$BENCH_BUDGET
    [ "$budget" -lt 1 ] && budget=$(( lim / 2 > 0 ? lim / 2 : 1 ))
    if [ "$QUICK" = 1 ]; then
        step "benchmark (timeout $lim s, quick sizes on the CPU)"
        notes+=("quick mode: the benchmark and the profile ran at tiny sizes on the CPU")
        bench_args=(--quick --device cpu)
    else
        step "benchmark (timeout $lim s, budget $budget s)"
        bench_args=(--device cuda --budget-s "$budget")
    fi
    if [ "$lim" -eq 0 ]; then
        skipped "benchmark"
    else
        timeout -k 10 "$lim" "$PY" benchmarks/bench_gpu.py "${bench_args[@]}" \
            --json "$RESULTS/bench_gpu.json" 2>&1 | tee "$RESULTS/bench_gpu.log"
        record "benchmark" "${PIPESTATUS[0]}"
    fi

    lim=$(limit "$PROFILE_TIMEOUT")
    step "profile: top kernels of one E-step batch and one Adam step (timeout $lim s)"
    if [ "$QUICK" = 1 ]; then
        profile_args=(--quick --device cpu --rows 5)
    else
        profile_args=(--device cuda --modes centred float64)
    fi
    if [ "$lim" -eq 0 ]; then
        skipped "profile"
    else
        timeout -k 10 "$lim" "$PY" benchmarks/profile_gpu.py "${profile_args[@]}" \
            >"$RESULTS/profile_gpu.log" 2>&1
        record "profile" $?
        grep -E "^== |Self CUDA time total|Self CPU time total" "$RESULTS/profile_gpu.log" || true
    fi

    if command -v nvidia-smi >/dev/null 2>&1 && [ "$(limit 10)" -ge 10 ]; then
        step "card after the run"
        timeout -k 2 10 nvidia-smi --query-gpu=name,memory.used,temperature.gpu,clocks.sm \
            --format=csv || true
    fi
    summary
    [ "${#failures[@]}" -eq 0 ]
}

main 2>&1 | tee "$RESULTS/gpu_check.log"
rc=${PIPESTATUS[0]}
exit "$rc"
