#!/usr/bin/env bash
# The profile-guided release build: authrelay compiled with a profile of its own request path,
# so that LLVM lays the hot code out together and inlines by what runs. Measured on this
# 2-core VM (docs/performance.md, issue 24, ninth round): 6-11% less CPU time a request on
# the plain forward path, 13-23% less time in user space.
#
#   benches/pgo.sh      # -> target/pgo/release/authrelay (and the floor built alike)
#
# Steps (everything on 127.0.0.1, bounded; ~10 minutes here, most of it two release builds):
#   1. finds an llvm-profdata of the LLVM version rustc uses (the toolchain's llvm-tools, or
#      the OS package llvm-N, installed with apt-get when missing);
#   2. builds authrelay and examples/hyper_floor instrumented (target/pgo-instrumented);
#   3. trains them with benches/load.sh: short runs of the forward proxy, the mount, the
#      access log, an HTTPS upstream, an intercepted CONNECT and the multi-threaded runtime, at
#      32 and 256 connections, and idle keep-alive connections. Paths that training does not
#      run are laid out as cold code: they still work (the whole test suite passes on any
#      build) but are not sped up;
#   4. merges the profiles (target/pgo-profiles) and builds both again with them
#      (target/pgo-build), copied to target/pgo/release/.
# The floor is trained and built the same way, so `benches/pair.sh` and `benches/load.sh` can
# compare builds made alike:
#   benches/pair.sh target/pgo/release/examples/hyper_floor target/pgo/release/authrelay
#   AUTHRELAY=target/pgo/release/authrelay FLOOR_BIN=target/pgo/release/examples/hyper_floor benches/load.sh
# A profile is only valid for the source it was taken from: run this again after a change.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
TRAIN_DURATION=${TRAIN_DURATION:-3}

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
host=$(rustc -vV | sed -n 's/^host: //p')
[ -n "$llvm_major" ] && [ -n "$host" ] || { log "cannot tell rustc's LLVM version"; exit 1; }
# A profile written by one LLVM version is read only by the same or a later one, so
# llvm-profdata must be the major version rustc was built with.
profdata=""
for candidate in "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
    "$(command -v "llvm-profdata-$llvm_major" || true)" "$(command -v llvm-profdata || true)"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] || continue
    if "$candidate" --version 2>/dev/null | grep -q "LLVM version $llvm_major\."; then
        profdata=$candidate; break
    fi
done
if [ -z "$profdata" ]; then
    install_if_missing "llvm-profdata-$llvm_major" "llvm-$llvm_major"
    profdata=$(command -v "llvm-profdata-$llvm_major")
fi
log "llvm-profdata: $profdata (rustc's LLVM is $llvm_major)"

raw=$PWD/target/pgo-profiles
rm -rf "$raw"
mkdir -p "$raw"
log "building instrumented (target/pgo-instrumented)"
# --target keeps RUSTFLAGS off build scripts and proc macros, which would otherwise be
# instrumented too and write profiles of the compiler's work into the training's.
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" CARGO_TARGET_DIR=target/pgo-instrumented \
    cargo build --release --quiet --target "$host" --bin authrelay --example hyper_floor
instrumented=target/pgo-instrumented/$host/release

log "training (benches/load.sh, ${TRAIN_DURATION}s a target)"
# The instrumented processes write their profiles as they exit: load.sh stops them with SIGTERM,
# on which both return from main.
AUTHRELAY=$instrumented/authrelay FLOOR_BIN=$instrumented/examples/hyper_floor \
    TARGETS="floor authrelay authrelay-mount authrelay-log authrelay-https authrelay-connect authrelay-mt" \
    RUNS=1 DURATION="$TRAIN_DURATION" CALLGRIND=0 IDLE_CONNS=1000 \
    benches/load.sh >"$raw/training.txt"
shopt -s nullglob
profiles=("$raw"/*.profraw)
[ ${#profiles[@]} -gt 0 ] || { log "training wrote no profile"; exit 1; }
"$profdata" merge -o "$raw/merged.profdata" "${profiles[@]}"

log "building with the profile (target/pgo)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$raw/merged.profdata" CARGO_TARGET_DIR=target/pgo-build \
    cargo build --release --quiet --target "$host" --bin authrelay --example hyper_floor
# One place that does not depend on the host's name.
mkdir -p target/pgo/release/examples
cp "target/pgo-build/$host/release/authrelay" target/pgo/release/authrelay
cp "target/pgo-build/$host/release/examples/hyper_floor" target/pgo/release/examples/hyper_floor
log "built target/pgo/release/authrelay and target/pgo/release/examples/hyper_floor"
