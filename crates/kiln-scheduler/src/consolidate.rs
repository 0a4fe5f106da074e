//! Consolidation (`POST /v1/fleet/consolidate`): empties lightly loaded nodes by moving their streams onto nodes
//! already in use. [`moves`] decides (pure, with [`kiln_binpack::consolidate`]); [`Scheduler::consolidate`] moves
//! each stream: stop on its node, book on the target, start there (never two copies at once).

use std::collections::HashSet;

use kiln_binpack::{Demand, Slot};

use crate::place::{caps, url_of};
use crate::store::{NodeEntry, Phase, StreamRecord};
use crate::{fleet, unix_ms, PlaceError, Scheduler};

/// One stream to move.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub rec: StreamRecord,
    pub demand: Demand,
    pub from: String,
    pub to: String,
    /// The GPU (position in the target's report) it books there.
    pub gpu: Option<usize>,
}

/// The moves that empty lightly loaded nodes, at most `max_moves`. Draining nodes are neither emptied nor filled;
/// only placed records with a booking on a live node can move. A node is not emptied while it holds a stream that
/// cannot move: a pushed one (`publish:`, its publisher is connected to that node and would not follow), or one
/// whose record names a GPU the node no longer reports. Such a node can still receive streams.
pub fn moves(nodes: &[NodeEntry], records: &[StreamRecord], max_moves: usize) -> Vec<Move> {
    let mut view = fleet::view(nodes, records, &HashSet::new());
    let placed = |r: &&StreamRecord| r.phase == Phase::Placed;
    let node_of = |r: &StreamRecord| {
        view.iter()
            .position(|n| Some(n.id.as_str()) == r.node.as_deref())
    };
    let pinned: HashSet<usize> = records
        .iter()
        .filter(placed)
        .filter_map(|r| {
            let node = node_of(r)?;
            let stale_gpu = r.gpu.is_some_and(|g| g >= view[node].gpus.len());
            (r.request.source.starts_with("publish:") || stale_gpu).then_some(node)
        })
        .collect();
    let running: Vec<(&StreamRecord, Demand, Slot)> = records
        .iter()
        .filter(placed)
        .filter_map(|r| {
            let node = node_of(r).filter(|n| !pinned.contains(n))?;
            Some((r, r.demand?, Slot { node, gpu: r.gpu }))
        })
        .collect();
    let pairs: Vec<_> = running.iter().map(|(_, d, s)| (*d, *s)).collect();
    let plan = kiln_binpack::consolidate(&mut view, &pairs, max_moves);
    plan.into_iter()
        .map(|(i, slot)| {
            let (rec, demand, from) = &running[i];
            Move {
                rec: (*rec).clone(),
                demand: *demand,
                from: view[from.node].id.clone(),
                to: view[slot.node].id.clone(),
                gpu: slot.gpu,
            }
        })
        .collect()
}

impl Scheduler {
    /// Empties lightly loaded nodes by moving their streams onto nodes already in use (`consolidate::moves`), at most
    /// `max_moves` streams. A move stops the stream on its node, then starts it on the new one: viewers see the
    /// stream end there and come back through `/play`. Returns the moves done as (stream, from, to).
    pub async fn consolidate(
        &self,
        max_moves: usize,
    ) -> Result<Vec<(String, String, String)>, PlaceError> {
        let _g = self.decide.lock().await;
        let epoch = self.leading().ok_or(PlaceError::NotLeader)?;
        let nodes = self.stored(self.store.nodes().await)?;
        let records = self.stored(self.store.streams().await)?;
        let mut done = Vec::new();
        for m in moves(&nodes, &records, max_moves) {
            if self.move_stream(epoch, &m, &nodes).await? {
                done.push((m.rec.id, m.from, m.to));
            }
        }
        Ok(done)
    }

    /// One move; `false` when it did not happen (logged).
    async fn move_stream(
        &self,
        epoch: u64,
        m: &Move,
        nodes: &[NodeEntry],
    ) -> Result<bool, PlaceError> {
        let (id, from, to) = (&m.rec.id, &m.from, &m.to);
        let (Some(from_url), Some(to_url)) = (url_of(nodes, from), url_of(nodes, to)) else {
            return Ok(false);
        };
        if let Err(e) = self.unfenced(self.daemons.delete(epoch, &from_url, id).await)? {
            tracing::warn!(stream = %id, node = %from, error = %e, "could not stop it for a move; left in place");
            return Ok(false);
        }
        let moved = StreamRecord {
            node: Some(to.clone()),
            gpu: m.gpu,
            epoch,
            placed_unix_ms: unix_ms(),
            ..m.rec.clone()
        };
        let saved = self.store.save(epoch, &moved, caps(nodes, to, m.gpu)).await;
        if let Err(e) = self.unfenced(saved)? {
            // not booked on the target: the leader loop restarts it where it was or re-places it
            tracing::warn!(stream = %id, error = %e, "move not booked");
            return Ok(false);
        }
        let spec = fleet::pinned(&m.rec.request, &m.demand);
        if let Err(e) = self.unfenced(self.daemons.put(epoch, &to_url, id, &spec).await)? {
            // the record says `to`, which does not run it: the leader loop restarts or re-places it
            tracing::warn!(stream = %id, node = %to, error = %e, "the target refused a moved stream");
            return Ok(false);
        }
        tracing::info!(stream = %id, from = %from, to = %to, "moved (consolidation)");
        self.metrics
            .placements
            .with_label_values(&["consolidate"])
            .inc();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use kiln_model::capacity::Resources;
    use kiln_model::node::{CapacityReport, Heartbeat, HostReport};
    use kiln_model::StreamRequest;

    use super::*;

    fn node(id: &str) -> NodeEntry {
        NodeEntry {
            id: id.into(),
            heartbeat: Some(Heartbeat {
                url: format!("http://{id}"),
                capacity: CapacityReport {
                    node_id: id.into(),
                    epoch: 1,
                    fence_epoch: 0,
                    host: HostReport {
                        capacity: Resources {
                            cpu_millicores: 4000,
                            memory_mib: 4000,
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                    gpus: vec![],
                    gpu_inventory: Default::default(),
                    streams: vec![],
                    headroom: Default::default(),
                    demands: Default::default(),
                    vod: None,
                    draining: false,
                },
            }),
            draining: false,
            evacuate: false,
        }
    }

    fn on(id: &str, node: &str, source: &str, gpu: Option<usize>) -> StreamRecord {
        StreamRecord {
            id: id.into(),
            request: StreamRequest {
                source: source.into(),
                ..Default::default()
            },
            phase: Phase::Placed,
            node: Some(node.into()),
            gpu,
            demand: Some(Demand {
                host: Resources {
                    cpu_millicores: 1000,
                    memory_mib: 100,
                    ..Default::default()
                },
                gpu: gpu.map(|_| Resources::default()),
                pixel_rate: 1,
            }),
            alternatives: vec![],
            epoch: 1,
            created_unix_ms: 0,
            placed_unix_ms: 0,
            moves: 0,
            handover_from: None,
        }
    }

    #[test]
    fn a_pushed_stream_is_not_moved_and_its_node_can_take_others() {
        let nodes = [node("a"), node("b"), node("c")];
        let records = [
            on("s1", "a", "test:", None),
            on("pushed", "b", "publish:cam", None),
            on("s3", "c", "test:", None),
        ];
        let moves = moves(&nodes, &records, 10);
        assert!(
            moves.iter().all(|m| m.rec.id != "pushed"),
            "the publisher is connected to b: {moves:?}"
        );
        // the others still move (a plan that moved nothing would prove nothing), onto b too
        assert!(!moves.is_empty(), "nothing moved");
        assert!(moves.iter().all(|m| m.from != "b"), "{moves:?}");
    }

    #[test]
    fn a_record_on_a_gpu_its_node_no_longer_reports_does_not_panic_and_pins_its_node() {
        let nodes = [node("a"), node("b")];
        // a's report lists no GPU now; its record still names GPU 1
        let records = [
            on("stale", "a", "test:", Some(1)),
            on("s2", "b", "test:", None),
        ];
        let moves = moves(&nodes, &records, 10);
        assert!(moves.iter().all(|m| m.from != "a"), "{moves:?}");
        // b's stream can still move onto a
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].rec.id, "s2");
    }
}
