//! Reconciliation as a pure decision: what the leader must do so that the daemons run what the records say
//! ([`plan`]). No I/O, no clock, no tokio: the inputs are the stream records, the fleet as the daemons report it
//! ([`Fleet`]), the nodes already declared dead, and the time ([`Context`]). `crate::exec` performs the actions.
//!
//! For each record (in record order):
//! - the copy to keep is the one on the record's node when it is placed there and runs there, else the first
//!   running copy (in node-id order); every other copy is a stray and is stopped ([`Action::StopStray`]);
//! - placed on a live node that runs it: nothing more;
//! - a kept copy elsewhere (the record is pending, or its node is dead or lost it): the copy is adopted where it
//!   runs, with the GPU it runs on and the matching demand alternative ([`Action::Adopt`]);
//! - no copy, placed on a live node: after the grace period (its node's report may lag a placement) it is started
//!   there again ([`Action::Restart`]; the daemon restarted); within the grace period nothing is done;
//! - no copy, placed on a dead node: re-placed with one more move ([`Action::Replace`] with `moved`); pending
//!   records are re-placed too. All re-placements form one batch.
//!
//! - placed on an evacuating node (drained with `evacuate`, or a daemon that reports `draining` after SIGTERM) that
//!   runs it: it is placed elsewhere and started there while the old copy plays on ([`Action::Evacuate`]; the
//!   record names the old node in `handover_from`); once the new copy publishes (`running`), the old one is
//!   stopped and the record forgets it ([`Action::Handover`]). Make-before-break: viewers following `/play` move
//!   to a copy that already has parts. If the new node dies first, the old copy is adopted again.
//!
//! - with [`Context::relieve`], placed on a live, accepting node that reports it behind real time (over its last
//!   10 s), and placed there over a minute ago: moved the same way ([`Action::Relieve`]), at most one stream per
//!   node per pass.
//!
//! Copies that are ended or stopping are on their way out and do not count. While the lease is new
//! ([`Context::warming`]) no node is declared dead and records placed on silent nodes are left alone: their
//! heartbeats may have lapsed only because nobody led.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_model::node::NodeStream;
use kiln_model::{Backend, StreamRequest, StreamState};

use crate::fleet;
use crate::store::{NodeEntry, Phase, StreamRecord};

/// One running copy of a stream, as a live node reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningCopy<'a> {
    pub node: &'a str,
    /// The node's base URL.
    pub url: &'a str,
    pub stream: &'a NodeStream,
    /// The position of its NVENC GPU in the node's report (what records book); `None` on the CPU, or when the
    /// report does not list that GPU.
    pub gpu: Option<usize>,
}

impl RunningCopy<'_> {
    fn on_gpu(&self) -> bool {
        matches!(self.stream.backend, Backend::Nvenc { .. })
    }
}

/// The fleet as the daemons report it.
#[derive(Debug, Clone, Default)]
pub struct Fleet<'a> {
    /// Live nodes (a heartbeat within three intervals): id → base URL.
    pub alive: BTreeMap<&'a str, &'a str>,
    /// Live nodes whose streams are to be moved elsewhere ([`NodeEntry::evacuating`]).
    pub evacuating: HashSet<&'a str>,
    /// Known nodes without a live heartbeat, in id order.
    pub silent: Vec<&'a str>,
    /// Stream id → its running copies on live nodes (neither ended nor stopping), in node-id order.
    pub copies: HashMap<&'a str, Vec<RunningCopy<'a>>>,
}

impl<'a> Fleet<'a> {
    pub fn from_nodes(nodes: &'a [NodeEntry]) -> Self {
        let mut f = Fleet::default();
        let mut live = BTreeMap::new();
        for n in nodes {
            match &n.heartbeat {
                Some(hb) => {
                    f.alive.insert(n.id.as_str(), hb.url.as_str());
                    if n.evacuating() {
                        f.evacuating.insert(n.id.as_str());
                    }
                    live.insert(n.id.as_str(), hb);
                }
                None => f.silent.push(&n.id),
            }
        }
        for (node, hb) in live {
            for s in &hb.capacity.streams {
                if matches!(s.state, StreamState::Ended | StreamState::Stopping) {
                    continue;
                }
                let gpu = match s.backend {
                    Backend::Nvenc { gpu } => hb.capacity.gpus.iter().position(|g| g.index == gpu),
                    Backend::Cpu => None,
                };
                f.copies.entry(&s.id).or_default().push(RunningCopy {
                    node,
                    url: &hb.url,
                    stream: s,
                    gpu,
                });
            }
        }
        f
    }
}

/// The leader's situation for one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// The leader's epoch, written into adopted records.
    pub epoch: u64,
    /// Unix ms now.
    pub now_ms: u64,
    /// How long after its placement a stream may be missing from its node's report.
    pub grace_ms: u64,
    /// Within one lease period of taking the lease.
    pub warming: bool,
    /// Move streams their nodes report behind real time ([`Action::Relieve`]; `--relieve-behind`) once they have
    /// been this many ms on their node (`--relieve-after-s`, [`RELIEF_AFTER_MS`] by default); `None`: never.
    pub relieve: Option<u64>,
}

/// One thing the leader does to bring the daemons and the records in line.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A node has no live heartbeat and was not declared dead before: count its death.
    NodeDied { node: String },
    /// A node declared dead reports again: forget its death (a later death counts again).
    NodeBack { node: String },
    /// Stop a copy that is not the kept one.
    StopStray {
        stream: String,
        node: String,
        url: String,
    },
    /// Save `record`: the running copy it describes is booked where it runs, nothing restarts.
    Adopt { record: StreamRecord },
    /// Its live node does not run it: start it there again (`spec` to `url`). If the daemon will not, the record
    /// joins the re-placement batch ([`released`]).
    Restart {
        record: StreamRecord,
        url: String,
        /// Boxed: a spec is large, and the record carries one already.
        spec: Box<StreamRequest>,
    },
    /// Re-place `record` (already released: pending, nothing booked) in the one batch that follows every other
    /// action. `moved`: its node died (its `moves` was counted up).
    Replace { record: StreamRecord, moved: bool },
    /// Place `record` (running on its evacuating node, named in `handover_from`) on another node and start it
    /// there, in one batch after the re-placements; the old copy keeps running. Nothing changes if it fits nowhere.
    Evacuate { record: StreamRecord },
    /// Like [`Action::Evacuate`], for a stream its live, accepting node reports behind real time (a node short of
    /// CPU or GPU): moved, make-before-break, to another node. At most one per node per pass, and not within
    /// [`RELIEF_AFTER_MS`] of its last placement.
    Relieve { record: StreamRecord },
    /// The moved copy publishes: stop the old copies (`node`, `url`) and save `record` without `handover_from`.
    Handover {
        record: StreamRecord,
        stop: Vec<(String, String)>,
    },
}

/// The record as it waits for a new place: pending, with nothing booked.
pub fn released(r: StreamRecord) -> StreamRecord {
    StreamRecord {
        phase: Phase::Pending,
        node: None,
        gpu: None,
        demand: None,
        ..r
    }
}

/// What to do, in order: deaths first, then each record's strays and its adoption, restart or re-placement.
/// `known_dead` are the nodes whose deaths were counted already.
pub fn plan(
    records: &[StreamRecord],
    fleet: &Fleet<'_>,
    known_dead: &HashSet<String>,
    ctx: &Context,
) -> Vec<Action> {
    let mut out = if ctx.warming {
        Vec::new()
    } else {
        deaths(fleet, known_dead)
    };
    for r in records {
        plan_record(r, fleet, ctx, &mut out);
    }
    // one relief move per node and pass: moving one stream may be enough to bring the others back to real time
    let mut relieved = HashSet::new();
    out.retain(|a| match a {
        Action::Relieve { record } => relieved.insert(record.handover_from.clone()),
        _ => true,
    });
    out
}

/// How long the removal of a stream is remembered once no live node reports a copy of it: long enough for a
/// node that missed the stop (a DELETE that timed out, a create given up after its start went through) to
/// report the copy and have it stopped.
pub const REMOVED_KEEP_MS: u64 = 5 * 60 * 1000;

/// What to do about removed streams' copies ([`removed_copies`]).
#[derive(Debug, Default, PartialEq)]
pub struct RemovedCopies {
    /// Copies live nodes still run, to stop.
    pub stop: Vec<Action>,
    /// Removals whose copies were reported now: their time moves to now, so they are kept
    /// [`REMOVED_KEEP_MS`] from the last report, not from the removal.
    pub seen: Vec<String>,
    /// Removals no node has reported a copy of for [`REMOVED_KEEP_MS`]: forgotten.
    pub forget: Vec<String>,
}

/// The copies of removed streams (`removed`: id → when last known to run, [`crate::store::Store::removed`])
/// that live nodes still run: each is stopped ([`Action::StopStray`]), the copy a deleted stream's move left on
/// its old node too. Within the grace period of the removal a copy is left alone: a report sent before a delete
/// that went through still lists it. A stream placed again under the same id is not removed any more (its save
/// forgets the removal).
pub fn removed_copies(
    removed: &HashMap<String, u64>,
    records: &[StreamRecord],
    fleet: &Fleet<'_>,
    ctx: &Context,
) -> RemovedCopies {
    let recorded: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut ids: Vec<(&String, &u64)> = removed.iter().collect();
    ids.sort();
    let mut out = RemovedCopies::default();
    for (id, &at) in ids {
        if recorded.contains(id.as_str()) {
            continue;
        }
        let age = ctx.now_ms.saturating_sub(at);
        match fleet.copies.get(id.as_str()).filter(|c| !c.is_empty()) {
            Some(_) if age <= ctx.grace_ms => {}
            Some(copies) => {
                out.seen.push(id.clone());
                out.stop.extend(copies.iter().map(|c| Action::StopStray {
                    stream: id.clone(),
                    node: c.node.to_string(),
                    url: c.url.to_string(),
                }));
            }
            None if age > REMOVED_KEEP_MS => out.forget.push(id.clone()),
            None => {}
        }
    }
    out
}

/// How long a node with nothing placed on it is remembered after its last heartbeat.
pub const FORGET_NODE_AFTER_MS: u64 = 24 * 3600 * 1000;

/// Silent nodes the fleet forgets ([`crate::store::Store::forget_node`]): no heartbeat for
/// [`FORGET_NODE_AFTER_MS`] and no record placed on them or moving off them. Returns those, and the silent nodes
/// with no last-seen time (known from before it was kept), whose clock starts now.
pub fn forgotten(
    fleet: &Fleet<'_>,
    records: &[StreamRecord],
    seen: &HashMap<String, u64>,
    now_ms: u64,
) -> (Vec<String>, Vec<String>) {
    let used: HashSet<&str> = records
        .iter()
        .flat_map(|r| [r.node.as_deref(), r.handover_from.as_deref()])
        .flatten()
        .collect();
    let (mut forget, mut unclocked) = (Vec::new(), Vec::new());
    for &n in fleet.silent.iter().filter(|n| !used.contains(*n)) {
        match seen.get(n) {
            Some(&at) if now_ms.saturating_sub(at) > FORGET_NODE_AFTER_MS => {
                forget.push(n.to_string())
            }
            Some(_) => {}
            None => unclocked.push(n.to_string()),
        }
    }
    (forget, unclocked)
}

fn deaths(fleet: &Fleet<'_>, known_dead: &HashSet<String>) -> Vec<Action> {
    let died = fleet
        .silent
        .iter()
        .filter(|n| !known_dead.contains(**n))
        .map(|n| Action::NodeDied {
            node: n.to_string(),
        });
    let back = fleet
        .alive
        .keys()
        .filter(|n| known_dead.contains(**n))
        .map(|n| Action::NodeBack {
            node: n.to_string(),
        });
    died.chain(back).collect()
}

fn plan_record(r: &StreamRecord, fleet: &Fleet<'_>, ctx: &Context, out: &mut Vec<Action>) {
    let here = fleet
        .copies
        .get(r.id.as_str())
        .map_or(&[][..], Vec::as_slice);
    let placed_on = r.node.as_deref().filter(|_| r.phase == Phase::Placed);
    if handover(r, placed_on, here, fleet, ctx, out) {
        return;
    }
    let keep = match placed_on {
        Some(n) if here.iter().any(|c| c.node == n) => Some(n),
        _ => here.first().map(|c| c.node),
    };
    for c in here.iter().filter(|c| Some(c.node) != keep) {
        out.push(Action::StopStray {
            stream: r.id.clone(),
            node: c.node.to_string(),
            url: c.url.to_string(),
        });
    }
    match keep {
        Some(n) if placed_on == Some(n) => {
            // a `publish:` stream's publisher is connected here: a copy elsewhere would only wait for it
            if fleet.evacuating.contains(n) && !r.request.source.starts_with("publish:") {
                out.push(Action::Evacuate {
                    record: StreamRecord {
                        handover_from: Some(n.to_string()),
                        ..r.clone()
                    },
                });
            } else if ctx
                .relieve
                .is_some_and(|after| ctx.now_ms.saturating_sub(r.placed_unix_ms) > after)
                && !ctx.warming
                && here
                    .iter()
                    .any(|c| c.node == n && c.stream.behind_real_time)
                && !r.request.source.starts_with("publish:")
            {
                out.push(Action::Relieve {
                    record: StreamRecord {
                        handover_from: Some(n.to_string()),
                        ..r.clone()
                    },
                });
            } else if r.handover_from.is_some() {
                // a move that ended without a handover (the new node died, the old copy was adopted)
                out.push(Action::Adopt {
                    record: StreamRecord {
                        handover_from: None,
                        ..r.clone()
                    },
                });
            }
        }
        Some(n) => {
            let copy = here.iter().find(|c| c.node == n).expect("the kept copy");
            out.push(Action::Adopt {
                record: adopted(r, copy, ctx),
            });
        }
        None => out.extend(lost(r, fleet, ctx)),
    }
}

/// A move in progress (`handover_from` names another node than the record's live one): waits while the new copy
/// starts, stops the old copies once it publishes, starts it again on its node if it is missing there past the
/// grace period. `false` when there is no such move (or its new node died): the other rules apply.
fn handover(
    r: &StreamRecord,
    placed_on: Option<&str>,
    here: &[RunningCopy<'_>],
    fleet: &Fleet<'_>,
    ctx: &Context,
    out: &mut Vec<Action>,
) -> bool {
    let (Some(from), Some(to)) = (r.handover_from.as_deref(), placed_on) else {
        return false;
    };
    if from == to {
        return false;
    }
    if !fleet.alive.contains_key(to) {
        // silent only because the lease or the Redis master is new: wait rather than undo the move
        return ctx.warming;
    }
    let new = here.iter().find(|c| c.node == to);
    let old = here.iter().find(|c| c.node != to);
    let stuck = new
        .is_some_and(|c| matches!(c.stream.state, StreamState::Failed | StreamState::Waiting))
        || ctx.now_ms.saturating_sub(r.placed_unix_ms) > HANDOVER_LIMIT_MS;
    if let (true, Some(o)) = (
        stuck && new.is_none_or(|c| c.stream.state != StreamState::Running),
        old,
    ) {
        // the new copy failed, waits for a publisher, or never got going: keep the old one, drop the new one (the
        // next pass tries the move again while the old node still drains)
        if let Some(n) = new {
            out.push(Action::StopStray {
                stream: r.id.clone(),
                node: n.node.to_string(),
                url: n.url.to_string(),
            });
        }
        out.push(Action::Adopt {
            record: adopted(r, o, ctx),
        });
        return true;
    }
    match new {
        // running, with a whole segment: viewers sent there find no hole between the two copies' timelines
        Some(c) if c.stream.state == StreamState::Running && c.stream.has_segment => {
            out.push(Action::Handover {
                record: StreamRecord {
                    handover_from: None,
                    ..r.clone()
                },
                stop: here
                    .iter()
                    .filter(|c| c.node != to)
                    .map(|c| (c.node.to_string(), c.url.to_string()))
                    .collect(),
            })
        }
        Some(_) => {} // starting, or no whole segment yet: the old copy plays on meanwhile
        None => out.extend(lost(r, fleet, ctx)),
    }
    true
}

/// How long a move may wait for its new copy to publish before it is given up (the old copy kept).
pub const HANDOVER_LIMIT_MS: u64 = 60_000;

/// By default a stream behind real time is moved only this long after its last placement: its real-time window
/// (10 s) must describe its current node, and a stream is not bounced between nodes.
pub const RELIEF_AFTER_MS: u64 = 60_000;

/// The record of an adopted copy: placed where it runs, on its GPU, booking the alternative that matches where
/// it encodes (the first one if none does).
fn adopted(r: &StreamRecord, copy: &RunningCopy<'_>, ctx: &Context) -> StreamRecord {
    let alt = r
        .alternatives
        .iter()
        .position(|d| d.gpu.is_some() == copy.on_gpu())
        .unwrap_or(0);
    StreamRecord {
        phase: Phase::Placed,
        node: Some(copy.node.to_string()),
        gpu: copy.gpu,
        demand: r.alternatives.get(alt).copied(),
        epoch: ctx.epoch,
        placed_unix_ms: ctx.now_ms,
        handover_from: None,
        ..r.clone()
    }
}

/// A record no live node runs.
fn lost(r: &StreamRecord, fleet: &Fleet<'_>, ctx: &Context) -> Option<Action> {
    let live_url = r.node.as_deref().and_then(|n| fleet.alive.get(n));
    match (r.phase, live_url) {
        (Phase::Placed, Some(url)) => {
            if ctx.now_ms.saturating_sub(r.placed_unix_ms) <= ctx.grace_ms {
                return None; // just placed: the node's report may not show it yet
            }
            let spec = r
                .demand
                .map_or(r.request.clone(), |d| fleet::pinned(&r.request, &d));
            Some(Action::Restart {
                record: r.clone(),
                url: url.to_string(),
                spec: Box::new(spec),
            })
        }
        (Phase::Placed, None) if ctx.warming => None,
        (Phase::Placed, None) => Some(Action::Replace {
            record: released(StreamRecord {
                moves: r.moves + 1,
                ..r.clone()
            }),
            moved: true,
        }),
        (Phase::Pending, _) => Some(Action::Replace {
            record: released(r.clone()),
            moved: false,
        }),
    }
}

#[cfg(test)]
mod tests;
