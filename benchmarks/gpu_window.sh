#!/usr/bin/env bash
# One GPU, at most 8 minutes: a per-step profile, the step benchmark, then the CIFAR-10 epoch timing
# and a reduced reproduction, in one file.
#
#   bash benchmarks/gpu_window.sh [DATASET] [--out FILE] [--quick] [--total SECONDS] [--step-budget SECONDS] [--no-step]
#
# DATASET: a folder with the CIFAR-10 schema (img, label; train/test), default ../shared/data/cifar10
# beside the repository. --out: the markdown written (default benchmarks/results/gpu.md); it is
# rewritten after every part (and on exit or interruption), so a stopped window still leaves what
# finished; the raw per-run records go beside it (gpu_runs.json for gpu.md). --quick (or
# GPU_WINDOW_QUICK=1): a CPU smoke run of every part on a tiny subset. --no-step: leave parts 0 and 1
# out (their script has a smoke test of its own).
#
# Time plan (--total, default 480 s): the card and versions (~10 s); part 0, `gpu_step.py --diagnose`
# (hard stop at 90 s): kernels, host operators, host syncs and GPU busy time per step of the hand
# loop and the trainer's modes; part 1, `gpu_step.py --graphs-first` with --time-budget 150 (hard
# stop 25 s later: the budget leaves room for its start-up): the CUDA-graph modes of the small nets
# first; part 2, benchmarks/gpu_reproduce.py in the time left less 15 s (its own deadline 10 s
# before its hard stop), with 60% of it for the cifar_resnet56 epoch timings (fused + CUDA graphs,
# then fused). Every part runs under `timeout`.
# Needs: python (or $PYTHON) with torch, transformers, accelerate, timm and datasets installed; the
# package itself is taken from this checkout's src/.

set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATASET="$REPO/../shared/data/cifar10"
OUT="$REPO/benchmarks/results/gpu.md"
QUICK="${GPU_WINDOW_QUICK:-0}"
TOTAL=480
STEP_BUDGET=150
STEP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --total) TOTAL="$2"; shift 2 ;;
    --step-budget) STEP_BUDGET="$2"; shift 2 ;;
    --no-step) STEP=0; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "gpu_window.sh: unknown option $1 (allowed: DATASET --out FILE --quick --total S --step-budget S --no-step)" >&2
        exit 2 ;;
    *) DATASET="$1"; shift ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  DEVICE=cpu; QUICK_FLAG=--quick; [ "$STEP_BUDGET" = 150 ] && STEP_BUDGET=30
else
  DEVICE=cuda; QUICK_FLAG=
fi
if [ ! -d "$DATASET" ]; then
  echo "gpu_window.sh: dataset folder $DATASET not found (give a folder with the CIFAR-10 schema as the first argument)" >&2
  exit 2
fi
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$(dirname "$OUT")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_window.XXXXXX")"
PARTS="$WORK/parts.md"   # one table row per finished part
: > "$PARTS"
SECONDS=0

log_tail() {  # the end of a part's log, for a part that failed
  printf '\n<details><summary>last lines of its log</summary>\n\n```\n'
  tail -n 30 "$1" 2>/dev/null
  printf '```\n</details>\n'
}

assemble() {
  {
    echo "# hf_graft on one GPU: step profile, step benchmark, epoch timing and reduced CIFAR-10 reproduction"
    echo
    if [ "$QUICK" = 1 ]; then echo "QUICK smoke run on the CPU (tiny subsets): checks that every part runs; no result."; echo; fi
    echo "Command: \`bash benchmarks/gpu_window.sh $DATASET${QUICK_FLAG:+ --quick}\` ($(date -u +%Y-%m-%dT%H:%MZ)); ${SECONDS} s so far of a ${TOTAL} s window."
    echo
    cat "$WORK/header.md" 2>/dev/null
    echo
    echo "| part | wall s | exit status |"
    echo "| --- | --- | --- |"
    cat "$PARTS"
    echo
    echo "## Part 0: step profile (benchmarks/gpu_step.py --diagnose)"
    echo
    if [ -s "$WORK/diagnose.md" ]; then cat "$WORK/diagnose.md"; else cat "$WORK/diagnose.note" 2>/dev/null || echo "(not run yet)"; fi
    echo
    echo "## Part 1: step benchmark (benchmarks/gpu_step.py)"
    echo
    if [ -s "$WORK/step.md" ]; then cat "$WORK/step.md"; else cat "$WORK/step.note" 2>/dev/null || echo "(not run yet)"; fi
    echo
    echo "## Part 2: reduced reproduction (benchmarks/gpu_reproduce.py)"
    echo
    if [ -s "$WORK/reproduce.md" ]; then cat "$WORK/reproduce.md"; fi
    cat "$WORK/reproduce.note" 2>/dev/null
    [ -s "$WORK/reproduce.md" ] || [ -s "$WORK/reproduce.note" ] || echo "(not run yet)"
  } > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
}
finish() {
  assemble
  [ -s "$WORK/runs/gpu_reproduce.json" ] && cp "$WORK/runs/gpu_reproduce.json" "${OUT%.md}_runs.json"
  rm -rf "$WORK"
}
trap finish EXIT
trap 'exit 130' INT TERM

run_part() {  # name, hard limit in seconds, log file, command...
  local name="$1" limit="$2" logfile="$3"; shift 3
  local start=$SECONDS
  echo "== $name (hard limit ${limit} s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$logfile"
  local rc=${PIPESTATUS[0]}
  local wall=$((SECONDS - start))
  local status="$rc"
  [ "$rc" = 124 ] && status="124 (stopped at its limit)"
  echo "| $name | $wall | $status |" >> "$PARTS"
  echo "== $name: ${wall} s, exit $status"
  return "$rc"
}

# ---------------------------------------------------------------- card and versions
run_part "card and versions" 60 "$WORK/header.log" "$PY" - "$DEVICE" <<'EOF'
import os, platform, subprocess, sys
device = sys.argv[1]
lines = []
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired):
    smi = ""
from importlib.metadata import PackageNotFoundError, version
import torch
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
lines.append(f"- card: {card}" + (f" (nvidia-smi: {smi})" if smi else "") + f"; runs on: {device}")
versions = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
for name in ("transformers", "accelerate", "timm", "datasets"):
    try:
        versions.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        versions.append(f"{name} missing")
lines.append("- versions: " + ", ".join(versions))
lines.append(f"- CPU cores: {os.cpu_count()}")
print("\n".join(lines))
EOF
grep '^- ' "$WORK/header.log" > "$WORK/header.md"
if command -v git > /dev/null; then
  (cd "$REPO" && git rev-parse --short HEAD 2>/dev/null | sed 's/^/- checkout: /') >> "$WORK/header.md"
fi
assemble

# ---------------------------------------------------------------- part 0: the step profile
if [ "$STEP" = 0 ]; then
  echo "(left out: --no-step)" > "$WORK/diagnose.note"
  echo "| step profile | 0 | left out (--no-step) |" >> "$PARTS"
elif [ -f "$REPO/benchmarks/gpu_step.py" ]; then
  run_part "step profile" 90 "$WORK/diagnose.log" \
    "$PY" "$REPO/benchmarks/gpu_step.py" --device "$DEVICE" $QUICK_FLAG --diagnose --out "$WORK/diagnose.md"
  rc=$?
  if [ "$rc" != 0 ]; then
    { echo "(gpu_step.py --diagnose exited with status $rc; what it wrote, if anything, is above)"; log_tail "$WORK/diagnose.log"; } > "$WORK/diagnose.note"
    [ -s "$WORK/diagnose.md" ] && cat "$WORK/diagnose.note" >> "$WORK/diagnose.md"
  fi
fi
assemble

# ---------------------------------------------------------------- part 1: the step benchmark
if [ "$STEP" = 0 ]; then
  echo "(left out: --no-step)" > "$WORK/step.note"
  echo "| step benchmark | 0 | left out (--no-step) |" >> "$PARTS"
elif [ -f "$REPO/benchmarks/gpu_step.py" ]; then
  run_part "step benchmark" $((STEP_BUDGET + 25)) "$WORK/step.log" \
    "$PY" "$REPO/benchmarks/gpu_step.py" --device "$DEVICE" ${QUICK_FLAG:---graphs-first} \
    --time-budget "$STEP_BUDGET" --out "$WORK/step.md"
  rc=$?
  if [ "$rc" != 0 ]; then
    { echo "(gpu_step.py exited with status $rc; what it wrote, if anything, is above)"; log_tail "$WORK/step.log"; } > "$WORK/step.note"
    [ -s "$WORK/step.md" ] && cat "$WORK/step.note" >> "$WORK/step.md"
  fi
else
  echo "(benchmarks/gpu_step.py is not in this checkout: part 1 skipped)" > "$WORK/step.note"
  echo "| step benchmark | 0 | skipped (no gpu_step.py) |" >> "$PARTS"
fi
assemble

# ---------------------------------------------------------------- part 2: the reproduction, in the time left
LEFT=$((TOTAL - SECONDS - 15))
if [ "$LEFT" -lt 60 ]; then
  echo "(only ${LEFT} s left: part 2 skipped)" > "$WORK/reproduce.note"
else
  run_part "reproduction" "$LEFT" "$WORK/reproduce.log" \
    "$PY" "$REPO/benchmarks/gpu_reproduce.py" "$DATASET" --device "$DEVICE" $QUICK_FLAG \
    --time-budget $((LEFT - 10)) --resnet56-share 0.6 --out "$WORK/reproduce.md" --work-dir "$WORK/runs"
  rc=$?
  if [ "$rc" != 0 ]; then
    { echo; echo "(gpu_reproduce.py exited with status $rc; the tables above hold the runs that finished)"; log_tail "$WORK/reproduce.log"; } > "$WORK/reproduce.note"
  fi
fi
assemble
echo "== wrote $OUT (${SECONDS} s)"
