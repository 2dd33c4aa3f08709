#!/usr/bin/env bash
# The end-to-end demo (README's first command). On a fresh Debian 12 machine, as root:
# installs and starts what it needs, builds Ferry and the sample images (arm64 + armv7, under
# qemu), then on one box running ferry-agent:
#   1. signs sensor 1.0.0 with an offline release key and installs it (controller-signed notice),
#   2. updates to 2.0.0 (start-first: zero downtime) — humidity appears,
#   3. rolls out the deliberately broken 3.0.0: the health gate fails and the agent rolls back
#      to 2.0.0 by itself, reporting the reason and the container's last log lines,
#   4. shows that a forged notice is rejected and changes nothing.
# Cleans up after itself (Ctrl-C too). KEEP=1 leaves the box running for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REGISTRY="${FERRY_REGISTRY_ADDR:-127.0.0.1:5055}"
WORK="$ROOT/.ferry-demo"
DEVICE="demo-box-1"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=()
cleanup() {
    set +e
    if [ "${KEEP:-0}" = 1 ]; then
        say "KEEP=1: agent and broker left running (pids ${pids[*]}); state in $WORK"
        return
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    docker ps -aq --filter "label=io.ferry.device=$DEVICE" | xargs -r docker rm -f >/dev/null
    rm -rf "/var/lib/ferry-apps/$DEVICE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "environment (dockerd, qemu binfmt, registry, mosquitto, toolchains)"
bash scripts/env-up.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

say "sample images for linux/arm64 and linux/arm/v7, built under qemu"
images/build.sh "$REGISTRY"

say "building ferry-agent and ferryctl"
cargo build --release --locked -p ferry-agent -p ferry-controller 2>&1 | tail -2
BIN="$ROOT/target/release"
ls -l "$BIN/ferry-agent" "$BIN/ferryctl" | awk '{print "  " $5 " bytes  " $9}'

rm -rf "$WORK"; mkdir -p "$WORK/keys" "$WORK/state" "$WORK/ctl"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BROKER="mqtt://127.0.0.1:$PORT"
cat > "$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
CONF
mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
pids+=($!)

say "keys: an offline release key and the controller's key"
"$BIN/ferryctl" keygen --out "$WORK/keys" --name release
"$BIN/ferryctl" keygen --out "$WORK/keys" --name controller

SENSORS="/var/lib/ferry-apps/$DEVICE/sensors"
mkdir -p "$SENSORS"; echo 23250 > "$SENSORS/temp1_input"; echo 41500 > "$SENSORS/humidity1_input"

for v in 1.0.0 2.0.0 3.0.0; do
cat > "$WORK/sensor-$v.toml" <<SPEC
app = "sensor"
version = "$v"
image = "$REGISTRY/ferry/sensor:$v"

[container]
binds = [{ host = "$SENSORS", container = "/sensors", read_only = true }]

[health]
check = { http = { port = 8080, path = "/healthz" } }
grace_s = 1
interval_s = 1
timeout_s = 2
successes = 3
max_failures = 3
deadline_s = 60
SPEC
"$BIN/ferryctl" release sign --key "$WORK/keys/release.key" --spec "$WORK/sensor-$v.toml" --out "$WORK/sensor-$v.release.json" >/dev/null
done
say "releases signed (per-platform digests resolved from the registry)"
"$BIN/ferryctl" release verify --trust "$WORK/keys/release.pub" "$WORK/sensor-2.0.0.release.json"

cat > "$WORK/agent.toml" <<CONF
device_id = "$DEVICE"
platform = "linux/arm64"   # this x86_64 host runs the ARM images under qemu
state_dir = "$WORK/state"

[mqtt]
url = "$BROKER"

[trust]
release_keys = ["$WORK/keys/release.pub"]
controller_keys = ["$WORK/keys/controller.pub"]
CONF
"$BIN/ferry-agent" check-config --config "$WORK/agent.toml"
"$BIN/ferry-agent" --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
pids+=($!)

publish() { # seq-label release [flags]
    "$BIN/ferryctl" publish --key "$WORK/keys/controller.key" --device "$DEVICE" --broker "$BROKER" \
        --state-dir "$WORK/ctl" "$@"
}
watch_until() {
    "$BIN/ferryctl" device watch "$DEVICE" --broker "$BROKER" --until any-terminal --timeout 5m || true
}
app_says() {
    local ip
    ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
        "$(docker ps -q --filter "label=io.ferry.device=$DEVICE" | head -1)")
    curl -fsS "http://$ip:8080/" || echo "(no answer)"
    echo
}

say "1. install sensor 1.0.0"
publish --release "$WORK/sensor-1.0.0.release.json"
watch_until
echo -n "  the app says: "; app_says

say "2. update to 2.0.0 (start-first: the new one passes its health gate before the old stops)"
publish --release "$WORK/sensor-2.0.0.release.json" --strategy start-first
watch_until
echo -n "  the app says: "; app_says

say "3. roll out the broken 3.0.0: the agent rolls itself back"
publish --release "$WORK/sensor-3.0.0.release.json"
watch_until
echo -n "  the app says: "; app_says

say "4. a forged notice (signed with the release key, not the controller's) is rejected"
"$BIN/ferryctl" publish --key "$WORK/keys/release.key" --device "$DEVICE" --broker "$BROKER" \
    --state-dir "$WORK/ctl" --release "$WORK/sensor-1.0.0.release.json" --allow-downgrade
watch_until
echo -n "  the app says: "; app_says

say "summary: containers of $DEVICE"
docker ps --filter "label=io.ferry.device=$DEVICE" --format 'table {{.Names}}\t{{.Label "io.ferry.version"}}\t{{.Status}}'
say "done"
