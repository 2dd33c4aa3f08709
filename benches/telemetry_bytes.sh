#!/usr/bin/env bash
# Bytes on the wire per month for one device at DEFAULT telemetry and MQTT settings, steady
# sensors, keepalive included. Measured on a real connection of the real agent to a real
# mosquitto, from the kernel's own counters of the agent's TCP socket (`ss -ti`: bytes_sent,
# bytes_received, segs_out, segs_in), and extrapolated to 30 days:
#
#   wire bytes = TCP payload both ways + 52 bytes per segment both ways
#                (IPv4 20 + TCP 20 + timestamps option 12; cellular billing counts IP packets)
#
# The window starts once the agent is connected and its first sample is out, and lasts
# BENCH_S seconds (default 1830: one full default heartbeat period of 1800 s, six keepalives).
# Sensors come from a fake sysfs (hwmon sht4x temperature + humidity, thermal cpu-thermal) that
# does not change; system metrics are this machine's real ones.
#
# Two agents run side by side, each with its own mosquitto: one with telemetry at its defaults,
# one with telemetry disabled (the cost of the MQTT link alone: keepalive). Their difference,
# per telemetry message, prices one message; a steady box sends one per heartbeat (the deadbands
# never trip; `policy::tests::steady_readings_publish_only_the_heartbeat`), so
#
#   steady month = idle link per month + (30 days / max_interval) x bytes per message
#
# The telemetry run's own extrapolation is printed too: on a loaded build machine its CPU and
# free-disk readings are anything but steady and trip the deadbands.
#
# Usage: benches/telemetry_bytes.sh [agent-binary]   (default: target/debug/ferry-agent)
# Env: BENCH_S (window seconds), CARGO_TARGET_DIR. Writes target/bench-telemetry.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
BIN="${1:-$TARGET/debug/ferry-agent}"
WINDOW="${BENCH_S:-1830}"
[ -x "$BIN" ] || cargo build -p ferry-agent
BIN="$(realpath "$BIN")"

if [ -z "${TELEMETRY_ENABLED:-}" ]; then
  docker info >/dev/null 2>&1 || bash scripts/env-up.sh
  mkdir -p "$TARGET"
  OUT="$(mktemp -d /tmp/ferry-bench-out.XXXXXX)"
  TELEMETRY_ENABLED=true BENCH_OUT="$OUT/on.txt" "$0" "$BIN" > "$OUT/on.log" 2>&1 &
  ON=$!
  TELEMETRY_ENABLED=false BENCH_OUT="$OUT/off.txt" "$0" "$BIN" > "$OUT/off.log" 2>&1 &
  OFF=$!
  wait $ON || { cat "$OUT/on.log"; exit 1; }
  wait $OFF || { cat "$OUT/off.log"; exit 1; }
  val() { sed -n "s/^$2=//p" "$OUT/$1.txt"; }
  ON_WIRE=$(val on wire); ON_MSGS=$(val on messages); OFF_WIRE=$(val off wire)
  PER_MSG=$(( (ON_WIRE - OFF_WIRE) / (ON_MSGS > 0 ? ON_MSGS : 1) ))
  IDLE_MONTH=$(( OFF_WIRE * 30 * 86400 / WINDOW ))
  HEARTBEATS=$(( 30 * 86400 / 1800 ))
  STEADY=$(( IDLE_MONTH + HEARTBEATS * PER_MSG ))
  {
    cat "$OUT/on.txt"
    echo
    cat "$OUT/off.txt"
    echo
    echo "== result"
    echo "idle link (keepalive only): $IDLE_MONTH bytes/month"
    echo "one telemetry message on the wire: $PER_MSG bytes ($ON_MSGS messages in the window)"
    echo "steady box at defaults: $IDLE_MONTH + $HEARTBEATS x $PER_MSG = $STEADY bytes/month ($(awk "BEGIN{printf \"%.2f\", $STEADY/1e6}") MB)"
  } | tee "$TARGET/bench-telemetry.txt"
  rm -rf "$OUT"
  exit 0
fi

W="$(mktemp -d /tmp/ferry-bench-tel.XXXXXX)"
cleanup() {
  [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null || true
  [ -n "${KEEP_LOG:-}" ] && cp "$W/agent.log" "$KEEP_LOG" || true
  [ -n "${SUB:-}" ] && kill "$SUB" 2>/dev/null || true
  [ -n "${BROKER:-}" ] && kill "$BROKER" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
cat > "$W/mosquitto.conf" <<CONF
user root
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
CONF
"$MOSQ" -c "$W/mosquitto.conf" >"$W/mosquitto.log" 2>&1 &
BROKER=$!

for role in release controller; do
  openssl genpkey -algorithm ed25519 -out "$W/$role.key" 2>/dev/null
  openssl pkey -in "$W/$role.key" -pubout -out "$W/$role.pub"
done

S="$W/sysfs"
mkdir -p "$S/class/hwmon/hwmon0" "$S/class/thermal/thermal_zone0"
echo sht4x > "$S/class/hwmon/hwmon0/name"
echo 21500 > "$S/class/hwmon/hwmon0/temp1_input"
echo 45250 > "$S/class/hwmon/hwmon0/humidity1_input"
echo cpu-thermal > "$S/class/thermal/thermal_zone0/type"
echo 47000 > "$S/class/thermal/thermal_zone0/temp"

DEVICE=bench-box-001
cat > "$W/agent.toml" <<CONF
device_id = "$DEVICE"
state_dir = "$W/state"
[mqtt]
url = "mqtt://127.0.0.1:$PORT"
[trust]
release_keys = ["$W/release.pub"]
controller_keys = ["$W/controller.pub"]
[log]
level = "info,ferry_agent::telemetry=debug"
format = "json"
[telemetry]
enabled = ${TELEMETRY_ENABLED:-true}
sysfs_root = "$S"
[[telemetry.sensor]]
name = "temperature_c"
kind = "hwmon"
device = "sht4x"
input = "temp1_input"
[[telemetry.sensor]]
name = "humidity_pct"
kind = "hwmon"
device = "sht4x"
input = "humidity1_input"
[[telemetry.sensor]]
name = "cpu_temp_c"
kind = "thermal"
zone = "cpu-thermal"
CONF

sleep 0.5
mosquitto_sub -p "$PORT" -q 1 -v -t "ferry/v1/devices/$DEVICE/telemetry" > "$W/telemetry.txt" &
SUB=$!
"$BIN" --config "$W/agent.toml" > "$W/agent.log" 2>&1 &
AGENT=$!

# The agent's socket to the broker: "bytes_sent:N ... segs_out:N segs_in:N ... bytes_received:N".
counters() {
  ss -tinH state established "( sport != :$PORT and dport = :$PORT )" 2>/dev/null \
    | tr ' ' '\n' | awk -F: '
      $1=="bytes_sent"{bs=$2} $1=="bytes_received"{br=$2} $1=="segs_out"{so=$2} $1=="segs_in"{si=$2}
      END{printf "%d %d %d %d\n", bs, br, so, si}'
}

READY='telemetry sample published\|telemetry buffer flushed\|telemetry disabled'
for _ in $(seq 1 600); do
  grep -q "$READY" "$W/agent.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "$READY" "$W/agent.log" || { cat "$W/agent.log"; echo "agent never published"; exit 1; }
sleep 2
read -r BS0 BR0 SO0 SI0 < <(counters)
MSG0="$(wc -l < "$W/telemetry.txt")"
CONNECTS0="$(grep -c 'MQTT connected' "$W/agent.log")"
echo "window ${WINDOW}s from $(date -u +%H:%M:%S); start counters: sent=$BS0 received=$BR0 segs_out=$SO0 segs_in=$SI0"
START=$(date +%s)
while [ $(( $(date +%s) - START )) -lt "$WINDOW" ]; do
  sleep 30
  read -r bs br so si < <(counters)
  echo "  +$(( $(date +%s) - START ))s payload=$(( bs - BS0 + br - BR0 )) segments=$(( so - SO0 + si - SI0 ))"
done
read -r BS1 BR1 SO1 SI1 < <(counters)
MSG1="$(wc -l < "$W/telemetry.txt")"
CONNECTS1="$(grep -c 'MQTT connected' "$W/agent.log")"
[ "$CONNECTS0" = "$CONNECTS1" ] || { echo "the agent reconnected during the window; measurement void"; exit 1; }

PAYLOAD=$(( BS1 - BS0 + BR1 - BR0 ))
SEGS=$(( SO1 - SO0 + SI1 - SI0 ))
WIRE=$(( PAYLOAD + 52 * SEGS ))
MONTH=$(( WIRE * 30 * 86400 / WINDOW ))
MSGS=$(( MSG1 - MSG0 ))
SAMPLE_BYTES="$(tail -n 1 "$W/telemetry.txt" | cut -d' ' -f2- | wc -c)"
REASONS="$(grep -o '"reason":"[a-z_0-9]*' "$W/agent.log" | sort | uniq -c | sort -rn | head -8 || true)"
{
  echo "telemetry enabled=$TELEMETRY_ENABLED, $(date -u +%Y-%m-%dT%H:%M:%SZ), window ${WINDOW}s, defaults (sample 60s, max_interval 30m, keepalive 5m)"
  echo "telemetry messages in window: $MSGS (last payload $SAMPLE_BYTES bytes)"
  echo "TCP payload both ways: $PAYLOAD bytes; segments both ways: $SEGS"
  echo "wire bytes in window: $WIRE"
  echo "per 30-day month: $MONTH bytes ($(awk "BEGIN{printf \"%.2f\", $MONTH/1e6}") MB)"
  echo "why the agent published (whole run):"
  echo "$REASONS"
  echo "last message: $(tail -n 1 "$W/telemetry.txt")"
  echo "wire=$WIRE"
  echo "messages=$MSGS"
} | tee "${BENCH_OUT:-$TARGET/bench-telemetry.txt}"
