#!/usr/bin/env bash
# Instructions kilnd executes per playback request, counted by callgrind: exact where the wall-clock benches
# (origin.rs) move by ±20 % between runs on a shared VM. For each kilnd binary given (default: the release
# build), starts it under `valgrind --tool=callgrind` with one async worker, publishes the origin bench's tiny
# live stream, then counts the instructions of every poll of the HTTP connections (`kiln_http::server::Timed`,
# so the stream's encoder threads are left out) while wrk alternates between the media playlist and a part for
# 15 s, and prints them per request. Compare two builds in one run: `benches/instructions.sh old-kilnd new-kilnd`.
# `ACCEPT_ENCODING=gzip benches/instructions.sh` sends that header with every request (browsers and shields do).
# The binaries need their symbols (the function name is how callgrind finds the polls):
#   CARGO_PROFILE_RELEASE_STRIP=none cargo build --release -p kilnd
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
command -v valgrind > /dev/null && command -v wrk > /dev/null || {
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends valgrind wrk
}
[ $# -gt 0 ] || set -- target/release/kilnd
SPEC='{"source": "test:pattern=ball", "audio": {"enabled": false},
  "renditions": [{"name": "v", "width": 160, "height": 90, "fps": 30, "bitrate_kbps": 2400}]}'
work=$(mktemp -d)
trap 'kill $(jobs -p) 2> /dev/null || true; rm -rf "$work"' EXIT
for bin in "$@"; do
  nm "$bin" 2> /dev/null | grep Timed > /dev/null || { echo "$bin has no symbols (see this script's header)" >&2; exit 2; }
  out="$work/callgrind.out"
  TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --collect-atstart=no \
    "--toggle-collect=*Timed*as*Future*poll*" --callgrind-out-file="$out" \
    "$bin" --listen 127.0.0.1:0 > "$work/kilnd.log" 2>&1 &
  vg=$!
  base=""
  for _ in $(seq 1 120); do
    base=$(grep -o 'listening on http://[0-9.:]*' "$work/kilnd.log" | sed 's/listening on //' || true)
    [ -n "$base" ] && break
    sleep 1
  done
  [ -n "$base" ] || { echo "kilnd did not start: $(tail -5 "$work/kilnd.log")" >&2; exit 1; }
  curl -sf -X PUT "$base/v1/streams/bench" -d "$SPEC" > /dev/null
  # two segments published (under valgrind the stream runs slower than real time)
  for _ in $(seq 1 180); do
    [ "$(curl -s "$base/live/bench/v/index.m3u8" | grep -c '^#EXTINF')" -ge 2 ] && break
    sleep 1
  done
  m=$(curl -s "$base/live/bench/v/index.m3u8" | grep -o 'part-[0-9]*-' | tail -1 | tr -dc 0-9)
  cat > "$work/mix.lua" <<LUA
local paths = {"/live/bench/v/index.m3u8", "/live/bench/v/part-$((m - 1))-2.m4s"}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % 2) + 1])
end
LUA
  callgrind_control -z "$vg" > /dev/null
  headers=()
  [ -n "${ACCEPT_ENCODING:-}" ] && headers=(-H "Accept-Encoding: $ACCEPT_ENCODING")
  result=$(wrk -t1 -c8 -d15s "${headers[@]}" -s "$work/mix.lua" "$base")
  callgrind_control -d "$vg" > /dev/null
  kill "$vg"; wait "$vg" 2> /dev/null || true
  if echo "$result" | grep -q Non-2xx; then echo "errors during the count: $result" >&2; exit 1; fi
  n=$(echo "$result" | awk '/requests in/ {print $1}')
  ir=$(awk '/^totals:/ {print $2}' "$out".1)
  echo "$bin: $n requests, $ir instructions in the connection polls, $((ir / n)) per request"
  rm -f "$out"*
done
