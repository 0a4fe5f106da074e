//! The scheduler API's response documents: typed, so the OpenAPI document is derived from what is sent.

use std::collections::BTreeMap;

use kiln_binpack::Demand;
use kiln_model::capacity::Resources;
use kiln_model::node::{GpuReport, HostReport};
use kiln_model::StreamRequest;
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{LeaderInfo, Phase, StreamRecord};

/// A stream as the scheduler records it (`GET /v1/streams[/{id}]`, `POST /v1/streams`).
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamView {
    pub id: String,
    pub phase: Phase,
    /// The node it is placed on (`null` while pending).
    pub node: Option<String>,
    /// The GPU on that node (`null` for a CPU placement).
    pub gpu: Option<usize>,
    /// The spec sent to the node.
    pub request: StreamRequest,
    /// What is booked for it on its node.
    pub booked: Option<Demand>,
    /// The leadership epoch of the scheduler that wrote the record.
    pub epoch: u64,
    /// Times it was re-placed (node death, drain, relief).
    pub moves: u32,
    /// The node it is being moved off (make-before-break), while the move lasts.
    pub moving_from: Option<String>,
    pub created_unix_ms: u64,
    pub placed_unix_ms: u64,
    /// Where viewers play it: a redirect to the node serving it now.
    pub playback: String,
}

impl From<&StreamRecord> for StreamView {
    fn from(r: &StreamRecord) -> Self {
        Self {
            id: r.id.clone(),
            phase: r.phase,
            node: r.node.clone(),
            gpu: r.gpu,
            request: r.request.clone(),
            booked: r.demand,
            epoch: r.epoch,
            moves: r.moves,
            moving_from: r.handover_from.clone(),
            created_unix_ms: r.created_unix_ms,
            placed_unix_ms: r.placed_unix_ms,
            playback: format!("/play/{}/master.m3u8", r.id),
        }
    }
}

/// A node (`GET /v1/nodes`).
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    /// `alive`, `draining` or `dead`.
    pub state: &'static str,
    /// Drained with `evacuate`: its streams are being moved elsewhere.
    pub evacuating: bool,
    /// Its base URL (`null` once its heartbeats lapsed).
    pub url: Option<String>,
    pub host: Option<HostReport>,
    pub gpus: Option<Vec<GpuReport>>,
    /// What the scheduler counts as used on the host: its own bookings or the node's, whichever is larger, plus
    /// the CPU the node keeps for its viewers.
    pub booked: Option<Resources>,
    /// Streams the scheduler placed there.
    pub placed: Vec<String>,
    /// Streams it reports running (not ended, failed or stopping).
    pub running: Option<Vec<String>>,
}

/// `POST`/`DELETE /v1/nodes/{id}/drain`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DrainView {
    pub id: String,
    pub draining: bool,
    pub evacuate: bool,
}

/// `GET /v1/fleet/headroom`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeadroomView {
    pub nodes: NodeCounts,
    /// Per preset: how many more streams of it alone the fleet takes now.
    pub presets: BTreeMap<String, PresetHeadroom>,
}

/// Nodes by state.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeCounts {
    pub alive: usize,
    pub draining: usize,
    pub dead: usize,
}

/// One preset's headroom.
#[derive(Debug, Serialize, ToSchema)]
pub struct PresetHeadroom {
    pub streams: u64,
    /// Of them, on an NVENC placement (absent when the preset cannot be placed at all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_gpu: Option<u64>,
}

/// `POST /v1/fleet/consolidate`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsolidateView {
    pub moves: Vec<Move>,
}

/// One stream moved.
#[derive(Debug, Serialize, ToSchema)]
pub struct Move {
    pub stream: String,
    pub from: String,
    pub to: String,
}

/// `GET /v1/leader`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaderView {
    /// This scheduler's instance id.
    pub instance: String,
    pub leading: bool,
    /// Its epoch while it leads.
    pub epoch: Option<u64>,
    /// Who leads (`null` when nobody holds the lease, or the store does not answer).
    pub leader: Option<LeaderInfo>,
}
