//! kiln-scheduler: places live streams on a fleet of kilnd nodes and keeps them placed.
//!
//! - **Input**: kilnd's node agent posts a heartbeat (its [`kiln_model::node::CapacityReport`]) every interval;
//!   a node whose heartbeat is three intervals old is dead. A heartbeat is admitted only with the join token (or
//!   the fleet token, or in an explicitly open fleet) and an advertised URL the address policy allows ([`admit`]).
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
//! Where things are:
//! - this file: [`Config`], [`Scheduler`] (its state), [`PlaceError`], the leader loop ([`run_loop`], [`serve`])
//!   and the gauges;
//! - `lead`: the lease (campaign, [`Scheduler::leading`], stepping down) and the one conversion of "deposed" (a
//!   fenced store write or a daemon on a newer epoch) into a step-down and [`PlaceError::NotLeader`];
//! - [`plan`]: reconciliation as a pure function of records, the daemons' reports and the time, returning
//!   [`plan::Action`]s; `exec`: the executor that reads the state, plans and performs the actions;
//! - `place`: the batch placement every decision goes through, and `create`/`delete` of one stream;
//! - `consolidate`: moving streams off lightly loaded nodes;
//! - [`client`]: the daemon client, with outcomes typed by HTTP status and the envelope's error code;
//! - [`admit`]: who may join the fleet (join token, `--nodes`, `--open-fleet`) and where a node's URL may point;
//! - [`fleet`]: the fleet as a packing problem (pure); [`api`]: the HTTP API; [`vod`]: VOD job routing;
//!   [`metrics`]: the Prometheus series; [`cli`]: the command line.
//!
//! HTTP: `POST/GET /v1/streams`, `GET/DELETE /v1/streams/{id}`, `GET /v1/nodes`, `POST/DELETE
//! /v1/nodes/{id}/drain`, `POST /v1/nodes/{id}/heartbeat`, `GET /v1/fleet/headroom`, `GET /v1/leader`,
//! `GET /play/{stream}/{path…}` (302 to the node serving it), `GET /metrics`, `GET /healthz`.

pub mod admit;
pub mod api;
pub mod cli;
pub mod client;
mod consolidate;
mod exec;
pub mod fleet;
mod lead;
pub mod metrics;
mod place;
pub mod plan;
pub mod store;
pub mod vod;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_binpack::Strategy;

use store::{Phase, Store, StoreError};

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
    /// The fleet's bearer token: required on this scheduler's control routes (and accepted on heartbeats), and sent
    /// with every command to a daemon (which requires the same token); `None` leaves the control routes open.
    pub api_token: Option<String>,
    /// Who may join the fleet (heartbeats) and where nodes may point ([`admit`]).
    pub nodes: admit::NodeAdmission,
    /// Move streams their nodes report behind real time to other nodes, make-before-break (`--relieve-behind`),
    /// once they have been this many ms on their node (`--relieve-after-s`); `None`: never.
    pub relieve: Option<u64>,
}

impl Config {
    pub fn heartbeat_ttl(&self) -> Duration {
        self.interval * 3
    }
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

/// A store failure as the API reports it. A fenced write means this process no longer leads; code that holds the
/// scheduler converts through `Scheduler::stored`/`Scheduler::unfenced` instead, which also steps down.
impl From<StoreError> for PlaceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced(_) => PlaceError::NotLeader,
            e => PlaceError::Store(e.to_string()),
        }
    }
}

/// The scheduler: state, leadership, HTTP client to daemons.
#[derive(Debug)]
pub struct Scheduler {
    pub config: Config,
    pub store: Store,
    pub metrics: metrics::Metrics,
    daemons: client::DaemonClient,
    role: parking_lot::Mutex<lead::Role>,
    /// One decision at a time in this process.
    decide: tokio::sync::Mutex<()>,
    /// Nodes seen dead, so a death is counted once.
    dead: parking_lot::Mutex<HashSet<String>>,
    /// VOD jobs this process routed, until the nodes' reports include them.
    routed: vod::Routed,
    /// Verdicts on node URL host names.
    names: admit::Names,
    /// The highest leader epoch any daemon reported having seen (heartbeats): a new epoch is above it.
    fence_floor: std::sync::atomic::AtomicU64,
    /// Why the store did not answer the last lease call, while it does not.
    store_down: parking_lot::Mutex<Option<String>>,
    /// Stream id → the URL `/play` sent viewers to last, refreshed every tick: `/play` answers from it while the
    /// store does not answer.
    routes: parking_lot::Mutex<std::collections::HashMap<String, String>>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Scheduler {
    pub fn new(config: Config, store: Store) -> Self {
        let metrics = metrics::Metrics::new();
        Self {
            daemons: client::DaemonClient::new(
                config.api_token.clone(),
                metrics.fenced.clone(),
                config.nodes.networks.clone(),
            ),
            config,
            store,
            metrics,
            role: parking_lot::Mutex::new(lead::Role::new()),
            decide: tokio::sync::Mutex::new(()),
            dead: parking_lot::Mutex::new(HashSet::new()),
            routed: vod::Routed::default(),
            names: admit::Names::default(),
            fence_floor: Default::default(),
            store_down: parking_lot::Mutex::new(None),
            routes: Default::default(),
        }
    }

    /// One pass of the leader loop: campaign, the routes `/play` remembers, then (when leading) failover,
    /// reconciliation and retries.
    pub async fn tick(&self) {
        self.campaign().await;
        self.pass().await;
    }

    /// [`Self::tick`] without the campaign: [`run_loop`] renews the lease on a task of its own.
    async fn pass(&self) {
        self.remember_routes().await;
        let Some(epoch) = self.leading() else {
            return;
        };
        let _g = self.decide.lock().await;
        if let Err(e) = self.reconcile(epoch).await {
            tracing::warn!(error = %e, "reconcile failed");
        }
    }

    /// Records whether the store answered a lease call: the gauge, the reason `store_down` gives, and one log
    /// line per change.
    pub(crate) fn store_health(&self, err: Option<&StoreError>) {
        let mut down = self.store_down.lock();
        match err {
            None | Some(StoreError::Fenced(_) | StoreError::Full(_)) => {
                if let Some(was) = down.take() {
                    tracing::info!(was = %was, "the store answers again");
                }
                self.metrics.store_up.set(1);
            }
            Some(e) => {
                if down.is_none() {
                    tracing::error!(error = %e, "the store does not answer: placements are refused, running streams keep running");
                }
                *down = Some(e.to_string());
                self.metrics.store_up.set(0);
            }
        }
    }

    /// Why the store is not usable now (`None` while it answered the last lease call).
    pub fn store_down(&self) -> Option<String> {
        self.store_down.lock().clone()
    }

    /// Refreshes what `/play` remembers: each placed stream's node URL. Kept as it was when the store fails.
    async fn remember_routes(&self) {
        let (Ok(records), Ok(nodes)) = (self.store.streams().await, self.store.nodes().await)
        else {
            return;
        };
        let urls: std::collections::HashMap<&str, &str> = nodes
            .iter()
            .filter_map(|n| {
                n.heartbeat
                    .as_ref()
                    .map(|h| (n.id.as_str(), h.url.as_str()))
            })
            .collect();
        let routes = records
            .iter()
            .filter(|r| r.phase == Phase::Placed)
            .filter_map(|r| {
                // as `/play` answers: the old copy during a move, while it still plays
                let on = |n: Option<&str>| n.and_then(|n| urls.get(n));
                let old = r
                    .handover_from
                    .as_deref()
                    .filter(|from| fleet::runs(&nodes, from, &r.id));
                let url = on(old).or_else(|| on(r.node.as_deref()))?;
                Some((r.id.clone(), url.to_string()))
            })
            .collect();
        *self.routes.lock() = routes;
    }

    /// Where `/play` last sent viewers of `stream`.
    pub(crate) fn remembered_route(&self, stream: &str) -> Option<String> {
        self.routes.lock().get(stream).cloned()
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

/// Runs the leader loop until the task is dropped: the lease on a task of its own, renewed every interval
/// whatever a pass is doing, and the passes on this one. A pass can wait seconds on a daemon that does not answer
/// (5 s per command) or on the decision lock; with the renewal behind it, such a pass outlived the lease (3
/// intervals, acted on for 2), and the next campaign took a new epoch and a new warming period, in which no node
/// is declared dead: a fleet with one wedged daemon never re-placed a dead node's streams.
pub async fn run_loop(s: std::sync::Arc<Scheduler>) {
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let every = |s: &Scheduler| {
        let mut every = tokio::time::interval(s.config.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every
    };
    let _lease = AbortOnDrop(tokio::spawn({
        let s = s.clone();
        let mut every = every(&s);
        async move {
            loop {
                every.tick().await;
                s.campaign().await;
            }
        }
    }));
    let mut passes = every(&s);
    loop {
        passes.tick().await;
        s.pass().await;
    }
}

/// Serves the scheduler on `listener` until `shutdown` resolves.
pub async fn serve(
    s: std::sync::Arc<Scheduler>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // the lease first, and the first pass on the loop (not before the API listens: heartbeats wait for nothing)
    s.campaign().await;
    let lp = tokio::spawn(run_loop(s.clone()));
    kiln_http::server::serve(
        listener,
        None,
        api::router(s),
        kiln_http::server::Limits::default(),
        shutdown,
    )
    .await?;
    lp.abort();
    Ok(())
}
