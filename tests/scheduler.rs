//! The scheduler as processes on loopback: a real `redis-server`, two `kiln-scheduler`s sharing it, three `kilnd`s
//! sending heartbeats, real pipelines. What must hold:
//! - streams are placed and run on exactly one daemon each (asserted from the daemons' own `GET /v1/streams`
//!   after every step), `/play/…` redirects to the daemon serving the stream, headroom shrinks as streams land;
//! - a drained node keeps its streams and gets no new ones;
//! - `kill -9` of a daemon: within 10 s its streams run on other daemons and `/play/…` follows;
//! - the leader frozen (SIGSTOP): the other scheduler takes the lease with a higher epoch and places streams; a
//!   command carrying the old epoch is refused by the daemons (fencing, 409 `stale_epoch`); the old leader,
//!   resumed, knows it no longer leads and redirects writes; no stream ever runs twice;
//! - nodes join only with the join token (or the fleet token, or an explicitly open fleet), at an address the
//!   policy allows, and a forged heartbeat neither adds a node nor re-points one (so `/play` never sends viewers
//!   to an address nobody admitted);
//! - `GET /v1/fleet/headroom` over 40 nodes answers at once and, called concurrently, never starves heartbeats.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln_integration::{
    free_port, make_clip, poll_json, poll_until, redis_on, redis_sentinel, redis_server,
    spawn_kilnd_env, wait_job, Polled, Proc,
};
use serde_json::{json, Value};

const KILND: &str = env!("CARGO_BIN_EXE_kiln-it-kilnd");
const SCHEDULER: &str = env!("CARGO_BIN_EXE_kiln-it-scheduler");
/// The CLIs' default. Each heartbeat request times out after one interval, a node is dead after three missed ones
/// and the leader lease lasts three: at 1 s a loaded 2-core host (three daemons with pipelines, two schedulers,
/// Redis, other tests) keeps every heartbeat and lease renewal in time.
const HEARTBEAT_MS: &str = "1000";
const HEARTBEAT: Duration = Duration::from_millis(1000);

/// The join token the test fleets use (`--node-token-env KILN_IT_NODE_TOKEN` on schedulers and daemons).
const NODE_TOKEN: &str = "node-join-token-0123456789";
const NODE_TOKEN_ENV: (&str, &str) = ("KILN_IT_NODE_TOKEN", NODE_TOKEN);

/// A `kiln-scheduler` on 127.0.0.1:0 with the test's heartbeat interval, `args` and `env`. The test daemons
/// advertise loopback URLs, which a scheduler refuses by default: `--node-networks 127.0.0.0/8` admits them.
async fn scheduler(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let argv: Vec<&str> = [
        "--listen",
        "127.0.0.1:0",
        "--heartbeat-ms",
        HEARTBEAT_MS,
        "--node-networks",
        "127.0.0.0/8",
    ]
    .into_iter()
    .chain(args.iter().copied())
    .collect();
    Proc::spawn_env(name, SCHEDULER, &argv, env, "listening on").await
}

/// A GPU-less `kilnd` node `name` with its data in `data`, sending heartbeats to `schedulers` (comma-separated)
/// at the test's interval; `args` and `env` are added.
async fn node(
    name: &str,
    data: &str,
    schedulers: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Proc> {
    let argv: Vec<&str> = [
        "--no-gpu",
        "--data-dir",
        data,
        "--node-id",
        name,
        "--scheduler",
        schedulers,
        "--heartbeat-ms",
        HEARTBEAT_MS,
    ]
    .into_iter()
    .chain(args.iter().copied())
    .collect();
    spawn_kilnd_env(name, KILND, &argv, env).await
}

struct Fleet {
    http: reqwest::Client,
    /// Does not follow redirects: for 302/307 checks.
    raw: reqwest::Client,
    daemons: BTreeMap<String, Proc>,
}

impl Fleet {
    async fn json(&self, url: &str) -> Result<Value> {
        let r = self.http.get(url).send().await?;
        ensure!(r.status().is_success(), "GET {url}: {}", r.status());
        Ok(r.json().await?)
    }

    /// Stream id → the live daemons that run it (state not ended), from the daemons themselves. Fails if any
    /// stream runs on two daemons.
    async fn running(&self) -> Result<BTreeMap<String, String>> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for (node, d) in &self.daemons {
            let list = self.json(&format!("{}/v1/streams", d.url)).await?;
            for s in list.as_array().context("list")? {
                if s["state"] == "ended" {
                    continue;
                }
                let id = s["id"].as_str().context("id")?.to_string();
                if let Some(other) = out.insert(id.clone(), node.clone()) {
                    bail!("stream {id} runs twice: on {other} and on {node}");
                }
            }
        }
        Ok(out)
    }

    /// `POST {sched}/v1/streams`: stream `id` of `preset` from the test source.
    async fn post(&self, sched: &str, id: &str, preset: &str) -> Result<reqwest::Response> {
        let body = json!({"id": id, "source": "test:", "preset": preset});
        let url = format!("{sched}/v1/streams");
        Ok(self.http.post(url).json(&body).send().await?)
    }

    /// [`Fleet::post`], which must place the stream (201).
    async fn place(&self, sched: &str, id: &str, preset: &str) -> Result<Value> {
        let r = self.post(sched, id, preset).await?;
        let status = r.status().as_u16();
        let body: Value = r.json().await?;
        ensure!(status == 201, "placing {id}: {status} {body}");
        Ok(body)
    }

    /// Waits until `cond` holds on the running map (checked every 100 ms; the map itself asserts no duplicates).
    async fn until(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Result<(BTreeMap<String, String>, Duration)> {
        let t = Instant::now();
        let cond = &cond;
        let m = poll_until(what, limit, Duration::from_millis(100), || async move {
            let m = self.running().await?;
            Ok(if cond(&m) {
                Polled::Done(m)
            } else {
                Polled::NotYet(format!("running: {m:?}"))
            })
        })
        .await?;
        Ok((m, t.elapsed()))
    }

    /// `/play/{id}/master.m3u8` on `sched` redirects (302) to a daemon, which serves the playlist.
    async fn play(&self, sched: &str, id: &str) -> Result<String> {
        let r = self
            .raw
            .get(format!("{sched}/play/{id}/master.m3u8"))
            .send()
            .await?;
        ensure!(r.status() == 302, "play {id}: {}", r.status());
        let loc = r.headers()["location"].to_str()?.to_string();
        let body = self.http.get(&loc).send().await?.text().await?;
        ensure!(body.starts_with("#EXTM3U"), "{loc}: {body}");
        Ok(loc)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_two_schedulers_survive_node_and_leader_failure() -> Result<()> {
    let redis = redis_server().await?;
    let mut scheds = Vec::new();
    // nodes join with the join token; the control API stays open (no fleet token): the two are independent
    let join = ["--node-token-env", NODE_TOKEN_ENV.0];
    for name in ["sched-a", "sched-b"] {
        let args = [
            "--redis-url",
            &redis.url,
            "--instance-id",
            name,
            join[0],
            join[1],
        ];
        scheds.push(scheduler(name, &args, &[NODE_TOKEN_ENV]).await?);
    }
    let all_scheds = format!("{},{}", scheds[0].url, scheds[1].url);
    let mut daemons = BTreeMap::new();
    for n in ["n1", "n2", "n3"] {
        let data = std::env::temp_dir().join(format!("kiln-sched-{}-{n}", std::process::id()));
        let data = data.display().to_string();
        let d = node(n, &data, &all_scheds, &join, &[NODE_TOKEN_ENV]).await?;
        daemons.insert(n.to_string(), d);
    }
    let f = Fleet {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()?,
        raw: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        daemons,
    };
    let http = f.http.clone();

    // one leader; three live nodes seen by both schedulers (heartbeats go to whichever answers, state is shared)
    let lead = poll_json(
        &http,
        &format!("{}/v1/leader", scheds[0].url),
        "a leader",
        Duration::from_secs(10),
        |v| v["leader"]["epoch"].as_u64().is_some(),
    )
    .await?;
    let epoch1 = lead["leader"]["epoch"].as_u64().unwrap();
    let leader_ix = if lead["leader"]["id"] == "sched-a" {
        0
    } else {
        1
    };
    let (leader, follower) = (leader_ix, 1 - leader_ix);
    for s in &scheds {
        poll_json(
            &http,
            &format!("{}/v1/nodes", s.url),
            "three live nodes",
            Duration::from_secs(10),
            |v| {
                v.as_array()
                    .is_some_and(|a| a.iter().filter(|n| n["state"] == "alive").count() == 3)
            },
        )
        .await?;
    }
    let headroom0 = f
        .json(&format!("{}/v1/fleet/headroom", scheds[follower].url))
        .await?;
    let audio0 = headroom0["presets"]["live-audio-only"]["streams"]
        .as_u64()
        .context("headroom")?;
    ensure!(audio0 >= 6, "fleet headroom for audio-only: {headroom0}");

    // placement, through the follower: its 307 leads to the leader, which places and starts the streams
    let mut placed = BTreeMap::new();
    for i in 1..=4 {
        let id = format!("s{i}");
        let preset = if i == 1 {
            "live-360p-abr"
        } else {
            "live-audio-only"
        };
        let body = f.place(&scheds[follower].url, &id, preset).await?;
        ensure!(body["phase"] == "placed", "{body}");
        placed.insert(id, body["node"].as_str().context("node")?.to_string());
    }
    let (running, _) = f
        .until("the four streams run", Duration::from_secs(10), |m| {
            placed.keys().all(|k| m.contains_key(k))
        })
        .await?;
    for (id, node) in &placed {
        ensure!(
            running[id] == *node,
            "{id} runs on {} but was placed on {node}",
            running[id]
        );
    }
    // the same request again is idempotent; another spec under the same id is a conflict
    let again = f.post(&scheds[leader].url, "s2", "live-audio-only").await?;
    ensure!(again.status() == 200, "repeat: {}", again.status());
    let clash = f.post(&scheds[leader].url, "s2", "live-360p-abr").await?;
    ensure!(clash.status() == 409, "conflict: {}", clash.status());
    let bad = http
        .post(format!("{}/v1/streams", scheds[leader].url))
        .body("{\"id\": \"x\", \"source\": \"nope:\"")
        .header("content-type", "application/json")
        .send()
        .await?;
    ensure!(bad.status() == 400, "malformed: {}", bad.status());
    let loc = f.play(&scheds[follower].url, "s1").await?;
    ensure!(
        loc.starts_with(&f.daemons[&placed["s1"]].url),
        "{loc} is not {}'s",
        placed["s1"]
    );
    let headroom1 = f
        .json(&format!("{}/v1/fleet/headroom", scheds[leader].url))
        .await?;
    let audio1 = headroom1["presets"]["live-audio-only"]["streams"]
        .as_u64()
        .context("headroom")?;
    ensure!(
        audio1 < audio0,
        "headroom did not shrink: {audio0} → {audio1}"
    );

    // drain the node with the fewest streams: it keeps them, and new streams go elsewhere
    let drained = ["n1", "n2", "n3"]
        .into_iter()
        .min_by_key(|n| placed.values().filter(|v| v.as_str() == *n).count())
        .unwrap()
        .to_string();
    let before: BTreeSet<String> = running
        .iter()
        .filter(|(_, n)| **n == drained)
        .map(|(k, _)| k.clone())
        .collect();
    let r = http
        .post(format!("{}/v1/nodes/{drained}/drain", scheds[leader].url))
        .send()
        .await?;
    ensure!(r.status() == 200, "drain: {}", r.status());
    for i in 5..=7 {
        let id = format!("s{i}");
        let body = f.place(&scheds[leader].url, &id, "live-audio-only").await?;
        let node = body["node"].as_str().context("node")?.to_string();
        ensure!(node != drained, "{id} was placed on draining {drained}");
        placed.insert(id, node);
    }
    let (running, _) = f
        .until("the new streams run", Duration::from_secs(10), |m| {
            placed.keys().all(|k| m.contains_key(k))
        })
        .await?;
    let after: BTreeSet<String> = running
        .iter()
        .filter(|(_, n)| **n == drained)
        .map(|(k, _)| k.clone())
        .collect();
    ensure!(
        before == after,
        "drain changed what {drained} runs: {before:?} → {after:?}"
    );
    let nodes = f
        .json(&format!("{}/v1/nodes", scheds[follower].url))
        .await?;
    ensure!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == drained.as_str() && n["state"] == "draining"),
        "{nodes}"
    );

    // kill -9 a daemon that runs streams (not the drained one): its streams must run elsewhere within 10 s
    let victim = placed
        .values()
        .filter(|n| **n != drained)
        .max_by_key(|n| placed.values().filter(|v| v == n).count())
        .unwrap()
        .clone();
    let lost: Vec<String> = running
        .iter()
        .filter(|(_, n)| **n == victim)
        .map(|(k, _)| k.clone())
        .collect();
    ensure!(!lost.is_empty(), "the victim runs nothing");
    let mut daemons = f.daemons;
    daemons.get_mut(&victim).unwrap().kill().await?;
    let dead = daemons.remove(&victim).unwrap();
    let f = Fleet { daemons, ..f };
    let (running, took) = f
        .until(
            "the dead node's streams run elsewhere",
            Duration::from_secs(10),
            |m| {
                lost.iter()
                    .all(|id| m.get(id).is_some_and(|n| *n != victim))
            },
        )
        .await?;
    eprintln!("failover of {} streams from {victim}: {took:?}", lost.len());
    for id in &lost {
        ensure!(
            running[id] != drained,
            "{id} failed over onto draining {drained}"
        );
        let loc = f.play(&scheds[follower].url, id).await?;
        ensure!(
            !loc.starts_with(&dead.url),
            "/play/{id} still points at the dead node: {loc}"
        );
    }
    let m = http
        .get(format!("{}/metrics", scheds[leader].url))
        .send()
        .await?
        .text()
        .await?;
    ensure!(m.contains("kiln_scheduler_node_deaths_total 1"), "{m}");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))?;
    let names: Vec<&str> = doc
        .lines()
        .skip_while(|l| !l.starts_with("## Scheduler"))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    ensure!(
        names.len() >= 10,
        "parsed {} scheduler series from docs/metrics.md",
        names.len()
    );
    for n in names {
        ensure!(
            m.contains(&format!("# TYPE {n} ")),
            "{n} is documented but the scheduler does not export it"
        );
    }
    ensure!(
        m.contains("kiln_scheduler_leader 1")
            && m.contains("kiln_scheduler_nodes{state=\"dead\"} 1"),
        "{m}"
    );
    ensure!(
        m.lines().any(
            |l| l.starts_with("kiln_scheduler_placements_total{reason=\"failover\"}")
                && !l.ends_with(" 0")
        ),
        "{m}"
    );

    // freeze the leader: the follower takes the lease with a newer epoch and places streams
    scheds[leader].signal("STOP").await?;
    let v = poll_json(
        &http,
        &format!("{}/v1/leader", scheds[follower].url),
        "the follower leads",
        Duration::from_secs(10),
        |v| v["leading"] == true,
    )
    .await?;
    let epoch2 = v["epoch"].as_u64().context("epoch")?;
    ensure!(epoch2 > epoch1, "epoch {epoch1} → {epoch2}");
    let body = f
        .place(&scheds[follower].url, "s8", "live-audio-only")
        .await?;
    let s8_node = body["node"].as_str().context("node")?.to_string();
    f.until("s8 runs", Duration::from_secs(10), |m| m.contains_key("s8"))
        .await?;
    // every daemon learns the new epoch from its heartbeat answers (or a command)
    for d in f.daemons.values() {
        poll_json(
            &http,
            &format!("{}/v1/capacity", d.url),
            "the daemon follows the new epoch",
            Duration::from_secs(10),
            |v| v["fence_epoch"].as_u64().is_some_and(|e| e >= epoch2),
        )
        .await?;
    }
    // what a deposed leader would send: the daemons follow epoch2 now and refuse epoch1
    for (node, d) in &f.daemons {
        let r = http
            .put(format!("{}/v1/streams/zombie", d.url))
            .header(kiln_model::node::EPOCH_HEADER, epoch1.to_string())
            .json(&json!({"source": "test:", "preset": "live-audio-only"}))
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.text().await?;
        ensure!(
            status == 409 && body.contains("stale_epoch"),
            "{node} took a stale command: {status} {body}"
        );
        let r = http
            .delete(format!("{}/v1/streams/s8", d.url))
            .header(kiln_model::node::EPOCH_HEADER, epoch1.to_string())
            .send()
            .await?;
        ensure!(
            r.status() == 409,
            "{node}: stale DELETE answered {}",
            r.status()
        );
    }
    // the old leader wakes up: it must know it no longer leads, and send writes to the new one
    scheds[leader].signal("CONT").await?;
    poll_json(
        &http,
        &format!("{}/v1/leader", scheds[leader].url),
        "the old leader steps down",
        Duration::from_secs(10),
        |v| v["leading"] == false && v["leader"]["id"] == scheds[follower].name.as_str(),
    )
    .await?;
    let r = f
        .raw
        .post(format!("{}/v1/streams", scheds[leader].url))
        .json(&json!({"id": "s9", "source": "test:", "preset": "live-audio-only"}))
        .send()
        .await?;
    ensure!(r.status() == 307, "old leader answered {}", r.status());
    ensure!(r.headers()["location"]
        .to_str()?
        .starts_with(&scheds[follower].url));
    // every record runs exactly where it is placed, once, and stays so for two heartbeat intervals (the resumed
    // old leader has had its chances to act by then; every look asserts no stream runs twice)
    let matches = |records: &Value, running: &BTreeMap<String, String>| -> Result<(), String> {
        for r in records.as_array().into_iter().flatten() {
            let id = r["id"].as_str().unwrap_or_default();
            if r["phase"] != "placed" {
                return Err(format!("{r}"));
            }
            if running.get(id).map(String::as_str) != r["node"].as_str() {
                return Err(format!(
                    "{id}: record {} vs running {:?}",
                    r["node"],
                    running.get(id)
                ));
            }
        }
        Ok(())
    };
    let since = std::cell::Cell::new(None::<Instant>);
    let (running, records) = poll_until(
        "the records match the daemons for two heartbeat intervals",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let running = f.running().await?;
            let records = f
                .json(&format!("{}/v1/streams", scheds[leader].url))
                .await?;
            Ok(match matches(&records, &running) {
                Err(why) => {
                    since.set(None);
                    Polled::NotYet(why)
                }
                Ok(()) => {
                    let t0 = since.get().unwrap_or_else(Instant::now);
                    since.set(Some(t0));
                    if t0.elapsed() >= 2 * HEARTBEAT {
                        Polled::Done((running, records))
                    } else {
                        Polled::NotYet("matching, not yet for two intervals".into())
                    }
                }
            })
        },
    )
    .await?;
    ensure!(running.contains_key("s8") && running["s8"] == s8_node);
    ensure!(!running.contains_key("zombie"));

    // consolidation: spread two streams onto the other live node (drain flips), then let the leader empty it
    let new_leader = &scheds[follower].url;
    let other = f.daemons.keys().find(|n| **n != drained).unwrap().clone();
    for (node, on) in [(&drained, false), (&other, true)] {
        let r = if on {
            http.post(format!("{new_leader}/v1/nodes/{node}/drain"))
                .send()
                .await?
        } else {
            http.delete(format!("{new_leader}/v1/nodes/{node}/drain"))
                .send()
                .await?
        };
        ensure!(r.status() == 200, "drain flip {node}: {}", r.status());
    }
    for id in ["c1", "c2"] {
        let body = f.place(new_leader, id, "live-audio-only").await?;
        ensure!(
            body["node"] == drained.as_str(),
            "{id} went to {}",
            body["node"]
        );
    }
    let r = http
        .delete(format!("{new_leader}/v1/nodes/{other}/drain"))
        .send()
        .await?;
    ensure!(r.status() == 200);
    f.until("c1 and c2 run", Duration::from_secs(10), |m| {
        m.contains_key("c1") && m.contains_key("c2")
    })
    .await?;
    let moves: Value = http
        .post(format!("{new_leader}/v1/fleet/consolidate?max_moves=10"))
        .send()
        .await?
        .json()
        .await?;
    let moved: BTreeSet<&str> = moves["moves"]
        .as_array()
        .context("moves")?
        .iter()
        .filter_map(|m| m["stream"].as_str())
        .collect();
    ensure!(
        moved == BTreeSet::from(["c1", "c2"]),
        "consolidation moved {moves}"
    );
    let (running, _) = f
        .until(
            "the drained-then-filled node is empty",
            Duration::from_secs(10),
            |m| {
                m.get("c1") == Some(&other)
                    && m.get("c2") == Some(&other)
                    && !m.values().any(|n| *n == drained)
            },
        )
        .await?;
    ensure!(
        running.len() == records.as_array().unwrap().len() + 2,
        "{running:?}"
    );
    drop(redis);
    Ok(())
}

/// The store's contract, on the in-memory store and on a real Redis (Lua scripts): one lease holder at a time
/// with a new epoch per lease; writes under a stale epoch are refused; a booking that would over-commit a node or
/// one of its GPUs is refused atomically and leaves the counters as they were; removal gives the booking back.
/// With a fleet token (`--api-token-env` on both): heartbeats and the scheduler's commands carry it, and every
/// control route of either process refuses a request without it (401 with a Bearer challenge), while `/play`,
/// `/metrics` and `/healthz` stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_token_guards_every_control_route_and_the_fleet_still_works() -> Result<()> {
    const TOKEN: &str = "fleet-token-0123456789abcdef";
    let env = [("KILN_IT_FLEET_TOKEN", TOKEN)];
    let sched = scheduler("sched", &["--api-token-env", "KILN_IT_FLEET_TOKEN"], &env).await?;
    let data = std::env::temp_dir().join(format!("kiln-sched-token-{}", std::process::id()));
    let data = data.display().to_string();
    let node = node(
        "n1",
        &data,
        &sched.url,
        &["--api-token-env", "KILN_IT_FLEET_TOKEN"],
        &env,
    )
    .await?;
    let open = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse()?,
    );
    let authed = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(auth)
        .build()?;
    // the node's heartbeats get through: it is listed
    poll_json(
        &authed,
        &format!("{}/v1/nodes", sched.url),
        "n1 registers",
        Duration::from_secs(10),
        |nodes| nodes.to_string().contains("\"n1\""),
    )
    .await?;
    // a path no route serves (an id with a `/`) gets the JSON envelope, like every other error
    let res = authed
        .get(format!("{}/v1/streams/a/b", sched.url))
        .send()
        .await?;
    ensure!(res.status() == 404, "{}", res.status());
    let v: Value = res.json().await.context("a JSON 404")?;
    ensure!(v["error"]["code"] == "not_found", "{v}");
    // without the token (or with a wrong one) every control route of both processes answers 401
    let body = json!({"id": "t1", "source": "test:", "preset": "live-audio-only"});
    let refused = [
        open.get(format!("{}/v1/streams", sched.url)),
        open.post(format!("{}/v1/streams", sched.url)).json(&body),
        open.get(format!("{}/v1/nodes", sched.url)),
        open.post(format!("{}/v1/nodes/n1/drain", sched.url)),
        open.get(format!("{}/v1/fleet/headroom", sched.url)),
        open.post(format!("{}/v1/nodes/n9/heartbeat", sched.url))
            .json(&json!({})),
        open.get(format!("{}/v1/streams", node.url)),
        open.put(format!("{}/v1/streams/t9", node.url))
            .json(&json!({"source": "test:"})),
        open.get(format!("{}/v1/capacity", node.url)),
        open.get(format!("{}/v1/jobs", node.url)),
        open.get(format!("{}/v1/streams", node.url))
            .bearer_auth("fleet-token-0123456789abcdeX"),
    ];
    for rb in refused {
        let r = rb.build()?;
        let what = format!("{} {}", r.method(), r.url());
        let res = open.execute(r).await?;
        ensure!(res.status() == 401, "{what}: {}", res.status());
        ensure!(
            res.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("Bearer")),
            "{what}: no Bearer challenge"
        );
    }
    // with it, a placement reaches the daemon (the scheduler's PUT carried the token)
    let r = authed
        .post(format!("{}/v1/streams", sched.url))
        .json(&body)
        .send()
        .await?;
    ensure!(r.status() == 201, "POST with the token: {}", r.status());
    let running: Value = authed
        .get(format!("{}/v1/streams", node.url))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        running
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["id"] == "t1")),
        "t1 is not on the daemon: {running}"
    );
    // viewers, Prometheus and health checks need no token
    for url in [
        format!("{}/metrics", sched.url),
        format!("{}/healthz", sched.url),
        format!("{}/metrics", node.url),
        format!("{}/healthz", node.url),
    ] {
        let st = open.get(&url).send().await?.status();
        ensure!(st == 200, "{url}: {st}");
    }
    let st = open
        .get(format!("{}/play/t1/master.m3u8", sched.url))
        .send()
        .await?
        .status();
    ensure!(st == 302, "/play without a token: {st}");
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// A heartbeat document for node `id` at `url` with `cpu_millicores` of CPU, pricing every built-in preset at
/// 1 core: what a forger (or the headroom test's 40 synthetic nodes) sends.
fn heartbeat_doc(id: &str, url: &str, cpu_millicores: u64) -> Value {
    use kiln_model::capacity::Resources;
    use kiln_model::node::{CapacityReport, Heartbeat, HostReport, PresetDemand};
    let cap = Resources {
        cpu_millicores,
        memory_mib: cpu_millicores,
        ..Default::default()
    };
    let price = PresetDemand {
        cpu: Resources {
            cpu_millicores: 1000,
            memory_mib: 100,
            ..Default::default()
        },
        gpu: None,
        pixel_rate: 1,
    };
    let hb = Heartbeat {
        url: url.into(),
        capacity: CapacityReport {
            node_id: id.into(),
            epoch: 1,
            fence_epoch: 0,
            host: HostReport {
                capacity: cap,
                free: cap,
                ..Default::default()
            },
            gpus: vec![],
            gpu_inventory: Default::default(),
            streams: vec![],
            headroom: Default::default(),
            demands: kiln_config::Presets::builtin()
                .names()
                .map(|n| (n.to_string(), price))
                .collect(),
            vod: None,
            draining: false,
        },
    };
    serde_json::to_value(hb).expect("a heartbeat serialises")
}

/// Nodes join only when admitted. A scheduler with a fleet token and a join token, and a real daemon that joins
/// with the join token:
/// - a forged heartbeat without the token, for a new node `evil` at the cloud metadata address or re-pointing
///   the real node, gets 401 (envelope and Bearer challenge) and changes nothing;
/// - with the join token, an advertised URL at the metadata address (or loopback on a scheduler without
///   `--node-networks`) gets 422 `node_url_refused` naming `--node-networks`, and nothing is stored;
/// - the join token opens no control route;
/// - a stream is placed on the real node and `/play` sends viewers there, after all the forgeries;
/// - a scheduler started with no token and no `--open-fleet` admits nobody (403 `fleet_closed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_only_with_the_join_token_at_an_allowed_address() -> Result<()> {
    const FLEET: &str = "fleet-token-0123456789abcdef";
    let env = [("KILN_IT_FLEET_TOKEN", FLEET), NODE_TOKEN_ENV];
    let tokens = [
        "--api-token-env",
        "KILN_IT_FLEET_TOKEN",
        "--node-token-env",
        NODE_TOKEN_ENV.0,
    ];
    let sched = scheduler("sched", &tokens, &env).await?;
    let data = std::env::temp_dir().join(format!("kiln-sched-join-{}", std::process::id()));
    let data = data.display().to_string();
    let n1 = node("n1", &data, &sched.url, &tokens, &env).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let nodes_url = format!("{}/v1/nodes", sched.url);
    let listed = || async {
        let v: Value = http
            .get(&nodes_url)
            .bearer_auth(FLEET)
            .send()
            .await?
            .json()
            .await?;
        let pairs: Vec<(String, String)> = v
            .as_array()
            .context("nodes")?
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap_or_default().to_string(),
                    n["url"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        anyhow::Ok(pairs)
    };
    poll_until(
        "n1 joins with the join token",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let l = listed().await?;
            Ok(if l == [("n1".to_string(), n1.url.clone())] {
                Polled::Done(())
            } else {
                Polled::NotYet(format!("{l:?}"))
            })
        },
    )
    .await?;
    let beat = |id: &str, url: &str, token: Option<&str>| {
        let rb = http
            .post(format!("{}/v1/nodes/{id}/heartbeat", sched.url))
            .json(&heartbeat_doc(id, url, 8000));
        match token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
        .send()
    };
    let refused = |r: reqwest::Response, status: u16, code: &'static str| async move {
        let got = r.status().as_u16();
        let challenge = r.headers().get("www-authenticate").cloned();
        let v: Value = r.json().await.context("a JSON envelope")?;
        ensure!(got == status && v["error"]["code"] == code, "{got} {v}");
        if status == 401 {
            ensure!(challenge.is_some(), "401 without a Bearer challenge");
        }
        anyhow::Ok(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    // no token: a new node at the metadata address, or the real node re-pointed, are both refused
    refused(
        beat("evil", "http://169.254.169.254", None).await?,
        401,
        "unauthorized",
    )
    .await?;
    let m = refused(
        beat("n1", "http://10.9.9.9:8080", None).await?,
        401,
        "unauthorized",
    )
    .await?;
    ensure!(m.contains("--node-token-env"), "{m}");
    refused(
        beat(
            "n1",
            "http://10.9.9.9:8080",
            Some("node-join-token-0123456780"),
        )
        .await?,
        401,
        "unauthorized",
    )
    .await?;
    // the token, but an address nobody may be sent to
    for url in [
        "http://169.254.169.254",
        "http://[::ffff:169.254.169.254]:80",
    ] {
        let m = refused(
            beat("evil", url, Some(NODE_TOKEN)).await?,
            422,
            "node_url_refused",
        )
        .await?;
        ensure!(
            m.contains("link-local") && m.contains("--node-networks"),
            "{url}: {m}"
        );
    }
    // the join token opens no control route
    let r = http
        .post(format!("{}/v1/streams", sched.url))
        .bearer_auth(NODE_TOKEN)
        .json(&json!({"id": "t1", "source": "test:", "preset": "live-audio-only"}))
        .send()
        .await?;
    ensure!(
        r.status() == 401,
        "POST /v1/streams with the join token: {}",
        r.status()
    );
    ensure!(
        listed().await? == [("n1".to_string(), n1.url.clone())],
        "a forged heartbeat changed the fleet: {:?}",
        listed().await?
    );
    // placement and playback go to the real node
    let r = http
        .post(format!("{}/v1/streams", sched.url))
        .bearer_auth(FLEET)
        .json(&json!({"id": "t1", "source": "test:", "preset": "live-audio-only"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "placing t1: {}", r.status());
    let r = http
        .get(format!("{}/play/t1/master.m3u8", sched.url))
        .send()
        .await?;
    let loc = r
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .unwrap_or_default();
    ensure!(
        r.status() == 302 && loc == format!("{}/live/t1/master.m3u8", n1.url),
        "/play: {} {loc}",
        r.status()
    );
    // no token and no --open-fleet: a scheduler admits nobody; without --node-networks loopback is refused
    let closed = Proc::spawn(
        "closed",
        SCHEDULER,
        &["--listen", "127.0.0.1:0", "--heartbeat-ms", HEARTBEAT_MS],
        "listening on",
    )
    .await?;
    let r = http
        .post(format!("{}/v1/nodes/n1/heartbeat", closed.url))
        .json(&heartbeat_doc("n1", "http://10.0.0.1:8080", 8000))
        .send()
        .await?;
    let m = refused(r, 403, "fleet_closed").await?;
    ensure!(
        m.contains("--open-fleet") && m.contains("--node-token-env"),
        "{m}"
    );
    let strict = Proc::spawn_env(
        "strict",
        SCHEDULER,
        &[
            "--listen",
            "127.0.0.1:0",
            "--node-token-env",
            NODE_TOKEN_ENV.0,
        ],
        &[NODE_TOKEN_ENV],
        "listening on",
    )
    .await?;
    let r = http
        .post(format!("{}/v1/nodes/n1/heartbeat", strict.url))
        .bearer_auth(NODE_TOKEN)
        .json(&heartbeat_doc("n1", &n1.url, 8000))
        .send()
        .await?;
    let m = refused(r, 422, "node_url_refused").await?;
    ensure!(
        m.contains("loopback") && m.contains("--node-networks"),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

/// `GET /v1/fleet/headroom` over 40 nodes with room for more than the 100,000 streams it counts per preset (what
/// took the old stream-by-stream fill 4–6 s per call, on the threads that answer heartbeats): four calls at a
/// time, with every node's heartbeat in flight beside them, round after round for more than a heartbeat TTL
/// (3 intervals). Every heartbeat is answered and every headroom answer sees all 40 nodes alive and the full
/// count: a call that held the workers for a TTL would show dead nodes (the reported `alive: 0, dead: 43`), and
/// one that took longer than the client's timeout would fail outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headroom_over_forty_nodes_is_cheap_and_never_starves_heartbeats() -> Result<()> {
    const NODES: usize = 40;
    let sched = scheduler("sched", &["--open-fleet"], &[]).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let docs: Vec<(String, Value)> = (0..NODES)
        .map(|i| {
            let id = format!("h{i:02}");
            let url = format!("http://10.0.{}.{}:8080", i / 200, 1 + i % 200);
            // 10^9 millicores: a million streams of every preset per node
            (id.clone(), heartbeat_doc(&id, &url, 1_000_000_000))
        })
        .collect();
    let heartbeats = || {
        futures_util::future::join_all(docs.iter().map(|(id, doc)| {
            let http = http.clone();
            let url = format!("{}/v1/nodes/{id}/heartbeat", sched.url);
            async move {
                let r = http.post(url).json(doc).send().await?;
                ensure!(r.status() == 200, "heartbeat {id}: {}", r.status());
                anyhow::Ok(())
            }
        }))
    };
    for r in heartbeats().await {
        r?;
    }
    let presets = kiln_config::Presets::builtin().names().count();
    let headroom = || async {
        let v: Value = http
            .get(format!("{}/v1/fleet/headroom", sched.url))
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(v)
    };
    // more than a heartbeat TTL (3 intervals) of rounds, each a heartbeat from every node beside 4 headroom calls
    let rounds = 3 * HEARTBEAT.as_millis() as usize / 250 + 4;
    for round in 0..rounds {
        let (beats, answers) = tokio::join!(
            heartbeats(),
            futures_util::future::join_all((0..4).map(|_| headroom()))
        );
        for b in beats {
            b.with_context(|| format!("round {round}"))?;
        }
        for a in answers {
            let v = a.with_context(|| format!("round {round}: headroom"))?;
            ensure!(
                v["nodes"]["alive"] == NODES && v["nodes"]["dead"] == 0,
                "round {round}: {}",
                v["nodes"]
            );
            let full = v["presets"]
                .as_object()
                .context("presets")?
                .values()
                .filter(|p| p["streams"] == 100_000)
                .count();
            ensure!(full == presets, "round {round}: {}", v["presets"]);
        }
        // pacing, not a measurement: the rounds span several heartbeat TTLs
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// VOD jobs through the scheduler: two daemons with one job slot each; two jobs go to different nodes (the first
/// one's queue counts before its next heartbeat), each is followed to `done` through the scheduler, `/vod/…`
/// redirects to the node holding the outputs, and a purge through the scheduler forgets the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vod_jobs_are_routed_to_the_shortest_queue_and_followed() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kiln-sched-vod-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("in"))?;
    let clip = dir.join("in/clip.mp4");
    make_clip(
        &clip,
        3.0,
        Some("testsrc2=size=640x360:rate=30"),
        &[],
        &[
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        ],
    )
    .await?;
    // a trusted network: any node joins without a token
    let sched = scheduler("sched", &["--open-fleet"], &[]).await?;
    let input_dir = dir.join("in").display().to_string();
    let mut nodes = Vec::new();
    for n in ["v1", "v2"] {
        let data = dir.join(n).display().to_string();
        let args = ["--vod-input-dir", &input_dir, "--vod-concurrency", "1"];
        nodes.push(node(n, &data, &sched.url, &args, &[]).await?);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    poll_json(
        &http,
        &format!("{}/v1/nodes", sched.url),
        "v1 and v2 register",
        Duration::from_secs(10),
        |v| {
            let listed = v.to_string();
            listed.contains("\"v1\"") && listed.contains("\"v2\"")
        },
    )
    .await?;
    let body = json!({"input": format!("file://{}", clip.display()), "x264_speed": "veryfast"});
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let r = http
            .post(format!("{}/v1/jobs", sched.url))
            .json(&body)
            .send()
            .await?;
        ensure!(r.status() == 201, "submit: {}", r.status());
        let v: Value = r.json().await?;
        jobs.push((
            v["id"].as_str().context("id")?.to_string(),
            v["node"].as_str().context("node")?.to_string(),
        ));
    }
    ensure!(
        jobs[0].1 != jobs[1].1,
        "both jobs went to one node: {jobs:?}"
    );
    let r = http
        .post(format!("{}/v1/jobs", sched.url))
        .json(&json!({"inputt": "x"}))
        .send()
        .await?;
    ensure!(r.status() == 400, "malformed: {}", r.status());
    let r = http
        .get(format!("{}/v1/jobs/jnope", sched.url))
        .send()
        .await?;
    ensure!(r.status() == 404, "unknown job: {}", r.status());
    for (id, node) in &jobs {
        let st = wait_job(&http, &sched.url, id, Duration::from_secs(90)).await?;
        ensure!(st["state"] == "done" && st["node"] == node.as_str(), "{st}");
        let node_url = &nodes[if node == "v1" { 0 } else { 1 }].url;
        let r = http
            .get(format!("{}/vod/{id}/master.m3u8", sched.url))
            .send()
            .await?;
        let loc = r
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .unwrap_or_default()
            .to_string();
        ensure!(
            r.status() == 302 && loc == format!("{node_url}/vod/{id}/master.m3u8"),
            "/vod redirect: {} {loc}",
            r.status()
        );
        let text = http.get(&loc).send().await?.text().await?;
        ensure!(text.starts_with("#EXTM3U"), "{text}");
    }
    let (id, _) = &jobs[0];
    let r = http
        .delete(format!("{}/v1/jobs/{id}?purge=true", sched.url))
        .send()
        .await?;
    ensure!(r.status() == 204, "purge: {}", r.status());
    let r = http
        .get(format!("{}/v1/jobs/{id}", sched.url))
        .send()
        .await?;
    ensure!(r.status() == 404, "a purged job: {}", r.status());
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_leases_fences_and_books_atomically_in_memory_and_in_redis() -> Result<()> {
    use kiln_binpack::Demand;
    use kiln_model::capacity::Resources;
    use kiln_scheduler::store::{
        BinCaps, LeaderInfo, Phase, RedisTarget, Store, StoreError, StreamRecord,
    };

    let redis = redis_server().await?;
    let ttl = Duration::from_millis(600);
    let cpu = |mc: u64| Resources {
        cpu_millicores: mc,
        memory_mib: 10,
        ..Default::default()
    };
    let gpu = Resources {
        nvenc_fps: 100,
        vram_mib: 1000,
        ..Default::default()
    };
    // one GPU: the node is its host and that GPU
    let caps = BinCaps {
        node: Resources {
            memory_mib: 1000,
            ..cpu(1000)
        }
        .plus(&gpu),
        gpu: Some(gpu),
    };
    let rec_on = |id: &str, node: &str, gpu: usize, mc: u64, nvenc: u64| StreamRecord {
        id: id.into(),
        request: kiln_model::StreamRequest {
            source: "test:".into(),
            ..Default::default()
        },
        phase: Phase::Placed,
        node: Some(node.into()),
        gpu: (nvenc > 0).then_some(gpu),
        demand: Some(Demand {
            host: cpu(mc),
            gpu: (nvenc > 0).then_some(Resources {
                nvenc_fps: nvenc,
                vram_mib: 100,
                ..Default::default()
            }),
            pixel_rate: 0,
        }),
        alternatives: vec![],
        epoch: 0,
        created_unix_ms: 0,
        placed_unix_ms: 0,
        moves: 0,
        handover_from: None,
    };
    let rec = |id: &str, mc: u64, nvenc: u64| rec_on(id, "n1", 0, mc, nvenc);
    for (name, a, b) in [
        ("memory", Store::memory(7), None),
        (
            "redis",
            Store::redis(&redis.url).await?,
            Some(Store::redis(&redis.url).await?),
        ),
    ] {
        // VOD job routes: stored, read back (by another connection on Redis), forgotten
        a.put_job("j1", "n2").await?;
        let reader = b.as_ref().unwrap_or(&a);
        ensure!(
            reader.job_node("j1").await? == Some("n2".into()),
            "{name}: job route"
        );
        a.remove_job("j1").await?;
        ensure!(
            reader.job_node("j1").await?.is_none(),
            "{name}: job route kept"
        );
        let e1 = a.lead("a", "http://a", ttl, 0).await?.context("a leads")?;
        if let Some(b) = &b {
            ensure!(
                b.lead("b", "http://b", ttl, 0).await?.is_none(),
                "{name}: two leaders"
            );
            // another process given the same id (two hosts on the default id, the advertise URL) is another
            // holder: it neither renews a's lease nor shares its epoch
            let same_id = Store::redis(&redis.url).await?;
            ensure!(
                same_id.lead("a", "http://a", ttl, 0).await?.is_none(),
                "{name}: a second process with a's id took a's lease"
            );
            let shown = LeaderInfo {
                id: "a".into(),
                url: "http://a".into(),
                epoch: 0,
            };
            ensure!(
                b.leader(&shown)
                    .await?
                    .is_some_and(|l| l.id == "a" && l.epoch == e1),
                "{name}: the leader is shown by its id"
            );
            // a record this binary cannot read (a newer scheduler's, in a rolling upgrade) is left out of the
            // reads, not a failure of every one of them
            let mut raw = redis::Client::open(redis.url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("HSET")
                .arg("kiln:streams")
                .arg("unreadable")
                .arg(r#"{"id": "unreadable", "from_the_future": true"#)
                .query_async::<()>(&mut raw)
                .await?;
            let listed = b
                .streams()
                .await
                .context("one unreadable record fails every read")?;
            ensure!(listed.iter().all(|r| r.id != "unreadable"), "{listed:?}");
            redis::cmd("HDEL")
                .arg("kiln:streams")
                .arg("unreadable")
                .query_async::<()>(&mut raw)
                .await?;
            ensure!(
                a.lead("a", "http://a", ttl, 0).await? == Some(e1),
                "{name}: renewal changed the epoch"
            );
        }
        a.save(e1, &rec("s1", 600, 60), Some(caps)).await?;
        // 600 + 500 mc > 1000: refused, nothing booked
        match a.save(e1, &rec("s2", 500, 10), Some(caps)).await {
            Err(StoreError::Full(why)) => ensure!(why.contains("cpu_millicores"), "{name}: {why}"),
            other => bail!("{name}: over-commit accepted: {other:?}"),
        }
        // fits the node but not the GPU (60 + 50 > 100 fps)
        match a.save(e1, &rec("s3", 100, 50), Some(caps)).await {
            Err(StoreError::Full(why)) => ensure!(why.contains("nvenc_fps"), "{name}: {why}"),
            other => bail!("{name}: GPU over-commit accepted: {other:?}"),
        }
        ensure!(
            a.booked("n1").await?.cpu_millicores == 600,
            "{name}: {:?}",
            a.booked("n1").await?
        );
        // a node with two GPUs: its counter adds up both, and is checked against both, so the second GPU
        // takes a full GPU's worth of its own; each GPU is still checked on its own
        let two = BinCaps {
            node: caps.node.plus(&gpu),
            gpu: Some(gpu),
        };
        a.save(e1, &rec_on("g0", "n2", 0, 10, 90), Some(two))
            .await?;
        a.save(e1, &rec_on("g1", "n2", 1, 10, 90), Some(two))
            .await
            .with_context(|| format!("{name}: the second GPU refused while it is empty"))?;
        match a.save(e1, &rec_on("g2", "n2", 0, 10, 20), Some(two)).await {
            Err(StoreError::Full(why)) => {
                ensure!(why.contains("gpu nvenc_fps"), "{name}: {why}")
            }
            other => bail!("{name}: GPU 0 over-committed: {other:?}"),
        }
        ensure!(
            a.booked("n2").await?.nvenc_fps == 180,
            "{name}: {:?}",
            a.booked("n2").await?
        );
        a.remove(e1, "g0").await?;
        a.remove(e1, "g1").await?;
        ensure!(
            a.booked("n2").await? == Resources::default(),
            "{name}: the two GPUs' bookings not given back"
        );
        // re-saving the same stream replaces its booking instead of adding to it
        a.save(e1, &rec("s1", 700, 60), Some(caps)).await?;
        ensure!(
            a.booked("n1").await?.cpu_millicores == 700,
            "{name}: re-save double-booked"
        );
        ensure!(
            a.stream("s2").await?.is_none(),
            "{name}: refused record stored"
        );
        if let Some(b) = &b {
            // the lease expires (not before its TTL); b takes it with a newer epoch, and a's writes are fenced
            let e2 = poll_until(
                "b leads once a's lease expires",
                ttl * 5,
                Duration::from_millis(50),
                || async {
                    Ok(match b.lead("b", "http://b", ttl, 0).await? {
                        Some(e) => Polled::Done(e),
                        None => Polled::NotYet("a's lease holds".into()),
                    })
                },
            )
            .await?;
            ensure!(e2 > e1, "{name}: epoch {e1} → {e2}");
            ensure!(
                a.lead("a", "http://a", ttl, 0).await?.is_none(),
                "{name}: a still leads"
            );
            match a.save(e1, &rec("s4", 10, 0), Some(caps)).await {
                Err(StoreError::Fenced(_)) => {}
                other => bail!("{name}: stale write accepted: {other:?}"),
            }
            ensure!(
                matches!(a.remove(e1, "s1").await, Err(StoreError::Fenced(_))),
                "{name}: stale remove"
            );
            b.remove(e2, "s1").await?;
            // the floor (the highest epoch a daemon reported) outranks a counter that fell behind it (a promoted
            // replica that missed increments): the holder takes a new epoch above it (and at least the wall clock
            // in ms), and keeps it on renewal
            let now = kiln_scheduler::unix_ms();
            let e3 = b
                .lead("b", "http://b", ttl, e2 + 10)
                .await?
                .context("b leads")?;
            ensure!(
                e3 > e2 + 10 && e3 >= now,
                "{name}: floor {} → {e3}",
                e2 + 10
            );
            ensure!(
                b.lead("b", "http://b", ttl, e3).await? == Some(e3),
                "{name}: renewal at the floor changed the epoch"
            );
            ensure!(
                b.save(e3, &rec("s5", 10, 0), None).await.is_ok()
                    && b.remove(e3, "s5").await.is_ok(),
                "{name}: writes under the raised epoch"
            );
        } else {
            ensure!(
                matches!(
                    a.save(e1 - 1, &rec("s4", 10, 0), None).await,
                    Err(StoreError::Fenced(_))
                ),
                "{name}"
            );
            a.remove(e1, "s1").await?;
        }
        ensure!(
            a.booked("n1").await? == Resources::default(),
            "{name}: booking not given back"
        );
        ensure!(a.streams().await?.is_empty(), "{name}");
    }
    // a failover that lost an increment no daemon has seen yet (the promoted replica is an empty Redis here):
    // the next lease's epoch still differs from, and exceeds, the one used on the lost master
    let lost = redis_server().await?;
    let on_lost = Store::redis(&lost.url).await?;
    let fresh = redis_server().await?;
    let promoted = Store::redis(&fresh.url).await?;
    let used = on_lost
        .lead("a", "http://a", ttl, 0)
        .await?
        .context("a leads")?;
    // a lease on a promoted replica comes a failover (seconds) later; here, at least the next millisecond
    while kiln_scheduler::unix_ms() <= used {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let next = promoted
        .lead("b", "http://b", ttl, 0)
        .await?
        .context("b leads")?;
    ensure!(
        next > used,
        "the lost master's epoch {used}, the promoted one's {next}"
    );
    drop(lost);

    // a lease that must reach a replica (WAIT) does not count on a Redis without one. WAIT is given 0.6 of the
    // timeout and its answer the rest: on a loaded host 80 ms of that (a 200 ms timeout) was not always enough for
    // the answer (seen: "Redis(timed out)" in CI), so these stores have the margin the Sentinel test gives its own.
    let lonely = Store::redis_at(RedisTarget {
        min_replicas: 1,
        timeout: Duration::from_millis(1500),
        ..RedisTarget::single(&redis.url)
    })
    .await?;
    let lonely = &lonely;
    poll_until(
        "b's lease expires",
        ttl * 5,
        Duration::from_millis(50),
        || async move {
            match lonely.lead("c", "http://c", ttl, 0).await {
                Ok(None) => Ok(Polled::NotYet("b's lease holds".into())),
                Err(StoreError::NotReplicated {
                    acked: 0,
                    wanted: 1,
                }) => Ok(Polled::Done(())),
                other => bail!("a lease no replica acknowledged counted: {other:?}"),
            }
        },
    )
    .await?;
    // with a replica it counts; with that replica frozen (connected, silent) it does not
    let master = redis_server().await?;
    let port = master.url.rsplit(':').next().context("port")?.to_string();
    let replica = redis_on(free_port()?, &["--replicaof", "127.0.0.1", &port]).await?;
    let replicated = Store::redis_at(RedisTarget {
        min_replicas: 1,
        timeout: Duration::from_millis(1500),
        ..RedisTarget::single(&master.url)
    })
    .await?;
    let replicated = &replicated;
    poll_until(
        "the replica acknowledges the lease",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move {
            Ok(match replicated.lead("d", "http://d", ttl * 10, 0).await {
                Ok(Some(e)) => Polled::Done(e),
                other => Polled::NotYet(format!("{other:?}")),
            })
        },
    )
    .await?;
    replica.signal("STOP").await?;
    let frozen = replicated.lead("d", "http://d", ttl * 10, 0).await;
    replica.signal("CONT").await?;
    ensure!(
        matches!(
            frozen,
            Err(StoreError::NotReplicated {
                acked: 0,
                wanted: 1
            })
        ),
        "a renewal no replica acknowledged counted: {frozen:?}"
    );
    Ok(())
}

/// Redis as an operator runs it for several schedulers, on loopback: a master, two replicas and three Sentinels
/// watching the master named `kiln` (quorum 2, down after 1 s).
struct RedisHa {
    dir: tempfile::TempDir,
    /// Port → the server, `None` while killed.
    servers: BTreeMap<u16, Option<Proc>>,
    sentinels: Vec<Proc>,
}

impl RedisHa {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ports = [free_port()?, free_port()?, free_port()?];
        let master = ports[0].to_string();
        let mut servers = BTreeMap::new();
        servers.insert(ports[0], Some(redis_on(ports[0], &[]).await?));
        for p in &ports[1..] {
            let r = redis_on(*p, &["--replicaof", "127.0.0.1", &master]).await?;
            servers.insert(*p, Some(r));
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(redis_sentinel(free_port()?, "kiln", ports[0], dir.path()).await?);
        }
        let ha = Self {
            dir,
            servers,
            sentinels,
        };
        ha.settled(Some(ports[0])).await?;
        Ok(ha)
    }

    /// `--redis-sentinel`'s value.
    fn sentinel_list(&self) -> String {
        let urls: Vec<&str> = self.sentinels.iter().map(|s| s.url.as_str()).collect();
        urls.join(",")
    }

    /// The master's port as the first Sentinel that answers names it.
    async fn master(&self) -> Result<u16> {
        let mut last = None;
        for s in &self.sentinels {
            let q = async {
                let mut c = redis::Client::open(format!("redis://{}", s.url))?
                    .get_multiplexed_async_connection()
                    .await?;
                let (_, port): (String, u16) = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg("kiln")
                    .query_async(&mut c)
                    .await?;
                Ok::<_, anyhow::Error>(port)
            };
            match tokio::time::timeout(Duration::from_secs(1), q).await {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(anyhow::anyhow!("{} did not answer", s.url)),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no sentinel")))
    }

    /// `INFO replication` of the server on `port`.
    async fn replication(port: u16) -> Result<String> {
        let q = async {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
                .get_multiplexed_async_connection()
                .await?;
            Ok::<String, anyhow::Error>(
                redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await?,
            )
        };
        tokio::time::timeout(Duration::from_secs(1), q)
            .await
            .context("INFO timed out")?
    }

    /// Waits until the Sentinels name `master` (any master, when `None`: a loaded host may see a failover of its
    /// own), which replicates to every other running server, all in sync. Answers the master.
    async fn settled(&self, master: Option<u16>) -> Result<u16> {
        let replicas = self.servers.values().filter(|s| s.is_some()).count() - 1;
        poll_until(
            "Redis settles: Sentinel names the master, every replica online",
            Duration::from_secs(45),
            Duration::from_millis(200),
            || async move {
                let named = self.master().await?;
                let info = Self::replication(named).await?;
                let online = info
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                    .count();
                let expected = master.is_none_or(|m| m == named);
                Ok(
                    if expected && info.contains("role:master") && online == replicas {
                        Polled::Done(named)
                    } else {
                        Polled::NotYet(format!("Sentinel names {named}: {info}"))
                    },
                )
            },
        )
        .await
    }

    /// `kill -9` of the server on `port`.
    async fn kill(&mut self, port: u16) -> Result<()> {
        let mut p = self
            .servers
            .get_mut(&port)
            .and_then(Option::take)
            .context("running")?;
        p.kill().await
    }

    /// Starts the server on `port` again (empty, as without persistence) replicating from `master`.
    async fn rejoin(&mut self, port: u16, master: u16) -> Result<()> {
        let m = master.to_string();
        let r = redis_on(port, &["--replicaof", "127.0.0.1", &m]).await?;
        self.servers.insert(port, Some(r));
        Ok(())
    }

    /// Sends `sig` to every running server (STOP: Redis is down for everyone, CONT: back).
    async fn signal_all(&self, sig: &str) -> Result<()> {
        for s in self.servers.values().flatten() {
            s.signal(sig).await?;
        }
        Ok(())
    }
}

/// Who leads as a scheduler that answers says: (id, epoch).
async fn leader_of(http: &reqwest::Client, scheds: &[&str]) -> Result<(String, u64)> {
    let v = poll_until(
        "a scheduler names a leader",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async move {
            for s in scheds {
                let Ok(r) = http.get(format!("{s}/v1/leader")).send().await else {
                    continue;
                };
                let v: Value = r.json().await?;
                if let (Some(id), Some(e)) =
                    (v["leader"]["id"].as_str(), v["leader"]["epoch"].as_u64())
                {
                    return Ok(Polled::Done((id.to_string(), e)));
                }
            }
            Ok(Polled::NotYet("no leader".into()))
        },
    )
    .await?;
    Ok(v)
}

/// `POST /v1/streams` until it places the stream (201, or 200 when an earlier try placed it but its answer was a
/// 503), checking at every try that no stream runs twice. Says which refusals it met on the way.
async fn place_when_possible(
    f: &Fleet,
    sched: &str,
    id: &str,
    limit: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    let seen = parking_lot::Mutex::new(BTreeSet::new());
    let seen_ref = &seen;
    poll_until(
        &format!("{id} is placed"),
        limit,
        Duration::from_millis(200),
        || async move {
            f.running().await?;
            // a follower redirects to the leader, which may be the one frozen: no answer is a refusal too
            let r = f
                .http
                .post(format!("{sched}/v1/streams"))
                .json(&json!({"id": id, "source": "test:", "preset": "live-audio-only"}))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) if e.is_timeout() => {
                    seen_ref
                        .lock()
                        .insert("no answer (the frozen leader)".into());
                    return Ok(Polled::NotYet(format!("{e}")));
                }
                Err(e) => return Err(e.into()),
            };
            let status = r.status().as_u16();
            let body: Value = r.json().await?;
            Ok(match status {
                200 | 201 => Polled::Done(()),
                503 => {
                    seen_ref.lock().insert(body["error"]["code"].to_string());
                    Polled::NotYet(format!("{status} {body}"))
                }
                _ => bail!("placing {id}: {status} {body}"),
            })
        },
    )
    .await?;
    eprintln!(
        "{id} placed after {:?}; refusals on the way: {:?}",
        t.elapsed(),
        seen.lock()
    );
    Ok(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failovers_keep_fencing_and_a_redis_outage_refuses_only_new_placements(
) -> Result<()> {
    let mut ha = RedisHa::start().await?;
    let sentinels = ha.sentinel_list();
    let join = ["--node-token-env", NODE_TOKEN_ENV.0];
    let mut scheds = Vec::new();
    for name in ["sched-a", "sched-b"] {
        let args = [
            "--redis-sentinel",
            &sentinels,
            "--redis-master",
            "kiln",
            // a loaded 2-core host can keep a replica off the CPU for a few hundred ms: WAIT gets 0.6 × this
            "--redis-timeout-ms",
            "1500",
            "--instance-id",
            name,
            join[0],
            join[1],
        ];
        scheds.push(scheduler(name, &args, &[NODE_TOKEN_ENV]).await?);
    }
    let urls: Vec<String> = scheds.iter().map(|s| s.url.clone()).collect();
    let all_scheds = urls.join(",");
    let mut daemons = BTreeMap::new();
    for n in ["n1", "n2", "n3"] {
        let data = ha.dir.path().join(n).display().to_string();
        daemons.insert(
            n.to_string(),
            node(n, &data, &all_scheds, &join, &[NODE_TOKEN_ENV]).await?,
        );
    }
    let client = || reqwest::Client::builder().timeout(Duration::from_secs(10));
    let f = Fleet {
        http: client().build()?,
        raw: client()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        daemons,
    };
    let http = f.http.clone();
    let lease = HEARTBEAT * 3;
    poll_json(
        &http,
        &format!("{}/v1/nodes", urls[0]),
        "three live nodes",
        Duration::from_secs(15),
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().filter(|n| n["state"] == "alive").count() == 3)
        },
    )
    .await?;
    let mut ids: Vec<String> = Vec::new();
    for i in 1..=3 {
        let id = format!("s{i}");
        place_when_possible(&f, &urls[0], &id, Duration::from_secs(15)).await?;
        ids.push(id);
    }

    // three failovers of the master (kill -9), the second with the leader frozen too, so that a new leader takes
    // its epoch on a promoted replica: the case asynchronous replication could break
    let mut holders: BTreeMap<u64, String> = BTreeMap::new();
    for round in 0..3 {
        let names: Vec<&str> = urls.iter().map(String::as_str).collect();
        let (was, epoch0) = leader_of(&http, &names).await?;
        let frozen = (round == 1).then(|| usize::from(was == "sched-b"));
        if let Some(i) = frozen {
            scheds[i].signal("STOP").await?;
        }
        let live = &urls[frozen.map_or(0, |i| 1 - i)];
        let old = ha.master().await?;
        let t0 = Instant::now();
        ha.kill(old).await?;
        let ha_ref = &ha;
        let new = poll_until(
            "Sentinel promotes a replica",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async move {
                let m = ha_ref.master().await?;
                Ok(if m != old {
                    Polled::Done(m)
                } else {
                    Polled::NotYet(format!("master {m}"))
                })
            },
        )
        .await?;
        let switched = t0.elapsed();
        let id = format!("f{round}");
        place_when_possible(&f, live, &id, Duration::from_secs(30)).await?;
        let placed = t0.elapsed();
        eprintln!("round {round}: Sentinel switched {old} → {new} after {switched:?}; placed again after {placed:?}");
        ids.push(id);
        // the schedulers follow within an interval of the switch; a new leader waits out the old lease
        ensure!(
            placed <= switched + lease + HEARTBEAT * 2,
            "round {round}: Sentinel switched after {switched:?}, the fleet placed again after {placed:?}"
        );
        let ids_ref = &ids;
        f.until("every stream runs, once", Duration::from_secs(15), |m| {
            ids_ref.iter().all(|i| m.contains_key(i))
        })
        .await?;
        let live_names = [live.as_str()];
        let (now, epoch1) = leader_of(&http, &live_names).await?;
        ensure!(epoch1 >= epoch0, "round {round}: epoch {epoch0} → {epoch1}");
        if now != was {
            ensure!(
                epoch1 > epoch0,
                "round {round}: {was}@{epoch0} → {now}@{epoch1}"
            );
        }
        eprintln!("round {round}: leader {was}@{epoch0} → {now}@{epoch1}");
        if let Some(other) = holders.insert(epoch1, now.clone()) {
            ensure!(other == now, "epoch {epoch1} held by {other} and {now}");
        }
        // every daemon follows the leader's epoch (heartbeat answers raise its fence), never a lower one
        for d in f.daemons.values() {
            poll_json(
                &http,
                &format!("{}/v1/capacity", d.url),
                "the daemon follows the leader's epoch",
                Duration::from_secs(10),
                |v| v["fence_epoch"].as_u64() == Some(epoch1),
            )
            .await?;
        }
        if let Some(i) = frozen {
            ensure!(now != was, "round {round}: the frozen {was} still leads");
            scheds[i].signal("CONT").await?;
            poll_json(
                &http,
                &format!("{}/v1/leader", urls[i]),
                "the thawed leader steps down",
                Duration::from_secs(10),
                |v| v["leading"] == false && v["leader"]["id"] == now.as_str(),
            )
            .await?;
        }
        ha.rejoin(old, new).await?;
        ha.settled(None).await?;
    }
    let m = f.json(&format!("{}/metrics", urls[0])).await.err();
    ensure!(m.is_some(), "metrics is text, not JSON");
    let metrics = http
        .get(format!("{}/metrics", urls[0]))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        metrics.lines().any(
            |l| l.starts_with("kiln_scheduler_redis_master_changes_total ") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );

    // Redis down for everyone for 10 s (every server frozen: no answers, not even refusals)
    let placement: BTreeMap<String, String> = f.running().await?;
    ha.signal_all("STOP").await?;
    let down = Instant::now();
    let r = poll_until(
        "placements are refused with the store's reason",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let r = f.post(&urls[0], "r1", "live-audio-only").await?;
            let status = r.status().as_u16();
            let body: Value = r.json().await?;
            Ok(
                if status == 503 && body["error"]["code"] == "store_unavailable" {
                    Polled::Done(body)
                } else {
                    Polled::NotYet(format!("{status} {body}"))
                },
            )
        },
    )
    .await?;
    ensure!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("running streams are not affected")),
        "{r}"
    );
    // while it is down: the same streams run on the same daemons, and /play still sends viewers to them
    while down.elapsed() < Duration::from_secs(10) {
        let now = f.running().await?;
        ensure!(
            now == placement,
            "during the outage: {now:?}, before: {placement:?}"
        );
        let loc = f.play(&urls[1], "s1").await?;
        ensure!(
            loc.starts_with(&f.daemons[&placement["s1"]].url),
            "/play sent s1 to {loc}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = http
        .get(format!("{}/metrics", urls[0]))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        m.contains("kiln_scheduler_store_up 0"),
        "store_up while down"
    );
    ha.signal_all("CONT").await?;
    let back = place_when_possible(&f, &urls[0], "r1", Duration::from_secs(30)).await?;
    eprintln!("placements again {back:?} after Redis came back");
    ids.push("r1".into());
    let ids_ref = &ids;
    let (m, _) = f
        .until("every stream runs, once", Duration::from_secs(30), |m| {
            ids_ref.iter().all(|i| m.contains_key(i))
        })
        .await?;
    for (id, node) in &placement {
        ensure!(
            m[id] == *node,
            "{id} moved from {node} to {} across the outage",
            m[id]
        );
    }
    Ok(())
}

/// Unix ms of an `EXT-X-PROGRAM-DATE-TIME` value (`2026-12-01T10:00:00.000Z`; kilnd writes UTC).
fn pdt_ms(v: &str) -> Option<i64> {
    let (date, time) = v.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // days from the civil date (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + h) * 60 + min) * 60 + s) * 1000 + ms)
}

/// What a viewer that asks `/play` for every reload of a stream's media playlist saw.
#[derive(Debug, Default)]
struct Watched {
    /// The largest hole in the media timeline (PROGRAM-DATE-TIME) between what it had and what came next, ms.
    max_hole_ms: i64,
    /// The longest wall time without newer media, ms.
    max_stall_ms: u128,
    /// Playlist reloads, the ones that failed (a copy stopping under the request), and the node changes seen.
    polls: u32,
    failed: u32,
    switches: u32,
}

/// Polls `/play/{id}/audio/index.m3u8` on `sched` every 200 ms until `stop`, following the redirect each time.
async fn watch_via_play(
    http: reqwest::Client,
    sched: String,
    id: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Watched> {
    let mut w = Watched::default();
    let mut covered: Option<i64> = None;
    let mut last_new = Instant::now();
    let mut node = String::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        w.polls += 1;
        let r = http
            .get(format!("{sched}/play/{id}/audio/index.m3u8"))
            .send()
            .await;
        let (host, text) = match r {
            Ok(r) if r.status().is_success() => (r.url().authority().to_string(), r.text().await?),
            _ => {
                w.failed += 1;
                continue;
            }
        };
        let Ok(pl) = kiln_integration::parse_ll(&text) else {
            w.failed += 1;
            continue;
        };
        if host != node {
            w.switches += u32::from(!node.is_empty());
            node = host;
        }
        let pdt: BTreeMap<u64, i64> = pl
            .pdt
            .iter()
            .filter_map(|(msn, v)| Some((*msn, pdt_ms(v)?)))
            .collect();
        for s in pl.segments.iter().filter(|s| s.uri.is_some()) {
            let (Some(start), Some(d)) = (pdt.get(&s.msn), s.duration) else {
                continue;
            };
            let end = start + (d * 1000.0) as i64;
            match covered {
                Some(c) if end <= c => {}
                Some(c) => {
                    w.max_hole_ms = w.max_hole_ms.max(start - c);
                    covered = Some(end);
                    w.max_stall_ms = w.max_stall_ms.max(last_new.elapsed().as_millis());
                    last_new = Instant::now();
                }
                None => {
                    covered = Some(end);
                    last_new = Instant::now();
                }
            }
        }
    }
    Ok(w)
}

/// Stream id → the nodes that run it (neither ended nor stopping), from the daemons themselves.
async fn copies(f: &Fleet) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, d) in &f.daemons {
        for s in f
            .json(&format!("{}/v1/streams", d.url))
            .await?
            .as_array()
            .context("list")?
        {
            if s["state"] != "ended" && s["state"] != "stopping" {
                out.entry(s["id"].as_str().context("id")?.to_string())
                    .or_default()
                    .push(node.clone());
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_through_sigterm_moves_every_stream_before_its_node_stops() -> Result<()>
{
    let join = ["--node-token-env", NODE_TOKEN_ENV.0];
    let sched = scheduler("sched", &join, &[NODE_TOKEN_ENV]).await?;
    let dir = tempfile::tempdir()?;
    let node_args = [
        "--node-token-env",
        NODE_TOKEN_ENV.0,
        "--drain-timeout-s",
        "30",
    ];
    let mut daemons = BTreeMap::new();
    for n in ["n1", "n2", "n3"] {
        let data = dir.path().join(n).display().to_string();
        daemons.insert(
            n.to_string(),
            node(n, &data, &sched.url, &node_args, &[NODE_TOKEN_ENV]).await?,
        );
    }
    let client = || reqwest::Client::builder().timeout(Duration::from_secs(10));
    let mut f = Fleet {
        http: client().build()?,
        raw: client()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        daemons,
    };
    let http = f.http.clone();
    poll_json(
        &http,
        &format!("{}/v1/nodes", sched.url),
        "three live nodes",
        Duration::from_secs(15),
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().filter(|n| n["state"] == "alive").count() == 3)
        },
    )
    .await?;
    let ids: Vec<String> = (1..=4).map(|i| format!("r{i}")).collect();
    for id in &ids {
        place_when_possible(&f, &sched.url, id, Duration::from_secs(15)).await?;
    }
    let ids_ref = &ids;
    f.until("every stream publishes", Duration::from_secs(20), |m| {
        ids_ref.iter().all(|i| m.contains_key(i))
    })
    .await?;
    for id in &ids {
        let url = format!("{}/play/{id}/audio/index.m3u8", sched.url);
        let http = &http;
        poll_until(
            &format!("{id} lists a segment"),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let url = url.clone();
                async move {
                    let text = http.get(&url).send().await?.text().await?;
                    Ok(match kiln_integration::parse_ll(&text) {
                        Ok(pl) if pl.segments.iter().any(|s| s.uri.is_some()) => Polled::Done(()),
                        _ => Polled::NotYet(text),
                    })
                }
            },
        )
        .await?;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchers: Vec<_> = ids
        .iter()
        .map(|id| {
            tokio::spawn(watch_via_play(
                http.clone(),
                sched.url.clone(),
                id.clone(),
                stop.clone(),
            ))
        })
        .collect();

    // moves per stream, counted from where the streams were before each restart and the drain by hand
    let mut expected: BTreeMap<String, u32> = BTreeMap::new();
    // each node in turn: SIGTERM, it drains (its streams start elsewhere first), exits, and comes back
    for n in ["n1", "n2", "n3"] {
        let before = copies(&f).await?;
        let here: Vec<&String> = before
            .iter()
            .filter(|(_, v)| v.contains(&n.to_string()))
            .map(|(k, _)| k)
            .collect();
        for id in &here {
            *expected.entry(id.to_string()).or_default() += 1;
        }
        let t = Instant::now();
        f.daemons[n].signal("TERM").await?;
        let st = f
            .daemons
            .get_mut(n)
            .context("node")?
            .wait_exit(Duration::from_secs(40))
            .await?;
        ensure!(st.success(), "{n} exited with {st}");
        eprintln!("{n}: ran {here:?}; drained and exited in {:?}", t.elapsed());
        let log = f.daemons[n].log_text();
        ensure!(
            here.is_empty() || log.contains("drained: nothing runs here any more"),
            "{n} stopped before its streams were moved:\n{log}"
        );
        let data = dir.path().join(n).display().to_string();
        let back = node(n, &data, &sched.url, &node_args, &[NODE_TOKEN_ENV]).await?;
        f.daemons.insert(n.to_string(), back);
        let placed = poll_until(
            "every stream runs once, elsewhere",
            Duration::from_secs(20),
            Duration::from_millis(200),
            || async {
                let c = copies(&f).await?;
                Ok(
                    if ids.iter().all(|i| c.get(i).is_some_and(|v| v.len() == 1)) {
                        Polled::Done(c)
                    } else {
                        Polled::NotYet(format!("{c:?}"))
                    },
                )
            },
        )
        .await?;
        for id in &here {
            ensure!(placed[*id] != [n.to_string()], "{id} is back on {n}");
        }
        poll_json(
            &http,
            &format!("{}/v1/nodes", sched.url),
            "the restarted node is alive",
            Duration::from_secs(15),
            |v| {
                v.as_array()
                    .is_some_and(|a| a.iter().any(|x| x["id"] == n && x["state"] == "alive"))
            },
        )
        .await?;
    }
    // the same by hand: kilnctl drains the busiest node and waits until it runs nothing; undrain reopens it
    const KILNCTL: &str = env!("CARGO_BIN_EXE_kiln-it-kilnctl");
    let ctl = |args: &[&str]| {
        let mut c = tokio::process::Command::new(KILNCTL);
        c.arg("--scheduler").arg(&sched.url).args(args);
        c
    };
    let now = copies(&f).await?;
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for nodes in now.values() {
        *load.entry(nodes[0].as_str()).or_default() += 1;
    }
    let busiest = load
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(n, _)| n.to_string())
        .context("a busy node")?;
    for (id, nodes) in &now {
        if nodes[0] == busiest {
            *expected.entry(id.clone()).or_default() += 1;
        }
    }
    let out = ctl(&["nodes", "drain", &busiest, "--wait", "--timeout", "30"])
        .output()
        .await?;
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success() && said.contains("runs no stream"),
        "drain --wait: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = copies(&f).await?;
    ensure!(
        ids.iter().all(|i| after
            .get(i)
            .is_some_and(|v| v.len() == 1 && v[0] != busiest)),
        "after drain --wait of {busiest}: {after:?}"
    );
    let out = ctl(&["nodes", "list"]).output().await?;
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success()
            && listed
                .lines()
                .any(|l| l.starts_with(&busiest) && l.contains("draining")),
        "{listed}"
    );
    let out = ctl(&["nodes", "undrain", &busiest]).output().await?;
    ensure!(
        out.status.success(),
        "undrain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["nodes", "list"]).output().await?;
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        listed
            .lines()
            .any(|l| l.starts_with(&busiest) && l.contains("alive")),
        "{listed}"
    );
    let out = ctl(&["nodes", "drain", "no-such-node"]).output().await?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("404"),
        "draining an unknown node: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (id, w) in ids.iter().zip(watchers) {
        let w = w.await??;
        let want = expected.get(id).copied().unwrap_or(0);
        eprintln!("{id}: {w:?}, moved {want} times");
        // each move of the stream is a change of node its viewer followed through /play
        ensure!(
            w.switches >= want,
            "{id}: the viewer followed {} of {want} moves",
            w.switches
        );
        ensure!(w.polls > 20 && w.failed * 10 <= w.polls, "{id}: {w:?}");
        // make-before-break: the new copy had media before viewers were sent to it, so the timeline is contiguous
        // (measured 0–1 ms; handing over while the new copy was still `starting` left 1,005 ms holes), and new
        // media never stopped for more than one segment beyond its 2 s cadence
        ensure!(
            w.max_hole_ms <= 500,
            "{id}: a hole in the media timeline: {w:?}"
        );
        ensure!(
            w.max_stall_ms <= 4000,
            "{id}: no new media for too long: {w:?}"
        );
    }
    ensure!(
        expected.values().sum::<u32>() >= 4,
        "no restart moved anything: {expected:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_an_answering_scheduler_does_not_wait_for_moves() -> Result<()> {
    // a scheduler URL nobody answers on: the node drains, sees nobody will move its stream, and stops it
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    let dir = tempfile::tempdir()?;
    let data = dir.path().display().to_string();
    let mut d = node("lonely", &data, &dead, &["--drain-timeout-s", "120"], &[]).await?;
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/v1/streams/alone", d.url))
        .json(&json!({"source": "test:", "preset": "live-audio-only"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "{}", r.status());
    let t = Instant::now();
    d.signal("TERM").await?;
    // while it drains, it is not ready (load balancers and Kubernetes stop sending it work)
    let ready = format!("{}/readyz", d.url);
    let http_ref = &http;
    poll_until(
        "/readyz says draining",
        Duration::from_secs(2),
        Duration::from_millis(50),
        || {
            let ready = ready.clone();
            async move {
                let r = http_ref.get(&ready).send().await?;
                let status = r.status().as_u16();
                let text = r.text().await?;
                Ok(if status == 503 && text.contains("draining") {
                    Polled::Done(())
                } else {
                    Polled::NotYet(format!("{status} {text}"))
                })
            }
        },
    )
    .await?;
    let st = d.wait_exit(Duration::from_secs(30)).await?;
    ensure!(st.success(), "{st}");
    let log = d.log_text();
    ensure!(
        log.contains("no scheduler answers") && t.elapsed() < Duration::from_secs(30),
        "exited after {:?}:\n{log}",
        t.elapsed()
    );
    Ok(())
}

/// Runs kilnctl with `args`: (success, stdout, stderr).
async fn kilnctl(args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-it-kilnctl"))
        .args(args)
        .env_remove("KILN_SERVER")
        .env_remove("KILN_SCHEDULER")
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kilnctl_drives_streams_capacity_fleet_and_completions_on_real_processes() -> Result<()> {
    let join = ["--node-token-env", NODE_TOKEN_ENV.0];
    let sched = scheduler("sched", &join, &[NODE_TOKEN_ENV]).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("n1").display().to_string();
    let d = node("n1", &data, &sched.url, &join, &[NODE_TOKEN_ENV]).await?;
    let http = reqwest::Client::new();
    poll_json(
        &http,
        &format!("{}/v1/nodes", sched.url),
        "the node is alive",
        Duration::from_secs(15),
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().any(|n| n["state"] == "alive"))
        },
    )
    .await?;
    let (s, dm) = (sched.url.as_str(), d.url.as_str());

    // completions
    let (ok, out, _) = kilnctl(&["completions", "bash"]).await?;
    ensure!(
        ok && out.contains("_kilnctl") && out.contains("streams"),
        "completions: {out}"
    );
    // capacity of the daemon: a table, and the document
    let (ok, out, err) = kilnctl(&["--server", dm, "capacity"]).await?;
    ensure!(
        ok && out.contains("node n1") && out.contains("cpu") && out.contains("serving"),
        "capacity: {out}{err}"
    );
    let (ok, out, _) = kilnctl(&["--server", dm, "--json", "capacity"]).await?;
    let doc: Value = serde_json::from_str(&out)?;
    ensure!(ok && doc["node_id"] == "n1", "{doc}");
    // a stream placed through the scheduler
    let (ok, out, err) = kilnctl(&[
        "--scheduler",
        s,
        "streams",
        "create",
        "k1",
        "--source",
        "test:",
        "--preset",
        "live-audio-only",
    ])
    .await?;
    ensure!(
        ok && out.contains("k1: placed on n1") && out.contains("/play/k1/master.m3u8"),
        "create: {out}{err}"
    );
    let (ok, out, _) = kilnctl(&["--scheduler", s, "streams", "list"]).await?;
    ensure!(
        ok && out
            .lines()
            .any(|l| l.starts_with("k1") && l.contains("placed") && l.contains("n1")),
        "{out}"
    );
    let (ok, out, _) = kilnctl(&["--scheduler", s, "--json", "streams", "list"]).await?;
    let list: Value = serde_json::from_str(&out)?;
    ensure!(
        ok && list
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == "k1")),
        "{list}"
    );
    let (ok, out, _) = kilnctl(&["--scheduler", s, "streams", "get", "k1"]).await?;
    let got: Value = serde_json::from_str(&out)?;
    ensure!(ok && got["id"] == "k1" && got["node"] == "n1", "{got}");
    // one started on the daemon directly, from a spec file
    let spec = dir.path().join("d1.json");
    std::fs::write(&spec, r#"{"source": "test:", "preset": "live-audio-only"}"#)?;
    let spec_s = spec.display().to_string();
    let (ok, out, err) =
        kilnctl(&["--server", dm, "streams", "create", "d1", "--spec", &spec_s]).await?;
    ensure!(
        ok && out.starts_with("d1: ") && out.contains("/live/d1/master.m3u8"),
        "create on the daemon: {out}{err}"
    );
    let (ok, out, _) = kilnctl(&["--server", dm, "streams", "list"]).await?;
    ensure!(
        ok && out.contains("d1") && out.contains("k1") && out.contains("cpu"),
        "{out}"
    );
    let (ok, out, _) = kilnctl(&["--server", dm, "streams", "get", "d1"]).await?;
    ensure!(
        ok && serde_json::from_str::<Value>(&out)?["id"] == "d1",
        "{out}"
    );
    // the fleet
    let (ok, out, _) = kilnctl(&["--scheduler", s, "fleet", "headroom"]).await?;
    ensure!(ok && out.contains("live-audio-only"), "{out}");
    let (ok, out, _) = kilnctl(&["--scheduler", s, "--json", "fleet", "headroom"]).await?;
    ensure!(
        ok && serde_json::from_str::<Value>(&out)?["presets"]["live-audio-only"]["streams"]
            .is_u64(),
        "{out}"
    );
    let (ok, out, _) = kilnctl(&["--scheduler", s, "fleet", "leader"]).await?;
    ensure!(ok && out.contains("leads at epoch"), "{out}");
    let (ok, out, err) =
        kilnctl(&["--scheduler", s, "fleet", "consolidate", "--max-moves", "1"]).await?;
    ensure!(
        ok && serde_json::from_str::<Value>(&out).is_ok(),
        "consolidate: {out}{err}"
    );
    let (ok, out, _) = kilnctl(&["--scheduler", s, "--json", "nodes", "list"]).await?;
    ensure!(
        ok && serde_json::from_str::<Value>(&out)?
            .as_array()
            .is_some_and(|a| a.len() == 1),
        "{out}"
    );
    // delete on each side
    let (ok, out, _) = kilnctl(&["--server", dm, "streams", "delete", "d1"]).await?;
    ensure!(ok && out.contains("d1: deleted"), "{out}");
    let (ok, out, _) = kilnctl(&["--scheduler", s, "streams", "delete", "k1"]).await?;
    ensure!(ok && out.contains("k1: deleted"), "{out}");
    // mistakes: the server's message and a non-zero exit, or what is missing
    let (ok, _, err) = kilnctl(&["--scheduler", s, "streams", "get", "k1"]).await?;
    ensure!(!ok && err.contains("404"), "a deleted stream: {err}");
    let (ok, _, err) = kilnctl(&["--server", dm, "fleet", "headroom"]).await?;
    ensure!(
        !ok && err.contains("--scheduler"),
        "fleet without a scheduler: {err}"
    );
    std::fs::write(&spec, "[1, 2]")?;
    let (ok, _, err) =
        kilnctl(&["--server", dm, "streams", "create", "d2", "--spec", &spec_s]).await?;
    ensure!(
        !ok && err.contains("JSON object"),
        "a spec that is not an object: {err}"
    );
    let (ok, _, err) = kilnctl(&[
        "--server", dm, "streams", "create", "d3", "--source", "test:", "--preset", "no-such",
    ])
    .await?;
    ensure!(!ok && err.contains("400"), "an unknown preset: {err}");
    Ok(())
}

/// Runs `tests/browser/pages.mjs` on `url` in headless Chromium: what the page shows. The screenshot goes to
/// `$KILN_IT_SHOTS/<name>.png` when that is set (for people), else into `dir`.
async fn page_shows(
    browser: &std::path::Path,
    url: &str,
    name: &str,
    dir: &std::path::Path,
) -> Result<Value> {
    let shots =
        std::env::var_os("KILN_IT_SHOTS").map_or(dir.to_path_buf(), std::path::PathBuf::from);
    let shot = shots.join(format!("{name}.png"));
    let script = browser.join("pages.mjs");
    let v = kiln_integration::node(
        &script,
        &[url.as_ref(), shot.as_os_str()],
        Duration::from_secs(60),
    )
    .await?;
    ensure!(
        v["errors"].as_array().is_some_and(Vec::is_empty),
        "{name}: page errors: {v}"
    );
    ensure!(v["error"] == "", "{name}: the page says {}", v["error"]);
    ensure!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "{name}: no screenshot"
    );
    Ok(v)
}

/// A bar shows `used` of `cap` with a width of used / cap.
fn bar_matches(bars: &Value, dim: &str, used: u64, cap: u64) -> bool {
    bars.as_array().is_some_and(|b| {
        b.iter().any(|x| {
            x["dim"] == dim
                && x["used"].as_u64() == Some(used)
                && x["cap"].as_u64() == Some(cap)
                && (x["width"].as_f64().unwrap_or(-1.0)
                    - (used as f64 / cap as f64 * 100.0).min(100.0))
                .abs()
                    < 0.2
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_pages_show_what_the_apis_say() -> Result<()> {
    let Some(browser) = kiln_integration::browser_dir()? else {
        return Ok(());
    };
    let join = ["--node-token-env", NODE_TOKEN_ENV.0];
    let sched = scheduler("sched", &join, &[NODE_TOKEN_ENV]).await?;
    let dir = tempfile::tempdir()?;
    let mut daemons = BTreeMap::new();
    // the node page's player loads hls.js from the assets directory (nothing else is reachable here)
    let assets = browser
        .join("node_modules/hls.js/dist")
        .display()
        .to_string();
    let args = [join[0], join[1], "--assets-dir", &assets];
    for n in ["n1", "n2"] {
        let data = dir.path().join(n).display().to_string();
        daemons.insert(
            n,
            node(n, &data, &sched.url, &args, &[NODE_TOKEN_ENV]).await?,
        );
    }
    let http = reqwest::Client::new();
    poll_json(
        &http,
        &format!("{}/v1/nodes", sched.url),
        "two live nodes",
        Duration::from_secs(15),
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().filter(|n| n["state"] == "alive").count() == 2)
        },
    )
    .await?;
    for (id, preset) in [
        ("p1", "live-audio-only"),
        ("p2", "live-audio-only"),
        ("p3", "live-360p-abr"),
    ] {
        let r = http
            .post(format!("{}/v1/streams", sched.url))
            .json(&json!({"id": id, "source": "test:", "preset": preset}))
            .send()
            .await?;
        ensure!(r.status() == 201, "placing {id}: {}", r.status());
    }
    // the nodes report what they run (one heartbeat later)
    poll_json(
        &http,
        &format!("{}/v1/nodes", sched.url),
        "the nodes report three streams",
        Duration::from_secs(15),
        |v| {
            v.as_array().is_some_and(|a| {
                a.iter()
                    .map(|n| n["running"].as_array().map_or(0, Vec::len))
                    .sum::<usize>()
                    == 3
            })
        },
    )
    .await?;

    let shown = page_shows(
        &browser,
        &format!("{}/", sched.url),
        "scheduler",
        dir.path(),
    )
    .await?;
    let nodes: Value = http
        .get(format!("{}/v1/nodes", sched.url))
        .send()
        .await?
        .json()
        .await?;
    let streams: Value = http
        .get(format!("{}/v1/streams", sched.url))
        .send()
        .await?
        .json()
        .await?;
    let leader: Value = http
        .get(format!("{}/v1/leader", sched.url))
        .send()
        .await?
        .json()
        .await?;
    let headroom: Value = http
        .get(format!("{}/v1/fleet/headroom", sched.url))
        .send()
        .await?
        .json()
        .await?;
    ensure!(shown["title"] == "kiln fleet", "{shown}");
    ensure!(
        shown["leader"]["id"] == leader["leader"]["id"]
            && shown["leader"]["epoch"] == leader["leader"]["epoch"],
        "leader: {} vs {leader}",
        shown["leader"]
    );
    let api_nodes = nodes.as_array().context("nodes")?;
    ensure!(
        shown["nodes"].as_array().map(Vec::len) == Some(api_nodes.len()),
        "{shown}"
    );
    for n in api_nodes {
        let row = shown["nodes"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["node"] == n["id"]))
            .with_context(|| format!("{} not shown", n["id"]))?;
        let running = n["running"].as_array().map_or(0, Vec::len).to_string();
        ensure!(
            row["state"] == n["state"] && row["streams"] == running.as_str(),
            "{row} vs {n}"
        );
        let (used, cap) = (
            n["booked"]["cpu_millicores"].as_u64().context("booked")?,
            n["host"]["capacity"]["cpu_millicores"]
                .as_u64()
                .context("cap")?,
        );
        ensure!(
            bar_matches(&shown["bars"], "cpu_millicores", used, cap),
            "no CPU bar {used}/{cap} for {}: {}",
            n["id"],
            shown["bars"]
        );
    }
    for s in streams.as_array().context("streams")? {
        ensure!(
            shown["streams"].as_array().is_some_and(|r| r
                .iter()
                .any(|r| r["stream"] == s["id"] && r["node"] == s["node"])),
            "stream {} on {} not shown: {}",
            s["id"],
            s["node"],
            shown["streams"]
        );
    }
    for (p, h) in headroom["presets"].as_object().context("presets")? {
        let want = h["streams"].to_string();
        ensure!(
            shown["presets"].as_array().is_some_and(|r| r
                .iter()
                .any(|r| r["preset"] == p.as_str() && r["streams"] == want.as_str())),
            "headroom {p}: {want} not shown: {}",
            shown["presets"]
        );
    }

    // a node's own page: its capacity bars and each stream's health
    let n1 = &daemons["n1"];
    let shown = page_shows(&browser, &format!("{}/", n1.url), "kilnd", dir.path()).await?;
    let cap: Value = http
        .get(format!("{}/v1/capacity", n1.url))
        .send()
        .await?
        .json()
        .await?;
    let list: Value = http
        .get(format!("{}/v1/streams", n1.url))
        .send()
        .await?
        .json()
        .await?;
    let host = &cap["host"];
    ensure!(
        bar_matches(
            &shown["bars"],
            "cpu_millicores",
            host["allocated"]["cpu_millicores"].as_u64().unwrap_or(0),
            host["capacity"]["cpu_millicores"].as_u64().unwrap_or(0)
        ) && bar_matches(
            &shown["bars"],
            "memory_mib",
            host["allocated"]["memory_mib"].as_u64().unwrap_or(0),
            host["capacity"]["memory_mib"].as_u64().unwrap_or(0)
        ),
        "host bars: {} vs {host}",
        shown["bars"]
    );
    for s in list.as_array().context("list")? {
        ensure!(
            shown["streams"].as_array().is_some_and(|r| r
                .iter()
                .any(|r| r["stream"] == s["id"] && r["backend"] == s["backend"]["kind"])),
            "{} not shown on the node page: {}",
            s["id"],
            shown["streams"]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_finishes_its_running_job_and_keeps_the_queued_one_for_its_return(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("in"))?;
    let clip = dir.path().join("in/clip.mp4");
    make_clip(
        &clip,
        12.0,
        Some("testsrc2=size=640x360:rate=30"),
        &[],
        &[
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        ],
    )
    .await?;
    let sched = scheduler("sched", &["--open-fleet"], &[]).await?;
    let input_dir = dir.path().join("in").display().to_string();
    let data = dir.path().join("v1").display().to_string();
    let args = [
        "--vod-input-dir",
        &input_dir,
        "--vod-concurrency",
        "1",
        "--drain-timeout-s",
        "90",
    ];
    let mut d = node("v1", &data, &sched.url, &args, &[]).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    poll_json(
        &http,
        &format!("{}/v1/nodes", sched.url),
        "v1 registers",
        Duration::from_secs(10),
        |v| v.to_string().contains("\"v1\""),
    )
    .await?;
    let body = json!({"input": format!("file://{}", clip.display()), "x264_speed": "veryfast"});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = http
            .post(format!("{}/v1/jobs", d.url))
            .json(&body)
            .send()
            .await?;
        ensure!(r.status() == 201, "submit: {}", r.status());
        ids.push(
            r.json::<Value>().await?["id"]
                .as_str()
                .context("id")?
                .to_string(),
        );
    }
    poll_json(
        &http,
        &format!("{}/v1/jobs/{}", d.url, ids[0]),
        "the first job runs",
        Duration::from_secs(20),
        |v| v["state"] == "running",
    )
    .await?;
    // SIGTERM: the running job finishes before the node stops; the queued one does not start
    d.signal("TERM").await?;
    let st = d.wait_exit(Duration::from_secs(120)).await?;
    ensure!(st.success(), "{st}");
    // (the log is colored: drop the escape sequences)
    let mut log = String::new();
    let mut escaped = false;
    for c in d.log_text().chars() {
        match (escaped, c) {
            (false, '\u{1b}') => escaped = true,
            (true, 'm') => escaped = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    // the job was still running when the drain began (else this test shows nothing), and the drain waited for it
    ensure!(
        log.contains("running_jobs=1") && log.contains("drained: nothing runs here any more"),
        "{log}"
    );
    let back = node("v1", &data, &sched.url, &args, &[]).await?;
    let first: Value = http
        .get(format!("{}/v1/jobs/{}", back.url, ids[0]))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        first["state"] == "done" && first["attempts"] == 1,
        "the running job was interrupted instead of finished: {first}"
    );
    // the queued job waited on disk and runs now, on its first attempt
    let second = wait_job(&http, &back.url, &ids[1], Duration::from_secs(120)).await?;
    ensure!(
        second["state"] == "done" && second["attempts"] == 1,
        "{second}"
    );
    Ok(())
}

/// `--relieve-behind` end to end: node `slow` runs its streams with a test-only fault that holds each
/// encoder 60 ms per frame (`KILN_FAULT_SLOW_ENCODER_MS`, fault-injection builds only), so a stream placed there
/// falls behind real time and the node reports it. Once it has been there `--relieve-after-s`, the scheduler
/// moves it, make-before-break, to the healthy node `fast`, where it keeps real time and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_behind_real_time_is_moved_to_a_healthy_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sched = scheduler(
        "sched",
        &["--open-fleet", "--relieve-behind", "--relieve-after-s", "8"],
        &[],
    )
    .await?;
    let data = |n: &str| dir.path().join(n).display().to_string();
    let slow = node(
        "slow",
        &data("slow"),
        &sched.url,
        &[],
        &[("KILN_FAULT_SLOW_ENCODER_MS", "60")],
    )
    .await?;
    let fleet = Fleet {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()?,
        raw: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        daemons: BTreeMap::from([("slow".to_string(), slow)]),
    };
    poll_json(
        &fleet.http,
        &format!("{}/v1/nodes", sched.url),
        "slow registers",
        Duration::from_secs(10),
        |v| v.to_string().contains("\"slow\""),
    )
    .await?;
    // the only node: the stream goes there
    fleet.place(&sched.url, "s", "live-360p-abr").await?;
    let slow_url = fleet.daemons["slow"].url.clone();
    poll_json(
        &fleet.http,
        &format!("{slow_url}/v1/streams/s"),
        "the slow node reports s behind real time",
        Duration::from_secs(40),
        |v| v["behind_real_time"] == true,
    )
    .await?;
    let mut fleet = fleet;
    let fast = node("fast", &data("fast"), &sched.url, &[], &[]).await?;
    fleet.daemons.insert("fast".to_string(), fast);
    // make-before-break: for a while it runs on both; then only on the healthy node
    let t = Instant::now();
    let fleet_ref = &fleet;
    poll_until(
        "s moves to the healthy node",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async move {
            let c = copies(fleet_ref).await?;
            Ok(match c.get("s").map(Vec::as_slice) {
                Some([only]) if only == "fast" => Polled::Done(()),
                other => Polled::NotYet(format!("s runs on {other:?}")),
            })
        },
    )
    .await?;
    eprintln!("moved after {:?}", t.elapsed());
    // it keeps real time there, and is not moved again
    let fast_url = fleet.daemons["fast"].url.clone();
    poll_json(
        &fleet.http,
        &format!("{fast_url}/v1/streams/s"),
        "s keeps real time on the healthy node",
        Duration::from_secs(30),
        |v| {
            v["recent_realtime_ratio"]
                .as_f64()
                .is_some_and(|r| r >= 0.9)
        },
    )
    .await?;
    let record = fleet.json(&format!("{}/v1/streams/s", sched.url)).await?;
    ensure!(
        record.to_string().contains("fast"),
        "the scheduler's record does not name the healthy node: {record}"
    );
    let running = fleet.running().await?;
    ensure!(
        running.get("s").map(String::as_str) == Some("fast"),
        "{running:?}"
    );
    // moved as a relief, once
    let metrics = fleet
        .http
        .get(format!("{}/metrics", sched.url))
        .send()
        .await?
        .text()
        .await?;
    let line = r#"kiln_scheduler_placements_total{reason="relief"} 1"#;
    ensure!(
        metrics.lines().any(|l| l == line),
        "no `{line}`:\n{metrics}"
    );
    Ok(())
}
