//! The scheduler's HTTP API. Errors are `{"error": {"code", "message"}}` like kilnd's.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use kiln_model::node::{Heartbeat, HeartbeatAck};
use kiln_model::stream::valid_stream_id;
use kiln_model::StreamRequest;
use serde_json::{json, Value};

use crate::admit::{self, JoinError, Joined};
use crate::store::{Phase, StreamRecord};
use crate::{fleet, PlaceError, Scheduler};

const MAX_BODY: usize = 256 * 1024;

type S = State<Arc<Scheduler>>;

use kiln_http::json_error as error;

/// Control routes (`/v1/…` but `/v1/leader` and heartbeats) need the fleet's bearer token when one is configured;
/// heartbeats need the join token or the fleet token, or an open fleet ([`crate::admit`]); `/play`, `/metrics`,
/// `/healthz` and `/v1/leader` never need a token.
pub fn router(s: Arc<Scheduler>) -> Router {
    let control = Router::new()
        .route("/v1/streams", get(list_streams).post(create_stream))
        .route("/v1/streams/{id}", get(get_stream).delete(delete_stream))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}/drain", post(drain).delete(undrain))
        .route("/v1/fleet/headroom", get(headroom))
        .route("/v1/fleet/consolidate", post(consolidate))
        .route("/v1/jobs", post(crate::vod::submit))
        .route(
            "/v1/jobs/{id}",
            get(crate::vod::get_job).delete(crate::vod::delete_job),
        );
    let control = kiln_http::require_bearer(
        control,
        s.config.api_token.as_deref(),
        "the fleet token: --api-token-env",
    );
    Router::new()
        .merge(control)
        // its own credential check (join token, fleet token, or an open fleet), before the body is read
        .route("/v1/nodes/{id}/heartbeat", post(heartbeat))
        .route("/v1/leader", get(leader))
        .route("/play/{stream}/{*path}", get(play))
        .route("/vod/{id}/{*path}", get(crate::vod::redirect))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(kiln_http::no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(s)
}

/// A write reached a follower: 307 to the leader (method and body are kept), or 503 while nobody leads.
async fn not_leader(s: &Scheduler, path: &str) -> Response {
    s.metrics.refusals.with_label_values(&["not_leader"]).inc();
    match s.leader().await {
        Some(l) if l.id != s.config.instance_id => {
            let mut r = kiln_http::json_error_with(
                StatusCode::TEMPORARY_REDIRECT,
                "not_leader",
                format!("{} leads (epoch {})", l.id, l.epoch),
                [("leader", json!(l.url))],
            );
            if let Ok(v) = header::HeaderValue::from_str(&format!("{}{path}", l.url)) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        _ => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_leader",
                "no scheduler holds the leader lease right now; retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
    }
}

fn view(r: &StreamRecord) -> Value {
    json!({
        "id": r.id,
        "phase": r.phase,
        "node": r.node,
        "gpu": r.gpu,
        "request": r.request,
        "booked": r.demand,
        "epoch": r.epoch,
        "moves": r.moves,
        "created_unix_ms": r.created_unix_ms,
        "placed_unix_ms": r.placed_unix_ms,
        "playback": format!("/play/{}/master.m3u8", r.id),
    })
}

fn place_error(s: &Scheduler, e: PlaceError) -> Response {
    let (status, code, reason) = match &e {
        PlaceError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request", "invalid"),
        PlaceError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "conflict"),
        PlaceError::NoRoom(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_capacity",
            "capacity",
        ),
        PlaceError::NotLeader => (StatusCode::SERVICE_UNAVAILABLE, "not_leader", "not_leader"),
        PlaceError::Store(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "store",
        ),
    };
    s.metrics.refusals.with_label_values(&[reason]).inc();
    error(status, code, e.to_string())
}

/// `POST /v1/streams` `{"id": "x", "source": "test:", "preset": "live-720p-abr", …}`: 201 placed and started,
/// 200 when the same stream already exists, 400 invalid, 409 same id with another spec, 429 no room.
async fn create_stream(State(s): S, body: Result<Bytes, BytesRejection>) -> Response {
    let Some(_) = s.leading() else {
        return not_leader(&s, "/v1/streams").await;
    };
    let Ok(body) = body else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {MAX_BODY} bytes"),
        );
    };
    let mut v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return place_error(
                &s,
                PlaceError::Invalid("the body must be a JSON object".into()),
            )
        }
        Err(e) => return place_error(&s, PlaceError::Invalid(format!("invalid JSON: {e}"))),
    };
    let id = match v.as_object_mut().and_then(|o| o.remove("id")) {
        Some(Value::String(id)) if valid_stream_id(&id) => id,
        Some(_) => {
            return place_error(
                &s,
                PlaceError::Invalid(
                    "`id` must be 1–64 characters of letters, digits, `-` and `_`".into(),
                ),
            )
        }
        None => return place_error(&s, PlaceError::Invalid("`id` is required".into())),
    };
    let req: StreamRequest = match serde_json::from_value(v) {
        Ok(r) => r,
        Err(e) => return place_error(&s, PlaceError::Invalid(format!("invalid stream spec: {e}"))),
    };
    match s.create(&id, req).await {
        Ok((r, created)) => {
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, Json(view(&r))).into_response()
        }
        Err(PlaceError::NotLeader) => not_leader(&s, "/v1/streams").await,
        Err(e) => place_error(&s, e),
    }
}

async fn list_streams(State(s): S) -> Response {
    match s.store.streams().await {
        Ok(rs) => Json(rs.iter().map(view).collect::<Vec<_>>()).into_response(),
        Err(e) => place_error(&s, e.into()),
    }
}

async fn get_stream(State(s): S, Path(id): Path<String>) -> Response {
    match s.store.stream(&id).await {
        Ok(Some(r)) => Json(view(&r)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("stream `{id}` does not exist"),
        ),
        Err(e) => place_error(&s, e.into()),
    }
}

async fn delete_stream(State(s): S, Path(id): Path<String>) -> Response {
    match s.delete(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("stream `{id}` does not exist"),
        ),
        Err(PlaceError::NotLeader) => not_leader(&s, &format!("/v1/streams/{id}")).await,
        Err(e) => place_error(&s, e),
    }
}

/// `GET /v1/nodes`: every known node with its state, capacity, what the scheduler booked there and what it runs.
async fn list_nodes(State(s): S) -> Response {
    let (nodes, records) = match (s.store.nodes().await, s.store.streams().await) {
        (Ok(n), Ok(r)) => (n, r),
        (Err(e), _) | (_, Err(e)) => return place_error(&s, e.into()),
    };
    let view = fleet::view(&nodes, &records, &HashSet::new());
    let out: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let v = view.iter().find(|v| v.id == n.id);
            let placed: Vec<&str> = records
                .iter()
                .filter(|r| r.phase == Phase::Placed && r.node.as_deref() == Some(n.id.as_str()))
                .map(|r| r.id.as_str())
                .collect();
            json!({
                "id": n.id,
                "state": fleet::node_state(n),
                "url": n.heartbeat.as_ref().map(|h| &h.url),
                "host": n.heartbeat.as_ref().map(|h| h.capacity.host),
                "gpus": n.heartbeat.as_ref().map(|h| &h.capacity.gpus),
                "booked": v.map(|v| v.host_used),
                "placed": placed,
                "running": n.heartbeat.as_ref().map(|h| h.capacity.streams.iter().map(|s| &s.id).collect::<Vec<_>>()),
            })
        })
        .collect();
    Json(out).into_response()
}

/// A refused heartbeat: the status and envelope for each [`JoinError`] (401 carries the Bearer challenge).
fn join_error(s: &Scheduler, id: &str, e: JoinError) -> Response {
    s.metrics.refusals.with_label_values(&["join"]).inc();
    let status = match &e {
        JoinError::Unauthorized { .. } => {
            // no log line: anyone can send these, and a flood would fill the log (the counter counts them)
            let mut r = error(StatusCode::UNAUTHORIZED, e.code(), e.to_string());
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"kiln\""),
            );
            return r;
        }
        JoinError::Closed | JoinError::NotListed(_) => StatusCode::FORBIDDEN,
        JoinError::BadUrl(_) => StatusCode::BAD_REQUEST,
        JoinError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
        JoinError::Repoint { .. } => StatusCode::CONFLICT,
    };
    if matches!(e, JoinError::Closed) {
        // the scheduler said so at start; anyone can send these
        tracing::debug!(node = %id, "heartbeat refused: the fleet is closed");
    } else {
        tracing::warn!(node = %id, code = e.code(), error = %e, "heartbeat refused");
    }
    error(status, e.code(), e.to_string())
}

/// `POST /v1/nodes/{id}/heartbeat` (from kilnd's agent). Any scheduler accepts it, once the node is admitted
/// ([`crate::admit`]): credential (401/403), body and id (400), `--nodes` (403), the advertised URL (400, 422), and
/// in an open fleet no move of a live node (409).
async fn heartbeat(
    State(s): S,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Heartbeat>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let joined = match s
        .config
        .nodes
        .authenticate(s.config.api_token.as_deref(), authorization)
    {
        Ok(j) => j,
        Err(e) => return join_error(&s, &id, e),
    };
    let hb = match body {
        Ok(Json(hb)) => hb,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    if !valid_stream_id(&id) || hb.capacity.node_id != id {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the node id must be a token and match the report's node_id",
        );
    }
    if let Err(e) = s.config.nodes.check_id(&id) {
        return join_error(&s, &id, e);
    }
    let host = match admit::parse_url(&hb.url) {
        Ok(h) => h,
        Err(e) => return join_error(&s, &id, e),
    };
    if let Err(e) = s.names.check(&s.config.nodes, &host).await {
        return join_error(&s, &id, e);
    }
    if joined == Joined::Open {
        match s.store.live_url(&id).await {
            Ok(Some(url)) if url != hb.url => {
                return join_error(
                    &s,
                    &id,
                    JoinError::Repoint {
                        id: id.clone(),
                        url,
                    },
                )
            }
            Ok(_) => {}
            Err(e) => return place_error(&s, e.into()),
        }
    }
    if let Err(e) = s.store.heartbeat(&id, &hb, s.config.heartbeat_ttl()).await {
        return place_error(&s, e.into());
    }
    s.metrics.heartbeats.inc();
    let epoch = match s.leading() {
        Some(e) => e,
        None => s.leader().await.map_or(0, |l| l.epoch),
    };
    Json(HeartbeatAck {
        epoch,
        interval_ms: s.config.interval.as_millis() as u64,
    })
    .into_response()
}

async fn set_drain(s: &Scheduler, id: &str, on: bool) -> Response {
    match s.store.set_draining(id, on).await {
        Ok(true) => Json(json!({"id": id, "draining": on})).into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("node `{id}` is not known"),
        ),
        Err(e) => place_error(s, e.into()),
    }
}

/// `POST /v1/nodes/{id}/drain`: the node keeps what it runs and gets nothing new.
async fn drain(State(s): S, Path(id): Path<String>) -> Response {
    set_drain(&s, &id, true).await
}

/// `DELETE /v1/nodes/{id}/drain`: the node takes streams again.
async fn undrain(State(s): S, Path(id): Path<String>) -> Response {
    set_drain(&s, &id, false).await
}

/// `GET /v1/fleet/headroom`: per preset, how many more streams of it (alone) the live, accepting nodes can take
/// now, placed the way the scheduler would place them ([`fleet::headroom`]: per node in closed form, so the answer
/// costs O(nodes × presets) and holds no lock while it is computed; it used to place stream after stream, which
/// took seconds on the threads that also answer heartbeats).
async fn headroom(State(s): S) -> Response {
    let (nodes, records) = match (s.store.nodes().await, s.store.streams().await) {
        (Ok(n), Ok(r)) => (n, r),
        (Err(e), _) | (_, Err(e)) => return place_error(&s, e.into()),
    };
    let live: Vec<_> = nodes.iter().filter_map(|n| n.heartbeat.as_ref()).collect();
    let base = fleet::view(&nodes, &records, &HashSet::new());
    let mut presets = BTreeMap::new();
    for name in s.config.presets.names() {
        let req = StreamRequest {
            source: "test:".into(),
            preset: Some(name.to_string()),
            ..Default::default()
        };
        let Ok(alts) = fleet::alternatives(&s.config.presets, "headroom", &req, &live) else {
            presets.insert(name.to_string(), json!({"streams": 0}));
            continue;
        };
        let h = fleet::headroom(&base, &alts);
        presets.insert(
            name.to_string(),
            json!({"streams": h.streams, "on_gpu": h.on_gpu}),
        );
    }
    Json(json!({
        "nodes": {"alive": nodes.iter().filter(|n| fleet::node_state(n) == "alive").count(),
                  "draining": nodes.iter().filter(|n| fleet::node_state(n) == "draining").count(),
                  "dead": nodes.iter().filter(|n| fleet::node_state(n) == "dead").count()},
        "presets": presets,
    }))
    .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct ConsolidateQuery {
    max_moves: Option<usize>,
}

/// `POST /v1/fleet/consolidate[?max_moves=N]` (leader): empties lightly loaded nodes onto nodes in use, moving at
/// most N streams (default 10). Answers the moves.
async fn consolidate(
    State(s): S,
    axum::extract::Query(q): axum::extract::Query<ConsolidateQuery>,
) -> Response {
    match s.consolidate(q.max_moves.unwrap_or(10).min(10_000)).await {
        Ok(moves) => Json(json!({
            "moves": moves.iter().map(|(id, from, to)| json!({"stream": id, "from": from, "to": to})).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(PlaceError::NotLeader) => not_leader(&s, "/v1/fleet/consolidate").await,
        Err(e) => place_error(&s, e),
    }
}

/// `GET /v1/leader`: who leads, and whether this scheduler does.
async fn leader(State(s): S) -> Response {
    let l = s.leader().await;
    Json(json!({
        "instance": s.config.instance_id,
        "leading": s.leading().is_some(),
        "epoch": s.leading(),
        "leader": l,
    }))
    .into_response()
}

/// `GET /play/{stream}/{path…}`: 302 to the node serving the stream now (query kept, e.g. LL-HLS directives).
async fn play(
    State(s): S,
    Path((stream, path)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    if !valid_stream_id(&stream)
        || path
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return error(StatusCode::NOT_FOUND, "not_found", "no such playback path");
    }
    let rec = match s.store.stream(&stream).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("stream `{stream}` does not exist"),
            )
        }
        Err(e) => return place_error(&s, e.into()),
    };
    let url = match (rec.phase, &rec.node) {
        (Phase::Placed, Some(node)) => match s.store.nodes().await {
            Ok(nodes) => nodes
                .into_iter()
                .find(|n| &n.id == node)
                .and_then(|n| n.heartbeat)
                .map(|h| h.url),
            Err(e) => return place_error(&s, e.into()),
        },
        _ => None,
    };
    let Some(url) = url else {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_placed",
            format!("stream `{stream}` is being placed; retry shortly"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    };
    let q = q.map(|q| format!("?{q}")).unwrap_or_default();
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, format!("{url}/live/{stream}/{path}{q}")),
            // the node can change on failover: caches must not keep the redirect
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}

async fn metrics(State(s): S) -> Response {
    s.refresh_gauges().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admit::NodeAdmission;
    use crate::store::Store;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use kiln_model::node::{CapacityReport, HostReport};
    use std::time::Duration;
    use tower::ServiceExt;

    const JOIN: &str = "join-token-0123456789";
    const FLEET: &str = "fleet-token-0123456789";

    fn scheduler(api_token: Option<&str>, nodes: NodeAdmission) -> Arc<Scheduler> {
        let config = crate::Config {
            instance_id: "a".into(),
            advertise_url: "http://sched".into(),
            interval: Duration::from_secs(1),
            presets: kiln_config::Presets::builtin(),
            strategy: kiln_binpack::Strategy::Kiln,
            api_token: api_token.map(str::to_string),
            nodes,
        };
        Arc::new(Scheduler::new(config, Store::memory(5)))
    }

    fn tokens() -> NodeAdmission {
        NodeAdmission {
            token: Some(JOIN.into()),
            ..Default::default()
        }
    }

    fn open() -> NodeAdmission {
        NodeAdmission {
            open: true,
            ..Default::default()
        }
    }

    fn report(id: &str, url: &str) -> Heartbeat {
        Heartbeat {
            url: url.into(),
            capacity: CapacityReport {
                node_id: id.into(),
                epoch: 1,
                fence_epoch: 0,
                host: HostReport::default(),
                gpus: vec![],
                gpu_inventory: Default::default(),
                streams: vec![],
                headroom: Default::default(),
                demands: Default::default(),
                vod: None,
            },
        }
    }

    /// Sends one request through the router: status, headers and the body as JSON (`Null` when it is not JSON).
    async fn send(
        s: &Arc<Scheduler>,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut rb = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            rb = rb.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => rb
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => rb.body(Body::empty()),
        }
        .unwrap();
        let res = router(s.clone()).oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (parts.status, parts.headers, v)
    }

    async fn beat(
        s: &Arc<Scheduler>,
        id: &str,
        url: &str,
        token: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let hb = serde_json::to_value(report(id, url)).unwrap();
        send(
            s,
            "POST",
            &format!("/v1/nodes/{id}/heartbeat"),
            token,
            Some(hb),
        )
        .await
    }

    async fn node_urls(s: &Scheduler) -> Vec<(String, String)> {
        s.store
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .filter_map(|n| Some((n.id, n.heartbeat?.url)))
            .collect()
    }

    /// A placed record for `id` on `node`, written the way the leader writes it.
    async fn placed(s: &Scheduler, id: &str, node: &str) {
        let rec = StreamRecord {
            id: id.into(),
            request: StreamRequest::default(),
            phase: Phase::Placed,
            node: Some(node.into()),
            gpu: None,
            demand: None,
            alternatives: vec![],
            epoch: 5,
            created_unix_ms: 1,
            placed_unix_ms: 1,
            moves: 0,
        };
        s.store.save(5, &rec, None).await.unwrap();
    }

    async fn play_location(s: &Arc<Scheduler>, stream: &str) -> String {
        let (st, h, _) = send(s, "GET", &format!("/play/{stream}/master.m3u8"), None, None).await;
        assert_eq!(st, StatusCode::FOUND);
        h[header::LOCATION].to_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn heartbeats_need_the_join_token_which_opens_nothing_else() {
        let s = scheduler(Some(FLEET), tokens());
        // none, a wrong one, one for another realm: 401 with the challenge, before the body is even read
        for token in [None, Some("join-token-0123456780"), Some("nope")] {
            let (st, h, v) = beat(&s, "evil", "http://10.0.0.66:8080", token).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{token:?}");
            assert!(h[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Bearer"));
            assert_eq!(v["error"]["code"], "unauthorized");
            let m = v["error"]["message"].as_str().unwrap();
            assert!(
                m.contains("--node-token-env") && m.contains("--api-token-env"),
                "{m}"
            );
        }
        let (st, _, _) = send(
            &s,
            "POST",
            "/v1/nodes/evil/heartbeat",
            None,
            Some(json!({})),
        )
        .await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "a malformed body does not get past the token"
        );
        assert!(node_urls(&s).await.is_empty());
        // the join token and the fleet token both admit
        let (st, _, v) = beat(&s, "n1", "http://10.0.0.1:8080", Some(JOIN)).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["interval_ms"], 1000);
        let (st, _, _) = beat(&s, "n2", "http://10.0.0.2:8080", Some(FLEET)).await;
        assert_eq!(st, StatusCode::OK);
        // the join token does not open the control API: no listing, no stream, no drain
        let body = json!({"id": "s1", "source": "test:"});
        for (method, path, body) in [
            ("GET", "/v1/nodes", None),
            ("POST", "/v1/streams", Some(body)),
            ("POST", "/v1/nodes/n1/drain", None),
            ("GET", "/v1/fleet/headroom", None),
        ] {
            let (st, _, _) = send(&s, method, path, Some(JOIN), body).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{method} {path}");
        }
        let (st, _, v) = send(&s, "GET", "/v1/nodes", Some(FLEET), None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
        // a node that has the token may move (a daemon restarted elsewhere): /play follows it
        placed(&s, "s1", "n1").await;
        assert_eq!(
            play_location(&s, "s1").await,
            "http://10.0.0.1:8080/live/s1/master.m3u8"
        );
        let (st, _, _) = beat(&s, "n1", "http://10.0.0.9:8080", Some(JOIN)).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            play_location(&s, "s1").await,
            "http://10.0.0.9:8080/live/s1/master.m3u8"
        );
        assert_eq!(s.metrics.refusals.with_label_values(&["join"]).get(), 4);
    }

    #[tokio::test]
    async fn a_closed_fleet_admits_nobody_and_the_allow_list_names_who_joins() {
        // no token and no --open-fleet: nobody joins, and the answer says which flag to use
        let s = scheduler(None, NodeAdmission::default());
        let (st, _, v) = beat(&s, "n1", "http://10.0.0.1:8080", None).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert_eq!(v["error"]["code"], "fleet_closed");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("--node-token-env") && m.contains("--open-fleet"),
            "{m}"
        );
        let (st, _, _) = beat(&s, "n1", "http://10.0.0.1:8080", Some(JOIN)).await;
        assert_eq!(
            st,
            StatusCode::FORBIDDEN,
            "a token nobody configured opens nothing"
        );
        assert!(node_urls(&s).await.is_empty());
        // --nodes n1: only n1 joins, with the token
        let s = scheduler(
            None,
            NodeAdmission {
                ids: Some(["n1".to_string()].into()),
                ..tokens()
            },
        );
        let (st, _, v) = beat(&s, "evil", "http://10.0.0.66:8080", Some(JOIN)).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert_eq!(v["error"]["code"], "node_not_allowed");
        assert!(v["error"]["message"].as_str().unwrap().contains("--nodes"));
        let (st, _, _) = beat(&s, "n1", "http://10.0.0.1:8080", Some(JOIN)).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            node_urls(&s).await,
            vec![("n1".to_string(), "http://10.0.0.1:8080".to_string())]
        );
    }

    #[tokio::test]
    async fn an_advertised_url_must_be_plain_http_to_an_allowed_address() {
        let s = scheduler(None, tokens());
        for (url, status, code) in [
            ("http://169.254.169.254", 422, "node_url_refused"),
            (
                "http://169.254.169.254:80/latest/meta-data",
                422,
                "node_url_refused",
            ),
            ("http://[fd00:ec2::254]", 422, "node_url_refused"),
            (
                "http://[::ffff:169.254.169.254]:8080",
                422,
                "node_url_refused",
            ),
            ("http://127.0.0.1:8080", 422, "node_url_refused"),
            ("http://0.0.0.0:8080", 422, "node_url_refused"),
            ("http://localhost:8080", 422, "node_url_refused"),
            ("http://224.0.0.1:8080", 422, "node_url_refused"),
            ("ftp://10.0.0.1", 400, "bad_request"),
            ("http://user:pw@10.0.0.1:8080", 400, "bad_request"),
            ("http://10.0.0.1:8080/?a=b", 400, "bad_request"),
            ("10.0.0.1:8080", 400, "bad_request"),
        ] {
            let (st, _, v) = beat(&s, "evil", url, Some(JOIN)).await;
            assert_eq!(st.as_u16(), status, "{url}: {v}");
            assert_eq!(v["error"]["code"], code, "{url}: {v}");
            if status == 422 {
                let m = v["error"]["message"].as_str().unwrap();
                assert!(m.contains("--node-networks"), "{url}: {m}");
            }
        }
        assert!(node_urls(&s).await.is_empty(), "nothing refused was stored");
        // public and private addresses join; --node-networks opens loopback for a one-host fleet
        for url in [
            "http://10.0.0.1:8080",
            "https://[fd12::1]:8443",
            "http://203.0.114.9",
        ] {
            assert_eq!(
                beat(&s, "n1", url, Some(JOIN)).await.0,
                StatusCode::OK,
                "{url}"
            );
        }
        let lo = scheduler(
            None,
            NodeAdmission {
                networks: crate::admit::NodeNetworks {
                    extra: kiln_model::net::UrlPolicy::parse("127.0.0.0/8").unwrap(),
                },
                ..tokens()
            },
        );
        assert_eq!(
            beat(&lo, "n1", "http://127.0.0.1:8080", Some(JOIN)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            beat(&lo, "n2", "http://169.254.169.254", Some(JOIN))
                .await
                .0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[tokio::test]
    async fn in_an_open_fleet_a_forged_heartbeat_cannot_re_point_a_live_node() {
        let s = scheduler(None, open());
        assert_eq!(
            beat(&s, "n1", "http://10.0.0.1:8080", None).await.0,
            StatusCode::OK
        );
        placed(&s, "s1", "n1").await;
        // the same node again: fine; somebody else's URL for it while it lives: 409, and viewers stay put
        assert_eq!(
            beat(&s, "n1", "http://10.0.0.1:8080", None).await.0,
            StatusCode::OK
        );
        let (st, _, v) = beat(&s, "n1", "http://10.0.0.66:8080", None).await;
        assert_eq!(st, StatusCode::CONFLICT);
        assert_eq!(v["error"]["code"], "node_url_conflict");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--node-token-env"));
        assert_eq!(
            play_location(&s, "s1").await,
            "http://10.0.0.1:8080/live/s1/master.m3u8"
        );
        // the address policy holds in an open fleet too
        let (st, _, _) = beat(&s, "evil", "http://169.254.169.254", None).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(node_urls(&s).await.len(), 1);
    }

    #[tokio::test]
    async fn in_an_open_fleet_a_node_moves_once_its_heartbeat_has_expired() {
        let s = scheduler(None, open());
        let hb = report("n1", "http://10.0.0.1:8080");
        // a heartbeat that expires at once: the node is dead, so a new URL for it is a new life
        s.store
            .heartbeat("n1", &hb, Duration::from_millis(0))
            .await
            .unwrap();
        assert_eq!(
            beat(&s, "n1", "http://10.0.0.2:8080", None).await.0,
            StatusCode::OK
        );
        assert_eq!(
            node_urls(&s).await,
            vec![("n1".to_string(), "http://10.0.0.2:8080".to_string())]
        );
    }

    /// Headroom per preset from the closed form: with nodes that price the preset, it counts what fits, and
    /// placing a stream makes it shrink.
    #[tokio::test]
    async fn headroom_counts_what_fits_and_shrinks_with_bookings() {
        use kiln_model::capacity::Resources;
        use kiln_model::node::PresetDemand;
        let s = scheduler(None, open());
        let mut hb = report("n1", "http://10.0.0.1:8080");
        hb.capacity.host.capacity = Resources {
            cpu_millicores: 10_000,
            memory_mib: 10_000,
            ..Default::default()
        };
        let cpu = Resources {
            cpu_millicores: 1000,
            memory_mib: 100,
            ..Default::default()
        };
        hb.capacity.demands.insert(
            "live-audio-only".into(),
            PresetDemand {
                cpu,
                gpu: None,
                pixel_rate: 0,
            },
        );
        s.store
            .heartbeat("n1", &hb, Duration::from_secs(60))
            .await
            .unwrap();
        let (st, _, v) = send(&s, "GET", "/v1/fleet/headroom", None, None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["nodes"]["alive"], 1);
        assert_eq!(v["presets"]["live-audio-only"]["streams"], 10, "{v}");
        assert_eq!(v["presets"]["live-audio-only"]["on_gpu"], 0);
        let rec = StreamRecord {
            demand: Some(kiln_binpack::Demand {
                host: cpu,
                gpu: None,
                pixel_rate: 0,
            }),
            ..StreamRecord {
                id: "a1".into(),
                request: StreamRequest::default(),
                phase: Phase::Placed,
                node: Some("n1".into()),
                gpu: None,
                demand: None,
                alternatives: vec![],
                epoch: 5,
                created_unix_ms: 1,
                placed_unix_ms: 1,
                moves: 0,
            }
        };
        s.store.save(5, &rec, None).await.unwrap();
        let (_, _, v) = send(&s, "GET", "/v1/fleet/headroom", None, None).await;
        assert_eq!(v["presets"]["live-audio-only"]["streams"], 9, "{v}");
    }
}
