//! Placing streams: the batch decision every placement goes through ([`Scheduler::place`]: solve, book in the
//! store, start on the daemons, try refused streams elsewhere), and the two stream writes of the API
//! ([`Scheduler::create`], [`Scheduler::delete`]).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use futures_util::StreamExt;
use kiln_binpack::{solve, Demand, Item, Problem, Solution};
use kiln_model::StreamRequest;

use crate::client::CommandError;
use crate::lead::Fencing;
use crate::store::{BinCaps, NodeEntry, Phase, StoreError, StreamRecord};
use crate::{fleet, unix_ms, PlaceError, Scheduler};

/// Daemon commands a batch decision sends at once.
const PUT_CONCURRENCY: usize = 32;

/// Why a stream of a batch was not placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unplaced {
    /// A daemon answered 400: the spec itself is bad.
    #[error("the daemon rejected the spec: {0}")]
    Rejected(String),
    /// No node took it: the last node's refusal, or that none had room.
    #[error("{0}")]
    NoRoom(String),
}

/// What `Scheduler::place` answers per stream: the placed record, or the record as it was and why not.
pub type Placement = Result<StreamRecord, (StreamRecord, Unplaced)>;

/// The capacity a booking on `node` (and its GPU `gpu`) is checked against, from its heartbeat.
pub(crate) fn caps(nodes: &[NodeEntry], node: &str, gpu: Option<usize>) -> Option<BinCaps> {
    let hb = nodes.iter().find(|n| n.id == node)?.heartbeat.as_ref()?;
    Some(BinCaps {
        node: (hb.capacity.gpus.iter())
            .fold(hb.capacity.host.capacity, |all, g| all.plus(&g.capacity)),
        gpu: gpu
            .and_then(|g| hb.capacity.gpus.get(g))
            .map(|g| g.capacity),
    })
}

/// The base URL of a live node.
pub(crate) fn url_of(nodes: &[NodeEntry], node: &str) -> Option<String> {
    nodes
        .iter()
        .find(|n| n.id == node)
        .and_then(|n| n.heartbeat.as_ref())
        .map(|h| h.url.clone())
}

/// The nodes each stream of a batch may no longer go to, and why the last one did not take it.
#[derive(Debug, Default)]
struct Tried {
    excluded: HashMap<String, HashSet<String>>,
    last_error: HashMap<String, String>,
}

impl Tried {
    fn refused(&mut self, id: &str, node: &str, why: impl std::fmt::Display) {
        self.excluded
            .entry(id.to_string())
            .or_default()
            .insert(node.to_string());
        self.last_error
            .insert(id.to_string(), format!("{node}: {why}"));
    }

    fn why(&self, id: &str) -> Option<String> {
        self.last_error.get(id).cloned()
    }
}

/// A stream booked in the store in this attempt, to be started on its node.
#[derive(Debug)]
struct Booked {
    /// The record as it was before the booking (saved back if the daemon does not start it).
    rec: StreamRecord,
    placed: StreamRecord,
    node: String,
    demand: Demand,
    url: String,
    spec: StreamRequest,
}

impl Scheduler {
    /// Places `recs` (new, displaced or pending) as one batch, books them and commands their daemons. A daemon's
    /// refusal excludes that node and the stream is tried again elsewhere (at most three nodes); what fits nowhere
    /// is returned with the reason. `reason` labels the placement metric.
    pub(crate) async fn place(
        &self,
        epoch: u64,
        mut recs: Vec<StreamRecord>,
        nodes: &[NodeEntry],
        reason: &str,
    ) -> Result<Vec<Placement>, PlaceError> {
        let mut done = Vec::new();
        let mut tried = Tried::default();
        // a stream moving off a node never goes back to it in the same move
        for r in &recs {
            if let Some(from) = &r.handover_from {
                tried
                    .excluded
                    .entry(r.id.clone())
                    .or_default()
                    .insert(from.clone());
            }
        }
        for _attempt in 0..3 {
            if recs.is_empty() {
                break;
            }
            let records = self.stored(self.store.streams().await)?;
            let solution = self.solve(&recs, nodes, &records, &tried);
            // book every assignment first (the store serialises them), then start the booked streams on their
            // daemons concurrently: a failover of a node's hundred streams costs one daemon round trip, not a
            // hundred in a row
            let (booked, mut retry) = self
                .book(epoch, recs, &solution, nodes, &mut tried, &mut done)
                .await?;
            retry.extend(
                self.start(epoch, booked, reason, &mut tried, &mut done)
                    .await?,
            );
            recs = retry;
        }
        for rec in recs {
            let why = tried.why(&rec.id).unwrap_or_default();
            done.push(Err((rec, Unplaced::NoRoom(why))));
        }
        Ok(done)
    }

    /// One solver decision for the batch, on the live nodes minus every node a stream of it was refused on.
    fn solve(
        &self,
        recs: &[StreamRecord],
        nodes: &[NodeEntry],
        records: &[StreamRecord],
        tried: &Tried,
    ) -> Solution {
        // each stream has its own exclusions; the view excludes the union for a batch
        let all_excluded: HashSet<String> = recs
            .iter()
            .flat_map(|r| tried.excluded.get(&r.id).cloned().unwrap_or_default())
            .collect();
        let problem = Problem {
            nodes: fleet::view(nodes, records, &all_excluded),
            items: recs
                .iter()
                .map(|r| Item {
                    id: r.id.clone(),
                    alternatives: r.alternatives.clone(),
                })
                .collect(),
            strategy: self.config.strategy,
        };
        let t = Instant::now();
        let solution = solve(&problem, &[]);
        self.metrics
            .decision
            .observe(t.elapsed().as_secs_f64() / recs.len().max(1) as f64);
        solution
    }

    /// Books each assigned stream in the store. Answers the booked ones and those to try again (the store found
    /// their node full); streams without an assignment go to `done` as unplaced.
    async fn book(
        &self,
        epoch: u64,
        recs: Vec<StreamRecord>,
        solution: &Solution,
        nodes: &[NodeEntry],
        tried: &mut Tried,
        done: &mut Vec<Placement>,
    ) -> Result<(Vec<Booked>, Vec<StreamRecord>), PlaceError> {
        let (mut booked, mut retry) = (Vec::new(), Vec::new());
        for rec in recs {
            let Some(a) = solution.assignments.iter().find(|a| a.id == rec.id) else {
                let why = tried
                    .why(&rec.id)
                    .unwrap_or_else(|| "no live, accepting node has room for it".into());
                done.push(Err((rec, Unplaced::NoRoom(why))));
                continue;
            };
            let demand = rec.alternatives[a.alternative];
            let placed = StreamRecord {
                phase: Phase::Placed,
                node: Some(a.node.clone()),
                gpu: a.gpu,
                demand: Some(demand),
                epoch,
                placed_unix_ms: unix_ms(),
                ..rec.clone()
            };
            // fenced: what this pass booked but has not started stays booked; the next leader's reconcile finds
            // no copy on its node and starts it there
            let saved = self.store.save(epoch, &placed, caps(nodes, &a.node, a.gpu));
            match self.unfenced(saved.await)? {
                Ok(()) => booked.push(Booked {
                    url: url_of(nodes, &a.node).unwrap_or_default(),
                    spec: fleet::pinned(&rec.request, &demand),
                    node: a.node.clone(),
                    rec,
                    placed,
                    demand,
                }),
                Err(StoreError::Full(why)) => {
                    tried.refused(&rec.id, &a.node, why);
                    retry.push(rec);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((booked, retry))
    }

    /// Starts the booked streams on their daemons (concurrently) and sorts the answers: started ones go to
    /// `done`; refused ones give their booking back and are answered, to be tried elsewhere.
    async fn start(
        &self,
        epoch: u64,
        booked: Vec<Booked>,
        reason: &str,
        tried: &mut Tried,
        done: &mut Vec<Placement>,
    ) -> Result<Vec<StreamRecord>, PlaceError> {
        // owned arguments: futures that borrow from `booked` through a closure are not `Send` for every lifetime
        let commands: Vec<(String, String, StreamRequest)> = booked
            .iter()
            .map(|b| (b.url.clone(), b.rec.id.clone(), b.spec.clone()))
            .collect();
        let answers: Vec<Result<(), CommandError>> =
            futures_util::stream::iter(commands.into_iter().map(|(url, id, spec)| async move {
                self.daemons.put(epoch, &url, &id, &spec).await
            }))
            .buffered(PUT_CONCURRENCY)
            .collect()
            .await;
        let mut retry = Vec::new();
        // every answer is handled (bookings given back) before a deposed leader steps down
        let mut deposed = None;
        for (b, answer) in booked.into_iter().zip(answers) {
            let e = match answer {
                Ok(()) => {
                    tracing::info!(stream = %b.rec.id, node = %b.node, gpu = ?b.placed.gpu, booked = %b.demand.host.plus(&b.demand.gpu.unwrap_or_default()).describe(), reason, "placed");
                    self.metrics.placements.with_label_values(&[reason]).inc();
                    done.push(Ok(b.placed));
                    continue;
                }
                Err(e) => e,
            };
            if !e.is_fenced() && !matches!(e, CommandError::Rejected { .. }) {
                tracing::warn!(stream = %b.rec.id, node = %b.node, error = %e, "daemon refused; trying another node");
            }
            // undo the booking, keep the record as it was
            deposed = deposed.or(self.unbook(epoch, &b.rec).await);
            match e {
                CommandError::Fenced { .. } => deposed = deposed.or(e.deposes()),
                CommandError::Rejected { message, .. } => {
                    done.push(Err((b.rec, Unplaced::Rejected(message))))
                }
                _ => {
                    tried.refused(&b.rec.id, &b.node, &e);
                    retry.push(b.rec);
                }
            }
        }
        match deposed {
            Some(why) => Err(self.deposed(why)),
            None => Ok(retry),
        }
    }

    /// Gives back the booking of a stream its daemon did not start (saves the record as it was). `Some(why)` when
    /// the store says this process is deposed.
    async fn unbook(&self, epoch: u64, rec: &StreamRecord) -> Option<&'static str> {
        let e = self.store.save(epoch, rec, None).await.err()?;
        if e.deposes().is_none() {
            // the record stays booked on a node that does not run it: the batch goes on (a new booking replaces
            // it), and otherwise the leader loop finds no copy there, restarts it or re-places it
            tracing::warn!(stream = %rec.id, error = %e, "could not give a booking back");
        }
        e.deposes()
    }

    /// `POST /v1/streams`: books and starts one stream. `Ok((record, created))`.
    pub async fn create(
        &self,
        id: &str,
        req: StreamRequest,
    ) -> Result<(StreamRecord, bool), PlaceError> {
        let _g = self.decide.lock().await;
        let epoch = self.leading().ok_or(PlaceError::NotLeader)?;
        if let Some(existing) = self.stored(self.store.stream(id).await)? {
            return if existing.request == req {
                Ok((existing, false))
            } else {
                Err(PlaceError::Conflict(id.to_string()))
            };
        }
        let nodes = self.stored(self.store.nodes().await)?;
        let live: Vec<_> = nodes.iter().filter_map(|n| n.heartbeat.as_ref()).collect();
        let alternatives =
            fleet::alternatives(&self.config.presets, id, &req, &live).map_err(|e| match e {
                fleet::DemandError::Invalid(m) => PlaceError::Invalid(m),
                fleet::DemandError::NoGpu => PlaceError::NoRoom(e.to_string()),
            })?;
        let rec = StreamRecord {
            id: id.to_string(),
            request: req,
            phase: Phase::Pending,
            node: None,
            gpu: None,
            demand: None,
            alternatives,
            epoch,
            created_unix_ms: unix_ms(),
            placed_unix_ms: 0,
            moves: 0,
            handover_from: None,
        };
        let res = self.place(epoch, vec![rec], &nodes, "new").await?.pop();
        if !matches!(res, Some(Ok(_))) {
            // a refused new stream leaves nothing behind. If that fails, a pending record is left that the leader
            // loop would place later, so the client must not hear "refused": it hears why the store failed (and
            // a retry of the same request finds the record)
            self.stored(self.store.remove(epoch, id).await)?;
        }
        match res {
            Some(Ok(r)) => Ok((r, true)),
            Some(Err((_, u @ Unplaced::Rejected(_)))) => Err(PlaceError::Invalid(u.to_string())),
            Some(Err((_, u))) => Err(PlaceError::NoRoom(u.to_string())),
            None => Err(PlaceError::NoRoom("nothing placed".into())),
        }
    }

    /// `DELETE /v1/streams/{id}`: stops it on its node (and on the node a move is taking it from) and forgets
    /// it. The store remembers the removal, so a copy this missed (a stop that failed, a node that was away) is
    /// stopped by the leader loop when a node reports it ([`crate::plan::removed_copies`]). `false` when unknown.
    pub async fn delete(&self, id: &str) -> Result<bool, PlaceError> {
        let _g = self.decide.lock().await;
        let epoch = self.leading().ok_or(PlaceError::NotLeader)?;
        let Some(rec) = self.stored(self.store.stream(id).await)? else {
            return Ok(false);
        };
        let nodes = self.stored(self.store.nodes().await)?;
        let on = [rec.node.as_deref(), rec.handover_from.as_deref()];
        for url in on.into_iter().flatten().filter_map(|n| url_of(&nodes, n)) {
            if let Err(e) = self.unfenced(self.daemons.delete(epoch, &url, id).await)? {
                tracing::warn!(stream = id, error = %e, "stop on the node failed; the leader loop stops it as a stray");
            }
        }
        self.stored(self.store.remove(epoch, id).await)?;
        Ok(true)
    }
}
