//! `kilnctl nodes …`: a scheduler's fleet (`--scheduler`): list, drain (with `--wait`, move every
//! stream off the node make-before-break and wait until it runs nothing), undrain.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

use crate::answer;

#[derive(Debug, Subcommand)]
pub(crate) enum NodesCmd {
    /// Every node the scheduler knows: state, streams it runs, URL.
    List,
    /// Stop placing streams on the node. With --evacuate (or --wait) its streams are moved elsewhere, each
    /// started on its new node before it is stopped on this one.
    Drain {
        id: String,
        #[arg(long)]
        evacuate: bool,
        /// Evacuate and wait until the node runs no stream (exit 1 if --timeout passes first).
        #[arg(long)]
        wait: bool,
        /// Seconds --wait waits.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Let the node take streams again.
    Undrain { id: String },
}

/// The node `id` in `GET /v1/nodes`.
async fn node(http: &reqwest::Client, base: &str, id: &str) -> Result<Value> {
    let v = answer(http.get(format!("{base}/v1/nodes")).send().await?).await?;
    v.as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == id))
        .cloned()
        .with_context(|| format!("the scheduler does not know node `{id}`"))
}

/// The stream ids a node entry runs.
fn runs(n: &Value) -> Vec<String> {
    n["running"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) async fn run(
    http: &reqwest::Client,
    base: &str,
    cmd: NodesCmd,
    json: bool,
) -> Result<ExitCode> {
    match cmd {
        NodesCmd::List => {
            let v = answer(http.get(format!("{base}/v1/nodes")).send().await?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<20} {:<9} {:>7}  URL", "ID", "STATE", "STREAMS");
            for n in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                println!(
                    "{:<20} {:<9} {:>7}  {}",
                    n["id"].as_str().unwrap_or("?"),
                    n["state"].as_str().unwrap_or("?"),
                    runs(n).len(),
                    n["url"].as_str().unwrap_or("-"),
                );
            }
        }
        NodesCmd::Drain {
            id,
            evacuate,
            wait,
            timeout,
        } => {
            let evacuate = evacuate || wait;
            let url = format!("{base}/v1/nodes/{id}/drain?evacuate={evacuate}");
            answer(http.post(url).send().await?).await?;
            println!(
                "{id}: draining{}",
                if evacuate { ", moving its streams" } else { "" }
            );
            if wait {
                return wait_empty(http, base, &id, Duration::from_secs(timeout)).await;
            }
        }
        NodesCmd::Undrain { id } => {
            answer(
                http.delete(format!("{base}/v1/nodes/{id}/drain"))
                    .send()
                    .await?,
            )
            .await?;
            println!("{id}: accepting streams");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls until node `id` runs no stream (or is dead); exit 1 with what it still runs after `limit`.
async fn wait_empty(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    limit: Duration,
) -> Result<ExitCode> {
    let t = Instant::now();
    let mut last = usize::MAX;
    loop {
        // a scheduler changing leader or Redis master answers 503 for a moment: keep asking until the limit
        let n = match node(http, base, id).await {
            Ok(n) => n,
            Err(e) if t.elapsed() < limit => {
                eprintln!("{id}: {e:#}; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let left = runs(&n);
        if n["state"] == "dead" {
            println!(
                "{id}: the node is dead (no heartbeat): the scheduler re-places its streams itself"
            );
            return Ok(ExitCode::SUCCESS);
        }
        if left.is_empty() {
            println!(
                "{id}: runs no stream (after {:.1} s)",
                t.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if left.len() != last {
            eprintln!(
                "{id}: {} stream(s) still here: {}",
                left.len(),
                left.join(", ")
            );
            last = left.len();
        }
        if t.elapsed() >= limit {
            eprintln!("{id}: still runs {} after {limit:?}", left.join(", "));
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
