#!/usr/bin/env bash
# Builds what tests/gpu/h200.sh runs on the lent GPU machine and bundles it with the GStreamer runtime into .gstdev/
# (ignored by git; carried by the device tool). Run on the CPU machine from anywhere in the repo.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p kilnd
strip target/release/kilnd
bins=(target/release/kilnd)
# The NVENC probe links libnvidia-encode/libnvcuvid at build time; here it is linked against stub libraries
# (crates/kiln-nvenc-probe/build-with-stubs.sh) and the real driver libraries are used on the GPU machine.
if crates/kiln-nvenc-probe/build-with-stubs.sh; then bins+=(target/release/kiln-nvenc-probe); fi
grep -qx '/.gstdev/' .git/info/exclude 2>/dev/null || echo /.gstdev/ >> .git/info/exclude
KILN_BUNDLE_PLUGINS="coreelements nvcodec videotestsrc x264 videoconvertscale videorate isomp4 videoparsersbad \
  audioparsers app typefindfunctions playback audioconvert audioresample voaacenc" \
  ../shared/device/bundle-gst.sh .gstdev "${bins[@]}"
du -sh .gstdev
