//! Leadership as this process knows it: taking and renewing the lease ([`Scheduler::campaign`]), whether it
//! certainly still holds it ([`Scheduler::leading`]), and stepping down.
//!
//! Deposition is handled in one place. A fenced store write ([`StoreError::Fenced`]) and a daemon that follows a
//! newer epoch ([`CommandError::Fenced`]) both mean another scheduler leads now: [`Scheduler::unfenced`] steps down
//! and turns either into [`PlaceError::NotLeader`], so callers write `?` and handle only the other errors.

use std::time::Instant;

use crate::client::CommandError;
use crate::store::{LeaderInfo, StoreError};
use crate::{PlaceError, Scheduler};

/// Leadership as this process knows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    pub(crate) epoch: Option<u64>,
    /// The lease is certainly still ours until then (one interval of margin before it can expire).
    pub(crate) valid_until: Instant,
    /// When this process last took the lease.
    pub(crate) since: Instant,
    /// The epoch it last held, kept when it steps down: a pass still on an older epoch, fenced after the lease
    /// task took a newer one, steps the process down from a lease that is still its own; finding that epoch
    /// again is not a new lease (no new warming period, in which no node may be declared dead).
    pub(crate) held: Option<u64>,
}

impl Role {
    pub(crate) fn new() -> Self {
        Self {
            epoch: None,
            valid_until: Instant::now(),
            since: Instant::now(),
            held: None,
        }
    }
}

/// An error that may say this process is deposed.
pub(crate) trait Fencing {
    /// Why this error deposes the leader, or `None` when it does not.
    fn deposes(&self) -> Option<&'static str>;
}

impl Fencing for StoreError {
    fn deposes(&self) -> Option<&'static str> {
        matches!(self, StoreError::Fenced(_)).then_some("the store fenced a write")
    }
}

impl Fencing for CommandError {
    fn deposes(&self) -> Option<&'static str> {
        self.is_fenced().then_some("a daemon follows a newer epoch")
    }
}

impl Scheduler {
    pub(crate) fn me(&self) -> LeaderInfo {
        LeaderInfo {
            id: self.config.instance_id.clone(),
            url: self.config.advertise_url.clone(),
            epoch: self.leading().unwrap_or(0),
        }
    }

    /// Our epoch while we certainly hold the lease.
    pub fn leading(&self) -> Option<u64> {
        let r = *self.role.lock();
        r.epoch.filter(|_| Instant::now() < r.valid_until)
    }

    /// Within one lease period of taking the lease, or of moving to a new Redis master: heartbeats that lapsed
    /// while nobody led (daemons moving to this scheduler) or while the store failed over must not look like a
    /// fleet-wide death.
    pub(crate) fn warming(&self) -> bool {
        self.role.lock().since.elapsed() < self.config.heartbeat_ttl()
    }

    pub(crate) fn step_down(&self, why: &str) {
        let mut r = self.role.lock();
        if r.epoch.is_some() {
            tracing::warn!(epoch = ?r.epoch, why, "stepping down");
        }
        r.epoch = None;
        self.metrics.leader.set(0);
    }

    /// Steps down because `why` says this process is deposed, and answers what the caller returns.
    pub(crate) fn deposed(&self, why: &str) -> PlaceError {
        self.step_down(why);
        PlaceError::NotLeader
    }

    /// The one conversion of deposition: when `res` failed because this process is deposed, steps down and
    /// answers `Err(NotLeader)`; otherwise hands `res` back for the caller to handle.
    pub(crate) fn unfenced<T, E: Fencing>(
        &self,
        res: Result<T, E>,
    ) -> Result<Result<T, E>, PlaceError> {
        match res {
            Err(e) => match e.deposes() {
                Some(why) => Err(self.deposed(why)),
                None => Ok(Err(e)),
            },
            ok => Ok(ok),
        }
    }

    /// [`Self::unfenced`] for a store call whose every other error is the caller's error too.
    pub(crate) fn stored<T>(&self, res: Result<T, StoreError>) -> Result<T, PlaceError> {
        Ok(self.unfenced(res)??)
    }

    /// Raises the fencing floor to an epoch a daemon reported having seen.
    /// Raises the fencing floor to an epoch a daemon reported having seen. An epoch further ahead than a daemon
    /// itself accepts (a day past this host's clock) is ignored: it can only be a bug or a lie, and as a floor it
    /// would push every new epoch out of the range the daemons accept.
    pub(crate) fn saw_fence(&self, epoch: u64) {
        const MAX_EPOCH_LEAD_MS: u64 = 24 * 3600 * 1000;
        if epoch > crate::unix_ms().saturating_add(MAX_EPOCH_LEAD_MS) {
            tracing::warn!(
                epoch,
                "a node reported an epoch far in the future: not used as the fencing floor"
            );
            return;
        }
        self.fence_floor
            .fetch_max(epoch, std::sync::atomic::Ordering::Relaxed);
    }

    /// The highest epoch any daemon is known to have seen: from the heartbeats this process received, and (when
    /// it might take the lease) from those in the store. A new epoch must be above it.
    async fn floor(&self) -> u64 {
        if self.leading().is_none() {
            if let Ok(nodes) = self.store.nodes().await {
                for hb in nodes.iter().filter_map(|n| n.heartbeat.as_ref()) {
                    self.saw_fence(hb.capacity.fence_epoch);
                }
            }
        }
        self.fence_floor.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// With Sentinel, after a failed store call: moves to the master Sentinel names now. `true` when it moved.
    async fn follow_master(&self) -> bool {
        match self.store.follow().await {
            Ok(true) => {
                self.metrics.master_changes.inc();
                // heartbeats lapsed while the master was gone: like a new lease, hear from the nodes again before
                // declaring any dead (or refusing a stream for want of live nodes)
                self.role.lock().since = Instant::now();
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "asking Sentinel for the Redis master failed");
                false
            }
        }
    }

    /// Takes or renews the lease. When the store fails, asks Sentinel (if any) for the master and, when it moved,
    /// tries once more there: a healthy master costs no Sentinel lookup, a failover costs one interval at most.
    pub async fn campaign(&self) {
        let ttl = self.config.heartbeat_ttl();
        let mut started = Instant::now();
        let mut res = self.try_lead(ttl).await;
        // a master without its replicas may be one Sentinel has replaced (its replicas follow the new one)
        let failed = matches!(
            res,
            Err(StoreError::Redis(_)
                | StoreError::Unreachable(_)
                | StoreError::NotReplicated { .. })
        );
        if failed && self.follow_master().await {
            started = Instant::now();
            res = self.try_lead(ttl).await;
        }
        self.store_health(res.as_ref().err());
        match res {
            Ok(Some(epoch)) => {
                let mut r = self.role.lock();
                if r.epoch != Some(epoch) && r.held != Some(epoch) {
                    tracing::info!(epoch, instance = %self.config.instance_id, "leading");
                    r.since = started;
                }
                r.epoch = Some(epoch);
                r.held = Some(epoch);
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

    async fn try_lead(&self, ttl: std::time::Duration) -> Result<Option<u64>, StoreError> {
        let floor = self.floor().await;
        self.store
            .lead(
                &self.config.instance_id,
                &self.config.advertise_url,
                ttl,
                floor,
            )
            .await
    }

    /// The leader as the store knows it.
    pub async fn leader(&self) -> Option<LeaderInfo> {
        self.store.leader(&self.me()).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn scheduler() -> Scheduler {
        let config = crate::Config {
            instance_id: "a".into(),
            advertise_url: "http://a".into(),
            interval: std::time::Duration::from_secs(1),
            presets: kiln_config::Presets::builtin(),
            strategy: kiln_binpack::Strategy::Kiln,
            api_token: None,
            nodes: Default::default(),
            relieve: None,
        };
        Scheduler::new(config, Store::memory(5))
    }

    #[tokio::test]
    async fn fenced_errors_step_down_and_other_errors_pass_through() {
        let s = scheduler();
        s.campaign().await;
        assert_eq!(s.leading(), Some(5));
        assert!(s.warming(), "just took the lease");
        // not deposing: handed back, still leading
        let full: Result<(), StoreError> = Err(StoreError::Full("node cpu".into()));
        assert!(matches!(s.unfenced(full), Ok(Err(StoreError::Full(_)))));
        assert!(matches!(
            s.stored::<()>(Err(StoreError::Full("node cpu".into()))),
            Err(PlaceError::Store(m)) if m.contains("node cpu")
        ));
        let refused: Result<(), CommandError> = Err(CommandError::Unreachable("x".into()));
        assert!(matches!(s.unfenced(refused), Ok(Err(_))));
        assert_eq!(s.leading(), Some(5));
        // a daemon on a newer epoch deposes
        let fenced: Result<(), CommandError> = Err(CommandError::Fenced {
            message: "epoch".into(),
        });
        assert!(matches!(s.unfenced(fenced), Err(PlaceError::NotLeader)));
        assert_eq!(s.leading(), None);
        assert_eq!(s.metrics.leader.get(), 0);
        // finding the same epoch again (a pass on an older one stepped the process down from its own lease) is
        // not a new lease: no new warming period
        s.role.lock().since = Instant::now() - std::time::Duration::from_secs(10);
        s.campaign().await;
        assert_eq!(s.leading(), Some(5));
        assert!(!s.warming(), "the same epoch again warmed up anew");
        // so does a fenced store write
        assert!(matches!(
            s.stored::<()>(Err(StoreError::Fenced(4))),
            Err(PlaceError::NotLeader)
        ));
        assert_eq!(s.leading(), None);
    }
}
