#!/usr/bin/env bash
# The packaged units under a real systemd: this machine's own Debian userland, with the amd64
# packages installed, booted by systemd-nspawn from an overlay copy of / (a private mount
# namespace; nothing outside changes), sharing the host's network and Docker socket.
#   agent:      `systemctl start` returns after READY=1; the sandbox is on (no capabilities,
#               seccomp, no_new_privs); watchdog pings arrive; a signed update installs through
#               the real registry and dockerd and commits; `systemctl stop` drains and exits 0,
#               the app keeps running; a self-update to the next agent (FERRY_NEXT_AGENT) commits
#               in the same process (exec, no restart); a broken one (/bin/false) is started three
#               times by systemd, a hanging one (FERRY_AGENT_BREAK=hang) killed three times by
#               the watchdog, and each time the box is back on 0.1.1 by itself; dpkg -i of a newer
#               package then wins over the installed versions; a stopped (hung) agent is killed
#               by the watchdog and restarted; a configuration error exits 78, NOT restarted.
#   controller: the real `ferryctl serve` under the packaged unit (its user, sandbox, state dir),
#               configured as the packaged controller.toml says (keygen, token 0640
#               root:ferry-controller): it stays active, /healthz answers, /metrics shows the
#               broker connected, the agent above is in `ferryctl devices --json` (API, token)
#               with its platform and app version, the SQLite database is in
#               /var/lib/ferry-controller owned by ferry-controller, `systemctl stop` exits 0,
#               a configuration error (missing key) exits 78 and is NOT restarted.
# The drop-ins used here shorten WatchdogSec to 4 s and RestartSec to 2 s, to keep it quick.
# Needs root, systemd-nspawn (systemd-container), dockerd, the registry with the sample images
# (scripts/test.sh builds them), mosquitto, qemu binfmt for arm64. Usage: test-systemd.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${FERRY_SYSTEMD_NS:-}" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "test-systemd: needs root" >&2; exit 1; }
    command -v systemd-nspawn >/dev/null || { echo "test-systemd: needs systemd-nspawn (systemd-container)" >&2; exit 1; }
    exec unshare --mount --propagation private env FERRY_SYSTEMD_NS=1 "$0" "$@"
fi

DIR="${1:-${CARGO_TARGET_DIR:-$PWD/target}/debian}"
VERSION="$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
REGISTRY="${FERRY_REGISTRY:-127.0.0.1:5055}"
DEVICE="systemd-smoke-$$"
# shellcheck source=scripts/lib/ports.sh
. scripts/lib/ports.sh
PORT=$(free_port)
API_PORT=$(free_port)
SCRATCH="$(mktemp -d)"
# Under the app's own directory: the packaged policy confines each app's binds to
# /var/lib/ferry-apps/<app>.
SENSORS="/var/lib/ferry-apps/sensor/$DEVICE/sensors"
# The agent's state dir, bound from the host at the same path: the host's dockerd resolves the
# bind sources of the containers the agent creates (its update-lock directory
# /var/lib/ferry/locks/<app>) in the host's filesystem, not in the container's overlay.
STATE=/var/lib/ferry
STATE_CREATED=""
FAILS=0
NSPAWN_PID=""
MOSQ_PID=""

ok() { printf '  ok   %s\n' "$*"; }
bad() { printf '  FAIL %s\n' "$*" >&2; FAILS=$((FAILS + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
one_of() { local v="$1"; shift; case " $* " in *" $v "*) return 0 ;; *) return 1 ;; esac; }
contains() { grep -qE -- "$2" <<<"$1"; } # contains TEXT REGEX
die() { echo "test-systemd: $*" >&2; exit 1; }

cleanup() {
    set +e
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" # nspawn asks the container's systemd to power off
        for _ in $(seq 1 40); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$NSPAWN_PID" 2>/dev/null
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    [ -z "$MOSQ_PID" ] || kill "$MOSQ_PID" 2>/dev/null
    docker ps -aq --filter "label=io.ferry.device=$DEVICE" | xargs -r docker rm -f >/dev/null
    rm -rf "/var/lib/ferry-apps/sensor/$DEVICE"
    rmdir /var/lib/ferry-apps/sensor 2>/dev/null
    [ -z "$STATE_CREATED" ] || rm -rf "$STATE"
    umount -R "$SCRATCH/ov" 2>/dev/null
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

AGENT_DEB="$DIR/ferry-agent_${VERSION}_amd64.deb"
CONTROLLER_DEB="$DIR/ferry-controller_${VERSION}_amd64.deb"
if [ ! -f "$AGENT_DEB" ] || [ ! -f "$CONTROLLER_DEB" ]; then
    die "no amd64 packages in $DIR (scripts/package.sh)"
fi

# ------------------------------------------------------------ the copy of this machine
mkdir -p "$SCRATCH/ov"
mount -t tmpfs -o size=1g tmpfs "$SCRATCH/ov"
mkdir -p "$SCRATCH/ov/upper" "$SCRATCH/ov/work" "$SCRATCH/ov/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$SCRATCH/ov/upper,workdir=$SCRATCH/ov/work" "$SCRATCH/ov/root"
R="$SCRATCH/ov/root"
cp "$AGENT_DEB" "$CONTROLLER_DEB" "$R/tmp/"
in_root() { chroot "$R" env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
in_root dpkg -P ferry-agent ferry-controller >/dev/null 2>&1 || true
in_root dpkg -i "/tmp/$(basename "$AGENT_DEB")" "/tmp/$(basename "$CONTROLLER_DEB")" >/dev/null 2>&1
in_root ferryctl keygen --out /root/keys --name release >/dev/null
cp "$R/root/keys/release.pub" "$R/etc/ferry/keys/"
# The controller's key where the packaged controller.toml expects it; the agent trusts its .pub.
in_root ferryctl keygen --out /etc/ferry/keys --name controller >/dev/null
sed -i -e "s|^# device_id = \"dev-001\".*|device_id = \"$DEVICE\"|" \
    -e "s|^url = .*|url = \"mqtt://127.0.0.1:$PORT\"|" \
    -e 's|^# platform = .*|platform = "linux/arm64"   # the sample images are ARM; qemu runs them|' \
    "$R/etc/ferry/agent.toml"
# The fleet enrolment token, as an operator bakes it into the image and the controller's config.
ENROLL_TOKEN="$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')"
echo "$ENROLL_TOKEN" >"$R/etc/ferry/enroll-token"
sed -i -e 's|^# enroll_token_file = |enroll_token_file = |' "$R/etc/ferry/agent.toml"
in_root ferry-agent check-config >/dev/null
mkdir -p "$R/etc/systemd/system/ferry-agent.service.d"
printf '[Service]\nWatchdogSec=4\nRestartSec=2\n' >"$R/etc/systemd/system/ferry-agent.service.d/smoke.conf"
# The controller as the packaged config's header says: key (above), token, group-readable.
head -c 24 /dev/urandom | base64 >"$R/etc/ferry/api-token"
in_root chgrp ferry-controller /etc/ferry/keys/controller.key /etc/ferry/api-token
chmod 0640 "$R/etc/ferry/keys/controller.key" "$R/etc/ferry/api-token"
sed -i -e "s|^listen = .*|listen = \"127.0.0.1:$API_PORT\"|" \
    -e "s|^url = .*|url = \"mqtt://127.0.0.1:$PORT\"|" \
    -e "s|^# tokens = .*|tokens = [\"$ENROLL_TOKEN\"]|" "$R/etc/ferry/controller.toml"
in_root setpriv --reuid=ferry-controller --regid=ferry-controller --clear-groups \
    ferryctl serve --check --config /etc/ferry/controller.toml >/dev/null
mkdir -p "$R/etc/systemd/system/ferry-controller.service.d"
printf '[Service]\nRestartSec=2\n' >"$R/etc/systemd/system/ferry-controller.service.d/smoke.conf"
# Boot only what the test needs: no second dockerd, broker or registry inside.
cat >"$R/etc/systemd/system/ferry-smoke.target" <<'EOF'
[Unit]
Description=Ferry systemd smoke test
Requires=basic.target
After=basic.target
AllowIsolate=yes
EOF
for u in docker.service docker.socket containerd.service mosquitto.service docker-registry.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$u"
done

# ------------------------------------------------------------ broker, sensors, release
# A leftover of an earlier smoke run (marked) is removed; anything else there is not ours.
[ ! -e "$STATE/.ferry-smoke-test" ] || rm -rf "$STATE"
if [ -e "$STATE" ]; then
    die "$STATE exists on this host (a ferry-agent installed here?); the smoke test binds its own there"
fi
mkdir -m 0700 "$STATE" && STATE_CREATED=1 && touch "$STATE/.ferry-smoke-test"
mkdir -p "$SENSORS"
echo 23250 >"$SENSORS/temp1_input"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" >"$SCRATCH/mosquitto.conf"
mosquitto -c "$SCRATCH/mosquitto.conf" >"$SCRATCH/mosquitto.log" 2>&1 &
MOSQ_PID=$!
cat >"$SCRATCH/sensor.toml" <<EOF
app = "sensor"
version = "1.0.0"
image = "$REGISTRY/ferry/sensor:1.0.0"

[container]
binds = [{ host = "$SENSORS", container = "/sensors", read_only = true }]

[health]
check = { http = { port = 8080, path = "/healthz" } }
grace_s = 1
interval_s = 1
timeout_s = 2
successes = 2
max_failures = 3
deadline_s = 60
EOF
"$R/usr/bin/ferryctl" release sign --key "$R/root/keys/release.key" --spec "$SCRATCH/sensor.toml" \
    --out "$SCRATCH/sensor.release.json" >/dev/null

# ------------------------------------------------------------ boot
echo "== booting this machine's userland under systemd-nspawn (device $DEVICE)"
systemd-nspawn -q -D "$R" --boot --register=no --keep-unit -M "ferry-smoke-$$" \
    --bind=/run/docker.sock --bind="$STATE" --console=passive \
    -- systemd.unit=ferry-smoke.target >"$SCRATCH/nspawn.log" 2>&1 &
NSPAWN_PID=$!
LEADER=""
for _ in $(seq 1 120); do
    # The container's PID 1 once it has exec'ed systemd: nspawn's first child is a short-lived
    # intermediate (taking it made nsenter fail now and then: "stat of /proc/N/ns/user failed").
    LEADER="$(pgrep -P "$NSPAWN_PID" -x systemd | head -n 1 || true)"
    [ -n "$LEADER" ] && break
    sleep 0.25
done
[ -n "$LEADER" ] || { cat "$SCRATCH/nspawn.log" >&2; die "the container did not start"; }
ct() { nsenter -t "$LEADER" -a "$@"; }
state=""
for _ in $(seq 1 120); do
    state="$(ct systemctl is-system-running 2>/dev/null || true)"
    case "$state" in running | degraded) break ;; esac
    sleep 0.5
done
check "container's systemd $(ct systemctl --version | head -n 1 | cut -d' ' -f1-2) is up ($state)" \
    one_of "$state" running degraded
show() { ct systemctl show "$1" -p "$2" --value; }

# ------------------------------------------------------------ agent
echo "== ferry-agent.service"
check "systemctl start returns once the agent sent READY=1" ct systemctl start ferry-agent
check "ActiveState=active" test "$(show ferry-agent ActiveState)" = active
pid="$(show ferry-agent MainPID)"
status="$(ct cat "/proc/$pid/status")"
check "sandboxed: no capabilities" contains "$status" $'^CapEff:\t0000000000000000$'
check "sandboxed: no_new_privs" contains "$status" $'^NoNewPrivs:\t1$'
check "sandboxed: seccomp filter" contains "$status" $'^Seccomp:\t2$'
echo "       agent RSS $(sed -n 's/^VmRSS:\s*//p' <<<"$status")"
w1="$(show ferry-agent WatchdogTimestampMonotonic)"
sleep 5
w2="$(show ferry-agent WatchdogTimestampMonotonic)"
check "WATCHDOG=1 pings arrive (WatchdogSec=4: every 2 s)" test "$w2" -gt "$w1"

"$R/usr/bin/ferryctl" publish --key "$R/etc/ferry/keys/controller.key" --device "$DEVICE" \
    --broker "mqtt://127.0.0.1:$PORT" --state-dir "$SCRATCH/ctl" \
    --release "$SCRATCH/sensor.release.json" >/dev/null
watch_out="$("$R/usr/bin/ferryctl" device watch "$DEVICE" --broker "mqtt://127.0.0.1:$PORT" \
    --until any-terminal --timeout 3m 2>&1 || true)"
if grep -q "event committed (seq 1)" <<<"$watch_out"; then
    ok "a signed update installs and commits under the sandbox (registry, dockerd, health gate, journal)"
else
    bad "update under the sandbox:"
    echo "$watch_out" | tail -n 15 | sed 's/^/       | /' >&2
    ct journalctl -u ferry-agent --no-pager -n 20 -o cat | sed 's/^/       | /' >&2
fi
check "the journal is in the state dir" ct test -s /var/lib/ferry/journal.json

# A self-update under systemd (PROTOCOL.md §10b): the packaged agent (the launcher) stages the
# next agent from its image, switches and execs into it: the same MainPID, no restart, and the
# new one commits. The next agent is this source built as 0.1.1 (scripts/build-agent-next.sh,
# FERRY_NEXT_AGENT); the box says linux/arm64 (the sample images are ARM), so its agent image is
# labelled arm64 while holding this machine's binary, which is what runs here.
NEXT="${FERRY_NEXT_AGENT:-}"
# agent_release VERSION BINARY: push a FROM scratch image holding BINARY as the agent VERSION,
# sign its release; prints the release file.
agent_release() {
    local ref="$REGISTRY/ferry/agent:$1-smoke" dir="$SCRATCH/agent-image-$1"
    mkdir -p "$dir"
    cp "$2" "$dir/ferry-agent"
    cp images/agent/Dockerfile "$dir/"
    DOCKER_BUILDKIT=0 docker build -q --platform linux/arm64 -t "$ref" "$dir" >/dev/null
    docker push "$ref" >/dev/null
    docker rmi "$ref" >/dev/null
    printf 'app = "ferry-agent"\nversion = "%s"\nimage = "%s"\n' "$1" "$ref" >"$dir/spec.toml"
    "$R/usr/bin/ferryctl" release sign --key "$R/root/keys/release.key" --spec "$dir/spec.toml" \
        --out "$dir/release.json" >/dev/null
    echo "$dir/release.json"
}
# publish_and_watch RELEASE...: the next notice (the sensor and RELEASE...), then its end.
publish_and_watch() {
    "$R/usr/bin/ferryctl" publish --key "$R/etc/ferry/keys/controller.key" --device "$DEVICE" \
        --broker "mqtt://127.0.0.1:$PORT" --state-dir "$SCRATCH/ctl" \
        --release "$SCRATCH/sensor.release.json" "$@" >/dev/null
    "$R/usr/bin/ferryctl" device watch "$DEVICE" --broker "mqtt://127.0.0.1:$PORT" \
        --until any-terminal --timeout 3m 2>&1 || true
}
# watched WHAT OK: report the watch's output when OK (a command) fails.
watched() {
    if "${@:2}"; then
        ok "$1"
    else
        bad "$1:"
        echo "$watch_out" | tail -n 15 | sed 's/^/       | /' >&2
        ct journalctl -u ferry-agent --no-pager -n 30 -o cat | sed 's/^/       | /' >&2
    fi
}
if [ -n "$NEXT" ]; then
    pid0="$(show ferry-agent MainPID)"
    n0="$(show ferry-agent NRestarts)"
    watch_out="$(publish_and_watch "$(agent_release 0.1.1 "$NEXT")")"
    watched "a self-update to agent 0.1.1 commits under systemd and the sandbox" \
        contains "$watch_out" "event committed \(seq 2\)"
    check "the same MainPID (exec), not restarted by systemd" \
        test "$(show ferry-agent MainPID) $(show ferry-agent NRestarts)" = "$pid0 $n0"
    check "the main process is agent 0.1.1 from the state dir" \
        test "$(ct readlink "/proc/$(show ferry-agent MainPID)/exe")" = /var/lib/ferry/agent/0.1.1/ferry-agent
    check "current -> 0.1.1, no longer on trial" \
        test "$(readlink "$STATE/agent/current")" = 0.1.1 -a ! -e "$STATE/agent/trial.json"
    check "the launcher logged it" contains "$(ct journalctl -u ferry-agent --no-pager -o cat)" \
        'starting the installed agent'

    # A broken next agent (/bin/false as 0.1.2: it exits at start): systemd restarts it, the
    # launcher counts the starts, and after three the box is back on 0.1.1 by itself.
    n0="$(show ferry-agent NRestarts)"
    watch_out="$(publish_and_watch "$(agent_release 0.1.2 /bin/false)")"
    fell_back() { contains "$watch_out" 'rolled_back \(seq 3\)' && contains "$watch_out" '3 times'; }
    watched "a broken agent (exits at start) falls back to 0.1.1 by itself, rolled_back with the reason" \
        fell_back
    check "systemd restarted it three times (the launcher's count), now active" \
        test "$(show ferry-agent NRestarts) $(show ferry-agent ActiveState)" = "$((n0 + 3)) active"
    check "the main process is 0.1.1 again, current -> 0.1.1" \
        test "$(ct readlink "/proc/$(show ferry-agent MainPID)/exe") $(readlink "$STATE/agent/current")" \
        = "/var/lib/ferry/agent/0.1.1/ferry-agent 0.1.1"

    # A next agent that hangs (built with FERRY_AGENT_BREAK=hang: READY=1, then never a watchdog
    # ping): the watchdog (4 s here) kills it, systemd restarts it, the launcher counts the
    # starts and the box is back on 0.1.1 after three.
    n0="$(show ferry-agent NRestarts)"
    watch_out="$(publish_and_watch "$(agent_release 0.1.3 "$(dirname "$NEXT")/ferry-agent-0.1.3-hang")")"
    fell_back() { contains "$watch_out" 'rolled_back \(seq 4\)' && contains "$watch_out" '3 times'; }
    watched "a hung agent (killed by the watchdog) falls back to 0.1.1 by itself, rolled_back with the reason" \
        fell_back
    check "the watchdog ended it three times, now active on 0.1.1" \
        test "$(show ferry-agent NRestarts) $(show ferry-agent ActiveState) $(readlink "$STATE/agent/current")" \
        = "$((n0 + 3)) active 0.1.1"
    check "the journal says the watchdog did it" \
        contains "$(ct journalctl -u ferry-agent --no-pager -o cat)" '[Ww]atchdog timeout'

    # dpkg -i of a newer package over the self-updated box: the package's agent (0.2.0, the same
    # source built as 0.2.0, repacked into the .deb) wins over the installed 0.1.1; the state
    # dir's versions are forgotten; dpkg's file was never rewritten by the agent.
    dpkg_sum="$(md5sum <"$R/usr/bin/ferry-agent")"
    deb020="$SCRATCH/deb-0.2.0"
    dpkg-deb -R "$AGENT_DEB" "$deb020"
    check "the self-updates left dpkg's binary alone" \
        test "$dpkg_sum" = "$(md5sum <"$deb020/usr/bin/ferry-agent")"
    cp "$(dirname "$NEXT")/ferry-agent-0.2.0" "$deb020/usr/bin/ferry-agent"
    sed -i 's/^Version: .*/Version: 0.2.0/' "$deb020/DEBIAN/control"
    (cd "$deb020" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
    dpkg-deb -b --root-owner-group "$deb020" "$R/root/ferry-agent_0.2.0_amd64.deb" >/dev/null
    # A box has no policy-rc.d (this machine's copy may: a container image's "no starts"): the
    # postinst's try-restart must really run.
    rm -f "$R/usr/sbin/policy-rc.d"
    ct dpkg -i /root/ferry-agent_0.2.0_amd64.deb >"$SCRATCH/dpkg.log" 2>&1 || { bad "dpkg -i ferry-agent 0.2.0"; sed "s/^/       | /" "$SCRATCH/dpkg.log" >&2; }
    for _ in $(seq 1 60); do
        [ "$(ct readlink "/proc/$(show ferry-agent MainPID)/exe" 2>/dev/null)" = /usr/bin/ferry-agent ] && break
        sleep 0.5
    done
    check "dpkg -i of a newer package wins: the main process is the packaged 0.2.0" \
        test "$(ct readlink "/proc/$(show ferry-agent MainPID)/exe") $(ct /usr/bin/ferry-agent --version)" \
        = "/usr/bin/ferry-agent ferry-agent 0.2.0"
    check "the installed versions are forgotten (no current, no previous)" \
        test ! -e "$STATE/agent/current" -a ! -e "$STATE/agent/previous"
    check "the launcher said why" contains "$(ct journalctl -u ferry-agent --no-pager -o cat)" 'dpkg won'
else
    echo "  skip self-update under systemd (FERRY_NEXT_AGENT not set; scripts/test.sh sets it)"
fi

check "systemctl stop drains and exits 0" ct systemctl stop ferry-agent
check "Result=success, exit status 0" test "$(show ferry-agent Result) $(show ferry-agent ExecMainStatus)" = "success 0"
check "the app keeps running without the agent" \
    test -n "$(docker ps -q --filter "label=io.ferry.device=$DEVICE" --filter status=running)"

ct systemctl start ferry-agent
pid="$(show ferry-agent MainPID)"
n0="$(show ferry-agent NRestarts)"
ct kill -STOP "$pid"
restarted=""
for _ in $(seq 1 60); do
    if [ "$(show ferry-agent NRestarts)" = "$((n0 + 1))" ] && [ "$(show ferry-agent ActiveState)" = active ]; then
        restarted=yes
        break
    fi
    sleep 0.5
done
check "a hung agent is restarted" test "$restarted" = yes
check "... by the watchdog" contains "$(ct journalctl -u ferry-agent --no-pager -o cat)" "Watchdog timeout"

sed -i "s|^device_id = .*|device_id = \"bad/id\"|" "$R/etc/ferry/agent.toml"
ct systemctl restart ferry-agent 2>/dev/null || true
before="$(show ferry-agent NRestarts)"
sleep 5 # RestartSec=2 in the drop-in: a restart would have happened by now
check "a configuration error: exit 78, failed, not restarted" \
    test "$(show ferry-agent ExecMainStatus) $(show ferry-agent ActiveState) $(show ferry-agent NRestarts)" = "78 failed $before"
check "the journal says why" contains "$(ct journalctl -u ferry-agent --no-pager -o cat)" \
    'device_id: "bad/id" is not a device id'

# ------------------------------------------------------------ controller
echo "== ferry-controller.service (ferryctl serve)"
API="http://127.0.0.1:$API_PORT"
TOKEN_FILE="$R/etc/ferry/api-token"
check "systemctl start ferry-controller" ct systemctl start ferry-controller
healthz=""
for _ in $(seq 1 40); do
    healthz="$(curl -fsS --max-time 2 "$API/healthz" 2>/dev/null || true)"
    [ -n "$healthz" ] && break
    sleep 0.25
done
check "/healthz answers (no token): ${healthz:-nothing}" test "$healthz" = ok
if [ "$healthz" != ok ]; then
    { ct systemctl status ferry-controller --no-pager -n 0 2>&1 || true; } | sed 's/^/       | /' >&2
    { ct journalctl -u ferry-controller --no-pager -n 15 -o cat || true; } | sed 's/^/       | /' >&2
fi
mqtt_up=""
for _ in $(seq 1 40); do
    if curl -fsS --max-time 2 "$API/metrics" 2>/dev/null | grep -qx 'ferry_mqtt_connected 1'; then
        mqtt_up=yes
        break
    fi
    sleep 0.25
done
check "/metrics: ferry_mqtt_connected 1 (the test's mosquitto)" test "$mqtt_up" = yes
check "/api/v1/devices without the token: 401" \
    test "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$API/api/v1/devices")" = 401
# The agent's retained state (from its runs above) reaches the controller through the broker.
dev=""
for _ in $(seq 1 40); do
    dev="$("$R/usr/bin/ferryctl" --json devices --server "$API" --token-file "$TOKEN_FILE" 2>/dev/null \
        | jq -c --arg d "$DEVICE" '.[] | select(.id == $d) | {platform, sensor: .apps.sensor.version}' 2>/dev/null || true)"
    [ "$dev" = '{"platform":"linux/arm64","sensor":"1.0.0"}' ] && break
    sleep 0.25
done
check "ferryctl devices --json (API + token): $DEVICE, linux/arm64, sensor 1.0.0" \
    test "$dev" = '{"platform":"linux/arm64","sensor":"1.0.0"}'
pid="$(show ferry-controller MainPID)"
status="$(ct cat "/proc/$pid/status" 2>/dev/null || true)"
check "runs as ferry-controller" test "$(ct stat -c %U "/proc/$pid" 2>&1)" = ferry-controller
sandboxed() {
    contains "$1" $'^CapEff:\t0000000000000000$' && contains "$1" $'^NoNewPrivs:\t1$' \
        && contains "$1" $'^Seccomp:\t2$'
}
check "sandboxed: no capabilities, no_new_privs, seccomp filter" sandboxed "$status"
echo "       controller RSS $(sed -n 's/^VmRSS:\s*//p' <<<"$status")"
check "StateDirectory /var/lib/ferry-controller: ferry-controller, 0750" \
    test "$(ct stat -c '%U %a' /var/lib/ferry-controller)" = "ferry-controller 750"
check "the SQLite database is there, owned by ferry-controller" \
    test "$(ct stat -c %U /var/lib/ferry-controller/ferry.db 2>&1)" = ferry-controller
sleep 3
check "still active, never restarted, nothing denied in its log" \
    test "$(show ferry-controller ActiveState) $(show ferry-controller NRestarts)" = "active 0"
log="$(ct journalctl -u ferry-controller --no-pager -o cat)"
logged() { contains "$log" 'database open' && contains "$log" 'controller serving' \
    && contains "$log" 'connected to the broker'; }
check "its log: database open, serving, connected to the broker (in any order)" logged
if contains "$log" 'ERROR|denied|not permitted|Permission'; then
    bad "the controller's log has errors:"
    echo "$log" | tail -n 15 | sed 's/^/       | /' >&2
fi
check "systemctl stop: exit 0" ct systemctl stop ferry-controller
check "Result=success, exit status 0" \
    test "$(show ferry-controller Result) $(show ferry-controller ExecMainStatus)" = "success 0"

mv "$R/etc/ferry/keys/controller.key" "$R/etc/ferry/keys/controller.key.away"
before="$(show ferry-controller NRestarts)"
ct systemctl start ferry-controller 2>/dev/null || true
sleep 4 # RestartSec=2 in the drop-in: a restart would have happened by now
check "a configuration error (controller key missing): exit 78, failed, not restarted" \
    test "$(show ferry-controller ExecMainStatus) $(show ferry-controller ActiveState) $(show ferry-controller NRestarts)" = "78 failed $before"
check "the journal says why" contains "$(ct journalctl -u ferry-controller --no-pager -o cat)" \
    'controller_key'

if [ "$FAILS" -gt 0 ]; then
    echo "test-systemd: $FAILS failure(s)" >&2
    exit 1
fi
echo "test-systemd: all checks passed"
