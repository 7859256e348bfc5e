# Shared by the benchmark scripts (sourced, not run): the processes they start, waiting for a
# port, and the proxy configuration every benchmark starts from.

TOKEN="Bearer bench-token"
PATH_QS="/v1/items/42?fields=id"

# Every process a script starts goes in PIDS; all are stopped when the script ends.
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

log() { printf '%s\n' "$*" >&2; }

install_if_missing() { # command package...: the first package the OS installs that brings it
    local cmd=$1; shift
    command -v "$cmd" >/dev/null && return 0
    log "installing $* (apt-get)"
    for pkg in "$@"; do
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >/dev/null 2>&1 && return 0
    done
    apt-get update >/dev/null 2>&1 || true
    for pkg in "$@"; do
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >/dev/null 2>&1 && return 0
    done
    log "cannot install $cmd"; exit 1
}

wait_port() { # port: waits at most 30 s (a proxy under valgrind starts slowly)
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2; exit 1
}

# bench_config LISTEN_PORT UPSTREAM_PORT [TOP_LEVEL_YAML] [FORWARD_ROUTE_LINE]: authrelay's
# configuration with the static credential the upstream checks for and the forward route to
# the upstream (FORWARD_ROUTE_LINE, e.g. `upstream: https://…`, is added to that route).
# Callers append further routes.
bench_config() {
    cat <<YAML
listen: 127.0.0.1:$1
unmatched: pass
${3:-}
credentials:
  bench:
    type: static
    value: "$TOKEN"
routes:
  - name: bench-forward
    host: "127.0.0.1:$2"
    credential: bench
YAML
    if [ -n "${4:-}" ]; then echo "    $4"; fi
}
