//! The node's measured load, sampled once a second: what serving viewers costs and whether each stream keeps up
//! with real time over the last seconds ([`kiln_model::load`] does the arithmetic).
//!
//! Serving is measured, not modelled: its CPU is the time the HTTP server spends polling connection and request
//! futures ([`kiln_http::server::serving_busy`]): parsing, TLS, handlers, writing, the wake-ups of parked
//! requests. Not counted: GStreamer's threads (encoding), the packaging of each published part and the building of
//! pipelines (both in the streams' calibrated prices), ingest I/O. A node serving viewers directly (no shield in
//! front) can spend a core on it; admission keeps the peak of the last [`SERVING_HOLD_S`] free, above
//! [`SERVING_FLOOR_MILLICORES`]. (Daemons run inside one test process add up into one figure.)

use std::time::{Duration, Instant};

use crate::AppState;

/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The span serving rates are measured over.
pub const SERVING_WINDOW_S: f64 = 5.0;
/// How long a serving peak stays reserved (viewer load comes in waves: a playlist poll, a segment boundary).
pub const SERVING_HOLD_S: f64 = 30.0;
/// The span of a stream's recent real-time ratio.
pub const REALTIME_WINDOW_S: f64 = 10.0;
/// Serving below this is not reserved: the control API at a scheduler's pace, heartbeats and metrics scrapes
/// were running when `kilnd calibrate` priced the streams, so their prices include that much already; a tenth of
/// a core is also below what one reading can tell from noise.
pub const SERVING_FLOOR_MILLICORES: u64 = 100;

/// Samples the serving time, the request counters and every stream's media published, until the task is
/// dropped.
pub async fn run(state: AppState) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.supervisor.reap_teardowns();
        let busy = kiln_http::server::serving_busy().as_secs_f64();
        let (requests, bytes) = state.metrics.http.totals();
        state
            .supervisor
            .sample_load(start.elapsed().as_secs_f64(), busy, requests, bytes);
    }
}
