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
export RUSTFLAGS="${RUSTFLAGS:-} -L $PWD/$STUBS/lib -C link-arg=-Wl,--unresolved-symbols=ignore-all -C link-arg=-Wl,-z,lazy"
cargo build --release -p kiln-nvenc-probe --features nvenc --target-dir target/nvenc-probe
cp target/nvenc-probe/release/kiln-nvenc-probe target/release/kiln-nvenc-probe
strip target/release/kiln-nvenc-probe
echo "built target/release/kiln-nvenc-probe (needs the NVIDIA driver at run time)"
