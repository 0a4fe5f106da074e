use super::*;

pub(crate) fn cfg() -> PackagerConfig {
    PackagerConfig {
        segment_ns: 2_000_000_000,
        target_duration_s: 2,
        part_target_ms: 334,
        window_segments: 4,
        retain_segments: 2,
        wallclock_origin_unix_ms: 1_795_880_805_000,
        can_skip_until_s: None,
        first_msn: 0,
    }
}

/// Feeds `segments` segments of six 10-frame parts at 30 fps.
pub(crate) fn feed(p: &mut Packager, segments: u64) {
    for s in 0..segments {
        for i in 0..6u64 {
            let start = s * 2_000_000_000 + i * 333_333_333;
            p.push_part(PartIn {
                starts_segment: i == 0,
                independent: i == 0,
                start_ns: start,
                duration_ns: 333_333_333,
                bytes: Bytes::from(format!("[{s}.{i}]")),
                discontinuity: false,
            })
            .unwrap();
        }
    }
}

#[test]
fn renders_a_live_edge_playlist() {
    let mut p = Packager::new(cfg());
    feed(&mut p, 2);
    let text = p.render();
    assert!(text.starts_with("#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n"));
    assert!(text.contains("#EXT-X-PART-INF:PART-TARGET=0.334\n"));
    assert!(text
        .contains("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.002,HOLD-BACK=6\n"));
    assert!(text.contains("#EXT-X-MAP:URI=\"init.mp4\"\n"));
    assert!(text.contains("#EXT-X-PROGRAM-DATE-TIME:2026-11-28T15:46:45.000Z\n"));
    assert!(text.contains("#EXT-X-PART:DURATION=0.33333,URI=\"part-0-0.m4s\",INDEPENDENT=YES\n"));
    assert!(text.contains("#EXT-X-PART:DURATION=0.33333,URI=\"part-0-1.m4s\"\n"));
    assert!(text.contains("#EXTINF:2.00000,\nseg-0.m4s\n"));
    // segment 1 is open with 6 parts; the next part starts at 4 s → a new segment
    assert!(
        text.ends_with("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part-2-0.m4s\"\n"),
        "{text}"
    );
    assert_eq!(p.last(), Some(PartPos::new(1, 5)));
    // parsed by a real parser
    let parsed = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
    assert_eq!(parsed.target_duration, 2);
    assert_eq!(parsed.segments.len(), 1);
}

#[test]
fn hint_names_the_next_part_inside_a_segment() {
    let mut p = Packager::new(cfg());
    feed(&mut p, 1);
    p.push_part(PartIn {
        starts_segment: true,
        independent: true,
        start_ns: 2_000_000_000,
        duration_ns: 333_333_333,
        bytes: Bytes::from_static(b"x"),
        discontinuity: false,
    })
    .unwrap();
    assert_eq!(p.hint(), Some(PartPos::new(1, 1)));
    assert!(p.render().ends_with("URI=\"part-1-1.m4s\"\n"));
}

#[test]
fn segment_bytes_are_the_parts_concatenated() {
    let mut p = Packager::new(cfg());
    feed(&mut p, 3);
    let seg = p.segment(1).unwrap();
    let parts: Vec<u8> = (0..6)
        .flat_map(|i| p.part(PartPos::new(1, i)).unwrap().to_vec())
        .collect();
    assert_eq!(seg.as_ref(), parts.as_slice());
    assert!(
        p.segment(2).is_none(),
        "the open segment has no segment bytes yet"
    );
    assert_eq!(p.part(PartPos::new(2, 6)), None);
}

#[test]
fn window_slides_and_retains_bytes_after_removal() {
    let mut p = Packager::new(cfg());
    feed(&mut p, 10);
    let snap = p.snapshot();
    // 9 complete segments; 4 listed (5..=8) + the open 9; 2 more retained (3, 4)
    assert_eq!(snap.media_sequence, 5);
    assert_eq!(snap.first_retained_msn, 3);
    let text = String::from_utf8(snap.playlist.to_vec()).unwrap();
    assert!(text.contains("#EXT-X-MEDIA-SEQUENCE:5\n"));
    assert!(!text.contains("seg-4.m4s"));
    assert!(p.segment(3).is_some() && p.segment(2).is_none());
    // part tags only within 3×TD (6 s) of the end: segments 7, 8 and open 9 (start ≥ 14 s of 20 s end)
    assert!(!text.contains("part-6-0"));
    assert!(text.contains("part-7-0") && text.contains("part-9-5"));
}

#[test]
fn end_closes_the_playlist() {
    let mut p = Packager::new(cfg());
    feed(&mut p, 2);
    p.end();
    let text = p.render();
    assert!(
        text.ends_with("#EXTINF:2.00000,\nseg-1.m4s\n#EXT-X-ENDLIST\n"),
        "{text}"
    );
    assert!(!text.contains("PRELOAD-HINT"));
    assert_eq!(
        p.push_part(PartIn {
            starts_segment: true,
            independent: true,
            start_ns: 0,
            duration_ns: 1,
            bytes: Bytes::from_static(b"x"),
            discontinuity: false,
        }),
        Err(PackError::Ended)
    );
}

#[test]
fn resources_round_trip() {
    assert_eq!(parse_resource("init.mp4"), Some(Resource::Init(0)));
    assert_eq!(parse_resource(&init_uri(3)), Some(Resource::Init(3)));
    assert_eq!(
        parse_resource(&segment_uri(42)),
        Some(Resource::Segment(42))
    );
    assert_eq!(
        parse_resource(&part_uri(7, 3)),
        Some(Resource::Part(PartPos::new(7, 3)))
    );
    for bad in [
        "",
        "seg-.m4s",
        "part-1.m4s",
        "part-a-b.m4s",
        "../etc/passwd",
        "seg-1.mp4",
        "seg-01.m4s",
        "seg-+1.m4s",
        "part-1-01.m4s",
        "init-0.mp4",
        "init-x.mp4",
    ] {
        assert_eq!(parse_resource(bad), None, "{bad}");
    }
}

fn part_at(seg: u64, i: u64, discontinuity: bool) -> PartIn {
    PartIn {
        starts_segment: i == 0,
        independent: i == 0,
        start_ns: seg * 2_000_000_000 + i * 333_333_333,
        duration_ns: 333_333_333,
        bytes: Bytes::from(format!("[{seg}.{i}]")),
        discontinuity,
    }
}

#[test]
fn delta_updates_skip_only_segments_beyond_the_skip_boundary() {
    let mut c = cfg();
    c.window_segments = 12;
    c.can_skip_until_s = Some(12);
    let mut p = Packager::new(c);
    feed(&mut p, 12); // 11 complete (0..=10), 11 open
    let full = p.render();
    assert!(full.contains("CAN-SKIP-UNTIL=12,"));
    let delta = p.render_with(Skip::Yes, &[]);
    // last complete segment 10 ends at 22 s; segments ending before 10 s (0..=3, ending at 2..8 s) are skipped;
    // segment 4 ends at 10 s: exactly 12 s before, not more, so it stays
    assert!(delta.contains("#EXT-X-VERSION:9\n"));
    assert!(
        delta.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS=4\n"),
        "{delta}"
    );
    assert!(delta.contains("#EXT-X-MEDIA-SEQUENCE:0\n"));
    assert!(!delta.contains("seg-3.m4s") && delta.contains("seg-4.m4s"));
    // merging: the delta's segment lines equal the full playlist's from segment 4 on
    let tail = |t: &str| t[t.find("#EXT-X-MAP").unwrap()..].to_string();
    let full_tail = &full[full
        .find("#EXT-X-PROGRAM-DATE-TIME:2026-11-28T15:46:53")
        .unwrap()..];
    assert!(tail(&delta).ends_with(full_tail));
    let v2 = p.render_with(Skip::V2, &[]);
    assert!(v2.contains("#EXT-X-VERSION:10\n"));
    assert!(v2.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS=4,RECENTLY-REMOVED-DATERANGES=\"\"\n"));
    // snapshots carry deltas while live, not once ended
    assert!(p.snapshot().delta.is_some());
    p.end();
    assert!(p.snapshot().delta.is_none());
}

#[test]
fn rendition_reports_follow_the_hint() {
    let mut p = Packager::new(cfg());
    feed(&mut p, 1);
    let text = p.render_with(
        Skip::No,
        &[RenditionReport {
            uri: "../lo/index.m3u8".into(),
            last: PartPos::new(0, 5),
        }],
    );
    assert!(text.ends_with(
        "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part-1-0.m4s\"\n\
         #EXT-X-RENDITION-REPORT:URI=\"../lo/index.m3u8\",LAST-MSN=0,LAST-PART=5\n"
    ));
}

#[test]
fn discontinuities_and_new_inits_are_signalled_and_counted() {
    let mut c = cfg();
    c.window_segments = 2;
    c.retain_segments = 1;
    let mut p = Packager::new(c);
    p.set_init(Bytes::from_static(b"init-a"));
    assert_eq!(
        p.set_init(Bytes::from_static(b"init-a")),
        0,
        "same bytes, same generation"
    );
    feed(&mut p, 2);
    assert!(!p.render().contains("TYPE=MAP"));
    assert_eq!(p.set_init(Bytes::from_static(b"init-b")), 1);
    // the new init is hinted until the first part that uses it arrives
    let hinted = p.render();
    assert!(
        hinted.contains("#EXT-X-PRELOAD-HINT:TYPE=MAP,URI=\"init-1.mp4\"\n"),
        "{hinted}"
    );
    for i in 0..6 {
        p.push_part(part_at(2, i, i == 0)).unwrap();
    }
    p.push_part(part_at(3, 0, false)).unwrap();
    let text = p.render();
    assert!(
        !text.contains("TYPE=MAP"),
        "the hint goes once the init is in use"
    );
    // segments 1 (gen 0) and 2 (gen 1, discontinuity) listed, 3 open
    let seg2 = text
        .find("#EXT-X-DISCONTINUITY\n#EXT-X-MAP:URI=\"init-1.mp4\"\n#EXT-X-PROGRAM-DATE-TIME")
        .unwrap();
    assert!(text.find("#EXT-X-MAP:URI=\"init.mp4\"").unwrap() < seg2);
    assert!(text.contains("#EXT-X-DISCONTINUITY-SEQUENCE:0\n"));
    assert_eq!(p.init_gen(1).as_deref(), Some(&b"init-b"[..]));
    // slide the discontinuity out of the playlist: the sequence counts it
    for s in 3..6 {
        for i in 0..6 {
            if (s, i) != (3, 0) {
                p.push_part(part_at(s, i, false)).unwrap();
            }
        }
    }
    let text = p.render();
    assert!(text.contains("#EXT-X-DISCONTINUITY-SEQUENCE:1\n"), "{text}");
    assert!(!text.contains("#EXT-X-DISCONTINUITY\n"));
    assert!(
        p.init_gen(0).is_none(),
        "generation 0 is no longer referenced"
    );
}

#[test]
fn holes_in_the_timeline_become_gap_parts() {
    let mut p = Packager::new(cfg());
    p.push_part(part_at(0, 0, false)).unwrap();
    p.push_part(part_at(0, 1, false)).unwrap();
    // parts 2 and 3 never came (the source stalled): the next part starts at 4 × 333 ms
    p.push_part(part_at(0, 4, false)).unwrap();
    let text = p.render();
    assert!(text.contains("URI=\"part-0-2.m4s\",GAP=YES\n"), "{text}");
    assert!(text.contains("URI=\"part-0-3.m4s\",GAP=YES\n"));
    assert!(text.contains("#EXT-X-PART:DURATION=0.33333,URI=\"part-0-4.m4s\"\n"));
    assert_eq!(p.part(PartPos::new(0, 2)), None, "gap parts have no bytes");
    assert_eq!(p.part(PartPos::new(0, 4)).as_deref(), Some(&b"[0.4]"[..]));
    // the timeline stays continuous: the hint follows the real part
    assert_eq!(p.hint(), Some(PartPos::new(0, 5)));
    // a hole before a new segment is filled at the end of the old one; the segment keeps its full duration
    p.push_part(part_at(1, 0, false)).unwrap();
    let text = p.render();
    assert!(text.contains("#EXTINF:2.00000,\nseg-0.m4s"), "{text}");
    assert_eq!(p.segment(0).unwrap().as_ref(), b"[0.0][0.1][0.4]");
    // small timestamp jitter is not a gap
    let mut q = Packager::new(cfg());
    q.push_part(part_at(0, 0, false)).unwrap();
    let mut late = part_at(0, 1, false);
    late.start_ns += 100_000_000;
    q.push_part(late).unwrap();
    assert!(!q.render().contains("GAP"));
}

#[test]
fn decimals_render_exactly() {
    assert_eq!(ms_decimal(334), "0.334");
    assert_eq!(ms_decimal(1002), "1.002");
    assert_eq!(ms_decimal(2000), "2");
    assert_eq!(secs(333_333_333), "0.33333");
    assert_eq!(secs(2_005_333_333), "2.00533");
    assert_eq!(secs(333_995_000), "0.33400");
}

#[test]
fn the_peak_bitrate_ignores_segments_cut_short() {
    let mut p = Packager::new(cfg());
    feed(&mut p, 3);
    // each full segment: six 5-byte parts in 2 s
    assert_eq!(p.peak_bitrate(), Some(6 * 5 * 8 / 2));
    // a 0.1 s segment of 1000 bytes (a switch point right after an IDR), then a normal one
    for (start, len, seg) in [
        (6_000_000_000u64, 1000usize, true),
        (6_100_000_000, 5, true),
    ] {
        p.push_part(PartIn {
            starts_segment: seg,
            independent: true,
            start_ns: start,
            duration_ns: 100_000_000,
            bytes: Bytes::from(vec![0u8; len]),
            discontinuity: false,
        })
        .unwrap();
    }
    assert_eq!(p.peak_bitrate(), Some(6 * 5 * 8 / 2));
}

/// A resource number is read exactly when writing it back gives the same text (what `canonical` checked by
/// formatting the number before it checked the text).
#[test]
fn a_resource_number_is_canonical_exactly_when_it_reads_back_the_same() {
    let by_formatting = |s: &str| -> Option<u64> {
        let n: u64 = s.parse().ok()?;
        (n.to_string() == s).then_some(n)
    };
    let mut texts = vec![String::new()];
    let mut all = Vec::new();
    for _ in 0..5 {
        let mut next = Vec::new();
        for t in &texts {
            for c in ['0', '1', '9', '+', '-', 'a', ' '] {
                next.push(format!("{t}{c}"));
            }
        }
        all.extend(next.iter().cloned());
        texts = next;
    }
    let max = u64::MAX.to_string();
    all.extend([
        max.clone(),
        format!("0{max}"),
        format!("{max}0"),
        "18446744073709551616".into(),
        "99999999999999999999".into(),
        "898090166".into(),
        "+898090166".into(),
        String::new(),
    ]);
    for t in &all {
        assert_eq!(canonical(t), by_formatting(t), "{t:?}");
    }
    assert_eq!(canonical(&max), Some(u64::MAX));
}
