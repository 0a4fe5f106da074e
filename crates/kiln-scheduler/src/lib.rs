//! kiln-scheduler: places live streams on a fleet of kilnd nodes and keeps them placed.
//!
//! - **Input**: kilnd's node agent posts a heartbeat (its [`kiln_model::node::CapacityReport`]) every interval;
//!   a node whose heartbeat is three intervals old is dead.
//! - **Placement**: [`kiln_binpack::solve`] on the live, non-draining nodes, with bookings from the scheduler's
//!   own records; the chosen daemon then gets an idempotent `PUT /v1/streams/{id}` that carries the leader's
//!   epoch ([`kiln_model::node::EPOCH_HEADER`]). A daemon that refuses (its own admission is the last word) is
//!   excluded and the next best node is tried.
//! - **Keeping placed** ([`Scheduler::tick`], every interval, leader only): streams of dead nodes are re-placed as
//!   one batch; a stream a live node runs but the records put elsewhere (a node that came back, a deposed leader's
//!   command) is stopped there; a placed stream its node does not run (the daemon restarted) is started again;
//!   pending streams are retried.
//! - **State** ([`store`]): in memory for one scheduler, or Redis for several, with a leader lease, an epoch per
//!   lease as fencing token, and atomic (Lua) bookings. Followers answer reads and heartbeats and redirect writes
//!   to the leader (307).
//!
//! HTTP: `POST/GET /v1/streams`, `GET/DELETE /v1/streams/{id}`, `GET /v1/nodes`, `POST/DELETE
//! /v1/nodes/{id}/drain`, `POST /v1/nodes/{id}/heartbeat`, `GET /v1/fleet/headroom`, `GET /v1/leader`,
//! `GET /play/{stream}/{path…}` (302 to the node serving it), `GET /metrics`, `GET /healthz`.

pub mod api;
pub mod cli;
pub mod fleet;
pub mod metrics;
pub mod store;
pub mod vod;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;

use kiln_binpack::{solve, Item, Problem, Strategy};
use kiln_model::node::EPOCH_HEADER;
use kiln_model::{StreamRequest, StreamState};

use store::{BinCaps, LeaderInfo, NodeEntry, Phase, Store, StoreError, StreamRecord};

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// This process's id (leader lease holder name).
    pub instance_id: String,
    /// URL other schedulers redirect writes to while this one leads.
    pub advertise_url: String,
    /// Heartbeat interval asked of nodes; a node is dead after three missed heartbeats, the leader lease lasts
    /// three intervals and the leader loop runs once per interval.
    pub interval: Duration,
    pub presets: kiln_config::Presets,
    pub strategy: Strategy,
    /// The fleet's bearer token: required on this scheduler's control routes and heartbeats, and sent with every
    /// command to a daemon (which requires the same token); `None` leaves them open.
    pub api_token: Option<String>,
}

impl Config {
    pub fn heartbeat_ttl(&self) -> Duration {
        self.interval * 3
    }
}

/// Leadership as this process knows it.
#[derive(Debug, Clone, Copy)]
struct Role {
    epoch: Option<u64>,
    /// The lease is certainly still ours until then (one interval of margin before it can expire).
    valid_until: Instant,
    /// When this process last took the lease.
    since: Instant,
}

/// Why placing one stream failed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("{0}")]
    Invalid(String),
    #[error("stream `{0}` already exists with a different spec")]
    Conflict(String),
    #[error("no node has room: {0}")]
    NoRoom(String),
    #[error("this scheduler is not the leader")]
    NotLeader,
    #[error("store: {0}")]
    Store(String),
}

/// A daemon's answer to a command.
#[derive(Debug)]
enum Command {
    Done,
    /// 409 stale_epoch: we are deposed.
    Fenced,
    /// 400: the spec itself is bad.
    Rejected(String),
    /// 422/429/5xx/unreachable: try elsewhere.
    Refused(String),
}

/// The scheduler: state, leadership, HTTP client to daemons.
#[derive(Debug)]
pub struct Scheduler {
    pub config: Config,
    pub store: Store,
    pub metrics: metrics::Metrics,
    http: reqwest::Client,
    role: Mutex<Role>,
    /// One decision at a time in this process.
    decide: tokio::sync::Mutex<()>,
    /// Nodes seen dead, so a death is counted once.
    dead: Mutex<HashSet<String>>,
    /// VOD jobs this process routed, until the nodes' reports include them.
    routed: vod::Routed,
}

/// Daemon commands a batch decision sends at once.
const PUT_CONCURRENCY: usize = 32;

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Scheduler {
    pub fn new(config: Config, store: Store) -> Self {
        Self {
            config,
            store,
            metrics: metrics::Metrics::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("building the HTTP client"),
            role: Mutex::new(Role {
                epoch: None,
                valid_until: Instant::now(),
                since: Instant::now(),
            }),
            decide: tokio::sync::Mutex::new(()),
            dead: Mutex::new(HashSet::new()),
            routed: vod::Routed::default(),
        }
    }

    fn me(&self) -> LeaderInfo {
        LeaderInfo {
            id: self.config.instance_id.clone(),
            url: self.config.advertise_url.clone(),
            epoch: self.leading().unwrap_or(0),
        }
    }

    /// Our epoch while we certainly hold the lease.
    pub fn leading(&self) -> Option<u64> {
        let r = *self.role.lock().unwrap_or_else(|e| e.into_inner());
        r.epoch.filter(|_| Instant::now() < r.valid_until)
    }

    fn step_down(&self, why: &str) {
        let mut r = self.role.lock().unwrap_or_else(|e| e.into_inner());
        if r.epoch.is_some() {
            tracing::warn!(epoch = ?r.epoch, why, "stepping down");
        }
        r.epoch = None;
        self.metrics.leader.set(0);
    }

    /// Takes or renews the lease.
    pub async fn campaign(&self) {
        let started = Instant::now();
        let ttl = self.config.heartbeat_ttl();
        match self
            .store
            .lead(&self.config.instance_id, &self.config.advertise_url, ttl)
            .await
        {
            Ok(Some(epoch)) => {
                let mut r = self.role.lock().unwrap_or_else(|e| e.into_inner());
                if r.epoch != Some(epoch) {
                    tracing::info!(epoch, instance = %self.config.instance_id, "leading");
                    r.since = started;
                }
                r.epoch = Some(epoch);
                // the lease runs from before the call; keep one interval of margin
                r.valid_until = started + ttl.saturating_sub(self.config.interval);
                self.metrics.leader.set(1);
                self.metrics.epoch.set(epoch as i64);
            }
            Ok(None) => self.step_down("another scheduler holds the lease"),
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                // the lease may still be ours until valid_until; leading() checks the deadline
            }
        }
    }

    /// The leader as the store knows it.
    pub async fn leader(&self) -> Option<LeaderInfo> {
        self.store.leader(&self.me()).await.ok().flatten()
    }

    /// The fleet token on a command to a daemon, when one is configured.
    pub(crate) fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.api_token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn command_put(&self, epoch: u64, url: &str, id: &str, req: &StreamRequest) -> Command {
        let r = self
            .authed(self.http.put(format!("{url}/v1/streams/{id}")))
            .header(EPOCH_HEADER, epoch.to_string())
            .json(req)
            .send()
            .await;
        self.answer(r).await
    }

    async fn command_delete(&self, epoch: u64, url: &str, id: &str) -> Command {
        let r = self
            .authed(self.http.delete(format!("{url}/v1/streams/{id}")))
            .header(EPOCH_HEADER, epoch.to_string())
            .send()
            .await;
        match self.answer(r).await {
            Command::Refused(m) if m.starts_with("404") => Command::Done,
            other => other,
        }
    }

    async fn answer(&self, r: reqwest::Result<reqwest::Response>) -> Command {
        match r {
            Err(e) => Command::Refused(format!("unreachable: {e}")),
            Ok(r) if r.status().is_success() => Command::Done,
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                if status == 409 && body.contains("stale_epoch") {
                    self.metrics.fenced.inc();
                    Command::Fenced
                } else if status == 400 {
                    Command::Rejected(body)
                } else {
                    Command::Refused(format!("{status} {body}"))
                }
            }
        }
    }

    fn caps(nodes: &[NodeEntry], node: &str, gpu: Option<usize>) -> Option<BinCaps> {
        let hb = nodes.iter().find(|n| n.id == node)?.heartbeat.as_ref()?;
        Some(BinCaps {
            host: hb.capacity.host.capacity,
            gpu: gpu
                .and_then(|g| hb.capacity.gpus.get(g))
                .map(|g| g.capacity),
        })
    }

    fn url_of(nodes: &[NodeEntry], node: &str) -> Option<String> {
        nodes
            .iter()
            .find(|n| n.id == node)
            .and_then(|n| n.heartbeat.as_ref())
            .map(|h| h.url.clone())
    }

    /// Places `recs` (new, displaced or pending) as one batch, books them and commands their daemons. A daemon's
    /// refusal excludes that node and the stream is tried again elsewhere (at most three nodes); what fits nowhere
    /// is returned with the reason. `reason` labels the placement metric.
    async fn place(
        &self,
        epoch: u64,
        mut recs: Vec<StreamRecord>,
        nodes: &[NodeEntry],
        reason: &str,
    ) -> Result<Vec<Result<StreamRecord, (StreamRecord, String)>>, PlaceError> {
        let mut done: Vec<Result<StreamRecord, (StreamRecord, String)>> = Vec::new();
        let mut excluded: HashMap<String, HashSet<String>> = HashMap::new();
        let mut last_error: HashMap<String, String> = HashMap::new();
        for _attempt in 0..3 {
            if recs.is_empty() {
                break;
            }
            let records = self
                .store
                .streams()
                .await
                .map_err(|e| PlaceError::Store(e.to_string()))?;
            // each stream has its own exclusions; the view excludes the union for a batch
            let all_excluded: HashSet<String> = recs
                .iter()
                .flat_map(|r| excluded.get(&r.id).cloned().unwrap_or_default())
                .collect();
            let view = fleet::view(nodes, &records, &all_excluded);
            let problem = Problem {
                nodes: view,
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
            let mut retry = Vec::new();
            // book every assignment first (the store serialises them), then start the booked streams on their
            // daemons concurrently: a failover of a node's hundred streams costs one daemon round trip, not a
            // hundred in a row
            let mut booked = Vec::new();
            for rec in recs.drain(..) {
                let Some(a) = solution.assignments.iter().find(|a| a.id == rec.id) else {
                    let why = last_error
                        .get(&rec.id)
                        .cloned()
                        .unwrap_or_else(|| "no live, accepting node has room for it".into());
                    done.push(Err((rec, why)));
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
                match self
                    .store
                    .save(epoch, &placed, Self::caps(nodes, &a.node, a.gpu))
                    .await
                {
                    Ok(()) => {}
                    Err(StoreError::Fenced(_)) => {
                        // what this pass booked but has not started stays booked: the next leader's
                        // reconcile finds no copy on its node and starts it there
                        self.step_down("the store fenced a write");
                        return Err(PlaceError::NotLeader);
                    }
                    Err(StoreError::Full(why)) => {
                        excluded
                            .entry(rec.id.clone())
                            .or_default()
                            .insert(a.node.clone());
                        last_error.insert(rec.id.clone(), format!("{}: {why}", a.node));
                        retry.push(rec);
                        continue;
                    }
                    Err(e) => return Err(PlaceError::Store(e.to_string())),
                }
                let url = Self::url_of(nodes, &a.node).unwrap_or_default();
                let spec = fleet::pinned(&rec.request, &demand);
                booked.push((rec, placed, a.node.clone(), a.gpu, demand, url, spec));
            }
            let commands: Vec<(String, String, StreamRequest)> = booked
                .iter()
                .map(|(rec, _, _, _, _, url, spec)| (url.clone(), rec.id.clone(), spec.clone()))
                .collect();
            let answers: Vec<Command> = futures_util::stream::iter(commands.into_iter().map(
                |(url, id, spec)| async move { self.command_put(epoch, &url, &id, &spec).await },
            ))
            .buffered(PUT_CONCURRENCY)
            .collect()
            .await;
            let mut fenced = false;
            for ((rec, placed, node, gpu, demand, _, _), answer) in booked.into_iter().zip(answers)
            {
                match answer {
                    Command::Done => {
                        tracing::info!(stream = %rec.id, node = %node, gpu = ?gpu, booked = %fleet::describe(&demand.host.plus(&demand.gpu.unwrap_or_default())), reason, "placed");
                        self.metrics.placements.with_label_values(&[reason]).inc();
                        done.push(Ok(placed));
                    }
                    Command::Fenced => {
                        let _ = self.store.save(epoch, &rec, None).await;
                        fenced = true;
                    }
                    Command::Rejected(m) => {
                        let _ = self.store.save(epoch, &rec, None).await;
                        done.push(Err((rec, format!("the daemon rejected the spec: {m}"))));
                    }
                    Command::Refused(m) => {
                        tracing::warn!(stream = %rec.id, node = %node, error = %m, "daemon refused; trying another node");
                        // undo the booking, keep the record as it was
                        let _ = self.store.save(epoch, &rec, None).await;
                        last_error.insert(rec.id.clone(), format!("{node}: {m}"));
                        excluded.entry(rec.id.clone()).or_default().insert(node);
                        retry.push(rec);
                    }
                }
            }
            if fenced {
                self.step_down("a daemon follows a newer epoch");
                return Err(PlaceError::NotLeader);
            }
            recs = retry;
        }
        for rec in recs {
            let why = last_error.get(&rec.id).cloned().unwrap_or_default();
            done.push(Err((rec, why)));
        }
        Ok(done)
    }

    /// `POST /v1/streams`: books and starts one stream. `Ok((record, created))`.
    pub async fn create(
        &self,
        id: &str,
        req: StreamRequest,
    ) -> Result<(StreamRecord, bool), PlaceError> {
        let _g = self.decide.lock().await;
        let epoch = self.leading().ok_or(PlaceError::NotLeader)?;
        let st = |e: StoreError| PlaceError::Store(e.to_string());
        if let Some(existing) = self.store.stream(id).await.map_err(st)? {
            return if existing.request == req {
                Ok((existing, false))
            } else {
                Err(PlaceError::Conflict(id.to_string()))
            };
        }
        let nodes = self.store.nodes().await.map_err(st)?;
        let live: Vec<_> = nodes.iter().filter_map(|n| n.heartbeat.as_ref()).collect();
        let alternatives =
            fleet::alternatives(&self.config.presets, id, &req, &live).map_err(|e| match e {
                fleet::DemandError::Invalid(m) => PlaceError::Invalid(m),
                fleet::DemandError::NoGpu => PlaceError::NoRoom(e.to_string()),
            })?;
        let now = unix_ms();
        let rec = StreamRecord {
            id: id.to_string(),
            request: req,
            phase: Phase::Pending,
            node: None,
            gpu: None,
            demand: None,
            alternatives,
            epoch,
            created_unix_ms: now,
            placed_unix_ms: 0,
            moves: 0,
        };
        let res = self.place(epoch, vec![rec], &nodes, "new").await?.pop();
        if !matches!(res, Some(Ok(_))) {
            // a refused new stream leaves nothing behind
            let _ = self.store.remove(epoch, id).await;
        }
        match res {
            Some(Ok(r)) => Ok((r, true)),
            Some(Err((_, why))) if why.contains("rejected the spec") => {
                Err(PlaceError::Invalid(why))
            }
            Some(Err((_, why))) => Err(PlaceError::NoRoom(why)),
            None => Err(PlaceError::NoRoom("nothing placed".into())),
        }
    }

    /// `DELETE /v1/streams/{id}`: stops it on its node and forgets it. `false` when unknown.
    pub async fn delete(&self, id: &str) -> Result<bool, PlaceError> {
        let _g = self.decide.lock().await;
        let epoch = self.leading().ok_or(PlaceError::NotLeader)?;
        let st = |e: StoreError| PlaceError::Store(e.to_string());
        let Some(rec) = self.store.stream(id).await.map_err(st)? else {
            return Ok(false);
        };
        let nodes = self.store.nodes().await.map_err(st)?;
        if let Some(url) = rec.node.as_deref().and_then(|n| Self::url_of(&nodes, n)) {
            match self.command_delete(epoch, &url, id).await {
                Command::Fenced => {
                    self.step_down("a daemon follows a newer epoch");
                    return Err(PlaceError::NotLeader);
                }
                Command::Refused(m) | Command::Rejected(m) => {
                    tracing::warn!(stream = id, error = %m, "stop on the node failed; the leader loop stops it as a stray")
                }
                Command::Done => {}
            }
        }
        match self.store.remove(epoch, id).await {
            Err(StoreError::Fenced(_)) => {
                self.step_down("the store fenced a write");
                Err(PlaceError::NotLeader)
            }
            Err(e) => Err(st(e)),
            Ok(()) => Ok(true),
        }
    }

    /// Empties lightly loaded nodes by moving their streams onto nodes already in use
    /// ([`kiln_binpack::consolidate`]), at most `max_moves` streams. Draining nodes are neither emptied nor filled.
    /// A move stops the stream on its node, then starts it on the new one (never two copies at once): viewers
    /// see the stream end there and come back through `/play`. Returns the moves as (stream, from, to).
    pub async fn consolidate(
        &self,
        max_moves: usize,
    ) -> Result<Vec<(String, String, String)>, PlaceError> {
        let _g = self.decide.lock().await;
        let epoch = self.leading().ok_or(PlaceError::NotLeader)?;
        let st = |e: StoreError| PlaceError::Store(e.to_string());
        let nodes = self.store.nodes().await.map_err(st)?;
        let records = self.store.streams().await.map_err(st)?;
        let mut view = fleet::view(&nodes, &records, &HashSet::new());
        let running: Vec<(StreamRecord, kiln_binpack::Demand, kiln_binpack::Slot)> = records
            .iter()
            .filter(|r| r.phase == Phase::Placed)
            .filter_map(|r| {
                let node = view
                    .iter()
                    .position(|n| Some(n.id.as_str()) == r.node.as_deref())?;
                Some((
                    r.clone(),
                    r.demand?,
                    kiln_binpack::Slot { node, gpu: r.gpu },
                ))
            })
            .collect();
        let pairs: Vec<_> = running.iter().map(|(_, d, s)| (*d, *s)).collect();
        let plan = kiln_binpack::consolidate(&mut view, &pairs, max_moves);
        let mut done = Vec::new();
        for (i, slot) in plan {
            let (rec, demand, from) = &running[i];
            let (from, to) = (view[from.node].id.clone(), view[slot.node].id.clone());
            let (Some(from_url), Some(to_url)) =
                (Self::url_of(&nodes, &from), Self::url_of(&nodes, &to))
            else {
                continue;
            };
            match self.command_delete(epoch, &from_url, &rec.id).await {
                Command::Done => {}
                Command::Fenced => {
                    self.step_down("a daemon follows a newer epoch");
                    return Err(PlaceError::NotLeader);
                }
                Command::Rejected(m) | Command::Refused(m) => {
                    tracing::warn!(stream = %rec.id, node = %from, error = %m, "could not stop it for a move; left in place");
                    continue;
                }
            }
            let moved = StreamRecord {
                node: Some(to.clone()),
                gpu: slot.gpu,
                epoch,
                placed_unix_ms: unix_ms(),
                ..rec.clone()
            };
            match self
                .store
                .save(epoch, &moved, Self::caps(&nodes, &to, slot.gpu))
                .await
            {
                Ok(()) => {}
                Err(StoreError::Fenced(_)) => {
                    self.step_down("the store fenced a write");
                    return Err(PlaceError::NotLeader);
                }
                Err(e) => {
                    // not booked on the target: the leader loop restarts it where it was or re-places it
                    tracing::warn!(stream = %rec.id, error = %e, "move not booked");
                    continue;
                }
            }
            match self
                .command_put(
                    epoch,
                    &to_url,
                    &rec.id,
                    &fleet::pinned(&rec.request, demand),
                )
                .await
            {
                Command::Done => {
                    tracing::info!(stream = %rec.id, from = %from, to = %to, "moved (consolidation)");
                    self.metrics
                        .placements
                        .with_label_values(&["consolidate"])
                        .inc();
                    done.push((rec.id.clone(), from, to));
                }
                Command::Fenced => {
                    self.step_down("a daemon follows a newer epoch");
                    return Err(PlaceError::NotLeader);
                }
                Command::Rejected(m) | Command::Refused(m) => {
                    // the record says `to`, which does not run it: the leader loop restarts or re-places it
                    tracing::warn!(stream = %rec.id, node = %to, error = %m, "the target refused a moved stream");
                }
            }
        }
        Ok(done)
    }

    /// One pass of the leader loop: campaign, then (when leading) failover, reconciliation and retries.
    pub async fn tick(&self) {
        self.campaign().await;
        let Some(epoch) = self.leading() else {
            return;
        };
        let _g = self.decide.lock().await;
        if let Err(e) = self.reconcile(epoch).await {
            tracing::warn!(error = %e, "reconcile failed");
        }
    }

    /// Brings the daemons in line with the records, for each record:
    /// - placed on a live node that runs it: copies elsewhere are strays and are stopped;
    /// - a copy runs on a live node, but the record is pending, or its node is dead or lost it: the copy is
    ///   adopted (booked where it runs; nothing restarts) and further copies are stopped;
    /// - placed on a live node that does not run it (the daemon restarted): started there again;
    /// - placed on a dead node, no copy anywhere: re-placed, with the pending ones, as one batch.
    ///
    /// For one lease period after taking the lease, no node is declared dead: heartbeats that lapsed while
    /// nobody led (daemons moving to this scheduler) must not look like a fleet-wide death.
    async fn reconcile(&self, epoch: u64) -> Result<(), PlaceError> {
        let st = |e: StoreError| PlaceError::Store(e.to_string());
        let nodes = self.store.nodes().await.map_err(st)?;
        let records = self.store.streams().await.map_err(st)?;
        let warming = {
            let r = self.role.lock().unwrap_or_else(|e| e.into_inner());
            r.since.elapsed() < self.config.heartbeat_ttl()
        };
        let alive: BTreeMap<&str, &NodeEntry> = nodes
            .iter()
            .filter(|n| n.heartbeat.is_some())
            .map(|n| (n.id.as_str(), n))
            .collect();
        if !warming {
            let mut dead = self.dead.lock().unwrap_or_else(|e| e.into_inner());
            for n in &nodes {
                if n.heartbeat.is_none() {
                    if dead.insert(n.id.clone()) {
                        tracing::warn!(node = %n.id, "node missed three heartbeats: dead");
                        self.metrics.node_deaths.inc();
                    }
                } else {
                    dead.remove(&n.id);
                }
            }
        }
        // who runs what, from the daemons (ended or stopping copies are on their way out)
        let mut copies: HashMap<&str, Vec<(&str, &kiln_model::node::NodeStream, usize)>> =
            HashMap::new();
        for (id, n) in &alive {
            let hb = n.heartbeat.as_ref().expect("alive");
            for s in &hb.capacity.streams {
                if !matches!(s.state, StreamState::Ended | StreamState::Stopping) {
                    let gpu = match s.backend {
                        kiln_model::Backend::Nvenc { gpu } => {
                            hb.capacity.gpus.iter().position(|g| g.index == gpu)
                        }
                        kiln_model::Backend::Cpu => None,
                    };
                    copies.entry(s.id.as_str()).or_default().push((
                        id,
                        s,
                        gpu.unwrap_or(usize::MAX),
                    ));
                }
            }
        }
        let grace = (self.config.interval * 3).as_millis() as u64;
        let now = unix_ms();
        let mut batch = Vec::new();
        let mut moved = 0;
        for r in records {
            let here = copies.get(r.id.as_str()).cloned().unwrap_or_default();
            let node_alive = r.node.as_deref().is_some_and(|n| alive.contains_key(n));
            let keep: Option<&str> = match (r.phase, r.node.as_deref()) {
                (Phase::Placed, Some(n)) if here.iter().any(|c| c.0 == n) => Some(n),
                _ => here.first().map(|c| c.0),
            };
            // stop every copy but the one kept
            for (n, _, _) in here.iter().filter(|c| Some(c.0) != keep) {
                tracing::warn!(stream = %r.id, node = %n, "stray copy: stopping it");
                let url = &alive[n].heartbeat.as_ref().expect("alive").url;
                if let Command::Fenced = self.command_delete(epoch, url, &r.id).await {
                    self.step_down("a daemon follows a newer epoch");
                    return Err(PlaceError::NotLeader);
                }
                self.metrics.strays.inc();
            }
            match keep {
                Some(n) if r.phase == Phase::Placed && r.node.as_deref() == Some(n) => {}
                Some(n) => {
                    // adopt the running copy
                    let (_, s, gpu) = here.iter().find(|c| c.0 == n).expect("kept copy");
                    let on_gpu = matches!(s.backend, kiln_model::Backend::Nvenc { .. });
                    let alt = r
                        .alternatives
                        .iter()
                        .position(|d| d.gpu.is_some() == on_gpu)
                        .unwrap_or(0);
                    let adopted = StreamRecord {
                        phase: Phase::Placed,
                        node: Some(n.to_string()),
                        gpu: (*gpu != usize::MAX).then_some(*gpu),
                        demand: r.alternatives.get(alt).copied(),
                        epoch,
                        placed_unix_ms: now,
                        ..r.clone()
                    };
                    tracing::info!(stream = %r.id, node = %n, "adopted the running copy");
                    if let Err(StoreError::Fenced(_)) = self.store.save(epoch, &adopted, None).await
                    {
                        self.step_down("the store fenced a write");
                        return Err(PlaceError::NotLeader);
                    }
                }
                None if r.phase == Phase::Placed && node_alive => {
                    if now.saturating_sub(r.placed_unix_ms) <= grace {
                        continue; // just placed: the node's report may not show it yet
                    }
                    // the daemon lost it (restarted): start it there again
                    let url = alive[r.node.as_deref().expect("placed")]
                        .heartbeat
                        .as_ref()
                        .expect("alive")
                        .url
                        .clone();
                    let spec = r
                        .demand
                        .map_or(r.request.clone(), |d| fleet::pinned(&r.request, &d));
                    match self.command_put(epoch, &url, &r.id, &spec).await {
                        Command::Done => {
                            tracing::info!(stream = %r.id, node = ?r.node, "restarted on its node");
                            self.metrics
                                .placements
                                .with_label_values(&["restart"])
                                .inc();
                            let _ = self
                                .store
                                .save(
                                    epoch,
                                    &StreamRecord {
                                        placed_unix_ms: unix_ms(),
                                        ..r
                                    },
                                    None,
                                )
                                .await;
                        }
                        Command::Fenced => {
                            self.step_down("a daemon follows a newer epoch");
                            return Err(PlaceError::NotLeader);
                        }
                        Command::Rejected(m) | Command::Refused(m) => {
                            tracing::warn!(stream = %r.id, error = %m, "its node will not run it again: re-placing");
                            batch.push(r);
                        }
                    }
                }
                None if r.phase == Phase::Placed && warming => {}
                None => {
                    if r.phase == Phase::Placed {
                        moved += 1;
                        batch.push(StreamRecord {
                            moves: r.moves + 1,
                            ..r
                        });
                    } else {
                        batch.push(r);
                    }
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        if moved > 0 {
            tracing::warn!(streams = moved, "re-placing the streams of dead nodes");
        }
        // displaced records give their booking back first; then one batch decision
        let batch: Vec<StreamRecord> = batch
            .into_iter()
            .map(|r| StreamRecord {
                phase: Phase::Pending,
                node: None,
                gpu: None,
                demand: None,
                ..r
            })
            .collect();
        for r in &batch {
            match self.store.save(epoch, r, None).await {
                Err(StoreError::Fenced(_)) => {
                    self.step_down("the store fenced a write");
                    return Err(PlaceError::NotLeader);
                }
                Err(e) => return Err(st(e)),
                Ok(()) => {}
            }
        }
        for res in self.place(epoch, batch, &nodes, "failover").await? {
            if let Err((r, why)) = res {
                self.metrics.refusals.with_label_values(&["capacity"]).inc();
                tracing::warn!(stream = %r.id, why, "pending: no room yet");
            }
        }
        Ok(())
    }

    /// Refreshes the gauges from the store.
    pub async fn refresh_gauges(&self) {
        let (Ok(nodes), Ok(records)) = (self.store.nodes().await, self.store.streams().await)
        else {
            return;
        };
        for s in ["alive", "draining", "dead"] {
            self.metrics
                .nodes
                .with_label_values(&[s])
                .set(nodes.iter().filter(|n| fleet::node_state(n) == s).count() as i64);
        }
        for (p, name) in [(Phase::Placed, "placed"), (Phase::Pending, "pending")] {
            self.metrics
                .streams
                .with_label_values(&[name])
                .set(records.iter().filter(|r| r.phase == p).count() as i64);
        }
        // packing: nodes with bookings over the lower bound for what is booked, with the largest live node's shape
        let view = fleet::view(&nodes, &records, &HashSet::new());
        let booked: Vec<_> = records
            .iter()
            .filter(|r| r.phase == Phase::Placed)
            .filter_map(|r| r.demand)
            .collect();
        let used = records
            .iter()
            .filter(|r| r.phase == Phase::Placed)
            .filter_map(|r| r.node.clone())
            .collect::<HashSet<_>>()
            .len();
        let shape = view.iter().max_by_key(|n| {
            n.host_capacity.cpu_millicores
                + n.gpus.iter().map(|g| g.capacity.nvenc_fps).sum::<u64>()
        });
        let ratio = match shape {
            Some(s) if !booked.is_empty() => {
                let lb = kiln_binpack::lower_bound(s, &booked).max(1);
                used as f64 / lb as f64
            }
            _ => 0.0,
        };
        self.metrics.packing_ratio.set(ratio);
        self.metrics.leader.set(i64::from(self.leading().is_some()));
    }
}

/// Runs the leader loop until the task is dropped.
pub async fn run_loop(s: std::sync::Arc<Scheduler>) {
    let mut every = tokio::time::interval(s.config.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        s.tick().await;
    }
}

/// Serves the scheduler on `listener` until `shutdown` resolves.
pub async fn serve(
    s: std::sync::Arc<Scheduler>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    s.tick().await;
    let lp = tokio::spawn(run_loop(s.clone()));
    axum::serve(listener, api::router(s))
        .with_graceful_shutdown(shutdown)
        .await?;
    lp.abort();
    Ok(())
}
