#!/usr/bin/env bash
# Builds the real probe (feature `nvenc`) on a host without the NVIDIA driver, for use on one that has it.
# The SDK crate links libnvidia-encode and libnvcuvid, cudarc 0.16 links libcuda: empty stand-ins with the driver's
# sonames satisfy the linker, symbols stay unresolved until the GPU host's dynamic loader binds them to the real
# driver libraries. The binary therefore does not start on a host without the driver (that is what kilnd's
# subprocess boundary is for).
set -euo pipefail
cd "$(dirname "$0")/../.."
STUBS=target/nvenc-stubs
mkdir -p "$STUBS/lib"
echo 'void kiln_nvenc_stub(void) {}' > "$STUBS/stub.c"
for l in cuda:libcuda.so.1 nvidia-encode:libnvidia-encode.so.1 nvcuvid:libnvcuvid.so.1; do
  cc -shared -fPIC -o "$STUBS/lib/lib${l%%:*}.so" -Wl,-soname,"${l#*:}" "$STUBS/stub.c"
done
mkdir -p "$STUBS/include"
export NVIDIA_VIDEO_CODEC_SDK_PATH=$PWD/$STUBS CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-12020}
# The link flags go to the final binary only (`cargo rustc -- …`), not to build scripts. --as-needed would drop the
# stand-ins (they define nothing): they are re-listed after --no-as-needed so the binary records libcuda.so.1,
# libnvidia-encode.so.1 and libnvcuvid.so.1 as NEEDED and its symbols bind to them on the GPU host.
cargo rustc --release -p kiln-nvenc-probe --features nvenc --bin kiln-nvenc-probe --target-dir target/nvenc-probe -- \
  -L "$PWD/$STUBS/lib" -C link-arg=-Wl,--unresolved-symbols=ignore-all -C link-arg=-Wl,-z,lazy \
  -C link-arg=-Wl,--no-as-needed -C link-arg=-lnvidia-encode -C link-arg=-lnvcuvid -C link-arg=-lcuda
cp target/nvenc-probe/release/kiln-nvenc-probe target/release/kiln-nvenc-probe
strip target/release/kiln-nvenc-probe
echo "built target/release/kiln-nvenc-probe (needs the NVIDIA driver at run time)"
