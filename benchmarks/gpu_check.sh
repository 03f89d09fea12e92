#!/usr/bin/env bash
# The GPU check, one short script (< 5 min): the handout's 17M TinyStories model
# (4 layers, d_model 512, 16 heads, d_ff 1344, context 256, vocab 10000) trained in bf16 autocast,
# eager and torch.compile, at batch 128 and 256, against the torch-native peer in the same process.
# Targets: `ours` at least 1.0x native under torch.compile, and >= 2,000,000 tokens/s on one H100.
#
#   bash benchmarks/gpu_check.sh            # from the repo root; tables on stdout, JSON in $OUT
#
# Overrides, for a dry run of the script's logic on a CPU:
#   BENCH_DEVICE=cpu BENCH_MODEL="--vocab-size 128 --d-model 32 --num-layers 1 --num-heads 4 --d-ff 64 --context-length 32" \
#   BENCH_BATCHES="2 4" BENCH_STEPS=2 BENCH_EXTRA="--peak-size 128 --no-memory-probe --threads 1" \
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check}"
DEVICE="${BENCH_DEVICE:-cuda}"
MODEL="${BENCH_MODEL:---vocab-size 10000 --context-length 256 --d-model 512 --num-layers 4 --num-heads 16 --d-ff 1344}"
read -r SMALL LARGE <<< "${BENCH_BATCHES:-128 256}"
STEPS="${BENCH_STEPS:-10}"
EXTRA="${BENCH_EXTRA:-}"
mkdir -p "$OUT"
start=$SECONDS
failures=0

python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print("torch", torch.__version__, "| python", platform.python_version(), "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY

# run TAG LIMIT_S ARGS...: one benchmark process, capped at LIMIT_S seconds, table to stdout and $OUT/TAG.txt
run() {
  local tag=$1 limit=$2; shift 2
  echo "=== $tag ($(( SECONDS - start )) s elapsed) ==="
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m cs336_nb.bench $MODEL --device "$DEVICE" --dtype bfloat16 --steps "$STEPS" \
      --json "$OUT/$tag.json" $EXTRA "$@" 2>&1 | tee "$OUT/$tag.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "!!! $tag failed with status $rc"; failures=$((failures + 1)); fi
}

run "bf16_eager_b$SMALL"   50 --batch-size "$SMALL" --variants ours,native,reference
run "bf16_eager_b$LARGE"   50 --batch-size "$LARGE" --variants ours,native
run "bf16_compile_b$LARGE" 120 --batch-size "$LARGE" --variants ours,native --compile
run "bf16_compile_b$SMALL" 60 --batch-size "$SMALL" --variants ours --compile

python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
print(f"{'run':<22} {'variant':<10} {'tokens/s':>11} {'MFU':>6} {'peak mem':>9}")
for path in sorted(Path(sys.argv[1]).glob("bf16_*.json")):
    result = json.loads(path.read_text())
    for name, v in result["variants"].items():
        mem = v.get("peak_memory_bytes")
        print(f"{path.stem:<22} {name:<10} {v['tokens_per_s']:>11,.0f} {v['mfu'] or 0:>6.3f} "
              + (f"{mem / 2**30:>6.2f} GB" if mem else f"{'-':>9}"))
    for key, ratio in result["ratios"].items():
        print(f"{path.stem:<22} {key}: {ratio:.3f}x")
PY
echo "done in $(( SECONDS - start )) s, $failures failed run(s); JSON in $OUT"
exit $(( failures > 0 ))
