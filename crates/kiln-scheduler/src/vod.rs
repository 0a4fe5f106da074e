//! VOD job routing. Jobs live on the node they are submitted to (its queue is on its disk and survives its
//! restarts); the scheduler only chooses that node and remembers the route (`job id → node`, in the store, so any
//! scheduler instance can answer).
//!
//! - `POST /v1/jobs`: the body is checked as a [`JobRequest`] (400 if malformed), then sent to the live,
//!   non-draining node with VOD whose queue is shortest per slot ([`VodLoad::backlog`]), counting the jobs this
//!   process routed there since its last heartbeat; ties go to the most free CPU, then the node id. A node that does
//!   not answer is skipped (3 tries); the node's own answer (201, or 400 for a request it refuses) is passed on
//!   with `"node"` added.
//! - `GET|DELETE /v1/jobs/{id}` are passed to the job's node (`?purge=true` too; a purge forgets the route).
//! - `GET /vod/{id}/{path}` redirects (302) to the job's node, like `/play` for streams.
//!
//! Any instance serves these, leader or not: routing books nothing (each node's admission books its own jobs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kiln_http::openapi::ErrorEnvelope;
use kiln_model::node::VodLoad;
use kiln_model::vod::JobRequest;
use kiln_model::vod::JobStatus;
use reqwest::Method;
use serde_json::{json, Value};

use kiln_http::json_error as error;

use crate::store::NodeEntry;
use crate::Scheduler;

type S = State<Arc<Scheduler>>;

/// Jobs this process routed recently, per node: they are not in the node's report until its next heartbeat.
#[derive(Debug, Default)]
pub struct Routed(parking_lot::Mutex<HashMap<String, Vec<Instant>>>);

impl Routed {
    fn note(&self, node: &str) {
        let mut m = self.0.lock();
        m.entry(node.to_string()).or_default().push(Instant::now());
    }

    /// How many were routed to `node` within `window`.
    fn recent(&self, node: &str, window: Duration) -> u32 {
        let mut m = self.0.lock();
        let v = m.entry(node.to_string()).or_default();
        v.retain(|t| t.elapsed() < window);
        v.len() as u32
    }
}

/// A job id as kilnd makes them (letters and digits): anything else cannot be a job.
fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// The base URL of a live node.
async fn node_url(s: &Scheduler, node: &str) -> Result<Option<String>, Response> {
    // that node's heartbeat alone: a job lookup must not cost the whole fleet's
    s.store
        .live_url(node)
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()))
}

/// A job as its node answers it, with the node's id added (documentation: the answer is the node's JSON).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct RoutedJob {
    #[serde(flatten)]
    status: JobStatus,
    /// The node the job runs on.
    node: String,
}

/// The most of a node's job answer read (a job's status, or a list of them, is a few KiB to a few hundred).
const NODE_ANSWER_CAP: usize = 4 << 20;

/// A node's answer, passed on (JSON bodies get `"node"` added). A node's server error other than 503 (which says
/// it cannot take jobs now) is a bad gateway here: the scheduler answered, the node failed.
async fn pass_on(node: &str, r: reqwest::Response) -> Response {
    let status = match StatusCode::from_u16(r.status().as_u16()) {
        Ok(s) if s.is_server_error() && s != StatusCode::SERVICE_UNAVAILABLE => {
            return error(
                StatusCode::BAD_GATEWAY,
                "bad_node_answer",
                format!("{node} answered {s}"),
            )
        }
        Ok(s) => s,
        Err(_) => StatusCode::BAD_GATEWAY,
    };
    let Some(bytes) = crate::client::capped(r, NODE_ANSWER_CAP).await else {
        return error(
            StatusCode::BAD_GATEWAY,
            "bad_node_answer",
            format!("{node}'s answer was cut off or over {NODE_ANSWER_CAP} bytes"),
        );
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(mut m)) => {
            m.insert("node".into(), json!(node));
            (status, axum::Json(Value::Object(m))).into_response()
        }
        Ok(v) => (status, axum::Json(v)).into_response(),
        Err(_) => status.into_response(),
    }
}

/// The live, non-draining VOD nodes as (id, URL), best first: the shortest queue per slot (counting the jobs this
/// process routed there since its last heartbeat), then the most free CPU, then the id.
fn ranked(s: &Scheduler, nodes: &[NodeEntry]) -> Vec<(String, String)> {
    let window = s.config.interval * 2;
    let mut candidates: Vec<(f64, i64, String, String)> = nodes
        .iter()
        .filter(|n| !n.closed())
        .filter_map(|n| {
            let hb = n.heartbeat.as_ref()?;
            let load = hb.capacity.vod?;
            let load = VodLoad {
                queued: load.queued.saturating_add(s.routed.recent(&n.id, window)),
                ..load
            };
            Some((
                load.backlog(),
                // a node reports its own numbers: none of them may overflow here (a wrap would rank it first)
                -i64::try_from(hb.capacity.host.free.cpu_millicores).unwrap_or(i64::MAX),
                n.id.clone(),
                hb.url.clone(),
            ))
        })
        .collect();
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    candidates
        .into_iter()
        .map(|(_, _, node, url)| (node, url))
        .collect()
}

/// `POST /v1/jobs`: routes a VOD job to the VOD node with the shortest queue per slot (then the most free CPU);
/// answers that node's 201 with `node` added.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body(content = JobRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Queued on a node (`node` names it)", body = RoutedJob),
        (status = 400, description = "Malformed job (or the node judged it so)", body = ErrorEnvelope),
        (status = 413, description = "Body over the scheduler's 256 KiB or the node's 64 KiB", body = ErrorEnvelope),
        (status = 422, description = "The node cannot run it", body = ErrorEnvelope),
        (status = 502, description = "The job's node answered badly or not at all", body = ErrorEnvelope),
        (status = 503, description = "No live, accepting VOD node took it, or the store does not answer", body = ErrorEnvelope),
    ))]
pub async fn submit(State(s): S, body: Bytes) -> Response {
    if let Err(e) = serde_json::from_slice::<JobRequest>(&body) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("invalid job: {e}"),
        );
    }
    let nodes = match s.store.nodes().await {
        Ok(n) => n,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
    };
    let candidates = ranked(&s, &nodes);
    if candidates.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_vod_node",
            "no live, accepting node runs VOD jobs (kilnd with a data directory)",
        );
    }
    let mut last = String::new();
    for (node, url) in candidates.into_iter().take(3) {
        let sent = s
            .daemons
            .request(Method::POST, &format!("{url}/v1/jobs"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                s.routed.note(&node);
                let status = r.status().as_u16();
                let bytes = crate::client::capped(r, NODE_ANSWER_CAP)
                    .await
                    .unwrap_or_default();
                let mut v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let Some(id) = v["id"].as_str().map(str::to_string) else {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        "bad_node_answer",
                        format!("{node} answered without a job id"),
                    );
                };
                if let Err(e) = s.store.put_job(&id, &node).await {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string());
                }
                tracing::info!(job = %id, node = %node, "VOD job routed");
                v["node"] = json!(node);
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
                return (code, axum::Json(v)).into_response();
            }
            // the node judged the request itself: its answer stands
            Ok(r)
                if r.status().is_client_error()
                    && r.status() != reqwest::StatusCode::UNAUTHORIZED =>
            {
                return pass_on(&node, r).await;
            }
            Ok(r) => last = format!("{node}: {}", r.status()),
            Err(e) => last = format!("{node}: {e}"),
        }
        tracing::warn!(node = %node, error = %last, "VOD job not accepted; trying the next node");
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_vod_node",
        format!("no node took the job (last: {last})"),
    )
}

/// The node of a routed job and its URL, or the error to answer.
async fn route(s: &Scheduler, id: &str) -> Result<(String, String), Response> {
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("job `{id}` is not known here"),
        )
    };
    if !valid_job_id(id) {
        return Err(not_found());
    }
    let node = match s.store.job_node(id).await {
        Ok(Some(n)) => n,
        Ok(None) => return Err(not_found()),
        Err(e) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store",
                e.to_string(),
            ))
        }
    };
    match node_url(s, &node).await? {
        Some(url) => Ok((node, url)),
        None => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unavailable",
                format!("job `{id}` is on node {node}, which is not reporting; its queue survives on its disk"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            Err(r)
        }
    }
}

/// `GET /v1/jobs/{id}`: the job's status, from its node (`node` added).
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = RoutedJob),
        (status = 404, description = "No such job", body = ErrorEnvelope),
        (status = 502, description = "The job's node answered badly or not at all", body = ErrorEnvelope),
        (status = 503, description = "Its node is not reporting (`Retry-After`), or the store does not answer", body = ErrorEnvelope),
    ))]
pub async fn get_job(State(s): S, Path(id): Path<String>) -> Response {
    let (node, url) = match route(&s, &id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match s
        .daemons
        .request(Method::GET, &format!("{url}/v1/jobs/{id}"))
        .send()
        .await
    {
        Ok(r) => pass_on(&node, r).await,
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!("{node}: {e}"),
        ),
    }
}

/// `DELETE /v1/jobs/{id}[?purge=true]`: cancels the job on its node, or purges a finished one (as kilnd does).
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("purge" = Option<bool>, Query, description = "Delete a finished job and its outputs instead of cancelling"),
    ),
    responses(
        (status = 200, description = "Cancelled", body = RoutedJob),
        (status = 204, description = "Purged"),
        (status = 404, description = "No such job", body = ErrorEnvelope),
        (status = 409, description = "Finished already (cancel), or not finished yet (purge)", body = ErrorEnvelope),
        (status = 502, description = "The job's node answered badly or not at all", body = ErrorEnvelope),
        (status = 503, description = "Its node is not reporting (`Retry-After`), or the store does not answer", body = ErrorEnvelope),
    ))]
pub async fn delete_job(State(s): S, Path(id): Path<String>, RawQuery(q): RawQuery) -> Response {
    let (node, url) = match route(&s, &id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let purge = q
        .as_deref()
        .is_some_and(|q| q.split('&').any(|kv| kv == "purge=true" || kv == "purge=1"));
    let target = if purge {
        format!("{url}/v1/jobs/{id}?purge=true")
    } else {
        format!("{url}/v1/jobs/{id}")
    };
    match s.daemons.request(Method::DELETE, &target).send().await {
        Ok(r) => {
            if purge && (r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND) {
                if let Err(e) = s.store.remove_job(&id).await {
                    // the job is gone from its node either way (its answer is passed on); the stale route only
                    // sends a later GET to the node, which answers 404
                    tracing::warn!(job = %id, node = %node, error = %e, "could not forget the purged job's route");
                }
            }
            pass_on(&node, r).await
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!("{node}: {e}"),
        ),
    }
}

/// `GET /vod/{id}/{path}`: 302 to the node holding the job's outputs.
#[utoipa::path(get, path = "/vod/{id}/{path}", tag = "playback",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("path" = String, Path, description = "A file of its outputs; may span segments"),
    ),
    responses(
        (status = 302, description = "To the node holding it (`Location`; `Cache-Control: no-store`)"),
        (status = 404, description = "No such job or path", body = ErrorEnvelope),
        (status = 503, description = "Its node is not reporting (`Retry-After`), or the store does not answer", body = ErrorEnvelope),
    ))]
pub async fn redirect(State(s): S, Path((id, path)): Path<(String, String)>) -> Response {
    if path
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return error(StatusCode::NOT_FOUND, "not_found", "no such VOD path");
    }
    let (_, url) = match route(&s, &id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, format!("{url}/vod/{id}/{path}")),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}
