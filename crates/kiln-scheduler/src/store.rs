//! Where the scheduler keeps its state: in this process ([`Store::memory`], one scheduler) or in Redis
//! ([`Store::redis`], several schedulers, one leader).
//!
//! What is stored:
//! - heartbeats, one per node, each expiring after three intervals (Redis `SET … PX`): a node without one is dead;
//! - the set of nodes ever seen, and the set of draining ones;
//! - stream records (what was asked for, where it runs, what it booked), written only by the leader and only
//!   under its epoch: the write is a Lua script that refuses a stale epoch (`FENCED`) and books the demand into
//!   per-node and per-GPU counters after checking them against the node's capacity (`FULL`), all atomically;
//! - the leader lease (`SET NX PX`, renewed by its holder) and the epoch counter (`INCR` on every new lease): the
//!   epoch is the fencing token carried on every command to a daemon.
//!
//! Redis can be one server (`--redis-url`) or a master that Redis Sentinel names (`--redis-sentinel`,
//! `--redis-master`): [`Store::follow`] asks the Sentinels for the master on every leader-loop tick and moves both
//! connections to a new one. Replication is asynchronous, so a promoted replica may miss the last writes. Two
//! rules keep fencing sound across a failover (the argument is in ARCHITECTURE.md, "Fencing across a Redis
//! failover"): every fenced write (lease, epoch, records) is followed by `WAIT` for `min_replicas` replicas and
//! counts only once they acknowledged it ([`StoreError::NotReplicated`]); and a new epoch is never below the
//! floor the caller passes (the highest epoch any daemon reported), so it outranks every epoch a daemon has seen
//! even when the store lost some.
//!
//! The in-memory store implements the same contract with a mutex, so both run the same scheduler code.

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kiln_binpack::Demand;
use kiln_model::capacity::{Dimension, Resources};
use kiln_model::node::Heartbeat;
use kiln_model::StreamRequest;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Where a stream stands in the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Booked on `node` (and commanded there).
    Placed,
    /// Waiting for room (its node died and nothing else fits yet).
    Pending,
}

/// One stream as the scheduler records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamRecord {
    pub id: String,
    /// The spec sent to the daemon (`PUT /v1/streams/{id}`).
    pub request: StreamRequest,
    pub phase: Phase,
    pub node: Option<String>,
    pub gpu: Option<usize>,
    /// What is booked on `node` (and its GPU).
    pub demand: Option<Demand>,
    /// The demand alternatives the stream may take, in order of preference.
    pub alternatives: Vec<Demand>,
    /// Epoch of the leader that wrote this record.
    pub epoch: u64,
    pub created_unix_ms: u64,
    pub placed_unix_ms: u64,
    /// Times it was re-placed after its node died.
    pub moves: u32,
    /// Being moved off this node (which drains) onto `node`: the copy there keeps playing until the new one
    /// publishes, then it is stopped (make-before-break).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_from: Option<String>,
}

/// Capacity a booking is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinCaps {
    /// The whole node: its host plus every one of its GPUs. The node's booking counter adds up the streams on
    /// all its GPUs, so it is checked against all of them, not against the one this booking is on.
    pub node: Resources,
    /// The GPU this booking is on.
    pub gpu: Option<Resources>,
}

/// A node as the store knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    pub id: String,
    /// The latest heartbeat, while it has not expired.
    pub heartbeat: Option<Heartbeat>,
    /// Drained by an operator: it keeps its streams and gets no new ones.
    pub draining: bool,
    /// Drained by an operator with `evacuate`: its streams are moved elsewhere, make-before-break.
    pub evacuate: bool,
}

impl NodeEntry {
    /// Its streams are to be moved elsewhere: an operator asked (`drain?evacuate=true`), or the daemon itself
    /// reports `draining` (it received SIGTERM and waits for its streams to be moved before it stops).
    pub fn evacuating(&self) -> bool {
        self.evacuate || self.heartbeat.as_ref().is_some_and(|h| h.capacity.draining)
    }

    /// It takes no new streams or jobs.
    pub fn closed(&self) -> bool {
        self.draining || self.evacuating()
    }
}

/// Who leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaderInfo {
    pub id: String,
    pub url: String,
    pub epoch: u64,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The writer's epoch is not the current one: it is no longer the leader.
    #[error("fenced: epoch {0} is not the current leader epoch")]
    Fenced(u64),
    /// The booking would over-commit `0` on the node or its GPU.
    #[error("the booking does not fit: {0}")]
    Full(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A fenced write reached the master but not `wanted` replicas within the timeout: it may be lost in a
    /// failover, so it does not count (the lease is not taken, the record not confirmed).
    #[error("redis: the write reached {acked} of {wanted} replicas required (WAIT)")]
    NotReplicated { acked: u64, wanted: u32 },
    /// No Redis (or no Sentinel) answered in time.
    #[error("redis: {0}")]
    Unreachable(String),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// The state backend.
#[derive(Debug)]
pub enum Store {
    Memory(Box<Mutex<Mem>>),
    Redis(RedisStore),
}

/// In-process state.
#[derive(Debug, Default)]
pub struct Mem {
    heartbeats: HashMap<String, (Instant, Duration, Heartbeat)>,
    known: BTreeSet<String>,
    draining: BTreeSet<String>,
    evacuating: BTreeSet<String>,
    streams: BTreeMap<String, StreamRecord>,
    used: HashMap<String, Resources>,
    epoch: u64,
    /// VOD job id → the node it was submitted to.
    jobs: HashMap<String, String>,
    /// Removed stream id → when (unix ms): [`Store::removed`].
    removed: HashMap<String, u64>,
}

/// How the scheduler reaches Redis.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    /// `redis://host:port[/db]` of one Redis, or (with `sentinels`) the template of the master's connection: its
    /// database and credentials are used, its address is the one Sentinel names.
    pub url: String,
    /// Sentinel addresses (`redis://host:port`); empty: `url` is the Redis to use.
    pub sentinels: Vec<String>,
    /// The master's name in Sentinel (`sentinel monitor NAME …`).
    pub master: String,
    /// Replicas that must acknowledge every fenced write (`WAIT`) before it counts; 0 with one Redis.
    pub min_replicas: u32,
    /// The bound on each Redis call, `WAIT` and Sentinel lookup.
    pub timeout: Duration,
}

impl RedisTarget {
    /// One Redis at `url`, no replicas required.
    pub fn single(url: &str) -> Self {
        Self {
            url: url.to_string(),
            sentinels: Vec::new(),
            master: String::new(),
            min_replicas: 0,
            timeout: Duration::from_millis(500),
        }
    }
}

/// The connections to the current master.
struct Link {
    target: RedisTarget,
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    /// Reads and heartbeats.
    reads: Mutex<ConnectionManager>,
    /// Record writes, each sent with a `WAIT` right behind it when replicas are required (`WAIT` counts the
    /// writes of its own connection and holds it meanwhile, so reads do not queue behind it).
    writes: Mutex<ConnectionManager>,
    /// The lease, on its own connection: a renewal never queues behind a record write's `WAIT`.
    lease: Mutex<ConnectionManager>,
    /// The master's address now.
    master: Mutex<String>,
}

/// Redis-backed state (keys under `kiln:`).
#[derive(Clone)]
pub struct RedisStore {
    link: Arc<Link>,
    /// What this store's process holds the lease as: its instance id and a random suffix drawn at connection.
    /// Two schedulers given the same id (the default id is the advertise URL, which two hosts bound to
    /// 0.0.0.0:8090 share) would otherwise renew each other's lease under one epoch, and fencing would let both
    /// through.
    nonce: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

/// A connection manager to `client` whose every call, connection attempt and reconnection is bounded by
/// `timeout` (a Redis that stops answering must not stall the leader loop or a request).
async fn manager(
    client: redis::Client,
    timeout: Duration,
) -> Result<ConnectionManager, StoreError> {
    let cfg = ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(timeout);
    Ok(ConnectionManager::new_with_config(client, cfg).await?)
}

/// The master Sentinel names now (checked by the client library: it answers `ROLE` as master), within
/// `timeout` per Sentinel and master probed.
async fn master_client(
    sentinel: &tokio::sync::Mutex<SentinelClient>,
    timeout: Duration,
) -> Result<redis::Client, StoreError> {
    let mut s = sentinel.lock().await;
    match tokio::time::timeout(timeout * 4, s.async_get_client()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(StoreError::Unreachable(format!(
            "no Sentinel named a reachable master within {:?}",
            timeout * 4
        ))),
    }
}

impl RedisStore {
    fn reads(&self) -> ConnectionManager {
        self.link.reads.lock().clone()
    }

    /// Runs the fenced script `src` on `conn` and, when replicas are required, `WAIT` right behind it in one
    /// pipeline: the `WAIT` is on the connection that wrote (a reconnect between the two fails both rather than
    /// count a write the new connection never made). A script error goes through `script_err`.
    async fn eval_replicated<T: redis::FromRedisValue>(
        &self,
        conn: &Mutex<ConnectionManager>,
        src: &str,
        keys: &[&str],
        args: &[String],
        script_err: impl FnOnce(redis::RedisError) -> StoreError,
    ) -> Result<T, StoreError> {
        let mut c = conn.lock().clone();
        let mut p = redis::pipe();
        p.cmd("EVAL").arg(src).arg(keys.len()).arg(keys).arg(args);
        let wanted = self.link.target.min_replicas;
        if wanted == 0 {
            let (v,): (T,) = p.query_async(&mut c).await.map_err(script_err)?;
            return Ok(v);
        }
        // WAIT's own timeout is below the connection's response timeout, so its answer (possibly 0) arrives
        let wait_ms = (self.link.target.timeout.as_millis() as u64 * 3 / 5).max(1);
        p.cmd("WAIT").arg(wanted).arg(wait_ms);
        let (v, acked): (T, u64) = p.query_async(&mut c).await.map_err(script_err)?;
        if acked < u64::from(wanted) {
            return Err(StoreError::NotReplicated { acked, wanted });
        }
        Ok(v)
    }

    /// Asks Sentinel which server is master and moves both connections there when it changed: `Ok(true)` when it
    /// moved. Without Sentinel, nothing to do.
    async fn follow(&self) -> Result<bool, StoreError> {
        let Some(sentinel) = &self.link.sentinel else {
            return Ok(false);
        };
        let client = master_client(sentinel, self.link.target.timeout).await?;
        let addr = client.get_connection_info().addr().to_string();
        if *self.link.master.lock() == addr {
            return Ok(false);
        }
        let reads = manager(client.clone(), self.link.target.timeout).await?;
        let writes = manager(client.clone(), self.link.target.timeout).await?;
        let lease = manager(client, self.link.target.timeout).await?;
        *self.link.reads.lock() = reads;
        *self.link.writes.lock() = writes;
        *self.link.lease.lock() = lease;
        let old = std::mem::replace(&mut *self.link.master.lock(), addr.clone());
        tracing::warn!(from = %old, to = %addr, "following the Redis master Sentinel names");
        Ok(true)
    }
}

const K_STREAMS: &str = "kiln:streams";
const K_JOBS: &str = "kiln:jobs";
const K_EPOCH: &str = "kiln:epoch";
const K_LEADER: &str = "kiln:leader";
const K_LEADER_INFO: &str = "kiln:leader:info";
const K_NODES: &str = "kiln:nodes";
const K_DRAINING: &str = "kiln:draining";
const K_EVACUATING: &str = "kiln:evacuating";
const K_REMOVED: &str = "kiln:removed";
const K_SEEN: &str = "kiln:seen";

fn hb_key(node: &str) -> String {
    format!("kiln:hb:{node}")
}

/// Shared Lua: booking counters `kiln:used:{node}` (host + GPU parts) and `kiln:used:{node}:gpu{i}`.
const LUA_BOOK: &str = r#"
local dims = {'cpu_millicores','memory_mib','nvenc_fps','nvdec_fps','encoder_sessions','vram_mib'}
local function present(x) return x ~= nil and x ~= cjson.null end
local function book(rec, sign)
  if not present(rec.node) or not present(rec.demand) or rec.phase ~= 'placed' then return end
  local hk = 'kiln:used:' .. rec.node
  for _, d in ipairs(dims) do
    local v = (rec.demand.host[d] or 0)
    if present(rec.demand.gpu) then v = v + (rec.demand.gpu[d] or 0) end
    if v ~= 0 then redis.call('HINCRBY', hk, d, sign * v) end
  end
  if present(rec.gpu) and present(rec.demand.gpu) then
    local gk = hk .. ':gpu' .. rec.gpu
    for _, d in ipairs(dims) do
      local v = rec.demand.gpu[d] or 0
      if v ~= 0 then redis.call('HINCRBY', gk, d, sign * v) end
    end
  end
end
local function fenced()
  local cur = redis.call('GET', KEYS[2])
  if cur ~= ARGV[1] then return redis.error_reply('FENCED') end
  return nil
end
"#;

/// KEYS: streams, epoch, removed. ARGV: epoch, id, record JSON, caps JSON ('' = no check).
const LUA_SAVE: &str = r#"
local f = fenced(); if f then return f end
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then book(cjson.decode(old), -1) end
local new = cjson.decode(ARGV[3])
if ARGV[4] ~= '' and new.phase == 'placed' and present(new.demand) then
  local caps = cjson.decode(ARGV[4])
  local hk = 'kiln:used:' .. new.node
  for _, d in ipairs(dims) do
    local want = (new.demand.host[d] or 0)
    if present(new.demand.gpu) then want = want + (new.demand.gpu[d] or 0) end
    local cap = (caps.node[d] or 0)
    local used = tonumber(redis.call('HGET', hk, d) or '0')
    if want > 0 and used + want > cap then
      if old then book(cjson.decode(old), 1) end
      return redis.error_reply('FULL node ' .. d)
    end
  end
  if present(new.gpu) and present(new.demand.gpu) and present(caps.gpu) then
    local gk = hk .. ':gpu' .. new.gpu
    for _, d in ipairs(dims) do
      local want = new.demand.gpu[d] or 0
      local used = tonumber(redis.call('HGET', gk, d) or '0')
      if want > 0 and used + want > (caps.gpu[d] or 0) then
        if old then book(cjson.decode(old), 1) end
        return redis.error_reply('FULL gpu ' .. d)
      end
    end
  end
end
book(new, 1)
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 'OK'
"#;

/// KEYS: streams, epoch, removed. ARGV: epoch, id, now (unix ms).
const LUA_REMOVE: &str = r#"
local f = fenced(); if f then return f end
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then book(cjson.decode(old), -1); redis.call('HDEL', KEYS[1], ARGV[2]) end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return 'OK'
"#;

/// KEYS: leader, epoch, leader info. ARGV: my holder value (id and nonce), ttl ms, my url, floor (the highest
/// epoch a daemon has seen), the least new epoch (above the floor, at least the wall clock in ms; a decimal
/// string, so no Lua arithmetic touches it), my id as shown. Returns my epoch, or 0 when another leads. A
/// renewed epoch below the floor is replaced by a new one (the holder lost it in a failover, and the daemons
/// would refuse it).
const LUA_LEAD: &str = r#"
local floor = tonumber(ARGV[4])
local function fresh()
  local e = redis.call('INCR', KEYS[2])
  if e < tonumber(ARGV[5]) then redis.call('SET', KEYS[2], ARGV[5]); e = tonumber(ARGV[5]) end
  redis.call('SET', KEYS[3], cjson.encode({id = ARGV[6], holder = ARGV[1], url = ARGV[3], epoch = e}))
  return e
end
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local e = tonumber(redis.call('GET', KEYS[2]) or '0')
  if e < floor or not redis.call('GET', KEYS[3]) then return fresh() end
  return e
end
if cur then return 0 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return fresh() end
return 0
"#;

/// GPU booking counters a forgotten node's are deleted for (`kiln:used:{node}:gpu0` …): more GPUs than a host has.
const MAX_GPUS_FORGOTTEN: usize = 64;

/// 64 random bits, in hex: std's per-`RandomState` keys come from the OS's random source.
fn lease_nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

fn add_signed(r: &Resources, o: &Resources, sign: i64) -> Resources {
    if sign > 0 {
        r.plus(o)
    } else {
        r.minus(o)
    }
}

impl Mem {
    fn book(&mut self, rec: &StreamRecord, sign: i64) {
        let (Some(node), Some(d), Phase::Placed) = (&rec.node, &rec.demand, rec.phase) else {
            return;
        };
        let total = d.host.plus(&d.gpu.unwrap_or_default());
        let e = self.used.entry(node.clone()).or_default();
        *e = add_signed(e, &total, sign);
        if let (Some(g), Some(gd)) = (rec.gpu, d.gpu) {
            let e = self.used.entry(format!("{node}:gpu{g}")).or_default();
            *e = add_signed(e, &gd, sign);
        }
    }
}

impl Store {
    /// One-process state; `epoch` is this process's fencing token (unix ms at start, so a restarted scheduler
    /// outranks its previous life).
    pub fn memory(epoch: u64) -> Self {
        Store::Memory(Box::new(Mutex::new(Mem {
            epoch,
            ..Default::default()
        })))
    }

    /// Connects to one Redis (`redis://host:port[/db]`).
    pub async fn redis(url: &str) -> Result<Self, StoreError> {
        Self::redis_at(RedisTarget::single(url)).await
    }

    /// Connects to Redis as `target` says: one server, or the master Sentinel names.
    pub async fn redis_at(target: RedisTarget) -> Result<Self, StoreError> {
        let sentinel = if target.sentinels.is_empty() {
            None
        } else {
            let template = redis::IntoConnectionInfo::into_connection_info(target.url.as_str())?;
            let node = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(template.redis_settings().clone());
            Some(tokio::sync::Mutex::new(SentinelClient::build(
                target.sentinels.clone(),
                target.master.clone(),
                Some(node),
                SentinelServerType::Master,
            )?))
        };
        let client = match &sentinel {
            Some(s) => master_client(s, target.timeout).await?,
            None => redis::Client::open(target.url.as_str())?,
        };
        let addr = client.get_connection_info().addr().to_string();
        Ok(Store::Redis(RedisStore {
            nonce: lease_nonce(),
            link: Arc::new(Link {
                reads: Mutex::new(manager(client.clone(), target.timeout).await?),
                writes: Mutex::new(manager(client.clone(), target.timeout).await?),
                lease: Mutex::new(manager(client, target.timeout).await?),
                target,
                sentinel,
                master: Mutex::new(addr),
            }),
        }))
    }

    fn mem(&self) -> Option<parking_lot::MutexGuard<'_, Mem>> {
        match self {
            Store::Memory(m) => Some(m.lock()),
            Store::Redis(_) => None,
        }
    }

    /// Records a heartbeat that expires after `ttl`.
    pub async fn heartbeat(
        &self,
        node: &str,
        hb: &Heartbeat,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                let mut m = self.mem().expect("memory");
                m.known.insert(node.to_string());
                m.heartbeats
                    .insert(node.to_string(), (Instant::now(), ttl, hb.clone()));
                Ok(())
            }
            Store::Redis(r) => {
                let mut c = r.reads();
                let json = serde_json::to_string(hb)?;
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(hb_key(node))
                    .arg(json)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .ignore()
                    .sadd(K_NODES, node)
                    .ignore()
                    .hset(K_SEEN, node, crate::unix_ms())
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await?;
                Ok(())
            }
        }
    }

    /// The URL a node's live (unexpired) heartbeat advertises.
    pub async fn live_url(&self, node: &str) -> Result<Option<String>, StoreError> {
        Ok(self.live_heartbeat(node).await?.map(|hb| hb.url))
    }

    /// One node's live heartbeat (one key read, where [`Self::nodes`] reads the whole fleet's).
    pub async fn live_heartbeat(&self, node: &str) -> Result<Option<Heartbeat>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self
                .mem()
                .expect("memory")
                .heartbeats
                .get(node)
                .filter(|(at, ttl, _)| at.elapsed() < *ttl)
                .map(|(_, _, hb)| hb.clone())),
            Store::Redis(r) => {
                let hb: Option<String> = r.reads().get(hb_key(node)).await?;
                Ok(hb.map(|s| serde_json::from_str(&s)).transpose()?)
            }
        }
    }

    /// Every node ever seen, with its live heartbeat (if any) and drain flag, ordered by id.
    pub async fn nodes(&self) -> Result<Vec<NodeEntry>, StoreError> {
        match self {
            Store::Memory(_) => {
                let m = self.mem().expect("memory");
                Ok(m.known
                    .iter()
                    .map(|id| NodeEntry {
                        id: id.clone(),
                        heartbeat: m
                            .heartbeats
                            .get(id)
                            .filter(|(at, ttl, _)| at.elapsed() < *ttl)
                            .map(|(_, _, hb)| hb.clone()),
                        draining: m.draining.contains(id),
                        evacuate: m.evacuating.contains(id),
                    })
                    .collect())
            }
            Store::Redis(r) => {
                let mut c = r.reads();
                let mut ids: Vec<String> = c.smembers(K_NODES).await?;
                ids.sort();
                let draining: BTreeSet<String> = c.smembers(K_DRAINING).await?;
                let evacuating: BTreeSet<String> = c.smembers(K_EVACUATING).await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let keys: Vec<String> = ids.iter().map(|i| hb_key(i)).collect();
                let hbs: Vec<Option<String>> =
                    redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
                ids.into_iter()
                    .zip(hbs)
                    .map(|(id, hb)| {
                        Ok(NodeEntry {
                            draining: draining.contains(&id),
                            evacuate: evacuating.contains(&id),
                            heartbeat: hb.map(|s| serde_json::from_str(&s)).transpose()?,
                            id,
                        })
                    })
                    .collect()
            }
        }
    }

    /// Marks a known node draining, and with `evacuate` also to be emptied (or neither when `on` is false);
    /// `false` when the node is unknown.
    pub async fn set_draining(
        &self,
        node: &str,
        on: bool,
        evacuate: bool,
    ) -> Result<bool, StoreError> {
        let evacuate = on && evacuate;
        match self {
            Store::Memory(_) => {
                let mut m = self.mem().expect("memory");
                if !m.known.contains(node) {
                    return Ok(false);
                }
                if on {
                    m.draining.insert(node.to_string());
                } else {
                    m.draining.remove(node);
                }
                if evacuate {
                    m.evacuating.insert(node.to_string());
                } else {
                    m.evacuating.remove(node);
                }
                Ok(true)
            }
            Store::Redis(r) => {
                let mut c = r.reads();
                if !c.sismember::<_, _, bool>(K_NODES, node).await? {
                    return Ok(false);
                }
                let mut p = redis::pipe();
                p.atomic();
                if on {
                    p.sadd(K_DRAINING, node).ignore();
                } else {
                    p.srem(K_DRAINING, node).ignore();
                }
                if evacuate {
                    p.sadd(K_EVACUATING, node).ignore();
                } else {
                    p.srem(K_EVACUATING, node).ignore();
                }
                p.query_async::<()>(&mut c).await?;
                Ok(true)
            }
        }
    }

    /// Remembers which node runs a VOD job (jobs live on their node; this is only the route to it).
    pub async fn put_job(&self, id: &str, node: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                self.mem()
                    .expect("memory")
                    .jobs
                    .insert(id.to_string(), node.to_string());
                Ok(())
            }
            Store::Redis(r) => Ok(r.reads().hset::<_, _, _, ()>(K_JOBS, id, node).await?),
        }
    }

    /// The node a VOD job was submitted to.
    pub async fn job_node(&self, id: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self.mem().expect("memory").jobs.get(id).cloned()),
            Store::Redis(r) => Ok(r.reads().hget(K_JOBS, id).await?),
        }
    }

    /// Forgets a VOD job's route (the job was deleted on its node).
    pub async fn remove_job(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                self.mem().expect("memory").jobs.remove(id);
                Ok(())
            }
            Store::Redis(r) => Ok(r.reads().hdel::<_, _, ()>(K_JOBS, id).await?),
        }
    }

    /// All stream records, ordered by id.
    pub async fn streams(&self) -> Result<Vec<StreamRecord>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self
                .mem()
                .expect("memory")
                .streams
                .values()
                .cloned()
                .collect()),
            Store::Redis(r) => {
                let mut c = r.reads();
                let all: BTreeMap<String, String> = c.hgetall(K_STREAMS).await?;
                // one record this binary cannot read (written by a newer scheduler during a rolling upgrade) is
                // left alone, not a failure of every read: reconciliation, placement and the API go on for the
                // rest of the fleet
                Ok(all
                    .iter()
                    .filter_map(|(id, s)| match serde_json::from_str(s) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::warn!(stream = %id, error = %e, "a stream record this scheduler cannot read: left alone");
                            None
                        }
                    })
                    .collect())
            }
        }
    }

    pub async fn stream(&self, id: &str) -> Result<Option<StreamRecord>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self.mem().expect("memory").streams.get(id).cloned()),
            Store::Redis(r) => {
                let mut c = r.reads();
                let s: Option<String> = c.hget(K_STREAMS, id).await?;
                Ok(s.map(|s| serde_json::from_str(&s)).transpose()?)
            }
        }
    }

    /// Writes `rec` under `epoch`, atomically: refused when `epoch` is stale; a placed record's booking replaces
    /// its previous one and is checked against `caps` (when given) first.
    pub async fn save(
        &self,
        epoch: u64,
        rec: &StreamRecord,
        caps: Option<BinCaps>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                let mut m = self.mem().expect("memory");
                if m.epoch != epoch {
                    return Err(StoreError::Fenced(epoch));
                }
                let old = m.streams.get(&rec.id).cloned();
                if let Some(o) = &old {
                    m.book(o, -1);
                }
                if let (Some(caps), Some(node), Some(d), Phase::Placed) =
                    (caps, &rec.node, &rec.demand, rec.phase)
                {
                    let used = m.used.get(node).copied().unwrap_or_default();
                    let cap = caps.node;
                    let want = d.host.plus(&d.gpu.unwrap_or_default());
                    let mut short = cap
                        .minus(&used)
                        .short_dimension(&want)
                        .map(|d| format!("node {d}"));
                    if let (None, Some(g), Some(gd), Some(gc)) = (&short, rec.gpu, d.gpu, caps.gpu)
                    {
                        let used = m
                            .used
                            .get(&format!("{node}:gpu{g}"))
                            .copied()
                            .unwrap_or_default();
                        short = gc
                            .minus(&used)
                            .short_dimension(&gd)
                            .map(|d| format!("gpu {d}"));
                    }
                    if let Some(s) = short {
                        if let Some(o) = &old {
                            m.book(o, 1);
                        }
                        return Err(StoreError::Full(s));
                    }
                }
                m.book(rec, 1);
                m.removed.remove(&rec.id);
                m.streams.insert(rec.id.clone(), rec.clone());
                Ok(())
            }
            Store::Redis(r) => {
                let caps = caps
                    .map(|c| serde_json::to_string(&c))
                    .transpose()?
                    .unwrap_or_default();
                let args = [
                    epoch.to_string(),
                    rec.id.clone(),
                    serde_json::to_string(rec)?,
                    caps,
                ];
                let _: String = r
                    .eval_replicated(
                        &r.link.writes,
                        &format!("{LUA_BOOK}{LUA_SAVE}"),
                        &[K_STREAMS, K_EPOCH, K_REMOVED],
                        &args,
                        |e| script_error(e, epoch),
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// Deletes a record and its booking, under `epoch`.
    pub async fn remove(&self, epoch: u64, id: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                let mut m = self.mem().expect("memory");
                if m.epoch != epoch {
                    return Err(StoreError::Fenced(epoch));
                }
                if let Some(o) = m.streams.remove(id) {
                    m.book(&o, -1);
                }
                m.removed.insert(id.to_string(), crate::unix_ms());
                Ok(())
            }
            Store::Redis(r) => {
                let args = [
                    epoch.to_string(),
                    id.to_string(),
                    crate::unix_ms().to_string(),
                ];
                let _: String = r
                    .eval_replicated(
                        &r.link.writes,
                        &format!("{LUA_BOOK}{LUA_REMOVE}"),
                        &[K_STREAMS, K_EPOCH, K_REMOVED],
                        &args,
                        |e| script_error(e, epoch),
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// When each known node last sent a heartbeat (unix ms); a node missing here (known before this was kept) is
    /// missing from the answer.
    pub async fn last_seen(&self) -> Result<HashMap<String, u64>, StoreError> {
        match self {
            Store::Memory(_) => {
                let m = self.mem().expect("memory");
                let now = crate::unix_ms();
                Ok(m.heartbeats
                    .iter()
                    .map(|(id, (at, _, _))| {
                        let ago = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
                        (id.clone(), now.saturating_sub(ago))
                    })
                    .collect())
            }
            Store::Redis(r) => Ok(r.reads().hgetall(K_SEEN).await?),
        }
    }

    /// Starts the clock of a node known from before [`Self::last_seen`] was kept: as if seen at `at`.
    pub async fn mark_seen(&self, node: &str, at: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => Ok(r.reads().hset_nx::<_, _, _, ()>(K_SEEN, node, at).await?),
        }
    }

    /// Forgets a node: its place in the known set, its drain marks, its last heartbeat and its booking counters.
    /// For a node long dead with nothing placed on it (an autoscaled node's id is not seen again), so the fleet's
    /// lists and every read of them do not grow without end. A node that reports again is known again.
    pub async fn forget_node(&self, node: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                let mut m = self.mem().expect("memory");
                m.known.remove(node);
                m.heartbeats.remove(node);
                m.draining.remove(node);
                m.evacuating.remove(node);
                let prefix = format!("{node}:gpu");
                m.used.retain(|k, _| k != node && !k.starts_with(&prefix));
                Ok(())
            }
            Store::Redis(r) => {
                let mut p = redis::pipe();
                p.atomic()
                    .srem(K_NODES, node)
                    .ignore()
                    .srem(K_DRAINING, node)
                    .ignore()
                    .srem(K_EVACUATING, node)
                    .ignore()
                    .hdel(K_SEEN, node)
                    .ignore()
                    .del(format!("kiln:used:{node}"))
                    .ignore();
                for g in 0..MAX_GPUS_FORGOTTEN {
                    p.del(format!("kiln:used:{node}:gpu{g}")).ignore();
                }
                Ok(p.query_async::<()>(&mut r.reads()).await?)
            }
        }
    }

    /// Streams removed (deleted, or given up by a create whose start may have happened after all) and not
    /// placed again since: id → when (unix ms). The leader stops any copy a daemon still reports of them, and
    /// forgets one once no live node does ([`Self::forget_removed`]).
    pub async fn removed(&self) -> Result<HashMap<String, u64>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self.mem().expect("memory").removed.clone()),
            Store::Redis(r) => Ok(r.reads().hgetall(K_REMOVED).await?),
        }
    }

    /// Moves the removal of `id` to `at` (unix ms): a copy of it was reported then.
    pub async fn mark_removed(&self, id: &str, at: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                if let Some(t) = self.mem().expect("memory").removed.get_mut(id) {
                    *t = at;
                }
                Ok(())
            }
            // only an entry still there (HSET would bring back one a save just cleared)
            Store::Redis(r) => Ok(redis::cmd("EVAL")
                .arg("if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 0")
                .arg(1)
                .arg(K_REMOVED)
                .arg(id)
                .arg(at)
                .query_async::<()>(&mut r.reads())
                .await?),
        }
    }

    /// Forgets the removal of `id` (no copy of it runs any more).
    pub async fn forget_removed(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                self.mem().expect("memory").removed.remove(id);
                Ok(())
            }
            Store::Redis(r) => Ok(r.reads().hdel::<_, _, ()>(K_REMOVED, id).await?),
        }
    }

    /// Takes or renews the leader lease for `ttl`. `Some(epoch)` while this process leads (a new epoch each
    /// time the lease is newly taken); `None` when another process holds it. In memory, always the leader.
    ///
    /// `floor` is the highest epoch any daemon is known to have seen: a new epoch is above it even when the
    /// store's counter is not (a promoted replica that missed the last increment), and a holder whose epoch fell
    /// below it takes a new one. With replicas required, the lease counts only once they have it.
    pub async fn lead(
        &self,
        me: &str,
        url: &str,
        ttl: Duration,
        floor: u64,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Some(self.mem().expect("memory").epoch)),
            Store::Redis(r) => {
                // a new epoch is above the floor and at least the wall clock in ms: unique per lease even when a
                // failover lost increments no daemon has reported yet (leases on two masters are taken seconds
                // apart, well beyond clock skew); daemons accept epochs up to a day ahead of their clock
                let fresh_min = (floor + 1).max(crate::unix_ms());
                let args = [
                    format!("{me}#{}", r.nonce),
                    (ttl.as_millis() as u64).to_string(),
                    url.to_string(),
                    floor.to_string(),
                    fresh_min.to_string(),
                    me.to_string(),
                ];
                let e: u64 = r
                    .eval_replicated(
                        &r.link.lease,
                        LUA_LEAD,
                        &[K_LEADER, K_EPOCH, K_LEADER_INFO],
                        &args,
                        StoreError::Redis,
                    )
                    .await?;
                Ok((e > 0).then_some(e))
            }
        }
    }

    /// With Sentinel: moves to the master it names now (`Ok(true)` when that changed). Run on every leader-loop
    /// tick, so a scheduler follows a failover within one interval of Sentinel's switch, without a restart.
    pub async fn follow(&self) -> Result<bool, StoreError> {
        match self {
            Store::Memory(_) => Ok(false),
            Store::Redis(r) => r.follow().await,
        }
    }

    /// The Redis master's address in use (`None` in memory).
    pub fn master(&self) -> Option<String> {
        match self {
            Store::Memory(_) => None,
            Store::Redis(r) => Some(r.link.master.lock().clone()),
        }
    }

    /// The current leader, if the lease is held.
    pub async fn leader(&self, me: &LeaderInfo) -> Result<Option<LeaderInfo>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Some(me.clone())),
            Store::Redis(r) => {
                let mut c = r.reads();
                let holder: Option<String> = c.get(K_LEADER).await?;
                let info: Option<String> = c.get(K_LEADER_INFO).await?;
                #[derive(Deserialize)]
                struct Held {
                    #[serde(flatten)]
                    info: LeaderInfo,
                    /// Absent in what a scheduler of before the nonce wrote: its holder was its id.
                    holder: Option<String>,
                }
                let info: Option<Held> = info.map(|s| serde_json::from_str(&s)).transpose()?;
                Ok(match (holder, info) {
                    (Some(h), Some(i)) if h == *i.holder.as_ref().unwrap_or(&i.info.id) => {
                        Some(i.info)
                    }
                    _ => None,
                })
            }
        }
    }

    /// Counters booked per node (`node` and `node:gpuN`), for checks and tests.
    pub async fn booked(&self, node: &str) -> Result<Resources, StoreError> {
        match self {
            Store::Memory(_) => Ok(self
                .mem()
                .expect("memory")
                .used
                .get(node)
                .copied()
                .unwrap_or_default()),
            Store::Redis(r) => {
                let mut c = r.reads();
                let h: HashMap<String, i64> = c.hgetall(format!("kiln:used:{node}")).await?;
                let mut out = Resources::default();
                for d in Dimension::ALL {
                    out.set(d, h.get(d.as_str()).copied().unwrap_or(0).max(0) as u64);
                }
                Ok(out)
            }
        }
    }
}

/// A booking script's error: fenced, full, or Redis's own. (The script runs in a pipeline, whose error wraps the
/// script's reply: `Pipeline failure: [(Index 0, error: "FULL": node cpu_millicores)]`.)
fn script_error(e: redis::RedisError, epoch: u64) -> StoreError {
    let text = e.to_string();
    if text.contains("FENCED") {
        StoreError::Fenced(epoch)
    } else if let Some(i) = text.find("FULL") {
        let why = text[i + 4..].trim_matches(|c: char| c.is_whitespace() || "\":)]".contains(c));
        StoreError::Full(why.to_string())
    } else {
        StoreError::Redis(e)
    }
}
