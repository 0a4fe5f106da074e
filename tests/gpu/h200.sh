#!/usr/bin/env bash
# The hardware-path check for the lent NVIDIA H200 (NVDEC, no NVENC; see ../shared/device/README.md).
#
# Prepare here (CPU machine):   tests/gpu/prepare.sh        (release kilnd + probe, GStreamer bundle in .gstdev/)
# Run there (device tool):      run(command="bash tests/gpu/h200.sh", carry=[".gstdev"], timeout_s=420)
#
# It prints, from one run on one input:
#   1. what the GPU and GStreamer's nvcodec offer (nvidia-smi, registered nv*/cuda* elements);
#   2. decode fps of a bare `gst-launch-1.0 … nvh264dec ! fakesink` on an H.264 1080p30 file made by x264 first;
#   3. kilnd with N live streams of that file: decoded on NVDEC (decode_gpu 0), scaled on CUDA if
#      cudaconvertscale registered, encoded on the CPU (no NVENC) — its aggregate decode fps (streams × fps × the
#      slowest real-time ratio from /metrics), next to the bare figure;
#   4. kiln-nvenc-probe's JSON, which must say there is no NVENC.
set -uo pipefail
cd "$(dirname "$0")/../.."
source .gstdev/env.sh
OUT=${OUT:-/tmp/kiln-gpu-out}
mkdir -p "$OUT"
BIN=.gstdev/bin
MEDIA=$(mktemp -d)
STREAMS=${STREAMS:-4}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,encoder.stats.sessionCount --format=csv | tee -a "$OUT/summary.txt"
gst-inspect-1.0 nvcodec >"$OUT/nvcodec.txt" 2>&1 || true
gst-inspect-1.0 2>/dev/null | grep -E "^(nvcodec|cuda)" | sed 's/^/   /' | tee -a "$OUT/summary.txt"

log "input: 20 s of H.264 1080p30 8 Mb/s made by x264"
gst-launch-1.0 -q videotestsrc num-buffers=600 pattern=ball \
  ! video/x-raw,width=1920,height=1080,framerate=30/1,format=I420 \
  ! x264enc speed-preset=ultrafast bitrate=8000 key-int-max=60 ! h264parse ! mp4mux \
  ! filesink location="$MEDIA/in.mp4" || { log "making the input failed"; exit 1; }

log "anchor: bare gst-launch NVDEC decode (unpaced)"
t0=$(date +%s.%N)
gst-launch-1.0 -q filesrc location="$MEDIA/in.mp4" ! qtdemux ! h264parse ! nvh264dec ! fakesink sync=false \
  >>"$OUT/summary.txt" 2>&1
t1=$(date +%s.%N)
anchor_fps=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", 600 / (b - a)}')
awk -v a="$t0" -v b="$t1" 'BEGIN {printf "   bare nvh264dec: 600 frames in %.2f s = %.0f fps (includes CUDA start-up)\n", b - a, 600 / (b - a)}' | tee -a "$OUT/summary.txt"

log "the decode chain kilnd builds, by hand (negotiated caps)"
gst-launch-1.0 -v filesrc location="$MEDIA/in.mp4" ! qtdemux ! h264parse ! h264parse ! nvh264dec ! videoconvert \
  ! "video/x-raw,format={I420,NV12}" ! videoconvertscale ! videorate \
  ! video/x-raw,format=I420,width=640,height=360,framerate=30/1,pixel-aspect-ratio=1/1 \
  ! x264enc speed-preset=ultrafast ! fakesink 2>&1 | grep -E "caps = |ERROR|error" | sed 's/^/   /' | sort -u | head -20 | tee -a "$OUT/summary.txt"

log "kilnd: $STREAMS live streams of the file (NVDEC decode, CPU encode)"
NO_COLOR=1 "$BIN/kilnd" --listen 127.0.0.1:0 --media-dir "$MEDIA" >"$OUT/kilnd.stdout" 2>"$OUT/kilnd.log" &
KPID=$!
for _ in $(seq 50); do grep -q "listening on" "$OUT/kilnd.stdout" && break; sleep 0.2; done
BASE=$(sed -n 's/^kilnd listening on //p' "$OUT/kilnd.stdout")
curl -s "$BASE/v1/capacity" >"$OUT/capacity.json"
echo "   capacity: $(head -c 600 "$OUT/capacity.json")" | tee -a "$OUT/summary.txt"
SPEC='{"source":"file:///in.mp4","policy":"prefer-gpu","renditions":[{"name":"720p","width":1280,"height":720,"fps":30,"bitrate_kbps":2500},{"name":"360p","width":640,"height":360,"fps":30,"bitrate_kbps":800}],"audio":{"enabled":false}}'
for i in $(seq "$STREAMS"); do
  curl -s -X PUT -H 'content-type: application/json' -d "$SPEC" "$BASE/v1/streams/s$i" >"$MEDIA/put-s$i.json"
  cat "$MEDIA/put-s$i.json" >>"$OUT/puts.json"; echo >>"$OUT/puts.json"
done
echo "   s1: $(grep -o '"backend":{[^}]*}\|"decode_gpu":[0-9]*\|"error":{[^}]*}' "$MEDIA/put-s1.json" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
sleep 10   # warm-up: pipelines start, NVDEC sessions open (measurement window below)
m0=$(curl -s "$BASE/metrics" | awk '/^kiln_media_seconds_total\{.*rendition="360p"/ {s+=$2} END {print s+0}')
t0=$(date +%s.%N); sleep 30; t1=$(date +%s.%N)
m1=$(curl -s "$BASE/metrics" | awk '/^kiln_media_seconds_total\{.*rendition="360p"/ {s+=$2} END {print s+0}')
nvidia-smi --query-gpu=utilization.decoder,utilization.encoder --format=csv >>"$OUT/summary.txt"
awk -v m0="$m0" -v m1="$m1" -v a="$t0" -v b="$t1" -v n="$STREAMS" -v bare="$anchor_fps" 'BEGIN {
  printf "   kilnd: %d streams decoded %.0f fps in aggregate (live, paced at 30 fps each) vs bare %s fps unpaced\n",
    n, (m1 - m0) * 30 / (b - a), bare }' | tee -a "$OUT/summary.txt"
curl -s "$BASE/v1/streams" >"$OUT/streams.json"
curl -s "$BASE/metrics" >"$OUT/metrics.txt"
log "passthrough: a stream of the file whose top rung is its own H.264 (the 360p rung decoded on NVDEC)"
PSPEC='{"source":"file:///in.mp4","policy":"prefer-gpu","renditions":[{"name":"source","passthrough":true},{"name":"360p","width":640,"height":360,"fps":30,"bitrate_kbps":800}],"audio":{"enabled":false}}'
curl -s -X PUT -H 'content-type: application/json' -d "$PSPEC" "$BASE/v1/streams/p1" >"$OUT/put-p1.json"
sleep 12   # two 2 s GOPs of the file, the first segment complete (TARGETDURATION is learnt from it)
curl -s "$BASE/v1/streams/p1" >"$OUT/p1.json"
curl -s "$BASE/live/p1/source/index.m3u8" >"$OUT/p1-source.m3u8"
curl -s "$BASE/live/p1/360p/index.m3u8" >"$OUT/p1-360p.m3u8"
echo "   p1: $(grep -o '"state":"[a-z]*"\|"decode_gpu":[0-9]*\|"passthrough":true\|"errors":\[[^]]*\]' "$OUT/p1.json" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
for r in source 360p; do
  echo "   $r: $(grep -c '^seg-' "$OUT/p1-$r.m3u8") segments, $(grep -m1 TARGETDURATION "$OUT/p1-$r.m3u8"), PDTs $(grep PROGRAM-DATE-TIME "$OUT/p1-$r.m3u8" | tail -3 | cut -c37- | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
done
echo "   states: $(grep -o '"state":"[a-z]*"' "$OUT/streams.json" | sort | uniq -c | tr -s ' \n' ' ')" | tee -a "$OUT/summary.txt"
sed 's/\x1b\[[0-9;]*m//g' "$OUT/kilnd.log" | grep -m2 "input format" | cut -c1-600 | sed 's/^/   /' | tee -a "$OUT/summary.txt"
echo "   first errors: $(grep -o '"errors":\[[^]]*\]' "$OUT/streams.json" | head -1 | head -c 400)" | tee -a "$OUT/summary.txt"
kill -TERM $KPID; wait $KPID
# autoplugging (VOD jobs, the VOD probe) must never pick nvcodec's decoders (PRIMARY+1 on 1.22) unbooked
echo "   demoted: $(sed 's/\x1b\[[0-9;]*m//g' "$OUT/kilnd.log" | grep -o 'hardware decoders are chosen explicitly.*' | head -c 300)" | tee -a "$OUT/summary.txt"

log "kiln-nvenc-probe"
if [ -x "$BIN/kiln-nvenc-probe" ]; then
  "$BIN/kiln-nvenc-probe" | tee -a "$OUT/summary.txt"
else
  echo "   not bundled" | tee -a "$OUT/summary.txt"
fi
