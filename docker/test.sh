#!/usr/bin/env bash
# Image test (needs a Docker engine; not part of the default suite because it builds a release
# binary): two containers on a private network, B bootstraps from A's address; a PUT on A
# appears on B; both stop cleanly (exit 0) on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
docker/build.sh blazedb:test >/dev/null
net=blazedb-test-$$
cleanup() { docker rm -f "$net-a" "$net-b" >/dev/null 2>&1 || true; docker network rm "$net" >/dev/null 2>&1 || true; }
trap cleanup EXIT
docker network create "$net" >/dev/null
docker run -d --name "$net-a" --network "$net" -p 127.0.0.1::7700 blazedb:test >/dev/null
ip_a=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$net-a")
docker run -d --name "$net-b" --network "$net" -p 127.0.0.1::7700 blazedb:test \
  node --data /data --api 0.0.0.0:7700 --listen /ip4/0.0.0.0/tcp/7701 --no-mdns \
  --bootstrap "/ip4/$ip_a/tcp/7701" >/dev/null
api_a=$(docker port "$net-a" 7700/tcp | head -1)
api_b=$(docker port "$net-b" 7700/tcp | head -1)
wait_for() { for _ in $(seq 1 100); do if eval "$1" >/dev/null 2>&1; then return 0; fi; sleep 0.2; done; echo "timed out: $1" >&2; return 1; }
wait_for "curl -sf http://$api_a/v1/status"
wait_for "curl -sf http://$api_b/v1/status"
curl -sf -X PUT "http://$api_a/v1/ns/default/users/ada" -d '{"name":"Ada"}' >/dev/null
wait_for "curl -sf http://$api_b/v1/ns/default/users/ada | grep -q Ada"
kx=$(curl -sf "http://$api_b/v1/status" | grep -o '"key_exchange":"[^"]*"' | head -1)
[ "$kx" = '"key_exchange":"X25519MLKEM768"' ] || { echo "unexpected key exchange: $kx" >&2; exit 1; }
docker stop -t 10 "$net-a" "$net-b" >/dev/null
for c in "$net-a" "$net-b"; do
  code=$(docker inspect -f '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || { echo "$c exited with $code" >&2; exit 1; }
done
echo "1 passed, 0 failed"
