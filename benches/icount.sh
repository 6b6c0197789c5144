#!/usr/bin/env bash
# Instruction-count regression check: each recorded pgbench session (benches/data/*.trace)
# replayed through the relay in process (`jitgate-e2e replay`: framing, classification, the
# statement tracker, audit encoding, the hash chain and the write; not TLS, not the kernel),
# under `valgrind --tool=callgrind`. Instructions do not move with the machine's load, times
# do. Each trace's first exchanges (a run of client reads and its answer: 100 of the select
# traces, one transaction each; 140 of TPC-B, seven per transaction) run twice, as 1 and as 3
# rounds of one session, and the difference is divided by the transactions of 2 rounds, so
# start-up and teardown cancel out. About 25 s on two cores.
#
#   benches/icount.sh            # compare with benches/data/icount-baseline, fail past +25%
#   benches/icount.sh --record   # write the baseline from this build
#
# BIN (default: the debug jitgate-e2e of `cargo build --workspace --bins`, which the test
# command builds anyway) and PROFILE (its cargo profile's name, kept in the baseline: counts of
# a debug build are compared only with a debug baseline), BASELINE (the file), MARGIN (1.25:
# the ratio that fails).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/jitgate-target}"
PROFILE=${PROFILE:-dev}
case $PROFILE in dev) dir=debug ;; *) dir=$PROFILE ;; esac
BIN=${BIN:-$CARGO_TARGET_DIR/$dir/jitgate-e2e}
BASELINE=${BASELINE:-benches/data/icount-baseline}
MARGIN=${MARGIN:-1.25}
record=0
[[ ${1:-} == --record ]] && record=1

command -v valgrind >/dev/null || { echo "icount: valgrind is not installed" >&2; exit 1; }
[[ -x $BIN ]] || { echo "icount: no $BIN (cargo build --workspace --bins first)" >&2; exit 1; }

# Instructions of one replay (callgrind's "Collected" total, every thread).
instructions() { # trace rounds exchanges
    local out
    out=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null "$BIN" replay "$1" --rounds "$2" --exchanges "$3" 2>&1) || {
        echo "$out" | tail -20 >&2
        echo "icount: the replay of $1 failed" >&2
        exit 1
    }
    sed -n 's/^==[0-9]*== Collected : \([0-9]*\)$/\1/p' <<<"$out"
}

declare -A base=()
if [[ $record == 0 ]]; then
    [[ -f $BASELINE ]] || { echo "icount: no $BASELINE (benches/icount.sh --record)" >&2; exit 1; }
    base_profile=$(sed -n 's/^profile \(.*\)$/\1/p' "$BASELINE")
    [[ $base_profile == "$PROFILE" ]] || {
        echo "icount: the baseline is of profile $base_profile, this build is $PROFILE" >&2
        exit 1
    }
    while read -r name value; do
        [[ $name == profile || -z $name ]] || base[$name]=$value
    done <"$BASELINE"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
lines=("profile $PROFILE")
failed=0
printf '%-16s %14s %14s %7s\n' trace "instr/tx" baseline ratio
for trace in select-simple select-extended select-prepared tpcb-simple; do
    # exchanges per round, and transactions in them
    case $trace in tpcb-*) ex=140 tx=20 ;; *) ex=100 tx=100 ;; esac
    # The two runs side by side (two cores; counts do not depend on it).
    instructions "$trace" 1 "$ex" >"$tmp/one" &
    first=$!
    three=$(instructions "$trace" 3 "$ex")
    wait "$first"
    one=$(<"$tmp/one")
    per_tx=$(((three - one) / (2 * tx)))
    lines+=("$trace $per_tx")
    if [[ $record == 1 ]]; then
        printf '%-16s %14d %14s %7s\n' "$trace" "$per_tx" - -
        continue
    fi
    b=${base[$trace]:-}
    [[ -n $b ]] || { echo "icount: $trace is not in $BASELINE" >&2; exit 1; }
    ratio=$(awk -v a="$per_tx" -v b="$b" 'BEGIN{printf "%.3f", a / b}')
    verdict=""
    if awk -v r="$ratio" -v m="$MARGIN" 'BEGIN{exit !(r > m)}'; then
        verdict="  over the margin ($MARGIN)"
        failed=1
    fi
    printf '%-16s %14d %14d %7s%s\n' "$trace" "$per_tx" "$b" "$ratio" "$verdict"
done
if [[ $record == 1 ]]; then
    printf '%s\n' "${lines[@]}" >"$BASELINE"
    echo "icount: wrote $BASELINE"
    exit 0
fi
if [[ $failed == 1 ]]; then
    echo "icount: instructions per transaction grew past the margin; if that is intended, record a new baseline (benches/icount.sh --record) and say why in the commit" >&2
    exit 1
fi
