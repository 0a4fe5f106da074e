//! The leader loop's reconciliation: reads the nodes and records, asks the pure [`crate::plan::plan`] what to do,
//! and does it ([`Scheduler::execute`]): daemon `DELETE`s and `PUT`s, store writes, and one batch placement for
//! everything to re-place, with the metrics and logs of each step.
//!
//! A daemon or store answer that says this process is deposed stops the pass (stepping down); any other failure of
//! one action is logged and the pass goes on, because the next pass (one interval later) plans from the new state.

use kiln_model::StreamRequest;

use crate::plan::{self, Action, Context, Fleet};
use crate::store::{NodeEntry, StreamRecord};
use crate::{unix_ms, PlaceError, Scheduler};

impl Scheduler {
    /// Brings the daemons in line with the records (the cases are in [`crate::plan`]).
    pub(crate) async fn reconcile(&self, epoch: u64) -> Result<(), PlaceError> {
        let nodes = self.stored(self.store.nodes().await)?;
        let records = self.stored(self.store.streams().await)?;
        let ctx = Context {
            epoch,
            now_ms: unix_ms(),
            grace_ms: self.config.heartbeat_ttl().as_millis() as u64,
            warming: self.warming(),
            relieve: self.config.relieve,
        };
        let removed = self.stored(self.store.removed().await)?;
        let known_dead = self.dead.lock().clone();
        let fleet = Fleet::from_nodes(&nodes);
        let mut actions = plan::plan(&records, &fleet, &known_dead, &ctx);
        let copies = plan::removed_copies(&removed, &records, &fleet, &ctx);
        actions.extend(copies.stop);
        // bookkeeping: a failure here is logged, and never holds up the pass (failover, restarts)
        for id in &copies.seen {
            if let Err(e) = self.store.mark_removed(id, ctx.now_ms).await {
                tracing::warn!(stream = %id, error = %e, "could not refresh a removed stream's time");
            }
        }
        for id in &copies.forget {
            if let Err(e) = self.store.forget_removed(id).await {
                tracing::warn!(stream = %id, error = %e, "could not forget a removed stream");
            }
        }
        if !ctx.warming {
            self.forget_nodes(&fleet, &records, ctx.now_ms).await;
        }
        self.execute(epoch, actions, &nodes).await
    }

    /// Forgets the nodes silent for a day with nothing on them ([`plan::forgotten`]); bookkeeping whose failure
    /// is logged and never holds up the pass.
    async fn forget_nodes(&self, fleet: &Fleet<'_>, records: &[StreamRecord], now_ms: u64) {
        let seen = match self.store.last_seen().await {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, "could not read when nodes were last seen"),
        };
        let (gone, unclocked) = plan::forgotten(fleet, records, &seen, now_ms);
        for n in gone {
            tracing::info!(node = %n, "forgetting a node silent for a day with nothing placed on it");
            match self.store.forget_node(&n).await {
                Ok(()) => {
                    self.dead.lock().remove(&n);
                }
                Err(e) => tracing::warn!(node = %n, error = %e, "could not forget a node"),
            }
        }
        for n in unclocked {
            if let Err(e) = self.store.mark_seen(&n, now_ms).await {
                tracing::warn!(node = %n, error = %e, "could not start a node's silence clock");
            }
        }
    }

    /// Performs `actions` in order, then places the re-placement batch (the `Replace` actions and the restarts
    /// the daemons refused, in action order) as one decision, then the streams to move off evacuating nodes as
    /// another.
    pub(crate) async fn execute(
        &self,
        epoch: u64,
        actions: Vec<Action>,
        nodes: &[NodeEntry],
    ) -> Result<(), PlaceError> {
        let mut batch = Vec::new();
        let mut evacuate = Vec::new();
        let mut relieve = Vec::new();
        let mut moved = 0;
        for action in actions {
            match action {
                Action::NodeDied { node } => {
                    if self.dead.lock().insert(node.clone()) {
                        tracing::warn!(node = %node, "node missed three heartbeats: dead");
                        self.metrics.node_deaths.inc();
                    }
                }
                Action::NodeBack { node } => {
                    self.dead.lock().remove(&node);
                }
                Action::StopStray { stream, node, url } => {
                    self.stop_stray(epoch, &stream, &node, &url).await?
                }
                Action::Adopt { record } => self.adopt(epoch, &record).await?,
                Action::Restart { record, url, spec } => {
                    if let Some(r) = self.restart(epoch, record, &url, &spec).await? {
                        batch.push((plan::released(r), true));
                    }
                }
                // a pending record is stored as it is already: only a released placed one is written first
                Action::Replace { record, moved: m } => {
                    moved += usize::from(m);
                    batch.push((record, m));
                }
                Action::Evacuate { record } => evacuate.push(record),
                Action::Relieve { record } => relieve.push(record),
                Action::Handover { record, stop } => self.hand_over(epoch, &record, &stop).await?,
            }
        }
        self.replace(epoch, batch, moved, nodes).await?;
        self.evacuate(epoch, evacuate, nodes, "drain").await?;
        self.evacuate(epoch, relieve, nodes, "relief").await
    }

    /// Starts each stream being moved (off a draining node: `drain`; behind real time: `relief`) on another node;
    /// the old copy plays on until the handover. `place` never puts a record back on its `handover_from` node.
    async fn evacuate(
        &self,
        epoch: u64,
        batch: Vec<StreamRecord>,
        nodes: &[NodeEntry],
        reason: &str,
    ) -> Result<(), PlaceError> {
        if batch.is_empty() {
            return Ok(());
        }
        tracing::info!(
            streams = batch.len(),
            reason,
            "moving streams, make-before-break"
        );
        for res in self.place(epoch, batch, nodes, reason).await? {
            if let Err((r, why)) = res {
                self.metrics.refusals.with_label_values(&["capacity"]).inc();
                tracing::warn!(stream = %r.id, why = %why, reason, "cannot move it yet: no room elsewhere");
            }
        }
        Ok(())
    }

    /// The moved copy publishes: records that the move is over (so `/play` sends viewers to the new copy), then
    /// stops the old copies.
    async fn hand_over(
        &self,
        epoch: u64,
        record: &StreamRecord,
        stop: &[(String, String)],
    ) -> Result<(), PlaceError> {
        if let Err(e) = self.unfenced(self.store.save(epoch, record, None).await)? {
            // viewers stay on the old copy; the next pass tries again
            tracing::warn!(stream = %record.id, error = %e, "could not record the end of the move");
            return Ok(());
        }
        for (node, url) in stop {
            if let Err(e) = self.unfenced(self.daemons.delete(epoch, url, &record.id).await)? {
                // the record no longer names it: the next pass stops it as a stray
                tracing::warn!(stream = %record.id, node, error = %e, "could not stop the old copy after the move");
            }
        }
        tracing::info!(stream = %record.id, from = ?stop.iter().map(|s| &s.0).collect::<Vec<_>>(), to = ?record.node, "moved: the new copy publishes, the old one is stopped");
        Ok(())
    }

    async fn stop_stray(
        &self,
        epoch: u64,
        stream: &str,
        node: &str,
        url: &str,
    ) -> Result<(), PlaceError> {
        tracing::warn!(stream, node, "stray copy: stopping it");
        if let Err(e) = self.unfenced(self.daemons.delete(epoch, url, stream).await)? {
            // counted all the same: it was found and told to stop; the next pass sees whether it did
            tracing::warn!(stream, node, error = %e, "could not stop a stray copy");
        }
        self.metrics.strays.inc();
        Ok(())
    }

    async fn adopt(&self, epoch: u64, record: &StreamRecord) -> Result<(), PlaceError> {
        tracing::info!(stream = %record.id, node = ?record.node, "adopted the running copy");
        if let Err(e) = self.unfenced(self.store.save(epoch, record, None).await)? {
            // the copy keeps running; the next pass finds it again and adopts it then
            tracing::warn!(stream = %record.id, error = %e, "could not save the adopted copy");
        }
        Ok(())
    }

    /// Starts `record` again on its node. `Some(record)` when the daemon will not run it: it is re-placed.
    async fn restart(
        &self,
        epoch: u64,
        record: StreamRecord,
        url: &str,
        spec: &StreamRequest,
    ) -> Result<Option<StreamRecord>, PlaceError> {
        if let Err(e) = self.unfenced(self.daemons.put(epoch, url, &record.id, spec).await)? {
            tracing::warn!(stream = %record.id, error = %e, "its node will not run it again: re-placing");
            return Ok(Some(record));
        }
        tracing::info!(stream = %record.id, node = ?record.node, "restarted on its node");
        self.metrics
            .placements
            .with_label_values(&["restart"])
            .inc();
        let restarted = StreamRecord {
            placed_unix_ms: unix_ms(),
            ..record
        };
        if let Err(e) = self.unfenced(self.store.save(epoch, &restarted, None).await)? {
            // it runs where the record says; only the grace period restarts from the old placement time, so the
            // next pass may send the (idempotent) PUT once more
            tracing::warn!(stream = %restarted.id, error = %e, "could not record the restart time");
        }
        Ok(None)
    }

    /// Releases the batch's bookings, then places it as one decision.
    /// Places `batch` as one decision; the records marked `true` (placed ones given up: their node died, or it
    /// refused a restart) are stored released first, so their bookings are given back even when nothing fits.
    /// A pending record is not written again: every pass would otherwise rewrite every pending record (a script
    /// and, with Sentinel, a WAIT each) for nothing.
    async fn replace(
        &self,
        epoch: u64,
        batch: Vec<(StreamRecord, bool)>,
        moved: usize,
        nodes: &[NodeEntry],
    ) -> Result<(), PlaceError> {
        if batch.is_empty() {
            return Ok(());
        }
        if moved > 0 {
            tracing::warn!(streams = moved, "re-placing the streams of dead nodes");
        }
        for (r, _) in batch.iter().filter(|(_, write)| *write) {
            self.stored(self.store.save(epoch, r, None).await)?;
        }
        let batch = batch.into_iter().map(|(r, _)| r).collect();
        for res in self.place(epoch, batch, nodes, "failover").await? {
            if let Err((r, why)) = res {
                self.metrics.refusals.with_label_values(&["capacity"]).inc();
                tracing::warn!(stream = %r.id, why = %why, "pending: no room yet");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kiln_binpack::Demand;
    use kiln_model::capacity::Resources;
    use kiln_model::node::{CapacityReport, Heartbeat, HostReport, NodeStream};
    use kiln_model::{Backend, StreamState};

    use super::*;
    use crate::store::{Phase, Store};

    type Log = Arc<parking_lot::Mutex<Vec<String>>>;

    /// A loopback daemon: logs `METHOD path` of each command and answers `refuse` paths with `status` and an
    /// envelope with `code`, everything else with 200.
    async fn daemon(
        refuse: &'static [&'static str],
        status: u16,
        code: &'static str,
    ) -> (String, Log) {
        use axum::http::{Method, StatusCode, Uri};
        let log: Log = Arc::default();
        let seen = log.clone();
        let app = axum::Router::new().fallback(move |m: Method, u: Uri| {
            let seen = seen.clone();
            async move {
                seen.lock().push(format!("{m} {}", u.path()));
                if refuse.contains(&u.path()) {
                    let body = serde_json::json!({"error": {"code": code, "message": "no"}});
                    (StatusCode::from_u16(status).unwrap(), body.to_string())
                } else {
                    (StatusCode::OK, "{}".to_string())
                }
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, log)
    }

    fn cpu(millicores: u64) -> Resources {
        Resources {
            cpu_millicores: millicores,
            memory_mib: 100,
            ..Default::default()
        }
    }

    async fn leader(url: &str, streams: Vec<NodeStream>) -> Scheduler {
        let config = crate::Config {
            instance_id: "a".into(),
            advertise_url: "http://sched".into(),
            interval: Duration::from_secs(1),
            presets: kiln_config::Presets::builtin(),
            strategy: kiln_binpack::Strategy::Kiln,
            api_token: None,
            nodes: Default::default(),
            relieve: None,
        };
        let s = Scheduler::new(config, Store::memory(5));
        s.campaign().await;
        let host = HostReport {
            capacity: Resources {
                memory_mib: 4000,
                ..cpu(4000)
            },
            ..Default::default()
        };
        let capacity = CapacityReport {
            node_id: "a".into(),
            epoch: 1,
            fence_epoch: 0,
            host,
            gpus: vec![],
            gpu_inventory: Default::default(),
            streams,
            headroom: Default::default(),
            demands: Default::default(),
            vod: None,
            draining: false,
        };
        let hb = Heartbeat {
            url: url.into(),
            capacity,
        };
        s.store
            .heartbeat("a", &hb, Duration::from_secs(60))
            .await
            .unwrap();
        s
    }

    fn record(id: &str, phase: Phase, node: Option<&str>) -> StreamRecord {
        let x264 = Demand {
            host: cpu(1000),
            gpu: None,
            pixel_rate: 1,
        };
        StreamRecord {
            id: id.into(),
            request: Default::default(),
            phase,
            node: node.map(str::to_string),
            gpu: None,
            demand: (phase == Phase::Placed).then_some(x264),
            alternatives: vec![x264],
            epoch: 5,
            created_unix_ms: 1,
            placed_unix_ms: 1,
            moves: 0,
            handover_from: None,
        }
    }

    #[tokio::test]
    async fn the_executor_commands_the_daemons_writes_the_store_and_counts() {
        let (url, log) = daemon(&["/v1/streams/r1"], 422, "cannot_run_here").await;
        let s = leader(&url, vec![]).await;
        let nodes = s.store.nodes().await.unwrap();
        let adopted = record("p1", Phase::Placed, Some("a"));
        let actions = vec![
            Action::NodeDied { node: "b".into() },
            Action::NodeDied { node: "b".into() },
            Action::StopStray {
                stream: "s9".into(),
                node: "a".into(),
                url: url.clone(),
            },
            Action::Adopt {
                record: adopted.clone(),
            },
            Action::Restart {
                record: record("r1", Phase::Placed, Some("a")),
                url: url.clone(),
                spec: Box::default(),
            },
            Action::Restart {
                record: record("r2", Phase::Placed, Some("a")),
                url: url.clone(),
                spec: Box::default(),
            },
            Action::Replace {
                record: plan::released(record("m1", Phase::Pending, None)),
                moved: true,
            },
        ];
        s.execute(5, actions, &nodes).await.unwrap();
        let mut sent = log.lock().clone();
        // the batch's PUTs go out concurrently: their order is not fixed
        sent[3..].sort();
        assert_eq!(
            sent,
            [
                "DELETE /v1/streams/s9",
                "PUT /v1/streams/r1",
                "PUT /v1/streams/r2",
                // the batch: the moved stream and the refused restart, both placed on a (r1 refused again)
                "PUT /v1/streams/m1",
                "PUT /v1/streams/r1",
            ]
        );
        assert_eq!(s.metrics.node_deaths.get(), 1, "a death counts once");
        assert_eq!(s.metrics.strays.get(), 1);
        let placements = |r: &str| s.metrics.placements.with_label_values(&[r]).get();
        assert_eq!((placements("restart"), placements("failover")), (1, 1));
        assert_eq!(s.metrics.refusals.with_label_values(&["capacity"]).get(), 1);
        assert_eq!(s.store.stream("p1").await.unwrap(), Some(adopted));
        let r2 = s.store.stream("r2").await.unwrap().unwrap();
        assert!(r2.placed_unix_ms > 1, "the restart time is recorded");
        let r1 = s.store.stream("r1").await.unwrap().unwrap();
        assert_eq!(
            (r1.phase, r1.node),
            (Phase::Pending, None),
            "refused everywhere: pending"
        );
        let m1 = s.store.stream("m1").await.unwrap().unwrap();
        assert_eq!(m1.node.as_deref(), Some("a"));
        assert!(s.dead.lock().contains("b"));
    }

    #[tokio::test]
    async fn a_daemon_on_a_newer_epoch_stops_the_pass_and_the_leader_steps_down() {
        let (url, log) = daemon(&["/v1/streams/s9"], 409, "stale_epoch").await;
        let s = leader(&url, vec![]).await;
        let nodes = s.store.nodes().await.unwrap();
        let actions = vec![
            Action::StopStray {
                stream: "s9".into(),
                node: "a".into(),
                url: url.clone(),
            },
            Action::Adopt {
                record: record("p1", Phase::Placed, Some("a")),
            },
        ];
        assert!(matches!(
            s.execute(5, actions, &nodes).await,
            Err(PlaceError::NotLeader)
        ));
        assert_eq!(s.leading(), None);
        assert_eq!(s.metrics.fenced.get(), 1);
        assert_eq!(s.metrics.strays.get(), 0, "not counted: it was not stopped");
        assert_eq!(
            s.store.stream("p1").await.unwrap(),
            None,
            "nothing after it ran"
        );
        assert_eq!(log.lock().len(), 1);
    }

    /// A forgotten node leaves the fleet's list, and comes back with its next heartbeat.
    #[tokio::test]
    async fn a_forgotten_node_leaves_the_list_until_it_reports_again() {
        let (url, _) = daemon(&[], 200, "").await;
        let s = leader(&url, vec![]).await;
        let hb = s.store.nodes().await.unwrap()[0].heartbeat.clone().unwrap();
        assert!(s.store.last_seen().await.unwrap().contains_key("a"));
        s.store.forget_node("a").await.unwrap();
        assert!(s.store.nodes().await.unwrap().is_empty());
        assert!(!s.store.last_seen().await.unwrap().contains_key("a"));
        s.store
            .heartbeat("a", &hb, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(s.store.nodes().await.unwrap().len(), 1);
    }

    /// A delete whose stop on the node failed forgets the record but not the stream: the next pass stops the
    /// copy the node still reports, which no record names any more.
    #[tokio::test]
    async fn a_copy_a_delete_could_not_stop_is_stopped_by_the_next_pass() {
        let copy = NodeStream {
            id: "x".into(),
            state: StreamState::Running,
            backend: Backend::Cpu,
            decode_gpu: None,
            demand: Resources::default(),
            gpu_demand: None,
            behind_real_time: false,
            has_segment: true,
        };
        let (url, log) = daemon(&["/v1/streams/x"], 500, "internal").await;
        let s = leader(&url, vec![copy]).await;
        s.role.lock().since = Instant::now() - Duration::from_secs(10);
        let epoch = s.leading().unwrap();
        s.store
            .save(epoch, &record("x", Phase::Placed, Some("a")), None)
            .await
            .unwrap();
        assert!(s.delete("x").await.unwrap());
        assert_eq!(s.store.stream("x").await.unwrap(), None);
        assert!(s.store.removed().await.unwrap().contains_key("x"));
        // within the grace period the copy is left alone: a report from before the delete may still list it
        s.tick().await;
        assert_eq!(log.lock().len(), 1, "{:?}", log.lock());
        // past it (the removal a minute ago), the copy still reported is stopped
        s.store
            .mark_removed("x", crate::unix_ms() - 60_000)
            .await
            .unwrap();
        s.tick().await;
        assert_eq!(
            *log.lock(),
            ["DELETE /v1/streams/x", "DELETE /v1/streams/x"],
            "the pass stops the copy the delete missed"
        );
        // and the removal is kept from that report on
        let at = s.store.removed().await.unwrap()["x"];
        assert!(crate::unix_ms() - at < 10_000, "{at}");
        // placed again under the same id: no longer removed, and its copy is not a stray
        s.store
            .save(epoch, &record("x", Phase::Placed, Some("a")), None)
            .await
            .unwrap();
        assert!(!s.store.removed().await.unwrap().contains_key("x"));
        s.tick().await;
        assert_eq!(log.lock().len(), 2, "{:?}", log.lock());
    }

    /// A pass stuck on a daemon that takes the connection and never answers (its 5 s command timeout) does not
    /// cost the lease: the loop renews it on its own task, so the leader keeps its epoch and is not warming again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_stuck_on_a_silent_daemon_keeps_the_lease() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        // a placed record the node does not run: the pass starts it there again, on the silent daemon
        let s = Arc::new(leader(&url, vec![]).await);
        s.role.lock().since = Instant::now() - Duration::from_secs(10);
        let epoch = s.leading().expect("leads");
        s.store
            .save(epoch, &record("r1", Phase::Placed, Some("a")), None)
            .await
            .unwrap();
        let looping = tokio::spawn(crate::run_loop(s.clone()));
        // the pass has reached the daemon: it waits on it from now on
        let (_held, _) = tokio::time::timeout(Duration::from_secs(10), silent.accept())
            .await
            .expect("the pass commands the silent daemon")
            .unwrap();
        // past the lease's acted-on span (ttl 3 s less one interval) from the pass's start
        tokio::time::sleep(Duration::from_millis(2_600)).await;
        assert_eq!(s.leading(), Some(epoch), "the lease lapsed behind the pass");
        assert!(!s.warming(), "a new lease would be warming");
        looping.abort();
    }

    #[tokio::test]
    async fn a_tick_reconciles_the_store_with_the_daemons_report() {
        let copy = NodeStream {
            id: "p1".into(),
            state: StreamState::Running,
            backend: Backend::Cpu,
            decode_gpu: None,
            demand: Resources::default(),
            gpu_demand: None,
            behind_real_time: false,
            has_segment: true,
        };
        let (url, log) = daemon(&[], 200, "").await;
        let s = leader(&url, vec![copy]).await;
        // past the warming period, with a silent node known
        s.role.lock().since = Instant::now() - Duration::from_secs(10);
        s.store
            .heartbeat(
                "b",
                &Heartbeat {
                    url: "http://b".into(),
                    ..s.store.nodes().await.unwrap()[0].heartbeat.clone().unwrap()
                },
                Duration::from_millis(1),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        for r in [
            record("p1", Phase::Pending, None),
            record("r1", Phase::Placed, Some("a")),
        ] {
            s.store.save(5, &r, None).await.unwrap();
        }
        s.tick().await;
        let p1 = s.store.stream("p1").await.unwrap().unwrap();
        assert_eq!(
            (p1.phase, p1.node.as_deref()),
            (Phase::Placed, Some("a")),
            "adopted"
        );
        assert_eq!(*log.lock(), ["PUT /v1/streams/r1"], "r1 restarted on a");
        assert_eq!(s.metrics.node_deaths.get(), 1, "b is dead");
        s.tick().await;
        assert_eq!(s.metrics.node_deaths.get(), 1, "and counted once");
    }

    #[tokio::test]
    async fn a_moving_stream_is_never_placed_back_on_the_node_it_leaves() {
        // the only node is the one the stream moves off: no room elsewhere, nothing commanded, record unchanged
        let (url, log) = daemon(&[], 200, "").await;
        let s = leader(&url, vec![]).await;
        let nodes = s.store.nodes().await.unwrap();
        let running = record("m1", Phase::Placed, Some("a"));
        s.store.save(5, &running, None).await.unwrap();
        let moving = StreamRecord {
            handover_from: Some("a".into()),
            ..running.clone()
        };
        s.execute(5, vec![Action::Relieve { record: moving }], &nodes)
            .await
            .unwrap();
        assert!(log.lock().is_empty(), "commanded: {:?}", log.lock());
        assert_eq!(s.store.stream("m1").await.unwrap(), Some(running));
        assert_eq!(s.metrics.refusals.with_label_values(&["capacity"]).get(), 1);
    }
}
