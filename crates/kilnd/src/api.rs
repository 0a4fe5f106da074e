//! The control API (`/v1/streams`, `/v1/jobs`, `/v1/capacity`, `/v1/stats`, behind the fleet token when one is
//! configured), VOD file serving (`/vod/{job}/…`), `/metrics`, `/healthz` and `/readyz`.
//!
//! Errors are mapped to HTTP in one place ([`ApiError`]) and written as the shared envelope
//! ([`kiln_http::json_error`]): `{"error": {"code", "message"}}`; the message says what to fix, and nothing
//! internal leaks.

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use kiln_http::openapi::ErrorEnvelope;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kiln_model::node::{CapacityReport, EPOCH_HEADER};
use kiln_model::vod::{JobRequest, JobStatus};
use kiln_model::{StreamRequest, StreamStatus};
use serde_json::json;

use crate::supervisor::{FenceError, SupervisorError};
use crate::AppState;

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

/// An API failure.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    /// 409: a scheduler command carrying an epoch older than one this daemon has accepted (fencing).
    StaleEpoch(String),
    /// 422: well-formed, but this node cannot run it (policy, source file).
    Unprocessable(String),
    Unavailable(String),
    PayloadTooLarge,
    /// 429: the node lacks `dimension`.
    Capacity {
        message: String,
        dimension: kiln_model::capacity::Dimension,
        requested: u64,
        free: u64,
    },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Capacity {
            message,
            dimension,
            requested,
            free,
        } = self
        {
            return kiln_http::json_error_with(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_capacity",
                message,
                [
                    ("dimension", json!(dimension)),
                    ("requested", json!(requested)),
                    ("free", json!(free)),
                ],
            );
        }
        let (status, code, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m),
            ApiError::StaleEpoch(m) => (StatusCode::CONFLICT, "stale_epoch", m),
            ApiError::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, "cannot_run_here", m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body is larger than {MAX_BODY} bytes"),
            ),
            ApiError::Capacity { .. } => unreachable!("handled above"),
        };
        kiln_http::json_error(status, code, message)
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::Invalid(e) => ApiError::BadRequest(e.to_string()),
            SupervisorError::Policy(_)
            | SupervisorError::SourceFile(_)
            | SupervisorError::SourceAddress(_) => ApiError::Unprocessable(e.to_string()),
            SupervisorError::Conflict(_) => ApiError::Conflict(e.to_string()),
            SupervisorError::NotFound(_) => ApiError::NotFound(e.to_string()),
            SupervisorError::Media(_)
            | SupervisorError::ShuttingDown
            | SupervisorError::Draining => ApiError::Unavailable(e.to_string()),
            SupervisorError::Capacity {
                dimension,
                requested,
                free,
            } => ApiError::Capacity {
                message: e.to_string(),
                dimension,
                requested,
                free,
            },
        }
    }
}

/// The control routes (`/v1/…`), behind the bearer token when one is configured.
pub fn control_router(token: Option<&str>) -> OpenApiRouter<AppState> {
    let control = OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(status, create, remove))
        .routes(routes!(list_jobs, submit_job))
        .routes(routes!(get_job, cancel_job))
        .routes(routes!(stats))
        .routes(routes!(capacity));
    kiln_http::require_bearer(
        control,
        token,
        "the token kilnd was started with: --api-token-env",
    )
    .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// VOD playback: the files of finished jobs (`/vod/{job}/…`).
pub fn vod_router() -> OpenApiRouter<AppState> {
    kiln_http::openapi::routes_with_rest(OpenApiRouter::new(), routes!(vod_file), "path")
}

/// Operations: `/metrics` (behind the bearer token when `metrics_token` is given: its series name every stream),
/// `/healthz`, `/readyz` (503 while draining).
pub fn service_router(metrics_token: Option<&str>) -> OpenApiRouter<AppState> {
    let metrics = OpenApiRouter::new().routes(routes!(metrics));
    let metrics = match metrics_token {
        Some(_) => kiln_http::require_bearer(
            metrics,
            metrics_token,
            "kilnd runs with --metrics-require-token: the fleet token of --api-token-env",
        ),
        None => metrics,
    };
    OpenApiRouter::new()
        .merge(metrics)
        .routes(routes!(healthz))
        .routes(routes!(ready))
}

/// `/healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /v1/streams`: every stream this node runs or has just ended.
#[utoipa::path(get, path = "/v1/streams", tag = "streams",
    responses((status = 200, description = "The streams", body = Vec<StreamStatus>)))]
async fn list(State(st): State<AppState>) -> Json<Vec<StreamStatus>> {
    Json(st.supervisor.list().iter().map(|h| h.status()).collect())
}

/// `GET /v1/streams/{id}`: one stream's status.
#[utoipa::path(get, path = "/v1/streams/{id}", tag = "streams",
    params(("id" = String, Path, description = "The stream's id")),
    responses(
        (status = 200, description = "The stream", body = StreamStatus),
        (status = 404, description = "No such stream", body = ErrorEnvelope),
    ))]
async fn status(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StreamStatus>, ApiError> {
    st.supervisor
        .get(&id)
        .map(|h| Json(h.status()))
        .ok_or_else(|| ApiError::NotFound(format!("stream `{id}` does not exist")))
}

/// `PUT /v1/streams/{id}`: 201 when created, 200 when the same stream already runs, 400 for an invalid spec,
/// 409 for a different spec under the same id, 503 when the pipeline cannot start.
#[utoipa::path(put, path = "/v1/streams/{id}", tag = "streams",
    params(("id" = String, Path, description = "The stream's id: 1–64 letters, digits, `-` and `_`"), ("x-kiln-epoch" = Option<u64>, Header, description = "The scheduler's leadership epoch (fencing): a command older than the newest this node accepted gets 409 `stale_epoch`")),
    request_body(content = StreamRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; a `publish:` stream's answer carries its ingest key (only this one)", body = StreamStatus),
        (status = 200, description = "The same stream already runs", body = StreamStatus),
        (status = 400, description = "Invalid spec or epoch header", body = ErrorEnvelope),
        (status = 409, description = "Another spec under this id (`conflict`) or a stale epoch (`stale_epoch`)", body = ErrorEnvelope),
        (status = 413, description = "Body over 64 KiB", body = ErrorEnvelope),
        (status = 422, description = "Well-formed, but this node cannot run it (policy, source file, address)", body = ErrorEnvelope),
        (status = 429, description = "No room (`insufficient_capacity`, with `dimension`, `requested`, `free`)", body = ErrorEnvelope),
        (status = 503, description = "The pipeline could not start, or the node is shutting down or draining", body = ErrorEnvelope),
    ))]
async fn create(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let epoch = fence(&st, &headers)?;
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::PayloadTooLarge,
        other => ApiError::BadRequest(other.body_text()),
    })?;
    let req: StreamRequest = serde_json::from_slice(&body).map_err(|e| {
        st.metrics.refusals.with_label_values(&["invalid"]).inc();
        ApiError::BadRequest(format!("invalid stream spec: {e}"))
    })?;
    let (h, created) = st.supervisor.create(&id, req).await.inspect_err(|e| {
        let reason = match e {
            SupervisorError::Invalid(_) => "invalid",
            SupervisorError::Conflict(_) => "conflict",
            SupervisorError::NotFound(_) => "not_found",
            SupervisorError::Media(_) => "pipeline",
            SupervisorError::ShuttingDown => "shutting_down",
            SupervisorError::Draining => "draining",
            SupervisorError::Policy(_) => "policy",
            SupervisorError::SourceFile(_) => "source_file",
            SupervisorError::SourceAddress(_) => "source_address",
            SupervisorError::Capacity { dimension, .. } => dimension.as_str(),
        };
        st.metrics.refusals.with_label_values(&[reason]).inc();
    })?;
    raise_fence(&st, epoch);
    let mut status = h.status();
    let code = if created {
        // the only answer that carries a publish stream's key and passphrase
        status.ingest = st.supervisor.ingest_info(&h);
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(status)).into_response())
}

/// `DELETE /v1/streams/{id}`: stops the stream (its playlists end) and frees what it booked.
#[utoipa::path(delete, path = "/v1/streams/{id}", tag = "streams",
    params(("id" = String, Path, description = "The stream's id"), ("x-kiln-epoch" = Option<u64>, Header, description = "The scheduler's leadership epoch (fencing): a command older than the newest this node accepted gets 409 `stale_epoch`")),
    responses(
        (status = 204, description = "Stopped"),
        (status = 400, description = "Invalid epoch header", body = ErrorEnvelope),
        (status = 404, description = "No such stream", body = ErrorEnvelope),
        (status = 409, description = "A stale epoch (`stale_epoch`)", body = ErrorEnvelope),
    ))]
async fn remove(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let epoch = fence(&st, &headers)?;
    st.supervisor.stop(&id).await?;
    raise_fence(&st, epoch);
    Ok(StatusCode::NO_CONTENT)
}

fn jobs(st: &AppState) -> Result<&std::sync::Arc<crate::jobs::Jobs>, ApiError> {
    st.jobs.as_ref().ok_or_else(|| {
        ApiError::Unavailable(
            "VOD jobs are disabled on this daemon: start kilnd with --data-dir".into(),
        )
    })
}

impl From<crate::jobs::JobError> for ApiError {
    fn from(e: crate::jobs::JobError) -> Self {
        use crate::jobs::JobError;
        match e {
            JobError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            JobError::NotFound(_) => ApiError::NotFound(e.to_string()),
            JobError::Finished(..) | JobError::NotFinished(..) => ApiError::Conflict(e.to_string()),
            JobError::Io(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

/// `POST /v1/jobs`: 201 with the queued job (its `id`), 400 for a malformed request. A well-formed request whose
/// input turns out bad is accepted and the job ends `failed` with the reason.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body(content = JobRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Queued", body = JobStatus),
        (status = 400, description = "Malformed request", body = ErrorEnvelope),
        (status = 413, description = "Body over 64 KiB", body = ErrorEnvelope),
        (status = 503, description = "VOD jobs are disabled (no `--data-dir`), or the job store failed", body = ErrorEnvelope),
    ))]
async fn submit_job(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&st)?;
    let body = body.map_err(|_| ApiError::PayloadTooLarge)?;
    let req: kiln_model::vod::JobRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid job request: {e}")))?;
    let status = jobs.submit(req)?;
    Ok((StatusCode::CREATED, Json(status)).into_response())
}

/// `GET /v1/jobs[?state=S][&limit=N]`: jobs newest first, optionally of one state, at most `limit`.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(
        ("state" = Option<kiln_model::vod::JobState>, Query, description = "Only jobs in this state"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100000, description = "At most this many"),
    ),
    responses(
        (status = 200, description = "Jobs, newest first", body = Vec<JobStatus>),
        (status = 400, description = "Unknown state or limit out of range", body = ErrorEnvelope),
        (status = 503, description = "VOD jobs are disabled (no `--data-dir`), or the job store failed", body = ErrorEnvelope),
    ))]
async fn list_jobs(
    State(st): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let state = match q.get("state") {
        Some(s) => Some(
            serde_json::from_value::<kiln_model::vod::JobState>(json!(s)).map_err(|_| {
                ApiError::BadRequest(format!(
                    "unknown state `{}` (queued, running, done, failed, cancelled)",
                    s.chars().take(32).collect::<String>()
                ))
            })?,
        ),
        None => None,
    };
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| ApiError::BadRequest("limit must be 1..=100000".into()))?,
        None => usize::MAX,
    };
    let list: Vec<_> = jobs(&st)?
        .list()
        .into_iter()
        .filter(|j| state.is_none_or(|s| j.state == s))
        .take(limit)
        .collect();
    Ok(Json(list).into_response())
}

/// `GET /v1/jobs/{id}`: one job's status, progress and (when done) its outputs.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 404, description = "No such job", body = ErrorEnvelope),
        (status = 503, description = "VOD jobs are disabled (no `--data-dir`), or the job store failed", body = ErrorEnvelope),
    ))]
async fn get_job(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    jobs(&st)?
        .get(&id)
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::NotFound(format!("job `{id}` does not exist")))
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job (200 with its status); 409 once it has finished.
/// `?purge=true` instead deletes a finished job and its outputs (204; 409 while it is queued or running).
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("purge" = Option<bool>, Query, description = "Delete a finished job and its outputs instead of cancelling"),
    ),
    responses(
        (status = 200, description = "Cancelled", body = JobStatus),
        (status = 204, description = "Purged"),
        (status = 404, description = "No such job", body = ErrorEnvelope),
        (status = 409, description = "Finished already (cancel), or not finished yet (purge)", body = ErrorEnvelope),
        (status = 503, description = "VOD jobs are disabled (no `--data-dir`), or the job store failed", body = ErrorEnvelope),
    ))]
async fn cancel_job(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if q.get("purge").is_some_and(|v| v == "true" || v == "1") {
        jobs(&st)?.purge(&id)?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(Json(jobs(&st)?.cancel(&id)?).into_response())
}

/// `GET /vod/{job}/{path}`: a finished job's outputs. Paths are checked part by part (letters, digits, `.-_`,
/// no dot-only parts), so nothing outside the job's directory can be named.
#[utoipa::path(get, path = "/vod/{id}/{path}", tag = "playback",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("path" = String, Path, description = "A file of its outputs, one or two segments (`master.m3u8`, `hi/index.m3u8`, `hi/seg1.m4s`)"),
    ),
    responses(
        (status = 200, description = "The file (immutable, cached a year)", content(("application/vnd.apple.mpegurl"), ("application/dash+xml"), ("video/mp4"), ("audio/mp4"), ("image/jpeg"), ("text/vtt"), ("application/octet-stream"))),
        (status = 206, description = "The requested range", content(("application/vnd.apple.mpegurl"), ("application/dash+xml"), ("video/mp4"), ("audio/mp4"), ("image/jpeg"), ("text/vtt"), ("application/octet-stream"))),
        (status = 304, description = "Not modified (`If-None-Match`, `If-Modified-Since`)"),
        (status = 404, description = "No such file", body = ErrorEnvelope),
        (status = 412, description = "A precondition (`If-Match`, `If-Unmodified-Since`) failed"),
        (status = 416, description = "Range not satisfiable"),
        (status = 503, description = "VOD jobs are disabled (no `--data-dir`), or the job store failed", body = ErrorEnvelope),
    ))]
async fn vod_file(
    State(st): State<AppState>,
    Path((id, path)): Path<(String, String)>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    use axum::http::{header, HeaderValue};
    use tower::ServiceExt;
    let not_found = || ApiError::NotFound("no such VOD file".into());
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 128
            && !p.chars().all(|c| c == '.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    if !ok_part(&id) || !path.split('/').all(ok_part) || path.split('/').count() > 2 {
        return Err(not_found());
    }
    let dir = jobs(&st)?.output_dir(&id).ok_or_else(not_found)?;
    let file = dir.join(&path);
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let ctype = match ext {
        "m3u8" => "application/vnd.apple.mpegurl",
        "mpd" => "application/dash+xml",
        "mp4" | "m4s" if path.starts_with("audio/") => "audio/mp4",
        "mp4" | "m4s" => "video/mp4",
        "jpg" => "image/jpeg",
        "vtt" => "text/vtt",
        _ => "application/octet-stream",
    };
    // ServeFile streams the file and answers Range, HEAD and conditional requests (ETag, Last-Modified)
    let res = tower_http::services::ServeFile::new(&file)
        .oneshot(req)
        .await
        .map_err(|_| not_found())?;
    if res.status() == StatusCode::NOT_FOUND {
        return Err(not_found());
    }
    let mut res = res.map(axum::body::Body::new);
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    // finished outputs never change
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    Ok(res)
}

/// Fencing: a command that carries a scheduler epoch ([`EPOCH_HEADER`]) older than the highest this daemon has
/// accepted comes from a deposed leader and is refused; a newer one raises the fence. Commands without the
/// header (an operator's own) are not fenced.
/// The scheduler epoch a command carries ([`EPOCH_HEADER`]), checked against the fence. The fence is raised only
/// by [`raise_fence`] once the command has been accepted, so a malformed or refused command moves nothing.
fn fence(st: &AppState, headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(EPOCH_HEADER) else {
        return Ok(None);
    };
    let epoch: u64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ApiError::BadRequest(format!("{EPOCH_HEADER} must be an integer")))?;
    st.supervisor
        .check_fence(epoch)
        .map_err(|e| fence_error(st, e))?;
    Ok(Some(epoch))
}

/// After an accepted command: the daemon follows its epoch from now on.
fn raise_fence(st: &AppState, epoch: Option<u64>) {
    if let Some(e) = epoch {
        if let Err(err) = st.supervisor.raise_fence(e) {
            // a newer leader's command was accepted in between: this one ran, the fence stays higher
            tracing::info!(error = %err, "fence not raised");
        }
    }
}

fn fence_error(st: &AppState, e: FenceError) -> ApiError {
    match e {
        FenceError::Stale { .. } => {
            st.metrics
                .refusals
                .with_label_values(&["stale_epoch"])
                .inc();
            ApiError::StaleEpoch(e.to_string())
        }
        FenceError::Future { .. } => ApiError::BadRequest(e.to_string()),
    }
}

/// Prometheus text exposition. Gauges that mirror live state are refreshed at scrape time.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition (format 0.0.4)", content_type = "text/plain", body = String)))]
async fn metrics(State(st): State<AppState>) -> Response {
    if let Some(jobs) = &st.jobs {
        st.metrics.set_vod_jobs(&jobs.list());
    }
    st.supervisor.refresh_metrics(&st.telemetry);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// `GET /v1/capacity`: what this node has, has booked and has free, per dimension, with the streams' demands,
/// the headroom in units of each preset and what a stream of each preset costs here.
#[utoipa::path(get, path = "/v1/capacity", tag = "node",
    responses((status = 200, description = "Capacity, bookings, headroom and preset costs", body = CapacityReport)))]
async fn capacity(State(st): State<AppState>) -> Json<CapacityReport> {
    Json(st.capacity_report())
}

/// `GET /v1/stats`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Stats {
    /// Streams this node runs (or has just ended).
    pub streams: usize,
    /// Playlist and part requests waiting for media right now (blocking reloads, preload hints).
    pub parked_requests: usize,
}

/// Live counters of this node (`/metrics` has them all).
#[utoipa::path(get, path = "/v1/stats", tag = "node",
    responses((status = 200, description = "Counters", body = Stats)))]
async fn stats(State(st): State<AppState>) -> Json<Stats> {
    Json(Stats {
        streams: st.supervisor.list().len(),
        parked_requests: st.origin.parked(),
    })
}

/// `/readyz`: 200 `ready`, or 503 `draining` once the node drains through its scheduler (SIGTERM): load
/// balancers and Kubernetes stop sending new work; the streams it still runs keep being served.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "`ready`", content_type = "text/plain", body = String),
        (status = 503, description = "`draining`", content_type = "text/plain", body = String),
    ))]
async fn ready(State(st): State<AppState>) -> (StatusCode, &'static str) {
    if st.supervisor.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
