//! Control API (`/v1/streams`, `/healthz`, `/readyz`) with JSON errors.
//!
//! Errors are mapped to HTTP in one place ([`ApiError`]): the body is `{"error": {"code", "message"}}`, the
//! message says what to fix, and nothing internal leaks.

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use std::collections::BTreeMap;

use kiln_model::capacity::Resources;
use kiln_model::node::{
    CapacityReport, GpuDemand, GpuInventoryNote, GpuMeasured, GpuReport, HostReport, NodeStream,
    PresetDemand, EPOCH_HEADER,
};
use kiln_model::{StreamRequest, StreamStatus};
use serde_json::json;

use crate::supervisor::SupervisorError;
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
        dimension: &'static str,
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
            let body = json!({"error": {
                "code": "insufficient_capacity",
                "message": message,
                "dimension": dimension,
                "requested": requested,
                "free": free,
            }});
            return (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
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
        (
            status,
            Json(json!({"error": {"code": code, "message": message}})),
        )
            .into_response()
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
            SupervisorError::Media(_) | SupervisorError::ShuttingDown => {
                ApiError::Unavailable(e.to_string())
            }
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

/// The control routes (`/v1/…`, behind the bearer token when one is configured), VOD file serving, metrics and
/// health.
pub fn router(token: Option<String>) -> Router<AppState> {
    let control = Router::new()
        .route("/v1/streams", get(list))
        .route("/v1/streams/{id}", get(status).put(create).delete(remove))
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/stats", get(stats))
        .route("/v1/capacity", get(capacity));
    let control = match token {
        Some(t) => {
            let t: std::sync::Arc<str> = t.into();
            control.route_layer(axum::middleware::from_fn(
                move |req: axum::extract::Request, next: axum::middleware::Next| {
                    let t = t.clone();
                    async move {
                        let h = req
                            .headers()
                            .get(axum::http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok());
                        if kiln_model::api::bearer_ok(h, &t) {
                            next.run(req).await
                        } else {
                            unauthorized()
                        }
                    }
                },
            ))
        }
        None => control,
    };
    Router::new()
        .merge(control)
        .route("/vod/{id}/{*path}", get(vod_file))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// 401 with a `WWW-Authenticate` challenge (RFC 6750).
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer realm=\"kiln\"")],
        Json(json!({"error": {"code": "unauthorized",
            "message": "the control API needs `Authorization: Bearer <token>` (the token kilnd was started with: --api-token-env)"}})),
    )
        .into_response()
}

async fn list(State(st): State<AppState>) -> Json<Vec<StreamStatus>> {
    Json(st.supervisor.list().iter().map(|h| h.status()).collect())
}

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
async fn create(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    fence(&st, &headers)?;
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
            SupervisorError::Policy(_) => "policy",
            SupervisorError::SourceFile(_) => "source_file",
            SupervisorError::SourceAddress(_) => "source_address",
            SupervisorError::Capacity { dimension, .. } => dimension,
        };
        st.metrics.refusals.with_label_values(&[reason]).inc();
    })?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(h.status())).into_response())
}

async fn remove(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    fence(&st, &headers)?;
    st.supervisor.stop(&id).await?;
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

async fn get_job(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    jobs(&st)?
        .get(&id)
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::NotFound(format!("job `{id}` does not exist")))
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job (200 with its status); 409 once it has finished.
/// `?purge=true` instead deletes a finished job and its outputs (204; 409 while it is queued or running).
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
async fn vod_file(
    State(st): State<AppState>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
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
    let bytes = tokio::fs::read(&file).await.map_err(|_| not_found())?;
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
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, ctype),
            // finished outputs never change
            (
                axum::http::header::CACHE_CONTROL,
                "public, max-age=31536000, immutable",
            ),
        ],
        bytes,
    )
        .into_response())
}

/// Fencing: a command that carries a scheduler epoch ([`EPOCH_HEADER`]) older than the highest this daemon has
/// accepted comes from a deposed leader and is refused; a newer one raises the fence. Commands without the
/// header (an operator's own) are not fenced.
fn fence(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get(EPOCH_HEADER) else {
        return Ok(());
    };
    let epoch: u64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ApiError::BadRequest(format!("{EPOCH_HEADER} must be an integer")))?;
    st.supervisor.raise_fence(epoch).map_err(|current| {
        st.metrics.refusals.with_label_values(&["stale_epoch"]).inc();
        ApiError::StaleEpoch(format!(
            "scheduler epoch {epoch} is older than {current}, which this daemon already follows: the sender is no longer the leader"
        ))
    })
}

/// Prometheus text exposition. Gauges that mirror live state are refreshed at scrape time.
async fn metrics(State(st): State<AppState>) -> Response {
    let m = &st.metrics;
    if let Some(jobs) = &st.jobs {
        let all = jobs.list();
        for (state, name) in [
            (kiln_model::vod::JobState::Queued, "queued"),
            (kiln_model::vod::JobState::Running, "running"),
            (kiln_model::vod::JobState::Done, "done"),
            (kiln_model::vod::JobState::Failed, "failed"),
            (kiln_model::vod::JobState::Cancelled, "cancelled"),
        ] {
            m.vod_jobs
                .with_label_values(&[name])
                .set(all.iter().filter(|j| j.state == state).count() as i64);
        }
    }
    m.streams.reset();
    m.stream_backend.reset();
    for h in st.supervisor.list() {
        m.frames(&h.plan.id, &h.frame_delta());
        let p = h.placement();
        let gpu = match p.backend {
            kiln_model::Backend::Nvenc { gpu } => gpu.to_string(),
            kiln_model::Backend::Cpu => String::new(),
        };
        m.stream_backend
            .with_label_values(&[
                h.plan.id.as_str(),
                p.backend.label(),
                gpu.as_str(),
                h.plan.encoder.policy.as_str(),
            ])
            .set(1);
        let state = serde_json::to_value(h.state()).ok();
        let state = state.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown");
        m.streams.with_label_values(&[state]).inc();
    }
    m.parked_requests.set(st.origin.parked() as i64);
    let sup = &st.supervisor;
    let (cap, alloc) = (sup.capacity(), sup.allocated());
    let measured = kiln_model::capacity::Resources {
        cpu_millicores: crate::metrics::process_cpu_millicores(),
        memory_mib: crate::metrics::process_rss_mib(),
        ..Default::default()
    };
    for (kind, r) in [
        ("capacity", cap),
        ("allocated", alloc),
        ("free", cap.minus(&alloc)),
        ("measured", measured),
    ] {
        for dim in kiln_model::capacity::DIMENSIONS {
            m.capacity
                .with_label_values(&[dim, kind])
                .set(r.dimension(dim) as i64);
        }
    }
    // per GPU: NVML telemetry and bookings
    for g in [&m.gpu_nvenc_utilization, &m.gpu_nvdec_utilization] {
        g.reset();
    }
    m.gpu_encoder_sessions.reset();
    m.gpu_vram_used_bytes.reset();
    m.gpu_resources.reset();
    for g in st.telemetry.snapshot().gpus {
        let labels = [g.index.to_string(), g.name.clone()];
        let l = [labels[0].as_str(), labels[1].as_str()];
        if let Some(u) = g.nvenc_utilization_pct {
            m.gpu_nvenc_utilization
                .with_label_values(&l)
                .set(f64::from(u) / 100.0);
        }
        if let Some(u) = g.nvdec_utilization_pct {
            m.gpu_nvdec_utilization
                .with_label_values(&l)
                .set(f64::from(u) / 100.0);
        }
        if let Some(n) = g.encoder_sessions {
            m.gpu_encoder_sessions
                .with_label_values(&l)
                .set(i64::from(n));
        }
        m.gpu_vram_used_bytes
            .with_label_values(&l)
            .set((g.memory_used_mib << 20) as i64);
    }
    for slot in &sup.gpus.slots {
        let alloc = sup.gpus.allocated(slot.index);
        let gpu = slot.index.to_string();
        for (kind, r) in [
            ("capacity", slot.capacity),
            ("allocated", alloc),
            ("free", slot.capacity.minus(&alloc)),
        ] {
            for dim in ["nvenc_fps", "nvdec_fps", "encoder_sessions", "vram_mib"] {
                m.gpu_resources
                    .with_label_values(&[gpu.as_str(), dim, kind])
                    .set(r.dimension(dim) as i64);
            }
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        m.render(),
    )
        .into_response()
}

/// `GET /v1/capacity`: what this node has, has booked and has free, per dimension, with the streams' demands,
/// the headroom in units of each preset and what a stream of each preset costs here ([`report`]).
async fn capacity(State(st): State<AppState>) -> Json<CapacityReport> {
    Json(report(&st))
}

/// The node's capacity report: the body of `GET /v1/capacity` and of every heartbeat to the scheduler.
pub fn report(st: &AppState) -> CapacityReport {
    let sup = &st.supervisor;
    let cap = sup.capacity();
    let alloc = sup.allocated();
    let free = cap.minus(&alloc);
    let measured = Resources {
        cpu_millicores: crate::metrics::process_cpu_millicores(),
        memory_mib: crate::metrics::process_rss_mib(),
        ..Default::default()
    };
    let effective = Resources {
        cpu_millicores: alloc.cpu_millicores.max(measured.cpu_millicores),
        memory_mib: alloc.memory_mib.max(measured.memory_mib),
        ..alloc
    };
    let streams = sup
        .list()
        .iter()
        .map(|h| {
            let p = h.placement();
            NodeStream {
                id: h.plan.id.clone(),
                state: h.state(),
                backend: p.backend,
                decode_gpu: p.decode_gpu,
                demand: p.host,
                gpu_demand: p.gpu.map(|(_, d)| d),
            }
        })
        .collect();
    let has_nvenc = sup.gpus.slots.iter().any(|s| s.nvenc);
    let mut headroom = BTreeMap::new();
    let mut demands = BTreeMap::new();
    for name in st.config.presets.names() {
        let req = StreamRequest {
            source: "test:".into(),
            preset: Some(name.to_string()),
            ..Default::default()
        };
        if let Ok(plan) = st.config.presets.resolve("headroom", &req) {
            let d = st.config.cpu_model.demand(&plan);
            headroom.insert(name.to_string(), free.how_many(&d));
            let g = st.config.gpu_model.demand(&plan, false);
            let gpu = (has_nvenc && !plan.video.is_empty()).then(|| GpuDemand {
                host: Resources {
                    cpu_millicores: g.cpu_millicores,
                    memory_mib: g.memory_mib,
                    ..Default::default()
                },
                gpu: Resources {
                    cpu_millicores: 0,
                    memory_mib: 0,
                    ..g
                },
            });
            let pixel_rate = plan
                .video
                .iter()
                .map(|v| {
                    u64::from(v.width) * u64::from(v.height) * u64::from(v.fps.num)
                        / u64::from(v.fps.den.max(1))
                })
                .sum();
            demands.insert(
                name.to_string(),
                PresetDemand {
                    cpu: d,
                    gpu,
                    pixel_rate,
                },
            );
        }
    }
    let inventory = st.telemetry.snapshot();
    let gpus = sup
        .gpus
        .slots
        .iter()
        .map(|slot| {
            let nvml = inventory.gpus.iter().find(|g| g.index == slot.index);
            let alloc = sup.gpus.allocated(slot.index);
            GpuReport {
                index: slot.index,
                model: slot.name.clone(),
                uuid: slot.uuid.clone(),
                pci_bus_id: nvml.map(|g| g.pci_bus_id.clone()),
                profile: slot.profile.clone(),
                nvenc: slot.nvenc,
                nvdec: slot.nvdec,
                capacity: slot.capacity,
                allocated: alloc,
                free: slot.capacity.minus(&alloc),
                measured: nvml.map(|g| GpuMeasured {
                    vram_mib: g.memory_used_mib,
                    nvenc_utilization_pct: g.nvenc_utilization_pct,
                    nvdec_utilization_pct: g.nvdec_utilization_pct,
                    encoder_sessions: g.encoder_sessions,
                }),
            }
        })
        .collect();
    CapacityReport {
        node_id: st.config.node_id.clone(),
        epoch: sup.epoch(),
        fence_epoch: sup.fence_epoch(),
        host: HostReport {
            capacity: cap,
            allocated: alloc,
            free,
            measured,
            effective,
        },
        gpus,
        gpu_inventory: GpuInventoryNote {
            driver_version: inventory.driver_version.clone(),
            cuda_devices: inventory.cuda_devices,
            note: inventory.note.clone(),
        },
        streams,
        headroom,
        demands,
        vod: st.jobs.as_ref().map(|j| j.load()),
    }
}

/// Live counters of this node (the Prometheus metrics issue extends this into `/metrics`).
async fn stats(State(st): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "streams": st.supervisor.list().len(),
        "parked_requests": st.origin.parked(),
    }))
}

async fn ready() -> &'static str {
    "ready\n"
}
