# Sourced by the benchmark scripts: starts the Redis peer (Debian's redis-server, installed if
# missing; in memory, no persistence) on 127.0.0.1:$REDIS_PORT (default 6399), stops it when
# the script exits, and returns once it accepts connections.
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server (Debian) for the peer measurement" >&2
  apt-get install -y -q redis-server >/dev/null
fi
REDIS_PORT=${REDIS_PORT:-6399}
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --loglevel warning >/dev/null &
REDIS_PID=$!
trap 'kill $REDIS_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/"$REDIS_PORT") 2>/dev/null && break
  sleep 0.05
done
