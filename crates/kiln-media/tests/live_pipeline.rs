//! Real GStreamer pipelines (videotestsrc/audiotestsrc → x264/AAC → cmafmux manual-split → appsink): the parts
//! kiln cuts meet the LL-HLS rules and line up across renditions. Small sizes keep this cheap on a 2-core host.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln_llhls::cmaf;
use kiln_media::{pipeline::channel_sink, LivePipeline, MediaEvent, PartIn};
use kiln_model::{
    AudioRendition, EncoderSettings, Fraction, StreamPlan, Timing, VideoRendition, X264Speed,
};

fn plan() -> StreamPlan {
    let v = |name: &str, w, h, kbps| VideoRendition {
        name: name.into(),
        width: w,
        height: h,
        fps: Fraction::new(30, 1),
        bitrate_kbps: kbps,
        codec: Default::default(),
    };
    StreamPlan::new(
        "media-test",
        "test:pattern=smpte",
        vec![v("a", 320, 180, 300), v("b", 160, 90, 120)],
        Some(AudioRendition::default()),
        Timing::default(),
        EncoderSettings {
            x264_speed: X264Speed::Ultrafast,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn parts_are_legal_and_aligned() {
    if let Err(e) = kiln_media::init() {
        eprintln!("skipping: {e}");
        return;
    }
    let plan = plan();
    let (sink, rx) = channel_sink();
    let p = LivePipeline::build(&plan, sink).expect("pipeline builds");
    p.start().expect("pipeline starts");

    let mut inits: BTreeMap<usize, (bytes::Bytes, Option<String>)> = BTreeMap::new();
    let mut parts: BTreeMap<usize, Vec<PartIn>> = BTreeMap::new();
    // Run until every rendition has closed 3 segments (4 segment starts), or fail after 40 s.
    let deadline = Instant::now() + Duration::from_secs(40);
    let seg_starts = |v: &Vec<PartIn>| v.iter().filter(|p| p.starts_segment).count();
    while (0..3).any(|r| parts.get(&r).map_or(0, seg_starts) < 4) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(MediaEvent::Init {
                rendition,
                bytes,
                codec,
            }) => {
                inits.insert(rendition, (bytes, codec));
            }
            Ok(MediaEvent::Part {
                rendition, part, ..
            }) => parts.entry(rendition).or_default().push(part),
            Ok(MediaEvent::Error { message, debug, .. }) => {
                panic!("pipeline error: {message} {debug:?}")
            }
            Ok(_) => {}
            Err(e) => panic!(
                "timed out waiting for parts: {e}; have {:?}",
                parts.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
            ),
        }
    }
    assert!(p.send_eos());
    p.stop();

    // init segments: ftyp + moov with mvex, no mdat, zero samples; codec strings
    for r in 0..3 {
        let (bytes, codec) = &inits[&r];
        let info = cmaf::parse_init(bytes).unwrap();
        assert_eq!(cmaf::top_level_kinds(bytes).unwrap(), ["ftyp", "moov"]);
        assert!(info.has_mvex && !info.has_mdat);
        assert!(info.tracks.iter().all(|t| t.stbl_sample_count == 0));
        let codec = codec.as_deref().unwrap();
        if r < 2 {
            // avc1.PPCCLL: profile, constraint flags, level as hex
            assert!(codec.len() == 11 && codec.starts_with("avc1."), "{codec}");
            assert!(u32::from_str_radix(&codec[5..], 16).is_ok(), "{codec}");
        } else {
            assert_eq!(codec, "mp4a.40.2");
        }
    }

    let pt_ns = plan.timing.part_target_ns();
    let mut video_segment_starts: Vec<Vec<u64>> = Vec::new();
    for (r, list) in &parts {
        let init = cmaf::parse_init(&inits[r].0).unwrap();
        // drop anything before the first segment start
        let first = list.iter().position(|p| p.starts_segment).unwrap();
        let list = &list[first..];
        let mut prev_end: Option<u64> = None;
        let mut starts = Vec::new();
        for (i, p) in list.iter().enumerate() {
            let f = cmaf::parse_fragment(&p.bytes, &init).unwrap();
            // tfdt continuity across parts
            if let Some(end) = prev_end {
                assert_eq!(f.base_decode_time, end, "rendition {r} part {i}: tfdt gap");
            }
            prev_end = Some(f.base_decode_time + f.duration);
            // INDEPENDENT exactly when the first sample is a sync sample
            assert_eq!(p.independent, f.starts_with_sync);
            if *r < 2 {
                assert_eq!(
                    p.independent, p.starts_segment,
                    "video: keyframes only at segment starts"
                );
            } else {
                assert!(p.independent, "every AAC frame is a sync sample");
            }
            assert!(
                p.duration_ns <= pt_ns,
                "rendition {r} part {i}: {} > PART-TARGET",
                p.duration_ns
            );
            let last_of_segment = list.get(i + 1).is_none_or(|n| n.starts_segment);
            if !last_of_segment && !p.independent {
                assert!(
                    p.duration_ns * 100 >= pt_ns * 85,
                    "rendition {r} part {i}: {} too short",
                    p.duration_ns
                );
            }
            if p.starts_segment {
                starts.push(p.start_ns);
            }
        }
        if *r < 2 {
            // 30 fps: every complete segment is six parts of 10 frames (333.3 ms)
            let segs: Vec<Vec<&PartIn>> = list.iter().fold(Vec::new(), |mut acc, p| {
                if p.starts_segment {
                    acc.push(Vec::new());
                }
                acc.last_mut().unwrap().push(p);
                acc
            });
            for s in &segs[1..segs.len() - 1] {
                let d: Vec<u64> = s.iter().map(|p| p.duration_ns / 1_000_000).collect();
                assert_eq!(d, [333; 6], "rendition {r} segment parts");
            }
            video_segment_starts.push(starts);
        } else {
            // audio segments start within one AAC frame after each 2 s grid point
            for s in &starts[1..] {
                let off = s % 2_000_000_000;
                assert!(
                    !(21_400_000..=1_999_000_000).contains(&off),
                    "audio segment start {s}"
                );
            }
        }
    }
    // segment N starts at the same running time in every video rendition
    let n = video_segment_starts.iter().map(Vec::len).min().unwrap();
    assert!(n >= 3);
    assert_eq!(video_segment_starts[0][..n], video_segment_starts[1][..n]);
    for w in video_segment_starts[0].windows(2) {
        assert!(
            (w[1] - w[0]).abs_diff(2_000_000_000) < 34_000_000,
            "segment length {}",
            w[1] - w[0]
        );
    }
}

/// A 2.5 s H.264 + AAC clip (320x180, 30 fps, a GOP of 0.5 s) in `dir`.
fn clip(dir: &std::path::Path) -> std::path::PathBuf {
    let clip = dir.join("clip.mp4");
    let st = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x180:rate=30",
            "-f",
            "lavfi",
        ])
        .args([
            "-i",
            "sine=frequency=300:sample_rate=48000",
            "-t",
            "2.5",
            "-c:v",
            "libx264",
            "-g",
            "15",
        ])
        .args(["-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"])
        .arg(&clip)
        .status()
        .expect("ffmpeg runs");
    assert!(st.success());
    clip
}

/// A `file://` source: demuxed, decoded by the decoder the selection table picks (the CPU here), paced at real
/// time, looped without a break in the timeline. A 2.5 s clip runs for three loops.
#[test]
fn file_source_loops_on_one_paced_timeline() {
    kiln_media::init().expect("GStreamer");
    let dir = std::env::temp_dir().join(format!("kiln-media-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clip = clip(&dir);
    let mut plan = plan();
    plan.source = kiln_model::Source::parse("file:///clip.mp4").unwrap();
    let registry = std::sync::Arc::new(kiln_media::select::Registry::probe().unwrap());
    let mut opts = kiln_media::BuildOptions::cpu(registry).unwrap();
    opts.file = Some(clip);
    let (sink, rx) = channel_sink();
    let p = LivePipeline::build_with(&plan, &opts, sink).expect("pipeline builds");
    let t0 = Instant::now();
    p.start().expect("pipeline starts");
    let mut video: Vec<PartIn> = Vec::new();
    let mut audio = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    let media = |v: &Vec<PartIn>| v.iter().map(|p| p.duration_ns).sum::<u64>();
    while media(&video) < 8_000_000_000 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(MediaEvent::Part {
                rendition: 0, part, ..
            }) => video.push(part),
            Ok(MediaEvent::Part { rendition: 2, .. }) => audio += 1,
            Ok(MediaEvent::Error {
                element, message, ..
            }) => panic!("{element:?}: {message}"),
            Ok(_) => {}
            Err(e) => panic!("no 8 s of media in 30 s ({} parts): {e}", video.len()),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let produced = media(&video) as f64 / 1e9;
    // paced: never faster than real time (a burst would reach 8 s in well under a second)
    assert!(
        produced <= wall + 0.5,
        "{produced:.2} s of media in {wall:.2} s: not paced"
    );
    for w in video.windows(2) {
        let end = w[0].start_ns + w[0].duration_ns;
        assert!(
            w[1].start_ns.abs_diff(end) < 2_000_000,
            "timeline break: part ends {end}, next starts {}",
            w[1].start_ns
        );
    }
    assert!(video.iter().filter(|p| p.starts_segment).count() >= 4);
    assert!(audio > 10, "audio parts: {audio}");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A lost source gives way to the slate and a new source takes over from the slate, on one timeline: every
/// rendition's parts follow each other without a gap or an overlap across both switches, the media stays paced at
/// real time, and the pipeline says which input is on air.
#[test]
fn the_slate_stands_in_for_a_lost_source_on_one_timeline() {
    kiln_media::init().expect("GStreamer");
    let dir = std::env::temp_dir().join(format!("kiln-media-slate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut plan = plan();
    plan.source = kiln_model::Source::parse("file:///clip.mp4").unwrap();
    let registry = std::sync::Arc::new(kiln_media::select::Registry::probe().unwrap());
    let mut opts = kiln_media::BuildOptions::cpu(registry).unwrap();
    opts.file = Some(clip(&dir));
    let (sink, rx) = channel_sink();
    let p = LivePipeline::build_with(&plan, &opts, sink).expect("pipeline builds");
    let t0 = Instant::now();
    p.start().expect("pipeline starts");
    assert_eq!(p.input(), Some(kiln_media::InputKind::Source));
    let mut parts: BTreeMap<usize, Vec<PartIn>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    let video_s = |parts: &BTreeMap<usize, Vec<PartIn>>| {
        parts
            .get(&0)
            .map_or(0, |v| v.iter().map(|p| p.duration_ns).sum::<u64>()) as f64
            / 1e9
    };
    let mut switched = (false, false);
    while video_s(&parts) < 9.0 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(MediaEvent::Part {
                rendition, part, ..
            }) => parts.entry(rendition).or_default().push(part),
            Ok(MediaEvent::Error {
                element, message, ..
            }) => panic!("{element:?}: {message}"),
            Ok(_) => {}
            Err(e) => panic!("no 9 s of media in 40 s: {e}"),
        }
        if !switched.0 && video_s(&parts) >= 3.0 {
            p.switch_to_slate().expect("the slate starts");
            switched.0 = true;
        }
        if !switched.1 && video_s(&parts) >= 6.0 {
            assert_eq!(p.input(), Some(kiln_media::InputKind::Slate));
            p.switch_to_source(&opts).expect("a new source starts");
            switched.1 = true;
        }
    }
    assert_eq!(p.input(), Some(kiln_media::InputKind::Source));
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        video_s(&parts) <= wall + 0.5,
        "{:.2} s of media in {wall:.2} s: not paced",
        video_s(&parts)
    );
    for (r, v) in &parts {
        for w in v.windows(2) {
            let end = w[0].start_ns + w[0].duration_ns;
            assert!(
                w[1].start_ns.abs_diff(end) < 2_000_000,
                "rendition {r}: timeline break: part ends {end}, next starts {}",
                w[1].start_ns
            );
        }
        assert!(v.len() > 10, "rendition {r}: {} parts", v.len());
    }
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}
