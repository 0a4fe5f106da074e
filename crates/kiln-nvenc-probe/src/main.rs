//! kiln-nvenc-probe: opens an NVENC session on every CUDA device and prints what the driver says, as one JSON
//! document on stdout. kilnd runs it as a subprocess where installed (a crash here cannot take the daemon down)
//! and otherwise relies on the GStreamer registry.
//!
//! Output: `{"probe": "nvenc", "devices": [{"index": 0, "name": …, "nvenc": true, "codecs": ["h264", "hevc"],
//! "presets_h264": 7}, …]}`; a device without NVENC (A100/H100/H200) reports `"nvenc": false` with the
//! session-open error (`"error_code"`: `NVENCSTATUS` number, e.g. 2 = unsupported device, 10 = out of
//! memory/session cap, and its name). Built without the `nvenc` feature it prints `{"probe": "unavailable", …}`
//! and exits 3.

#[cfg(feature = "nvenc")]
fn main() {
    use std::sync::Arc;

    use nvidia_video_codec_sdk::sys::nvEncodeAPI::{
        NV_ENC_CODEC_AV1_GUID, NV_ENC_CODEC_H264_GUID, NV_ENC_CODEC_HEVC_GUID,
    };
    use nvidia_video_codec_sdk::Encoder;
    use serde_json::json;

    let count = match cudarc::driver::CudaContext::device_count() {
        Ok(n) => n,
        Err(e) => {
            println!(
                "{}",
                json!({"probe": "nvenc", "error": format!("CUDA: {e}"), "devices": []})
            );
            std::process::exit(2);
        }
    };
    let mut devices = Vec::new();
    for index in 0..count.max(0) as usize {
        let ctx = match cudarc::driver::CudaContext::new(index) {
            Ok(c) => c,
            Err(e) => {
                devices.push(
                    json!({"index": index, "nvenc": false, "error": format!("CUDA context: {e}")}),
                );
                continue;
            }
        };
        let name = ctx.name().unwrap_or_default();
        match Encoder::initialize_with_cuda(Arc::clone(&ctx)) {
            Ok(enc) => {
                let guids = enc.get_encode_guids().unwrap_or_default();
                let mut codecs = Vec::new();
                for (g, n) in [
                    (NV_ENC_CODEC_H264_GUID, "h264"),
                    (NV_ENC_CODEC_HEVC_GUID, "hevc"),
                    (NV_ENC_CODEC_AV1_GUID, "av1"),
                ] {
                    if guids.contains(&g) {
                        codecs.push(n);
                    }
                }
                let presets = enc
                    .get_preset_guids(NV_ENC_CODEC_H264_GUID)
                    .map(|p| p.len())
                    .ok();
                devices.push(
                    json!({"index": index, "name": name, "nvenc": true, "codecs": codecs,
                                    "presets_h264": presets}),
                );
            }
            Err(e) => {
                let kind = e.kind();
                devices.push(json!({"index": index, "name": name, "nvenc": false,
                                    "error_code": kind as u32, "error": format!("{kind:?}: {e}")}));
            }
        }
    }
    println!("{}", json!({"probe": "nvenc", "devices": devices}));
}

#[cfg(not(feature = "nvenc"))]
fn main() {
    println!(
        "{}",
        serde_json::json!({"probe": "unavailable",
            "reason": "built without the `nvenc` feature (it links the NVIDIA driver libraries)"})
    );
    std::process::exit(3);
}
