#!/usr/bin/env bash
# Builds the blazedb image FROM scratch: release binary + the shared libraries it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p blazedb-node --bin blazedb
root=docker/rootfs
rm -rf "$root"
mkdir -p "$root/usr/bin" "$root/tmp" "$root/data"
cp target/release/blazedb "$root/usr/bin/blazedb"
strip "$root/usr/bin/blazedb" 2>/dev/null || true
# Every shared object the binary loads, at the same path (the dynamic loader included).
ldd target/release/blazedb | grep -o '/[^ ]*' | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
chmod 1777 "$root/tmp"
docker build -t "${1:-blazedb:latest}" .
