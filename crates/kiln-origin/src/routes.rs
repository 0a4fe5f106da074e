//! Playback routes.
//!
//! Cache-Control follows draft-pantos-hls-rfc8216bis App. B.1 for a CDN in front: blocking playlist answers live
//! 6 × TD (the URL names the state it waited for), plain playlist answers ½ TD, blocking failures 4 × TD, other
//! failures 1 × TD; media (immutable once published) 6 × TD. The origin never sends `Age`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use kiln_llhls::packager::{parse_resource, PartPos, Resource};
use kiln_llhls::{BlockRequest, Decision};
use tokio::time::Instant;

use crate::store::{Origin, Rendition, RenditionKind, StreamOrigin};

/// Content type of playlists.
pub const M3U8: &str = "application/vnd.apple.mpegurl";

/// The playback router (`/live/...`), with the [`Origin`] as state.
pub fn router() -> Router<Origin> {
    Router::new()
        .route("/live/{stream}/master.m3u8", get(master))
        .route("/live/{stream}/{rendition}/{file}", get(media))
}

fn reply(status: StatusCode, content_type: &'static str, max_age: u64, body: Bytes) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let cc = if max_age == 0 {
        HeaderValue::from_static("no-cache")
    } else {
        HeaderValue::from_str(&format!("public, max-age={max_age}")).expect("ascii")
    };
    h.insert(header::CACHE_CONTROL, cc);
    r
}

fn error(status: StatusCode, max_age: u64, msg: &str) -> Response {
    reply(
        status,
        "text/plain; charset=utf-8",
        max_age,
        Bytes::from(format!("{msg}\n")),
    )
}

/// Parses `_HLS_msn` / `_HLS_part` (other parameters, e.g. tokens, are ignored).
fn parse_block(query: Option<&str>) -> Result<BlockRequest, &'static str> {
    let mut req = BlockRequest::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let num = || {
            v.parse::<u64>()
                .map_err(|_| "_HLS_msn and _HLS_part must be non-negative integers")
        };
        match k {
            "_HLS_msn" => req.msn = Some(num()?),
            "_HLS_part" => req.part = Some(num()?),
            _ => {}
        }
    }
    Ok(req)
}

async fn master(State(origin): State<Origin>, Path(stream): Path<String>) -> Response {
    let Some(s) = origin.get(&stream) else {
        return error(StatusCode::NOT_FOUND, 2, "no such stream");
    };
    let td = u64::from(s.config.target_duration_s);
    let mut rx = s.subscribe_changes();
    let deadline = Instant::now() + Duration::from_secs(3 * td);
    loop {
        rx.borrow_and_update();
        if let Some(text) = s.master() {
            return reply(StatusCode::OK, M3U8, 6 * td, Bytes::from(text));
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    0,
                    "stream is starting: renditions not ready yet",
                )
            }
        }
    }
}

async fn media(
    State(origin): State<Origin>,
    Path((stream, rendition, file)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(s) = origin.get(&stream) else {
        return error(StatusCode::NOT_FOUND, 2, "no such stream");
    };
    let Some(r) = s.rendition(&rendition).cloned() else {
        return error(StatusCode::NOT_FOUND, 2, "no such rendition");
    };
    if file == "index.m3u8" {
        return match parse_block(query.as_deref()) {
            Ok(q) => playlist(&s, &r, q).await,
            Err(msg) => error(
                StatusCode::BAD_REQUEST,
                4 * u64::from(s.config.target_duration_s),
                msg,
            ),
        };
    }
    match parse_resource(&file) {
        Some(res) => resource(&s, &r, res).await,
        None => error(StatusCode::NOT_FOUND, 2, "no such resource"),
    }
}

async fn playlist(s: &StreamOrigin, r: &Rendition, q: BlockRequest) -> Response {
    let td = u64::from(s.config.target_duration_s);
    let mut rx = r.subscribe();
    // A request that cannot be answered within 3 × TD gets 503 (§6.2.5.2).
    let deadline = Instant::now() + Duration::from_secs(3 * td);
    loop {
        let snap = rx.borrow_and_update().clone();
        // Until the first segment is complete a playlist holds parts only, which players that read whole segments
        // (ffmpeg, non-LL clients) take for an empty stream: hold plain requests until then (≤ 1 segment + 1 part).
        let decision = if snap.closed.is_empty() && !snap.ended {
            if q.is_blocking() {
                snap.decide(q)
            } else {
                Decision::Wait
            }
        } else {
            snap.decide(q)
        };
        match decision {
            Decision::Ready => {
                let max_age = if q.is_blocking() {
                    6 * td
                } else {
                    (td / 2).max(1)
                };
                return reply(StatusCode::OK, M3U8, max_age, snap.playlist.clone());
            }
            Decision::Reject(msg) => return error(StatusCode::BAD_REQUEST, 4 * td, msg),
            Decision::Wait => match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return error(StatusCode::NOT_FOUND, td, "stream ended"),
                Err(_) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        0,
                        "the requested part did not appear within 3 target durations",
                    )
                }
            },
        }
    }
}

fn media_type(r: &Rendition) -> &'static str {
    match r.info.kind {
        RenditionKind::Video { .. } => "video/mp4",
        RenditionKind::Audio { .. } => "audio/mp4",
    }
}

async fn resource(s: &StreamOrigin, r: &Arc<Rendition>, res: Resource) -> Response {
    let td = u64::from(s.config.target_duration_s);
    let ok = |b: Bytes| reply(StatusCode::OK, media_type(r), 6 * td, b);
    match res {
        Resource::Segment(msn) => match r.segment(msn) {
            Some(b) => ok(b),
            None => error(StatusCode::NOT_FOUND, td, "no such segment"),
        },
        Resource::Init => wait_for(r, td, |r, snap| match r.init() {
            Some(b) => Some(Ok(b)),
            None if snap.ended => Some(Err(())),
            None => None,
        })
        .await
        .map_or_else(|e| e, ok),
        Resource::Part(pos) => wait_for(r, td, |r, snap| part_state(r, snap, pos))
            .await
            .map_or_else(|e| e, ok),
    }
}

/// `Some(Ok)`: the part is there; `Some(Err)`: it never will be; `None`: it is the hinted (or an earlier
/// unpublished) part — hold the request.
fn part_state(
    r: &Rendition,
    snap: &kiln_llhls::Snapshot,
    pos: PartPos,
) -> Option<Result<Bytes, ()>> {
    match r.part(pos) {
        Some(b) => Some(Ok(b)),
        None if snap.part_may_appear(pos) => None,
        None => Some(Err(())),
    }
}

/// Holds a request until `check` gives an answer, a publish at a time, for at most 3 × TD. A resource is sent
/// only once complete (never trickled).
async fn wait_for<F>(r: &Arc<Rendition>, td: u64, check: F) -> Result<Bytes, Response>
where
    F: Fn(&Rendition, &kiln_llhls::Snapshot) -> Option<Result<Bytes, ()>>,
{
    let mut rx = r.subscribe();
    let deadline = Instant::now() + Duration::from_secs(3 * td);
    loop {
        let snap = rx.borrow_and_update().clone();
        match check(r, &snap) {
            Some(Ok(b)) => return Ok(b),
            Some(Err(())) => return Err(error(StatusCode::NOT_FOUND, td, "no such resource")),
            None => match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(error(StatusCode::NOT_FOUND, td, "stream ended")),
                Err(_) => {
                    return Err(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        0,
                        "the resource did not appear within 3 target durations",
                    ))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RenditionInfo;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use kiln_llhls::{PackagerConfig, PartIn};
    use tower::ServiceExt;

    fn origin() -> (Origin, Arc<StreamOrigin>) {
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
                segment_ns: 2_000_000_000,
                target_duration_s: 2,
                part_target_ms: 334,
                window_segments: 4,
                retain_segments: 2,
                wallclock_origin_unix_ms: 0,
            },
        );
        o.insert(s.clone());
        (o, s)
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
            },
        )
        .unwrap();
    }

    async fn get(o: &Origin, uri: &str) -> (StatusCode, String, Option<String>) {
        let res = router()
            .with_state(o.clone())
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
            get(&o, "/live/s/v/seg-1.m4s").await.0,
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
        ] {
            let (st, _, cc) = get(&o, &format!("/live/s/v/index.m3u8?{q}")).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{q}");
            assert_eq!(cc.as_deref(), Some("public, max-age=8"));
        }
    }

    #[tokio::test]
    async fn blocked_request_and_hinted_part_wake_on_publish() {
        let (o, s) = origin();
        part(&s, 0, 0);
        let o2 = o.clone();
        let pl =
            tokio::spawn(
                async move { get(&o2, "/live/s/v/index.m3u8?_HLS_msn=0&_HLS_part=1").await },
            );
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
}
