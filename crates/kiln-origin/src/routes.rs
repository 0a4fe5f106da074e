//! Playback routes.
//!
//! Cache-Control follows draft-pantos-hls-rfc8216bis App. B.1 for a CDN in front: blocking playlist answers live
//! 6 × TD (the URL names the state it waited for), plain playlist answers ½ TD, blocking failures 4 × TD, other
//! failures 1 × TD; parts and init segments 6 × TD; complete segments a day (their URLs never repeat: media
//! sequence numbers start from the wall clock). The origin never sends `Age`. Media carries a strong `ETag`
//! (answered with 304 on `If-None-Match`) and honours single `Range` requests with 206.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kiln_http::lend::Lend;
use kiln_http::openapi::ErrorEnvelope;
use kiln_llhls::packager::{parse_resource, PartPos, Resource, Skip};
use kiln_llhls::{BlockRequest, Decision, Snapshot};
use tokio::time::Instant;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::published::{Playlist, Published};
use crate::store::{Origin, Rendition, RenditionKind, StreamOrigin};

/// A playback answer: a response, or a `200` of a published resource made of prepared lines ([`lines`]).
pub type Reply = kiln_http::h1::Reply<axum::body::Body>;

/// Content type of playlists.
pub const M3U8: &str = "application/vnd.apple.mpegurl";

/// Cache lifetime of complete segments.
const SEGMENT_MAX_AGE: u64 = 86_400;

/// The playback router (`/live/...`), with the [`Origin`] as state; its routes are documented (OpenAPI) where
/// they are registered.
pub fn router() -> OpenApiRouter<Origin> {
    OpenApiRouter::new()
        .routes(routes!(master))
        .routes(routes!(mpd))
        .routes(routes!(media))
        .routes(routes!(utc_time))
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// With signing configured: the caller's valid token (to append to the URIs we return), or 403 at once. Without
/// it, a query naming `exp` or `sig` gets 400 (never stored): caches key on them (they are the token when signing
/// is on), so random values would each be a new key, an uncollapsed request that parks here.
#[allow(clippy::result_large_err)]
fn check_token(
    origin: &Origin,
    stream: &str,
    query: Option<&str>,
) -> Result<Option<String>, Response> {
    let Some(signer) = &origin.signer else {
        let named = |name: &str| {
            query.is_some_and(|q| {
                q.split('&').any(|kv| {
                    kv.split('=')
                        .next()
                        .is_some_and(|k| k.eq_ignore_ascii_case(name))
                })
            })
        };
        if named("exp") || named("sig") {
            let mut r = error(
                StatusCode::BAD_REQUEST,
                0,
                "this origin does not sign playback URLs: exp and sig are not accepted",
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Err(r);
        }
        return Ok(None);
    };
    signer
        .verify(stream, query, (unix_now_ms() / 1000) as u64)
        .map(Some)
        .map_err(|e| {
            let mut r = error(StatusCode::FORBIDDEN, 0, &e.to_string());
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        })
}

/// `urn:mpeg:dash:utc:http-iso:2014` clock for DASH players.
#[utoipa::path(get, path = "/time", tag = "playback",
    responses((status = 200, description = "The time, ISO 8601 in UTC with milliseconds", content_type = "text/plain", body = String)))]
async fn utc_time() -> Response {
    let now = unix_now_ms();
    reply(
        StatusCode::OK,
        "text/plain; charset=utf-8",
        0,
        Bytes::from(kiln_llhls::time::format_unix_ms(now)),
    )
}

/// The LL-DASH MPD (held, like the multivariant playlist, until every rendition has published a part).
#[utoipa::path(get, path = "/live/{stream}/manifest.mpd", tag = "playback",
    params(("stream" = String, Path, description = "The stream's id"), ("exp" = Option<u64>, Query, description = "Signed playback: expiry (Unix s); only when the origin signs URLs"),
        ("sig" = Option<String>, Query, description = "Signed playback: the signature; only when the origin signs URLs")),
    responses(
        (status = 200, description = "The LL-DASH MPD", content_type = "application/dash+xml", body = String),
        (status = 400, description = "`exp`/`sig` given to an origin that does not sign", body = ErrorEnvelope),
        (status = 403, description = "Signed playback: the token is missing, expired or wrong", body = ErrorEnvelope),
        (status = 404, description = "No such stream (or, for the MPD, a stream with a passthrough rendition)", body = ErrorEnvelope),
        (status = 503, description = "The stream is starting (not every rendition has a part yet), or too many requests wait", body = ErrorEnvelope),
    ))]
async fn mpd(
    State(origin): State<Origin>,
    Path(stream): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let gzip = crate::encoding::wants_gzip(&headers);
    drop(headers);
    mpd_answer(&origin, &stream, query.as_deref(), gzip)
        .await
        .into_response()
}

fn mpd_answer(origin: &Origin, stream: &str, query: Option<&str>, gzip: bool) -> LiveAnswer {
    if origin.get(stream).is_some_and(|s| s.follows_source_gop()) {
        return LiveAnswer::now(error(
            StatusCode::NOT_FOUND,
            60,
            "no LL-DASH for a stream with a passthrough rendition: its segments follow the source's GOP, which \
             the MPD's fixed segment template cannot number (HLS only)",
        ));
    }
    stream_document(origin, stream, query, move |s, token| {
        let doc = s
            .mpd_prepared(unix_now_ms(), "/time")?
            .get(token.as_deref(), gzip);
        let max_age = (u64::from(s.target_duration_s()) / 2).max(1);
        Some((doc, "application/dash+xml", max_age))
    })
}

/// A stream-level document (multivariant playlist, MPD): checks the token, then holds the request (at most
/// 3 × TD, bounded parking) until `render` can produce it, i.e. until every rendition has published.
fn stream_document<F>(origin: &Origin, stream: &str, query: Option<&str>, render: F) -> LiveAnswer
where
    F: Fn(&StreamOrigin, &Option<String>) -> Option<(Playlist, &'static str, u64)> + Send + 'static,
{
    let token = match check_token(origin, stream, query) {
        Ok(t) => t,
        Err(r) => return LiveAnswer::now(r),
    };
    let Some(s) = origin.get(stream) else {
        return LiveAnswer::now(error(StatusCode::NOT_FOUND, 2, "no such stream"));
    };
    let mut rx = s.subscribe_changes();
    rx.borrow_and_update();
    if let Some((doc, content_type, max_age)) = render(&s, &token) {
        return LiveAnswer::now(document_reply(content_type, max_age, doc));
    }
    let Some(place) = origin.park() else {
        return LiveAnswer::now(too_many_parked());
    };
    let td = u64::from(s.target_duration_s());
    let mut park = Park::new(rx, place, Duration::from_secs(3 * td));
    LiveAnswer::later(async move {
        loop {
            if !matches!(park.next().await, Woken::Published) {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    0,
                    "stream is starting: renditions not ready yet",
                )
                .into();
            }
            if let Some((doc, content_type, max_age)) = render(&s, &token) {
                return document_reply(content_type, max_age, doc);
            }
        }
    })
}

/// Whether segment `msn` is being produced (or is the next one): LL-DASH asks for it early
/// (`availabilityTimeOffset`) and gets it chunk by chunk.
fn segment_in_progress(snap: &Snapshot, msn: u64) -> bool {
    !snap.ended
        && snap
            .last
            .is_some_and(|last| msn == last.msn || msn == last.msn + 1)
        && !snap.closed.iter().any(|(m, _)| *m == msn)
}

/// Streams segment `msn` part by part as each is published (chunked transfer), ending when the segment closes.
/// Each part goes out whole, so the bytes are exactly the segment's once it is complete.
fn stream_segment(origin: &Origin, r: Arc<Rendition>, msn: u64, td: u64) -> Response {
    use futures_util::stream;
    let Some(guard) = origin.park() else {
        return too_many_parked();
    };
    let content_type = media_type(&r);
    let rx = r.subscribe();
    // (rendition, its publishes, next part, the parking place: dropped once the body is cut short)
    let state = (r, rx, 0u64, Some(guard));
    let body = stream::unfold(state, move |(r, mut rx, mut next, guard)| async move {
        guard.as_ref()?;
        loop {
            let snap = rx.borrow_and_update().clone();
            if let Some(b) = r.part(PartPos::new(msn, next)) {
                return Some((Ok::<_, std::io::Error>(b), (r, rx, next + 1, guard)));
            }
            // a GAP part has no bytes (the segment's own bytes skip it too): the next part follows
            if r.is_gap(PartPos::new(msn, next)) {
                next += 1;
                continue;
            }
            if snap.closed.iter().any(|(m, n)| *m == msn && next >= *n) {
                return None;
            }
            // cut short (the stream ended, the segment left the window, no part for 3 x TD): the body ends with
            // an error, so neither a client nor a cache takes what came for the whole segment
            let deadline = Instant::now() + Duration::from_secs(3 * td);
            let more = !snap.ended
                && msn >= snap.first_retained_msn
                && matches!(
                    tokio::time::timeout_at(deadline, rx.changed()).await,
                    Ok(Ok(()))
                );
            if !more {
                let e = std::io::Error::other("the segment ended before it was complete");
                return Some((Err(e), (r, rx, next, None)));
            }
        }
    });
    let mut resp = axum::body::Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, cache_control(6 * td));
    resp
}

/// Lifetimes below this have their Cache-Control value built once ([`cache_control`]): every lifetime the routes
/// give (multiples of TD up to 6 × TD, for a TD of up to 10 s).
const PREBUILT_MAX_AGES: u64 = 64;

/// `public, max-age=N` (`no-cache` for 0). The common values are built once and shared: a clone is a reference
/// count, not a formatted string and an allocation per response.
fn cache_control(max_age: u64) -> HeaderValue {
    static PREBUILT: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    static SEGMENT: HeaderValue = HeaderValue::from_static("public, max-age=86400");
    let build = |max_age: u64| {
        if max_age == 0 {
            HeaderValue::from_static("no-cache")
        } else {
            HeaderValue::from_str(&format!("public, max-age={max_age}")).expect("ascii")
        }
    };
    if max_age == SEGMENT_MAX_AGE {
        return SEGMENT.clone();
    }
    if max_age < PREBUILT_MAX_AGES {
        let table = PREBUILT.get_or_init(|| (0..PREBUILT_MAX_AGES).map(build).collect());
        return table[max_age as usize].clone();
    }
    build(max_age)
}

/// A `200` with a playlist or MPD, gzipped as prepared when it is ([`crate::encoding`]), with the headers the
/// compression layer would add (`Content-Encoding` and `Vary` on a gzipped one, `Vary` on one it could compress),
/// so that it passes the layer as it is. Prepared lines where the lifetime has one ([`lines`]).
fn document_reply(content_type: &'static str, max_age: u64, doc: Playlist) -> Reply {
    let vary: &'static [u8] = if doc.gzipped {
        lines::GZIPPED
    } else if doc.body.len() >= crate::encoding::MIN_COMPRESSED {
        lines::VARY
    } else {
        b""
    };
    let (Some(ct), Some(cc)) = (
        lines::content_type(content_type),
        lines::cache_control(max_age),
    ) else {
        let mut r = reply(StatusCode::OK, content_type, max_age, doc.body);
        if !vary.is_empty() {
            let h = r.headers_mut();
            if doc.gzipped {
                h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        return r.into();
    };
    let p = kiln_http::h1::Prepared::new(doc.body).with(ct).with(cc);
    if vary.is_empty() {
        p.into()
    } else {
        p.with(vary).into()
    }
}

fn reply(status: StatusCode, content_type: &'static str, max_age: u64, body: Bytes) -> Response {
    let mut r = Response::new(axum::body::Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    // room for every header a media answer gets here and on its way out (validators, CORS, Vary): the map is
    // allocated once, not grown and rehashed
    h.reserve(12);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, cache_control(max_age));
    r
}

/// An error's Cache-Control: `max_age` (App. B.1) for players, and `s-maxage=1` for the shared caches between
/// them and kilnd (the shields in `deploy/edge/`, a CDN), which keep an error about a second (nginx counts TTLs in
/// whole seconds: up to 2): long enough to collapse a storm of identical failing requests, short enough that a
/// transient error (a part asked for just before a restart) does not outlive its cause at the edge. nginx,
/// Varnish, CloudFront, Fastly and Cloudflare all take `s-maxage` over `max-age`.
fn error_cache_control(max_age: u64) -> HeaderValue {
    if max_age > 1 {
        HeaderValue::from_str(&format!("public, max-age={max_age}, s-maxage=1")).expect("ascii")
    } else {
        cache_control(max_age)
    }
}

/// An error in the control APIs' JSON envelope (`{"error": {"code", "message"}}`), cacheable for `max_age` like
/// the answer it replaces (a CDN must not hammer the origin with a request that will fail again), a second at
/// most in a shared cache ([`error_cache_control`]).
fn error(status: StatusCode, max_age: u64, msg: &str) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "error",
    };
    let mut r = kiln_http::json_error(status, code, msg);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, error_cache_control(max_age));
    r
}

/// 503 past the parking limit (counted by [`Origin::park`]), with `Retry-After: 1`: the next part is due within a
/// second, and a client (or CDN) that retries then finds it published and needs no place.
/// The answer to a parked request its state did not answer in time. Cacheable for a second: a CDN's collapsed
/// waiters share it instead of queueing one by one behind an uncacheable answer.
fn parked_too_long() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        1,
        "the requested part did not appear within 3 target durations",
    )
}

/// What a playlist answer needs of its stream besides the rendition's state: TARGETDURATION, and whether it is
/// final ([`StreamOrigin::timing`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) td: u64,
    pub(crate) known: bool,
}

fn too_many_parked() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        1,
        "too many requests are waiting for new parts; retry",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Why a query naming a delivery directive twice (or in another case) is refused. Its 400 is never stored: a
/// cache keys it on one of the values, and must not answer that value's requests with it.
const AMBIGUOUS_QUERY: &str =
    "each of _HLS_msn, _HLS_part and _HLS_skip at most once, spelt exactly so";

/// What a playlist request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaylistQuery {
    pub block: BlockRequest,
    pub skip: Skip,
}

/// Parses `_HLS_msn`, `_HLS_part` and `_HLS_skip`; other parameters (e.g. tokens) are ignored. A directive
/// given twice, or spelt in another case, is refused: a cache in front keys on one value (nginx's `$arg_*` takes
/// the first, case-insensitively) and must get the answer to that one, not to another.
pub fn parse_query(query: Option<&str>) -> Result<PlaylistQuery, &'static str> {
    let mut q = PlaylistQuery {
        block: BlockRequest::default(),
        skip: Skip::No,
    };
    let mut seen = [false; 3];
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let directive = ["_HLS_msn", "_HLS_part", "_HLS_skip"]
            .iter()
            .position(|d| d.eq_ignore_ascii_case(k));
        if let Some(i) = directive {
            if seen[i] || !["_HLS_msn", "_HLS_part", "_HLS_skip"].contains(&k) {
                return Err(AMBIGUOUS_QUERY);
            }
            seen[i] = true;
        }
        // one spelling per number, as for the resource names and tokens: `05`, `+5` and `5` would be three keys
        // at every cache in front, each missing the others and parking here
        let num = || {
            let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
            (digits && (v.len() == 1 || !v.starts_with('0')))
                .then(|| v.parse::<u64>().ok())
                .flatten()
                .ok_or("_HLS_msn and _HLS_part must be non-negative decimal integers without leading zeros")
        };
        match k {
            "_HLS_msn" => q.block.msn = Some(num()?),
            "_HLS_part" => q.block.part = Some(num()?),
            "_HLS_skip" => {
                q.skip = match v {
                    "YES" => Skip::Yes,
                    "v2" => Skip::V2,
                    _ => return Err("_HLS_skip must be YES or v2"),
                }
            }
            _ => {}
        }
    }
    Ok(q)
}

/// The multivariant playlist (held until every rendition has published a part).
#[utoipa::path(get, path = "/live/{stream}/master.m3u8", tag = "playback",
    params(("stream" = String, Path, description = "The stream's id"), ("exp" = Option<u64>, Query, description = "Signed playback: expiry (Unix s); only when the origin signs URLs"),
        ("sig" = Option<String>, Query, description = "Signed playback: the signature; only when the origin signs URLs")),
    responses(
        (status = 200, description = "The multivariant playlist", content_type = "application/vnd.apple.mpegurl", body = String),
        (status = 400, description = "`exp`/`sig` given to an origin that does not sign", body = ErrorEnvelope),
        (status = 403, description = "Signed playback: the token is missing, expired or wrong", body = ErrorEnvelope),
        (status = 404, description = "No such stream (or, for the MPD, a stream with a passthrough rendition)", body = ErrorEnvelope),
        (status = 503, description = "The stream is starting (not every rendition has a part yet), or too many requests wait", body = ErrorEnvelope),
    ))]
async fn master(
    State(origin): State<Origin>,
    Path(stream): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let gzip = crate::encoding::wants_gzip(&headers);
    drop(headers);
    master_answer(&origin, &stream, query.as_deref(), gzip)
        .await
        .into_response()
}

fn master_answer(origin: &Origin, stream: &str, query: Option<&str>, gzip: bool) -> LiveAnswer {
    stream_document(origin, stream, query, move |s, token| {
        let doc = s.master_prepared()?.get(token.as_deref(), gzip);
        let max_age = 6 * u64::from(s.target_duration_s());
        Some((doc, M3U8, max_age))
    })
}

/// A rendition's media playlist (blocking reload, delta updates) or one of its resources: the init segment,
/// segments (a segment in progress is sent part by part as each is published, for LL-DASH), parts (a hinted part
/// is held until complete).
#[utoipa::path(get, path = "/live/{stream}/{rendition}/{file}", tag = "playback",
    params(
        ("stream" = String, Path, description = "The stream's id"),
        ("rendition" = String, Path, description = "The rendition's name", example = "720p"),
        ("file" = String, Path, description = "`index.m3u8`, `init.mp4`, `seg{msn}.m4s`, `part{msn}.{index}.m4s`", example = "index.m3u8"),
        ("_HLS_msn" = Option<u64>, Query, description = "Blocking playlist reload: wait until this media sequence number exists"),
        ("_HLS_part" = Option<u64>, Query, description = "Blocking playlist reload: and this part of it (needs `_HLS_msn`)"),
        ("_HLS_skip" = Option<String>, Query, description = "Delta update: `YES` (or `v2`, also skipping date ranges)"),
        ("exp" = Option<u64>, Query, description = "Signed playback: expiry (Unix s); only when the origin signs URLs"),
        ("sig" = Option<String>, Query, description = "Signed playback: the signature; only when the origin signs URLs"),
    ),
    responses(
        (status = 200, description = "The playlist or the media", content(("application/vnd.apple.mpegurl"), ("video/mp4"), ("audio/mp4"))),
        (status = 206, description = "The requested range of the media", content(("video/mp4"), ("audio/mp4"))),
        (status = 304, description = "Not modified (`If-None-Match` matched the media's ETag)"),
        (status = 400, description = "A bad delivery directive, or `exp`/`sig` given to an origin that does not sign", body = ErrorEnvelope),
        (status = 403, description = "Signed playback: the token is missing, expired or wrong", body = ErrorEnvelope),
        (status = 404, description = "No such stream, rendition or resource (or gone from the window)", body = ErrorEnvelope),
        (status = 416, description = "Range not satisfiable", body = ErrorEnvelope),
        (status = 503, description = "The media did not arrive in time, or too many requests wait (`Retry-After`)", body = ErrorEnvelope),
    ))]
async fn media(
    State(origin): State<Origin>,
    Path((stream, rendition, file)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    req: axum::extract::Request,
) -> Response {
    // the two headers a media answer looks at, taken out of the request (the `HeaderMap` extractor would copy
    // the whole map, and a parked request would hold it)
    let conditions = Conditions::of(req.headers());
    drop(req);
    media_answer(
        &origin,
        (&stream, &rendition, &file),
        query.as_deref(),
        conditions,
        None,
    )
    .await
    .into_response()
}

/// What [`media`] answers, for `(stream, rendition, file)`.
fn media_answer(
    origin: &Origin,
    (stream, rendition, file): (&str, &str, &str),
    query: Option<&str>,
    conditions: Conditions,
    lend: Option<Lend<'_>>,
) -> LiveAnswer {
    let token = match check_token(origin, stream, query) {
        Ok(t) => t,
        Err(r) => return LiveAnswer::now(r),
    };
    let Some(s) = origin.get(stream) else {
        return LiveAnswer::now(error(StatusCode::NOT_FOUND, 2, "no such stream"));
    };
    let Some(r) = s.rendition(rendition).cloned() else {
        return LiveAnswer::now(error(StatusCode::NOT_FOUND, 2, "no such rendition"));
    };
    let td = u64::from(s.target_duration_s());
    if file == "index.m3u8" {
        return match parse_query(query) {
            Ok(q) => playlist(origin, s, r, (q, token, conditions.gzip), lend),
            Err(AMBIGUOUS_QUERY) => {
                let mut r = error(StatusCode::BAD_REQUEST, 0, AMBIGUOUS_QUERY);
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                LiveAnswer::now(r)
            }
            Err(msg) => LiveAnswer::now(error(StatusCode::BAD_REQUEST, 4 * td, msg)),
        };
    }
    let Some(res) = parse_resource(file) else {
        return LiveAnswer::now(error(StatusCode::NOT_FOUND, td, "no such resource"));
    };
    let awaited = match res {
        Resource::Segment(msn) => {
            return LiveAnswer::now(match r.segment(msn) {
                Some(b) => {
                    let tag = r.tag(res);
                    media_reply(&conditions, media_type(&r), tag, SEGMENT_MAX_AGE, b)
                }
                None if segment_in_progress(&r.snapshot(), msn) => {
                    stream_segment(origin, r, msn, td).into()
                }
                None => error(StatusCode::NOT_FOUND, td, "no such segment").into(),
            })
        }
        Resource::Init(gen) => Awaited::Init(gen),
        Resource::Part(pos) => Awaited::Part(pos),
    };
    let media = MediaWait {
        r,
        awaited,
        td,
        conditions,
    };
    media.answer(origin)
}

/// What of the request decides a media answer: the two headers that decide its status, and whether the
/// compression layer would gzip it ([`crate::encoding::wants_gzip`]: a playlist is then sent gzipped as
/// prepared).
#[derive(Debug, Default)]
struct Conditions {
    if_none_match: Option<HeaderValue>,
    range: Option<HeaderValue>,
    gzip: bool,
}

impl Conditions {
    /// Copies of the two headers (a clone would share the connection's read buffer, which a parked request would
    /// then keep alive and the server replace with a new one).
    fn of(headers: &HeaderMap) -> Self {
        let copy = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| HeaderValue::from_bytes(v.as_bytes()).ok())
        };
        Conditions {
            if_none_match: copy(header::IF_NONE_MATCH),
            range: copy(header::RANGE),
            gzip: crate::encoding::wants_gzip(headers),
        }
    }
}

/// 200/206/304/416 for a complete media resource whose `ETag` line is `tag` ([`Rendition::tag`]): a `200` (no
/// `If-None-Match`, no `Range`) is prepared lines ([`lines`]) where its lifetime has one.
fn media_reply(
    conditions: &Conditions,
    content_type: &'static str,
    tag: Bytes,
    max_age: u64,
    body: Bytes,
) -> Reply {
    if conditions.if_none_match.is_none() && conditions.range.is_none() {
        if let (Some(ct), Some(cc)) = (
            lines::content_type(content_type),
            lines::cache_control(max_age),
        ) {
            return kiln_http::h1::Prepared::new(body)
                .with(ct)
                .with(cc)
                .with_shared(tag)
                .into();
        }
    }
    media_response(conditions, content_type, &tag, max_age, body).into()
}

/// [`media_reply`] as a response.
fn media_response(
    conditions: &Conditions,
    content_type: &'static str,
    tag: &Bytes,
    max_age: u64,
    body: Bytes,
) -> Response {
    // the value of `etag: "…"\r\n`
    let etag_value = HeaderValue::from_maybe_shared(tag.slice("etag: ".len()..tag.len() - 2))
        .expect("a resource name is ascii");
    let etag = etag_value.to_str().expect("built from ascii");
    let matches = conditions
        .if_none_match
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let range = conditions.range.as_ref().and_then(|v| v.to_str().ok());
        match range.map(|r| (r, parse_range(r, body.len() as u64))) {
            // no Range, or one this answer ignores (RFC 9110 §14.2: several ranges, another unit, bad syntax)
            None => reply(StatusCode::OK, content_type, max_age, body),
            Some((r, None)) if !unsatisfiable(r) => {
                reply(StatusCode::OK, content_type, max_age, body)
            }
            Some((_, range)) => match range {
                Some((start, end)) => {
                    let mut r = reply(
                        StatusCode::PARTIAL_CONTENT,
                        content_type,
                        max_age,
                        body.slice(start as usize..=end as usize),
                    );
                    let cr = format!("bytes {start}-{end}/{}", body.len());
                    r.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&cr).expect("ascii"),
                    );
                    r
                }
                None => {
                    let mut r = error(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        0,
                        "range not satisfiable",
                    );
                    let cr = format!("bytes */{}", body.len());
                    r.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&cr).expect("ascii"),
                    );
                    r
                }
            },
        }
    };
    let status = resp.status();
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag_value.clone());
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // the resource's lifetime for the resource (200, 206, 304); a 416 keeps its error's ("no-cache")
    if status != StatusCode::RANGE_NOT_SATISFIABLE {
        h.insert(header::CACHE_CONTROL, cache_control(max_age));
    }
    resp
}

/// Whether `spec` is one well-formed `bytes=` range that no byte of the resource satisfies (416), as opposed to a
/// Range header an answer ignores (200): several ranges (kiln sends no multipart answers), another unit, or
/// bad syntax. Asked only of a header [`parse_range`] did not take.
fn unsatisfiable(spec: &str) -> bool {
    let Some(one) = spec.trim().strip_prefix("bytes=") else {
        return false;
    };
    let Some((a, b)) = one.split_once('-') else {
        return false;
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), b.trim().is_empty()) {
        // `-n`: unsatisfiable only as `-0` (or on an empty resource)
        (true, false) => number(b).is_some(),
        // `a-` and `a-b` with a <= b: past the end
        (false, true) => number(a).is_some(),
        (false, false) => matches!((number(a), number(b)), (Some(a), Some(b)) if a <= b),
        (true, true) => false,
    }
}

/// Parses a single `bytes=` range against a resource of `len` bytes: `a-b`, `a-` (to the end; an end past the
/// resource, like the 2^53−1 of open-ended hint ranges, is clamped) or `-n` (the last n bytes). Multiple ranges
/// and unsatisfiable ones give `None`.
pub fn parse_range(spec: &str, len: u64) -> Option<(u64, u64)> {
    let spec = spec.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || len == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len - 1
        } else {
            b.parse::<u64>().ok()?.min(len - 1)
        };
        (start, end)
    };
    (start <= end && start < len).then_some((start, end))
}

/// A media playlist: at once when the rendition's state answers the request, else parked until a publish does
/// (a blocking reload, or a plain request while the stream starts).
/// A request on kiln's HTTP/1.1 (`lend`) lends its socket while it waits, and the publish that satisfies it
/// writes its answer ([`lent`]); others wait on the rendition's publishes.
fn playlist(
    origin: &Origin,
    s: Arc<StreamOrigin>,
    r: Arc<Rendition>,
    (q, token, gzip): (PlaylistQuery, Option<String>, bool),
    lend: Option<Lend<'_>>,
) -> LiveAnswer {
    let mut rx = r.subscribe();
    let snap = rx.borrow_and_update().clone();
    let served = |body| {
        r.note_served(&snap);
        body
    };
    if let Some(resp) = playlist_step(s.timing(), (q, &token, gzip), &snap, served) {
        return LiveAnswer::now(resp);
    }
    let Some(place) = origin.park() else {
        return LiveAnswer::now(too_many_parked());
    };
    // A request that cannot be answered within 3 × TD gets 503 (§6.2.5.2).
    // (a stream still learning its source's GOP: its first segment may take two of the longest GOPs a plan allows)
    let wait_s = if s.target_known() {
        3 * u64::from(s.target_duration_s())
    } else {
        30
    };
    let park = Park::new(rx, place, Duration::from_secs(wait_s));
    let form = lent::Form { q, token, gzip };
    let form = match lend.map(Lend::lend) {
        Some(loan) => match lent::park(r.clone(), loan, form, &snap, &origin.fanout) {
            Ok(wait) => return LiveAnswer::later(wait.answer(park, move || s.timing())),
            Err(form) => form,
        },
        None => form,
    };
    drop(snap);
    subscribed(origin, s, r, form, park)
}

/// A playlist request waiting on its rendition's publishes.
fn subscribed(
    origin: &Origin,
    s: Arc<StreamOrigin>,
    r: Arc<Rendition>,
    lent::Form { q, token, gzip }: lent::Form,
    mut park: Park<Arc<Published>>,
) -> LiveAnswer {
    let fanout = origin.fanout.clone();
    LiveAnswer::later(async move {
        loop {
            let td = u64::from(s.target_duration_s());
            match park.next().await {
                Woken::Published => {}
                Woken::Closed => return error(StatusCode::NOT_FOUND, td, "stream ended").into(),
                Woken::TimedOut => return parked_too_long().into(),
            }
            let snap = park.current();
            // a blocking reload woken by the publish of the part it asked for: its answer measures the fan-out
            // (publish → written) when the server is done with it
            let woken = |body: Bytes| {
                r.note_served(&snap);
                match q.block.msn.zip(q.block.part) {
                    Some((m, p)) => r.stamped(body, PartPos::new(m, p), &fanout),
                    None => body,
                }
            };
            if let Some(resp) = playlist_step(s.timing(), (q, &token, gzip), &snap, woken) {
                return resp;
            }
        }
    })
}

/// A playlist request against the rendition's state `snap`: the playlist (its body passed through `ready`, which
/// notes the answer as served from `snap` when it is given, [`Rendition::served_from`], and stamps a woken
/// request's answer for the fan-out) or a refusal; `None`: wait.
fn playlist_step(
    t: Timing,
    (q, token, gzip): (PlaylistQuery, &Option<String>, bool),
    snap: &Arc<Published>,
    ready: impl FnOnce(Bytes) -> Bytes,
) -> Option<Reply> {
    let td = t.td;
    let blocking = q.block.is_blocking();
    // Until the first segment is complete a playlist holds parts only, which players that read whole segments
    // (ffmpeg, non-LL clients) take for an empty stream: hold plain requests until then (≤ 1 segment + 1 part).
    let decision = if (snap.closed.is_empty() || !t.known) && !snap.ended && !blocking {
        Decision::Wait
    } else if !t.known && !snap.ended {
        // TARGETDURATION is not final yet: nothing is served before it is (it never changes after); a request
        // the rules refuse whatever the state (`_HLS_part` alone, an MSN too far ahead) is refused now, not
        // after the wait
        match snap.decide(q.block) {
            refused @ Decision::Reject(_) => refused,
            _ => Decision::Wait,
        }
    } else {
        snap.decide(q.block)
    };
    match decision {
        Decision::Ready => {
            let max_age = if blocking { 6 * td } else { (td / 2).max(1) };
            let mut doc = snap.playlist(q.skip, token.as_deref(), gzip);
            doc.body = ready(doc.body);
            Some(document_reply(M3U8, max_age, doc))
        }
        Decision::Reject(msg) => Some(error(StatusCode::BAD_REQUEST, 4 * td, msg).into()),
        Decision::Wait => None,
    }
}

fn media_type(r: &Rendition) -> &'static str {
    match r.info.kind {
        RenditionKind::Video { .. } => "video/mp4",
        RenditionKind::Audio { .. } => "audio/mp4",
    }
}

/// A media resource that may have to be waited for: an init segment or a part.
#[derive(Debug, Clone, Copy)]
enum Awaited {
    Init(u32),
    Part(PartPos),
}

impl Awaited {
    fn resource(self) -> Resource {
        match self {
            Awaited::Init(gen) => Resource::Init(gen),
            Awaited::Part(pos) => Resource::Part(pos),
        }
    }

    /// `Some(Ok)`: it is there; `Some(Err)`: it never will be; `None`: it is coming (the hinted part, an earlier
    /// unpublished one, or the first init segment while the stream starts): hold the request.
    fn state(self, r: &Rendition, snap: &Snapshot) -> Option<Result<Bytes, ()>> {
        match self {
            Awaited::Init(gen) => match r.init_gen(gen) {
                Some(b) => Some(Ok(b)),
                // generation 0 is coming while the stream starts; others exist only once announced
                None if gen == 0 && !snap.ended && snap.last.is_none() => None,
                None => Some(Err(())),
            },
            Awaited::Part(pos) => match r.part(pos) {
                Some(b) => Some(Ok(b)),
                None if snap.part_may_appear(pos) => None,
                None => Some(Err(())),
            },
        }
    }
}

/// A request for an init segment or a part, and what its answer is made of: all a parked one holds.
struct MediaWait {
    r: Arc<Rendition>,
    awaited: Awaited,
    td: u64,
    conditions: Conditions,
}

impl MediaWait {
    /// At once if the resource is there (or never will be), else parked until it is published (for at most
    /// 3 × TD). A resource is sent only once complete (never trickled).
    fn answer(self, origin: &Origin) -> LiveAnswer {
        let mut rx = self.r.subscribe();
        let snap = rx.borrow_and_update().clone();
        if let Some(state) = self.awaited.state(&self.r, &snap) {
            return LiveAnswer::now(self.reply(state));
        }
        drop(snap);
        let Some(place) = origin.park() else {
            return LiveAnswer::now(too_many_parked());
        };
        let mut park = Park::new(rx, place, Duration::from_secs(3 * self.td));
        let fanout = origin.fanout.clone();
        LiveAnswer::later(async move {
            loop {
                match park.next().await {
                    Woken::Published => {}
                    Woken::Closed => {
                        return error(StatusCode::NOT_FOUND, self.td, "stream ended").into()
                    }
                    Woken::TimedOut => {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            1,
                            "the resource did not appear within 3 target durations",
                        )
                        .into()
                    }
                }
                let snap = park.current();
                if let Some(mut state) = self.awaited.state(&self.r, &snap) {
                    // a held part woken by its publish: its answer measures the fan-out (publish → written)
                    if let (Awaited::Part(p), Ok(body)) = (self.awaited, &mut state) {
                        *body = self.r.stamped(std::mem::take(body), p, &fanout);
                    }
                    return self.reply(state);
                }
            }
        })
    }

    fn reply(&self, state: Result<Bytes, ()>) -> Reply {
        match state {
            Ok(body) => media_reply(
                &self.conditions,
                media_type(&self.r),
                self.r.tag(self.awaited.resource()),
                6 * self.td,
                body,
            ),
            Err(()) => error(StatusCode::NOT_FOUND, self.td, "no such resource").into(),
        }
    }
}

mod direct;
pub(crate) mod lent;
mod lines;
mod park;
pub use direct::LiveGet;
pub use park::LiveAnswer;
use park::{Park, Woken};

#[cfg(test)]
mod tests;
