#!/usr/bin/env bash
# Controller scale benchmark (issue 3): one mosquitto, `ferryctl serve` and `ferry-sim` with
# 10,000 simulated devices on this machine. In this order (each phase starts once the
# controller is idle again): registration, RSS, rollout 1, rollout 2, a controller-less
# baseline for notice delivery (`ferry-sim notify`), the blast. Measures
#   1. rollout start → all notices delivered, one 100% wave          (goal < 10 s)
#   2. controller throughput on status messages during a blast         (goal ≥ 5,000/s)
#   3. controller RSS with every device registered                     (goal < 150 MB)
#   4. a 3-wave rollout's time beyond its configured soak times        (goal < 5 s)
#   5. signed device reports verified per second on one core           (goal ≥ 20,000/s)
#      (`ferry-sim verify-bench`, run first while the machine is quiet)
# Every device report is signed (protocol v2): the simulated devices enrol with the fleet's
# enrolment token, which the controller is configured with ([enroll] tokens).
# prints a summary and writes $CARGO_TARGET_DIR/bench-scale.json (logs in .../bench-scale/).
# A benchmark, not a test: CI never runs it.
#
# Knobs (environment): DEVICES=10000 PER_CONN=500 BLAST=5 (state reports per device)
#   WAVES=1%,10%,100% SOAK=5s PULL_DELAY=0 HEALTH_DELAY=0 (ferry-sim durations or ranges, 1s..3s)
#   FAILURE_RATE=0 MAX_FAILURES=5% MQTT_INFLIGHT=20 (mosquitto max_inflight_messages)
#   TICK (the controller's [rollout] tick; default: the controller's own, 1s)
#   VERIFY_N=100000 (reports for verify-bench; 0 skips it)
#   STORE=sqlite|postgres (the controller's database; postgres: a fresh database on the server
#     scripts/env-up.sh starts, FERRY_POSTGRES_URL, dropped at the end)
#   REPLICAS=N (STORE=postgres only: N `ferryctl serve` on the one database; the first leads
#     the phases above, then it is SIGKILLed after rollout 2 and a rollout is started through
#     another replica: kill → its first notice delivered is measured, goal ≤ 10 s; the
#     remaining phases run on the new leader) LEASE=8s (the replicas' lease; the default)
#   NO_BUILD=1 (use the binaries already in $CARGO_TARGET_DIR/release) KEEP_WORK=1
#   FERRYCTL_BIN=PATH SIM_BIN=PATH (other builds, e.g. to compare a controller change)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DEVICES=${DEVICES:-10000}
PER_CONN=${PER_CONN:-500}
BLAST=${BLAST:-5}
WAVES=${WAVES:-1%,10%,100%}
SOAK=${SOAK:-5s}
PULL_DELAY=${PULL_DELAY:-0}
HEALTH_DELAY=${HEALTH_DELAY:-0}
FAILURE_RATE=${FAILURE_RATE:-0}
MAX_FAILURES=${MAX_FAILURES:-5%}
MQTT_INFLIGHT=${MQTT_INFLIGHT:-20}
STEP_TIMEOUT=${STEP_TIMEOUT:-180}
VERIFY_N=${VERIFY_N:-100000}
STORE=${STORE:-sqlite}
REPLICAS=${REPLICAS:-1}
LEASE=${LEASE:-8s}
PG_ADMIN=${FERRY_POSTGRES_URL:-postgres://postgres@127.0.0.1:5544/postgres}
PG_DB=""
OUT=$CARGO_TARGET_DIR/bench-scale.json
LOGS=$CARGO_TARGET_DIR/bench-scale

log() { printf '%s == %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
now_ms() { date +%s%3N; }

if [ -z "${NO_BUILD:-}" ]; then
    log "building ferryctl and ferry-sim (release)"
    cargo build --release --locked -q -p ferry-controller -p ferry-sim
fi
MOSQUITTO=/usr/sbin/mosquitto
[ -x "$MOSQUITTO" ] || MOSQUITTO=$(command -v mosquitto) || die "mosquitto not installed (apt-get install -y mosquitto)"

WORK=$(mktemp -d /tmp/ferry-scale.XXXXXX)
# Private copies: a shared target directory may be rebuilt by someone else during the run.
mkdir -p "$WORK/bin"
cp_bin() { [ -x "$1" ] || die "missing $1"; cp "$1" "$WORK/bin/$2"; }
cp_bin "${FERRYCTL_BIN:-$CARGO_TARGET_DIR/release/ferryctl}" ferryctl
cp_bin "${SIM_BIN:-$CARGO_TARGET_DIR/release/ferry-sim}" ferry-sim
FERRYCTL=$WORK/bin/ferryctl
SIM=$WORK/bin/ferry-sim
SIM_PID='' SERVE_PID='' MOSQ_PID='' RSS_PID=''
REPLICA_PIDS=()
stop_pid() { # PID: SIGTERM, then SIGKILL after 5 s
    local pid=$1 _
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$SIM_PID"
    stop_pid "$RSS_PID"
    stop_pid "$SERVE_PID"
    for p in "${REPLICA_PIDS[@]}"; do stop_pid "$p"; done
    stop_pid "$MOSQ_PID"
    [ -z "$PG_DB" ] || psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$LOGS" && mkdir -p "$LOGS"
    cp "$WORK"/*.log "$WORK"/*.json "$WORK"/*.out "$WORK"/*.txt "$WORK"/*.toml "$WORK"/*.conf "$LOGS"/ 2>/dev/null || true
    if [ -n "${KEEP_WORK:-}" ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
    [ $rc -eq 0 ] || log "logs in $LOGS"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=scripts/lib/ports.sh
. scripts/lib/ports.sh
# jq-like one-liners without jq: `jval FILE EXPR` evaluates a Python expression over `d`.
jval() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); v=eval(sys.argv[2]); print("" if v is None else v)' "$1" "$2" 2>/dev/null; }
metrics() { curl -fsS "http://127.0.0.1:$API_PORT/metrics"; }
# `metric NAME`: the sum of every series of NAME (so gauges split by label add up).
metric() {
    metrics | awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $2; f = 1 } END { if (f) printf "%d\n", s; else print "" }'
}
wait_until() { # DESCRIPTION TIMEOUT_S COMMAND...: poll every 50 ms
    local what=$1 t=$2; shift 2
    local deadline=$(( $(date +%s) + t ))
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${t}s waiting for $what"
        [ -z "$MOSQ_PID" ] || kill -0 "$MOSQ_PID" 2>/dev/null || die "mosquitto exited (see $LOGS/mosquitto.log)"
        [ -z "$SERVE_PID" ] || kill -0 "$SERVE_PID" 2>/dev/null || die "ferryctl serve exited (see $LOGS/serve.log)"
        [ -z "$SIM_PID" ] || kill -0 "$SIM_PID" 2>/dev/null || die "ferry-sim exited (see $LOGS/sim.log)"
        sleep 0.05
    done
}
rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# CPU seconds (user + system) used so far by each process, as "controller mosquitto sim".
CPU_MARKS=$WORK/cpu-marks.txt
cpu_s() { [ -n "$1" ] && awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat" 2>/dev/null || printf 0; }
# The controller column: every live replica's CPU seconds (the leader and its followers), each
# once; a SIGKILLed leader drops out, so a phase's marks are taken after a kill, not across it.
ctl_cpu() {
    local p total=0 seen=" "
    for p in "$SERVE_PID" "${REPLICA_PIDS[@]}"; do
        [ -n "$p" ] && [ "${seen#* "$p" }" = "$seen" ] || continue
        seen="$seen$p "
        total=$(awk -v a="$total" -v b="$(cpu_s "$p")" 'BEGIN { printf "%.2f", a + b }')
    done
    echo "$total"
}
cpu_mark() { echo "$1 $(now_ms) $(ctl_cpu) $(cpu_s "$MOSQ_PID") $(cpu_s "$SIM_PID") $(cut -d' ' -f1 /proc/loadavg)" >> "$CPU_MARKS"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
sim_idle() { [ "$(jval "$SIM_STATS" 'd["busy_devices"] == 0 and d["reports"]["acked"] >= d["reports"]["published"]')" = True ]; }
wait_idle() { # until the simulator is idle and the controller used < 5% of a core for a second
    local a b deadline=$(( $(date +%s) + STEP_TIMEOUT ))
    wait_until "the simulator to go idle" "$STEP_TIMEOUT" sim_idle
    a=$(cpu_ticks "$SERVE_PID")
    while sleep 1; do
        b=$(cpu_ticks "$SERVE_PID")
        [ $((b - a)) -gt $(( $(getconf CLK_TCK) / 20 )) ] || return 0
        a=$b
        [ "$(date +%s)" -lt "$deadline" ] || die "the controller did not go idle within ${STEP_TIMEOUT}s"
    done
}

# ---- (5) report verification on one core, before anything else runs on this machine
VERIFY_FILE=  # empty: skipped
if [ "$VERIFY_N" -gt 0 ]; then
    log "verify-bench: $VERIFY_N signed state reports on one core"
    VERIFY_FILE=$WORK/verify-bench.json
    "$SIM" verify-bench --n "$VERIFY_N" --json > "$VERIFY_FILE"
    log "verify-bench: $(jval "$VERIFY_FILE" '"one by one {:,.0f}/s ({} µs per report, {} µs of it parsing), in batches of {} {:,.0f}/s".format(d["per_s"], d["per_report_us"], d["open_us"], d["batch"], d["batched_per_s"])')"
fi

# ---- broker
MQTT_PORT=$(free_port)
USER_LINE=; [ "$(id -u)" = 0 ] && USER_LINE="user root"
cat > "$WORK/mosquitto.conf" <<EOF
$USER_LINE
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
# The controller's one subscription must not lose messages when it falls behind a burst
# (mosquitto's default queue of 1000 drops the rest).
max_queued_messages 2000000
max_queued_bytes 0
max_inflight_messages $MQTT_INFLIGHT
log_dest file $WORK/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
EOF
"$MOSQUITTO" -c "$WORK/mosquitto.conf" > "$WORK/mosquitto.out" 2>&1 &
MOSQ_PID=$!
wait_until "mosquitto" 10 grep -qs " running" "$WORK/mosquitto.log"

# ---- keys, controller
"$FERRYCTL" keygen --out "$WORK/keys" --name controller > /dev/null
"$FERRYCTL" keygen --out "$WORK/keys" --name release > /dev/null
head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > "$WORK/token"
# The fleet's enrolment token: devices proving it are admitted at once.
ENROLL_TOKEN=$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')
API_PORT=$(free_port)
STORE_TOML=""
case "$STORE" in
sqlite) ;;
postgres)
    PG_DB="ferry_bench_$$"
    psql -q "$PG_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null \
        || die "cannot create a database on $PG_ADMIN (scripts/env-up.sh starts the server)"
    STORE_TOML="[store]
url = \"${PG_ADMIN%/*}/$PG_DB\""
    ;;
*) die "STORE=$STORE: sqlite or postgres" ;;
esac
[ "$REPLICAS" -ge 1 ] 2>/dev/null || die "REPLICAS=$REPLICAS: a count"
[ "$REPLICAS" = 1 ] || [ "$STORE" = postgres ] || die "REPLICAS=$REPLICAS needs STORE=postgres"
REPLICA_TOML=""
[ "$REPLICAS" = 1 ] || REPLICA_TOML="[replica]
id = \"r1\"
lease = \"$LEASE\""
cat > "$WORK/serve.toml" <<EOF
listen = "127.0.0.1:$API_PORT"
data_dir = "$WORK/data"
api_token_file = "$WORK/token"
controller_key = "$WORK/keys/controller.key"

$STORE_TOML

$REPLICA_TOML

[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
topic_prefix = "ferry"

[trust]
release_keys = ["$WORK/keys/release.pub"]
release_threshold = 1

[rollout]
device_timeout = "10m"
${TICK:+tick = \"$TICK\"}

[enroll]
tokens = ["$ENROLL_TOKEN"]
EOF
mkdir -p "$WORK/data"
export FERRY_SERVER="http://127.0.0.1:$API_PORT" FERRY_TOKEN_FILE="$WORK/token"
"$FERRYCTL" serve --config "$WORK/serve.toml" > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
# The controller's RSS every 200 ms, for the per-phase maxima.
(while kill -0 "$SERVE_PID" 2>/dev/null; do echo "$(now_ms) $(rss_kb "$SERVE_PID" VmRSS)"; sleep 0.2; done) > "$WORK/rss-samples.txt" 2>/dev/null &
RSS_PID=$!
http_ok() { curl -fsS -o /dev/null "$1" 2>/dev/null; }
wait_until "ferryctl serve's /metrics" 30 http_ok "http://127.0.0.1:$API_PORT/metrics"
wait_until "the controller's MQTT connection" 30 test "$(metric ferry_mqtt_connected)" = 1
log "mosquitto on :$MQTT_PORT, ferryctl serve (pid $SERVE_PID) on :$API_PORT"
# The other replicas: the same config but their own id, port and data dir; they follow.
REPLICA_PIDS=() REPLICA_PORTS=()
if [ "$REPLICAS" -gt 1 ]; then
    wait_until "replica r1 to lead" 30 test "$(metric ferry_leader)" = 1
    for i in $(seq 2 "$REPLICAS"); do
        port=$(free_port)
        sed -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" -e "s|^data_dir = .*|data_dir = \"$WORK/data-r$i\"|" \
            -e "s|^id = \"r1\"|id = \"r$i\"|" "$WORK/serve.toml" > "$WORK/serve-r$i.toml"
        mkdir -p "$WORK/data-r$i"
        "$FERRYCTL" serve --config "$WORK/serve-r$i.toml" > "$WORK/serve-r$i.log" 2>&1 &
        REPLICA_PIDS+=($!) REPLICA_PORTS+=("$port")
        wait_until "replica r$i's /metrics" 30 http_ok "http://127.0.0.1:$port/metrics"
    done
    log "$((REPLICAS - 1)) more replica(s) following on :${REPLICA_PORTS[*]} (lease $LEASE)"
fi

# ---- releases
for v in 2.0.0 2.1.0 2.2.0 2.3.0; do
    "$SIM" make-release --key "$WORK/keys/release.key" --app sensor --version "$v" --out "$WORK/sensor-$v.json"
    "$FERRYCTL" --json release push "$WORK/sensor-$v.json" > "$WORK/push-$v.out"
done

# ---- devices
SIM_STATS=$WORK/sim-stats.json
log "starting $DEVICES simulated devices ($PER_CONN per connection)"
T_SIM=$(now_ms)
"$SIM" run --broker "mqtt://127.0.0.1:$MQTT_PORT" --devices "$DEVICES" --per-connection "$PER_CONN" \
    --controller-key "$WORK/keys/controller.pub" --release-key "$WORK/keys/release.pub" \
    --labels fleet=sim --app sensor=1.0.0 --enroll-token "$ENROLL_TOKEN" \
    --pull-delay "$PULL_DELAY" --health-delay "$HEALTH_DELAY" --failure-rate "$FAILURE_RATE" \
    --blast "$BLAST" --blast-on-signal --blast-then-offline --per-device \
    --stats "$SIM_STATS" --stats-interval 100ms > "$WORK/sim.out" 2> "$WORK/sim.log" &
SIM_PID=$!
devices_registered() { [ "$(metric ferry_devices)" -ge "$DEVICES" ] 2>/dev/null; }
wait_until "$DEVICES devices registered" "$STEP_TIMEOUT" devices_registered
T_REG=$(now_ms)
STATUS_AFTER_REG=$(metric ferry_status_messages_total)
log "all $DEVICES devices registered after $((T_REG - T_SIM)) ms"
cpu_mark registered
# Let the ingest queue drain before reading the memory.
wait_idle
RSS_IDLE_KB=$(rss_kb "$SERVE_PID" VmRSS)
HWM_IDLE_KB=$(rss_kb "$SERVE_PID" VmHWM)
log "controller RSS with $DEVICES devices: $((RSS_IDLE_KB / 1024)) MB (peak so far $((HWM_IDLE_KB / 1024)) MB)"

# ---- the console's fleet page with every device registered: what a browser fetches to draw it
# (the page, its script and style, one page of 50 devices, the rollouts), one after another
# as a cold load does; then the same reads revalidated with their ETags (the 2 s poll).
console_load() { # LABEL → appends {"label", "cold_ms", "poll_ms", "parts"} to $WORK/console.jsonl
    python3 - "$1" "$FERRY_SERVER" "$(cat "$WORK/token")" >> "$WORK/console.jsonl" <<'PY'
import json, sys, time, urllib.request
label, base, token = sys.argv[1:4]
def get(path, tag=None, api=True):
    h = {"Authorization": f"Bearer {token}"} if api else {}
    if tag: h["If-None-Match"] = tag
    t = time.perf_counter()
    try:
        r = urllib.request.urlopen(urllib.request.Request(base + path, headers=h), timeout=30)
        body, status, etag = r.read(), r.status, r.headers.get("ETag")
    except urllib.error.HTTPError as e:
        body, status, etag = b"", e.code, e.headers.get("ETag")
    return (time.perf_counter() - t) * 1000, status, len(body), etag
parts, tags = {}, {}
for path, api in [("/", False), ("/app.js", False), ("/app.css", False),
                  ("/api/v1/devices?limit=50", True), ("/api/v1/rollouts", True),
                  ("/api/v1/devices?limit=50&select=fleet%3Dsim&after=sim-05000", True)]:
    ms, status, n, tag = get(path, api=api)
    assert status == 200, (path, status)
    parts[path] = {"ms": round(ms, 1), "bytes": n}
    tags[path] = tag
cold = sum(p["ms"] for k, p in list(parts.items())[:5])
poll = 0.0
for path in ["/api/v1/devices?limit=50", "/api/v1/rollouts"]:
    ms, status, n, _ = get(path, tags[path])
    assert status == 304, (path, status)
    parts[path + " (304)"] = {"ms": round(ms, 1), "bytes": n}
    poll += ms
print(json.dumps({"label": label, "cold_ms": round(cold, 1), "poll_ms": round(poll, 1), "parts": parts}))
PY
    log "console ($1): the fleet page's reads took $(tail -1 "$WORK/console.jsonl" | jval /dev/stdin 'd["cold_ms"]') ms cold, $(tail -1 "$WORK/console.jsonl" | jval /dev/stdin 'd["poll_ms"]') ms revalidated"
}
console_load registered

# ---- (1) one 100% wave: rollout start → all notices delivered
rollout_start() { # VERSION WAVES SOAK → prints the rollout id
    "$FERRYCTL" --json rollout start --app sensor --version "$1" --select fleet=sim \
        --waves "$2" --soak "$3" --max-failures "$MAX_FAILURES" > "$WORK/start-$1.out"
    jval "$WORK/start-$1.out" 'd.get("id") or d.get("rollout", {}).get("id")'
}
# Polled every 50 ms: the view without its 10,000-device list (what `rollout status` without
# --json asks for), so that watching costs the controller little.
rollout_state() {
    curl -fsS -H "Authorization: Bearer $(cat "$WORK/token")" \
        "$FERRY_SERVER/api/v1/rollouts/$1?devices=false" > "$WORK/status.json" 2>/dev/null &&
        jval "$WORK/status.json" 'd.get("state")'
}
rollout_done() { # ID: completed (or failed: stop waiting, reported below)
    local s; s=$(rollout_state "$1") || return 1
    case "$s" in
        completed) return 0 ;;
        paused|aborted|failed) die "rollout $1 ended $s: $(cat "$WORK/status.json")" ;;
        *) return 1 ;;
    esac
}
accepted() { jval "$SIM_STATS" 'd["notices"]["accepted"]'; }

wait_idle
A0=$(accepted)
log "rollout 1: sensor 2.0.0 to $DEVICES devices in one 100% wave"
cpu_mark rollout1_start
T1_START=$(now_ms)
R1=$(rollout_start 2.0.0 100% 0s)
T1_STARTED=$(now_ms)
[ -n "$R1" ] || die "rollout start printed no id: $(cat "$WORK/start-2.0.0.out")"
all_notified() { [ "$(accepted)" -ge $((A0 + DEVICES)) ]; }
wait_until "$DEVICES notices of rollout $R1" "$STEP_TIMEOUT" all_notified
sleep 0.3 # the stats file is rewritten every 100 ms
T1_LAST_NOTICE=$(jval "$SIM_STATS" "d['rollouts'].get('$R1', {}).get('last_notice_unix_ms') or d['notices']['last_unix_ms']")
T1_FIRST_NOTICE=$(jval "$SIM_STATS" "d['rollouts'].get('$R1', {}).get('first_notice_unix_ms') or ''")
DELIVERY_MS=$((T1_LAST_NOTICE - T1_START))
log "rollout 1 ($R1): all $DEVICES notices delivered $DELIVERY_MS ms after rollout start (start command returned after $((T1_STARTED - T1_START)) ms)"
wait_until "rollout $R1 to complete" "$STEP_TIMEOUT" rollout_done "$R1"
T1_DONE=$(now_ms)
cpu_mark rollout1_done
log "rollout 1 completed after $((T1_DONE - T1_START)) ms"
console_load "after a 100% rollout"

# ---- (4) three waves with soak: time beyond the soak
SOAK_S=$(python3 -c "
import re,sys
s='$SOAK'; m=re.fullmatch(r'(\d+(?:\.\d+)?)(ms|s|m)?', s)
v=float(m.group(1)); u=m.group(2) or 's'
print(v/1000 if u=='ms' else v*60 if u=='m' else v)")
NWAVES=$(awk -F, '{print NF}' <<< "$WAVES")
wait_idle
log "rollout 2: sensor 2.1.0 in waves $WAVES, soak $SOAK"
cpu_mark rollout2_start
T2_START=$(now_ms)
R2=$(rollout_start 2.1.0 "$WAVES" "$SOAK")
[ -n "$R2" ] || die "rollout start printed no id: $(cat "$WORK/start-2.1.0.out")"
wait_until "rollout $R2 to complete" "$STEP_TIMEOUT" rollout_done "$R2"
T2_DONE=$(now_ms)
cpu_mark rollout2_done
cp "$WORK/status.json" "$WORK/status-$R2.json"
T2_TOTAL=$((T2_DONE - T2_START))
OVERHEAD_MS=$(python3 -c "print(round($T2_TOTAL - $NWAVES * $SOAK_S * 1000))")
log "rollout 2 ($R2) completed after $T2_TOTAL ms: $OVERHEAD_MS ms beyond $NWAVES × $SOAK soak"

# ---- (6) REPLICAS > 1: the leader SIGKILLed, a rollout started through another replica
# (retried while it answers 503: no replica leads yet); measured: the kill → the first notice
# of that rollout delivered to a device. The remaining phases run on the new leader.
TAKEOVER=None R3='' BASELINE_RELEASE=2.1.0
if [ "$REPLICAS" -gt 1 ]; then
    wait_idle
    A0=$(accepted)
    log "take-over: SIGKILL the leader (r1, pid $SERVE_PID), then start sensor 2.2.0 through r2"
    T3_KILL=$(now_ms)
    kill -KILL "$SERVE_PID"
    wait "$SERVE_PID" 2>/dev/null || true
    stop_pid "$RSS_PID"
    OLD_PID=$SERVE_PID SERVE_PID=''
    cpu_mark takeover_start
    export FERRY_SERVER="http://127.0.0.1:${REPLICA_PORTS[0]}"
    deadline=$(( $(date +%s) + 60 ))
    until R3=$(rollout_start 2.2.0 100% 0s 2>/dev/null) && [ -n "$R3" ]; do
        [ "$(date +%s)" -lt "$deadline" ] || die "no replica took the rollout within 60 s: $(cat "$WORK/start-2.2.0.out")"
        sleep 0.2
    done
    T3_STARTED=$(now_ms)
    # Who leads now: that replica is "the controller" for the phases that follow.
    for i in "${!REPLICA_PORTS[@]}"; do
        API_PORT=${REPLICA_PORTS[$i]}
        if [ "$(metric ferry_leader)" = 1 ]; then SERVE_PID=${REPLICA_PIDS[$i]}; NEW_LEADER=r$((i + 2)); break; fi
    done
    [ -n "$SERVE_PID" ] || die "no replica leads after the take-over"
    export FERRY_SERVER="http://127.0.0.1:$API_PORT"
    (while kill -0 "$SERVE_PID" 2>/dev/null; do echo "$(now_ms) $(rss_kb "$SERVE_PID" VmRSS)"; sleep 0.2; done) >> "$WORK/rss-samples.txt" 2>/dev/null &
    RSS_PID=$!
    wait_until "$DEVICES notices of rollout $R3" "$STEP_TIMEOUT" all_notified
    sleep 0.3
    T3_FIRST=$(jval "$SIM_STATS" "d['rollouts']['$R3']['first_notice_unix_ms']")
    T3_LAST=$(jval "$SIM_STATS" "d['rollouts']['$R3']['last_notice_unix_ms']")
    wait_until "rollout $R3 to complete" "$STEP_TIMEOUT" rollout_done "$R3"
    T3_DONE=$(now_ms)
    cpu_mark takeover_done
    TAKEOVER="{\"killed\": \"r1\", \"new_leader\": \"$NEW_LEADER\", \"lease\": \"$LEASE\", \"rollout\": \"$R3\", \"start_accepted_after_kill_ms\": $((T3_STARTED - T3_KILL)), \"first_notice_after_kill_ms\": $((T3_FIRST - T3_KILL)), \"all_notices_after_kill_ms\": $((T3_LAST - T3_KILL)), \"completed_after_kill_ms\": $((T3_DONE - T3_KILL)), \"goal_ms\": 10000}"
    log "take-over: $NEW_LEADER leads; the rollout was accepted $((T3_STARTED - T3_KILL)) ms after the kill, its first notice delivered after $((T3_FIRST - T3_KILL)) ms, all $DEVICES after $((T3_LAST - T3_KILL)) ms"
    BASELINE_RELEASE=2.3.0
fi

# ---- baseline: the same 10,000 notices signed and published by `ferry-sim notify` over one
# connection, no controller logic in the path (the controller still ingests the reports).
BASELINE_MS=None  # (a Python literal for the results below)
if [ "${BASELINE:-1}" = 1 ]; then
    wait_idle
    A0=$(accepted)
    cpu_mark baseline_start
    TB_START=$(now_ms)
    "$SIM" notify --broker "mqtt://127.0.0.1:$MQTT_PORT" --key "$WORK/keys/controller.key" \
        --release "$WORK/sensor-$BASELINE_RELEASE.json" --devices "$DEVICES" --rollout baseline > "$WORK/notify.out"
    wait_until "$DEVICES baseline notices" "$STEP_TIMEOUT" all_notified
    sleep 0.3
    BASELINE_MS=$(( $(jval "$SIM_STATS" "d['rollouts']['baseline']['last_notice_unix_ms']") - TB_START ))
    cpu_mark baseline_done
    log "baseline: $DEVICES notices from ferry-sim notify delivered after $BASELINE_MS ms ($(cat "$WORK/notify.out"))"
fi

# ---- (2) throughput: every device publishes BLAST state reports, then `online` = 0. The
# controller counts messages as its MQTT task parses them (ferry_status_messages_total), before
# its core applies them; the core's own rate is measured with the marker: when the gauge
# ferry_devices_online{online="false"} (recomputed by the core after each commit) reaches
# DEVICES, every blast message before each marker has been applied and committed.
wait_idle
BLAST_MSGS=$((DEVICES * (BLAST + 1)))
C0=$(metric ferry_status_messages_total)
SAMPLES=$WORK/blast-samples.txt
: > "$SAMPLES"
cpu_mark blast_start
kill -USR1 "$SIM_PID"
blast_sample() { # appends "time received offline"; true once every device is offline in the core
    local m c off
    m=$(metrics) || return 1
    c=$(awk '$1 == "ferry_status_messages_total" { print $2 }' <<< "$m")
    off=$(awk '$1 == "ferry_devices_online{online=\"false\"}" { print $2 }' <<< "$m")
    echo "$(now_ms) ${c:-0} ${off:-0}" >> "$SAMPLES"
    [ "${off:-0}" -ge "$DEVICES" ]
}
wait_until "the controller to apply $BLAST_MSGS blast messages" "$STEP_TIMEOUT" blast_sample
cpu_mark blast_done
wait_until "the blast window in the simulator's stats" 10 test -n "$(jval "$SIM_STATS" 'd["blasts"][0]["acked_unix_ms"]')"
T_BLAST_START=$(jval "$SIM_STATS" 'd["blasts"][0]["start_unix_ms"]')
T_BLAST_ACKED=$(jval "$SIM_STATS" 'd["blasts"][0]["acked_unix_ms"]')
read -r T_RECEIVED T_APPLIED PEAK < <(python3 - "$SAMPLES" "$C0" "$BLAST_MSGS" "$DEVICES" <<'EOF'
import sys
pts = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
c0, n, devices = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
received = next((t for t, c, _ in pts if c >= c0 + n), pts[-1][0])
applied = next(t for t, _, off in pts if off >= devices)
best = 0
for i, (t0, c0_, _) in enumerate(pts):
    for t1, c1, _ in pts[i + 1:]:
        if t1 - t0 >= 1000:
            best = max(best, (c1 - c0_) * 1000 / (t1 - t0))
            break
print(received, applied, round(best))
EOF
)
THROUGHPUT=$(python3 -c "print(round($BLAST_MSGS * 1000 / max(1, $T_APPLIED - $T_BLAST_START)))")
RECEIVE_RATE=$(python3 -c "print(round($BLAST_MSGS * 1000 / max(1, $T_RECEIVED - $T_BLAST_START)))")
log "blast: $BLAST_MSGS messages applied by the controller's core in $((T_APPLIED - T_BLAST_START)) ms = $THROUGHPUT/s (received and parsed by its MQTT task at $RECEIVE_RATE/s, best 1 s $PEAK/s; the broker had them all after $((T_BLAST_ACKED - T_BLAST_START)) ms)"

RSS_END_KB=$(rss_kb "$SERVE_PID" VmRSS)
HWM_END_KB=$(rss_kb "$SERVE_PID" VmHWM)
STATUS_TOTAL=$(metric ferry_status_messages_total)
sleep 0.3
cp "$SIM_STATS" "$WORK/sim-stats-final.json"

# ---- results
python3 - "$OUT" "$WORK/sim-stats-final.json" <<EOF
import json, sys
sim = json.load(open(sys.argv[2]))
marks = [l.split() for l in open("$CPU_MARKS")]
rss = [tuple(map(int, l.split())) for l in open("$WORK/rss-samples.txt") if len(l.split()) == 2]
cpu = {}
for (a, ta, *x), (b, tb, *y) in zip(marks, marks[1:]):
    if a.endswith("_start") and b.endswith("_done"):
        peak = max((kb for t, kb in rss if int(ta) <= t <= int(tb)), default=0)
        cpu[a[:-6]] = {"wall_s": round((int(tb) - int(ta)) / 1000, 2),
                       "controller": round(float(y[0]) - float(x[0]), 2), "mosquitto": round(float(y[1]) - float(x[1]), 2),
                       "sim": round(float(y[2]) - float(x[2]), 2), "loadavg_1m_at_end": float(y[3]),
                       "controller_rss_max_mb": round(peak / 1024, 1)}
def ro(r):
    x = sim["rollouts"].get(r, {})
    return {k: x.get(k) for k in ("notices", "committed", "rolled_back", "rejected", "notices_per_s", "notice_to_commit_ms")}
res = {
    "date_utc": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "machine": {"cores": $(nproc), "kernel": "$(uname -r)"},
    "setup": {"store": "$STORE", "replicas": $REPLICAS, "devices": $DEVICES, "per_connection": $PER_CONN, "pull_delay": "$PULL_DELAY",
              "health_delay": "$HEALTH_DELAY", "failure_rate": $FAILURE_RATE,
              "mosquitto_max_inflight_messages": $MQTT_INFLIGHT, "max_failures": "$MAX_FAILURES"},
    "register": {"ms": $((T_REG - T_SIM)), "status_messages": $STATUS_AFTER_REG},
    "notice_delivery": {"rollout": "$R1", "ms": $DELIVERY_MS, "goal_ms": 10000,
                        "start_command_ms": $((T1_STARTED - T1_START)),
                        "first_notice_after_ms": ($T1_FIRST_NOTICE - $T1_START) if "$T1_FIRST_NOTICE" else None,
                        "rollout_completed_ms": $((T1_DONE - T1_START)), "sim": ro("$R1")},
    "throughput": {"messages": $BLAST_MSGS, "applied_ms": $((T_APPLIED - T_BLAST_START)),
                   "per_s": $THROUGHPUT, "goal_per_s": 5000,
                   "received_ms": $((T_RECEIVED - T_BLAST_START)), "received_per_s": $RECEIVE_RATE,
                   "received_best_1s_per_s": $PEAK,
                   "broker_acked_after_ms": $((T_BLAST_ACKED - T_BLAST_START))},
    "rss": {"with_devices_mb": round($RSS_IDLE_KB / 1024, 1), "peak_at_registration_mb": round($HWM_IDLE_KB / 1024, 1),
            "end_mb": round($RSS_END_KB / 1024, 1), "peak_mb": round($HWM_END_KB / 1024, 1), "goal_mb": 150},
    "waves": {"rollout": "$R2", "waves": "$WAVES", "soak_s": $SOAK_S, "total_ms": $T2_TOTAL,
              "beyond_soak_ms": $OVERHEAD_MS, "goal_ms": 5000, "sim": ro("$R2")},
    "baseline_notice_delivery_ms": $BASELINE_MS,
    "takeover": $TAKEOVER,
    "report_verification": json.load(open("$VERIFY_FILE")) if "$VERIFY_FILE" else None,
    "status_messages_total": $STATUS_TOTAL,
    "cpu_s": cpu,
    "console": [json.loads(l) for l in open("$WORK/console.jsonl")],
    "sim_errors": sim["errors"],
}
# Per wave, from the controller's log ("wave started/completed"); for the last wave, where its
# time went: notices reaching the devices, the devices' updates, the soak, the controller seeing
# the soak end.
import datetime, re
def ts(line):
    return int(datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp() * 1000)
waves = {}
for line in open("$WORK/serve.log", errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    m = re.search(r'wave (started|completed) rollout="?$R2"? wave=(\d+)', line)
    if m:
        waves.setdefault(int(m.group(2)), {})[m.group(1)] = ts(line)
soak_ms = $SOAK_S * 1000
res["waves"]["per_wave"] = [
    {"wave": i, "ms": w["completed"] - w["started"], "beyond_soak_ms": round(w["completed"] - w["started"] - soak_ms)}
    for i, w in sorted(waves.items()) if "started" in w and "completed" in w
]
r2 = sim["rollouts"].get("$R2", {})
if waves and r2.get("last_notice_unix_ms"):
    last = waves[max(waves)]
    res["waves"]["last_wave"] = {
        "notices_delivered_after_ms": r2["last_notice_unix_ms"] - last["started"],
        "devices_committed_after_ms": r2["last_commit_unix_ms"] - last["started"],
        "completed_after_last_commit_minus_soak_ms": round(last["completed"] - r2["last_commit_unix_ms"] - soak_ms),
    }
res["goals_met"] = {
    "notice_delivery": res["notice_delivery"]["ms"] < 10000,
    "throughput": res["throughput"]["per_s"] >= 5000,
    "rss": res["rss"]["peak_mb"] < 150,
    "waves": res["waves"]["beyond_soak_ms"] < 5000,
    "console": all(c["cold_ms"] < 1000 for c in res["console"]),
}
if res["takeover"] is not None:
    res["goals_met"]["takeover"] = res["takeover"]["first_notice_after_kill_ms"] <= 10000
if res["report_verification"] is not None:
    # The controller verifies what queued up in one batch: under load (the case the goal is
    # about) that is the batched rate.
    res["goals_met"]["report_verification"] = res["report_verification"]["batched_per_s"] >= 20000
ok = lambda b: "ok  " if b else "MISS"
rv = res["report_verification"]
rv_line = (f"{ok(rv['batched_per_s'] >= 20000)} signed reports verified on one core: in batches of {rv['batch']} {rv['batched_per_s']:,.0f}/s, "
           f"one by one {rv['per_s']:,.0f}/s ({rv['per_report_us']} µs each, {rv['open_us']} µs parsing, {rv['mean_envelope_bytes']} B state envelopes)   (goal ≥ 20000/s)"
           if rv else "skip signed report verification (VERIFY_N=0)")
json.dump(res, open(sys.argv[1], "w"), indent=2)
g = res["goals_met"]
print(f"""
Ferry controller scale benchmark: {res['setup']['devices']} simulated devices, {res['machine']['cores']} cores
  {ok(g['notice_delivery'])} rollout start → all notices delivered (100% wave): {res['notice_delivery']['ms']} ms   (goal < 10000 ms)
  {ok(g['throughput'])} status messages applied by the core: {res['throughput']['per_s']}/s over {res['throughput']['messages']} messages (received by its MQTT task at {res['throughput']['received_per_s']}/s)   (goal ≥ 5000/s)
  {ok(g['rss'])} controller RSS: {res['rss']['with_devices_mb']} MB with all devices registered, peak {res['rss']['peak_mb']} MB   (goal < 150 MB)
  {ok(g['waves'])} {res['waves']['waves']} rollout, soak {res['waves']['soak_s']} s: {res['waves']['total_ms']} ms, {res['waves']['beyond_soak_ms']} ms beyond the soak   (goal < 5000 ms)
     per wave beyond the soak: {", ".join(f"{w['beyond_soak_ms']} ms" for w in res['waves'].get('per_wave', []))}; last wave: {res['waves'].get('last_wave')}
     baseline without the controller's logic (ferry-sim notify): all notices delivered after {res['baseline_notice_delivery_ms']} ms
  {rv_line}
  {(ok(g['takeover']) + " leader SIGKILLed → the first notice of a rollout started through another replica: " + str(res['takeover']['first_notice_after_kill_ms']) + " ms (lease " + res['takeover']['lease'] + ", all notices after " + str(res['takeover']['all_notices_after_kill_ms']) + " ms)   (goal ≤ 10000 ms)") if res['takeover'] else "skip take-over (REPLICAS=1)"}
  {ok(g['console'])} the console's fleet page (page, script, style, 50 devices, rollouts): {", ".join(f"{c['label']} {c['cold_ms']} ms cold, {c['poll_ms']} ms a poll (304s)" for c in res['console'])}   (goal < 1000 ms)
  CPU seconds per phase (controller / mosquitto / simulator): {", ".join(f"{k} {v['controller']}/{v['mosquitto']}/{v['sim']}" for k, v in cpu.items())}
results: {sys.argv[1]}""")
EOF
