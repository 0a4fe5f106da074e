use super::*;

fn v(name: &str, w: u32, h: u32) -> VideoRendition {
    VideoRendition {
        name: name.into(),
        width: w,
        height: h,
        fps: Fraction::new(30, 1),
        bitrate_kbps: 1000,
        codec: VideoCodec::H264,
    }
}

#[test]
fn default_timing_gives_ten_frame_parts() {
    let t = Timing::default();
    assert_eq!(t.video_frames_per_part(Fraction::new(30, 1)), 10);
    assert_eq!(t.video_frames_per_part(Fraction::new(30000, 1001)), 10);
    assert_eq!(t.video_frames_per_part(Fraction::new(60, 1)), 20);
    assert_eq!(t.video_frames_per_part(Fraction::new(25, 1)), 8);
    assert_eq!(t.video_frames_per_part(Fraction::new(24, 1)), 8);
    assert_eq!(t.audio_frames_per_part(48_000), 15);
    assert_eq!(t.target_duration_s(), 2);
    assert!(t.part_hold_back_s() >= 3.0 * 0.334 - 1e-9);
    // every part fits under PART-TARGET with no rounding
    assert!(t.video_part_ns(Fraction::new(30000, 1001)) <= t.part_target_ns());
    assert!(t.audio_part_ns(48_000) <= t.part_target_ns());
}

#[test]
fn fractions_parse_from_numbers_and_strings() {
    let f: Fraction = serde_json::from_str("25").unwrap();
    assert_eq!(f, Fraction::new(25, 1));
    let f: Fraction = serde_json::from_str("\"30000/1001\"").unwrap();
    assert_eq!(f, Fraction::new(30000, 1001));
    assert!(serde_json::from_str::<Fraction>("\"x/1\"").is_err());
}

#[test]
fn plan_validation_names_the_problem() {
    let t = Timing::default();
    let ok = StreamPlan::new(
        "a",
        "test:",
        vec![v("hi", 640, 360)],
        None,
        t,
        EncoderSettings::default(),
    )
    .unwrap();
    assert_eq!(ok.source_size(), (640, 360));
    assert!(matches!(
        StreamPlan::new(
            "../x",
            "test:",
            vec![v("hi", 640, 360)],
            None,
            t,
            EncoderSettings::default()
        ),
        Err(PlanError::BadId(_))
    ));
    assert!(matches!(
        StreamPlan::new("a", "test:", vec![], None, t, EncoderSettings::default()),
        Err(PlanError::NoVideo)
    ));
    let audio_only = StreamPlan::new(
        "a",
        "test:",
        vec![],
        Some(AudioRendition::default()),
        t,
        EncoderSettings::default(),
    )
    .expect("audio-only streams are allowed");
    assert_eq!(audio_only.source_size(), (0, 0));
    assert!(matches!(
        StreamPlan::new(
            "a",
            "test:",
            vec![v("x", 641, 360)],
            None,
            t,
            EncoderSettings::default()
        ),
        Err(PlanError::BadRendition { .. })
    ));
    assert!(matches!(
        StreamPlan::new(
            "a",
            "test:",
            vec![v("x", 100_000, 360)],
            None,
            t,
            EncoderSettings::default()
        ),
        Err(PlanError::BadRendition { .. })
    ));
    assert!(matches!(
        StreamPlan::new(
            "a",
            "test:",
            vec![v("x", 64, 64), v("x", 32, 32)],
            None,
            t,
            EncoderSettings::default()
        ),
        Err(PlanError::DuplicateRendition(_))
    ));
    assert!(matches!(
        StreamPlan::new(
            "a",
            "test:",
            vec![v("A/B", 64, 64)],
            None,
            t,
            EncoderSettings::default()
        ),
        Err(PlanError::BadRenditionName(_))
    ));
    let bad_t = Timing {
        segment_ms: 2000,
        part_target_ms: 50,
    };
    assert!(matches!(
        StreamPlan::new(
            "a",
            "test:",
            vec![v("x", 64, 64)],
            None,
            bad_t,
            EncoderSettings::default()
        ),
        Err(PlanError::BadTiming(_))
    ));
    // 7 fps with a 334 ms part target: two frames = 286 ms ≥ 85 % (283.9) → fine; 5 fps: one frame = 200 ms → refused
    let mut slow = v("x", 64, 64);
    slow.fps = Fraction::new(5, 1);
    assert!(matches!(
        StreamPlan::new(
            "a",
            "test:",
            vec![slow],
            None,
            t,
            EncoderSettings::default()
        ),
        Err(PlanError::BadRendition { .. })
    ));
}

#[test]
fn source_loss_defaults_and_limits() {
    let d: SourceLoss = serde_json::from_str("{}").unwrap();
    assert_eq!(d, SourceLoss::default());
    assert_eq!(d.source_timeout_ms, 1500);
    assert_eq!(d.reconnect_window_s, 30);
    assert!(d.validate().is_ok());
    for (ms, ok) in [(199, false), (200, true), (60_000, true), (60_001, false)] {
        let l = SourceLoss {
            source_timeout_ms: ms,
            ..d
        };
        assert_eq!(l.validate().is_ok(), ok, "{ms} ms");
    }
    let long = SourceLoss {
        reconnect_window_s: SourceLoss::MAX_WINDOW_S + 1,
        ..d
    };
    assert!(long.validate().unwrap_err().contains("reconnect_window_s"));
    assert!(serde_json::from_str::<SourceLoss>(r#"{"source_timeout":5}"#).is_err());
}

#[test]
fn a_backup_is_a_live_input_for_a_stream_that_can_lose_its_own() {
    let req = |source: &str, failback_s: u32| BackupRequest {
        source: source.into(),
        failback_s,
    };
    let publish = Source::parse("publish:").unwrap();
    let b = Backup::new(&req("srt://203.0.113.5:9000", 10), &publish).unwrap();
    assert_eq!(b.failback(), std::time::Duration::from_secs(10));
    // a second publisher on a publish stream
    let second = Backup::new(&req("publish:", 3), &publish).unwrap();
    assert!(second.source.is_publish());
    let srt = Source::parse("srt://203.0.113.5:9000").unwrap();
    for (source, primary, why) in [
        ("publish:", &srt, "needs a `publish:` stream"),
        ("file:///a.mp4", &publish, "live input"),
        ("test:", &publish, "live input"),
        ("srt://203.0.113.5:9000", &srt, "own source"),
        (
            "srt://203.0.113.5:9001",
            &Source::parse("test:").unwrap(),
            "applies to",
        ),
        ("nope://x", &publish, "scheme"),
    ] {
        let e = Backup::new(&req(source, 10), primary)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{source}: {e}");
    }
    let long = Backup::new(&req("rtsp://203.0.113.5/cam", 3601), &publish).unwrap_err();
    assert!(long.to_string().contains("failback_s"));
    let parsed: BackupRequest = serde_json::from_str(r#"{"source": "srt://h:1"}"#).unwrap();
    assert_eq!(parsed.failback_s, 10);
    assert!(serde_json::from_str::<BackupRequest>(r#"{"source": "srt://h:1", "x": 1}"#).is_err());
}

#[test]
fn a_passthrough_rendition_parses_apart_and_is_validated_against_the_plan() {
    let specs: Vec<RenditionSpec> = serde_json::from_str(
        r#"[{"name": "source", "passthrough": true},
            {"name": "lo", "width": 640, "height": 360, "bitrate_kbps": 800}]"#,
    )
    .unwrap();
    assert_eq!(
        specs[0],
        RenditionSpec::Passthrough(Passthrough {
            name: "source".into(),
            passthrough: true,
            bitrate_kbps: Passthrough::DEFAULT_BITRATE_KBPS,
            width: 1920,
            height: 1080,
        })
    );
    let mut lo = v("lo", 640, 360);
    lo.bitrate_kbps = 800;
    assert_eq!(specs[1], RenditionSpec::Video(lo));
    // mistakes name the rendition and the field
    let e =
        serde_json::from_str::<RenditionSpec>(r#"{"name": "s", "passthrough": true, "fps": 60}"#)
            .unwrap_err()
            .to_string();
    assert!(e.contains("rendition `s`") && e.contains("drop fps"), "{e}");
    let e = serde_json::from_str::<RenditionSpec>(r#"{"name": "x", "width": 640, "height": 360}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rendition `x`: missing field `bitrate_kbps`"),
        "{e}"
    );
    assert!(serde_json::from_str::<RenditionSpec>(
        r#"{"name": "x", "passthrough": true, "bogus": 1}"#
    )
    .is_err());

    let plan = |source: &str, video: Vec<VideoRendition>| {
        StreamPlan::new(
            "s",
            source,
            video,
            Some(AudioRendition::default()),
            Timing::default(),
            EncoderSettings::default(),
        )
        .unwrap()
    };
    let RenditionSpec::Passthrough(p) = specs[0].clone() else {
        unreachable!()
    };
    let ok = plan("publish:", vec![v("lo", 640, 360)])
        .with_passthrough(Some(p.clone()))
        .unwrap();
    assert_eq!(
        ok.passthrough_index(),
        Some(2),
        "after the video and the audio"
    );
    assert_eq!(
        ok.source_size(),
        (1920, 1080),
        "the decode is booked at the largest source picture"
    );
    assert_eq!(ok.video.len(), 1, "nothing is encoded for it");
    let bad = |plan: StreamPlan, p: Passthrough, what: &str| {
        let e = plan.with_passthrough(Some(p)).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    };
    bad(
        plan("test:", vec![v("lo", 640, 360)]),
        p.clone(),
        "encoded source",
    );
    bad(
        plan("publish:", vec![]),
        p.clone(),
        "at least one encoded video rendition",
    );
    bad(
        plan("publish:", vec![v("source", 640, 360)]),
        p.clone(),
        "used twice",
    );
    bad(
        plan("publish:", vec![v("lo", 640, 360)]),
        Passthrough {
            width: 641,
            ..p.clone()
        },
        "even",
    );
}
