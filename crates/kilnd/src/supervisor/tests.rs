//! Placement against a recorded registry and a synthetic GPU (no pipeline is started): the policy matrix,
//! spill to the CPU, GPU-dimension refusals, NVDEC booking for encoded sources, release.

use super::*;
use crate::gpus::GpuSlot;

fn l4(index: u32) -> GpuSlot {
    GpuSlot {
        index,
        name: "NVIDIA L4".into(),
        uuid: String::new(),
        profile: Some("l4".into()),
        nvenc: true,
        nvdec: true,
        capacity: Resources {
            nvenc_fps: 100,
            nvdec_fps: 1000,
            encoder_sessions: 1024,
            vram_mib: 20_000,
            ..Default::default()
        },
    }
}

fn supervisor(slots: Vec<GpuSlot>) -> Supervisor {
    let registry = Registry::from_names(
        (1, 22),
        &[
            "x264enc",
            "videoconvertscale",
            "nvh264enc",
            "nvh264dec",
            "avdec_h264",
        ],
    );
    let config = Config {
        gpus: Some(slots.clone()),
        // a fixed host, whatever machine runs the test
        capacity: Resources {
            cpu_millicores: 8000,
            memory_mib: 16_000,
            ..Default::default()
        },
        ..Default::default()
    };
    Supervisor::new(
        Arc::new(config),
        Origin::new(),
        Arc::new(crate::metrics::Metrics::new()),
        Arc::new(registry),
        GpuPool::new(slots),
    )
}

fn plan(sup: &Supervisor, source: &str, policy: Policy) -> StreamPlan {
    // 1080p30 + 720p30: 44 1080p-equivalent fps of NVENC
    let req: StreamRequest = serde_json::from_str(&format!(
        r#"{{"source": "{source}", "policy": "{}",
            "renditions": [{{"name": "a", "width": 1920, "height": 1080, "fps": 30, "bitrate_kbps": 5000}},
                           {{"name": "b", "width": 1280, "height": 720, "fps": 30, "bitrate_kbps": 2500}}]}}"#,
        policy.as_str()
    ))
    .unwrap();
    sup.config.presets.resolve("p", &req).unwrap()
}

#[test]
fn policies_place_on_nvenc_spill_to_the_cpu_and_refuse_by_gpu_dimension() {
    let sup = supervisor(vec![l4(0)]);
    let gpu = plan(&sup, "test:", Policy::PreferGpu);
    let a = sup.place(&gpu, false).unwrap();
    assert_eq!(a.backend, Backend::Nvenc { gpu: 0 });
    assert_eq!(
        a.gpu.map(|(g, d)| (g, d.nvenc_fps, d.encoder_sessions)),
        Some((0, 44, 2))
    );
    assert!(
        a.host.cpu_millicores > 0 && a.host.cpu_millicores < 200,
        "{a:?}"
    );
    let b = sup.place(&gpu, false).unwrap();
    assert_eq!(b.backend, Backend::Nvenc { gpu: 0 });
    assert_eq!(sup.gpus.allocated(0).nvenc_fps, 88);
    // 12 fps of NVENC left: prefer-gpu spills to x264, gpu-only is refused on the GPU dimension
    let c = sup.place(&gpu, false).unwrap();
    assert_eq!((c.backend, c.gpu), (Backend::Cpu, None));
    sup.release_placement(&c);
    match sup.place(&plan(&sup, "test:", Policy::GpuOnly), false) {
        Err(SupervisorError::Capacity {
            dimension: Dimension::NvencFps,
            requested: 44,
            free: 12,
        }) => {}
        other => panic!("{other:?}"),
    }
    // cpu-only never touches the GPU; a rebuild after an encoder failure is CPU whatever the policy
    let cpu = sup
        .place(&plan(&sup, "test:", Policy::CpuOnly), false)
        .unwrap();
    assert_eq!((cpu.backend, cpu.gpu), (Backend::Cpu, None));
    sup.release_placement(&cpu);
    let rebuilt = sup.place(&gpu, true).unwrap();
    assert_eq!(rebuilt.backend, Backend::Cpu);
    sup.release_placement(&rebuilt);
    // releasing restores exactly
    sup.release_placement(&a);
    sup.release_placement(&b);
    assert_eq!(sup.gpus.allocated(0), Resources::default());
}

#[test]
fn encoded_sources_book_nvdec_and_audio_only_stays_on_the_cpu() {
    let sup = supervisor(vec![l4(0)]);
    let p = sup
        .place(&plan(&sup, "file:///a.mp4", Policy::CpuOnly), false)
        .unwrap();
    assert_eq!((p.backend, p.decode_gpu), (Backend::Cpu, Some(0)));
    let (g, d) = p.gpu.unwrap();
    assert_eq!(
        (g, d.nvdec_fps, d.nvenc_fps, d.encoder_sessions),
        (0, 30, 0, 0)
    );
    let p = sup
        .place(&plan(&sup, "file:///a.mp4", Policy::PreferGpu), false)
        .unwrap();
    assert_eq!(
        (p.backend, p.decode_gpu),
        (Backend::Nvenc { gpu: 0 }, Some(0))
    );
    let radio = sup
        .config
        .presets
        .resolve(
            "r",
            &serde_json::from_str(
                r#"{"source": "test:", "preset": "live-audio-only", "policy": "gpu-only"}"#,
            )
            .unwrap(),
        )
        .unwrap();
    assert_eq!(sup.place(&radio, false).unwrap().backend, Backend::Cpu);
    // no GPU at all: gpu-only is a policy error (422), not a capacity one
    let bare = supervisor(vec![]);
    assert!(matches!(
        bare.place(&plan(&bare, "test:", Policy::GpuOnly), false),
        Err(SupervisorError::Policy(_))
    ));
}

#[test]
fn the_fence_moves_only_on_raise_never_back_and_never_past_a_day_ahead() {
    let sup = supervisor(Vec::new());
    assert_eq!(sup.fence_epoch(), 0);
    // checking moves nothing, whatever the value
    assert_eq!(sup.check_fence(7), Ok(()));
    assert_eq!(sup.fence_epoch(), 0);
    let max = max_epoch(unix_ms());
    assert!(matches!(
        sup.check_fence(u64::MAX),
        Err(FenceError::Future {
            epoch: u64::MAX,
            ..
        })
    ));
    assert!(matches!(
        sup.raise_fence(u64::MAX),
        Err(FenceError::Future { .. })
    ));
    assert!(matches!(
        sup.raise_fence(max + 1000),
        Err(FenceError::Future { .. })
    ));
    assert_eq!(
        sup.fence_epoch(),
        0,
        "a refused epoch leaves the fence alone"
    );
    // a Redis lease counter, then an in-memory scheduler's start time in unix ms: both are real epochs
    assert_eq!(sup.raise_fence(5), Ok(()));
    assert_eq!(
        sup.check_fence(4),
        Err(FenceError::Stale { epoch: 4, fence: 5 })
    );
    assert_eq!(
        sup.raise_fence(4),
        Err(FenceError::Stale { epoch: 4, fence: 5 })
    );
    assert_eq!(sup.fence_epoch(), 5, "never lowered");
    let now = unix_ms();
    assert_eq!(sup.raise_fence(now), Ok(()));
    assert_eq!(sup.fence_epoch(), now);
    assert_eq!(
        sup.check_fence(now),
        Ok(()),
        "the current epoch keeps working"
    );
}

#[test]
fn serving_keeps_new_streams_out_but_not_a_running_streams_fallback() {
    let sup = supervisor(vec![]);
    let p = plan(&sup, "test:", Policy::CpuOnly);
    let demand = sup.place(&p, false).unwrap();
    sup.release_placement(&demand);
    let need = demand.host.cpu_millicores;
    // serving as busy as leaves 100 mc less than one stream needs: 8000 - need + 100 above the 100 mc floor
    let busy_s = (8000 - need + 200) as f64 / 1000.0;
    for t in 0..=6 {
        let t = f64::from(t);
        sup.sample_load(t, t * busy_s, (t * 1000.0) as u64, 0);
    }
    let serving = sup.serving();
    assert_eq!(
        serving.reserved_millicores,
        8000 - need + 100,
        "{serving:?}"
    );
    assert_eq!(sup.free().cpu_millicores, need - 100);
    match sup.place(&p, false) {
        Err(SupervisorError::Capacity { dimension, .. }) => {
            assert_eq!(dimension, kiln_model::capacity::Dimension::CpuMillicores)
        }
        other => panic!("a new stream must not fit beside the serving reservation: {other:?}"),
    }
    // an encoder fallback books again what the running stream gave back
    let rebuilt = sup.place(&p, true).unwrap();
    assert_eq!(rebuilt.host.cpu_millicores, need);
}

/// A teardown that outran its limit keeps its NVENC booking until its thread returns: admission must not hand out
/// a session a stuck pipeline may still hold. (The stuck thread is a blocking task waiting on a channel.)
#[tokio::test]
async fn a_stuck_teardown_keeps_its_bookings_until_its_thread_returns() {
    let sup = supervisor(vec![l4(0)]);
    let gpu = plan(&sup, "test:", Policy::PreferGpu);
    let a = sup.place(&gpu, false).unwrap();
    assert_eq!(sup.gpus.allocated(0).nvenc_fps, 44);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let stuck = tokio::task::spawn_blocking(move || {
        let _ = rx.recv();
    });
    sup.hold_until_torn_down(stuck, a);
    assert_eq!(sup.reap_teardowns(), 1);
    assert_eq!(sup.gpus.allocated(0).nvenc_fps, 44, "released while stuck");
    tx.send(()).unwrap();
    let reaped = async {
        while sup.reap_teardowns() > 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), reaped)
        .await
        .expect("the returned teardown is reaped");
    assert_eq!(sup.gpus.allocated(0), Resources::default());
}
