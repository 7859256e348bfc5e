#!/usr/bin/env bash
# Loopback load benchmark: direct vs authrelay (forward proxy and mount) vs nginx vs the hyper
# floor (examples/hyper_floor.rs: hyper + tokio alone, no routing or logging).
#
#   benches/load.sh                      # full run: 32 and 256 connections, 3 runs of 5 s
#   DURATION=3 RUNS=1 benches/load.sh    # quick look
#
# What it does (everything on 127.0.0.1, every loop bounded):
#   1. builds authrelay, examples/bench_upstream and examples/hyper_floor in release mode;
#   2. installs wrk and nginx from the OS packages when missing (apt-get);
#   3. starts the upstream (answers 100 bytes only when `Authorization: Bearer bench-token`
#      is present, else 401) over plain HTTP and over TLS, authrelay (static credential,
#      `unmatched: pass`, RUST_LOG=warn; a second one at RUST_LOG=info for the access-log
#      runs) and nginx (one worker, same header injection, keep-alive upstream pools, no
#      access log except on the access-log port);
#   4. runs wrk (and, for TLS from the client, examples/bench_tls_client) against each target
#      at each connection count, RUNS times (interleaved: targets compared with each other
#      run next to each other, and every other run in reverse order), and prints the
#      medians of req/s, p50 and p99, the proxy's CPU time per request (user + system, from
#      /proc/PID/stat, and the user part alone), the proxies' peak RSS and the ratios;
#   5. measures authrelay's (and nginx's) RSS idle and with IDLE_CONNS idle keep-alive clients;
#   6. counts the user-space instructions each proxy executes per request under callgrind
#      (valgrind, installed when missing; CALLGRIND=0 skips it): repeatable where timings are not.
#
# Pinning: the proxy under test (authrelay or nginx) runs alone on PROXY_CORE; wrk and the
# upstream share LOAD_CORE. The exception is authrelay-mt: authrelay unpinned, so that it runs
# tokio's multi-threaded runtime with a worker per core, and wrk unpinned beside it (the
# upstream stays on LOAD_CORE); its CPU per request against the pinned authrelay's is what work
# stealing and cross-thread wake-ups cost. The direct run (wrk sends the header itself) uses LOAD_CORE only. Numbers from a shared machine
# are noisy: read the ratios, not the absolute values.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
RUNS=${RUNS:-3}
CONNS=${CONNS:-"32 256"}
PROXY_CORE=${PROXY_CORE:-0}
LOAD_CORE=${LOAD_CORE:-1}
IDLE_CONNS=${IDLE_CONNS:-10000}
CALLGRIND=${CALLGRIND:-1}
CG_PORT=${CG_PORT:-18184}
UP_PORT=${UP_PORT:-18181}
AR_PORT=${AR_PORT:-18182}
NGX_PORT=${NGX_PORT:-18183}
UPS_PORT=${UPS_PORT:-18185}             # the upstream over TLS
AR_LOG_PORT=${AR_LOG_PORT:-18186}       # authrelay with RUST_LOG=info (access log on)
NGX_LOG_PORT=${NGX_LOG_PORT:-18187}     # nginx with its access log on
NGX_HTTPS_PORT=${NGX_HTTPS_PORT:-18188} # nginx: plain HTTP in, TLS to the upstream
NGX_TLS_PORT=${NGX_TLS_PORT:-18189}     # nginx: TLS in (as authrelay's intercepted CONNECT), TLS out
FLOOR_PORT=${FLOOR_PORT:-18191}         # the hyper floor
AR_MT_PORT=${AR_MT_PORT:-18192}         # authrelay on every core (multi-threaded runtime)
# Which targets run (all by default); e.g. TARGETS="direct authrelay nginx".
TARGETS=${TARGETS:-"direct authrelay authrelay-mount nginx floor authrelay-log nginx-log authrelay-https nginx-https authrelay-connect nginx-tls authrelay-mt"}
# BEFORE=path/to/other/authrelay adds the target authrelay-before: that build, same config,
# interleaved with the others, so a change is measured before and after in one sitting.
BEFORE=${BEFORE:-}
AR_BEFORE_PORT=${AR_BEFORE_PORT:-18190}
if [ -n "$BEFORE" ] && [[ " $TARGETS " != *" authrelay-before "* ]]; then TARGETS+=" authrelay-before"; fi
HTTPS_HOST=api.bench.test
TLS_HOST=secure.bench.test

WORK=$(mktemp -d /tmp/authrelay-load.XXXXXX)
. benches/common.sh
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

install_if_missing wrk wrk
install_if_missing nginx nginx-light nginx
[ "$CALLGRIND" = 1 ] && install_if_missing valgrind valgrind
NGINX=$(command -v nginx)

log "building (release)"
cargo build --release --quiet --bin authrelay --example bench_upstream --example bench_tls_client --example hyper_floor
# AUTHRELAY and FLOOR_BIN choose other builds of the two (benches/pgo.sh measures and trains
# its profile-guided builds through them).
AUTHRELAY=${AUTHRELAY:-target/release/authrelay}
FLOOR_BIN=${FLOOR_BIN:-target/release/examples/hyper_floor}
UPSTREAM=target/release/examples/bench_upstream
TLS_CLIENT=target/release/examples/bench_tls_client

# --- certificates: authrelay's interception CA also signs the TLS upstream's and nginx's ---
"$AUTHRELAY" ca init --out "$WORK/ca" >/dev/null 2>&1
leaf() { # name san
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
        -keyout "$WORK/ca/$1-key.pem" -out "$WORK/ca/$1.csr" 2>/dev/null
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$2" >"$WORK/ca/$1.ext"
    openssl x509 -req -in "$WORK/ca/$1.csr" -CA "$WORK/ca/ca.pem" -CAkey "$WORK/ca/ca-key.pem" \
        -CAcreateserial -days 2 -extfile "$WORK/ca/$1.ext" -out "$WORK/ca/$1.pem" 2>/dev/null
}
leaf upstream "IP:127.0.0.1,DNS:localhost"
leaf nginx "DNS:$TLS_HOST"


status_of() { # pid field -> kB
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

# --- upstream ---------------------------------------------------------------------------
BENCH_EXPECT="$TOKEN" taskset -c "$LOAD_CORE" "$UPSTREAM" "127.0.0.1:$UP_PORT" 2>"$WORK/upstream.log" &
UP_PID=$!; PIDS+=("$UP_PID")
wait_port "$UP_PORT"
BENCH_EXPECT="$TOKEN" BENCH_TLS_CERT="$WORK/ca/upstream.pem" BENCH_TLS_KEY="$WORK/ca/upstream-key.pem" \
    taskset -c "$LOAD_CORE" "$UPSTREAM" "127.0.0.1:$UPS_PORT" 2>"$WORK/upstream-tls.log" &
PIDS+=($!)
wait_port "$UPS_PORT"

# --- authrelay ----------------------------------------------------------------------------
bench_config "$AR_PORT" "$UP_PORT" "tls:
  ca_file: $WORK/ca/ca.pem
intercept_ca:
  cert_file: $WORK/ca/ca.pem
  key_file: $WORK/ca/ca-key.pem" >"$WORK/routes.yaml"
cat >>"$WORK/routes.yaml" <<EOF
  - name: bench-mount
    mount: /m
    upstream: http://127.0.0.1:$UP_PORT
    credential: bench
  - name: bench-https
    host: $HTTPS_HOST
    upstream: https://127.0.0.1:$UPS_PORT
    credential: bench
  - name: bench-intercept
    host: $TLS_HOST
    upstream: https://127.0.0.1:$UPS_PORT
    credential: bench
    intercept: true
EOF
start_authrelay() {
    RUST_LOG=warn taskset -c "$PROXY_CORE" "$AUTHRELAY" --config "$WORK/routes.yaml" run \
        2>>"$WORK/authrelay.log" &
    AR_PID=$!; PIDS+=("$AR_PID")
    wait_port "$AR_PORT"
}
start_authrelay
# The same proxy at the default `info` level: one access line per request, to a file.
sed "s/^listen: .*/listen: 127.0.0.1:$AR_LOG_PORT/" "$WORK/routes.yaml" >"$WORK/routes-log.yaml"
RUST_LOG=info taskset -c "$PROXY_CORE" "$AUTHRELAY" --config "$WORK/routes-log.yaml" run \
    2>>"$WORK/authrelay-access.log" &
AR_LOG_PID=$!; PIDS+=("$AR_LOG_PID")
wait_port "$AR_LOG_PORT"
if [ -n "$BEFORE" ]; then
    sed "s/^listen: .*/listen: 127.0.0.1:$AR_BEFORE_PORT/" "$WORK/routes.yaml" >"$WORK/routes-before.yaml"
    RUST_LOG=warn taskset -c "$PROXY_CORE" "$BEFORE" --config "$WORK/routes-before.yaml" run \
        2>>"$WORK/authrelay-before.log" &
    AR_BEFORE_PID=$!; PIDS+=("$AR_BEFORE_PID")
    wait_port "$AR_BEFORE_PORT"
fi

if [[ " $TARGETS " == *" authrelay-mt "* ]]; then
    sed "s/^listen: .*/listen: 127.0.0.1:$AR_MT_PORT/" "$WORK/routes.yaml" >"$WORK/routes-mt.yaml"
    RUST_LOG=warn "$AUTHRELAY" --config "$WORK/routes-mt.yaml" run 2>>"$WORK/authrelay-mt.log" &
    AR_MT_PID=$!; PIDS+=("$AR_MT_PID")
    wait_port "$AR_MT_PORT"
fi

# --- the hyper floor -----------------------------------------------------------------------
# The same header injection on hyper + tokio alone: what authrelay spends above it is its own.
if [[ " $TARGETS " == *" floor "* ]]; then
    taskset -c "$PROXY_CORE" "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" \
        "127.0.0.1:$UP_PORT" "$TOKEN" 2>>"$WORK/floor.log" &
    FLOOR_PID=$!; PIDS+=("$FLOOR_PID")
    wait_port "$FLOOR_PORT"
fi

# --- nginx ----------------------------------------------------------------------------------
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 30000; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    upstream bench_up {
        server 127.0.0.1:$UP_PORT;
        keepalive 256;
        keepalive_requests 1000000;
    }
    upstream bench_tls_up {
        server 127.0.0.1:$UPS_PORT;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGX_PORT backlog=4096;
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "$TOKEN";
            proxy_pass http://bench_up;
        }
    }
    server { # the access-log runs: nginx's default combined format, to a file
        listen 127.0.0.1:$NGX_LOG_PORT backlog=4096;
        access_log $WORK/nginx/access.log;
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "$TOKEN";
            proxy_pass http://bench_up;
        }
    }
    server { # plain HTTP in, TLS (kept alive) to the upstream
        listen 127.0.0.1:$NGX_HTTPS_PORT backlog=4096;
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "$TOKEN";
            proxy_ssl_session_reuse on;
            proxy_pass https://bench_tls_up;
        }
    }
    server { # TLS in, TLS out: what authrelay does for an intercepted CONNECT tunnel
        listen 127.0.0.1:$NGX_TLS_PORT ssl backlog=4096;
        ssl_certificate $WORK/ca/nginx.pem;
        ssl_certificate_key $WORK/ca/nginx-key.pem;
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "$TOKEN";
            proxy_ssl_session_reuse on;
            proxy_pass https://bench_tls_up;
        }
    }
}
EOF
taskset -c "$PROXY_CORE" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
NGX_MASTER=$!; PIDS+=("$NGX_MASTER")
wait_port "$NGX_PORT"
NGX_WORKER=$(pgrep -P "$NGX_MASTER" | head -1)

# --- sanity: every path answers 200 (the upstream checks the header) ----------------------
check() { # name curl-args...
    local name=$1; shift
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@")
    [ "$code" = 200 ] || { log "$name answered $code, expected 200"; exit 1; }
}
check direct -H "Authorization: $TOKEN" "http://127.0.0.1:$UP_PORT$PATH_QS"
check authrelay -x "http://127.0.0.1:$AR_PORT" "http://127.0.0.1:$UP_PORT$PATH_QS"
check authrelay-mount "http://127.0.0.1:$AR_PORT/m$PATH_QS"
check nginx -x "http://127.0.0.1:$NGX_PORT" "http://127.0.0.1:$UP_PORT$PATH_QS"
check authrelay-log -x "http://127.0.0.1:$AR_LOG_PORT" "http://127.0.0.1:$UP_PORT$PATH_QS"
check nginx-log -x "http://127.0.0.1:$NGX_LOG_PORT" "http://127.0.0.1:$UP_PORT$PATH_QS"
check authrelay-https -x "http://127.0.0.1:$AR_PORT" "http://$HTTPS_HOST$PATH_QS"
check nginx-https -x "http://127.0.0.1:$NGX_HTTPS_PORT" "http://$HTTPS_HOST$PATH_QS"
check authrelay-connect --cacert "$WORK/ca/ca.pem" -x "http://127.0.0.1:$AR_PORT" "https://$TLS_HOST$PATH_QS"
check nginx-tls --cacert "$WORK/ca/ca.pem" --resolve "$TLS_HOST:$NGX_TLS_PORT:127.0.0.1" "https://$TLS_HOST:$NGX_TLS_PORT$PATH_QS"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -x "http://127.0.0.1:$NGX_PORT" -H 'Authorization: wrong' "http://127.0.0.1:$UP_PORT$PATH_QS")
[ "$code" = 200 ] || { log "nginx did not replace the client's Authorization"; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$UP_PORT$PATH_QS" -H 'Authorization: wrong')
[ "$code" = 401 ] || { log "upstream accepted a wrong credential"; exit 1; }

AR_IDLE_RSS=$(status_of "$AR_PID" VmRSS)
NGX_IDLE_RSS=$(( $(status_of "$NGX_WORKER" VmRSS) + $(status_of "$NGX_MASTER" VmRSS) ))

# Absolute-form request line for the forward-proxy targets.
cat >"$WORK/forward.lua" <<EOF
wrk.path = "http://127.0.0.1:$UP_PORT$PATH_QS"
EOF
cat >"$WORK/forward-https.lua" <<EOF
wrk.path = "http://$HTTPS_HOST$PATH_QS"
EOF

to_ms() { # wrk latency such as 812.00us, 1.23ms, 1.01s
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n = n / 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n = n * 1000
        printf "%.3f", n }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

cpu_ticks() { # pid -> user + system clock ticks so far
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}
user_ticks() { # pid -> user clock ticks so far: the proxy's own code, without the kernel's TCP work
    awk '{ print $14 }' "/proc/$1/stat"
}
per_request() { # ticks wrk-output -> microseconds a request
    awk -v t="$1" -v hz="$CLK_TCK" '/ requests in / { printf "%.2f", t / hz * 1e6 / $1 }' "$2"
}
CLK_TCK=$(getconf CLK_TCK)

# Samples of each target/conns, space-separated; medians are taken at the end.
declare -A RPS P50 P99 BAD CPU USER
run_once() { # name conns run url lua header [proxy-pid] [wrk-cores]
    local name=$1 conns=$2 run=$3 url=$4 lua=${5:-} header=${6:-} pid=${7:-} cores=${8:-$LOAD_CORE}
    local key=$name/$conns out="$WORK/wrk-$name-$conns-$run.txt" ticks=0 uticks=0 rps p50 p99
    [ -n "$pid" ] && ticks=$(cpu_ticks "$pid") && uticks=$(user_ticks "$pid")
    taskset -c "$cores" timeout $((DURATION + 30)) wrk -t1 -c"$conns" -d"${DURATION}s" \
        --timeout 5s --latency ${lua:+-s "$lua"} ${header:+-H "$header"} "$url" >"$out"
    if [ -n "$pid" ]; then # CPU time the proxy spent per request, in microseconds
        CPU[$key]+=" $(per_request $(( $(cpu_ticks "$pid") - ticks )) "$out")"
        USER[$key]+=" $(per_request $(( $(user_ticks "$pid") - uticks )) "$out")"
    fi
    rps=$(awk '/^Requests\/sec/ { print $2 }' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    RPS[$key]+=" $rps"; P50[$key]+=" $p50"; P99[$key]+=" $p99"
    BAD[$key]=$(( ${BAD[$key]:-0} + $(awk '/Non-2xx/ { s += $5 } /Socket errors/ { gsub(",", ""); s += $4 + $6 + $8 + $10 } END { print s + 0 }' "$out") ))
    log "  $name c=$conns run $run: $rps req/s p50 $p50 ms p99 $p99 ms"
}
run_tls_once() { # name conns run port proxy-pid [connect-authority]
    local name=$1 conns=$2 run=$3 port=$4 pid=$5 connect=${6:-}
    local key=$name/$conns out="$WORK/wrk-$name-$conns-$run.txt" ready="$WORK/ready-$name-$conns-$run" ticks uticks rps p50 p99
    taskset -c "$LOAD_CORE" timeout $((DURATION + 60)) "$TLS_CLIENT" --addr "127.0.0.1:$port" \
        ${connect:+--connect "$connect"} --host "$TLS_HOST" --ca "$WORK/ca/ca.pem" --path "$PATH_QS" \
        -c "$conns" -d "$DURATION" --ready "$ready" >"$out" &
    local client=$!
    for _ in $(seq 600); do [ -s "$ready" ] && break; sleep 0.05; done
    # Counted from here: every connection is open and through CONNECT and TLS.
    ticks=$(cpu_ticks "$pid")
    uticks=$(user_ticks "$pid")
    wait "$client"
    CPU[$key]+=" $(per_request $(( $(cpu_ticks "$pid") - ticks )) "$out")"
    USER[$key]+=" $(per_request $(( $(user_ticks "$pid") - uticks )) "$out")"
    rps=$(awk '/^Requests\/sec/ { print $2 }' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    RPS[$key]+=" $rps"; P50[$key]+=" $p50"; P99[$key]+=" $p99"
    BAD[$key]=$(( ${BAD[$key]:-0} + $(awk '/Non-2xx/ { s += $5 } /Socket errors/ { gsub(",", ""); s += $4 + $6 + $8 + $10 } END { print s + 0 }' "$out") ))
    log "  $name c=$conns run $run: $rps req/s p50 $p50 ms p99 $p99 ms"
}
wanted() { [[ " $TARGETS " == *" $1 "* ]]; }
median_of() { # "a b c" -> median, or - when empty
    if [ -z "${1// }" ]; then echo -; else printf '%s\n' $1 | median; fi
}

# Runs are interleaved (run 1 of every target, then run 2, ...) so that a noisy moment on
# the shared machine hits all targets alike instead of one target's whole series.
# The TLS upstream connections of both proxies are opened (and pooled) before the counted
# runs, as the plain ones are after the first seconds of load.
for c in $CONNS; do
    if wanted authrelay-https; then taskset -c "$LOAD_CORE" wrk -t1 -c"$c" -d1s -s "$WORK/forward-https.lua" "http://127.0.0.1:$AR_PORT/" >/dev/null; fi
    if wanted nginx-https; then taskset -c "$LOAD_CORE" wrk -t1 -c"$c" -d1s -s "$WORK/forward-https.lua" "http://127.0.0.1:$NGX_HTTPS_PORT/" >/dev/null; fi
done
# Each round of runs starts with empty access logs: a file grown by the earlier runs (hundreds
# of MB) made every later run's writes dearer, so the later runs measured the file, not the
# proxy (2026-12-05, run 10: authrelay-log 46.7k, 42.9k, 38.3k req/s in its three runs at 256
# connections, nginx-log 52.5k, 49.3k, 47.7k). Both logs are opened for appending, so they
# can be emptied under the running proxies; their lines are counted first.
AR_LOG_LINES=0
NGX_LOG_LINES=0
empty_access_logs() {
    AR_LOG_LINES=$(( AR_LOG_LINES + $(grep -c ' request status=' "$WORK/authrelay-access.log" || true) ))
    NGX_LOG_LINES=$(( NGX_LOG_LINES + $(wc -l <"$WORK/nginx/access.log" 2>/dev/null || echo 0) ))
    : >"$WORK/authrelay-access.log"
    if [ -f "$WORK/nginx/access.log" ]; then : >"$WORK/nginx/access.log"; fi
}
log "load: ${RUNS} x ${DURATION}s per target and connection count"
# One target's slot in a run.
run_target() { # name conns run
    local c=$2 run=$3
    case $1 in
        direct) run_once direct "$c" "$run" "http://127.0.0.1:$UP_PORT$PATH_QS" "" "Authorization: $TOKEN" ;;
        authrelay) run_once authrelay "$c" "$run" "http://127.0.0.1:$AR_PORT/" "$WORK/forward.lua" "" "$AR_PID" ;;
        authrelay-before) run_once authrelay-before "$c" "$run" "http://127.0.0.1:$AR_BEFORE_PORT/" "$WORK/forward.lua" "" "$AR_BEFORE_PID" ;;
        authrelay-mt) run_once authrelay-mt "$c" "$run" "http://127.0.0.1:$AR_MT_PORT/" "$WORK/forward.lua" "" "$AR_MT_PID" "$PROXY_CORE,$LOAD_CORE" ;;
        authrelay-mount) run_once authrelay-mount "$c" "$run" "http://127.0.0.1:$AR_PORT/m$PATH_QS" "" "" "$AR_PID" ;;
        floor) run_once floor "$c" "$run" "http://127.0.0.1:$FLOOR_PORT/" "$WORK/forward.lua" "" "$FLOOR_PID" ;;
        nginx) run_once nginx "$c" "$run" "http://127.0.0.1:$NGX_PORT/" "$WORK/forward.lua" "" "$NGX_WORKER" ;;
        authrelay-log) run_once authrelay-log "$c" "$run" "http://127.0.0.1:$AR_LOG_PORT/" "$WORK/forward.lua" "" "$AR_LOG_PID" ;;
        nginx-log) run_once nginx-log "$c" "$run" "http://127.0.0.1:$NGX_LOG_PORT/" "$WORK/forward.lua" "" "$NGX_WORKER" ;;
        authrelay-https) run_once authrelay-https "$c" "$run" "http://127.0.0.1:$AR_PORT/" "$WORK/forward-https.lua" "" "$AR_PID" ;;
        nginx-https) run_once nginx-https "$c" "$run" "http://127.0.0.1:$NGX_HTTPS_PORT/" "$WORK/forward-https.lua" "" "$NGX_WORKER" ;;
        authrelay-connect) run_tls_once authrelay-connect "$c" "$run" "$AR_PORT" "$AR_PID" "$TLS_HOST:443" ;;
        nginx-tls) run_tls_once nginx-tls "$c" "$run" "$NGX_TLS_PORT" "$NGX_WORKER" ;;
    esac
}
# Targets compared with each other run next to each other (this VM's speed drifts by 10-20%
# within minutes: the floor and authrelay measured 25 s apart disagreed by as much), and every
# other run goes through them in reverse order, so that a drift across a run weighs on both
# sides of each ratio alike.
ORDER="direct nginx floor authrelay authrelay-mt authrelay-log nginx-log authrelay-mount authrelay-before authrelay-https nginx-https authrelay-connect nginx-tls"
REVERSED=$(tr ' ' '\n' <<<"$ORDER" | tac | tr '\n' ' ')
for c in $CONNS; do
    for run in $(seq "$RUNS"); do
        empty_access_logs
        order=$ORDER
        if (( run % 2 == 0 )); then order=$REVERSED; fi
        for t in $order; do
            if wanted "$t"; then run_target "$t" "$c" "$run"; fi
        done
    done
done
empty_access_logs
# Each run's CPU per request, kept for the ratios taken run by run (below).
declare -A CPU_RUNS USER_RUNS
for key in "${!CPU[@]}"; do CPU_RUNS[$key]=${CPU[$key]}; USER_RUNS[$key]=${USER[$key]}; done
for key in "${!RPS[@]}"; do
    for table in RPS P50 P99 CPU USER; do
        declare -n samples=$table
        samples[$key]=$(median_of "${samples[$key]:-}")
        unset -n samples
    done
done
AR_PEAK=$(status_of "$AR_PID" VmHWM)
NGX_PEAK=$(( $(status_of "$NGX_WORKER" VmHWM) + $(status_of "$NGX_MASTER" VmHWM) ))
UP_PEAK=$(status_of "$UP_PID" VmHWM)

# --- memory with idle keep-alive connections ---------------------------------------------
idle_rss() { # port target pid... -> "rss_kB ok failed"
    local port=$1 target=$2; shift 2
    local ready="$WORK/ready-$port"
    rm -f "$ready"
    taskset -c "$LOAD_CORE" python3 benches/idle_conns.py "$port" "$IDLE_CONNS" "$target" "$ready" 60 &
    local helper=$!
    for _ in $(seq 1800); do [ -s "$ready" ] && break; sleep 0.1; done
    sleep 1
    local rss=0
    for pid in "$@"; do rss=$((rss + $(status_of "$pid" VmRSS))); done
    echo "$rss $(cat "$ready" 2>/dev/null || echo '0 ?')"
    kill "$helper" 2>/dev/null || true
    wait "$helper" 2>/dev/null || true
}
# A fresh authrelay, so that the load runs above do not inflate the figure.
kill "$AR_PID"; wait "$AR_PID" 2>/dev/null || true
start_authrelay
AR_FRESH_RSS=$(status_of "$AR_PID" VmRSS)
log "idle connections: $IDLE_CONNS to authrelay"
read -r AR_CONN_RSS AR_CONN_OK AR_CONN_FAIL < <(idle_rss "$AR_PORT" "http://127.0.0.1:$UP_PORT$PATH_QS" "$AR_PID")
log "idle connections: $IDLE_CONNS to nginx"
read -r NGX_CONN_RSS NGX_CONN_OK NGX_CONN_FAIL < <(idle_rss "$NGX_PORT" "http://127.0.0.1:$UP_PORT$PATH_QS" "$NGX_WORKER" "$NGX_MASTER")

# --- user-space instructions per request (callgrind) ------------------------------------------
# Wall-clock numbers on a shared VM swing by tens of percent; instruction counts do not. Each
# proxy runs under callgrind on PROXY_CORE with the same config as above, is warmed up, and
# then counts the instructions it executes in user space (the kernel's share is not seen)
# while wrk sends requests through it at 8 connections.
instructions_per_request() { # name pid -> instructions per request
    local name=$1 pid=$2 out n
    taskset -c "$LOAD_CORE" wrk -t1 -c8 -d2s -s "$WORK/forward.lua" "http://127.0.0.1:$CG_PORT/" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    out=$(taskset -c "$LOAD_CORE" wrk -t1 -c8 -d"${DURATION}s" -s "$WORK/forward.lua" "http://127.0.0.1:$CG_PORT/")
    callgrind_control -d "$pid" >/dev/null
    sleep 1
    if grep -q 'Non-2xx' <<<"$out"; then log "$name answered non-2xx under callgrind"; exit 1; fi
    n=$(awk '/ requests in / { print $1 }' <<<"$out")
    cat "$WORK/callgrind.$name".* | awk -v n="$n" '/^totals:/ { s += $2 } END { printf "%d", s / n }'
}
AR_INSTR=- AR_INFO_INSTR=- NGX_INSTR=- FLOOR_INSTR=-
if [ "$CALLGRIND" = 1 ]; then
    log "instructions per request under callgrind"
    kill "$AR_PID" "$NGX_MASTER" 2>/dev/null || true
    wait "$AR_PID" "$NGX_MASTER" 2>/dev/null || true
    sed "s/^listen: .*/listen: 127.0.0.1:$CG_PORT/" "$WORK/routes.yaml" >"$WORK/routes-cg.yaml"
    for level in warn info; do # info adds the access-log line of every request
        RUST_LOG=$level taskset -c "$PROXY_CORE" valgrind --tool=callgrind \
            --callgrind-out-file="$WORK/callgrind.authrelay-$level" \
            "$AUTHRELAY" --config "$WORK/routes-cg.yaml" run 2>>"$WORK/authrelay-$level.log" &
        CG_PID=$!; PIDS+=("$CG_PID")
        wait_port "$CG_PORT"
        if [ "$level" = warn ]; then
            AR_INSTR=$(instructions_per_request authrelay-warn "$CG_PID")
        else
            AR_INFO_INSTR=$(instructions_per_request authrelay-info "$CG_PID")
        fi
        kill "$CG_PID"; wait "$CG_PID" 2>/dev/null || true
    done
    sed -e 's/^master_process on;/master_process off;/' \
        -e "s/listen 127.0.0.1:$NGX_PORT /listen 127.0.0.1:$CG_PORT /" \
        "$WORK/nginx/nginx.conf" >"$WORK/nginx/nginx-cg.conf"
    taskset -c "$PROXY_CORE" valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.nginx" \
        "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx-cg.conf" 2>/dev/null &
    CG_PID=$!; PIDS+=("$CG_PID")
    wait_port "$CG_PORT"
    NGX_INSTR=$(instructions_per_request nginx "$CG_PID")
    kill "$CG_PID"; wait "$CG_PID" 2>/dev/null || true
    if [[ " $TARGETS " == *" floor "* ]]; then
        kill "$FLOOR_PID" 2>/dev/null || true
        taskset -c "$PROXY_CORE" valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.floor" \
            "$FLOOR_BIN" "127.0.0.1:$CG_PORT" "127.0.0.1:$UP_PORT" "$TOKEN" 2>/dev/null &
        CG_PID=$!; PIDS+=("$CG_PID")
        wait_port "$CG_PORT"
        FLOOR_INSTR=$(instructions_per_request floor "$CG_PID")
        kill "$CG_PID"; wait "$CG_PID" 2>/dev/null || true
    fi
fi

# --- report ---------------------------------------------------------------------------------
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
sub_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

echo
echo "authrelay load benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -r)"
echo "wrk -t1, ${DURATION}s x ${RUNS} runs (medians); proxy on core $PROXY_CORE, wrk + upstream on core $LOAD_CORE; RUST_LOG=warn, nginx access_log off"
echo "(authrelay-log / nginx-log: RUST_LOG=info and nginx's access_log, each to a file; -https: plain HTTP"
echo " in, TLS kept alive to the upstream; authrelay-connect: CONNECT + TLS to the proxy (interception),"
echo " nginx-tls: TLS to nginx; both TLS out; bench_tls_client instead of wrk, handshakes before the clock;"
echo " authrelay-mt: authrelay and wrk unpinned, the multi-threaded runtime on $(nproc) cores)"
echo
printf '%-18s %6s %12s %10s %10s %8s %14s %10s\n' target conns 'req/s' 'p50 ms' 'p99 ms' errors 'proxy CPU us/req' 'of it user'
for c in $CONNS; do
    for t in $TARGETS; do
        [ -n "${RPS[$t/$c]:-}" ] || continue
        printf '%-18s %6s %12s %10s %10s %8s %14s %10s\n' "$t" "$c" "${RPS[$t/$c]}" "${P50[$t/$c]}" "${P99[$t/$c]}" "${BAD[$t/$c]}" "${CPU[$t/$c]:--}" "${USER[$t/$c]:--}"
    done
done
echo
# The CPU ratio taken within each run (the two targets ran back to back, so the VM's slower
# and faster minutes hit both) and its spread over the runs: the median of the medians alone
# hides how far one run is from the next.
paired() { # "a1 a2 .." "b1 b2 .." -> "median (min-max)" of a_i / b_i
    awk -v a="$1" -v b="$2" 'BEGIN {
        n = split(a, x, " "); m = split(b, y, " "); k = 0
        for (i = 1; i <= n && i <= m; i++) if (y[i] > 0) r[++k] = x[i] / y[i]
        if (k == 0) { print "-"; exit }
        for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
        med = (k % 2) ? r[(k + 1) / 2] : (r[k / 2] + r[k / 2 + 1]) / 2
        printf "%.2f (%.2f-%.2f)", med, r[1], r[k]
    }'
}
printf '%-6s %-18s %-12s %10s %10s %10s %10s  %-20s %s\n' conns authrelay 'vs' 'req/s x' 'CPU/req x' 'p99 ms' 'p99 (2nd)' 'CPU/req x run by run' 'user CPU/req x run by run'
for c in $CONNS; do
    for pair in authrelay:nginx authrelay:floor authrelay-log:floor floor:nginx authrelay:authrelay-before authrelay-mount:nginx authrelay-log:nginx-log authrelay-https:nginx-https authrelay-connect:nginx-tls authrelay-mt:authrelay; do
        a=${pair%%:*} n=${pair##*:}
        [ -n "${RPS[$a/$c]:-}" ] && [ -n "${RPS[$n/$c]:-}" ] || continue
        printf '%-6s %-18s %-12s %10s %10s %10s %10s  %-20s %s\n' "$c" "$a" "$n" \
            "$(ratio "${RPS[$a/$c]}" "${RPS[$n/$c]}")" "$(ratio "${CPU[$a/$c]}" "${CPU[$n/$c]}")" \
            "${P99[$a/$c]}" "${P99[$n/$c]}" "$(paired "${CPU_RUNS[$a/$c]:-}" "${CPU_RUNS[$n/$c]:-}")" \
            "$(paired "${USER_RUNS[$a/$c]:-}" "${USER_RUNS[$n/$c]:-}")"
    done
done
echo "(req/s x, CPU/req x: the first target relative to the second doing the same, from the medians;"
echo " run by run: the ratio within each run, median and range over the runs; CPU/req below 1.00"
echo " means the first spends less CPU time per request; user: the proxy's time in user space alone,"
echo " its own code without the kernel's TCP work, which is most of either's CPU per request here;"
echo " access lines written: authrelay $AR_LOG_LINES, nginx $NGX_LOG_LINES)"
echo
echo "memory (RSS, MB)            authrelay    nginx (master+worker)"
printf 'idle, before load           %9s    %9s\n' "$(mb "$AR_IDLE_RSS")" "$(mb "$NGX_IDLE_RSS")"
printf 'peak during load (VmHWM)    %9s    %9s\n' "$(mb "$AR_PEAK")" "$(mb "$NGX_PEAK")"
printf 'idle, fresh process         %9s\n' "$(mb "$AR_FRESH_RSS")"
printf '%s idle keep-alive conns %7s    %9s   (answered 200: %s / %s)\n' "$IDLE_CONNS" \
    "$(mb "$AR_CONN_RSS")" "$(mb "$NGX_CONN_RSS")" "$AR_CONN_OK" "$NGX_CONN_OK"
echo
echo "user-space instructions per request (callgrind, 8 conns): authrelay $AR_INSTR, nginx $NGX_INSTR" \
    "($(ratio "$AR_INSTR" "$NGX_INSTR") x nginx, $(ratio "$AR_INSTR" "$FLOOR_INSTR") x the hyper floor's $FLOOR_INSTR);" \
    "authrelay with RUST_LOG=info (access log on): $AR_INFO_INSTR"
[ "${AR_CONN_FAIL:-0}" = 0 ] && [ "${NGX_CONN_FAIL:-0}" = 0 ] || echo "failed idle connections: authrelay $AR_CONN_FAIL, nginx $NGX_CONN_FAIL"
echo "upstream peak RSS: $(mb "$UP_PEAK") MB; raw wrk output: $WORK"
