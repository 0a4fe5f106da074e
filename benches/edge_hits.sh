#!/usr/bin/env bash
# Cache-hit throughput of the two LL-HLS shields in deploy/edge/ (what an edge node serves per core), against
# nginx serving the same bytes from disk, measured in the same run.
#
# The same mix as benches/origin.rs: wrk (-t1 -c64, pinned to CPU 0) alternates between a blocking playlist
# (1968 B) and a part (4600 B). The server under test is pinned to CPU 1: nginx with one worker (the shield, then
# plain static files as the anchor) and varnishd with all its threads. A small Python origin answers the shields'
# first misses; after that every request is a hit (max-age 600). Plain HTTP/1.1 with wrk, then what browsers get:
# TLS with HTTP/2 from h2load (-t1 -c64 -m1, one stream in flight per connection as wrk has one request), nginx
# itself and Varnish behind hitch (kiln-edge-hitch.conf.template, one worker, on the same core as Varnish).
#   benches/edge_hits.sh [SECONDS]        (default 10; needs nginx-light, varnish, hitch, wrk, nghttp2-client,
#                                           python3, openssl)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
for t in nginx varnishd hitch wrk h2load python3 openssl taskset envsubst curl; do
  command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || {
    echo "edge_hits: $t is missing (apt-get install nginx-light varnish hitch wrk nghttp2-client python3 openssl" \
      "gettext-base curl)" >&2
    exit 1
  }
done
PATH="$PATH:/usr/sbin"
dir=$(mktemp -d)
# nginx's workers run as an unprivileged user when started as root: they must reach the cache under $dir
chmod 755 "$dir"
pids=()
cleanup() {
  [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 150); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.2; done; return 1; }

mkdir -p "$dir/www/live/e/v"
python3 - "$dir/www/live/e/v" <<'EOF'
import os, sys
d = sys.argv[1]
line = '#EXT-X-PART:DURATION=0.33334,URI="part-100-1.m4s",INDEPENDENT=YES\n'
open(f'{d}/index.m3u8', 'w').write(('#EXTM3U\n' + line * 30)[:1967] + '\n')
open(f'{d}/part-100-1.m4s', 'wb').write(os.urandom(4600))
EOF
origin=$(free_port)
python3 - "$dir/www" "$origin" <<'EOF' &
import http.server, os, socketserver, sys
root, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        f = root + self.path.split('?')[0]
        body = open(f, 'rb').read() if os.path.isfile(f) else b''
        self.send_response(200 if body else 404)
        self.send_header("Cache-Control", "public, max-age=600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer): daemon_threads = True
S(("127.0.0.1", port), H).serve_forever()
EOF
pids+=($!)
wait_port "$origin"

cat > "$dir/mix.lua" <<'EOF'
local paths = {"/live/e/v/index.m3u8?_HLS_msn=100&_HLS_part=1", "/live/e/v/part-100-1.m4s"}
local i = 0
request = function() i = i + 1; return wrk.format("GET", paths[(i % 2) + 1]) end
EOF
measure() { # name port
  for u in "/live/e/v/index.m3u8?_HLS_msn=100&_HLS_part=1" /live/e/v/part-100-1.m4s; do
    curl -s -o /dev/null "http://127.0.0.1:$2$u"   # the miss that fills the cache
  done
  local out code
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/live/e/v/part-100-1.m4s")
  [ "$code" = 200 ] || { echo "edge_hits: $1 answered $code" >&2; cat "$dir/error.log" >&2 || true; exit 1; }
  out=$(taskset -c 0 wrk -t1 -c64 -d"${secs}s" --latency -s "$dir/mix.lua" "http://127.0.0.1:$2")
  printf '%-28s %10s req/s  p99 %s\n' "$1" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")"
}

# the same mix over TLS and HTTP/2 (h2load cycles through the URIs on each connection): name base
measure_h2() {
  local out
  out=$(taskset -c 0 h2load -t1 -c64 -m1 -D "$secs" --warm-up-time=1 \
    "$2/live/e/v/index.m3u8?_HLS_msn=100&_HLS_part=1" "$2/live/e/v/part-100-1.m4s")
  grep -q "Application protocol: h2" <<<"$out" || { echo "edge_hits: $1 did not negotiate h2: $out" >&2; exit 1; }
  grep -qE "requests: .* 0 failed" <<<"$out" || { echo "edge_hits: $1 had failures: $out" >&2; exit 1; }
  printf '%-28s %10s req/s  mean %s (h2load gives no p99)\n' "$1" \
    "$(awk '/^finished in/ {print $4}' <<<"$out")" "$(awk '$1 == "time" && $2 == "for" && $3 == "request:" {print $6}' <<<"$out")"
}

edge=$(free_port); tls=$(free_port); static=$(free_port)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=127.0.0.1 \
  -keyout "$dir/edge.key" -out "$dir/edge.pem" 2>/dev/null
KILN_ORIGIN=127.0.0.1:$origin KILN_EDGE_LISTEN=127.0.0.1:$edge KILN_EDGE_TLS_LISTEN=127.0.0.1:$tls \
  KILN_CACHE_DIR=$dir/cache KILN_TLS_CERT=$dir/edge.pem KILN_TLS_KEY=$dir/edge.key \
  envsubst '${KILN_ORIGIN} ${KILN_EDGE_LISTEN} ${KILN_EDGE_TLS_LISTEN} ${KILN_CACHE_DIR} ${KILN_TLS_CERT} ${KILN_TLS_KEY}' \
  < deploy/edge/kiln-edge.conf.template > "$dir/kiln-edge.conf"
cat > "$dir/nginx.conf" <<EOF
daemon on;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy; fastcgi_temp_path $dir/f;
  uwsgi_temp_path $dir/u; scgi_temp_path $dir/s;
  include $dir/kiln-edge.conf;
  server { listen 127.0.0.1:$static; root $dir/www; }
}
EOF
taskset -c 1 nginx -c "$dir/nginx.conf" -p "$dir"
wait_port "$edge"
measure "nginx static (anchor)" "$static"
measure "nginx shield (cache hits)" "$edge"
measure_h2 "nginx shield, TLS + h2" "https://127.0.0.1:$tls"
kill "$(cat "$dir/nginx.pid")"; rm -f "$dir/nginx.pid"

varnish=$(free_port); proxy=$(free_port); hitch_tls=$(free_port)
KILN_ORIGIN_HOST=127.0.0.1 KILN_ORIGIN_PORT=$origin envsubst '${KILN_ORIGIN_HOST} ${KILN_ORIGIN_PORT}' \
  < deploy/edge/kiln-edge.vcl.template > "$dir/kiln-edge.vcl"
taskset -c 1 varnishd -F -j none -T none -s malloc,256m -p feature=+http2 -p rush_exponent=1000 \
  -p thread_pool_min=500 -a "127.0.0.1:$varnish" -a "127.0.0.1:$proxy,PROXY" -n "$dir/varnish" \
  -f "$dir/kiln-edge.vcl" \
  >"$dir/varnish.log" 2>&1 &
pids+=($!)
wait_port "$varnish"
measure "Varnish shield (cache hits)" "$varnish"

KILN_EDGE_TLS_HOST=127.0.0.1 KILN_EDGE_TLS_PORT=$hitch_tls KILN_VARNISH_PROXY_PORT=$proxy KILN_HITCH_WORKERS=1 \
  KILN_TLS_CERT=$dir/edge.pem KILN_TLS_KEY=$dir/edge.key \
  envsubst '${KILN_EDGE_TLS_HOST} ${KILN_EDGE_TLS_PORT} ${KILN_VARNISH_PROXY_PORT} ${KILN_HITCH_WORKERS} ${KILN_TLS_CERT} ${KILN_TLS_KEY}' \
  < deploy/edge/kiln-edge-hitch.conf.template > "$dir/hitch.conf"
user=(); [ "$(id -u)" -eq 0 ] && user=(--user=nobody)   # hitch refuses to run its workers as root
taskset -c 1 hitch --config="$dir/hitch.conf" "${user[@]}" >"$dir/hitch.log" 2>&1 &
pids+=($!)
wait_port "$hitch_tls"
measure_h2 "Varnish via hitch, TLS + h2" "https://127.0.0.1:$hitch_tls"
