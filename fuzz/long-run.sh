#!/usr/bin/env bash
# One long fuzz run of TARGET until the fuzzer has used CPU_SECONDS of CPU (default 1860,
# 31 CPU-minutes), at the lowest priority so it only takes idle CPU.
#
#   fuzz/long-run.sh TARGET [CPU_SECONDS]
#
# Builds the targets first (cargo fuzz build -s none). The run is cut into segments of at
# most 10 minutes of wall time on one corpus, because a niced process on a busy machine gets
# less CPU than wall time: segments go on until their CPU time adds up to CPU_SECONDS.
# Writes LOG_DIR/long-TARGET.log (libFuzzer's output) and appends one summary line to
# LOG_DIR/summary.txt: CPU seconds, wall seconds, total execs, execs per CPU second, the
# last cov/ft/corpus line. Exits non-zero when the fuzzer finds a crash (the reproducer is
# in fuzz/artifacts/TARGET/).
#
# Environment: NICE (priority of the fuzzer, default 19), LOG_DIR (default ~/.cache/jitgate-fuzz/logs), CORPUS_DIR (working corpora,
# default ~/.cache/jitgate-fuzz/corpus), FUZZ_TARGET_DIR (default ~/.cache/jitgate-fuzz/target).
set -euo pipefail
cd "$(dirname "$0")"
target=$1
budget=${2:-1860}
cache=${HOME:-/root}/.cache/jitgate-fuzz
log_dir=${LOG_DIR:-$cache/logs}
corpus=${CORPUS_DIR:-$cache/corpus}/$target
target_dir=${FUZZ_TARGET_DIR:-$cache/target}
mkdir -p "$log_dir" "$corpus" "artifacts/$target"
log=$log_dir/long-$target.log
: >"$log"

cargo fuzz build -s none --target-dir "$target_dir" "$target" >>"$log" 2>&1
bin=$target_dir/x86_64-unknown-linux-gnu/release/$target

# CPU seconds (user + system) of this shell's finished children, from the `times` builtin.
# `times` must run in this shell, not in a $(...) subshell, which has no children of its own.
times_file=$(mktemp)
trap 'rm -f "$times_file"' EXIT
children_cpu() {
    sed -n 2p "$times_file" | awk '{
        total = 0
        for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); total += p[1] * 60 + p[2] }
        printf "%d", total
    }'
}

start=$(date +%s)
times >"$times_file"
base=$(children_cpu)
cpu=0
execs=0
segment=0
while ((cpu < budget)); do
    segment=$((segment + 1))
    wall=$((budget - cpu))
    ((wall > 600)) && wall=600
    echo "== segment $segment: -max_total_time=$wall (CPU so far ${cpu}s of ${budget}s)" >>"$log"
    seg_log=$(mktemp)
    status=0
    nice -n "${NICE:-19}" "$bin" -max_total_time="$wall" -print_final_stats=1 -artifact_prefix="artifacts/$target/" \
        "$corpus" "seeds/$target" >"$seg_log" 2>&1 || status=$?
    cat "$seg_log" >>"$log"
    n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$seg_log" | tail -1)
    execs=$((execs + ${n:-0}))
    last=$(grep -E '^#[0-9]+' "$seg_log" | tail -1 || true)
    rm -f "$seg_log"
    times >"$times_file"
    cpu=$(($(children_cpu) - base))
    if ((status != 0)); then
        echo "$target: FAILED (status $status) after ${cpu} CPU-s, see $log" | tee -a "$log_dir/summary.txt"
        exit "$status"
    fi
done
wall_total=$(($(date +%s) - start))
per_s=$((execs / (cpu > 0 ? cpu : 1)))
corpus_files=$(find "$corpus" -type f | wc -l)
echo "$target: cpu_s=$cpu wall_s=$wall_total segments=$segment execs=$execs execs_per_cpu_s=$per_s corpus_files=$corpus_files last: $last" |
    tee -a "$log_dir/summary.txt"
