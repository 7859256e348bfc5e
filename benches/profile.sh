#!/usr/bin/env bash
# Where authrelay's user-space instructions per request go: runs the release binary under
# callgrind behind the same loopback upstream as benches/load.sh, sends wrk traffic at
# CONNS connections (absolute-form forward-proxy requests), and prints the instructions per
# request and callgrind_annotate's inclusive and exclusive tables.
#
#   benches/profile.sh                     # RUST_LOG=warn, 32 connections, 5 s
#   LEVEL=info CONNS=256 benches/profile.sh
#   MODE=https WARMUP=15 benches/profile.sh # the upstream over TLS (keep-alive; the warm-up
#                                          # opens the pool: handshakes are slow under valgrind)
#   MODE=mount benches/profile.sh           # origin-form requests to a mount (reverse proxy)
#
# Instruction counts are repeatable on a shared machine where timings are not; the kernel's
# share (syscalls) is not counted.
set -euo pipefail
cd "$(dirname "$0")/.."
LEVEL=${LEVEL:-warn}
CONNS=${CONNS:-32}
DURATION=${DURATION:-5}
MODE=${MODE:-plain}
UP_PORT=${UP_PORT:-18281}
UPS_PORT=${UPS_PORT:-18285}
CG_PORT=${CG_PORT:-18284}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
OUT=${OUT:-$(mktemp -d /tmp/authrelay-profile.XXXXXX)}
. benches/common.sh

# AUTHRELAY=path profiles another build (e.g. a copy of the previous commit's binary).
if [ -z "${AUTHRELAY:-}" ]; then
    cargo build --release --quiet --bin authrelay --example bench_upstream
    AUTHRELAY=target/release/authrelay
fi
if [ "$MODE" = https ]; then
    # A CA (rustls refuses a self-signed leaf) and the upstream's certificate from it.
    "$AUTHRELAY" ca init --out "$OUT/ca" >/dev/null 2>&1
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=upstream \
        -keyout "$OUT/up.key" -out "$OUT/up.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$OUT/up.ext"
    openssl x509 -req -in "$OUT/up.csr" -CA "$OUT/ca/ca.pem" -CAkey "$OUT/ca/ca-key.pem" \
        -CAcreateserial -days 2 -extfile "$OUT/up.ext" -out "$OUT/up.pem" 2>/dev/null
    BENCH_EXPECT="$TOKEN" BENCH_TLS_CERT="$OUT/up.pem" BENCH_TLS_KEY="$OUT/up.key" \
        taskset -c "$LOAD_CORE" target/release/examples/bench_upstream "127.0.0.1:$UPS_PORT" 2>/dev/null &
    PIDS+=($!); wait_port "$UPS_PORT"
    UPSTREAM="upstream: https://127.0.0.1:$UPS_PORT"
    TLS_CONF="tls:
  ca_file: $OUT/ca/ca.pem"
else
    BENCH_EXPECT="$TOKEN" taskset -c "$LOAD_CORE" target/release/examples/bench_upstream "127.0.0.1:$UP_PORT" 2>/dev/null &
    PIDS+=($!); wait_port "$UP_PORT"
    UPSTREAM="" # as benches/load.sh: the route names the host only
    TLS_CONF=""
fi
bench_config "$CG_PORT" "$UP_PORT" "$TLS_CONF" "$UPSTREAM" >"$OUT/routes.yaml"
cat >>"$OUT/routes.yaml" <<YAML
  - name: bench-mount
    mount: /m
    upstream: http://127.0.0.1:$UP_PORT
    credential: bench
YAML
if [ "$MODE" = mount ]; then
    echo "wrk.path = \"/m$PATH_QS\"" >"$OUT/forward.lua"
else
    echo "wrk.path = \"http://127.0.0.1:$UP_PORT$PATH_QS\"" >"$OUT/forward.lua"
fi
RUST_LOG=$LEVEL taskset -c "$PROXY_CORE" valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    "$AUTHRELAY" --config "$OUT/routes.yaml" run 2>"$OUT/authrelay.log" >/dev/null &
CG_PID=$!; PIDS+=("$CG_PID")
wait_port "$CG_PORT"
taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${WARMUP:-2}s" -s "$OUT/forward.lua" "http://127.0.0.1:$CG_PORT/" >/dev/null
callgrind_control -z "$CG_PID" >/dev/null
out=$(taskset -c "$LOAD_CORE" wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 10s -s "$OUT/forward.lua" "http://127.0.0.1:$CG_PORT/")
callgrind_control -d "$CG_PID" >/dev/null
sleep 1
if grep -q 'Non-2xx' <<<"$out"; then echo "non-2xx answers under callgrind" >&2; echo "$out" >&2; exit 1; fi
n=$(awk '/ requests in / { print $1 }' <<<"$out")
dump=$(ls -t "$OUT"/callgrind.out* | grep -v '\.out$' | head -1 || true)
[ -n "$dump" ] || dump="$OUT/callgrind.out"
total=$(awk '/^totals:/ { s += $2 } END { print s }' "$dump")
echo "mode=$MODE level=$LEVEL conns=$CONNS requests=$n instructions=$total per_request=$((total / n))"
callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | head -${TOP:-70} >"$OUT/inclusive.txt"
callgrind_annotate "$dump" 2>/dev/null | head -${TOP:-70} >"$OUT/exclusive.txt"
echo "annotations: $OUT/inclusive.txt $OUT/exclusive.txt (dump: $dump)"
