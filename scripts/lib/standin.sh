# Start and stop the MongoDB stand-in (secantusd-rs) from scripts. Source this file.
#   standin_start DIR   starts a server on a free port with its data in DIR, waits for `ping`,
#                       exports MONGODB_URI and STANDIN_PID (cache: STANDIN_CACHE, default 256M)
#   standin_stop        stops it by PID (TERM, then KILL after 10 s)

STANDIN_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

standin_start() {
  local dir="$1" port="" i
  mkdir -p "$dir/data"
  : >"$dir/stdout"
  secantusd-rs --host 127.0.0.1 --port 0 --storage-path "$dir/data" \
    --cache-size "${STANDIN_CACHE:-256M}" --log-file-max 16MB >"$dir/stdout" 2>"$dir/server.log" &
  STANDIN_PID=$!
  export STANDIN_PID
  for i in $(seq 1 600); do
    port=$(sed -n 's/.*listening on .*:\([0-9][0-9]*\).*/\1/p' "$dir/stdout" | head -n 1)
    [ -n "$port" ] && break
    if ! kill -0 "$STANDIN_PID" 2>/dev/null; then
      echo "the MongoDB stand-in exited at start; its log:" >&2
      tail -n 20 "$dir/server.log" >&2
      return 1
    fi
    sleep 0.1
  done
  if [ -z "$port" ]; then
    echo "the MongoDB stand-in did not report its port within 60 s" >&2
    standin_stop
    return 1
  fi
  python3 "$STANDIN_LIB_DIR/mongo-ping.py" 127.0.0.1 "$port" 30 || { standin_stop; return 1; }
  export MONGODB_URI="mongodb://127.0.0.1:$port/?directConnection=true"
  export STANDIN_PORT="$port"
}

standin_stop() {
  [ -n "${STANDIN_PID:-}" ] || return 0
  if kill -0 "$STANDIN_PID" 2>/dev/null; then
    kill -TERM "$STANDIN_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 100); do
      kill -0 "$STANDIN_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$STANDIN_PID" 2>/dev/null || true
  fi
  wait "$STANDIN_PID" 2>/dev/null || true
  STANDIN_PID=""
}
