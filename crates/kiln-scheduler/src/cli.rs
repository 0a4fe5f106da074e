//! The `kiln-scheduler` command line: flags → [`crate::Config`] → serve.

use std::sync::Arc;
use std::time::Duration;

use crate::store::{RedisTarget, Store};
use anyhow::Context;
use clap::Parser;

/// kiln scheduler: places live streams on kilnd nodes.
#[derive(Debug, Parser)]
#[command(name = "kiln-scheduler", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// Keep state in Redis (`redis://host:port`) so several schedulers can run, one leading. With
    /// --redis-sentinel, only its database and credentials are used (the address is the one Sentinel names).
    #[arg(long)]
    redis_url: Option<String>,
    /// Redis Sentinels (`host:port`, comma-separated): the store uses the master they name for --redis-master and
    /// follows a failover without a restart.
    #[arg(
        long,
        value_name = "HOST:PORT,…",
        value_delimiter = ',',
        requires = "redis_master"
    )]
    redis_sentinel: Vec<String>,
    /// The master's name in Sentinel (`sentinel monitor NAME …`).
    #[arg(long, requires = "redis_sentinel")]
    redis_master: Option<String>,
    /// Replicas that must acknowledge every lease, epoch and record write (`WAIT`) before it counts, so a
    /// failover cannot lose it (default: 1 with --redis-sentinel, 0 without).
    #[arg(long)]
    redis_min_replicas: Option<u32>,
    /// Move a stream its node reports behind real time (below 0.9 × over 10 s) to another node, make-before-break:
    /// one per node per pass, not within --relieve-after-s of its last placement. Off by default until it has
    /// been watched against real overload (tests/scheduler.rs moves a stream whose encoder was slowed).
    #[arg(long)]
    relieve_behind: bool,
    /// How long a stream stays on a node before --relieve-behind may move it (its 10 s real-time window must
    /// describe that node, and nothing bounces), in seconds.
    #[arg(long, default_value_t = 60, requires = "relieve_behind")]
    relieve_after_s: u64,
    /// The bound on every Redis call and Sentinel lookup, in ms.
    #[arg(long, default_value_t = 500)]
    redis_timeout_ms: u64,
    /// URL other schedulers redirect writes to while this one leads (default: from the bound address).
    #[arg(long)]
    advertise_url: Option<String>,
    /// This instance's id for the leader lease (default: advertise URL).
    #[arg(long)]
    instance_id: Option<String>,
    /// Heartbeat interval asked of nodes, in ms: a node is dead after three missed ones; the lease lasts three.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Consolidate every this many seconds (0: never): move at most --consolidate-moves streams off lightly loaded
    /// nodes onto nodes in use. Each move ends the stream on its old node (viewers come back through /play).
    #[arg(long, default_value_t = 0)]
    consolidate_every_s: u64,
    /// Most streams moved per consolidation pass.
    #[arg(long, default_value_t = 10)]
    consolidate_moves: usize,
    /// The fleet's bearer token, read from this environment variable (≥ 16 bytes): required on this scheduler's
    /// control routes, accepted on heartbeats, and sent to the daemons (start them with the same token).
    #[arg(long, value_name = "ENV_VAR")]
    api_token_env: Option<String>,
    /// The join token, read from this environment variable (≥ 16 bytes): a node's heartbeats must carry it (or
    /// the fleet token) to join. It admits heartbeats and nothing else. Start kilnd with the same variable in its
    /// own --node-token-env.
    #[arg(long, value_name = "ENV_VAR")]
    node_token_env: Option<String>,
    /// Admit heartbeats without a token (a trusted network only: demos, tests). Without a token and without this
    /// flag every heartbeat is refused. A live node's URL still changes only once its heartbeat expires.
    #[arg(long, conflicts_with_all = ["api_token_env", "node_token_env"])]
    open_fleet: bool,
    /// Only these node ids may join (comma-separated); default: any id that has the token.
    #[arg(long, value_name = "ID,ID", value_delimiter = ',')]
    nodes: Vec<String>,
    /// Networks a node's advertised URL may point into besides public and private (10/8, 172.16/12, 192.168/16,
    /// fc00::/7) addresses: comma-separated CIDRs (`127.0.0.0/8` for a fleet on one host; `any` turns the check
    /// off). Loopback, link-local (the cloud metadata service), unspecified, multicast, broadcast and the other
    /// special-purpose ranges are refused otherwise. A host name must resolve only to allowed addresses.
    #[arg(long, value_name = "CIDR,CIDR", value_parser = parse_networks, default_value = "")]
    node_networks: kiln_model::net::UrlPolicy,
    /// Load presets from this directory instead of the built-in ones (they must match the daemons').
    #[arg(long)]
    pipelines_dir: Option<std::path::PathBuf>,
}

fn parse_networks(s: &str) -> Result<kiln_model::net::UrlPolicy, String> {
    kiln_model::net::UrlPolicy::parse(s).map_err(|e| e.to_string())
}

/// The binary's whole `main`: parses the process arguments and runs. Test harnesses build their own binaries
/// from it, so integration tests run the same code as the shipped binary.
pub fn main() -> anyhow::Result<()> {
    kiln_http::process::run(run)
}

/// How nodes join, from the flags: the join token, open mode, the id allow-list and the node networks.
fn node_admission(
    args: &Args,
    api_token: Option<&str>,
) -> anyhow::Result<crate::admit::NodeAdmission> {
    let node_token = args
        .node_token_env
        .as_deref()
        .map(kiln_http::token_from_env)
        .transpose()?;
    anyhow::ensure!(
        node_token.is_none() || node_token.as_deref() != api_token,
        "the join token (--node-token-env) must differ from the fleet token (--api-token-env): a node must not be \
         able to drive the control API"
    );
    let nodes = crate::admit::NodeAdmission {
        token: node_token,
        open: args.open_fleet,
        ids: (!args.nodes.is_empty()).then(|| {
            args.nodes
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        }),
        networks: crate::admit::NodeNetworks {
            extra: args.node_networks.clone(),
        },
    };
    if nodes.token.is_none() && api_token.is_none() && !nodes.open {
        tracing::warn!(
            "no --node-token-env, no --api-token-env and no --open-fleet: every heartbeat is refused, so no node \
             can join"
        );
    }
    Ok(nodes)
}

/// Where the store is, from the flags: `None` keeps state in this process.
fn redis_target(args: &Args) -> Option<RedisTarget> {
    let timeout = Duration::from_millis(args.redis_timeout_ms.clamp(50, 60_000));
    if let Some(master) = &args.redis_master {
        return Some(RedisTarget {
            url: args
                .redis_url
                .clone()
                .unwrap_or_else(|| "redis://127.0.0.1".into()),
            sentinels: args
                .redis_sentinel
                .iter()
                .map(|a| format!("redis://{}", a.trim_start_matches("redis://")))
                .collect(),
            master: master.clone(),
            min_replicas: args.redis_min_replicas.unwrap_or(1),
            timeout,
        });
    }
    let url = args.redis_url.as_deref()?;
    Some(RedisTarget {
        min_replicas: args.redis_min_replicas.unwrap_or(0),
        timeout,
        ..RedisTarget::single(url)
    })
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let presets = match &args.pipelines_dir {
        Some(dir) => kiln_config::Presets::load_dir(dir, kiln_config::DEFAULT_PRESET)?,
        None => kiln_config::Presets::builtin(),
    };
    let api_token = args
        .api_token_env
        .as_deref()
        .map(kiln_http::token_from_env)
        .transpose()?;
    let nodes = node_admission(&args, api_token.as_deref())?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let target = redis_target(&args);
    let url = args
        .advertise_url
        .unwrap_or_else(|| format!("http://{bound}"));
    let store = match target {
        Some(t) => {
            let what = if t.sentinels.is_empty() {
                t.url.clone()
            } else {
                format!(
                    "the master `{}` via Sentinel {}",
                    t.master,
                    t.sentinels.join(",")
                )
            };
            Store::redis_at(t)
                .await
                .with_context(|| format!("connecting to {what}"))?
        }
        None => Store::memory(crate::unix_ms()),
    };
    let config = crate::Config {
        instance_id: args.instance_id.unwrap_or_else(|| url.clone()),
        advertise_url: url,
        interval: Duration::from_millis(args.heartbeat_ms.clamp(100, 60_000)),
        presets,
        strategy: kiln_binpack::Strategy::Kiln,
        api_token,
        nodes,
        relieve: args
            .relieve_behind
            .then_some(args.relieve_after_s.saturating_mul(1000)),
    };
    println!("kiln-scheduler listening on http://{bound}");
    let s = Arc::new(crate::Scheduler::new(config, store));
    if args.consolidate_every_s > 0 {
        let (s, every, moves) = (
            s.clone(),
            Duration::from_secs(args.consolidate_every_s),
            args.consolidate_moves,
        );
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.tick().await;
            loop {
                t.tick().await;
                if s.leading().is_some() {
                    match s.consolidate(moves).await {
                        Ok(m) if !m.is_empty() => {
                            tracing::info!(moves = m.len(), "consolidation pass")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "consolidation failed"),
                    }
                }
            }
        });
    }
    crate::serve(s, listener, kiln_http::shutdown_signal()).await
}
