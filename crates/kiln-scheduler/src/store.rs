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
//! The in-memory store implements the same contract with a mutex, so both run the same scheduler code.

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kiln_binpack::Demand;
use kiln_model::capacity::{Dimension, Resources};
use kiln_model::node::Heartbeat;
use kiln_model::StreamRequest;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

/// Where a stream stands in the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// Capacity a booking is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinCaps {
    pub host: Resources,
    pub gpu: Option<Resources>,
}

/// A node as the store knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    pub id: String,
    /// The latest heartbeat, while it has not expired.
    pub heartbeat: Option<Heartbeat>,
    pub draining: bool,
}

/// Who leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[error("corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// The state backend.
#[derive(Debug)]
pub enum Store {
    Memory(Mutex<Mem>),
    Redis(RedisStore),
}

/// In-process state.
#[derive(Debug, Default)]
pub struct Mem {
    heartbeats: HashMap<String, (Instant, Duration, Heartbeat)>,
    known: BTreeSet<String>,
    draining: BTreeSet<String>,
    streams: BTreeMap<String, StreamRecord>,
    used: HashMap<String, Resources>,
    epoch: u64,
    /// VOD job id → the node it was submitted to.
    jobs: HashMap<String, String>,
}

/// Redis-backed state (keys under `kiln:`).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    save: redis::Script,
    remove: redis::Script,
    lead: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

const K_STREAMS: &str = "kiln:streams";
const K_JOBS: &str = "kiln:jobs";
const K_EPOCH: &str = "kiln:epoch";
const K_LEADER: &str = "kiln:leader";
const K_LEADER_INFO: &str = "kiln:leader:info";
const K_NODES: &str = "kiln:nodes";
const K_DRAINING: &str = "kiln:draining";

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

/// KEYS: streams, epoch. ARGV: epoch, id, record JSON, caps JSON ('' = no check).
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
    local cap = (caps.host[d] or 0)
    if present(caps.gpu) then cap = cap + (caps.gpu[d] or 0) end
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
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 'OK'
"#;

/// KEYS: streams, epoch. ARGV: epoch, id.
const LUA_REMOVE: &str = r#"
local f = fenced(); if f then return f end
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then book(cjson.decode(old), -1); redis.call('HDEL', KEYS[1], ARGV[2]) end
return 'OK'
"#;

/// KEYS: leader, epoch, leader info. ARGV: my id, ttl ms, my url. Returns my epoch, or 0 when another leads.
const LUA_LEAD: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
end
if cur then return 0 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local e = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[3], cjson.encode({id = ARGV[1], url = ARGV[3], epoch = e}))
  return e
end
return 0
"#;

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
        Store::Memory(Mutex::new(Mem {
            epoch,
            ..Default::default()
        }))
    }

    /// Connects to Redis (`redis://host:port[/db]`).
    pub async fn redis(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Store::Redis(RedisStore {
            conn,
            save: redis::Script::new(&format!("{LUA_BOOK}{LUA_SAVE}")),
            remove: redis::Script::new(&format!("{LUA_BOOK}{LUA_REMOVE}")),
            lead: redis::Script::new(LUA_LEAD),
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
                let mut c = r.conn.clone();
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
                    .query_async::<()>(&mut c)
                    .await?;
                Ok(())
            }
        }
    }

    /// The URL a node's live (unexpired) heartbeat advertises.
    pub async fn live_url(&self, node: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self
                .mem()
                .expect("memory")
                .heartbeats
                .get(node)
                .filter(|(at, ttl, _)| at.elapsed() < *ttl)
                .map(|(_, _, hb)| hb.url.clone())),
            Store::Redis(r) => {
                let hb: Option<String> = r.conn.clone().get(hb_key(node)).await?;
                Ok(hb
                    .map(|s| serde_json::from_str::<Heartbeat>(&s))
                    .transpose()?
                    .map(|hb| hb.url))
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
                    })
                    .collect())
            }
            Store::Redis(r) => {
                let mut c = r.conn.clone();
                let mut ids: Vec<String> = c.smembers(K_NODES).await?;
                ids.sort();
                let draining: BTreeSet<String> = c.smembers(K_DRAINING).await?;
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
                            heartbeat: hb.map(|s| serde_json::from_str(&s)).transpose()?,
                            id,
                        })
                    })
                    .collect()
            }
        }
    }

    /// Marks a known node draining (or not); `false` when the node is unknown.
    pub async fn set_draining(&self, node: &str, on: bool) -> Result<bool, StoreError> {
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
                Ok(true)
            }
            Store::Redis(r) => {
                let mut c = r.conn.clone();
                if !c.sismember::<_, _, bool>(K_NODES, node).await? {
                    return Ok(false);
                }
                if on {
                    c.sadd::<_, _, ()>(K_DRAINING, node).await?;
                } else {
                    c.srem::<_, _, ()>(K_DRAINING, node).await?;
                }
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
            Store::Redis(r) => Ok(r.conn.clone().hset::<_, _, _, ()>(K_JOBS, id, node).await?),
        }
    }

    /// The node a VOD job was submitted to.
    pub async fn job_node(&self, id: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self.mem().expect("memory").jobs.get(id).cloned()),
            Store::Redis(r) => Ok(r.conn.clone().hget(K_JOBS, id).await?),
        }
    }

    /// Forgets a VOD job's route (the job was deleted on its node).
    pub async fn remove_job(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => {
                self.mem().expect("memory").jobs.remove(id);
                Ok(())
            }
            Store::Redis(r) => Ok(r.conn.clone().hdel::<_, _, ()>(K_JOBS, id).await?),
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
                let mut c = r.conn.clone();
                let all: BTreeMap<String, String> = c.hgetall(K_STREAMS).await?;
                all.values()
                    .map(|s| serde_json::from_str(s).map_err(StoreError::from))
                    .collect()
            }
        }
    }

    pub async fn stream(&self, id: &str) -> Result<Option<StreamRecord>, StoreError> {
        match self {
            Store::Memory(_) => Ok(self.mem().expect("memory").streams.get(id).cloned()),
            Store::Redis(r) => {
                let mut c = r.conn.clone();
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
                    let cap = caps.host.plus(&caps.gpu.unwrap_or_default());
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
                m.streams.insert(rec.id.clone(), rec.clone());
                Ok(())
            }
            Store::Redis(r) => {
                let mut c = r.conn.clone();
                let caps = caps
                    .map(|c| serde_json::to_string(&c))
                    .transpose()?
                    .unwrap_or_default();
                let res: Result<String, redis::RedisError> = r
                    .save
                    .key(K_STREAMS)
                    .key(K_EPOCH)
                    .arg(epoch)
                    .arg(&rec.id)
                    .arg(serde_json::to_string(rec)?)
                    .arg(caps)
                    .invoke_async(&mut c)
                    .await;
                script_result(res, epoch)
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
                Ok(())
            }
            Store::Redis(r) => {
                let mut c = r.conn.clone();
                let res: Result<String, redis::RedisError> = r
                    .remove
                    .key(K_STREAMS)
                    .key(K_EPOCH)
                    .arg(epoch)
                    .arg(id)
                    .invoke_async(&mut c)
                    .await;
                script_result(res, epoch)
            }
        }
    }

    /// Takes or renews the leader lease for `ttl`. `Some(epoch)` while this process leads (a new epoch each
    /// time the lease is newly taken); `None` when another process holds it. In memory, always the leader.
    pub async fn lead(
        &self,
        me: &str,
        url: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Some(self.mem().expect("memory").epoch)),
            Store::Redis(r) => {
                let mut c = r.conn.clone();
                let e: u64 = r
                    .lead
                    .key(K_LEADER)
                    .key(K_EPOCH)
                    .key(K_LEADER_INFO)
                    .arg(me)
                    .arg(ttl.as_millis() as u64)
                    .arg(url)
                    .invoke_async(&mut c)
                    .await?;
                Ok((e > 0).then_some(e))
            }
        }
    }

    /// The current leader, if the lease is held.
    pub async fn leader(&self, me: &LeaderInfo) -> Result<Option<LeaderInfo>, StoreError> {
        match self {
            Store::Memory(_) => Ok(Some(me.clone())),
            Store::Redis(r) => {
                let mut c = r.conn.clone();
                let holder: Option<String> = c.get(K_LEADER).await?;
                let info: Option<String> = c.get(K_LEADER_INFO).await?;
                let info: Option<LeaderInfo> =
                    info.map(|s| serde_json::from_str(&s)).transpose()?;
                Ok(match (holder, info) {
                    (Some(h), Some(i)) if h == i.id => Some(i),
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
                let mut c = r.conn.clone();
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

fn script_result(res: Result<String, redis::RedisError>, epoch: u64) -> Result<(), StoreError> {
    match res {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = format!("{} {}", e.code().unwrap_or(""), e.detail().unwrap_or(""));
            if text.contains("FENCED") {
                Err(StoreError::Fenced(epoch))
            } else if text.contains("FULL") {
                Err(StoreError::Full(
                    text.trim().trim_start_matches("FULL").trim().to_string(),
                ))
            } else {
                Err(StoreError::Redis(e))
            }
        }
    }
}
