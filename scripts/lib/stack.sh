# A small running system for the checks that drive lab-api from outside: the CML simulator
# registered in a database of its own on MONGODB_URI, one sync-daemon cycle, and lab-api, all
# debug builds. Source it from the repository root; what it starts stops when the script exits.
#   stack_init NAME            a work directory and database named after NAME; the cleanup trap
#   stack_sim ARGS...          cml-sim with ARGS, until ready; sets STACK_CONTROL (its control URL)
#   stack_first_cycle          `sync-daemon once`; exits with its log when it fails
#   stack_api [ENV=VALUE...]   lab-api on a free port with ENV; sets STACK_API (host:port)

stack_pids=()
stack_cleanup() {
  local p
  for p in "${stack_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${stack_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$STACK_WORK"
}

stack_init() {
  cargo build --quiet --locked -p cml-sim -p sync-daemon -p lab-api
  STACK_WORK="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
  STACK_DB="${1//-/_}_$(date +%s)_$$"
  trap stack_cleanup EXIT
  export CML_LABS_MONGODB__URI="$MONGODB_URI" CML_LABS_MONGODB__DATABASE="$STACK_DB" \
    CML_LABS_CML__PASSWORD=local-dev-password CML_LABS_CML__REQUEST_TIMEOUT=2s
}

stack_sim() {
  ./target/debug/cml-sim "$@" --state-dir "$STACK_WORK/sim" --mongodb-uri "$MONGODB_URI" \
    --mongodb-database "$STACK_DB" >"$STACK_WORK/sim.out" 2>"$STACK_WORK/sim.err" &
  stack_pids+=($!)
  local _
  for _ in $(seq 1 200); do grep -q "cml-sim ready" "$STACK_WORK/sim.out" 2>/dev/null && break; sleep 0.1; done
  STACK_CONTROL="$(sed -n 's/.*control=\([^ ]*\).*/\1/p' "$STACK_WORK/sim.out")"
  [ -n "$STACK_CONTROL" ] || { cat "$STACK_WORK/sim.out" "$STACK_WORK/sim.err" >&2; exit 1; }
}

stack_first_cycle() {
  ./target/debug/sync-daemon once 2>"$STACK_WORK/first-cycle.log" \
    || { tail -n 20 "$STACK_WORK/first-cycle.log" >&2; exit 1; }
}

# A long-running sync-daemon (after the first cycle: it holds the lease and serves refreshes).
stack_daemon() {
  env CML_LABS_SYNC__ADMIN_LISTEN=127.0.0.1:0 CML_LABS_SYNC__INTERVAL=1h "$@" \
    ./target/debug/sync-daemon run 2>"$STACK_WORK/daemon.log" &
  stack_pids+=($!)
  scripts/lib/log-event "$STACK_WORK/daemon.log" lease_acquired --timeout 20 >/dev/null
}

stack_api() {
  env CML_LABS_API__LISTEN=127.0.0.1:0 "$@" ./target/debug/lab-api 2>"$STACK_WORK/api.log" &
  stack_pids+=($!)
  STACK_API="$(scripts/lib/log-event "$STACK_WORK/api.log" listening --where endpoint=api --field address --timeout 20)"
}
