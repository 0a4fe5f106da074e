use super::*;
use crate::store::RenditionInfo;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use kiln_http::lend::{Lend, Lender};
use kiln_llhls::{PackagerConfig, PartIn};
use tower::ServiceExt;

fn origin() -> (Origin, Arc<StreamOrigin>) {
    let o = Origin::new();
    let s = stream("s");
    o.insert(s.clone());
    (o, s)
}

/// A stream of one 64×64 video rendition, 2 s segments of 334 ms parts.
fn stream(id: &str) -> Arc<StreamOrigin> {
    StreamOrigin::new(
        id,
        vec![RenditionInfo {
            name: "v".into(),
            kind: RenditionKind::Video {
                width: 64,
                height: 64,
                fps: 30.0,
            },
            bitrate: 100_000,
        }],
        PackagerConfig {
            segment_ns: 2_000_000_000,
            target_duration_s: 2,
            part_target_ms: 334,
            window_segments: 4,
            retain_segments: 2,
            wallclock_origin_unix_ms: 0,
            can_skip_until_s: Some(12),
            first_msn: 0,
        },
    )
}

fn part(s: &StreamOrigin, seg: u64, i: u64) {
    s.on_part(
        0,
        PartIn {
            starts_segment: i == 0,
            independent: i == 0,
            start_ns: seg * 2_000_000_000 + i * 333_333_333,
            duration_ns: 333_333_333,
            bytes: Bytes::from(format!("p{seg}.{i}")),
            discontinuity: false,
        },
    )
    .unwrap();
}

async fn get(o: &Origin, uri: &str) -> (StatusCode, String, Option<String>) {
    let res = axum::Router::from(router().with_state(o.clone()))
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let cc = res
        .headers()
        .get(header::CACHE_CONTROL)
        .map(|v| v.to_str().unwrap().to_string());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), cc)
}

#[tokio::test]
async fn serves_playlists_parts_and_segments() {
    let (o, s) = origin();
    s.on_init(0, Bytes::from_static(b"init"), Some("avc1.64001f".into()));
    for i in 0..6 {
        part(&s, 0, i);
    }
    part(&s, 1, 0);
    let (st, body, cc) = get(&o, "/live/s/v/index.m3u8").await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.contains("seg-0.m4s") && body.contains("part-1-0.m4s"));
    assert_eq!(cc.as_deref(), Some("public, max-age=1"));
    assert_eq!(get(&o, "/live/s/v/part-0-2.m4s").await.1, "p0.2");
    assert_eq!(
        get(&o, "/live/s/v/seg-0.m4s").await.1,
        "p0.0p0.1p0.2p0.3p0.4p0.5"
    );
    assert_eq!(get(&o, "/live/s/v/init.mp4").await.1, "init");
    assert_eq!(
        get(&o, "/live/s/v/seg-9.m4s").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&o, "/live/s/v/part-9-0.m4s").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(&o, "/live/s/v/..%2Fx").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&o, "/live/nope/v/index.m3u8").await.0,
        StatusCode::NOT_FOUND
    );
    let (st, body, _) = get(&o, "/live/s/master.m3u8").await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.contains("CODECS=\"avc1.64001f\""));
}

#[tokio::test]
async fn bad_blocking_requests_get_400() {
    let (o, s) = origin();
    part(&s, 0, 0);
    for q in [
        "_HLS_part=0",
        "_HLS_msn=x",
        "_HLS_msn=9",
        "_HLS_msn=0&_HLS_part=99",
        // another spelling of a number the origin answers (`0`): one spelling, one cache key
        "_HLS_msn=00",
        "_HLS_msn=+0",
        "_HLS_msn=0&_HLS_part=+0",
        "_HLS_msn=0&_HLS_part=00",
    ] {
        let (st, body, cc) = get(&o, &format!("/live/s/v/index.m3u8?{q}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}");
        // App. B.1's 4 x TD for players; a second in a shared cache
        assert_eq!(cc.as_deref(), Some("public, max-age=8, s-maxage=1"));
        // the same JSON envelope as the control API
        let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON error body");
        assert_eq!(v["error"]["code"], "bad_request", "{q}: {body}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // a directive twice, or in another case: refused, and never stored by a cache that keys on one value
    for q in [
        "_HLS_msn=0&_HLS_part=0&_HLS_msn=9",
        "_hls_msn=0",
        "_HLS_msn=0&_HLS_Part=1",
        "_HLS_skip=YES&_HLS_skip=v2",
    ] {
        let (st, _, cc) = get(&o, &format!("/live/s/v/index.m3u8?{q}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(cc.as_deref(), Some("no-store"), "{q}");
    }
    let (st, body, _) = get(&o, "/live/nope/v/index.m3u8").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(body.contains("\"not_found\""), "{body}");
}

#[tokio::test]
async fn parked_requests_are_answered_from_one_shared_snapshot() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let r = s.renditions[0].clone();
    let q = "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1";
    let (o1, o2) = (o.clone(), o.clone());
    let a = tokio::spawn(async move { get(&o1, q).await });
    let b = tokio::spawn(async move { get(&o2, q).await });
    while o.parked() < 2 {
        tokio::task::yield_now().await;
    }
    part(&s, 0, 1);
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let (snap, answers) = r.served_from();
    let snap = snap.unwrap();
    assert_eq!(answers, 2, "both answers from one snapshot");
    assert!(Arc::ptr_eq(&snap, &r.snapshot()), "the published one");
    assert_eq!(a.1.as_bytes(), &snap.playlist[..]);
    assert_eq!(a.1, b.1);
    // an answer from a later publish starts a new count
    part(&s, 0, 2);
    assert_eq!(
        get(&o, "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=2")
            .await
            .0,
        StatusCode::OK
    );
    let (later, answers) = r.served_from();
    assert_eq!(answers, 1);
    assert!(!Arc::ptr_eq(&snap, &later.unwrap()));
}

#[tokio::test]
async fn blocked_request_and_hinted_part_wake_on_publish() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let o2 = o.clone();
    let pl =
        tokio::spawn(async move { get(&o2, "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1").await });
    let o3 = o.clone();
    let hinted = tokio::spawn(async move { get(&o3, "/live/s/v/part-0-1.m4s").await });
    // wait until both are parked on the rendition's publish channel
    while s.renditions[0].parked() < 2 {
        tokio::task::yield_now().await;
    }
    assert!(!pl.is_finished() && !hinted.is_finished());
    part(&s, 0, 1);
    let (st, body, cc) = pl.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(body.contains("part-0-1.m4s"));
    assert_eq!(cc.as_deref(), Some("public, max-age=12"));
    assert_eq!(hinted.await.unwrap().1, "p0.1");
}

#[tokio::test]
async fn plain_playlist_waits_for_the_first_complete_segment() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let o2 = o.clone();
    let pl = tokio::spawn(async move { get(&o2, "/live/s/v/index.m3u8").await });
    while s.renditions[0].parked() < 1 {
        tokio::task::yield_now().await;
    }
    for i in 1..6 {
        part(&s, 0, i);
    }
    assert!(!pl.is_finished());
    part(&s, 1, 0);
    let (st, body, _) = pl.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(body.contains("#EXTINF:2.00000,\nseg-0.m4s"));
}

async fn get_with(o: &Origin, uri: &str, hdr: (&str, &str)) -> Response {
    axum::Router::from(router().with_state(o.clone()))
        .oneshot(
            Request::get(uri)
                .header(hdr.0, hdr.1)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn open_segment_streams_part_by_part_until_it_closes() {
    let (o, s) = origin();
    s.on_init(0, Bytes::from_static(b"init"), Some("avc1.64001f".into()));
    part(&s, 0, 0);
    let o2 = o.clone();
    let seg = tokio::spawn(async move { get(&o2, "/live/s/v/seg-0.m4s").await });
    while s.renditions[0].parked() < 1 {
        tokio::task::yield_now().await;
    }
    for i in 1..6 {
        part(&s, 0, i);
    }
    assert!(
        !seg.is_finished(),
        "the segment is open until the next one starts"
    );
    part(&s, 1, 0);
    let (st, body, cc) = seg.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, "p0.0p0.1p0.2p0.3p0.4p0.5");
    assert_eq!(cc.as_deref(), Some("public, max-age=12"));
    // a segment two ahead of the live edge is not in progress
    assert_eq!(
        get(&o, "/live/s/v/seg-3.m4s").await.0,
        StatusCode::NOT_FOUND
    );
}

/// A hole in the timeline (the source skipped two parts) is GAP parts in the open segment: the streamed segment
/// goes on past them with the parts after, instead of waiting on a part that will never have bytes.
#[tokio::test]
async fn an_open_segment_streams_past_its_gap_parts() {
    let (o, s) = origin();
    s.on_init(0, Bytes::from_static(b"init"), Some("avc1.64001f".into()));
    part(&s, 0, 0);
    let o2 = o.clone();
    let seg = tokio::spawn(async move { get(&o2, "/live/s/v/seg-0.m4s").await });
    while s.renditions[0].parked() < 1 {
        tokio::task::yield_now().await;
    }
    part(&s, 0, 1);
    // parts 2 and 3 never come: part 4 starts 667 ms after part 1's end
    part(&s, 0, 4);
    part(&s, 0, 5);
    assert!(s.renditions[0].is_gap(PartPos::new(0, 2)));
    part(&s, 1, 0);
    let (st, body, _) = tokio::time::timeout(Duration::from_secs(5), seg)
        .await
        .expect("the segment ends when it closes, not after a wait on its gap")
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, "p0.0p0.1p0.4p0.5");
}

#[tokio::test]
async fn media_has_etags_and_ranges() {
    let (o, s) = origin();
    for i in 0..6 {
        part(&s, 0, i);
    }
    part(&s, 1, 0);
    let r = get_with(&o, "/live/s/v/seg-0.m4s", ("x-none", "")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CACHE_CONTROL], "public, max-age=86400");
    let etag = r.headers()[header::ETAG].to_str().unwrap().to_string();
    let r = get_with(&o, "/live/s/v/seg-0.m4s", ("if-none-match", &etag)).await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = get_with(&o, "/live/s/v/part-0-1.m4s", ("range", "bytes=1-2")).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes 1-2/4");
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "0.");
    // an open-ended hint range (2^53 - 1) is clamped to the part
    let r = get_with(
        &o,
        "/live/s/v/part-0-1.m4s",
        ("range", "bytes=0-9007199254740991"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "p0.1");
    let r = get_with(&o, "/live/s/v/part-0-1.m4s", ("range", "bytes=9-")).await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    // an error's lifetime, not the part's 6 x TD
    assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
    assert_eq!(parse_range("bytes=-2", 4), Some((2, 3)));
    assert_eq!(parse_range("bytes=0-1,2-3", 4), None);
    assert_eq!(parse_range("items=0-1", 4), None);
    // a Range this answer does not take (several ranges, another unit, bad syntax) is ignored: the whole part,
    // 200 (RFC 9110 §14.2); only a well-formed range past the end is 416
    for ignored in [
        "bytes=0-1,2-3",
        "items=0-1",
        "bytes=x-1",
        "bytes=3-1",
        "bytes=-",
    ] {
        let r = get_with(&o, "/live/s/v/part-0-1.m4s", ("range", ignored)).await;
        assert_eq!(r.status(), StatusCode::OK, "{ignored}");
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "p0.1");
    }
    for past in ["bytes=4-", "bytes=9-12", "bytes=-0"] {
        let r = get_with(&o, "/live/s/v/part-0-1.m4s", ("range", past)).await;
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{past}");
    }
}

#[tokio::test]
async fn skip_requests_get_delta_updates() {
    let (o, s) = origin();
    for seg in 0..8 {
        for i in 0..6 {
            part(&s, seg, i);
        }
    }
    let (st, full, _) = get(&o, "/live/s/v/index.m3u8").await;
    assert_eq!(st, StatusCode::OK);
    assert!(full.contains("CAN-SKIP-UNTIL=12"));
    let (_, delta, _) = get(&o, "/live/s/v/index.m3u8?_HLS_skip=YES").await;
    assert!(delta.contains("#EXT-X-VERSION:9") && delta.contains("#EXT-X-SKIP:SKIPPED-SEGMENTS="));
    let (_, v2, _) = get(&o, "/live/s/v/index.m3u8?_HLS_skip=v2").await;
    assert!(v2.contains("RECENTLY-REMOVED-DATERANGES"));
    let (st, _, _) = get(&o, "/live/s/v/index.m3u8?_HLS_skip=maybe").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn parking_is_bounded() {
    let o = Origin::with_parking_limit(1);
    let s = StreamOrigin::new(
        "s",
        origin()
            .1
            .renditions
            .iter()
            .map(|r| r.info.clone())
            .collect(),
        origin().1.config.clone(),
    );
    o.insert(s.clone());
    part(&s, 0, 0);
    let o2 = o.clone();
    let first =
        tokio::spawn(async move { get(&o2, "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1").await });
    while o.parked() < 1 {
        tokio::task::yield_now().await;
    }
    let refused = get_with(
        &o,
        "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1",
        ("accept", "*/*"),
    )
    .await;
    assert_eq!(
        refused.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the second waiter finds no place"
    );
    assert_eq!(
        refused.headers().get("retry-after").unwrap(),
        "1",
        "told when to come back"
    );
    assert_eq!(o.park_refusals.get(), 1, "and counted");
    assert_eq!(o.fanout.get_sample_count(), 0);
    part(&s, 0, 1);
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert_eq!(o.parked(), 0, "places are given back");
    // the woken request measured its fan-out (publish → answer written: its body dropped once read here); the refused one nothing
    assert_eq!(o.fanout.get_sample_count(), 1);
    assert!(o.fanout.get_sample_sum() < 5.0);
    // an answer that never waited is not a fan-out
    get(&o, "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1").await;
    assert_eq!(o.fanout.get_sample_count(), 1);
}

#[tokio::test]
async fn signed_urls_are_checked_before_waiting_and_propagated() {
    let (mut o, s) = origin();
    let signer = crate::signing::UrlSigner::new(b"0123456789abcdef!").unwrap();
    let token = signer.sign("s", u64::MAX / 2);
    o.signer = Some(Arc::new(signer));
    for i in 0..6 {
        part(&s, 0, i);
    }
    part(&s, 1, 0);
    // no token, bad token, expired token: 403 at once, even for a request that would block
    for q in [
        "_HLS_msn=9&_HLS_part=0",
        "exp=99999999999&sig=00",
        "exp=1&sig=ab",
    ] {
        let (st, _, cc) = get(&o, &format!("/live/s/v/index.m3u8?{q}")).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{q}");
        assert_eq!(cc.as_deref(), Some("no-store"));
    }
    assert_eq!(
        get(&o, "/live/s/v/part-0-0.m4s").await.0,
        StatusCode::FORBIDDEN
    );
    let (st, body, _) = get(&o, &format!("/live/s/v/index.m3u8?{token}")).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        body.contains(&format!("URI=\"part-0-0.m4s?{token}\"")),
        "{body}"
    );
    assert_eq!(
        get(&o, &format!("/live/s/v/part-0-0.m4s?{token}")).await.1,
        "p0.0"
    );
}

#[tokio::test(start_paused = true)]
async fn blocked_request_times_out_with_503() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let (st, _, _) = get(&o, "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn ending_releases_waiters_with_endlist() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let o2 = o.clone();
    let pl = tokio::spawn(async move { get(&o2, "/live/s/v/index.m3u8?_HLS_msn=1").await });
    while s.renditions[0].parked() < 1 {
        tokio::task::yield_now().await;
    }
    s.end();
    let (st, body, _) = pl.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(body.ends_with("#EXT-X-ENDLIST\n"));
}

/// A part's publish that loses the race with the end (its snapshot taken first, published last) does not put
/// the ended playlist back to a live one: players would wait on its hint for ever.
#[tokio::test]
async fn an_older_snapshot_published_late_does_not_replace_the_end() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let r = s.renditions[0].clone();
    let taken_before_the_end = r.packager().snapshot_with(&[]);
    s.end();
    r.publish(taken_before_the_end);
    assert!(r.snapshot().ended, "the end was replaced by an older state");
    let (st, body, _) = get(&o, "/live/s/v/index.m3u8").await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.ends_with("#EXT-X-ENDLIST\n"), "{body}");
    // a newer one still replaces an older one
    let before = r.snapshot().version;
    r.publish(r.packager().snapshot_with(&[]));
    assert!(r.snapshot().version > before);
}

/// Two video renditions of a stream whose segments follow a 4 s source GOP ("v" learns it, index 1).
fn gop_origin() -> (Origin, Arc<StreamOrigin>) {
    let o = Origin::new();
    let info = |name: &str| RenditionInfo {
        name: name.into(),
        kind: RenditionKind::Video {
            width: 64,
            height: 64,
            fps: 30.0,
        },
        bitrate: 100_000,
    };
    let s = StreamOrigin::following_gop(
        "g",
        vec![info("lo"), info("v")],
        PackagerConfig {
            segment_ns: 2_000_000_000,
            target_duration_s: 2,
            part_target_ms: 334,
            window_segments: 4,
            retain_segments: 2,
            wallclock_origin_unix_ms: 0,
            can_skip_until_s: Some(12),
            first_msn: 0,
        },
        1,
    );
    o.insert(s.clone());
    (o, s)
}

fn gop_part(s: &StreamOrigin, r: usize, seg: u64, i: u64, seg_s: u64) {
    s.on_part(
        r,
        PartIn {
            starts_segment: i == 0,
            independent: i == 0,
            start_ns: seg * seg_s * 1_000_000_000 + i * 333_333_333,
            duration_ns: 333_333_333,
            bytes: Bytes::from(format!("p{seg}.{i}")),
            discontinuity: false,
        },
    )
    .unwrap();
}

#[tokio::test]
async fn a_stream_on_its_source_gop_serves_playlists_once_targetduration_is_known() {
    let (o, s) = gop_origin();
    s.on_init(0, Bytes::from_static(b"init"), Some("avc1.64001f".into()));
    s.on_init(1, Bytes::from_static(b"init"), Some("avc1.64001f".into()));
    // 12 parts of 333 ms: the first segment is 4 s
    for i in 0..12 {
        gop_part(&s, 0, 0, i, 4);
        gop_part(&s, 1, 0, i, 4);
    }
    assert!(!s.target_known());
    // a request the rules refuse is refused now, not after the wait for TARGETDURATION
    for bad in ["_HLS_part=0", "_HLS_msn=9", "_HLS_msn=0&_HLS_part=99"] {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            get(&o, &format!("/live/g/lo/index.m3u8?{bad}")),
        )
        .await
        .expect("refused at once");
        assert_eq!(answer.0, StatusCode::BAD_REQUEST, "{bad}");
    }
    // a request made now waits for the first complete segment
    let early = tokio::spawn({
        let o = o.clone();
        async move { get(&o, "/live/g/lo/index.m3u8").await }
    });
    tokio::task::yield_now().await;
    assert!(!early.is_finished());
    gop_part(&s, 0, 1, 0, 4);
    assert!(!s.target_known(), "learnt from `v`, not from `lo`");
    gop_part(&s, 1, 1, 0, 4);
    assert!(s.target_known());
    assert_eq!(s.target_duration_s(), 4);
    let (st, body, _) = early.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(body.contains("#EXT-X-TARGETDURATION:4\n"), "{body}");
    assert!(
        body.contains("HOLD-BACK=12") || body.contains("CAN-SKIP-UNTIL=24"),
        "{body}"
    );
    for r in ["lo", "v"] {
        let (_, body, _) = get(&o, &format!("/live/g/{r}/index.m3u8")).await;
        assert!(body.contains("#EXT-X-TARGETDURATION:4\n"), "{r}: {body}");
        assert!(body.contains("CAN-SKIP-UNTIL=24"), "{r}: {body}");
    }
    // a later, longer GOP keeps TD (it never changes) and is counted
    for i in 1..18 {
        gop_part(&s, 1, 1, i, 4);
    }
    s.on_part(
        1,
        PartIn {
            starts_segment: true,
            independent: true,
            start_ns: 4_000_000_000 + 18 * 333_333_333,
            duration_ns: 333_333_333,
            bytes: Bytes::from_static(b"p2.0"),
            discontinuity: false,
        },
    )
    .unwrap();
    assert_eq!(s.target_duration_s(), 4);
    assert_eq!(s.segments_over_target(), 1);
    // no LL-DASH for it
    assert_eq!(
        get(&o, "/live/g/manifest.mpd").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn an_unsigned_origin_refuses_tokens_that_would_split_a_caches_key() {
    let (o, s) = origin();
    for i in 0..6 {
        part(&s, 0, i);
    }
    part(&s, 1, 0);
    for q in ["sig=0123", "exp=1&sig=ab", "_HLS_msn=0&EXP=5", "x=1&sig"] {
        let (st, body, cc) = get(&o, &format!("/live/s/v/index.m3u8?{q}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {body}");
        assert!(body.contains("does not sign"), "{q}: {body}");
        assert_eq!(cc.as_deref(), Some("no-store"), "{q}");
    }
    // other parameters are not the origin's business
    let (st, _, _) = get(&o, "/live/s/v/index.m3u8?session=7&signature=x").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn a_stalled_renditions_reports_stay_within_a_part_of_the_others() {
    // two renditions; "lo" publishes its first part, then only "hi" (index 1) goes on: lo's playlist is
    // republished with fresh reports, so its report on hi is never more than one part behind hi (a blocking
    // request for lo's part 0.0: a plain one waits for a complete segment)
    let o = Origin::new();
    let info = |name: &str| RenditionInfo {
        name: name.into(),
        kind: RenditionKind::Video {
            width: 64,
            height: 64,
            fps: 30.0,
        },
        bitrate: 100_000,
    };
    let s = StreamOrigin::new(
        "r",
        vec![info("lo"), info("hi")],
        PackagerConfig {
            segment_ns: 2_000_000_000,
            target_duration_s: 2,
            part_target_ms: 334,
            window_segments: 4,
            retain_segments: 2,
            wallclock_origin_unix_ms: 0,
            can_skip_until_s: Some(12),
            first_msn: 0,
        },
    );
    o.insert(s.clone());
    s.on_init(0, Bytes::from_static(b"init"), Some("avc1.64001f".into()));
    s.on_init(1, Bytes::from_static(b"init"), Some("avc1.64001f".into()));
    gop_part(&s, 0, 0, 0, 2);
    gop_part(&s, 1, 0, 0, 2);
    // (hi had no part when lo published: no report on it yet, which is one part behind)
    for i in 1..6 {
        gop_part(&s, 1, 0, i, 2);
        let (st, body, _) = get(&o, "/live/r/lo/index.m3u8?_HLS_msn=0&_HLS_part=0").await;
        assert_eq!(st, StatusCode::OK);
        let report = body
            .lines()
            .find(|l| l.starts_with("#EXT-X-RENDITION-REPORT:URI=\"../hi/index.m3u8\""))
            .unwrap_or_else(|| panic!("no report on hi: {body}"));
        let part: u64 = report.rsplit("LAST-PART=").next().unwrap().parse().unwrap();
        assert!(
            part + 1 >= i,
            "hi is at part {i}, lo reports part {part}: {report}"
        );
    }
    // lo's own parts did not change: only its reports were refreshed
    let (_, body, _) = get(&o, "/live/r/lo/index.m3u8?_HLS_msn=0&_HLS_part=0").await;
    assert_eq!(body.matches("#EXT-X-PART:").count(), 1, "{body}");
}

/// A parked request's future is paid for by every request that waits (10,000 of them in the origin bench): each
/// kind that can wait fits jemalloc's 512 B size class (the next ones are 640 and 768; one future type served
/// every route before, 1,080 B in a release build and 952 B in this one). Answers given at once have no future at all.
#[tokio::test]
async fn the_parked_futures_fit_a_512_byte_allocation() {
    let (o, s) = origin();
    part(&s, 0, 0);
    // a second stream that has published nothing: its documents and init segment are waited for
    o.insert(stream("t"));
    let get = |uri: &str, h: &[(header::HeaderName, &str)]| {
        let mut headers = HeaderMap::new();
        for (k, v) in h {
            headers.insert(k.clone(), v.parse().unwrap());
        }
        LiveGet::of(&axum::http::Method::GET, &uri.parse().unwrap(), &headers)
            .unwrap()
            .answer(&o)
    };
    let conditions = [
        (header::RANGE, "bytes=0-"),
        (
            header::IF_NONE_MATCH,
            "\"an-etag-of-some-length-0123456789\"",
        ),
        (header::ACCEPT_ENCODING, "gzip"),
    ];
    let waiting = [
        get(
            "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=2&_HLS_skip=YES",
            &conditions,
        ),
        get("/live/s/v/index.m3u8", &[]),
        get("/live/s/v/part-0-1.m4s", &conditions),
        get("/live/t/v/init.mp4", &conditions),
        get("/live/t/master.m3u8?", &conditions),
        get("/live/t/manifest.mpd", &[]),
    ];
    for (i, a) in waiting.iter().enumerate() {
        let size = a
            .waiting_size()
            .unwrap_or_else(|| panic!("request {i} waits"));
        assert!(size <= 512, "request {i}: {size} B");
    }
    assert_eq!(get("/live/s/v/part-0-0.m4s", &[]).waiting_size(), None);
    let ready = get("/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=0", &[]);
    assert_eq!(ready.waiting_size(), None);
}

/// The fan-out runs from the publish to the woken answer being written: it is observed when the server drops the
/// answer's body (written, or given up), not when the answer is ready. A blocking reload and a held part.
#[tokio::test]
async fn the_fan_out_ends_when_the_woken_answer_is_written() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let waiting = |uri: &str| {
        let live = LiveGet::of(
            &axum::http::Method::GET,
            &uri.parse().unwrap(),
            &HeaderMap::new(),
        );
        tokio::spawn(live.unwrap().answer(&o))
    };
    let reload = waiting("/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1");
    let held = waiting("/live/s/v/part-0-1.m4s");
    while o.parked() < 2 {
        tokio::task::yield_now().await;
    }
    part(&s, 0, 1);
    let answers = [reload.await.unwrap(), held.await.unwrap()];
    assert_eq!(o.fanout.get_sample_count(), 0, "ready, not yet written");
    let mut bodies = Vec::new();
    for a in answers {
        let Reply::Prepared(p) = a else {
            panic!("a woken answer not prepared");
        };
        // the server holds a clone of the body while it writes the rest of it
        bodies.push(p.body().clone());
    }
    assert!(bodies[0].starts_with(b"#EXTM3U") && &bodies[1][..] == b"p0.1");
    assert_eq!(o.fanout.get_sample_count(), 0, "still being written");
    drop(bodies);
    assert_eq!(o.fanout.get_sample_count(), 2, "written: both measured");
    assert!(o.fanout.get_sample_sum() < 5.0);
}

/// A connected pair of sockets: the server's side (which lends) and the client's.
async fn socket_pair() -> (Lender, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(l.local_addr().unwrap());
    let (client, server) = tokio::join!(client, l.accept());
    (Lender::new(server.unwrap().0), client.unwrap())
}

/// What has arrived on `c` by now: read from the socket itself (not through tokio's readiness, which its I/O
/// driver may not have seen yet), without waiting.
fn arrived(c: &tokio::net::TcpStream) -> String {
    use std::io::Read as _;
    use std::os::fd::AsFd as _;
    let mut s = std::net::TcpStream::from(c.as_fd().try_clone_to_owned().unwrap());
    let mut all = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    String::from_utf8(all).unwrap()
}

/// Everything that arrives on `c` until `want` has (or 10 s).
async fn arrives(c: &tokio::net::TcpStream, want: &str) -> String {
    let mut all = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !all.contains(want) {
            c.readable().await.unwrap();
            all += &arrived(c);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{want:?} did not arrive: {all:?}"));
    all
}

fn lending<'a>(o: &Origin, uri: &str, lend: Lend<'a>) -> LiveAnswer {
    LiveGet::of(
        &axum::http::Method::GET,
        &uri.parse().unwrap(),
        &HeaderMap::new(),
    )
    .unwrap()
    .answer_lending(o, Some(lend.with_lines(b"x-lent: yes\r\n")))
}

/// A blocking reload on a lent socket is answered by the publish itself: its answer is on the socket, and the
/// fan-out observed, when the publish returns, before its future has run; the future then gives the written
/// answer to its connection.
#[tokio::test]
async fn a_lent_blocking_reload_is_written_by_the_publish() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let (mut server, client) = socket_pair().await;
    let q = "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1";
    let answer = lending(&o, q, server.lend(false));
    assert!(
        answer.waiting_size().is_some_and(|n| n <= 512),
        "{:?}",
        answer.waiting_size()
    );
    assert_eq!((o.parked(), s.renditions[0].parked()), (1, 1));
    let task = tokio::spawn(answer);
    tokio::task::yield_now().await;
    assert_eq!(arrived(&client), "", "nothing before the publish");
    part(&s, 0, 1);
    assert_eq!(o.fanout.get_sample_count(), 1, "measured as it was written");
    let got = arrived(&client);
    let (head, body) = got.split_once("\r\n\r\n").expect("a whole answer");
    let head = format!("{head}\r\n");
    let snap = s.renditions[0].snapshot();
    assert_eq!(body.as_bytes(), &snap.playlist[..]);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for line in [
        "content-type: application/vnd.apple.mpegurl",
        "cache-control: public, max-age=12",
        "x-lent: yes",
        &format!("content-length: {}", body.len()),
    ] {
        assert!(head.contains(&format!("{line}\r\n")), "{line}: {head}");
    }
    assert!(!head.contains("connection: close"), "{head}");
    let Reply::Written(w) = task.await.unwrap() else {
        panic!("not the written answer");
    };
    assert_eq!(w.body_len(), body.len() as u64);
    assert_eq!(o.parked(), 0);
    let (from, answers) = s.renditions[0].served_from();
    assert!(Arc::ptr_eq(&from.unwrap(), &snap) && answers == 1);
}

/// A panic inside a publish's run (a bug) does not leave the requests it had not answered to their deadline: they
/// answer by themselves, with the playlist the publish made; those written before it keep their answers. (One
/// thread: the run has no helpers.)
#[tokio::test]
async fn a_panic_in_a_run_lets_the_requests_it_had_not_answered_answer_by_themselves() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let mut pairs = Vec::new();
    for _ in 0..5 {
        pairs.push(socket_pair().await);
    }
    let mut tasks: Vec<_> = pairs
        .iter_mut()
        .map(|(server, _)| {
            let q = "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1";
            tokio::spawn(lending(&o, q, server.lend(false)))
        })
        .collect();
    assert_eq!(o.parked(), 5);
    super::lent::PANIC_AT.set(Some(2));
    let published = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| part(&s, 0, 1)));
    assert!(published.is_err(), "the injected panic");
    let snap = s.renditions[0].snapshot();
    // the third was being answered when the run panicked: it waits for its deadline
    tasks.remove(2).abort();
    for (i, task) in tasks.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap_or_else(|_| panic!("request {i} was left to its deadline"))
            .unwrap()
        {
            Reply::Written(w) if i < 2 => assert_eq!(w.body_len(), snap.playlist.len() as u64),
            Reply::Prepared(p) if i >= 2 => assert_eq!(p.body(), &snap.playlist[..]),
            _ => panic!("request {i}: not the answer expected"),
        }
    }
}

/// Enough waiters for a chunk per worker: every socket gets its answer, each measured once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_lent_reloads_are_written_by_every_worker() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let mut pairs = Vec::new();
    for _ in 0..300 {
        pairs.push(socket_pair().await);
    }
    let tasks: Vec<_> = pairs
        .iter_mut()
        .map(|(server, _)| {
            let q = "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1&_HLS_skip=YES";
            tokio::spawn(lending(&o, q, server.lend(false)))
        })
        .collect();
    assert_eq!(o.parked(), 300);
    // published from a task of the runtime, as kilnd does
    let s2 = s.clone();
    tokio::spawn(async move { part(&s2, 0, 1) }).await.unwrap();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Reply::Written(_)));
    }
    let body = s.renditions[0]
        .snapshot()
        .playlist(Skip::Yes, None, false)
        .body;
    let body = std::str::from_utf8(&body).unwrap();
    for (_, client) in &pairs {
        let got = arrives(client, &body[body.len() - 24..]).await;
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with(body),
            "{got}"
        );
    }
    assert_eq!(o.fanout.get_sample_count(), 300);
    assert_eq!(o.parked(), 0);
    let (from, answers) = s.renditions[0].served_from();
    assert!(Arc::ptr_eq(&from.unwrap(), &s.renditions[0].snapshot()));
    assert_eq!(answers, 300, "each written answer counted once");
}

/// A run evaluates at most `lent::FORMS` distinct forms: the requests of further forms, here three that the
/// publish satisfies, are woken to answer by themselves (their answer then not written by the publish), and
/// those still waiting stay registered.
#[tokio::test]
async fn requests_of_forms_past_a_run_s_limit_answer_by_themselves() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let skips = ["", "&_HLS_skip=YES", "&_HLS_skip=v2"];
    let mut waiting = Vec::new();
    for (m, p) in [(0, 2), (0, 3), (0, 4), (0, 5), (1, 0)] {
        for skip in skips {
            waiting.push(format!(
                "/live/s/v/index.m3u8?_HLS_msn={m}&_HLS_part={p}{skip}"
            ));
        }
    }
    waiting.push("/live/s/v/index.m3u8?_HLS_msn=1&_HLS_part=1".into());
    assert_eq!(waiting.len(), super::lent::FORMS);
    let satisfied: Vec<String> = skips
        .iter()
        .map(|skip| format!("/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1{skip}"))
        .collect();
    let mut pairs = Vec::new();
    for _ in 0..waiting.len() + satisfied.len() {
        pairs.push(socket_pair().await);
    }
    // registered in this order: the waiting forms take the run's places first
    let mut tasks: Vec<_> = waiting
        .iter()
        .chain(&satisfied)
        .zip(pairs.iter_mut())
        .map(|(q, (server, _))| tokio::spawn(lending(&o, q, server.lend(false))))
        .collect();
    assert_eq!(o.parked(), waiting.len() + satisfied.len());
    part(&s, 0, 1);
    let snap = s.renditions[0].snapshot();
    for (task, skip) in
        tasks
            .split_off(waiting.len())
            .into_iter()
            .zip([Skip::No, Skip::Yes, Skip::V2])
    {
        let Reply::Prepared(p) = task.await.unwrap() else {
            panic!("answered by the publish, or not a prepared answer");
        };
        assert_eq!(p.body(), &snap.playlist(skip, None, false).body);
    }
    assert_eq!(o.parked(), waiting.len(), "the others still wait");
    let (from, answers) = s.renditions[0].served_from();
    assert!(Arc::ptr_eq(&from.unwrap(), &snap));
    assert_eq!(
        answers, 3,
        "each answer counted once, by the request that gave it"
    );
    for (_, client) in &pairs {
        assert_eq!(arrived(client), "", "nothing written by the publish");
    }
    drop(tasks);
}

/// A lent request that ends by itself (its deadline, or its client leaving) takes its socket back: the publish
/// after it writes nothing there.
#[tokio::test(start_paused = true)]
async fn a_lent_reload_that_ends_by_itself_is_not_written_after() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let (mut server, client) = socket_pair().await;
    let q = "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1";
    // 3 × TD without the part: 503, from the request itself
    let timed_out = lending(&o, q, server.lend(false)).await;
    let Reply::Response(r) = timed_out else {
        panic!("not a response")
    };
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    // a client that leaves: its answer is dropped
    let left = lending(&o, q, server.lend(false));
    assert_eq!(o.parked(), 1);
    drop(left);
    assert_eq!(o.parked(), 0);
    part(&s, 0, 1);
    assert_eq!(arrived(&client), "");
    assert_eq!(o.fanout.get_sample_count(), 0);
    // a connection that closes (or hands its socket on) closes the loan of a request still parked: the
    // publish writes nothing on the descriptor it had
    let q = "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=2";
    let parked = lending(&o, q, server.lend(false));
    assert!(parked.waiting_size().is_some());
    let tcp = server.into_tcp();
    part(&s, 0, 2);
    assert_eq!(o.fanout.get_sample_count(), 0);
    assert_eq!(arrived(&client), "");
    drop((parked, tcp));
}

/// A lent request a publish does not satisfy stays registered, and the publish that does writes its answer.
#[tokio::test]
async fn a_lent_reload_waits_through_publishes_that_do_not_satisfy_it() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let (mut server, client) = socket_pair().await;
    let answer = lending(
        &o,
        "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=2",
        server.lend(false),
    );
    let task = tokio::spawn(answer);
    part(&s, 0, 1);
    assert_eq!(arrived(&client), "", "part 1 is not what it asked for");
    assert_eq!(o.parked(), 1);
    part(&s, 0, 2);
    let got = arrived(&client);
    assert!(
        got.starts_with("HTTP/1.1 200 OK\r\n") && got.contains("part-0-2.m4s"),
        "{got}"
    );
    assert!(matches!(task.await.unwrap(), Reply::Written(_)));
    assert_eq!(o.fanout.get_sample_count(), 1);
}

/// With a TARGETDURATION over 10 s a blocking reload's answer is not a prepared one (its lifetime line is not
/// prepared): the publish leaves it to the request, whose answer is measured once its connection drops it.
#[tokio::test]
async fn a_lent_reload_whose_answer_is_not_prepared_answers_itself_and_is_measured() {
    let o = Origin::new();
    let s = StreamOrigin::new(
        "s",
        vec![RenditionInfo {
            name: "v".into(),
            kind: RenditionKind::Video {
                width: 64,
                height: 64,
                fps: 30.0,
            },
            bitrate: 100_000,
        }],
        PackagerConfig {
            segment_ns: 12_000_000_000,
            target_duration_s: 12,
            part_target_ms: 1000,
            window_segments: 4,
            retain_segments: 2,
            wallclock_origin_unix_ms: 0,
            can_skip_until_s: None,
            first_msn: 0,
        },
    );
    o.insert(s.clone());
    let part = |i: u64| {
        s.on_part(
            0,
            PartIn {
                starts_segment: i == 0,
                independent: i == 0,
                start_ns: i * 1_000_000_000,
                duration_ns: 1_000_000_000,
                bytes: Bytes::from(format!("p{i}")),
                discontinuity: false,
            },
        )
        .unwrap();
    };
    part(0);
    let (mut server, client) = socket_pair().await;
    let answer = lending(
        &o,
        "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1",
        server.lend(false),
    );
    assert!(answer.waiting_size().is_some());
    let task = tokio::spawn(answer);
    part(1);
    assert_eq!(arrived(&client), "", "left to the request");
    let Reply::Response(r) = task.await.unwrap() else {
        panic!("not the request's own answer");
    };
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(o.fanout.get_sample_count(), 0, "not written yet");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(std::str::from_utf8(&body).unwrap().contains("part-0-1.m4s"));
    drop(body); // (the collected bytes are the answer's own)
    assert_eq!(o.fanout.get_sample_count(), 1, "measured once dropped");
    assert_eq!(o.parked(), 0);
    // evaluated by the publish and again by the request: served once
    assert_eq!(s.renditions[0].served_from().1, 1);
}

/// A request that evaluated a state the rendition has published past is not registered (no publish would come
/// for it): it gets its pieces back, to wait the subscribed way, and its loan is closed.
#[tokio::test]
async fn a_lent_registration_that_missed_a_publish_is_refused() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let r = s.renditions[0].clone();
    let seen = r.snapshot();
    part(&s, 0, 1);
    let (mut server, client) = socket_pair().await;
    let form = lent::Form {
        q: parse_query(Some("_HLS_msn=0&_HLS_part=2")).unwrap(),
        token: None,
        gzip: false,
    };
    let (lent, loan) = server.lend(false).lend();
    let probe = lent.loan();
    let Err(back) = lent::park(r.clone(), (lent, loan), form.clone(), &seen, &o.fanout) else {
        panic!("registered against a state already replaced");
    };
    assert_eq!(back, form);
    assert!(!probe.is_open(), "the loan is closed");
    // registered against the current state, it is served by the next publish
    let (lent, loan) = server.lend(false).lend();
    let Ok(wait) = lent::park(r.clone(), (lent, loan), form, &r.snapshot(), &o.fanout) else {
        panic!("refused against the current state");
    };
    part(&s, 0, 2);
    assert!(arrived(&client).contains("part-0-2.m4s"));
    drop(wait);
}

/// One HTTP/2 connection parks at most its share of requests: its next one gets 503 at once, while another
/// connection still parks (a few hundred connections of 200 streams each would otherwise hold every place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_parks_only_its_share() {
    let (o, s) = origin();
    part(&s, 0, 0);
    let app = axum::Router::from(router().with_state(o.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kiln_http::server::serve(
        listener,
        None,
        app,
        kiln_http::server::Limits::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        (send, tokio::spawn(conn))
    };
    // sends the next part's blocking reload (it parks until that part is published, 3 x TD at most) and hands
    // back its answer to come
    let request = |send: &h2::client::SendRequest<Bytes>| {
        let req = Request::get("http://x/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1")
            .body(())
            .unwrap();
        let send = send.clone();
        async move {
            let answer = send
                .ready()
                .await
                .unwrap()
                .send_request(req, true)
                .unwrap()
                .0;
            [answer]
        }
    };
    let (a, a_conn) = connect().await;
    let mut held = Vec::new();
    for _ in 0..crate::store::MAX_PARKED_PER_CONNECTION {
        let [answer] = request(&a).await;
        held.push(answer);
    }
    let parked_all = async {
        while o.parked() < crate::store::MAX_PARKED_PER_CONNECTION {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), parked_all)
        .await
        .expect("the connection's share parks");
    // at once, not after the 3 x TD (6 s) a parked request would wait
    let [over] = request(&a).await;
    let over = tokio::time::timeout(Duration::from_secs(2), over)
        .await
        .expect("refused at once")
        .unwrap();
    assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(over.headers().contains_key(header::RETRY_AFTER));
    // another connection still parks, and is answered by the publish like the first one's
    let (b, b_conn) = connect().await;
    let [other] = request(&b).await;
    let one_more = async {
        while o.parked() < crate::store::MAX_PARKED_PER_CONNECTION + 1 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), one_more)
        .await
        .expect("another connection parks");
    part(&s, 0, 1);
    assert_eq!(other.await.unwrap().status(), StatusCode::OK);
    for h in held {
        assert_eq!(h.await.unwrap().status(), StatusCode::OK);
    }
    drop((a, b));
    a_conn.abort();
    b_conn.abort();
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
