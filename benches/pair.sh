#!/usr/bin/env bash
# Paired CPU comparison of proxies on the plain forward path: each takes its turn in short
# slices, one right after the other, PAIRS times, and the ratio is taken pair by pair. This
# VM's speed drifts by 10-20% within minutes; two proxies measured seconds apart see the same
# machine, where benches/load.sh's slots (a dozen targets a run) can be half a minute apart.
#
#   benches/pair.sh                                   # the hyper floor vs this build
#   benches/pair.sh /tmp/authrelay-old target/release/authrelay   # two builds
#   PAIRS=10 CONNS=256 benches/pair.sh
#
# Each proxy is started fresh per slice, pinned to PROXY_CORE, warmed for WARMUP seconds, then
# loaded for SLICE seconds by wrk (absolute-form forward requests, on LOAD_CORE with the
# upstream). CPU time per request is user + system time from /proc/PID/stat over the slice. A
# name ending in `hyper_floor` is started as the floor (examples/hyper_floor.rs); anything
# else as authrelay with a static credential and `RUST_LOG=warn`, as in benches/load.sh.
# Prints each slice, each pair's ratio (second ÷ first) and their median and range.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-6}
CONNS=${CONNS:-32}
SLICE=${SLICE:-6}
WARMUP=${WARMUP:-2}
UP_PORT=${UP_PORT:-18291}
PROXY_PORT=${PROXY_PORT:-18294}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
WORK=$(mktemp -d /tmp/authrelay-pair.XXXXXX)
. benches/common.sh
command -v wrk >/dev/null || { echo "wrk is needed (benches/load.sh installs it)" >&2; exit 1; }

cargo build --release --quiet --bin authrelay --example bench_upstream --example hyper_floor
if [ $# -eq 0 ]; then set -- target/release/examples/hyper_floor target/release/authrelay; fi
[ $# -eq 2 ] || { echo "usage: benches/pair.sh [FIRST SECOND]" >&2; exit 2; }

bench_config "$PROXY_PORT" "$UP_PORT" >"$WORK/routes.yaml"
echo "wrk.path = \"http://127.0.0.1:$UP_PORT$PATH_QS\"" >"$WORK/forward.lua"

BENCH_EXPECT="$TOKEN" taskset -c "$LOAD_CORE" target/release/examples/bench_upstream "127.0.0.1:$UP_PORT" 2>/dev/null &
PIDS+=($!); wait_port "$UP_PORT"
CLK_TCK=$(getconf CLK_TCK)

slice() { # binary -> "microseconds-per-request user-microseconds-per-request"
    local bin=$1 pid ticks0 user0 ticks1 user1 n
    if [[ $bin == *hyper_floor ]]; then
        taskset -c "$PROXY_CORE" "$bin" "127.0.0.1:$PROXY_PORT" "127.0.0.1:$UP_PORT" "$TOKEN" >/dev/null 2>&1 &
    else
        RUST_LOG=warn taskset -c "$PROXY_CORE" "$bin" --config "$WORK/routes.yaml" run >/dev/null 2>&1 &
    fi
    pid=$!
    wait_port "$PROXY_PORT"
    taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "$WORK/forward.lua" "http://127.0.0.1:$PROXY_PORT/" >/dev/null
    read -r user0 ticks0 < <(awk '{ print $14, $14 + $15 }' "/proc/$pid/stat")
    n=$(taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${SLICE}s" -s "$WORK/forward.lua" "http://127.0.0.1:$PROXY_PORT/" |
        awk '/ requests in / { print $1 }')
    read -r user1 ticks1 < <(awk '{ print $14, $14 + $15 }' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    awk -v t=$((ticks1 - ticks0)) -v u=$((user1 - user0)) -v n="$n" -v hz="$CLK_TCK" \
        'BEGIN { printf "%.3f %.3f\n", t / hz * 1e6 / n, u / hz * 1e6 / n }'
}

echo "paired slices: $PAIRS x (${WARMUP}s warm-up + ${SLICE}s), $CONNS connections; proxy on core $PROXY_CORE, wrk + upstream on core $LOAD_CORE"
echo "first:  $1"
echo "second: $2"
ratios=() user_ratios=()
for pair in $(seq "$PAIRS"); do
    # Alternate which goes first, so that a drift within a pair weighs on both alike.
    if (( pair % 2 )); then a=$(slice "$1"); b=$(slice "$2"); else b=$(slice "$2"); a=$(slice "$1"); fi
    read -r cpu_a user_a <<<"$a"; read -r cpu_b user_b <<<"$b"
    ratio=$(awk -v a="$cpu_a" -v b="$cpu_b" 'BEGIN { printf "%.3f", b / a }')
    user_ratio=$(awk -v a="$user_a" -v b="$user_b" 'BEGIN { printf "%.3f", b / a }')
    ratios+=("$ratio"); user_ratios+=("$user_ratio")
    printf 'pair %d: CPU us/request %s / %s = %s (user alone %s / %s = %s)\n' \
        "$pair" "$cpu_a" "$cpu_b" "$ratio" "$user_a" "$user_b" "$user_ratio"
done
summary() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { printf "median %.3f, range %.3f-%.3f", a[int((NR + 1) / 2)], a[1], a[NR] }'; }
echo "second / first, CPU per request: $(summary "${ratios[@]}"); user alone: $(summary "${user_ratios[@]}")"
