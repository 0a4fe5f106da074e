use super::testutil::*;
use super::*;

#[test]
fn reads_init_segment() {
    let init = parse_init(&video_init()).unwrap();
    assert_eq!(init.major_brand, "cmf2");
    assert!(init.compatible_brands.contains(&"iso6".to_string()));
    assert!(init.has_mvex && !init.has_mdat);
    let t = &init.tracks[0];
    assert_eq!(
        (t.track_id, t.timescale, t.handler.as_str()),
        (1, 90_000, "vide")
    );
    assert_eq!(t.codec.as_deref(), Some("avc1.64001f"));
    assert_eq!((t.width, t.height), (Some(640), Some(360)));
    assert_eq!(init.codecs().as_deref(), Some("avc1.64001f"));
}

#[test]
fn reads_fragments_and_sync_flags() {
    let init = parse_init(&video_init()).unwrap();
    let f = parse_fragment(&video_fragment(90_000, 10, true), &init).unwrap();
    assert_eq!(f.base_decode_time, 90_000);
    assert_eq!(f.sample_count, 10);
    assert_eq!(f.duration, 30_000);
    assert_eq!(f.duration_ns(), 333_333_333);
    assert!(f.starts_with_sync);
    assert_eq!(f.sync_samples, vec![0]);
    let g = parse_fragment(&video_fragment(120_000, 10, false), &init).unwrap();
    assert!(!g.starts_with_sync && g.sync_samples.is_empty());
    // two parts concatenated read as one segment with continuous moofs
    let both = [
        video_fragment(90_000, 10, true),
        video_fragment(120_000, 10, false),
    ]
    .concat();
    let s = parse_fragment(&both, &init).unwrap();
    assert_eq!(s.moofs, vec![(90_000, 30_000), (120_000, 30_000)]);
    assert_eq!(s.kinds, ["moof", "mdat", "moof", "mdat"]);
}

#[test]
fn esds_gives_aac_lc() {
    // ES_Descriptor(ES_ID=1) → DecoderConfig(OTI 0x40, audio) → DecSpecificInfo(AAC-LC 48k stereo: 0x11 0x90)
    let mut e = vec![0, 0, 0, 0, 0x03, 25, 0, 1, 0, 0x04, 17, 0x40, 0x15];
    e.extend_from_slice(&[0; 11]);
    e.extend_from_slice(&[0x05, 2, 0x11, 0x90]);
    assert_eq!(esds_codec(&e).unwrap(), "mp4a.40.2");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert!(parse_init(b"").is_err());
    assert!(parse_init(&[0, 0, 0, 200, b'f', b't', b'y', b'p']).is_err());
    let init = parse_init(&video_init()).unwrap();
    let mut frag = video_fragment(0, 3, true);
    frag.truncate(frag.len() - 20);
    assert!(parse_fragment(&frag, &init).is_err());
    for cut in 0..video_init().len() {
        let _ = parse_init(&video_init()[..cut]);
    }
}
