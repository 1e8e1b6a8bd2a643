#!/usr/bin/env bash
# The CPU step benchmark in one command (about 2 minutes: 2 min 6 s on the quiet 2-core Intel Xeon VM at 238a29e):
#   bash bench/cpu_suite.sh
# Runs bench/test_bench_step.py on the CPU (copy bandwidth, cpu-small in three dtypes, the many-small
# sweep) and turns the JSON into bench/results/<cpu>-<date>.{json,md,png}, then bench/bench_paired_step.py
# (interleaved ratios: bench/results/paired-<cpu>-<date>T<HHMM>.{json,md}). The timings are only as good
# as the machine is idle: FUSEDECAY_WAIT_QUIET_S=N first waits up to N seconds for the 1-minute load
# average to drop below 1 (each row records the load average it ran under either way).
set -euo pipefail
export PYTHONUNBUFFERED=1 FUSEDECAY_BENCH_DEVICE=cpu
cd "$(dirname "$0")/.."
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW=bench/results/raw-cpu-$STAMP.json
mkdir -p bench/results
WAIT=${FUSEDECAY_WAIT_QUIET_S:-0}
while (( WAIT > 0 )) && ! awk '{exit !($1 < 1.0)}' /proc/loadavg; do
    sleep 10; WAIT=$(( WAIT - 10 ))
done
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
python -m pytest bench/test_bench_step.py -p no:cacheprovider --benchmark-json="$RAW" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name
python bench/to_results.py "$RAW"
# Paired ratios (every candidate stepped in every round, order rotated; median per-round ratio with a 95 % CI),
# full-precision and 8-bit state, plus the tensor-count sweep (1M params in 10 … 4000 tensors):
python bench/bench_paired_step.py --dtypes fp32,bf16-fp32state,bf16 --state-bits 32,8 --sweep
