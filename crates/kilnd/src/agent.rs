//! The node agent: tells the scheduler what this node has and runs, every heartbeat interval.
//!
//! Each heartbeat is `POST {scheduler}/v1/nodes/{node_id}/heartbeat` with a [`Heartbeat`] (the node's advertised
//! URL and its [`kiln_model::node::CapacityReport`], the same document as `GET /v1/capacity`). The answer carries
//! the current leader's epoch, which raises this daemon's fence (so a deposed leader's commands are refused even
//! before the new leader has sent one), and the interval the scheduler wants. With several scheduler URLs the
//! agent sticks to the one that answers and moves to the next on a failure: any scheduler accepts heartbeats.
//! Heartbeats carry the join token (`--node-token-env`) when one is configured, the fleet token otherwise.

use std::time::Duration;

use kiln_model::node::{CapacityReport, Heartbeat, HeartbeatAck};

pub use crate::config::AgentConfig;

/// What the agent reports and whom it tells about the leader's epoch.
pub trait Node: Send + Sync {
    /// This node's id in the fleet.
    fn node_id(&self) -> &str;
    /// The fleet's bearer token, when one is configured.
    fn api_token(&self) -> Option<&str>;
    /// The report a heartbeat carries (the same document as `GET /v1/capacity`).
    fn report(&self) -> CapacityReport;
    /// The scheduler answered with its leader's `epoch`: raise the fence to it.
    fn saw_epoch(&self, epoch: u64);
    /// A scheduler answered a heartbeat (with any status: one whose store is failing over still answers) while
    /// heartbeats go every `interval`.
    fn scheduler_answered(&self, interval: Duration);
}

/// Sends heartbeats until the task is dropped.
pub async fn run(node: impl Node, cfg: AgentConfig) {
    let client = reqwest::Client::builder()
        .build()
        .expect("building the heartbeat client");
    let mut interval = cfg.interval;
    let mut current = 0usize;
    let mut failures = 0u32;
    loop {
        let hb = Heartbeat {
            url: cfg.advertise_url.clone(),
            capacity: node.report(),
        };
        let base = &cfg.schedulers[current % cfg.schedulers.len()];
        let url = format!("{base}/v1/nodes/{}/heartbeat", node.node_id());
        let mut req = client.post(&url).json(&hb);
        if let Some(t) = cfg.join_token.as_deref().or(node.api_token()) {
            req = req.bearer_auth(t);
        }
        let sent = req
            // a scheduler slower than one interval (frozen, overloaded) is skipped before the node's heartbeat
            // can expire (three intervals)
            .timeout(interval.clamp(Duration::from_millis(250), Duration::from_secs(2)))
            .send()
            .await
            .inspect(|_| node.scheduler_answered(interval))
            .and_then(|r| r.error_for_status());
        match sent {
            Ok(r) => match r.json::<HeartbeatAck>().await {
                Ok(ack) => {
                    if failures > 0 {
                        tracing::info!(scheduler = %base, "heartbeats accepted again");
                    }
                    failures = 0;
                    node.saw_epoch(ack.epoch);
                    interval = Duration::from_millis(ack.interval_ms.clamp(100, 60_000));
                }
                Err(e) => tracing::warn!(scheduler = %base, error = %e, "bad heartbeat answer"),
            },
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(scheduler = %base, error = %e, failures, "heartbeat failed; trying the next scheduler");
                }
                current = current.wrapping_add(1);
                // with more than one scheduler, try the next one at once
                if cfg.schedulers.len() > 1 && failures % cfg.schedulers.len() as u32 != 0 {
                    continue;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
