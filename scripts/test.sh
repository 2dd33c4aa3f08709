#!/usr/bin/env bash
# The test command (README): on a fresh Debian 12 machine, as root, installs and starts what the
# tests need (scripts/env-up.sh: dockerd, binfmt + qemu, registry, mosquitto, cross toolchains,
# rust targets), builds the sample images for arm64 and armv7 under qemu, then runs two lanes at
# once, so that the two cores stay busy while the integration tests mostly wait:
#   main lane (target/):
#     1. cargo fmt --check and clippy -D warnings
#     2. the agent built for aarch64 and armv7 (release, as shipped) in one cargo invocation:
#        their single-threaded fat-LTO links overlap
#     3. every unit and integration test of the workspace against the real dockerd, registry and
#        mosquitto (FERRY_REQUIRE_INFRA=1: a missing component fails, it never skips); built
#        first with `cargo test --no-run` (it builds ferryctl and ferry-agent too, with the
#        features the tests use)
#   background lane (target/ci-side, its own cargo; builds under nice 19, so that they take only
#   the CPU the main lane leaves; its log is printed at the end):
#     a. the amd64 release build of agent + controller
#     b. the Debian packages (scripts/package.sh --no-build: agent amd64/arm64/armhf, controller
#        amd64; it waits for step 2) and their checks (scripts/test-packages.sh: contents, the
#        units, a real dpkg install into an overlay copy of this machine;
#        scripts/test-systemd.sh: the installed units under a real systemd booted with
#        systemd-nspawn: READY, watchdog, an update, drain, exit 78, and the real ferryctl
#        serve under its unit's sandbox)
#     c. the agent's unit tests built for armv7 and run under qemu-arm
#        (FERRY_QEMU_TESTS="aarch64 armv7" runs them under qemu-aarch64 as well)
# A failure in either lane fails the run (the other lane is stopped). The end prints when each
# step started. Idempotent; safe to run again. Set FERRY_SKIP_CROSS=1 to skip the ARM builds,
# the ARM packages and the qemu unit tests while iterating.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
TIMELINE="$PWD/target/ci-timeline.txt"
mkdir -p target
: >"$TIMELINE"
step() {
    printf '\n==> %s (%ss)\n' "$*" "$((SECONDS - T0))"
    printf '%6ss  main        %s\n' "$((SECONDS - T0))" "$*" >>"$TIMELINE"
}

step "environment"
bash scripts/env-up.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export FERRY_REGISTRY="${FERRY_REGISTRY_ADDR:-127.0.0.1:5055}"
export FERRY_REQUIRE_INFRA=1
# Line tables only in the test builds: backtraces keep file:line, and linking some forty test
# binaries stops writing every dependency's full debug info each time.
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
export FERRY_IMAGES_FILE="$PWD/target/sample-images.txt"

step "sample images (arm64 + armv7, built under qemu)"
images/build.sh "$FERRY_REGISTRY" > "$FERRY_IMAGES_FILE.tmp"
mv "$FERRY_IMAGES_FILE.tmp" "$FERRY_IMAGES_FILE"
cat "$FERRY_IMAGES_FILE"

CROSS=1
[ "${FERRY_SKIP_CROSS:-0}" != 1 ] || CROSS=0
ARM_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
# The unit tests run under qemu on armv7 only: 32-bit usize/time_t and alignment are where an ARM
# box differs from this host; aarch64 is 64-bit little-endian like it, and its release build
# proves it compiles. (Both: FERRY_QEMU_TESTS="aarch64 armv7".)
QEMU_TARGETS=()
if [ "$CROSS" = 1 ]; then
    for arch in ${FERRY_QEMU_TESTS:-armv7}; do
        case "$arch" in
            aarch64) QEMU_TARGETS+=(aarch64-unknown-linux-gnu) ;;
            armv7) QEMU_TARGETS+=(armv7-unknown-linux-gnueabihf) ;;
            *) echo "FERRY_QEMU_TESTS: unknown arch $arch" >&2; exit 2 ;;
        esac
    done
else
    export FERRY_PKG_AGENT_ARCHES=amd64
fi

# ------------------------------------------------------------------ the background lane
SIDE="$PWD/target/ci-side"
BG_LOG="$PWD/target/ci-background.log"
ARM_READY="$SIDE/arm-agents.ready"
# The next agent (0.1.1) for the self-update checks, built by the main lane.
NEXT_READY="$SIDE/next-agent.ready"
NEXT_AGENT="${CARGO_TARGET_DIR:-$PWD/target}/selfupdate/ferry-agent-0.1.1"
mkdir -p "$SIDE"
rm -f "$ARM_READY" "$NEXT_READY"
background() {
    bstep() {
        printf '\n==> [background] %s (%ss)\n' "$*" "$((SECONDS - T0))"
        printf '%6ss  background  %s\n' "$((SECONDS - T0))" "$*" >>"$TIMELINE"
    }
    bstep "agent + controller for amd64 (release, as shipped; nice 19)"
    CARGO_TARGET_DIR="$SIDE" nice -n 19 cargo build --locked --release -p ferry-agent -p ferry-controller
    if [ "$CROSS" = 1 ] && [ ! -e "$ARM_READY" ]; then
        bstep "waiting for the ARM release agents of the main lane"
        while [ ! -e "$ARM_READY" ]; do sleep 1; done
    fi
    bstep "Debian packages and their checks"
    FERRY_PKG_AMD64_TARGET_DIR="$SIDE" bash scripts/package.sh --no-build
    bash scripts/test-packages.sh
    if [ ! -e "$NEXT_READY" ]; then
        bstep "waiting for the next agent (0.1.1) of the main lane"
        while [ ! -e "$NEXT_READY" ]; do sleep 1; done
    fi
    FERRY_NEXT_AGENT="$NEXT_AGENT" bash scripts/test-systemd.sh
    local target
    for target in "${QEMU_TARGETS[@]}"; do
        bstep "agent unit tests for $target: build (nice 19)"
        CARGO_TARGET_DIR="$SIDE" nice -n 19 \
            cargo test --locked --no-run -p ferry-agent -p ferry-protocol --lib --target "$target"
        bstep "agent unit tests for $target under qemu"
        CARGO_TARGET_DIR="$SIDE" cargo test --locked -p ferry-agent -p ferry-protocol --lib --target "$target"
    done
    bstep "background lane passed"
}

BG_PID=""
# Prints the background lane's log once it has ended; stops it first when the main lane failed.
finish() {
    local rc=$? bg_rc=0
    [ -n "$BG_PID" ] || return 0
    if [ "$rc" -ne 0 ] && kill -0 "$BG_PID" 2>/dev/null; then
        echo "test.sh: the main lane failed; stopping the background lane" >&2
        kill -TERM -- "-$BG_PID" 2>/dev/null || true
    fi
    wait "$BG_PID" || bg_rc=$?
    BG_PID=""
    printf '\n==> the background lane (%s), exit %s:\n' "$BG_LOG" "$bg_rc"
    cat "$BG_LOG"
    printf '\n==> timeline (when each step started)\n'
    sort -n "$TIMELINE"
    if [ "$bg_rc" -ne 0 ]; then
        printf '\n==> FAILED in the background lane (exit %s): see its log above\n' "$bg_rc" >&2
        [ "$rc" -ne 0 ] || exit "$bg_rc"
    fi
}
trap finish EXIT
# Its own process group (set -m), so that finish can stop all of it: cargo, rustc, test-systemd.sh.
set -m
(background) </dev/null >"$BG_LOG" 2>&1 &
BG_PID=$!
set +m
echo "test.sh: background lane started (pid $BG_PID, log $BG_LOG)"

# ------------------------------------------------------------------ the main lane
step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

if [ "$CROSS" = 1 ]; then
    step "agent for ${ARM_TARGETS[*]} (release, as shipped)"
    cargo build --locked --release -p ferry-agent "${ARM_TARGETS[@]/#/--target=}"
    for target in "${ARM_TARGETS[@]}"; do
        ls -l "target/$target/release/ferry-agent"
    done
    # The budget for the boxes' flash (README "Size"): the stripped armv7 agent, ≤ 4 MB.
    v7="target/armv7-unknown-linux-gnueabihf/release/ferry-agent"
    if readelf -S "$v7" | grep -q '\.symtab'; then
        echo "test.sh: $v7 is not stripped" >&2
        exit 1
    fi
    v7_bytes=$(stat -c %s "$v7")
    if [ "$v7_bytes" -gt 4000000 ]; then
        echo "test.sh: the stripped armv7 agent is $v7_bytes bytes, over the 4,000,000-byte budget" >&2
        exit 1
    fi
    echo "armv7 agent: $v7_bytes bytes (budget 4,000,000)"
    touch "$ARM_READY"
fi

step "workspace tests: build"
cargo test --locked --workspace --no-run
# The same agent built as 0.1.1 (only the binary relinks), for tests/self_update.rs.
bash scripts/build-agent-next.sh
touch "$NEXT_READY"
step "workspace tests (real dockerd, registry, mosquitto; ARM images under qemu)"
cargo test --locked --workspace -- --test-threads="${FERRY_TEST_THREADS:-2}"

step "waiting for the background lane"
finish
step "all tests passed in $((SECONDS - T0)) s"
