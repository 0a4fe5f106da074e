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
/// only placed records with a booking on a live node can move.
pub fn moves(nodes: &[NodeEntry], records: &[StreamRecord], max_moves: usize) -> Vec<Move> {
    let mut view = fleet::view(nodes, records, &HashSet::new());
    let running: Vec<(&StreamRecord, Demand, Slot)> = records
        .iter()
        .filter(|r| r.phase == Phase::Placed)
        .filter_map(|r| {
            let node = view
                .iter()
                .position(|n| Some(n.id.as_str()) == r.node.as_deref())?;
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
