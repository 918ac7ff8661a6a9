#!/usr/bin/env bash
# Live sync from CML's event streams (`scripts/bench --live`, and the last part of
# `scripts/bench`; about 4 minutes after the release build): 1000 simulated workers (CML 2.9
# and 2.10) x 50 labs, 50 ms per CML call, watched over their event streams by one daemon.
#   Idle:    30 s of the streams' stats with nothing changing: the daemon's CPU, and its RSS
#            with 1000 open streams.
#   Changes: 20 lab changes a second on random labs for 30 s (labs-bench live, through the
#            simulator's control API), timed to 10 clients of lab-api's event stream (change ->
#            MongoDB write -> client); CML calls and MongoDB round trips per change.
#   Staleness: how long a changed lab waits before it is in MongoDB, event-driven (measured)
#            against the 30-minute poll and a poll spending the same CML calls (from the
#            measured cycle of 1000 workers and the calls spent).
# Prints one table.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
source scripts/lib/standin.sh

bash scripts/install-secantus >/dev/null
echo "building (release)..." >&2
cargo build --release --locked -q -p labs-bench -p lab-api -p sync-daemon -p cml-sim
bin=target/release
work="$(mktemp -d "${TMPDIR:-/tmp}/cml-labs-live.XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  standin_stop
  if [ -n "${LIVE_KEEP:-}" ]; then mkdir -p "$LIVE_KEEP" && cp "$work"/*.json "$work"/*.log "$LIVE_KEEP"/ 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
wait_for_line() { # FILE PATTERN
  for _ in $(seq 1 1200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2; tail -n 20 "$1" >&2; return 1
}
caught_up() { # URL: a starting lab-api has read back its window of changes
  local prev=-1 now
  for _ in $(seq 1 120); do
    now="$(curl -s "$1/metrics" | sed -n 's/^events_changes_total \([0-9]*\).*/\1/p')"
    [ -n "$now" ] && [ "$now" = "$prev" ] && [ "$now" -gt 0 ] && return 0
    prev="$now"; sleep 1
  done
}
peak_rss_kb() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
rss_kb() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in clock ticks
# One series' value (awk reads to the end: curl is never cut off mid-write).
metric() { curl -s "$1/metrics" | awk -v k="$2" '$1 == k && !found { print $2; found = 1 }'; }
wait_metric() { # URL SERIES MIN
  local v=""
  for _ in $(seq 1 1200); do
    v="$(metric "$1" "$2")"
    [ -n "$v" ] && awk -v v="$v" -v m="$3" 'BEGIN { exit !(v >= m) }' && return 0
    sleep 0.5
  done
  echo "timed out waiting for $2 >= $3 (last: ${v:-none})" >&2; return 1
}

standin_start "$work/mongo" >/dev/null
uri="$MONGODB_URI"
export CML_LABS_MONGODB__URI="$uri" CML_LABS_TELEMETRY__LOG_FORMAT=json CML_LABS_TELEMETRY__LOG_LEVEL=info

echo "Live: 1000 simulated workers (2.9, 2.10) x 50 labs watched over their event streams..." >&2
$bin/cml-sim --workers 1000 --labs-per-worker 50 --latency-ms 50 --versions 2.9,2.10 --seed 27 \
  --state-dir "$work/simlive" --mongodb-uri "$uri" --mongodb-database bench_live \
  >"$work/simlive.out" 2>"$work/simlive.err" &
live_sim_pid=$!; pids+=("$live_sim_pid")
wait_for_line "$work/simlive.out" "cml-sim ready"
live_control="$(sed -n 's/.*control=\([^ ]*\).*/\1/p' "$work/simlive.out")"
CML_LABS_MONGODB__DATABASE=bench_live CML_LABS_CML__PASSWORD=local-dev-password CML_LABS_SYNC__INTERVAL=1h \
  CML_LABS_SYNC__ADMIN_LISTEN=127.0.0.1:0 $bin/sync-daemon run 2>"$work/live-sync.log" &
live_pid=$!; pids+=("$live_pid")
live_admin="http://$(scripts/lib/log-event "$work/live-sync.log" listening --where endpoint=admin --field address)"
scripts/lib/log-event "$work/live-sync.log" cycle_completed --timeout 300 >/dev/null
wait_metric "$live_admin" 'sync_event_watches{state="live"}' 1000
# Each worker is relisted once its stream is live (a relist of a worker whose cycle sync is
# still queued joins it): done when no sync has run for two seconds.
idle_for=0
for _ in $(seq 1 1200); do
  if [ "$(metric "$live_admin" sync_workers_in_flight)" = "0" ]; then idle_for=$((idle_for + 1)); else idle_for=0; fi
  [ "$idle_for" -ge 4 ] && break
  sleep 0.5
done
# Idle: 1000 streams sending their stats, nothing changing.
idle_msgs() { curl -s "$live_admin/metrics" | awk '/^sync_event_messages_total/ { s += $2 } END { print s }'; }
echo "$(cpu_ticks "$live_pid") $(idle_msgs) $(date +%s.%N)" >"$work/live_idle"
sleep 30
echo "$(cpu_ticks "$live_pid") $(idle_msgs) $(date +%s.%N) $(getconf CLK_TCK)" >>"$work/live_idle"
rss_kb "$live_pid" >"$work/live_rss"
peak_rss_kb "$live_pid" >"$work/live_rss_peak"
CML_LABS_MONGODB__DATABASE=bench_live CML_LABS_API__LISTEN=127.0.0.1:0 CML_LABS_API__AUTH__MODE=none \
  $bin/lab-api 2>"$work/live-api.log" &
live_api_pid=$!; pids+=("$live_api_pid")
live_api="http://$(scripts/lib/log-event "$work/live-api.log" listening --where endpoint=api --field address)"
caught_up "$live_api"
curl -s "$live_admin/metrics" >"$work/live_metrics1"
$bin/labs-bench live --control "$live_control" --api "$live_api" --rate 20 --seconds 30 --streams 10 \
  >"$work/live.json" 2>"$work/live.err" || { cat "$work/live.err" >&2; exit 1; }
curl -s "$live_admin/metrics" >"$work/live_metrics2"

python3 - "$work" <<'PY'
import json, re, sys, pathlib
w = pathlib.Path(sys.argv[1])
j = lambda n: json.loads((w / n).read_text())
rows = []
def row(name, value, target, ok):
    rows.append((name, value, target, "ok" if ok else "MISSED"))
lv = j("live.json")
live_logs = [json.loads(l) for l in (w / "live-sync.log").read_text().splitlines() if l.startswith("{")]
live_cycle_s = next(l for l in live_logs if l.get("event") == "cycle_completed")["duration_ms"] / 1000
t0, m0, s0, t1, m1, s1, ltck = (float(v) for v in (w / "live_idle").read_text().split())
idle_cpu = (t1 - t0) / ltck / (s1 - s0)
idle_rate = (m1 - m0) / (s1 - s0)
def live_metric(name, text):
    return sum(float(v) for v in re.findall(r'^' + name + r'(?:\{[^}]*\})? ([0-9.e+]+)', text, re.M))
lm1, lm2 = (w / "live_metrics1").read_text(), (w / "live_metrics2").read_text()
live_cmds = live_metric("mongodb_commands_total", lm2) - live_metric("mongodb_commands_total", lm1)
lag_n = live_metric("sync_event_lag_seconds_count", lm2) - live_metric("sync_event_lag_seconds_count", lm1)
lag_sum = live_metric("sync_event_lag_seconds_sum", lm2) - live_metric("sync_event_lag_seconds_sum", lm1)
changes = max(lv["changes"], 1)
tot, tw, wc = lv["total_ms"], lv["to_write_ms"], lv["write_to_client_ms"]
row(f"Live: CML change -> SSE client ms (p50 | p99 | max; {lv['streams']} clients x {lv['changes']} changes, 1000 workers)",
    f'{tot["p50"]} | {tot["p99"]} | {tot["max"]}', "p99 <= 1000 ms, every client every change",
    tot["p99"] <= 1000 and lv["missing"] == 0)
row("  split p50 | p99 ms: change -> MongoDB write; write -> client",
    f'{tw["p50"]} | {tw["p99"]}; {wc["p50"]} | {wc["p99"]}', f"(daemon: CML event -> write mean {lag_sum / max(lag_n, 1) * 1000:.0f} ms)", True)
# Users and groups are read on a clock (`sync.access_interval`, 5 min, spread over the fleet:
# 1,000 workers make about 3.3 such syncs a second), not per lab change: they are shown, not
# counted against the changes.
by_ep = lv["cml_calls_by_endpoint"]
access_calls = by_ep.get("users", 0) + by_ep.get("groups", 0)
cml_per = (lv["cml_calls"] - access_calls) / changes
row("  CML calls per lab change", f"{cml_per:.3f}", f"<= 1.05 ({by_ep}; users and groups on the access clock)", cml_per <= 1.05)
row("  MongoDB round trips per lab change (all the daemon's commands)", f"{live_cmds / changes:.2f}", "<= 3", live_cmds / changes <= 3)
live_rss = int((w / "live_rss").read_text().strip()) / 1024
live_peak = int((w / "live_rss_peak").read_text().strip()) / 1024
row("  sync-daemon RSS with 1000 open watches (peak, first cycle included)", f"{live_rss:.1f} MiB ({live_peak:.1f})", "<= 100 MiB", live_rss <= 100)
row("  sync-daemon CPU for the idle streams' stats", f"{idle_cpu * 100:.1f}% of a core at {idle_rate:.0f} messages/s",
    "<= 5% of a core", idle_cpu <= 0.05)
# Staleness a user sees: how long a changed lab waits before it is in MongoDB.
poll_calls = 2 * lv["workers"]  # a full read per worker: populate_lab_tiles + groups (2.9+)
calls_per_s = max(lv["cml_calls"], 1) / lv["seconds"]
same_interval = poll_calls / calls_per_s
poll = lambda interval: (interval / 2 + live_cycle_s / 2, 0.99 * interval + live_cycle_s)
p30, peq = poll(1800), poll(same_interval)
row("  staleness mean | p99 s: event-driven", f'{tw["mean"] / 1000:.2f} | {tw["p99"] / 1000:.2f}', "(measured)", True)
row("  ... the 30-minute poll", f"{p30[0]:.0f} | {p30[1]:.0f}", f"(a cycle of 1000 workers: {live_cycle_s:.1f} s)", True)
row(f"  ... a poll spending the same CML calls (every {same_interval:.0f} s)", f"{peq[0]:.1f} | {peq[1]:.1f}",
    f"({calls_per_s:.1f} calls/s; a poll reads {poll_calls} per cycle)", True)
widths = [max(len(r[i]) for r in rows + [("measure", "value", "target", "")]) for i in range(4)]
fmt = "  ".join("{:<%d}" % n for n in widths)
print(fmt.format("measure", "value", "target", ""))
print(fmt.format(*["-" * n for n in widths]))
for r in rows:
    print(fmt.format(*r))
missed = [r[0].strip() for r in rows if r[3] == "MISSED"]
print(f"\n{len(rows) - len(missed)} targets met, {len(missed)} missed" + (": " + "; ".join(missed) if missed else ""))
PY
