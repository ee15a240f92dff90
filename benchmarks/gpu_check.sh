#!/usr/bin/env bash
# One command for a CUDA machine with torch, torchvision and triton installed (no network, no
# pip, no .venv): the GPU tests, the ResNet-50 throughput grid, the masked-SGD kernel benchmark,
# the data-pipeline benchmark, the demo recipe under torchrun and, with several GPUs, the DDP
# bucket sizes. Each part runs under `timeout` and the next one runs whatever
# happened; the limits add up to 415 s, so the whole script stays under 7 minutes (give the device
# call 480 s: start-up and a killed part's 10 s grace come on top). Results and the log go to $OUT when
# set, else to benchmarks/results/<date>-<card>/; a summary of what passed ends the log.
#
#   bash benchmarks/gpu_check.sh
#
# Environment: PYTHON (default python3), THROUGHPUT_ARGS (more benchmarks/throughput.py flags),
# PARTS (names of the parts to run, e.g. "kernels demo"; default all but autotune and
# structured, which run only when named: `PARTS=autotune bash benchmarks/gpu_check.sh` is a call
# of its own, `PARTS=structured` takes 55 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEFAULT_PARTS="gpu-tests throughput kernels data demo ddp"
OPT_IN_PARTS="structured autotune"
for name in ${PARTS:-}; do
  if [[ " $DEFAULT_PARTS $OPT_IN_PARTS " != *" $name "* ]]; then
    echo "gpu_check: PARTS: unknown part '$name' (parts: $DEFAULT_PARTS $OPT_IN_PARTS)" >&2
    exit 2
  fi
done

probe='import torch; assert torch.cuda.is_available()
print(torch.cuda.device_count(), torch.cuda.get_device_name())'
if ! found=$("$PY" -c "$probe" 2>/dev/null); then
  echo "gpu_check: $PY sees no CUDA device (or no torch); nothing run" >&2
  exit 2
fi
read -r ngpu card <<<"$found"
slug=$(printf '%s' "$card" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-')
RESULTS=${OUT:-benchmarks/results/$(date -u +%Y%m%d)-${slug%-}}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check.log
: >"$LOG"

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, platform
from importlib import metadata

import torch

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"

props = torch.cuda.get_device_properties(0)
print(f"card: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
      f", torchvision {version('torchvision')}, triton {version('triton')}"
      f", python {platform.python_version()}")
print("date:", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
EOF
nvidia-smi --query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1 |
  tee -a "$LOG"

SUMMARY=()
FAILED=0

part() { # NAME SECONDS COMMAND...: run under a time limit, log it, record the outcome
  local name=$1 limit=$2 start=$SECONDS rc status
  shift 2
  [[ " ${PARTS:-$DEFAULT_PARTS} " == *" $name "* ]] || return 0
  printf '\n=== %s (limit %ss): %s\n' "$name" "$limit" "$*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  [[ $rc == 0 ]] || FAILED=1
  SUMMARY+=("$(printf '%-11s %-15s %4ds' "$name" "$status" $((SECONDS - start)))")
}

# Budgets (seconds): 45 + 230 + 30 + 50 + 60 = 415, on one GPU. The H100 run of 2026-11-27
# (a fresh machine) took 35 s for the GPU tests, 41 for data and 25 for the demo's training
# after its start-up; its kernels part gave no line in 20 s; compiling ResNet-50 took 80 s
# (54 on the next fresh machine), the baseline loop's first row 28 s.
# With several GPUs the ddp part takes 40 s of the grid's. The throughput grid starts no row
# after 170 s and writes its JSON and table after every row, so a timeout keeps the rows
# already measured. Its rows reading files run 113 steps (2 x 16 + 1 warm-up, 5 windows of 16),
# about 16 s for the baseline loop; the rows after the first compiled one reuse its graph from
# inductor's cache (3-6 s of warm-up).
grid_s=170
((ngpu > 1)) && grid_s=130
part gpu-tests 45 "$PY" -m pytest -m gpu -q -rs --tb=short -p no:cacheprovider \
  --continue-on-collection-errors
# shellcheck disable=SC2086 # THROUGHPUT_ARGS is a list of flags
part throughput $((grid_s + 60)) "$PY" benchmarks/throughput.py --budget-s "$grid_s" \
  --out "$RESULTS/throughput" ${THROUGHPUT_ARGS:-}
part kernels 30 "$PY" benchmarks/kernels.py --device cuda --out "$RESULTS"
part data 50 "$PY" benchmarks/data.py --out "$RESULTS"
# The demo recipe end to end as users run it (torchrun, checkpoints, the Triton update in
# retraining), with the GPU settings and nvJPEG decoding (the prefetch thread and the crop
# kernel across epoch ends, evals and stages); its run folder stays out of $OUT. One process:
# torchrun makes no process group for a world of one, so NCCL and DDP run only in the ddp part.
scratch=$(mktemp -d)  # what stays out of $OUT
trap 'rm -rf "$scratch"' EXIT
part demo 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m engine.run \
  recipes/demo.yaml precision.amp=bf16 precision.channels_last=true data.decode=gpu data.workers=4 \
  data.root="$scratch/data" run.dir="$scratch/run"
# DDP bucket sizes on every GPU of the machine (eager ResNet-50, five rows of about 5 s); DDP
# needs two GPUs at least, so on one this part is skipped, and said so.
if ((ngpu > 1)); then
  part ddp 40 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" \
    benchmarks/ddp.py --bucket-mb 10 25 50 100 --out "$RESULTS"
elif [[ " ${PARTS:-$DEFAULT_PARTS} " == *" ddp "* ]]; then
  printf '\n=== ddp: skipped, DDP needs 2 GPUs or more\n' | tee -a "$LOG"
  SUMMARY+=("$(printf '%-11s %-15s %4ds' ddp "SKIP (1 GPU)" 0)")
fi
# Opt-in: dense vs filter-pruned training steps (7 models, measured on the H200 and the H100 of
# 2026-11-27; each row printed as measured, the table to the log only).
part structured 55 "$PY" benchmarks/structured.py --device cuda
# Opt-in: torch.compile's max-autotune modes, which benchmark Triton templates for every conv
# and matmul shape (minutes on ResNet-50; the second row reuses the first's autotuning). Its
# table goes to the log only: the default parts already fill the 8 files a device call returns.
# Plain compile first: the side-by-side reference. Each finished row prints its line to the log.
# It needs a device call of its own (about 7 minutes with the machine's start): no row starts
# after 300 s.
part autotune 400 "$PY" benchmarks/throughput.py --out "$scratch/autotune" --budget-s 300 --rows \
  default/nhwc/bf16/dense/synthetic max-autotune-no-cudagraphs/nhwc/bf16/dense/synthetic \
  max-autotune/nhwc/bf16/dense/synthetic

{
  printf '\n=== summary: %s, results in %s\n' "$card" "$RESULTS"
  printf '%s\n' "${SUMMARY[@]}"
  for table in "$RESULTS"/{throughput,masked_sgd_cuda,data_cuda,ddp}.md; do
    [[ -f $table ]] && printf '\n' && cat "$table"
  done
} | tee -a "$LOG"
exit "$FAILED"
