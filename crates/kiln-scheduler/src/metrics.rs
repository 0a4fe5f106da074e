//! The scheduler's Prometheus series (`/metrics`), documented in `docs/metrics.md`.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every series the scheduler exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub placements: IntCounterVec,
    pub refusals: IntCounterVec,
    pub decision: Histogram,
    pub nodes: IntGaugeVec,
    pub streams: IntGaugeVec,
    pub packing_ratio: Gauge,
    pub leader: IntGauge,
    pub epoch: IntGauge,
    pub fenced: IntCounter,
    pub node_deaths: IntCounter,
    pub strays: IntCounter,
    pub heartbeats: IntCounter,
    pub store_up: IntGauge,
    pub master_changes: IntCounter,
    pub play_from_memory: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    // Long by design: a declaration list: one registration per exported series.
    pub fn new() -> Self {
        let registry = Registry::new();
        let placements = IntCounterVec::new(
            Opts::new(
                "kiln_scheduler_placements_total",
                "Streams placed and started on a node, by reason (new, failover, restart, consolidate, drain: moved off a draining node, relief: moved off a node where it fell behind real time).",
            ),
            &["reason"],
        )
        .expect("metric");
        let refusals = IntCounterVec::new(
            Opts::new(
                "kiln_scheduler_refusals_total",
                "Requests or re-placements refused, by reason (capacity, invalid, conflict, not_leader, store, warming; join: a heartbeat not admitted).",
            ),
            &["reason"],
        )
        .expect("metric");
        let decision = Histogram::with_opts(
            HistogramOpts::new(
                "kiln_scheduler_decision_seconds",
                "Solver time per placed stream (kiln-binpack, without I/O).",
            )
            .buckets(vec![
                1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1,
            ]),
        )
        .expect("metric");
        let nodes = IntGaugeVec::new(
            Opts::new(
                "kiln_scheduler_nodes",
                "Known nodes by state (alive, draining, dead).",
            ),
            &["state"],
        )
        .expect("metric");
        let streams = IntGaugeVec::new(
            Opts::new(
                "kiln_scheduler_streams",
                "Streams by phase (placed, pending).",
            ),
            &["phase"],
        )
        .expect("metric");
        let packing_ratio = Gauge::new(
            "kiln_scheduler_packing_ratio",
            "Nodes with placed streams over the lower bound for what is placed (1.0 is perfect).",
        )
        .expect("metric");
        let leader = IntGauge::new(
            "kiln_scheduler_leader",
            "1 while this scheduler holds the lease.",
        )
        .expect("metric");
        let epoch = IntGauge::new(
            "kiln_scheduler_epoch",
            "This scheduler's last leader epoch.",
        )
        .expect("metric");
        let fenced = IntCounter::new(
            "kiln_scheduler_fenced_total",
            "Commands a daemon refused because it follows a newer leader epoch.",
        )
        .expect("metric");
        let node_deaths = IntCounter::new(
            "kiln_scheduler_node_deaths_total",
            "Nodes that missed three heartbeats.",
        )
        .expect("metric");
        let strays = IntCounter::new(
            "kiln_scheduler_stray_stops_total",
            "Stream copies stopped on a node the records do not put them on.",
        )
        .expect("metric");
        let heartbeats = IntCounter::new(
            "kiln_scheduler_heartbeats_total",
            "Heartbeats received by this scheduler.",
        )
        .expect("metric");
        let store_up = IntGauge::new(
            "kiln_scheduler_store_up",
            "1 while the store answered this scheduler's last lease call (with the required replicas' WAIT), 0 \
             while Redis is unreachable or not replicating: placements are refused, running streams keep running.",
        )
        .expect("metric");
        let master_changes = IntCounter::new(
            "kiln_scheduler_redis_master_changes_total",
            "Times this scheduler moved to a new Redis master named by Sentinel.",
        )
        .expect("metric");
        let play_from_memory = IntCounter::new(
            "kiln_scheduler_play_from_memory_total",
            "`/play` redirects answered from the last known placement because the store did not answer.",
        )
        .expect("metric");
        for c in [
            Box::new(placements.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(refusals.clone()),
            Box::new(decision.clone()),
            Box::new(nodes.clone()),
            Box::new(streams.clone()),
            Box::new(packing_ratio.clone()),
            Box::new(leader.clone()),
            Box::new(epoch.clone()),
            Box::new(fenced.clone()),
            Box::new(node_deaths.clone()),
            Box::new(strays.clone()),
            Box::new(heartbeats.clone()),
            Box::new(store_up.clone()),
            Box::new(master_changes.clone()),
            Box::new(play_from_memory.clone()),
        ] {
            registry.register(c).expect("registering a metric");
        }
        for r in [
            "new",
            "failover",
            "restart",
            "consolidate",
            "drain",
            "relief",
        ] {
            placements.with_label_values(&[r]);
        }
        for r in [
            "capacity",
            "invalid",
            "conflict",
            "not_leader",
            "store",
            "warming",
        ] {
            refusals.with_label_values(&[r]);
        }
        Self {
            registry,
            placements,
            refusals,
            decision,
            nodes,
            streams,
            packing_ratio,
            leader,
            epoch,
            fenced,
            node_deaths,
            strays,
            heartbeats,
            store_up,
            master_changes,
            play_from_memory,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding metrics");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}
