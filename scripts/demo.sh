#!/usr/bin/env bash
# The end-to-end demo (README's first command). On a fresh Debian 12 machine, as root:
#
#   scripts/demo.sh [--keep]        (or FERRY_DEMO_KEEP=1)
#
# Installs and starts what it needs (scripts/env-up.sh), builds Ferry (debug: the workspace's
# binaries, plus the agent for aarch64 and armv7) and the sample images (arm64 + armv7, under
# qemu), then starts a private mosquitto on the shipped hardened configuration
# (examples/mosquitto: TLS, a certificate per client from `ferryctl cert`, ACLs), the controller
# (`ferryctl serve`) and three boxes:
#
#   demo-1-aarch64  the aarch64 agent binary under qemu-user     group=canary site=north
#   demo-2-armv7    the armv7 agent binary under qemu-user       group=fleet  site=north
#   demo-3-x86      the native agent, platform linux/arm64       group=fleet  site=south
#                   (it runs the ARM image under binfmt)
#
# each with its own fake sysfs tree (hwmon temperature, a CPU thermal zone; different values per
# box) read by its telemetry, plus humidity taken from the app's own HTTP endpoint (only 2.x
# serves it). Then, through the controller:
#   1. sensor 1.0.0 is installed on all three (one 100% wave);
#   2. 2.0.0 is signed with the offline release key and rolled out in two waves (canary first,
#      10 s soak): humidity appears in the telemetry;
#   3. the broken 3.0.0 is rolled out the same way: the canary's health gate fails and it rolls
#      itself back, the rollout pauses, wave 2 never starts, the fleet keeps running 2.0.0;
#   4. a second app, bulk 2.0.0 (the 7 MiB ferry/bulk image, evicted from the engine first), to
#      demo-3-x86, whose agent has a 1 MiB/s link budget: its agent is killed (kill -9) in the
#      middle of the download and restarted, and the download resumes from the fsynced length;
#   5. a summary table (`ferryctl devices`) and the time it took.
#
# Without --keep everything it started is stopped and removed on exit and on Ctrl-C: agents,
# controller, broker, the demo devices' containers, temp dirs. With --keep the controller's web
# page stays up until Ctrl-C. It leaves everything else alone (other containers, the registry on
# 127.0.0.1:5055, images other references use).
#
# Simulation notes: the three boxes share this machine's dockerd and filesystem. A release is the
# same for every box, so the directory it binds into the app (/var/lib/ferry-apps/ferry-demo/
# sensors, the app's own temperature/humidity files) is one shared "site" directory; the per-box
# readings come from each agent's fake sysfs tree. On a real box the app would answer on the
# box's 127.0.0.1:8080; here each app runs on Docker's bridge, and each box gets a small
# forwarder on a port of its own that passes the agent's request to that box's container.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$SECONDS

KEEP="${FERRY_DEMO_KEEP:-0}"
for a in "$@"; do
    case "$a" in
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: $0 [--keep]" >&2; exit 2 ;;
    esac
done

REGISTRY_ADDR="${FERRY_REGISTRY_ADDR:-127.0.0.1:5055}"
# The demo names the registry `localhost:PORT` (the same registry): its agents prune the images
# they stop using, and on a shared dockerd removing `localhost:5055/...` only drops that name,
# never an image that something else here pulled as 127.0.0.1:5055/... .
REGISTRY="localhost:${REGISTRY_ADDR##*:}"
BOXES=(demo-1-aarch64 demo-2-armv7 demo-3-x86)
SITE_DIR=/var/lib/ferry-apps/ferry-demo

B=$'\033[1m'; D=$'\033[2m'; R=$'\033[31m'; G=$'\033[32m'; N=$'\033[0m'
if [ ! -t 1 ] || [ -n "${NO_COLOR:-}" ]; then B=; D=; R=; G=; N=; fi
now() { date +%H:%M:%S; }
say() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
info() { printf '%s %s\n' "$(now)" "$*"; }
die() { printf '%sdemo: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }
elapsed() { local s=$((SECONDS - T0)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

[ "$(id -u)" = 0 ] || die "run me as root (Docker, apt, /var/lib/ferry-apps)"

# One demo at a time on this machine (a second one would take the first one's device names).
exec 8>"${TMPDIR:-/tmp}/ferry-demo.lock"
flock -n 8 || die "another scripts/demo.sh is running (lock ${TMPDIR:-/tmp}/ferry-demo.lock)"

WORK=""
pids=()        # long-running helpers, stopped in reverse order
declare -A AGENT_PID=()
watchers=()    # `ferryctl device watch` printers
remove_demo_containers() {
    local b ids
    for b in "${BOXES[@]}"; do
        ids=$(docker ps -aq --filter "label=io.ferry.device=$b" 2>/dev/null || true)
        [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
    done
    return 0
}
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    for p in "${watchers[@]}"; do kill "$p" 2>/dev/null; done
    # Agents first (SIGTERM: they drain to a safe point), then the rest.
    local i p
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}" "${watchers[@]}"; do kill -9 "$p" 2>/dev/null; done
    for p in "${pids[@]}" "${watchers[@]}"; do wait "$p" 2>/dev/null; done
    if command -v docker >/dev/null; then remove_demo_containers; fi
    rm -rf "$SITE_DIR"
    [ -n "$WORK" ] && rm -rf "$WORK"
    if [ "$rc" != 0 ] && [ "$rc" != 130 ]; then
        printf '%sdemo failed (exit %s) after %s; stopped and removed what it started%s\n' \
            "$R" "$rc" "$(elapsed)" "$N" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; info "interrupted: cleaning up"; exit 130' INT TERM

# If a failure happens with the logs at hand, show their tails.
show_logs() {
    local f
    for f in "$WORK"/*.log; do
        [ -f "$f" ] || continue
        printf '%s--- %s (last 15 lines) ---%s\n' "$D" "${f##*/}" "$N" >&2
        tail -n 15 "$f" >&2
    done
}
fail() { show_logs; die "$*"; }

# ------------------------------------------------------------------ environment and build
say "environment: dockerd, qemu binfmt, registry on $REGISTRY_ADDR, mosquitto, toolchains"
# The daemons env-up may start (dockerd, the registry) must not inherit the demo's lock on fd 8:
# they would hold it after the demo ended, and every later demo would think one still runs.
bash scripts/env-up.sh 8>&- 2>&1 | sed 's/^/  /'
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
need=()
command -v jq >/dev/null || need+=(jq)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
    info "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        </dev/null >/dev/null || die "apt-get install ${need[*]} failed"
fi
info "ready ($(elapsed))"

say "building Ferry (debug): ferry-agent + ferryctl for x86_64, the agent for aarch64 and armv7"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK=$(mktemp -d /tmp/ferry-demo.XXXXXX)
run_logged() { # log-file grep-pattern command... : output to the log, matching lines shown
    local log=$1 pat=$2 rc
    shift 2
    set +e
    "$@" 2>&1 | tee "$log" | grep --line-buffered -E "$pat" | sed -u 's/^ */  /'
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" = 0 ] || { tail -n 40 "$log" >&2; die "failed: $*"; }
}
t=$SECONDS
BUILD_SHOWN='Compiling (ferry[a-z-]*|ring|rusqlite|bollard|tokio|rustls|axum) |Finished|Blocking|^error'
run_logged "$WORK/build-host.log" "$BUILD_SHOWN" cargo build --locked --workspace --bins
# The ARM agents: release builds already in target/ (scripts/test.sh makes them) are used when
# they are newer than every source; otherwise a debug build without debuginfo (the fastest).
fresh_release() { # triple
    local bin="$TARGET_DIR/$1/release/ferry-agent"
    [ -x "$bin" ] && [ -z "$(find src protocol registry Cargo.toml Cargo.lock -newer "$bin" \
        -type f ! -path '*/target/*' -print -quit)" ] && echo "$bin"
}
AGENT_A64=$(fresh_release aarch64-unknown-linux-gnu || true)
AGENT_V7=$(fresh_release armv7-unknown-linux-gnueabihf || true)
cross=()
[ -n "$AGENT_A64" ] || { cross+=(--target aarch64-unknown-linux-gnu); AGENT_A64="$TARGET_DIR/aarch64-unknown-linux-gnu/debug/ferry-agent"; }
[ -n "$AGENT_V7" ] || { cross+=(--target armv7-unknown-linux-gnueabihf); AGENT_V7="$TARGET_DIR/armv7-unknown-linux-gnueabihf/debug/ferry-agent"; }
if [ "${#cross[@]}" -gt 0 ]; then
    CARGO_PROFILE_DEV_DEBUG=0 run_logged "$WORK/build-arm.log" "$BUILD_SHOWN" \
        cargo build --locked -p ferry-agent "${cross[@]}"
fi
CTL="$TARGET_DIR/debug/ferryctl"
AGENT_X86="$TARGET_DIR/debug/ferry-agent"
for f in "$CTL" "$AGENT_X86" "$AGENT_A64" "$AGENT_V7"; do [ -x "$f" ] || die "$f was not built"; done
BUILD_S=$((SECONDS - t))
info "built in $BUILD_S s ($(elapsed))"

say "sample images sensor 1.0.0 / 2.0.0 / 3.0.0 for linux/arm64 + linux/arm/v7 (built under qemu, skipped when current)"
t=$SECONDS
images/build.sh "$REGISTRY_ADDR" 8>&- >"$WORK/images.txt" 2>"$WORK/images-build.log" \
    || { tail -n 30 "$WORK/images-build.log" >&2; die "images/build.sh failed"; }
grep -E 'linux/' "$WORK/images.txt" | awk '{printf "  %s %-7s %-13s %s\n", $1, $2, $3, substr($4, 1, 19) "…"}'
IMAGES_S=$((SECONDS - t))
info "images ready in $IMAGES_S s ($(elapsed))"

# ------------------------------------------------------------------ broker, keys, controller
# shellcheck source=scripts/lib/ports.sh
. scripts/lib/ports.sh
remove_demo_containers   # leftovers of an interrupted earlier run
rm -rf "$SITE_DIR"

STORY_T0=$SECONDS
say "the hardened broker (examples/mosquitto: TLS, a certificate per client, ACLs), keys, the controller"
MQTT_PORT=$(free_port)
BROKER="mqtts://127.0.0.1:$MQTT_PORT"
PKI="$WORK/pki"
# The fleet CA (offline in real life) and a certificate for every client: the broker, the
# controller's two connections, each box, and a watcher per box for the live event lines below.
"$CTL" cert ca --out "$WORK/offline/ca" >/dev/null
cert() { "$CTL" cert issue "$1" --role "$2" --ca "$WORK/offline/ca" --out "$PKI" "${@:3}" >/dev/null; }
cert broker broker --host 127.0.0.1 --host localhost
cert ferry-controller controller
for b in "${BOXES[@]}"; do cert "$b" device; cert "watch-$b" device; done
cp "$WORK/offline/ca/ca.crt" "$PKI/ferry-ca.crt"
# The shipped configuration as it is, on a free loopback port, pointed at these files; the
# demo's watchers get read access to one box each.
sed -e "s|^listener 8883\$|listener $MQTT_PORT 127.0.0.1|" -e "s|/etc/mosquitto/certs/|$PKI/|" \
    -e "s|/etc/mosquitto/ferry.acl|$WORK/ferry.acl|" examples/mosquitto/ferry.conf >"$WORK/mosquitto.conf"
grep -q "^listener $MQTT_PORT " "$WORK/mosquitto.conf" || die "examples/mosquitto/ferry.conf: no 'listener 8883' line"
{
    cat examples/mosquitto/ferry.acl
    echo
    echo "# The demo's watchers (ferryctl device watch), one box each."
    for b in "${BOXES[@]}"; do printf 'user watch-%s\ntopic read ferry/v1/devices/%s/#\n' "$b" "$b"; done
} >"$WORK/ferry.acl"
# As root, mosquitto would drop to its own user, which cannot read this private directory.
[ "$(id -u)" != 0 ] || sed -i '1i user root' "$WORK/mosquitto.conf"
mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
pids+=($!)
MQTT_TLS=(--mqtt-ca "$PKI/ferry-ca.crt")

mkdir -p "$WORK/keys" "$WORK/offline"
# The release key is the offline one (a release engineer's machine); the controller only ever
# sees its public half.
"$CTL" keygen --out "$WORK/offline" --name release >/dev/null
"$CTL" keygen --out "$WORK/keys" --name controller >/dev/null
cp "$WORK/offline/release.pub" "$WORK/keys/release.pub"
head -c 24 /dev/urandom | base64 | tr '+/' '-_' >"$WORK/api-token"
TOKEN=$(cat "$WORK/api-token")
# The fleet enrolment token: baked into every box's image; the controller admits a box that
# proves it (each box signs every report with its own key, generated at first start).
head -c 24 /dev/urandom | base64 | tr '+/' '-_' >"$WORK/enroll-token"
info "release key (offline) $WORK/offline/release.key, controller key $WORK/keys/controller.key"

HTTP_PORT=$(free_port)
cat >"$WORK/controller.toml" <<CONF
listen = "127.0.0.1:$HTTP_PORT"
data_dir = "$WORK/controller"
api_token_file = "$WORK/api-token"
controller_key = "$WORK/keys/controller.key"

[mqtt]
url = "$BROKER"
ca = "$PKI/ferry-ca.crt"
cert = "$PKI/ferry-controller.crt"
key = "$PKI/ferry-controller.key"
notices_cert = "$PKI/ferry-controller-notices.crt"
notices_key = "$PKI/ferry-controller-notices.key"

[trust]
release_keys = ["$WORK/keys/release.pub"]

[enroll]
token_file = "$WORK/enroll-token"

[rollout]
device_timeout = "5m"
tick = "500ms"
CONF
"$CTL" serve --config "$WORK/controller.toml" --check >/dev/null 2>&1 \
    || { "$CTL" serve --config "$WORK/controller.toml" --check; die "controller config rejected"; }
NO_COLOR=1 RUST_LOG=info,rumqttc=warn "$CTL" serve --config "$WORK/controller.toml" >"$WORK/controller.log" 2>&1 &
pids+=($!)
export FERRY_SERVER="http://127.0.0.1:$HTTP_PORT" FERRY_TOKEN_FILE="$WORK/api-token"
for _ in $(seq 100); do curl -fsS -m 1 "$FERRY_SERVER/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS -m 2 "$FERRY_SERVER/healthz" >/dev/null 2>&1 || fail "the controller does not answer on $FERRY_SERVER"
info "broker $BROKER; controller $FERRY_SERVER (web page: $FERRY_SERVER/#token=$TOKEN)"

# ------------------------------------------------------------------ the boxes
# The app reads the release's bind: the site's sensor files (shared by the three boxes).
mkdir -p "$SITE_DIR/sensors"
echo 21750 >"$SITE_DIR/sensors/temp1_input"
echo 41500 >"$SITE_DIR/sensors/humidity1_input"

# Each box's "127.0.0.1:8080": a forwarder to the box's current container (see the header).
FWD_PORTS=()
fwd_args=()
for b in "${BOXES[@]}"; do p=$(free_port); FWD_PORTS+=("$p"); fwd_args+=("$b=$p"); done
cat >"$WORK/forward.py" <<'PY'
import http.server, subprocess, sys, threading, urllib.request, urllib.error

def container_ip(device):
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=io.ferry.device={device}"],
                         capture_output=True, text=True, timeout=5).stdout.split()
    if not ids:
        return None
    out = subprocess.run(["docker", "inspect", "-f",
                          "{{.Created}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"] + ids,
                         capture_output=True, text=True, timeout=5).stdout.split("\n")
    rows = sorted(l.split() for l in out if len(l.split()) == 2)
    return rows[-1][1] if rows else None   # the newest container

def handler(device):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, body = 502, b'{"error":"no container"}'
            try:
                ip = container_ip(device)
                if ip:
                    with urllib.request.urlopen(f"http://{ip}:8080{self.path}", timeout=1.5) as r:
                        status, body = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            except Exception as e:
                status, body = 502, ('{"error":"%s"}' % type(e).__name__).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    return H

for arg in sys.argv[1:]:
    device, port = arg.split("=")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), handler(device))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
threading.Event().wait()
PY
python3 "$WORK/forward.py" "${fwd_args[@]}" >"$WORK/forward.log" 2>&1 &
pids+=($!)

say "three boxes, each with its own sensors and labels"
# name | binary wrapper | binary | platform | labels | board temp m°C | cpu temp m°C
box_spec() {
    case "$1" in
        demo-1-aarch64) echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu|$AGENT_A64||group=canary site=north|19250|41000" ;;
        demo-2-armv7)   echo "qemu-arm-static -L /usr/arm-linux-gnueabihf|$AGENT_V7||group=fleet site=north|22500|47500" ;;
        demo-3-x86)     echo "|$AGENT_X86|linux/arm64|group=fleet site=south|26750|52000" ;;
    esac
}
declare -A MAX_RATE=([demo-3-x86]=1048576)
i=0
for b in "${BOXES[@]}"; do
    IFS='|' read -r wrapper bin platform labels temp cpu <<<"$(box_spec "$b")"
    dir="$WORK/$b"
    sys="$dir/sys"
    mkdir -p "$dir/state" "$sys/class/hwmon/hwmon0" "$sys/class/thermal/thermal_zone0"
    echo sht4x >"$sys/class/hwmon/hwmon0/name"
    echo "$temp" >"$sys/class/hwmon/hwmon0/temp1_input"
    echo cpu-thermal >"$sys/class/thermal/thermal_zone0/type"
    echo "$cpu" >"$sys/class/thermal/thermal_zone0/temp"
    {
        echo "device_id = \"$b\""
        [ -n "$platform" ] && echo "platform = \"$platform\"   # an x86_64 box running ARM images under binfmt"
        echo "state_dir = \"$dir/state\""
        echo
        echo "[labels]"
        for l in $labels; do echo "${l%%=*} = \"${l#*=}\""; done
        cat <<CONF

[mqtt]
url = "$BROKER"
ca_file = "$PKI/ferry-ca.crt"
cert_file = "$PKI/$b.crt"
key_file = "$PKI/$b.key"
keepalive = "30s"
backoff_initial = "200ms"
backoff_max = "2s"

[trust]
release_keys = ["$WORK/keys/release.pub"]
controller_keys = ["$WORK/keys/controller.pub"]

[identity]
enroll_token_file = "$WORK/enroll-token"

[update]
stop_timeout = "3s"
health_watch = "2s"
drain_gate = "2s"

[download]
max_rate = ${MAX_RATE[$b]:-0}      # bytes/s (0: unlimited); the x86 box plays a 1 MiB/s link

[policy]
# Each app binds only from /var/lib/ferry-apps/<app> (the default), and the site's sensor
# directory, which every app may read.
shared_bind_dirs = ["$SITE_DIR/sensors"]

[log]
level = "info"

[telemetry]
sysfs_root = "$sys"
sample = "2s"
max_interval = "10s"

[[telemetry.sensor]]
name = "temperature_c"
kind = "hwmon"
device = "sht4x"
input = "temp1_input"

[[telemetry.sensor]]
name = "cpu_temp_c"
kind = "thermal"
zone = "cpu-thermal"

[[telemetry.sensor]]
name = "humidity_pct"
kind = "http"
url = "http://127.0.0.1:${FWD_PORTS[$i]}/"
field = "humidity_pct"
CONF
    } >"$dir/agent.toml"
    # shellcheck disable=SC2086
    $wrapper "$bin" --config "$dir/agent.toml" check-config >/dev/null 2>"$WORK/$b.check.log" \
        || { cat "$WORK/$b.check.log" >&2; die "$b: config rejected"; }
    # shellcheck disable=SC2086
    NO_COLOR=1 $wrapper "$bin" --config "$dir/agent.toml" run >"$WORK/$b.log" 2>&1 &
    pids+=($!)
    AGENT_PID[$b]=$!
    kind="native x86_64"; [ -n "$wrapper" ] && kind="${wrapper%% *} (qemu-user)"
    info "$b: ${bin#"$ROOT"/}, $kind; $labels; board $(awk "BEGIN{print $temp/1000}") °C"
    i=$((i + 1))
done
# Live events of every box, as the agents report them over MQTT.
for b in "${BOXES[@]}"; do
    "$CTL" device watch "$b" --broker "$BROKER" "${MQTT_TLS[@]}" \
        --mqtt-cert "$PKI/watch-$b.crt" --mqtt-key "$PKI/watch-$b.key" 2>/dev/null > >(
        grep --line-buffered -E ' event (received|downloaded|committed|rolling_back|rolled_back|failed|rejected)|^    \| ' \
            | sed -u 's/^/  /') &
    watchers+=($!)
done

devices_json() { "$CTL" --json devices 2>/dev/null || echo '[]'; }
wait_for() { # description, timeout_s, jq filter over `devices --json` that must be true
    local what=$1 limit=$2 filter=$3 t=$SECONDS
    while [ $((SECONDS - t)) -lt "$limit" ]; do
        [ "$(devices_json | jq -r "$filter")" = true ] && return 0
        sleep 1
    done
    "$CTL" devices >&2 || true
    fail "timed out after ${limit}s waiting for: $what"
}
wait_for "three boxes online" 120 '[.[] | select(.online)] | length == 3'
info "the controller sees all three boxes online"

# ------------------------------------------------------------------ releases
sign() { # version [app] -> $WORK/APP-V.release.json; the image is ferry/APP:V
    local v=$1 app=${2:-sensor}
    cat >"$WORK/offline/$app-$v.toml" <<SPEC
app = "$app"
version = "$v"
image = "$REGISTRY/ferry/$app:$v"

[container]
binds = [{ host = "$SITE_DIR/sensors", container = "/sensors", read_only = true }]

[health]
check = { http = { port = 8080, path = "/healthz" } }
grace_s = 1
interval_s = 1
timeout_s = 2
successes = 2
max_failures = 3
deadline_s = 90
SPEC
    "$CTL" release sign --key "$WORK/offline/release.key" --spec "$WORK/offline/$app-$v.toml" \
        --out "$WORK/$app-$v.release.json" >"$WORK/sign-$app-$v.out" 2>&1 \
        || { cat "$WORK/sign-$app-$v.out" >&2; die "release sign $app $v failed"; }
    "$CTL" release push "$WORK/$app-$v.release.json" >"$WORK/push-$app-$v.out" 2>&1 \
        || { cat "$WORK/push-$app-$v.out" >&2; die "release push $app $v failed"; }
    info "$app $v signed offline ($(jq -r '.payload' "$WORK/$app-$v.release.json" | base64 -d \
        | jq -r '.platforms | keys | join(" + ")') digests from the registry), pushed to the catalogue"
}

# Start a rollout and print its progress until it ends (completed / paused / ...).
ROLLOUT=""
rollout() { # version waves soak
    local v=$1 waves=$2 soak=$3 out line last="" state
    out=$("$CTL" --json rollout start --app sensor --version "$v" --select all --waves "$waves" \
        --soak "$soak" --max-failures 0 2>&1) || { echo "$out" >&2; fail "rollout start $v failed"; }
    ROLLOUT=$(jq -r .id <<<"$out")
    local how="one wave"
    case "$waves" in 1,*) how="waves $waves: one canary first, then the rest" ;; esac
    info "rollout $ROLLOUT: sensor $v to every box ($how), soak $soak, pause at the first failure"
    local t=$SECONDS
    while :; do
        out=$("$CTL" --json rollout status "$ROLLOUT" 2>/dev/null || true)
        if [ -n "$out" ]; then
            state=$(jq -r .state <<<"$out")
            line=$(jq -r '"rollout \(.id) \(.state)" + ([.summary.waves[] | select(.started) |
                " | wave \(.index + 1): \(.devices) box(es), \(.notified) notified, \(.soaking) soaking, \(.succeeded) ok, \(.failed) failed"]
                | join(""))' <<<"$out")
            if [ "$line" != "$last" ]; then info "$line"; last=$line; fi
            case "$state" in running) ;; *) break ;; esac
        fi
        [ $((SECONDS - t)) -lt 420 ] || fail "rollout $ROLLOUT still running after 420 s"
        sleep 1
    done
    ROLLOUT_JSON=$out
}

# The latest readings of a box from the controller (ferryctl telemetry ID --json).
readings() { # box
    "$CTL" --json telemetry "$1" --since 10m 2>/dev/null | jq -r '
        def last(m): (.series[m] // []) | last;
        def show(m; unit): if last(m) then "\(m)=\(last(m).value)\(unit)" else "\(m)=-" end;
        [show("temperature_c"; "°C"), show("cpu_temp_c"; "°C"), show("humidity_pct"; "%")] | join("  ")' \
        2>/dev/null || echo "(no telemetry yet)"
}
first_humidity() { # box -> "HH:MM:SS VALUE" of its first humidity sample, or nothing
    "$CTL" --json telemetry "$1" --since 10m --metric humidity_pct 2>/dev/null \
        | jq -r '(.series.humidity_pct // [])[0] // empty | "\(.ts / 1000 | localtime | strftime("%H:%M:%S")) \(.value)"' 2>/dev/null
}
app_says() { curl -fsS -m 3 "http://127.0.0.1:$1/" 2>/dev/null || echo "(no answer)"; }

# ------------------------------------------------------------------ the story
say "1. install sensor 1.0.0 on all three boxes (one wave)"
sign 1.0.0
rollout 1.0.0 100% 2s
[ "$(jq -r .state <<<"$ROLLOUT_JSON")" = completed ] || fail "installing 1.0.0: $(jq -c '{state,reason}' <<<"$ROLLOUT_JSON")"
sleep 3
info "telemetry at the controller (ferryctl telemetry ID): each box's own sysfs readings, no humidity"
for b in "${BOXES[@]}"; do printf '    %-15s %s\n' "$b" "$(readings "$b")"; done

say "2. sign 2.0.0 (adds humidity) and roll it out in two waves: the canary, then the rest"
sign 2.0.0
rollout 2.0.0 1,100% 10s
[ "$(jq -r .state <<<"$ROLLOUT_JSON")" = completed ] || fail "rollout of 2.0.0: $(jq -c '{state,reason}' <<<"$ROLLOUT_JSON")"
info "humidity arrives in the telemetry once 2.0.0 runs (the agents read it from the app):"
for b in "${BOXES[@]}"; do
    t=$SECONDS; first=""
    while [ $((SECONDS - t)) -lt 60 ] && [ -z "$first" ]; do
        first=$(first_humidity "$b"); [ -n "$first" ] || sleep 1
    done
    [ -n "$first" ] || fail "$b: no humidity_pct in its telemetry 60 s after 2.0.0"
    printf '    %-15s first humidity_pct %s %% at %s; now %s\n' "$b" "${first#* }" "${first%% *}" "$(readings "$b")"
done

say "3. roll out the broken 3.0.0 the same way"
sign 3.0.0
rollout 3.0.0 1,100% 10s
state=$(jq -r .state <<<"$ROLLOUT_JSON")
R3=$ROLLOUT
[ "$state" = paused ] || fail "the broken 3.0.0 rollout ended $state, expected paused"
info "rollout $ROLLOUT ${R}paused${N}: $(jq -r .reason <<<"$ROLLOUT_JSON")"
info "wave 2 never started: $(jq -r '[.devices | to_entries[] | select(.value.wave == null) | .key] | join(" and ")' \
    <<<"$ROLLOUT_JSON") were never sent 3.0.0"
canary=$(jq -r '[.devices | to_entries[] | select(.value.wave != null)] | sort_by(.value.wave) | .[0].key' <<<"$ROLLOUT_JSON")
seq3=$(devices_json | jq -r --arg c "$canary" '.[] | select(.id == $c) | .sequence')
info "ferryctl device show $canary:"
"$CTL" device show "$canary" 2>&1 | sed -n '1,/recent events/p' | grep -v 'recent events' | sed 's/^/    /'
info "its rolled_back event (reason + the failed container's last log lines):"
"$CTL" --json device show "$canary" | jq -r --argjson s "$seq3" '
    [.events[] | select(.sequence == $s and .phase == "rolled_back")][0]
    | "    reason: \(.reason)", (.logs // [] | .[] | "    | \(.)")'

say "4. a 7 MiB app over a 1 MiB/s link, with a power cut (kill -9) in the middle of its download"
# ferry/bulk: the sensor app plus a 6 MiB incompressible layer. The engine must not have it yet.
BULK_DIFF=$(python3 - "$REGISTRY_ADDR" <<'PY'
import json, sys, urllib.request
reg = sys.argv[1]
acc = "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json"
def get(path, accept=None):
    r = urllib.request.Request(f"http://{reg}/v2/ferry/bulk/{path}", headers={"Accept": accept} if accept else {})
    return json.load(urllib.request.urlopen(r, timeout=10))
idx = get("manifests/2.0.0", acc)
d = [m["digest"] for m in idx["manifests"] if m.get("platform", {}).get("architecture") == "arm64"][0]
m = get("manifests/" + d, "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
big = max(range(len(m["layers"])), key=lambda i: m["layers"][i]["size"])
print(get("blobs/" + m["config"]["digest"])["rootfs"]["diff_ids"][big])
PY
) || fail "cannot read the bulk image's layers from the registry"
holding_bulk() { # the images (build intermediates included) holding the bulk data layer
    for id in $(docker images -aq --no-trunc | sort -u); do
        docker image inspect -f '{{.Id}}{{range .RootFS.Layers}} {{.}}{{end}}' "$id" 2>/dev/null || true
    done | awk -v l="$BULK_DIFF" 'index($0, l) {print $1}'
}
for _ in 1 2 3 4 5; do   # children before their build parents: a few rounds
    ids=$(holding_bulk)
    [ -n "$ids" ] || break
    # shellcheck disable=SC2086
    docker rmi -f $ids >/dev/null 2>&1 || true
done
[ -z "$(holding_bulk)" ] || fail "the engine still holds the bulk layer (a container uses it?)"
sign 2.0.0 bulk
BOX=demo-3-x86
out=$("$CTL" --json rollout start --app bulk --version 2.0.0 --select "id=$BOX" --soak 2s 2>&1) \
    || { echo "$out" >&2; fail "rollout of bulk failed to start"; }
ROLLOUT=$(jq -r .id <<<"$out")
info "rollout $ROLLOUT: app bulk 2.0.0 (7 MiB) to $BOX, whose agent has [download] max_rate = 1 MiB/s"
PART="$WORK/$BOX/state/store/partial/sha256"
t=$SECONDS; have=0
while [ "$have" -lt 2500000 ]; do
    have=$(find "$PART" -maxdepth 1 -type f ! -name '*.durable' -printf '%s\n' 2>/dev/null | sort -n | tail -n 1)
    have=${have:-0}
    [ $((SECONDS - t)) -lt 90 ] || fail "$BOX: no download under way after 90 s"
    sleep 0.2
done
kill -9 "${AGENT_PID[$BOX]}"
wait "${AGENT_PID[$BOX]}" 2>/dev/null || true
have=$(find "$PART" -maxdepth 1 -type f ! -name '*.durable' -printf '%s\n' 2>/dev/null | sort -n | tail -n 1)
durable=$(cat "$PART"/*.durable 2>/dev/null | sort -n | tail -n 1)
info "${R}power cut${N}: $BOX's agent killed (kill -9) with $((${have:-0} / 1024)) KiB of the 6 MiB layer written, $((${durable:-0} / 1024)) KiB of it fsynced"
sleep 1
IFS='|' read -r _ bin _ _ _ _ <<<"$(box_spec "$BOX")"
NO_COLOR=1 "$bin" --config "$WORK/$BOX/agent.toml" run >>"$WORK/$BOX.log" 2>&1 &
pids+=($!)
AGENT_PID[$BOX]=$!
info "$BOX restarted: it reads its journal (downloading) and resumes the layer with a Range request"
t=$SECONDS
while :; do
    state=$("$CTL" --json rollout status "$ROLLOUT" 2>/dev/null | jq -r .state)
    case "$state" in running|"") ;; *) break ;; esac
    [ $((SECONDS - t)) -lt 180 ] || fail "rollout $ROLLOUT still running after 180 s"
    sleep 1
done
[ "$state" = completed ] || fail "the bulk rollout ended $state"
"$CTL" --json device show "$BOX" | jq -r --arg r "$ROLLOUT" '
    [.events[] | select(.rollout == $r and .phase == "downloaded")][0].download
    | "    downloaded: \(.fetched_bytes) bytes fetched after the restart, \(.resumes) blob resumed from its fsynced length, \(.restarts) restarted from zero, \(.skipped_blobs) layers the engine already had (busybox, shared with sensor)"' \
    || true
grep -h "resuming a blob" "$WORK/$BOX.log" | tail -n 1 | sed 's/^/    agent log: /'
info "${G}rollout $ROLLOUT completed: the download survived the power cut and nothing was fetched twice${N}"

say "5. the fleet afterwards"
"$CTL" devices | sed 's/^/  /'
info "every report above was signed by its box's own key (enrolled with the fleet token) and verified by the controller:"
"$CTL" device keys | sed 's/^/  /'
curl -fsS -m 2 "$FERRY_SERVER/metrics" | grep -E '^ferry_reports_dropped_total' | sed 's/^/  /' || true
i=0
for b in "${BOXES[@]}"; do
    printf '  %-15s its app says: %s\n' "$b" "$(app_says "${FWD_PORTS[$i]}")"
    i=$((i + 1))
done
if devices_json | jq -e '[.[] | select(.apps.sensor.version == "2.0.0" and .health == "healthy")] | length == 3' >/dev/null \
    && { "$CTL" --json rollout status "$R3" 2>/dev/null || true; } \
        | jq -e '[.devices | to_entries[] | select(.value.wave != null)] | length == 1' >/dev/null; then
    info "${G}every box runs sensor 2.0.0, healthy; only the canary ever received 3.0.0, and it rolled itself back${N}"
else
    info "${R}unexpected: not every box runs a healthy 2.0.0, or 3.0.0 went past the canary${N}"
fi
"$CTL" rollout list | sed 's/^/  /'
say "done in $(elapsed) (build $BUILD_S s, images $IMAGES_S s, the story $((SECONDS - STORY_T0)) s)"

if [ "$KEEP" = 1 ]; then
    for p in "${watchers[@]}"; do kill "$p" 2>/dev/null; done
    watchers=()
    echo "The controller's web page: $FERRY_SERVER/#token=$TOKEN"
    echo "  (CLI: FERRY_SERVER=$FERRY_SERVER FERRY_TOKEN_FILE=$WORK/api-token $CTL devices)"
    echo "  (it listens on 127.0.0.1; from another machine: ssh -L $HTTP_PORT:127.0.0.1:$HTTP_PORT root@THIS-HOST)"
    echo "Press Ctrl-C to stop the boxes, the controller and the broker and remove what the demo made."
    while :; do sleep 3600 & pids+=($!); wait $!; done
fi
