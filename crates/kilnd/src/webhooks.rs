//! Webhooks: what happened to streams and jobs, POSTed to the platform behind kiln (`--webhook-url`), at least
//! once, in order, signed.
//!
//! Every event is written to an outbox on disk (`<data-dir>/webhooks/outbox/<seq>.json`, atomically) before
//! anything else happens, so an event survives a crash or `kill -9`: the next start sends what is left. One task
//! sends the outbox oldest first and removes a file only after a 2xx answer; a failure is retried with exponential
//! backoff (1 s doubling to 60 s) for 24 h after the event, then the event moves to `webhooks/dead/` and is
//! counted. One sender, in sequence order, keeps the events of each stream in order (the platform never sees
//! `stream.ended` before `stream.started`); the price is that one slow receiver holds up the rest, which it
//! would anyway (there is one receiver).
//!
//! Signature: `kiln-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, the scheme Stripe
//! uses (GitHub's `sha256=` header signs the body alone): a receiver recomputes it and refuses a `t` more than a
//! few minutes old, so a captured request cannot be replayed later. `t` is the time of each attempt.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Event types (the `type` field), as documented in the README.
pub const EVENT_TYPES: [&str; 10] = [
    "stream.created",
    "stream.started",
    "source.connected",
    "source.lost",
    "source.failover",
    "stream.ended",
    "stream.failed",
    "encoder.fallback",
    "job.done",
    "job.failed",
];

/// How long an event is retried before it is given up (moved to `dead/`).
pub const RETRY_FOR: Duration = Duration::from_secs(24 * 3600);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// One attempt's time limit (connect, send, answer).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where events go and how they are signed.
#[derive(Clone)]
pub struct WebhookConfig {
    pub url: String,
    /// The HMAC key (`--webhook-secret-env`, at least 16 bytes).
    pub secret: Vec<u8>,
    /// `<data-dir>/webhooks`.
    pub dir: PathBuf,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// One event, as the receiver gets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique; a receiver drops a repeat (delivery is at least once).
    pub id: String,
    /// Increases with every event of this daemon (across restarts): the order they happened in.
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub time_unix_ms: u64,
    /// The daemon (`--node-id`).
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The stream's or job's status when it happened.
    pub data: serde_json::Value,
}

/// `t=…,v1=…` for `body` sent at `t` (unix seconds).
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before attempt `n + 1` after `n` failures: 1 s, 2 s, 4 s … 60 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(MAX_BACKOFF)
}

/// The webhook series (`kiln_webhook_*`, in `docs/metrics.md`).
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    /// Attempts by result: `ok` (2xx), `error` (anything else, or no answer), `dropped` (given up after 24 h).
    pub deliveries: IntCounterVec,
    /// Events in the outbox, not yet delivered.
    pub backlog: IntGauge,
    /// Age of the oldest undelivered event (seconds; 0 when the outbox is empty).
    pub oldest_age: IntGauge,
}

impl WebhookMetrics {
    pub fn new(registry: &Registry) -> Self {
        let deliveries = IntCounterVec::new(
            Opts::new(
                "kiln_webhook_deliveries_total",
                "Webhook delivery attempts, by result (ok, error, dropped after 24 h)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let backlog = IntGauge::new(
            "kiln_webhook_backlog",
            "Webhook events in the outbox, not yet delivered",
        )
        .expect("valid metric");
        let oldest_age = IntGauge::new(
            "kiln_webhook_oldest_age_seconds",
            "Age of the oldest undelivered webhook event",
        )
        .expect("valid metric");
        for m in [
            Box::new(deliveries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(backlog.clone()),
            Box::new(oldest_age.clone()),
        ] {
            registry.register(m).expect("registered once");
        }
        for r in ["ok", "error", "dropped"] {
            deliveries.with_label_values(&[r]);
        }
        Self {
            deliveries,
            backlog,
            oldest_age,
        }
    }
}

/// The outbox and its sender.
pub struct Webhooks {
    cfg: WebhookConfig,
    node: String,
    /// The last sequence number given out; held while an event is written, so files appear in order.
    seq: Mutex<u64>,
    wake: tokio::sync::Notify,
    client: reqwest::Client,
    metrics: WebhookMetrics,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Opens (creates) the outbox, removing temporary files a crash left; sequence numbers go on from the highest
    /// one found in `last-seq`, the outbox or `dead/`.
    pub fn open(cfg: WebhookConfig, node: &str, metrics: WebhookMetrics) -> anyhow::Result<Self> {
        let outbox = cfg.dir.join("outbox");
        std::fs::create_dir_all(&outbox)?;
        std::fs::create_dir_all(cfg.dir.join("dead"))?;
        for e in std::fs::read_dir(&outbox)?.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let recorded = std::fs::read_to_string(cfg.dir.join("last-seq"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let last = scan(&outbox)
            .into_iter()
            .chain(scan(&cfg.dir.join("dead")))
            .map(|(seq, _)| seq)
            .chain(recorded)
            .max()
            .unwrap_or(0);
        metrics.backlog.set(scan(&outbox).len() as i64);
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            cfg,
            node: node.to_string(),
            seq: Mutex::new(last),
            wake: tokio::sync::Notify::new(),
            client,
            metrics,
        })
    }

    /// Records an event in the outbox (on disk before this returns: the file and its directory entry are synced)
    /// and wakes the sender. The new number is recorded first, so a number is never given out twice, even when
    /// writing the event fails (then the event is lost, logged, and nothing else is).
    ///
    /// `job` events get an id made of the job and the type: a job that runs again after a crash (it was not
    /// recorded as finished) reports the same id, which receivers drop as a repeat.
    pub fn emit(
        &self,
        kind: &str,
        stream: Option<&str>,
        job: Option<&str>,
        data: serde_json::Value,
    ) {
        let mut seq = self.seq.lock();
        let ev = Event {
            id: match job {
                Some(j) => format!("evt_{j}_{kind}"),
                None => format!("evt_{}", crate::supervisor::random_token(12)),
            },
            seq: *seq + 1,
            kind: kind.to_string(),
            time_unix_ms: unix_ms(),
            node: self.node.clone(),
            stream: stream.map(str::to_string),
            job: job.map(str::to_string),
            data,
        };
        let body = serde_json::to_vec(&ev).expect("an event serializes");
        let outbox = self.cfg.dir.join("outbox");
        let written = crate::jobs::write_atomic(
            &self.cfg.dir.join("last-seq"),
            ev.seq.to_string().as_bytes(),
        )
        .map(|()| *seq = ev.seq)
        .and_then(|()| crate::jobs::write_atomic(&outbox.join(file_name(ev.seq)), &body))
        .and_then(|()| std::fs::File::open(&outbox)?.sync_all());
        drop(seq);
        match written {
            Ok(()) => {
                self.metrics.backlog.inc();
                self.wake.notify_one();
            }
            Err(e) => {
                tracing::error!(kind, error = %e, "webhook event not recorded: the outbox cannot be written")
            }
        }
    }

    /// Sends the outbox, oldest first, for as long as the daemon runs. Anything but a delivered and removed (or
    /// dead-lettered) event backs off, so a disk that refuses removals cannot make it spin.
    pub async fn run(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let files = scan(&self.cfg.dir.join("outbox"));
            self.metrics.backlog.set(files.len() as i64);
            let Some((_, path)) = files.into_iter().min_by_key(|(seq, _)| *seq) else {
                self.metrics.oldest_age.set(0);
                // an emit notifies; the timeout only guards against a missed wake-up
                let _ = tokio::time::timeout(Duration::from_secs(5), self.wake.notified()).await;
                continue;
            };
            if self.attempt(&path).await {
                failures = 0;
            } else {
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
            }
        }
    }

    /// One attempt at the event in `path`: whether it left the outbox (delivered, or dead-lettered).
    async fn attempt(&self, path: &Path) -> bool {
        let body = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable webhook event: moved to dead/");
                return self.dead_letter(path);
            }
        };
        let ev: Option<Event> = serde_json::from_slice(&body).ok();
        let age_ms = ev
            .as_ref()
            .map_or(u64::MAX, |e| unix_ms().saturating_sub(e.time_unix_ms));
        self.metrics
            .oldest_age
            .set((age_ms / 1000).min(i64::MAX as u64) as i64);
        if age_ms > RETRY_FOR.as_millis() as u64 {
            tracing::error!(file = %path.display(), "webhook event undelivered for 24 h (or unreadable): moved to dead/");
            return self.dead_letter(path);
        }
        let t = unix_ms() / 1000;
        let mut req = self
            .client
            .post(&self.cfg.url)
            .header("content-type", "application/json")
            .header("kiln-signature", signature(&self.cfg.secret, t, &body));
        if let Some(ev) = &ev {
            req = req
                .header("kiln-event-id", &ev.id)
                .header("kiln-event-type", &ev.kind);
        }
        match req.body(body).send().await {
            Ok(r) if r.status().is_success() => {
                self.metrics.deliveries.with_label_values(&["ok"]).inc();
                match std::fs::remove_file(path) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "a delivered webhook event could not be removed: it will be sent again");
                        false
                    }
                }
            }
            Ok(r) => {
                self.metrics.deliveries.with_label_values(&["error"]).inc();
                tracing::warn!(status = r.status().as_u16(), "webhook refused: retrying");
                false
            }
            Err(e) => {
                self.metrics.deliveries.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "webhook not delivered: retrying");
                false
            }
        }
    }

    /// Moves `path` to `dead/`, counted as dropped; whether it left the outbox.
    fn dead_letter(&self, path: &Path) -> bool {
        let dead = self
            .cfg
            .dir
            .join("dead")
            .join(path.file_name().unwrap_or_default());
        self.metrics
            .deliveries
            .with_label_values(&["dropped"])
            .inc();
        std::fs::rename(path, dead).is_ok()
    }
}

fn file_name(seq: u64) -> String {
    format!("{seq:020}.json")
}

/// The event files in `dir` (`<seq>.json`), with their numbers, as the directory names them.
fn scan(dir: &Path) -> Vec<(u64, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let seq = e
                .file_name()
                .to_str()?
                .strip_suffix(".json")?
                .parse()
                .ok()?;
            Some((seq, e.path()))
        })
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_the_time_and_the_body() {
        let a = signature(b"0123456789abcdef", 1_700_000_000, b"{}");
        assert!(a.starts_with("t=1700000000,v1=") && a.len() == "t=1700000000,v1=".len() + 64);
        assert_ne!(a, signature(b"0123456789abcdef", 1_700_000_001, b"{}"));
        assert_ne!(a, signature(b"0123456789abcdef", 1_700_000_000, b"{ }"));
        assert_ne!(a, signature(b"0123456789abcdeF", 1_700_000_000, b"{}"));
        // the published test vector of HMAC-SHA256 (RFC 4231, case 2), through the same code: key "Jefe"
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let waits: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn events_survive_a_reopen_in_order_and_numbers_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WebhookConfig {
            url: "http://127.0.0.1:9/".into(),
            secret: b"0123456789abcdef".to_vec(),
            dir: dir.path().join("webhooks"),
        };
        let outbox = cfg.dir.join("outbox");
        let seqs = || {
            let mut v: Vec<u64> = scan(&outbox).into_iter().map(|(s, _)| s).collect();
            v.sort();
            v
        };
        let w = Webhooks::open(cfg.clone(), "n1", WebhookMetrics::new(&Registry::new())).unwrap();
        for kind in ["stream.created", "stream.started", "stream.ended"] {
            w.emit(kind, Some("s1"), None, serde_json::json!({"state": kind}));
        }
        assert_eq!(w.metrics.backlog.get(), 3);
        drop(w);
        // a crash's leftover temporary file is cleaned, the events stay
        std::fs::write(outbox.join(".tmpXYZ"), b"half").unwrap();
        let w = Webhooks::open(cfg.clone(), "n1", WebhookMetrics::new(&Registry::new())).unwrap();
        assert_eq!(w.metrics.backlog.get(), 3);
        assert!(!outbox.join(".tmpXYZ").exists());
        assert_eq!(seqs(), [1, 2, 3]);
        let ev: Event =
            serde_json::from_slice(&std::fs::read(outbox.join(file_name(1))).unwrap()).unwrap();
        assert_eq!(
            (ev.kind.as_str(), ev.stream.as_deref()),
            ("stream.created", Some("s1"))
        );
        // delivered (removed) events do not give their numbers back
        for s in seqs() {
            std::fs::remove_file(outbox.join(file_name(s))).unwrap();
        }
        let w = Webhooks::open(cfg.clone(), "n1", WebhookMetrics::new(&Registry::new())).unwrap();
        w.emit("job.done", None, Some("j1"), serde_json::json!({}));
        assert_eq!(seqs(), [4]);
        // a job's event has an id of its own making: the same job reported twice is one event to a receiver
        let ev: Event =
            serde_json::from_slice(&std::fs::read(outbox.join(file_name(4))).unwrap()).unwrap();
        assert_eq!(ev.id, "evt_j1_job.done");
    }
}
