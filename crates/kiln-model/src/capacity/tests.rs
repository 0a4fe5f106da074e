use super::*;
use crate::stream::{AudioRendition, EncoderSettings, Fraction, Timing, VideoRendition};
use proptest::prelude::*;

#[test]
fn dimensions_are_named_like_the_fields_and_split_between_host_and_gpu() {
    let r = Resources {
        cpu_millicores: 1,
        memory_mib: 2,
        nvenc_fps: 3,
        nvdec_fps: 4,
        encoder_sessions: 5,
        vram_mib: 6,
    };
    let json = serde_json::to_value(r).unwrap();
    for (i, d) in Dimension::ALL.into_iter().enumerate() {
        assert_eq!(json[d.as_str()], serde_json::json!(i + 1), "{d}");
        assert_eq!(Dimension::parse(d.as_str()), Some(d));
        assert_eq!(
            serde_json::to_value(d).unwrap(),
            serde_json::json!(d.as_str())
        );
        let mut z = Resources::default();
        z.set(d, 9);
        assert_eq!(z.get(d), 9);
        assert_eq!(z.host_part().get(d) > 0, d.is_host(), "{d}");
        assert_eq!(z.gpu_part().get(d) > 0, Dimension::GPU.contains(&d), "{d}");
    }
    assert_eq!(Dimension::parse("cpu"), None);
    assert_eq!(r.host_part().plus(&r.gpu_part()), r);
    assert_eq!(
        r.describe(),
        "cpu_millicores=1 memory_mib=2 nvenc_fps=3 nvdec_fps=4 encoder_sessions=5 vram_mib=6"
    );
    assert_eq!(Resources::default().describe(), "");
}

fn model() -> CpuCostModel {
    CpuCostModel {
        stream_base_millicores: 40,
        source_millicores_per_mpx: 3.0,
        x264_millicores_per_mpx: [4.0, 6.0, 10.0, 14.0, 20.0, 28.0],
        audio_millicores: 15,
        stream_base_memory_mib: 20,
        memory_mib_per_mpx: 2.0,
        serving: None,
    }
}

fn plan(renditions: &[(u32, u32, u32)], audio: bool) -> StreamPlan {
    let video = renditions
        .iter()
        .enumerate()
        .map(|(i, &(w, h, fps))| VideoRendition {
            name: format!("v{i}"),
            width: w,
            height: h,
            fps: Fraction::new(fps, 1),
            bitrate_kbps: 500,
            codec: Default::default(),
        })
        .collect();
    StreamPlan::new(
        "p",
        "test:",
        video,
        audio.then(AudioRendition::default),
        Timing::default(),
        EncoderSettings::default(),
    )
    .unwrap()
}

#[test]
fn demo_ladder_costs_about_what_was_measured() {
    // 720p30 + 360p30 veryfast + AAC measured 520 millicores here (release build)
    let d = model().demand(&plan(&[(1280, 720, 30), (640, 360, 30)], true));
    assert!((450..=560).contains(&d.cpu_millicores), "{d:?}");
    assert_eq!(d.nvenc_fps, 0);
}

#[test]
fn fit_and_headroom() {
    let cap = Resources {
        cpu_millicores: 1000,
        memory_mib: 100,
        ..Default::default()
    };
    let d = Resources {
        cpu_millicores: 300,
        memory_mib: 10,
        ..Default::default()
    };
    assert_eq!(cap.how_many(&d), 3);
    assert_eq!(cap.short_dimension(&d), None);
    let big = Resources {
        cpu_millicores: 300,
        memory_mib: 200,
        ..Default::default()
    };
    assert_eq!(cap.short_dimension(&big), Some(Dimension::MemoryMib));
    assert_eq!(cap.minus(&big).memory_mib, 0);
}

proptest! {
    /// Demand grows with resolution and frame rate, adds across renditions, and is never negative.
    #[test]
    fn demand_is_monotone_and_additive(w in 8u32..960, h in 8u32..540, fi in 0usize..3, extra in 8u32..480) {
        const RATES: [u32; 4] = [24, 25, 30, 60];
        let (w, h, extra, fps) = (w * 2, h * 2, extra * 2, RATES[fi]);
        let m = model();
        let a = m.demand(&plan(&[(w, h, fps)], false));
        let bigger = m.demand(&plan(&[(w + 2, h + 2, fps)], false));
        let faster = m.demand(&plan(&[(w, h, RATES[fi + 1])], false));
        prop_assert!(bigger.cpu_millicores >= a.cpu_millicores && faster.cpu_millicores >= a.cpu_millicores);
        prop_assert!(bigger.memory_mib >= a.memory_mib);
        // a second (smaller) rendition costs its own encode, never less than nothing
        let two = m.demand(&plan(&[(w, h, fps), (extra.min(w), extra.min(h), fps)], false));
        prop_assert!(two.cpu_millicores >= a.cpu_millicores);
        let with_audio = m.demand(&plan(&[(w, h, fps)], true));
        prop_assert!(with_audio.cpu_millicores >= a.cpu_millicores + m.audio_millicores - 1);
    }
}

fn l4() -> GpuProfile {
    GpuProfile {
        name: "l4".into(),
        model: "NVIDIA L4".into(),
        architecture: "Ada".into(),
        vram_mib: 23034,
        nvenc_engines: 2,
        nvdec_engines: 4,
        encode_codecs: vec!["h264".into(), "hevc".into(), "av1".into()],
        decode_codecs: vec!["h264".into()],
        nvenc_h264_fps_per_engine: [700, 600, 500, 400, 300, 250, 200],
        nvdec_h264_fps_per_engine: 700,
        session_scope: SessionScope::None,
        max_sessions: None,
        sources: GPU_PROFILE_FIGURES
            .iter()
            .map(|f| (f.to_string(), "test".to_string()))
            .collect(),
    }
}

#[test]
fn gpu_profiles_are_checked_and_give_capacity() {
    let p = l4();
    assert!(p.problems().is_empty(), "{:?}", p.problems());
    let c = p.capacity(4);
    assert_eq!((c.nvenc_fps, c.nvdec_fps, c.vram_mib), (800, 2800, 23034));
    assert_eq!(c.encoder_sessions, UNCAPPED_SESSIONS);
    let mut no_enc = p.clone();
    no_enc.nvenc_engines = 0;
    assert!(!no_enc.problems().is_empty(), "codecs listed without NVENC");
    no_enc.encode_codecs.clear();
    no_enc.nvenc_h264_fps_per_engine = [0; 7];
    assert!(no_enc.problems().is_empty());
    assert_eq!(no_enc.capacity(4).encoder_sessions, 0);
    let mut unsourced = p.clone();
    unsourced.sources.remove("vram_mib");
    assert!(unsourced.problems().iter().any(|e| e.contains("vram_mib")));
    let mut geforce = p;
    geforce.session_scope = SessionScope::Host;
    assert!(!geforce.problems().is_empty());
    geforce.max_sessions = Some(8);
    assert_eq!(geforce.capacity(1).encoder_sessions, 8);
}

#[test]
fn gpu_demand_counts_sessions_and_1080p_equivalents() {
    let d = GpuCostModel::default().demand(&plan(&[(1920, 1080, 30), (1280, 720, 30)], true), true);
    assert_eq!(d.encoder_sessions, 2);
    assert_eq!(d.nvenc_fps, 44); // 30 + 13.33
    assert!(d.nvdec_fps > 0 && d.vram_mib == 2 * 200 + 150);
    let cpu_decode = GpuCostModel::default().demand(&plan(&[(1920, 1080, 30)], true), false);
    assert_eq!(cpu_decode.nvdec_fps, 0);
}

#[test]
fn a_backup_input_books_one_more_decode_on_the_cpu() {
    let m = model();
    let p = plan(&[(1280, 720, 30), (640, 360, 30)], true);
    assert_eq!(m.backup_demand(&p), Resources::default());
    let mut with = p.clone();
    with.backup = Some(crate::stream::Backup {
        source: crate::Source::parse("srt://203.0.113.5:9000").unwrap(),
        failback_s: 10,
    });
    let b = m.backup_demand(&with);
    let mpx = 1280.0 * 720.0 * 30.0 / 1e6;
    assert_eq!(
        b.cpu_millicores,
        (m.source_millicores_per_mpx * mpx
            + m.audio_millicores as f64
            + m.stream_base_millicores as f64 / 4.0)
            .ceil() as u64
    );
    assert!(b.cpu_millicores > 0 && b.memory_mib > 0);
    assert_eq!(b.nvenc_fps + b.nvdec_fps + b.vram_mib, 0);
}

#[test]
fn the_calibration_ramp_grows_by_one_then_by_an_eighth_up_to_its_cap() {
    let mut steps = vec![0usize];
    while *steps.last().unwrap() < RAMP_MAX_STREAMS {
        steps.push(ramp_next(*steps.last().unwrap()));
    }
    assert_eq!(&steps[..12], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert_eq!(ramp_next(16), 18);
    assert_eq!(ramp_next(100), 112);
    assert_eq!(ramp_next(RAMP_MAX_STREAMS), RAMP_MAX_STREAMS);
    for w in steps.windows(2) {
        // always grows, and never by more than an eighth past 8: the count found is within 12.5 % of the true one
        assert!(w[1] > w[0], "{steps:?}");
        assert!(
            w[0] < 8 || (w[1] - w[0]) * 8 <= w[0],
            "{} -> {}",
            w[0],
            w[1]
        );
    }
    // a host that sustains hundreds is measured in tens of steps (13 s each by default)
    assert!(
        steps.len() < 60,
        "{} steps to {RAMP_MAX_STREAMS}",
        steps.len()
    );
}
