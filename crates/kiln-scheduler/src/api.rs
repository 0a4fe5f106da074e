//! The scheduler's HTTP API. Errors are `{"error": {"code", "message"}}` like kilnd's.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use kiln_http::openapi::ErrorEnvelope;
use kiln_model::node::{Heartbeat, HeartbeatAck};
use kiln_model::stream::valid_stream_id;
use kiln_model::StreamRequest;
use kiln_model::StreamState;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admit::{self, JoinError, Joined};
use crate::store::Phase;
use crate::{fleet, PlaceError, Scheduler};

mod views;
pub use views::*;

const MAX_BODY: usize = 256 * 1024;
/// How long a heartbeat's body may take to arrive once its token is checked (a node sends it in one go).
const HEARTBEAT_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

type S = State<Arc<Scheduler>>;

use kiln_http::json_error as error;

/// Control routes (`/v1/…` but `/v1/leader` and heartbeats) need the fleet's bearer token when one is configured;
/// heartbeats need the join token or the fleet token, or an open fleet ([`crate::admit`]); `/play`, `/metrics`,
/// `/healthz` and `/v1/leader` never need a token.
pub fn router(s: Arc<Scheduler>) -> Router {
    router_with_document(s).0
}

/// What `/v1/openapi.json` begins with.
const DOCUMENT: &str = "kiln-scheduler: places live streams on kilnd nodes (`/v1/streams`), routes VOD jobs \
(`/v1/jobs`), drains nodes, reports the fleet's headroom, and redirects viewers to the node serving a stream \
(`/play`, `/vod`). Writes go to the leader: a follower answers 307 to it. Errors are \
`{\"error\": {\"code\", \"message\"}}`. Control routes take the fleet token when the scheduler has one.";

/// [`router`], and its OpenAPI document (built from the same registrations, so the two cannot differ).
pub fn router_with_document(s: Arc<Scheduler>) -> (Router, utoipa::openapi::OpenApi) {
    let control = OpenApiRouter::new()
        .routes(routes!(list_streams, create_stream))
        .routes(routes!(get_stream, delete_stream))
        .routes(routes!(list_nodes))
        .routes(routes!(drain, undrain))
        .routes(routes!(headroom))
        .routes(routes!(consolidate))
        .routes(routes!(crate::vod::submit))
        .routes(routes!(crate::vod::get_job, crate::vod::delete_job));
    let control = kiln_http::require_bearer(
        control,
        s.config.api_token.as_deref(),
        "the fleet token: --api-token-env",
    );
    let api = OpenApiRouter::new()
        .merge(control)
        // its own credential check (join token, fleet token, or an open fleet), before the body is read
        .routes(routes!(heartbeat))
        .routes(routes!(leader))
        .routes(routes!(metrics))
        .routes(routes!(healthz))
        // the operators' page: static; its data comes from the API above (with the token the person gives)
        .routes(routes!(page))
        .routes(routes!(favicon));
    let api = kiln_http::openapi::routes_with_rest(api, routes!(play), "path");
    let api = kiln_http::openapi::routes_with_rest(api, routes!(crate::vod::redirect), "path");
    let (router, document) =
        kiln_http::openapi::finish(api.with_state(s), "kiln-scheduler", DOCUMENT);
    let router = router
        .fallback(kiln_http::no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY));
    (router, document)
}

/// `/healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /`: the operators' page.
#[utoipa::path(get, path = "/", tag = "page",
    responses((status = 200, description = "The page", content_type = "text/html", body = String)))]
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(PAGE)
}

/// `GET /favicon.ico`: none.
#[utoipa::path(get, path = "/favicon.ico", tag = "page", responses((status = 204, description = "No icon")))]
async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// 503 `store_unavailable`: the store (Redis) does not answer, so nothing new can be placed; what runs keeps
/// running.
fn store_unavailable(s: &Scheduler, why: &str) -> Response {
    s.metrics.refusals.with_label_values(&["store"]).inc();
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!(
            "the scheduler's store does not answer ({why}): new placements are refused until it does; running \
             streams are not affected"
        ),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// The page at `/`: nodes with a capacity bar per dimension and per GPU, state, streams, leader and epoch, fleet
/// headroom per preset, refreshed every 2 s from the API.
const PAGE: &str = include_str!("page.html");

/// A write reached a follower: 307 to the leader (method and body are kept), or 503 while nobody leads (with
/// the reason when the store does not answer).
async fn not_leader(s: &Scheduler, path: &str) -> Response {
    if let Some(why) = s.store_down() {
        return store_unavailable(s, &why);
    }
    s.metrics.refusals.with_label_values(&["not_leader"]).inc();
    match s.leader().await {
        // by address, not id: another process given this one's id (the lease tells them apart) still leads
        // somewhere else
        Some(l) if l.url != s.config.advertise_url => {
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
        PlaceError::Store(why) => return store_unavailable(s, why),
    };
    s.metrics.refusals.with_label_values(&[reason]).inc();
    error(status, code, e.to_string())
}

/// The body of `POST /v1/streams`: `id` beside the fields of a [`StreamRequest`] (the spec as kilnd's
/// `PUT /v1/streams/{id}` takes it). Documentation only: the handler takes `id` out, then reads the rest.
#[derive(Debug)]
struct PlaceRequest;

impl utoipa::PartialSchema for PlaceRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
        use utoipa::openapi::RefOr;
        let RefOr::T(Schema::Object(mut spec)) = <StreamRequest as utoipa::PartialSchema>::schema()
        else {
            unreachable!("a StreamRequest is an object");
        };
        let id = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9_-]{1,64}$"))
            .description(Some("The stream's id: 1–64 letters, digits, `-` and `_`"));
        spec.properties.insert("id".into(), id.into());
        spec.required.insert(0, "id".into());
        RefOr::T(Schema::Object(spec))
    }
}

impl utoipa::ToSchema for PlaceRequest {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        <StreamRequest as utoipa::ToSchema>::schemas(schemas);
    }
}

/// `POST /v1/streams` `{"id": "x", "source": "test:", "preset": "live-720p-abr", …}`: 201 placed and started,
/// 200 when the same stream already exists, 400 invalid, 409 same id with another spec, 429 no room.
#[utoipa::path(post, path = "/v1/streams", tag = "streams",
    request_body(content = PlaceRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Placed and started", body = StreamView),
        (status = 200, description = "The same stream exists already", body = StreamView),
        (status = 307, description = "This scheduler does not lead: `Location` names the leader (`not_leader`)", body = ErrorEnvelope),
        (status = 400, description = "Invalid JSON, id or spec", body = ErrorEnvelope),
        (status = 409, description = "The id exists with another spec", body = ErrorEnvelope),
        (status = 413, description = "Body over 256 KiB", body = ErrorEnvelope),
        (status = 429, description = "No node has room (`insufficient_capacity`)", body = ErrorEnvelope),
        (status = 503, description = "The store does not answer (`store_unavailable`), nobody leads (`no_leader`), or a new leader is still hearing from the nodes (`warming`); `Retry-After`", body = ErrorEnvelope),
    ))]
async fn create_stream(State(s): S, body: Result<Bytes, BytesRejection>) -> Response {
    if let Some(why) = s.store_down() {
        return store_unavailable(&s, &why);
    }
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
            (code, Json(StreamView::from(&r))).into_response()
        }
        Err(PlaceError::NotLeader) => not_leader(&s, "/v1/streams").await,
        // the leader (or its store) is new: nodes whose heartbeats lapsed meanwhile are not known to be gone
        Err(PlaceError::NoRoom(why)) if s.warming() => {
            s.metrics.refusals.with_label_values(&["warming"]).inc();
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "warming",
                format!(
                    "no node has room yet ({why}), but this scheduler only just took the lease or moved to a new \
                     Redis master and is still hearing from the nodes; retry shortly"
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        Err(e) => place_error(&s, e),
    }
}

/// `GET /v1/streams`: every stream the fleet runs, with its placement.
#[utoipa::path(get, path = "/v1/streams", tag = "streams",
    responses(
        (status = 200, description = "The streams", body = Vec<StreamView>),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
async fn list_streams(State(s): S) -> Response {
    match s.store.streams().await {
        Ok(rs) => Json(rs.iter().map(StreamView::from).collect::<Vec<_>>()).into_response(),
        Err(e) => place_error(&s, e.into()),
    }
}

/// `GET /v1/streams/{id}`: one stream and its placement.
#[utoipa::path(get, path = "/v1/streams/{id}", tag = "streams",
    params(("id" = String, Path, description = "The stream's id")),
    responses(
        (status = 200, description = "The stream", body = StreamView),
        (status = 404, description = "No such stream", body = ErrorEnvelope),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
async fn get_stream(State(s): S, Path(id): Path<String>) -> Response {
    match s.store.stream(&id).await {
        Ok(Some(r)) => Json(StreamView::from(&r)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("stream `{id}` does not exist"),
        ),
        Err(e) => place_error(&s, e.into()),
    }
}

/// `DELETE /v1/streams/{id}` (leader): stops the stream on its node and forgets it.
#[utoipa::path(delete, path = "/v1/streams/{id}", tag = "streams",
    params(("id" = String, Path, description = "The stream's id")),
    responses(
        (status = 204, description = "Stopped and forgotten"),
        (status = 307, description = "This scheduler does not lead: `Location` names the leader (`not_leader`)", body = ErrorEnvelope),
        (status = 404, description = "No such stream", body = ErrorEnvelope),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
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

/// `GET /v1/nodes`: every known node with its state, capacity, what the scheduler booked there (`booked`: the
/// larger of its own bookings and the node's, plus the CPU the node reserves for its viewers, `host.serving`) and
/// what it runs.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses(
        (status = 200, description = "The nodes", body = Vec<NodeView>),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
async fn list_nodes(State(s): S) -> Response {
    let (nodes, records) = match (s.store.nodes().await, s.store.streams().await) {
        (Ok(n), Ok(r)) => (n, r),
        (Err(e), _) | (_, Err(e)) => return place_error(&s, e.into()),
    };
    let view = fleet::view(&nodes, &records, &HashSet::new());
    let out: Vec<NodeView> = nodes
        .iter()
        .map(|n| {
            let v = view.iter().find(|v| v.id == n.id);
            let placed = records
                .iter()
                .filter(|r| r.phase == Phase::Placed && r.node.as_deref() == Some(n.id.as_str()))
                .map(|r| r.id.clone())
                .collect();
            let hb = n.heartbeat.as_ref();
            NodeView {
                id: n.id.clone(),
                state: fleet::node_state(n),
                evacuating: n.evacuating(),
                url: hb.map(|h| h.url.clone()),
                host: hb.map(|h| h.capacity.host),
                gpus: hb.map(|h| h.capacity.gpus.clone()),
                booked: v.map(|v| v.host_used),
                placed,
                // what it runs (ended, failed and stopping copies are on their way out)
                running: hb.map(|h| {
                    h.capacity
                        .streams
                        .iter()
                        .filter(|s| {
                            !matches!(
                                s.state,
                                StreamState::Ended | StreamState::Failed | StreamState::Stopping
                            )
                        })
                        .map(|s| s.id.clone())
                        .collect()
                }),
            }
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
#[utoipa::path(post, path = "/v1/nodes/{id}/heartbeat", tag = "nodes",
    params(("id" = String, Path, description = "The node's id (its report's `node_id`)")),
    request_body(content = Heartbeat, content_type = "application/json"),
    security(("fleet_token" = []), ()),
    responses(
        (status = 200, description = "Accepted: the leader's epoch and the heartbeat interval", body = HeartbeatAck),
        (status = 400, description = "Malformed report, id, or advertised URL", body = ErrorEnvelope),
        (status = 401, description = "The join token (or the fleet token) is required and was missing or wrong", body = ErrorEnvelope),
        (status = 403, description = "The fleet is closed, or the node is not in `--nodes`", body = ErrorEnvelope),
        (status = 408, description = "The body did not arrive within 10 s of the head", body = ErrorEnvelope),
        (status = 413, description = "The body is over 256 KiB", body = ErrorEnvelope),
        (status = 409, description = "Open fleet: a live node of this id reports another URL", body = ErrorEnvelope),
        (status = 422, description = "The advertised URL is refused (`--allow-networks`, name resolution), or the report is JSON of another shape", body = ErrorEnvelope),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
async fn heartbeat(State(s): S, Path(id): Path<String>, req: axum::extract::Request) -> Response {
    // the token before the body: a request without one is answered without reading (a client that trickles a
    // 256 KiB body holds no handler), and the body has a deadline of its own
    let authorization = req
        .headers()
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
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("a heartbeat is at most {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let read = axum::body::to_bytes(req.into_body(), MAX_BODY);
    let bytes = match tokio::time::timeout(HEARTBEAT_BODY_DEADLINE, read).await {
        Ok(Ok(b)) => b,
        // a body without a length that runs past the limit (axum's LengthLimitError)
        Ok(Err(e)) if e.to_string().contains("length limit") => return too_large(),
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the heartbeat body: {e}"),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the heartbeat body did not arrive in time",
            )
        }
    };
    // as axum's Json extractor answers: 400 for JSON that does not parse, 422 for JSON of another shape
    let hb: Heartbeat = match serde_json::from_slice(&bytes) {
        Ok(hb) => hb,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable",
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("Failed to parse the request body as JSON: {e}"),
            )
        }
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
    // the node is admitted: the epoch it follows raises the floor a new epoch must exceed, store or no store
    s.saw_fence(hb.capacity.fence_epoch);
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

async fn set_drain(s: &Scheduler, id: &str, on: bool, evacuate: bool) -> Response {
    match s.store.set_draining(id, on, evacuate).await {
        Ok(true) => Json(DrainView {
            id: id.to_string(),
            draining: on,
            evacuate: on && evacuate,
        })
        .into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("node `{id}` is not known"),
        ),
        Err(e) => place_error(s, e.into()),
    }
}

/// `?evacuate=true` on a drain.
#[derive(Debug, Default, serde::Deserialize)]
struct DrainQuery {
    #[serde(default)]
    evacuate: bool,
}

/// `POST /v1/nodes/{id}/drain[?evacuate=true]`: the node gets nothing new; it keeps what it runs, or with
/// `evacuate` its streams are moved elsewhere, make-before-break (as when the daemon itself drains on SIGTERM).
#[utoipa::path(post, path = "/v1/nodes/{id}/drain", tag = "nodes",
    params(
        ("id" = String, Path, description = "The node's id"),
        ("evacuate" = Option<bool>, Query, description = "Also move its streams elsewhere, make-before-break"),
    ),
    responses(
        (status = 200, description = "Draining", body = DrainView),
        (status = 400, description = "`evacuate` is not a boolean", body = ErrorEnvelope),
        (status = 404, description = "No such node", body = ErrorEnvelope),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
async fn drain(
    State(s): S,
    Path(id): Path<String>,
    q: Result<axum::extract::Query<DrainQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "`evacuate` must be true or false",
        );
    };
    set_drain(&s, &id, true, q.evacuate).await
}

/// `DELETE /v1/nodes/{id}/drain`: the node takes streams again (an evacuation stops; moves under way finish).
#[utoipa::path(delete, path = "/v1/nodes/{id}/drain", tag = "nodes",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "Accepting again", body = DrainView),
        (status = 404, description = "No such node", body = ErrorEnvelope),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
async fn undrain(State(s): S, Path(id): Path<String>) -> Response {
    set_drain(&s, &id, false, false).await
}

/// `GET /v1/fleet/headroom`: per preset, how many more streams of it (alone) the live, accepting nodes can take
/// now, placed the way the scheduler would place them ([`fleet::headroom`]: per node in closed form, so the answer
/// costs O(nodes × presets) and holds no lock while it is computed; it used to place stream after stream, which
/// took seconds on the threads that also answer heartbeats).
#[utoipa::path(get, path = "/v1/fleet/headroom", tag = "fleet",
    responses(
        (status = 200, description = "Nodes by state, and per preset the streams the fleet takes now", body = HeadroomView),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
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
            presets.insert(
                name.to_string(),
                PresetHeadroom {
                    streams: 0,
                    on_gpu: None,
                },
            );
            continue;
        };
        let h = fleet::headroom(&base, &alts);
        presets.insert(
            name.to_string(),
            PresetHeadroom {
                streams: h.streams,
                on_gpu: Some(h.on_gpu),
            },
        );
    }
    let count = |state: &str| {
        nodes
            .iter()
            .filter(|n| fleet::node_state(n) == state)
            .count()
    };
    Json(HeadroomView {
        nodes: NodeCounts {
            alive: count("alive"),
            draining: count("draining"),
            dead: count("dead"),
        },
        presets,
    })
    .into_response()
}

#[derive(Debug, Default, serde::Deserialize)]
struct ConsolidateQuery {
    max_moves: Option<usize>,
}

/// `POST /v1/fleet/consolidate[?max_moves=N]` (leader): empties lightly loaded nodes onto nodes in use, moving at
/// most N streams (default 10). Answers the moves.
#[utoipa::path(post, path = "/v1/fleet/consolidate", tag = "fleet",
    params(("max_moves" = Option<u32>, Query, description = "Move at most this many streams (default 10, at most 10000)")),
    responses(
        (status = 200, description = "The moves made", body = ConsolidateView),
        (status = 307, description = "This scheduler does not lead: `Location` names the leader (`not_leader`)", body = ErrorEnvelope),
        (status = 400, description = "`max_moves` is not a non-negative integer", body = ErrorEnvelope),
        (status = 503, description = "The store does not answer (`store_unavailable`, `Retry-After`), or nobody leads (`no_leader`)", body = ErrorEnvelope),
    ))]
async fn consolidate(
    State(s): S,
    q: Result<axum::extract::Query<ConsolidateQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "`max_moves` must be a non-negative integer",
        );
    };
    match s.consolidate(q.max_moves.unwrap_or(10).min(10_000)).await {
        Ok(moves) => Json(ConsolidateView {
            moves: moves
                .into_iter()
                .map(|(stream, from, to)| Move { stream, from, to })
                .collect(),
        })
        .into_response(),
        Err(PlaceError::NotLeader) => not_leader(&s, "/v1/fleet/consolidate").await,
        Err(e) => place_error(&s, e),
    }
}

/// `GET /v1/leader`: who leads, and whether this scheduler does.
#[utoipa::path(get, path = "/v1/leader", tag = "fleet",
    responses((status = 200, description = "Who leads", body = LeaderView)))]
async fn leader(State(s): S) -> Response {
    let l = s.leader().await;
    Json(LeaderView {
        instance: s.config.instance_id.clone(),
        leading: s.leading().is_some(),
        epoch: s.leading(),
        leader: l,
    })
    .into_response()
}

enum PlayError {
    /// The stream exists but has no live node now.
    NotPlaced,
    Store(crate::store::StoreError),
}

/// The URL of the node serving `stream` now: `Ok(None)` when the stream does not exist.
async fn play_url(s: &Scheduler, stream: &str) -> Result<Option<String>, PlayError> {
    // the record and the heartbeats of its (at most two) nodes: a viewer's join must not cost the whole fleet's
    // heartbeats (anyone may ask); not the last pass's routes either, which can be an interval behind a move
    let rec = match s.store.stream(stream).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(e) => return Err(PlayError::Store(e)),
    };
    let (Phase::Placed, Some(node)) = (rec.phase, &rec.node) else {
        return Err(PlayError::NotPlaced);
    };
    // during a move, viewers stay on the old copy (it has parts) until the handover, while it still plays
    if let Some(from) = rec.handover_from.as_deref() {
        let old = s
            .store
            .live_heartbeat(from)
            .await
            .map_err(PlayError::Store)?;
        if let Some(hb) = old.filter(|hb| fleet::reports_running(hb, stream)) {
            return Ok(Some(hb.url));
        }
    }
    s.store
        .live_url(node)
        .await
        .map_err(PlayError::Store)?
        .map(Some)
        .ok_or(PlayError::NotPlaced)
}

/// `GET /play/{stream}/{path…}`: 302 to the node serving the stream now (query kept, e.g. LL-HLS directives);
/// while the store does not answer, to the node it was served from last.
#[utoipa::path(get, path = "/play/{stream}/{path}", tag = "playback",
    params(
        ("stream" = String, Path, description = "The stream's id"),
        ("path" = String, Path, description = "A playback path under the stream (`master.m3u8`, `hi/index.m3u8`, …); may span segments"),
    ),
    responses(
        (status = 302, description = "To the node serving it now (`Location`; `Cache-Control: no-store`)"),
        (status = 404, description = "No such stream or path", body = ErrorEnvelope),
        (status = 503, description = "Being placed (`not_placed`, `Retry-After`), or the store does not answer and no earlier route is known", body = ErrorEnvelope),
    ))]
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
    let url = match play_url(&s, &stream).await {
        Ok(Some(url)) => Some(url),
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("stream `{stream}` does not exist"),
            )
        }
        Err(PlayError::NotPlaced) => None,
        // the store does not answer: send viewers where they went last (the daemons do not need the store)
        Err(PlayError::Store(e)) => match s.remembered_route(&stream) {
            Some(url) => {
                s.metrics.play_from_memory.inc();
                Some(url)
            }
            None => return place_error(&s, e.into()),
        },
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

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition (format 0.0.4)", content_type = "text/plain", body = String)))]
async fn metrics(State(s): S) -> Response {
    s.refresh_gauges().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
